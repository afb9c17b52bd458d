"""iotjobs.ecdsa under the unix port (32 KB heap) against `cryptography` as the oracle: seeded
random keys and messages, valid and tampered signatures, every key and signature format, strict
DER, out-of-range scalars and points, and constructed edge cases (x(R) >= n, R at infinity,
Q = +-G) that random keys never reach. The device code runs once over all cases."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import statistics
import subprocess
import tempfile
from dataclasses import dataclass, field

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)

from conftest import MICROPYTHON, ROOT

SCRIPT = os.path.join(ROOT, "host_tests", "scripts", "ecdsa_vectors.py")
DEVICE_ENV = dict(os.environ, MICROPYPATH=".frozen:" + os.path.join(ROOT, "lib"))
HEAP = "32K"
KEYS = 200
SEED = 0x1E7_0B5

# P-256 domain parameters, for the few cases the test builds by hand
P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
G = (0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
     0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5)
SHA256 = ec.ECDSA(hashes.SHA256())
PREHASHED = ec.ECDSA(Prehashed(hashes.SHA256()))


# -- a tiny affine reference, only to construct edge cases (cryptography then judges them) ------
def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    if a[0] == b[0] and (a[1] + b[1]) % P == 0:
        return None
    if a == b:
        lam = 3 * (a[0] * a[0] - 1) * pow(2 * a[1], -1, P) % P
    else:
        lam = (b[1] - a[1]) * pow(b[0] - a[0], -1, P) % P
    x = (lam * lam - a[0] - b[0]) % P
    return x, (lam * (a[0] - x) - a[1]) % P


def _mul(k, pt):
    acc = None
    for bit in bin(k)[2:]:
        acc = _add(acc, acc)
        if bit == "1":
            acc = _add(acc, pt)
    return acc


def _neg(pt):
    return pt[0], (-pt[1]) % P


def _small_x_point():
    x = 0
    while True:
        rhs = (x ** 3 - 3 * x + B) % P
        y = pow(rhs, (P + 1) // 4, P)  # p = 3 mod 4
        if y * y % P == rhs:
            return x, y
        x += 1


def _raw_point(pt) -> bytes:
    return b"\x04" + pt[0].to_bytes(32, "big") + pt[1].to_bytes(32, "big")


# -- cases ----------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    kind: str
    key: bytes | str  # raw point / DER SPKI bytes, or PEM text
    sig: bytes
    msg: bytes | None = None
    digest: bytes | None = None
    expected: bool = False
    oracle: bool = True  # expected computed by cryptography (else fixed by the API's rules)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        d: dict = {"id": self.id, "sig": self.sig.hex()}
        if isinstance(self.key, str):
            d["pem"] = self.key
        else:
            d["key"] = self.key.hex()
        if self.msg is not None:
            d["msg"] = self.msg.hex()
        if self.digest is not None:
            d["digest"] = self.digest.hex()
        return json.dumps(d)


def _load_key(key: bytes | str):
    """The key as cryptography reads it, or None when it refuses it or it is not P-256."""
    try:
        if isinstance(key, str):
            k = serialization.load_pem_public_key(key.encode())
        elif key[:1] == b"\x04":
            k = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), key)
        else:
            k = serialization.load_der_public_key(key)
    except (ValueError, TypeError):
        return None
    if not isinstance(k, ec.EllipticCurvePublicKey) or not isinstance(k.curve, ec.SECP256R1):
        return None
    return k


def oracle(key: bytes | str, sig: bytes, msg: bytes | None, digest: bytes | None,
           raw_sig: bool) -> bool:
    """What cryptography says (raw r||s is converted to DER for it)."""
    k = _load_key(key)
    if k is None:
        return False
    if raw_sig:
        sig = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    try:
        if msg is not None:
            k.verify(sig, msg, SHA256)
        else:
            k.verify(sig, digest, PREHASHED)
    except InvalidSignature:
        return False
    return True


def raw(r: int, s: int) -> bytes:
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def der_int(v: bytes) -> bytes:
    return b"\x02" + bytes([len(v)]) + v


def der_seq(body: bytes) -> bytes:
    return b"\x30" + bytes([len(body)]) + body


def minimal(v: int) -> bytes:
    return v.to_bytes(max(1, (v.bit_length() + 8) // 8), "big")  # room for the sign bit


class Builder:
    def __init__(self) -> None:
        self.cases: list[Case] = []

    def add(self, kind: str, key, sig: bytes, msg=None, digest=None, *, raw_sig: bool = False,
            expected: bool | None = None) -> None:
        if expected is None:
            exp, by_oracle = oracle(key, sig, msg, digest, raw_sig), True
        else:
            exp, by_oracle = expected, False
        self.cases.append(Case(f"{kind}-{len(self.cases)}", kind, key, sig, msg, digest, exp, by_oracle))


def key_forms(pub: ec.EllipticCurvePublicKey) -> tuple[bytes, bytes, str]:
    return (pub.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint),
            pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
            pub.public_bytes(serialization.Encoding.PEM,
                             serialization.PublicFormat.SubjectPublicKeyInfo).decode())


def build_cases() -> list[Case]:
    rng = random.Random(SEED)
    b = Builder()
    det = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
    keys = [ec.derive_private_key(rng.randrange(1, N), ec.SECP256R1()) for _ in range(KEYS)]
    for i, priv in enumerate(keys):
        forms = key_forms(priv.public_key())
        key = forms[i % 3]
        other = key_forms(keys[(i + 1) % KEYS].public_key())[i % 3]
        msg = rng.randbytes(rng.choice((0, 1, 31, 32, 33, 64, 200, 1000)))
        dig = hashlib.sha256(msg).digest()
        der = priv.sign(msg, det)
        r, s = decode_dss_signature(der)
        as_raw = (i // 3) % 2 == 1
        sig = raw(r, s) if as_raw else der

        def enc(r_: int, s_: int, as_raw: bool = as_raw) -> bytes:
            return raw(r_, s_) if as_raw else encode_dss_signature(r_, s_)

        # message or pre-computed digest, alternately
        m, d = (msg, None) if i % 2 == 0 else (None, dig)
        b.add("valid", key, sig, m, d, raw_sig=as_raw)
        b.add("high-s" if s > N // 2 else "low-s", key, enc(r, N - s), m, d, raw_sig=as_raw)
        # one full-cost tampering per key, in rotation
        tamper = i % 4
        if tamper == 0:
            b.add("altered-r", key, enc(r ^ (1 << rng.randrange(256)) or 1, s), m, d, raw_sig=as_raw)
        elif tamper == 1:
            b.add("altered-s", key, enc(r, s ^ (1 << rng.randrange(256)) or 1), m, d, raw_sig=as_raw)
        elif tamper == 2:
            bad = msg + b"\x00" if m is not None else None
            b.add("altered-msg", key, sig, bad, None if bad is not None else bytes([dig[0] ^ 1]) + dig[1:],
                  raw_sig=as_raw)
        else:
            b.add("other-key", other, sig, m, d, raw_sig=as_raw)
        # out-of-range scalars (cheap: rejected before any point arithmetic)
        big = rng.randrange(N + 1, 1 << 256)
        j = i % 6
        r_bad, s_bad = [(0, s), (r, 0), (N, s), (r, N), (big, s), (r, big)][j]
        b.add(["r=0", "s=0", "r=n", "s=n", "r>n", "s>n"][j], key, enc(r_bad, s_bad), m, d, raw_sig=as_raw)
        # malformed DER, derived from this key's DER signature
        b.add("truncated-der", key, der[: rng.randrange(len(der))], m, d)
        b.add("trailing-der", key, der + b"\x00", m, d)
        b.add("trailing-in-seq", key, der_seq(der[2:] + (b"\x00", b"\x02\x01\x01")[i % 2]), m, d)
        b.add("garbage-der", key, rng.randbytes(rng.choice((8, 70, 71, 72))), m, d)
        ri, si = minimal(r), minimal(s)
        j = i % 5
        if j == 0:  # non-minimal: a redundant leading zero
            bad = der_seq(der_int(b"\x00" + ri) + der_int(si))
        elif j == 1:  # non-minimal: long-form sequence length
            body = der[2:]
            bad = b"\x30\x81" + bytes([len(body)]) + body
        elif j == 2:  # a negative integer (the sign pad removed from a high-bit value)
            v = ri.lstrip(b"\x00") if ri[0] == 0 else bytes([ri[0] | 0x80]) + ri[1:]
            bad = der_seq(der_int(v) + der_int(si))
        elif j == 3:  # wrong inner length
            bad = bytearray(der)
            bad[3] += 1
            bad = bytes(bad)
        else:  # wrong outer length
            bad = bytes([0x30, der[1] - 1]) + der[2:]
        b.add(["der-leading-zero", "der-long-length", "der-negative", "der-int-length",
               "der-seq-length"][j], key, bad, m, d)
    add_key_cases(b, keys[0], rng)
    add_api_cases(b, keys[1], rng)
    add_constructed_cases(b, rng)
    return b.cases


def add_key_cases(b: Builder, priv, rng: random.Random) -> None:
    raw_key, der_key, pem_key = key_forms(priv.public_key())
    msg = rng.randbytes(50)
    sig = priv.sign(msg, SHA256)
    x, y = int.from_bytes(raw_key[1:33], "big"), int.from_bytes(raw_key[33:], "big")
    off = _raw_point((x, (y + 1) % P))
    spki_prefix = der_key[:26]

    def pem(der: bytes) -> str:
        b64 = base64.b64encode(der).decode()
        lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
        return "-----BEGIN PUBLIC KEY-----\n" + "\n".join(lines) + "\n-----END PUBLIC KEY-----\n"

    b.add("key-raw", raw_key, sig, msg)
    b.add("key-der", der_key, sig, msg)
    b.add("key-pem", pem_key, sig, msg)
    b.add("key-pem-crlf", pem_key.replace("\n", "\r\n"), sig, msg)
    b.add("key-off-curve-raw", off, sig, msg)
    b.add("key-off-curve-der", spki_prefix + off, sig, msg)
    b.add("key-off-curve-pem", pem(spki_prefix + off), sig, msg)
    # invalid-curve: the addition formulas never use b, so a point off P-256 lies on another curve
    # y^2 = x^3 - 3x + b'. With a zero digest, u1 = 0 and R = u2*Q' is computed on that curve
    # alone: without the on-curve check this "signature" would verify.
    k = rng.randrange(1, N)
    rx = _mul(k, (x, (y + 1) % P))[0]
    forged = encode_dss_signature(rx % N, rx % N * pow(k, -1, N) % N)
    for kind, form in (("raw", off), ("der", spki_prefix + off), ("pem", pem(spki_prefix + off))):
        b.add("key-off-curve-forged-" + kind, form, forged, None, bytes(32))
    # a point with x < 2^256 - p, and a signature (over a zero digest, forged as above) that is
    # valid for it: the same point written with x + p (or y + p) must still be refused
    small = _small_x_point()
    rx = _mul(k, small)[0]
    small_sig = encode_dss_signature(rx % N, rx % N * pow(k, -1, N) % N)
    sx, sy = small
    b.add("key-small-x", _raw_point(small), small_sig, None, bytes(32))
    b.add("key-x-ge-p", b"\x04" + (sx + P).to_bytes(32, "big") + sy.to_bytes(32, "big"), small_sig,
          None, bytes(32), expected=False)
    if sy + P < 1 << 256:
        b.add("key-y-ge-p", b"\x04" + sx.to_bytes(32, "big") + (sy + P).to_bytes(32, "big"), small_sig,
              None, bytes(32), expected=False)
    b.add("key-infinity", b"\x00", sig, msg, expected=False)
    b.add("key-no-prefix", raw_key[1:], sig, msg, expected=False)
    b.add("key-hybrid-06", b"\x06" + raw_key[1:], sig, msg, expected=False)
    b.add("key-compressed", priv.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint), sig, msg,
        expected=False)  # not supported here: only uncompressed points
    b.add("key-der-trailing", der_key + b"\x00", sig, msg, expected=False)
    b.add("key-der-truncated", der_key[:-1], sig, msg, expected=False)
    b.add("key-der-other-curve-oid", der_key[:22] + b"\x01" + der_key[23:], sig, msg)  # prime192v1
    b.add("key-der-other-alg-oid", der_key[:12] + b"\x03" + der_key[13:], sig, msg, expected=False)
    b.add("key-pem-garbage-char", pem_key.replace("\n", "!\n", 2), sig, msg, expected=False)
    b.add("key-pem-no-end", pem_key.split("-----END")[0], sig, msg, expected=False)
    b.add("key-pem-private-label", pem_key.replace("PUBLIC", "PRIVATE"), sig, msg, expected=False)
    b.add("key-pem-bare-point", pem(raw_key), sig, msg, expected=False)
    b.add("key-empty", b"", sig, msg, expected=False)


def add_api_cases(b: Builder, priv, rng: random.Random) -> None:
    raw_key = key_forms(priv.public_key())[0]
    msg = rng.randbytes(100)
    dig = hashlib.sha256(msg).digest()
    sig = priv.sign(msg, SHA256)
    b.add("api-digest", raw_key, sig, None, dig)
    b.add("api-digest-31", raw_key, sig, None, dig[:31], expected=False)
    b.add("api-digest-33", raw_key, sig, None, dig + b"\x00", expected=False)
    b.add("api-both", raw_key, sig, msg, dig, expected=False)
    b.add("api-neither", raw_key, sig, None, None, expected=False)
    b.add("api-empty-sig", raw_key, b"", msg, expected=False)
    b.add("api-raw-63", raw_key, raw(*decode_dss_signature(sig))[:63], msg, expected=False)
    b.add("api-raw-65", raw_key, raw(*decode_dss_signature(sig)) + b"\x00", msg, expected=False)


def add_constructed_cases(b: Builder, rng: random.Random) -> None:
    # Q = G (d = 1: G + Q is a doubling) and Q = -G (d = n - 1: G + Q is infinity)
    for d in (1, 2, N - 1, N - 2):
        priv = ec.derive_private_key(d, ec.SECP256R1())
        key = key_forms(priv.public_key())[0]
        for _ in range(3):
            msg = rng.randbytes(20)
            der = priv.sign(msg, SHA256)
            b.add(f"small-key-{d if d < 3 else f'n-{N - d}'}", key, der, msg)
            b.add("small-key-altered", key, der, msg + b"!")
    # u1*G + u2*Q at infinity: e = -r*d (mod n) with the digest chosen by us
    priv = ec.derive_private_key(rng.randrange(1, N), ec.SECP256R1())
    key = key_forms(priv.public_key())[0]
    dv = priv.private_numbers().private_value
    r, s = rng.randrange(1, N), rng.randrange(1, N)
    b.add("r-at-infinity", key, encode_dss_signature(r, s), None, (-r * dv % N).to_bytes(32, "big"))
    # x(R) in [n, p): valid only with r = x(R) - n. R is picked first and Q derived from it,
    # Q = (R - u1*G) / u2, so that the verification equation holds by construction.
    while True:
        x = rng.randrange(N, P)
        rhs = (x ** 3 - 3 * x + B) % P
        y = pow(rhs, (P + 1) // 4, P)  # p = 3 mod 4
        if y * y % P == rhs:
            break
    R = (x, y)
    u1, u2 = rng.randrange(1, N), rng.randrange(1, N)
    Q = _mul(pow(u2, -1, N), _add(R, _neg(_mul(u1, G))))
    key = _raw_point(Q)
    r = x - N
    s = r * pow(u2, -1, N) % N
    digest = (u1 * s % N).to_bytes(32, "big")
    b.add("x-ge-n", key, encode_dss_signature(r, s), None, digest)
    b.add("x-ge-n-raw", key, raw(r, s), None, digest, raw_sig=True)
    b.add("x-ge-n-unreduced", key, encode_dss_signature(x, s), None, digest)  # r = x >= n
    b.add("x-ge-n-altered", key, encode_dss_signature(r, s), None, bytes(31) + b"\x01")


# -- running the device code ------------------------------------------------------------------------
def run_driver(cases: list[Case], heap: str = HEAP, timeout: float = 120) -> dict[str, tuple[bool, int]]:
    fd, path = tempfile.mkstemp(suffix=".jsonl", prefix="iotjobs-ecdsa-")
    try:
        with os.fdopen(fd, "w") as f:
            for c in cases:
                f.write(c.to_json() + "\n")
        r = subprocess.run([MICROPYTHON, "-X", f"heapsize={heap}", SCRIPT, path], capture_output=True,
                           text=True, timeout=timeout, env=DEVICE_ENV, cwd=ROOT)
    finally:
        os.unlink(path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    out: dict[str, tuple[bool, int]] = {}
    lines = r.stdout.splitlines()
    assert lines and lines[-1] == f"DONE {len(cases)}", r.stdout[-2000:] + r.stderr
    for line in lines[:-1]:
        tag, cid, ok, us = line.split()
        assert tag == "CASE", line
        out[cid] = (ok == "1", int(us))
    return out


@pytest.fixture(scope="module")
def results() -> tuple[list[Case], dict[str, tuple[bool, int]]]:
    cases = build_cases()
    return cases, run_driver(cases)


def test_device_agrees_with_cryptography_on_every_case(results):
    cases, got = results
    assert len(cases) >= 8 * KEYS
    wrong = [f"{c.id}: device {got[c.id][0]}, expected {c.expected}" for c in cases
             if got[c.id][0] != c.expected]
    assert not wrong, f"{len(wrong)} of {len(cases)} disagree:\n" + "\n".join(wrong[:40])


def test_cases_cover_what_must_pass_and_what_must_fail(results):
    """The oracle's verdicts are the ones the spec calls for, so agreement above means something."""
    cases, _ = results
    by_kind: dict[str, set[bool]] = {}
    for c in cases:
        by_kind.setdefault(c.kind, set()).add(c.expected)
    for kind in ("valid", "high-s", "low-s", "key-raw", "key-der", "key-pem", "key-pem-crlf",
                 "api-digest", "key-small-x", "small-key-1", "small-key-n-1", "x-ge-n", "x-ge-n-raw"):
        assert by_kind[kind] == {True}, kind
    for kind in ("altered-r", "altered-s", "altered-msg", "other-key", "r=0", "s=0", "r=n", "s=n",
                 "r>n", "s>n", "truncated-der", "trailing-der", "garbage-der", "der-leading-zero",
                 "der-long-length", "der-negative", "der-int-length", "der-seq-length",
                 "key-off-curve-raw", "key-off-curve-der", "key-off-curve-pem", "key-der-other-curve-oid",
                 "key-off-curve-forged-raw", "key-off-curve-forged-der", "key-off-curve-forged-pem",
                 "trailing-in-seq",
                 "r-at-infinity", "x-ge-n-unreduced", "x-ge-n-altered", "small-key-altered"):
        assert by_kind[kind] == {False}, kind
    assert sum(c.oracle for c in cases) >= 8 * KEYS


def test_verify_fits_32k_heap_and_median_time(results):
    cases, got = results
    full = [got[c.id][1] for c in cases if c.kind in ("valid", "high-s", "low-s")]
    assert len(full) == 2 * KEYS and all(got[c.id][0] for c in cases if c.kind == "valid")
    median_ms = statistics.median(full) / 1000
    print(f"\nECDSA P-256 verify under -X heapsize={HEAP}: median {median_ms:.1f} ms "
          f"over {len(full)} verifications (min {min(full) / 1000:.1f}, max {max(full) / 1000:.1f})")
