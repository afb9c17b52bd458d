# Retried jobs (FLEET.md 3.4): a retry is a new execution of the same job for this thing, QUEUED
# with the next executionNumber and versionNumber 1, announced by notify-next. The device keys
# what it has finished by (jobId, executionNumber): a new execution of a job it finished runs
# again from scratch (run, no checkpoint), while the same execution handed back again is never
# run twice (ALREADY_DONE with the recorded status), and a power cut resumes the attempt the
# journal holds, never another one.
#
# The runner, journal, client and transport are the real ones; only the socket is missing:
# `Link` hands publishes to `Jobs`, a small jobs service that keeps executions keyed (jobId,
# executionNumber) and answers as PROTOCOL.md says the real one does (update and describe take
# executionNumber, the latest when it is omitted; a terminal execution refuses updates). A
# power cut is a BaseException raised at a named point: nothing in the runner catches it, so
# the journal on flash is what a cut would leave; the next "boot" is a new Runner over a new
# Journal loaded from the same file, against the same service.
import json
import os
import time
from binascii import hexlify

from iotjobs.client import JobsClient
from iotjobs.journal import Journal
from iotjobs.runner import Handler, JobFailed, Runner, R_ALREADY_DONE
from iotjobs.transport import Transport

BASE = b"$aws/things/dev1/jobs/"
TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "REMOVED", "CANCELED")
STEPS = 400  # turns of the loop a scenario may take (each one is a few messages at most)


class PowerCut(BaseException):
    pass


class _Sock:
    def close(self):
        pass


class Link(Transport):
    """A Transport without a socket: publishes go to the service, which queues its answers;
    wait() hands one queued message to the callback, as the receive path does."""

    def __init__(self, service):
        super().__init__(b"dev1", "127.0.0.1", 1)
        self.service = service
        service.link = self
        self.inbox = []

    def try_reconnect(self):
        self.sock = _Sock()

    def subscribe(self, topic, qos=1):
        self.subs.append((topic, qos))

    def publish(self, topic, msg, retain=False, qos=0, wait=True):
        self.service.on_publish(topic, msg)

    def wait(self, timeout_ms):
        if self.inbox:
            topic, msg = self.inbox.pop(0)
            if msg is None:
                self.lost = 1  # transport.TOO_LARGE: drained, over the limit
            self.cb(topic, msg)
            return 0x30
        time.sleep_ms(min(timeout_ms, 10))  # a wait waits (the runner's backoff is a few ms here)
        return None


