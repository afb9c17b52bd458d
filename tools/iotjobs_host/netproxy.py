"""A loopback TCP proxy that can break the network under a device, for tests.

It sits between devices and a broker listener and forwards bytes only, so mutual TLS stays end to
end (the device keeps checking the broker's name and certificate). Four faults:

- cut(): a dead link, as when Wi-Fi drops. Nothing is forwarded in either direction and no socket
  is closed, so neither end is told anything; only its own timers (keepalive, reply and socket
  timeouts) can find out. Connections accepted during a cut are held, not forwarded (a dead link
  answers no handshake). restore() lets the held bytes through, as TCP retransmission would.
  cut(seconds) restores by itself after that long (a blackhole of a set length).
- drop_all(): every connection closed at once, as a broker or NAT that forgets its flows.
- slow(delay_ms, rate): a slow link. Every byte is held delay_ms before it is passed on, and/or
  each direction of each connection carries at most `rate` bytes a second; slow(..., seconds=S)
  ends by itself after S seconds, fast() at once (what was held then goes at full speed).
- stop(): the proxy goes away (listener, connections and its one thread).

One selector thread does all socket work; the public methods hand it a command and wait until it
has been applied, so after cut() returns not one more byte is forwarded. The thread sleeps
until a socket, a command or a deadline of its own (a timed cut or slow link, a held chunk, a
rate limit) needs it: an idle proxy costs no CPU."""
from __future__ import annotations

import collections
import queue
import selectors
import socket
import threading
import time

_CHUNK = 64 * 1024
_HIGH_WATER = 1 << 20  # stop reading one side while this much waits to be sent to the other
_LISTEN = "listen"
_WAKE = "wake"


class _Conn:
    """One proxied connection: side 0 is the client (device), side 1 the target (broker)."""

    def __init__(self, down: socket.socket) -> None:
        self.socks: list[socket.socket | None] = [down, None]
        self.out = [bytearray(), bytearray()]  # bytes waiting to be sent on socks[i]
        # slow(): chunks held until their time (monotonic), before they join out[i]
        self.later: list[collections.deque[tuple[float, bytes]]] = [collections.deque(),
                                                                    collections.deque()]
        self.tokens = [0.0, 0.0]  # slow(rate): bytes that may be sent on socks[i] now
        self.closed = False

    def pending(self, side: int) -> int:
        """Bytes waiting to go out on socks[side] (held by a slow link included)."""
        return len(self.out[side]) + sum(len(b) for _, b in self.later[side])

    def close(self) -> None:
        self.closed = True
        for s in self.socks:
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass


