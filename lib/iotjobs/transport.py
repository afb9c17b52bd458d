# MQTT transport: a thin subclass of umqtt.simple.MQTTClient (the umqtt.robust pattern) that
# fixes what 1.3.4 gets wrong on MicroPython 1.2x (PLATFORM.md):
#  - TLS through an SSLContext (CERT_REQUIRED is the caller's context's job) instead of `ussl`;
#  - TCP_NODELAY and one socket write per packet (no 44 ms Nagle stall per publish);
#  - SUBSCRIBE with a real variable-length header (jobs filters exceed 122 bytes);
#  - bounded waits: connect/read timeouts, wait(timeout_ms) with keepalive PINGs;
#  - reconnect with exponential backoff and jitter, then resubscribe.
# Every failure of the connection surfaces as OSError, so one `except OSError` drives recovery.
#
# The receive path never leaves the stream in the middle of a packet: headers, packet ids and the
# topic are read into buffers allocated once; the topic and the payload objects are allocated
# before the payload is consumed, and when either allocation fails (MemoryError) the rest of the
# packet is drained through a fixed buffer and acknowledged. The callback then gets msg=None and
# `lost` says why: TOO_LARGE (over MAX_PACKET, a verdict) or NO_MEMORY (this heap, now: worth
# asking again). A MemoryError raised by the callback itself comes after the whole packet.
import socket
import select
import time
from micropython import const
from umqtt.simple import MQTTClient

_DEBUG = const(False)

_PUBLISH = const(0x30)
_PUBACK = const(0x40)
_SUBACK = const(0x90)
_PINGRESP = const(0xD0)
_IPPROTO_TCP = const(6)
_EAGAIN = const(11)
_POLL_SLICE_MS = const(500)
_TCP_NODELAY = const(1)
# Largest inbound PUBLISH held in RAM: a 32 KB job document plus its envelope. Larger packets
# are drained through a small buffer and reported to the callback with msg=None.
MAX_PACKET = const(40 * 1024)
# AWS IoT topics are at most 256 bytes; a longer one is drained and reported with topic None.
TOPIC_BUF = const(256)
_DRAIN = const(256)  # the topic buffer, reused
# Why the callback got msg=None (in `lost`).
TOO_LARGE = const(1)
NO_MEMORY = const(2)


