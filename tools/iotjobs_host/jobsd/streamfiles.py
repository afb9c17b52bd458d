"""The bytes behind streams: a stream file is the S3 object `s3://<bucket>/<key>`, i.e. the file
`<--files>/<bucket>/<key>` (the mapping presigned URLs use, files.py).

`measure()` reads a file at CreateStream / UpdateStream time for its size and SHA-256 (the
stream's ETag). `BlockSource` serves GetStream requests: the content of each (stream, version,
file) is read and hashed once and kept in memory (an LRU bounded by bytes); later requests only
`stat` the file and reuse the cached bytes while the file's identity (device, inode, size,
mtime) is unchanged. A file that changed is read and hashed again, once per change: a hash
that no longer matches the recorded one is ETagMismatch until the file changes again or an
UpdateStream records the new content. A file that is gone is ResourceNotFound; one that cannot
be read (a directory, a symlink out of the folder, no permission) is Unauthorized, the error a
device gets when the stream's role cannot read the S3 object.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from .files import clean_relpath
from .streams import StreamError

CACHE_BYTES = 256 << 20
_READ = 1 << 20


class Missing(Exception):
    """The object does not exist (ResourceNotFound)."""


class Unreadable(Exception):
    """The object exists but cannot be read (Unauthorized)."""


def resolve(root: str, bucket: str, key: str) -> str:
    """The real path of `root/bucket/key`; Missing or Unreadable otherwise (never a path
    outside root)."""
    rel = clean_relpath(f"{bucket}/{key}")
    if rel is None:
        raise Unreadable(f"s3://{bucket}/{key} is not a plain path under the files folder")
    real = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([root, real]) != root or real == root:
        raise Unreadable(f"s3://{bucket}/{key} resolves outside the files folder")
    return real


def _open(root: str, bucket: str, key: str) -> tuple[int, os.stat_result]:
    path = resolve(root, bucket, key)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise Missing(f"s3://{bucket}/{key} does not exist") from None
    except OSError as err:
        if err.errno in (errno.ENOTDIR, errno.ENAMETOOLONG):
            raise Missing(f"s3://{bucket}/{key} does not exist") from None
        raise Unreadable(f"s3://{bucket}/{key} cannot be read: {err.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Unreadable(f"s3://{bucket}/{key} is not a regular file")
    return fd, st


def _read_all(fd: int, size: int) -> bytes:
    chunks = []
    left = size
    while True:
        chunk = os.read(fd, max(_READ, left))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def measure(root: str, bucket: str, key: str) -> tuple[int, str]:
    """(size, sha256 hex) of an object; Missing or Unreadable."""
    fd, st = _open(root, bucket, key)
    try:
        h = hashlib.sha256()
        size = 0
        while True:
            chunk = os.read(fd, _READ)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
        return size, h.hexdigest()
    except OSError as err:
        raise Unreadable(f"s3://{bucket}/{key} cannot be read: {err.strerror}") from None
    finally:
        os.close(fd)


@dataclass
class _Entry:
    identity: tuple[int, int, int, int]
    data: Optional[bytes]          # None: the content no longer matches the stream's ETag


class BlockSource:
    """Contents of stream files by (stream id, version, file id), thread-safe."""

    def __init__(self, root: str, budget: int = CACHE_BYTES) -> None:
        self.root = root
        self._budget = budget
        self._used = 0
        self._entries: OrderedDict[tuple[str, int, int], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0                # how many times a file was read and hashed (tests, bench)

    def content(self, stream_id: str, version: int, file_id: int, bucket: str, key: str,
                size: int, sha256: str, token: Optional[str]) -> memoryview:
        """The file's bytes as recorded for this stream version; StreamError otherwise."""
        try:
            path = resolve(self.root, bucket, key)
            st = os.stat(path)
        except Unreadable as err:
            raise StreamError("Unauthorized", str(err), token) from None
        except FileNotFoundError:
            raise StreamError("ResourceNotFound", f"The file of fileId {file_id} no longer"
                                                  " exists", token) from None
        except OSError as err:
            raise StreamError("Unauthorized", f"The file of fileId {file_id} cannot be read:"
                                              f" {err.strerror}", token) from None
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        cache_key = (stream_id, version, file_id)
        with self._lock:
            entry = self._entries.get(cache_key)
            if entry is not None and entry.identity == identity:
                self._entries.move_to_end(cache_key)
                return self._ok(entry, file_id, token)
        entry = self._load(bucket, key, size, sha256, file_id, token)
        with self._lock:
            old = self._entries.pop(cache_key, None)
            if old is not None and old.data is not None:
                self._used -= len(old.data)
            self._entries[cache_key] = entry
            if entry.data is not None:
                self._used += len(entry.data)
            while self._used > self._budget and len(self._entries) > 1:
                _, dropped = self._entries.popitem(last=False)
                if dropped.data is not None:
                    self._used -= len(dropped.data)
        return self._ok(entry, file_id, token)

    def forget(self, stream_id: str) -> None:
        """Drop every cached version of a stream (after UpdateStream or DeleteStream)."""
        with self._lock:
            for cache_key in [k for k in self._entries if k[0] == stream_id]:
                entry = self._entries.pop(cache_key)
                if entry.data is not None:
                    self._used -= len(entry.data)

    @staticmethod
    def _ok(entry: _Entry, file_id: int, token: Optional[str]) -> memoryview:
        if entry.data is None:
            raise StreamError("ETagMismatch", f"The file of fileId {file_id} changed since the"
                                              " stream was created or updated", token)
        return memoryview(entry.data)

    def _load(self, bucket: str, key: str, size: int, sha256: str, file_id: int,
              token: Optional[str]) -> _Entry:
        try:
            fd, st = _open(self.root, bucket, key)
        except Missing:
            raise StreamError("ResourceNotFound", f"The file of fileId {file_id} no longer"
                                                  " exists", token) from None
        except Unreadable as err:
            raise StreamError("Unauthorized", str(err), token) from None
        try:
            data = _read_all(fd, st.st_size)
        except OSError as err:
            raise StreamError("Unauthorized", f"The file of fileId {file_id} cannot be read:"
                                              f" {err.strerror}", token) from None
        finally:
            os.close(fd)
        self.reads += 1
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            return _Entry(identity, None)
        return _Entry(identity, data)
