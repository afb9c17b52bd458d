# Fake of MicroPython's `network` (ESP32 port) for tests of boards/esp32/iotjobs_board.py.
#
# Behaviour as docs.micropython.org (library/network.WLAN.html) describes it and the ESP32 port
# (ports/esp32/network_wlan.c) implements it:
#   - WLAN(STA_IF) is a singleton per interface; connect() needs active(True) first ("Wifi Not
#     Started" OSError otherwise) and returns at once: the join happens in the background;
#   - isconnected() is true once the station has an IP address; status() is STAT_GOT_IP then,
#     STAT_CONNECTING while an attempt runs, STAT_IDLE before any, and after a failed attempt the
#     IDF's reason (STAT_NO_AP_FOUND 201, STAT_WRONG_PASSWORD 202, ...), but only when the
#     retry budget config(reconnects=n) is spent: with the default (-1, retry for ever) a failed
#     join keeps saying STAT_CONNECTING (here one attempt stands for the IDF's whole budget);
#   - config(reconnects=n) / config("reconnects"); an unknown name raises ValueError.
#
# Scripted behaviour (a test edits SCRIPT after reset()):
#   ssid, password: the access point that exists and its password (other ssid: NO_AP_FOUND;
#                   other password: WRONG_PASSWORD);
#   join_on:        the connect() call (1-based) from which joining succeeds; None: never;
#   polls:          isconnected()/status() calls an attempt takes before its outcome shows;
#   fail:           the reason a failing attempt with the right credentials ends with;
#   connect_errors: how many connect() calls raise OSError("Wifi Internal Error") (the ESP32
#                   port raises it, for one, when connect() comes while an attempt still runs).
# EVENTS records ("connect" | "disconnect", machine.now()) for timing checks.
import machine

STA_IF = 0
AP_IF = 1
STAT_IDLE = 1000
STAT_CONNECTING = 1001
STAT_GOT_IP = 1010
STAT_BEACON_TIMEOUT = 200
STAT_NO_AP_FOUND = 201
STAT_WRONG_PASSWORD = 202
STAT_ASSOC_FAIL = 203
STAT_HANDSHAKE_TIMEOUT = 204
_ASSOC_LEAVE = 8  # WIFI_REASON_ASSOC_LEAVE: what disconnect() leaves in status()

SCRIPT = {}
EVENTS = []
_ifaces = {}


def reset(**script):
    """Forget every interface and event; SCRIPT = defaults updated with `script`."""
    SCRIPT.clear()
    SCRIPT.update({"ssid": "lab", "password": "secret", "join_on": 1, "polls": 2,
                   "fail": STAT_NO_AP_FOUND, "connect_errors": 0})
    SCRIPT.update(script)
    EVENTS.clear()
    _ifaces.clear()


def WLAN(interface_id=STA_IF):
    w = _ifaces.get(interface_id)
    if w is None:
        w = _ifaces[interface_id] = _WLAN(interface_id)
    return w


class _WLAN:
    def __init__(self, if_id):
        self.if_id = if_id
        self._active = False
        self._requested = False
        self._connected = False
        self._reason = 0
        self._conf_reconnects = 0  # 0: for ever (config reconnects=-1), else n + 1
        self._outcome = None  # (polls left, reason or STAT_GOT_IP) of the running attempt
        self.attempts = 0

    def active(self, is_active=None):
        if is_active is None:
            return self._active
        self._active = bool(is_active)
        if not self._active:
            self._requested = False
            self._connected = False
            self._outcome = None

    def config(self, *args, **kw):
        if args:
            if args[0] != "reconnects":
                raise ValueError("unknown config param")
            return self._conf_reconnects - 1
        for k in kw:
            if k != "reconnects":
                raise ValueError("unknown config param")
            n = kw[k]
            self._conf_reconnects = 0 if n == -1 else n + 1

    def connect(self, ssid=None, key=None, *, bssid=None):
        if not self._active:
            raise OSError("Wifi Not Started")
        self.attempts += 1
        EVENTS.append(("connect", machine.now()))
        if self.attempts <= SCRIPT["connect_errors"]:
            raise OSError("Wifi Internal Error")
        if ssid != SCRIPT["ssid"]:
            result = STAT_NO_AP_FOUND
        elif key != SCRIPT["password"]:
            result = STAT_WRONG_PASSWORD
        elif SCRIPT["join_on"] is not None and self.attempts >= SCRIPT["join_on"]:
            result = STAT_GOT_IP
        else:
            result = SCRIPT["fail"]
        self._requested = True
        self._connected = False
        self._outcome = [SCRIPT["polls"], result]

    def disconnect(self):
        EVENTS.append(("disconnect", machine.now()))
        if self._connected:
            self._reason = _ASSOC_LEAVE
        self._requested = False
        self._connected = False
        self._outcome = None

    def _progress(self):
        o = self._outcome
        if o is None:
            return
        if o[0] > 0:
            o[0] -= 1
            return
        self._outcome = None
        if o[1] == STAT_GOT_IP:
            self._connected = True
            self._reason = 0
        else:
            self._reason = o[1]

    def isconnected(self):
        self._progress()
        return self._connected

    def status(self, param=None):
        if param is not None:
            if param == "rssi" and self._connected:
                return -60
            raise ValueError("unknown status param")
        self._progress()
        if self._connected:
            return STAT_GOT_IP
        if self._requested and (self._outcome is not None or self._conf_reconnects == 0):
            return STAT_CONNECTING  # attempt running, or the IDF retries for ever
        if self._reason == 0:
            return STAT_IDLE
        return self._reason

    def ifconfig(self, config=None):
        if self._connected:
            return ("192.168.1.50", "255.255.255.0", "192.168.1.1", "192.168.1.1")
        return ("0.0.0.0", "0.0.0.0", "0.0.0.0", "0.0.0.0")


reset()
