"""`--files DIR`: the local stand-in for S3 presigned URLs, served on the `--data` listener.

Mapping (the choice this module makes): an S3 object `s3://<bucket>/<key>` is the file
`DIR/<bucket>/<key>`; the bucket is the first path segment, so two buckets never share a key.
Both S3 URL styles name an object:
`https://s3[.<region>].amazonaws.com/<bucket>/<key>` (path style) and
`https://<bucket>.s3[.<region>].amazonaws.com/<key>` (virtual-hosted style); the key is
percent-decoded as S3 does.

Presigned URLs: a job document may hold `${aws:iot:s3-presigned-url:<S3 URL>}` (PROTOCOL.md 4).
Every time the document is delivered to a device the placeholder is replaced by a fresh
`<base>/files/<bucket>/<key>?X-Expires=<epoch>&X-Signature=<hex>`; the signature is
HMAC-SHA256, keyed with a per-database secret (generated on first start and kept in SQLite, so
URLs stay valid across restarts), over `<bucket>/<key>` and the expiry. `<base>` is
`http://<data listener>` unless `--files-url` names another. The control plane's GetJobDocument
returns the placeholders untouched, as AWS does.

Serving: GET and HEAD; one `Range: bytes=a-b | a- | -n` range gives 206 with Content-Range,
an unsatisfiable one 416; other Range forms are ignored (200, whole file), as RFC 9110 allows.
Failures answer like S3 (XML `<Error>` body): bad or missing signature and expired URLs 403;
a path that is not a clean relative path (`..`, `.`, empty segments, NUL, backslash) 403 before
the file system is touched; a file that does not exist, is not a regular file, or resolves
(through symlinks) outside DIR 404. Only regular files under the real path of DIR are opened.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler
from typing import Optional
from collections.abc import Callable
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .rules import parse_json

log = logging.getLogger("jobsd.files")

PREFIX = "/files/"
PLACEHOLDER = "${aws:iot:s3-presigned-url:"
_PLACEHOLDER_RE = re.compile(r"\$\{aws:iot:s3-presigned-url:([^}\"\s\\]+)\}")
_PATH_HOST_RE = re.compile(r"s3(?:[.-][a-z0-9-]+)?\.amazonaws\.com(?:\.cn)?")
_VHOST_RE = re.compile(r"(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])\.s3(?:[.-][a-z0-9-]+)?"
                       r"\.amazonaws\.com(?:\.cn)?")
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
CHUNK = 64 * 1024
MAX_DOCUMENT = 32768
DEFAULT_EXPIRES = 3600


def s3_object(url: str) -> Optional[tuple[str, str]]:
    """(bucket, key) of an S3 object URL in either style; None when it names no object."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme != "https" or not parts.hostname:
        return None
    host, path = parts.hostname.lower(), parts.path
    vhost = _VHOST_RE.fullmatch(host)
    if vhost is not None:
        bucket, key = vhost.group("bucket"), path.lstrip("/")
    elif _PATH_HOST_RE.fullmatch(host):
        bucket, _, key = path.lstrip("/").partition("/")
    else:
        return None
    key = unquote(key)
    if not bucket or not key:
        return None
    return bucket, key


def clean_relpath(rel: str) -> Optional[str]:
    """`rel` if it is a plain relative path of named segments; None otherwise."""
    if not rel or "\x00" in rel or "\\" in rel or rel.startswith("/"):
        return None
    if any(seg in ("", ".", "..") for seg in rel.split("/")):
        return None
    return rel


