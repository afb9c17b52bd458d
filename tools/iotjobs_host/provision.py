"""`tools/provision`: a device's flash-ready folder, `config.json` and `certs/`, for one thing.

What firmware/app.py reads, nothing more: `thing`, `host`, `port`, `client_id` (= the thing
name, what AWS IoT policies key on), `keepalive`, `tls` {ca, cert, key, hostname} naming DER
files (mbedTLS in MicroPython reads no PEM), and optionally `ota` {pubkey, allow},
`download` {allow} and `wifi` {ssid, password}. Paths in the config are relative to the
device's filesystem root, where the folder's contents go.

Two sources of the device's identity:
- `--local CA_DIR`: the local stack (mosquitto + jobsd). The thing's key and certificate
  (CN = thing name) are made here from the CA in CA_DIR (ca.pem, ca-key.pem; a new CA and a
  broker certificate are created there when the folder holds none). mosquitto's ACL written by
  `tools/jobsd --write-acl` is pattern-based (`%u` = certificate CN), so a new thing needs no
  ACL change; `--acl FILE` checks that the broker's ACL is that one.
- `--aws`: the certificate, key and Amazon root CA downloaded from AWS IoT; they are checked
  (the key is the certificate's, the key type is one AWS IoT accepts, the CA is a CA) and
  converted to DER.

Wi-Fi credentials come only from the environment (IOTJOBS_WIFI_SSID, IOTJOBS_WIFI_PASSWORD),
never from the command line (process lists and shell history show arguments) and are never
printed. Nothing secret goes to stdout. The folder is written next to its final place and
renamed into it, so it is either complete or absent; an existing one is replaced only with
`--force`."""
from __future__ import annotations

import argparse
import datetime
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from typing import Any, NoReturn, Optional
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from . import BUILD
from .jobsd import acl as jobsd_acl
from .pki import CA_KEY, PKI

THING_RE = re.compile(r"[a-zA-Z0-9:_-]{1,128}")  # AWS IoT thing names
_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_AWS_ATS_RE = re.compile(r"[a-z0-9]+-ats\.iot\.[a-z0-9-]+\.amazonaws\.com(\.cn)?")
DEFAULT_PORT = 8883
CN_MAX = 64  # X.509 ub-common-name (RFC 5280)
ENV_SSID = "IOTJOBS_WIFI_SSID"
ENV_PASSWORD = "IOTJOBS_WIFI_PASSWORD"
CERTS = "certs"
CA_FILE, CERT_FILE, KEY_FILE, PUB_FILE = "ca.der", "cert.der", "key.der", "signing-pub.der"
CONFIG = "config.json"
AWS_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)  # and RSA >= 2048: what AWS IoT accepts


class ProvisionError(Exception):
    """Bad input: one line on stderr, exit status 2."""


def _say(msg: str) -> None:
    print(f"provision: {msg}", file=sys.stderr)


# -- input checks ----------------------------------------------------------------------------------
def check_thing(name: str) -> str:
    if not THING_RE.fullmatch(name):
        raise ProvisionError(f"{name!r} is not a thing name (AWS IoT: 1..128 of a-z A-Z 0-9 : _ -)")
    return name


def check_host(host: str) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if len(host) > 253 or not all(_LABEL_RE.fullmatch(p) for p in host.split(".")):
        raise ProvisionError(f"{host!r} is not a host name or IP address")
    return host


def parse_endpoint(text: str) -> tuple[str, int]:
    """HOST or HOST:PORT (port 8883 by default)."""
    host, port = text, DEFAULT_PORT
    if text.count(":") == 1:
        host, _, p = text.partition(":")
        if not p.isdigit() or not 0 < int(p) < 65536:
            raise ProvisionError(f"--endpoint {text!r}: the port must be 1..65535")
        port = int(p)
    return check_host(host), port


