"""`tools/flash`: put a MicroPython image on an ESP32 board, then the project's code on it.

Three steps, each a command that could be typed by hand (`--dry-run` prints them, shell-quoted,
one per line, and runs nothing):
  1. python -m esptool --chip CHIP --port PORT --baud BAUD erase-flash
  2. python -m esptool --chip CHIP --port PORT --baud BAUD write-flash OFFSET FIRMWARE.bin
  3. tools/deploy --port PORT --board BOARD [--config DIR]     (left out with --no-deploy)
esptool is the venv's (pinned in requirements.txt; esptool 5 spells its commands with dashes).
BOARD is --board, or the generic board of --chip; `--config DIR` (a `tools/provision` folder)
is passed on, so one command turns a blank board into a provisioned device. esptool checks, as
it connects and before it erases, that the chip on PORT is the one named (esptool: "This chip
is ESP32, not ESP32-S3"); write-flash reads back the MD5 of what it wrote ("Hash of data
verified").

Where the image goes: MicroPython's ESP32 downloads are one file that starts with the
second-stage bootloader, so it is written where the ROM looks for that: 0x1000 on the ESP32,
0x0 on the ESP32-S3 and ESP32-C3. Sources: micropython/micropython
ports/esp32/boards/ESP32_GENERIC/board.json ("flash_offset": "0x1000"),
ESP32_GENERIC_S3/board.json and ESP32_GENERIC_C3/board.json ("flash_offset": "0"), rendered
on micropython.org/download/<BOARD>/ by ports/esp32/boards/deploy.md ("esptool.py --baud 460800
write_flash {flash_offset} ..."), also deploy_s3.md / deploy_c3.md ("starting at address 0").
The file is laid out as ports/esp32/makeimg.py writes it: the bootloader image at 0, the
partition table at 0x8000 - OFFSET, the first app partition's image at its offset - OFFSET.

Before anything touches the board the file is checked: an ESP image starts with the byte 0xE9
and carries, at offset 12, the chip id it was built for (esptool's IMAGE_CHIP_ID: ESP32 0,
ESP32-S3 9, ESP32-C3 5); writing another chip's image bricks the board until it is flashed
again, so a mismatch is refused. The bootloader, the partition table (its MD5 entry) and the
application must all be in the file and whole: every segment the image header announces, the
checksum byte and the appended SHA-256, so a download cut short or damaged is refused. An
application image alone (it begins with esp_app_desc_t, magic 0xABCD5432, at 0x20) is refused
as --firmware: at OFFSET it would replace the bootloader. `--force` skips these checks.

An OTA slot alone (`--app-bin APP.bin --slot ota_1`): how a slot whose image is broken is
written again without erasing the rest (the other slot, NVS, the filesystem with config.json
and the certificates stay as they are):
  1. python -m esptool ... read-flash 0x8000 0xc00 partitions.bin   (the board's partition table)
  2. python -m esptool ... write-flash SLOT_OFFSET APP.bin
SLOT_OFFSET comes from the board's partition table in this repository (boards/BOARD/board.json
"partitions", e.g. boards/partitions/ota-4MiB.csv: ota_0 0x10000, ota_1 0x190000). Before
step 1 the file must be an application image for the chip, whole (as above), and no larger
than the slot (--force skips the first checks, never the size); after step 1 the table read
from the board must hold the slot at the same offset and size, else nothing is written (a board
with another table, a stock non-OTA image say, would have its application overwritten). There
is no deploy step: the filesystem is not touched. (A real run reads the table into a temporary
folder; `--dry-run` prints it as partitions.bin.)"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import struct
import subprocess
import sys
import tempfile
from typing import NamedTuple, NoReturn, Optional

from . import ROOT, TOOLS, VENV_BIN

PYTHON = os.path.join(VENV_BIN, "python")
DEPLOY = os.path.join(TOOLS, "deploy")
BOARDS_DIR = os.path.join(ROOT, "boards")
DEFAULT_BAUD = 460800
IMAGE_MAGIC = 0xE9
_CHIP_ID_AT = 12  # esp_image_header_t: magic, segments, mode, size/freq, entry (4), wp, drv (3), chip_id
_HASH_APPENDED_AT = 23  # the last byte of the extended header: a SHA-256 follows the checksum
_HEADER_LEN = 24
_SEGMENT_HEADER = struct.Struct("<II")  # load address, length
_MAX_SEGMENTS = 16  # ESP_IMAGE_MAX_SEGMENTS
_CHECKSUM_SEED = 0xEF  # ESP_ROM_CHECKSUM_INITIAL
APP_DESC_MAGIC = 0xABCD5432  # esp_app_desc_t.magic_word, the first word of an app's first segment
_APP_DESC_AT = _HEADER_LEN + _SEGMENT_HEADER.size
PARTITION_TABLE_OFFSET = 0x8000  # CONFIG_PARTITION_TABLE_OFFSET's default, MicroPython's too
PARTITION_TABLE_SIZE = 0xC00  # ESP_PARTITION_TABLE_MAX_LEN
_ENTRY = struct.Struct("<2sBBII16sI")  # esp_partition_info_t
_ENTRY_MAGIC = b"\xaa\x50"
_MD5_MAGIC = b"\xeb\xeb"


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


class Partition(NamedTuple):
    name: str
    type: str  # "app", "data" or the number
    subtype: str
    offset: int
    size: int

    def where(self) -> str:
        return f"{self.name} at {self.offset:#x} ({self.size:#x} bytes)"


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


# --- ESP images -------------------------------------------------------------------------------

class _Bad(Exception):
    """What is wrong with an image, said as the end of a sentence about it."""

    def __init__(self, what: str, truncated: bool = False) -> None:
        super().__init__(what)
        self.truncated = truncated


def _xor(data: bytes) -> int:
    """The XOR of all bytes (the image checksum), folded in C on a big int."""
    n, width = int.from_bytes(data, "little"), len(data)
    while width > 1:
        half = (width + 1) // 2
        n = (n >> (8 * half)) ^ (n & ((1 << (8 * half)) - 1))
        width = half
    return n & 0xFF


def image_end(data: bytes, start: int = 0) -> int:
    """Where the ESP image at `start` ends: its header, every segment it announces, the checksum
    byte (at the last byte of a 16-byte block) and, when the header says so, the SHA-256 of all
    that. Raises _Bad if the data ends first or the checksum or the hash do not match."""
    if len(data) < start + _HEADER_LEN:
        raise _Bad(f"its header needs {_HEADER_LEN} bytes, {len(data) - start} are there", True)
    count = data[start + 1]
    if not 1 <= count <= _MAX_SEGMENTS:
        raise _Bad(f"its header announces {count} segments (1..{_MAX_SEGMENTS} is an image)")
    pos, checksum = start + _HEADER_LEN, _CHECKSUM_SEED
    for n in range(1, count + 1):
        if pos + _SEGMENT_HEADER.size > len(data):
            raise _Bad(f"segment {n} of {count} is missing", True)
        _addr, length = _SEGMENT_HEADER.unpack_from(data, pos)
        pos += _SEGMENT_HEADER.size
        if pos + length > len(data):
            raise _Bad(f"segment {n} of {count} needs {length} bytes, {len(data) - pos} are there",
                       True)
        checksum ^= _xor(data[pos:pos + length])
        pos += length
    pos += 15 - (pos - start) % 16
    if pos >= len(data):
        raise _Bad("its checksum byte is missing", True)
    if data[pos] != checksum:
        raise _Bad(f"its checksum is {data[pos]:#04x}, its segments give {checksum:#04x}")
    end = pos + 1
    if data[start + _HASH_APPENDED_AT] == 1:
        if end + 32 > len(data):
            raise _Bad("the SHA-256 appended to it is missing", True)
        if hashlib.sha256(data[start:end]).digest() != data[end:end + 32]:
            raise _Bad("the SHA-256 appended to it does not match its content")
        end += 32
    return end


def _built_for(data: bytes, start: int, chip: Chip) -> Optional[str]:
    """None if the image at `start` is for `chip`, else what it is built for."""
    chip_id = int.from_bytes(data[start + _CHIP_ID_AT:start + _CHIP_ID_AT + 2], "little")
    if chip_id == chip.image_chip_id:
        return None
    return _CHIP_LABELS.get(chip_id, f"chip id {chip_id}")


def _is_app(data: bytes, start: int = 0) -> bool:
    at = start + _APP_DESC_AT
    return len(data) >= at + 4 and struct.unpack_from("<I", data, at)[0] == APP_DESC_MAGIC


def _read(path: str, option: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except IsADirectoryError:
        raise FlashError(f"{option} {path} is a directory") from None
    except OSError as e:
        raise FlashError(f"{option} {path}: {e.strerror or e}") from None


def _check_head(data: bytes, path: str, option: str, chip: Chip) -> None:
    if not data or data[0] != IMAGE_MAGIC:
        first = f"0x{data[0]:02X}" if data else "nothing (empty file)"
        raise FlashError(f"{option} {path} is not an ESP32 image (it starts with {first}, not 0xE9); "
                         "--force writes it anyway")
    if len(data) < _CHIP_ID_AT + 2:
        raise FlashError(f"{option} {path} is too short to be an ESP32 image; --force writes it anyway")
    built = _built_for(data, 0, chip)
    if built is not None:
        raise FlashError(f"{option} {path} is built for {built}, not {chip.label}; "
                         "--force writes it anyway")


def _refuse(option: str, path: str, part: str, bad: _Bad) -> NoReturn:
    if bad.truncated:
        raise FlashError(f"{option} {path} is truncated: {part}: {bad}; download it again "
                         "(--force writes it anyway)")
    raise FlashError(f"{option} {path} is damaged: {part}: {bad} (--force writes it anyway)")


def check_image(path: str, chip: Chip, force: bool) -> None:
    """The file exists and, unless --force, is a whole firmware for `chip` as makeimg.py lays it
    out: bootloader, partition table, the first app partition's image, all of them whole."""
    data = _read(path, "--firmware")
    if force:
        return
    _check_head(data, path, "--firmware", chip)
    if _is_app(data):
        raise FlashError(f"--firmware {path} is an application image (esp_app_desc_t at 0x20), "
                         f"not a whole firmware: at {chip.offset:#x} it would replace the "
                         f"bootloader; write it to an OTA slot with --app-bin {path} --slot ota_0 "
                         "(--force writes it anyway)")
    try:
        boot_end = image_end(data)
    except _Bad as bad:
        _refuse("--firmware", path, "its bootloader image", bad)
    table_at = PARTITION_TABLE_OFFSET - chip.offset
    if boot_end > table_at:
        raise FlashError(f"--firmware {path} is damaged: its bootloader image runs over the "
                         f"partition table at {PARTITION_TABLE_OFFSET:#x} (--force writes it anyway)")
    if len(data) < table_at + _ENTRY.size:
        raise FlashError(f"--firmware {path} is truncated: it ends at {len(data):#x}, before its "
                         f"partition table ({table_at:#x} in the file, {PARTITION_TABLE_OFFSET:#x} "
                         "on the flash); download it again (--force writes it anyway)")
    try:
        table = parse_table(data[table_at:table_at + PARTITION_TABLE_SIZE])
    except ValueError as e:
        raise FlashError(f"--firmware {path} is damaged: its partition table ({table_at:#x} in the "
                         f"file): {e} (--force writes it anyway)") from None
    apps = [p for p in table if p.type == "app"]
    if not apps:
        raise FlashError(f"--firmware {path} is damaged: its partition table has no app partition "
                         "(--force writes it anyway)")
    app = apps[0]
    at = app.offset - chip.offset
    part = f"its application image ({at:#x} in the file, {app.offset:#x} = {app.name} on the flash)"
    if len(data) <= at or data[at] == 0xFF:
        raise FlashError(f"--firmware {path} is truncated: {part} is missing, the file ends at "
                         f"{len(data):#x}; download it again (--force writes it anyway)")
    if data[at] != IMAGE_MAGIC:
        raise FlashError(f"--firmware {path} is damaged: {part} starts with 0x{data[at]:02X}, not "
                         "0xE9 (--force writes it anyway)")
    built = _built_for(data, at, chip)
    if built is not None:
        raise FlashError(f"--firmware {path}: {part} is built for {built}, not {chip.label}; "
                         "--force writes it anyway")
    try:
        end = image_end(data, at)
    except _Bad as bad:
        _refuse("--firmware", path, part, bad)
    if end - at > app.size:
        raise FlashError(f"--firmware {path} is damaged: {part} is {end - at} bytes, more than "
                         f"{app.name} holds ({app.size:#x}) (--force writes it anyway)")


