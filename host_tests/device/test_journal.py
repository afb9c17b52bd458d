# The journal's own behaviour, on littlefs (a RAM chip mounted at /flash, as on an ESP32) and on
# the unix port's POSIX filesystem (a temporary folder): clean starts, the transitions of a job,
# the write budget, the done list, and unreadable files that must load as a clean start.
import json
import os
from binascii import hexlify
from flashsim import Flash, MOUNT
from iotjobs import journal as J

NAME = "journal.json"


class LittleFs:
    label = "littlefs"

    def __init__(self):
        self.flash = Flash()
        self.flash.format()
        self.flash.mount()
        self.dir = MOUNT

    def close(self):
        self.flash.unmount()


class Posix:
    label = "posix"

    def __init__(self):
        self.dir = (os.getenv("IOTJOBS_TEST_TMP") or "/tmp") + "/journal-test-" + hexlify(
            os.urandom(6)).decode()
        os.mkdir(self.dir)

    def close(self):
        _rmtree(self.dir)


def _rmtree(path):
    for entry in os.ilistdir(path):
        p = path + "/" + entry[0]
        if entry[1] == 0x4000:
            _rmtree(p)
        else:
            os.remove(p)
    os.rmdir(path)


def each_fs(check):
    """Run check(fs) on a fresh littlefs chip and on a fresh POSIX folder."""
    for kind in (LittleFs, Posix):
        fs = kind()
        try:
            check(fs)
        finally:
            fs.close()


def state(j):
    return json.loads(json.dumps([j.boot, j.job, j.out, j.done]))


def reload(path):
    logs = []
    j = J.Journal(path, logs.append)
    assert logs == [], logs
    return j


def put(path, data):
    with open(path, "wb") as f:
        f.write(data)


def get(path):
    with open(path, "rb") as f:
        return f.read()


def files(fs):
    return sorted(os.listdir(fs.dir))


CLEAN = [0, None, None, []]


# -- clean start and the transitions ----------------------------------------------------------
def test_fresh_start_is_clean():
    def check(fs):
        logs = []
        j = J.Journal(fs.dir + "/" + NAME, logs.append)
        assert state(j) == CLEAN
        assert logs == ["journal: no journal: clean start"], logs
        assert j.writes == 0 and j.bytes_written == 0
        assert files(fs) == []  # loading writes nothing
        J.Journal(fs.dir + "/" + NAME)  # no log function: still fine
    each_fs(check)


def test_load_never_touches_flash():
    fs = LittleFs()
    fs.flash.reset_counts()
    J.Journal(fs.dir + "/" + NAME)
    assert fs.flash.ops == 0  # a load never programs or erases
    fs.close()


def test_transitions():
    def check(fs):
        path = fs.dir + "/" + NAME
        j = J.Journal(path)

        j.booted()
        assert state(j) == [1, None, None, []]
        assert state(reload(path)) == state(j)
        assert files(fs) == [NAME]  # the temporary file was renamed over the journal

        j.start("ota-7", 2, 5)
        job = {"id": "ota-7", "n": 2, "v": 5, "step": 0, "cp": None, "t": J.RUN}
        assert j.job == job
        assert state(reload(path)) == [1, job, None, []]

        j.checkpoint(0, {"off": 8192})
        job["cp"] = {"off": 8192}
        assert state(reload(path)) == [1, job, None, []]

        j.checkpoint(1, {"slot": "ota_0"}, J.REBOOT)
        job.update(step=1, cp={"slot": "ota_0"}, t=J.REBOOT)
        assert state(reload(path)) == [1, job, None, []]

        # a reboot: a new object reads it all back, counts the boot, and carries on
        j = reload(path)
        j.booted()
        j.checkpoint(2, None)
        job.update(step=2, cp=None, t=J.RUN)
        assert state(reload(path)) == [2, job, None, []]

        j.finish("SUCCEEDED", {"reason": "ok"}, 6)
        out = ["ota-7", 2, "SUCCEEDED", {"reason": "ok"}, 6]
        assert state(j) == [2, None, out, []]  # job and outbox change in one write
        assert state(reload(path)) == [2, None, out, []]
        assert j.finished_status("ota-7", 2) is None  # not done until acknowledged

        j.acknowledged()
        assert state(reload(path)) == [2, None, None, ["ota-7:2:SUCCEEDED"]]
        assert j.finished_status("ota-7", 2) == "SUCCEEDED"
        assert j.writes == 4
        assert files(fs) == [NAME]
    each_fs(check)


