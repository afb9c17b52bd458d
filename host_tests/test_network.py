"""A device on a bad network: the link goes dead under a running job, the broker restarts, every
connection is dropped again and again. The device talks mutual TLS to mosquitto through
tools/iotjobs_host/netproxy.py (bytes only: TLS stays end to end), which plays the faults; a spy
on the plain listener watches the wire, and the service (boto3 `iot`) has the last word."""
from __future__ import annotations

import json
import time

import pytest
from conftest import thing_arn, wait_execution
from iotjobs_host import stack
from iotjobs_host.netproxy import Proxy

HEAP = stack.DEFAULT_HEAP  # the project's device heap (devsim's default)
TERMINAL = {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "REMOVED", "CANCELED"}
CUT_S = 30.0
KEEPALIVE = 5


@pytest.fixture
def proxy(mosquitto):
    p = Proxy(mosquitto.tls_port)
    yield p
    p.stop()


class WireSpy(stack.Spy):
    """The stack's spy, made to survive a broker restart: it reconnects at once and subscribes
    again (a clean session forgets subscriptions)."""

    def __init__(self, broker_port: int, thing: str) -> None:
        super().__init__(broker_port, thing)
        self.thing = thing
        self.connects = 1
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect

    def _on_connect(self, client, userdata, flags, reason, properties=None) -> None:
        self.connects += 1
        client.subscribe(f"$aws/things/{self.thing}/jobs/#", qos=1)

    def requests(self) -> int:
        """Messages the device has published (requests, not the service's replies/events)."""
        with self._cond:
            return sum(1 for t, _ in self.messages if t.rsplit("/", 1)[-1] in ("start-next", "update", "get"))


@pytest.fixture
def wirespy(mosquitto):
    spies: list[WireSpy] = []

    def start(thing: str) -> WireSpy:
        s = WireSpy(mosquitto.port, thing)
        spies.append(s)
        return s

    yield start
    for s in spies:
        s.stop()


def create_job(iot, job_id: str, thing: str, document: dict) -> None:
    iot.create_job(jobId=job_id, targets=[thing_arn(thing)], document=json.dumps(document))


def is_progress(job_id: str):
    return lambda t, p: (t.endswith(f"/jobs/{job_id}/update") and isinstance(p, dict)
                         and p.get("status") == "IN_PROGRESS")


def full_log(dev: stack.Device) -> str:
    return dev.log_text(10**8)


def count_lines(dev: stack.Device, text: str) -> int:
    return sum(1 for ln in full_log(dev).splitlines() if text in ln)


def assert_healthy(dev: stack.Device) -> None:
    log = full_log(dev)
    assert dev.proc.alive(), "devsim ended"
    assert len(dev.boots()) == 1, f"the firmware restarted: boots {dev.boots()}\n{log[-4000:]}"
    assert "Traceback" not in log, log[-4000:]


def terminal_acceptances(spy: stack.Spy, job_id: str) -> list[str]:
    """Statuses of the device's terminal updates of job_id that the service accepted, matched by
    clientToken (request on <job>/update, reply on <job>/update/accepted)."""
    base = f"/jobs/{job_id}/update"
    status_of: dict[str, str] = {}
    accepted: list[str] = []
    for t, p in list(spy.messages):
        if not isinstance(p, dict):
            continue
        if t.endswith(base) and p.get("status") in TERMINAL:
            status_of[p.get("clientToken")] = p["status"]
        elif t.endswith(base + "/accepted") and p.get("clientToken") in status_of:
            accepted.append(status_of[p["clientToken"]])
    return accepted


def settled_acceptances(spy: stack.Spy, job_id: str, timeout: float = 10.0) -> list[str]:
    """terminal_acceptances once the first has been recorded (the service may show the terminal
    status a moment before the spy has the reply). Called after the next job has finished, so a
    resend of this job's terminal update (the outbox goes first) would already be counted."""
    spy.wait_for(lambda t, p: bool(terminal_acceptances(spy, job_id)), timeout,
                 what=f"the acceptance of {job_id}'s terminal update")
    return terminal_acceptances(spy, job_id)


