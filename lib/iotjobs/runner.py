# The job engine: one job at a time, durable across power cuts.
#
# Boot: load the journal, count the boot, connect, then reconcile before asking for new work:
#   - an outbox entry (terminal update never acknowledged) is sent again;
#   - an interrupted job is described: still pending -> its handler resumes from the journal's
#     step and checkpoint; settled elsewhere (cancelled, removed, timed out, gone) -> the
#     handler's abort() runs and the job is dropped.
# Loop: start-next, journal the job (before any side effect), run its steps' handlers, journal
# the outcome into the outbox, send the terminal update with expectedVersion, clear the outbox
# when the service answers, then the next job. Wake on notify-next; re-sync (start-next) after
# every reconnect and every few minutes in case an event was lost.
#
# Memory: running out is a fault like a power cut. The journal changes only once it is written,
# so after a MemoryError anywhere (in a handler, in the runner, in the client) what the loop
# knows is what the journal says: a job it holds is reconciled with the service and resumed,
# never started again. A job that meets a second fault in one boot resets the device (a fresh
# heap is a defragmented one) and resumes after the boot; after OOM_JOB_MAX faults it ends
# FAILED OUT_OF_MEMORY. A reply the heap could not hold is asked for again; "too large" is
# only ever said of a reply over the transport's limit. Faults back off (oom_backoff_ms,
# doubling); OOM_RESET faults in a row without progress reset the device, after a pause that
# doubles with each such reset in a row.
import gc
import time
from micropython import const
from . import codec
from .client import ACCEPTED, REJECTED, TIMEOUT, TOO_LARGE, NO_MEMORY
from .topics import START_NEXT_ACCEPTED as T_START_NEXT, UPDATE_ACCEPTED as T_UPDATE

# For type checkers only (tools/stubcheck, an editor): the compiler folds the constant and drops
# the block, so these imports cost the device nothing.
TYPE_CHECKING = const(False)
if TYPE_CHECKING:
    from .appstate import AppState
    from .commands import Commands

_DEBUG = const(False)
OOM_RESET = const(5)  # memory faults in a row, without progress, before the device resets
OOM_JOB_MAX = const(4)  # memory faults one job may meet before it ends FAILED OUT_OF_MEMORY
_OOM_JOB_BOOT = const(2)  # a job's memory faults in one boot before a reset (a fresh heap)
_OOM_FORGET_MS = const(600000)  # faults further apart than this are not "in a row"
_OOM_PAUSE_MAX_MS = const(300000)

# Reason codes in statusDetails["reason"].
R_OK = "OK"
R_UNKNOWN_OPERATION = "UNKNOWN_OPERATION"
R_BAD_DOCUMENT = "BAD_DOCUMENT"
R_HANDLER_ERROR = "HANDLER_ERROR"
R_INTERRUPTED = "INTERRUPTED"
R_TIMEOUT = "TIMEOUT"
R_TOO_LARGE = "DOCUMENT_TOO_LARGE"
R_ALREADY_DONE = "ALREADY_DONE"
R_OUT_OF_MEMORY = "OUT_OF_MEMORY"

_TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "REMOVED", "CANCELED")
# Rejection codes that mean "the service settled this execution otherwise".
_SETTLED = ("ResourceNotFound", "TerminalStateReached", "InvalidStateTransition")
# Rejection codes worth retrying later.
_TRANSIENT = ("RequestThrottled", "InternalError")


class JobFailed(Exception):
    """Raised by a handler to end its job FAILED with a reason code and details."""

    def __init__(self, reason, message=None, **details):
        super().__init__(reason)
        self.reason = reason
        self.details = details
        if message is not None:
            details["message"] = message


class JobRejected(JobFailed):
    """Raised by a handler that refuses a job it cannot or must not run: the job ends REJECTED."""


class JobCanceled(Exception):
    """The service settled the execution while its handler ran (cancelled, timed out, removed)."""


class _Reboot(Exception):
    pass


