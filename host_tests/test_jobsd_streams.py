"""AWS IoT MQTT-based file delivery (streams) and minimal OTA updates in tools/jobsd: the control
plane through boto3 `iot`, DescribeStream / GetStream over MQTT in JSON and CBOR, every error
code, the ACL on the mutual-TLS listener, a restart, and hostile input. A real mosquitto and real
jobsd processes; a paho client plays the device.

Oracle: STREAMS.md (in ../shared/), section 11's scenarios 1-18 by number, and botocore's `iot`
model for the control plane. Where STREAMS.md marks a rule [infer], the test checks jobsd's
documented choice (streams.py's docstring, README).

No sleeps. To show that a request produced nothing more (no data after a rejection, no answer to
a forged reply) the device follows it with a marker request on the same connection and waits for
the marker's reply: the device subscribes at QoS 0, so jobsd's replies reach it in the order
jobsd published them, after those of every earlier request.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import random
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from collections.abc import Iterator

import boto3
import cbor2
import paho.mqtt.client as paho
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from iotjobs_host import stack
from iotjobs_host.stack import Jobsd

TIMEOUT = 10.0
REGION, ACCOUNT = "us-east-1", "123456789012"
PREFIX = f"arn:aws:iot:{REGION}:{ACCOUNT}"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/stream-reader"
OUT_OF_RANGE = "The data requested is out of the range of data available."
F1_SIZE, F2_SIZE = 10_000, 300 * 1024
FORMATS = ("json", "cbor")
CODES = {"InvalidTopic", "InvalidJson", "InvalidCbor", "InvalidRequest", "Unauthorized",
         "BlockSizeOutOfBounds", "OffsetOutOfBounds", "BlockCountLimitExceeded",
         "BlockBitmapLimitExceeded", "ResourceNotFound", "VersionMismatch", "ETagMismatch",
         "InternalError"}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def thing_arn(name: str) -> str:
    return f"{PREFIX}:thing/{name}"


def error_of(err: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    return (err.value.response["Error"]["Code"],
            err.value.response["ResponseMetadata"]["HTTPStatusCode"])


def unvalidated(url: str) -> Any:
    """A boto3 `iot` client that sends what it is given, so jobsd's own validation answers."""
    return boto3.client("iot", endpoint_url=url, region_name=REGION,
                        aws_access_key_id="local", aws_secret_access_key="local",
                        config=Config(retries={"max_attempts": 1}, parameter_validation=False))


def hooks(jobsd: Jobsd, **body: Any) -> dict[str, Any]:
    """jobsd's test hook (PUT /_jobsd/test-hooks, on with --test-hooks)."""
    host, port = jobsd.control_url[len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        conn.request("PUT", "/_jobsd/test-hooks", body=json.dumps(body).encode())
        reply = conn.getresponse()
        out = json.loads(reply.read())
        assert reply.status == 200, out
        return out
    finally:
        conn.close()


# -- processes and files ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """jobsd's --files: s3://fw/<key> is <files_dir>/fw/<key>."""
    root = tmp_path_factory.mktemp("stream-files")
    (root / "fw").mkdir()
    return root


JOBSD_FILES = "files_dir"
JOBSD_EXTRA = ["--test-hooks"]


@pytest.fixture(scope="module")
def broker(module_broker: stack.Mosquitto) -> stack.Mosquitto:
    return module_broker


@pytest.fixture(scope="module")
def jobsd(module_jobsd: Jobsd) -> Jobsd:
    """One jobsd for the module (conftest); each test works on fresh names."""
    return module_jobsd


def content(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def put_file(files_dir: Path, data: bytes) -> str:
    """A fresh object in bucket fw; returns its key."""
    key = f"{unique('obj')}.bin"
    (files_dir / "fw" / key).write_bytes(data)
    return key


def new_stream(jobsd: Jobsd, files_dir: Path, files: dict[int, bytes],
               description: Optional[str] = "firmware") -> tuple[str, dict[int, str]]:
    """A stream of the given contents; returns its id and the key of each fileId."""
    stream_id = unique("S")
    keys = {fid: put_file(files_dir, data) for fid, data in files.items()}
    extra = {} if description is None else {"description": description}
    out = jobsd.iot.create_stream(
        streamId=stream_id, roleArn=ROLE, **extra,
        files=[{"fileId": fid, "s3Location": {"bucket": "fw", "key": key}}
               for fid, key in keys.items()])
    assert out["streamId"] == stream_id and out["streamVersion"] == 1
    return stream_id, keys


@pytest.fixture
def f1_stream(jobsd: Jobsd, files_dir: Path) -> tuple[str, bytes]:
    data = content(F1_SIZE, 1)
    return new_stream(jobsd, files_dir, {0: data})[0], data


@pytest.fixture
def f2_stream(jobsd: Jobsd, files_dir: Path) -> tuple[str, bytes]:
    data = content(F2_SIZE, 2)
    return new_stream(jobsd, files_dir, {0: data})[0], data


# -- the device --------------------------------------------------------------------------------------

@dataclass
class Reply:
    topic: str
    kind: str          # description | data | rejected
    fmt: str
    body: dict[str, Any]
    raw: bytes


def encode(fmt: str, fields: dict[str, Any]) -> bytes:
    """A request as a device sends it: in JSON a bitmap given as bytes becomes "0x<hex>"."""
    if fmt == "cbor":
        return cbor2.dumps(fields)
    return json.dumps({k: ("0x" + v.hex() if k == "b" and isinstance(v, bytes) else v)
                       for k, v in fields.items()}).encode()


def decode(topic: str, raw: bytes) -> Reply:
    parts = topic.split("/")
    kind, fmt = parts[5], parts[6]
    if fmt == "cbor":
        # the real service frames every reply as an indefinite-length map (STREAMS.md 3.3)
        assert raw[:1] == b"\xbf" and raw[-1:] == b"\xff", raw[:40]
        body = cbor2.loads(raw)
    else:
        body = json.loads(raw)
    assert isinstance(body, dict)
    return Reply(topic, kind, fmt, body, raw)


class StreamDevice:
    """A paho MQTT 5 client on the plain listener, subscribed (QoS 0, as the FreeRTOS agent) to
    one thing's stream replies: description, data and rejected, for every stream and format."""

    def __init__(self, port: int, thing: str) -> None:
        self.thing = thing
        self.messages: list[paho.MQTTMessage] = []
        self._cond = threading.Condition()
        self._marks = 0
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=unique("dev"),
                                  protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(f"$aws/things/{thing}/streams/+/{kind}/+", SubscribeOptions(qos=0))
                               for kind in ("description", "data", "rejected")])
        assert subscribed.wait(TIMEOUT), "subscription not acknowledged"

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def topic(self, stream_id: str, verb: str, fmt: str) -> str:
        return f"$aws/things/{self.thing}/streams/{stream_id}/{verb}/{fmt}"

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(TIMEOUT)

    def exchange(self, topic: str, payload: bytes) -> list[Reply]:
        """Publish one request; return every reply it caused, in order (up to the marker)."""
        with self._cond:
            start = len(self.messages)
        self._marks += 1
        mark = f"mark-{self._marks}"
        self.publish(topic, payload)
        marker = self.topic("no-such-stream-marker", "describe", "json")
        self.publish(marker, json.dumps({"c": mark}).encode())
        rejected = marker.replace("/describe/", "/rejected/")
        deadline = time.monotonic() + TIMEOUT
        with self._cond:
            while True:
                for i, msg in enumerate(self.messages[start:], start):
                    if msg.topic == rejected and json.loads(msg.payload).get("c") == mark:
                        return [decode(m.topic, m.payload) for m in self.messages[start:i]]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no marker reply within {TIMEOUT}s; saw "
                                         f"{[m.topic for m in self.messages[start:]]}")
                self._cond.wait(left)

    def wait_for(self, pred: Any) -> int:
        """The index of the first message satisfying pred."""
        deadline = time.monotonic() + TIMEOUT
        with self._cond:
            while True:
                for i, msg in enumerate(self.messages):
                    if pred(msg):
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no such message within {TIMEOUT}s; saw "
                                         f"{[m.topic for m in self.messages]}")
                self._cond.wait(left)

    def get(self, stream_id: str, fmt: str, **fields: Any) -> list[Reply]:
        return self.exchange(self.topic(stream_id, "get", fmt), encode(fmt, fields))

    def describe(self, stream_id: str, fmt: str, **fields: Any) -> list[Reply]:
        return self.exchange(self.topic(stream_id, "describe", fmt), encode(fmt, fields))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def device(broker: stack.Mosquitto, jobsd: Jobsd) -> Iterator[StreamDevice]:
    dev = StreamDevice(broker.port, unique("thing"))
    try:
        yield dev
    finally:
        dev.close()


