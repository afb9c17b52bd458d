# The transport's receive path when memory runs out: it never leaves the stream in the middle of
# a packet. A real TCP connection on loopback (the "broker" is a socket in this process that
# writes MQTT packets by hand and reads what the device sends back); allocation failures are
# real MemoryErrors (micropython.heap_lock), injected at each call of the transport in turn.
import select
import socket
import time
import micropython
from iotjobs import transport as TR
from iotjobs.transport import Transport
from oominject import Injector

TOPIC_A = b"$aws/things/dev1/jobs/start-next/accepted"
TOPIC_B = b"$aws/commands/things/dev1/executions/e-1/request/json"
TOPIC_C = b"$aws/things/dev1/jobs/notify-next"
TOPIC_D = b"$aws/things/dev1/jobs/j-1/update/accepted"
_PORT = [47200 + (time.ticks_ms() % 500) * 4]


def _pair():
    """A connected Transport (no CONNECT exchange) and the broker's end of its socket."""
    while True:
        _PORT[0] += 1
        addr = socket.getaddrinfo("127.0.0.1", _PORT[0])[0][-1]
        ls = socket.socket()
        try:
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(addr)
            break
        except OSError:
            ls.close()
    ls.listen(1)
    c = socket.socket()
    c.connect(addr)
    srv, _ = ls.accept()
    ls.close()
    t = Transport(b"dev1", "127.0.0.1", _PORT[0])
    c.settimeout(5)
    srv.settimeout(5)
    t.sock = c
    t.raw = c
    t._poll = select.poll()
    t._poll.register(c, select.POLLIN)
    t._last_rx = t._last_tx = time.ticks_ms()
    got = []
    t.set_callback(lambda topic, msg: got.append((topic, None if msg is None else bytes(msg),
                                                  t.lost if msg is None else 0)))
    return t, srv, got


