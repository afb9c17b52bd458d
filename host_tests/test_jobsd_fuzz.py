"""Deterministic fuzzing of tools/jobsd: random and malformed requests on every device MQTT topic
and every REST path, against a real mosquitto and a real jobsd process.

Oracles come from PROTOCOL.md, not from jobsd's code:
* MQTT (1.2, 1.8): a request on a topic under `$aws/things/<T>/jobs/` that is not a response or
  event topic gets exactly one reply, on the request topic plus `/accepted` or `/rejected`,
  echoing the request's clientToken when it has one; a rejection carries a documented `code`
  (never InternalError for bad input), InvalidTopic when the topic names no API, InvalidJson when
  the payload is not UTF-8 JSON, and `executionState` only with InvalidStateTransition and
  VersionMismatch. Response and event topics get no reply.
* REST (2.3, restJson1): every response is JSON, with a status from the documented set and, for
  errors, an `x-amzn-ErrorType` header and a `message`; never 500.
* Afterwards the process is alive, logged no traceback, and a job created before the fuzz still
  runs to completion.

Inputs that once broke jobsd are kept out of the random mix and pinned, one bug each, in the
tests at the end of this module.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import socket
import threading
import time
import uuid
from collections import Counter
from typing import Any, Optional

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

# fixed by default (deterministic); JOBSD_FUZZ_SEED=<n> explores other sequences
SEED = int(os.environ.get("JOBSD_FUZZ_SEED", "0x10B52024"), 0)
MQTT_REQUESTS = 600
REST_REQUESTS = 500
BATCH = 25
TIMEOUT = 10.0
REGION, ACCOUNT = "us-east-1", "123456789012"

CODES = {"InvalidTopic", "InvalidJson", "InvalidRequest", "InvalidStateTransition",
         "ResourceNotFound", "VersionMismatch", "InternalError", "RequestThrottled",
         "TerminalStateReached"}
REST_STATUSES = {200, 400, 404, 409, 410, 429, 503}
REST_ERROR_TYPES = {
    "InvalidRequestException", "ResourceNotFoundException", "ResourceAlreadyExistsException",
    "InvalidStateTransitionException", "VersionConflictException", "ConflictException",
    "ValidationException", "TerminalStateException", "ThrottlingException",
    "ServiceUnavailableException", "UnknownOperationException", "LimitExceededException",
    "CertificateValidationException", "ServiceQuotaExceededException",
}
_THING_RE = re.compile(r"[A-Za-z0-9:_-]{1,128}")
_JOB_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
LONG_MAX = 2**63 - 1

FUZZ_THINGS = ["fz-a", "fz-b", "fz-c"]
FUZZ_JOBS = ["fz-j1", "fz-j2", "fz-j3", "fz-j4", "fz-j5"]
KEEP_THING, KEEP_JOB = "keep-thing", "keep-job"  # never named by any fuzz input


def arn(thing: str) -> str:
    return f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/{thing}"


# -- MQTT oracle -----------------------------------------------------------------------------------

def expects_reply(topic: str) -> bool:
    """PROTOCOL.md 1.1: requests live under `$aws/things/<T>/jobs/`; responses and events do not
    get answered."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != "$aws" or parts[1] != "things" or parts[3] != "jobs":
        return False
    rest = parts[4:]
    if rest and rest[-1] in ("accepted", "rejected"):
        return False
    if rest in (["notify"], ["notify-next"]):
        return False
    return not any(p.startswith("notify-namespace-") for p in rest)


def api_of(topic: str) -> Optional[str]:
    parts = topic.split("/")
    thing, rest = parts[2], parts[4:]
    if not _THING_RE.fullmatch(thing):
        return None
    if rest == ["get"]:
        return "get"
    if rest == ["start-next"]:
        return "start-next"
    if len(rest) == 2 and rest[1] == "get" and (rest[0] == "$next" or _JOB_RE.fullmatch(rest[0])):
        return "describe"
    if len(rest) == 2 and rest[1] == "update" and _JOB_RE.fullmatch(rest[0]):
        return "update"
    return None


def parse_json(payload: bytes) -> tuple[bool, Any]:
    try:
        return True, json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError):
        return False, None


