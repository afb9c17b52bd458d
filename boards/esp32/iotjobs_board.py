# The one module that touches the hardware on an ESP32 board (ESP32_GENERIC, ESP32_GENERIC_S3,
# ESP32_GENERIC_C3): machine, network, esp32, ntptime. Deployed as `iotjobs_board.py` in place of the
# unix-port twin (firmware/iotjobs_board.py); the app only calls what both define.
#
# Board settings come from /board.json in the flash root:
#   {"board": "ESP32_GENERIC", "chip": "esp32", "led_pin": 2, "led_active_low": false,
#    "wdt_ms": 30000, "heap_budget_kb": 100, "transfer": "mqtt"}   (other keys are for the
#    host tools; "transfer" is the default way update files come, firmware/app.py)
# A missing or malformed file, or a wrong-typed value, gives the safe default for that key: no
# LED, no watchdog (once started machine.WDT cannot be stopped, so it is only started when a
# board asks for it).
#
# OTA state. MicroPython has no app-state API (esp_ota_get_state_partition is not exposed; PR
# #7048 is still open), so this module reads the otadata partition itself, as ESP-IDF lays it out
# (components/bootloader_support/include/esp_flash_partitions.h, app_update/esp_ota_ops.c,
# bootloader_support/src/bootloader_common_loader.c):
#   - two copies of esp_ota_select_entry_t, one at the start of each 4 KB sector of otadata:
#       uint32 ota_seq; uint8 seq_label[20]; uint32 ota_state; uint32 crc   (32 bytes, LE)
#   - crc = esp_rom_crc32_le(UINT32_MAX, &ota_seq, 4): the CRC covers ota_seq only; it equals
#     binascii.crc32(seq_bytes, 0xFFFFFFFF) (the IDF's own otatool.py computes it that way);
#   - an entry is usable when ota_seq != 0xFFFFFFFF, its state is not INVALID/ABORTED and its
#     crc matches (bootloader_common_ota_select_valid); the usable entry with the highest seq is
#     active (bootloader_common_get_active_otadata) and selects OTA slot (seq - 1) % app_count;
#   - ota_state: NEW 0, PENDING_VERIFY 1, VALID 2, INVALID 3, ABORTED 4, UNDEFINED 0xFFFFFFFF.
#     With CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE (MicroPython's ESP32 builds since PR #12475)
#     set_boot() writes NEW, the bootloader turns NEW into PENDING_VERIFY at the next boot and a
#     PENDING_VERIFY entry into ABORTED at the boot after (rollback).
# So `pending` (this image must confirm itself) is: the active entry selects the running slot
# and is PENDING_VERIFY. `last_invalid` follows esp_ota_get_last_invalid_partition (the
# INVALID/ABORTED entry with the lowest seq, if it names another slot), without its image check.
# `rolled_back` is an approximation: the newest entry is the abandoned one, i.e. the last boot
# selection was rolled back and nothing was set to boot since (it stays true until the next
# set_boot, not only at the boot at which the rollback happened as in the unix twin).
#
# Firmware version: the running image's esp_app_desc_t.version (the app descriptor sits at
# offset 32 of an app image, after the 24-byte esp_image_header_t and the 8-byte segment header;
# magic 0xABCD5432, version char[32] at offset 16 of it; esp_ota_get_partition_description
# reads it there). Stock MicroPython images leave it empty (ports/esp32/boards/sdkconfig.base
# sets CONFIG_APP_EXCLUDE_PROJECT_VER_VAR=y), and then this is None: the OTA handler skips its
# downgrade check rather than compare against MicroPython's own release number. A frozen fleet
# build sets CONFIG_APP_EXCLUDE_PROJECT_VER_VAR=n, CONFIG_APP_PROJECT_VER_FROM_CONFIG=y and
# CONFIG_APP_PROJECT_VER="1.2.0" in the board's sdkconfig. A file in the filesystem cannot
# stand in: both slots share the filesystem, so it could not tell which image runs.
import time
import machine
from micropython import const