def payload_of(reply: Reply) -> bytes:
    p = reply.body["p"]
    if reply.fmt == "json":
        assert isinstance(p, str)
        return base64.b64decode(p, validate=True)
    assert isinstance(p, bytes)
    return p


def blocks(replies: list[Reply]) -> list[int]:
    assert all(r.kind == "data" for r in replies), [(r.kind, r.body) for r in replies]
    return [r.body["i"] for r in replies]


def check_data(replies: list[Reply], data: bytes, block: int, file_id: int = 0,
               token: Optional[str] = None) -> None:
    """Every data message: keys c (iff sent), f, l, i, p; l = len(p); p = the file's bytes at
    i * block."""
    for r in replies:
        assert r.kind == "data", r.body
        want = {"f", "l", "i", "p"} | ({"c"} if token is not None else set())
        assert set(r.body) == want, r.body.keys()
        assert r.body.get("c") == token and r.body["f"] == file_id
        p = payload_of(r)
        i = r.body["i"]
        assert r.body["l"] == len(p) == len(data[i * block:(i + 1) * block]) > 0
        assert p == data[i * block:(i + 1) * block]


def rejected(replies: list[Reply], code: str, token: Optional[str] = None,
             message: Optional[str] = None) -> dict[str, Any]:
    """Exactly one reply, a rejection of the given code, in the dual-key shape (scenario 14)."""
    assert len(replies) == 1, [(r.kind, r.body) for r in replies]
    (r,) = replies
    assert r.kind == "rejected", r.body
    body = r.body
    assert body["o"] == body["code"] == code, body
    assert body["m"] == body["message"] and isinstance(body["m"], str) and body["m"], body
    if token is None:
        assert "c" not in body and "clientToken" not in body, body
        assert set(body) == {"o", "code", "m", "message"}
    else:
        assert body["c"] == body["clientToken"] == token, body
        assert set(body) == {"o", "code", "m", "message", "c", "clientToken"}
    if message is not None:
        assert body["m"] == message
    return body


# -- scenarios 1-15: the device API ---------------------------------------------------------------

def test_01_cbor_freertos_style(device: StreamDevice, f1_stream: tuple[str, bytes]) -> None:
    stream_id, data = f1_stream
    bitmap = 0b111
    got = bytearray(F1_SIZE)
    seen = []
    for _ in range(3):
        replies = device.get(stream_id, "cbor", c="rdy", f=0, l=4096, o=0,
                             b=bytes([bitmap]), n=1)
        check_data(replies, data, 4096, token="rdy")
        (r,) = replies
        i = r.body["i"]
        seen.append((i, r.body["l"]))
        got[i * 4096:i * 4096 + r.body["l"]] = payload_of(r)
        bitmap &= ~(1 << i)
    assert seen == [(0, 4096), (1, 4096), (2, 1808)]
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    # the framing of the capture in STREAMS.md 3.3: bf, c, f, i, l, p, ff
    raw = device.get(stream_id, "cbor", c="rdy", f=0, l=4096, o=0, b=b"\x01", n=1)[0].raw
    assert raw[:16] == bytes.fromhex("bf616363726479616600616900616c19")
    assert len(raw) == 4120


def test_02_json_sequential(device: StreamDevice, f1_stream: tuple[str, bytes]) -> None:
    stream_id, data = f1_stream
    for k in range(10):
        replies = device.get(stream_id, "json", s=1, f=0, l=1024, o=k, n=1)
        check_data(replies, data, 1024)
        assert blocks(replies) == [k]
        assert len(payload_of(replies[0])) == (784 if k == 9 else 1024)
    # the documented JSON shape, key order included
    raw = device.get(stream_id, "json", c="rdy", f=0, l=1024, o=0, n=1)[0].raw
    assert raw.startswith(b'{"c":"rdy","f":0,"l":1024,"i":0,"p":"')


@pytest.mark.parametrize("fmt", FORMATS)
def test_03_multi_block(device: StreamDevice, f2_stream: tuple[str, bytes], fmt: str) -> None:
    stream_id, data = f2_stream
    replies = device.get(stream_id, fmt, f=0, l=1024, o=0, n=8)
    check_data(replies, data, 1024)
    assert blocks(replies) == list(range(8))


@pytest.mark.parametrize("fmt", FORMATS)
def test_04_128k_cap(device: StreamDevice, f2_stream: tuple[str, bytes], fmt: str) -> None:
    stream_id, data = f2_stream
    replies = device.get(stream_id, fmt, f=0, l=32768, n=5)
    check_data(replies, data, 32768)
    assert blocks(replies) == [0, 1, 2, 3]
    replies = device.get(stream_id, fmt, f=0, l=32768, o=4, n=1)
    check_data(replies, data, 32768)
    assert blocks(replies) == [4]


@pytest.mark.parametrize("fmt", FORMATS)
def test_05_docs_bitmap(device: StreamDevice, f2_stream: tuple[str, bytes], fmt: str) -> None:
    stream_id, data = f2_stream
    replies = device.get(stream_id, fmt, c="1", s=1, f=0, l=256, o=20, n=32, b=b"\x13\x00\x80")
    check_data(replies, data, 256, token="1")
    assert blocks(replies) == [20, 21, 24, 43]


def test_05_docs_bitmap_golden_cbor_bytes(device: StreamDevice, jobsd: Jobsd,
                                          files_dir: Path) -> None:
    """STREAMS.md 3.2's exact CBOR request (file id 1, a definite 7-entry map)."""
    data = content(F2_SIZE, 5)
    stream_id, _ = new_stream(jobsd, files_dir, {1: data})
    request = bytes.fromhex("a7 61 63 61 31 61 73 01 61 66 01 61 6c 19 01 00 61 6f 14 61 6e 18 20"
                            " 61 62 43 13 00 80")
    assert cbor2.loads(request) == {"c": "1", "s": 1, "f": 1, "l": 256, "o": 20, "n": 32,
                                    "b": b"\x13\x00\x80"}
    replies = device.exchange(device.topic(stream_id, "get", "cbor"), request)
    check_data(replies, data, 256, file_id=1, token="1")
    assert blocks(replies) == [20, 21, 24, 43]


@pytest.mark.parametrize("fmt", FORMATS)
def test_06_n_caps_bitmap(device: StreamDevice, f2_stream: tuple[str, bytes], fmt: str) -> None:
    stream_id, data = f2_stream
    bitmap = bytes([0b10100101, 0b01011011, 0b00000001])
    wanted = [j for j in range(24) if bitmap[j >> 3] & (1 << (j & 7))]
    assert len(wanted) == 10
    replies = device.get(stream_id, fmt, f=0, l=1024, o=100, n=3, b=bitmap)
    check_data(replies, data, 1024)
    assert blocks(replies) == [100 + j for j in wanted[:3]]