class Proxy:
    """Proxy(target_port) listens on 127.0.0.1:<port> and forwards to target_host:target_port."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1",
                 host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server((host, 0), backlog=64)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0  # connections accepted since start (a reconnect adds one)
        self.max_open = 0  # the most connections open at once since start
        self.down_bytes = 0  # bytes passed on to the clients since start
        self._cut_at: int | None = None
        self.cut_fired = threading.Event()  # set when a cut_after() cut took effect
        self._cut = False
        self._restore_at: float | None = None  # a timed cut ends then (monotonic)
        self._delay = 0.0  # slow(): seconds each chunk is held
        self._rate: float | None = None  # slow(): bytes a second per direction of a connection
        self._slow_until: float | None = None
        self._refilled = time.monotonic()
        self._conns: list[_Conn] = []
        self._registered: dict[socket.socket, int] = {}
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ, _LISTEN)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._cmds: queue.Queue[tuple[str, object, threading.Event]] = queue.Queue()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=f"netproxy-{self.port}", daemon=True)
        self._thread.start()

    # -- control (any thread) --------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def is_cut(self) -> bool:
        return self._cut

    def open_connections(self) -> int:
        return sum(1 for c in self._conns if not c.closed)

    @property
    def is_slow(self) -> bool:
        return self._delay > 0 or self._rate is not None

    def cut(self, seconds: float | None = None) -> None:
        """Blackhole every connection, present and future, without closing any; with `seconds`,
        restore() follows by itself after that long."""
        if seconds is not None and seconds < 0:
            raise ValueError("seconds must be >= 0")
        self._command("cut", seconds)

    def slow(self, delay_ms: float = 0, rate: float | None = None,
             seconds: float | None = None) -> None:
        """A slow link for every connection, present and future: each chunk held `delay_ms`
        before it is passed on, and/or at most `rate` bytes a second in each direction of each
        connection; with `seconds`, fast() follows by itself after that long."""
        if delay_ms < 0 or (rate is not None and rate <= 0) or (seconds is not None and seconds < 0):
            raise ValueError("delay_ms >= 0, rate > 0 and seconds >= 0")
        self._command("slow", (delay_ms / 1000.0, rate, seconds))

    def fast(self) -> None:
        """End slow(): what it holds goes on at once, at full speed."""
        self._command("fast")

    def cut_after(self, nbytes: int) -> None:
        """Blackhole every connection (as cut()) once `nbytes` more bytes have gone down to the
        clients: a cut at a chosen point of a transfer, whatever its speed."""
        self.cut_fired.clear()
        self._cut_at = self.down_bytes + nbytes

    def restore(self) -> None:
        self._command("restore")

    def drop_all(self) -> None:
        """Close every connection (both of its sockets); the listener stays open."""
        self._command("drop")

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._thread.is_alive():
            self._command("stop")
        self._thread.join(10)

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _command(self, name: str, arg: object = None) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("netproxy is not running")
        done = threading.Event()
        self._cmds.put((name, arg, done))
        self._wake_w.send(b"x")
        if not done.wait(10):
            raise TimeoutError(f"netproxy did not apply {name}")

    # -- the selector thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            running = True
            while running:
                timeout = self._timers()
                self._update_interest()
                for key, events in self._sel.select(timeout=timeout):
                    data = key.data
                    if data == _LISTEN:
                        self._accept()
                    elif data == _WAKE:
                        running = self._run_commands()
                    else:
                        conn, side = data
                        if conn.closed:
                            continue
                        if events & selectors.EVENT_WRITE:
                            self._send(conn, side)
                        if events & selectors.EVENT_READ and not conn.closed:
                            self._recv(conn, side)
                self._conns = [c for c in self._conns if not c.closed]
        finally:
            for c in self._conns:
                c.close()
            self._conns = []
            self._sel.close()
            for s in (self._listener, self._wake_r, self._wake_w):
                s.close()
            # a caller still waiting for a command must not hang
            while not self._cmds.empty():
                self._cmds.get_nowait()[2].set()

    def _run_commands(self) -> bool:
        try:
            self._wake_r.recv(4096)
        except BlockingIOError:
            pass
        running = True
        while True:
            try:
                name, arg, done = self._cmds.get_nowait()
            except queue.Empty:
                return running
            if name == "cut":
                self._cut = True
                self._restore_at = None if arg is None else time.monotonic() + arg  # type: ignore[operator]
            elif name == "restore":
                self._restore()
            elif name == "slow":
                delay, rate, seconds = arg  # type: ignore[misc]
                self._release(time.monotonic())
                self._delay, self._rate = delay, rate
                self._slow_until = None if seconds is None else time.monotonic() + seconds
                self._refilled = time.monotonic()
                for c in self._conns:
                    c.tokens = [0.0, 0.0]
            elif name == "fast":
                self._fast()
            elif name == "drop":
                for c in self._conns:
                    self._close(c)
            elif name == "stop":
                running = False
            done.set()

    def _restore(self) -> None:
        self._cut = False
        self._restore_at = None
        for c in self._conns:
            if not c.closed and c.socks[1] is None:
                self._connect_target(c)

    def _fast(self) -> None:
        self._delay, self._rate, self._slow_until = 0.0, None, None
        for c in self._conns:
            for side in (0, 1):
                while c.later[side]:
                    c.out[side] += c.later[side].popleft()[1]

    def _release(self, now: float) -> None:
        """Held chunks whose time has come join the send buffers."""
        for c in self._conns:
            for side in (0, 1):
                q = c.later[side]
                while q and q[0][0] <= now:
                    c.out[side] += q.popleft()[1]

    def _timers(self) -> float | None:
        """Apply what is due now (a timed cut or slow link ending, held chunks, the rate's
        refill); the select timeout until the next such moment (None: nothing scheduled)."""
        now = time.monotonic()
        if self._restore_at is not None and now >= self._restore_at:
            self._restore()
        if self._slow_until is not None and now >= self._slow_until:
            self._fast()
        wake = [t for t in (self._restore_at, self._slow_until) if t is not None]
        if self._delay > 0 or any(c.later[0] or c.later[1] for c in self._conns):
            self._release(now)
            wake += [c.later[side][0][0] for c in self._conns for side in (0, 1) if c.later[side]]
        if self._rate is not None:
            rate = self._rate
            burst = max(1024.0, rate / 20)
            gained = (now - self._refilled) * rate
            self._refilled = now
            for c in self._conns:
                for side in (0, 1):
                    c.tokens[side] = min(burst, c.tokens[side] + gained)
                    need = self._quantum(c, side)
                    if c.out[side] and c.tokens[side] < need and not self._cut:
                        wake.append(now + (need - c.tokens[side]) / rate)
        if not wake:
            return None
        return min(max(0.0, min(wake) - now), 1.0) + 0.001

    def _quantum(self, c: _Conn, side: int) -> float:
        """A rate-limited send waits for this many bytes' worth of tokens (about 50 sends a
        second at most, or all that waits), not for each byte."""
        assert self._rate is not None
        return min(float(len(c.out[side])), max(1.0, self._rate / 50))

    def _accept(self) -> None:
        while True:
            try:
                s, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.accepted += 1
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = _Conn(s)
            self._conns.append(c)
            self.max_open = max(self.max_open, self.open_connections())
            if not self._cut:
                self._connect_target(c)

    def _connect_target(self, c: _Conn) -> None:
        try:
            up = socket.create_connection(self.target, timeout=5)
        except OSError:
            self._close(c)  # the client sees its connection end, as when the port is closed
            return
        up.setblocking(False)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.socks[1] = up

    def _update_interest(self) -> None:
        """(Un)register each socket for what it needs now: nothing at all while cut."""
        want: dict[socket.socket, tuple[int, tuple[_Conn, int]]] = {}
        if not self._cut:
            for c in self._conns:
                if c.closed or c.socks[1] is None:
                    continue
                for side in (0, 1):
                    s = c.socks[side]
                    assert s is not None
                    mask = 0
                    if c.pending(1 - side) < _HIGH_WATER:
                        mask |= selectors.EVENT_READ
                    if c.out[side] and (self._rate is None
                                        or c.tokens[side] >= self._quantum(c, side)):
                        mask |= selectors.EVENT_WRITE
                    if mask:
                        want[s] = (mask, (c, side))
        for s in list(self._registered):
            if s not in want:
                if s.fileno() != -1:
                    self._sel.unregister(s)
                del self._registered[s]
        for s, (mask, data) in want.items():
            if s not in self._registered:
                self._sel.register(s, mask, data)
            elif self._registered[s] != mask:
                self._sel.modify(s, mask, data)
            self._registered[s] = mask

    def _recv(self, c: _Conn, side: int) -> None:
        s = c.socks[side]
        assert s is not None
        try:
            data = s.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            # One end went away: pass on what it said last, then end the other end too.
            self._send(c, 1 - side)
            self._close(c)
            return
        if self._delay > 0:
            c.later[1 - side].append((time.monotonic() + self._delay, data))
            return
        if c.later[1 - side]:  # bytes held from before: these go after them
            c.later[1 - side].append((0.0, data))
            return
        c.out[1 - side] += data
        self._send(c, 1 - side)

    def _send(self, c: _Conn, side: int) -> None:
        s = c.socks[side]
        buf = c.out[side]
        if s is None or not buf or c.closed:
            return
        limit = len(buf)
        if self._rate is not None:
            limit = min(limit, int(c.tokens[side]))
            if limit <= 0:
                return
        try:
            n = s.send(buf if limit == len(buf) else buf[:limit])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(c)
            return
        del buf[:n]
        if self._rate is not None:
            c.tokens[side] -= n
        if side == 0:
            self.down_bytes += n
            if self._cut_at is not None and self.down_bytes >= self._cut_at:
                self._cut_at = None
                self._cut = True
                self.cut_fired.set()

    def _close(self, c: _Conn) -> None:
        for s in c.socks:
            if s is not None and s in self._registered:
                self._sel.unregister(s)
                del self._registered[s]
        c.close()
