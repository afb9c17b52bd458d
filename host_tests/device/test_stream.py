# Files over MQTT (iotjobs.stream): the request bitmap, window selection, block validation,
# repeats and reordering, resume from a checkpointed bitmap, hostile messages, rejections and
# giving up. The fetcher runs over the real JobsClient and a real Transport without a broker:
# `Link` overrides only the edges that need a socket (subscribe, publish, wait) and keeps a
# fake clock; `Service` answers requests the way STREAMS.md section 4 says the real one does.
import binascii
import gc
import json
import os

import micropython
from iotjobs import stream as S
from iotjobs.client import JobsClient
from iotjobs.runner import JobFailed, JobCanceled
from iotjobs.transport import Transport

BASE = b"$aws/things/dev1/streams/S/"
DATA = BASE + b"data/json"


class Link(Transport):
    """A Transport with no socket: publishes go to `service`, wait() hands queued messages to
    the callback one at a time (as the receive path does) or advances the fake clock."""

    def __init__(self):
        super().__init__(b"dev1", "127.0.0.1", 1)
        self.now = 0
        self.inbox = []
        self.sent = []
        self.service = None

    def clock(self):
        return self.now

    def subscribe(self, topic, qos=1):
        self.subs.append((topic, qos))

    def publish(self, topic, msg, retain=False, qos=0, wait=True):
        self.sent.append((topic, msg))
        if self.service is not None:
            self.service(topic, msg)

    def wait(self, timeout_ms):
        if self.inbox:
            topic, msg = self.inbox.pop(0)
            self.cb(topic, msg)
            return 0x30
        self.now += max(1, timeout_ms)
        return None


def content(n, seed=0):
    return bytes((k * 31 + seed + (k >> 8)) & 0xFF for k in range(n))


def data_msg(f, i, chunk, c="x", length=None):
    p = binascii.b2a_base64(chunk).strip().decode()
    return bytearray(('{"c":"%s","f":%d,"l":%d,"i":%d,"p":"%s"}' % (
        c, f, len(chunk) if length is None else length, i, p)).encode())


class Service:
    """The stream service's side: describe, get (o, n, b as STREAMS.md section 4), rejections,
    and faults on demand (drop, reorder, repeat, silence)."""

    def __init__(self, link, files, version=1):
        self.link = link
        self.files = files
        self.version = version
        self.requests = []
        self.sent = []  # block indices delivered
        self.silent = False
        self.after = None  # go silent after this many blocks
        self.drop_once = set()
        self.order = None
        self.reject = None
        link.service = self.on_publish

    def push(self, suffix, payload):
        self.link.inbox.append((BASE + suffix, bytearray(payload.encode())))

    def on_publish(self, topic, msg):
        if not topic.startswith(BASE):
            return
        verb = topic[len(BASE):]
        req = json.loads(msg)
        if self.silent:
            self.requests.append(req)
            return
        if verb == b"describe/json":
            r = [{"f": f, "z": len(d)} for f, d in self.files.items()]
            self.push(b"description/json", json.dumps({"c": req.get("c"), "s": self.version,
                                                       "d": "fw", "r": r}))
            return
        assert verb == b"get/json", verb
        self.requests.append(req)
        f = req["f"]
        code = self.reject
        if code is None and "s" in req and req["s"] != self.version:
            code = "VersionMismatch"
        if code is None and f not in self.files:
            code = "ResourceNotFound"
        if code is not None:
            self.push(b"rejected/json", json.dumps({"clientToken": req["c"], "c": req["c"],
                                                    "code": code, "o": code,
                                                    "message": "refused", "m": "refused"}))
            return
        data = self.files[f]
        ln, o = req["l"], req["o"]
        nb = (len(data) + ln - 1) // ln
        assert req["b"].startswith("0x")
        bits = binascii.unhexlify(req["b"][2:])
        blocks = [o + j for j in range(len(bits) * 8) if bits[j >> 3] >> (j & 7) & 1]
        assert blocks and blocks[-1] < nb, "a bit past the last block"
        assert req["n"] == len(blocks) and req["n"] <= nb - o
        if self.order is not None:
            blocks = self.order(blocks)
        for i in blocks:
            if self.after is not None and len(self.sent) >= self.after:
                self.silent = True
                return
            if i in self.drop_once:
                self.drop_once.discard(i)
                continue
            self.sent.append(i)
            self.link.inbox.append((DATA, data_msg(f, i, data[i * ln:(i + 1) * ln], req["c"])))