@pytest.mark.parametrize("fmt", FORMATS)
def test_07_block_size_bounds(device: StreamDevice, f2_stream: tuple[str, bytes],
                              fmt: str) -> None:
    stream_id, data = f2_stream
    for size in (255, 131073, 0, -1):
        rejected(device.get(stream_id, fmt, c="t7", f=0, l=size, o=0, n=1),
                 "BlockSizeOutOfBounds", "t7")
    for size in (256, 131072):
        replies = device.get(stream_id, fmt, c="t7", f=0, l=size, o=1, n=1)
        check_data(replies, data, size, token="t7")
        assert blocks(replies) == [1]


@pytest.mark.parametrize("fmt", FORMATS)
def test_08_unknown_file_or_stream(device: StreamDevice, f1_stream: tuple[str, bytes],
                                   fmt: str) -> None:
    stream_id, _ = f1_stream
    rejected(device.get(stream_id, fmt, c="t8", f=7, l=1024, o=0, n=1), "ResourceNotFound", "t8")
    rejected(device.get(stream_id, fmt, c="t8", f=256, l=1024, o=0, n=1), "ResourceNotFound",
             "t8")
    replies = device.get("nope", fmt, c="t8", f=0, l=1024, o=0, n=1)
    rejected(replies, "ResourceNotFound", "t8")
    assert replies[0].topic == device.topic("nope", "rejected", fmt)
    rejected(device.describe("nope", fmt, c="t8"), "ResourceNotFound", "t8")


@pytest.mark.parametrize("fmt", FORMATS)
def test_09_stale_version(device: StreamDevice, jobsd: Jobsd, files_dir: Path, fmt: str) -> None:
    old, new = content(F1_SIZE, 9), content(F1_SIZE, 10)
    stream_id, keys = new_stream(jobsd, files_dir, {0: old})
    check_data(device.get(stream_id, fmt, s=1, f=0, l=4096, o=0, n=1), old, 4096)
    (files_dir / "fw" / keys[0]).write_bytes(new)
    assert jobsd.iot.update_stream(streamId=stream_id, description="v2")["streamVersion"] == 2
    rejected(device.get(stream_id, fmt, c="t9", s=1, f=0, l=4096, o=0, n=1), "VersionMismatch",
             "t9")
    replies = device.get(stream_id, fmt, f=0, l=4096, o=0, n=3)
    check_data(replies, new, 4096)
    assert blocks(replies) == [0, 1, 2]
    check_data(device.get(stream_id, fmt, s=2, f=0, l=4096, o=2, n=1), new, 4096)
    (r,) = device.describe(stream_id, fmt)
    assert (r.kind, r.body["s"], r.body["d"]) == ("description", 2, "v2")


@pytest.mark.parametrize("fmt", FORMATS)
def test_10_token_length(device: StreamDevice, f1_stream: tuple[str, bytes], fmt: str) -> None:
    stream_id, data = f1_stream
    rejected(device.get(stream_id, fmt, c="x" * 65, f=0, l=4096, o=0, n=1), "InvalidRequest")
    rejected(device.get(stream_id, fmt, c="é" * 33, f=0, l=4096, o=0, n=1), "InvalidRequest")
    rejected(device.describe(stream_id, fmt, c="x" * 65), "InvalidRequest")
    token = "y" * 64
    check_data(device.get(stream_id, fmt, c=token, f=0, l=4096, o=0, n=1), data, 4096,
               token=token)
    (r,) = device.describe(stream_id, fmt, c=token)
    assert r.kind == "description" and r.body["c"] == token


def test_11_malformed(device: StreamDevice, f1_stream: tuple[str, bytes]) -> None:
    stream_id, _ = f1_stream
    get_json, get_cbor = (device.topic(stream_id, "get", f) for f in FORMATS)
    rejected(device.exchange(get_json, b"{f:0"), "InvalidJson")
    rejected(device.exchange(get_json, b'{"f":0'), "InvalidJson")
    rejected(device.exchange(get_json, b"[1, 2]"), "InvalidJson")
    rejected(device.exchange(get_json, b"\xff\xfe"), "InvalidJson")
    rejected(device.exchange(get_cbor, b"\xff\x00"), "InvalidCbor")
    rejected(device.exchange(get_cbor, cbor2.dumps([1, 2])), "InvalidCbor")
    rejected(device.exchange(get_cbor, cbor2.dumps({"f": 0, "l": 1024}) + b"\x00"), "InvalidCbor")
    rejected(device.exchange(get_cbor, bytes.fromhex("bf6166")), "InvalidCbor")  # cut short
    for fmt in FORMATS:
        rejected(device.get(stream_id, fmt, c="t11", f="0", l=1024, o=0, n=1), "InvalidRequest",
                 "t11")
        rejected(device.get(stream_id, fmt, c="t11", f=0, o=0, n=1), "InvalidRequest", "t11")
        rejected(device.get(stream_id, fmt, c="t11", l=1024, o=0, n=1), "InvalidRequest", "t11")
        rejected(device.get(stream_id, fmt, c="t11", f=0, l=1024.0, n=1), "InvalidRequest",
                 "t11")
        rejected(device.get(stream_id, fmt, c="t11", f=True, l=1024, n=1), "InvalidRequest",
                 "t11")
        rejected(device.get(stream_id, fmt, c="t11", f=0, l=1024, n="1"), "InvalidRequest", "t11")
        rejected(device.get(stream_id, fmt, c="t11", s="1", f=0, l=1024, n=1), "InvalidRequest",
                 "t11")
        rejected(device.get(stream_id, fmt, c=5, f=0, l=1024, n=1), "InvalidRequest")
    # a CBOR bitmap as a text string (aws-iot-mqtt-download-agent#3): InvalidCbor, no token
    rejected(device.exchange(get_cbor, cbor2.dumps({"c": "t11", "f": 0, "l": 1024, "n": 1,
                                                    "b": "0x07"})), "InvalidCbor")
    # a JSON bitmap that is not a hex string
    for bad in ("0x7", "zz", [7], 7):
        rejected(device.exchange(get_json, json.dumps({"c": "t11", "f": 0, "l": 1024, "n": 1,
                                                       "b": bad}).encode()),
                 "InvalidRequest", "t11")


def test_11_json_bitmap_spellings(device: StreamDevice, f2_stream: tuple[str, bytes]) -> None:
    """[infer] choice: with or without 0x, either case."""
    stream_id, _ = f2_stream
    topic = device.topic(stream_id, "get", "json")
    for spelling in ("0x130080", "130080", "0X130080"):
        replies = device.exchange(topic, json.dumps({"f": 0, "l": 256, "o": 20, "n": 32,
                                                     "b": spelling}).encode())
        assert blocks(replies) == [20, 21, 24, 43], spelling
    replies = device.exchange(topic, json.dumps({"f": 0, "l": 256, "o": 0, "n": 32,
                                                 "b": "0xfF"}).encode())
    assert blocks(replies) == list(range(8))


