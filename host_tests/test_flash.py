"""tools/flash, first without a board: the exact commands --dry-run prints (erase, then write at
the chip's offset, then deploy), the image checks, the refusals, and esptool 5.6's own parser
accepting the printed command lines: run against a serial port that does not exist, esptool
gets as far as opening the port, so the arguments passed.

Then through esptool's protocol, against an emulated Espressif ROM bootloader
(esp32-mock-bootloader, pinned in requirements.txt) on a pseudo-terminal: for each board the
firmware lands at the chip's offset and esptool reads the same bytes back; an application image
lands in the OTA slot the board's partition table names; and what must be refused is refused
before anything is erased (the emulated flash is read back unchanged).

The images are made in memory by host_tests/espimage.py with esptool's own image writer (no
binary file is committed)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import time

import pytest
from esptool.cmds import attach_flash, detect_chip, read_flash, run_stub, verify_flash, write_flash
from esptool.util import FatalError

import espimage
from conftest import ROOT

FLASH = os.path.join(ROOT, "tools", "flash")
PY = os.path.join(ROOT, ".venv", "bin", "python")
DEPLOY = os.path.join(ROOT, "tools", "deploy")
NO_PORT = "/dev/iotjobs-no-such-port"
OFFSETS = {"esp32": "0x1000", "esp32s3": "0x0", "esp32c3": "0x0"}
BOARDS = {"ESP32_GENERIC": "esp32", "ESP32_GENERIC_S3": "esp32s3", "ESP32_GENERIC_C3": "esp32c3"}
LABELS = {"esp32": "ESP32", "esp32s3": "ESP32-S3", "esp32c3": "ESP32-C3"}


def board_rows(board: str):
    with open(os.path.join(ROOT, "boards", board, "board.json")) as f:
        name = json.load(f)["partitions"]
    return espimage.read_csv(os.path.join(ROOT, "boards", "partitions", name))


GENERIC = {chip: board for board, chip in BOARDS.items()}


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
    """A small but whole firmware per chip (bootloader, the generic board's partition table,
    an 8 KiB application), laid out as MicroPython's makeimg.py does."""
    folder = tmp_path_factory.mktemp("images")
    out = {}
    for chip in OFFSETS:
        path = folder / f"micropython-{chip}.bin"
        path.write_bytes(espimage.firmware(chip, board_rows(GENERIC[chip]),
                                           espimage.app_image(chip, seed="images")))
        out[chip] = str(path)
    return out


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


# --- --app-bin without a board ----------------------------------------------------------------

@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    """An application image per chip (what ESP-IDF builds as the app, micropython.bin)."""
    folder = tmp_path_factory.mktemp("apps")
    out = {}
    for chip in OFFSETS:
        path = folder / f"app-{chip}.bin"
        path.write_bytes(espimage.app_image(chip, seed="apps"))
        out[chip] = str(path)
    return out


SLOTS = {("ESP32_GENERIC", "ota_0"): 0x10000, ("ESP32_GENERIC", "ota_1"): 0x190000,
         ("ESP32_GENERIC_C3", "ota_1"): 0x190000, ("ESP32_GENERIC_S3", "ota_1"): 0x310000}


@pytest.mark.parametrize("board, slot", sorted(SLOTS))
def test_dry_run_app_bin_reads_the_table_then_writes_the_slot(apps, board, slot):
    chip = BOARDS[board]
    r = flash("--board", board, "--port", "/dev/ttyUSB0", "--app-bin", apps[chip], "--slot", slot,
              "--dry-run")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    esptool = [PY, "-m", "esptool", "--chip", chip, "--port", "/dev/ttyUSB0", "--baud", "460800"]
    assert r.stdout.splitlines() == [
        shlex.join(esptool + ["read-flash", "0x8000", "0xc00", "partitions.bin"]),
        shlex.join(esptool + ["write-flash", hex(SLOTS[board, slot]), apps[chip]])]
    # no erase-flash and no deploy: the rest of the flash and the filesystem stay as they are
    assert "erase" not in r.stdout and DEPLOY not in r.stdout