def check_app_image(path: str, chip: Chip, force: bool, slot: Partition) -> None:
    """The file exists, fits the slot and, unless --force, is a whole application image for
    `chip` (not a firmware with the bootloader first)."""
    data = _read(path, "--app-bin")
    if len(data) > slot.size:
        raise FlashError(f"--app-bin {path} is {len(data)} bytes, more than slot {slot.name} holds "
                         f"({slot.size:#x} = {slot.size} bytes)")
    if force:
        return
    _check_head(data, path, "--app-bin", chip)
    if not _is_app(data):
        raise FlashError(f"--app-bin {path} is not an application image (no esp_app_desc_t, "
                         "magic 0xABCD5432, at 0x20): a whole firmware (bootloader first) goes "
                         "on with --firmware; --force writes it anyway")
    try:
        image_end(data)
    except _Bad as bad:
        _refuse("--app-bin", path, "the application image", bad)


# --- partition tables -------------------------------------------------------------------------

_TYPES = {0x00: "app", 0x01: "data"}
_APP_SUBTYPES = {0x00: "factory", 0x20: "test", **{0x10 + i: f"ota_{i}" for i in range(16)}}


def parse_table(blob: bytes) -> list[Partition]:
    """The partitions of a binary table (ESP-IDF's esp_partition_info_t entries, then an optional
    MD5 entry over them, then 0xFF). ValueError says what is wrong."""
    parts: list[Partition] = []
    for pos in range(0, min(len(blob), PARTITION_TABLE_SIZE) - _ENTRY.size + 1, _ENTRY.size):
        entry = blob[pos:pos + _ENTRY.size]
        if entry[:2] == _MD5_MAGIC:
            if hashlib.md5(blob[:pos]).digest() != entry[16:]:
                raise ValueError("its MD5 does not match its entries")
            break
        if entry == b"\xff" * _ENTRY.size:
            if not parts:
                raise ValueError("it is erased (0xFF)")
            break
        magic, ptype, subtype, offset, size, label, _flags = _ENTRY.unpack(entry)
        if magic != _ENTRY_MAGIC:
            raise ValueError(f"entry {len(parts) + 1} starts with {entry[:2].hex()}, not aa50")
        kind = _TYPES.get(ptype, str(ptype))
        sub = _APP_SUBTYPES.get(subtype, str(subtype)) if kind == "app" else str(subtype)
        parts.append(Partition(label.rstrip(b"\0").decode("ascii", "replace"), kind, sub, offset, size))
    if not parts:
        raise ValueError("it holds no partition")
    return parts