# -- a: the link goes dead for 30 s in the middle of a job ---------------------------------------
def test_dead_link_mid_job_is_noticed_within_two_keepalives_and_the_job_succeeds(
        jobsd, mosquitto, iot, device, spy, proxy):
    thing = "dev-cut"
    iot.create_thing(thingName=thing)
    watch = spy(thing)
    dev = device(thing, tls=True, heap=HEAP, keepalive=KEEPALIVE, broker=proxy.address)
    watch.wait_for(lambda t, p: t.endswith("/jobs/start-next"), what="the first start-next")
    assert proxy.accepted == 1

    create_job(iot, "cut-job", thing, {"operation": "demo", "steps": 6, "step_ms": 1000})
    watch.wait_for(is_progress("cut-job"), what="the first IN_PROGRESS update")
    lost_before = count_lines(dev, "link lost")
    proxy.cut()
    t_cut = time.monotonic()
    seen_at_cut = len(watch.messages)

    # The device must find the dead link by itself (keepalive, bounded waits) ...
    stack.wait_until(lambda: count_lines(dev, "link lost") > lost_before, CUT_S,
                     "the device to log 'link lost' while the link is dead", 0.05)
    noticed = time.monotonic() - t_cut
    # ... then the rest of the 30 s outage (the scenario itself, not a wait for a condition)
    time.sleep(max(0.0, t_cut + CUT_S - time.monotonic()))
    through = watch.messages[seen_at_cut:]
    proxy.restore()

    assert not [t for t, _ in through if t.rsplit("/", 1)[-1] in ("update", "start-next", "get")], \
        f"device requests crossed a dead link: {through}"

    ex = wait_execution(iot, "cut-job", thing, TERMINAL, 120, device=dev)
    # both failures in one report: when the link loss was noticed, and how the job ended
    assert ex["status"] == "SUCCEEDED" and noticed <= 2 * KEEPALIVE, (
        f"job ended {ex['status']} {ex.get('statusDetails')}; dead link noticed {noticed:.1f}s after "
        f"the cut (at most {2 * KEEPALIVE}s: two keepalive periods)\n{full_log(dev)[-3000:]}")
    assert ex["statusDetails"]["detailsMap"]["reason"] == "OK", ex
    assert ex["statusDetails"]["detailsMap"]["steps"] == "6", ex
    assert proxy.accepted > 1, "the device never reconnected through the proxy"

    create_job(iot, "after-cut", thing, {"operation": "demo", "steps": 1})
    ex = wait_execution(iot, "after-cut", thing, TERMINAL, 30, device=dev)
    assert ex["status"] == "SUCCEEDED", ex
    assert settled_acceptances(watch, "cut-job") == ["SUCCEEDED"]
    assert_healthy(dev)


# -- b: the broker restarts in the middle of a job -------------------------------------------------
def test_broker_restart_mid_job_ends_with_exactly_one_terminal_update(
        jobsd, mosquitto, iot, device, wirespy):
    thing = "dev-restart"
    iot.create_thing(thingName=thing)
    watch = wirespy(thing)
    dev = device(thing, tls=True, heap=HEAP)
    watch.wait_for(lambda t, p: t.endswith("/jobs/start-next"), what="the first start-next")

    create_job(iot, "restart-job", thing, {"operation": "demo", "steps": 6, "step_ms": 800})
    watch.wait_for(is_progress("restart-job"), what="the first IN_PROGRESS update")
    connects = watch.connects
    mid = iot.describe_job_execution(jobId="restart-job", thingName=thing)["execution"]["status"]
    mosquitto.restart()
    assert mid == "IN_PROGRESS", f"the job was not running when the broker restarted: {mid}"
    stack.wait_until(lambda: watch.connects > connects, 10, "the spy to resubscribe")

    ex = wait_execution(iot, "restart-job", thing, TERMINAL, 120, device=dev)
    assert ex["status"] == "SUCCEEDED", (ex, full_log(dev)[-3000:])
    assert ex["statusDetails"]["detailsMap"] == {"reason": "OK", "steps": "6"}, ex
    # the terminal update reached the service once; any resend was answered /rejected
    assert "link lost" in full_log(dev)

    create_job(iot, "after-restart", thing, {"operation": "demo", "steps": 1})
    ex = wait_execution(iot, "after-restart", thing, TERMINAL, 60, device=dev)
    assert ex["status"] == "SUCCEEDED", ex
    assert settled_acceptances(watch, "restart-job") == ["SUCCEEDED"]
    assert settled_acceptances(watch, "after-restart") == ["SUCCEEDED"]
    assert_healthy(dev)


