"""tools/flash without a board: the exact commands --dry-run prints (erase, then write at the
chip's offset, then deploy), the image checks (made with esptool's own image writer), the
refusals, and esptool 5.6's own parser accepting the printed command lines: run against a serial
port that does not exist, esptool gets as far as opening the port, so the arguments passed."""
from __future__ import annotations

import json
import os
import shlex
import subprocess

import pytest
from esptool.bin_image import (ESP32C3FirmwareImage, ESP32FirmwareImage, ESP32S3FirmwareImage,
                               ImageSegment)

from conftest import ROOT

FLASH = os.path.join(ROOT, "tools", "flash")
PY = os.path.join(ROOT, ".venv", "bin", "python")
DEPLOY = os.path.join(ROOT, "tools", "deploy")
NO_PORT = "/dev/iotjobs-no-such-port"
OFFSETS = {"esp32": "0x1000", "esp32s3": "0x0", "esp32c3": "0x0"}
IMAGE_CLASSES = {"esp32": ESP32FirmwareImage, "esp32s3": ESP32S3FirmwareImage,
                 "esp32c3": ESP32C3FirmwareImage}
BOARDS = {"ESP32_GENERIC": "esp32", "ESP32_GENERIC_S3": "esp32s3", "ESP32_GENERIC_C3": "esp32c3"}


def flash(*args) -> subprocess.CompletedProcess:
    return subprocess.run([FLASH, *map(str, args)], capture_output=True, text=True, timeout=60)