def test_three_writes_per_job_without_progress():
    def check(fs):
        path = fs.dir + "/" + NAME
        J.Journal(path).booted()
        j = reload(path)
        if isinstance(fs, LittleFs):
            fs.flash.reset_counts()
        j.start("reboot-1", 1, 1)
        j.finish("SUCCEEDED", None, 2)
        j.acknowledged()
        assert j.writes == 3
        assert j.bytes_written < 3 * 160, j.bytes_written
        assert state(reload(path)) == [1, None, None, ["reboot-1:1:SUCCEEDED"]]
        if isinstance(fs, LittleFs):
            # a handful of program/erase operations per write, one 4 KB erase at most
            assert fs.flash.ops <= 3 * 6, (fs.flash.writes, fs.flash.erases)
            assert fs.flash.erases <= 3, fs.flash.erases
    each_fs(check)


def test_failed_job():
    def check(fs):
        path = fs.dir + "/" + NAME
        j = J.Journal(path)
        j.start("dl-1", 4, 1)
        j.finish("FAILED", {"reason": "HTTP_404"}, 2)
        assert reload(path).out == ["dl-1", 4, "FAILED", {"reason": "HTTP_404"}, 2]
        j.acknowledged()
        assert reload(path).finished_status("dl-1", 4) == "FAILED"
    each_fs(check)


def test_acknowledged_without_outbox_changes_nothing_but_writes():
    def check(fs):
        path = fs.dir + "/" + NAME
        j = J.Journal(path)
        j.acknowledged()
        assert state(reload(path)) == CLEAN
        assert j.writes == 1
    each_fs(check)


def test_abandon():
    def check(fs):
        path = fs.dir + "/" + NAME
        j = J.Journal(path)
        j.start("cancelled-job", 9, 3)
        j.checkpoint(1, {"k": 1})
        j.abandon()
        assert state(reload(path)) == [0, None, None, ["cancelled-job:9:ABANDONED"]]
        assert j.finished_status("cancelled-job", 9) == "ABANDONED"
        j.abandon()  # nothing to abandon: harmless
        assert state(reload(path)) == [0, None, None, ["cancelled-job:9:ABANDONED"]]
    each_fs(check)


def test_abandon_keeps_the_outbox():
    fs = LittleFs()
    path = fs.dir + "/" + NAME
    j = J.Journal(path)
    j.start("a", 1, 1)
    j.finish("SUCCEEDED", None, 2)
    j.start("b", 1, 1)  # a new job while the outbox still waits
    j.abandon()
    assert state(reload(path)) == [0, None, ["a", 1, "SUCCEEDED", None, 2], ["b:1:ABANDONED"]]
    fs.close()


# -- the done list ----------------------------------------------------------------------------
def test_done_list_is_bounded():
    def check(fs):
        path = fs.dir + "/" + NAME
        j = J.Journal(path)
        total = J.DONE_MAX + 3
        for k in range(total):
            j.start("job-%d" % k, k + 1, 1)
            j.finish("SUCCEEDED" if k % 2 else "FAILED", None, 2)
            j.acknowledged()
            assert len(j.done) == min(k + 1, J.DONE_MAX)
        r = reload(path)
        assert len(r.done) == J.DONE_MAX
        assert r.done[-1] == "job-%d:%d:%s" % (total - 1, total, "FAILED" if total % 2 else
                                                "SUCCEEDED")
        for k in range(total):
            want = None if k < total - J.DONE_MAX else ("SUCCEEDED" if k % 2 else "FAILED")
            assert r.finished_status("job-%d" % k, k + 1) == want, k
        assert j.writes == 3 * total
    each_fs(check)