class Transport(MQTTClient):
    def __init__(
        self,
        client_id,
        server,
        port=0,
        ssl=None,
        server_hostname=None,
        keepalive=60,
        timeout=10,
        backoff_ms=1000,
        backoff_max_ms=60000,
        log=None,
    ):
        super().__init__(client_id, server, port or (8883 if ssl else 1883), keepalive=keepalive)
        self.ssl = ssl  # an SSLContext, or None for plain TCP
        self.hostname = server_hostname or server
        self.timeout = timeout
        self.backoff_ms = backoff_ms
        self.backoff_max_ms = backoff_max_ms
        self.log = log
        self.subs = []  # (topic, qos) to restore after a reconnect
        self.raw = None
        self._poll = None
        self._last_tx = 0
        self._last_rx = 0
        self._ping_at = None
        self._acked = -1  # last PUBACK / SUBACK packet id
        self._suback_rc = 0
        # Receive buffers, allocated once: nothing on the receive path allocates before it
        # knows the whole packet can be consumed.
        self._b1 = bytearray(1)
        self._b4 = bytearray(4)
        self._tbuf = bytearray(TOPIC_BUF)
        self._drain = self._tbuf  # one buffer: a topic is copied out (or given up) before a drain
        self._ack = bytearray(b"\x40\x02\x00\x00")
        self.lost = 0  # TOO_LARGE or NO_MEMORY: why the callback's last msg was None
        self.lost_count = 0  # messages lost to a lack of memory since start

    # -- connection --------------------------------------------------------------------------
    def connect(self, clean_session=True):
        self.close()
        addr = socket.getaddrinfo(self.server, self.port, 0, socket.SOCK_STREAM)[0][-1]
        raw = s = socket.socket()
        try:
            s.settimeout(self.timeout)
            try:
                s.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
            except OSError:
                pass
            s.connect(addr)
            if self.ssl is not None:
                s = self.ssl.wrap_socket(s, server_hostname=self.hostname)
        except Exception as e:
            raw.close()
            raise e if isinstance(e, OSError) else OSError(str(e))
        self.sock = s
        self.raw = raw  # the TCP socket under TLS: polled directly (see wait)
        cid = self.client_id
        if isinstance(cid, str):
            cid = cid.encode()
        body = bytearray(b"\x00\x04MQTT\x04\x00\x00\x00")
        body[7] = clean_session << 1
        body[8] = self.keepalive >> 8
        body[9] = self.keepalive & 0xFF
        pkt = bytearray(b"\x10") + _varlen(len(body) + 2 + len(cid)) + body
        pkt += len(cid).to_bytes(2, "big") + cid
        self._write(pkt)
        resp = self._read(4)
        if resp[0] != 0x20 or resp[1] != 2:
            self.close()
            raise OSError("bad CONNACK")
        if resp[3]:
            self.close()
            raise OSError("CONNACK refused %d" % resp[3])
        self._poll = select.poll()
        self._poll.register(raw, select.POLLIN)
        self._ping_at = None
        self._last_rx = time.ticks_ms()
        return resp[2] & 1

    def close(self):
        s = self.sock
        self.sock = None
        self.raw = None
        self._poll = None
        if s is not None:
            try:
                s.close()
            except OSError:
                pass

    def disconnect(self):
        try:
            self._write(b"\xe0\x00")
        except (OSError, AttributeError):
            pass
        self.close()

    @property
    def connected(self):
        return self.sock is not None

    def try_reconnect(self):
        """One attempt to connect and resubscribe (OSError if it fails)."""
        try:
            self.connect()
            for topic, qos in self.subs:
                self._subscribe(topic, qos)
        except OSError:
            self.close()
            raise

    def reconnect(self, sleep_ms=time.sleep_ms):
        """Connect and resubscribe, retrying for ever with exponential backoff and jitter."""
        import random

        delay = self.backoff_ms
        while True:
            try:
                self.try_reconnect()
                return
            except OSError as e:
                self.close()
                wait = delay // 2 + random.getrandbits(16) % (delay // 2 + 1)
                if self.log:
                    self.log("mqtt: connect failed (%r), retry in %d ms" % (e, wait))
                sleep_ms(wait)
                delay = min(delay * 2, self.backoff_max_ms)

    # -- outbound ----------------------------------------------------------------------------
    def _write(self, buf):
        if self.sock is None:
            raise OSError("not connected")
        self.sock.write(buf)
        self._last_tx = time.ticks_ms()

    def _next_pid(self):
        self.pid = self.pid % 65535 + 1
        return self.pid

    def publish(self, topic, msg, retain=False, qos=0, wait=True):
        """Send one PUBLISH in a single write; for QoS 1 wait (bounded) for its PUBACK unless
        `wait` is False (a request whose reply proves delivery needs no PUBACK wait)."""
        sz = 2 + len(topic) + len(msg) + (2 if qos else 0)
        head = bytearray(1)
        head[0] = _PUBLISH | qos << 1 | retain
        pkt = head + _varlen(sz) + len(topic).to_bytes(2, "big") + topic
        if qos:
            pid = self._next_pid()
            pkt += pid.to_bytes(2, "big")
        pkt += msg
        self._write(pkt)
        if qos and wait:
            self._await_ack(pid)

    def subscribe(self, topic, qos=1):
        if isinstance(topic, str):
            topic = topic.encode()
        self._subscribe(topic, qos)
        for t, _ in self.subs:
            if t == topic:
                return
        self.subs.append((topic, qos))

    def unsubscribe(self, topic):
        """Forget a subscription (a reconnect no longer restores it) and tell the broker; the
        UNSUBACK is not awaited (the receive path skips it)."""
        self.subs = [s for s in self.subs if s[0] != topic]
        if self.sock is not None:
            pkt = bytearray(b"\xa2") + _varlen(2 + 2 + len(topic))
            pkt += self._next_pid().to_bytes(2, "big") + len(topic).to_bytes(2, "big") + topic
            self._write(pkt)

    def _subscribe(self, topic, qos):
        pid = self._next_pid()
        pkt = bytearray(b"\x82") + _varlen(2 + 2 + len(topic) + 1)
        pkt += pid.to_bytes(2, "big") + len(topic).to_bytes(2, "big") + topic + bytes((qos,))
        self._write(pkt)
        self._await_ack(pid)
        if self._suback_rc == 0x80:
            raise OSError("SUBSCRIBE refused: %s" % topic)

    def ping(self):
        self._write(b"\xc0\x00")
        if self._ping_at is None:
            self._ping_at = time.ticks_ms()

    # -- inbound -----------------------------------------------------------------------------
    def _read(self, n):
        """n bytes as a new object (the CONNACK only: the receive path uses _fill)."""
        b = bytearray(n)
        self._fill(b, n)
        return b

    def _fill(self, buf, n):
        """Read exactly n bytes into buf[0:n]; allocates nothing."""
        if not n:
            return
        got = self.sock.readinto(buf, n)
        if not got:
            raise OSError("connection closed")
        b1 = self._b1
        while got < n:  # a short read (rare for headers): byte by byte, still no allocation
            if not self.sock.readinto(b1):
                raise OSError("connection closed")
            buf[got] = b1[0]
            got += 1

    def _skip(self, n):
        """Consume n bytes through the drain buffer."""
        d = self._drain
        while n > 0:
            k = self.sock.readinto(d, n if n < _DRAIN else _DRAIN)
            if not k:
                raise OSError("connection closed")
            n -= k

    def _readinto(self, mv):
        got = 0
        n = len(mv)
        while got < n:
            try:
                k = self.sock.readinto(mv[got:] if got else mv)
            except MemoryError:
                # The slice could not be allocated (nothing was read): one byte at a time.
                k = self.sock.readinto(self._b1)
                if k:
                    mv[got] = self._b1[0]
            if not k:
                raise OSError("connection closed")
            got += k

    def _recv_len(self):
        n = 0
        sh = 0
        b1 = self._b1
        while True:
            self._fill(b1, 1)
            b = b1[0]
            n |= (b & 0x7F) << sh
            if not b & 0x80:
                return n
            sh += 7
            if sh > 21:
                raise OSError("bad remaining length")

    def _await_ack(self, pid):
        deadline = time.ticks_add(time.ticks_ms(), self.timeout * 1000)
        while self._acked != pid:
            left = time.ticks_diff(deadline, time.ticks_ms())
            if left <= 0:
                raise OSError("no ack for packet %d" % pid)
            self.wait(left)

    def _keepalive(self):
        """PING after half a keepalive without sending or without receiving; a PING unanswered
        for another half is a dead link (OSError): a silent drop is noticed within one
        keepalive period of the last packet received."""
        if not self.keepalive:
            return
        now = time.ticks_ms()
        half = self.keepalive * 500
        if self._ping_at is not None:
            if time.ticks_diff(now, self._ping_at) > half:
                raise OSError("keepalive: no PINGRESP")
        elif time.ticks_diff(now, self._last_tx) >= half or time.ticks_diff(now, self._last_rx) >= half:
            self.ping()

    def _try_byte(self):
        """The next byte if one is ready, else None; never blocks, never allocates. Tried
        before polling: TLS may hold decrypted bytes the TCP socket no longer shows."""
        raw = self.raw
        raw.settimeout(0)
        try:
            k = self.sock.readinto(self._b1)
        except OSError as e:
            if e.args and e.args[0] == _EAGAIN:
                return None
            raise
        finally:
            raw.settimeout(self.timeout)
        if k is None:
            return None
        if not k:
            raise OSError("connection closed")
        return self._b1[0]

    def wait(self, timeout_ms):
        """Process at most one incoming packet, waiting up to timeout_ms for it.

        Returns the packet type, or None when nothing arrived in time. Polls the TCP socket
        itself: polling a TLS socket object falls back to 1 ms sleeps in MicroPython, which
        cost a millisecond or more on every packet."""
        if self.sock is None:
            raise OSError("not connected")
        deadline = time.ticks_add(time.ticks_ms(), max(0, timeout_ms))
        while True:
            self._keepalive()  # on every pass: a long wait must not hide a dead link
            op = self._try_byte()
            if op is not None:
                return self._packet(op)
            left = time.ticks_diff(deadline, time.ticks_ms())
            if left <= 0:
                return None
            self._poll.poll(min(left, _POLL_SLICE_MS))

    def check_msg(self):
        return self.wait(0)

    def wait_msg(self):
        """Read and process exactly one packet (blocking, bounded by the socket timeout)."""
        self._fill(self._b1, 1)
        return self._packet(self._b1[0])

    def _packet(self, op):
        self._last_rx = time.ticks_ms()
        sz = self._recv_len()
        kind = op & 0xF0
        if kind == _PUBLISH:
            self._publish_in(op, sz)
        elif (kind == _PUBACK or kind == _SUBACK) and 2 <= sz <= 4:
            b = self._b4
            self._fill(b, sz)
            self._acked = b[0] << 8 | b[1]
            if kind == _SUBACK:
                self._suback_rc = b[2] if sz > 2 else 0
        else:
            if kind == _PINGRESP:
                self._ping_at = None
            self._skip(sz)
        return kind

    def _topic(self, n):
        """The topic read into the topic buffer, as bytes (the first allocation of a PUBLISH)."""
        return bytes(memoryview(self._tbuf)[:n])

    def _payload(self, n):
        """The payload's buffer, allocated before a byte of it is read."""
        return bytearray(n)

    def _publish_in(self, op, sz):
        b = self._b4
        self._fill(b, 2)
        tlen = b[0] << 8 | b[1]
        sz -= 2
        if tlen > sz:
            raise OSError("bad PUBLISH")
        topic = None
        msg = None
        lost = NO_MEMORY
        if tlen <= TOPIC_BUF:
            self._fill(self._tbuf, tlen)
        else:
            self._skip(tlen)  # longer than any AWS topic: nobody's
            lost = TOO_LARGE
        sz -= tlen
        qos = (op >> 1) & 3
        pid = 0
        if qos:
            self._fill(b, 2)
            pid = b[0] << 8 | b[1]
            sz -= 2
        if sz < 0:
            raise OSError("bad PUBLISH")
        if lost != TOO_LARGE:
            try:
                topic = self._topic(tlen)
                if sz > MAX_PACKET:
                    lost = TOO_LARGE
                else:
                    msg = self._payload(sz)
                    self._readinto(memoryview(msg))
                    sz = 0
            except MemoryError:
                msg = None
        self._skip(sz)  # what could not be held: the stream stays whole
        if qos == 1:
            a = self._ack
            a[2] = pid >> 8
            a[3] = pid & 0xFF
            self._write(a)
        if _DEBUG:
            print("mqtt <", topic, sz)
        if msg is None:
            self.lost = lost
            if lost == NO_MEMORY:
                self.lost_count += 1
        self.cb(topic, msg)


def _varlen(n):
    """MQTT remaining-length bytes for n (1 to 4 bytes)."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return out
