# Files over the MQTT connection the device already has: AWS IoT MQTT-based file delivery
# ("streams", STREAMS.md), JSON on the wire. One Fetch brings one file (`fileId` of stream S)
# into a sink, by block index:
#  - subscribes $aws/things/<T>/streams/<S>/data/json, .../rejected/json and
#    .../description/json before any request, and unsubscribes when it ends;
#  - on a fresh start describes the stream once: its version `s` (sent with every request, so a
#    stream that changes mid-file is refused by the service, never mixed) and the size `z`;
#  - asks for a window of missing blocks: `o` = the first missing block, a hex bitmap `b` of at
#    most `window` blocks (bit j = block o+j, least significant bit first, no bit past the last
#    block) and an explicit `n` (the bits set). One request in flight: the next one goes out when
#    every block of the window has arrived, or when `idle_ms` pass without a good block (it then
#    asks again for what is missing); `tries` requests in a row without a good block end FAILED
#    STREAM_TIMEOUT;
#  - checks each data message (file id `f`, absolute index `i` < nblocks, `l` = the block size or
#    the remainder for the last block, the payload's length); repeats, strangers, malformed and
#    oversized messages are counted and dropped, never raised. A good block goes to the sink at
#    byte offset i * l, then its bit is cleared;
#  - keeps the bitmap (1 bit per block, set = missing) in a bytearray and journals it through
#    `on_checkpoint` every `every` blocks, before each progress report: after a power cut only
#    the missing blocks, and at most `every` blocks written after the last checkpoint, are
#    fetched again (`state` brings a checkpoint back).
# The fetch loop waits in transport.wait, so the jobs client's callbacks run meanwhile (progress
# reports, cancellation through ctx.progress, commands queued by the commands module): the
# stream's topics are routed through the client's `on_other` chain, everything else goes on to
# whoever held it before.
#
# Memory: a data message is parsed in place, without json.loads: the keys are scanned in the
# message's own bytearray, the base64 payload is decoded in slices back into the same buffer
# (the decoded bytes never overtake the text still to read) and the sink gets a memoryview of
# it. Per block that leaves the transport's topic and payload objects, and a few short-lived
# 384-byte pieces from binascii (no second block-sized allocation). The block size is chosen
# from the free heap (1, 2 or 4 KiB), never larger than the transport can receive.
import binascii
import time
from micropython import const
from .runner import JobFailed, JobRejected

IDLE_MS = const(10000)  # no good block for this long: ask again (FreeRTOS OTA's default)
TRIES = const(8)  # requests in a row without a good block before giving up
WINDOW = const(32)  # blocks per request at most (the bitmap's span)
_REQ_BYTES = const(131072)  # the service sends at most 128 KiB per request
_NBLOCKS_MAX = const(98304)  # the service's range for `o` and `n`
_CHECKPOINT_BYTES = const(65536)  # journal the bitmap about every 64 KB (flash wear vs rework)
_B64 = const(512)  # base64 characters decoded per slice (384 bytes)
_OVERHEAD = const(160)  # a data message beyond its base64 text: keys, token, topic
_TOKEN_MAX = const(64)

# Reasons (statusDetails["reason"]) of a fetch that fails.
R_TIMEOUT = "STREAM_TIMEOUT"
R_CHANGED = "STREAM_CHANGED"
R_NOT_FOUND = "STREAM_NOT_FOUND"
R_REJECTED = "STREAM_REJECTED"
R_SIZE = "SIZE_MISMATCH"
R_TOO_LARGE = "TOO_LARGE"
R_WRITE = "WRITE_FAILED"