class Ctx:
    """The job context as a handler sees it (runner.Context's surface): checkpoints as the
    journal would keep them, progress reports, named points."""

    def __init__(self, client):
        self.runner = self
        self.client = client
        self.boot = 1
        self.checkpoints = []
        self.reports = []
        self.points = []
        self.cancel_after = None

    def log(self, msg, level="info"):
        pass

    def sleep_ms(self, ms):
        pass

    def check(self):
        pass

    def point(self, name):
        self.points.append(name)

    def checkpoint(self, data):
        self.checkpoints.append(json.loads(json.dumps(data)))
        self.last_checkpoint = self.checkpoints[-1]

    def progress(self, force=False, **details):
        self.reports.append(details)
        if self.cancel_after is not None and len(self.reports) >= self.cancel_after:
            raise JobCanceled()
        return True


class Memory:
    """A sink: a bytearray written by offset, counting writes per offset."""

    def __init__(self, n):
        self.buf = bytearray(n)
        self.writes = {}
        self.flushes = 0

    def write_at(self, off, data):
        self.buf[off:off + len(data)] = data
        self.writes[off] = self.writes.get(off, 0) + 1

    def flush(self):
        self.flushes += 1


def setup(files, version=1):
    link = Link()
    client = JobsClient(link, "dev1")
    return link, client, Service(link, files, version), Ctx(client)


def fetch(client, link, sink, size=None, block=1024, **kw):
    kw.setdefault("idle_ms", 100)
    return S.Fetch(client, "S", 0, sink, size, block, clock=link.clock, **kw)


def failed(fn, *args):
    try:
        fn(*args)
    except JobFailed as e:
        return e
    raise AssertionError("no JobFailed")


# -- pure parts -------------------------------------------------------------------------------
def test_bitmap_encoding_of_the_documented_example():
    bm = bytearray(8)
    for b in (20, 21, 24, 43):
        bm[b >> 3] |= 1 << (b & 7)
    out = bytearray(4)
    n, nbytes = S.window(bm, 64, 20, 32, out)
    assert (n, nbytes) == (4, 3)
    assert S.hexbits(out, nbytes) == "0x130080"


def test_new_bitmap_leaves_no_bit_past_the_last_block():
    assert S.new_bitmap(10) == b"\xff\x03"
    assert S.new_bitmap(16) == b"\xff\xff"
    assert S.new_bitmap(1) == b"\x01"
    assert S.count(S.new_bitmap(1000)) == 1000
    out = bytearray(4)
    # the window never reaches past the file: 10 blocks, o = 4 -> blocks 4..9
    assert S.window(S.new_bitmap(10), 10, 4, 32, out) == (6, 1)
    assert S.hexbits(out, 1) == "0x3f"


def test_block_size_follows_the_heap_and_the_transport():
    assert S.block_size(200000, 40960) == 4096
    assert S.block_size(30000, 40960) == 2048
    assert S.block_size(5000, 40960) == 1024
    assert S.block_size(200000, S.message_size(2048)) == 2048  # a smaller receive path
    assert S.message_size(4096) <= 40 * 1024
    assert S.block_size() in (1024, 2048, 4096)


def test_a_block_size_the_transport_cannot_carry_is_replaced():
    link, client, svc, ctx = setup({0: content(10)})
    for bad in (0, 100, 65536):
        assert fetch(client, link, None, 10, bad).l in (1024, 2048, 4096), bad
    assert fetch(client, link, None, 10, 256).l == 256


def test_stream_references_are_checked():
    assert S.stream_ref({"id": "AFR_OTA-1_x", "fileId": 3}) == ("AFR_OTA-1_x", 3)
    assert S.stream_ref({"id": "s"}) == ("s", 0)
    for bad in ({"id": ""}, {"id": "a/b"}, {"id": "s", "fileId": 256}, {"id": "s", "fileId": True},
                {"fileId": 1}, "s", None, {"id": "s", "fileId": "1"}, {"id": "x" * 129}):
        try:
            S.stream_ref(bad)
        except JobFailed as e:
            assert e.reason == "BAD_ARGUMENT"
            continue
        raise AssertionError(bad)