def _size(text: str) -> int:
    text = text.strip()
    for suffix, mult in (("K", 1024), ("M", 1024 * 1024)):
        if text.upper().endswith(suffix):
            return int(text[:-1], 0) * mult
    return int(text, 0)


def board_table(board: str) -> tuple[str, list[Partition]]:
    """The board's partition table: boards/BOARD/board.json names a CSV in boards/partitions/."""
    with open(os.path.join(BOARDS_DIR, board, "board.json")) as f:
        name = json.load(f).get("partitions")
    if not name:
        raise FlashError(f"boards/{board}/board.json names no partition table")
    path = os.path.join(BOARDS_DIR, "partitions", name)
    parts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            cells = [c.strip() for c in line.split(",")]
            try:
                parts.append(Partition(cells[0], cells[1], cells[2], _size(cells[3]), _size(cells[4])))
            except (IndexError, ValueError):
                raise FlashError(f"{os.path.relpath(path, ROOT)} line {n}: not name, type, subtype, "
                                 "offset, size") from None
    return os.path.relpath(path, ROOT), parts


def pick_slot(board: str, name: str) -> tuple[str, Partition]:
    source, parts = board_table(board)
    slots = [p for p in parts if p.type == "app"]
    for p in parts:
        if p.name == name:
            if p.type != "app":
                raise FlashError(f"--slot {name} is a {p.type} partition in {source}, not an app "
                                 f"slot; the slots: {', '.join(s.where() for s in slots)}")
            return source, p
    raise FlashError(f"--slot {name!r} is not a partition of {board} ({source}); the slots: "
                     f"{', '.join(s.where() for s in slots) or 'none'}")