@pytest.mark.parametrize("fmt", FORMATS)
def test_12_past_end_of_file(device: StreamDevice, jobsd: Jobsd, f1_stream: tuple[str, bytes],
                             fmt: str) -> None:
    stream_id, data = f1_stream
    rejected(device.get(stream_id, fmt, c="t12", f=0, l=4096, o=3, n=1), "InvalidRequest", "t12",
             OUT_OF_RANGE)
    rejected(device.get(stream_id, fmt, c="t12", f=0, l=4096, o=0, b=b"\x0f", n=4),
             "InvalidRequest", "t12", OUT_OF_RANGE)
    rejected(device.get(stream_id, fmt, c="t12", f=0, l=4096, o=1, b=b"\x04", n=1),
             "InvalidRequest", "t12", OUT_OF_RANGE)
    # strict (the default): no n, the implied 32 blocks run past the 3 of the file
    rejected(device.get(stream_id, fmt, c="t12", f=0, l=4096, o=0, b=b"\x07"),
             "InvalidRequest", "t12", OUT_OF_RANGE)
    rejected(device.get(stream_id, fmt, f=0, l=4096), "InvalidRequest", None, OUT_OF_RANGE)
    # an explicit n past the end is clamped
    replies = device.get(stream_id, fmt, f=0, l=4096, o=0, b=b"\x07", n=8)
    check_data(replies, data, 4096)
    assert blocks(replies) == [0, 1, 2]
    assert blocks(device.get(stream_id, fmt, f=0, l=4096, o=1, n=50)) == [1, 2]
    # n = 0 and an empty bitmap are valid and send nothing
    assert device.get(stream_id, fmt, f=0, l=4096, o=0, n=0) == []
    assert device.get(stream_id, fmt, f=0, l=4096, o=0, b=b"\x00\x00", n=2) == []
    # clamp mode: the no-n request is served up to the end
    assert hooks(jobsd, streamStrictEof=False)["streamStrictEof"] is False
    try:
        assert blocks(device.get(stream_id, fmt, f=0, l=4096, o=0, b=b"\x07")) == [0, 1, 2]
        assert blocks(device.get(stream_id, fmt, f=0, l=4096, o=1)) == [1, 2]
        rejected(device.get(stream_id, fmt, f=0, l=4096, o=3), "InvalidRequest", None,
                 OUT_OF_RANGE)
    finally:
        hooks(jobsd, streamStrictEof=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_13_quotas(device: StreamDevice, f2_stream: tuple[str, bytes], fmt: str) -> None:
    stream_id, data = f2_stream
    rejected(device.get(stream_id, fmt, c="q", f=0, l=256, o=98305, n=1), "OffsetOutOfBounds",
             "q")
    rejected(device.get(stream_id, fmt, c="q", f=0, l=256, o=-1, n=1), "OffsetOutOfBounds", "q")
    rejected(device.get(stream_id, fmt, c="q", f=0, l=256, o=0, n=98305),
             "BlockCountLimitExceeded", "q")
    rejected(device.get(stream_id, fmt, c="q", f=0, l=256, o=0, n=1, b=b"\x01" * 12288),
             "BlockBitmapLimitExceeded", "q")
    # 98,304 is in range: an offset past this file's end is out of its range, not of bounds
    rejected(device.get(stream_id, fmt, c="q", f=0, l=256, o=98304, n=1), "InvalidRequest", "q",
             OUT_OF_RANGE)
    # the largest bitmap allowed, all bits clear but the first
    replies = device.get(stream_id, fmt, f=0, l=256, o=0, n=1, b=b"\x01" + b"\x00" * 12286)
    check_data(replies, data, 256)
    assert blocks(replies) == [0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_15_describe(device: StreamDevice, jobsd: Jobsd, files_dir: Path, fmt: str) -> None:
    data = content(F1_SIZE, 15)
    stream_id, _ = new_stream(jobsd, files_dir, {0: data, 3: b"x" * 51200}, description="fw v2")
    (r,) = device.describe(stream_id, fmt)
    assert r.kind == "description" and r.topic == device.topic(stream_id, "description", fmt)
    assert r.body == {"s": 1, "d": "fw v2", "r": [{"f": 0, "z": F1_SIZE}, {"f": 3, "z": 51200}]}
    (r,) = device.describe(stream_id, fmt, c="x")
    assert r.body["c"] == "x" and r.body["s"] == 1
    (r,) = device.exchange(device.topic(stream_id, "describe", fmt), b"")
    assert r.kind == "description" and "c" not in r.body
    bare, _ = new_stream(jobsd, files_dir, {0: data}, description=None)
    (r,) = device.describe(bare, fmt)
    assert r.body == {"s": 1, "d": "", "r": [{"f": 0, "z": F1_SIZE}]}


def test_every_documented_error_code_is_reachable(device: StreamDevice, jobsd: Jobsd,
                                                  files_dir: Path) -> None:
    """STREAMS.md 3.5, the complete list, in both formats where the format matters."""
    seen: set[str] = set()

    def expect(replies: list[Reply], code: str, token: Optional[str] = "e") -> None:
        rejected(replies, code, token)
        seen.add(code)

    data = content(F1_SIZE, 99)
    stream_id, keys = new_stream(jobsd, files_dir, {0: data, 1: data, 2: data})
    for fmt in FORMATS:
        expect(device.exchange(device.topic(stream_id, "fetch", fmt), b"{}"), "InvalidTopic", None)
        expect(device.get(stream_id, fmt, c="e", f="0", l=256), "InvalidRequest")
        expect(device.get(stream_id, fmt, c="e", f=0, l=128, n=1), "BlockSizeOutOfBounds")
        expect(device.get(stream_id, fmt, c="e", f=0, l=256, o=10**5, n=1), "OffsetOutOfBounds")
        expect(device.get(stream_id, fmt, c="e", f=0, l=256, n=10**5), "BlockCountLimitExceeded")
        expect(device.get(stream_id, fmt, c="e", f=0, l=256, n=1, b=bytes(20000)),
               "BlockBitmapLimitExceeded")
        expect(device.get(stream_id, fmt, c="e", f=9, l=256, n=1), "ResourceNotFound")
        expect(device.get(stream_id, fmt, c="e", s=7, f=0, l=256, n=1), "VersionMismatch")
    expect(device.exchange(device.topic(stream_id, "get", "json"), b"{"), "InvalidJson", None)
    expect(device.exchange(device.topic(stream_id, "get", "cbor"), b"\xff"), "InvalidCbor", None)
    # the object changed after the stream recorded it (same size, other bytes): ETagMismatch
    # until an UpdateStream records the new content
    (files_dir / "fw" / keys[0]).write_bytes(content(F1_SIZE, 100))
    for fmt in FORMATS:
        expect(device.get(stream_id, fmt, c="e", f=0, l=4096, n=1), "ETagMismatch")
    # the object is gone: ResourceNotFound; unreadable (a folder now): Unauthorized
    (files_dir / "fw" / keys[1]).unlink()
    expect(device.get(stream_id, "json", c="e", f=1, l=4096, n=1), "ResourceNotFound")
    os.remove(files_dir / "fw" / keys[2])
    (files_dir / "fw" / keys[2]).mkdir()
    expect(device.get(stream_id, "cbor", c="e", f=2, l=4096, n=1), "Unauthorized")
    # the fault-injection switch
    hooks(jobsd, streamFault="InternalError")
    try:
        for fmt in FORMATS:
            expect(device.get(stream_id, fmt, c="e", f=0, l=4096, n=1), "InternalError")
            expect(device.describe(stream_id, fmt, c="e"), "InternalError")
    finally:
        assert hooks(jobsd, streamFault=None)["streamFault"] is None
    assert seen == CODES
    # repaired: the file again as recorded is served; a fresh version serves the new bytes
    (files_dir / "fw" / keys[0]).write_bytes(data)
    check_data(device.get(stream_id, "json", f=0, l=4096, o=0, n=3), data, 4096)
    (files_dir / "fw" / keys[0]).write_bytes(content(F1_SIZE, 100))
    (files_dir / "fw" / keys[1]).write_bytes(data)
    shutil.rmtree(files_dir / "fw" / keys[2])
    (files_dir / "fw" / keys[2]).write_bytes(data)
    assert jobsd.iot.update_stream(streamId=stream_id)["streamVersion"] == 2
    check_data(device.get(stream_id, "cbor", s=2, f=0, l=4096, o=0, n=3),
               content(F1_SIZE, 100), 4096)


def test_topics_that_are_not_requests_are_ignored(device: StreamDevice,
                                                  f1_stream: tuple[str, bytes]) -> None:
    """Replies published by anyone else (forgeries) get no answer; a request with an unknown
    verb or format is InvalidTopic (on rejected/json unless the format is cbor)."""
    stream_id, _ = f1_stream
    base = f"$aws/things/{device.thing}/streams/{stream_id}/"
    for suffix in ("data/json", "data/cbor", "description/json", "rejected/cbor",
                   "rejected/json/extra"):
        forged = b"\xbf\x61f\x00\xff" if suffix.endswith("cbor") else b'{"f":0,"l":1024,"n":1}'
        replies = device.exchange(base + suffix, forged)
        # the device sees its own forgery (it is subscribed there) and nothing from jobsd
        assert [r.topic for r in replies] == ([base + suffix] if suffix.count("/") == 1 else [])
    replies = device.exchange(base + "get/xml", b'{"f":0,"l":1024,"n":1}')
    rejected(replies, "InvalidTopic")
    assert replies[0].topic == base + "rejected/json"
    replies = device.exchange(base + "get", b'{"c":"z"}')
    rejected(replies, "InvalidTopic")
    replies = device.exchange(base + "fetch/cbor", cbor2.dumps({"c": "z"}))
    rejected(replies, "InvalidTopic")
    assert replies[0].topic == base + "rejected/cbor"
    replies = device.exchange(f"$aws/things/{device.thing}/streams/bad.id/get/json",
                              b'{"f":0,"l":1024,"n":1}')
    rejected(replies, "InvalidTopic")


# -- scenario 16: each thing on its own topics (the TLS listener, the generated ACL) -------------

def test_acl_file_has_the_streams_topics(broker: stack.Mosquitto) -> None:
    with open(os.path.join(os.path.dirname(broker.conf), "things.acl")) as f:
        acl = f.read().splitlines()
    prefix = "$aws/things/%u/streams/+/"
    streams = [line for line in acl if "/streams/" in line]
    assert sorted(streams) == sorted([f"pattern write {prefix}describe/+",
                                      f"pattern write {prefix}get/+",
                                      f"pattern read {prefix}description/+",
                                      f"pattern read {prefix}data/+",
                                      f"pattern read {prefix}rejected/+"])


def test_16_isolation_on_the_tls_listener(broker: stack.Mosquitto, pki: Any, jobsd: Jobsd,
                                          f1_stream: tuple[str, bytes]) -> None:
    from test_acl import TlsThing

    stream_id, data = f1_stream
    a_name, b_name = unique("tls-a"), unique("tls-b")
    wire = StreamDevice(broker.port, "+")  # plain listener: sees every thing's replies
    a, b = TlsThing(broker, pki, a_name), TlsThing(broker, pki, b_name)
    try:
        def topic(thing: str, suffix: str) -> str:
            return f"$aws/things/{thing}/streams/{stream_id}/{suffix}"

        for suffix in ("data/json", "rejected/json", "description/json", "data/+", "rejected/+"):
            assert a.subscribe(topic(a_name, suffix)) == 1, suffix
        for t in (topic(b_name, "data/json"), f"$aws/things/{b_name}/streams/#",
                  "$aws/things/+/streams/+/data/json", topic(a_name, "get/json"),
                  topic(a_name, "+/cbor")):
            rc = a.subscribe(t)
            assert rc in (0x80, 1), (t, rc)  # refused, or granted and delivers nothing
        assert b.subscribe(topic(b_name, "data/json")) == 1
        # a publishes on b's request topic and forges its own data: the broker drops both
        a.publish(topic(b_name, "get/json"), b'{"c":"stolen","f":0,"l":4096,"n":1}')
        a.publish(topic(a_name, "data/json"), b'{"f":0,"l":1,"i":0,"p":"AA=="}')
        a.publish(topic(a_name, "get/json"), b'{"c":"mine","f":0,"l":4096,"o":1,"n":1}')
        got_topic, payload = a.next_message()
        assert got_topic == topic(a_name, "data/json")
        body = json.loads(payload)
        assert (body["c"], body["i"]) == ("mine", 1)
        assert base64.b64decode(body["p"]) == data[4096:8192]
        # the wire (subscribed to every thing) sees a's reply; b's data, had jobsd got the
        # stolen request, or a's forgery, had the broker taken it, would have come before it
        index = wire.wait_for(lambda m: m.topic == topic(a_name, "data/json"))
        seen = [(m.topic, json.loads(m.payload)) for m in wire.messages[:index + 1]]
        assert [t for t, _ in seen] == [topic(a_name, "data/json")], seen
        assert seen[0][1]["c"] == "mine"
        assert b.inbox.empty()
    finally:
        a.close()
        b.close()
        wire.close()


# -- scenario 17: the control plane -------------------------------------------------------------

def test_17_control_plane(jobsd: Jobsd, files_dir: Path, device: StreamDevice) -> None:
    iot = jobsd.iot
    key = put_file(files_dir, content(F1_SIZE, 17))
    loc = {"bucket": "fw", "key": key}
    stream_id = unique("S17")
    created = iot.create_stream(streamId=stream_id, description="d1", roleArn=ROLE,
                                files=[{"fileId": 0, "s3Location": loc}],
                                tags=[{"Key": "team", "Value": "fw"}])
    assert {k: v for k, v in created.items() if k != "ResponseMetadata"} == {
        "streamId": stream_id, "streamArn": f"{PREFIX}:stream/{stream_id}",
        "description": "d1", "streamVersion": 1}
    info = iot.describe_stream(streamId=stream_id)["streamInfo"]
    assert info["streamId"] == stream_id and info["streamVersion"] == 1
    assert info["files"] == [{"fileId": 0, "s3Location": loc}] and info["roleArn"] == ROLE
    assert info["createdAt"] == info["lastUpdatedAt"]
    with pytest.raises(ClientError) as err:
        iot.create_stream(streamId=stream_id, roleArn=ROLE, files=[{"fileId": 0,
                                                                    "s3Location": loc}])
    assert error_of(err) == ("ResourceAlreadyExistsException", 409)
    assert err.value.response["resourceId"] == stream_id
    # updates: each adds one to the version; files replaced when given
    other = put_file(files_dir, content(5000, 18))
    up = iot.update_stream(streamId=stream_id, files=[{"fileId": 4, "s3Location": {
        "bucket": "fw", "key": other, "version": "v7"}}])
    assert (up["streamVersion"], up["description"]) == (2, "d1")
    assert iot.update_stream(streamId=stream_id, description="d3")["streamVersion"] == 3
    info = iot.describe_stream(streamId=stream_id)["streamInfo"]
    assert info["files"] == [{"fileId": 4, "s3Location": {"bucket": "fw", "key": other,
                                                           "version": "v7"}}]
    assert info["description"] == "d3" and info["lastUpdatedAt"] >= info["createdAt"]
    (r,) = device.describe(stream_id, "json")
    assert r.body == {"s": 3, "d": "d3", "r": [{"f": 4, "z": 5000}]}
    # not found
    missing = unique("missing")
    for call in (lambda: iot.describe_stream(streamId=missing),
                 lambda: iot.update_stream(streamId=missing, description="x"),
                 lambda: iot.delete_stream(streamId=missing),
                 lambda: iot.create_stream(streamId=missing, roleArn=ROLE, files=[
                     {"fileId": 0, "s3Location": {"bucket": "fw", "key": "no-such-key"}}])):
        with pytest.raises(ClientError) as err:
            call()
        assert error_of(err) == ("ResourceNotFoundException", 404)
    # delete: then the device gets ResourceNotFound and the id is free again
    iot.delete_stream(streamId=stream_id)
    rejected(device.get(stream_id, "json", c="g", f=4, l=1024, n=1), "ResourceNotFound", "g")
    with pytest.raises(ClientError) as err:
        iot.describe_stream(streamId=stream_id)
    assert error_of(err) == ("ResourceNotFoundException", 404)
    assert iot.create_stream(streamId=stream_id, roleArn=ROLE, files=[
        {"fileId": 0, "s3Location": loc}])["streamVersion"] == 1


def test_17_control_plane_validation(jobsd: Jobsd, files_dir: Path) -> None:
    raw = unvalidated(jobsd.control_url)
    key = put_file(files_dir, b"abc")
    good = {"fileId": 0, "s3Location": {"bucket": "fw", "key": key}}
    cases: list[tuple[str, dict[str, Any], str, int]] = [
        ("51 files", {"files": [dict(good, fileId=i) for i in range(51)]},
         "InvalidRequestException", 400),
        ("fileId 256", {"files": [dict(good, fileId=256)]}, "InvalidRequestException", 400),
        ("fileId -1", {"files": [dict(good, fileId=-1)]}, "InvalidRequestException", 400),
        ("fileId string", {"files": [dict(good, fileId="0")]}, "InvalidRequestException", 400),
        ("duplicate fileId", {"files": [good, good]}, "InvalidRequestException", 400),
        ("no files", {"files": []}, "InvalidRequestException", 400),
        ("files missing", {"files": None}, "InvalidRequestException", 400),
        ("no s3Location", {"files": [{"fileId": 0}]}, "InvalidRequestException", 400),
        ("empty key", {"files": [{"fileId": 0, "s3Location": {"bucket": "fw", "key": ""}}]},
         "InvalidRequestException", 400),
        ("traversal", {"files": [{"fileId": 0, "s3Location": {"bucket": "fw",
                                                              "key": "../../etc/passwd"}}]},
         "InvalidRequestException", 400),
        ("short roleArn", {"roleArn": "arn:short"}, "InvalidRequestException", 400),
        ("no roleArn", {"roleArn": None}, "InvalidRequestException", 400),
        ("control char", {"description": "a\nb"}, "InvalidRequestException", 400),
        ("long description", {"description": "d" * 2029}, "InvalidRequestException", 400),
    ]
    for name, change, code, status in cases:
        args: dict[str, Any] = {"streamId": unique("V"), "roleArn": ROLE, "files": [good]}
        args.update(change)
        args = {k: v for k, v in args.items() if v is not None}
        with pytest.raises(ClientError) as err:
            raw.create_stream(**args)
        assert error_of(err) == (code, status), name
    for bad in ("bad.id", "s" * 129):
        with pytest.raises(ClientError) as err:
            raw.create_stream(streamId=bad, roleArn=ROLE, files=[good])
        assert error_of(err) == ("InvalidRequestException", 400), bad
    stream_id = unique("V")
    raw.create_stream(streamId=stream_id, roleArn=ROLE, files=[good])
    with pytest.raises(ClientError) as err:
        raw.update_stream(streamId=stream_id, files=[dict(good, fileId=i) for i in range(51)])
    assert error_of(err) == ("InvalidRequestException", 400)
    assert jobsd.iot.describe_stream(streamId=stream_id)["streamInfo"]["streamVersion"] == 1


def test_17_list_streams_pages(jobsd: Jobsd, files_dir: Path) -> None:
    iot = jobsd.iot
    before = [s["streamId"] for s in iot.get_paginator("list_streams").paginate(
        ascendingOrder=True).build_full_result()["streams"]]
    mine = [new_stream(jobsd, files_dir, {0: b"x" * 300})[0] for _ in range(5)]
    ascending = []
    token: Optional[str] = None
    pages = 0
    while True:
        kwargs: dict[str, Any] = {"maxResults": 2, "ascendingOrder": True}
        if token:
            kwargs["nextToken"] = token
        out = iot.list_streams(**kwargs)
        assert len(out["streams"]) <= 2
        ascending += out["streams"]
        pages += 1
        token = out.get("nextToken")
        if not token:
            break
    assert pages == -(-(len(before) + 5) // 2)
    assert [s["streamId"] for s in ascending] == before + mine
    row = ascending[-1]
    assert row == {"streamId": mine[-1], "streamArn": f"{PREFIX}:stream/{mine[-1]}",
                   "streamVersion": 1, "description": "firmware"}
    newest_first = [s["streamId"] for s in iot.list_streams(maxResults=5)["streams"]]
    assert newest_first == list(reversed(mine))
    for bad in (0, 251):
        with pytest.raises(ClientError) as err:
            unvalidated(jobsd.control_url).list_streams(maxResults=bad)
        assert error_of(err) == ("InvalidRequestException", 400)


# -- scenario 18: CreateOTAUpdate ------------------------------------------------------------------

def wait_ota(jobsd: Jobsd, ota_id: str) -> dict[str, Any]:
    def done() -> Optional[dict[str, Any]]:
        info = jobsd.iot.get_ota_update(otaUpdateId=ota_id)["otaUpdateInfo"]
        return info if info["otaUpdateStatus"] not in ("CREATE_PENDING",
                                                       "CREATE_IN_PROGRESS") else None
    return stack.wait_until(done, TIMEOUT, f"OTA update {ota_id} to be created")


def test_18_create_ota_update_mqtt(jobsd: Jobsd, files_dir: Path, device: StreamDevice) -> None:
    iot = jobsd.iot
    iot.create_thing(thingName=device.thing)
    image = content(F2_SIZE + 123, 18)
    key = put_file(files_dir, image)
    signature = b"0E\x02 " + bytes(range(32)) + b"\x02!\x00" + bytes(range(33))
    ota_id = unique("ota")
    out = iot.create_ota_update(
        otaUpdateId=ota_id, targets=[thing_arn(device.thing)], protocols=["MQTT"],
        roleArn=ROLE, files=[{
            "fileName": "firmware.bin", "fileType": 0,
            "fileLocation": {"s3Location": {"bucket": "fw", "key": key}},
            "codeSigning": {"customCodeSigning": {
                "signature": {"inlineDocument": signature},
                "certificateChain": {"certificateName": "ecdsa-signer.crt.pem"},
                "hashAlgorithm": "SHA256", "signatureAlgorithm": "ECDSA"}}}])
    job_id = f"AFR_OTA-{ota_id}"
    assert out["otaUpdateId"] == ota_id and out["otaUpdateStatus"] == "CREATE_PENDING"
    assert out["awsIotJobId"] == job_id and out["awsIotJobArn"] == f"{PREFIX}:job/{job_id}"
    assert out["otaUpdateArn"] == f"{PREFIX}:otaupdate/{ota_id}"
    info = wait_ota(jobsd, ota_id)
    assert info["otaUpdateStatus"] == "CREATE_COMPLETE", info.get("errorInfo")
    assert info["awsIotJobId"] == job_id and info["protocols"] == ["MQTT"]
    assert info["targets"] == [thing_arn(device.thing)]
    assert info["otaUpdateFiles"][0]["fileName"] == "firmware.bin"
    document = json.loads(iot.get_job_document(jobId=job_id)["document"])
    ota = document["afr_ota"]
    assert ota["protocols"] == ["MQTT"]
    stream_id = ota["streamname"]
    assert stream_id.startswith("AFR_OTA-") and uuid.UUID(stream_id[len("AFR_OTA-"):])
    assert ota["files"] == [{"filepath": "firmware.bin", "filesize": len(image), "fileid": 0,
                             "certfile": "ecdsa-signer.crt.pem", "fileType": 0,
                             "sig-sha256-ecdsa": base64.b64encode(signature).decode()}]
    described = iot.describe_stream(streamId=stream_id)["streamInfo"]
    assert described["files"] == [{"fileId": 0, "s3Location": {"bucket": "fw", "key": key}}]
    (r,) = device.describe(stream_id, "cbor")
    assert r.body["r"] == [{"f": 0, "z": len(image)}]
    check_data(device.get(stream_id, "cbor", f=0, l=4096, o=75, n=2), image, 4096)
    # the job reached the thing
    ex = iot.describe_job_execution(jobId=job_id, thingName=device.thing)["execution"]
    assert ex["status"] == "QUEUED"
    # the stream is in use: DeleteStream is a conflict until the OTA update is gone
    with pytest.raises(ClientError) as err:
        iot.delete_stream(streamId=stream_id)
    assert error_of(err) == ("DeleteConflictException", 409)
    assert ota_id in [o["otaUpdateId"] for o in iot.list_ota_updates()["otaUpdates"]]
    assert ota_id in [o["otaUpdateId"] for o in iot.list_ota_updates(
        otaUpdateStatus="CREATE_COMPLETE")["otaUpdates"]]
    assert ota_id not in [o["otaUpdateId"] for o in iot.list_ota_updates(
        otaUpdateStatus="CREATE_FAILED")["otaUpdates"]]
    with pytest.raises(ClientError) as err:
        iot.create_ota_update(otaUpdateId=ota_id, targets=[thing_arn(device.thing)],
                              roleArn=ROLE, files=[{"fileLocation": {"s3Location": {
                                  "bucket": "fw", "key": key}}}])
    assert error_of(err) == ("ResourceAlreadyExistsException", 409)
    iot.delete_ota_update(otaUpdateId=ota_id, deleteStream=True, forceDeleteAWSJob=True)
    for call in (lambda: iot.get_ota_update(otaUpdateId=ota_id),
                 lambda: iot.describe_stream(streamId=stream_id),
                 lambda: iot.describe_job(jobId=job_id),
                 lambda: iot.delete_ota_update(otaUpdateId=ota_id)):
        with pytest.raises(ClientError) as err:
            call()
        assert error_of(err) == ("ResourceNotFoundException", 404)


def test_18_ota_update_from_a_stream_and_over_http(jobsd: Jobsd, files_dir: Path) -> None:
    iot = jobsd.iot
    thing = unique("ota-thing")
    iot.create_thing(thingName=thing)
    image = content(5000, 181)
    stream_id, keys = new_stream(jobsd, files_dir, {3: image})
    ota_id = unique("ota")
    iot.create_ota_update(otaUpdateId=ota_id, targets=[thing_arn(thing)],
                          protocols=["MQTT", "HTTP"], roleArn=ROLE,
                          files=[{"fileName": "/app.bin", "fileLocation": {
                              "stream": {"streamId": stream_id, "fileId": 3}}}])
    assert wait_ota(jobsd, ota_id)["otaUpdateStatus"] == "CREATE_COMPLETE"
    job_id = f"AFR_OTA-{ota_id}"
    ota = json.loads(iot.get_job_document(jobId=job_id)["document"])["afr_ota"]
    assert ota["protocols"] == ["MQTT", "HTTP"] and ota["streamname"] == stream_id
    (f,) = ota["files"]
    assert (f["filepath"], f["filesize"], f["fileid"]) == ("/app.bin", 5000, 3)
    assert f["auth_scheme"] == "aws.s3.presigned"
    assert f["update_data_url"] == ("${aws:iot:s3-presigned-url:https://s3.amazonaws.com/fw/"
                                    f"{keys[3]}}}")
    # delivered to the device with a fresh presigned URL of jobsd's file server
    got = jobsd.data.start_next_pending_job_execution(thingName=thing)["execution"]
    url = got["jobDocument"] and json.loads(got["jobDocument"])["afr_ota"]["files"][0][
        "update_data_url"]
    assert url.startswith(jobsd.data_url + "/files/fw/") and "X-Signature=" in url
    host, port = jobsd.data_url[len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        conn.request("GET", url[len(jobsd.data_url):])
        assert conn.getresponse().read() == image
    finally:
        conn.close()
    # a stream the caller supplied survives DeleteOTAUpdate(deleteStream) but is in use before
    with pytest.raises(ClientError) as err:
        iot.delete_stream(streamId=stream_id)
    assert error_of(err) == ("DeleteConflictException", 409)
    iot.delete_ota_update(otaUpdateId=ota_id, deleteStream=True)
    assert iot.describe_stream(streamId=stream_id)["streamInfo"]["streamVersion"] == 1
    assert iot.describe_job(jobId=job_id)["job"]["jobId"] == job_id  # no force flag: kept
    iot.delete_stream(streamId=stream_id)


def test_18_ota_update_validation(jobsd: Jobsd, files_dir: Path) -> None:
    raw = unvalidated(jobsd.control_url)
    thing = unique("ota-thing")
    jobsd.iot.create_thing(thingName=thing)
    key = put_file(files_dir, b"image")
    s3 = {"fileLocation": {"s3Location": {"bucket": "fw", "key": key}}}
    good: dict[str, Any] = {"targets": [thing_arn(thing)], "roleArn": ROLE, "files": [s3]}
    cases: list[tuple[str, dict[str, Any], str, int]] = [
        ("no targets", {"targets": []}, "InvalidRequestException", 400),
        ("unknown thing", {"targets": [thing_arn(unique("ghost"))]},
         "ResourceNotFoundException", 404),
        ("not an ARN", {"targets": ["thing"]}, "InvalidRequestException", 400),
        ("no files", {"files": []}, "InvalidRequestException", 400),
        ("bad protocol", {"protocols": ["FTP"]}, "InvalidRequestException", 400),
        ("both locations", {"files": [{"fileLocation": {
            "s3Location": {"bucket": "fw", "key": key},
            "stream": {"streamId": "x", "fileId": 0}}}]}, "InvalidRequestException", 400),
        ("missing object", {"files": [{"fileLocation": {"s3Location": {
            "bucket": "fw", "key": "nope"}}}]}, "ResourceNotFoundException", 404),
        ("missing stream", {"files": [{"fileLocation": {"stream": {
            "streamId": unique("nos"), "fileId": 0}}}]}, "ResourceNotFoundException", 404),
        ("AWS Signer", {"files": [dict(s3, codeSigning={"awsSignerJobId": "j"})]},
         "InvalidRequestException", 400),
        ("no roleArn", {"roleArn": None}, "InvalidRequestException", 400),
    ]
    for name, change, code, status in cases:
        args = dict(good, otaUpdateId=unique("o"), **change)
        args = {k: v for k, v in args.items() if v is not None}
        with pytest.raises(ClientError) as err:
            raw.create_ota_update(**args)
        assert error_of(err) == (code, status), name
    with pytest.raises(ClientError) as err:
        raw.create_ota_update(otaUpdateId="o" * 57, **good)
    assert error_of(err) == ("InvalidRequestException", 400)
    with pytest.raises(ClientError) as err:
        jobsd.iot.get_ota_update(otaUpdateId=unique("none"))
    assert error_of(err) == ("ResourceNotFoundException", 404)


# -- restart, hostile input ---------------------------------------------------------------------

def test_streams_and_ota_updates_survive_a_restart(tmp_path: Path, mosquitto: stack.Mosquitto,
                                                   files: Path) -> None:
    (files / "fw").mkdir()
    data = content(F1_SIZE, 77)
    (files / "fw" / "image.bin").write_bytes(data)
    db = str(tmp_path / "jobsd.sqlite3")
    first = Jobsd(str(tmp_path), mosquitto.broker, files=str(files), db=db, log_name="jobsd1.log")
    try:
        first.iot.create_stream(streamId="kept", roleArn=ROLE, description="kept", files=[
            {"fileId": 0, "s3Location": {"bucket": "fw", "key": "image.bin"}}])
        first.iot.update_stream(streamId="kept", description="kept v2")
        first.iot.create_thing(thingName="restart-thing")
        first.iot.create_ota_update(otaUpdateId="kept-ota", targets=[thing_arn("restart-thing")],
                                    roleArn=ROLE, files=[{"fileName": "fw.bin", "fileLocation": {
                                        "stream": {"streamId": "kept", "fileId": 0}}}])
        assert wait_ota(first, "kept-ota")["otaUpdateStatus"] == "CREATE_COMPLETE"
    finally:
        assert first.stop() == 0
    second = Jobsd(str(tmp_path), mosquitto.broker, files=str(files), db=db,
                   log_name="jobsd2.log")
    dev = StreamDevice(mosquitto.port, "restart-thing")
    try:
        info = second.iot.describe_stream(streamId="kept")["streamInfo"]
        assert (info["streamVersion"], info["description"]) == (2, "kept v2")
        (r,) = dev.describe("kept", "json")
        assert r.body == {"s": 2, "d": "kept v2", "r": [{"f": 0, "z": F1_SIZE}]}
        replies = dev.get("kept", "cbor", s=2, f=0, l=4096, o=0, n=3)
        check_data(replies, data, 4096)
        assert second.iot.get_ota_update(otaUpdateId="kept-ota")["otaUpdateInfo"][
            "otaUpdateStatus"] == "CREATE_COMPLETE"
        with pytest.raises(ClientError) as err:
            second.iot.delete_stream(streamId="kept")
        assert error_of(err) == ("DeleteConflictException", 409)
    finally:
        dev.close()
        assert second.stop() == 0


SEED = 1313
FUZZ = 300


def _fuzz_value(rng: random.Random) -> Any:
    return rng.choice([None, True, -1, 0, 1, 255, 256, 4096, 2**31, 2**64, -2**70, 1.5, "0",
                       "", "x" * 70, b"\x07", b"", b"\xff" * 40, [], [1], {}, {"a": 1},
                       "0x07", "0xZZ"])


def _fuzz_payload(rng: random.Random, fmt: str) -> bytes:
    kind = rng.random()
    if kind < 0.15:
        return rng.randbytes(rng.randrange(0, 64))
    body: dict[Any, Any] = {"f": 0, "l": rng.choice([256, 1024, 4096, 255]),
                            "o": rng.randrange(0, 50), "n": rng.randrange(0, 40)}
    for _ in range(rng.randrange(0, 4)):
        body[rng.choice(["c", "s", "f", "l", "o", "n", "b", "zz"])] = _fuzz_value(rng)
    if fmt == "json":
        body = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in body.items()}
        text = json.dumps(body).encode()
        if kind < 0.3:
            text = text[:rng.randrange(0, len(text))]
        return text
    raw = cbor2.dumps(body)
    if kind < 0.3:
        raw = raw[:rng.randrange(0, len(raw))]
    elif kind < 0.4:
        raw = cbor2.dumps(cbor2.CBORTag(rng.choice([0, 1, 2, 24, 258, 55799]), body))
    return raw


def test_hostile_input_never_crashes_jobsd(jobsd: Jobsd, device: StreamDevice,
                                           f2_stream: tuple[str, bytes]) -> None:
    rng = random.Random(SEED)
    stream_id, data = f2_stream
    answered = 0
    for _ in range(FUZZ):
        fmt = rng.choice(FORMATS)
        verb = rng.choice(["get", "get", "get", "describe"])
        replies = device.exchange(device.topic(stream_id, verb, fmt), _fuzz_payload(rng, fmt))
        for r in replies:
            if r.kind == "rejected":
                assert r.body["code"] in CODES - {"InternalError"}, r.body
                assert r.body["o"] == r.body["code"] and r.body["m"], r.body
            else:
                assert r.kind in ("data", "description"), r.kind
        answered += bool(replies)
    assert answered > FUZZ // 2
    # deeply nested input and foreign topics
    device.exchange(device.topic(stream_id, "get", "json"), b"[" * 100000 + b"]" * 100000)
    device.exchange(device.topic(stream_id, "get", "cbor"), b"\x81" * 100000 + b"\x00")
    device.exchange(device.topic(stream_id, "get", "cbor"), b"\x9f" * 5000)
    device.exchange(f"$aws/things/{device.thing}/streams", b"{}")
    device.exchange(f"$aws/things/{device.thing}/streams/{stream_id}", b"{}")
    assert jobsd.proc.alive()
    with open(jobsd.proc.log_path, errors="replace") as f:
        assert "Traceback" not in f.read()
    # still serving
    check_data(device.get(stream_id, "json", f=0, l=4096, o=0, n=4), data, 4096)


def test_a_job_named_streams_is_still_a_jobs_request(jobsd: Jobsd, broker: stack.Mosquitto
                                                     ) -> None:
    """`$aws/things/<T>/jobs/streams/get` names the job "streams": the jobs API answers it."""
    thing = unique("thing")
    jobsd.iot.create_thing(thingName=thing)
    jobsd.iot.create_job(jobId="streams", targets=[thing_arn(thing)],
                         document=json.dumps({"operation": "x"}))
    got: list[paho.MQTTMessage] = []
    arrived, subscribed = threading.Event(), threading.Event()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=unique("jobs"))
    c.on_message = lambda _c, _u, m: (got.append(m), arrived.set())
    c.on_subscribe = lambda *a: subscribed.set()
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        c.subscribe(f"$aws/things/{thing}/jobs/streams/get/+", 1)
        assert subscribed.wait(TIMEOUT)
        c.publish(f"$aws/things/{thing}/jobs/streams/get", b'{"clientToken":"j"}', qos=1)
        assert arrived.wait(TIMEOUT)
        assert got[0].topic.endswith("/accepted")
        assert json.loads(got[0].payload)["execution"]["jobId"] == "streams"
    finally:
        c.disconnect()
        c.loop_stop()


def test_a_schema_3_database_is_upgraded_in_place(tmp_path: Path, mosquitto: stack.Mosquitto,
                                                  files: Path) -> None:
    """A database of the jobsd before streams (schema 3) keeps its things and gains streams."""
    import sqlite3

    from iotjobs_host.jobsd import store

    db = str(tmp_path / "old.sqlite3")
    conn = sqlite3.connect(db, isolation_level=None)
    for script in store._MIGRATIONS[:3]:
        conn.executescript(script)
    conn.execute("INSERT INTO things (name, thing_id, attributes, thing_type, version, created_at)"
                 " VALUES ('old-thing', 'id-1', '{}', NULL, 1, 0)")
    conn.execute("PRAGMA user_version=3")
    conn.close()
    (files / "fw").mkdir()
    (files / "fw" / "a.bin").write_bytes(b"a" * 700)
    j = Jobsd(str(tmp_path), mosquitto.broker, files=str(files), db=db)
    try:
        assert j.iot.describe_thing(thingName="old-thing")["thingId"] == "id-1"
        assert j.iot.create_stream(streamId="new", roleArn=ROLE, files=[
            {"fileId": 0, "s3Location": {"bucket": "fw", "key": "a.bin"}}])["streamVersion"] == 1
    finally:
        j.stop()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION == 5
    finally:
        conn.close()