# -- the fetch over the client ------------------------------------------------------------------
def test_whole_file_in_windows_with_explicit_n_version_and_token():
    data = content(10000)
    link, client, svc, ctx = setup({0: data})
    sink = Memory(len(data))
    f = fetch(client, link, sink, len(data), 1024, window=4)
    assert f.run(ctx, ctx.checkpoint) == len(data)
    assert bytes(sink.buf) == data
    assert all(v == 1 for v in sink.writes.values()) and len(sink.writes) == 10
    reqs = svc.requests
    assert [(r["o"], r["n"], r["b"]) for r in reqs] == [(0, 4, "0x0f"), (4, 4, "0x0f"),
                                                         (8, 2, "0x03")]
    assert all(r["s"] == 1 and r["f"] == 0 and r["l"] == 1024 for r in reqs)
    assert len({r["c"] for r in reqs}) == 3
    # subscribed before the first request, unsubscribed after
    topics = [t for t, _ in link.sent]
    assert topics[0] == BASE + b"describe/json" and topics[1] == BASE + b"get/json"
    assert not [s for s in link.subs if s[0].startswith(BASE)]
    assert client.on_other is None
    st = ctx.checkpoints[-1]
    assert st["b"] == "0000" and st["z"] == 10000 and st["s"] == 1 and st["l"] == 1024
    assert ctx.reports[-1] == {"blocks": "10/10"}


def test_the_last_block_is_the_remainder_and_a_lost_block_is_asked_again():
    data = content(4096 * 2 + 1808)  # STREAMS.md F1: three blocks, the last one 1808 bytes
    link, client, svc, ctx = setup({0: data})
    svc.drop_once = {1}
    sink = Memory(len(data))
    f = fetch(client, link, sink, len(data), 4096)
    f.run(ctx)
    assert bytes(sink.buf) == data
    assert svc.sent == [0, 2, 1]  # block 1 again after the idle timeout
    assert [r["b"] for r in svc.requests] == ["0x07", "0x01"]
    assert svc.requests[1]["o"] == 1 and svc.requests[1]["n"] == 1
    assert len(sink.writes) == 3


def test_repeated_and_reordered_blocks():
    data = content(8 * 512)
    link, client, svc, ctx = setup({0: data})
    svc.order = lambda blocks: [5, 5, 7, 6, 0, 7, 1, 0, 2, 3, 4]
    sink = Memory(len(data))
    f = fetch(client, link, sink, len(data), 512)
    f.run(ctx)
    assert bytes(sink.buf) == data
    assert all(v == 1 for v in sink.writes.values())  # nothing written twice
    assert f.dups == 3 and f.got == 8 and len(svc.requests) == 1


def test_block_validation_drops_what_does_not_fit():
    data = content(3000)
    link, client, svc, ctx = setup({0: data})
    sink = Memory(3000)
    st = {"id": "S", "f": 0, "s": 1, "l": 1024, "z": 3000, "b": "07"}
    f = fetch(client, link, sink, 3000, 1024, state=st)
    assert f.resumed and f.nblocks == 3 and f.missing == 3
    f.attach()
    b0, b2 = data[:1024], data[2048:]
    cases = [
        ("foreign", data_msg(1, 0, b0)),  # another file of the stream
        ("bad", data_msg(0, 3, b0)),  # beyond the file
        ("bad", data_msg(0, 0, b0[:1000])),  # a short block that is not the last
        ("bad", data_msg(0, 2, b2, length=1024)),  # the last block is 952 bytes
        ("bad", data_msg(0, 0, b0[:1023], length=1024)),  # payload shorter than l
        ("bad", data_msg(0, 0, b0 + b"x", length=1024)),  # payload longer than l
        ("bad", bytearray(b'{"f":0,"i":-1,"l":1024,"p":""}')),
        ("bad", bytearray(b'{"f":0,"i":0,"l":1024,"p":5}')),
        ("bad", bytearray(b'{"f":0,"i":0,"l":1024}')),
        ("bad", bytearray(b'{"f":0.0,"i":0,"l":1024,"p":"AAAA"}')),
        ("bad", bytearray(b'[1,2]')),
        ("bad", bytearray(b"")),
    ]
    for kind, msg in cases:
        before = (f.foreign, f.bad)
        client._on_message(DATA, msg)
        after = (f.foreign, f.bad)
        assert after[0 if kind == "foreign" else 1] == before[0 if kind == "foreign" else 1] + 1, (
            kind, bytes(msg[:60]))
    assert f.missing == 3 and not sink.writes
    client._on_message(DATA, data_msg(0, 2, b2))  # good: the remainder
    client._on_message(DATA, data_msg(0, 2, b2))  # again: a repeat
    assert f.missing == 2 and f.dups == 1 and sink.writes == {2048: 1}
    # key order, spaces, unknown keys and nested values are fine
    msg = '{ "p" : "%s" , "x": {"a": [1, "}"]}, "i" : 0, "l" : 1024, "c": "q\\"", "f" : 0, "n": null }' % (
        binascii.b2a_base64(b0).strip().decode())
    client._on_message(DATA, bytearray(msg.encode()))
    assert f.missing == 1 and bytes(sink.buf[:1024]) == b0
    f.detach()


