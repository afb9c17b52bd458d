# Fake of MicroPython's `machine` for tests of boards/esp32/iotjobs_board.py under the unix port. A
# test puts host_tests/device/fakes first on sys.path; `machine` is an extensible built-in, so
# this file then shadows the unix port's own.
#
# Behaviour as docs.micropython.org describes the real one (library/machine.WDT.html,
# machine.Pin.html, machine.html) and the ESP32 port implements it:
#   - WDT(id=0, timeout=5000): starts at once; timeout in ms; cannot be stopped or changed;
#     feed() restarts the countdown. The real one resets the chip when it runs out; this fake
#     cannot interrupt the test, so a feed (or check()) that comes too late raises
#     WatchdogExpired: the test fails as the board would have reset.
#   - reset() never returns: it raises ResetCalled (a BaseException, so no `except Exception`
#     in the code under test can swallow it).
#   - unique_id() is the 6-byte MAC on an ESP32.
#   - Pin(id, mode, pull, *, value=...): value([x]), on(), off(), init(); `writes` counts the
#     level writes and every level change is kept in `history` as (clock ms, level) unless a
#     test sets history to None.
# Clock: time.ticks_ms() unless a test calls use_fake_clock(); then only advance() moves it, so
# a test records sleeps instead of sleeping.
import time

UNIQUE_ID = b"\x24\x0a\xc4\x12\x34\x56"
_now = None
resets = 0


def now():
    return time.ticks_ms() if _now is None else _now


def use_fake_clock(start=0):
    global _now
    _now = start


def advance(ms):
    global _now
    _now = time.ticks_add(now(), ms)


class ResetCalled(BaseException):
    """machine.reset() was called (the board would restart here)."""


class WatchdogExpired(BaseException):
    """The watchdog was not fed within its timeout (the board would have reset)."""


def reset():
    global resets
    resets += 1
    raise ResetCalled()


def unique_id():
    return UNIQUE_ID


class WDT:
    instances = 0
    last = None

    def __init__(self, id=0, timeout=5000):
        if id != 0:
            raise ValueError("WDT id")
        if timeout <= 0:
            raise ValueError("WDT timeout too short")
        WDT.instances += 1
        WDT.last = self
        self.timeout = timeout
        self.feeds = 0
        self.fed_at = now()

    def check(self):
        late = time.ticks_diff(now(), self.fed_at)
        if late > self.timeout:
            raise WatchdogExpired(late)

    def feed(self):
        self.check()
        self.fed_at = now()
        self.feeds += 1


class Pin:
    IN = 1
    OUT = 3
    OPEN_DRAIN = 7
    PULL_UP = 2
    PULL_DOWN = 1
    made = {}  # id -> the last Pin object made for it

    def __init__(self, id, mode=-1, pull=-1, *, value=None, drive=None, hold=None):
        self.id = id
        self.mode = None
        self.pull = None
        self.level = None
        self.writes = 0
        self.history = []
        Pin.made[id] = self
        self.init(mode, pull, value=value)

    def init(self, mode=-1, pull=-1, *, value=None, drive=None, hold=None):
        if mode != -1:
            self.mode = mode
        if pull != -1:
            self.pull = pull
        if value is not None:
            self._set(value)

    def _set(self, x):
        self.writes += 1
        x = 1 if x else 0
        if x != self.level:
            self.level = x
            if self.history is not None:
                self.history.append((now(), x))

    def value(self, x=None):
        if x is None:
            return self.level or 0
        self._set(x)

    def __call__(self, x=None):
        return self.value(x)

    def on(self):
        self._set(1)

    def off(self):
        self._set(0)


class RTC:
    dt = None

    def datetime(self, dt=None):
        if dt is None:
            return RTC.dt
        RTC.dt = tuple(dt)
