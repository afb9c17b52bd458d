# The ESP32 board module (boards/esp32/iotjobs_board.py) against fakes of the hardware edge
# (host_tests/device/fakes: machine, network, ntptime, esp32), which behave as MicroPython's
# documentation says the real modules do. Sleeps go to a recorder that moves the fake clock, so
# minutes of Wi-Fi backoff take no time and the watchdog fake still sees them.
import sys

_HERE = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
# Fakes first (they shadow the unix port's own machine), then the ESP32 board module ahead
# of firmware/iotjobs_board.py (the unix twin, on MICROPYPATH).
sys.path.insert(0, _HERE + "/../../boards/esp32")
sys.path.insert(0, _HERE + "/fakes")

import micropython  # noqa: E402

import esp32  # noqa: E402
import machine  # noqa: E402
import network  # noqa: E402
import ntptime  # noqa: E402
import iotjobs_board as P  # noqa: E402

WIFI = {"wifi": {"ssid": "lab", "password": "secret"}}
LED = {"led_pin": 2, "led_active_low": False, "wdt_ms": 0}


class Log:
    def __init__(self):
        self.lines = []

    def __call__(self, msg, level="info"):
        self.lines.append((level, msg))

    def has(self, text, level=None):
        return any(text in m and level in (None, lv) for lv, m in self.lines)


class Sleeps:
    """An injectable sleep: records each call and moves the fake clock instead of waiting."""

    def __init__(self):
        self.ms = []

    def __call__(self, ms):
        self.ms.append(ms)
        machine.advance(ms)


