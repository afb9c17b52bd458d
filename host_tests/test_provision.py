"""tools/provision as a user runs it: the folder it writes (DER files the device's own TLS code
loads, the key 0600, the config firmware/app.py reads), every refusal (exit 2, one line, nothing
written), AWS-mode inputs made here with `cryptography`, and the acceptance test: a thing
provisioned with `--local` from the test broker's CA boots under tools/devsim from that folder
as is, runs a job to SUCCEEDED over mutual TLS, and cannot reach another thing's topics."""
from __future__ import annotations

import datetime
import json
import os
import queue
import ssl
import stat
import subprocess
import threading

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from conftest import MICROPYTHON, ROOT, thing_arn, wait_execution
from iotjobs_host import stack

PROVISION = os.path.join(ROOT, "tools", "provision")
SIGN = os.path.join(ROOT, "tools", "sign")
ENDPOINT = "abc123example-ats.iot.eu-west-1.amazonaws.com"
WIFI = {"IOTJOBS_WIFI_SSID": "home net", "IOTJOBS_WIFI_PASSWORD": "pa55-w0rd-XYZZY"}
TIMEOUT = 10


def provision(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("IOTJOBS_WIFI_")}
    return subprocess.run([PROVISION, *map(str, args)], capture_output=True, text=True, timeout=60,
                          env={**base, **(env or {})})


