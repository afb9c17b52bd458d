"""Hostile input on a running device's own topics.

An attacker on the broker's plain listener (no ACL there) publishes what the device subscribes to
(`$aws/things/<T>/jobs/notify-next`, `start-next/+`, `get/+`, `<job>/get/+`, `<job>/update/+`),
plus topics the device must never see: malformed and non-UTF-8 JSON, JSON that is not an object,
every wrong type for the fields the device reads, payloads over the device's limit, deep nesting,
invalid job ids, replies nobody asked for, replays of real replies out of order, another thing's
topics. The inputs are interleaved with real jobs (before, during a paced job, after), and:

- every real job ends with the status and reason its document calls for, its updates exactly the
  expected ones, and the device publishes nothing for a job id that is not real;
- the firmware never restarts (one `devsim: boot`, no Traceback);
- its heap does not grow: the `heap free=<n> alloc=<n>` line the runner prints after each job
  (after gc.collect()) ends within TOLERANCE of where it started."""
from __future__ import annotations

import json
import re

import paho.mqtt.client as mqtt
import pytest
from conftest import thing_arn, wait_execution
from iotjobs_host import stack

HEAP = stack.DEFAULT_HEAP  # the project's device heap (devsim's default)
TERMINAL = {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "REMOVED", "CANCELED"}
TOLERANCE = 2048  # bytes of heap growth allowed between the first and the last job
HEAP_LINE = re.compile(r"heap free=(\d+) alloc=(\d+)")
MAX_PACKET = 40 * 1024  # lib/iotjobs/transport.py: the largest PUBLISH the device holds

Input = tuple[str, str, bytes]  # (name, topic, payload)


def j(obj: object) -> bytes:
    return json.dumps(obj).encode()


def execution(job_id: object = "ghost-job", **over: object) -> dict:
    ex = {"jobId": job_id, "status": "QUEUED", "queuedAt": 1, "lastUpdatedAt": 1,
          "versionNumber": 1, "executionNumber": 1, "jobDocument": {"operation": "demo"}}
    ex.update(over)
    return ex


def padded(size: int, key: str = "pad") -> bytes:
    """A JSON object of exactly `size` bytes."""
    head = b'{"' + key.encode() + b'": "'
    return head + b"a" * (size - len(head) - 2) + b'"}'