def test_an_escaped_slash_in_the_payload_is_accepted_other_escapes_are_not():
    chunk = bytes([0xFF] * 300)  # base64 "////..."
    data = chunk + content(100)
    link, client, svc, ctx = setup({0: data})
    sink = Memory(len(data))
    f = fetch(client, link, sink, len(data), 300,
              state={"id": "S", "f": 0, "s": 1, "l": 300, "z": 400, "b": "03"})
    f.attach()
    p = binascii.b2a_base64(chunk).strip().decode()
    assert "/" in p
    bad = '{"f":0,"i":0,"l":300,"p":"%s"}' % ("\\u0041" + p[1:])
    client._on_message(DATA, bytearray(bad.encode()))
    assert f.bad == 1 and f.missing == 2
    esc = '{"f":0,"i":0,"l":300,"p":"%s"}' % p.replace("/", "\\/")
    client._on_message(DATA, bytearray(esc.encode()))
    assert f.missing == 1 and bytes(sink.buf[:300]) == chunk
    f.detach()


def test_hostile_and_oversized_messages_never_crash_the_loop():
    data = content(2048)
    link, client, svc, ctx = setup({0: data})
    sink = Memory(2048)
    f = fetch(client, link, sink, 2048, 1024,
              state={"id": "S", "f": 0, "s": 1, "l": 1024, "z": 2048, "b": "03"})
    f.attach()
    link.lost = 1  # transport.TOO_LARGE: drained, the callback gets None
    client._on_message(DATA, None)
    client._on_message(None, None)  # lost topic and all: passed on, nothing to do here
    assert f.lost == 1
    hostile = [
        b"{" * 5000,
        b'{"p":"' + b"A" * 30000,
        b'{"f":0,"i":0,"l":1024,"p":"' + b"!" * 1368 + b'"}',
        b'{"f":0,"i":0,"l":1024,"p":"' + b"=" * 1368 + b'"}',
        b'{"f":99999999999999999999,"i":0,"l":1024,"p":""}',
        b'{"f":0,"i":0,"l":1024,"p":"AAAA"',
        b'\x00\xff\xfe',
        b'{"f":0,"i":0,"l":1024,"p":"AAAA"}garbage',
    ]
    for m in hostile:
        client._on_message(DATA, bytearray(m))
        client._on_message(BASE + b"rejected/json", bytearray(m))
        client._on_message(BASE + b"description/json", bytearray(m))
        client._on_message(BASE + b"unknown/json", bytearray(m))
    client._on_message(BASE + b"rejected/json", bytearray(b"{" * 9000))  # too large to parse
    assert f.missing == 2 and not sink.writes and f._reject is None and f._desc is None
    f.detach()


def test_resume_from_a_checkpointed_bitmap_fetches_only_missing_blocks():
    data = content(20 * 256 - 100)
    link, client, svc, ctx = setup({0: data})
    sink = Memory(len(data))  # the flash: it keeps what was written
    svc.after = 10  # the device loses power after the 10th block (the service goes quiet)
    f = fetch(client, link, sink, len(data), 256, every=4, tries=2)
    e = failed(f.run, ctx, ctx.checkpoint)
    assert e.reason == S.R_TIMEOUT
    st = ctx.checkpoints[-1]
    assert st["b"] == "00ff0f"  # blocks 0..7 journaled (every 4), 8 and 9 not yet
    assert ctx.reports[-1] == {"blocks": "8/20"}
    # after the "boot": only what the journal says is missing, at most `every` again
    link2, client2, svc2, ctx2 = setup({0: data})
    f2 = fetch(client2, link2, sink, len(data), 9999, state=st, every=4)
    assert f2.resumed and f2.l == 256 and f2.missing == 12
    f2.run(ctx2, ctx2.checkpoint)
    assert sorted(svc2.sent) == list(range(8, 20))
    assert not [t for t, _ in link2.sent if t.endswith(b"describe/json")]  # s from the journal
    assert bytes(sink.buf) == data
    assert ctx2.checkpoints[-1]["b"] == "000000"


