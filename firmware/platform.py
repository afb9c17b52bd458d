# The one module that touches the hardware: machine, esp32, network. This is its unix-port twin,
# used by tools/devsim; boards/<BOARD>/platform.py replaces it on a real device. The app only
# calls what is defined here.
import sys
import time

NAME = "unix"
# Exit status that tells tools/devsim "reset me" (machine.reset() on a board).
RESET_EXIT = 3


def reset():
    """machine.reset(): on the unix port the process ends and devsim boots it again."""
    sys.stdout.flush() if hasattr(sys.stdout, "flush") else None
    sys.exit(RESET_EXIT)


def connect_network(config, log=print):
    """network.WLAN(STA_IF) on a board; the host's network is already up."""
    return True


def unique_id():
    return b"unix"


def feed_watchdog():
    pass


def sleep_ms(ms):
    time.sleep_ms(ms)