def check_allow(url: str) -> str:
    """An allowlist entry is a URL prefix the device compares character by character, so it must
    end its host with '/': `https://bucket.s3.amazonaws.com` would also admit
    `https://bucket.s3.amazonaws.com.evil.example/`."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc or not parts.path.startswith("/"):
        raise ProvisionError(f"--allow {url!r}: give a URL prefix scheme://host[:port]/path "
                             "(http or https, with the '/' after the host)")
    if parts.query or parts.fragment or any(c.isspace() for c in url):
        raise ProvisionError(f"--allow {url!r}: a URL prefix has no query, fragment or spaces")
    return url


def wifi_from_env(env: dict[str, str]) -> Optional[dict[str, str]]:
    ssid, password = env.get(ENV_SSID), env.get(ENV_PASSWORD)
    if ssid is None:
        if password is not None:
            raise ProvisionError(f"{ENV_PASSWORD} is set but {ENV_SSID} is not")
        return None
    if not 1 <= len(ssid.encode()) <= 32:
        raise ProvisionError(f"{ENV_SSID} must be 1..32 bytes")
    password = password or ""
    n = len(password.encode())
    # WPA/WPA2-PSK: a passphrase of 8..63 characters or 64 hex digits; empty: an open network
    if n and not (8 <= n <= 63 or (n == 64 and all(c in "0123456789abcdefABCDEF" for c in password))):
        raise ProvisionError(f"{ENV_PASSWORD} must be empty (open network), 8..63 characters or "
                             "64 hex digits")
    return {"ssid": ssid, "password": password}


# -- certificates and keys -------------------------------------------------------------------------
def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ProvisionError(f"{what} {path}: {e.strerror or e}") from None


def load_certs(path: str, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise ProvisionError(f"{what} {path} is not an X.509 certificate (PEM or DER)") from None
    return certs


def load_key(path: str) -> Any:
    data = _read(path, "--key")
    try:
        if b"-----BEGIN" in data:
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_der_private_key(data, password=None)
    except TypeError:
        raise ProvisionError(f"--key {path} is encrypted; the device needs it unencrypted "
                             "(openssl pkey -in KEY -out PLAIN.pem)") from None
    except ValueError:
        raise ProvisionError(f"--key {path} is not a private key (PEM or DER)") from None


def _spki(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def key_der(key: Any) -> bytes:
    """PKCS#8 DER: what the device's mbedTLS loads for RSA and EC keys alike."""
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, as the AWS IoT console shows a certificate's id."""
    return hashlib.sha256(cert_der(cert)).hexdigest()


def _is_ca(cert: x509.Certificate) -> Optional[bool]:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return None


def _validity(cert: x509.Certificate, what: str, warnings: list[str]) -> None:
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc <= now:
        raise ProvisionError(f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    if cert.not_valid_before_utc > now:
        warnings.append(f"{what} is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")


def aws_identity(cert_path: str, key_path: str, ca_path: str,
                 warnings: list[str]) -> tuple[bytes, bytes, bytes, x509.Certificate]:
    """(ca, cert, key) DER from the files AWS IoT hands out. AWS does not look at the
    certificate's subject (a thing is bound to a certificate by attaching it), so the CN is not
    checked; the key type is, because AWS IoT refuses anything but RSA >= 2048 and ECDSA
    P-256/P-384/P-521."""
    certs = load_certs(cert_path, "--cert")
    cert = certs[0]
    if len(certs) > 1:
        warnings.append(f"--cert {cert_path} holds {len(certs)} certificates; the device gets the "
                        "first (AWS IoT needs no chain for its own certificates)")
    key = load_key(key_path)
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise ProvisionError(f"--key {key_path} is RSA-{key.key_size}; AWS IoT needs 2048 bits or more")
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, AWS_CURVES):
            raise ProvisionError(f"--key {key_path} is on {key.curve.name}; AWS IoT accepts "
                                 "P-256, P-384 and P-521")
    else:
        raise ProvisionError(f"--key {key_path} is a {type(key).__name__.lstrip('_')}; AWS IoT and "
                             "the device take RSA or ECDSA keys")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise ProvisionError(f"--key {key_path} is not the key of --cert {cert_path}")
    if _is_ca(cert):
        raise ProvisionError(f"--cert {cert_path} is a CA certificate, not a device certificate")
    _validity(cert, f"--cert {cert_path}", warnings)
    cas = load_certs(ca_path, "--ca")
    ca = cas[0]
    if _is_ca(ca) is False:
        raise ProvisionError(f"--ca {ca_path} is not a CA certificate (give AmazonRootCA1.pem)")
    if len(cas) > 1:
        warnings.append(f"--ca {ca_path} holds {len(cas)} certificates; the device trusts only the "
                        "first")
    _validity(ca, f"--ca {ca_path}", warnings)
    if "Amazon" not in ca.subject.rfc4514_string():
        warnings.append(f"--ca {ca_path} is not an Amazon root CA ({ca.subject.rfc4514_string()}); "
                        "ATS endpoints are verified with AmazonRootCA1 (RSA) or AmazonRootCA3 (EC)")
    return cert_der(ca), cert_der(cert), key_der(key), cert


