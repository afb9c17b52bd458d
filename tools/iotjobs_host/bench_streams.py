"""jobsd's MQTT file delivery (streams) under one device: a paho client fetches a file (1 MiB by
default) in 4 KiB blocks through jobsd, with one GetStream request of `n` blocks in flight at a
time (the next request goes out when the last block of the current one has arrived), as a
device that keeps one request in flight does (STREAMS.md 4, 10).

The floor is the same exchange against a trivial responder in another process that answers each
request with `n` messages of the same size as jobsd's data messages and does nothing else: what
mosquitto and paho cost with no streams service behind them. jobsd is not the bottleneck when
its figures are close to the floor's.

    .venv/bin/python -m iotjobs_host.bench_streams [--size BYTES] [--block BYTES] [--n N]
                                                    [--fmt cbor|json] [--repeat R]

(from tools/), or call `bench_streams()`; it returns a dict and starts and stops its own
mosquitto and jobsd."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional

import paho.mqtt.client as mqtt

from . import stack
from .pki import PKI

THING = "bench-streams"
ROLE = "arn:aws:iam::123456789012:role/bench-streams"

ECHO = r"""
import socket, sys, paho.mqtt.client as mqtt
size, n = int(sys.argv[2]), int(sys.argv[3])
body = b"\xa5" * size
def on_message(c, u, m):
    for _ in range(n):
        c.publish("bench/x/data", body, qos=0)
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-streams-echo")
c.on_connect = lambda c, u, f, rc, p: c.subscribe("bench/x/get", 1)
c.on_subscribe = lambda *a: print("READY", flush=True)
c.on_message = on_message
c.connect("127.0.0.1", int(sys.argv[1]))
c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as jobsd's bridge does
c.loop_forever()
"""


class _Fetcher:
    """One paho client: publish a request, wait for `expect` replies, repeat."""

    def __init__(self, port: int, subscriptions: list[str]) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"bench-streams-{os.getpid()}")
        self.client.on_message = self._on_message
        self._cond = threading.Condition()
        self.messages: list[bytes] = []
        self.rejected: list[bytes] = []
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.loop_start()
        self.client.subscribe([(t, 0) for t in subscriptions])
        if not subscribed.wait(10):
            raise TimeoutError("bench subscribe")

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            if "/rejected/" in msg.topic:
                self.rejected.append(msg.payload)
            else:
                self.messages.append(msg.payload)
            self._cond.notify_all()

    def request(self, topic: str, payload: bytes, expect: int, timeout: float = 10.0) -> None:
        with self._cond:
            want = len(self.messages) + expect
        self.client.publish(topic, payload, qos=0)
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < want:
                if self.rejected:
                    raise RuntimeError(f"rejected: {self.rejected[0][:300]!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"only {len(self.messages)} of {want} messages")
                self._cond.wait(left)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _encode(fmt: str, fields: dict[str, Any]) -> bytes:
    if fmt == "cbor":
        import cbor2

        return cbor2.dumps(fields)
    return json.dumps(fields).encode()


def _decode(fmt: str, raw: bytes) -> dict[str, Any]:
    if fmt == "cbor":
        import cbor2

        return cbor2.loads(raw)
    import base64

    body = json.loads(raw)
    body["p"] = base64.b64decode(body["p"])
    return body


def _rate(seconds: float, blocks: int, size: int) -> dict[str, float]:
    return {"seconds": round(seconds, 4), "blocks_per_s": round(blocks / seconds, 1),
            "mib_per_s": round(size / seconds / (1 << 20), 2)}


def _fetch_jobsd(port: int, stream_id: str, size: int, block: int, n: int, fmt: str,
                 repeat: int) -> tuple[float, bytes, int]:
    """(median seconds of `repeat` fetches, the file as received by the last, the size of one
    full data message)."""
    base = f"$aws/things/{THING}/streams/{stream_id}/"
    f = _Fetcher(port, [base + f"data/{fmt}", base + f"rejected/{fmt}"])
    try:
        nblocks = -(-size // block)
        # warm-up: the first request reads and hashes the file into jobsd's cache
        f.request(base + f"get/{fmt}", _encode(fmt, {"c": "w", "f": 0, "l": block, "o": 0,
                                                     "n": 1}), 1)
        message_size = len(f.messages[-1])
        times = []
        for _ in range(repeat):
            with f._cond:
                f.messages.clear()
            t0 = time.perf_counter()
            for o in range(0, nblocks, n):
                count = min(n, nblocks - o)
                f.request(base + f"get/{fmt}", _encode(fmt, {"c": "b", "s": 1, "f": 0,
                                                             "l": block, "o": o, "n": count}),
                          count)
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        out = bytearray(size)
        for raw in f.messages:
            body = _decode(fmt, raw)
            out[body["i"] * block:body["i"] * block + body["l"]] = body["p"]
        return seconds, bytes(out), message_size
    finally:
        f.close()


def _fetch_floor(port: int, size: int, block: int, n: int, message_size: int,
                 repeat: int) -> float:
    echo = subprocess.Popen([sys.executable, "-c", ECHO, str(port), str(message_size), str(n)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert echo.stdout is not None and echo.stdout.readline().startswith("READY")
        f = _Fetcher(port, ["bench/x/data"])
        try:
            nblocks = -(-size // block)
            f.request("bench/x/get", b"{}", n)  # warm-up
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                for o in range(0, nblocks, n):
                    f.request("bench/x/get", b'{"c":"b","s":1,"f":0,"l":4096,"o":0,"n":8}',
                              min(n, nblocks - o))
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
        finally:
            f.close()
    finally:
        echo.terminate()
        echo.wait(10)


def bench_streams(size: int = 1 << 20, block: int = 4096, n: int = 8, fmt: str = "cbor",
                  repeat: int = 5, work: Optional[str] = None) -> dict[str, Any]:
    """Fetch a `size`-byte file in `block`-byte blocks, `n` blocks per request, through jobsd
    and through the echo floor (`repeat` times each, the median kept); blocks/s and MiB/s of
    each."""
    owned = work is None
    work = work or tempfile.mkdtemp(prefix="bench-streams-")
    pki = PKI(os.path.join(work, "pki"))
    files = os.path.join(work, "files")
    os.makedirs(os.path.join(files, "fw"), exist_ok=True)
    data = os.urandom(size)
    with open(os.path.join(files, "fw", "image.bin"), "wb") as fh:
        fh.write(data)
    mosq = stack.Mosquitto(os.path.join(work, "mosquitto"), pki)
    jobsd = None
    try:
        jobsd = stack.Jobsd(os.path.join(work, "jobsd"), mosq.broker, files=files,
                            extra=["--log-level", "WARNING"])
        jobsd.iot.create_stream(streamId="bench", roleArn=ROLE, files=[
            {"fileId": 0, "s3Location": {"bucket": "fw", "key": "image.bin"}}])
        seconds, got, message_size = _fetch_jobsd(mosq.port, "bench", size, block, n, fmt,
                                                      repeat)
        if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
            raise RuntimeError("the file fetched through jobsd differs from the original")
        floor = _fetch_floor(mosq.port, size, block, n, message_size, repeat)
    finally:
        if jobsd is not None:
            jobsd.stop()
        mosq.stop()
        if owned:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    blocks = -(-size // block)
    mine, base = _rate(seconds, blocks, size), _rate(floor, blocks, size)
    return {"file_bytes": size, "block": block, "blocks": blocks, "blocks_per_request": n,
            "format": fmt, "repeat": repeat, "data_message_bytes": message_size, "jobsd": mine, "floor": base,
            "jobsd_vs_floor": round(mine["blocks_per_s"] / base["blocks_per_s"], 3)}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bench_streams", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1 << 20)
    p.add_argument("--block", type=int, default=4096)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--fmt", choices=("cbor", "json"), default="cbor")
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args(argv)
    print(json.dumps(bench_streams(a.size, a.block, a.n, a.fmt, a.repeat), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