def check_board_table(blob: bytes, slot: Partition, source: str) -> None:
    """The table read from the board holds `slot` where the board's table in this repository
    puts it; else nothing may be written."""
    try:
        parts = parse_table(blob)
    except ValueError as e:
        raise FlashError(f"the board holds no usable partition table at {PARTITION_TABLE_OFFSET:#x} "
                         f"({e}): write a whole firmware with --firmware first; nothing was written"
                         ) from None
    for p in parts:
        if p.name == slot.name:
            if (p.type, p.offset, p.size) == ("app", slot.offset, slot.size):
                return
            raise FlashError(f"the board's partition table has {p.name} as {p.type} at "
                             f"{p.offset:#x} ({p.size:#x} bytes), {source} at {slot.offset:#x} "
                             f"({slot.size:#x} bytes); nothing was written")
    apps = [p.where() for p in parts if p.type == "app"]
    raise FlashError(f"the board's partition table has no {slot.name} (its app partitions: "
                     f"{', '.join(apps) or 'none'}); nothing was written")


# --- the steps --------------------------------------------------------------------------------

def check_config(folder: str) -> None:
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FlashError(f"--config {folder} holds no config.json (make one with tools/provision)")


def _esptool(chip: Chip, port: str, baud: int) -> list[str]:
    return [PYTHON, "-m", "esptool", "--chip", chip.name, "--port", port, "--baud", str(baud)]


