# The download-file handler: native `{"operation": "download-file", "url": ..., "path": ...,
# "sha256": ..., "size": ...}` (or `"stream": {"id": S, "fileId": F}` instead of, or beside,
# the URL: the file over the MQTT connection, iotjobs.stream; the configuration's `transfer`
# picks when both are offered) and the AWS-Download-File template (`download-file.sh` with
# args [downloadUrl, filePath]). Streams through one reused buffer into `<path>.part`, hashing
# as it goes, checkpoints the offset now and then so a power cut resumes with HTTP Range (over
# MQTT: the stream's bitmap, so only missing blocks are fetched again), checks
# size and sha256, then renames into place (atomic). The target is confined to the configured
# folder; the URL must match the configured allowlist. A lost link or a body cut short is
# resumed with Range (4 retries); an expired presigned URL is signed afresh through describe.
# `fetch_file` is shared with the application-update handler (app.py).
import binascii
import hashlib
import os
from micropython import const
from .runner import Handler, JobFailed, JobRejected
from . import http

_BUF = const(1024)
_CHECKPOINT_EVERY = const(64 * 1024)  # bytes between journal writes (flash wear vs rework)
_RETRIES = const(4)


def confine(root, path):
    """`root/path` for a relative path without `..` or empty parts; JobRejected otherwise."""
    if not isinstance(path, str) or not path or path[0] == "/" or "\\" in path or "\x00" in path:
        raise JobRejected("BAD_PATH", "path must be relative to the download folder")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise JobRejected("BAD_PATH", "path must not contain empty, . or .. parts")
    return root.rstrip("/") + "/" + path


def _mkdirs(path):
    """Make the folders above `path` (relative or absolute)."""
    end = path.find("/", 1)
    while end > 0:
        try:
            os.mkdir(path[:end])
        except OSError:
            pass
        end = path.find("/", end + 1)


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _size(path):
    try:
        return os.stat(path)[6]
    except OSError:
        return 0


def fetch_file(ctx, url, path, buf, refresh, ssl_context=None, on_checkpoint=None):
    """Download `url` into `path`, continuing after the bytes `path` already holds (HTTP Range).
    Returns (total bytes, sha256 object of the whole file). A lost link, a body cut short or a
    5xx answer is retried from what arrived (4 times, backing off 0.5 to 4 s); a 403 (an expired
    presigned URL) asks `refresh()` for a fresh URL once. `on_checkpoint(have)` is called every
    64 KB after a flush. Otherwise JobFailed: DOWNLOAD_FAILED (details: `http` status, 0 when
    no answer came) or TRUNCATED."""
    attempt = 0
    refreshed = False
    while True:
        try:
            return _fetch_once(ctx, url, path, buf, ssl_context, on_checkpoint)
        except http.HttpError as e:
            if e.status == 403 and not refreshed:
                refreshed = True
                url2 = refresh()
                if url2 and url2 != url:
                    url = url2
                    continue
            if e.status < 500:
                raise JobFailed("DOWNLOAD_FAILED", e.reason, http=str(e.status))
            reason, status = "DOWNLOAD_FAILED", e.status
        except OSError as e:
            reason = "TRUNCATED" if str(e) == "body truncated" else "DOWNLOAD_FAILED"
            status = 0
        attempt += 1
        if attempt > _RETRIES:
            raise JobFailed(reason, "the download failed %d times" % attempt, http=str(status))
        import time

        time.sleep_ms(250 << attempt)
        ctx.point("download-retry")


def fetch_stream(ctx, ref, path, size, state, buf, opts, on_checkpoint):
    """File `ref` = (stream id, file id) over the MQTT connection into `path` (iotjobs.stream),
    continuing from `state` (a checkpoint) when `path` survived. Returns (bytes, sha256 object
    of the file as the flash holds it)."""
    from . import stream

    if not _exists(path):
        state = None
    f = stream.Fetch(ctx.runner.client, ref[0], ref[1], None, size, opts.get("block", 0), state,
                     opts.get("idle_ms", stream.IDLE_MS), opts.get("tries", stream.TRIES),
                     log=ctx.runner.log)
    sink = stream.FileSink(path, not f.resumed)
    f.set_sink(sink)
    try:
        total = f.run(ctx, on_checkpoint)
    finally:
        sink.close()
    if _size(path) != total:
        raise JobFailed("SIZE_MISMATCH", "the file has %d bytes, the stream %d"
                        % (_size(path), total))
    h = hashlib.sha256()
    _hash_file(path, h, total, memoryview(buf))
    return total, h


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _hash_file(path, h, n, mv):
    with open(path, "rb") as f:
        while n > 0:
            k = f.readinto(mv[: min(n, len(mv))])
            if not k:
                break
            h.update(mv[:k])
            n -= k