def raises(exc, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except exc as e:
        return e
    raise AssertionError("%s not raised" % exc.__name__)


def connect_gaps():
    t = [at for what, at in network.EVENTS if what == "connect"]
    return [t[i + 1] - t[i] for i in range(len(t) - 1)]


def start_watchdog(ms=2000):
    machine.use_fake_clock(0)
    wdt = P.init_watchdog({"wdt_ms": ms})
    assert wdt is machine.WDT.last and wdt.timeout == ms
    return wdt


def board_from(text, log=None):
    """load_board() of a board.json holding `text` (written to a scratch file, then removed)."""
    import os

    path = (os.getenv("IOTJOBS_TEST_TMP") or "/tmp") + "/board-%s.json" % "".join(
        "%02x" % b for b in os.urandom(6))
    with open(path, "w") as f:
        f.write(text)
    try:
        return P.load_board(path, log) if log else P.load_board(path)
    finally:
        os.remove(path)


# -- board.json ----------------------------------------------------------------------------------
def test_board_json_missing_gives_defaults():
    b = P.load_board("/nonexistent/board.json")
    assert b == {"board": "ESP32_GENERIC", "chip": "esp32", "led_pin": None,
                 "led_active_low": False, "wdt_ms": 0, "heap_budget_kb": 100, "transfer": "mqtt"}


def test_board_json_read():
    b = board_from('{"board": "ESP32_GENERIC_S3", "chip": "esp32s3", "led_pin": 48,'
                   ' "led_active_low": true, "wdt_ms": 30000, "heap_budget_kb": 96, "x": 1,'
                   ' "transfer": "http"}')
    assert b == {"board": "ESP32_GENERIC_S3", "chip": "esp32s3", "led_pin": 48,
                 "led_active_low": True, "wdt_ms": 30000, "heap_budget_kb": 96, "transfer": "http"}


def test_board_json_malformed_gives_defaults():
    log = Log()
    b = board_from('{"led_pin": 2,', log)
    assert b["led_pin"] is None and b["wdt_ms"] == 0
    assert log.has("not valid JSON", "warning")
    b = board_from("[1, 2]", log)
    assert b == P.load_board("/nonexistent")
    assert log.has("not an object")


def test_board_json_bad_values_keep_defaults():
    log = Log()
    b = board_from('{"led_pin": "2", "led_active_low": 1, "wdt_ms": 500,'
                   ' "heap_budget_kb": 0, "board": "ESP32_GENERIC_C3", "chip": 3,'
                   ' "transfer": "ftp"}', log)
    assert b == {"board": "ESP32_GENERIC_C3", "chip": "esp32", "led_pin": None,
                 "led_active_low": False, "wdt_ms": 0, "heap_budget_kb": 100, "transfer": "mqtt"}
    assert len(log.lines) == 6  # one warning per rejected value


# -- Wi-Fi ---------------------------------------------------------------------------------------
def test_wifi_joins_at_once():
    network.reset(join_on=1, polls=2)
    machine.use_fake_clock(0)
    log, sleeps = Log(), Sleeps()
    assert P.connect_network(WIFI, log, sleeps) is True
    wlan = network.WLAN(network.STA_IF)
    assert wlan.attempts == 1 and wlan.isconnected() and wlan.active()
    assert wlan.config("reconnects") == -1  # joined: the IDF re-associates after a drop
    assert sum(sleeps.ms) < 1000  # no backoff, only polling
    assert max(sleeps.ms) <= 50  # sliced: the watchdog is fed at least every 50 ms
    assert log.has("joined lab as 192.168.1.50")
    # Already joined: no new attempt.
    assert P.connect_network(WIFI, log, sleeps) is True and wlan.attempts == 1


def test_wifi_joins_after_three_failures_with_growing_delays():
    network.reset(join_on=4, polls=3, fail=network.STAT_NO_AP_FOUND)
    wdt = start_watchdog(2000)
    log, sleeps = Log(), Sleeps()
    assert P.connect_network(WIFI, log, sleeps) is True
    wlan = network.WLAN()
    assert wlan.attempts == 4 and wlan.config("reconnects") == -1
    gaps = connect_gaps()
    # Each gap is the attempt's polling (~200 ms) plus the backoff: 1 s, 2 s, 4 s.
    for gap, backoff in zip(gaps, (1000, 2000, 4000)):
        assert backoff <= gap < backoff + 500, gaps
    assert len(gaps) == 3
    assert sum(1 for lv, m in log.lines if "no link to lab" in m and "201" in m) == 3
    assert wdt.feeds > 7000 // 50
    wdt.check()  # never starved


def test_wifi_never_joins_returns_false_and_feeds_the_watchdog():
    network.reset(join_on=None, polls=1)
    wdt = start_watchdog(1000)
    log, sleeps = Log(), Sleeps()
    cfg = {"wifi": {"ssid": "lab", "password": "secret", "tries": 7, "wait_s": 2}}
    assert P.connect_network(cfg, log, sleeps) is False
    wlan = network.WLAN()
    assert wlan.attempts == 7 + 1  # the last: a join left running in the background
    assert network.EVENTS[-1][0] == "connect" and wlan.config("reconnects") == -1
    gaps = connect_gaps()[:-1]
    assert len(gaps) == 6
    for gap, backoff in zip(gaps, (1000, 2000, 4000, 8000, 16000, 16000)):
        assert backoff <= gap < backoff + 500, gaps
    assert not wlan.isconnected() and log.has("keeps trying", "error")
    assert wdt.feeds >= 47000 // 50 and max(sleeps.ms) <= 50
    wdt.check()
    assert P._pat == P.PATTERNS["error"]


def test_wifi_waits_for_a_slow_join_within_wait_s():
    network.reset(join_on=1, polls=40)  # 40 polls of 100 ms: about 2 s
    wdt = start_watchdog(1000)
    assert P.connect_network(WIFI, Log(), Sleeps()) is True
    assert network.WLAN().attempts == 1
    assert machine.now() >= 1900
    wdt.check()


def test_wifi_attempt_times_out_after_wait_s():
    # The IDF retries for ever when reconnects is unsupported: status stays CONNECTING.
    network.reset(join_on=None, polls=1)
    machine.use_fake_clock(0)
    wlan = network.WLAN()

    def no_reconnects(*args, **kw):
        raise ValueError("unknown config param")

    wlan.config = no_reconnects
    sleeps = Sleeps()
    cfg = {"wifi": {"ssid": "lab", "password": "secret", "tries": 2, "wait_s": 3}}
    assert P.connect_network(cfg, Log(), sleeps) is False
    assert wlan.attempts == 2 + 1
    assert 3000 + 1000 <= connect_gaps()[0] < 3000 + 1000 + 200


def test_wifi_wrong_password():
    network.reset(password="secret", polls=1)
    machine.use_fake_clock(0)
    log = Log()
    cfg = {"wifi": {"ssid": "lab", "password": "guess", "tries": 3}}
    assert P.connect_network(cfg, log, Sleeps()) is False
    assert network.WLAN().attempts == 3 + 1
    assert sum(1 for lv, m in log.lines if "refused the password" in m and lv == "error") == 3
    assert network.WLAN().status() == network.STAT_CONNECTING  # the IDF retries on its own


def test_wifi_unknown_ssid():
    network.reset(polls=1)
    machine.use_fake_clock(0)
    log = Log()
    cfg = {"wifi": {"ssid": "elsewhere", "password": "secret", "tries": 2}}
    assert P.connect_network(cfg, log, Sleeps()) is False
    assert log.has("status 201")


def test_wifi_connect_oserror_is_retried():
    network.reset(join_on=3, connect_errors=2, polls=1)
    machine.use_fake_clock(0)
    log = Log()
    assert P.connect_network(WIFI, log, Sleeps()) is True
    assert network.WLAN().attempts == 3
    assert log.has("Wifi Internal Error")


def test_wifi_without_ssid_returns_false():
    network.reset()
    log = Log()
    assert P.connect_network({}, log, Sleeps()) is False
    assert P.connect_network({"wifi": "lab"}, log, Sleeps()) is False
    assert network.WLAN().attempts == 0 and log.has("no wifi.ssid", "error")


# -- watchdog ------------------------------------------------------------------------------------
def test_watchdog_started_once_and_fed_while_sleeping():
    wdt = start_watchdog(1000)
    assert P.init_watchdog({"wdt_ms": 5000}) is wdt and machine.WDT.instances == 1
    sleeps = Sleeps()
    P.sleep_ms(10000, sleeps)
    assert sum(sleeps.ms) == 10000 and max(sleeps.ms) == 50
    assert wdt.feeds >= 200
    wdt.check()


def test_watchdog_fake_catches_starvation():
    start_watchdog(1000)
    P.feed_watchdog()
    machine.advance(999)
    P.feed_watchdog()
    machine.advance(1001)
    raises(machine.WatchdogExpired, P.feed_watchdog)


def test_no_watchdog_without_wdt_ms():
    assert P.init_watchdog({"wdt_ms": 0}) is None
    P.feed_watchdog()
    P.tick()
    assert machine.WDT.instances == 0


def test_tick_and_feed_allocate_nothing():
    start_watchdog(1000)
    P.init_led(LED)
    pin = machine.Pin.made[2]
    pin.history = None  # the fake's own record keeping would allocate
    P.led("error", now=0)
    P.tick(1)
    micropython.heap_lock()
    try:
        for t in range(0, 4000, 50):
            P.tick(t)
            P.feed_watchdog()
            P.led_tick(t)
    finally:
        micropython.heap_unlock()
    assert pin.value() == 0  # t = 3950: 1950 ms into the 2 s cycle, in the long pause
    P.led_tick(2100)
    assert pin.value() == 1


# -- LED -----------------------------------------------------------------------------------------
EXPECTED = {  # pattern -> level at t ms after it started (written out, not computed like P does)
    "off": lambda t: 0,
    "boot": lambda t: 1,
    "connecting": lambda t: 1 if t % 500 < 250 else 0,
    "online": lambda t: 1 if t % 2000 < 250 else 0,
    "job": lambda t: 1 if t % 1000 < 500 else 0,
    "error": lambda t: 1 if t % 2000 < 250 or 500 <= t % 2000 < 750 else 0,
}


def test_led_pattern_timings():
    for active_low in (False, True):
        for name in EXPECTED:
            P.init_led({"led_pin": 2, "led_active_low": active_low})
            pin = machine.Pin.made[2]
            assert pin.mode == machine.Pin.OUT
            assert pin.value() == (1 if active_low else 0)  # starts off
            P.led(name, now=1000)
            writes = pin.writes
            changes = 0
            last = pin.value()
            for t in range(0, 6000, 10):
                P.led_tick(1000 + t)
                want = EXPECTED[name](t)
                got = pin.value() ^ (1 if active_low else 0)
                assert got == want, (name, active_low, t, got)
                if pin.value() != last:
                    changes += 1
                    last = pin.value()
            assert pin.writes - writes == changes  # the pin is written on changes only


def test_led_follows_the_clock_when_ticked_coarsely():
    P.init_led(LED)
    pin = machine.Pin.made[2]
    P.led("job", now=0)
    seen = []
    for t in range(0, 4000, 250):  # a 250 ms loop still shows a 1 Hz blink
        P.led_tick(t)
        seen.append(pin.value())
    assert seen == [1, 1, 0, 0] * 4


def test_led_without_pin_is_a_no_op():
    P.init_led({"led_pin": None, "led_active_low": False})
    for name in P.PATTERNS:
        P.led(name)
        P.led_tick()
        P.tick()
    assert machine.Pin.made == {}


def test_led_unknown_pattern():
    P.init_led(LED)
    raises(ValueError, P.led, "party")


# -- NTP -----------------------------------------------------------------------------------------
def test_ntp_retries_then_sets_the_clock():
    ntptime.reset(fail=2)
    machine.use_fake_clock(0)
    log, sleeps = Log(), Sleeps()
    assert P.sync_time(log, sleep=sleeps, host="time.example") is True
    assert ntptime.calls == 3 and ntptime.host == "time.example"
    assert machine.RTC().datetime() == ntptime.UTC
    assert sum(sleeps.ms) == 1000 + 2000
    assert sum(1 for lv, m in log.lines if "ntp: attempt" in m) == 2


def test_ntp_gives_up_without_raising():
    ntptime.reset(fail=-1)
    wdt = start_watchdog(1000)
    sleeps = Sleeps()
    assert P.sync_time(Log(), tries=4, sleep=sleeps) is False
    assert ntptime.calls == 4 and sum(sleeps.ms) == 1000 + 2000 + 4000
    assert machine.RTC().datetime() is None
    wdt.check()


# -- otadata and OTA state -----------------------------------------------------------------------
def test_otadata_entry_bytes_as_idf_writes_them():
    # Golden vector: ota_seq 1, VALID; crc32_le(UINT32_MAX, seq, 4) = 0x4743989A.
    assert esp32.entry_bytes(1, esp32.VALID) == (
        b"\x01\x00\x00\x00" + b"\xff" * 20 + b"\x02\x00\x00\x00" + b"\x9a\x98\x43\x47")
    esp32.setup()
    esp32.write_entry(0, 1, esp32.VALID)
    esp32.write_entry(1, 2, esp32.NEW)
    assert P.read_otadata() == [(1, P.OTA_VALID, True), (2, P.OTA_NEW, True)]
    assert esp32.raw("otadata")[32:4096] == b"\xff" * (4096 - 32)


def test_fresh_otadata_runs_ota_0_without_factory():
    esp32.setup(factory=False)
    esp32.flash("ota_0", esp32.app_image("1.0.0"))
    assert P.read_otadata() == [(0xFFFFFFFF, 0xFFFFFFFF, False)] * 2
    assert P.ota_state() == {"slot": "ota_0", "version": "1.0.0", "pending": False,
                             "rolled_back": False, "last_invalid": None, "flags": {}}
    assert P.ota_pending() is False
    # The bootloader's first boot then records ota_0 (set_actual_ota_seq): seq 1, VALID.
    assert esp32.boot() == "ota_0"
    assert P.read_otadata()[0] == (1, P.OTA_VALID, True)
    assert P.ota_pending() is False


def test_fresh_otadata_runs_factory():
    esp32.setup(factory=True)
    esp32.flash("factory", esp32.app_image("0.9.0"))
    assert esp32.boot() == "factory"
    st = P.ota_state()
    assert st["slot"] == "factory" and st["version"] == "0.9.0" and not st["pending"]
    assert P.read_otadata() == [(0xFFFFFFFF, 0xFFFFFFFF, False)] * 2  # untouched
    assert P.firmware_version() == "0.9.0"
    # First update from factory: both entries erased, so sector 0 gets seq slot + 1.
    Part = P.partition_class()
    nxt = Part(Part.RUNNING).get_next_update()
    assert nxt.info()[4] == "ota_0"
    nxt.writeblocks(0, esp32.app_image("1.0.0"))
    nxt.set_boot()
    assert P.read_otadata()[0] == (1, P.OTA_NEW, True)
    assert esp32.boot() == "ota_0" and P.ota_pending() is True


def test_highest_valid_seq_wins():
    esp32.setup(running="ota_1")
    esp32.write_entry(0, 3, esp32.VALID)  # -> ota_0
    esp32.write_entry(1, 4, esp32.PENDING_VERIFY)  # -> ota_1, the newer one
    e = P.read_otadata()
    assert P.active_entry(e) == 1 and P.ota_pending() is True
    esp32.write_entry(0, 5, esp32.VALID)  # sector 0 newer again: ota_0 is selected
    e = P.read_otadata()
    assert P.active_entry(e) == 0
    assert P.ota_pending() is False  # ota_1 runs but is not the selected trial image


def test_torn_sector_is_ignored():
    esp32.setup(running="ota_1")
    esp32.write_entry(0, 5, esp32.PENDING_VERIFY)  # seq 5 -> ota_0
    # The power went during the write of sector 1: seq and state are there, the crc is not.
    esp32.write_entry(1, 6, esp32.PENDING_VERIFY, crc=0xFFFFFFFF)
    e = P.read_otadata()
    assert e[1] == (6, P.OTA_PENDING_VERIFY, False)
    assert P.active_entry(e) == 0  # seq 6 would select ota_1: ignored
    assert P.ota_pending() is False
    # A crc that is merely wrong (a torn seq) is ignored the same way.
    esp32.write_entry(1, 6, esp32.VALID, crc=esp32.ota_crc(4))
    assert P.active_entry(P.read_otadata()) == 0


def test_invalid_and_aborted_entries_are_not_active():
    esp32.setup(running="ota_0")
    esp32.flash("ota_1", esp32.app_image("2.0.0"))
    esp32.write_entry(0, 1, esp32.VALID)
    for state, name in ((esp32.ABORTED, "ABORTED"), (esp32.INVALID, "INVALID")):
        esp32.write_entry(1, 2, state)
        assert P.active_entry(P.read_otadata()) == 0
        st = P.ota_state()
        assert st["slot"] == "ota_0" and not st["pending"] and st["rolled_back"]
        assert st["last_invalid"] == {"slot": "ota_1", "state": name, "version": "2.0.0"}


def test_partition_class_round_trip_update_confirmed():
    esp32.setup()
    esp32.flash("ota_0", esp32.app_image("1.0.0"))
    assert esp32.boot() == "ota_0"
    Part = P.partition_class()
    assert Part is esp32.Partition
    run = Part(Part.RUNNING)
    assert run.info()[4] == "ota_0"
    nxt = run.get_next_update()
    assert nxt.info()[:2] == (Part.TYPE_APP, 0x11) and nxt.info()[4] == "ota_1"
    assert nxt.ioctl(5, 0) == 4096 and nxt.ioctl(4, 0) == 16
    img = esp32.app_image("1.1.0")
    for b in range(len(img) // 4096):
        nxt.writeblocks(b, img[b * 4096:(b + 1) * 4096])
    nxt.set_boot()
    # Written as esp_rewrite_ota_data does: the other sector, next seq for ota_1, state NEW.
    assert P.read_otadata() == [(1, P.OTA_VALID, True), (2, P.OTA_NEW, True)]
    assert Part(Part.BOOT).info()[4] == "ota_1"
    assert P.ota_pending() is False  # still the old image until the reset
    assert esp32.boot() == "ota_1"
    st = P.ota_state()
    assert st["slot"] == "ota_1" and st["version"] == "1.1.0" and st["pending"] is True
    assert st["last_invalid"] is None and st["rolled_back"] is False
    assert P.ota_pending() is True and P.firmware_version() == "1.1.0"
    Part.mark_app_valid_cancel_rollback()
    assert P.ota_pending() is False
    assert P.read_otadata()[1] == (2, P.OTA_VALID, True)
    assert esp32.boot() == "ota_1" and not P.ota_state()["pending"]
    Part.mark_app_valid_cancel_rollback()  # fine on every boot


def test_partition_class_round_trip_rolled_back():
    esp32.setup()
    esp32.flash("ota_0", esp32.app_image("1.0.0"))
    esp32.boot()
    Part = P.partition_class()
    nxt = Part(Part.RUNNING).get_next_update()
    img = esp32.app_image("1.1.0")
    nxt.writeblocks(0, img)  # two blocks in one call: erase 8 KB, then program
    nxt.set_boot()
    assert esp32.boot() == "ota_1" and P.ota_pending()
    # No confirmation: the next boot aborts the trial and returns to ota_0.
    assert esp32.boot() == "ota_0"
    assert P.read_otadata()[1] == (2, P.OTA_ABORTED, True)
    assert P.ota_state() == {"slot": "ota_0", "version": "1.0.0", "pending": False,
                             "rolled_back": True, "flags": {},
                             "last_invalid": {"slot": "ota_1", "state": "ABORTED",
                                              "version": "1.1.0"}}
    # The next update to ota_1 replaces the aborted entry.
    Part(Part.RUNNING).get_next_update().set_boot()
    assert P.read_otadata()[1] == (2, P.OTA_NEW, True)
    assert P.ota_state()["last_invalid"] is None


def test_partition_errors_as_the_firmware_raises_them():
    esp32.setup()
    esp32.flash("ota_0", esp32.app_image("1.0.0"))
    esp32.boot()
    Part = P.partition_class()
    nxt = Part("ota_1")
    e = raises(OSError, nxt.set_boot)  # erased slot: esp_image_verify fails
    assert e.args[0] == -0x1503
    e = raises(OSError, nxt.writeblocks, 0, b"x" * 100)  # erase needs whole sectors
    assert e.args[0] == -0x104
    raises(OSError, Part(Part.RUNNING).writeblocks, 0, bytearray(4096))
    assert raises(OSError, Part, "nope").args[0] == 2
    raises(ValueError, Part, 7)
    buf = bytearray(16)
    nxt.readblocks(3, buf, 100)
    assert buf == b"\xff" * 16
    assert [p.info()[4] for p in Part.find(Part.TYPE_DATA, 0x00)] == ["otadata"]
    assert [p.info()[4] for p in Part.find(Part.TYPE_APP)] == ["ota_0", "ota_1"]


def test_no_otadata_partition():
    esp32.setup(otadata=False, slots=0, factory=True)
    esp32.flash("factory", esp32.app_image("0.1.0"))
    assert esp32.boot() == "factory"
    assert P.read_otadata() is None
    assert P.ota_state() is None and P.ota_pending() is False
    assert P.firmware_version() == "0.1.0"


def test_firmware_version_without_app_descriptor():
    esp32.setup()
    assert P.firmware_version() is None  # erased running slot: no esp_app_desc_t
    # A stock MicroPython image: CONFIG_APP_EXCLUDE_PROJECT_VER_VAR=y leaves version "".
    esp32.flash("ota_0", esp32.app_image(""))
    assert P.firmware_version() is None and P.ota_state()["version"] is None


# -- reset and identity --------------------------------------------------------------------------
def test_reset_and_unique_id():
    raises(machine.ResetCalled, P.reset)
    assert machine.resets == 1
    assert P.unique_id() == machine.UNIQUE_ID and len(P.unique_id()) == 6
    assert P.NAME == "esp32"