def test_longer_done_list_on_flash_is_cut_to_the_newest():
    fs = LittleFs()
    path = fs.dir + "/" + NAME
    done = ["j%d:1:SUCCEEDED" % k for k in range(J.DONE_MAX + 5)]
    put(path, json.dumps({"ver": 1, "boot": 3, "job": None, "out": None, "done": done}))
    assert reload(path).done == done[-J.DONE_MAX:]
    fs.close()


def test_finished_status_matches_id_and_number_exactly():
    fs = LittleFs()
    j = J.Journal(fs.dir + "/" + NAME)
    for job_id, n, status in (("a", 1, "SUCCEEDED"), ("a", 11, "FAILED"), ("ab", 1, "REJECTED")):
        j.start(job_id, n, 1)
        j.finish(status, None, 2)
        j.acknowledged()
    assert j.finished_status("a", 1) == "SUCCEEDED"
    assert j.finished_status("a", 11) == "FAILED"
    assert j.finished_status("ab", 1) == "REJECTED"
    assert j.finished_status("a", 2) is None
    assert j.finished_status("b", 1) is None
    assert j.finished_status("", 1) is None
    fs.close()


# -- unreadable journals: a clean start, logged, never an exception ------------------------------
GOOD = {"ver": 1, "boot": 4, "job": {"id": "x", "n": 1, "v": 1, "step": 0, "cp": None, "t": "RUN"},
        "out": None, "done": ["w:1:SUCCEEDED"]}

CORRUPT = (
    ("erased flash", b"\xff" * 64),
    ("garbage", b"\x00\x13\x80\xfe garbage {"),
    ("zeros", b"\x00" * 32),
    ("empty", b""),
    ("whitespace", b"  \n"),
    ("utf-8 bom", b"\xef\xbb\xbf" + json.dumps(GOOD).encode()),
    ("trailing garbage", json.dumps(GOOD).encode() + b"xx"),
    ("not an object", b"[1, 2, 3]"),
    ("a string", b'"journal"'),
    ("null", b"null"),
    ("no ver", json.dumps({"boot": 1, "job": None}).encode()),
    ("ver 2", json.dumps({"ver": 2, "boot": 1}).encode()),
    ("ver as text", json.dumps({"ver": "1", "boot": 1}).encode()),
    ("job a list", json.dumps({"ver": 1, "job": ["x", 1]}).encode()),
    ("job a string", json.dumps({"ver": 1, "job": "x"}).encode()),
    ("job without id", json.dumps({"ver": 1, "job": {"n": 1}}).encode()),
    ("job id a number", json.dumps({"ver": 1, "job": {"id": 5}}).encode()),
    ("out a dict", json.dumps({"ver": 1, "out": {"id": "x"}}).encode()),
    ("out too short", json.dumps({"ver": 1, "out": ["x", 1, "SUCCEEDED"]}).encode()),
    ("out a string", json.dumps({"ver": 1, "out": "x"}).encode()),
    ("done a string", json.dumps({"ver": 1, "done": "x:1:SUCCEEDED"}).encode()),
    ("done an object", json.dumps({"ver": 1, "done": {}}).encode()),
    ("done null", json.dumps({"ver": 1, "done": None}).encode()),
)


def _expect_clean(path, what):
    logs = []
    try:
        j = J.Journal(path, logs.append)
    except Exception as e:  # anything raised is the failure being tested
        raise AssertionError("%s: load raised %r" % (what, e))
    assert state(j) == CLEAN, (what, state(j))
    assert len(logs) == 1 and logs[0].startswith("journal: journal unreadable (") and \
        logs[0].endswith("): clean start"), (what, logs)
    return j


def test_corrupt_files_load_as_clean_start():
    def check(fs):
        path = fs.dir + "/" + NAME
        for what, data in CORRUPT:
            put(path, data)
            j = _expect_clean(path, what)
            # and the next save replaces the bad file
            j.booted()
            assert state(reload(path)) == [1, None, None, []], what
    each_fs(check)


