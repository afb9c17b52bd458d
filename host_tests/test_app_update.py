"""Application updates (app-update) on a simulated device against jobsd's file server: signed
bundles made by tools/sign, staged beside the running application, switched with one pointer
write, confirmed after the reboot; a version that fails at import rolled back after its tries;
every failure leaving the running application as it was; power cuts at every journalled step."""
import base64
import hashlib
import json
import os
import sys

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import ROOT, stack, thing_arn, wait_execution
from iotjobs_host.fileserver import FlakyServer

sys.path.insert(0, os.path.join(ROOT, "tools"))
from iotjobs_host import sign as signtool  # noqa: E402

TERMINAL = {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED", "REMOVED"}
KEY = ec.generate_private_key(ec.SECP256R1())
OTHER = ec.generate_private_key(ec.SECP256R1())
PING = {"operation": "app-ping"}


def app_files(version, broken=False, big=0):
    """An application: `application.py` registers the job operation `app-ping`, which answers
    the version from a module of the bundle; a package in a sub-folder; optional ballast."""
    entry = ("import helper\nfrom pkg import util\n\n\ndef start(api):\n"
             "    api.log('application %s starting' % helper.VERSION)\n"
             "    api.register('app-ping', lambda ctx, doc: {'app': helper.VERSION, "
             "'util': util.NAME, 'settings': str(api.settings.get('colour'))})\n")
    if broken:
        entry = "raise ImportError('broken on purpose')\n" + entry
    out = {"application.py": entry.encode(), "helper.py": f"VERSION = {version!r}\n".encode(),
           "pkg/__init__.py": b"", "pkg/util.py": b"NAME = 'util'\n"}
    if big:
        out["data/ballast.bin"] = os.urandom(big)
    return out


@pytest.fixture
def keyfile(tmp_path):
    p = tmp_path / "signing-key.pem"
    p.write_bytes(KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return str(p)


@pytest.fixture
def publish(tmp_path, files, keyfile):
    """publish(version, files) -> the app-update document, made by tools/sign bundle with the
    objects placed in jobsd's files folder (one presigned URL per file)."""

    def make(version, content, prefix=None):
        src = tmp_path / f"src-{version}-{prefix or ''}".replace("/", "_")
        for rel, data in content.items():
            p = src / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        out = tmp_path / f"doc-{version}.json"
        argv = ["bundle", str(src), "--key", keyfile, "--version", version, "--bucket", "apps",
                "--files", str(files), "--presign-files", "--out", str(out)]
        if prefix:
            argv += ["--key-prefix", prefix]
        assert signtool.main(argv) == 0
        return json.loads(out.read_text())

    return make


@pytest.fixture
def app_device(tmp_path, device, iot):
    pub = tmp_path / "pub.der"
    pub.write_bytes(KEY.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))

    def start(thing, docs, extra=None):
        iot.create_thing(thingName=thing)
        for i, doc in enumerate(docs):
            iot.create_job(jobId=f"{thing}-{i}", targets=[thing_arn(thing)], document=json.dumps(doc))
        cfg = {"ota": {"pubkey": str(pub), "allow": ["http://127.0.0.1:"]}, "progress_min_ms": 0,
               "app": {"max_tries": 3, "settings": {"colour": "green"}}}
        cfg.update(extra or {})
        # 192K: on the unix port every imported module's code sits in the heap too (runner,
        # TLS, the update handler, ECDSA, the application itself: about 110 KB); a board with
        # frozen code keeps only the working set there (`make bench` measures both)
        return device(thing, config=cfg, heap="192K")

    return start


def result(iot, dev, thing, i, timeout=60):
    ex = wait_execution(iot, f"{thing}-{i}", thing, TERMINAL, timeout, device=dev)
    return ex["status"], ex.get("statusDetails", {}).get("detailsMap", {})


def app_state(dev):
    with open(os.path.join(dev.flash, "app.d", "state.json")) as f:
        return json.load(f)


def tree(folder):
    """{relative path: sha256} of every file under folder."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.mark.images()  # fleet32, stock32 and pip
def test_install_then_update(jobsd, iot, app_device, publish):
    v1 = publish("1.0", app_files("1.0"))
    v11 = publish("1.1", app_files("1.1", big=150_000))
    dev = app_device("app-ok", [v1, PING, v11, PING])
    status, details = result(iot, dev, "app-ok", 0)
    assert status == "SUCCEEDED" and details["app"] == "1.0", details
    status, details = result(iot, dev, "app-ok", 1)
    assert status == "SUCCEEDED" and details == {**details, "app": "1.0", "util": "util",
                                                 "settings": "green"}, details
    status, details = result(iot, dev, "app-ok", 2)
    assert status == "SUCCEEDED" and details["app"] == "1.1", details
    status, details = result(iot, dev, "app-ok", 3)
    assert status == "SUCCEEDED" and details["app"] == "1.1", "the new version runs"
    st = app_state(dev)
    assert (st["cur"], st["prev"], st["trial"], st["ver"]) == ("b", "a", False,
                                                               {"a": "1.0", "b": "1.1"}), st
    want = {p: hashlib.sha256(d).hexdigest() for p, d in app_files("1.0").items()}
    assert tree(os.path.join(dev.flash, "app.d", "a")) == want, "1.0 stays, for a rollback"
    assert len(dev.boots()) == 3, "one reset per update"


@pytest.mark.images()  # fleet32, stock32 and pip
def test_version_that_fails_at_import_is_rolled_back(jobsd, iot, app_device, publish):
    v1 = publish("1.0", app_files("1.0"))
    v2 = publish("2.0", app_files("2.0", broken=True))
    dev = app_device("app-rb", [v1, v2, PING])
    assert result(iot, dev, "app-rb", 0)[0] == "SUCCEEDED"
    before = tree(os.path.join(dev.flash, "app.d", "a"))
    status, details = result(iot, dev, "app-rb", 1, 90)
    assert status == "FAILED" and details["reason"] == "rolled_back", details
    assert "broken on purpose" in details["error"] and details["app"] == "1.0", details
    status, details = result(iot, dev, "app-rb", 2)
    assert status == "SUCCEEDED" and details["app"] == "1.0", "the old version runs again"
    assert tree(os.path.join(dev.flash, "app.d", "a")) == before
    st = app_state(dev)
    assert st["cur"] == "a" and not st["trial"], st
    # boot 1, the update's reset, three failed starts on trial, the rollback boot
    assert len(dev.boots()) == 6, dev.boots()


def _signed_manifest(files_dir, prefix, version, entries, payloads, key=KEY):
    """A hand-made bundle (tools/sign refuses to make bad ones): manifest, files, document."""
    manifest = json.dumps({"version": version, "files": entries}, sort_keys=True,
                          separators=(",", ":")).encode()
    root = files_dir / "apps" / prefix
    (root / "files").mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_bytes(manifest)
    for name, data in payloads.items():
        (root / "files" / name).write_bytes(data)
    sig = base64.b64encode(key.sign(manifest, ec.ECDSA(hashes.SHA256()))).decode()
    return {"operation": "app-update", "version": version, "signature": sig,
            "manifest": signtool.presigned("apps", f"{prefix}/manifest.json"),
            "urls": {e["path"]: signtool.presigned("apps", f"{prefix}/files/{name}")
                     for e, name in zip(entries, payloads, strict=True)}}


def test_failures_leave_the_running_application_untouched(jobsd, iot, app_device, publish, files):
    v1 = publish("1.0", app_files("1.0"))
    good = publish("2.0", app_files("2.0"))

    def variant(**over):
        d = json.loads(json.dumps(good))
        d.update(over)
        return d

    entry = b"def start(api):\n    pass\n"
    sha = hashlib.sha256(entry).hexdigest()
    traversal = _signed_manifest(files, "app/trav", "2.0",
                                 [{"path": "../escape.py", "sha256": sha, "size": len(entry)}],
                                 {"escape.py": entry})
    absolute = _signed_manifest(files, "app/abs", "2.0",
                                [{"path": "/application.py", "sha256": sha, "size": len(entry)}],
                                {"application.py": entry})
    wrong_hash = _signed_manifest(files, "app/hash", "2.0",
                                  [{"path": "application.py", "sha256": "0" * 64, "size": len(entry)}],
                                  {"application.py": entry})
    wrong_size = _signed_manifest(files, "app/size", "2.0",
                                  [{"path": "application.py", "sha256": sha, "size": len(entry) + 5}],
                                  {"application.py": entry})
    srv500 = FlakyServer(entry, fail_status=500, fails=-1)
    try:
        cases = [
            ("bad signature", variant(signature=base64.b64encode(
                OTHER.sign(b"x", ec.ECDSA(hashes.SHA256()))).decode()), "FAILED", "BAD_SIGNATURE"),
            ("no signature", {k: v for k, v in good.items() if k != "signature"}, "REJECTED",
             "NO_SIGNATURE"),
            ("bad hash", wrong_hash, "FAILED", "HASH_MISMATCH"),
            ("wrong size", wrong_size, "FAILED", "SIZE_MISMATCH"),
            ("path traversal", traversal, "FAILED", "BAD_PATH"),
            ("absolute path", absolute, "FAILED", "BAD_PATH"),
            ("manifest 404", variant(manifest=signtool.presigned("apps", "nope/manifest.json")),
             "FAILED", "DOWNLOAD_FAILED"),
            ("file 404", variant(urls={**good["urls"], "helper.py":
                                       signtool.presigned("apps", "nope/helper.py")}),
             "FAILED", "DOWNLOAD_FAILED"),
            ("file 500", variant(urls={**good["urls"], "helper.py": srv500.url + "helper.py"}),
             "FAILED", "DOWNLOAD_FAILED"),
            ("outside the allowlist", variant(manifest="http://example.com/manifest.json"),
             "REJECTED", "URL_NOT_ALLOWED"),
            ("file outside the allowlist", variant(urls={**good["urls"],
                                                         "helper.py": "https://example.com/h.py"}),
             "FAILED", "URL_NOT_ALLOWED"),
            ("other version's manifest", variant(version="3.0"), "FAILED", "BAD_MANIFEST"),
            ("downgrade", publish("0.9", app_files("0.9")), "REJECTED", "DOWNGRADE"),
        ]
        thing = "app-bad"
        dev = app_device(thing, [v1] + [c[1] for c in cases] + [PING])
        assert result(iot, dev, thing, 0)[0] == "SUCCEEDED"
        running = tree(os.path.join(dev.flash, "app.d", "a"))
        for i, (name, _, want_status, want_reason) in enumerate(cases, start=1):
            status, details = result(iot, dev, thing, i, 60)
            assert (status, details.get("reason")) == (want_status, want_reason), (name, details)
        status, details = result(iot, dev, thing, len(cases) + 1)
        assert status == "SUCCEEDED" and details["app"] == "1.0", details
        assert tree(os.path.join(dev.flash, "app.d", "a")) == running
        assert app_state(dev)["cur"] == "a" and app_state(dev)["seq"] == 1
        assert len(dev.boots()) == 2, "no failed update resets the device"
        assert not os.path.exists(os.path.join(dev.flash, "escape.py"))
        assert not os.path.exists(os.path.join(dev.flash, "app.d", "escape.py"))
        assert srv500.ranges, "the 500 server was asked"
    finally:
        srv500.stop()


APP_POINTS = (
    ["journaled", "app-manifest", "app-checkpoint#1", "app-checkpoint#2", "app-file#1",
     "app-file#3", "app-file#5", "app-verified", "app-switching",
     "app-switched", "before-reset", "app-confirmed", "handler-done", "outbox-written",
     "update-sent", "update-answered"]
)


@pytest.mark.parametrize("point", APP_POINTS)
def test_power_cut_at_every_step(jobsd, iot, app_device, publish, point):
    """A power cut at each journalled step of an update (and inside the download of a 200 kB
    file): the update still ends SUCCEEDED, the new version runs, confirmed, exactly once."""
    v1 = publish("1.0", app_files("1.0", big=200_000))
    thing = "app-cut-" + point.replace("#", "-")
    dev = app_device(thing, [v1, PING], {"test_handlers": True, "halt_at": point})
    stack.wait_until(lambda: f"@@HALT {point}" in dev.log_text(10**7), 60, "the halt")
    dev.power_cut()
    status, details = result(iot, dev, thing, 0, 90)
    assert status == "SUCCEEDED" and details["app"] == "1.0", (details, dev.log_text())
    status, details = result(iot, dev, thing, 1)
    assert status == "SUCCEEDED" and details["app"] == "1.0", details
    st = app_state(dev)
    assert st["cur"] == "a" and not st["trial"] and st["seq"] == 1, st
    want = {p: hashlib.sha256(d).hexdigest() for p, d in app_files("1.0").items()
            if not p.startswith("data/")}
    got = tree(os.path.join(dev.flash, "app.d", "a"))
    assert {p: h for p, h in got.items() if not p.startswith("data/")} == want


# On the other images (stock32, pip): a cut inside a file's download, after the verification,
# at the switch, before the reset and after the confirmation (all 16 on fleet32 above).
APP_POINTS_EVERY_IMAGE = ("app-checkpoint#1", "app-verified", "app-switching", "before-reset",
                          "app-confirmed")


@pytest.mark.images("stock32", "pip")
@pytest.mark.parametrize("point", APP_POINTS_EVERY_IMAGE)
def test_power_cut_on_the_other_images(jobsd, iot, app_device, publish, point):
    test_power_cut_at_every_step(jobsd, iot, app_device, publish, point)


def test_cancel_while_staging_frees_the_stage(jobsd, iot, app_device, publish):
    v1 = publish("1.0", app_files("1.0", big=200_000))
    thing = "app-cancel"
    dev = app_device(thing, [v1], {"test_handlers": True, "halt_at": "app-checkpoint"})
    stack.wait_until(lambda: "@@HALT app-checkpoint" in dev.log_text(10**7), 60, "the halt")
    # While the device is stuck (as good as off), the operator force-cancels the job.
    iot.cancel_job(jobId=f"{thing}-0", force=True)
    dev.power_cut()
    # "abandoned" is logged before the handler's abort runs: wait for the idle line after it
    stack.wait_until(lambda: "heap free=" in dev.log_text(10**7).partition("abandoned")[2], 30,
                     "the device to abandon the job and go idle")
    assert not os.path.exists(os.path.join(dev.flash, "app.d", "a")), "staged files removed"
    assert not os.path.exists(os.path.join(dev.flash, "app.d", "a.json"))
    assert not os.path.exists(os.path.join(dev.flash, "app.d", "state.json")), "nothing switched"


@pytest.mark.parametrize("protocol", ["http", "mqtt"])
def test_one_command_app_update_from_tools_jobs(jobsd, iot, files, app_device, tmp_path, protocol):
    """tools/sign keygen, then tools/jobs app: signed, published, job created; the device runs
    the new application (its own job operation answers). Over MQTT the bundle is one stream and
    the device may fetch nothing over HTTP."""
    import subprocess

    keys = tmp_path / "keys"
    r = subprocess.run([os.path.join(ROOT, "tools", "sign"), "keygen", "--out", str(keys)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    src = tmp_path / "myapp"
    for rel, data in app_files("4.2").items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "x.pyc").write_bytes(b"junk")
    allow = ["http://127.0.0.1:"] if protocol == "http" else []
    dev = app_device("app-cli", [], {"ota": {"pubkey": str(keys / "signing-pub.der"),
                                             "allow": allow}})
    r = subprocess.run([os.path.join(ROOT, "tools", "jobs"), "--endpoint", jobsd.control_url, "app",
                        "app-42", "--dir", str(src), "--key", str(keys / "signing-key.pem"),
                        "--files", str(files), "--version", "4.2", "--thing", "app-cli",
                        "--exclude", "__pycache__", "--protocol", protocol],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    if protocol == "http":
        assert "created app-update job app-42: version 4.2, 4 file(s)" in r.stdout, r.stdout
    else:
        doc = json.loads(iot.get_job_document(jobId="app-42")["document"])
        assert doc["stream"] == {"id": "app-42", "manifest": 0} and "urls" not in doc, doc
        assert len(iot.describe_stream(streamId="app-42")["streamInfo"]["files"]) == 5
    ex = wait_execution(iot, "app-42", "app-cli", TERMINAL, 60, device=dev)
    assert ex["status"] == "SUCCEEDED" and ex["statusDetails"]["detailsMap"]["app"] == "4.2", ex
    iot.create_job(jobId="ping-1", targets=[thing_arn("app-cli")], document=json.dumps(PING))
    ex = wait_execution(iot, "ping-1", "app-cli", TERMINAL, 30, device=dev)
    assert ex["statusDetails"]["detailsMap"]["app"] == "4.2", ex
