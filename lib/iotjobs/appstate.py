# The application in flash and how it starts. The root folder is `app.d` by default: a name no
# `import` can resolve (MicroPython imports a plain folder on sys.path as a package, so a
# folder named `app` would shadow the firmware's `app` module). Two folders, `<root>/a` and
# `<root>/b`, each a
# whole version of the application (the .py/.mpy files of a signed bundle), and one pointer
# file, `<root>/state.json`, replaced atomically (write a temp file, rename it over the old one):
#
#   {"seq": 4,                  pointer switches so far (the update handler's witness)
#    "cur": "b",                the folder that runs (None: no application installed)
#    "prev": "a",               the folder to return to if `cur` fails on trial (or None)
#    "ver": {"a": "1.0", "b": "1.1"},
#    "trial": true,             `cur` has not confirmed itself yet
#    "tries": 1,                starts of `cur` on trial so far
#    "failed": {"slot", "ver", "err"} or None}   the last version that was rolled back
#
# Switching versions is one write of this file; nothing else moves. At every boot, before the
# application is imported, a version on trial has its start counted in flash; past `max_tries`
# starts without a confirmation it is rolled back (the pointer returns to `prev`). A start
# fails when the entry module raises at import or in `start(api)`; a reset or a crash before
# the confirmation (the watchdog on a board) counts the same way, because the count was
# written before the import. The confirmation comes once the device has reached the jobs
# service with the new application running (firmware/app.py, and the update handler's resume).
#
# The entry module is `application` (application.py or .mpy at the top of the bundle); its
# folder goes first on sys.path, so the bundle's other modules import as usual. A bundle
# without it is files only (data, libraries) and always "starts".
import json
import os
import sys
from micropython import const

ENTRY = "application"
_MAX_TRIES = const(3)
_VERSION = const(1)


def _slot_ok(s):
    return s is None or s in ("a", "b")


