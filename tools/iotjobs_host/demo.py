"""`make demo`: the whole system on this machine, in under a minute.

Starts mosquitto (mutual TLS), jobsd and one simulated device, creates a job for the device's
demonstration handler through the control plane (boto3, as an operator would), prints every
jobs message on the wire as it happens, prints the final status, stops everything, and exits 0
only if the job SUCCEEDED."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

from . import BUILD
from . import stack
from .pki import PKI

THING = "demo-device"
TERMINAL = {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED", "REMOVED"}


def show(t0: float, topic: str, payload: object) -> None:
    short = topic.split("/jobs/", 1)[-1]
    if isinstance(payload, dict):
        payload = {k: v for k, v in payload.items() if k not in ("timestamp",)}
        text = json.dumps(payload, separators=(",", ":"))
    else:
        text = repr(payload)
    if len(text) > 150:
        text = text[:147] + "..."
    print(f"  {time.monotonic() - t0:6.2f}s  {short:<28} {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    work = os.path.join(BUILD, "demo")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    running: list = []
    t0 = time.monotonic()
    try:
        print("demo: certificates (CA, broker, thing)")
        pki = PKI(os.path.join(work, "pki"))
        print("demo: mosquitto with a mutual-TLS listener")
        mosq = stack.Mosquitto(os.path.join(work, "mosquitto"), pki)
        running.append(mosq)
        print("demo: jobsd (local AWS IoT Jobs)")
        jobsd = stack.Jobsd(os.path.join(work, "jobsd"), mosq.broker)
        running.append(jobsd)
        iot = jobsd.iot
        iot.create_thing(thingName=THING)
        spy = stack.Spy(mosq.port, THING, on_message=lambda t, p: show(t0, t, p))
        running.append(spy)
        print(f"demo: device {THING} (MicroPython unix port, 96 KB heap, TLS port {mosq.tls_port})")
        dev = stack.Device(os.path.join(work, "device"), THING, mosq.tls_broker,
                           tls_dir=pki.thing(THING), heap=stack.DEFAULT_HEAP)
        running.append(dev)
        spy.wait_for(lambda t, p: t.endswith("/start-next"), 30, "the device to ask for work")
        job_id = "demo-" + time.strftime("%H%M%S")
        document = {"operation": "demo", "steps": 3, "step_ms": 400}
        print(f"demo: create job {job_id} {json.dumps(document)}")
        iot.create_job(jobId=job_id, targets=[f"arn:aws:iot:us-east-1:123456789012:thing/{THING}"],
                       document=json.dumps(document))
        ex: dict = {}

        def done():
            nonlocal ex
            ex = iot.describe_job_execution(jobId=job_id, thingName=THING)["execution"]
            return ex["status"] in TERMINAL

        try:
            stack.wait_until(done, 60, f"job {job_id} to finish", 0.1)
        except TimeoutError as e:
            print(f"demo: {e}\n--- device log ---\n{dev.log_text()}", file=sys.stderr)
            return 1
        details = ex.get("statusDetails", {}).get("detailsMap", {})
        print(f"demo: job {job_id} ended {ex['status']} {json.dumps(details)} "
              f"(version {ex['versionNumber']}) after {time.monotonic() - t0:.1f}s")
        return 0 if ex["status"] == "SUCCEEDED" else 1
    except Exception as e:  # report, then still stop everything
        print(f"demo: failed: {e}", file=sys.stderr)
        return 1
    finally:
        for r in reversed(running):
            r.stop()
        print("demo: stopped mosquitto, jobsd and the device")
