"""`tools/sign`: signing keys, signed firmware images and signed application bundles.

The device trusts an update only when an ECDSA P-256 / SHA-256 signature made with the key from
`keygen` verifies (`lib/iotjobs/ecdsa.py` holds the public half, `signing-pub.der`). Signatures
are DER, base64 in documents, exactly what AWS code signing puts in `sig-sha256-ecdsa`, so the
same device code checks images signed here and images signed by AWS.

Where files go: with `--bucket B --files DIR` the S3 object `s3://B/KEY` is written to
`DIR/B/KEY`, the folder jobsd's `--files` serves; without `--files` the document still names
`s3://B/KEY` (as a presigned-URL placeholder) and uploading the object is up to the user.
Objects are written atomically (temp file, then rename), so jobsd never serves half a file, and
an existing object with different content is refused without `--force`: a device halfway
through a download of the old bytes would otherwise fail its hash check.

Firmware image (`image`), the native document:
    {"operation": "ota", "url": U, "size": N, "sha256": HEX, "signature": B64, "version": V}
or, with `--afr-ota`, the document AWS OTA (HTTP protocol) creates:
    {"afr_ota": {"protocols": ["HTTP"], "files": [{"filepath": P, "filesize": N, "fileid": 0,
     "certfile": C, "update_data_url": U, "auth_scheme": "aws.s3.presigned",
     "sig-sha256-ecdsa": B64}]}}

Application bundle (`bundle`): the object tree under the key prefix PREFIX (default `app/V`):
    PREFIX/manifest.json   {"files":[{"path":..,"sha256":..,"size":..},..],"version":V}
                           (compact JSON, sorted keys, files sorted by path); the signature
                           covers exactly these bytes
    PREFIX/manifest.sig    base64 of the DER signature of manifest.json, and a newline
    PREFIX/files/<path>    each file of the bundle
and the document
    {"operation": "app-update", "manifest": U, "signature": B64, "base": PREFIX_URL/files/,
     "version": V}
A file's URL is `base` + its manifest path. Paths are relative, `/`-separated, of segments made
of `A-Z a-z 0-9 . _ -` (never `.` or `..`), so the device can join them to a URL or a local path
with no quoting and no escape; the bundle holds only regular files (symlinks, devices and fifos
are refused, never silently dropped).

A presigned URL names one object, so `base` is a plain URL prefix (`https://s3.../B/PREFIX/files/`
or `--base-url`). `--presign-files` adds `"urls": {path: placeholder, ...}`, one presigned URL
per file, for stores that serve nothing unsigned (jobsd, private S3 buckets).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import fnmatch
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Optional
from urllib.parse import quote

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

KEY_FILE = "signing-key.pem"
PUB_PEM_FILE = "signing-pub.pem"
PUB_DER_FILE = "signing-pub.der"
MANIFEST = "manifest.json"
MANIFEST_SIG = "manifest.sig"
FILES_DIR = "files"
PLACEHOLDER = "${aws:iot:s3-presigned-url:%s}"
MAX_DOCUMENT = 32768  # AWS IoT job documents (and jobsd) stop at 32 KB
CHUNK = 64 * 1024
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_REGION_RE = re.compile(r"[a-z0-9-]+")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")
_VERSION_RE = re.compile(r"[A-Za-z0-9._+-]{1,64}")
_POINT_LEN = 65


class SignError(Exception):
    """A mistake in what the user asked for: reported in one line, exit status 2."""


# -- keys ----------------------------------------------------------------------------------------
def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SignError(f"cannot read {path}: {e.strerror or e}") from None


def load_private_key(path: str) -> ec.EllipticCurvePrivateKey:
    data = _read(path)
    try:
        if data.lstrip().startswith(b"-----"):
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise SignError(f"{path} is not an unencrypted private key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SignError(f"{path} is not a P-256 (secp256r1) key; the device verifies only P-256")
    return key


def load_public_key(path: str) -> ec.EllipticCurvePublicKey:
    """PEM or DER SubjectPublicKeyInfo, or the raw 65-byte point: whatever the device accepts."""
    data = _read(path)
    try:
        if data.lstrip().startswith(b"-----"):
            key = serialization.load_pem_public_key(data)
        elif len(data) == _POINT_LEN and data[0] == 4:
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), data)
        else:
            key = serialization.load_der_public_key(data)
    except (ValueError, TypeError) as e:
        raise SignError(f"{path} is not a public key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SignError(f"{path} is not a P-256 (secp256r1) public key")
    return key


def _write_atomic(path: str, data: Optional[bytes], mode: int, src: Optional[str] = None) -> None:
    """`data` (or a streamed copy of the file `src`) at `path`, all or nothing."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        os.fchmod(fd, mode)  # before any byte of a secret is written
        with os.fdopen(fd, "wb") as f:
            if src is not None:
                with open(src, "rb") as s:
                    shutil.copyfileobj(s, f, CHUNK)
            else:
                assert data is not None
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def keygen(out: str, force: bool = False) -> dict[str, str]:
    paths = {name: os.path.join(out, name) for name in (KEY_FILE, PUB_PEM_FILE, PUB_DER_FILE)}
    existing = [p for p in paths.values() if os.path.lexists(p)]
    if existing and not force:
        raise SignError(f"{', '.join(existing)} already exist(s); --force replaces them (devices "
                        "that trust the old key will refuse updates signed with the new one)")
    os.makedirs(out, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pub = key.public_key()
    _write_atomic(paths[KEY_FILE], key.private_bytes(serialization.Encoding.PEM,
                                                     serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()), 0o600)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    _write_atomic(paths[PUB_PEM_FILE], pub.public_bytes(serialization.Encoding.PEM, spki), 0o644)
    _write_atomic(paths[PUB_DER_FILE], pub.public_bytes(serialization.Encoding.DER, spki), 0o644)
    return paths


# -- signing -------------------------------------------------------------------------------------
def file_digest(path: str) -> tuple[int, bytes]:
    """(size, SHA-256) of a file, read in chunks: firmware images need not fit in memory."""
    h = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
    except OSError as e:
        raise SignError(f"cannot read {path}: {e.strerror or e}") from None
    return size, h.digest()


def sign_digest(key: ec.EllipticCurvePrivateKey, digest: bytes) -> bytes:
    """DER ECDSA signature of the data whose SHA-256 is `digest` (same as signing the data)."""
    return key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def verify_digest(pub: ec.EllipticCurvePublicKey, signature: bytes, digest: bytes) -> bool:
    """DER signatures, and raw r||s (64 bytes) as the device also accepts."""
    forms = [signature]
    if len(signature) == 2 * 32:
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        forms.append(encode_dss_signature(r, s))
    for sig in forms:
        try:
            pub.verify(sig, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
            return True
        except (InvalidSignature, ValueError):
            pass
    return False


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignError("the signature is not base64") from None


# -- S3 objects and jobsd's files folder --------------------------------------------------------
def check_bucket(bucket: str) -> str:
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise SignError(f"{bucket!r} is not an S3 bucket name (3..63 of a-z 0-9 . -)")
    return bucket


def check_key(key: str, what: str = "--key-name") -> str:
    """An S3 key that is also a safe relative path under the files folder."""
    if (not key or "\x00" in key or "\\" in key or key.startswith("/")
            or any(seg in ("", ".", "..") for seg in key.split("/"))):
        raise SignError(f"{what} {key!r} must be a relative path of named segments (no '..', "
                        "no empty segment, no leading '/')")
    return key


def s3_url(bucket: str, key: str, region: Optional[str] = None) -> str:
    host = f"s3.{region}.amazonaws.com" if region else "s3.amazonaws.com"
    return f"https://{host}/{bucket}/{quote(key, safe='/-_.~')}"


def presigned(bucket: str, key: str, region: Optional[str] = None) -> str:
    """The placeholder AWS IoT (and jobsd) replaces with a fresh presigned URL per delivery."""
    return PLACEHOLDER % s3_url(bucket, key, region)


def _same_content(path: str, data: Optional[bytes], src: Optional[str]) -> bool:
    if data is None:
        assert src is not None
        return file_digest(path) == file_digest(src)
    with open(path, "rb") as f:
        return f.read() == data


def put_object(root: str, key: str, *, data: Optional[bytes] = None, src: Optional[str] = None,
               force: bool = False) -> str:
    """Write one object (bytes or a copy of a file) at root/key; returns its path."""
    check_key(key)
    dest = os.path.join(root, *key.split("/"))
    if os.path.islink(dest) or (os.path.lexists(dest) and not os.path.isfile(dest)):
        raise SignError(f"{dest} exists and is not a regular file")
    if os.path.exists(dest) and not force and not _same_content(dest, data, src):
        raise SignError(f"{dest} already exists with other content; --force replaces it")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        _write_atomic(dest, data, 0o644, src)
    except OSError as e:
        raise SignError(f"cannot write {dest}: {e.strerror or e}") from None
    return dest


def _check_size(doc: dict[str, Any]) -> None:
    n = len(json.dumps(doc, separators=(",", ":")).encode())
    if n > MAX_DOCUMENT:
        raise SignError(f"the job document is {n} bytes; AWS IoT and jobsd accept at most "
                        f"{MAX_DOCUMENT}")


# -- firmware image ------------------------------------------------------------------------------
def image_document(*, url: str, size: int, sha256: str, signature: str,
                   version: Optional[str] = None, afr_ota: bool = False,
                   filepath: str = "", certfile: str = "signer") -> dict[str, Any]:
    if afr_ota:
        return {"afr_ota": {"protocols": ["HTTP"], "files": [{
            "filepath": filepath, "filesize": size, "fileid": 0, "certfile": certfile,
            "update_data_url": url, "auth_scheme": "aws.s3.presigned",
            "sig-sha256-ecdsa": signature}]}}
    doc: dict[str, Any] = {"operation": "ota", "url": url, "size": size, "sha256": sha256,
                           "signature": signature}
    if version is not None:
        doc["version"] = version
    return doc


def image(a: argparse.Namespace) -> dict[str, Any]:
    key = load_private_key(a.key)
    if not os.path.isfile(a.file):
        raise SignError(f"{a.file} is not a regular file")
    if a.version is not None and not _VERSION_RE.fullmatch(a.version):
        raise SignError(f"--version {a.version!r}: 1..64 of A-Z a-z 0-9 . _ + -")
    if a.bucket:
        check_bucket(a.bucket)
        key_name = check_key(a.key_name or os.path.basename(a.file))
        url = presigned(a.bucket, key_name, a.region)
    elif a.url:
        url = a.url
    else:
        raise SignError("name where devices fetch the image: --bucket B [--key-name K] or --url URL")
    if a.files and not a.bucket:
        raise SignError("--files needs --bucket: the object s3://B/K is the file DIR/B/K")
    size, digest = file_digest(a.file)
    signature = sign_digest(key, digest)
    if a.files:
        dest = put_object(os.path.join(a.files, a.bucket), key_name, src=a.file, force=a.force)
        if file_digest(dest) != (size, digest):
            raise SignError(f"{a.file} changed while it was being signed; run again")
        print(f"sign: copied {a.file} to {dest}", file=sys.stderr)
    doc = image_document(url=url, size=size, sha256=digest.hex(), signature=b64(signature),
                         version=a.version, afr_ota=a.afr_ota,
                         filepath=a.filepath or os.path.basename(a.file), certfile=a.certfile)
    _check_size(doc)
    return doc


# -- application bundle --------------------------------------------------------------------------
def _excluded(rel: str, name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def bundle_files(folder: str, exclude: Optional[list[str]] = None) -> list[tuple[str, str]]:
    """(manifest path, file system path) of every file of the bundle, sorted by manifest path.

    Refuses, rather than skips, anything the device could not reproduce faithfully: names
    outside the safe character set, symlinks, and files that are not regular."""
    patterns = exclude or []
    out: list[tuple[str, str]] = []

    def walk(fs_dir: str, rel_dir: str) -> None:
        try:
            entries = sorted(os.scandir(fs_dir), key=lambda e: e.name)
        except OSError as e:
            raise SignError(f"cannot list {fs_dir}: {e.strerror or e}") from None
        for e in entries:
            rel = f"{rel_dir}{e.name}"
            if _excluded(rel, e.name, patterns):
                continue
            if not _SEGMENT_RE.fullmatch(e.name) or e.name in (".", ".."):
                raise SignError(f"{e.path}: bundle names may hold only A-Z a-z 0-9 . _ - "
                                "(use --exclude to leave it out)")
            if e.is_symlink():
                raise SignError(f"{e.path} is a symlink; a bundle holds only regular files")
            if e.is_dir(follow_symlinks=False):
                walk(e.path, rel + "/")
            elif e.is_file(follow_symlinks=False):
                out.append((rel, e.path))
            else:
                raise SignError(f"{e.path} is not a regular file")

    if not os.path.isdir(folder):
        raise SignError(f"{folder} is not a directory")
    walk(folder, "")
    if not out:
        raise SignError(f"{folder} holds no files")
    out.sort(key=lambda t: t[0])
    return out


def manifest_bytes(version: str, entries: list[dict[str, Any]]) -> bytes:
    """Canonical manifest text (compact, sorted keys): what the signature covers, byte for byte."""
    return json.dumps({"version": version, "files": entries}, sort_keys=True,
                      separators=(",", ":")).encode()


def bundle(a: argparse.Namespace) -> dict[str, Any]:
    key = load_private_key(a.key)
    if not _VERSION_RE.fullmatch(a.version):
        raise SignError(f"--version {a.version!r}: 1..64 of A-Z a-z 0-9 . _ + -")
    prefix = check_key((a.key_prefix or f"app/{a.version}").strip("/") or "", "--key-prefix")
    if a.bucket:
        check_bucket(a.bucket)
    if a.files and not a.bucket:
        raise SignError("--files needs --bucket: the object s3://B/K is the file DIR/B/K")
    if a.presign_files and not a.bucket:
        raise SignError("--presign-files needs --bucket")
    if not a.bucket and not a.base_url:
        raise SignError("name where devices fetch the bundle: --bucket B or --base-url URL")
    if not a.files and not a.stage:
        raise SignError("say where the bundle's objects go: --files DIR (jobsd) or --stage DIR "
                        "(to upload to s3://B/PREFIX yourself)")

    files = bundle_files(a.dir, a.exclude)
    entries = []
    for rel, path in files:
        size, digest = file_digest(path)
        entries.append({"path": rel, "size": size, "sha256": digest.hex()})
    manifest = manifest_bytes(a.version, entries)
    signature = b64(sign_digest(key, hashlib.sha256(manifest).digest()))

    root = os.path.join(a.files, a.bucket, *prefix.split("/")) if a.files else a.stage
    if not a.force and os.path.isdir(root) and os.listdir(root):
        old = os.path.join(root, MANIFEST)
        if not (os.path.isfile(old) and _read(old) == manifest):
            raise SignError(f"{root} already holds another bundle; a version is published once "
                            "(--force writes over it)")
    for (rel, path), entry in zip(files, entries, strict=True):
        dest = put_object(root, f"{FILES_DIR}/{rel}", src=path, force=True)
        if file_digest(dest) != (entry["size"], bytes.fromhex(entry["sha256"])):
            raise SignError(f"{path} changed while the bundle was being made; run again")
    put_object(root, MANIFEST_SIG, data=(signature + "\n").encode(), force=True)
    put_object(root, MANIFEST, data=manifest, force=True)  # last: its presence marks completion
    print(f"sign: {len(entries)} file(s), manifest and signature written under {root}",
          file=sys.stderr)

    if a.base_url:
        root_url = a.base_url if a.base_url.endswith("/") else a.base_url + "/"
    else:
        root_url = s3_url(a.bucket, prefix + "/", a.region)
    manifest_url = presigned(a.bucket, f"{prefix}/{MANIFEST}", a.region) if a.bucket \
        else root_url + MANIFEST
    doc: dict[str, Any] = {"operation": "app-update", "manifest": manifest_url,
                           "signature": signature, "base": f"{root_url}{FILES_DIR}/",
                           "version": a.version}
    if a.presign_files:
        doc["urls"] = {e["path"]: presigned(a.bucket, f"{prefix}/{FILES_DIR}/{e['path']}", a.region)
                       for e in entries}
    _check_size(doc)
    return doc


# -- verify --------------------------------------------------------------------------------------
def _document_claims(doc: Any) -> tuple[Optional[int], Optional[str], str]:
    """(size, sha256 hex, signature b64) a native or afr_ota image document states."""
    if isinstance(doc, dict) and isinstance(doc.get("afr_ota"), dict):
        files = doc["afr_ota"].get("files")
        f = files[0] if isinstance(files, list) and files and isinstance(files[0], dict) else {}
        sig = f.get("sig-sha256-ecdsa")
        if isinstance(sig, str):
            return f.get("filesize"), None, sig
    elif isinstance(doc, dict) and isinstance(doc.get("signature"), str):
        return doc.get("size"), doc.get("sha256"), doc["signature"]
    raise SignError("the document holds no image signature (native 'signature' or afr_ota "
                    "'sig-sha256-ecdsa')")


def verify(a: argparse.Namespace) -> int:
    pub = load_public_key(a.pub)
    size, digest = file_digest(a.file)
    problems = []
    if a.document:
        try:
            doc = json.loads(_read(a.document))
        except ValueError as e:
            raise SignError(f"{a.document} is not JSON: {e}") from None
        want_size, want_sha, sig_b64 = _document_claims(doc)
        if want_size is not None and want_size != size:
            problems.append(f"size {size} but the document says {want_size}")
        if want_sha is not None and want_sha.lower() != digest.hex():
            problems.append(f"sha256 {digest.hex()} but the document says {want_sha}")
    else:
        sig_b64 = a.signature
    if sig_b64.startswith("@"):
        sig_b64 = _read(sig_b64[1:]).decode("ascii", "replace")
    if not verify_digest(pub, unb64(sig_b64), digest):
        problems.append("the signature does not verify with this public key")
    if problems:
        for p in problems:
            print(f"sign: {a.file}: {p}", file=sys.stderr)
        print(f"BAD {a.file}")
        return 1
    print(f"OK {a.file} ({size} bytes, sha256 {digest.hex()})")
    return 0


# -- command line --------------------------------------------------------------------------------
def _emit(doc: dict[str, Any], out: Optional[str]) -> None:
    text = json.dumps(doc, indent=2) + "\n"
    if out:
        with open(out, "w") as f:
            f.write(text)
    sys.stdout.write(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sign", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    k = sub.add_parser("keygen", help="make a P-256 signing key pair")
    k.add_argument("--out", required=True, metavar="DIR",
                   help=f"writes {KEY_FILE} (0600), {PUB_PEM_FILE}, {PUB_DER_FILE} (device config)")
    k.add_argument("--force", action="store_true", help="replace an existing key pair")

    def where(s: argparse.ArgumentParser) -> None:
        s.add_argument("--key", required=True, metavar="KEY.pem", help="the signing key (PEM/DER)")
        s.add_argument("--bucket", help="S3 bucket devices fetch from (presigned-URL placeholder)")
        s.add_argument("--region", help="S3 region in URLs (default: s3.amazonaws.com)")
        s.add_argument("--files", metavar="DIR", help="jobsd's --files folder: write s3://B/K to DIR/B/K")
        s.add_argument("--out", metavar="DOC.json", help="also write the job document here")
        s.add_argument("--force", action="store_true", help="replace objects that differ")

    i = sub.add_parser("image", help="sign a firmware image; print its OTA job document")
    i.add_argument("file", metavar="FILE")
    where(i)
    i.add_argument("--version", help="firmware version (native document only)")
    i.add_argument("--key-name", metavar="K", help="S3 key of the image (default: FILE's name)")
    i.add_argument("--url", help="the image's URL when it is not in a bucket")
    i.add_argument("--afr-ota", action="store_true", help="AWS OTA (afr_ota, HTTP) document")
    i.add_argument("--filepath", help="afr_ota filepath (default: FILE's name)")
    i.add_argument("--certfile", default="signer", help="afr_ota certfile (default: signer)")

    b = sub.add_parser("bundle", help="sign an application folder; print its app-update document")
    b.add_argument("dir", metavar="DIR")
    where(b)
    b.add_argument("--version", required=True)
    b.add_argument("--key-prefix", metavar="PREFIX", help="S3 key prefix (default: app/VERSION)")
    b.add_argument("--stage", metavar="OUT", help="write the objects of PREFIX here (to upload)")
    b.add_argument("--base-url", metavar="URL", help="URL of PREFIX/ as devices see it")
    b.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out paths or names matching GLOB (repeatable), e.g. '*.pyc'")
    b.add_argument("--presign-files", action="store_true",
                   help='add "urls": {path: presigned URL} for stores that serve nothing unsigned')

    v = sub.add_parser("verify", help="check a file's signature (exit 1 when it does not verify)")
    v.add_argument("file", metavar="FILE")
    v.add_argument("--pub", required=True, help="public key: PEM, DER SPKI or raw 65-byte point")
    g = v.add_mutually_exclusive_group(required=True)
    g.add_argument("--signature", metavar="B64", help="base64 DER or r||s signature, or @FILE")
    g.add_argument("--document", metavar="DOC.json", help="an image job document (size, sha256 too)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    a = parser().parse_args(argv)
    try:
        if a.cmd == "keygen":
            paths = keygen(a.out, a.force)
            print(f"wrote {paths[KEY_FILE]} (keep it secret), {paths[PUB_PEM_FILE]}, "
                  f"{paths[PUB_DER_FILE]} (for the device config)")
            return 0
        if a.cmd == "verify":
            return verify(a)
        doc = image(a) if a.cmd == "image" else bundle(a)
        _emit(doc, a.out)
        return 0
    except SignError as e:
        print(f"sign: {e}", file=sys.stderr)
        return 2