class Jobs:
    """The jobs service for one thing. `retries`: how many times a FAILED or TIMED_OUT attempt
    is retried (a new execution n+1, QUEUED, versionNumber 1, notify-next)."""

    def __init__(self):
        self.link = None
        self.jobs = {}  # job id -> {"doc", "retries"}
        self.order = []  # job ids, oldest first
        self.ex = {}  # (job id, executionNumber) -> {"status", "v", "details", "attempt"}
        self.requests = []  # (job id or "start-next", verb, request) in the order received
        self.stale = []  # executions start-next hands back once more, as first delivered
        self.ignore_number = False  # a faulty service: describe/update answer the latest
        self.too_large = 0  # start-next replies to come as too large for the device to hold
        self.unnumbered = 0  # describe replies to come without executionNumber

    # -- the operator's side --------------------------------------------------------------
    def create(self, job_id, doc, retries=0):
        self.jobs[job_id] = {"doc": doc, "retries": retries}
        self.order.append(job_id)
        self._queue(job_id, 1, 0)

    def requeue(self, job_id):
        """A new execution of the job (as a retry makes one), whatever the last one's end."""
        n = self.latest(job_id)
        self._queue(job_id, n + 1, self.ex[(job_id, n)]["attempt"] + 1)

    def time_out(self, job_id, n):
        e = self.ex[(job_id, n)]
        e["status"] = "TIMED_OUT"
        e["v"] += 1
        self._ended(job_id, n)

    def status(self, job_id):
        """{executionNumber: status} of the job."""
        return {k[1]: e["status"] for k, e in self.ex.items() if k[0] == job_id}

    def updates(self, job_id, n):
        """The update requests that addressed execution n (the latest, without a number)."""
        return [r for j, verb, r in self.requests if j == job_id and verb == "update"
                and r.get("executionNumber") == n]

    # -- internals ------------------------------------------------------------------------
    def latest(self, job_id):
        return max(k[1] for k in self.ex if k[0] == job_id)

    def _queue(self, job_id, n, attempt):
        self.ex[(job_id, n)] = {"status": "QUEUED", "v": 1, "details": {}, "attempt": attempt}
        if self.link is not None:
            self._push(b"notify-next", {"timestamp": 1, "execution": self._view(job_id, n)})

    def _ended(self, job_id, n):
        e = self.ex[(job_id, n)]
        if e["status"] in ("FAILED", "TIMED_OUT") and e["attempt"] < self.jobs[job_id]["retries"]:
            self._queue(job_id, n + 1, e["attempt"] + 1)

    def _view(self, job_id, n, doc=True):
        e = self.ex[(job_id, n)]
        v = {"jobId": job_id, "status": e["status"], "queuedAt": 1, "lastUpdatedAt": 1,
             "versionNumber": e["v"], "executionNumber": n}
        if e["details"]:
            v["statusDetails"] = e["details"]
        if doc:
            v["jobDocument"] = self.jobs[job_id]["doc"]
        return v

    def _state(self, key):
        e = self.ex[key]
        return {"status": e["status"], "statusDetails": e["details"], "versionNumber": e["v"]}

    def _push(self, suffix, body):
        self.link.inbox.append((BASE + suffix, None if body is None else json.dumps(body).encode()))

    def _pending(self):
        for want in ("IN_PROGRESS", "QUEUED"):
            for job_id in self.order:
                n = self.latest(job_id)
                if self.ex[(job_id, n)]["status"] == want:
                    return job_id, n
        return None

    def on_publish(self, topic, msg):
        assert topic.startswith(BASE), topic
        req = json.loads(msg)
        tok = req["clientToken"]
        rest = topic[len(BASE):].decode()
        if rest == "start-next":
            self.requests.append(("start-next", "start-next", req))
            body = {"clientToken": tok, "timestamp": 1}
            if self.stale:
                body["execution"] = self.stale.pop(0)
            else:
                key = self._pending()
                if key is not None:
                    e = self.ex[key]
                    if e["status"] == "QUEUED":
                        e["status"] = "IN_PROGRESS"
                        e["v"] += 1
                    body["execution"] = self._view(*key)
                    e["delivered"] = body["execution"]
            if self.too_large and "execution" in body:
                self.too_large -= 1
                body = None
            self._push(b"start-next/accepted", body)
            return
        job_id, verb = rest.split("/")
        self.requests.append((job_id, verb, req))
        n = req.get("executionNumber")
        if job_id in self.jobs and (n is None or self.ignore_number):
            n = self.latest(job_id)
        key = (job_id, n)
        if job_id == "$next":
            key = self._pending()
            job_id, n = key if key is not None else ("$next", None)
        reply = (job_id + "/" + verb).encode()
        if key not in self.ex:
            self._push(reply + b"/rejected", {"clientToken": tok, "code": "ResourceNotFound",
                                              "message": "no such execution"})
            return
        if verb == "get":
            view = self._view(job_id, n, req.get("includeJobDocument", True))
            if self.unnumbered:
                self.unnumbered -= 1
                del view["executionNumber"]
            self._push(reply + b"/accepted", {"clientToken": tok, "timestamp": 1, "execution": view})
            return
        assert verb == "update", verb
        e = self.ex[key]
        if e["status"] in TERMINAL:
            self._push(reply + b"/rejected", {
                "clientToken": tok, "code": "InvalidStateTransition",
                "message": "already in terminal state", "executionState": self._state(key)})
            return
        if "expectedVersion" in req and req["expectedVersion"] != e["v"]:
            self._push(reply + b"/rejected", {"clientToken": tok, "code": "VersionMismatch",
                                              "executionState": self._state(key)})
            return
        e["status"] = req["status"]
        e["details"] = req.get("statusDetails") or e["details"]
        e["v"] += 1
        body = {"clientToken": tok, "timestamp": 1}
        if req.get("includeJobExecutionState"):
            body["executionState"] = self._state(key)
        self._push(reply + b"/accepted", body)
        if e["status"] in TERMINAL:
            self._ended(job_id, n)


