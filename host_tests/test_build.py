"""`make build`: every device file compiles with mpy-cross for the host and for ESP32."""
import os
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
from iotjobs_host import build as B  # noqa: E402


def test_build_compiles_every_device_file_for_both_targets():
    r = subprocess.run([os.path.join(ROOT, "tools", "build")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    sources = B.sources()
    assert any(rel == os.path.join("iotjobs", "runner.py") for _, rel in sources)
    assert any(rel == os.path.join("umqtt", "simple.py") for _, rel in sources)
    for arch in ("host", "xtensawin"):
        out = os.path.join(ROOT, "build", "mpy", arch)
        for _, rel in sources:
            name = rel if os.path.basename(rel) in B.KEEP_SOURCE else rel[:-3] + ".mpy"
            path = os.path.join(out, name)
            assert os.path.exists(path), f"{arch}: {name} was not built"
            if name.endswith(".mpy"):
                with open(path, "rb") as f:
                    head = f.read(2)
                assert head == b"M\x06", f"{arch}: {name} is not an .mpy v6 file"
        assert f"{arch}: " in r.stdout


def test_build_reports_a_syntax_error(tmp_path, monkeypatch):
    """A file mpy-cross cannot compile fails the build with its name."""
    bad = tmp_path / "lib"
    bad.mkdir()
    (bad / "broken.py").write_text("def f(:\n")
    monkeypatch.setattr(B, "ROOT", str(tmp_path))
    monkeypatch.setattr(B, "BUILD", str(tmp_path / "build"))
    (tmp_path / "build" / "umqtt").mkdir(parents=True)
    (tmp_path / "build" / "umqtt" / "simple.py").write_text("")
    assert B.main(["--arch", "host"]) == 1