def test_every_truncation_of_a_journal_loads_as_clean_start():
    def check(fs):
        path = fs.dir + "/" + NAME
        text = json.dumps(GOOD).encode()
        put(path, text)
        assert state(reload(path)) == [4, GOOD["job"], None, GOOD["done"]]
        for k in range(len(text)):
            put(path, text[:k])
            _expect_clean(path, "cut at %d" % k)
    each_fs(check)


def test_bad_boot_counter_is_reset_not_fatal():
    fs = LittleFs()
    path = fs.dir + "/" + NAME
    for boot in ("7", None, [1], 2.5):
        put(path, json.dumps({"ver": 1, "boot": boot, "job": None, "out": None, "done": []}))
        assert state(reload(path)) == CLEAN, boot
    fs.close()


def test_wrong_types_inside_entries_load_as_clean_start():
    """Entries that parse but that the runner cannot use (it reads job["n"], job["step"],
    job["cp"], out[3].get(...), done entries as strings) must be a clean start, not a crash
    later at boot."""
    bad = (
        ("job without n", {"id": "x"}, None, []),
        ("job n a string", dict(GOOD["job"], n="1"), None, []),
        ("job step missing", {"id": "x", "n": 1, "v": 1, "cp": None, "t": "RUN"}, None, []),
        ("job step a string", dict(GOOD["job"], step="0"), None, []),
        ("out id a number", None, [5, 1, "SUCCEEDED", None, 2], []),
        ("out n a string", None, ["x", "1", "SUCCEEDED", None, 2], []),
        ("out details a list", None, ["x", 1, "FAILED", [1], 2], []),
        ("done entries numbers", None, None, [1, 2]),
        ("done entry null", None, None, ["a:1:SUCCEEDED", None]),
    )
    fs = LittleFs()
    path = fs.dir + "/" + NAME
    for what, job, out, done in bad:
        put(path, json.dumps({"ver": 1, "boot": 1, "job": job, "out": out, "done": done}))
        j = _expect_clean(path, what)
        assert j.finished_status("a", 1) is None
    fs.close()


def test_directory_in_place_of_the_journal():
    def check(fs):
        path = fs.dir + "/" + NAME
        os.mkdir(path)
        logs = []
        j = J.Journal(path, logs.append)  # must not raise
        assert state(j) == CLEAN
        assert len(logs) == 1 and logs[0].endswith("clean start"), logs
    each_fs(check)


def test_directory_in_place_of_the_journal_does_not_block_saving():
    """Otherwise booted() raises on every boot and the device never gets past it."""
    def check(fs):
        path = fs.dir + "/" + NAME
        os.mkdir(path)
        j = J.Journal(path)
        j.booted()
        assert state(reload(path)) == [1, None, None, []]
    each_fs(check)


# -- leftovers of an interrupted write --------------------------------------------------------
def test_leftover_temporary_file_is_ignored_and_overwritten():
    def check(fs):
        path = fs.dir + "/" + NAME
        j = J.Journal(path)
        j.booted()
        j.start("job-1", 1, 1)
        saved = state(j)
        # an interrupted save: a complete new state, and a longer half-written one
        put(path + ".tmp", json.dumps({"ver": 1, "boot": 99, "job": None, "out": None,
                                       "done": ["ghost:1:SUCCEEDED"]}).encode())
        j2 = reload(path)
        assert state(j2) == saved  # the temporary file is never read
        put(path + ".tmp", b'{"ver": 1, "boot": 99, "job": null, "done": ["' + b"z" * 600)
        j2 = reload(path)
        assert state(j2) == saved
        j2.checkpoint(1, {"off": 1})
        assert files(fs) == [NAME]  # renamed away
        text = get(path)
        assert b"z" not in text and b"ghost" not in text  # truncated, not overwritten in place
        assert state(reload(path)) == state(j2)
    each_fs(check)