class Flaky(Handler):
    """Fails while `fails` > 0 (the file is not on the server yet: a 404), then succeeds. Each
    run checkpoints half-way (point "half"); every call is recorded with the execution number
    and the checkpoint the handler was given."""

    def __init__(self, fails=1):
        self.fails = fails
        self.calls = []

    def run(self, ctx, doc):
        self.calls.append(("run", ctx.execution_number, ctx.last_checkpoint))
        ctx.checkpoint({"n": ctx.execution_number, "half": 1})
        ctx.point("half")
        if self.fails > 0:
            self.fails -= 1
            raise JobFailed("DOWNLOAD_FAILED", "HTTP_404", http="404")
        return {"attempt": str(ctx.execution_number)}

    def resume(self, ctx, doc, cp):
        self.calls.append(("resume", ctx.execution_number, cp))
        return {"attempt": str(ctx.execution_number), "resumed": "yes"}

    def abort(self, ctx):
        self.calls.append(("abort", ctx.execution_number, ctx.last_checkpoint))


class Device:
    """A device's flash (the journal file) that boots any number of times against `service`.
    `cut_at(point, k)` cuts the power the k-th time the point is passed, counted across boots."""

    def __init__(self, service, handlers, text=None):
        self.service = service
        self.handlers = handlers
        self.path = (os.getenv("IOTJOBS_TEST_TMP") or "/tmp") + "/retry-journal-%s.json" % (
            hexlify(os.urandom(6)).decode())
        if text is not None:
            with open(self.path, "w") as f:
                f.write(text)
        self.logs = []
        self.cut = None
        self.passes = {}
        self.runner = None

    def cut_at(self, point, k=1):
        self.cut = (point, k)

    def _point(self, name):
        self.passes[name] = self.passes.get(name, 0) + 1
        if self.cut is not None and self.cut == (name, self.passes[name]):
            self.cut = None
            raise PowerCut(name)

    def boot(self, until):
        """Run until `until(service)` holds; True, or PowerCut's point if the power was cut."""
        link = Link(self.service)
        client = JobsClient(link, "dev1", reply_timeout_ms=100)
        self.runner = r = Runner(client, Journal(self.path, self.logs.append), self.handlers,
                                 log=self.logs.append, on_point=self._point, progress_min_ms=0,
                                 retry_ms=1, sleep_ms=lambda ms: None)
        turns = [0]

        def done():
            turns[0] += 1
            assert turns[0] < STEPS, "no progress in %d turns: %s" % (STEPS, self.logs[-8:])
            return until(self.service) and r.journal.out is None and r.journal.job is None

        try:
            r.run(done)
        except PowerCut as e:
            return e.args[0]
        return True

    def journal(self):
        return Journal(self.path)


DOC = {"operation": "fetch", "url": "http://files/fw.bin"}


def ended(job_id, n, status=None):
    def check(svc):
        s = svc.status(job_id).get(n)
        return s in TERMINAL if status is None else s == status
    return check


def details(svc, job_id, n):
    return svc.ex[(job_id, n)]["details"]


# -- a new execution of a finished job runs; the same one never twice ---------------------------
def test_a_failed_job_retried_runs_again_as_a_new_execution():
    svc = Jobs()
    svc.create("fw", DOC, retries=2)
    h = Flaky(fails=1)
    dev = Device(svc, {"fetch": h})
    assert dev.boot(ended("fw", 2)) is True
    assert svc.status("fw") == {1: "FAILED", 2: "SUCCEEDED"}
    assert details(svc, "fw", 1)["reason"] == "DOWNLOAD_FAILED"
    assert details(svc, "fw", 2) == {"reason": "OK", "attempt": "2"}  # not ALREADY_DONE
    # attempt 2 ran from scratch: run(), no checkpoint of attempt 1
    assert h.calls == [("run", 1, None), ("run", 2, None)], h.calls
    # each attempt got its own terminal update, addressed by its number
    assert [u["status"] for u in svc.updates("fw", 1)] == ["FAILED"]
    assert [u["status"] for u in svc.updates("fw", 2)] == ["SUCCEEDED"]
    assert dev.journal().done == ["fw:1:FAILED", "fw:2:SUCCEEDED"]
    assert not [m for m in dev.logs if "already finished" in m], dev.logs