def test_app_bin_refusals(tmp_path, images, apps):
    base = ["--port", "/dev/ttyUSB0", "--dry-run"]
    esp32 = ["--board", "ESP32_GENERIC", *base]
    refused(flash(*esp32, "--app-bin", apps["esp32"]), "--slot")
    refused(flash(*esp32, "--firmware", images["esp32"], "--slot", "ota_1"), "--slot", "--app-bin")
    refused(flash(*esp32, "--app-bin", apps["esp32"], "--slot", "ota_2"),
            "'ota_2' is not a partition of ESP32_GENERIC", "boards/partitions/ota-4MiB.csv",
            "ota_0 at 0x10000", "ota_1 at 0x190000")
    refused(flash(*esp32, "--app-bin", apps["esp32"], "--slot", "nvs"), "data partition", "not an app")
    refused(flash(*esp32, "--app-bin", apps["esp32"], "--slot", "ota_1", "--config", tmp_path),
            "filesystem")
    r = flash(*esp32, "--app-bin", apps["esp32"], "--firmware", images["esp32"])
    assert r.returncode == 2 and "not allowed with" in r.stderr, r.stderr
    # the image: this chip's, an application (not a whole firmware), whole, and fits the slot
    refused(flash(*esp32, "--app-bin", apps["esp32s3"], "--slot", "ota_1"), "built for ESP32-S3",
            "not ESP32")
    refused(flash(*esp32, "--app-bin", images["esp32"], "--slot", "ota_1"),
            "not an application image", "--firmware")
    cut = tmp_path / "cut.bin"
    cut.write_bytes(open(apps["esp32"], "rb").read()[:5000])
    refused(flash(*esp32, "--app-bin", cut, "--slot", "ota_1"), "is truncated", "segment 1 of 2")
    big = tmp_path / "big.bin"
    big.write_bytes(espimage.app_image("esp32", size=0x180000 + 64))
    refused(flash(*esp32, "--app-bin", big, "--slot", "ota_1"),
            "more than slot ota_1 holds (0x180000")
    # --force skips the image checks, never the slot's size
    refused(flash(*esp32, "--app-bin", big, "--slot", "ota_1", "--force"), "more than slot ota_1")
    assert flash(*esp32, "--app-bin", images["esp32"], "--slot", "ota_1", "--force").returncode == 0
    # the S3's table (8 MiB) has 3 MiB slots: the same image fits there
    assert flash("--board", "ESP32_GENERIC_S3", *base, "--app-bin", big, "--slot", "ota_1",
                 "--force").returncode == 0


def _patched(data: bytes, at: int, value: int) -> bytes:
    return data[:at] + bytes([value]) + data[at + 1:]


def test_firmware_must_be_whole(tmp_path, images, apps):
    """A download cut short anywhere, or damaged, is refused; so is an application image given
    as --firmware (written at 0x1000 it would replace the bootloader)."""
    fw = open(images["esp32"], "rb").read()
    base = ["--board", "ESP32_GENERIC", "--port", "/dev/ttyUSB0", "--dry-run"]

    def check(name: str, data: bytes, *words: str) -> None:
        path = tmp_path / name
        path.write_bytes(data)
        refused(flash(*base, "--firmware", path), *words)

    boot_len = len(espimage.bootloader_image("esp32"))
    check("boot-cut.bin", fw[:boot_len - 20], "is truncated", "its bootloader image",
          "the SHA-256 appended to it is missing")
    check("boot-cut2.bin", fw[:boot_len - 40], "is truncated", "its checksum byte is missing")
    check("boot-cut3.bin", fw[:100], "is truncated", "its bootloader image", "segment 1 of 1")
    check("no-table.bin", fw[:0x6000], "is truncated", "before its partition table")
    check("no-app.bin", fw[:0xF000], "is truncated", "its application image", "ota_0", "is missing")
    check("app-cut.bin", fw[:-100], "is truncated", "its application image (0xf000 in the file, "
          "0x10000 = ota_0 on the flash)")
    check("app-flip.bin", _patched(fw, 0xF000 + 600, fw[0xF000 + 600] ^ 1), "is damaged",
          "its application image", "checksum")
    check("boot-flip.bin", _patched(fw, 2000, fw[2000] ^ 0x80), "is damaged", "its bootloader image")
    check("table-flip.bin", _patched(fw, 0x7000 + 40, fw[0x7000 + 40] ^ 1), "is damaged",
          "partition table", "MD5")
    # an ESP32 bootloader with an ESP32-C3 application behind it
    mixed = fw[:0xF000] + open(apps["esp32c3"], "rb").read()
    check("mixed.bin", mixed, "its application image", "built for ESP32-C3, not ESP32")
    check("app.bin", open(apps["esp32"], "rb").read(), "is an application image",
          "--app-bin", "--slot ota_0")
    # the same file, whole, is accepted; --force writes a damaged one anyway
    assert flash(*base, "--firmware", images["esp32"]).returncode == 0
    assert flash(*base, "--firmware", tmp_path / "app-cut.bin", "--force").returncode == 0


