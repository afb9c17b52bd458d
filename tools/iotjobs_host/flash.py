"""`tools/flash`: put a MicroPython image on an ESP32 board, then the project's code on it.

Three steps, each a command that could be typed by hand (`--dry-run` prints them, shell-quoted,
one per line, and runs nothing):
  1. python -m esptool --chip CHIP --port PORT --baud BAUD erase-flash
  2. python -m esptool --chip CHIP --port PORT --baud BAUD write-flash OFFSET FIRMWARE.bin
  3. tools/deploy --port PORT --board BOARD [--config DIR]     (left out with --no-deploy)
esptool is the venv's (pinned in requirements.txt; esptool 5 spells its commands with dashes).
BOARD is --board, or the generic board of --chip; `--config DIR` (a `tools/provision` folder)
is passed on, so one command turns a blank board into a provisioned device.

Where the image goes: MicroPython's ESP32 downloads are one file that starts with the
second-stage bootloader, so it is written where the ROM looks for that: 0x1000 on the ESP32,
0x0 on the ESP32-S3 and ESP32-C3. Sources: micropython/micropython
ports/esp32/boards/ESP32_GENERIC/board.json ("flash_offset": "0x1000"),
ESP32_GENERIC_S3/board.json and ESP32_GENERIC_C3/board.json ("flash_offset": "0"), rendered
on micropython.org/download/<BOARD>/ by ports/esp32/boards/deploy.md ("esptool.py --baud 460800
write_flash {flash_offset} ..."), also deploy_s3.md / deploy_c3.md ("starting at address 0").

Before anything touches the board the file is checked: an ESP image starts with the byte 0xE9
and carries, at offset 12, the chip id it was built for (esptool's IMAGE_CHIP_ID: ESP32 0,
ESP32-S3 9, ESP32-C3 5); writing another chip's image bricks the board until it is flashed
again, so a mismatch is refused (`--force` skips these checks)."""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from typing import NoReturn, Optional

from . import TOOLS, VENV_BIN

PYTHON = os.path.join(VENV_BIN, "python")
DEPLOY = os.path.join(TOOLS, "deploy")
DEFAULT_BAUD = 460800
IMAGE_MAGIC = 0xE9
_CHIP_ID_AT = 12  # esp_image_header_t: magic, segments, mode, size/freq, entry (4), wp, drv (3), chip_id


class Chip:
    def __init__(self, name: str, offset: int, image_chip_id: int, label: str) -> None:
        self.name = name
        self.offset = offset
        self.image_chip_id = image_chip_id
        self.label = label


CHIPS = {
    "esp32": Chip("esp32", 0x1000, 0, "ESP32"),
    "esp32s3": Chip("esp32s3", 0x0, 9, "ESP32-S3"),
    "esp32c3": Chip("esp32c3", 0x0, 5, "ESP32-C3"),
}
BOARDS = {"ESP32_GENERIC": "esp32", "ESP32_GENERIC_S3": "esp32s3", "ESP32_GENERIC_C3": "esp32c3"}
GENERIC_BOARD = {chip: board for board, chip in BOARDS.items()}
_CHIP_LABELS = {c.image_chip_id: c.label for c in CHIPS.values()} | {2: "ESP32-S2", 12: "ESP32-C2",
                                                                       13: "ESP32-C6", 16: "ESP32-H2",
                                                                       18: "ESP32-P4"}


class FlashError(Exception):
    """Bad input: one line on stderr, exit status 2."""


def pick_chip(chip: Optional[str], board: Optional[str]) -> Chip:
    if board is not None:
        if board not in BOARDS:
            raise FlashError(f"--board {board!r} is not one of {', '.join(BOARDS)}")
        if chip is not None and chip != BOARDS[board]:
            raise FlashError(f"--board {board} is an {BOARDS[board]}, not an {chip}")
        chip = BOARDS[board]
    if chip is None:
        raise FlashError("say which chip: --chip esp32|esp32s3|esp32c3 or --board BOARD")
    if chip not in CHIPS:
        raise FlashError(f"--chip {chip!r} is not one of {', '.join(CHIPS)}")
    return CHIPS[chip]