def test_every_retry_runs_until_the_budget_is_spent():
    svc = Jobs()
    svc.create("fw", DOC, retries=2)
    h = Flaky(fails=5)
    dev = Device(svc, {"fetch": h})
    assert dev.boot(ended("fw", 3)) is True
    assert svc.status("fw") == {1: "FAILED", 2: "FAILED", 3: "FAILED"}
    assert h.calls == [("run", 1, None), ("run", 2, None), ("run", 3, None)]
    assert dev.journal().done == ["fw:1:FAILED", "fw:2:FAILED", "fw:3:FAILED"]


def test_a_new_execution_of_a_succeeded_job_runs_again():
    svc = Jobs()
    svc.create("cfg", DOC)
    h = Flaky(fails=0)
    dev = Device(svc, {"fetch": h})
    assert dev.boot(ended("cfg", 1)) is True
    svc.requeue("cfg")  # a new execution: the device decides by number, not by the last status
    assert dev.boot(ended("cfg", 2)) is True
    assert svc.status("cfg") == {1: "SUCCEEDED", 2: "SUCCEEDED"}
    assert h.calls == [("run", 1, None), ("run", 2, None)]
    assert details(svc, "cfg", 2)["reason"] == "OK"


def test_the_same_execution_handed_back_is_never_run_again():
    svc = Jobs()
    svc.create("fw", DOC)  # no retries
    h = Flaky(fails=1)
    dev = Device(svc, {"fetch": h})
    assert dev.boot(ended("fw", 1)) is True
    first = svc.ex[("fw", 1)]["delivered"]
    # a stale start-next reply and a duplicate notify-next, in this boot ...
    svc.stale.append(first)
    svc._push(b"notify-next", {"timestamp": 2, "execution": first})
    r = dev.runner
    r._want_next = True
    turns = [0]

    def stale_taken():
        turns[0] += 1
        assert turns[0] < STEPS
        return not svc.stale and r.journal.out is None

    r.run(stale_taken)
    # ... and after a boot, from the journal on flash
    svc.stale.append(first)
    assert dev.boot(lambda s: not s.stale) is True
    assert h.calls == [("run", 1, None)], h.calls  # never run twice
    again = svc.updates("fw", 1)[1:]
    assert len(again) == 2, svc.requests
    for u in again:  # the recorded status, said again
        assert u["status"] == "FAILED" and u["statusDetails"] == {"reason": R_ALREADY_DONE}, u
    assert svc.status("fw") == {1: "FAILED"}  # refused as terminal: taken as acknowledged
    assert details(svc, "fw", 1)["reason"] == "DOWNLOAD_FAILED"


# -- power cuts -------------------------------------------------------------------------------
def test_a_power_cut_in_the_second_attempt_resumes_the_second_attempt():
    svc = Jobs()
    svc.create("fw", DOC, retries=2)
    h = Flaky(fails=1)
    dev = Device(svc, {"fetch": h})
    dev.cut_at("half", 2)  # attempt 2, checkpointed half-way
    assert dev.boot(ended("fw", 2)) == "half"
    assert svc.status("fw") == {1: "FAILED", 2: "IN_PROGRESS"}
    j = dev.journal()
    assert (j.job["id"], j.job["n"], j.job["cp"]) == ("fw", 2, {"n": 2, "half": 1}), j.job
    v1 = svc.ex[("fw", 1)]["v"]
    assert dev.boot(ended("fw", 2)) is True
    assert h.calls == [("run", 1, None), ("run", 2, None), ("resume", 2, {"n": 2, "half": 1})]
    assert svc.status("fw") == {1: "FAILED", 2: "SUCCEEDED"}
    assert details(svc, "fw", 2) == {"reason": "OK", "attempt": "2", "resumed": "yes"}
    describes = [r for j_, verb, r in svc.requests if verb == "get"]
    assert [r.get("executionNumber") for r in describes] == [2], describes
    assert svc.ex[("fw", 1)]["v"] == v1 and len(svc.updates("fw", 1)) == 1  # 1 untouched
    assert dev.journal().done == ["fw:1:FAILED", "fw:2:SUCCEEDED"]