def _fetch_once(ctx, url, path, buf, ssl_context, on_checkpoint):
    have = _size(path)
    r = http.get(url, ssl_context, have)
    try:
        h = hashlib.sha256()
        mv = memoryview(buf)
        if r.status == 200 and have:  # the server ignored the Range: start over
            have = 0
            with open(path, "wb"):
                pass
        elif have:
            _hash_file(path, h, have, mv)  # resume: hash what survived
        since = 0
        with open(path, "ab") as f:
            while True:
                n = r.readinto(mv)
                if not n:
                    break
                f.write(mv[:n])
                h.update(mv[:n])
                have += n
                since += n
                if since >= _CHECKPOINT_EVERY:
                    f.flush()
                    since = 0
                    if on_checkpoint is not None:
                        on_checkpoint(have)
        return have, h
    finally:
        r.close()


class Download(Handler):
    idempotent = True  # a re-run continues from the .part file, and placing is a rename

    def __init__(self, root="data", allow=(), ssl_context=None, buf=None, transfer="mqtt",
                 stream=None):
        self.root = root
        self.allow = allow
        self.ssl_context = ssl_context
        self.buf = buf or bytearray(_BUF)
        self.transfer = transfer  # "mqtt" or "http": the way a document offering both is fetched
        self.stream = stream or {}  # iotjobs.stream.Fetch options (block, idle_ms, tries)

    def _args(self, doc):
        args = doc.get("args")
        if isinstance(args, list):  # AWS-Download-File: [downloadUrl, filePath]
            url = args[0] if len(args) > 0 else None
            path = args[1] if len(args) > 1 else None
            return url, path, None, None
        return doc.get("url"), doc.get("path"), doc.get("sha256"), doc.get("size")

    def run(self, ctx, doc):
        return self._run(ctx, doc, None)

    def resume(self, ctx, doc, cp):
        return self._run(ctx, doc, cp)  # HTTP: from what the .part file holds; MQTT: its bitmap

    def _run(self, ctx, doc, cp):
        url, path, sha, size = self._args(doc)
        ref = doc.get("stream")
        if ref is not None:
            from .stream import stream_ref

            ref = stream_ref(ref)
        mqtt = ref is not None and (url is None or self.transfer != "http")
        if not mqtt and not isinstance(url, str):
            raise JobRejected("BAD_ARGUMENT", "url missing")
        if not mqtt and not http.allowed(url, self.allow):
            raise JobRejected("URL_NOT_ALLOWED", "the URL is outside the download allowlist")
        if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
            raise JobRejected("BAD_ARGUMENT", "sha256 must be 64 hex digits")
        if size is not None and (not isinstance(size, int) or size < 0):
            raise JobRejected("BAD_ARGUMENT", "size must be a non-negative integer")
        target = confine(self.root, path)
        part = target + ".part"
        _mkdirs(part)

        def refresh():
            # An expired presigned URL: the service signs a fresh one with the document.
            fresh = ctx.fresh_document()
            u = self._args(fresh)[0] if isinstance(fresh, dict) else None
            return u if isinstance(u, str) and http.allowed(u, self.allow) else None

        def on_checkpoint(have):
            ctx.checkpoint({"off": have})
            ctx.point("download-checkpoint")
            ctx.progress(bytes=str(have))

        try:
            if mqtt:
                st = cp.get("st") if isinstance(cp, dict) else None
                total, h = fetch_stream(ctx, ref, part, size, st, self.buf, self.stream,
                                        lambda s: ctx.checkpoint({"st": s}))
            else:
                total, h = fetch_file(ctx, url, part, self.buf, refresh, self.ssl_context,
                                      on_checkpoint)
        except JobFailed:
            _remove(part)  # the job is over: nothing is left behind
            raise
        if size is not None and total != size:
            os.remove(part)
            raise JobFailed("SIZE_MISMATCH", "got %d bytes, expected %d" % (total, size))
        digest = binascii.hexlify(h.digest()).decode()
        if sha is not None and digest != sha.lower():
            os.remove(part)
            raise JobFailed("HASH_MISMATCH", "sha256 of the download differs")
        os.rename(part, target)
        ctx.point("download-placed")
        return {"path": path, "size": str(total), "sha256": digest}
