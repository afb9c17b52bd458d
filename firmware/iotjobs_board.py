# The one module that touches the hardware: machine, esp32, network. This is its unix-port twin,
# used by tools/devsim; boards/esp32/iotjobs_board.py replaces it on a real device. The app only
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


def init_watchdog(settings=None):
    """machine.WDT(timeout=board.json wdt_ms) on a board; none here."""
    return None


def tick(now=None):
    """Feed the watchdog and drive the status LED (the main loop calls it); nothing here."""


def led(pattern, now=None):
    """Status LED pattern ("boot", "connecting", "online", "job", "error", "off"); no LED here."""


def sync_time(log=print, tries=4, host=None, sleep=None):
    """NTP (ntptime.settime) on a board; the host's clock is already right."""
    return True


def sleep_ms(ms):
    time.sleep_ms(ms)


# -- OTA: esp32.Partition on a board; here the twin whose files tools/devsim (the bootloader)
# keeps. Imported on first use, so a device that never updates pays no heap for it.
def partition_class():
    """esp32.Partition: Partition(Partition.RUNNING).get_next_update(), writeblocks, set_boot,
    Partition.mark_app_valid_cancel_rollback()."""
    import esp32sim

    return esp32sim.Partition


def ota_state():
    """{"slot": "ota_1", "version": "1.2.0", "pending": bool, "rolled_back": bool,
    "last_invalid": {"slot", "state", "version"} or None, "flags": {...}}; None without OTA
    partitions. `pending`: this image must confirm itself (mark_app_valid_cancel_rollback) or
    the next reset rolls it back; `rolled_back`: at this boot the bootloader abandoned an
    unconfirmed image (`last_invalid` says which, and stays until that slot is reused)."""
    import sys

    loaded = "esp32sim" in sys.modules
    import esp32sim

    try:
        return esp32sim.ota_state()
    except OSError:
        return None
    finally:
        if not loaded:  # the twin's code is heap on the unix port: let it go again
            del sys.modules["esp32sim"]


def ota_pending():
    """True when the running image is on trial (PENDING_VERIFY) and must confirm itself. Cheap:
    reads otadata without loading the Partition twin (checked at every boot)."""
    import os
    import json

    folder = os.getenv("IOTJOBS_OTA")
    if not folder:
        return False
    try:
        with open(folder + "/otadata.json") as f:
            od = json.load(f)
        return od["state"].get(os.getenv("IOTJOBS_RUNNING") or "ota_0") == "PENDING_VERIFY"
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def firmware_version():
    """The running image's version string (its header), or None without OTA partitions."""
    st = ota_state()
    return st["version"] if st else None