def token_of(payload: bytes) -> Optional[str]:
    ok, body = parse_json(payload)
    if ok and isinstance(body, dict) and isinstance(body.get("clientToken"), str):
        return body["clientToken"]
    return None


# -- random inputs ---------------------------------------------------------------------------------

SCALARS: list[Any] = [
    None, True, False, 0, 1, 2, 3, -1, 7, 10080, 10081, -2, 2**31, LONG_MAX, -(2**63), 2**70,
    1.5, -0.0, 1e308, float("nan"), float("inf"), "", "x", "1", "2", "-1", "1.0.1", "true",
    "IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED", "QUEUED", "CANCELED", "TIMED_OUT",
    "REMOVED", "DONE", "in_progress", "$next", "x" * 1025, "x" * 20000, "ünïcödé", "\u0000",
    "line\nbreak", "\ud800", "😀", "<script>", "' OR 1=1 --",
]
STATUSES = ["IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED", "QUEUED", "CANCELED", "DONE", ""]
MQTT_FIELDS = {
    "get": [],
    "start-next": ["statusDetails", "stepTimeoutInMinutes"],
    "describe": ["executionNumber", "includeJobDocument"],
    "update": ["status", "statusDetails", "expectedVersion", "executionNumber",
               "includeJobExecutionState", "includeJobDocument", "stepTimeoutInMinutes"],
}
ALL_FIELDS = sorted({f for fields in MQTT_FIELDS.values() for f in fields})
UNKNOWN_FIELDS = ["foo", "jobId", "thingName", "timestamp", "execution", "code", "__proto__",
                  "ClientToken", "clienttoken", ""]


def rand_value(rng: random.Random, depth: int = 0, big_ints: bool = True) -> Any:
    roll = rng.random()
    if depth < 3 and roll < 0.1:
        return [rand_value(rng, depth + 1, big_ints) for _ in range(rng.randint(0, 3))]
    if depth < 3 and roll < 0.2:
        return {rng.choice(["k", "a:b", "bad key", "", "k" * 129]):
                rand_value(rng, depth + 1, big_ints) for _ in range(rng.randint(0, 3))}
    value = rng.choice(SCALARS)
    if not big_ints and isinstance(value, int) and not isinstance(value, bool) \
            and not -(2**63) <= value <= LONG_MAX:
        value = LONG_MAX
    return value


def rand_details(rng: random.Random) -> Any:
    if rng.random() < 0.3:
        return rand_value(rng)
    keys = ["step", "a:b_c-d", "k" * 128, "k" * 129, "bad key", "", "ü", "progress"]
    values: list[Any] = ["v", "50", "x" * 1024, "x" * 1025, "", "tab\t", 1, None, ["v"], "ünï"]
    return {rng.choice(keys): rng.choice(values) for _ in range(rng.randint(0, 4))}


CLEAN_VALUES: dict[str, list[Any]] = {
    "status": ["IN_PROGRESS", "IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED"],
    "statusDetails": [{"step": "1"}, {"a:b_c-d": "ünï"}, {}, {"k" * 128: "v" * 1024}],
    "expectedVersion": [1, 2, 3, 4, "2"],
    "executionNumber": [1, 1, 2],
    "stepTimeoutInMinutes": [1, 10080, 5],
    "includeJobExecutionState": [True, False],
    "includeJobDocument": [True, False],
}


def rand_field(rng: random.Random, name: str, big_ints: bool = True, clean: bool = False) -> Any:
    if name in CLEAN_VALUES and (clean or rng.random() < 0.5):
        return rng.choice(CLEAN_VALUES[name])
    if name == "status" and rng.random() < 0.5:
        return rng.choice(STATUSES)
    if name == "statusDetails":
        return rand_details(rng)
    if name in ("executionNumber", "expectedVersion", "stepTimeoutInMinutes") \
            and rng.random() < 0.5:
        return rng.choice([0, -1, 10081, "1", "x", 1.0, True])
    return rand_value(rng, big_ints=big_ints)


