"""End to end: a job created through the control plane (boto3 `iot`) runs on a simulated device
(tools/devsim, firmware/ under the unix port, 64 KB heap) over mutual TLS through mosquitto and
jobsd, and ends as its handler decides."""
import json

import pytest

from conftest import stack, thing_arn, wait_execution

HEAP = stack.DEFAULT_HEAP


def create_job(iot, job_id, thing, document):
    return iot.create_job(jobId=job_id, targets=[thing_arn(thing)], document=json.dumps(document))


def boot(iot, device, spy, thing):
    """Register the thing, boot its device, and wait until it has asked for work (subscribed)."""
    iot.create_thing(thingName=thing)
    watch = spy(thing)
    dev = device(thing, tls=True, heap=HEAP)
    watch.wait_for(lambda t, p: t.endswith("/jobs/start-next"), what="the first start-next")
    return dev, watch


@pytest.mark.images()  # fleet32, stock32 and pip
def test_job_runs_to_succeeded_over_mutual_tls(jobsd, iot, device, spy):
    thing = "dev-ok"
    dev, watch = boot(iot, device, spy, thing)
    create_job(iot, "job-ok", thing, {"operation": "demo", "steps": 2})
    ex = wait_execution(iot, "job-ok", thing, {"SUCCEEDED", "FAILED", "REJECTED"}, device=dev)
    assert ex["status"] == "SUCCEEDED", ex
    assert ex["statusDetails"]["detailsMap"] == {"reason": "OK", "steps": "2"}
    # 1 when queued, +1 start-next, +2 progress reports, +1 SUCCEEDED
    assert ex["versionNumber"] == 5, ex

    # The wire, in order: notify-next announces the job, the device starts it, reports
    # progress twice, then SUCCEEDED, and each update is accepted.
    base = f"$aws/things/{thing}/jobs/"
    # the spy is a separate client: its copy of the last reply may trail the REST answer
    stack.wait_until(lambda: sum(t.endswith("job-ok/update/accepted") for t, _ in watch.messages)
                     >= 3, 10, "the spy to see the last reply")
    seq = [(t[len(base):], p) for t, p in watch.messages]
    names = [n for n, _ in seq]
    i_next = next(i for i, (n, p) in enumerate(seq)
                  if n == "notify-next" and p.get("execution", {}).get("jobId") == "job-ok")
    assert "start-next" in names[i_next:]
    # The device's requests and jobsd's replies and events come from different publishers, so
    # the spy may see them in any order relative to each other (the boot's empty reply after
    # notify-next; the reply that hands out the job before it): the reply carrying the job.
    accepted = next(p for n, p in seq if n == "start-next/accepted"
                    and p.get("execution", {}).get("jobId") == "job-ok")
    assert accepted["execution"]["jobDocument"] == {"operation": "demo", "steps": 2}
    updates = [p for n, p in seq if n == "job-ok/update"]
    assert [u["status"] for u in updates] == ["IN_PROGRESS", "IN_PROGRESS", "SUCCEEDED"]
    assert [u["statusDetails"].get("step") for u in updates[:2]] == ["1/2", "2/2"]
    assert names.count("job-ok/update/accepted") == 3
    assert "job-ok/update/rejected" not in names


def test_failing_handler_ends_failed_and_next_job_still_runs(jobsd, iot, device, spy):
    thing = "dev-fail"
    dev, _ = boot(iot, device, spy, thing)
    create_job(iot, "job-boom", thing, {"operation": "demo", "steps": 0, "fail": "disk on fire"})
    ex = wait_execution(iot, "job-boom", thing, {"SUCCEEDED", "FAILED", "REJECTED"}, device=dev)
    assert ex["status"] == "FAILED", ex
    details = ex["statusDetails"]["detailsMap"]
    assert details["reason"] == "HANDLER_ERROR"
    assert "RuntimeError" in details["message"] and "disk on fire" in details["message"]

    create_job(iot, "job-after", thing, {"operation": "demo", "steps": 1})
    ex = wait_execution(iot, "job-after", thing, {"SUCCEEDED", "FAILED", "REJECTED"}, device=dev)
    assert ex["status"] == "SUCCEEDED", ex
    assert dev.proc.alive(), "the device loop must survive a failing handler"


