# How the runner turns a handler's behaviour into a terminal status and statusDetails, with a
# real journal (in a temp folder) and the outbox as the observable result. The client is the
# real JobsClient over a transport that is never connected: _finish's update then fails with
# OSError before any I/O, which leaves the outbox in place, exactly as a lost link would.
import os
from iotjobs import runner as R
from iotjobs.runner import Runner, Handler, JobFailed, JobRejected
from iotjobs.journal import Journal
from iotjobs.client import JobsClient
from iotjobs.transport import Transport

_N = [0]


def _runner(handlers):
    _N[0] += 1
    path = (os.getenv("IOTJOBS_TEST_TMP") or "/tmp") + "/iotjobs-test-runner-%d.json" % _N[0]
    try:
        os.remove(path)
    except OSError:
        pass
    t = Transport(b"t1", "127.0.0.1", 1)
    return Runner(JobsClient(t, "t1"), Journal(path), handlers, log=lambda m: None)


def _outcome(handlers, document):
    r = _runner(handlers)
    try:
        r.run_job({"jobId": "j1", "executionNumber": 1, "versionNumber": 2, "jobDocument": document})
    except OSError:
        pass  # the terminal update could not be sent: it waits in the outbox
    out = r.journal.out
    assert out is not None and out[0] == "j1" and out[1] == 1
    assert r.journal.job is None
    return out[2], out[3]


def test_success_merges_handler_result():
    status, details = _outcome({"x": lambda ctx, doc: {"size": "3"}}, {"operation": "x"})
    assert status == "SUCCEEDED"
    assert details == {"reason": R.R_OK, "size": "3"}


def test_handler_exception_fails_with_its_message():
    def boom(ctx, doc):
        raise OSError(28)

    status, details = _outcome({"x": boom}, {"operation": "x"})
    assert status == "FAILED"
    assert details["reason"] == R.R_HANDLER_ERROR
    assert details["message"] == "OSError: 28"


def test_job_failed_carries_reason_and_details():
    def refuse(ctx, doc):
        raise JobFailed("LOW_BATTERY", "battery at 3%", level="3")

    assert _outcome({"x": refuse}, {"operation": "x"}) == (
        "FAILED",
        {"reason": "LOW_BATTERY", "message": "battery at 3%", "level": "3"},
    )


def test_job_rejected():
    def reject(ctx, doc):
        raise JobRejected("UNSUPPORTED")

    assert _outcome({"x": reject}, {"operation": "x"}) == ("REJECTED", {"reason": "UNSUPPORTED"})


def test_unknown_or_missing_operation_is_rejected():
    for doc in ({"operation": "nope"}, {"other": 1}):
        status, details = _outcome({}, doc)
        assert status == "REJECTED"
        assert details["reason"] == R.R_UNKNOWN_OPERATION, details


def test_non_object_document_is_rejected():
    for doc in ("text", [1, 2], None, 5):
        status, details = _outcome({"x": lambda ctx, doc: None}, doc)
        assert status == "REJECTED"
        assert details["reason"] == R.R_BAD_DOCUMENT


def test_managed_template_steps_run_in_order_and_final_step_last():
    seen = []

    def rec(ctx, doc):
        seen.append((doc["operation"], doc["args"], ctx.step, ctx.steps))

    doc = {"version": "1.0", "steps": [
        {"action": {"name": "A", "type": "runHandler", "input": {"handler": "install-packages.sh", "args": ["wget"]}}},
        {"action": {"name": "B", "type": "runHandler", "input": {"handler": "download-file.sh", "args": ["u", "/f"], "path": "default"}}},
    ], "finalStep": {"action": {"name": "C", "type": "runHandler", "input": {"handler": "remove-packages.sh", "args": ["wget"]}}}}
    status, details = _outcome({"install-packages": rec, "download-file": rec, "remove-packages": rec}, doc)
    assert status == "SUCCEEDED", details
    assert seen == [("install-packages", ["wget"], 0, 3), ("download-file", ["u", "/f"], 1, 3),
                    ("remove-packages", ["wget"], 2, 3)]
    assert details["steps"] == "3/3"