def test_a_checkpoint_of_another_file_is_not_adopted():
    link, client, svc, ctx = setup({0: content(100)})
    good = {"id": "S", "f": 0, "s": 1, "l": 256, "z": 2000, "b": "ff"}
    for change in ({"id": "T"}, {"f": 1}, {"z": 3000}, {"b": "ff00"}, {"b": "zz"}, {"l": 100},
                   {"b": "ffff"}, {"z": None}):
        st = dict(good)
        st.update(change)
        assert not fetch(client, link, None, 2000, 1024, state=st).resumed, change
    assert fetch(client, link, None, 2000, 1024, state=good).resumed


def test_version_mismatch_fails_the_fetch_and_never_mixes_versions():
    data = content(3000)
    link, client, svc, ctx = setup({0: data}, version=2)
    sink = Memory(3000)
    st = {"id": "S", "f": 0, "s": 1, "l": 1024, "z": 3000, "b": "06"}
    e = failed(fetch(client, link, sink, 3000, 1024, state=st).run, ctx)
    assert e.reason == S.R_CHANGED and e.details["code"] == "VersionMismatch"
    assert not sink.writes and svc.requests[0]["s"] == 1


def test_rejections_map_to_reasons():
    for code, reason in (("ResourceNotFound", S.R_NOT_FOUND), ("ETagMismatch", S.R_CHANGED),
                         ("BlockSizeOutOfBounds", S.R_REJECTED), ("InvalidRequest", S.R_REJECTED)):
        link, client, svc, ctx = setup({0: content(3000)})
        svc.reject = code
        e = failed(fetch(client, link, Memory(3000), 3000).run, ctx)
        assert e.reason == reason and e.details["code"] == code, (code, e.reason)
    # a file the stream does not have: the description says so
    link, client, svc, ctx = setup({1: content(10)})
    assert failed(fetch(client, link, Memory(10), 10).run, ctx).reason == S.R_NOT_FOUND
    # the description's size differs from the document's
    link, client, svc, ctx = setup({0: content(10)})
    assert failed(fetch(client, link, Memory(11), 11).run, ctx).reason == S.R_SIZE


def test_a_rejection_for_another_fetch_is_ignored():
    data = content(1024)
    link, client, svc, ctx = setup({0: data})
    link.inbox.append((BASE + b"rejected/json", bytearray(b'{"c":"zzzz9","o":"InvalidRequest"}')))
    sink = Memory(1024)
    fetch(client, link, sink, 1024).run(ctx)
    assert bytes(sink.buf) == data


def test_gives_up_after_k_requests_without_a_block():
    link, client, svc, ctx = setup({0: content(5000)})
    sink = Memory(5000)
    f = fetch(client, link, sink, 5000, 1024, tries=3, idle_ms=1000)
    svc.after = 0  # described, then silent
    t0 = link.now
    e = failed(f.run, ctx)
    assert e.reason == S.R_TIMEOUT and e.details["blocks"] == "0/5"
    assert len(svc.requests) == 3 and f.requests == 3
    assert 3000 <= link.now - t0 < 4000  # one idle period per request
    assert client.on_other is None and not [s for s in link.subs if s[0].startswith(BASE)]
    # a silent describe gives up the same way
    link, client, svc, ctx = setup({0: content(10)})
    svc.silent = True
    assert failed(fetch(client, link, Memory(10), 10, tries=2).run, ctx).reason == S.R_TIMEOUT


def test_progress_resets_the_count_of_requests_without_a_block():
    data = content(6 * 1024)
    link, client, svc, ctx = setup({0: data})
    svc.drop_once = {1, 3, 5}
    svc.order = lambda blocks: blocks
    sink = Memory(len(data))
    # three requests in all get nothing, never two in a row: each good block starts the count
    # again
    f = fetch(client, link, sink, len(data), 1024, tries=2, window=2)
    f.run(ctx)
    assert bytes(sink.buf) == data and f.requests == 6


