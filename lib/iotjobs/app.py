# The application-update handler: `{"operation": "app-update", "manifest": URL, "signature":
# B64, "base": URL/, "urls": {path: URL}, "version": V, "allowDowngrade": false}` as
# `tools/sign bundle` writes it. The manifest `{"files": [{"path", "size", "sha256"}], "version"}`
# is signed (ECDSA P-256 over its SHA-256, the key from the device config).
# Over MQTT (iotjobs.stream, no second TLS session) the bundle is one stream: `"stream": {"id":
# S, "manifest": 0, "files": {path: fileId}}` in place of (or beside) manifest/base/urls. The
# manifest is file `manifest` (default 0); without `files`, the k-th file of the manifest is
# file k + 1 (the manifest first, then the files in manifest order). The configuration's
# `transfer` picks the way when a document offers both; the checks are the same.
#
# 1. fetch the manifest (at most 16 KB), verify its signature, check every path (relative,
#    no `..`, safe characters) and the free space;
# 2. stage: empty the folder that does not run (appstate.AppState.other) and download each file
#    into it (HTTP Range, or the stream's bitmap, after a power cut or a lost link), checking
#    its size and SHA-256; one checkpoint per file and every 64 KB;
# 3. verify every staged file again from flash, then switch: one atomic write of the pointer
#    file (appstate), then reboot;
# 4. after the boot the new version starts on trial; once the device has reached the service
#    it is confirmed and the job SUCCEEDS with its version. A version that fails to start
#    `max_tries` times is rolled back by appstate at boot, and the job FAILS `rolled_back`.
# Nothing touches the running folder, so every failure leaves the running application as it was.
import binascii
import gc
import hashlib
import json
import os
from micropython import const
from .runner import Handler, JobFailed, JobRejected
from .version import newer
from .download import confine, fetch_file, fetch_stream, _mkdirs
from . import http

# For type checkers only (tools/stubcheck, an editor): the compiler folds the constant and drops
# the block, so these imports cost the device nothing.
TYPE_CHECKING = const(False)
if TYPE_CHECKING:
    from .appstate import AppState

_MANIFEST_MAX = const(16384)
_FILES_MAX = const(64)
_BUF = const(1024)
_SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-/"


def rmtree(path):
    """Remove a folder and everything under it (no error when it is missing)."""
    try:
        entries = list(os.ilistdir(path))
    except OSError:
        try:
            os.remove(path)
        except OSError:
            pass
        return
    for e in entries:
        p = path + "/" + e[0]
        if e[1] == 0x4000:
            rmtree(p)
        else:
            os.remove(p)
    os.rmdir(path)


def params(doc):
    """(manifest url or None, stream or None, signature bytes, base url or None, urls dict,
    version, downgrade ok). The stream is (id, manifest file id, {path: file id} or None)."""
    url, sig, base = doc.get("manifest"), doc.get("signature"), doc.get("base")
    urls, version = doc.get("urls") or {}, doc.get("version")
    ref = doc.get("stream")
    if ref is not None:
        from .stream import stream_ref

        files = ref.get("files") if isinstance(ref, dict) else None
        if files is not None and not isinstance(files, dict):
            raise JobRejected("BAD_ARGUMENT", "stream.files must map paths to file ids")
        sid, fid = stream_ref({"id": ref.get("id") if isinstance(ref, dict) else None,
                               "fileId": ref.get("manifest", 0) if isinstance(ref, dict) else 0})
        ref = (sid, fid, files)
    if ref is None and not isinstance(url, str):
        raise JobRejected("BAD_ARGUMENT", "manifest URL missing")
    if url is not None and not isinstance(url, str):
        raise JobRejected("BAD_ARGUMENT", "manifest must be a URL")
    if not isinstance(version, str) or not version:
        raise JobRejected("BAD_ARGUMENT", "version missing")
    if base is not None and not isinstance(base, str):
        raise JobRejected("BAD_ARGUMENT", "base must be a URL")
    if not isinstance(urls, dict):
        raise JobRejected("BAD_ARGUMENT", "urls must map paths to URLs")
    if ref is None and base is None and not urls:
        raise JobRejected("BAD_ARGUMENT", "neither base nor urls: the files cannot be fetched")
    if not isinstance(sig, str) or not sig:
        raise JobRejected("NO_SIGNATURE", "the manifest must be signed")
    try:
        sig = binascii.a2b_base64(sig)
    except ValueError:
        raise JobRejected("BAD_SIGNATURE", "signature is not base64")
    return url, ref, sig, base, urls, version, doc.get("allowDowngrade") is True