def local_identity(ca_dir: str, thing: str, hosts: tuple[str, str], days: int, notes: list[str],
                   warnings: list[str]) -> tuple[bytes, bytes, bytes, x509.Certificate]:
    """(ca, cert, key) DER: a new key and certificate (CN = thing) from the CA in `ca_dir`.
    A CA made here comes with a broker certificate for `hosts` (endpoint host, TLS name)."""
    if os.path.exists(ca_dir) and not os.path.isdir(ca_dir):
        raise ProvisionError(f"--local {ca_dir} is not a directory")
    try:
        pki = PKI(ca_dir, days=max(days, 3650), load=True)
    except (ValueError, OSError) as e:
        raise ProvisionError(f"--local {ca_dir}: {e}") from None
    if pki.created:
        srv = pki.server(cn=hosts[1], hosts=hosts)
        notes.append(f"no CA in {ca_dir}: created a new local CA ({pki.ca_pem}, {CA_KEY} mode 0600) "
                     f"and a broker certificate for {' and '.join(sorted(set(hosts)))} ({srv['cert_pem']}, {srv['key_pem']}); "
                     f"give mosquitto's TLS listener: cafile {pki.ca_pem}, certfile "
                     f"{srv['cert_pem']}, keyfile {srv['key_pem']}")
    elif os.stat(pki.ca_key_pem).st_mode & 0o077:
        warnings.append(f"{pki.ca_key_pem} can be read by other users: chmod 600 it (whoever reads "
                        "it can make certificates your broker trusts)")
    now = datetime.datetime.now(datetime.UTC)
    if pki.ca_cert.not_valid_after_utc <= now + datetime.timedelta(hours=1):
        raise ProvisionError(f"the CA in {ca_dir} expires on "
                             f"{pki.ca_cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; make a new one")
    cert, key = pki.issue(thing, days=days)
    return cert_der(pki.ca_cert), cert_der(cert), key_der(key), cert


def check_acl(path: str) -> None:
    """The broker's ACL must be the pattern-based one jobsd writes: then the new thing (its
    certificate CN is its MQTT username, `%u`) is confined to its own topics with no edit."""
    text = _read(path, "--acl").decode(errors="replace")
    have = {" ".join(line.split()) for line in text.splitlines()}
    missing = [f"pattern {a} {t}" for a, t in jobsd_acl.RULES if f"pattern {a} {t}" not in have]
    if missing:
        raise ProvisionError(f"--acl {path} lacks {len(missing)} of jobsd's pattern lines (first: "
                             f"{missing[0]!r}); write it with `tools/jobsd --write-acl {path}`")


# -- the folder ------------------------------------------------------------------------------------
def build_config(*, thing: str, host: str, port: int, hostname: str, keepalive: int,
                 allow: list[str], ota_pubkey: bool, wifi: Optional[dict[str, str]]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "thing": thing, "host": host, "port": port, "client_id": thing, "keepalive": keepalive,
        "tls": {"ca": f"{CERTS}/{CA_FILE}", "cert": f"{CERTS}/{CERT_FILE}",
                "key": f"{CERTS}/{KEY_FILE}", "hostname": hostname},
    }
    if allow:
        cfg["download"] = {"allow": list(allow)}
    if ota_pubkey:
        cfg["ota"] = {"pubkey": f"{CERTS}/{PUB_FILE}", "allow": list(allow)}
    if wifi is not None:
        cfg["wifi"] = dict(wifi)
    return cfg