def test_jobs_and_commands_traffic_keeps_flowing_during_a_fetch():
    data = content(4096)
    link, client, svc, ctx = setup({0: data})
    others = []
    client.on_other = lambda t, m: others.append(t)  # the commands module's place
    cmd = b"$aws/commands/things/dev1/executions/e1/request/json"
    link.inbox.append((cmd, bytearray(b'{"command":"ping"}')))
    link.inbox.append((b"$aws/things/dev1/jobs/notify-next", bytearray(b'{"execution":{}}')))
    sink = Memory(4096)
    fetch(client, link, sink, 4096).run(ctx)
    assert others == [cmd] and client.take_next_event() is True
    assert client.on_other is not None and client.on_other.__name__ == "<lambda>"


def test_cancellation_through_progress_ends_the_fetch_cleanly():
    data = content(20 * 256)
    link, client, svc, ctx = setup({0: data})
    ctx.cancel_after = 2
    f = fetch(client, link, Memory(len(data)), len(data), 256, every=4)
    try:
        f.run(ctx, ctx.checkpoint)
        raise AssertionError("not cancelled")
    except JobCanceled:
        pass
    assert client.on_other is None and not [s for s in link.subs if s[0].startswith(BASE)]


def test_at_most_every_blocks_are_ever_written_and_not_journaled():
    """Blocks also arrive while a progress report waits for its answer (the client's update
    waits in transport.wait): still never more than `every` written and not journaled."""
    n, every = 64, 8
    data = content(n * 256)
    link, client, svc, ctx = setup({0: data})
    journaled = [0]
    written = [0]
    worst = [0]

    def save(st):
        journaled[0] = n - S.count(binascii.unhexlify(st["b"]))

    def put(off, d):
        written[0] += 1
        worst[0] = max(worst[0], written[0] - journaled[0])

    def progress(force=False, **details):
        while link.inbox:
            link.wait(0)

    ctx.progress = progress
    svc.drop_once = {3, 20}  # checkpoints then fall in the middle of a window
    f = fetch(client, link, put, len(data), 256, every=every)
    assert f.window == every
    f.run(ctx, save)
    assert f.got == n and journaled[0] == n
    assert worst[0] <= every, worst[0]
    # a window wider than a checkpoint's worth would break the bound
    link, client, svc, ctx = setup({0: data})
    ctx.progress = progress
    svc.drop_once = {3, 20}
    journaled[0] = written[0] = worst[0] = 0
    fetch(client, link, put, len(data), 256, every=every, window=2 * every).run(ctx, save)
    assert worst[0] > every, worst[0]


def test_a_sink_that_fails_fails_the_job():
    link, client, svc, ctx = setup({0: content(2048)})

    def broken(off, data):
        raise OSError(28)

    e = failed(fetch(client, link, broken, 2048).run, ctx)
    assert e.reason == S.R_WRITE and "28" in e.details["message"]


def test_file_sink_writes_by_offset_and_resumes():
    d = (os.getenv("IOTJOBS_TEST_TMP") or "/tmp") + "/stream-sink.bin"
    data = content(5000)
    link, client, svc, ctx = setup({0: data})
    svc.order = lambda blocks: list(reversed(blocks))
    sink = S.FileSink(d, True)
    fetch(client, link, sink, 5000, 1024).run(ctx)
    sink.close()
    with open(d, "rb") as fh:
        assert fh.read() == data


# -- memory ------------------------------------------------------------------------------------
def test_routing_and_rejecting_blocks_allocates_nothing():
    data = content(2048)
    link, client, svc, ctx = setup({0: data})
    sink = Memory(2048)
    f = fetch(client, link, sink, 2048, 1024,
              state={"id": "S", "f": 0, "s": 1, "l": 1024, "z": 2048, "b": "01"})
    client.on_other = lambda t, m: None
    f.attach()
    msgs = [
        (DATA, data_msg(0, 1, data[1024:])),  # a repeat (block 1 is here already)
        (DATA, data_msg(3, 0, data[:1024])),  # another file
        (DATA, data_msg(0, 0, data[:1000])),  # wrong size
        (DATA, bytearray(b"{" * 100)),  # malformed
        (b"$aws/commands/things/dev1/executions/e/request/json", bytearray(b"{}")),
        (b"$aws/things/dev1/jobs/notify-next", bytearray(b"{}")),
    ]
    micropython.heap_lock()
    try:
        for topic, msg in msgs:
            client._on_message(topic, msg)
    finally:
        micropython.heap_unlock()
    assert (f.dups, f.foreign, f.bad) == (1, 1, 2)
    f.detach()