class Handler:
    """Base of job handlers. `run` does the work; `resume` continues after a reset in the middle
    of `run` (with the last checkpoint); `abort` cleans up when the job was cancelled meanwhile.

    A handler that is safe to run twice sets `idempotent = True`: it is simply run again. The
    default `resume` of any other handler ends the job FAILED (INTERRUPTED): at most once."""

    idempotent = False

    def run(self, ctx, document):
        raise NotImplementedError

    def resume(self, ctx, document, checkpoint):
        if self.idempotent:
            return self.run(ctx, document)
        raise JobFailed(R_INTERRUPTED, "the device restarted while the handler ran")

    def abort(self, ctx):
        pass


class FunctionHandler(Handler):
    """A plain function `fn(ctx, document)` as a handler."""

    def __init__(self, fn, idempotent=False):
        self.fn = fn
        self.idempotent = idempotent

    def run(self, ctx, document):
        return self.fn(ctx, document)


class Context:
    """What a handler sees of its job: progress, checkpoints, its deadline, reboot."""

    def __init__(self, runner, job_id, number, document, step, steps, deadline, checkpoint=None):
        self.runner = runner
        self.id = job_id
        self.execution_number = number
        self.document = document
        self.step = step
        self.steps = steps
        self.deadline = deadline  # time.ticks_ms() value
        self.last_checkpoint = checkpoint
        self.boot = runner.journal.boot
        self._last_progress = None

    def remaining_ms(self):
        return time.ticks_diff(self.deadline, time.ticks_ms())

    def check(self):
        """Raise JobFailed(TIMEOUT) once the handler's deadline has passed."""
        if self.remaining_ms() <= 0:
            raise JobFailed(R_TIMEOUT, "the handler ran past its deadline")

    def progress(self, force=False, **details):
        """Report IN_PROGRESS with details (rate-limited unless `force`); renews the step
        timeout. Raises JobCanceled when the service has settled the execution meanwhile."""
        self.check()
        now = time.ticks_ms()
        r = self.runner
        if (not force and self._last_progress is not None
                and time.ticks_diff(now, self._last_progress) < r.progress_min_ms):
            return False
        self._last_progress = now
        return r.report_progress(self.id, self.execution_number, details)

    def checkpoint(self, data):
        """Record the handler's progress in flash (one journal write): after a reset,
        `resume` receives the last checkpoint."""
        self.last_checkpoint = data
        self.runner.journal.checkpoint(self.step, data)

    def fresh_document(self):
        """This step's document as the service delivers it now (describe): presigned URLs in it
        are signed afresh. None when the service does not answer."""
        r = self.runner
        res, doc = r.client.describe(self.id, True, self.execution_number)
        ex = doc.get("execution") if res == ACCEPTED else None
        if not isinstance(ex, dict):
            return None
        try:
            return codec.steps(ex.get("jobDocument"))[self.step][1]
        except (ValueError, IndexError):
            return None

    def request_reboot(self):
        """Reset the device now; the job resumes after the boot (checkpoint first)."""
        raise _Reboot()

    def point(self, name):
        self.runner.point(name)