def hostile_inputs(thing: str, job: str) -> list[Input]:
    """Distinct hostile inputs; `job` is a real job id of this thing (per-job topics)."""
    b = f"$aws/things/{thing}/jobs/"
    nn, sa, sr = b + "notify-next", b + "start-next/accepted", b + "start-next/rejected"
    ua, ur, ga, gr = f"{b}{job}/update/accepted", f"{b}{job}/update/rejected", \
        f"{b}{job}/get/accepted", f"{b}{job}/get/rejected"
    out: list[Input] = [
        # -- not JSON, not UTF-8, not an object
        ("json-unterminated", nn, b'{"execution": {"jobId": "a"'),
        ("json-garbage", nn, b"{not json"),
        ("json-trailing-garbage", nn, b'{"a": 1} trailing'),
        ("json-single-quotes", sa, b"{'clientToken': 'x'}"),
        ("json-empty-payload", nn, b""),
        ("json-whitespace-only", nn, b" \n\t "),
        ("bytes-not-utf8", nn, b"\xff\xfe\x00\x80"),
        ("bytes-nul", sr, b"\x00" * 64),
        ("utf8-invalid-in-string", nn, b'{"execution": {"jobId": "\xc3\x28"}}'),
        ("utf8-overlong-token", ua, b'{"clientToken": "\xc0\xaf"}'),
        ("utf8-bom", nn, b"\xef\xbb\xbf{}"),
        ("json-lone-surrogate", nn, b'{"execution": {"jobId": "\\ud800"}}'),
        ("json-nan", b + "get/accepted", b'{"x": NaN}'),
        ("json-float-overflow", nn, b'{"timestamp": 1e999}'),
        ("json-array", nn, b"[1, 2, 3]"),
        ("json-string", sa, b'"execution"'),
        ("json-number", ua, b"42"),
        ("json-null", ga, b"null"),
        ("json-true", b + "get/rejected", b"true"),
        # -- sizes and depth (the device holds at most MAX_PACKET bytes)
        ("size-60k", nn, padded(60 * 1024)),
        ("size-200k", sa, padded(200 * 1024, "clientToken")),
        ("size-200k-binary", ua, bytes(range(256)) * 800),
        ("size-at-device-limit", nn, padded(MAX_PACKET)),
        ("size-one-over-limit", nn, padded(MAX_PACKET + 1)),
        ("size-expanding-array", nn, b'{"a": [' + b"0," * 12000 + b"0]}"),
        ("size-many-keys", nn, j({f"k{i}": i for i in range(1500)})),
        ("size-2000-digit-int", nn, b'{"execution": {"executionNumber": ' + b"9" * 2000 + b"}}"),
        ("nest-1000-lists", nn, b"[" * 1000 + b"]" * 1000),
        ("nest-1000-objects", nn, b'{"a":' * 1000 + b"1" + b"}" * 1000),
        ("nest-5000-unclosed", nn, b"[" * 5000),
        ("nest-10000-in-execution", nn, b'{"execution": ' + b"[" * 10000 + b"]" * 10000 + b"}"),
        # -- replies nobody asked for, unknown fields
        ("forged-start-next-accepted", sa, j({"clientToken": "forged-1", "execution": execution("forged-job")})),
        ("forged-token-device-format", sa, j({"clientToken": "00000000-1", "execution": execution("forged-job")})),
        ("forged-no-token", sa, j({"execution": execution("forged-job")})),
        ("forged-start-next-rejected", sr, j({"clientToken": "forged-2", "code": "InternalError"})),
        ("forged-update-accepted", ua, j({"clientToken": "forged-3", "timestamp": 1})),
        ("forged-update-rejected-version", ur, j({"clientToken": "forged-4", "code": "VersionMismatch",
                                                  "executionState": {"status": "IN_PROGRESS",
                                                                     "versionNumber": 99}})),
        ("forged-update-rejected-canceled", ur, j({"clientToken": "forged-5", "code": "InvalidStateTransition",
                                                   "executionState": {"status": "CANCELED"}})),
        ("forged-describe-accepted", ga, j({"clientToken": "forged-6", "execution": execution(job, status="SUCCEEDED")})),
        ("forged-describe-rejected", gr, j({"clientToken": "forged-7", "code": "ResourceNotFound"})),
        ("forged-next-describe", b + "$next/get/accepted", j({"clientToken": "forged-8",
                                                              "execution": execution("forged-job2")})),
        ("forged-get-pending", b + "get/accepted", j({"clientToken": "forged-9", "inProgressJobs": "x",
                                                      "queuedJobs": [{"jobId": 5}]})),
        ("unknown-fields-notify", nn, j({"execution": execution(zzz={"deep": [1, 2]}), "extra": True,
                                         "timestamp": "yesterday"})),
        ("unknown-fields-reply", sa, j({"clientToken": "forged-10", "surprise": [{}], "execution": None})),
        ("notify-next-ghost-job", nn, j({"timestamp": 1, "execution": execution("ghost-job")})),
        ("notify-next-wrong-thing-inside", nn, j({"execution": execution("x", thingName="other")})),
        # -- topics the device must not act on: invalid job ids, other things, other levels
        ("topic-jobid-65", f"{b}{'a' * 65}/update/accepted", j({"clientToken": "x"})),
        ("topic-jobid-dot", f"{b}bad.id/update/rejected", j({"clientToken": "x", "code": "InternalError"})),
        ("topic-next-update", f"{b}$next/update/accepted", j({"clientToken": "x"})),
        ("topic-jobid-unicode", f"{b}jöb/get/accepted", j({"clientToken": "x", "execution": execution("jöb")})),
        ("topic-start-next-as-job", f"{b}start-next/get/accepted", j({"clientToken": "x"})),
        ("topic-other-thing-notify", "$aws/things/other/jobs/notify-next", j({"execution": execution("other-job")})),
        ("topic-other-thing-start-next", "$aws/things/other/jobs/start-next/accepted",
         j({"clientToken": "x", "execution": execution("other-job")})),
        ("topic-other-thing-update", "$aws/things/other/jobs/other-job/update/accepted", j({"clientToken": "x"})),
        ("topic-thing-name-prefix", f"$aws/things/{thing}x/jobs/notify-next", j({"execution": execution()})),
        ("topic-notify-unsubscribed", b + "notify", j({"jobs": "junk"})),
        ("topic-extra-level", b + "start-next/accepted/extra", j({"clientToken": "x"})),
    ]
    # -- every wrong type for each field the device reads
    for i, v in enumerate(["str", 1, 1.5, True, None, [], [{}]]):
        out.append((f"type-execution-{i}", nn, j({"execution": v})))
    for i, v in enumerate([1, None, [], {}, True, "", "a" * 65, "bad id!", "x/#", "../../etc", "+",
                           "$next", "jöb"]):
        out.append((f"type-jobid-{i}", nn, j({"execution": execution(v)})))
    for i, v in enumerate(["str", 1, [], None, True, {"operation": 5}, {"operation": ["demo"]}]):
        out.append((f"type-jobdocument-{i}", sa,
                    j({"clientToken": f"doc-{i}", "execution": execution("forged-job", jobDocument=v)})))
    for i, v in enumerate([1, [], "BOGUS", None, {"a": 1}]):
        out.append((f"type-status-{i}", ga, j({"clientToken": f"st-{i}", "execution": execution(job, status=v)})))
    for i, v in enumerate(["1", -1, 2**70, 1.5, None]):
        out.append((f"type-version-{i}", ua, j({"clientToken": f"ver-{i}",
                                                "executionState": {"status": "IN_PROGRESS", "versionNumber": v}})))
    for i, v in enumerate(["x", -5, 10**30, 0, 1e308, True]):
        out.append((f"type-execnumber-{i}", nn, j({"execution": execution(executionNumber=v)})))
    for i, v in enumerate([1, None, [], {}, "", "x" * 10000, True]):
        out.append((f"type-clienttoken-{i}", sr, j({"clientToken": v, "code": "InternalError"})))
    return out


