"""A small certificate authority: CA, broker and per-thing certs, for one test run, a demo, or
(through `tools/provision --local`) a local fleet.

mosquitto reads PEM; the device (mbedTLS in MicroPython) reads DER only, so both are written.
The CA's key is kept beside its certificate (`ca-key.pem`, mode 0600) so that a later run can
issue more certificates from the same CA (`PKI(folder, load=True)`)."""
from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"


def _write(path: str, data: bytes, mode: int = 0o644) -> None:
    """All or nothing (temp file, then rename); 0644 by default: mosquitto may run as another
    user. Secrets get their mode before any byte is written."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


class PKI:
    """Creates the CA once; `server()` and `thing(name)` issue certificates from it.

    `load=True` uses the CA already in `folder` (ca.pem and ca-key.pem) when there is one;
    `created` tells whether this object made a new CA. A folder with half a CA, or a key that
    is not the certificate's, raises ValueError rather than being replaced."""

    def __init__(self, folder: str, days: int = 2, load: bool = False) -> None:
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.days = days
        self.ca_pem = os.path.join(folder, CA_CERT)
        self.ca_der = os.path.join(folder, "ca.der")
        self.ca_key_pem = os.path.join(folder, CA_KEY)
        self.created = not (load and self._load())
        if self.created:
            self._create()

    def _load(self) -> bool:
        """Read the CA of the folder; False when there is none at all."""
        have_cert, have_key = os.path.exists(self.ca_pem), os.path.exists(self.ca_key_pem)
        if not have_cert and not have_key:
            return False
        if not (have_cert and have_key):
            there, missing = (self.ca_pem, self.ca_key_pem) if have_cert else (self.ca_key_pem, self.ca_pem)
            raise ValueError(f"{there} exists but {missing} does not: not a usable CA folder")
        with open(self.ca_pem, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(self.ca_key_pem, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if (key.public_key().public_bytes(serialization.Encoding.DER, spki)
                != cert.public_key().public_bytes(serialization.Encoding.DER, spki)):
            raise ValueError(f"{self.ca_key_pem} is not the key of {self.ca_pem}")
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise ValueError(f"{self.ca_key_pem} is neither an EC nor an RSA key")
        self.ca_cert, self.ca_key = cert, key
        if not os.path.exists(self.ca_der):
            _write(self.ca_der, cert.public_bytes(serialization.Encoding.DER))
        return True

    def _create(self) -> None:
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("iotjobs test CA"))
            .issuer_name(_name("iotjobs test CA"))
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=self.days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        # the key first: a folder with a certificate but no key is refused by _load
        _write(self.ca_key_pem, _pem_key(self.ca_key), 0o600)
        _write(self.ca_der, self.ca_cert.public_bytes(serialization.Encoding.DER))
        _write(self.ca_pem, self.ca_cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, cn: str, server: bool = False, hosts: tuple[str, ...] = (),
              days: int | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A new P-256 key and its certificate (CN = `cn`); never valid past the CA. A server
        certificate names localhost, 127.0.0.1 and `hosts` (DNS names or IP addresses)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        until = min(now + datetime.timedelta(days=days or self.days), self.ca_cert.not_valid_after_utc)
        b = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            names = ["localhost", "127.0.0.1"] + [h for h in hosts if h not in ("localhost", "127.0.0.1")]
            b = b.add_extension(x509.SubjectAlternativeName([_host_name(h) for h in names]),
                                critical=False)
        return b.sign(self.ca_key, hashes.SHA256()), key

    def _issue(self, cn: str, folder: str, server: bool, hosts: tuple[str, ...] = ()) -> dict[str, str]:
        os.makedirs(folder, exist_ok=True)
        cert, key = self.issue(cn, server, hosts)
        files = {
            "cert_pem": os.path.join(folder, "cert.pem"),
            "key_pem": os.path.join(folder, "key.pem"),
            "cert": os.path.join(folder, "cert.der"),
            "key": os.path.join(folder, "key.der"),
            "ca": os.path.join(folder, "ca.der"),
        }
        _write(files["cert_pem"], cert.public_bytes(serialization.Encoding.PEM))
        _write(files["key_pem"], _pem_key(key))
        _write(files["cert"], cert.public_bytes(serialization.Encoding.DER))
        _write(
            files["key"],
            key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        _write(files["ca"], self.ca_cert.public_bytes(serialization.Encoding.DER))
        return files

    def server(self, cn: str = "localhost", name: str = "server",
               hosts: tuple[str, ...] = ()) -> dict[str, str]:
        """A server certificate for `cn` (and `hosts`) in the folder `name` (another name:
        another one)."""
        return self._issue(cn, os.path.join(self.folder, name), server=True, hosts=hosts)

    def thing(self, name: str) -> str:
        """Issue a client certificate whose CN is the thing name; returns its folder."""
        folder = os.path.join(self.folder, "things", name)
        if not os.path.exists(os.path.join(folder, "cert.der")):
            self._issue(name, folder, server=False)
        return folder
