"""tools/sign as a user runs it: keys, signed images and bundles, the job documents, and the
signatures checked twice, by `cryptography` and by the device's own verifier (iotjobs.ecdsa under
the unix port), so a key or format mismatch between host and device shows up here."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
from urllib.parse import unquote, urlsplit

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import MICROPYTHON, ROOT
from iotjobs_host.jobsd.files import FileStore

SIGN = os.path.join(ROOT, "tools", "sign")
DEVICE_ENV = dict(os.environ, MICROPYPATH=".frozen:" + os.path.join(ROOT, "lib"))
PLACEHOLDER = "${aws:iot:s3-presigned-url:https://s3.amazonaws.com/%s}"

# Runs under MicroPython: everything comes through a JSON file (argv over 256 chars crashes the
# unix port), each case checked both ways the device can: whole message and streamed digest.
DEVICE_SCRIPT = """
import sys, json, binascii, hashlib
from iotjobs import ecdsa
with open(sys.argv[1]) as f:
    cases = json.load(f)
out = []
for c in cases:
    with open(c["pub"], "rb") as f:
        pub = f.read()
    sig = binascii.a2b_base64(c["sig"])
    h = hashlib.sha256()
    with open(c["data"], "rb") as f:
        data = f.read()
    for i in range(0, len(data), 512):
        h.update(data[i:i + 512])
    out.append([ecdsa.verify(pub, sig, message=data), ecdsa.verify(pub, sig, digest=h.digest())])
