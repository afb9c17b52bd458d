# The job loop: ask for the next job (start-next), run its handler, report the outcome, repeat;
# wake on notify-next, poll now and then in case an event was lost, and survive any failure of
# the connection. One job at a time.
import time
from micropython import const
from . import codec
from .client import ACCEPTED, REJECTED, TIMEOUT

_DEBUG = const(False)

# Reason codes in statusDetails["reason"].
R_OK = "OK"
R_UNKNOWN_OPERATION = "UNKNOWN_OPERATION"
R_BAD_DOCUMENT = "BAD_DOCUMENT"
R_HANDLER_ERROR = "HANDLER_ERROR"


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


class Job:
    """What a handler sees of the job it runs."""

    def __init__(self, runner, execution):
        self.runner = runner
        self.execution = execution
        self.id = execution.get("jobId")
        self.document = execution.get("jobDocument")

    def progress(self, **details):
        """Report IN_PROGRESS with details. False when the service refused it (e.g. cancelled)."""
        res, _ = self.runner.client.update(self.id, codec.IN_PROGRESS, details)
        return res == ACCEPTED


class Runner:
    def __init__(
        self,
        client,
        handlers=None,
        log=print,
        poll_ms=1000,
        recheck_s=300,
        sleep_ms=time.sleep_ms,
    ):
        self.client = client
        self.handlers = dict(handlers or {})
        self.log = log
        self.poll_ms = poll_ms
        self.recheck_ms = recheck_s * 1000
        self.sleep_ms = sleep_ms
        self.outbox = None  # (job id, status, details): a terminal update not yet acknowledged
        self._want_next = True
        self._last_check = time.ticks_ms()
        self.jobs_done = 0

    def register(self, operation, handler):
        self.handlers[operation] = handler

    # -- main loop ---------------------------------------------------------------------------
    def run(self, until=None):
        """Run for ever (or until `until()` is true), reconnecting whenever the link fails."""
        t = self.client.transport
        while until is None or not until():
            try:
                if not t.connected:
                    t.reconnect(self.sleep_ms)
                    if not t.subs:
                        self.client.subscribe()
                    self.log("connected")
                    self._want_next = True
                self.step()
            except OSError as e:
                self.log("link lost: %r" % (e,))
                t.close()

    def step(self):
        """One turn of the loop: flush the outbox, fetch and run a job, or wait for an event."""
        if self.outbox is not None:
            self._flush()
            return
        now = time.ticks_ms()
        if time.ticks_diff(now, self._last_check) >= self.recheck_ms:
            self._want_next = True
        if self._want_next:
            self._want_next = False
            self._last_check = now
            self._start_next()
            return
        self.client.transport.wait(self.poll_ms)
        ev = self.client.take_next_event()
        if ev is not None and isinstance(ev.get("execution"), dict):
            self._want_next = True

    def _start_next(self):
        res, doc = self.client.start_next()
        if res == TIMEOUT:
            self.log("start-next: no reply")
            self._want_next = True
            return
        if res == REJECTED:
            self.log("start-next rejected: %s" % doc.get("code"))
            return
        ex = doc.get("execution")
        if not isinstance(ex, dict):
            return  # nothing pending
        self.run_job(ex)
        self._want_next = True

    # -- one job -----------------------------------------------------------------------------
    def run_job(self, execution):
        job = Job(self, execution)
        if not isinstance(job.id, str):
            self.log("execution without jobId dropped")
            return
        self.log("job %s: start" % job.id)
        status, details = self._outcome(job)
        self.log("job %s: %s %s" % (job.id, status, details.get("reason")))
        self.outbox = (job.id, status, details)
        self._flush()

    def _outcome(self, job):
        if not isinstance(job.document, dict):
            return codec.REJECTED, {"reason": R_BAD_DOCUMENT, "message": "job document is not a JSON object"}
        op = codec.operation(job.document)
        handler = self.handlers.get(op) if op else None
        if handler is None:
            return codec.REJECTED, {
                "reason": R_UNKNOWN_OPERATION,
                "message": "no handler for operation %r" % (op,),
            }
        try:
            result = handler(job)
        except JobRejected as e:
            return codec.REJECTED, _details(e)
        except JobFailed as e:
            return codec.FAILED, _details(e)
        except Exception as e:  # a handler bug must not take the loop down
            return codec.FAILED, {"reason": R_HANDLER_ERROR, "message": "%s: %s" % (type(e).__name__, e)}
        details = {"reason": R_OK}
        if isinstance(result, dict):
            details.update(result)
        return codec.SUCCEEDED, details

    def _flush(self):
        """Send the pending terminal update; keep it until the service answers it."""
        job_id, status, details = self.outbox
        res, doc = self.client.update(job_id, status, details)
        if res == TIMEOUT:
            self.log("job %s: update not acknowledged, will resend" % job_id)
            return
        if res == REJECTED:
            # The service settled this execution otherwise (cancelled, timed out, already
            # terminal): nothing we resend can change that.
            self.log("job %s: update rejected: %s" % (job_id, doc.get("code")))
        self.outbox = None
        self.jobs_done += 1


def _details(e):
    d = {"reason": e.reason}
    d.update(e.details)
    return d