def test_a_power_cut_before_attempt_two_started_resumes_it_not_attempt_one():
    svc = Jobs()
    svc.create("fw", DOC, retries=2)
    h = Flaky(fails=1)
    dev = Device(svc, {"fetch": h})
    dev.cut_at("journaled", 2)  # attempt 2 in the journal, its handler not started
    assert dev.boot(ended("fw", 2)) == "journaled"
    assert dev.boot(ended("fw", 2)) is True
    assert h.calls == [("run", 1, None), ("resume", 2, None)], h.calls
    assert svc.status("fw") == {1: "FAILED", 2: "SUCCEEDED"}


def test_an_attempt_cut_and_timed_out_is_abandoned_and_the_retry_starts_afresh():
    svc = Jobs()
    svc.create("fw", DOC, retries=1)
    h = Flaky(fails=0)
    dev = Device(svc, {"fetch": h})
    dev.cut_at("half", 1)
    assert dev.boot(ended("fw", 2)) == "half"
    svc.time_out("fw", 1)  # while the device was off: TIMED_OUT, retried as execution 2
    assert svc.status("fw") == {1: "TIMED_OUT", 2: "QUEUED"}
    assert dev.boot(ended("fw", 2)) is True
    # attempt 1's handler cleans up with its own checkpoint; attempt 2 starts from nothing
    assert h.calls == [("run", 1, None), ("abort", 1, {"n": 1, "half": 1}), ("run", 2, None)]
    assert svc.status("fw") == {1: "TIMED_OUT", 2: "SUCCEEDED"}
    assert svc.updates("fw", 1) == []  # nothing sent to the settled attempt
    assert dev.journal().done == ["fw:1:ABANDONED", "fw:2:SUCCEEDED"]


def test_an_answer_for_another_execution_never_resumes_the_journals_attempt_into_it():
    # a service that ignores executionNumber in describe answers with the retry (QUEUED): the
    # journal's attempt 1 is over; its checkpoint must not be resumed as if it were attempt 2
    svc = Jobs()
    svc.create("fw", DOC, retries=1)
    h = Flaky(fails=0)
    dev = Device(svc, {"fetch": h})
    dev.cut_at("half", 1)
    assert dev.boot(ended("fw", 2)) == "half"
    svc.time_out("fw", 1)
    svc.ignore_number = True
    assert dev.boot(ended("fw", 2)) is True
    assert h.calls == [("run", 1, None), ("abort", 1, {"n": 1, "half": 1}), ("run", 2, None)]
    assert svc.status("fw") == {1: "TIMED_OUT", 2: "SUCCEEDED"}
    assert details(svc, "fw", 2) == {"reason": "OK", "attempt": "2"}


def test_a_power_cut_after_attempt_one_was_accepted_resends_it_to_attempt_one_only():
    svc = Jobs()
    svc.create("fw", DOC, retries=1)
    h = Flaky(fails=1)
    dev = Device(svc, {"fetch": h})
    dev.cut_at("update-answered", 1)  # the service has FAILED (and retried); outbox not cleared
    assert dev.boot(ended("fw", 2)) == "update-answered"
    assert svc.status("fw") == {1: "FAILED", 2: "QUEUED"}
    assert dev.journal().out[:3] == ["fw", 1, "FAILED"]
    assert dev.boot(ended("fw", 2)) is True
    sent = svc.updates("fw", 1)
    assert [u["status"] for u in sent] == ["FAILED", "FAILED"]  # the resend, to attempt 1
    assert [u["status"] for u in svc.updates("fw", 2)] == ["SUCCEEDED"]
    assert h.calls == [("run", 1, None), ("run", 2, None)]
    assert svc.status("fw") == {1: "FAILED", 2: "SUCCEEDED"}
    assert dev.journal().done == ["fw:1:FAILED", "fw:2:SUCCEEDED"]


