"""devsim as the ESP32 bootloader: OTA slot selection, PENDING_VERIFY, confirmation, rollback
and image verification, seen by firmware on the device (device/otaprobe.py as its main.py)
driving the esp32.Partition twin, with power cuts between steps."""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from conftest import HERE

from iotjobs_host import devsim
from iotjobs_host.stack import wait_until

PROBE = os.path.join(HERE, "device", "otaprobe.py")
MiB = 1 << 20


class Probe:
    """One simulated device running the probe firmware; commands go through its flash folder."""

    def __init__(self, tmp_path, device, thing: str = "ota1", extra: list[str] | None = None):
        flash = tmp_path / ("device-" + thing) / "flash"
        flash.mkdir(parents=True)
        shutil.copyfile(PROBE, flash / "main.py")  # the filesystem's main.py runs, as on a board
        self.flash = str(flash)
        self.ota = devsim.ota_dir(self.flash)
        self.dev = device(thing, tls=False, extra=extra)
        self.n = 0

    def log(self) -> str:
        return self.dev.log_text(10**7)

    def boots(self) -> list[dict]:
        return [json.loads(m) for m in re.findall(r"^@@BOOT (.*)$", self.log(), re.M)]

    def wait_boot(self, count: int) -> dict:
        """The state the firmware printed at its count-th boot."""
        try:
            return wait_until(lambda: len(self.boots()) >= count and self.boots()[count - 1],
                              30, f"boot {count}")
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{self.log()}") from None

    def do(self, op: str, **args) -> dict:
        self.n += 1
        n = self.n
        tmp = os.path.join(self.flash, "cmd.tmp")
        with open(tmp, "w") as f:
            json.dump({"n": n, "op": op, **args}, f)
        os.replace(tmp, os.path.join(self.flash, "cmd.json"))
        pat = re.compile(rf"^@@DONE {n} (.*)$", re.M)
        try:
            line = wait_until(lambda: pat.search(self.log()), 30, f"command {n} {op}")
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{self.log()}") from None
        return json.loads(line.group(1))

    def put_image(self, image: bytes, name: str = "img.bin") -> str:
        with open(os.path.join(self.flash, name), "wb") as f:
            f.write(image)
        return name

    def otadata(self) -> dict:
        return devsim.read_otadata(self.ota)


def test_first_boot_runs_the_factory_image_in_ota_0(tmp_path, device):
    p = Probe(tmp_path, device)
    st = p.wait_boot(1)
    assert st["slot"] == "ota_0" and st["version"] == devsim.FACTORY_VERSION
    assert st["pending"] is False and st["rolled_back"] is False and st["last_invalid"] is None
    assert st["boot"] == "ota_0" and st["next"] == "ota_1"
    assert not os.path.exists(os.path.join(p.ota, "otadata.json"))  # erased, as from esptool
    assert devsim.slot_image(p.ota, "ota_0")["version"] == devsim.FACTORY_VERSION
    # the default table is MicroPython's 4 MiB OTA layout
    with open(os.path.join(p.ota, "partitions.json")) as f:
        table = json.load(f)
    assert [(e["label"], e["subtype"], e["addr"], e["size"]) for e in table] == [
        ("ota_0", 0x10, 0x10000, 0x180000), ("ota_1", 0x11, 0x190000, 0x180000)]
    # confirming an image that esptool flashed is allowed and changes nothing
    assert p.do("confirm")["pending"] is False
    assert not os.path.exists(os.path.join(p.ota, "otadata.json"))


def test_new_image_boots_pending_and_stays_once_confirmed(tmp_path, device):
    p = Probe(tmp_path, device)
    p.wait_boot(1)
    image = devsim.make_image("2.0.0", size=1 * MiB, channel="beta")
    r = p.do("flash", file=p.put_image(image))
    assert r == {"written": 256, "boot": "ota_1"}
    assert p.otadata()["boot"] == "ota_1" and p.otadata()["state"]["ota_1"] == "NEW"
    with open(os.path.join(p.ota, "ota_1.bin"), "rb") as f:
        assert f.read() == image
    assert p.do("state")["slot"] == "ota_0"  # RUNNING stays until the reset

    p.do("reset")
    st = p.wait_boot(2)
    assert st["slot"] == "ota_1" and st["version"] == "2.0.0" and st["pending"] is True
    assert st["flags"] == {"channel": "beta"} and st["next"] == "ota_0"
    assert p.otadata()["state"]["ota_1"] == "PENDING_VERIFY"

    st = p.do("confirm")
    assert st["pending"] is False and p.otadata()["state"]["ota_1"] == "VALID"
    p.dev.power_cut()
    st = p.wait_boot(3)
    assert st["slot"] == "ota_1" and st["version"] == "2.0.0"
    assert st["pending"] is False and st["rolled_back"] is False