NAME = "esp32"
RESET_EXIT = 3  # the unix twin's exit status for "reset me"; unused on a board
BOARD_JSON = "/board.json"

_SLICE_MS = const(50)  # longest sleep between two watchdog feeds / LED updates
_JOIN_POLL_MS = const(100)
_WIFI_TRIES = const(5)
_WIFI_WAIT_MS = const(10000)  # per attempt, for isconnected()
_BACKOFF_FIRST_MS = const(1000)
_BACKOFF_MAX_MS = const(16000)
_NTP_TRIES = const(4)

# status() codes of the ESP32 port that say "the password": network.STAT_WRONG_PASSWORD
# (WIFI_REASON_AUTH_FAIL), STAT_HANDSHAKE_TIMEOUT and the raw WIFI_REASON_4WAY_HANDSHAKE_TIMEOUT,
# which is what a wrong WPA2 key usually ends in.
_PASSWORD_CODES = (202, 204, 15)

# ESP-IDF partition and otadata constants (esp_flash_partitions.h)
_SUBTYPE_DATA_OTA = const(0x00)
_SUBTYPE_OTA_0 = const(0x10)
_ENTRY_SIZE = const(32)
_SEQ_ERASED = 0xFFFFFFFF
OTA_NEW = const(0)
OTA_PENDING_VERIFY = const(1)
OTA_VALID = const(2)
OTA_INVALID = const(3)
OTA_ABORTED = const(4)
OTA_UNDEFINED = 0xFFFFFFFF
_APP_DESC_OFFSET = const(32)  # sizeof(esp_image_header_t) + sizeof(esp_image_segment_header_t)
_APP_DESC_MAGIC = 0xABCD5432

_DEFAULTS = {"board": "ESP32_GENERIC", "chip": "esp32", "led_pin": None, "led_active_low": False,
             "wdt_ms": 0, "heap_budget_kb": 100, "transfer": "mqtt"}

# LED patterns: durations in ms, alternately on and off, repeated; () is off, (n,) steady on.
# Every phase is >= 250 ms so a tick every 250 ms or faster shows them all.
PATTERNS = {
    "off": (),
    "boot": (1000,),
    "connecting": (250, 250),
    "online": (250, 1750),
    "job": (500, 500),
    "error": (250, 250, 250, 1250),
}

_board = None
_wdt = None
_led_ready = False
_pin = None
_active_low = 0
_pat = None
_period = 0
_t0 = 0
_level = -1


def _log_nothing(msg, level="info"):
    pass


# -- board settings ------------------------------------------------------------------------------
def _valid(key, v):
    if key == "led_pin":
        return v is None or (type(v) is int and v >= 0)
    if key == "led_active_low":
        return type(v) is bool
    if key == "wdt_ms":  # 0: no watchdog; the IDF task watchdog counts whole seconds on old IDFs
        return type(v) is int and (v == 0 or v >= 1000)
    if key == "heap_budget_kb":
        return type(v) is int and v > 0
    if key == "transfer":  # how update files come: "mqtt" (one TLS session) or "http"
        return v in ("mqtt", "http")
    return type(v) is str


def load_board(path=BOARD_JSON, log=_log_nothing):
    """board.json merged over the defaults; never raises."""
    b = dict(_DEFAULTS)
    try:
        import json

        with open(path) as f:
            d = json.load(f)
    except OSError:
        return b  # no file: defaults
    except ValueError:
        log("board.json is not valid JSON: defaults used", "warning")
        return b
    if not isinstance(d, dict):
        log("board.json is not an object: defaults used", "warning")
        return b
    for k in _DEFAULTS:
        if k in d:
            if _valid(k, d[k]):
                b[k] = d[k]
            else:
                log("board.json: bad %s %r, default kept" % (k, d[k]), "warning")
    return b


def board():
    """The board settings (read once)."""
    global _board
    if _board is None:
        _board = load_board()
    return _board


# -- reset, identity, time -----------------------------------------------------------------------
def reset():
    machine.reset()


def unique_id():
    return machine.unique_id()


