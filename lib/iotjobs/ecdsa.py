# ECDSA P-256 (secp256r1) signature verification with SHA-256, in plain MicroPython big ints.
# OTA images and app bundles are signed the way AWS code signing does it; the device checks the
# signature before activating anything. Verification only: no secrets here, so no constant-time
# arithmetic is needed. Jacobian coordinates (one modular inversion per verification, for s),
# Shamir's trick for u1*G + u2*Q, and the final x-coordinate test done projectively.
from micropython import const

_P = const(0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF)
_N = const(0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551)
_B = const(0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B)
_GX = const(0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296)
_GY = const(0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5)

_POINT_LEN = const(65)  # 0x04 || X || Y
_DIGEST_LEN = const(32)
_RAW_SIG_LEN = const(64)  # r || s
_INT_MAX = const(33)  # a DER INTEGER below n: up to 32 bytes, plus a 0x00 when the top bit is set
_SEQ_MAX = const(2 * (2 + _INT_MAX))  # fits the short length form, so nothing else is accepted

# SubjectPublicKeyInfo { AlgorithmIdentifier { id-ecPublicKey, prime256v1 }, BIT STRING (0 unused
# bits) of a 65-byte uncompressed point }. DER is canonical, so every valid encoding of such a key
# is exactly this prefix followed by the point.
_SPKI_PREFIX = b"0Y0\x13\x06\x07*\x86H\xce=\x02\x01\x06\x08*\x86H\xce=\x03\x01\x07\x03B\x00"
_PEM_BEGIN = b"-----BEGIN PUBLIC KEY-----"
_PEM_END = b"-----END PUBLIC KEY-----"


def _on_curve(x, y):
    return 0 <= x < _P and 0 <= y < _P and (y * y - x * x * x + 3 * x - _B) % _P == 0


def _point(b):
    if len(b) != _POINT_LEN or b[0] != 4:
        raise ValueError("bad point")
    x = int.from_bytes(b[1:33], "big")
    y = int.from_bytes(b[33:], "big")
    if not _on_curve(x, y):
        raise ValueError("not on curve")
    return x, y


def load_public_key(data):
    """(x, y) of a P-256 public key given as a raw uncompressed point, a DER SubjectPublicKeyInfo
    or its PEM text; ValueError for anything else (including a point not on the curve)."""
    if isinstance(data, str):
        data = data.encode()
    data = bytes(data)
    if data.startswith(_PEM_BEGIN):
        end = data.find(_PEM_END)
        if end < 0 or data[end + len(_PEM_END):].strip():
            raise ValueError("bad PEM")
        body = b"".join(data[len(_PEM_BEGIN):end].split())
        import binascii

        data = binascii.a2b_base64(body)
        # a2b_base64 skips stray characters; only the canonical encoding is accepted
        if binascii.b2a_base64(data).rstrip() != body:
            raise ValueError("bad PEM")
        if not data.startswith(_SPKI_PREFIX):
            raise ValueError("bad PEM")  # PEM carries an SPKI, never a bare point
    if len(data) == len(_SPKI_PREFIX) + _POINT_LEN and data.startswith(_SPKI_PREFIX):
        return _point(data[len(_SPKI_PREFIX):])
    return _point(data)


def _der_int(b, i):
    # One strict DER INTEGER at b[i]: positive, minimal, at most _INT_MAX bytes. -> (value, next)
    if i + 2 > len(b) or b[i] != 2:
        raise ValueError
    n = b[i + 1]
    i += 2
    if n == 0 or n > _INT_MAX or i + n > len(b):
        raise ValueError
    if b[i] & 0x80 or (b[i] == 0 and n > 1 and not b[i + 1] & 0x80):
        raise ValueError  # negative, or a redundant leading zero
    return int.from_bytes(b[i:i + n], "big"), i + n


def _signature(sig):
    # DER first; exactly 64 bytes that are not valid DER are raw r || s.
    if len(sig) > _SEQ_MAX + 2:
        raise ValueError  # before copying: never duplicate a large bogus input
    sig = bytes(sig)
    try:
        if len(sig) < 8 or sig[0] != 0x30 or sig[1] != len(sig) - 2:
            raise ValueError
        r, i = _der_int(sig, 2)
        s, i = _der_int(sig, i)
        if i != len(sig):
            raise ValueError
        return r, s
    except ValueError:
        if len(sig) != _RAW_SIG_LEN:
            raise
    return int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")


def _double(x1, y1, z1):
    # dbl-2001-b (a = -3)
    if not z1:  # P-256 has no point of order 2, so y1 == 0 cannot occur
        return 0, 1, 0
    d = z1 * z1 % _P
    g = y1 * y1 % _P
    be = x1 * g % _P
    a = 3 * (x1 - d) * (x1 + d) % _P
    x3 = (a * a - 8 * be) % _P
    z3 = ((y1 + z1) * (y1 + z1) - g - d) % _P
    y3 = (a * (4 * be - x3) - 8 * g * g) % _P
    return x3, y3, z3


def _add_affine(x1, y1, z1, x2, y2):
    # Jacobian (x1, y1, z1) + affine (x2, y2)
    if not z1:
        return x2, y2, 1
    zz = z1 * z1 % _P
    h = (x2 * zz - x1) % _P
    r = (y2 * zz * z1 - y1) % _P
    if not h:
        return _double(x1, y1, z1) if not r else (0, 1, 0)
    hh = h * h % _P
    hhh = h * hh % _P
    v = x1 * hh % _P
    x3 = (r * r - hhh - 2 * v) % _P
    y3 = (r * (v - x3) - y1 * hhh) % _P
    return x3, y3, z1 * h % _P


def _verify(qx, qy, r, s, e):
    if not (0 < r < _N and 0 < s < _N):
        return False
    w = pow(s, _N - 2, _N)
    u1 = e * w % _N
    u2 = r * w % _N
    # G + Q in affine form, so that every addition in the loop is a mixed one
    x, y, z = _add_affine(_GX, _GY, 1, qx, qy)
    if z:
        zi = pow(z, _P - 2, _P)
        zi2 = zi * zi % _P
        gq = (x * zi2 % _P, y * zi2 * zi % _P)
    else:
        gq = None  # Q == -G
    table = (None, (_GX, _GY), (qx, qy), gq)
    x, y, z = 0, 1, 0
    for i in range(255, -1, -1):  # u1, u2 < n < 2^256; doubling infinity costs nothing
        x, y, z = _double(x, y, z)
        t = table[(u1 >> i & 1) | (u2 >> i & 1) << 1]
        if t:
            x, y, z = _add_affine(x, y, z, t[0], t[1])
    if not z:
        return False
    # x(R) mod n == r, without inverting z: x == r * z^2 (mod p), or (r + n) when that is below p
    zz = z * z % _P
    if (r * zz - x) % _P == 0:
        return True
    return r + _N < _P and ((r + _N) * zz - x) % _P == 0


def verify(pubkey, signature, message=None, digest=None):
    """True only for a valid ECDSA P-256/SHA-256 signature. Pass exactly one of `message` (hashed
    here) or `digest` (32 bytes, for data hashed while streaming). Bad input of any kind gives
    False; only running out of memory raises."""
    try:
        if (message is None) == (digest is None):
            return False
        if digest is None:
            import hashlib

            digest = hashlib.sha256(message).digest()
        elif len(digest) != _DIGEST_LEN:
            return False
        qx, qy = load_public_key(pubkey)
        r, s = _signature(signature)
        return _verify(qx, qy, r, s, int.from_bytes(bytes(digest), "big"))
    except MemoryError:
        raise
    except Exception:
        return False
