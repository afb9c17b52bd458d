# The device's durable state in flash: one small JSON file, replaced atomically (write a temp
# file, then rename it over the old one: littlefs and POSIX both make the rename atomic), so a
# power cut leaves exactly the old or the new state.
#
# State:
#   boot  boot counter (incremented once per boot)
#   job   the execution being worked on: {"id", "n" (executionNumber), "v" (versionNumber),
#         "step" (index of the step running), "cp" (the handler's checkpoint), "t" (status:
#         RUN, or REBOOT while a requested reboot is under way)} or None
#   out   the terminal update not yet acknowledged: [job id, executionNumber, status, details,
#         expectedVersion] or None
#   done  recently finished executions, newest last: ["<id>:<n>:<status>", ...] (DONE_MAX)
#
# Writes per job without checkpoints: start (job), finish (job -> out), acknowledged (out ->
# done): three. A missing or unreadable journal is a clean start, logged, never a crash.
import json
import os
from micropython import const

DONE_MAX = const(8)
_VERSION = const(1)
RUN = "RUN"
REBOOT = "REBOOT"


def _job_ok(j):
    return (isinstance(j, dict) and isinstance(j.get("id"), str) and isinstance(j.get("n"), int)
            and isinstance(j.get("step"), int) and "cp" in j and j.get("t") in (RUN, REBOOT))


def _out_ok(o):
    return (isinstance(o, list) and len(o) == 5 and isinstance(o[0], str)
            and isinstance(o[1], int) and isinstance(o[2], str)
            and (o[3] is None or isinstance(o[3], dict)))


class Journal:
    def __init__(self, path="journal.json", log=None):
        self.path = path
        self.tmp = path + ".tmp"
        self.log = log
        self.writes = 0  # writes since this object was made (for tests and benchmarks)
        self.bytes_written = 0
        self.boot = 0
        self.job = None
        self.out = None
        self.done = []
        self.load()

    def load(self):
        try:
            with open(self.path) as f:
                d = json.load(f)
            if not isinstance(d, dict) or d.get("ver") != _VERSION:
                raise ValueError("unknown journal format")
            job, out, done = d.get("job"), d.get("out"), d.get("done", [])
            if job is not None and not _job_ok(job):
                raise ValueError("bad job entry")
            if out is not None and not _out_ok(out):
                raise ValueError("bad outbox entry")
            if not (isinstance(done, list) and all(isinstance(e, str) for e in done)):
                raise ValueError("bad done list")
            self.boot = d.get("boot", 0) if isinstance(d.get("boot"), int) else 0
            self.job, self.out, self.done = job, out, done[-DONE_MAX:]
        except OSError:
            self._clean("no journal")
        except (ValueError, TypeError, KeyError) as e:
            self._clean("journal unreadable (%s)" % (e,))

    def _clean(self, why):
        if self.log:
            self.log("journal: %s: clean start" % why)
        self.job = None
        self.out = None
        self.done = []

    def save(self):
        data = json.dumps({"ver": _VERSION, "boot": self.boot, "job": self.job,
                           "out": self.out, "done": self.done})
        with open(self.tmp, "w") as f:
            n = f.write(data)  # bytes (UTF-8), not characters
        try:
            os.rename(self.tmp, self.path)
        except OSError:
            os.rmdir(self.path)  # an empty directory holds the name: clear it, once
            os.rename(self.tmp, self.path)
        self.writes += 1
        self.bytes_written += n

    # -- the transitions a job goes through (each one write) -----------------------------------
    def booted(self):
        self.boot += 1
        self.save()

    def start(self, job_id, number, version):
        self.job = {"id": job_id, "n": number, "v": version, "step": 0, "cp": None, "t": RUN}
        self.save()

    def checkpoint(self, step, cp, state=RUN):
        j = self.job
        j["step"] = step
        j["cp"] = cp
        j["t"] = state
        self.save()

    def finish(self, status, details, version):
        """The job is over on the device: move it to the outbox in the same write."""
        j = self.job
        self.out = [j["id"], j["n"], status, details, version]
        self.job = None
        self.save()

    def acknowledged(self):
        """The service has the terminal status: remember the execution as done."""
        o = self.out
        if o is not None:
            self.done.append("%s:%s:%s" % (o[0], o[1], o[2]))
            del self.done[:-DONE_MAX]
        self.out = None
        self.save()

    def abandon(self):
        """The execution was settled elsewhere (cancelled, removed, timed out): forget it."""
        j = self.job
        if j is not None:
            self.done.append("%s:%s:%s" % (j["id"], j["n"], "ABANDONED"))
            del self.done[:-DONE_MAX]
        self.job = None
        self.save()

    def finished_status(self, job_id, number):
        """The status this device gave the execution, if it finished it recently; else None."""
        prefix = "%s:%s:" % (job_id, number)
        for entry in self.done:
            if entry.startswith(prefix):
                return entry[len(prefix):]
        return None