def test_the_image_helper_makes_what_esptool_accepts(tmp_path, images, apps):
    """The control for the checks above: esptool's image-info finds the test images valid
    (checksum, SHA-256, chip id, the app and bootloader descriptions where ESP-IDF puts them)."""
    for chip, label in (("esp32", "ESP32"), ("esp32s3", "ESP32-S3"), ("esp32c3", "ESP32-C3")):
        boot = tmp_path / f"boot-{chip}.bin"
        boot.write_bytes(open(images[chip], "rb").read()[:len(espimage.bootloader_image(chip))])
        for path, kind in ((apps[chip], "Application Information"),
                           (boot, "Bootloader Information")):
            r = subprocess.run([PY, "-m", "esptool", "--chip", chip, "image-info", str(path)],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr
            assert f"Chip ID: {espimage.CHIP_IDS[chip]} ({label})" in r.stdout, r.stdout
            assert "Checksum:" in r.stdout and "(valid)" in r.stdout.split("Checksum:")[1].split("\n")[0]
            assert re.search(r"Validation hash: [0-9a-f]{64} \(valid\)", r.stdout), r.stdout
            assert kind in r.stdout, r.stdout


# --- through esptool's protocol: an emulated ROM bootloader ------------------------------------

# The emulator runs in its own process on a pseudo-terminal (a device path, like /dev/ttyUSB0;
# esptool reads a PTY in bulk, where over socket:// pyserial makes it read byte by byte, 20 KiB/s).
# Two constants of esp32-mock-bootloader 0.3.0's server are raised, nothing else is changed:
# - _CLIENT_RECV_TIMEOUT (0.05 s) is also how long it waits for each of esptool's acknowledgements
#   while it streams read-flash data to the flasher stub; one scheduling hiccup of 50 ms on a busy
#   machine ends the stream ("Serial data stream stopped"). A real stub waits for the ack.
# - _FLASH_END_IDLE_SEC (3 s): that long after a write ends, it starts a new session, forgetting
#   that the stub runs, even if a later esptool run is in the middle of talking to it (on a PTY
#   every run is one session: nothing resets the emulated chip between runs).
_MOCK = """
import sys
from esp32_mock_bootloader import server
assert isinstance(server._CLIENT_RECV_TIMEOUT, float), "esp32-mock-bootloader changed"
assert isinstance(server._FLASH_END_IDLE_SEC, float), "esp32-mock-bootloader changed"
server._CLIENT_RECV_TIMEOUT = 1.0
server._FLASH_END_IDLE_SEC = float("inf")
server.run_pty_server(None, None, sys.argv[1])
"""


class Mock:
    """One emulated chip: its own process, its own pseudo-terminal, its own 4 MiB of flash (0xFF
    at the start), until stop()."""

    def __init__(self, chip: str, folder) -> None:
        self.chip = chip
        self.folder = folder
        self.log = folder / f"mock-{chip}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ESP32_MOCK_")}
        env["ESP32_MOCK_BOOTLOADER_STATE_DIR"] = str(folder / "mock-state")  # its registry
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([PY, "-c", _MOCK, chip], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            m = re.search(r"on PTY (/dev/\S+)\n", self.log.read_text())
            if m:
                self.port = m.group(1)
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the emulator did not start: {self.log.read_text()}")
            time.sleep(0.02)  # polling the log, under the deadline above

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    @contextlib.contextmanager
    def _esptool(self):
        """A session of esptool's Python API (esptool.cmds) with the emulated chip: connect,
        check it is the chip it emulates, run the flasher stub, attach the flash."""
        with detect_chip(self.port, connect_mode="no-reset") as esp:
            assert esp.CHIP_NAME == LABELS[self.chip], esp.CHIP_NAME
            esp = run_stub(esp)
            attach_flash(esp)
            yield esp

    def write(self, *pairs: tuple[int, bytes]) -> None:
        """esptool write-flash ADDR DATA ... (not through tools/flash); write-flash checks the
        chip's MD5 of each region afterwards."""
        with self._esptool() as esp:
            write_flash(esp, list(pairs))

    def read(self, offset: int, length: int) -> bytes:
        """esptool read-flash: what the emulated flash holds."""
        with self._esptool() as esp:
            data = read_flash(esp, offset, length, no_progress=True)
        assert len(data) == length
        return data

    def verify(self, *pairs: tuple[int, bytes]) -> bool:
        """esptool verify-flash ADDR DATA ...: the chip's MD5 of each region against the data's."""
        with self._esptool() as esp:
            try:
                verify_flash(esp, list(pairs))
            except FatalError as e:
                assert "Verification failed" in str(e), e
                return False
        return True


@pytest.fixture
def mocks(tmp_path):
    """mocks(chip) starts an emulated chip; all of them are stopped (by PID) when the test ends."""
    started: list[Mock] = []

    def start(chip: str) -> Mock:
        m = Mock(chip, tmp_path)
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop()
    for m in started:
        assert m.proc.returncode is not None


def esptool_steps(stderr: str) -> list[str]:
    """The esptool subcommands tools/flash started, in order."""
    return [shlex.split(ln[len("flash: "):])[9] for ln in stderr.splitlines()
            if ln.startswith("flash: ") and " esptool " in ln]


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


SENTINEL_AT = 0x3F0000  # far from every image: an erase-flash would show here


@pytest.mark.parametrize("board", sorted(BOARDS))
def test_flash_writes_the_firmware_at_the_chips_offset(tmp_path, mocks, board):
    chip = BOARDS[board]
    offset = int(OFFSETS[chip], 0)
    fw = espimage.firmware(chip, board_rows(board), espimage.app_image(chip, seed=board))
    path = tmp_path / "firmware.bin"
    path.write_bytes(fw)
    mock = mocks(chip)
    old = espimage.app_image(chip, size=4096, seed="old")
    mock.write((SENTINEL_AT, old))  # something on the flash before: erase-flash must remove it

    r = flash("--board", board, "--port", mock.port, "--firmware", path, "--no-deploy")
    assert r.returncode == 0, r.stdout + r.stderr
    assert esptool_steps(r.stderr) == ["erase-flash", "write-flash"], r.stderr
    assert f"Wrote {len(fw)} bytes" in r.stdout and f"at {offset:#010x}" in r.stdout, r.stdout
    assert "Hash of data verified." in r.stdout  # write-flash's own check, the chip's MD5

    back = mock.read(0, offset + len(fw))
    assert back[offset:] == fw and md5(back[offset:]) == md5(fw)
    assert back[:offset] == b"\xff" * offset  # ESP32: nothing below 0x1000
    # the pieces are where the ROM and the bootloader look for them
    assert back[offset] == 0xE9 and back[offset + espimage.CHIP_ID_AT] == espimage.CHIP_IDS[chip]
    assert back[0x8000:0x8002] == b"\xaa\x50"
    assert back[0x10000:0x10000 + 24 + 8 + 4][-4:] == (0xABCD5432).to_bytes(4, "little")

    # esptool's verify-flash: the chip's MD5 of what it holds; and the whole chip was erased
    assert mock.verify((offset, fw), (SENTINEL_AT, b"\xff" * len(old)))
    # the controls: verify-flash can fail, on a firmware one byte different, or on the old data
    assert not mock.verify((offset, _patched(fw, len(fw) - 50, fw[-50] ^ 1)))
    assert not mock.verify((SENTINEL_AT, old))


@pytest.mark.parametrize("board", sorted(BOARDS))
def test_app_bin_rewrites_a_broken_slot_and_nothing_else(tmp_path, mocks, board):
    """A board whose ota_1 holds a broken image (cut short): tools/flash --app-bin reads the
    board's partition table, then writes the new image at ota_1's offset; the bootloader, the
    table and ota_0 stay as they were (no erase-flash)."""
    chip = BOARDS[board]
    offset = int(OFFSETS[chip], 0)
    slot = SLOTS.get((board, "ota_1")) or next(o for n, _, _, o, _ in board_rows(board) if n == "ota_1")
    fw = espimage.firmware(chip, board_rows(board), espimage.app_image(chip, seed="v1"))
    broken = espimage.app_image(chip, size=16 * 1024, seed="v1.1")[:10000]
    mock = mocks(chip)
    mock.write((offset, fw), (slot, broken))
    app = tmp_path / "micropython.bin"
    new = espimage.app_image(chip, size=12 * 1024, seed="v2")
    app.write_bytes(new)

    r = flash("--board", board, "--port", mock.port, "--app-bin", app, "--slot", "ota_1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert esptool_steps(r.stderr) == ["read-flash", "write-flash"], r.stderr
    assert f"the board's partition table has ota_1 at {slot:#x}" in r.stderr
    assert f"Wrote {len(new)} bytes" in r.stdout and f"at {slot:#010x}" in r.stdout, r.stdout
    assert "Hash of data verified." in r.stdout

    back = mock.read(slot, len(broken) + 4096)
    assert back[:len(new)] == new and md5(back[:len(new)]) == md5(new)
    # the sectors write-flash erased: what was left of the broken image beyond the new one is gone
    assert back[len(new):] == b"\xff" * (len(back) - len(new))
    assert mock.verify((offset, fw), (slot, new))


def test_refused_before_anything_is_erased(tmp_path, mocks, images, apps):
    """A board running its firmware; each bad file is refused before esptool is started at all,
    and the flash is read back (verify-flash) exactly as it was."""
    mock = mocks("esp32s3")
    fw = open(images["esp32s3"], "rb").read()
    old = espimage.app_image("esp32s3", seed="ota_1 before")
    mock.write((0, fw), (0x310000, old))

    def attempt(name: str, data: bytes | None, *args) -> subprocess.CompletedProcess:
        if data is not None:
            (tmp_path / name).write_bytes(data)
        return flash("--board", "ESP32_GENERIC_S3", "--port", mock.port,
                     *[str(tmp_path / name) if a == "FILE" else a for a in args])

    # another chip's image
    refused(flash("--board", "ESP32_GENERIC_S3", "--port", mock.port, "--firmware", images["esp32"]),
            "is built for ESP32, not ESP32-S3")
    # a download cut short, in the application and before the partition table
    refused(attempt("cut.bin", fw[:-1000], "--firmware", "FILE"), "is truncated",
            "its application image", "segment")
    refused(attempt("cut2.bin", fw[:0x4000], "--firmware", "FILE"), "is truncated",
            "before its partition table")
    # no ESP magic byte
    refused(attempt("nomagic.bin", b"\x00" + fw[1:], "--firmware", "FILE"),
            "is not an ESP32 image (it starts with 0x00, not 0xE9)")
    refused(attempt("zip.bin", b"PK\x03\x04" + fw[4:], "--firmware", "FILE"), "starts with 0x50")
    # the same for an application image bound for a slot, and slots that are not there or too small
    s3_app = open(apps["esp32s3"], "rb").read()
    refused(attempt("esp32-app.bin", open(apps["esp32"], "rb").read(), "--app-bin", "FILE",
                    "--slot", "ota_1"), "built for ESP32, not ESP32-S3")
    refused(attempt("app-cut.bin", s3_app[:-20], "--app-bin", "FILE", "--slot", "ota_1"),
            "is truncated", "SHA-256")
    refused(attempt("app-nomagic.bin", b"\xff" + s3_app[1:], "--app-bin", "FILE", "--slot", "ota_1"),
            "not an ESP32 image (it starts with 0xFF")
    refused(attempt("app.bin", s3_app, "--app-bin", "FILE", "--slot", "ota_2"), "'ota_2' is not a "
            "partition of ESP32_GENERIC_S3 (boards/partitions/ota-8MiB.csv)")
    refused(attempt("big.bin", espimage.app_image("esp32s3", size=0x300000 + 64), "--app-bin", "FILE",
                    "--slot", "ota_1"), "more than slot ota_1 holds (0x300000")

    # refused() saw no "flash: ... esptool ..." line: no step was started; and the flash is as it was
    assert mock.verify((0, fw), (0x310000, old))


def test_another_chip_on_the_port_is_refused_before_erasing(tmp_path, mocks, images, apps):
    """The board says ESP32-S3 (or C3), the chip on the port is an ESP32: esptool finds out as it
    connects, before erase-flash or read-flash does anything; tools/flash stops there."""
    mock = mocks("esp32")
    fw = open(images["esp32"], "rb").read()
    mock.write((0x1000, fw))

    r = flash("--board", "ESP32_GENERIC_S3", "--port", mock.port, "--firmware", images["esp32s3"],
              "--no-deploy")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "This chip is ESP32, not ESP32-S3. Wrong chip argument?" in r.stdout + r.stderr
    assert esptool_steps(r.stderr) == ["erase-flash"], r.stderr
    assert "that step failed (exit 2); nothing after it was run" in r.stderr
    assert "Erasing flash" not in r.stdout

    r = flash("--board", "ESP32_GENERIC_C3", "--port", mock.port, "--app-bin", apps["esp32c3"],
              "--slot", "ota_1")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "This chip is ESP32, not ESP32-C3. Wrong chip argument?" in r.stdout + r.stderr
    assert esptool_steps(r.stderr) == ["read-flash"], r.stderr

    assert mock.verify((0x1000, fw))


def test_app_bin_needs_the_slot_in_the_boards_own_table(tmp_path, mocks, apps):
    """The slot is written only where the table read from the board has it, with the offset
    and size of the repository's table: not on a blank board, not over a stock image's factory
    app, not into a slot laid out otherwise."""
    mock = mocks("esp32")
    base = ["--board", "ESP32_GENERIC", "--port", mock.port, "--app-bin", apps["esp32"], "--slot",
            "ota_1"]

    def refused_after_reading(r, *words):
        assert r.returncode == 2, r.stdout + r.stderr
        assert esptool_steps(r.stderr) == ["read-flash"], r.stderr
        last = r.stderr.splitlines()[-1]
        for w in words:
            assert w in last, last
        assert last.endswith("nothing was written"), last

    refused_after_reading(flash(*base), "no usable partition table at 0x8000",
                          "it is erased (0xFF)", "--firmware")

    stock = [("nvs", "data", "nvs", 0x9000, 0x6000), ("phy_init", "data", "phy", 0xF000, 0x1000),
             ("factory", "app", "factory", 0x10000, 0x1F0000), ("vfs", "data", "fat", 0x200000, 0x200000)]
    fw = espimage.firmware("esp32", stock, espimage.app_image("esp32", seed="stock"))
    mock.write((0x1000, fw))
    refused_after_reading(flash(*base), "has no ota_1",
                          "its app partitions: factory at 0x10000 (0x1f0000 bytes)")
    other = [("nvs", "data", "nvs", 0x9000, 0x4000), ("otadata", "data", "ota", 0xD000, 0x2000),
             ("ota_0", "app", "ota_0", 0x10000, 0x100000), ("ota_1", "app", "ota_1", 0x110000, 0x100000)]
    fw2 = espimage.firmware("esp32", other, espimage.app_image("esp32", seed="other"))
    mock.write((0x1000, fw2[:0x7000 + 0xC00]))  # only the bootloader and the table change
    refused_after_reading(flash(*base), "has ota_1 as app at 0x110000 (0x100000 bytes)",
                          "boards/partitions/ota-4MiB.csv at 0x190000 (0x180000 bytes)")
    assert mock.verify((0x1000, fw2[:0x7C00]), (0x8C00, fw[0x7C00:]))