def message_size(block):
    """Bytes of a JSON data message carrying `block` bytes (base64 plus keys, token, topic)."""
    return 4 * ((block + 2) // 3) + _OVERHEAD


def block_size(free=None, limit=None):
    """The block size for this heap: 4 KiB with 40 KB free, 2 KiB with 20 KB, else 1 KiB;
    never more than a transport holding `limit` bytes per message can receive."""
    if free is None:
        import gc

        gc.collect()
        free = gc.mem_free()
    if limit is None:
        from .transport import MAX_PACKET as limit
    b = 4096
    while b > 1024 and (free < 10 * b or message_size(b) > limit):
        b >>= 1
    return b


def stream_ref(obj):
    """(stream id, file id) of a document's `{"id": S, "fileId": F}`; JobRejected otherwise."""
    sid = obj.get("id") if isinstance(obj, dict) else None
    fid = obj.get("fileId", 0) if isinstance(obj, dict) else None
    if not isinstance(sid, str) or not 1 <= len(sid) <= 128 or not _safe(sid):
        raise JobRejected("BAD_ARGUMENT", "stream.id must be a stream name")
    if not isinstance(fid, int) or isinstance(fid, bool) or not 0 <= fid <= 255:
        raise JobRejected("BAD_ARGUMENT", "stream.fileId must be an integer 0..255")
    return sid, fid


def _safe(s):
    for c in s:
        if not ("a" <= c <= "z" or "A" <= c <= "Z" or "0" <= c <= "9" or c in "_-"):
            return False
    return True


def new_bitmap(nblocks):
    """Every block missing: bits 0..nblocks-1 set, the unused high bits of the last byte clear."""
    bm = bytearray(b"\xff" * ((nblocks + 7) >> 3))
    if nblocks & 7:
        bm[-1] = (1 << (nblocks & 7)) - 1
    return bm


def count(bm):
    """The bits set (missing blocks)."""
    n = 0
    for b in bm:
        while b:
            b &= b - 1
            n += 1
    return n


def window(bm, nblocks, o, span, out):
    """The request bitmap of the missing blocks o .. o+span-1 (bit j = block o+j, LSB first, no
    bit past the last block) into `out` (zeroed first). Returns (bits set, bytes used: trailing
    zero bytes are left off)."""
    for k in range(len(out)):
        out[k] = 0
    end = o + span
    if end > nblocks:
        end = nblocks
    n = 0
    last = -1
    for b in range(o, end):
        if bm[b >> 3] >> (b & 7) & 1:
            j = b - o
            out[j >> 3] |= 1 << (j & 7)
            n += 1
            last = j
    return n, (last >> 3) + 1


def hexbits(buf, nbytes):
    """The JSON form of a request bitmap: "0x" and two hex digits per byte, byte 0 first."""
    return "0x" + binascii.hexlify(memoryview(buf)[:nbytes]).decode()


class FileSink:
    """Blocks into a file by byte offset (download-file, application staging). A fresh start
    empties the file; a resumed one writes into what the power cut left."""

    def __init__(self, path, fresh):
        if fresh:
            with open(path, "wb"):
                pass
        self.f = open(path, "r+b")

    def write_at(self, off, data):
        f = self.f
        f.seek(off)
        f.write(data)

    def flush(self):
        self.f.flush()

    def close(self):
        self.f.close()


class Fetch:
    def __init__(self, client, stream_id, file_id, sink, size=None, block=0, state=None,
                 idle_ms=IDLE_MS, tries=TRIES, window=0, every=0, clock=time.ticks_ms,
                 log=None):
        self.client = client
        self.transport = client.transport
        self.sid = stream_id
        self.fid = file_id
        self.size = size  # the document's (None: the stream's description says)
        self.set_sink(sink)
        self.idle_ms = idle_ms
        self.tries = tries
        self.clock = clock
        self.log = log
        base = b"$aws/things/" + client.topics.thing + b"/streams/" + stream_id.encode() + b"/"
        self.prefix = base
        self.t_data = base + b"data/json"
        self.t_rejected = base + b"rejected/json"
        self.t_desc = base + b"description/json"
        self.t_get = base + b"get/json"
        self.version = None  # the stream's `s`
        self.z = None  # the file's size
        self.l = block  # noqa: E741 - the protocol's name for the block size
        self.bm = None
        self.nblocks = 0
        self.missing = 0
        self.resumed = False
        if state is not None:
            self._adopt(state)
        from .transport import MAX_PACKET

        if self.l < 256 or message_size(self.l) > MAX_PACKET:  # none, or one we cannot use
            self.l = block_size(None, MAX_PACKET)
        self.every = every or max(1, _CHECKPOINT_BYTES // self.l)
        # A window no larger than a checkpoint's worth: what arrives while a progress report
        # waits for its answer is one window at most, so at most `every` blocks are ever
        # written and not yet journaled.
        self.window = window or min(WINDOW, _REQ_BYTES // self.l, self.every)
        self._win = bytearray((self.window + 7) >> 3)
        import random

        self._tag = "%04x" % random.getrandbits(16)  # this fetch's tokens start with it
        # counters (tests and the final details read them)
        self.got = 0  # blocks written by this fetch
        self.dups = 0
        self.bad = 0  # malformed, wrong size, beyond the file
        self.foreign = 0  # another file id of the stream
        self.lost = 0  # dropped by the transport (too large or no memory) or by a MemoryError
        self.requests = 0
        # the request in flight
        self._o = 0
        self._span = 0
        self._pending = 0
        self._active = 0  # clock of the last request sent or good block
        self._misses = 0  # requests since the last good block
        self._low = 0  # no block below this one is missing
        self._since = 0  # good blocks since the last checkpoint
        self._reject = None  # (code, message) of a rejected reply
        self._desc = None
        self._error = None  # what the sink raised
        self._f = self._i = self._ln = self._ps = self._pe = 0  # _scan's results (no dict growth)
        self._prev = None
        self._ctx = None  # the job's context while run() runs
        self._cb = self._on_message
        self._on = False

    def set_sink(self, sink):
        """Where blocks go: `sink(offset, data)`, or an object with `write_at(offset, data)` and
        optionally `flush()` (called before each checkpoint). `data` is a memoryview of the
        message: write it out, do not keep it."""
        if hasattr(sink, "write_at"):
            self._put = sink.write_at
            self._flush = getattr(sink, "flush", None)
        else:
            self._put = sink
            self._flush = None

    # -- state -------------------------------------------------------------------------------
    def _adopt(self, st):
        """Continue from a checkpoint when it is about this very file; otherwise start over."""
        try:
            if st["id"] != self.sid or st["f"] != self.fid:
                return
            z, block = st["z"], st["l"]
            if self.size is not None and z != self.size:
                return
            nb = (z + block - 1) // block
            bm = bytearray(binascii.unhexlify(st["b"]))
            if len(bm) != (nb + 7) >> 3 or block < 256:
                return
            if nb & 7 and bm[-1] >> (nb & 7):
                return
        except (KeyError, TypeError, ValueError):
            return
        self.z, self.l, self.version = z, block, st.get("s")
        self.nblocks, self.bm, self.missing = nb, bm, count(bm)
        self.resumed = True

    def state(self):
        """The checkpoint: enough to continue after a power cut, with nothing fetched twice but
        what arrived after it. (Only asked once the bitmap `bm` exists.)"""
        return {"id": self.sid, "f": self.fid, "s": self.version, "l": self.l, "z": self.z,
                "b": binascii.hexlify(self.bm).decode()}  # pyright: ignore[reportArgumentType]

    def missing_between(self, lo, hi):
        """True when no byte in [lo, hi) has arrived yet (the OTA sink erases such a sector)."""
        bm, block = self.bm, self.l
        last = (hi - 1) // block
        if last >= self.nblocks:
            last = self.nblocks - 1
        for b in range(lo // block, last + 1):
            if not bm[b >> 3] >> (b & 7) & 1:
                return False
        return True

    # -- the loop ----------------------------------------------------------------------------
    def run(self, ctx, on_checkpoint=None, on_size=None):
        """Fetch every missing block. Returns the file's size; raises JobFailed with a reason.
        `on_checkpoint(state)` journals the state; `on_size(z)` learns the size of a fresh
        file before any block comes (it may refuse it by raising)."""
        t = self.transport
        self._ctx = ctx
        self.attach()
        subs = (self.t_data, self.t_rejected, self.t_desc)
        try:
            for topic in subs:
                self._call(ctx, t.subscribe, topic, 0)
            if not self.resumed:
                self._describe(ctx)
                z = self.z
                if self.size is not None and z != self.size:
                    raise JobFailed(R_SIZE, "the stream's file has %d bytes, the document says %d"
                                    % (z, self.size))
                if self.l < 256 or (z + self.l - 1) // self.l > _NBLOCKS_MAX:
                    raise JobFailed(R_TOO_LARGE, "the file is too large for a stream")
                if on_size is not None:
                    on_size(z)
                self.nblocks = nb = (z + self.l - 1) // self.l
                self.bm = new_bitmap(nb)
                self.missing = nb
                if on_checkpoint is not None:
                    on_checkpoint(self.state())
            elif self.log:
                self.log("stream %s/%d: resuming, %d of %d blocks missing"
                         % (self.sid, self.fid, self.missing, self.nblocks))
            self._loop(ctx, on_checkpoint)
            if self.log:
                self.log("stream %s/%d: %d blocks fetched of %d (%d repeats, %d bad, %d lost, "
                         "%d requests)" % (self.sid, self.fid, self.got, self.nblocks, self.dups,
                                           self.bad, self.lost, self.requests))
            return self.z
        finally:
            self.detach()
            self._ctx = None
            for topic in subs:
                try:
                    t.unsubscribe(topic)
                except OSError:
                    pass

    def attach(self):
        """Take the stream's topics out of the client's `on_other` chain (the rest goes on to
        whoever held it: the commands module)."""
        c = self.client
        self._prev = c.on_other
        c.on_other = self._cb
        self._on = True

    def detach(self):
        self._on = False  # a callback still chained behind a later hook only passes things on
        c = self.client
        if c.on_other is self._cb:
            c.on_other = self._prev

    def _call(self, ctx, fn, *args):
        """fn(*args), reconnecting (with backoff, within the job's deadline) on a lost link."""
        while True:
            try:
                return fn(*args)
            except OSError as e:
                self._relink(ctx, e)

    def _relink(self, ctx, e):
        t = self.transport
        t.close()
        if self.log:
            self.log("stream: link lost (%r): reconnecting" % (e,))
        delay = 500
        while True:
            ctx.check()
            ctx.point("stream-relink")
            ctx.runner.sleep_ms(delay)
            try:
                t.try_reconnect()  # restores every subscription, the stream's too
                self._active = None  # ask again at once
                return
            except OSError:
                delay = min(delay * 2, 8000)

    def _describe(self, ctx):
        t = self.transport
        payload = '{"c":"%sd"}' % self._tag
        misses = 0
        while self._desc is None:
            if misses >= self.tries:
                raise JobFailed(R_TIMEOUT, "the stream was not described after %d requests"
                                % misses)
            self._call(ctx, t.publish, self.prefix + b"describe/json", payload)
            misses += 1
            start = self.clock()
            while self._desc is None and time.ticks_diff(self.clock(), start) < self.idle_ms:
                self._call(ctx, t.wait, 250)
                self._raise_reject()
                ctx.check()
        d = self._desc
        self.version = d.get("s") if isinstance(d.get("s"), int) else None
        r = d.get("r")
        for e in r if isinstance(r, list) else ():
            if isinstance(e, dict) and e.get("f") == self.fid and isinstance(e.get("z"), int):
                self.z = e["z"]
                if self.z < 0:
                    break
                return
        raise JobFailed(R_NOT_FOUND, "the stream has no file %d" % self.fid)

    def _loop(self, ctx, on_checkpoint):
        t = self.transport
        while self.missing:
            self._raise_reject()
            if self._error is not None:
                e = self._error
                raise e if isinstance(e, JobFailed) else JobFailed(R_WRITE, "%s: %s" % (
                    type(e).__name__, e))
            now = self.clock()
            active = self._active
            if active is None or self._pending <= 0 or time.ticks_diff(now, active) >= self.idle_ms:
                if self._misses >= self.tries:
                    raise JobFailed(R_TIMEOUT, "no block came in %d requests" % self._misses,
                                    blocks="%d/%d" % (self.nblocks - self.missing, self.nblocks))
                self._call(ctx, self._request)
                active = self._active
            # `active` is not None here: _request() has just set it
            left = self.idle_ms - time.ticks_diff(self.clock(), active)  # pyright: ignore[reportCallIssue,reportArgumentType]
            self._call(ctx, t.wait, 250 if left > 250 else (left if left > 0 else 0))
            if self._since >= self.every and self.missing:
                self._checkpoint(ctx, on_checkpoint)
            ctx.check()
        self._raise_reject()
        self._checkpoint(ctx, on_checkpoint)

    def _checkpoint(self, ctx, on_checkpoint):
        if self._flush is not None:
            self._flush()  # the blocks are in flash before the bits that say so
        self._since = 0
        if on_checkpoint is not None:
            on_checkpoint(self.state())
        ctx.point("stream-checkpoint")
        ctx.progress(blocks="%d/%d" % (self.nblocks - self.missing, self.nblocks))
        if self._since >= self.every:  # a window's worth came while the report waited
            if self._flush is not None:
                self._flush()
            self._since = 0
            if on_checkpoint is not None:
                on_checkpoint(self.state())

    def _request(self):
        """Ask for the window that starts at the first missing block."""
        bm, nb = self.bm, self.nblocks
        o = self._low
        while o < nb and not bm[o >> 3] >> (o & 7) & 1:
            o = (o | 7) + 1 if not bm[o >> 3] >> (o & 7) else o + 1
        self._low = o
        span = min(self.window, nb - o)
        n, nbytes = window(bm, nb, o, span, self._win)
        self._o, self._span, self._pending = o, span, n
        s = "" if self.version is None else ',"s":%d' % self.version
        self.requests += 1
        payload = '{"c":"%s%d"%s,"f":%d,"l":%d,"o":%d,"n":%d,"b":"%s"}' % (
            self._tag, self.requests, s, self.fid, self.l, o, n, hexbits(self._win, nbytes))
        self._misses += 1
        self._active = self.clock()
        self.transport.publish(self.t_get, payload)

    def _raise_reject(self):
        r = self._reject
        if r is None:
            return
        code, msg = r
        if code in ("VersionMismatch", "ETagMismatch"):
            raise JobFailed(R_CHANGED, "the stream changed during the download", code=code)
        if code == "ResourceNotFound":
            raise JobFailed(R_NOT_FOUND, msg or "the stream or its file is gone", code=code)
        raise JobFailed(R_REJECTED, msg or "the stream service refused the request", code=code)

    # -- incoming (the MQTT callback) ---------------------------------------------------------
    def _on_message(self, topic, msg):
        p = self.prefix
        if not self._on or topic is None or not topic.startswith(p):
            prev = self._prev
            if prev is not None:
                prev(topic, msg)
            return
        if topic == self.t_data:
            if msg is None:
                self.lost += 1
                return
            try:
                self._block(msg)
            except MemoryError:
                self.lost += 1  # asked again when the window times out
            return
        if msg is None or len(msg) > 8192:
            self.lost += 1
            return
        if topic == self.t_rejected:
            d = self._json(msg)
            if d is None:
                return
            code = d.get("o") or d.get("code")
            token = d.get("c") or d.get("clientToken")
            if not isinstance(code, str):
                self.bad += 1
                return
            if isinstance(token, str) and not token.startswith(self._tag):
                self.foreign += 1  # an answer to a request of another fetch
                return
            m = d.get("m") or d.get("message")
            self._reject = (str(code), m if isinstance(m, str) else None)
        elif topic == self.t_desc:
            d = self._json(msg)
            if d is not None and self._desc is None and isinstance(d.get("r"), list):
                self._desc = d
        else:
            self.foreign += 1

    def _json(self, msg):
        import json

        try:
            d = json.loads(msg)
        except (ValueError, MemoryError):
            d = None
        if not isinstance(d, dict):
            self.bad += 1
            return None
        return d

    def _block(self, m):
        """One data message, checked and written; allocates only the decoding's pieces."""
        if not self._scan(m):
            self.bad += 1
            return
        # one name at a time: unpacking five values would build a tuple
        f = self._f
        i = self._i
        ln = self._ln
        ps = self._ps
        pe = self._pe
        if f != self.fid:
            self.foreign += 1
            return
        nb = self.nblocks
        if i < 0 or i >= nb or self.bm is None:
            self.bad += 1  # beyond the file
            return
        want = self.l if i < nb - 1 else self.z - i * self.l
        if ln != want:
            self.bad += 1
            return
        bm = self.bm
        if not bm[i >> 3] >> (i & 7) & 1:
            self.dups += 1
            return
        if m.find(b"\\", ps, pe) >= 0:  # "\/" is the only escape base64 text may carry
            pe = _unescape(m, ps, pe)
            if pe < 0:
                self.bad += 1
                return
        if pe - ps != 4 * ((ln + 2) // 3):
            self.bad += 1
            return
        mv = memoryview(m)
        w = ps
        k = ps
        try:
            while k < pe:
                e = k + _B64 if k + _B64 < pe else pe
                d = binascii.a2b_base64(mv[k:e])
                n = len(d)
                if w + n > e:  # cannot happen with base64: decoded text is shorter
                    raise ValueError
                mv[w:w + n] = d
                w += n
                k = e
        except ValueError:
            self.bad += 1
            return
        if w - ps != ln:
            self.bad += 1
            return
        try:
            self._put(i * self.l, mv[ps:w])
        except Exception as e:  # the loop fails the job with it (not a link failure)
            self._error = e
            return
        bm[i >> 3] &= ~(1 << (i & 7))
        self.missing -= 1
        self.got += 1
        self._since += 1
        self._misses = 0
        self._active = self.clock()
        if self._o <= i < self._o + self._span:
            self._pending -= 1
        c = self._ctx
        if c is not None:
            c.point("stream-block")  # one per block written (tests cut the power here)

    def _scan(self, m):
        """The top-level keys f, i, l (integers) and p (a string: its span) of a JSON object in
        `m`, found in place. False when `m` is not such an object."""
        n = len(m)
        k = _ws(m, 0, n)
        if k >= n or m[k] != 0x7B:  # {
            return False
        f = i = ln = -1
        ps = pe = -1
        k += 1
        while True:
            k = _ws(m, k, n)
            if k >= n:
                return False
            c = m[k]
            if c == 0x7D:  # }
                break
            if c != 0x22:
                return False
            e = _str_end(m, k + 1)
            if e < 0:
                return False
            key = m[k + 1] if e == k + 2 else 0
            k = _ws(m, e + 1, n)
            if k >= n or m[k] != 0x3A:  # :
                return False
            k = _ws(m, k + 1, n)
            if k >= n:
                return False
            c = m[k]
            if c == 0x22:
                e = _str_end(m, k + 1)
                if e < 0:
                    return False
                if key == 0x70:  # p
                    ps, pe = k + 1, e
                k = e + 1
            elif 0x30 <= c <= 0x39:
                v = 0
                while k < n and 0x30 <= m[k] <= 0x39:
                    if v < 100000000:
                        v = v * 10 + m[k] - 0x30
                    k += 1
                if k < n and (m[k] == 0x2E or m[k] | 0x20 == 0x65):  # . e E
                    return False  # integers only
                if key == 0x66:  # f
                    f = v
                elif key == 0x69:  # i
                    i = v
                elif key == 0x6C:  # l
                    ln = v
            else:
                k = _skip_value(m, k, n)
                if k < 0:
                    return False
                if key == 0x66 or key == 0x69 or key == 0x6C or key == 0x70:
                    return False  # a known key with a value of the wrong type
            k = _ws(m, k, n)
            if k < n and m[k] == 0x2C:  # ,
                k += 1
            elif k >= n or m[k] != 0x7D:
                return False
        if f < 0 or i < 0 or ln < 0 or ps < 0:
            return False
        self._f = f
        self._i = i
        self._ln = ln
        self._ps = ps
        self._pe = pe
        return True


def _ws(m, k, n):
    while k < n and (m[k] == 0x20 or m[k] == 0x0A or m[k] == 0x0D or m[k] == 0x09):
        k += 1
    return k


def _str_end(m, k):
    """Index of the quote that closes a JSON string whose text starts at k; -1 if none."""
    while True:
        e = m.find(b'"', k)
        if e < 0:
            return -1
        b = e - 1
        while b >= k and m[b] == 0x5C:
            b -= 1
        if (e - 1 - b) & 1 == 0:  # an even number of backslashes: not escaped
            return e
        k = e + 1


def _skip_value(m, k, n):
    """Past a JSON value that is not a string or a non-negative integer (literal, negative
    number, object, array); -1 when it does not end."""
    c = m[k]
    if c != 0x7B and c != 0x5B:  # a literal or a number: up to the next , } or space
        while k < n:
            c = m[k]
            if c == 0x2C or c == 0x7D or c == 0x20 or c == 0x0A or c == 0x0D or c == 0x09:
                break
            k += 1
        return k
    depth = 0
    while k < n:
        c = m[k]
        if c == 0x22:
            k = _str_end(m, k + 1)
            if k < 0:
                return -1
        elif c == 0x7B or c == 0x5B:
            depth += 1
        elif c == 0x7D or c == 0x5D:
            depth -= 1
            if not depth:
                return k + 1
        k += 1
    return -1


def _unescape(m, ps, pe):
    """Drop the backslash of each "\\/" in m[ps:pe], in place; the new end, or -1 when another
    escape is there (no base64 text has one)."""
    w = ps
    k = ps
    while k < pe:
        c = m[k]
        if c == 0x5C:
            k += 1
            if k >= pe or m[k] != 0x2F:
                return -1
            c = 0x2F
        m[w] = c
        w += 1
        k += 1
    return w