def _write_file(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.fchmod(fd, mode)  # before any byte of a secret is written
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def check_out(out: str, force: bool) -> None:
    out = os.path.abspath(out)
    if os.path.islink(out) or (os.path.lexists(out) and not os.path.isdir(out)):
        raise ProvisionError(f"{out} exists and is not a directory")
    if os.path.exists(out) and not force:
        raise ProvisionError(f"{out} already exists; --force replaces it")


def write_folder(out: str, files: dict[str, tuple[bytes, int]], force: bool) -> None:
    """Build the folder beside `out`, then rename it into place: a reader (or a power cut) sees
    the old folder or the complete new one, never a mixture."""
    out = os.path.abspath(out)
    check_out(out, force)
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    except OSError as e:
        raise ProvisionError(f"cannot write {out}: {e.strerror or e}") from None
    old = None
    try:
        os.chmod(tmp, 0o755)
        for rel, (data, mode) in files.items():
            path = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            _write_file(path, data, mode)
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.replace(out, os.path.join(old, "x"))
        os.replace(tmp, out)
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        if old is not None and not os.path.exists(out):
            os.replace(os.path.join(old, "x"), out)  # put the previous folder back
        raise ProvisionError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# -- command line ----------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="provision", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Wi-Fi: set IOTJOBS_WIFI_SSID and IOTJOBS_WIFI_PASSWORD in the environment.")
    p.add_argument("thing", metavar="THING", help="the thing name (AWS rules: [a-zA-Z0-9:_-]{1,128})")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--local", metavar="CA_DIR",
                      help="issue the thing's certificate from the local CA in CA_DIR (made if absent)")
    mode.add_argument("--aws", action="store_true",
                      help="use the certificate, key and CA downloaded from AWS IoT (--cert --key --ca)")
    p.add_argument("--endpoint", required=True, metavar="HOST[:PORT]",
                   help="the broker the device connects to (port 8883 by default); for AWS the "
                        "account's xxxx-ats.iot.REGION.amazonaws.com")
    p.add_argument("--hostname", help="the name the broker's certificate must carry (default: the "
                                      "endpoint's host)")
    p.add_argument("--out", metavar="DIR", help="the folder to write (default build/provision/THING)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--keepalive", type=int, default=60, help="MQTT keepalive, seconds (default 60)")
    p.add_argument("--allow", action="append", default=[], metavar="URL",
                   help="URL prefix the device may download OTA images and files from (repeatable)")
    p.add_argument("--ota-pubkey", metavar="FILE",
                   help="the OTA signing public key (tools/sign keygen: signing-pub.der; PEM, DER or "
                        "raw point)")
    p.add_argument("--acl", metavar="FILE", help="(--local) check that the broker's ACL is jobsd's")
    p.add_argument("--days", type=int, default=3650,
                   help="(--local) validity of the thing's certificate, days (default 3650; never past the CA)")
    p.add_argument("--cert", metavar="CERT.pem", help="(--aws) the device certificate")
    p.add_argument("--key", metavar="KEY.pem", help="(--aws) its private key")
    p.add_argument("--ca", metavar="CA.pem", help="(--aws) the Amazon root CA (AmazonRootCA1.pem)")
    return p


