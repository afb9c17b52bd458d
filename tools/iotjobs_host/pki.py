"""A throw-away certificate authority for one test run or demo: CA, broker and per-thing certs.

mosquitto reads PEM; the device (mbedTLS in MicroPython) reads DER only, so both are written."""
from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o644)  # mosquitto may run as another user


class PKI:
    """Creates the CA once; `server()` and `thing(name)` issue certificates from it."""

    def __init__(self, folder: str, days: int = 2) -> None:
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.days = days
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("iotjobs test CA"))
            .issuer_name(_name("iotjobs test CA"))
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca_pem = os.path.join(folder, "ca.pem")
        self.ca_der = os.path.join(folder, "ca.der")
        _write(self.ca_pem, self.ca_cert.public_bytes(serialization.Encoding.PEM))
        _write(self.ca_der, self.ca_cert.public_bytes(serialization.Encoding.DER))

    def _issue(self, cn: str, folder: str, server: bool) -> dict[str, str]:
        os.makedirs(folder, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        b = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=self.days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = b.sign(self.ca_key, hashes.SHA256())
        files = {
            "cert_pem": os.path.join(folder, "cert.pem"),
            "key_pem": os.path.join(folder, "key.pem"),
            "cert": os.path.join(folder, "cert.der"),
            "key": os.path.join(folder, "key.der"),
            "ca": os.path.join(folder, "ca.der"),
        }
        _write(files["cert_pem"], cert.public_bytes(serialization.Encoding.PEM))
        _write(
            files["key_pem"],
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
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

    def server(self, cn: str = "localhost", name: str = "server") -> dict[str, str]:
        """A server certificate for `cn` in the folder `name` (another name: another one)."""
        return self._issue(cn, os.path.join(self.folder, name), server=True)

    def thing(self, name: str) -> str:
        """Issue a client certificate whose CN is the thing name; returns its folder."""
        folder = os.path.join(self.folder, "things", name)
        if not os.path.exists(os.path.join(folder, "cert.der")):
            self._issue(name, folder, server=False)
        return folder
