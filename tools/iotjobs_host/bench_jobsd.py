"""jobsd under load: 200 things with 5 no-op jobs each, driven concurrently by paho clients.

Each simulated thing loops start-next -> update SUCCEEDED -> start-next ... until nothing is
pending, as a device does. Reported: executions per second (first request to last reply), p50
and p99 of the start-next and update round trips under that load, and as the floor the round
trip of the same requests through mosquitto to a trivial responder in another process that
answers like jobsd but keeps nothing (what the broker and paho cost, with no jobs service behind
them): unloaded (one request at a time) and loaded (the same fleet, the same concurrency)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt

from . import stack

ECHO = r"""
import json, sys, paho.mqtt.client as mqtt
left = {}
def on_message(c, u, m):
    parts = m.topic.split("/")
    if parts[-1] == "req":
        c.publish(m.topic[:-3] + "accepted", m.payload, qos=1)
    elif parts[4] == "start-next":
        n = left.setdefault(parts[2], int(sys.argv[2]))
        body = {"clientToken": "s", "timestamp": 1}
        if n:
            left[parts[2]] = n - 1
            body["execution"] = {"jobId": "noop-%d" % n, "status": "IN_PROGRESS"}
        c.publish(m.topic + "/accepted", json.dumps(body), qos=1)
    else:
        c.publish(m.topic + "/accepted", b'{"clientToken":"u","timestamp":1}', qos=1)
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="echo")
c.max_inflight_messages_set(0)
c.on_connect = lambda c, u, f, rc, p: c.subscribe([("echo/+/req", 1),
    ("$aws/things/+/jobs/start-next", 1), ("$aws/things/+/jobs/+/update", 1)])