def test_unknown_operation_is_rejected_with_reason(jobsd, iot, device, spy):
    thing = "dev-unknown"
    dev, _ = boot(iot, device, spy, thing)
    create_job(iot, "job-what", thing, {"operation": "make-coffee"})
    create_job(iot, "job-noop", thing, {"no": "operation"})
    create_job(iot, "job-fine", thing, {"operation": "demo", "steps": 0})
    what = wait_execution(iot, "job-what", thing, {"SUCCEEDED", "FAILED", "REJECTED"}, device=dev)
    assert what["status"] == "REJECTED"
    assert what["statusDetails"]["detailsMap"]["reason"] == "UNKNOWN_OPERATION"
    assert "make-coffee" in what["statusDetails"]["detailsMap"]["message"]
    noop = wait_execution(iot, "job-noop", thing, {"SUCCEEDED", "FAILED", "REJECTED"}, device=dev)
    assert noop["status"] == "REJECTED"
    assert noop["statusDetails"]["detailsMap"]["reason"] == "UNKNOWN_OPERATION"
    fine = wait_execution(iot, "job-fine", thing, {"SUCCEEDED", "FAILED", "REJECTED"}, device=dev)
    assert fine["status"] == "SUCCEEDED"


@pytest.mark.images()  # fleet32, stock32 and pip
def test_jobs_queued_before_boot_run_in_creation_order(jobsd, iot, device, spy):
    thing = "dev-late"
    iot.create_thing(thingName=thing)
    for i in range(3):
        create_job(iot, f"early-{i}", thing, {"operation": "demo", "steps": 0})
    watch = spy(thing)
    dev = device(thing, tls=True, heap=HEAP)
    for i in range(3):
        ex = wait_execution(iot, f"early-{i}", thing, {"SUCCEEDED", "FAILED", "REJECTED"}, device=dev)
        assert ex["status"] == "SUCCEEDED", ex
    def finals():
        return [t.split("/")[4] for t, p in list(watch.messages)
                if t.endswith("/update") and p.get("status") == "SUCCEEDED"]

    stack.wait_until(lambda: len(finals()) >= 3, 10, "the spy to see the last update")
    assert finals() == ["early-0", "early-1", "early-2"]


def test_device_reconnects_after_the_broker_restarts(jobsd, mosquitto, iot, device, spy):
    thing = "dev-reconnect"
    dev, _ = boot(iot, device, spy, thing)
    create_job(iot, "before", thing, {"operation": "demo", "steps": 0})
    assert wait_execution(iot, "before", thing, {"SUCCEEDED"}, device=dev)["status"] == "SUCCEEDED"
    mosquitto.restart()
    # The device comes back by itself (backoff, resubscribe) and asks for work again.
    create_job(iot, "after", thing, {"operation": "demo", "steps": 1})
    ex = wait_execution(iot, "after", thing, {"SUCCEEDED", "FAILED", "REJECTED"}, 60, device=dev)
    assert ex["status"] == "SUCCEEDED", ex
    assert "link lost" in dev.log_text()


def test_hostile_messages_do_not_stop_the_device(jobsd, mosquitto, iot, device, spy):
    """Junk on the device's own topics (malformed JSON, wrong types, replies nobody asked for,
    a payload larger than the device holds) is dropped; the next job still runs."""
    import paho.mqtt.client as mqtt

    thing = "dev-hostile"
    dev, _ = boot(iot, device, spy, thing)
    base = f"$aws/things/{thing}/jobs/"
    evil = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="evil")
    evil.connect("127.0.0.1", mosquitto.port)
    evil.loop_start()
    try:
        for topic, payload in [
            ("notify-next", b"{not json"),
            ("notify-next", b"\xff\xfe\x00"),
            ("notify-next", b"[1, 2, 3]"),
            ("notify-next", json.dumps({"execution": "not an object"}).encode()),
            ("notify-next", b"{" + b" " * 50_000 + b"}"),  # larger than the device's limit
            ("start-next/accepted", json.dumps({"clientToken": "forged", "execution": {
                "jobId": "forged", "jobDocument": {"operation": "demo"}}}).encode()),
            ("forged/update/rejected", b'{"code": "InternalError"}'),
            ("$next/get/accepted", b""),
        ]:
            evil.publish(base + topic, payload, qos=1).wait_for_publish(5)
    finally:
        evil.loop_stop()
        evil.disconnect()
    create_job(iot, "after-junk", thing, {"operation": "demo", "steps": 1})
    ex = wait_execution(iot, "after-junk", thing, {"SUCCEEDED", "FAILED", "REJECTED"}, device=dev)
    assert ex["status"] == "SUCCEEDED", ex
    assert "Traceback" not in dev.log_text()
    assert "devsim: boot 2" not in dev.log_text(), "the device restarted"