def rand_token(rng: random.Random, i: int) -> str:
    return rng.choice([f"fz-{i}", f"fz-{i}", f"fz-{i}-ünï", f"fz-{i} \t", f"fz-{i}" + "x" * 5000,
                       f"\ud800fz-{i}", f"fz-{i}/accepted", f'fz-{i}"{{}}'])


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def mqtt_payload(rng: random.Random, i: int, kind: Optional[str]) -> bytes:
    mode = rng.choices(["clean", "object", "malformed", "wrong-token", "oversized", "duplicate"],
                       weights=[35, 30, 15, 7, 6, 7])[0]
    fields = MQTT_FIELDS[kind] if kind else ALL_FIELDS
    if mode == "malformed":
        return rng.choice([
            b"", b"{", b"}", b"{not json", b'{"clientToken": "fz-x"', b'{"clientToken": fz}',
            b"\xff\xfe\x00", b"\xc3\x28", b"\x80abc", bytes(rng.randrange(256) for _ in range(40)),
            b"null", b"[]", b"[1, 2]", b'"str"', b"42", b"true", b"\xef\xbb\xbf{}",
            nested(200), b"{}{}", b"{'clientToken': 'single'}", b'{"a":1,}',
            json.dumps({"clientToken": "fz-cut", "status": "SUCCEEDED"}).encode()[:-3],
        ])
    body: dict[str, Any] = {}
    if mode == "wrong-token":
        body["clientToken"] = rng.choice([5, None, [], {}, True, 1.5, ["fz"]])
    elif rng.random() < 0.85:
        body["clientToken"] = rand_token(rng, i)
    for name in rng.sample(fields, rng.randint(0, len(fields))):
        body[name] = rand_field(rng, name, clean=mode == "clean")
    if kind == "update" and mode == "clean":
        body.setdefault("status", rand_field(rng, "status", clean=True))
    if rng.random() < 0.2:
        body[rng.choice(UNKNOWN_FIELDS)] = rand_value(rng)
    if mode == "oversized":
        filler = "y" * 200_000
        where = rng.choice(["unknown", "details", "token", "status"])
        if where == "unknown":
            body["padding"] = filler
        elif where == "details":
            body["statusDetails"] = {"big": filler}
        elif where == "token":
            body["clientToken"] = f"fz-{i}-" + filler
        else:
            body["status"] = filler
    text = json.dumps(body)
    if mode == "duplicate" and "clientToken" in body and isinstance(body["clientToken"], str):
        # the last of two members wins in every JSON parser this test knows
        text = '{"clientToken": "ignored-%d", ' % i + text[1:]
    return text.encode()


MQTT_THINGS = FUZZ_THINGS + ["fz-ghost", "a:b_c-d", "T" * 128]
MQTT_BAD_THINGS = ["bad!thing", "t" * 129, "sp ace", "ünï", "dot.ted", "..", "%24", "$next", "",
                   "UPPER.lower", "a|b"]
MQTT_JOBS = FUZZ_JOBS + ["missing-job", "$next", "j" * 64]
MQTT_BAD_JOBS = ["j" * 65, "bad.id", "a:b", "%24next", "..", "ünï", "$NEXT", "", "sp ace"]


def mqtt_request(rng: random.Random, i: int) -> tuple[str, bytes]:
    thing = rng.choice(MQTT_BAD_THINGS) if rng.random() < 0.12 else rng.choice(MQTT_THINGS)
    job = rng.choice(MQTT_BAD_JOBS) if rng.random() < 0.12 else rng.choice(MQTT_JOBS)
    roll = rng.random()
    kind: Optional[str]
    if roll < 0.78:
        kind = rng.choice(["get", "start-next", "describe", "update", "update", "describe"])
        suffix = {"get": "get", "start-next": "start-next", "describe": f"{job}/get",
                  "update": f"{job}/update"}[kind]
    elif roll < 0.92:  # names no API
        kind = None
        suffix = rng.choice([job, f"{job}/get/extra", f"{job}/update/x", "notifyzz", "get/x",
                             "start-next/now", "jobs", "update", f"{job}/delete", "", "a/b/c/d",
                             "$next/update", "notify-next/x", "GET", "Start-Next", f"{job}/get/"])
    else:  # responses and events: never answered
        kind = None
        suffix = rng.choice(["get/accepted", f"{job}/update/rejected", "notify", "notify-next",
                             f"{job}/notify-namespace-ns1/", "start-next/accepted",
                             f"{job}/get/rejected"])
    return f"$aws/things/{thing}/jobs/{suffix}", mqtt_payload(rng, i, kind)


