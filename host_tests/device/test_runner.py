# How the runner turns a handler's behaviour into a terminal status and statusDetails.
from iotjobs.runner import Runner, Job, JobFailed, JobRejected
from iotjobs import runner as R


class _NoTransport:
    def set_callback(self, cb):
        pass


def _runner(handlers):
    from iotjobs.client import JobsClient

    return Runner(JobsClient(_NoTransport(), "t1"), handlers, log=lambda m: None)


def _outcome(handlers, document):
    r = _runner(handlers)
    return r._outcome(Job(r, {"jobId": "j1", "jobDocument": document}))


def test_success_merges_handler_result():
    status, details = _outcome({"x": lambda job: {"size": "3"}}, {"operation": "x"})
    assert status == "SUCCEEDED"
    assert details == {"reason": R.R_OK, "size": "3"}


def test_handler_exception_fails_with_its_message():
    def boom(job):
        raise OSError(28)

    status, details = _outcome({"x": boom}, {"operation": "x"})
    assert status == "FAILED"
    assert details["reason"] == R.R_HANDLER_ERROR
    assert details["message"] == "OSError: 28"


def test_job_failed_carries_reason_and_details():
    def refuse(job):
        raise JobFailed("LOW_BATTERY", "battery at 3%", level="3")

    assert _outcome({"x": refuse}, {"operation": "x"}) == (
        "FAILED",
        {"reason": "LOW_BATTERY", "message": "battery at 3%", "level": "3"},
    )


def test_job_rejected():
    def reject(job):
        raise JobRejected("UNSUPPORTED")

    assert _outcome({"x": reject}, {"operation": "x"}) == ("REJECTED", {"reason": "UNSUPPORTED"})


def test_unknown_or_missing_operation_is_rejected():
    for doc in ({"operation": "nope"}, {"other": 1}):
        status, details = _outcome({}, doc)
        assert status == "REJECTED"
        assert details["reason"] == R.R_UNKNOWN_OPERATION


def test_non_object_document_is_rejected():
    for doc in ("text", [1, 2], None, 5):
        status, details = _outcome({"x": lambda job: None}, doc)
        assert status == "REJECTED"
        assert details["reason"] == R.R_BAD_DOCUMENT
