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
#   oom   resets the runner made in a row because memory ran out (it backs off on them)
#   job["m"]  memory faults the current job has met (the runner resumes it a few times, then
#         ends it FAILED OUT_OF_MEMORY)
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
        self.oom = 0
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
            self.oom = d.get("oom", 0) if isinstance(d.get("oom"), int) else 0
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

    def save(self, job: "dict | int | None" = 0, out: "list | int | None" = 0, done=None):
        """Write the state with `job`, `out`, `done` replaced (0: keep; None is a value), then
        adopt them: the object changes only once the new state is in flash, so an exception
        anywhere in here (a MemoryError while serialising, an I/O error) leaves memory and flash
        saying the same thing."""
        job = self.job if isinstance(job, int) else job
        out = self.out if isinstance(out, int) else out
        done = self.done if done is None else done
        state = {"ver": _VERSION, "boot": self.boot, "oom": self.oom, "job": job, "out": out,
                 "done": done}
        try:
            data = json.dumps(state)  # one write: the fast path
        except MemoryError:
            # No contiguous block for the whole text (a 500-byte string failed with 7 KB free
            # in the near-minimum-heap test): stream it into the file piece by piece instead.
            data = None
        with open(self.tmp, "w") as f:
            if data is None:
                json.dump(state, f)
            else:
                f.write(data)
            n = f.tell()  # bytes (UTF-8), not characters
        try:
            os.rename(self.tmp, self.path)
        except OSError:
            os.rmdir(self.path)  # an empty directory holds the name: clear it, once
            os.rename(self.tmp, self.path)
        self.job = job
        self.out = out
        self.done = done
        self.writes += 1
        self.bytes_written += n

    # -- the transitions a job goes through (each one write) -----------------------------------
    def booted(self):
        self.boot += 1
        try:
            self.save()
        except BaseException:
            self.boot -= 1
            raise

    def start(self, job_id, number, version):
        self.save({"id": job_id, "n": number, "v": version, "step": 0, "cp": None, "t": RUN})

    def checkpoint(self, step, cp, state=RUN, faults=None):
        """The step running and the handler's checkpoint; `faults` counts the memory faults
        this job has met (kept when None)."""
        j = self.job.copy()  # a checkpoint: a job is running
        j["step"] = step
        j["cp"] = cp
        j["t"] = state
        if faults is not None:
            j["m"] = faults
        self.save(j)

    def finish(self, status, details, version):
        """The job is over on the device: move it to the outbox in the same write."""
        j = self.job
        self.save(None, [j["id"], j["n"], status, details, version])

    def acknowledged(self):
        """The service has the terminal status: remember the execution as done."""
        o = self.out
        done = self.done
        if o is not None:
            done = done[-(DONE_MAX - 1):] + ["%s:%s:%s" % (o[0], o[1], o[2])]
        self.save(0, None, done)

    def abandon(self):
        """The execution was settled elsewhere (cancelled, removed, timed out): forget it."""
        j = self.job
        done = self.done
        if j is not None:
            done = done[-(DONE_MAX - 1):] + ["%s:%s:%s" % (j["id"], j["n"], "ABANDONED")]
        self.save(None, 0, done)

    def finished_status(self, job_id, number):
        """The status this device gave the execution, if it finished it recently; else None."""
        prefix = "%s:%s:" % (job_id, number)
        for entry in self.done:
            if entry.startswith(prefix):
                return entry[len(prefix):]
        return None