c.on_subscribe = lambda *a: print("READY", flush=True)
c.on_message = on_message
c.connect("127.0.0.1", int(sys.argv[1]))
c.loop_forever()
"""


def _client(cid: str, port: int) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    import socket

    c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000


class Fleet:
    """Simulated things spread over a few paho connections, driven from their callbacks."""

    def __init__(self, port: int, things: list[str], connections: int) -> None:
        self.things = things
        self.start_rtt: list[float] = []
        self.update_rtt: list[float] = []
        self.sent: dict[str, float] = {}
        self.done = 0
        self.finished: set[str] = set()
        self.all_done = threading.Event()
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.by_thing: dict[str, mqtt.Client] = {}
        self.clients = []
        for i in range(connections):
            c = _client(f"bench-{i}", port)
            mine = things[i::connections]
            for t in mine:
                self.by_thing[t] = c
            subs = []
            for t in mine:
                subs += [(f"$aws/things/{t}/jobs/start-next/+", 1), (f"$aws/things/{t}/jobs/+/update/+", 1)]
            ready = threading.Event()
            c.on_subscribe = lambda *a, ev=ready: ev.set()
            c.on_message = self._on_message
            c.loop_start()
            for k in range(0, len(subs), 8):
                ready.clear()
                c.subscribe(subs[k:k + 8])
                if not ready.wait(10):
                    raise TimeoutError("bench subscribe")
            self.clients.append(c)

    def _send(self, thing: str, suffix: str, payload: dict) -> None:
        self.sent[thing] = time.perf_counter()
        self.by_thing[thing].publish(f"$aws/things/{thing}/jobs/{suffix}", json.dumps(payload), qos=1)

    def _on_message(self, c, u, msg) -> None:
        now = time.perf_counter()
        parts = msg.topic.split("/")
        thing = parts[2]
        body = json.loads(msg.payload)
        rtt = now - self.sent[thing]
        if parts[-1] == "rejected":
            self.errors.append(f"{msg.topic}: {body.get('code')}")
        if parts[4] == "start-next":
            self.start_rtt.append(rtt)
            ex = body.get("execution")
            if ex:
                self._send(thing, f"{ex['jobId']}/update", {"status": "SUCCEEDED", "clientToken": "u"})
            else:
                with self.lock:
                    self.finished.add(thing)
                    if len(self.finished) == len(self.things):
                        self.all_done.set()
        else:
            self.update_rtt.append(rtt)
            with self.lock:
                self.done += 1
            self._send(thing, "start-next", {"clientToken": "s"})

    def run(self, timeout: float = 120) -> float:
        t0 = time.perf_counter()
        for t in self.things:
            self._send(t, "start-next", {"clientToken": "s"})
        if not self.all_done.wait(timeout):
            raise TimeoutError(f"only {self.done} executions after {timeout}s")
        return time.perf_counter() - t0

    def stop(self) -> None:
        for c in self.clients:
            c.disconnect()
            c.loop_stop()


def echo_responder(port: int, jobs: int) -> subprocess.Popen:
    echo = subprocess.Popen([sys.executable, "-c", ECHO, str(port), str(jobs)],
                            stdout=subprocess.PIPE, text=True)
    assert echo.stdout is not None and echo.stdout.readline().startswith("READY")
    return echo


def floor_rtt(port: int, n: int = 2000) -> list[float]:
    """Sequential request/reply round trips through mosquitto to the echo responder."""
    c = _client("floor", port)
    got = threading.Event()
    c.on_message = lambda *a: got.set()
    sub = threading.Event()
    c.on_subscribe = lambda *a: sub.set()
    c.loop_start()
    c.subscribe("echo/x/accepted", 1)
    assert sub.wait(10)
    out = []
    for _ in range(n):
        got.clear()
        t = time.perf_counter()
        c.publish("echo/x/req", b'{"clientToken":"f"}', qos=1)
        if not got.wait(5):
            raise TimeoutError("echo did not answer")
        out.append(time.perf_counter() - t)
    c.disconnect()
    c.loop_stop()
    return out


def floor(work: str, pki, names: list[str], jobs: int, connections: int) -> dict:
    """The floor: the same measurements against the echo responder, on a broker of its own."""
    mosq = stack.Mosquitto(os.path.join(work, "floor-mosquitto"), pki)
    echo = echo_responder(mosq.port, jobs)
    fleet = None
    try:
        seq = floor_rtt(mosq.port)
        fleet = Fleet(mosq.port, names, connections)
        wall = fleet.run()
        return {"seq": seq, "wall": wall, "start": fleet.start_rtt, "update": fleet.update_rtt,
                "executions": fleet.done}
    finally:
        if fleet:
            fleet.stop()
        echo.terminate()
        echo.wait(10)
        mosq.stop()


def sequential_jobsd_rtt(port: int, iot, n: int = 500) -> list[float]:
    """The same sequential round trip, but to jobsd (start-next with nothing pending)."""
    iot.create_thing(thingName="bench-seq")
    c = _client("seq", port)
    got = threading.Event()
    c.on_message = lambda *a: got.set()
    sub = threading.Event()
    c.on_subscribe = lambda *a: sub.set()
    c.loop_start()
    c.subscribe("$aws/things/bench-seq/jobs/start-next/+", 1)
    assert sub.wait(10)
    out = []
    for _ in range(n):
        got.clear()
        t = time.perf_counter()
        c.publish("$aws/things/bench-seq/jobs/start-next", b'{"clientToken":"q"}', qos=1)
        if not got.wait(5):
            raise TimeoutError("jobsd did not answer")
        out.append(time.perf_counter() - t)
    c.disconnect()
    c.loop_stop()
    return out


def run(work: str, pki, things: int = 200, jobs: int = 5, connections: int = 20) -> dict:
    names = [f"t{i:03d}" for i in range(things)]
    fl = floor(work, pki, names, jobs, connections)
    mosq = stack.Mosquitto(os.path.join(work, "mosquitto"), pki)
    jobsd = stack.Jobsd(os.path.join(work, "jobsd"), mosq.broker, extra=["--log-level", "WARNING"])
    fleet = None
    try:
        iot = jobsd.iot
        arns = [iot.create_thing(thingName=n)["thingArn"] for n in names]
        for j in range(jobs):
            iot.create_job(jobId=f"noop-{j}", targets=arns, document='{"operation":"noop"}')
        seq = sequential_jobsd_rtt(mosq.port, iot)
        fleet = Fleet(mosq.port, names, connections)
        wall = fleet.run()
        executions = fleet.done
        completed = sum(iot.describe_job(jobId=f"noop-{j}")["job"]["jobProcessDetails"]
                        ["numberOfSucceededThings"] for j in range(jobs))
        floor_p50 = pct(fl["seq"], 0.5)
        floor_loaded_p50 = pct(fl["start"] + fl["update"], 0.5)
        loaded_p50 = pct(fleet.start_rtt + fleet.update_rtt, 0.5)
        return {
            "things": things, "jobs_per_thing": jobs, "connections": connections,
            "executions": executions, "executions_confirmed_succeeded": completed,
            "rejections": len(fleet.errors),
            "wall_s": round(wall, 3),
            "executions_per_s": round(executions / wall, 1),
            "start_next_ms_p50": round(pct(fleet.start_rtt, 0.5), 2),
            "start_next_ms_p99": round(pct(fleet.start_rtt, 0.99), 2),
            "update_ms_p50": round(pct(fleet.update_rtt, 0.5), 2),
            "update_ms_p99": round(pct(fleet.update_rtt, 0.99), 2),
            "floor_executions_per_s": round(fl["executions"] / fl["wall"], 1),
            "floor_loaded_rtt_ms_p50": round(floor_loaded_p50, 2),
            "floor_loaded_rtt_ms_p99": round(pct(fl["start"] + fl["update"], 0.99), 2),
            "loaded_rtt_p50_vs_floor": round(loaded_p50 / floor_loaded_p50, 2),
            "floor_rtt_ms_p50": round(floor_p50, 3),
            "floor_rtt_ms_p99": round(pct(fl["seq"], 0.99), 3),
            "jobsd_sequential_rtt_ms_p50": round(pct(seq, 0.5), 3),
            "jobsd_sequential_vs_floor": round(pct(seq, 0.5) / floor_p50, 2),
            "executions_per_s_vs_floor": round((executions / wall) / (fl["executions"] / fl["wall"]), 2),
        }
    finally:
        if fleet:
            fleet.stop()
        jobsd.stop()
        mosq.stop()
