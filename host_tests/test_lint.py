"""`make lint` stays clean: ruff over the device and host code (ruff.toml), and the device code
against each ESP32 board's API surface (tools/stubcheck), a check shown to fail on code that
calls what an ESP32 lacks."""
import os
import subprocess

import pytest
from conftest import ROOT


def _lint_paths():
    """The Makefile's LINT_PATHS: one list for `make lint` and this test."""
    with open(os.path.join(ROOT, "Makefile")) as f:
        for line in f:
            if line.startswith("LINT_PATHS :="):
                return line.split(":=", 1)[1].split()
    raise AssertionError("no LINT_PATHS in the Makefile")


PATHS = _lint_paths()


def test_ruff_finds_nothing():
    r = subprocess.run([os.path.join(ROOT, ".venv", "bin", "ruff"), "check", *PATHS],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# -- the ESP32 API surface (tools/stubcheck: pyright against each board's MicroPython stubs) -----
STUBCHECK = os.path.join(ROOT, "tools", "stubcheck")
BOARDS = ("ESP32_GENERIC", "ESP32_GENERIC_C3", "ESP32_GENERIC_S3")


def stubcheck(*args):
    return subprocess.run([STUBCHECK, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_device_code_uses_only_what_every_esp32_board_has():
    """lib/iotjobs, firmware/app.py, firmware/main.py and boards/esp32 against the stubs of
    ESP32_GENERIC, S3 and C3 (make lint runs the same): nothing reported."""
    r = stubcheck()
    assert r.returncode == 0, r.stdout + r.stderr
    for b in BOARDS:
        assert f"stubcheck: {b}: the device code: 0 problem(s)" in r.stdout, r.stdout


# Device code as someone might write it after testing on the unix port only; each line is one
# thing an ESP32 does not have, with the pyright rule that must report it.
BAD = {
    "missing_machine_function.py": ("import machine\nmachine.deepsleep_forever()\n",
                                    "reportAttributeAccessIssue", '"deepsleep_forever" is not a known attribute'),
    "missing_esp32_function.py": ("import esp32\nesp32.Partition.mark_app_invalid()\n",
                                  "reportAttributeAccessIssue", '"mark_app_invalid"'),
    "partition_signature.py": ('import esp32\np = esp32.Partition("ota_0", 4096, 1)\n',
                               "reportCallIssue", "Expected 2 positional arguments"),
    "wlan_signature.py": ('import network\nw = network.WLAN("sta")\n',
                          "reportArgumentType", '"interface_id"'),
    "wlan_keyword.py": ('import network\nnetwork.WLAN(network.STA_IF).connect("lab", "pw", timeout=5)\n',
                        "reportCallIssue", 'No parameter named "timeout"'),
    "unix_only_module.py": ("import ffi\n", "reportMissingImports", 'Import "ffi"'),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_the_check_fails_on_what_the_esp32_lacks(tmp_path, name):
    code, rule, words = BAD[name]
    bad = tmp_path / name
    bad.write_text(code)
    r = stubcheck("--board", "ESP32_GENERIC", str(bad))
    assert r.returncode == 1, r.stdout + r.stderr
    line = next((ln for ln in r.stdout.splitlines() if name in ln), "")
    assert ":2:" in line or ":1:" in line, r.stdout
    assert rule in line and words in line, r.stdout
    assert "stubcheck: ESP32_GENERIC:" in r.stdout and "1 problem(s)" in r.stdout, r.stdout


def test_the_check_knows_each_board(tmp_path):
    """esp32.raw_temperature() exists on the ESP32 only (its S3 and C3 have mcu_temperature):
    the same file passes for one board and fails for the other two."""
    f = tmp_path / "temperature.py"
    f.write_text("import esp32\nt = esp32.raw_temperature()\n")
    r = stubcheck(str(f))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "stubcheck: ESP32_GENERIC: " in r.stdout and "0 problem(s)" in r.stdout.split(
        "stubcheck: ESP32_GENERIC: ")[1].splitlines()[0], r.stdout
    for b in ("ESP32_GENERIC_C3", "ESP32_GENERIC_S3"):
        assert f"{b}: " in r.stdout and '"raw_temperature" is not a known attribute' in r.stdout, r.stdout
        assert f"stubcheck: {b}: " in r.stdout and "1 problem(s)" in r.stdout.split(
            f"stubcheck: {b}: ")[1].splitlines()[0], r.stdout


def test_the_check_refuses_what_it_cannot_do(tmp_path):
    r = stubcheck("--board", "UNIX")
    assert r.returncode == 2 and "unknown board UNIX" in r.stderr, r.stderr
    r = stubcheck(str(tmp_path / "nothing.py"))
    assert r.returncode == 2 and "no such file" in r.stderr, r.stderr


def test_editor_configuration_checks_the_same(tmp_path):
    """`--editor BOARD --out DIR` writes the pyrightconfig.json an editor reads: pyright run
    with it finds the device code clean, and finds a bad line added to a copy of a module."""
    r = stubcheck("--editor", "ESP32_GENERIC_S3", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = tmp_path / "pyrightconfig.json"
    import json

    c = json.loads(cfg.read_text())
    assert c["typeshedPath"].endswith("build/stubs/ESP32_GENERIC_S3"), c
    env = dict(os.environ, PYRIGHT_PYTHON_IGNORE_WARNINGS="1")
    pyright = os.path.join(ROOT, ".venv", "bin", "pyright")
    ok = subprocess.run([pyright, "-p", str(cfg)], capture_output=True, text=True, env=env,
                        timeout=300)
    assert ok.returncode == 0 and "0 errors" in ok.stdout, ok.stdout
    c["include"].append("bad.py")  # relative to the file, as pyright wants
    cfg.write_text(json.dumps(c))
    (tmp_path / "bad.py").write_text("import esp32\nesp32.raw_temperature()\n")
    bad = subprocess.run([pyright, "-p", str(cfg)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert bad.returncode == 1 and "raw_temperature" in bad.stdout, bad.stdout