def sleep_ms(ms, sleep=None):
    """time.sleep_ms (or `sleep`) in slices of at most 50 ms, feeding the watchdog and driving
    the LED between them: the runner's pauses between reconnect attempts can be longer than
    the watchdog's timeout."""
    _pause(ms, sleep)


def _pause(ms, sleep):
    if sleep is None:
        sleep = time.sleep_ms
    while ms > 0:
        tick()
        n = ms if ms < _SLICE_MS else _SLICE_MS
        sleep(n)
        ms -= n
    tick()


def tick(now=None):
    """Feed the watchdog and update the LED: call it from the main loop (never blocks, never
    allocates)."""
    if _wdt is not None:
        _wdt.feed()
    led_tick(now)


# -- watchdog ------------------------------------------------------------------------------------
def init_watchdog(settings=None):
    """Start machine.WDT(timeout=wdt_ms) once, if the board asks for one. It cannot be stopped
    afterwards: from now on the main loop must feed it (tick / feed_watchdog)."""
    global _wdt
    if _wdt is None:
        ms = (settings or board()).get("wdt_ms")
        if ms:
            _wdt = machine.WDT(timeout=ms)
    return _wdt


def feed_watchdog():
    if _wdt is not None:
        _wdt.feed()


# -- status LED ----------------------------------------------------------------------------------
def init_led(settings=None):
    """Set up the LED pin from the board settings (none: every LED call does nothing)."""
    global _led_ready, _pin, _active_low, _level
    b = settings or board()
    _led_ready = True
    _level = -1
    pin = b.get("led_pin")
    _active_low = 1 if b.get("led_active_low") else 0
    _pin = None if pin is None else machine.Pin(pin, machine.Pin.OUT, value=_active_low)
    _level = _active_low  # off
    return _pin


def led(pattern, now=None):
    """Show a pattern ("boot", "connecting", "online", "job", "error", "off"); it then runs
    from tick()/led_tick()."""
    global _pat, _period, _t0
    p = PATTERNS.get(pattern)
    if p is None:
        raise ValueError("unknown LED pattern %r" % (pattern,))
    if not _led_ready:
        init_led()
    _pat = p
    _period = sum(p)
    _t0 = time.ticks_ms() if now is None else now
    led_tick(now)


def led_tick(now=None):
    """Set the LED to what the pattern says for this instant; writes the pin only on a change."""
    global _level
    p = _pat
    if _pin is None or p is None:
        return
    on = 0
    if p:
        if now is None:
            now = time.ticks_ms()
        t = time.ticks_diff(now, _t0) % _period
        i = 0
        for d in p:
            if t < d:
                break
            t -= d
            i += 1
        on = 0 if i & 1 else 1
    lvl = on ^ _active_low
    if lvl != _level:
        _pin.value(lvl)
        _level = lvl


