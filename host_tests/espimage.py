"""Small but well-formed ESP32 flash images for the flashing tests, made in memory (no binary
file is committed): an application image (what ESP-IDF calls the app, MicroPython's
`micropython.bin`, an OTA slot's content), a second-stage bootloader image, a partition table
from a CSV, and a whole firmware as MicroPython's `makeimg.py` lays one out (bootloader at 0,
partition table at 0x8000 - offset, the first app partition's image at its offset - offset).

The images are written by esptool's own image classes (`esptool.bin_image`), so the header,
the chip id at byte 12, the segment checksum and the appended SHA-256 are esptool's idea of them:
  - an app image's first segment is a DROM (flash-mapped) segment at DROM_MAP_START + 0x20
    that starts with esp_app_desc_t (magic word 0xABCD5432), as ESP-IDF links it;
  - a bootloader image's first segment starts with esp_bootloader_desc_t (magic byte 0x50).
`esptool image-info` accepts them (a test checks that)."""
from __future__ import annotations

import hashlib
import random
import struct

from esptool.bin_image import (ESP32C3FirmwareImage, ESP32FirmwareImage, ESP32S3FirmwareImage,
                               ImageSegment)

IMAGE_CLASSES = {"esp32": ESP32FirmwareImage, "esp32s3": ESP32S3FirmwareImage,
                 "esp32c3": ESP32C3FirmwareImage}
CHIP_IDS = {"esp32": 0, "esp32s3": 9, "esp32c3": 5}
OFFSETS = {"esp32": 0x1000, "esp32s3": 0x0, "esp32c3": 0x0}
CHIP_ID_AT = 12
PARTITION_TABLE_OFFSET = 0x8000
# (DRAM address of the data, IRAM entry point), plausible for each chip's app and bootloader
_RAM = {"esp32": (0x3FFB0000, 0x40080400), "esp32s3": (0x3FC88000, 0x40378000),
        "esp32c3": (0x3FC88000, 0x40380000)}
_BOOT_RAM = {"esp32": (0x3FFF0030, 0x40078000), "esp32s3": (0x3FCE3800, 0x403C9700),
             "esp32c3": (0x3FCD5800, 0x403CE000)}
APP_DESC_MAGIC = 0xABCD5432
_APP_DESC = struct.Struct("<II8s32s32s16s16s32s32sHHB3s72s")  # esp_app_desc_t, 256 bytes
_BOOT_DESC = struct.Struct("<B3sI32s24s16s")  # esp_bootloader_desc_t, 80 bytes


def _filler(n: int, seed: str) -> bytes:
    """n bytes that do not compress (esptool then writes them as they are) and differ per seed."""
    return random.Random(seed).randbytes(n)


def app_image(chip: str, size: int = 8 * 1024, version: str = "1.28.0", seed: str = "") -> bytes:
    """An application image of `size` bytes, give or take 16 (at least 1 KiB)."""
    img = IMAGE_CLASSES[chip]()
    dram, entry = _RAM[chip]
    img.entrypoint = entry
    desc = _APP_DESC.pack(APP_DESC_MAGIC, 0, b"", version.encode(), b"micropython", b"12:00:00",
                          b"Jan  1 2026", b"v5.4.2", hashlib.sha256(seed.encode()).hexdigest()
                          [:32].encode(), 0, 199, 16, b"", b"")
    body = max(size - 24 - 2 * 8 - 8 - 32, 1024)  # header, segment headers, checksum, SHA-256
    drom = ImageSegment(img.ROM_LOADER.DROM_MAP_START + 0x20,
                        desc + _filler(body - 256 - body // 4, f"{chip}/{seed}/drom"))
    drom.name = ".flash.appdesc"
    data = ImageSegment(dram, _filler(body // 4 // 4 * 4, f"{chip}/{seed}/dram"))
    data.name = ".dram0.data"
    img.segments = [drom, data]
    out = img.save(None)
    assert out[0] == 0xE9 and out[12] == CHIP_IDS[chip]
    assert struct.unpack_from("<I", out, 32)[0] == APP_DESC_MAGIC, "app desc not at 0x20"
    return out


def bootloader_image(chip: str, seed: str = "") -> bytes:
    img = IMAGE_CLASSES[chip]()
    dram, entry = _BOOT_RAM[chip]
    img.entrypoint = entry
    desc = _BOOT_DESC.pack(0x50, b"", 1, b"v5.4.2", b"Jan  1 2026 12:00:00", b"")
    seg = ImageSegment(dram, desc + _filler(4096 - len(desc), f"{chip}/{seed}/boot"))
    seg.name = ".dram0.bootdesc"
    img.segments = [seg]
    out = img.save(None)
    assert out[0] == 0xE9 and out[12] == CHIP_IDS[chip] and out[32] == 0x50
    return out


def _size(text: str) -> int:
    text = text.strip()
    for suffix, mult in (("K", 1024), ("M", 1024 * 1024)):
        if text.upper().endswith(suffix):
            return int(text[:-1], 0) * mult
    return int(text, 0)


TYPES = {"app": 0x00, "data": 0x01}
SUBTYPES = {"factory": 0x00, "test": 0x20, "ota": 0x00, "phy": 0x01, "nvs": 0x02,
            "nvs_keys": 0x04, "fat": 0x81, "spiffs": 0x82, "littlefs": 0x83,
            **{f"ota_{i}": 0x10 + i for i in range(16)}}


def read_csv(path: str) -> list[tuple[str, str, str, int, int]]:
    """(name, type, subtype, offset, size) of each line of an ESP-IDF partition CSV."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, ptype, subtype, offset, size = [c.strip() for c in line.split(",")][:5]
            rows.append((name, ptype, subtype, _size(offset), _size(size)))
    return rows


def partition_table(rows, md5: bool = True) -> bytes:
    """The binary partition table (ESP-IDF's gen_esp32part.py format), padded to 0xC00."""
    out = b""
    for name, ptype, subtype, offset, size in rows:
        out += struct.pack("<2sBBLL16sL", b"\xaa\x50", TYPES[ptype], SUBTYPES[subtype], offset, size,
                           name.encode(), 0)
    if md5:
        out += b"\xeb\xeb" + b"\xff" * 14 + hashlib.md5(out).digest()
    return out + b"\xff" * (0xC00 - len(out))


def firmware(chip: str, rows, app: bytes, boot: bytes | None = None) -> bytes:
    """A whole firmware, laid out as MicroPython's ports/esp32/makeimg.py does."""
    base = OFFSETS[chip]
    boot = bootloader_image(chip) if boot is None else boot
    app_offset = next(offset for _, ptype, _, offset, _ in rows if ptype == "app")
    out = bytearray(boot)
    out += b"\xff" * (PARTITION_TABLE_OFFSET - base - len(out))
    out += partition_table(rows)
    out += b"\xff" * (app_offset - base - len(out))
    out += app
    return bytes(out)