def test_leftover_temporary_file_without_journal_is_a_clean_start():
    def check(fs):
        path = fs.dir + "/" + NAME
        put(path + ".tmp", json.dumps(GOOD).encode())  # cut before the first rename
        logs = []
        j = J.Journal(path, logs.append)
        assert state(j) == CLEAN
        assert logs == ["journal: no journal: clean start"]
        j.booted()
        assert files(fs) == [NAME]
    each_fs(check)


# -- what a save costs ----------------------------------------------------------------------------
def test_bytes_written_is_the_file_size():
    """bytes_written feeds the flash-wear figures: it must count bytes, not characters
    (details may carry any text; the file is UTF-8)."""
    def check(fs):
        path = fs.dir + "/" + NAME
        j = J.Journal(path)
        for details in ({"reason": "ok"}, {"reason": "caf\u00e9 \u2713"}):
            j.start("job-1", 1, 1)
            before = j.bytes_written
            j.finish("SUCCEEDED", details, 2)
            size = os.stat(path)[6]
            assert j.bytes_written - before == size, (details, j.bytes_written - before, size)
            j.acknowledged()
    each_fs(check)


def test_typical_job_cost():
    """A firmware update with two checkpoints: six writes, each well under 512 bytes."""
    fs = LittleFs()
    path = fs.dir + "/" + NAME
    j = J.Journal(path)
    j.done = ["ota-%d:1:SUCCEEDED" % k for k in range(J.DONE_MAX)]  # a device with a history
    j.save()
    j = reload(path)
    fs.flash.reset_counts()
    sizes = []
    last = 0
    for step in (lambda: j.booted(),
                 lambda: j.start("fw-update-2024-06-01", 3, 1),
                 lambda: j.checkpoint(1, {"off": 65536, "sha": "9f86d081884c7d65"}),
                 lambda: j.checkpoint(2, {"slot": "ota_1", "size": 1310720}, J.REBOOT),
                 lambda: j.finish("SUCCEEDED", {"reason": "ok", "fw": "1.4.2"}, 4),
                 lambda: j.acknowledged()):
        step()
        sizes.append(j.bytes_written - last)
        last = j.bytes_written
    assert j.writes == 6
    assert max(sizes) < 512, sizes
    assert fs.flash.ops <= 6 * 8, (fs.flash.writes, fs.flash.erases)
    print("typical job: bytes per save %s, total %d; flash: %d programs, %d erases" % (
        sizes, j.bytes_written, fs.flash.writes, fs.flash.erases))
    fs.close()


class _NoRoomForTheText:
    """json as the journal sees it when the heap has no contiguous block for the whole text:
    dumps fails, dump (streamed into the file) works."""

    def __init__(self):
        self.streamed = 0

    def dumps(self, obj):
        raise MemoryError("no block for the text")

    def dump(self, obj, f):
        self.streamed += 1
        return json.dump(obj, f)

    def load(self, f):
        return json.load(f)


def test_a_journal_write_streams_when_the_text_does_not_fit_and_a_failed_one_changes_nothing():
    for fs in (LittleFs(), Posix()):
        path = fs.dir + "/" + NAME
        try:
            j = J.Journal(path)
            j.booted()
            j.start("j1", 1, 2)
            fake = _NoRoomForTheText()
            J.json = fake
            try:
                j.checkpoint(1, {"off": 4096})
                j.finish("SUCCEEDED", {"reason": "OK"}, 3)
            finally:
                J.json = json
            assert fake.streamed == 2, fs.label
            again = J.Journal(path)
            assert again.job is None and again.out == ["j1", 1, "SUCCEEDED", {"reason": "OK"}, 3]

            # a write that fails altogether leaves memory as it was, equal to flash
            class Full(_NoRoomForTheText):
                def dump(self, obj, f):
                    raise MemoryError("nothing fits")

            J.json = Full()
            try:
                j.acknowledged()
                raise AssertionError("the write did not fail")
            except MemoryError:
                pass
            finally:
                J.json = json
            assert j.out == ["j1", 1, "SUCCEEDED", {"reason": "OK"}, 3] and j.done == []
            assert J.Journal(path).out == j.out
        finally:
            fs.close()