def test_a_good_block_allocates_little_beside_the_message():
    block = 4096
    data = content(2 * block)
    link, client, svc, ctx = setup({0: data})
    f = fetch(client, link, lambda off, d: None, 2 * block, block,
              state={"id": "S", "f": 0, "s": 1, "l": block, "z": 2 * block, "b": "03"})
    f.attach()
    msg = data_msg(0, 0, data[:block])
    gc.collect()
    gc.disable()
    try:
        before = gc.mem_alloc()
        client._on_message(DATA, msg)
        used = gc.mem_alloc() - before
    finally:
        gc.enable()
    assert f.missing == 1
    print("stream: %d bytes allocated for a %d-byte block" % (used, block))
    # the base64 pieces (384 bytes each) and their views, never a second block-sized object:
    # a little more than the block in all, in small pieces
    assert used < block * 3 // 2, used
    f.detach()


# -- the handlers over a stream -----------------------------------------------------------------
# P-256's generator as the signer's public key (a valid point whose private key nobody uses) and
# the DER signature (r=1, s=1): well-formed, never valid. What is checked here is the path to
# the signature check: the slot holds the image, and nothing is activated.
_G = binascii.unhexlify(
    "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296"
    "4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5")
_SIG = "MAYCAQECAQE="


def _slots():
    """Two 128 KB OTA slots of the esp32.Partition twin, running ota_0; ota_1 full of zeros (an
    old image: every flash block must be erased before the new one is programmed)."""
    import esp32sim

    d = (os.getenv("IOTJOBS_TEST_TMP") or "/tmp") + "/stream-ota-%d" % len(os.listdir(
        os.getenv("IOTJOBS_TEST_TMP") or "/tmp"))
    os.mkdir(d)
    table = [{"label": "ota_%d" % i, "type": 0, "subtype": 0x10 + i,
              "addr": 0x10000 + i * 131072, "size": 131072} for i in range(2)]
    with open(d + "/partitions.json", "w") as f:
        json.dump(table, f)
    esp32sim.attach(d, "ota_0", None)
    slot = esp32sim.Partition("ota_1")
    zeros = bytearray(4096)
    for b in range(32):
        slot.writeblocks(b, zeros)
    return slot