def test_a_job_too_large_to_hold_is_journaled_only_with_its_execution_number():
    # start-next's reply does not fit; describe $next (without the document) names the job but,
    # at first, no executionNumber: nothing is journaled until it does (a journal entry without
    # its number would make the whole journal unreadable after a power cut: a clean start that
    # forgets what was finished)
    svc = Jobs()
    svc.create("big", DOC)
    svc.too_large, svc.unnumbered = 10, 2
    h = Flaky(fails=0)
    dev = Device(svc, {"fetch": h})
    dev.cut_at("outbox-written", 1)
    assert dev.boot(ended("big", 1)) == "outbox-written"
    logs = []
    j = Journal(dev.path, logs.append)
    assert logs == [] and j.out[:3] == ["big", 1, "REJECTED"], (logs, j.out)
    assert dev.boot(ended("big", 1)) is True
    assert svc.status("big") == {1: "REJECTED"} and h.calls == []
    assert details(svc, "big", 1)["reason"] == "DOCUMENT_TOO_LARGE"
    assert dev.journal().done == ["big:1:REJECTED"]


# -- journals written by earlier firmware -----------------------------------------------------
# Written by the journal module of 5a685da (before "oom") and of c76b139 (with it): the same
# history, attempt 1 of fw-1 FAILED and acknowledged, cfg-2 SUCCEEDED, attempt 2 of fw-1 running
# with a checkpoint. The format has not changed since: "ver" 1, done entries "<id>:<n>:<status>".
OLD_JOURNALS = (
    '{"job": {"step": 0, "t": "RUN", "cp": {"off": 65536}, "n": 2, "id": "fw-1", "v": 1}, '
    '"out": null, "done": ["fw-1:1:FAILED", "cfg-2:1:SUCCEEDED"], "ver": 1, "boot": 1}',
    '{"job": {"id": "fw-1", "v": 1, "cp": {"off": 65536}, "n": 2, "t": "RUN", "step": 0}, '
    '"out": null, "done": ["fw-1:1:FAILED", "cfg-2:1:SUCCEEDED"], "boot": 1, "ver": 1, "oom": 0}',
)


def test_an_old_journal_loads_with_its_done_list_keyed_by_execution():
    for text in OLD_JOURNALS:
        dev = Device(None, {}, text)
        logs = []
        j = Journal(dev.path, logs.append)
        assert logs == [], logs  # loaded, not a clean start
        assert j.boot == 1 and j.out is None
        assert j.job == {"id": "fw-1", "n": 2, "v": 1, "step": 0, "cp": {"off": 65536}, "t": "RUN"}
        assert j.finished_status("fw-1", 1) == "FAILED"
        assert j.finished_status("cfg-2", 1) == "SUCCEEDED"
        assert j.finished_status("fw-1", 2) is None and j.finished_status("cfg-2", 2) is None
        # what this code writes back is the same format (a rolled-back firmware reads it)
        j.save()
        with open(dev.path) as f:
            d = json.load(f)
        assert d["ver"] == 1 and d["done"] == ["fw-1:1:FAILED", "cfg-2:1:SUCCEEDED"]
        assert sorted(d["job"]) == ["cp", "id", "n", "step", "t", "v"]


def test_a_device_booting_from_an_old_journal_resumes_its_attempt_and_keeps_its_history():
    for text in OLD_JOURNALS:
        svc = Jobs()
        svc.create("fw-1", DOC, retries=1)
        svc.create("cfg-2", {"operation": "cfg"})
        svc.ex[("fw-1", 1)].update(status="FAILED", v=3)
        svc.ex[("cfg-2", 1)].update(status="SUCCEEDED", v=3)
        svc._queue("fw-1", 2, 1)
        svc.ex[("fw-1", 2)].update(status="IN_PROGRESS", v=2)
        fetch, cfg = Flaky(fails=0), Flaky(fails=0)
        dev = Device(svc, {"fetch": fetch, "cfg": cfg}, text)
        cfg_stale = svc._view("cfg-2", 1)
        cfg_stale["status"] = "IN_PROGRESS"
        svc.stale.append(cfg_stale)  # handed back once more: recorded as done
        assert dev.boot(lambda s: ended("fw-1", 2)(s) and not s.stale) is True
        assert fetch.calls == [("resume", 2, {"off": 65536})], fetch.calls
        assert cfg.calls == []
        assert svc.status("fw-1") == {1: "FAILED", 2: "SUCCEEDED"}
        assert svc.updates("cfg-2", 1)[0]["statusDetails"] == {"reason": R_ALREADY_DONE}
        assert dev.journal().done[-2:] == ["fw-1:2:SUCCEEDED", "cfg-2:1:SUCCEEDED"]