def parse_manifest(data, version):
    """[(path, size, sha256 bytes)] of a verified manifest; JobFailed when it is malformed."""
    try:
        m = json.loads(data)
        files = m["files"]
        if m["version"] != version:
            raise JobFailed("BAD_MANIFEST", "the manifest is for version %s" % m["version"])
        if not isinstance(files, list) or len(files) > _FILES_MAX:
            raise JobFailed("BAD_MANIFEST", "files must be a list of at most %d" % _FILES_MAX)
        out = []
        seen = set()
        for f in files:
            path, size, sha = f["path"], f["size"], f["sha256"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise JobFailed("BAD_MANIFEST", "bad size for %s" % path)
            if not isinstance(sha, str) or len(sha) != 64:
                raise JobFailed("BAD_MANIFEST", "bad sha256 for %s" % path)
            confine("", path)  # relative, no empty, . or .. segment
            for c in path:
                if c not in _SAFE:
                    raise JobFailed("BAD_PATH", "unsafe character in %r" % path)
            if path in seen:
                raise JobFailed("BAD_MANIFEST", "duplicate path %s" % path)
            seen.add(path)
            out.append((path, size, binascii.unhexlify(sha)))
        return out
    except JobRejected as e:  # from confine(): a signed manifest with a bad path
        raise JobFailed(e.reason, e.details.get("message"))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise JobFailed("BAD_MANIFEST", "the manifest is not a valid bundle manifest")


class AppUpdate(Handler):
    def __init__(self, state: "AppState", pubkey, allow=(), ssl_context=None, transfer="mqtt", stream=None):
        # appstate.AppState of this boot, or a function that makes it (on first use)
        self.state = state() if callable(state) else state
        self.pubkey = pubkey
        self.allow = allow
        self.ssl_context = ssl_context
        self.buf = bytearray(_BUF)
        self.transfer = transfer  # "mqtt" or "http": the way a document offering both is fetched
        self.stream = stream or {}  # iotjobs.stream.Fetch options (block, idle_ms, tries)

    def _ref(self, doc):
        """The bundle's stream when it is to be fetched over MQTT, else None (HTTP)."""
        url, ref = params(doc)[:2]
        return ref if ref is not None and (url is None or self.transfer != "http") else None

    # -- run ---------------------------------------------------------------------------------
    def run(self, ctx, doc):
        url, _, sig, base, urls, version, down = params(doc)
        ref = self._ref(doc)
        st = self.state
        if ref is None and not http.allowed(url, self.allow):
            raise JobRejected("URL_NOT_ALLOWED", "the manifest URL is outside the allowlist")
        if not self.pubkey:
            raise JobRejected("NO_PUBLIC_KEY", "no signing key configured")
        running = st.version()
        if running and not down and not newer(version, running):
            raise JobRejected("DOWNGRADE", "%s is not newer than %s" % (version, running))
        if st.trial:
            raise JobFailed("APP_ON_TRIAL", "version %s has not confirmed itself yet" % running)
        slot = st.other()
        stage = st.folder(slot)
        rmtree(stage)  # what an earlier, unfinished update left there
        rmtree(stage + ".json")
        _mkdirs(stage + "/x")
        data = self._manifest(ctx, url) if ref is None else self._manifest_stream(ctx, ref)
        entries = self._verified(data, sig, version)
        gc.collect()
        need = 0
        for _, size, _ in entries:
            need += size
        fs = os.statvfs(st.root)
        free = fs[0] * fs[4]
        if need + 4096 * (len(entries) + 2) > free:
            raise JobFailed("NO_SPACE", "the bundle needs %d bytes, %d free" % (need, free))
        with open(stage + ".json", "wb") as f:
            f.write(data)
        ctx.checkpoint({"p": "stage", "slot": slot, "i": 0})
        ctx.point("app-manifest")
        return self._stage(ctx, doc, slot, entries, 0)

    def _manifest_stream(self, ctx, ref):
        from . import stream

        data = None

        def size(z):
            nonlocal data
            if z > _MANIFEST_MAX:
                raise JobFailed("BAD_MANIFEST", "the manifest is over %d bytes" % _MANIFEST_MAX)
            gc.collect()  # one contiguous block for the manifest
            data = bytearray(z)

        def put(off, block):
            data[off:off + len(block)] = block

        opts = self.stream
        f = stream.Fetch(ctx.runner.client, ref[0], ref[1], put, None, opts.get("block", 0), None,
                         opts.get("idle_ms", stream.IDLE_MS), opts.get("tries", stream.TRIES),
                         log=ctx.runner.log)
        f.run(ctx, None, size)
        return data

    def _manifest(self, ctx, url):
        def once(u):
            r = http.get(u, self.ssl_context)
            try:
                if r.length < 0 or r.length > _MANIFEST_MAX:
                    raise JobFailed("BAD_MANIFEST", "the manifest is over %d bytes" % _MANIFEST_MAX)
                gc.collect()  # one contiguous block for the manifest
                data = bytearray(r.length)
                mv = memoryview(data)
                got = 0
                while got < len(data):
                    n = r.readinto(mv[got:])
                    if not n:
                        break
                    got += n
                return data  # json, hashlib and file writes all take the bytearray
            finally:
                r.close()

        try:
            return once(url)
        except http.HttpError as e:
            if e.status == 403:
                fresh = ctx.fresh_document()
                u = fresh.get("manifest") if isinstance(fresh, dict) else None
                if isinstance(u, str) and u != url and http.allowed(u, self.allow):
                    try:
                        return once(u)
                    except http.HttpError as e2:
                        e = e2
                    except OSError:
                        raise JobFailed("DOWNLOAD_FAILED", "the manifest download failed")
            raise JobFailed("DOWNLOAD_FAILED", e.reason, http=str(e.status), file="manifest")
        except OSError:
            raise JobFailed("DOWNLOAD_FAILED", "the manifest download failed")

    def _verified(self, data, sig, version):
        from . import ecdsa

        if not ecdsa.verify(self.pubkey, sig, digest=hashlib.sha256(data).digest()):
            raise JobFailed("BAD_SIGNATURE", "the manifest signature does not verify")
        return parse_manifest(data, version)

    def _url(self, doc, path):
        urls = doc.get("urls") if isinstance(doc, dict) else None
        if isinstance(urls, dict) and isinstance(urls.get(path), str):
            return urls[path]
        base = doc.get("base") if isinstance(doc, dict) else None
        return base + path if isinstance(base, str) else None

    def _stage(self, ctx, doc, slot, entries, first, cp=None):
        st = self.state
        stage = st.folder(slot)
        mv = memoryview(self.buf)
        n = len(entries)
        ref = self._ref(doc)
        for i in range(first, n):
            path, size, sha = entries[i]
            target = stage + "/" + path
            if ref is not None:
                _mkdirs(target)
                gc.collect()
                fid = ref[2].get(path) if ref[2] is not None else i + 1
                if not isinstance(fid, int) or isinstance(fid, bool) or not 0 <= fid <= 255:
                    raise JobFailed("BAD_ARGUMENT", "%s: no file id in the stream" % path,
                                    file=path)
                state = cp.get("st") if i == first and isinstance(cp, dict) else None

                def save(s, i=i):
                    ctx.checkpoint({"p": "stage", "slot": slot, "i": i, "st": s})

                total, h = fetch_stream(ctx, (ref[0], fid), target, size, state, self.buf,
                                        self.stream, save)
                self._check(ctx, path, size, sha, total, h.digest(), i, n, slot)
                continue
            url = self._url(doc, path)
            if url is None or not http.allowed(url, self.allow):
                raise JobFailed("URL_NOT_ALLOWED", "%s: no URL inside the allowlist" % path)
            _mkdirs(target)
            gc.collect()  # a whole heap for each file: the TLS handshake wants large blocks
            if i != first:
                with open(target, "wb"):
                    pass

            def refresh(path=path):
                u = self._url(ctx.fresh_document(), path)
                return u if u and http.allowed(u, self.allow) else None

            def on_checkpoint(have, i=i):
                ctx.checkpoint({"p": "stage", "slot": slot, "i": i})
                ctx.point("app-checkpoint")
                ctx.progress(file=path, bytes=str(have))

            resumed = i == first and _exists(target)
            total, h = fetch_file(ctx, url, target, self.buf, refresh, self.ssl_context,
                                  on_checkpoint)
            digest = h.digest()  # final: MicroPython's hash objects give it once
            if (total != size or digest != sha) and resumed:
                # What survived the power cut is not a prefix of the file: fetch it whole.
                with open(target, "wb"):
                    pass
                total, h = fetch_file(ctx, url, target, self.buf, refresh, self.ssl_context,
                                      on_checkpoint)
                digest = h.digest()
            self._check(ctx, path, size, sha, total, digest, i, n, slot)
        # Every file once more, as it is in flash now: what runs after the switch is what
        # was signed, whatever happened during the staging.
        for path, size, sha in entries:
            h = hashlib.sha256()
            got = 0
            with open(stage + "/" + path, "rb") as f:
                while True:
                    k = f.readinto(mv)
                    if not k:
                        break
                    h.update(mv[:k])
                    got += k
            if got != size or h.digest() != sha:
                raise JobFailed("HASH_MISMATCH", "staged %s changed in flash" % path, file=path)
        ctx.point("app-verified")
        version = doc["version"]
        ctx.checkpoint({"p": "switch", "slot": slot, "seq": st.seq + 1, "boot": ctx.boot,
                        "ver": version})
        ctx.point("app-switching")
        st.switch(slot, version)
        ctx.point("app-switched")
        ctx.progress(True, step="rebooting", app=version)
        ctx.request_reboot()

    def _check(self, ctx, path, size, sha, total, digest, i, n, slot):
        if total != size:
            raise JobFailed("SIZE_MISMATCH", "%s: got %d bytes, expected %d"
                            % (path, total, size), file=path)
        if digest != sha:
            raise JobFailed("HASH_MISMATCH", "sha256 of %s differs" % path, file=path)
        ctx.checkpoint({"p": "stage", "slot": slot, "i": i + 1})
        ctx.point("app-file")
        ctx.progress(files="%d/%d" % (i + 1, n))

    # -- after a reset -------------------------------------------------------------------------
    def resume(self, ctx, doc, cp):
        p = cp.get("p") if isinstance(cp, dict) else None
        st = self.state
        if p == "stage":
            slot = cp.get("slot")
            if slot != st.other() or not isinstance(cp.get("i"), int):
                return self.run(ctx, doc)
            p = params(doc)
            sig, version = p[2], p[5]
            try:
                mpath = st.folder(slot) + ".json"
                if os.stat(mpath)[6] > _MANIFEST_MAX:
                    raise OSError("manifest too large")
                with open(mpath, "rb") as f:
                    data = f.read()
                entries = self._verified(data, sig, version)
            except (OSError, JobFailed):
                return self.run(ctx, doc)  # the manifest did not survive: start over
            return self._stage(ctx, doc, slot, entries, cp["i"], cp)
        if p != "switch":
            return self.run(ctx, doc)
        slot, seq = cp.get("slot"), cp.get("seq")
        if st.seq == seq - 1 and st.cur != slot:
            st.switch(slot, cp.get("ver"))  # cut between the checkpoint and the switch
            ctx.point("app-switched")
            ctx.request_reboot()
        if st.seq != seq:
            raise JobFailed("APP_STATE", "the application pointer moved during the update")
        if st.cur == slot:
            if ctx.boot == cp.get("boot"):
                ctx.request_reboot()  # switched, the reset did not happen yet
            if st.confirm():  # it started, and the service has answered: keep it
                ctx.point("app-confirmed")
            return {"app": str(st.version()), "slot": slot}
        bad = st.failed or {}
        raise JobFailed("rolled_back", "version %s did not start; running %s"
                        % (bad.get("ver"), st.version()), error=str(bad.get("err")),
                        app=str(st.version()))

    def abort(self, ctx):
        """Cancelled while staging: free the flash the staged files hold."""
        cp = ctx.last_checkpoint
        if isinstance(cp, dict) and cp.get("p") == "stage" and cp.get("slot") == self.state.other():
            rmtree(self.state.folder(cp["slot"]))
            rmtree(self.state.folder(cp["slot"]) + ".json")


def _exists(path):
    try:
        return os.stat(path)[6] > 0
    except OSError:
        return False