def refused(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("flash: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A small but well-formed application image per chip, written by esptool's own code."""
    folder = tmp_path_factory.mktemp("images")
    out = {}
    for chip, cls in IMAGE_CLASSES.items():
        img = cls()
        img.entrypoint = 0x40080000
        seg = ImageSegment(0x3FFB0000, bytes(range(256)))
        seg.name = ".data"
        img.segments = [seg]
        path = folder / f"micropython-{chip}.bin"
        img.save(str(path))
        out[chip] = str(path)
    return out


GENERIC = {chip: board for board, chip in BOARDS.items()}


def expected(chip: str, port: str, fw: str, baud: int = 460800, deploy: bool = True,
             config: str | None = None) -> list[str]:
    esptool = [PY, "-m", "esptool", "--chip", chip, "--port", port, "--baud", str(baud)]
    lines = [shlex.join(esptool + ["erase-flash"]),
             shlex.join(esptool + ["write-flash", OFFSETS[chip], fw])]
    if deploy:
        lines.append(shlex.join([DEPLOY, "--port", port, "--board", GENERIC[chip]]
                                + (["--config", config] if config else [])))
    return lines


@pytest.mark.parametrize("chip", sorted(OFFSETS))
def test_dry_run_prints_erase_write_deploy(images, chip):
    r = flash("--chip", chip, "--port", "/dev/ttyUSB0", "--firmware", images[chip], "--dry-run")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.splitlines() == expected(chip, "/dev/ttyUSB0", images[chip])
    assert r.stdout.endswith("\n")


def test_dry_run_offsets_are_micropythons(images):
    """The address MicroPython's download pages give: 0x1000 (ESP32), 0 (S3, C3)."""
    for chip, offset in (("esp32", "0x1000"), ("esp32s3", "0x0"), ("esp32c3", "0x0")):
        r = flash("--chip", chip, "--port", "COM4", "--firmware", images[chip], "--dry-run")
        write = shlex.split(r.stdout.splitlines()[1])
        assert write[write.index("write-flash") + 1] == offset
        assert int(offset, 0) == {"esp32": 0x1000}.get(chip, 0)


def test_dry_run_baud_no_deploy_and_quoting(images):
    port = "/dev/serial/by-id/usb-Silicon Labs CP2102 'uart'"
    r = flash("--chip", "esp32c3", "--port", port, "--firmware", images["esp32c3"],
              "--baud", "115200", "--no-deploy", "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines == expected("esp32c3", port, images["esp32c3"], 115200, deploy=False)
    # each line is one shell command: the shell gives back exactly the argv
    assert shlex.split(lines[1]) == [PY, "-m", "esptool", "--chip", "esp32c3", "--port", port,
                                     "--baud", "115200", "write-flash", "0x0", images["esp32c3"]]


@pytest.mark.parametrize("board, chip", sorted(BOARDS.items()))
def test_board_names_the_chip(images, board, chip):
    r = flash("--board", board, "--port", "/dev/ttyACM0", "--firmware", images[chip], "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == expected(chip, "/dev/ttyACM0", images[chip])
    same = flash("--board", board, "--chip", chip, "--port", "/dev/ttyACM0",
                 "--firmware", images[chip], "--dry-run")
    assert same.stdout == r.stdout


def test_board_table_matches_the_boards_folder():
    """boards/<BOARD>/board.json, where it exists, names the same chip and offset."""
    checked = 0
    for board, chip in BOARDS.items():
        path = os.path.join(ROOT, "boards", board, "board.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            info = json.load(f)
        if "chip" in info:
            assert info["chip"] == chip, board
        if info.get("flash_offset") is not None:
            assert int(info["flash_offset"], 0) == int(OFFSETS[chip], 0), board
        checked += 1
    if not checked:
        pytest.skip("no boards/<BOARD>/board.json yet")


def test_refusals(tmp_path, images):
    text = tmp_path / "firmware.bin"
    text.write_text("<html>404 Not Found</html>\n")  # what a bad download link saves
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    base = ["--port", "/dev/ttyUSB0", "--dry-run"]
    refused(flash("--chip", "esp32", "--firmware", text, *base), "not an ESP32 image", "0x3C", "--force")
    refused(flash("--chip", "esp32", "--firmware", empty, *base), "empty")
    refused(flash("--chip", "esp32", "--firmware", tmp_path / "nope.bin", *base),
            "nope.bin", "No such file")
    refused(flash("--chip", "esp32", "--firmware", tmp_path, *base), "directory")
    refused(flash("--chip", "esp8266", "--firmware", images["esp32"], *base), "esp8266", "esp32s3")
    refused(flash("--board", "ESP32_GENERIC_S2", "--firmware", images["esp32"], *base), "--board")
    refused(flash("--firmware", images["esp32"], *base), "--chip", "--board")
    refused(flash("--board", "ESP32_GENERIC", "--chip", "esp32s3", "--firmware", images["esp32"],
                  *base), "ESP32_GENERIC")
    refused(flash("--chip", "esp32", "--firmware", images["esp32"], "--baud", "fast", *base), "--baud")
    refused(flash("--chip", "esp32", "--firmware", images["esp32"], "--dry-run"), "--port")
    refused(flash("--chip", "esp32", "--firmware", images["esp32"], "--config", tmp_path, *base),
            "config.json")
    (tmp_path / "config.json").write_text("{}")
    refused(flash("--chip", "esp32", "--firmware", images["esp32"], "--config", tmp_path, *base,
                  "--no-deploy"), "--no-deploy")
    # another chip's image: flashing it would leave the board unbootable
    refused(flash("--chip", "esp32", "--firmware", images["esp32s3"], *base), "ESP32-S3", "not ESP32")
    refused(flash("--board", "ESP32_GENERIC_C3", "--firmware", images["esp32"], *base),
            "built for ESP32,", "ESP32-C3")


def test_force_skips_the_image_checks(tmp_path, images):
    text = tmp_path / "firmware.bin"
    text.write_text("not an image")
    r = flash("--chip", "esp32", "--port", "/dev/ttyUSB0", "--firmware", text, "--dry-run", "--force")
    assert r.returncode == 0 and r.stdout.splitlines() == expected("esp32", "/dev/ttyUSB0", str(text))
    r = flash("--chip", "esp32", "--port", "/dev/ttyUSB0", "--firmware", images["esp32s3"],
              "--dry-run", "--force")
    assert r.returncode == 0
    # a missing file is refused even with --force
    refused(flash("--chip", "esp32", "--port", "p", "--firmware", tmp_path / "x.bin", "--force"),
            "No such file")


@pytest.mark.parametrize("chip", sorted(OFFSETS))
def test_esptool_accepts_the_printed_commands(images, chip):
    """Each printed esptool line, run as printed, fails only at opening the (absent) port."""
    r = flash("--chip", chip, "--port", NO_PORT, "--firmware", images[chip], "--dry-run")
    for line in r.stdout.splitlines()[:2]:
        run = subprocess.run(shlex.split(line), capture_output=True, text=True, timeout=60)
        out = run.stdout + run.stderr
        assert run.returncode != 0
        assert f"Could not open {NO_PORT}" in out, out
        assert "Usage:" not in out and "No such" not in out.replace("No such file or directory", "")
        assert "Deprecated" not in out and "WARNING" not in out, out


def test_esptool_check_tells_bad_arguments_apart(images):
    """The controls for the test above: a wrong argument is reported as one, before the port is
    opened; the esptool 4 spelling still runs in 5.6 but says it is deprecated."""
    run = subprocess.run([PY, "-m", "esptool", "--chip", "esp32", "--port", NO_PORT, "write-flash",
                          "--bogus", "0x0", images["esp32"]], capture_output=True, text=True, timeout=60)
    out = run.stdout + run.stderr
    assert run.returncode != 0 and "Usage:" in out and "Could not open" not in out, out
    run = subprocess.run([PY, "-m", "esptool", "--chip", "esp32", "--port", NO_PORT, "erase_flash"],
                         capture_output=True, text=True, timeout=60)
    out = run.stdout + run.stderr
    assert "Deprecated" in out and f"Could not open {NO_PORT}" in out, out


def test_a_real_run_stops_at_the_first_failing_step(images):
    """Without --dry-run the steps really run: esptool cannot open the port, so the erase
    fails, its exit status is returned, and the write is never attempted."""
    r = flash("--chip", "esp32", "--port", NO_PORT, "--firmware", images["esp32"], "--no-deploy")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"Could not open {NO_PORT}" in r.stdout + r.stderr
    started = [ln for ln in r.stderr.splitlines() if ln.startswith("flash: ") and "esptool" in ln]
    assert len(started) == 1 and started[0].endswith("erase-flash"), r.stderr
    assert "nothing after it was run" in r.stderr


def test_deploy_line_is_accepted_by_tools_deploy(tmp_path, images):
    """The printed deploy step, with a tools/provision folder as --config, run with --dry-run:
    tools/deploy takes the arguments, builds the board and would copy the config and certs."""
    cfg = tmp_path / "dev1"
    subprocess.run([os.path.join(ROOT, "tools", "provision"), "dev1", "--local", tmp_path / "ca",
                    "--endpoint", "192.168.1.10", "--out", cfg], check=True, capture_output=True)
    r = flash("--board", "ESP32_GENERIC_C3", "--port", NO_PORT, "--firmware", images["esp32c3"],
              "--config", cfg, "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines == expected("esp32c3", NO_PORT, images["esp32c3"], config=str(cfg))
    run = subprocess.run(shlex.split(lines[2]) + ["--dry-run"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    for rel in ("config.json", "certs/ca.der", "certs/cert.der", "certs/key.der"):
        assert f"-> :{rel}" in run.stdout, run.stdout