# -- c: every connection is dropped, five times, while a job runs -------------------------------
def test_repeated_connection_drops_during_a_job(jobsd, mosquitto, iot, device, wirespy, proxy):
    thing = "dev-drops"
    iot.create_thing(thingName=thing)
    watch = wirespy(thing)
    dev = device(thing, tls=True, heap=HEAP, broker=proxy.address)
    watch.wait_for(lambda t, p: t.endswith("/jobs/start-next"), what="the first start-next")

    create_job(iot, "drops-job", thing, {"operation": "demo", "steps": 16, "step_ms": 1000})
    watch.wait_for(is_progress("drops-job"), what="the first IN_PROGRESS update")
    for i in range(5):
        accepted, sent = proxy.accepted, watch.requests()
        proxy.drop_all()
        # reconnected: a new connection, and a request of the device through it reached the broker
        stack.wait_until(lambda a=accepted: proxy.accepted > a, 30,
                         f"the device to reconnect after drop {i + 1}", 0.05)
        stack.wait_until(lambda s=sent, a=accepted: proxy.accepted > a and watch.requests() > s
                         and proxy.open_connections() >= 1, 30,
                         f"a request over the new connection after drop {i + 1}", 0.05)
        status = iot.describe_job_execution(jobId="drops-job", thingName=thing)["execution"]["status"]
        assert status == "IN_PROGRESS", f"after drop {i + 1} the job is {status}: not mid-job any more"
    assert proxy.accepted >= 6

    ex = wait_execution(iot, "drops-job", thing, TERMINAL, 90, device=dev)
    assert ex["status"] == "SUCCEEDED", (ex, full_log(dev)[-3000:])
    assert ex["statusDetails"]["detailsMap"] == {"reason": "OK", "steps": "16"}, ex
    assert count_lines(dev, "link lost") >= 5, full_log(dev)[-3000:]

    create_job(iot, "after-drops", thing, {"operation": "demo", "steps": 1})
    assert wait_execution(iot, "after-drops", thing, TERMINAL, 60, device=dev)["status"] == "SUCCEEDED"
    assert settled_acceptances(watch, "drops-job") == ["SUCCEEDED"]
    assert_healthy(dev)


def test_netproxy_cut_restore_drop_and_stop(mosquitto):
    """The proxy itself: a cut holds bytes without closing, restore delivers them, drop_all
    closes, stop frees the port and its thread."""
    import socket
    import threading

    threads = threading.active_count()
    p = Proxy(mosquitto.port)  # the plain listener: speak raw MQTT through it
    try:
        c = socket.create_connection(("127.0.0.1", p.port), timeout=5)
        connect = bytes([0x10, 14, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 60, 0, 2]) + b"np"
        c.sendall(connect)
        assert c.recv(4)[:1] == b"\x20", "CONNACK through the proxy"
        p.cut()
        c.sendall(b"\xc0\x00")  # PINGREQ into the dead link
        c.settimeout(1.0)
        with pytest.raises(socket.timeout):
            c.recv(2)
        c2 = socket.create_connection(("127.0.0.1", p.port), timeout=5)  # held while cut
        p.restore()
        c.settimeout(5)
        assert c.recv(2) == b"\xd0\x00", "the held PINGREQ is answered after restore"
        assert p.accepted == 2
        p.drop_all()
        assert c.recv(2) == b"" and c2.recv(2) == b""
        assert p.open_connections() == 0
        c.close()
        c2.close()
    finally:
        p.stop()
    assert threading.active_count() == threads, "netproxy left a thread behind"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", p.port), timeout=1).close()



def test_proxy_cuts_after_a_byte_count_and_counts_connections():
    """netproxy.cut_after(n): the link goes dead once n more bytes have gone down to the
    client (a cut at a chosen point of a transfer); max_open counts connections open at once."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    sent = threading.Event()

    def serve():
        conn, _ = server.accept()
        with conn:
            conn.recv(1)
            conn.sendall(b"x" * 100_000)
            sent.set()
            conn.recv(1)  # held open until the client goes

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with Proxy(server.getsockname()[1]) as p:
        p.cut_after(30_000)
        client = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        client.sendall(b"g")
        got = 0
        while got < 30_000:  # up to the cut (10 s per read at most)
            got += len(client.recv(65536))
        assert p.cut_fired.wait(10) and p.is_cut
        client.settimeout(0.5)  # what was already on its way still arrives; then nothing
        try:
            while got < 100_000:
                chunk = client.recv(65536)
                if not chunk:
                    break
                got += len(chunk)
        except TimeoutError:
            pass
        assert 30_000 <= got < 100_000, got
        assert p.max_open == 1 and p.accepted == 1
        p.restore()
        client.settimeout(10)
        while got < 100_000:
            got += len(client.recv(65536))
        assert got == 100_000
        client.close()
    server.close()