# -- Wi-Fi ---------------------------------------------------------------------------------------
def connect_network(config, log=print, sleep=None):
    """Join the Wi-Fi of config["wifi"] {"ssid", "password", "tries", "wait_s"}: up to `tries`
    attempts (5), each waiting up to wait_s (10) for isconnected(), with 1, 2, 4, 8, 16 s
    between attempts; the watchdog is fed and the LED driven all the while. True when joined;
    False (never an exception) when not, the station then left retrying on its own."""
    wifi = config.get("wifi") or {}
    ssid = wifi.get("ssid") if isinstance(wifi, dict) else None
    import network

    wlan = network.WLAN(network.STA_IF)
    try:
        wlan.active(True)
        if wlan.isconnected():
            led("online")
            return True
    except OSError as e:
        log("wifi: cannot start the station interface: %r" % (e,), "error")
        return False
    if not ssid:
        log("wifi: config.json has no wifi.ssid", "error")
        return False
    # One IDF attempt per connect() while joining: the retrying (and its backoff) happens
    # here, and a failed attempt shows its reason in status() (reconnects=-1, the default,
    # keeps reporting STAT_CONNECTING).
    _reconnects(wlan, 0)
    idle = getattr(network, "STAT_IDLE", 1000)
    connecting = getattr(network, "STAT_CONNECTING", 1001)
    got_ip = getattr(network, "STAT_GOT_IP", 1010)
    tries = wifi.get("tries", _WIFI_TRIES)
    polls = wifi.get("wait_s", _WIFI_WAIT_MS // 1000) * 1000 // _JOIN_POLL_MS
    led("connecting")
    delay = _BACKOFF_FIRST_MS
    for attempt in range(1, tries + 1):
        status = None
        try:
            wlan.connect(ssid, wifi.get("password"))
            for _ in range(polls):
                if wlan.isconnected():
                    break
                status = wlan.status()
                if status != connecting and status != idle and status != got_ip:
                    break  # the attempt has failed: no point waiting longer
                _pause(_JOIN_POLL_MS, sleep)
            if wlan.isconnected():
                log("wifi: joined %s as %s" % (ssid, wlan.ifconfig()[0]))
                _reconnects(wlan, -1)  # from now on the IDF re-associates after a drop
                led("online")
                return True
        except OSError as e:
            status = e
        if status in _PASSWORD_CODES:
            log("wifi: %s refused the password (attempt %d/%d, status %d)"
                % (ssid, attempt, tries, status), "error")
        else:
            log("wifi: no link to %s (attempt %d/%d, status %r)" % (ssid, attempt, tries, status),
                "warning")
        try:
            wlan.disconnect()  # abandon this attempt before the next one
        except OSError:
            pass
        if attempt < tries:
            _pause(delay, sleep)
            delay = min(delay * 2, _BACKOFF_MAX_MS)
    # Give up for now, but leave the IDF trying in the background: the link may still come
    # while the runner waits for the broker.
    _reconnects(wlan, -1)
    try:
        wlan.connect(ssid, wifi.get("password"))
    except OSError:
        pass
    log("wifi: no link after %d attempts; the station keeps trying" % tries, "error")
    led("error")
    return False


def _reconnects(wlan, n):
    try:
        wlan.config(reconnects=n)
    except (OSError, ValueError, TypeError):
        pass  # older firmware has no such option


# -- clock ---------------------------------------------------------------------------------------
def sync_time(log=print, tries=_NTP_TRIES, host=None, sleep=None):
    """Set the RTC from NTP (ntptime.settime, UTC): TLS needs a true clock to check certificate
    validity. Retries with 1, 2, 4 s pauses; returns whether the clock was set, never raises."""
    try:
        import ntptime
    except ImportError:
        log("ntp: no ntptime module in this firmware", "error")
        return False
    if host:
        ntptime.host = host
    delay = _BACKOFF_FIRST_MS
    for attempt in range(1, tries + 1):
        try:
            ntptime.settime()
            log("ntp: clock set, %d-%02d-%02d %02d:%02d:%02d UTC" % time.gmtime()[:6])
            return True
        except Exception as e:  # OSError (DNS, timeout) or whatever the reply makes it raise
            log("ntp: attempt %d/%d failed: %r" % (attempt, tries, e), "warning")
        if attempt < tries:
            _pause(delay, sleep)
            delay = min(delay * 2, _BACKOFF_MAX_MS)
    return False


# -- OTA -----------------------------------------------------------------------------------------
def partition_class():
    """esp32.Partition."""
    import esp32

    return esp32.Partition


def _crc(buf):
    import binascii

    return binascii.crc32(memoryview(buf)[:4], 0xFFFFFFFF)


def read_otadata(P=None):
    """Both otadata entries as [(ota_seq, ota_state, crc_ok), (...)] (crc_ok is false for an
    erased or torn entry), or None without an otadata partition."""
    import struct

    P = P or partition_class()
    parts = P.find(P.TYPE_DATA, _SUBTYPE_DATA_OTA)
    if not parts:
        return None
    part = parts[0]
    buf = bytearray(_ENTRY_SIZE)
    out = []
    for sector in (0, 1):  # 4096-byte blocks: block n is otadata sector n
        part.readblocks(sector, buf)
        seq = struct.unpack_from("<I", buf)[0]
        state, crc = struct.unpack_from("<II", buf, 24)
        out.append((seq, state, seq != _SEQ_ERASED and crc == _crc(buf)))
    return out


def active_entry(e):
    """Index of the active otadata entry (highest seq among usable ones), or -1."""
    best = -1
    for i in (0, 1):
        seq, st, ok = e[i]
        if ok and st != OTA_INVALID and st != OTA_ABORTED and (best < 0 or seq > e[best][0]):
            best = i
    return best


def _last_invalid_entry(e):
    # get_last_invalid_otadata: bootloader_common_select_otadata(..., max=false)
    bad = -1
    for i in (0, 1):
        seq, st, ok = e[i]
        if ok and (st == OTA_INVALID or st == OTA_ABORTED) and (bad < 0 or seq < e[bad][0]):
            bad = i
    return bad


def _app_count(P):
    # esp_ota_get_app_partition_count: ota_0, ota_1, ... without a gap
    n = 0
    while P.find(P.TYPE_APP, _SUBTYPE_OTA_0 + n):
        n += 1
    return n


def _pending(P, e, n, run):
    a = active_entry(e)
    return (a >= 0 and e[a][1] == OTA_PENDING_VERIFY
            and (e[a][0] - 1) % n == run[1] - _SUBTYPE_OTA_0)


def app_version(part):
    """esp_app_desc_t.version of the image in `part`, or None without a descriptor."""
    import struct

    buf = bytearray(48)  # magic, secure_version, reserv1[2], version[32]
    try:
        part.readblocks(0, buf, _APP_DESC_OFFSET)
    except OSError:
        return None
    if struct.unpack_from("<I", buf)[0] != _APP_DESC_MAGIC:
        return None
    v = bytes(buf[16:48])
    end = v.find(b"\x00")
    v = (v if end < 0 else v[:end]).decode()
    return v or None


def ota_state():
    """{"slot", "version", "pending", "rolled_back", "last_invalid", "flags"} as the unix twin
    gives it (see the top of this file for how each is found); None without OTA partitions."""
    P = partition_class()
    e = read_otadata(P)
    n = _app_count(P)
    if e is None or n == 0:
        return None
    # esp32.Partition(id): a label, or BOOT / RUNNING (ints) as MicroPython's documentation
    # says; the stubs type id as str only, hence the marks below
    run = P(P.RUNNING).info()  # pyright: ignore[reportArgumentType]
    last = None
    rolled = False
    b = _last_invalid_entry(e)
    if b >= 0:
        label = P.find(P.TYPE_APP, _SUBTYPE_OTA_0 + (e[b][0] - 1) % n)[0].info()[4]
        if label != run[4]:
            last = {"slot": label, "state": "INVALID" if e[b][1] == OTA_INVALID else "ABORTED",
                    "version": app_version(P(label))}
            a = active_entry(e)
            rolled = a < 0 or e[b][0] > e[a][0]
    return {
        "slot": run[4],
        "version": app_version(P(P.RUNNING)),  # pyright: ignore[reportArgumentType]
        "pending": _pending(P, e, n, run),
        "rolled_back": rolled,
        "last_invalid": last,
        "flags": {},
    }


def ota_pending():
    """True when the running image is on trial (PENDING_VERIFY) and must confirm itself
    (Partition.mark_app_valid_cancel_rollback) before the next reset."""
    try:
        P = partition_class()
        e = read_otadata(P)
        n = _app_count(P)
        if e is None or n == 0:
            return False
        return _pending(P, e, n, P(P.RUNNING).info())  # pyright: ignore[reportArgumentType]  (stubs: id is str only; RUNNING is an int, as documented)
    except (ImportError, OSError):
        return False


def firmware_version():
    """The running image's version (esp_app_desc_t.version), or None."""
    try:
        P = partition_class()
        return app_version(P(P.RUNNING))  # pyright: ignore[reportArgumentType]  (stubs: id is str only; RUNNING is an int, as documented)
    except (ImportError, OSError):
        return None