def ok(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    r = provision(*args, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def refused(r: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2 with one line on stderr that names the problem, nothing on stdout."""
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("provision: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def config(folder) -> dict:
    return json.loads(read(os.path.join(folder, "config.json")))


def device_tls_check(folder) -> subprocess.CompletedProcess:
    """Under the unix port, in the folder as the device's filesystem root: firmware/app.py's own
    load_config() and ssl_context() (mbedTLS, DER only) accept what was written."""
    env = dict(os.environ, MICROPYPATH=".frozen:" + os.path.join(ROOT, "firmware"))
    code = ("import app\ncfg = app.load_config()\nctx = app.ssl_context(cfg['tls'])\n"
            "print('TLS-OK', cfg['thing'], cfg['tls']['hostname'])\n")
    return subprocess.run([MICROPYTHON, "-c", code], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=60)


# -- certificates the tests make (AWS mode) ----------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Amazon"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(subject: str, key, issuer_key, issuer: str, ca: bool, days: int = 365,
              start_days: int = -1):
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now + datetime.timedelta(days=start_days))
         .not_valid_after(now + datetime.timedelta(days=days)))
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    algo = hashes.SHA256()
    return b.sign(issuer_key, algo)


def pem_key(key, fmt=serialization.PrivateFormat.TraditionalOpenSSL, password: bytes | None = None):
    enc = (serialization.BestAvailableEncryption(password) if password
           else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, fmt, enc)


def pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def aws_root(tmp_path_factory):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = make_cert("Amazon Root CA 1", key, key, "Amazon Root CA 1", ca=True, days=3650)
    path = tmp_path_factory.mktemp("aws") / "AmazonRootCA1.pem"
    path.write_bytes(pem(cert))
    return cert, key, str(path)


def aws_device(folder, root, kind: str = "rsa", **cert_kw):
    """What the AWS IoT console hands out: xxx-certificate.pem.crt and xxx-private.pem.key (an
    RSA key in the traditional PKCS#1 PEM form), signed by AWS's issuer."""
    root_cert, root_key, _ = root
    if kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key({"ec": ec.SECP256R1(), "ec384": ec.SECP384R1()}[kind])
    cert = make_cert("AWS IoT Certificate", key, root_key, "Amazon Root CA 1", ca=False, **cert_kw)
    os.makedirs(folder, exist_ok=True)
    cpath = os.path.join(folder, "dev-certificate.pem.crt")
    kpath = os.path.join(folder, "dev-private.pem.key")
    with open(cpath, "wb") as f:
        f.write(pem(cert))
    with open(kpath, "wb") as f:
        f.write(pem_key(key))
    return cert, key, cpath, kpath


def aws_args(out, cpath, kpath, ca):
    return ["--aws", "--endpoint", ENDPOINT, "--cert", cpath, "--key", kpath, "--ca", ca,
            "--out", out]


# -- the folder ----------------------------------------------------------------------------------
def test_local_mode_writes_a_device_folder(tmp_path):
    ca_dir, out = tmp_path / "ca", tmp_path / "out" / "dev-1"
    keys = tmp_path / "keys"
    subprocess.run([SIGN, "keygen", "--out", keys], check=True, capture_output=True)
    r = ok("dev-1", "--local", ca_dir, "--endpoint", "192.168.1.20:8884", "--out", out,
           "--hostname", "broker.lan",
           "--allow", "http://192.168.1.20:8443/files/", "--allow", "https://fw.example.com/ota/",
           "--ota-pubkey", keys / "signing-pub.pem", "--keepalive", "120", env=WIFI)
    # a new CA (its key 0600) and a broker certificate for the endpoint, announced
    assert "created a new local CA" in r.stdout
    assert mode(ca_dir / "ca-key.pem") == 0o600
    server = x509.load_pem_x509_certificate(read(ca_dir / "server" / "cert.pem"))
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "192.168.1.20" in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    assert "broker.lan" in sans.get_values_for_type(x509.DNSName)

    assert sorted(os.listdir(out)) == ["certs", "config.json"]
    assert sorted(os.listdir(out / "certs")) == ["ca.der", "cert.der", "key.der", "signing-pub.der"]
    assert mode(out / "certs" / "key.der") == 0o600
    assert mode(out / "config.json") == 0o600  # it holds the Wi-Fi password
    assert mode(out / "certs" / "cert.der") == 0o644
    assert os.listdir(tmp_path / "out") == ["dev-1"]  # no temporary folder left behind

    ca = x509.load_der_x509_certificate(read(out / "certs" / "ca.der"))
    cert = x509.load_der_x509_certificate(read(out / "certs" / "cert.der"))
    key = serialization.load_der_private_key(read(out / "certs" / "key.der"), password=None)
    assert ca == x509.load_pem_x509_certificate(read(ca_dir / "ca.pem"))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    cert.verify_directly_issued_by(ca)
    assert key.public_key() == cert.public_key()
    pub = serialization.load_der_public_key(read(out / "certs" / "signing-pub.der"))
    assert pub == serialization.load_pem_public_key(read(keys / "signing-pub.pem"))

    allow = ["http://192.168.1.20:8443/files/", "https://fw.example.com/ota/"]
    assert config(out) == {
        "thing": "dev-1", "host": "192.168.1.20", "port": 8884, "client_id": "dev-1",
        "keepalive": 120,
        "tls": {"ca": "certs/ca.der", "cert": "certs/cert.der", "key": "certs/key.der",
                "hostname": "broker.lan"},
        "download": {"allow": allow},
        "ota": {"pubkey": "certs/signing-pub.der", "allow": allow},
        "wifi": {"ssid": "home net", "password": "pa55-w0rd-XYZZY"},
    }
    # nothing secret on the terminal
    said = r.stdout + r.stderr
    assert WIFI["IOTJOBS_WIFI_PASSWORD"] not in said and "PRIVATE KEY" not in said
    assert "no ACL change needed" in said
    assert f"tools/deploy --port PORT --config {out}" in r.stdout

    r = device_tls_check(out)
    assert r.returncode == 0 and "TLS-OK dev-1 broker.lan" in r.stdout, r.stdout + r.stderr


def test_second_thing_reuses_the_ca_and_defaults(tmp_path):
    ca_dir = tmp_path / "ca"
    ok("one", "--local", ca_dir, "--endpoint", "broker.lan", "--out", tmp_path / "one")
    before = read(ca_dir / "ca.pem"), read(ca_dir / "ca-key.pem")
    r = ok("two", "--local", ca_dir, "--endpoint", "broker.lan", "--hostname", "mqtt.lan",
           "--out", tmp_path / "two")
    assert "created" not in r.stdout and "no Wi-Fi" in r.stdout
    assert (read(ca_dir / "ca.pem"), read(ca_dir / "ca-key.pem")) == before
    assert read(tmp_path / "one" / "certs" / "ca.der") == read(tmp_path / "two" / "certs" / "ca.der")
    cfg = config(tmp_path / "two")
    assert (cfg["host"], cfg["port"], cfg["keepalive"], cfg["tls"]["hostname"]) == \
        ("broker.lan", 8883, 60, "mqtt.lan")
    assert "wifi" not in cfg and "ota" not in cfg and "download" not in cfg
    assert mode(tmp_path / "two" / "config.json") == 0o644


def test_default_output_folder_is_under_build(tmp_path):
    thing = f"prov-default-{os.getpid()}"
    out = os.path.join(ROOT, "build", "provision", thing)
    try:
        r = ok(thing, "--local", tmp_path / "ca", "--endpoint", "127.0.0.1")
        assert f"wrote {out}/" in r.stdout
        assert config(out)["thing"] == thing
    finally:
        import shutil

        shutil.rmtree(out, ignore_errors=True)


def test_existing_folder_needs_force_and_is_replaced_whole(tmp_path):
    out = tmp_path / "dev"
    ok("dev", "--local", tmp_path / "ca", "--endpoint", "127.0.0.1", "--out", out)
    (out / "stale.txt").write_text("from before")
    old_key = read(out / "certs" / "key.der")
    refused(provision("dev", "--local", tmp_path / "ca2", "--endpoint", "127.0.0.1", "--out", out),
            "already exists", "--force")
    assert not os.path.exists(tmp_path / "ca2")  # refused before any CA was made
    assert read(out / "certs" / "key.der") == old_key  # untouched
    ok("dev", "--local", tmp_path / "ca", "--endpoint", "127.0.0.1", "--out", out, "--force")
    assert read(out / "certs" / "key.der") != old_key
    assert sorted(os.listdir(out)) == ["certs", "config.json"]  # the old folder is gone, not merged
    assert sorted(os.listdir(tmp_path)) == ["ca", "dev"]
    (tmp_path / "afile").write_text("x")
    refused(provision("dev", "--local", tmp_path / "ca", "--endpoint", "127.0.0.1",
                      "--out", tmp_path / "afile", "--force"), "not a directory")


# -- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bad name", "a" * 129, "", "dev/1", "dev#1", "dev+1", "dév"])
def test_bad_thing_name_is_refused(tmp_path, name):
    refused(provision(name, "--local", tmp_path / "ca", "--endpoint", "127.0.0.1",
                      "--out", tmp_path / "o"), "thing name")
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "ca")


def test_longest_thing_names(tmp_path, aws_root):
    """AWS allows 128 characters; --local makes the name a certificate CN, which X.509 caps at 64."""
    name = "A-z_0:9" * 18 + "xy"
    assert len(name) == 128
    _, _, cpath, kpath = aws_device(tmp_path / "in", aws_root, "ec")
    ok(name, *aws_args(str(tmp_path / "aws"), cpath, kpath, aws_root[2]))
    assert config(tmp_path / "aws")["client_id"] == name
    ok(name[:64], "--local", tmp_path / "ca", "--endpoint", "127.0.0.1", "--out", tmp_path / "o")
    refused(provision(name[:65], "--local", tmp_path / "ca", "--endpoint", "127.0.0.1",
                      "--out", tmp_path / "o2"), "at most 64")


@pytest.mark.parametrize("args, words", [
    (["--endpoint", "127.0.0.1"], ["--local", "--aws"]),  # no mode
    (["--local", "CA", "--aws", "--endpoint", "h"], ["not allowed"]),
    (["--local", "CA"], ["--endpoint"]),
    (["--local", "CA", "--endpoint", "host:0"], ["port"]),
    (["--local", "CA", "--endpoint", "host:99999"], ["port"]),
    (["--local", "CA", "--endpoint", "bad_host!"], ["host name"]),
    (["--local", "CA", "--endpoint", "h", "--keepalive", "0"], ["keepalive"]),
    (["--local", "CA", "--endpoint", "h", "--allow", "https://bucket.s3.amazonaws.com"], ["'/'"]),
    (["--local", "CA", "--endpoint", "h", "--allow", "ftp://x/"], ["--allow"]),
    (["--local", "CA", "--endpoint", "h", "--cert", "c.pem"], ["for --aws"]),
    (["--aws", "--endpoint", ENDPOINT, "--cert", "c.pem"], ["--key", "--ca"]),
    (["--aws", "--endpoint", ENDPOINT, "--acl", "a"], ["--acl", "--local"]),
])
def test_bad_arguments_are_refused(tmp_path, args, words):
    args = [str(tmp_path / "ca") if a == "CA" else a for a in args]
    refused(provision("dev", *args, "--out", tmp_path / "o"), *words)
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("env, words", [
    ({"IOTJOBS_WIFI_PASSWORD": "secret-pass"}, ["IOTJOBS_WIFI_SSID"]),
    ({"IOTJOBS_WIFI_SSID": "net", "IOTJOBS_WIFI_PASSWORD": "short"}, ["IOTJOBS_WIFI_PASSWORD"]),
    ({"IOTJOBS_WIFI_SSID": "x" * 33, "IOTJOBS_WIFI_PASSWORD": "long-enough"}, ["IOTJOBS_WIFI_SSID"]),
])
def test_bad_wifi_settings_are_refused_without_echoing_them(tmp_path, env, words):
    line = refused(provision("dev", "--local", tmp_path / "ca", "--endpoint", "h",
                             "--out", tmp_path / "o", env=env), *words)
    assert env.get("IOTJOBS_WIFI_PASSWORD", "@") not in line


def test_open_network_has_an_empty_password(tmp_path):
    r = ok("dev", "--local", tmp_path / "ca", "--endpoint", "h", "--out", tmp_path / "o",
           env={"IOTJOBS_WIFI_SSID": "cafe"})
    assert config(tmp_path / "o")["wifi"] == {"ssid": "cafe", "password": ""}
    assert "open network" in r.stdout


def test_missing_files_are_refused(tmp_path, aws_root):
    _, _, cpath, kpath = aws_device(tmp_path / "in", aws_root)
    ca = aws_root[2]
    nope = str(tmp_path / "nope.pem")
    out = str(tmp_path / "o")
    refused(provision("dev", *aws_args(out, nope, kpath, ca)), "--cert", nope, "No such file")
    refused(provision("dev", *aws_args(out, cpath, nope, ca)), "--key", nope)
    refused(provision("dev", *aws_args(out, cpath, kpath, nope)), "--ca", nope)
    refused(provision("dev", *aws_args(out, cpath, kpath, ca), "--ota-pubkey", nope), "--ota-pubkey")
    refused(provision("dev", "--local", tmp_path / "ca", "--endpoint", "h", "--out", out,
                      "--acl", nope), "--acl", nope)
    assert not os.path.exists(out)


def test_a_key_that_is_not_the_certificates_is_refused(tmp_path, aws_root):
    _, _, cpath, _ = aws_device(tmp_path / "a", aws_root)
    _, _, _, other_key = aws_device(tmp_path / "b", aws_root)
    refused(provision("dev", *aws_args(str(tmp_path / "o"), cpath, other_key, aws_root[2])),
            "is not the key of")
    assert not os.path.exists(tmp_path / "o")


def test_unusable_aws_inputs_are_refused(tmp_path, aws_root):
    out = str(tmp_path / "o")
    cert, key, cpath, kpath = aws_device(tmp_path / "in", aws_root)
    # an encrypted key
    enc = tmp_path / "enc.pem"
    enc.write_bytes(pem_key(key, serialization.PrivateFormat.PKCS8, b"pw"))
    refused(provision("dev", *aws_args(out, cpath, str(enc), aws_root[2])), "encrypted")
    # the device certificate given as the CA
    refused(provision("dev", *aws_args(out, cpath, kpath, cpath)), "--ca", "not a CA")
    # garbage as a certificate
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"not a certificate\n")
    refused(provision("dev", *aws_args(out, str(junk), kpath, aws_root[2])), "X.509")
    # an expired certificate
    _, _, old_c, old_k = aws_device(tmp_path / "old", aws_root, days=-1, start_days=-30)
    refused(provision("dev", *aws_args(out, old_c, old_k, aws_root[2])), "expired")
    # a key too weak for AWS IoT
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    wc = make_cert("AWS IoT Certificate", weak, aws_root[1], "Amazon Root CA 1", ca=False)
    (tmp_path / "w.crt").write_bytes(pem(wc))
    (tmp_path / "w.key").write_bytes(pem_key(weak))
    refused(provision("dev", *aws_args(out, str(tmp_path / "w.crt"), str(tmp_path / "w.key"),
                                       aws_root[2])), "RSA-1024")
    # port 443 needs ALPN, which MicroPython lacks
    args = aws_args(out, cpath, kpath, aws_root[2])
    args[args.index(ENDPOINT)] = ENDPOINT + ":443"
    refused(provision("dev", *args), "ALPN")
    assert not os.path.exists(out)


def test_half_a_ca_folder_is_refused(tmp_path):
    ca_dir = tmp_path / "ca"
    ok("one", "--local", ca_dir, "--endpoint", "h", "--out", tmp_path / "one")
    os.unlink(ca_dir / "ca-key.pem")
    refused(provision("two", "--local", ca_dir, "--endpoint", "h", "--out", tmp_path / "two"),
            "ca-key.pem")
    assert not os.path.exists(tmp_path / "two")


def test_a_ca_made_elsewhere_is_used_as_it_is(tmp_path, aws_root):
    """CA_DIR may hold any CA (here RSA) as ca.pem + ca-key.pem; a key that is not the
    certificate's is refused, and a CA key others can read is warned about."""
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    root_cert, root_key, _ = aws_root
    (ca_dir / "ca.pem").write_bytes(pem(root_cert))
    (ca_dir / "ca-key.pem").write_bytes(pem_key(root_key, serialization.PrivateFormat.PKCS8))
    os.chmod(ca_dir / "ca-key.pem", 0o644)
    r = ok("dev", "--local", ca_dir, "--endpoint", "h", "--out", tmp_path / "o")
    assert "created" not in r.stdout and "can be read by other users" in r.stderr
    cert = x509.load_der_x509_certificate(read(tmp_path / "o" / "certs" / "cert.der"))
    cert.verify_directly_issued_by(root_cert)
    assert cert.not_valid_after_utc <= root_cert.not_valid_after_utc
    assert read(tmp_path / "o" / "certs" / "ca.der") == root_cert.public_bytes(serialization.Encoding.DER)
    other = ec.generate_private_key(ec.SECP256R1())
    (ca_dir / "ca-key.pem").write_bytes(pem_key(other, serialization.PrivateFormat.PKCS8))
    refused(provision("dev2", "--local", ca_dir, "--endpoint", "h", "--out", tmp_path / "o2"),
            "is not the key of")


def test_an_acl_without_jobsds_patterns_is_refused(tmp_path):
    acl = tmp_path / "things.acl"
    subprocess.run([os.path.join(ROOT, "tools", "jobsd"), "--write-acl", acl], check=True)
    lines = acl.read_text().splitlines()
    acl.write_text("\n".join(ln for ln in lines if "+/update" not in ln) + "\n")
    refused(provision("dev", "--local", tmp_path / "ca", "--endpoint", "h", "--out", tmp_path / "o",
                      "--acl", acl), "--acl", "pattern", "tools/jobsd --write-acl")
    acl.write_text("user dev\ntopic readwrite $aws/things/dev/#\n")
    refused(provision("dev", "--local", tmp_path / "ca", "--endpoint", "h", "--out", tmp_path / "o",
                      "--acl", acl), "lacks")
    assert not os.path.exists(tmp_path / "o")


# -- AWS mode ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_aws_mode_converts_the_downloaded_files(tmp_path, aws_root, kind):
    cert, key, cpath, kpath = aws_device(tmp_path / "in", aws_root, kind)
    out = tmp_path / "dev"
    r = ok("kitchen-sensor-7", *aws_args(str(out), cpath, kpath, aws_root[2]), env=WIFI)
    assert r.stderr == ""  # nothing to warn about
    assert read(out / "certs" / "cert.der") == cert.public_bytes(serialization.Encoding.DER)
    assert read(out / "certs" / "ca.der") == aws_root[0].public_bytes(serialization.Encoding.DER)
    written = serialization.load_der_private_key(read(out / "certs" / "key.der"), password=None)
    assert written.private_numbers() == key.private_numbers()
    assert mode(out / "certs" / "key.der") == 0o600
    assert config(out) == {
        "thing": "kitchen-sensor-7", "host": ENDPOINT, "port": 8883, "client_id": "kitchen-sensor-7",
        "keepalive": 60,
        "tls": {"ca": "certs/ca.der", "cert": "certs/cert.der", "key": "certs/key.der",
                "hostname": ENDPOINT},
        "wifi": {"ssid": "home net", "password": "pa55-w0rd-XYZZY"},
    }
    assert "attached to thing kitchen-sensor-7" in r.stdout
    said = r.stdout + r.stderr
    assert WIFI["IOTJOBS_WIFI_PASSWORD"] not in said and "PRIVATE KEY" not in said
    r = device_tls_check(out)
    assert r.returncode == 0 and "TLS-OK kitchen-sensor-7" in r.stdout, r.stdout + r.stderr


def test_aws_mode_warns_but_goes_on(tmp_path, aws_root):
    """A legacy (non-ATS) endpoint, a chain in the certificate file: warnings on stderr."""
    cert, key, cpath, kpath = aws_device(tmp_path / "in", aws_root, "ec384")
    with open(cpath, "ab") as f:
        f.write(pem(aws_root[0]))
    args = aws_args(str(tmp_path / "o"), cpath, kpath, aws_root[2])
    args[args.index(ENDPOINT)] = "abc123.iot.eu-west-1.amazonaws.com"
    r = ok("dev", *args)
    assert "not an AWS IoT ATS endpoint" in r.stderr and "holds 2 certificates" in r.stderr
    assert read(tmp_path / "o" / "certs" / "cert.der") == cert.public_bytes(serialization.Encoding.DER)


# -- acceptance: a provisioned thing on the local stack -------------------------------------------
class TlsClient:
    """paho over the mutual-TLS listener with the provisioned certificate and key (converted to
    PEM for CPython's ssl), under another client id so the device stays connected."""

    def __init__(self, tls_port: int, folder, client_id: str):
        certs = os.path.join(folder, "certs")
        pem_dir = os.path.join(os.path.dirname(folder), "pem")
        os.makedirs(pem_dir, exist_ok=True)
        paths = {}
        for name, data in (
            ("ca", pem(x509.load_der_x509_certificate(read(os.path.join(certs, "ca.der"))))),
            ("cert", pem(x509.load_der_x509_certificate(read(os.path.join(certs, "cert.der"))))),
            ("key", pem_key(serialization.load_der_private_key(read(os.path.join(certs, "key.der")),
                                                               None), serialization.PrivateFormat.PKCS8)),
        ):
            paths[name] = os.path.join(pem_dir, name + ".pem")
            with open(paths[name], "wb") as f:
                f.write(data)
        self.inbox: queue.Queue = queue.Queue()
        self.subacks: queue.Queue = queue.Queue()
        connected = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.c.tls_set(ca_certs=paths["ca"], certfile=paths["cert"], keyfile=paths["key"],
                       cert_reqs=ssl.CERT_REQUIRED)
        self.c.on_connect = lambda *a: connected.set()
        self.c.on_message = lambda c, u, m: self.inbox.put((m.topic, m.payload))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put([int(rc.value) for rc in rcs])
        self.c.connect("localhost", tls_port)
        self.c.loop_start()
        assert connected.wait(TIMEOUT), "the provisioned identity did not connect over TLS"

    def subscribe(self, topic: str) -> int:
        self.c.subscribe(topic, qos=1)
        return self.subacks.get(timeout=TIMEOUT)[0]

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(TIMEOUT)

    def next_message(self):
        return self.inbox.get(timeout=TIMEOUT)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Watch:
    """One plain-listener client recording two things' jobs topics in the broker's order."""

    def __init__(self, port: int, things: list[str]):
        self.messages: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        subscribed = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watch-provision")
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *a: subscribed.set()
        self.c.connect("127.0.0.1", port)
        self.c.subscribe([(f"$aws/things/{t}/jobs/#", 1) for t in things])
        self.c.loop_start()
        assert subscribed.wait(TIMEOUT)

    def _on_message(self, client, userdata, msg) -> None:
        with self.cond:
            self.messages.append((msg.topic, msg.payload))
            self.cond.notify_all()

    def wait_for(self, pred, what: str):
        with self.cond:
            if not self.cond.wait_for(lambda: any(pred(t, p) for t, p in self.messages), 20):
                raise AssertionError(f"no {what}; saw {[t for t, _ in self.messages]}")
            return [t for t, _ in self.messages]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def jobs(thing: str, suffix: str) -> str:
    return f"$aws/things/{thing}/jobs/{suffix}"


def test_acceptance_provisioned_thing_runs_a_job_and_is_isolated(tmp_path, mosquitto, pki, jobsd,
                                                                    iot, procs):
    thing, other = "prov-dev", "other-dev"
    acl = os.path.join(os.path.dirname(mosquitto.conf), "things.acl")
    workdir = tmp_path / "device"
    flash = workdir / "flash"
    r = ok(thing, "--local", pki.folder, "--endpoint", mosquitto.tls_broker, "--acl", acl,
           "--out", flash)
    assert "created" not in r.stdout  # the broker's own CA, loaded, not replaced
    assert f"ACL {acl}" in r.stdout and "no ACL change needed" in r.stdout
    provisioned = read(flash / "config.json")
    for name in (thing, other):
        iot.create_thing(thingName=name)
    watch = Watch(mosquitto.port, [thing, other])
    # no --tls: devsim boots the folder's own config.json and certificates as they are
    dev = stack.Device(str(workdir), thing, mosquitto.tls_broker)
    procs.append(dev)
    watch.wait_for(lambda t, p: t == jobs(thing, "start-next"), "start-next from the device")
    assert read(flash / "config.json") == provisioned

    iot.create_job(jobId="prov-job", targets=[thing_arn(thing)],
                   document=json.dumps({"operation": "demo", "steps": 2}))
    ex = wait_execution(iot, "prov-job", thing, {"SUCCEEDED", "FAILED", "REJECTED"}, device=dev)
    assert ex["status"] == "SUCCEEDED", ex

    # The same identity (CN = prov-dev) as a paho client: another thing's topics stay closed.
    spy = TlsClient(mosquitto.tls_port, str(flash), client_id=thing + "-probe")
    try:
        assert spy.subscribe(jobs(thing, "notify-next")) == 1
        assert spy.subscribe(jobs(thing, "get/+")) == 1
        for topic in (jobs(other, "notify-next"), jobs(other, "+/update/+"), jobs(other, "#"),
                      "$aws/things/+/jobs/notify-next", "#"):
            assert spy.subscribe(topic) in (0x80, 1), topic  # refused, or delivers nothing
        # other's job is announced before one of prov-dev's (jobsd's order is the broker's):
        # everything the probe gets up to its own notify-next is all it could get of other's
        iot.create_job(jobId="other-job", targets=[thing_arn(other)], document=json.dumps({"x": 1}))
        iot.create_job(jobId="prov-job-2", targets=[thing_arn(thing)],
                       document=json.dumps({"operation": "demo", "steps": 1}))
        seen = []
        while not (seen and seen[-1][0] == jobs(thing, "notify-next") and b"prov-job-2" in seen[-1][1]):
            seen.append(spy.next_message())
        assert all(t.startswith(f"$aws/things/{thing}/") for t, _ in seen), seen
        assert jobs(other, "notify-next") in watch.wait_for(
            lambda t, p: t == jobs(other, "notify-next"), "other-dev's notify-next")

        # publishing as prov-dev on other-dev's topics: dropped by the broker, never answered
        spy.publish(jobs(other, "start-next"), b'{"clientToken": "stolen"}')
        spy.publish(jobs(other, "other-job/update"), b'{"status": "FAILED"}')
        spy.publish(jobs(thing, "get"), b'{"clientToken": "probe-marker"}')
        topics = watch.wait_for(lambda t, p: t == jobs(thing, "get") and b"probe-marker" in p,
                                "the probe's own request")
        assert jobs(other, "start-next") not in topics
        assert jobs(other, "other-job/update") not in topics
        while True:  # what the identity may do, jobsd answers
            topic, payload = spy.next_message()
            if topic == jobs(thing, "get/accepted") and b"probe-marker" in payload:
                break
        ex = iot.describe_job_execution(jobId="other-job", thingName=other)["execution"]
        assert ex["status"] == "QUEUED" and ex["versionNumber"] == 1, ex
    finally:
        spy.close()
        watch.close()
    ex = wait_execution(iot, "prov-job-2", thing, {"SUCCEEDED", "FAILED", "REJECTED"}, device=dev)
    assert ex["status"] == "SUCCEEDED", ex
