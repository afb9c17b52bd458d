# The application pointer (iotjobs.appstate) and the manifest checks of the update handler
# (iotjobs.app), on littlefs (a RAM chip mounted at /flash): starts counted on trial, rollback
# after max_tries, the entry module imported from the running folder, failed starts recorded,
# malformed state files, and power cuts at every block write of a switch and of a boot count.
import json
import os
import sys
from flashsim import Flash, MOUNT, NONE, TORN
from iotjobs.appstate import AppState
from iotjobs import app as A
from iotjobs.runner import JobFailed

ROOT = MOUNT + "/app.d"


class FakeRunner:
    """Only what Api touches: register(), log, tick, on_online."""

    def __init__(self):
        self.handlers = {}
        self.tick = None
        self.on_online = None
        self.lines = []

    def register(self, op, handler):
        self.handlers[op] = handler

    def log(self, msg):
        self.lines.append(msg)


def _fresh():
    f = Flash()
    f.format()
    f.mount()
    return f


def _write(path, text):
    A._mkdirs(path)
    with open(path, "w") as f:
        f.write(text)


def _forget_app():
    for name in ("application", "apphelper"):
        if name in sys.modules:
            del sys.modules[name]
    for p in list(sys.path):
        if p.startswith(ROOT):
            sys.path.remove(p)


def _install(st, slot, version, entry):
    _write(st.folder(slot) + "/application.py", entry)
    st.switch(slot, version)


def test_no_application_is_a_quiet_start():
    f = _fresh()
    st = AppState(ROOT)
    assert (st.cur, st.trial, st.version()) == (None, False, None)
    st.boot()
    assert st.start(None) is True
    assert st.other() == "a"
    f.unmount()


def test_switch_counts_starts_and_rolls_back_after_max_tries():
    f = _fresh()
    st = AppState(ROOT, max_tries=3)
    _install(st, "a", "1.0", "def start(api):\n    pass\n")
    assert st.confirm() is True
    _install(st, "b", "2.0", "raise ImportError('nope')\n")
    assert (st.cur, st.prev, st.trial, st.seq) == ("b", "a", True, 2)
    for k in (1, 2, 3):
        st = AppState(ROOT, max_tries=3)  # a boot
        st.boot()
        assert (st.cur, st.tries) == ("b", k)
        _forget_app()
        assert st.start(None) is False
        assert "nope" in st.error
    st = AppState(ROOT, max_tries=3)
    st.boot()  # the fourth start on trial: rolled back before any import
    assert (st.cur, st.prev, st.trial, st.seq) == ("a", None, False, 2)
    assert st.failed["ver"] == "2.0" and "nope" in st.failed["err"], st.failed
    assert AppState(ROOT).cur == "a", "the rollback is in flash"
    _forget_app()
    f.unmount()


def test_start_imports_the_running_folder_and_gives_the_api():
    f = _fresh()
    st = AppState(ROOT)
    _write(st.folder("a") + "/apphelper.py", "WHO = 'helper'\n")
    _install(st, "a", "1.0", "import apphelper\n\ndef start(api):\n"
             "    api.register('who', lambda ctx, doc: {'who': apphelper.WHO})\n"
             "    api.on_tick(lambda: None)\n")
    from iotjobs.appstate import Api

    r = FakeRunner()
    _forget_app()
    assert st.start(Api(r, {"colour": "red"}, st)) is True
    assert r.handlers["who"](None, {}) == {"who": "helper"}
    assert r.tick is not None
    assert sys.path[0] == st.folder("a")
    _forget_app()
    f.unmount()


def test_launch_confirms_on_trial_once_online_and_resets_after_a_failed_start():
    f = _fresh()
    st = AppState(ROOT)
    _install(st, "a", "1.0", "def start(api):\n    pass\n")
    r = FakeRunner()
    resets = []
    _forget_app()
    st.launch(r, {}, lambda: resets.append(1))
    assert resets == [] and st.trial and r.on_online is not None
    r.on_online()  # the service answered
    assert AppState(ROOT).trial is False
    _install(st, "b", "2.0", "def start(api):\n    raise ValueError('bad start')\n")
    _forget_app()
    st = AppState(ROOT)
    st.launch(FakeRunner(), {}, lambda: resets.append(1))
    assert resets == [1], "a failed start on trial resets at once"
    with open(ROOT + "/last-error.txt") as fh:
        assert "bad start" in fh.read()
    _forget_app()
    f.unmount()


