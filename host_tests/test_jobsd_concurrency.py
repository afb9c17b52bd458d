"""Many things at once: MQTT devices (paho) and HTTPS-style devices (iot-jobs-data over plain
HTTP, one keep-alive connection per thread) work through their queues concurrently against one
jobsd, while the operator keeps creating jobs. Every execution must end SUCCEEDED exactly once
with the version history of a clean run, and every job COMPLETED.
"""

from __future__ import annotations

import http.client
import json
import threading
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from iotjobs_host import stack
from iotjobs_host.pki import PKI
from iotjobs_host.stack import Jobsd
from test_jobsd import Device, arn

MQTT_THINGS, HTTP_THINGS, JOBS = 12, 8, 6


@pytest.fixture
def jobsd(tmp_path, pki: PKI) -> Iterator[tuple[Jobsd, stack.Mosquitto]]:
    broker = stack.Mosquitto(str(tmp_path / "broker"), pki)
    service = None
    try:
        service = Jobsd(str(tmp_path / "jobsd"), broker.broker)
        yield service, broker
    finally:
        if service is not None:
            service.stop()
        broker.stop()


def run_mqtt_device(dev: Device, results: dict[str, list[str]]) -> None:
    done: list[str] = []
    while True:
        outcome, body, _ = dev.request("start-next", {})
        assert outcome == "accepted", body
        if "execution" not in body:
            break
        job = body["execution"]["jobId"]
        assert body["execution"]["status"] == "IN_PROGRESS"
        outcome, body, _ = dev.request(f"{job}/update", {"status": "SUCCEEDED",
                                                         "expectedVersion": 2})
        assert outcome == "accepted", body
        done.append(job)
    results[dev.thing] = done


def run_http_device(url: str, thing: str, results: dict[str, list[str]]) -> None:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    done: list[str] = []

    def call(method: str, path: str, body: dict) -> tuple[int, dict]:
        conn.request(method, path, body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read())

    try:
        while True:
            status, body = call("PUT", f"/things/{thing}/jobs/%24next", {})
            assert status == 200, body
            if "execution" not in body:
                break
            job = body["execution"]["jobId"]
            status, body = call("POST", f"/things/{thing}/jobs/{job}",
                                {"status": "SUCCEEDED", "expectedVersion": 2,
                                 "includeJobExecutionState": True})
            assert status == 200 and body["executionState"]["versionNumber"] == 3, body
            done.append(job)
    finally:
        conn.close()
    results[thing] = done


def test_many_devices_at_once(jobsd: tuple[Jobsd, stack.Mosquitto]) -> None:
    service, broker = jobsd
    run = uuid.uuid4().hex[:6]
    mqtt_things = [f"mq-{run}-{i}" for i in range(MQTT_THINGS)]
    http_things = [f"http-{run}-{i}" for i in range(HTTP_THINGS)]
    for thing in mqtt_things + http_things:
        service.iot.create_thing(thingName=thing)
    targets = [arn(t) for t in mqtt_things + http_things]
    jobs = [f"job-{run}-{j}" for j in range(JOBS)]
    for job in jobs[:JOBS // 2]:
        service.iot.create_job(jobId=job, targets=targets, document='{"operation": "x"}')
    devices = [Device(broker.port, t) for t in mqtt_things]
    results: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def guarded(fn, *args) -> None:
        try:
            fn(*args)
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=guarded, args=(run_mqtt_device, d, results))
               for d in devices]
    threads += [threading.Thread(target=guarded,
                                 args=(run_http_device, service.data_url, t, results))
                for t in http_things]
    try:
        for t in threads:
            t.start()
        for job in jobs[JOBS // 2:]:  # the operator keeps adding work meanwhile
            service.iot.create_job(jobId=job, targets=targets, document='{"operation": "x"}')
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert not any(t.is_alive() for t in threads)
    finally:
        for d in devices:
            d.close()
    # a device that drained its queue before the later jobs arrived picks them up now
    for dev_thing in mqtt_things + http_things:
        leftovers = service.data.get_pending_job_executions(thingName=dev_thing)
        for summary in leftovers["queuedJobs"]:
            service.data.update_job_execution(thingName=dev_thing, jobId=summary["jobId"],
                                              status="SUCCEEDED")
            results[dev_thing].append(summary["jobId"])
    for thing, done in results.items():
        assert sorted(done) == sorted(jobs), thing  # each job exactly once, none lost
    for job in jobs:
        view = service.iot.describe_job(jobId=job)["job"]
        assert view["status"] == "COMPLETED", job
        assert view["jobProcessDetails"]["numberOfSucceededThings"] == len(targets)
    assert service.proc.alive()