def check_image(path: str, chip: Chip, force: bool) -> None:
    """The file exists and, unless --force, is an ESP application image built for `chip`."""
    try:
        with open(path, "rb") as f:
            head = f.read(_CHIP_ID_AT + 2)
    except IsADirectoryError:
        raise FlashError(f"--firmware {path} is a directory") from None
    except OSError as e:
        raise FlashError(f"--firmware {path}: {e.strerror or e}") from None
    if force:
        return
    if not head or head[0] != IMAGE_MAGIC:
        first = f"0x{head[0]:02X}" if head else "nothing (empty file)"
        raise FlashError(f"--firmware {path} is not an ESP32 image (it starts with {first}, not 0xE9); "
                         "--force writes it anyway")
    if len(head) < _CHIP_ID_AT + 2:
        raise FlashError(f"--firmware {path} is too short to be an ESP32 image; --force writes it anyway")
    chip_id = int.from_bytes(head[_CHIP_ID_AT:_CHIP_ID_AT + 2], "little")
    if chip_id != chip.image_chip_id:
        built = _CHIP_LABELS.get(chip_id, f"chip id {chip_id}")
        raise FlashError(f"--firmware {path} is built for {built}, not {chip.label}; "
                         "--force writes it anyway")


def check_config(folder: str) -> None:
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FlashError(f"--config {folder} holds no config.json (make one with tools/provision)")


def commands(chip: Chip, port: str, firmware: str, baud: int, deploy: bool,
             board: Optional[str] = None, config: Optional[str] = None) -> list[list[str]]:
    esptool = [PYTHON, "-m", "esptool", "--chip", chip.name, "--port", port, "--baud", str(baud)]
    cmds = [esptool + ["erase-flash"], esptool + ["write-flash", hex(chip.offset), firmware]]
    if deploy:
        cmds.append([DEPLOY, "--port", port, "--board", board or GENERIC_BOARD[chip.name]]
                    + (["--config", config] if config else []))
    return cmds


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="flash", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Offsets: " + ", ".join(f"{c.name} {hex(c.offset)}" for c in CHIPS.values())
                + ". Boards: " + ", ".join(f"{b} = {c}" for b, c in BOARDS.items()) + ".")
    p.add_argument("--chip", help="esp32, esp32s3 or esp32c3")
    p.add_argument("--board", help="instead of --chip: " + ", ".join(BOARDS))
    p.add_argument("--port", required=True, help="the board's serial port, e.g. /dev/ttyUSB0")
    p.add_argument("--firmware", required=True, metavar="FILE.bin", help="the MicroPython image")
    p.add_argument("--baud", type=int, default=DEFAULT_BAUD,
                   help=f"serial speed while flashing (default {DEFAULT_BAUD}; 115200 if it fails)")
    p.add_argument("--dry-run", action="store_true", help="print the commands; run nothing")
    p.add_argument("--no-deploy", action="store_true", help="stop after writing the image")
    p.add_argument("--config", metavar="DIR",
                   help="passed to tools/deploy: the device's config.json and certs/ (tools/provision --out)")
    p.add_argument("--force", action="store_true",
                   help="write the file even if it does not look like an image for this chip")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    a = parser().parse_args(argv)
    try:
        chip = pick_chip(a.chip, a.board)
        if not a.port or a.port.startswith("-"):
            raise FlashError(f"--port {a.port!r} is not a serial port")
        if not 300 <= a.baud <= 10_000_000:
            raise FlashError(f"--baud {a.baud} is not a serial speed (300..10000000)")
        check_image(a.firmware, chip, a.force)
        if a.config is not None:
            if a.no_deploy:
                raise FlashError("--config is deployed by the last step; it makes no sense with --no-deploy")
            check_config(a.config)
    except FlashError as e:
        print(f"flash: {e}", file=sys.stderr)
        return 2
    cmds = commands(chip, a.port, a.firmware, a.baud, not a.no_deploy, a.board, a.config)
    if a.dry_run:
        for cmd in cmds:
            print(shlex.join(cmd))
        return 0
    if not a.no_deploy and not os.access(DEPLOY, os.X_OK):
        print(f"flash: {DEPLOY} is missing; run again with --no-deploy, or deploy later",
              file=sys.stderr)
        return 2
    for cmd in cmds:
        print(f"flash: {shlex.join(cmd)}", file=sys.stderr, flush=True)
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            print(f"flash: that step failed (exit {rc}); nothing after it was run", file=sys.stderr)
            return rc
    return 0