class Spy(stack.Spy):
    """stack.Spy that survives what it records: json.loads raises RecursionError (not
    ValueError) on the deeply nested inputs, which would end the stack spy's paho thread."""

    def _on_message(self, client, userdata, msg) -> None:
        try:
            payload = json.loads(msg.payload)
        except (ValueError, RecursionError):
            payload = msg.payload
        with self._cond:
            self.messages.append((msg.topic, payload))
            self._cond.notify_all()


@pytest.fixture
def spy(mosquitto):
    spies: list[Spy] = []

    def start(thing: str) -> Spy:
        s = Spy(mosquitto.port, thing)
        spies.append(s)
        return s

    yield start
    for s in spies:
        s.stop()


class Attacker:
    """A paho client on the plain listener that publishes whatever it is given."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="attacker")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.sent: list[str] = []

    def send(self, inputs: list[Input], retain: bool = False) -> None:
        for name, topic, payload in inputs:
            info = self.client.publish(topic, payload, qos=1, retain=retain)
            info.wait_for_publish(10)
            assert info.is_published(), f"broker did not take {name}"
            self.sent.append(name)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def replies_of(spy, thing: str, job_id: str) -> list[Input]:
    """The service's real replies about job_id recorded by the spy (their clientToken is one the
    device sent; the attacker's forgeries never carry one), for replay."""
    msgs = list(spy.messages)
    tokens = {p["clientToken"] for t, p in msgs
              if isinstance(p, dict) and t.rsplit("/", 1)[-1] in ("start-next", "update", "get")
              and isinstance(p.get("clientToken"), str)}
    out = []
    for i, (t, p) in enumerate(msgs):
        if not (isinstance(p, dict) and t.endswith(("/accepted", "/rejected"))
                and isinstance(p.get("clientToken"), str) and p["clientToken"] in tokens):
            continue
        ex = p.get("execution")
        if f"/{job_id}/" in t or (isinstance(ex, dict) and ex.get("jobId") == job_id):
            out.append((f"replay-{job_id}-{i}", t, j(p)))
    return out


def updates_of(spy, job_id: str) -> list[str]:
    return [p.get("status") for t, p in list(spy.messages)
            if t.endswith(f"/jobs/{job_id}/update") and isinstance(p, dict)]