def test_failed_step_stops_unless_ignored():
    seen = []

    def ok(ctx, doc):
        seen.append(doc["name"])

    def bad(ctx, doc):
        seen.append(doc["name"])
        raise JobFailed("STEP_FAILED")

    def act(name, handler, ignore=False):
        a = {"action": {"name": name, "type": "runHandler", "input": {"handler": handler}}}
        if ignore:
            a["action"]["ignoreStepFailure"] = "true"
        return a

    doc = {"version": "1.0", "steps": [act("1", "bad.sh", True), act("2", "ok.sh"), act("3", "bad.sh"), act("4", "ok.sh")]}
    status, details = _outcome({"bad": bad, "ok": ok}, doc)
    assert status == "FAILED" and details["reason"] == "STEP_FAILED"
    assert seen == ["1", "2", "3"]


def test_unsupported_step_documents_are_rejected():
    for doc, reason in (
        ({"version": "2.0", "steps": [{"action": {"type": "runHandler", "input": {"handler": "x"}}}]}, "UNSUPPORTED_VERSION"),
        ({"version": "1.0", "steps": [{"action": {"type": "runCommand", "input": {}}}]}, "UNSUPPORTED_ACTION"),
        ({"version": "1.0", "steps": []}, "BAD_DOCUMENT"),
        ({"version": "1.0", "steps": [{"action": {"type": "runHandler", "input": {"handler": "x", "args": "notalist"}}}]}, "UNSUPPORTED_ACTION"),
    ):
        status, details = _outcome({"x": lambda ctx, d: None}, doc)
        assert (status, details["reason"]) == ("REJECTED", reason), (doc, details)


def test_journal_writes_for_a_job_without_progress():
    r = _runner({"x": lambda ctx, doc: None})
    before = r.journal.writes
    try:
        r.run_job({"jobId": "j1", "executionNumber": 1, "versionNumber": 2, "jobDocument": {"operation": "x"}})
    except OSError:
        pass
    assert r.journal.writes - before == 2  # start, finish (the third, acknowledged, needs the service)
    r.journal.acknowledged()
    assert r.journal.writes - before == 3


def test_a_finished_execution_is_never_run_again():
    calls = []
    r = _runner({"x": lambda ctx, doc: calls.append(1)})
    r.journal.start("j1", 1, 2)
    r.journal.finish("SUCCEEDED", {"reason": "OK"}, 2)
    r.journal.acknowledged()
    try:
        r.run_job({"jobId": "j1", "executionNumber": 1, "versionNumber": 3, "jobDocument": {"operation": "x"}})
    except OSError:
        pass
    assert calls == []
    assert r.journal.out[2] == "SUCCEEDED" and r.journal.out[3] == {"reason": R.R_ALREADY_DONE}


def test_default_resume_is_at_most_once_and_idempotent_reruns():
    class Once(Handler):
        def run(self, ctx, doc):
            return {"ran": "1"}

    class Again(Once):
        idempotent = True

    r = _runner({"once": Once(), "again": Again()})
    for op, want in (("once", ("FAILED", R.R_INTERRUPTED)), ("again", ("SUCCEEDED", R.R_OK))):
        r.journal.start("j-" + op, 1, 2)
        try:
            r._run_steps("j-" + op, 1, {"operation": op}, 0, None, True)
        except OSError:
            pass
        assert (r.journal.out[2], r.journal.out[3]["reason"]) == want, (op, r.journal.out)
        r.journal.acknowledged()


