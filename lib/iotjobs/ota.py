# Firmware OTA into the ESP32's other app slot (esp32.Partition, reached through the board
# module). Documents: native `{"operation": "ota", "url" and/or "stream": {"id", "fileId"},
# "size", "sha256", "signature", "version", "allowDowngrade"}` and AWS OTA's `{"afr_ota":
# {"protocols": ["MQTT", "HTTP"], "streamname", "files": [{"fileid", "update_data_url",
# "filesize", "sig-sha256-ecdsa"}]}}`. A document that offers both ways is fetched the way the
# configuration prefers (`transfer`: "mqtt" or "http"); one way only is taken as it comes.
#
# HTTP: a lost link, a body cut short or a 5xx answer resumes from the last whole block (4 retries).
# Streams the image block by block into the next OTA slot: each 4 KB flash block is erased, then
# programmed in 1 KB pieces through one reused buffer as the body arrives, then hashed as the
# flash holds it (a 1 KB buffer needs no 4 KB contiguous block of a fragmented heap); the offset
# is checkpointed every 16 blocks (a power cut resumes with HTTP Range after re-hashing what the
# slot holds). The buffer is given back before the signature check.
# MQTT (iotjobs.stream, over the jobs connection: no second TLS session): blocks of 1-4 KiB, in
# any order, each written where it belongs straight from the message (a flash block is erased
# when the first stream block inside it arrives); the stream's bitmap is checkpointed every
# 64 KB, so a power cut fetches only what is missing; once every block is there the slot is
# hashed as the flash holds it.
# Either way, before set_boot: size, SHA-256 and the ECDSA P-256 signature over the image (as AWS
# code signing makes it) with the configured public key. Then reboot; the new image confirms
# itself after its self-test (firmware/app.py). After the boot, the slot that runs tells: the new
# one -> SUCCEEDED with its version; the old one (the bootloader rolled back an image that never
# confirmed) -> FAILED rolled_back. Nothing touches the running slot, so every failure leaves the
# running firmware as it was.
import binascii
import hashlib
from micropython import const
from .runner import Handler, JobFailed, JobRejected
from .version import newer

_CHECKPOINT_BLOCKS = const(16)
_CHUNK = const(1024)  # bytes per flash write (a 4 KB block takes several)
_RETRIES = const(4)  # a lost link or a cut-short body: resume with Range this many times