# -- REST inputs -------------------------------------------------------------------------------------

THING_SEGS = ["fz-a", "fz-b", "fz-ghost", "a:b", "bad!thing", "%21", "t" * 129, "sp%20ace",
              "%C3%BC", "%C3%28", "..", ".", "%2e%2e", "%2E%2E%2Fetc", "a%2Fb", "%00", "%ZZ", "%",
              "$next", "%24next", "", "~", "a;b", "a%3Bb"]
JOB_SEGS = FUZZ_JOBS + ["missing-job", "$next", "%24next", "j" * 65, "bad.id", "..", "%2e%2e",
                        "a%2Fb", "%ZZ", "%00", "", "%C3%28", "new-fz-job"]
NUMBER_SEGS = ["1", "2", "0", "-1", "abc", "1.5", str(LONG_MAX), "%31", ""]
QUERY_VALUES = ["", "true", "false", "maybe", "TRUE", "0", "1", "2", "-1", "250", "251", "abc",
                "1e3", "9" * 18, "%ZZ", "%00", "IN_PROGRESS", "COMPLETED", "DONE", "SNAPSHOT",
                "CONTINUOUS", "%E2%9C%93"]
QUERY_NAMES = ["includeJobDocument", "executionNumber", "force", "maxResults", "nextToken",
               "status", "targetSelection", "jobId", "namespaceId", "thingGroupName", "foo", "",
               "%ZZ", "status[]"]

DATA_ROUTES = [("GET", "/things/{T}/jobs"), ("GET", "/things/{T}/jobs/{J}"),
               ("PUT", "/things/{T}/jobs/$next"), ("PUT", "/things/{T}/jobs/%24next"),
               ("POST", "/things/{T}/jobs/{J}"), ("POST", "/command-executions")]
CONTROL_ROUTES = [
    ("POST", "/things/{T}"), ("GET", "/things/{T}"), ("GET", "/things"), ("PUT", "/jobs/{J}"),
    ("GET", "/jobs/{J}"), ("GET", "/jobs/{J}/job-document"), ("GET", "/jobs"),
    ("PUT", "/jobs/{J}/cancel"), ("DELETE", "/jobs/{J}"), ("GET", "/jobs/{J}/things"),
    ("GET", "/things/{T}/jobs"), ("GET", "/things/{T}/jobs/{J}"),
    ("PUT", "/things/{T}/jobs/{J}/cancel"),
    ("DELETE", "/things/{T}/jobs/{J}/executionNumber/{N}"),
    ("POST", "/thing-groups/{T}"), ("PUT", "/thing-groups/addThingToThingGroup"),
]
METHODS = ["GET", "PUT", "POST", "DELETE", "PATCH"]
BODY_FIELDS = ["status", "statusDetails", "expectedVersion", "executionNumber",
               "includeJobExecutionState", "includeJobDocument", "stepTimeoutInMinutes",
               "targets", "document", "description", "targetSelection", "timeoutConfig",
               "jobExecutionsRolloutConfig", "abortConfig", "reasonCode", "comment",
               "attributePayload", "thingTypeName", "targetArn", "commandArn", "parameters",
               "executionTimeoutSeconds", "clientToken", "thingGroupName", "thingName",
               "documentSource", "tags", "foo"]


def rest_field(rng: random.Random, name: str, clean: bool) -> Any:
    """Body member values; lone surrogates in control-plane strings are pinned separately."""
    if name == "targets" and rng.random() < 0.7:
        return [rng.choice([arn(t) for t in FUZZ_THINGS] + [arn("fz-ghost"), "not-an-arn", 5,
                            f"arn:aws:iot:eu-west-1:{ACCOUNT}:thing/fz-a",
                            f"arn:aws:iot:{REGION}:{ACCOUNT}:thinggroup/none"])
                for _ in range(rng.randint(0, 3))]
    if name == "document" and rng.random() < 0.7:
        return rng.choice(['{"op": "fuzz"}', "{}", "[1]", "{oops", "", "null",
                           json.dumps({"x": "y" * 33000}), '"str"'])
    if name == "attributePayload" and rng.random() < 0.6:
        return {"attributes": rng.choice([{"a": "b"}, {"a": 1}, "x", None, {}]),
                "merge": rng.choice([True, "no"])}
    value = rand_field(rng, name, big_ints=True, clean=clean)
    if isinstance(value, str) and "\ud800" in value:
        value = "ok"
    return value