class FileStore:
    """Signs URLs for files under `root` and serves them to the data-plane HTTP handler."""

    def __init__(self, root: str, secret: bytes, base_url: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise OSError(f"--files {root} is not a directory")
        self._secret = secret
        self.base_url = base_url.rstrip("/")
        self._clock = clock

    # -- signing ---------------------------------------------------------------------------------
    def _signature(self, rel: str, expires: int) -> str:
        msg = f"{rel}\n{expires}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

    def sign(self, rel: str, expires_in: int) -> str:
        expires = int(self._clock()) + expires_in
        return (f"{self.base_url}{PREFIX}{quote(rel)}?X-Expires={expires}"
                f"&X-Signature={self._signature(rel, expires)}")

    def presign_document(self, document: str, expires_in: int) -> str:
        """The document with every presigned-URL placeholder replaced by a fresh URL.

        A placeholder whose URL names no S3 object is left as it is (AWS would not sign it
        either). The URLs use only URL-safe characters, so the JSON text stays valid."""
        def replace(match: re.Match[str]) -> str:
            obj = s3_object(match.group(1))
            if obj is None:
                return match.group(0)
            return self.sign(f"{obj[0]}/{obj[1]}", expires_in)
        return _PLACEHOLDER_RE.sub(replace, document)

    # -- files -----------------------------------------------------------------------------------
    def resolve(self, rel: str) -> Optional[str]:
        """The real path of a regular file under root, or None (never outside root)."""
        if clean_relpath(rel) is None:
            return None
        real = os.path.realpath(os.path.join(self.root, rel))
        if os.path.commonpath([self.root, real]) != self.root or real == self.root:
            return None
        try:
            if not stat.S_ISREG(os.stat(real).st_mode):
                return None
        except OSError:
            return None
        return real

    def read_document(self, url: str) -> str:
        """CreateJob `documentSource`: the JSON object text of an S3 URL's file; ValueError
        with the reason otherwise."""
        obj = s3_object(url)
        if obj is None:
            raise ValueError("documentSource must be an S3 object URL, https://s3.amazonaws.com/"
                             "<bucket>/<key> or https://<bucket>.s3.amazonaws.com/<key>")
        path = self.resolve(f"{obj[0]}/{obj[1]}")
        if path is None:
            raise ValueError(f"documentSource {url} does not exist under the files folder")
        with open(path, "rb") as f:
            data = f.read(MAX_DOCUMENT + 1)
        if len(data) > MAX_DOCUMENT:
            raise ValueError(f"documentSource {url} is larger than {MAX_DOCUMENT} bytes")
        try:
            text = data.decode("utf-8")
            parsed = parse_json(text)
        except ValueError:
            raise ValueError(f"documentSource {url} is not UTF-8 JSON") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"documentSource {url} is not a JSON object")
        return text

    # -- HTTP ------------------------------------------------------------------------------------
    def serve(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        """Answer one GET or HEAD of `/files/...` on the handler's connection."""
        parts = urlsplit(h.path)
        rel = unquote(parts.path[len(PREFIX):])
        query = parse_qs(parts.query)
        expires_s = query.get("X-Expires", [""])[-1]
        signature = query.get("X-Signature", [""])[-1]
        if clean_relpath(rel) is None:
            return self._error(h, head, 403, "AccessDenied", "Invalid object path")
        if not expires_s.isdigit() or not signature:
            return self._error(h, head, 403, "AccessDenied", "Missing X-Expires or X-Signature")
        expires = int(expires_s)
        if not hmac.compare_digest(signature, self._signature(rel, expires)):
            return self._error(h, head, 403, "SignatureDoesNotMatch",
                               "The request signature does not match")
        if self._clock() > expires:
            return self._error(h, head, 403, "AccessDenied", "Request has expired")
        path = self.resolve(rel)
        if path is None:
            return self._error(h, head, 404, "NoSuchKey", "The specified key does not exist.")
        try:
            f = open(path, "rb")
        except OSError:
            return self._error(h, head, 404, "NoSuchKey", "The specified key does not exist.")
        with f:
            st = os.fstat(f.fileno())
            size = st.st_size
            etag = f'"{st.st_mtime_ns:x}-{size:x}"'
            span = _range(h.headers.get("Range"), size)
            if span == "unsatisfiable":
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{size}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return None
            start, end = span if span is not None else (0, size - 1)
            length = max(0, end - start + 1)
            h.send_response(206 if span is not None else 200)
            h.send_header("Content-Type", "application/octet-stream")
            h.send_header("Content-Length", str(length))
            h.send_header("Accept-Ranges", "bytes")
            h.send_header("ETag", etag)
            h.send_header("Last-Modified", formatdate(st.st_mtime, usegmt=True))
            if span is not None:
                h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            h.end_headers()
            if head:
                return None
            f.seek(start)
            left = length
            try:
                while left > 0:
                    chunk = f.read(min(CHUNK, left))
                    if not chunk:  # the file shrank under us: the connection cannot continue
                        h.close_connection = True
                        break
                    h.wfile.write(chunk)
                    left -= len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                h.close_connection = True  # the device went away mid-download; it may resume
        return None

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, head: bool, status: int, code: str,
               message: str) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{message}</Message></Error>").encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/xml")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)


def _range(header: Optional[str], size: int) -> tuple[int, int] | str | None:
    """(first, last) byte of a single satisfiable range, "unsatisfiable", or None (whole file)."""
    if not header:
        return None
    m = _RANGE_RE.fullmatch(header.strip())
    if m is None:
        return None  # multiple ranges or another unit: ignored, the whole file is sent
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    a = int(first)
    b = int(last) if last else size - 1
    if last and b < a:
        return None  # syntactically invalid: ignored
    if a >= size:
        return "unsatisfiable"
    return a, min(b, size - 1)