class Runner:
    def __init__(
        self,
        client,
        journal,
        handlers=None,
        log=print,
        reset=None,
        poll_ms=1000,
        recheck_s=300,
        progress_min_ms=5000,
        step_timeout_min=None,
        handler_timeout_s=600,
        retry_ms=2000,
        sleep_ms=time.sleep_ms,
        on_point=None,
        reset_grace_ms=5000,
        oom_backoff_ms=100,
    ):
        self.client = client
        self.journal = journal
        self.handlers = {}
        for op in handlers or {}:
            self.register(op, handlers[op])
        self.log = log
        self.reset = reset
        self.poll_ms = poll_ms
        self.recheck_ms = recheck_s * 1000
        self.progress_min_ms = progress_min_ms
        self.step_timeout_min = step_timeout_min
        self.handler_timeout_ms = handler_timeout_s * 1000
        self.retry_ms = retry_ms
        self.sleep_ms = sleep_ms
        self.on_point = on_point
        self.reset_grace_ms = reset_grace_ms
        self.oom_backoff_ms = oom_backoff_ms
        self.memory_faults = 0  # since start (tests and the heap log line read it)
        self._oom = 0  # faults in a row without progress
        self._oom_at = 0
        self._oom_resume = False  # the journal's job is to be resumed after a memory fault
        self._job_oom = 0  # memory faults of the journal's job in this boot
        self._cdone = 0
        self.on_online = None
        self.tick = None  # called about once per poll_ms while idle (the application's hook)
        self.commands: "Commands | None" = None  # run between job steps
        self.app: "AppState | None" = None  # the installed application (firmware/app.py)
        self.version = None  # versionNumber of the current execution, as last seen
        self.jobs_done = 0
        self._want_next = True
        self._recover = True
        self._subscribed = False  # every jobs (and commands) filter acknowledged once
        self._last_check = time.ticks_ms()
        self._backoff = retry_ms
        self._retry_at = None
        self._relink_at = None
        if on_point is not None:
            client.on_sent = self._sent
        journal.booted()

    def register(self, operation, handler):
        if not isinstance(handler, Handler):
            handler = FunctionHandler(handler)
        self.handlers[operation] = handler

    def point(self, name):
        """A named point in a job's life (tests halt the device here to cut its power)."""
        if self.on_point is not None:
            self.on_point(name)

    def _sent(self, code):
        if code == T_START_NEXT:
            self.point("start-next-sent")
        elif code == T_UPDATE:
            self.point("update-sent")

    # -- main loop ---------------------------------------------------------------------------
    def run(self, until=None):
        """Run for ever (or until `until()` is true), reconnecting whenever the link fails."""
        t = self.client.transport
        while until is None or not until():
            try:
                if not t.connected:
                    t.reconnect(self.sleep_ms)
                    if not self._subscribed:
                        # All of them, again, until once every one got through: a link lost
                        # in the middle leaves the transport restoring only the first few
                        # (soak seed 4). A repeated SUBSCRIBE is harmless.
                        self.client.subscribe()
                        if self.commands is not None:
                            self.commands.subscribe()
                        self._subscribed = True
                    self.log("connected")
                    self._want_next = True
                    self._recover = True
                    self._retry_at = None
                self.step()
            except OSError as e:
                self.log("link lost: %r" % (e,))
                t.close()
            except MemoryError:
                self.memory_fault("loop")

    def memory_fault(self, where):
        """Out of memory somewhere in the loop (or a reply the heap could not hold): go back to
        what the journal says, back off, and reset when it keeps happening."""
        gc.collect()
        now = time.ticks_ms()
        if self._oom and time.ticks_diff(now, self._oom_at) > _OOM_FORGET_MS:
            self._oom = 0
        self._oom += 1
        self._oom_at = now
        self.memory_faults += 1
        j = self.journal
        job = j.job
        if job is not None:
            self._recover = True
            self._oom_resume = True
            self._job_oom += 1
            try:  # counted in flash: the bound holds across the resets below
                j.checkpoint(job["step"], job["cp"], job["t"], job.get("m", 0) + 1)
            except (MemoryError, OSError):
                pass
        self._want_next = True
        c = self.commands
        if c is not None:
            c.recover()
        if self._oom == 1:  # once per burst: a log line costs heap too
            self._say("out of memory (%s, free %d): back to the journal" % (where, gc.mem_free()))
        if self._oom < OOM_RESET and self._job_oom < _OOM_JOB_BOOT:
            self.sleep_ms(self.oom_backoff_ms << (self._oom - 1))
            return
        n = self._oom
        self._oom = 0
        self._job_oom = 0
        if self.reset is None:
            self.sleep_ms(_OOM_PAUSE_MAX_MS // 10)
            return
        pause = min(1000 << min(j.oom, 10), _OOM_PAUSE_MAX_MS)
        j.oom += 1
        try:
            j.save()
        except (MemoryError, OSError):
            pass
        self._say("out of memory %d times in a row: reset in %d ms" % (n, pause))
        self.sleep_ms(pause)
        self.reset()
        self.sleep_ms(self.reset_grace_ms)

    def _say(self, msg):
        try:
            self.log(msg)
        except MemoryError:
            pass

    def _progressed(self):
        """Work got done: faults before this are not "in a row"."""
        self._oom = 0
        self._job_oom = 0
        self.journal.oom = 0

    def _waiting(self):
        """True while backing off after a transient failure (waits on the link meanwhile)."""
        if self._retry_at is None:
            return False
        left = time.ticks_diff(self._retry_at, time.ticks_ms())
        if left <= 0:
            self._retry_at = None
            return False
        self.client.transport.wait(min(left, self.poll_ms))
        return True

    def _later(self):
        self._retry_at = time.ticks_add(time.ticks_ms(), self._backoff)
        self._backoff = min(self._backoff * 2, 60000)

    def step(self):
        """One turn of the loop."""
        if self.on_online is not None and self.client.replied:
            cb, self.on_online = self.on_online, None
            cb()  # the service answered once since boot (the new firmware's self-test)
        if self._waiting():
            return
        j = self.journal
        if j.out is not None:
            self._flush()
            return
        if self._recover:
            if j.job is not None and not self._reconcile():
                return
            self._recover = False
            if j.out is not None:  # the resumed job ended; its outcome is sent first
                return
        c = self.commands
        if c is not None and c.busy() and c.step():
            if c.done != self._cdone:
                self._cdone = c.done
                self._progressed()
            return
        now = time.ticks_ms()
        if time.ticks_diff(now, self._last_check) >= self.recheck_ms:
            self._want_next = True
        if self.client.take_next_event():  # one that came while a command or a job ran
            self._want_next = True
        if self._want_next:
            self._want_next = False
            self._last_check = now
            self._start_next()
            return
        if self.tick is not None:
            try:
                self.tick()
            except Exception as e:  # the application's fault must not stop the jobs
                self.log("tick failed: %r" % (e,))
        self.client.transport.wait(self.poll_ms)
        if self.client.take_next_event():
            self._want_next = True

    # -- after a reset -----------------------------------------------------------------------
    def _reconcile(self):
        """Settle the interrupted job of the journal with the service. False: try again later."""
        j = self.journal.job
        res, doc = self.client.describe(j["id"], True, j["n"])
        if res == TIMEOUT:
            self._later()
            return False
        if res == NO_MEMORY:
            self.memory_fault("describe reply")
            return False
        if res == REJECTED:
            code = doc.get("code")
            if code in _TRANSIENT:
                self._later()
                return False
            self.log("job %s: %s at the service: abandoned" % (j["id"], code))
            self._abandon(j, None)
            return True
        ex = doc.get("execution") if res == ACCEPTED else None
        if not isinstance(ex, dict):
            if res == TOO_LARGE:  # cannot hold the document again: end it
                self._finish(codec.REJECTED, {"reason": R_TOO_LARGE})
                return True
            self._abandon(j, None)
            return True
        status = ex.get("status")
        if ex.get("executionNumber", j["n"]) != j["n"]:
            # Another execution of the job answered (a retry replaced ours): the journal's
            # attempt is over, and its step and checkpoint never carry over to another one.
            status = "REPLACED"
        if status in _TERMINAL or status == "REPLACED":
            self.log("job %s: %s at the service: abandoned" % (j["id"], status))
            self._abandon(j, ex.get("jobDocument"))
            return True
        self.version = ex.get("versionNumber")
        self._resume(j, ex.get("jobDocument"))
        return True

    def _resume(self, j, document):
        """Continue the journal's job from its step and checkpoint (after a boot, or after a
        memory fault: those are counted in the journal, and bounded)."""
        m = j.get("m", 0)
        if m >= OOM_JOB_MAX:
            self._oom_resume = False
            self._finish(codec.FAILED, {"reason": R_OUT_OF_MEMORY, "message":
                                        "out of memory %d times while running" % m})
            return
        if self._oom_resume:
            self._oom_resume = False
            self.log("job %s: resuming step %d after a memory fault" % (j["id"], j["step"]))
        else:
            self.log("job %s: resuming step %d after boot %d" % (j["id"], j["step"],
                                                                  self.journal.boot))
        self._run_steps(j["id"], j["n"], document, j["step"], j["cp"], True)

    def _abandon(self, j, document):
        """The execution was settled elsewhere: let its handler clean up, then forget it."""
        try:
            op = codec.steps(document)[j["step"]][0] if document is not None else None
        except (ValueError, IndexError, TypeError):
            op = None
        h = self.handlers.get(op) if op else None
        if h is not None:
            ctx = Context(self, j["id"], j["n"], document, j["step"], 1, time.ticks_ms(), j["cp"])
            try:
                h.abort(ctx)
            except Exception as e:  # an abort that fails must not take the loop down
                self.log("job %s: abort failed: %r" % (j["id"], e))
        self.journal.abandon()
        self.point("abandoned")

    # -- new work ----------------------------------------------------------------------------
    def _start_next(self):
        self.point("before-start-next")
        res, doc = self.client.start_next(None, self.step_timeout_min)
        if res == TIMEOUT:
            self.log("start-next: no reply")
            self._want_next = True
            self._later()
            return
        if res == NO_MEMORY:
            self.memory_fault("start-next reply")
            return
        if res == TOO_LARGE:
            self._too_large()
            return
        if res == REJECTED:
            self.log("start-next rejected: %s" % doc.get("code"))
            if doc.get("code") in _TRANSIENT:
                self._want_next = True
                self._later()
            return
        self._backoff = self.retry_ms
        ex = doc.get("execution")
        if not isinstance(ex, dict):
            self._idle()  # nothing pending
            return
        self.point("start-next-accepted")
        self.run_job(ex)
        self._want_next = True

    def _too_large(self):
        """start-next's reply did not fit: find the job without its document and reject it."""
        res, doc = self.client.describe("$next", False)
        if res == NO_MEMORY:
            self.memory_fault("describe reply")
            return
        ex = doc.get("execution") if res == ACCEPTED else None
        if not isinstance(ex, dict) or not isinstance(ex.get("jobId"), str):
            self._later()
            self._want_next = True
            return
        n = ex.get("executionNumber")
        if not isinstance(n, int) or isinstance(n, bool):  # the journal keys on (id, n)
            self._later()
            self._want_next = True
            return
        if self.journal.job is not None:  # the journal's job comes first
            self._recover = True
            self._want_next = True
            return
        self.version = ex.get("versionNumber")
        self.journal.start(ex["jobId"], n, self.version)
        self._finish(codec.REJECTED, {"reason": R_TOO_LARGE, "message": "job document too large"})
        self._want_next = True

    def run_job(self, execution):
        job_id = execution.get("jobId")
        n = execution.get("executionNumber")
        if not isinstance(job_id, str) or not isinstance(n, int) or isinstance(n, bool):
            self.log("execution without a valid jobId/executionNumber dropped")
            return
        j = self.journal.job
        if j is not None:
            # The journal holds a job (a memory fault came between its journaling and now): it
            # is never started again. The same execution is resumed from its step; another
            # one waits until the journal's job is reconciled.
            if j["id"] != job_id or j["n"] != n:
                self._recover = True
                return
            self.version = execution.get("versionNumber")
            self._resume(j, execution.get("jobDocument"))
            return
        out = self.journal.out
        if out is not None and out[0] == job_id and out[1] == n:
            # Its outcome waits in the outbox (the service has not answered it): the outbox
            # sends it; the execution never runs again (soak seed 1000).
            return
        self.version = execution.get("versionNumber")
        if not isinstance(self.version, int):
            self.version = None
        done = self.journal.finished_status(job_id, n)
        if done is not None:
            # Finished here already (a stale or duplicate notification): never run it twice.
            self.log("job %s: already finished (%s); reporting again" % (job_id, done))
            status = done if done in (codec.SUCCEEDED, codec.FAILED, codec.REJECTED) else codec.FAILED
            self.journal.start(job_id, n, self.version)
            self._finish(status, {"reason": R_ALREADY_DONE})
            return
        self.journal.start(job_id, n, self.version)  # before any side effect
        self.point("journaled")
        self._run_steps(job_id, n, execution.get("jobDocument"), 0, None, False)

    def _run_steps(self, job_id, n, document, first, checkpoint, resuming):
        try:
            plan = codec.steps(document)
        except ValueError as e:
            reason = e.args[0] if e.args else R_BAD_DOCUMENT
            msg = "job document is not a JSON object" if reason == R_BAD_DOCUMENT else (
                "no handler for this job document")
            self._finish(codec.REJECTED, {"reason": reason, "message": msg})
            return
        for op, _, _ in plan:
            if op not in self.handlers:
                self._finish(codec.REJECTED, {"reason": R_UNKNOWN_OPERATION,
                                              "message": "no handler for operation %r" % (op,)})
                return
        timeout = document.get("timeoutSec") if isinstance(document, dict) else None
        if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
            timeout_ms = self.handler_timeout_ms
        else:
            timeout_ms = timeout * 1000
        deadline = time.ticks_add(time.ticks_ms(), timeout_ms)
        details = {"reason": R_OK}
        status = codec.SUCCEEDED
        for i in range(first, len(plan)):
            op, step_doc, ignore = plan[i]
            h = self.handlers[op]
            ctx = Context(self, job_id, n, step_doc, i, len(plan), deadline,
                          checkpoint if i == first else None)
            try:
                if resuming and i == first:
                    result = h.resume(ctx, step_doc, checkpoint)
                else:
                    result = h.run(ctx, step_doc)
                if isinstance(result, dict):
                    details.update(result)
            except _Reboot:
                if self.reset is None:
                    status, details = codec.FAILED, {"reason": "REBOOT_UNAVAILABLE"}
                    break
                self.journal.checkpoint(i, ctx.last_checkpoint, "REBOOT")
                self.point("before-reset")
                self.log("job %s: reboot requested by %s" % (job_id, op))
                self.reset()
                # machine.reset() does not return: still running after a grace period means
                # the reset never came.
                self.sleep_ms(self.reset_grace_ms)
                status, details = codec.FAILED, {"reason": "RESET_FAILED",
                                                 "message": "the device did not reset"}
                break
            except JobCanceled:
                self.log("job %s: settled by the service while running: abort" % job_id)
                try:
                    h.abort(ctx)
                except Exception as e:
                    self.log("job %s: abort failed: %r" % (job_id, e))
                self.journal.abandon()
                return
            except JobRejected as e:
                status, details = codec.REJECTED, _details(e)
            except JobFailed as e:
                status, details = codec.FAILED, _details(e)
            except MemoryError:
                raise  # a fault, not an outcome: the loop resumes the job from the journal
            except Exception as e:  # a handler bug must not take the loop down
                status = codec.FAILED
                details = {"reason": R_HANDLER_ERROR, "message": "%s: %s" % (type(e).__name__, e)}
            if status != codec.SUCCEEDED:
                if ignore:
                    status, details = codec.SUCCEEDED, {"reason": R_OK}
                else:
                    break
            if len(plan) > 1:
                details["steps"] = "%d/%d" % (i + 1, len(plan))
                if i + 1 < len(plan):
                    _commit(self.journal.checkpoint, i + 1, None)
        self.point("handler-done")
        self._finish(status, details)

    def _finish(self, status, details):
        j = self.journal.job
        # The outcome goes to flash first: a log line is worth less than the outcome.
        _commit(self.journal.finish, status, details, self.version)
        msg = details.get("message")
        self._say("job %s: %s %s%s" % (j["id"], status, details.get("reason"),
                                       ": " + msg if msg else ""))
        self.point("outbox-written")
        self._flush()

    # -- talking to the service --------------------------------------------------------------
    def report_progress(self, job_id, number, details):
        t = self.client.transport
        if not t.connected:
            # The link went down while the handler works: one attempt to bring it back (at
            # most once per backoff period), so progress and the step timer keep flowing;
            # otherwise the handler goes on and its outcome waits in the outbox.
            now = time.ticks_ms()
            if self._relink_at is not None and time.ticks_diff(self._relink_at, now) > 0:
                return False
            try:
                t.try_reconnect()
                self.log("connected")
                self._relink_at = None
                self._recover = False
            except OSError as e:
                self._relink_at = time.ticks_add(now, self._backoff)
                self._backoff = min(self._backoff * 2, 60000)
                self.log("link lost: %r" % (e,))
                return False
        try:
            res, doc = self.client.update(job_id, codec.IN_PROGRESS, details, None,
                                          self.step_timeout_min, number, True)
        except MemoryError:
            # Progress is best effort: the handler goes on (the stream is whole: the transport
            # never stops mid-packet).
            gc.collect()
            self.memory_faults += 1
            return False
        except OSError as e:
            # A lost link must not fail the job: the handler's work goes on; the main loop
            # reconnects once the handler returns, and the outbox delivers the outcome.
            self.log("link lost: %r" % (e,))
            t.close()
            return False
        if res == ACCEPTED:
            st = doc.get("executionState")
            if isinstance(st, dict) and isinstance(st.get("versionNumber"), int):
                self.version = st["versionNumber"]
            return True
        if res == REJECTED:
            code = doc.get("code")
            st = doc.get("executionState")
            if code in _SETTLED or (isinstance(st, dict) and st.get("status") in _TERMINAL):
                raise JobCanceled()
            if code == "VersionMismatch" and isinstance(st, dict):
                self.version = st.get("versionNumber")
        return False

    def _flush(self):
        """Send the outbox's terminal update; keep it until the service has answered it."""
        job_id, n, status, details, version = self.journal.out
        self.point("before-update")
        res, doc = self.client.update(job_id, status, details, version, None, n)
        if res == NO_MEMORY:
            self.memory_fault("update reply")
            return
        if res == TIMEOUT or res == TOO_LARGE:
            self.log("job %s: update not acknowledged, will resend" % job_id)
            self._later()
            return
        if res == REJECTED:
            code = doc.get("code")
            st = doc.get("executionState")
            seen = st.get("status") if isinstance(st, dict) else None
            if code in _TRANSIENT:
                self._later()
                return
            if code == "VersionMismatch" and seen not in _TERMINAL and isinstance(st, dict):
                self.journal.out[4] = st.get("versionNumber")  # someone else updated: retry
                return
            if code == "InvalidRequest" and details.get("reason") != "INVALID_DETAILS":
                self.journal.out[3] = {"reason": "INVALID_DETAILS"}
                return
            # Settled already: by this very update (a resend) or otherwise (cancelled...).
            self.log("job %s: update rejected: %s (%s)" % (job_id, code, seen))
        self.point("update-answered")
        self._backoff = self.retry_ms
        self._progressed()
        _commit(self.journal.acknowledged)
        self.point("outbox-cleared")
        self.jobs_done += 1
        self.version = None

    def _idle(self):
        """The queue is empty: a good moment to tidy the heap and say how it looks."""
        gc.collect()
        self._progressed()
        j = self.journal
        self.log("heap free=%d alloc=%d journal=%d/%d jobs=%d oom=%d lost=%d" % (
            gc.mem_free(), gc.mem_alloc(), j.writes, j.bytes_written, self.jobs_done,
            self.memory_faults, self.client.transport.lost_count))


def _commit(fn, *args):
    """A journal write after work that must not be lost: a MemoryError (the failed attempt's
    garbage is freed when it unwinds) is tried again twice before it becomes a fault."""
    for _ in range(2):
        try:
            return fn(*args)
        except MemoryError:
            gc.collect()
    return fn(*args)


def _details(e):
    d = {"reason": e.reason}
    d.update(e.details)
    return d