class _Cut(Exception):
    """The transfer stopped early (link lost or body cut short); `reason` for the last one."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def params(doc):
    """(url or None, stream (id, file id) or None, size, sha256 hex or None, signature bytes,
    version or None, downgrade ok)."""
    ota = doc.get("afr_ota")
    ref = None
    if isinstance(ota, dict):
        files = ota.get("files")
        f = files[0] if isinstance(files, list) and files and isinstance(files[0], dict) else {}
        protos = ota.get("protocols")
        if not isinstance(protos, list):
            protos = ("HTTP",)  # documents of the HTTP-only days name no protocol
        url = f.get("update_data_url") if "HTTP" in protos else None
        if "MQTT" in protos and ota.get("streamname") is not None:
            ref = {"id": ota.get("streamname"), "fileId": f.get("fileid", 0)}
        size, sig = f.get("filesize"), f.get("sig-sha256-ecdsa")
        sha, version, down = None, doc.get("version"), False
    else:
        url, size, sig, ref = doc.get("url"), doc.get("size"), doc.get("signature"), doc.get("stream")
        sha, version, down = doc.get("sha256"), doc.get("version"), doc.get("allowDowngrade") is True
    if ref is not None:
        from .stream import stream_ref

        ref = stream_ref(ref)
    if (url is None and ref is None) or (url is not None and not isinstance(url, str)):
        raise JobRejected("BAD_ARGUMENT", "url missing")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise JobRejected("BAD_ARGUMENT", "size must be a positive integer")
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
        raise JobRejected("BAD_ARGUMENT", "sha256 must be 64 hex digits")
    if not isinstance(sig, str) or not sig:
        raise JobRejected("NO_SIGNATURE", "the image must be signed")
    try:
        sig = binascii.a2b_base64(sig)
    except ValueError:
        raise JobRejected("BAD_SIGNATURE", "signature is not base64")
    if version is not None and not isinstance(version, str):
        raise JobRejected("BAD_ARGUMENT", "version must be a string")
    return url, ref, size, sha, sig, version, down


class Ota(Handler):
    def __init__(self, board, pubkey, allow=(), ssl_context=None, transfer="mqtt",
                 stream=None):
        self.board = board  # the board module (iotjobs_board): OTA state, Partition, version
        self.pubkey = pubkey  # bytes of the signer's public key (raw point, DER or PEM)
        self.allow = allow
        self.ssl_context = ssl_context
        self.transfer = transfer  # the way a document offering both is fetched
        self.stream = stream or {}  # iotjobs.stream.Fetch options (block, idle_ms, tries)
        self.buf = None
        self.have = 0

    def run(self, ctx, doc):
        return self._download(ctx, doc, 0)

    def resume(self, ctx, doc, cp):
        phase = cp.get("phase") if isinstance(cp, dict) else None
        if phase == "download":
            return self._download(ctx, doc, cp.get("off", 0))
        if phase == "stream":
            return self._download(ctx, doc, 0, cp)
        if phase != "reboot":
            return self.run(ctx, doc)
        if ctx.boot == cp.get("boot"):
            ctx.request_reboot()  # cut after the checkpoint, before the reset: reset now
        st = self.board.ota_state() or {}
        if st.get("slot") == cp.get("slot"):
            if st.get("pending"):
                # Confirm before reporting: the service has just answered (the boot's describe),
                # which is the self-test; a cut between the two re-runs this, never the reverse
                # (SUCCEEDED reported by an image the bootloader then throws away).
                self.board.partition_class().mark_app_valid_cancel_rollback()
                ctx.point("ota-confirmed")
            return {"version": str(self.board.firmware_version()), "slot": st.get("slot")}
        bad = st.get("last_invalid") or {}
        raise JobFailed("rolled_back", "the new image did not confirm itself; running %s"
                        % st.get("slot"), version=str(self.board.firmware_version()),
                        image=str(bad.get("version")))

    def _download(self, ctx, doc, off, cp=None):
        url, ref, size, sha, sig, version, down = params(doc)
        mqtt = ref is not None and (url is None or self.transfer != "http" or cp is not None)
        if not mqtt:
            from . import http  # imported by the HTTP way only: a stream never loads it

            if not http.allowed(url, self.allow):
                raise JobRejected("URL_NOT_ALLOWED", "the URL is outside the OTA allowlist")
        if not self.pubkey:
            raise JobRejected("NO_PUBLIC_KEY", "no signing key configured")
        running = self.board.firmware_version()
        if version and running and not down and not newer(version, running):
            raise JobRejected("DOWNGRADE", "%s is not newer than %s" % (version, running))
        P = self.board.partition_class()
        slot = P(P.RUNNING).get_next_update()
        bs = slot.ioctl(5, 0)
        if size > slot.ioctl(4, 0) * bs:
            raise JobRejected("TOO_LARGE", "the image does not fit the OTA slot")
        if mqtt:
            return self._via_stream(ctx, slot, ref, size, sha, sig, version, cp)
        label = slot.info()[4]
        chunk = _CHUNK if bs > _CHUNK and bs % _CHUNK == 0 else bs
        buf = self.buf
        if buf is None or len(buf) != chunk:
            import gc

            gc.collect()  # one contiguous block, allocated once and kept for every update
            buf = self.buf = bytearray(chunk)
        h = hashlib.sha256()
        off -= off % bs
        for b in range(off // bs):  # resume: hash what the slot already holds
            _hash_block(slot, b, bs, buf, h, min(bs, size - b * bs))
        if off == 0:
            ctx.checkpoint({"phase": "download", "off": 0, "slot": label})
        attempt = 0
        while True:
            try:
                # a cut after the last block's checkpoint: the slot holds every byte already
                total = off if off >= size else self._stream(ctx, url, slot, label, off, size,
                                                             buf, h)
                break
            except _Cut as e:
                attempt += 1
                if attempt > _RETRIES:
                    raise JobFailed(e.reason, "the download stopped early %d times" % attempt)
                off = self.have  # whole blocks written and hashed so far: continue there
                import time

                time.sleep_ms(250 << attempt)
                ctx.point("ota-retry")
        if total != size:
            raise JobFailed("SIZE_MISMATCH", "got %d bytes, expected %d" % (total, size))
        digest = h.digest()
        buf = self.buf = h = None  # the download is over: its buffer goes back to the heap
        return self._activate(ctx, slot, label, digest, sha, sig, version)

    def _via_stream(self, ctx, slot, ref, size, sha, sig, version, cp):
        """The image over the MQTT connection (iotjobs.stream), then _activate."""
        from . import stream

        self.buf = None  # the HTTP path's buffer: the stream writes from its messages
        bs = slot.ioctl(5, 0)
        label = slot.info()[4]
        st = cp.get("st") if isinstance(cp, dict) and cp.get("slot") == label else None
        opts = self.stream
        block = opts.get("block") or stream.block_size()
        if block > bs or bs % block:
            block = bs
        fetch = None

        def put(off, data):
            # A flash block is erased when the first stream block inside it arrives (after a
            # power cut too: whatever the slot held there is not counted as received).
            sector = off // bs
            if fetch.missing_between(sector * bs, min(sector * bs + bs, size)):
                slot.ioctl(6, sector)
            slot.writeblocks(sector, data, off - sector * bs)

        fetch = stream.Fetch(ctx.runner.client, ref[0], ref[1], put, size, block, st,
                             opts.get("idle_ms", stream.IDLE_MS), opts.get("tries", stream.TRIES),
                             log=ctx.runner.log)
        fetch.run(ctx, lambda s: ctx.checkpoint({"phase": "stream", "slot": label, "st": s}))
        fetch = None
        import gc

        gc.collect()
        buf = bytearray(_CHUNK if bs > _CHUNK and bs % _CHUNK == 0 else bs)
        h = hashlib.sha256()
        for b in range((size + bs - 1) // bs):  # the image as the flash holds it
            _hash_block(slot, b, bs, buf, h, min(bs, size - b * bs))
        digest = h.digest()
        buf = h = None
        return self._activate(ctx, slot, label, digest, sha, sig, version)

    def _activate(self, ctx, slot, label, digest, sha, sig, version):
        """Check hash and signature, then boot the new image (the same for both ways)."""
        if sha is not None and binascii.hexlify(digest).decode() != sha.lower():
            raise JobFailed("HASH_MISMATCH", "sha256 of the image differs")
        import gc  # the download's buffer is back in the heap, whole, before the signature
        # check's big-number arithmetic

        gc.collect()
        from . import ecdsa

        if not ecdsa.verify(self.pubkey, sig, digest=digest):
            raise JobFailed("BAD_SIGNATURE", "the image signature does not verify")
        ctx.point("ota-verified")
        try:
            slot.set_boot()
        except OSError as e:
            raise JobFailed("BAD_IMAGE", "the bootloader refused the image (%s)" % (e,))
        ctx.checkpoint({"phase": "reboot", "slot": label, "boot": ctx.boot, "version": version})
        ctx.progress(True, step="rebooting", slot=label)
        ctx.request_reboot()

    def _stream(self, ctx, url, slot, label, off, size, buf, h):
        from . import http

        self.have = off
        try:
            r = http.get(url, self.ssl_context, off)
        except OSError:
            raise _Cut("DOWNLOAD_FAILED")  # no connection: retried like a cut
        except http.HttpError as e:
            if e.status == 403:  # an expired presigned URL: describe signs a fresh one
                fresh = ctx.fresh_document()
                try:
                    url = params(fresh)[0] if isinstance(fresh, dict) else None
                except JobRejected:
                    url = None
                if url and http.allowed(url, self.allow):
                    try:
                        r = http.get(url, self.ssl_context, off)
                    except http.HttpError as e2:
                        raise JobFailed("DOWNLOAD_FAILED", e2.reason)
                else:
                    raise JobFailed("DOWNLOAD_FAILED", e.reason)
            elif e.status >= 500:
                raise _Cut("DOWNLOAD_FAILED")  # the server's trouble: retried like a cut
            else:
                raise JobFailed("DOWNLOAD_FAILED", e.reason)
        bs = slot.ioctl(5, 0)
        chunk = len(buf)
        mv = memoryview(buf)
        block = off // bs
        have = self.have = off
        try:
            if r.status == 200 and off:
                raise JobFailed("NO_RANGE", "the server ignored the Range request")
            while True:
                got = 0  # bytes of this block written
                while got < bs:
                    fill = 0
                    while fill < chunk:  # whole pieces: a write never ends mid-piece
                        n = r.readinto(mv[fill:])
                        if not n:
                            break
                        fill += n
                    if not fill:
                        break
                    if have + got + fill > size:
                        raise JobFailed("SIZE_MISMATCH", "the server sent more than %d bytes" % size)
                    for i in range(fill, chunk):
                        buf[i] = 0xFF  # the tail of the last block stays erased
                    if not got:
                        slot.ioctl(6, block)  # erase the block, then program it piece by piece
                    slot.writeblocks(block, buf, got)
                    got += fill
                    if fill < chunk:
                        break
                if not got:
                    break
                _hash_block(slot, block, bs, buf, h, got)  # as the flash holds it
                ctx.point("ota-block")
                block += 1
                have += got
                self.have = have
                if block % _CHECKPOINT_BLOCKS == 0:
                    ctx.checkpoint({"phase": "download", "off": have, "slot": label})
                    ctx.point("ota-checkpoint")
                    ctx.progress(bytes=str(have))
                if got < bs:
                    break
        except OSError as e:
            # The partial block was not hashed: the retry starts at the last whole block
            # (self.have), which erases it again.
            raise _Cut("TRUNCATED" if str(e) == "body truncated" else "DOWNLOAD_FAILED")
        finally:
            r.close()
        return have


def _hash_block(slot, block, bs, buf, h, n):
    """Hash the first `n` bytes of `block` as the slot holds them, through `buf`."""
    mv = memoryview(buf)
    chunk = len(buf)
    o = 0
    while o < n:
        k = min(chunk, n - o)
        slot.readblocks(block, mv[:k], o)
        h.update(mv[:k])
        o += chunk