class AppState:
    def __init__(self, root="app.d", log=None, max_tries=_MAX_TRIES):
        self.root = root
        self.path = root + "/state.json"
        self.log = log
        self.max_tries = max_tries
        self.error = None  # why the last start failed (a short string), or None
        self.module = None
        self.load()

    def _log(self, msg):
        if self.log:
            self.log("app: " + msg)

    def load(self):
        self.seq, self.cur, self.prev, self.ver = 0, None, None, {}
        self.trial, self.tries, self.failed = False, 0, None
        try:
            with open(self.path) as f:
                d = json.load(f)
        except OSError:
            return  # no application installed yet
        except ValueError:
            self._log("state.json unreadable: no application runs until the next update")
            return
        try:
            if d.get("v") != _VERSION or not (_slot_ok(d["cur"]) and _slot_ok(d["prev"])):
                raise ValueError
            seq, ver, tries = d["seq"], d["ver"], d["tries"]
            if not (isinstance(seq, int) and isinstance(ver, dict) and isinstance(tries, int)):
                raise ValueError
            self.seq, self.cur, self.prev, self.ver = seq, d["cur"], d["prev"], ver
            self.trial, self.tries, self.failed = d["trial"] is True, tries, d.get("failed")
        except (ValueError, KeyError, TypeError, AttributeError):
            self._log("state.json malformed: no application runs until the next update")

    def save(self):
        try:
            os.mkdir(self.root)
        except OSError:
            pass
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"v": _VERSION, "seq": self.seq, "cur": self.cur, "prev": self.prev,
                       "ver": self.ver, "trial": self.trial, "tries": self.tries,
                       "failed": self.failed}, f)
        os.rename(tmp, self.path)

    def folder(self, slot):
        return self.root + "/" + slot

    def version(self):
        """The running application's version, or None."""
        return self.ver.get(self.cur) if self.cur else None

    def other(self):
        """The folder an update is staged in: never the one that runs."""
        return "b" if self.cur == "a" else "a"

    # -- boot ------------------------------------------------------------------------------------
    def boot(self):
        """Count this start of a version on trial (in flash, before its code runs); roll it back
        once it has had `max_tries` starts without confirming itself."""
        if not (self.cur and self.trial):
            return
        if self.tries >= self.max_tries:
            self.rollback("did not confirm in %d starts (%s)" % (self.tries, self.error_hint()))
            return
        self.tries += 1
        self.save()
        self._log("version %s on trial: start %d of %d" % (self.version(), self.tries,
                                                            self.max_tries))

    def error_hint(self):
        try:
            with open(self.root + "/last-error.txt") as f:
                return f.read(200)
        except OSError:
            return "no error recorded"

    def rollback(self, why):
        bad = self.cur
        self.failed = {"slot": bad, "ver": self.ver.get(bad), "err": why[:200]}
        self.cur, self.prev = self.prev, None
        self.trial, self.tries = False, 0
        self.save()
        self._log("version %s rolled back (%s); running %s" % (
            self.failed["ver"], why, self.version()))

    def start(self, api):
        """Import the entry module of the running version and call its `start(api)`. True when
        it started (or there is nothing to start); False with `self.error` otherwise."""
        if not self.cur:
            return True
        path = self.folder(self.cur)
        found = False
        for ext in (".mpy", ".py"):
            try:
                os.stat(path + "/" + ENTRY + ext)
                found = True
            except OSError:
                pass
        if not found:
            return True
        sys.path.insert(0, path)
        try:
            m = __import__(ENTRY)
            fn = getattr(m, "start", None)
            if fn is not None:
                fn(api)
            self.module = m
            return True
        except Exception as e:  # whatever the application does wrong, the runner goes on
            self.error = "%s: %s" % (type(e).__name__, e)
            self._log("version %s failed to start: %s" % (self.version(), self.error))
            try:
                with open(self.root + "/last-error.txt", "w") as f:
                    f.write(self.error[:200])
            except OSError:
                pass
            sys.path.remove(path) if path in sys.path else None
            if ENTRY in sys.modules:
                del sys.modules[ENTRY]
            return False

    def confirm(self):
        """The version on trial has started and reached the service: keep it. True if it was on
        trial."""
        if not self.trial:
            return False
        self.trial, self.tries, self.failed = False, 0, None
        self.save()
        self._log("version %s confirmed" % self.version())
        return True

    def launch(self, runner, settings, reset):
        """Boot-time start: count a start on trial, roll back a version that keeps failing,
        start the application with an Api; after a failed start on trial, `reset()` (the next
        boot counts again). A version on trial is confirmed once the service has answered."""
        self.boot()
        if self.start(Api(runner, settings, self)):
            if self.trial:
                prev = runner.on_online

                def confirm():
                    if prev is not None:
                        prev()
                    self.confirm()

                runner.on_online = confirm  # reached the service with it running: keep it
            return
        if self.trial:
            self._log("version %s failed on trial: reset" % self.version())
            reset()

    def switch(self, slot, version):
        """Make the staged folder `slot` the one that runs from the next boot, on trial."""
        self.prev, self.cur = self.cur, slot
        self.ver[slot] = version
        for k in list(self.ver):
            if k not in (self.cur, self.prev):
                del self.ver[k]
        self.trial, self.tries, self.failed = True, 0, None
        self.seq += 1
        self.save()


class Api:
    """What the application's `start(api)` receives: register job handlers, a hook called about
    once a second while the device is idle, the log, its settings and version."""

    def __init__(self, runner, settings, state):
        self.runner = runner
        self.log = runner.log
        self.settings = settings
        self.version = state.version()
        self.folder = state.folder(state.cur) if state.cur else None

    def register(self, operation, handler):
        """Jobs whose operation is `operation` go to `handler` (a function(ctx, doc) or an
        iotjobs.runner.Handler)."""
        self.runner.register(operation, handler)

    def on_tick(self, fn):
        self.runner.tick = fn
