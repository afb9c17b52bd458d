# Fake of micropython-lib's `ntptime` (frozen into the ESP32 firmware) for tests of
# boards/esp32/iotjobs_board.py. The real settime() asks `host` over UDP with a `timeout`-second
# socket and sets machine.RTC() to UTC; it raises OSError when DNS fails or no answer comes in
# time (micropython-lib micropython/net/ntptime/ntptime.py).
#
# FAIL: how many settime() calls fail (OSError ETIMEDOUT) before one succeeds; -1: all fail.
import errno

import machine

host = "pool.ntp.org"
timeout = 1
FAIL = 0
calls = 0
UTC = (2026, 3, 14, 5, 15, 9, 26, 0)  # machine.RTC().datetime() tuple set on success


def reset(fail=0):
    global FAIL, calls, host
    FAIL = fail
    calls = 0
    host = "pool.ntp.org"
    machine.RTC.dt = None


def settime():
    global calls
    calls += 1
    if FAIL < 0 or calls <= FAIL:
        raise OSError(errno.ETIMEDOUT)
    machine.RTC().datetime(UTC)