def test_start_next_handing_back_the_journals_execution_resumes_it():
    # a memory fault left j1 in the journal at step 1 (its first step done); start-next then
    # offers the same execution: it is resumed from step 1 with its checkpoint, never started
    # again from step 0
    calls = []

    class Step(Handler):
        def __init__(self, name):
            self.name = name

        def run(self, ctx, doc):
            calls.append(("run", self.name))

        def resume(self, ctx, doc, cp):
            calls.append(("resume", self.name, cp))

    doc = {"version": "1.0", "steps": [
        {"action": {"name": "a", "type": "runHandler", "input": {"handler": "a.sh"}}},
        {"action": {"name": "b", "type": "runHandler", "input": {"handler": "b.sh"}}},
        {"action": {"name": "c", "type": "runHandler", "input": {"handler": "c.sh"}}}]}
    r = _runner({"a": Step("a"), "b": Step("b"), "c": Step("c")})
    r.journal.start("j1", 1, 2)
    r.journal.checkpoint(1, {"half": 1})
    writes = r.journal.writes
    try:
        r.run_job({"jobId": "j1", "executionNumber": 1, "versionNumber": 3, "jobDocument": doc})
    except OSError:
        pass  # the terminal update waits in the outbox
    assert calls == [("resume", "b", {"half": 1}), ("run", "c")], calls
    assert r.journal.out[2] == "SUCCEEDED" and r.journal.out[0] == "j1"
    assert r.journal.writes - writes == 2  # step c journaled, then the outcome


def test_another_execution_waits_until_the_journals_job_is_reconciled():
    calls = []
    r = _runner({"x": lambda ctx, doc: calls.append(1)})
    r.journal.start("j1", 1, 2)
    r._recover = False
    r.run_job({"jobId": "j2", "executionNumber": 1, "versionNumber": 1,
               "jobDocument": {"operation": "x"}})
    assert calls == [] and r._recover is True
    assert r.journal.job["id"] == "j1" and r.journal.out is None


def test_a_memory_error_in_a_handler_is_a_fault_not_an_outcome():
    # the handler runs out of memory: nothing is journaled as its outcome; the loop is told
    # (MemoryError) and the journal still holds the job at its step, to be resumed
    def greedy(ctx, doc):
        raise MemoryError("no room")

    r = _runner({"x": greedy})
    try:
        r.run_job({"jobId": "j1", "executionNumber": 1, "versionNumber": 2,
                   "jobDocument": {"operation": "x"}})
        raise AssertionError("the MemoryError was swallowed")
    except MemoryError:
        pass
    assert r.journal.out is None and r.journal.job["id"] == "j1" and r.journal.job["step"] == 0
    slept = []
    r.sleep_ms = slept.append
    r.memory_fault("test")
    assert r._recover and r._oom_resume and r.journal.job["m"] == 1 and slept == [100]


def test_a_job_that_keeps_running_out_of_memory_ends_failed_out_of_memory():
    r = _runner({"x": lambda ctx, doc: None})
    r.sleep_ms = lambda ms: None
    resets = []
    r.reset = lambda: resets.append(1)
    r.reset_grace_ms = 0
    r.journal.start("j1", 1, 2)
    for _ in range(R.OOM_JOB_MAX):
        r.memory_fault("test")
    assert r.journal.job["m"] == R.OOM_JOB_MAX
    assert len(resets) == R.OOM_JOB_MAX // 2  # a second fault in one boot resets
    try:
        r._resume(r.journal.job, {"operation": "x"})
    except OSError:
        pass
    assert r.journal.out[2] == "FAILED" and r.journal.out[3]["reason"] == R.R_OUT_OF_MEMORY


def test_faults_in_a_row_back_off_then_reset_once():
    r = _runner({})
    slept, resets = [], []
    r.sleep_ms = slept.append
    r.reset = lambda: resets.append(1)
    r.reset_grace_ms = 0
    for _ in range(R.OOM_RESET):
        r.memory_fault("test")
    assert slept[:R.OOM_RESET - 1] == [100, 200, 400, 800], slept
    assert resets == [1] and slept[-2] == 1000  # the pause before the first such reset
    assert r.journal.oom == 1  # the next one waits twice as long