def commands(chip: Chip, port: str, firmware: str, baud: int, deploy: bool,
             board: Optional[str] = None, config: Optional[str] = None) -> list[list[str]]:
    esptool = _esptool(chip, port, baud)
    cmds = [esptool + ["erase-flash"], esptool + ["write-flash", hex(chip.offset), firmware]]
    if deploy:
        cmds.append([DEPLOY, "--port", port, "--board", board or GENERIC_BOARD[chip.name]]
                    + (["--config", config] if config else []))
    return cmds


def app_commands(chip: Chip, port: str, app: str, baud: int, slot: Partition,
                 table_file: str) -> list[list[str]]:
    esptool = _esptool(chip, port, baud)
    return [esptool + ["read-flash", hex(PARTITION_TABLE_OFFSET), hex(PARTITION_TABLE_SIZE), table_file],
            esptool + ["write-flash", hex(slot.offset), app]]


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
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--firmware", metavar="FILE.bin",
                      help="the MicroPython image (bootloader, partition table, application)")
    what.add_argument("--app-bin", metavar="APP.bin",
                      help="an application image alone, written into --slot (nothing erased but "
                           "the slot's sectors; no deploy)")
    p.add_argument("--slot", metavar="NAME",
                   help="with --app-bin: the app partition of the board's table, e.g. ota_0, ota_1")
    p.add_argument("--baud", type=int, default=DEFAULT_BAUD,
                   help=f"serial speed while flashing (default {DEFAULT_BAUD}; 115200 if it fails)")
    p.add_argument("--dry-run", action="store_true", help="print the commands; run nothing")
    p.add_argument("--no-deploy", action="store_true", help="stop after writing the image")
    p.add_argument("--config", metavar="DIR",
                   help="passed to tools/deploy: the device's config.json and certs/ (tools/provision --out)")
    p.add_argument("--force", action="store_true",
                   help="write the file even if it does not look like an image for this chip")
    return p


def _run(cmds: list[list[str]]) -> int:
    for cmd in cmds:
        print(f"flash: {shlex.join(cmd)}", file=sys.stderr, flush=True)
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            print(f"flash: that step failed (exit {rc}); nothing after it was run", file=sys.stderr)
            return rc
    return 0


def _main_app(a: argparse.Namespace, chip: Chip) -> int:
    board = a.board or GENERIC_BOARD[chip.name]
    try:
        if a.slot is None:
            raise FlashError("--app-bin needs --slot NAME (the OTA slot to write, e.g. ota_1)")
        if a.config is not None:
            raise FlashError("--app-bin leaves the filesystem as it is; deploy --config with tools/deploy")
        source, slot = pick_slot(board, a.slot)
        check_app_image(a.app_bin, chip, a.force, slot)
    except FlashError as e:
        print(f"flash: {e}", file=sys.stderr)
        return 2
    if a.dry_run:
        for cmd in app_commands(chip, a.port, a.app_bin, a.baud, slot, "partitions.bin"):
            print(shlex.join(cmd))
        return 0
    with tempfile.TemporaryDirectory(prefix="flash-") as tmp:
        table_file = os.path.join(tmp, "partitions.bin")
        read, write = app_commands(chip, a.port, a.app_bin, a.baud, slot, table_file)
        rc = _run([read])
        if rc != 0:
            return rc
        try:
            with open(table_file, "rb") as f:
                check_board_table(f.read(), slot, source)
        except (OSError, FlashError) as e:
            print(f"flash: {e}", file=sys.stderr)
            return 2
        print(f"flash: the board's partition table has {slot.where()}, as {source}",
              file=sys.stderr)
        return _run([write])


def main(argv: Optional[list[str]] = None) -> int:
    a = parser().parse_args(argv)
    try:
        chip = pick_chip(a.chip, a.board)
        if not a.port or a.port.startswith("-"):
            raise FlashError(f"--port {a.port!r} is not a serial port")
        if not 300 <= a.baud <= 10_000_000:
            raise FlashError(f"--baud {a.baud} is not a serial speed (300..10000000)")
        if a.app_bin is None and a.slot is not None:
            raise FlashError("--slot goes with --app-bin (an application image for that slot)")
    except FlashError as e:
        print(f"flash: {e}", file=sys.stderr)
        return 2
    if a.app_bin is not None:
        return _main_app(a, chip)
    try:
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
    return _run(cmds)