def test_a_confirmed_application_that_fails_is_skipped_not_reset():
    f = _fresh()
    st = AppState(ROOT)
    _install(st, "a", "1.0", "raise RuntimeError('later bug')\n")
    st.confirm()
    resets = []
    _forget_app()
    st.launch(FakeRunner(), {}, lambda: resets.append(1))
    assert resets == [] and st.cur == "a" and "later bug" in st.error
    _forget_app()
    f.unmount()


def test_malformed_state_files_mean_no_application():
    f = _fresh()
    for text in ("", "{", "[]", "null", '{"v": 2}', '{"v": 1, "cur": "c", "prev": null}',
                 '{"v": 1, "cur": "a", "prev": null, "seq": "1", "ver": {}, "tries": 0, "trial": 0}',
                 '{"v": 1, "cur": "../x", "prev": null, "seq": 1, "ver": {}, "tries": 0}'):
        _write(ROOT + "/state.json", text)
        st = AppState(ROOT)
        assert st.cur is None and st.start(None) is True, text
    f.unmount()


def _switch_survives(style):
    """Cut the power at every block operation of a switch: the pointer is the old or the new."""
    n = 0
    seen = set()
    while True:
        n += 1
        f = _fresh()
        st = AppState(ROOT)
        _install(st, "a", "1.0", "def start(api):\n    pass\n")
        st.confirm()
        _write(st.folder("b") + "/application.py", "def start(api):\n    pass\n")
        f.reset_counts()
        f.cut_at(n, style)
        try:
            st.switch("b", "2.0")
            done = True
        except OSError:
            done = False
        g = f.survivor()
        g.mount()
        after = AppState(ROOT)
        state = (after.cur, after.trial, after.seq)
        assert state in (("a", False, 1), ("b", True, 2)), (n, state)
        seen.add(state)
        g.unmount()
        if done:
            break
    assert seen == {("a", False, 1), ("b", True, 2)}, seen
    return n


def test_power_cut_during_the_switch_torn():
    assert _switch_survives(TORN) > 1


def test_power_cut_during_the_switch_lost():
    assert _switch_survives(NONE) > 1


def _manifest(files, version="2.0"):
    return json.dumps({"version": version, "files": files})


def _entry(path, size=1):
    return {"path": path, "size": size, "sha256": "00" * 32}


def test_manifest_paths_are_confined():
    ok = A.parse_manifest(_manifest([_entry("application.py"), _entry("pkg/util.py", 5)]), "2.0")
    assert [(p, n) for p, n, _ in ok] == [("application.py", 1), ("pkg/util.py", 5)]
    for bad, reason in (("../x.py", "BAD_PATH"), ("/abs.py", "BAD_PATH"), ("a//b", "BAD_PATH"),
                        ("a/./b", "BAD_PATH"), ("a\\b", "BAD_PATH"), ("sp ace", "BAD_PATH"),
                        ("", "BAD_PATH"), ("x\x00y", "BAD_PATH")):
        try:
            A.parse_manifest(_manifest([_entry(bad)]), "2.0")
            raise AssertionError("accepted %r" % bad)
        except JobFailed as e:
            assert e.reason == reason, (bad, e.reason)


def test_malformed_manifests_are_refused():
    cases = [
        "not json", "[]", '{"version": "2.0"}', _manifest("x"), _manifest([_entry("a")], "3.0"),
        _manifest([{"path": "a", "size": -1, "sha256": "00" * 32}]),
        _manifest([{"path": "a", "size": True, "sha256": "00" * 32}]),
        _manifest([{"path": "a", "size": 1, "sha256": "xyz"}]),
        _manifest([{"path": 5, "size": 1, "sha256": "00" * 32}]),
        _manifest([_entry("a"), _entry("a")]),
        _manifest([_entry("f%d" % i) for i in range(65)]),
    ]
    for text in cases:
        try:
            A.parse_manifest(text, "2.0")
            raise AssertionError("accepted %r" % text[:60])
        except JobFailed as e:
            assert e.reason in ("BAD_MANIFEST", "BAD_PATH"), (text[:60], e.reason)


def test_rmtree_removes_nested_folders():
    f = _fresh()
    _write(MOUNT + "/t/a/b/c.txt", "x")
    _write(MOUNT + "/t/d.txt", "y")
    A.rmtree(MOUNT + "/t")
    assert "t" not in os.listdir(MOUNT)
    A.rmtree(MOUNT + "/missing")  # no error
    f.unmount()