print(json.dumps(out))
"""


def sign(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([SIGN, *map(str, args)], capture_output=True, text=True, timeout=60, cwd=cwd)


def ok(*args: str) -> subprocess.CompletedProcess:
    r = sign(*args)
    assert r.returncode == 0, r.stderr
    return r


def device_verify(tmp_path, cases: list[dict]) -> list[bool]:
    """The device verifier's answer for each case (both forms must agree)."""
    script = tmp_path / "devverify.py"
    script.write_text(DEVICE_SCRIPT)
    data = tmp_path / "devcases.json"
    data.write_text(json.dumps(cases))
    r = subprocess.run([MICROPYTHON, str(script), str(data)], capture_output=True, text=True,
                       timeout=120, env=DEVICE_ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    answers = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(a == b for a, b in answers), answers
    return [a for a, _ in answers]


def crypto_verify(pub_path, sig_b64: str, data: bytes) -> bool:
    pub = serialization.load_der_public_key(open(pub_path, "rb").read())
    try:
        pub.verify(base64.b64decode(sig_b64), data, ec.ECDSA(hashes.SHA256()))
        return True
    except InvalidSignature:
        return False


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    ok("keygen", "--out", d)
    return d


@pytest.fixture
def firmware(tmp_path):
    p = tmp_path / "fw.bin"
    p.write_bytes(os.urandom(70_000) + b"\x00" * 1000)  # more than one read chunk
    return p


# -- keygen --------------------------------------------------------------------------------------
def test_keygen_files_permissions_and_refusal(tmp_path):
    out = tmp_path / "k"
    ok("keygen", "--out", out)
    key_pem = out / "signing-key.pem"
    assert stat.S_IMODE(os.stat(key_pem).st_mode) == 0o600
    key = serialization.load_pem_private_key(key_pem.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    pkcs8 = b"-----BEGIN "
    pkcs8 += b"PRIVATE KEY-----"  # built in two parts: no key-looking line in the repository
    assert key_pem.read_bytes().startswith(pkcs8)
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    assert (out / "signing-pub.der").read_bytes() == spki
    pem_pub = serialization.load_pem_public_key((out / "signing-pub.pem").read_bytes())
    assert pem_pub.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo) == spki

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = sign("keygen", "--out", out)
    assert r.returncode == 2 and "--force" in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    (out / "signing-pub.der").unlink()  # one file left over is enough to refuse
    assert sign("keygen", "--out", out).returncode == 2

    ok("keygen", "--out", out, "--force")
    assert (out / "signing-key.pem").read_bytes() != before["signing-key.pem"]
    assert stat.S_IMODE(os.stat(out / "signing-key.pem").st_mode) == 0o600
    assert sorted(p.name for p in out.iterdir()) == ["signing-key.pem", "signing-pub.der",
                                                     "signing-pub.pem"]


# -- firmware image ------------------------------------------------------------------------------
def test_image_native_document_and_files_folder(tmp_path, keys, firmware):
    files = tmp_path / "files"
    out = tmp_path / "doc.json"
    r = ok("image", firmware, "--key", keys / "signing-key.pem", "--version", "1.4.2",
           "--bucket", "fw-bucket", "--key-name", "esp32/fw 1.4.2.bin", "--files", files,
           "--out", out)
    doc = json.loads(r.stdout)
    assert json.loads(out.read_text()) == doc
    data = firmware.read_bytes()
    assert list(doc) == ["operation", "url", "size", "sha256", "signature", "version"]
    assert doc["operation"] == "ota" and doc["version"] == "1.4.2"
    assert doc["url"] == PLACEHOLDER % "fw-bucket/esp32/fw%201.4.2.bin"
    assert doc["size"] == len(data) and doc["sha256"] == hashlib.sha256(data).hexdigest()
    assert base64.b64decode(doc["signature"])[0] == 0x30  # DER, as AWS code signing
    assert crypto_verify(keys / "signing-pub.der", doc["signature"], data)
    assert (files / "fw-bucket" / "esp32" / "fw 1.4.2.bin").read_bytes() == data

    # jobsd's own mapping finds the copied object from the placeholder
    store = FileStore(str(files), b"secret", "http://127.0.0.1:1")
    url = json.loads(store.presign_document(json.dumps(doc), 600))["url"]
    rel = unquote(urlsplit(url).path[len("/files/"):])
    assert open(store.resolve(rel), "rb").read() == data


def test_image_afr_ota_document(tmp_path, keys, firmware):
    r = ok("image", firmware, "--key", keys / "signing-key.pem", "--bucket", "fw-bucket",
           "--key-name", "fw.bin", "--afr-ota")
    doc = json.loads(r.stdout)
    assert list(doc) == ["afr_ota"]
    assert list(doc["afr_ota"]) == ["protocols", "files"]
    assert doc["afr_ota"]["protocols"] == ["HTTP"]
    (f,) = doc["afr_ota"]["files"]
    assert f == {"filepath": "fw.bin", "filesize": firmware.stat().st_size, "fileid": 0,
                 "certfile": "signer", "update_data_url": PLACEHOLDER % "fw-bucket/fw.bin",
                 "auth_scheme": "aws.s3.presigned", "sig-sha256-ecdsa": f["sig-sha256-ecdsa"]}
    assert crypto_verify(keys / "signing-pub.der", f["sig-sha256-ecdsa"], firmware.read_bytes())


def test_image_url_and_usage_errors(tmp_path, keys, firmware):
    key = keys / "signing-key.pem"
    doc = json.loads(ok("image", firmware, "--key", key, "--url", "https://example.com/fw.bin").stdout)
    assert doc["url"] == "https://example.com/fw.bin" and "version" not in doc
    for args in ([], ["--files", tmp_path / "f", "--url", "https://x/y"],
                 ["--bucket", "b", "--key-name", "../escape.bin", "--files", tmp_path / "f"],
                 ["--bucket", "Bad_Bucket"], ["--url", "https://x/y", "--version", "a b"]):
        r = sign("image", firmware, "--key", key, *args)
        assert r.returncode == 2, (args, r.stdout)
        assert r.stderr.startswith("sign: ") and "Traceback" not in r.stderr
    assert not (tmp_path / "escape.bin").exists() and not (tmp_path / "f").exists()
    wrong = tmp_path / "rsa.pem"
    wrong.write_text("not a key")
    assert sign("image", firmware, "--key", wrong, "--url", "https://x/y").returncode == 2


def test_image_refuses_to_replace_a_published_object(tmp_path, keys, firmware):
    files = tmp_path / "files"
    args = ["--key", keys / "signing-key.pem", "--bucket", "fw1", "--key-name", "fw.bin", "--files", files]
    ok("image", firmware, *args)
    ok("image", firmware, *args)  # the same bytes again: nothing to refuse
    other = tmp_path / "other.bin"
    other.write_bytes(b"other firmware")
    r = sign("image", other, *args)
    assert r.returncode == 2 and "--force" in r.stderr
    assert (files / "fw1" / "fw.bin").read_bytes() == firmware.read_bytes()
    ok("image", other, *args, "--force")
    assert (files / "fw1" / "fw.bin").read_bytes() == b"other firmware"


def test_verify_command_and_tampering(tmp_path, keys, firmware):
    pub = keys / "signing-pub.der"
    doc_path = tmp_path / "doc.json"
    doc = json.loads(ok("image", firmware, "--key", keys / "signing-key.pem", "--url", "https://x/fw",
                        "--out", doc_path).stdout)
    assert ok("verify", firmware, "--pub", pub, "--signature", doc["signature"]).stdout.startswith("OK")
    assert ok("verify", firmware, "--pub", keys / "signing-pub.pem", "--document", doc_path)

    tampered = tmp_path / "tampered.bin"
    data = bytearray(firmware.read_bytes())
    data[1234] ^= 1
    tampered.write_bytes(data)
    r = sign("verify", tampered, "--pub", pub, "--signature", doc["signature"])
    assert r.returncode == 1 and "BAD" in r.stdout and "does not verify" in r.stderr
    r = sign("verify", tampered, "--pub", pub, "--document", doc_path)
    assert r.returncode == 1 and "sha256" in r.stderr

    longer = tmp_path / "longer.bin"
    longer.write_bytes(firmware.read_bytes() + b"\x00")
    r = sign("verify", longer, "--pub", pub, "--document", doc_path)
    assert r.returncode == 1 and "size" in r.stderr
    assert sign("verify", firmware, "--pub", pub, "--signature", "***").returncode == 2


def test_device_verifier_agrees(tmp_path, keys, firmware):
    """The image and bundle signatures verify on the device, with every key form it reads, and
    fail there for a tampered file and for another key."""
    key = keys / "signing-key.pem"
    native = json.loads(ok("image", firmware, "--key", key, "--url", "https://x/fw").stdout)
    afr = json.loads(ok("image", firmware, "--key", key, "--url", "https://x/fw", "--afr-ota").stdout)
    afr_sig = afr["afr_ota"]["files"][0]["sig-sha256-ecdsa"]

    app = tmp_path / "app"
    app.mkdir()
    (app / "main.py").write_text("print('v3')\n")
    files = tmp_path / "files"
    bdoc = json.loads(ok("bundle", app, "--key", key, "--version", "3", "--bucket", "apps",
                         "--files", files).stdout)
    manifest = files / "apps" / "app" / "3" / "manifest.json"

    tampered = tmp_path / "tampered.bin"
    data = bytearray(firmware.read_bytes())
    data[-1] ^= 0x80
    tampered.write_bytes(data)
    tampered_manifest = tmp_path / "manifest.json"
    tampered_manifest.write_bytes(manifest.read_bytes().replace(b'"version":"3"', b'"version":"4"'))
    other = tmp_path / "other"
    ok("keygen", "--out", other)

    der, pem = str(keys / "signing-pub.der"), str(keys / "signing-pub.pem")
    cases = [
        ({"pub": der, "sig": native["signature"], "data": str(firmware)}, True),
        ({"pub": pem, "sig": native["signature"], "data": str(firmware)}, True),
        ({"pub": der, "sig": afr_sig, "data": str(firmware)}, True),
        ({"pub": der, "sig": bdoc["signature"], "data": str(manifest)}, True),
        ({"pub": der, "sig": native["signature"], "data": str(tampered)}, False),
        ({"pub": der, "sig": bdoc["signature"], "data": str(tampered_manifest)}, False),
        ({"pub": str(other / "signing-pub.der"), "sig": native["signature"], "data": str(firmware)},
         False),
    ]
    for c, want in cases:  # the oracle first, so a failure below is the device's
        assert crypto_verify(c["pub"] if c["pub"] != pem else der, c["sig"],
                             open(c["data"], "rb").read()) is want
    assert device_verify(tmp_path, [c for c, _ in cases]) == [w for _, w in cases]


# -- application bundle --------------------------------------------------------------------------
def make_app(root):
    (root / "lib" / "pkg").mkdir(parents=True)
    (root / "main.py").write_text("import pkg\n")
    (root / "lib" / "pkg" / "__init__.py").write_text("")
    (root / "lib" / "pkg" / "core.py").write_bytes(os.urandom(3000))
    (root / "config-defaults.json").write_text("{}")
    (root / "B.txt").write_text("capital sorts first")
    return root


def test_bundle_manifest_layout_and_document(tmp_path, keys):
    app = make_app(tmp_path / "app")
    files = tmp_path / "files"
    out = tmp_path / "doc.json"
    doc = json.loads(ok("bundle", app, "--key", keys / "signing-key.pem", "--version", "2.1.0",
                        "--bucket", "apps", "--key-prefix", "fleet/app-2.1.0", "--files", files,
                        "--out", out).stdout)
    assert json.loads(out.read_text()) == doc
    assert list(doc) == ["operation", "manifest", "signature", "base", "version"]
    assert doc["operation"] == "app-update" and doc["version"] == "2.1.0"
    assert doc["manifest"] == PLACEHOLDER % "apps/fleet/app-2.1.0/manifest.json"
    assert doc["base"] == "https://s3.amazonaws.com/apps/fleet/app-2.1.0/files/"

    root = files / "apps" / "fleet" / "app-2.1.0"
    raw = (root / "manifest.json").read_bytes()
    assert (root / "manifest.sig").read_text() == doc["signature"] + "\n"
    assert crypto_verify(keys / "signing-pub.der", doc["signature"], raw)
    m = json.loads(raw)
    assert raw == json.dumps(m, sort_keys=True, separators=(",", ":")).encode()  # canonical
    assert m["version"] == "2.1.0"
    paths = [f["path"] for f in m["files"]]
    assert paths == ["B.txt", "config-defaults.json", "lib/pkg/__init__.py", "lib/pkg/core.py",
                     "main.py"]
    for f in m["files"]:
        assert sorted(f) == ["path", "sha256", "size"]
        src = (app / f["path"]).read_bytes()
        assert f["size"] == len(src) and f["sha256"] == hashlib.sha256(src).hexdigest()
        # base + path is the object, and jobsd's folder holds it
        assert doc["base"] + f["path"] == f"https://s3.amazonaws.com/apps/fleet/app-2.1.0/files/{f['path']}"
        assert (root / "files" / f["path"]).read_bytes() == src

    # the same bundle again is fine; another bundle under the same version is refused
    ok("bundle", app, "--key", keys / "signing-key.pem", "--version", "2.1.0", "--bucket", "apps",
       "--key-prefix", "fleet/app-2.1.0", "--files", files)
    (app / "main.py").write_text("changed\n")
    r = sign("bundle", app, "--key", keys / "signing-key.pem", "--version", "2.1.0", "--bucket",
             "apps", "--key-prefix", "fleet/app-2.1.0", "--files", files)
    assert r.returncode == 2 and "--force" in r.stderr
    assert (root / "manifest.json").read_bytes() == raw


def test_bundle_presigned_files_stage_and_base_url(tmp_path, keys):
    app = make_app(tmp_path / "app")
    key = keys / "signing-key.pem"
    doc = json.loads(ok("bundle", app, "--key", key, "--version", "5", "--bucket", "apps",
                        "--files", tmp_path / "files", "--presign-files").stdout)
    assert doc["manifest"] == PLACEHOLDER % "apps/app/5/manifest.json"  # default prefix app/V
    assert doc["urls"]["lib/pkg/core.py"] == PLACEHOLDER % "apps/app/5/files/lib/pkg/core.py"
    assert len(doc["urls"]) == 5

    stage = tmp_path / "stage"
    doc = json.loads(ok("bundle", app, "--key", key, "--version", "5", "--stage", stage,
                        "--base-url", "https://cdn.example.com/app5").stdout)
    assert doc["manifest"] == "https://cdn.example.com/app5/manifest.json"
    assert doc["base"] == "https://cdn.example.com/app5/files/"
    assert crypto_verify(keys / "signing-pub.der", doc["signature"], (stage / "manifest.json").read_bytes())
    assert (stage / "files" / "main.py").read_text() == "import pkg\n"

    for args in (["--version", "5", "--bucket", "apps"],  # nowhere to put the objects
                 ["--version", "5", "--stage", stage / "x"],  # no URL
                 ["--version", "5", "--bucket", "apps", "--files", tmp_path / "f", "--key-prefix", "a/../b"],
                 ["--version", "../5", "--bucket", "apps", "--files", tmp_path / "f"]):
        r = sign("bundle", app, "--key", key, *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, args
    assert not (tmp_path / "f").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("kind", ["symlink", "dir-symlink", "fifo", "bad-name", "space", "empty"])
def test_bundle_path_rules(tmp_path, keys, kind):
    app = make_app(tmp_path / "app")
    if kind == "symlink":
        (app / "link.py").symlink_to(app / "main.py")
    elif kind == "dir-symlink":
        (app / "lib" / "up").symlink_to(tmp_path)
    elif kind == "fifo":
        os.mkfifo(app / "pipe")
    elif kind == "bad-name":
        (app / "lib" / "na\\me.py").write_text("")
    elif kind == "space":
        (app / "my file.py").write_text("")
    elif kind == "empty":
        app = tmp_path / "empty"
        (app / "sub").mkdir(parents=True)
    files = tmp_path / "files"
    r = sign("bundle", app, "--key", keys / "signing-key.pem", "--version", "1", "--bucket", "apps",
             "--files", files)
    assert r.returncode == 2 and r.stderr.startswith("sign: ") and "Traceback" not in r.stderr
    assert not files.exists()  # nothing half-published


def test_bundle_exclude(tmp_path, keys):
    app = make_app(tmp_path / "app")
    (app / "__pycache__").mkdir()
    (app / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"\x00")
    (app / "lib" / "pkg" / "core.pyc").write_bytes(b"\x00")
    (app / "notes~").write_text("")
    files = tmp_path / "files"
    ok("bundle", app, "--key", keys / "signing-key.pem", "--version", "1", "--bucket", "apps",
       "--files", files, "--exclude", "__pycache__", "--exclude", "*.pyc", "--exclude", "notes~")
    m = json.loads((files / "apps" / "app" / "1" / "manifest.json").read_bytes())
    assert [f["path"] for f in m["files"]] == ["B.txt", "config-defaults.json", "lib/pkg/__init__.py",
                                               "lib/pkg/core.py", "main.py"]
    assert all(".." not in f["path"].split("/") and not f["path"].startswith("/") for f in m["files"])