def test_hostile_input_around_real_jobs(jobsd, mosquitto, iot, device, spy):
    thing = "dev-hostile"
    iot.create_thing(thingName=thing)
    watch = spy(thing)
    dev = device(thing, tls=True, heap=HEAP)
    watch.wait_for(lambda t, p: t.endswith("/jobs/start-next"), what="the first start-next")
    evil = Attacker(mosquitto.port)
    retained_topic = f"$aws/things/{thing}/jobs/start-next/accepted"
    real: dict[str, tuple[dict, str, dict]] = {}

    def run_job(job_id: str, document: dict, status: str, details: dict, timeout: float = 30) -> dict:
        real[job_id] = (document, status, details)
        iot.create_job(jobId=job_id, targets=[thing_arn(thing)], document=json.dumps(document))
        return wait_execution(iot, job_id, thing, TERMINAL, timeout, device=dev)

    def check(ex: dict) -> None:
        document, status, details = real[ex["jobId"]]
        got = ex.get("statusDetails", {}).get("detailsMap", {})
        assert ex["status"] == status, (ex, dev.log_text())
        assert {k: got.get(k) for k in details} == details, ex

    try:
        inputs = hostile_inputs(thing, "h-before")
        names = [n for n, _, _ in inputs]
        assert len(set(names)) == len(names) >= 60, f"{len(set(names))} distinct inputs"

        # before any job (and one retained, so it also comes back on every resubscribe)
        evil.send([("retained-junk", retained_topic, b"{retained junk")], retain=True)
        evil.send(inputs[0::3])
        check(run_job("h-before", {"operation": "demo", "steps": 1}, "SUCCEEDED",
                      {"reason": "OK", "steps": "1"}))

        # during a paced job: the rest of the inputs, replays of the last job's replies in reverse
        # (duplicates, out of order), while the handler sleeps and reports
        during = {"operation": "demo", "steps": 8, "step_ms": 500}
        real["h-during"] = (during, "SUCCEEDED", {"reason": "OK", "steps": "8"})
        iot.create_job(jobId="h-during", targets=[thing_arn(thing)], document=json.dumps(during))
        watch.wait_for(lambda t, p: t.endswith("/jobs/h-during/update") and isinstance(p, dict)
                       and p.get("status") == "IN_PROGRESS", what="h-during's first progress")
        replays = replies_of(watch, thing, "h-before")
        assert replays, "nothing recorded to replay"
        evil.send(inputs[1::3] + replays[::-1])
        mid = iot.describe_job_execution(jobId="h-during", thingName=thing)["execution"]
        assert mid["status"] == "IN_PROGRESS", f"the hostile batch did not land mid-job: {mid}"
        check(wait_execution(iot, "h-during", thing, TERMINAL, 60, device=dev))

        # after: the last third, every reply of h-during twice, then jobs of every outcome
        evil.send(inputs[2::3] + replies_of(watch, thing, "h-during") * 2)
        check(run_job("h-fail", {"operation": "demo", "steps": 0, "fail": "boom"}, "FAILED",
                      {"reason": "HANDLER_ERROR"}))
        check(run_job("h-unknown", {"operation": "make-coffee"}, "REJECTED",
                      {"reason": "UNKNOWN_OPERATION"}))
        check(run_job("h-last", {"operation": "demo", "steps": 2}, "SUCCEEDED",
                      {"reason": "OK", "steps": "2"}))
    finally:
        evil.send([("clear-retained", retained_topic, b"")], retain=True)
        evil.stop()
    assert len(set(evil.sent)) >= 60

    # each real job's updates: its progress reports then one terminal status, nothing refused
    # (the spy's copy of the last update may trail the service's answer: wait for it)
    stack.wait_until(lambda: "SUCCEEDED" in updates_of(watch, "h-last"), 10,
                     "the spy to see the last update")
    for job_id, (document, status, _) in real.items():
        steps = document.get("steps", 0) if document.get("operation") == "demo" else 0
        assert updates_of(watch, job_id) == ["IN_PROGRESS"] * steps + [status], \
            (job_id, updates_of(watch, job_id))
        refused = [p for _, t, p in replies_of(watch, thing, job_id) if t.endswith("/update/rejected")]
        assert not refused, (job_id, refused)
    # nothing published for a job the service never had (forged, invalid or another thing's)
    acted = {t.split("/")[4] for t in watch.topics() if t.endswith(("/update", "/get"))
             and t.count("/") == 5}
    assert acted <= set(real) | {"$next"}, f"device acted on forged jobs: {acted - set(real)}"

    log = dev.log_text(10**8)
    assert dev.proc.alive()
    assert len(dev.boots()) == 1, f"the firmware restarted (boots {dev.boots()}):\n{log[-6000:]}"
    assert "Traceback" not in log, log[-6000:]
    heap = [(int(f), int(a)) for f, a in HEAP_LINE.findall(log)]
    assert len(heap) >= len(real), f"expected a `heap free= alloc=` line after each job, got {heap}"
    (free0, alloc0), (free1, alloc1) = heap[0], heap[-1]
    assert alloc1 - alloc0 <= TOLERANCE and free0 - free1 <= TOLERANCE, \
        f"heap grew from alloc={alloc0} to alloc={alloc1} (free {free0} -> {free1}) over {len(heap)} jobs"