def test_unconfirmed_image_is_rolled_back_at_the_next_reset(tmp_path, device):
    p = Probe(tmp_path, device)
    p.wait_boot(1)
    p.do("flash", file=p.put_image(devsim.make_image("2.0.0", size=64 * 1024, selftest="fail")))
    p.do("reset")
    st = p.wait_boot(2)
    assert st["slot"] == "ota_1" and st["pending"] is True
    assert st["flags"] == {"selftest": "fail"}  # this image would not confirm itself

    p.dev.power_cut()  # the reset before confirmation (watchdog, crash, power)
    st = p.wait_boot(3)
    assert st["slot"] == "ota_0" and st["version"] == devsim.FACTORY_VERSION
    assert st["rolled_back"] is True and st["pending"] is False
    assert st["last_invalid"] == {"slot": "ota_1", "state": "ABORTED", "version": "2.0.0"}
    assert st["boot"] == "ota_0" and p.otadata()["state"]["ota_1"] == "ABORTED"
    assert "devsim: rollback: ota_1 was not confirmed" in p.log()

    # later boots stay on the old image; the rollback is no longer news, the record remains
    p.do("reset")
    st = p.wait_boot(4)
    assert st["slot"] == "ota_0" and st["rolled_back"] is False
    assert st["last_invalid"]["slot"] == "ota_1"

    # the slot can be reused: a new image replaces the record
    p.do("flash", file=p.put_image(devsim.make_image("2.0.1", size=64 * 1024)))
    p.do("reset")
    st = p.wait_boot(5)
    assert st["slot"] == "ota_1" and st["version"] == "2.0.1" and st["pending"] is True
    assert st["last_invalid"] is None


@pytest.mark.parametrize("damage", ["payload", "metadata", "magic", "truncated"])
def test_set_boot_refuses_a_corrupt_image(tmp_path, device, damage):
    p = Probe(tmp_path, device)
    p.wait_boot(1)
    image = bytearray(devsim.make_image("2.0.0", size=64 * 1024))
    if damage == "payload":
        image[40000] ^= 1
    elif damage == "metadata":
        image[50] ^= 1
    elif damage == "magic":
        image[0] = 0xE9
    else:
        image = image[:-4096]
    assert devsim.parse_image(bytes(image)) is None
    r = p.do("flash", file=p.put_image(bytes(image)))
    assert r["error"] == [-0x1503, "ESP_ERR_OTA_VALIDATE_FAILED"]
    assert p.otadata()["boot"] is None
    p.do("reset")
    st = p.wait_boot(2)
    assert st["slot"] == "ota_0" and st["pending"] is False


def test_image_damaged_after_set_boot_is_never_booted(tmp_path, device):
    """The bootloader verifies the image itself: one flipped bit after set_boot (bit rot, a
    write after verification) means the old slot boots, and the damaged one never does."""
    p = Probe(tmp_path, device)
    p.wait_boot(1)
    p.do("flash", file=p.put_image(devsim.make_image("2.0.0", size=256 * 1024)))
    with open(os.path.join(p.ota, "ota_1.bin"), "r+b") as f:
        f.seek(100000)
        b = f.read(1)
        f.seek(100000)
        f.write(bytes([b[0] ^ 0x10]))
    p.do("reset")
    st = p.wait_boot(2)
    assert st["slot"] == "ota_0" and st["version"] == devsim.FACTORY_VERSION
    assert "ota_1 holds no valid image; skipped" in p.log()
    p.do("reset")
    st = p.wait_boot(3)
    assert st["slot"] == "ota_0" and p.otadata()["state"]["ota_1"] == "ABORTED"
    assert st["last_invalid"]["slot"] == "ota_1"


def test_power_cut_while_writing_an_image_keeps_the_old_one(tmp_path, device):
    p = Probe(tmp_path, device)
    p.wait_boot(1)
    image = devsim.make_image("2.0.0", size=128 * 1024)
    assert p.do("flash", file=p.put_image(image), blocks=10) == {"written": 10}
    p.dev.power_cut()
    st = p.wait_boot(2)
    assert st["slot"] == "ota_0" and st["pending"] is False and st["boot"] == "ota_0"
    with open(os.path.join(p.ota, "ota_1.bin"), "rb") as f:
        assert f.read() == image[:10 * 4096]  # every finished write survived the cut
    # and the update can simply start again
    p.do("flash", file="img.bin")
    p.do("reset")
    assert p.wait_boot(3)["version"] == "2.0.0"


def test_small_slots_are_configurable(tmp_path, device):
    p = Probe(tmp_path, device, extra=["--slot-size", "0x20000", "--factory-version", "0.9"])
    st = p.wait_boot(1)
    assert st["version"] == "0.9"
    r = p.do("flash", file=p.put_image(devsim.make_image("1.0", size=0x20000 + 4096)))
    assert r["error"] == [-0x104, "ESP_ERR_INVALID_SIZE"]  # does not fit the slot


def test_image_helper_round_trip():
    image = devsim.make_image("3.1.4", size=MiB, selftest="fail")
    assert len(image) == MiB
    assert devsim.parse_image(image) == {"version": "3.1.4", "selftest": "fail"}
    assert devsim.parse_image(image + b"\xff" * 4096) is not None  # a whole slot
    assert devsim.parse_image(image[:-1]) is None
    small = devsim.make_image("1", payload=b"x")
    assert len(small) == 4097 and devsim.parse_image(small) == {"version": "1"}
    with pytest.raises(ValueError):
        devsim.make_image("1", note="x" * 5000)


def test_bootloader_with_nothing_bootable_halts(tmp_path):
    folder = str(tmp_path / "ota")
    devsim.provision_ota(folder, 0x10000)
    with open(os.path.join(folder, "ota_0.bin"), "r+b") as f:
        f.write(b"XXXX")
    choice = devsim.bootloader(folder)
    assert choice.slot is None