def run(a: argparse.Namespace, env: dict[str, str]) -> list[str]:
    """Do it; returns the lines to print."""
    thing = check_thing(a.thing)
    host, port = parse_endpoint(a.endpoint)
    hostname = check_host(a.hostname) if a.hostname else host
    if not 1 <= a.keepalive <= 1200:
        raise ProvisionError("--keepalive must be 1..1200 seconds (AWS IoT's maximum is 1200)")
    allow = [check_allow(u) for u in a.allow]
    wifi = wifi_from_env(env)
    out = a.out or os.path.join(BUILD, "provision", thing)
    check_out(out, a.force)  # before a CA is made or a key file read
    warnings: list[str] = []
    notes: list[str] = []
    files: dict[str, tuple[bytes, int]] = {}
    if a.ota_pubkey:
        from .sign import SignError, load_public_key

        try:
            pub = load_public_key(a.ota_pubkey)
        except SignError as e:
            raise ProvisionError(f"--ota-pubkey: {e}") from None
        files[f"{CERTS}/{PUB_FILE}"] = (_spki(pub), 0o644)
        if not allow:
            warnings.append("--ota-pubkey without --allow: the device refuses every OTA URL until "
                            "an allowlist is configured")
    if a.aws:
        if a.acl:
            raise ProvisionError("--acl is for --local")
        missing = [f"--{o}" for o in ("cert", "key", "ca") if not getattr(a, o)]
        if missing:
            raise ProvisionError(f"--aws needs {', '.join(missing)} (the files AWS IoT gave you)")
        if port == 443:
            raise ProvisionError("AWS IoT takes MQTT with client certificates on port 443 only with "
                                 "ALPN, which MicroPython lacks; use 8883")
        if not _AWS_ATS_RE.fullmatch(host):
            warnings.append(f"{host} is not an AWS IoT ATS endpoint (xxxx-ats.iot.REGION.amazonaws.com: "
                            "`aws iot describe-endpoint --endpoint-type iot:Data-ATS`)")
        if a.keepalive < 30:
            warnings.append("AWS IoT raises a keepalive below 30 s to 30 s")
        ca, cert, key, c = aws_identity(a.cert, a.key, a.ca, warnings)
    else:
        given = [f"--{o}" for o in ("cert", "key", "ca") if getattr(a, o)]
        if given:
            raise ProvisionError(f"{', '.join(given)} are for --aws; --local issues its own")
        if not 1 <= a.days <= 36500:
            raise ProvisionError("--days must be 1..36500")
        if len(thing) > CN_MAX:
            raise ProvisionError(f"--local makes the thing name the certificate's CN (the broker's "
                                 f"username), and X.509 allows at most {CN_MAX} characters there; "
                                 f"this one has {len(thing)}")
        if a.acl:
            check_acl(a.acl)  # before anything is written
        ca, cert, key, c = local_identity(a.local, thing, (host, hostname), a.days, notes, warnings)
    files[f"{CERTS}/{CA_FILE}"] = (ca, 0o644)
    files[f"{CERTS}/{CERT_FILE}"] = (cert, 0o644)
    files[f"{CERTS}/{KEY_FILE}"] = (key, 0o600)
    cfg = build_config(thing=thing, host=host, port=port, hostname=hostname, keepalive=a.keepalive,
                       allow=allow, ota_pubkey=bool(a.ota_pubkey), wifi=wifi)
    secret_cfg = bool(wifi and wifi["password"])
    files[CONFIG] = ((json.dumps(cfg, indent=1) + "\n").encode(), 0o600 if secret_cfg else 0o644)
    write_folder(out, files, a.force)

    for w in warnings:
        _say(f"warning: {w}")
    lines = notes[:]
    names = ", ".join(sorted(files))
    lines.append(f"wrote {os.path.abspath(out)}/: {names} (key.der mode 0600"
                 f"{', config.json 0600: it holds the Wi-Fi password' if secret_cfg else ''})")
    lines.append(f"thing {thing}: {host}:{port}, TLS server name {hostname}, client id {thing}; "
                 f"certificate sha256 {fingerprint(c)}, valid until {c.not_valid_after_utc:%Y-%m-%d}")
    if wifi is None:
        lines.append(f"no Wi-Fi in config.json (set {ENV_SSID} and {ENV_PASSWORD} to add it)")
    else:
        lines.append(f"Wi-Fi from {ENV_SSID}/{ENV_PASSWORD}"
                     f"{'' if wifi['password'] else ' (open network: no password)'}")
    if a.aws:
        lines.append(f"AWS IoT: the certificate must be ACTIVE, attached to thing {thing} and to a "
                     f"policy that allows iot:Connect as client {thing} and its jobs topics")
    elif a.acl:
        lines.append(f"ACL {a.acl}: jobsd's pattern lines (%u = certificate CN) confine {thing} to "
                     "its own topics; no ACL change needed")
    else:
        lines.append(f"ACL: jobsd's ACL (`tools/jobsd --write-acl`) is pattern-based (%u = certificate "
                     f"CN = {thing}); no ACL change needed (--acl FILE checks the broker's)")
    lines.append(f"next: tools/deploy --port PORT --config {shlex.quote(out)} (or copy the folder's "
                 "contents to the root of the device's filesystem)")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    a = parser().parse_args(argv)
    try:
        for line in run(a, dict(os.environ)):
            print(line)
        return 0
    except ProvisionError as e:
        _say(str(e))
        return 2