def rest_body(rng: random.Random) -> bytes:
    mode = rng.choices(["object", "malformed", "empty", "big"], weights=[65, 15, 15, 5])[0]
    if mode == "empty":
        return b""
    if mode == "malformed":
        return rng.choice([b"{", b"{not json", b"[1]", b"null", b'"s"', b"42", b"\xff\xfe",
                           b"\xc3\x28", nested(200), b"{}{}", b"\xef\xbb\xbf{}", b" ",
                           b'{"status": }', bytes(rng.randrange(256) for _ in range(30))])
    clean = rng.random() < 0.4
    body = {name: rest_field(rng, name, clean)
            for name in rng.sample(BODY_FIELDS, rng.randint(0, 6))}
    if mode == "big":
        body["padding"] = "z" * 200_000
    return json.dumps(body).encode()


def rest_request(rng: random.Random, routes: list[tuple[str, str]]) -> tuple[str, str, bytes]:
    roll = rng.random()
    method, template = rng.choice(routes)
    if roll < 0.15:
        method = rng.choice([m for m in METHODS if m != method])
    if roll > 0.93:  # a path no route has
        template = "/" + "/".join(rng.choice(["things", "jobs", "{T}", "{J}", "..", "%2e%2e",
                                              "x", "", "thing-groups", "executions"])
                                  for _ in range(rng.randint(0, 6)))
    good = rng.random() < 0.5  # half the requests name things and jobs that exist
    path = (template.replace("{T}", rng.choice(FUZZ_THINGS if good else THING_SEGS))
            .replace("{J}", rng.choice(FUZZ_JOBS if good else JOB_SEGS))
            .replace("{N}", rng.choice(["1", "1", "2"] if good else NUMBER_SEGS)))
    if rng.random() < 0.5:
        pairs = [f"{rng.choice(QUERY_NAMES)}={rng.choice(QUERY_VALUES)}"
                 for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.1:
            pairs.append(rng.choice(["=", "&&", "novalue", "a=1=2", "%"]))
        path += "?" + "&".join(pairs)
    body = rest_body(rng) if method in ("PUT", "POST", "PATCH") or rng.random() < 0.1 else b""
    return method, path, body


# -- plumbing ----------------------------------------------------------------------------------------

class Wire:
    """One paho connection that publishes the fuzz and records everything on the jobs topics
    (its own publications included, so they can be told apart from jobsd's)."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"fuzz-{uuid.uuid4().hex}")
        self.client.max_inflight_messages_set(100)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.loop_start()
        self.client.subscribe("$aws/things/+/jobs/#", qos=1)
        assert subscribed.wait(TIMEOUT), "subscription not acknowledged"

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        assert info.rc == paho.MQTT_ERR_SUCCESS, (topic, info.rc)

    def wait_reply(self, topic: str, token: str) -> dict[str, Any]:
        """The reply to a request carrying `token`; everything jobsd sent before it is in."""
        deadline = time.monotonic() + TIMEOUT
        seen = 0
        with self._cond:
            while True:
                for t, p in self.messages[seen:]:
                    if t in (topic + "/accepted", topic + "/rejected") and token_of(p) == token:
                        body = json.loads(p)
                        body["_outcome"] = t.rsplit("/", 1)[1]
                        return body
                seen = len(self.messages)
                left = deadline - time.monotonic()
                assert left > 0, f"no reply on {topic} for {token}"
                self._cond.wait(left)

    def request(self, topic: str, body: dict[str, Any]) -> dict[str, Any]:
        token = uuid.uuid4().hex
        self.publish(topic, json.dumps({**body, "clientToken": token}).encode())
        return self.wait_reply(topic, token)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def http_call(url: str, method: str, path: str, body: bytes = b"",
              conn: Optional[http.client.HTTPConnection] = None
              ) -> tuple[int, dict[str, str], bytes, http.client.HTTPConnection]:
    host, port = url[len("http://"):].split(":")
    if conn is None:
        conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    headers = {"Content-Type": "application/json"} if body else {}
    conn.request(method, path, body=body, headers=headers)
    reply = conn.getresponse()
    data = reply.read()
    out_headers = {k.lower(): v for k, v in reply.getheaders()}
    if reply.will_close:
        conn.close()
        conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    return reply.status, out_headers, data, conn


def check_rest_reply(what: str, status: int, headers: dict[str, str], data: bytes) -> None:
    assert status in REST_STATUSES, f"{what}: status {status}: {data[:300]!r}"
    assert headers.get("content-type", "").startswith("application/json"), what
    assert headers.get("x-amzn-requestid"), what
    body = json.loads(data)  # every reply is JSON
    assert isinstance(body, dict), f"{what}: {data[:200]!r}"
    if status != 200:
        kind = headers.get("x-amzn-errortype", "").split(":")[0]
        assert kind in REST_ERROR_TYPES, f"{what}: {status} with x-amzn-ErrorType {kind!r}"
        assert isinstance(body.get("message"), str) and body["message"], what


# -- the fuzz ----------------------------------------------------------------------------------------

def test_fuzz_mqtt_and_rest(mosquitto: Any, jobsd: Any) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    iot = jobsd.iot
    for name in FUZZ_THINGS + [KEEP_THING]:
        iot.create_thing(thingName=name)
    for n, job in enumerate(FUZZ_JOBS):
        iot.create_job(jobId=job, targets=[arn(t) for t in FUZZ_THINGS[: 1 + n % 3]],
                       document=json.dumps({"op": "fuzz", "n": n}))
    iot.create_job(jobId=KEEP_JOB, targets=[arn(KEEP_THING)], document='{"op": "keep"}')

    wire = Wire(mosquitto.port)
    try:
        # -- MQTT ------------------------------------------------------------------------------
        sent: list[tuple[str, bytes]] = []
        barrier_topic = "$aws/things/fz-barrier/jobs/get"
        for start in range(0, MQTT_REQUESTS, BATCH):
            for i in range(start, min(start + BATCH, MQTT_REQUESTS)):
                topic, payload = mqtt_request(rng, i)
                assert KEEP_THING not in topic
                sent.append((topic, payload))
                wire.publish(topic, payload)
            token = f"barrier-{start}"
            barrier = json.dumps({"clientToken": token}).encode()
            sent.append((barrier_topic, barrier))
            wire.publish(barrier_topic, barrier)
            assert wire.wait_reply(barrier_topic, token)["_outcome"] == "accepted"
        check_mqtt(sent, list(wire.messages))

        # -- REST ------------------------------------------------------------------------------
        counts: Counter[int] = Counter()
        for url, routes in ((jobsd.data_url, DATA_ROUTES), (jobsd.control_url, CONTROL_ROUTES)):
            conn = None
            for _ in range(REST_REQUESTS // 2):
                method, path, body = rest_request(rng, routes)
                assert KEEP_THING not in path and KEEP_JOB not in path
                status, headers, data, conn = http_call(url, method, path, body, conn)
                check_rest_reply(f"{method} {url}{path[:200]} body={body[:120]!r}",
                                 status, headers, data)
                counts[status] += 1
            assert conn is not None
            conn.close()
        if os.environ.get("JOBSD_FUZZ_STATS"):
            print("REST statuses:", dict(counts))
        assert counts[200] > 20 and counts[400] > 20 and counts[404] > 20, counts  # not all noise

        # -- afterwards: alive, nothing crashed inside, the earlier job still completes ---------
        assert jobsd.proc.alive()
        with open(jobsd.proc.log_path, errors="replace") as f:
            log = f.read()
        assert "Traceback" not in log, log[-3000:]
        started_next = wire.request(f"$aws/things/{KEEP_THING}/jobs/start-next", {})
        assert started_next["_outcome"] == "accepted", started_next
        assert started_next["execution"]["jobId"] == KEEP_JOB
        assert started_next["execution"]["status"] == "IN_PROGRESS"
        assert started_next["execution"]["jobDocument"] == {"op": "keep"}
        done = wire.request(f"$aws/things/{KEEP_THING}/jobs/{KEEP_JOB}/update",
                            {"status": "SUCCEEDED", "expectedVersion": 2})
        assert done["_outcome"] == "accepted", done
        execution = iot.describe_job_execution(jobId=KEEP_JOB, thingName=KEEP_THING)["execution"]
        assert execution["status"] == "SUCCEEDED" and execution["versionNumber"] == 3
        assert iot.describe_job(jobId=KEEP_JOB)["job"]["status"] == "COMPLETED"
    finally:
        wire.close()
    assert time.monotonic() - started < 20, "the fuzz must stay quick"


def check_mqtt(sent: list[tuple[str, bytes]], received: list[tuple[str, bytes]]) -> None:
    # everything received that is not one of our own publications came from jobsd
    ours = Counter(sent)
    from_jobsd: list[tuple[str, bytes]] = []
    for message in received:
        if ours[message] > 0:
            ours[message] -= 1
        else:
            from_jobsd.append(message)
    assert not +ours, f"own publications not seen back: {list(ours)[:3]}"

    replies: dict[Optional[str], list[tuple[str, str, dict[str, Any]]]] = {}
    for topic, payload in from_jobsd:
        body = json.loads(payload)  # jobsd only ever publishes JSON objects
        assert isinstance(body, dict)
        if topic.endswith(("/notify", "/notify-next")):
            assert "clientToken" not in body and isinstance(body["timestamp"], int)
            continue
        base, _, outcome = topic.rpartition("/")
        assert outcome in ("accepted", "rejected"), f"jobsd published on {topic}"
        token = body.get("clientToken")
        replies.setdefault(token, []).append((base, outcome, body))

    got_all = list(replies.values())
    untokened: Counter[str] = Counter()
    answered = 0
    for topic, payload in sent:
        token = token_of(payload)
        if not expects_reply(topic):
            assert token is None or token not in replies, f"{topic} must not be answered"
            continue
        answered += 1
        if token is None:
            untokened[topic] += 1
            continue
        got = replies.pop(token, [])
        assert len(got) == 1, f"{len(got)} replies to {topic} {payload[:200]!r}"
        base, outcome, body = got[0]
        assert base == topic, f"reply to {topic} came on {base}"
        check_reply(topic, payload, outcome, body)
    # requests without a usable clientToken: one token-less reply per request, on its topic
    leftover = replies.pop(None, [])
    assert not replies, f"replies nobody asked for: {list(replies)[:5]}"
    assert Counter(base for base, _, _ in leftover) == untokened
    for base, outcome, body in leftover:
        check_reply(base, None, outcome, body)
    assert answered >= 500, answered
    if os.environ.get("JOBSD_FUZZ_STATS"):
        codes = Counter(body.get("code", outcome) for _, outcome, body in
                        [r for rs in got_all for r in rs])
        print("MQTT replies by outcome/code:", dict(codes))


def check_reply(topic: str, payload: Optional[bytes], outcome: str, body: dict[str, Any]) -> None:
    what = f"{topic}: {json.dumps(body)[:300]}"
    assert isinstance(body.get("timestamp"), int), what
    api = api_of(topic)
    if outcome == "accepted":
        assert api is not None and "code" not in body, what
        if api == "get":
            assert isinstance(body["inProgressJobs"], list), what
            assert isinstance(body["queuedJobs"], list), what
        if "jobDocument" in body.get("execution", {}):
            assert isinstance(body["execution"]["jobDocument"], dict), what  # an object on MQTT
        return
    code = body.get("code")
    assert code in CODES and code != "InternalError", what
    assert isinstance(body.get("message"), str), what
    assert ("executionState" in body) == (code in ("InvalidStateTransition", "VersionMismatch")), \
        what
    if api is None:
        assert code == "InvalidTopic", what
    elif payload is not None:
        ok, parsed = parse_json(payload)
        if not ok:
            assert code == "InvalidJson", what
        elif not isinstance(parsed, dict):
            assert code in ("InvalidJson", "InvalidRequest"), what


# -- inputs that once broke jobsd (pinned here, outside the random mix above) -------------------------------

def test_execution_number_out_of_range(mosquitto: Any, jobsd: Any) -> None:
    jobsd.iot.create_thing(thingName="fz-a")
    jobsd.iot.create_job(jobId="fz-j1", targets=[arn("fz-a")], document="{}")
    huge = 2**64
    wire = Wire(mosquitto.port)
    try:
        for suffix, body in (("fz-j1/get", {"executionNumber": huge}),
                             ("fz-j1/update", {"status": "IN_PROGRESS", "executionNumber": huge})):
            reply = wire.request(f"$aws/things/fz-a/jobs/{suffix}", body)
            assert reply["_outcome"] == "rejected"
            assert reply["code"] in ("InvalidRequest", "ResourceNotFound"), reply
    finally:
        wire.close()
    for url, method, path, body in [
        (jobsd.data_url, "GET", f"/things/fz-a/jobs/fz-j1?executionNumber={huge}", b""),
        (jobsd.data_url, "POST", "/things/fz-a/jobs/fz-j1",
         json.dumps({"status": "IN_PROGRESS", "executionNumber": huge}).encode()),
        (jobsd.control_url, "GET", f"/things/fz-a/jobs/fz-j1?executionNumber={huge}", b""),
        (jobsd.control_url, "DELETE", f"/things/fz-a/jobs/fz-j1/executionNumber/{huge}", b""),
    ]:
        status, headers, data, conn = http_call(url, method, path, body)
        conn.close()
        check_rest_reply(f"{method} {path}", status, headers, data)
        assert status in (400, 404), (path, status, data)


def test_deeply_nested_json(mosquitto: Any, jobsd: Any) -> None:
    jobsd.iot.create_thing(thingName="fz-a")
    jobsd.iot.create_job(jobId="fz-j1", targets=[arn("fz-a")], document="{}")
    deep = nested(100_000)
    wire = Wire(mosquitto.port)
    try:
        topic = "$aws/things/fz-a/jobs/fz-j1/update"
        wire.publish(topic, deep)
        barrier = wire.request("$aws/things/fz-a/jobs/get", {})  # replies come in request order
        assert barrier["_outcome"] == "accepted"
        [reply] = [json.loads(p) for t, p in wire.messages if t == topic + "/rejected"]
        assert reply["code"] in ("InvalidJson", "InvalidRequest"), reply
    finally:
        wire.close()
    for url, method, path in [(jobsd.data_url, "POST", "/things/fz-a/jobs/fz-j1"),
                              (jobsd.control_url, "PUT", "/jobs/fz-deep")]:
        status, headers, data, conn = http_call(url, method, path, deep)
        conn.close()
        check_rest_reply(f"{method} {path}", status, headers, data)
        assert status == 400


def test_lone_surrogate_in_control_plane_strings(jobsd: Any) -> None:
    jobsd.iot.create_thing(thingName="fz-a")
    jobsd.iot.create_job(jobId="fz-j1", targets=[arn("fz-a")], document="{}")
    bad = "\ud800"
    for method, path, body in [
        ("PUT", "/jobs/fz-surrogate", {"targets": [arn("fz-a")], "document": "{}",
                                       "description": bad}),
        ("POST", "/things/fz-surrogate", {"thingTypeName": bad}),
        ("PUT", "/jobs/fz-j1/cancel", {"reasonCode": bad}),
        ("PUT", "/jobs/fz-j1/cancel", {"comment": bad}),
    ]:
        status, headers, data, conn = http_call(jobsd.control_url, method, path,
                                                json.dumps(body).encode())
        conn.close()
        check_rest_reply(f"{method} {path} {body}", status, headers, data)
        assert status == 400 and headers["x-amzn-errortype"] == "InvalidRequestException"


def test_http_errors_outside_routing_are_restjson(jobsd: Any) -> None:
    for url in (jobsd.data_url, jobsd.control_url):
        for method in ("OPTIONS", "TRACE", "FOO"):
            status, headers, data, conn = http_call(url, method, "/things/fz-a/jobs")
            conn.close()
            check_rest_reply(f"{method} {url}", status, headers, data)
        host, port = url[len("http://"):].split(":")
        for raw in (b"GET /things/" + b"a" * 70_000 + b"/jobs HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"GARBAGE\r\n\r\n"):
            with socket.create_connection((host, int(port)), timeout=TIMEOUT) as s:
                s.sendall(raw)
                s.shutdown(socket.SHUT_WR)
                chunks = []
                while chunk := s.recv(65536):
                    chunks.append(chunk)
            head, _, data = b"".join(chunks).partition(b"\r\n\r\n")
            assert b"x-amzn-errortype" in head.lower(), head
            json.loads(data)