def _slot_bytes(slot, n):
    out = bytearray(n)
    buf = bytearray(4096)
    for b in range((n + 4095) // 4096):
        slot.readblocks(b, buf)
        k = min(4096, n - b * 4096)
        out[b * 4096:b * 4096 + k] = buf[:k]
    return bytes(out)


def _ota_doc(image, sha=None):
    import hashlib

    return {"operation": "ota", "stream": {"id": "S", "fileId": 0}, "size": len(image),
            "sha256": sha or binascii.hexlify(hashlib.sha256(image).digest()).decode(),
            "signature": _SIG, "version": "2.0.0"}


def test_ota_over_a_stream_fills_the_slot_in_any_order_then_checks_the_signature():
    import iotjobs_board as board
    from iotjobs.ota import Ota

    slot = _slots()
    image = content(20000, 7)  # five flash blocks, the last one partial; 20 stream blocks
    link, client, svc, ctx = setup({0: image})
    svc.order = lambda blocks: list(reversed(blocks))
    h = Ota(board, _G, stream={"block": 1024, "idle_ms": 100})
    e = failed(h.run, ctx, _ota_doc(image))
    assert e.reason == "BAD_SIGNATURE", e.reason
    assert _slot_bytes(slot, len(image)) == image
    assert "ota-verified" not in ctx.points and board.ota_state()["slot"] == "ota_0"
    cp = ctx.checkpoints[-1]
    assert cp["phase"] == "stream" and cp["slot"] == "ota_1" and cp["st"]["l"] == 1024
    # a wrong hash is found the same way, from the flash
    link, client, svc, ctx = setup({0: image})
    e = failed(Ota(board, _G, stream={"block": 1024}).run, ctx, _ota_doc(image, "0" * 64))
    assert e.reason == "HASH_MISMATCH"


def test_ota_over_a_stream_resumes_from_its_checkpoint_after_a_power_cut():
    import iotjobs_board as board
    from iotjobs.ota import Ota

    slot = _slots()
    image = content(100 * 1024 - 300, 9)  # 100 blocks of 1 KiB: a checkpoint every 64
    link, client, svc, ctx = setup({0: image})
    svc.after = 70  # the power goes after 70 blocks: 64..69 are in flash, not journaled
    opts = {"block": 1024, "idle_ms": 50, "tries": 1}
    e = failed(Ota(board, _G, stream=opts).run, ctx, _ota_doc(image))
    assert e.reason == "STREAM_TIMEOUT"
    cp = ctx.checkpoints[-1]
    assert cp["st"]["b"] == "00" * 8 + "ffffffff0f", cp
    link, client, svc, ctx = setup({0: image})
    e = failed(Ota(board, _G, stream=opts).resume, ctx, _ota_doc(image), cp)
    assert e.reason == "BAD_SIGNATURE", e.reason
    assert sorted(svc.sent) == list(range(64, 100))  # only what the journal says is missing
    assert _slot_bytes(slot, len(image)) == image


def test_download_file_over_a_stream():
    import hashlib
    from iotjobs.download import Download

    root = (os.getenv("IOTJOBS_TEST_TMP") or "/tmp") + "/dl"
    data = content(7000, 3)
    link, client, svc, ctx = setup({0: data})
    h = Download(root, stream={"block": 1024, "idle_ms": 100})
    doc = {"operation": "download-file", "stream": {"id": "S", "fileId": 0}, "path": "a/b.bin",
           "sha256": binascii.hexlify(hashlib.sha256(data).digest()).decode()}
    out = h.run(ctx, doc)
    assert out["size"] == "7000" and out["path"] == "a/b.bin"
    with open(root + "/a/b.bin", "rb") as f:
        assert f.read() == data
    # both ways offered: the configuration decides (http here, refused by the empty allowlist)
    doc["url"] = "http://127.0.0.1:1/x"
    try:
        Download(root, transfer="http").run(ctx, doc)
        raise AssertionError("not refused")
    except JobFailed as e:
        assert e.reason == "URL_NOT_ALLOWED"


def test_ota_documents_name_their_ways():
    from iotjobs.ota import params

    f = {"filepath": "fw.bin", "filesize": 1000, "fileid": 2, "sig-sha256-ecdsa": _SIG,
         "update_data_url": "https://b/fw.bin"}
    mqtt = {"afr_ota": {"protocols": ["MQTT"], "streamname": "AFR_OTA-x", "files": [f]}}
    both = {"afr_ota": {"protocols": ["MQTT", "HTTP"], "streamname": "AFR_OTA-x", "files": [f]}}
    http = {"afr_ota": {"protocols": ["HTTP"], "files": [f]}}
    old = {"afr_ota": {"files": [f]}}  # the HTTP-only days: no protocols
    assert params(mqtt)[:3] == (None, ("AFR_OTA-x", 2), 1000)
    assert params(both)[:2] == ("https://b/fw.bin", ("AFR_OTA-x", 2))
    assert params(http)[:2] == ("https://b/fw.bin", None)
    assert params(old)[:2] == ("https://b/fw.bin", None)
    native = {"operation": "ota", "stream": {"id": "fw", "fileId": 1}, "size": 5, "signature": _SIG}
    assert params(native)[:2] == (None, ("fw", 1))
    for bad, reason in (({"afr_ota": {"protocols": ["MQTT"], "files": [f]}}, "BAD_ARGUMENT"),
                        (dict(native, stream={"id": "a b"}), "BAD_ARGUMENT"),
                        (dict(native, stream=None), "BAD_ARGUMENT")):
        try:
            params(bad)
        except JobFailed as e:
            assert e.reason == reason, (bad, e.reason)
            continue
        raise AssertionError(bad)


def test_unsubscribe_sends_one_packet_and_forgets_the_subscription():
    class Sock:
        def __init__(self):
            self.out = []

        def write(self, b):
            self.out.append(bytes(b))

    t = Transport(b"dev1", "127.0.0.1", 1)
    t.subs = [(b"a/b", 0), (b"c", 1)]
    t.sock = Sock()
    t.unsubscribe(b"a/b")
    assert t.sock.out == [b"\xa2\x07\x00\x01\x00\x03a/b"]  # UNSUBSCRIBE, pid 1, one filter
    assert t.subs == [(b"c", 1)]
    t.sock = None
    t.unsubscribe(b"c")  # not connected: only forgotten (a reconnect does not restore it)
    assert t.subs == []