def _varlen(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def publish(topic, payload, pid=0):
    body = len(topic).to_bytes(2, "big") + topic
    if pid:
        body += pid.to_bytes(2, "big")
    body += payload
    return bytes((0x32 if pid else 0x30,)) + _varlen(len(body)) + body


def _acks(srv, n):
    """The PUBACKs the device sent, as packet ids (n of them)."""
    buf = b""
    while len(buf) < 4 * n:
        buf += srv.read(4 * n - len(buf))
    out = []
    for i in range(n):
        p = buf[4 * i: 4 * i + 4]
        assert p[0] == 0x40 and p[1] == 2, p
        out.append(p[2] << 8 | p[3])
    return out


def _drain_waits(t, got, n, limit=20):
    for _ in range(limit):
        if len(got) >= n:
            return
        t.wait(1000)
    raise AssertionError("only %d of %d messages arrived: %r" % (len(got), n, got))


_INJ = []


def _injector():
    if not _INJ:
        inj = Injector()
        inj.patch_class(Transport)
        _INJ.append(inj)
    return _INJ[0]


def _case(fail_at, payload_a=b'{"clientToken":"x"}', pid_a=7):
    """Send A, B, C; the transport's `fail_at`-th call (0: none) runs with the heap locked."""
    t, srv, got = _pair()
    inj = _injector()
    srv.write(publish(TOPIC_A, payload_a, pid_a) + publish(TOPIC_B, b'{"command":"ping"}', 8)
              + publish(TOPIC_C, b"{}", 9) + publish(TOPIC_D, b"{}", 10))
    inj.arm(fail_at)
    raised = 0
    upto_c = 0
    for _ in range(20):
        if got and got[-1][0] == TOPIC_D:
            break
        if not upto_c and got and got[-1][0] == TOPIC_C:
            upto_c = inj.calls
        try:
            t.wait(1000)
        except MemoryError:
            raised += 1  # the callback's own allocation: after the packet, never inside it
    inj.at = 0
    inj.upto_c = upto_c
    return t, srv, got, inj, raised


def _first_call_locked(name, packets, n):
    """Send `packets`; the first call of Transport.<name> runs with the heap locked (a real
    MemoryError at its first allocation). What the callback got, and the broker's end."""
    t, srv, got = _pair()
    orig = getattr(Transport, name)
    calls = [0]

    def failing(self, size):
        calls[0] += 1
        if calls[0] != 1:
            return orig(self, size)
        micropython.heap_lock()
        try:
            return orig(self, size)
        finally:
            micropython.heap_unlock()

    setattr(Transport, name, failing)
    try:
        srv.write(packets)
        _drain_waits(t, got, n)
    finally:
        setattr(Transport, name, orig)
    return t, srv, got


def test_a_topic_that_cannot_be_allocated_is_drained_and_acknowledged():
    t, srv, got = _first_call_locked("_topic", publish(TOPIC_A, b"{}", 7)
                                     + publish(TOPIC_B, b"{}", 8), 2)
    assert got[0] == (None, None, TR.NO_MEMORY), got
    assert got[1] == (TOPIC_B, b"{}", 0), got  # the next message is whole
    assert _acks(srv, 2) == [7, 8]
    assert t.lost_count == 1


def test_a_payload_that_cannot_be_allocated_is_no_memory_not_too_large():
    t, srv, got = _first_call_locked("_payload", publish(TOPIC_A, b'{"a":1}', 7)
                                     + publish(TOPIC_B, b'{"b":2}', 8), 2)
    assert got == [(TOPIC_A, None, TR.NO_MEMORY), (TOPIC_B, b'{"b":2}', 0)], got
    assert _acks(srv, 2) == [7, 8]
    assert t.lost_count == 1


def test_over_the_limit_is_too_large_and_the_stream_stays_whole():
    t, srv, got = _pair()
    big = b"x" * (TR.MAX_PACKET + 1)
    srv.write(publish(TOPIC_A, big, 7))
    srv.write(publish(TOPIC_B, b"{}", 8))
    _drain_waits(t, got, 2)
    assert got == [(TOPIC_A, None, TR.TOO_LARGE), (TOPIC_B, b"{}", 0)], [g[:1] for g in got]
    assert _acks(srv, 2) == [7, 8]
    assert t.lost_count == 0


def test_control_packets_and_a_lost_publish_allocate_nothing():
    t, srv, got = _pair()
    # SUBACK (pid 3, granted 1), PUBACK (pid 4), PINGRESP, then a PUBLISH: with the heap locked
    # throughout, the first three are read without a single allocation and the PUBLISH is
    # drained and acknowledged (its topic cannot be held).
    srv.write(b"\x90\x03\x00\x03\x01" + b"\x40\x02\x00\x04" + b"\xd0\x00"
              + publish(TOPIC_A, b"{}", 9) + publish(TOPIC_B, b"{}", 10))
    kinds = [0, 0, 0, 0]
    slot = [1, 1, 0]
    cb = t.cb

    def store(topic, msg):  # a callback that allocates nothing either
        slot[0] = topic
        slot[1] = msg
        slot[2] = t.lost

    t.set_callback(store)
    t._ping_at = time.ticks_ms()
    done = 0
    micropython.heap_lock()
    try:
        for i in range(4):
            kinds[i] = t._packet(t._try_byte())
            done += 1
    except MemoryError:
        pass
    micropython.heap_unlock()
    assert done == 4, "allocated on the receive path (in packet %d)" % (done + 1)
    assert kinds == [0x90, 0x40, 0xD0, 0x30], kinds
    assert t._acked == 4 and t._suback_rc == 1 and t._ping_at is None
    assert slot == [None, None, TR.NO_MEMORY], slot
    t.set_callback(cb)
    _drain_waits(t, got, 1)
    assert got[0] == (TOPIC_B, b"{}", 0)
    assert _acks(srv, 2) == [9, 10]


def test_every_transport_call_failing_in_turn_never_desynchronises_the_stream():
    # a clean run counts the transport's calls for three messages; then each call in turn runs
    # with the heap locked: the message after the failure always arrives whole, every message
    # is acknowledged, and a message is either whole or reported lost (NO_MEMORY), never torn
    _, _, got, inj, _ = _case(0)
    total = inj.upto_c  # the calls that carry A, B and C (D is the message after them all)
    assert total >= 9 and len(got) == 4, (total, got)
    whole = {TOPIC_A: b'{"clientToken":"x"}', TOPIC_B: b'{"command":"ping"}', TOPIC_C: b"{}",
             TOPIC_D: b"{}"}
    fired = {}
    for n in range(1, total + 1):
        t, srv, got, inj, raised = _case(n)
        assert got[-1] == (TOPIC_D, b"{}", 0), (n, inj.fired, got)
        # each message is seen, or its callback was the allocation that failed (after the
        # whole packet was read)
        assert len(got) + raised == 4, (n, inj.fired, got, raised)
        for topic, msg, lost in got:
            if msg is None:
                assert lost == TR.NO_MEMORY and (topic is None or topic in whole), (n, got)
            else:
                assert whole.get(topic) == msg and lost == 0, (n, inj.fired, got)
        assert _acks(srv, 4) == [7, 8, 9, 10], (n, inj.fired)
        fired[inj.fired] = fired.get(inj.fired, 0) + 1
        t.sock.close()
        srv.close()
    # the sweep did reach the allocations that matter
    assert "Transport._topic" in fired and "Transport._payload" in fired, fired
