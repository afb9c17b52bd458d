# The esp32.Partition twin (firmware/esp32sim.py): block semantics as MicroPython documents
# them over ESP-IDF (4096-byte blocks, erase-then-write without offset, NOR programming with an
# offset, OSError(-esp_err_t)), and the OTA calls' effect on otadata.
import hashlib
import json
import os
import struct

import esp32sim
from esp32sim import Partition

SLOT = 16 * 4096


def fresh(running="ota_0", otadata=None):
    """A new OTA folder with two 64 KB slots, attached as if devsim had booted `running`."""
    d = (os.getenv("IOTJOBS_TEST_TMP") or "/tmp") + "/esp32sim-" + "".join(
        "%02x" % b for b in os.urandom(6))
    os.mkdir(d)
    table = [{"label": "ota_%d" % i, "type": 0, "subtype": 0x10 + i,
              "addr": 0x10000 + i * SLOT, "size": SLOT} for i in range(2)]
    with open(d + "/partitions.json", "w") as f:
        json.dump(table, f)
    if otadata:
        with open(d + "/otadata.json", "w") as f:
            json.dump(otadata, f)
    esp32sim.attach(d, running, None)
    return d


def image(version, payload):
    meta = json.dumps({"version": version}).encode()
    head = struct.pack("<4sHHI", b"IJFW", 1, len(meta), len(payload))
    head += hashlib.sha256(meta + payload).digest() + meta
    return head + b"\xff" * (4096 - len(head)) + payload


def write_image(part, data):
    buf = bytearray(4096)
    for block in range((len(data) + 4095) // 4096):
        chunk = data[block * 4096:(block + 1) * 4096]
        buf[:len(chunk)] = chunk
        for i in range(len(chunk), 4096):
            buf[i] = 0xFF
        part.writeblocks(block, buf)


def raises(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return e.args
    raise AssertionError("no OSError")


def otadata(d):
    with open(d + "/otadata.json") as f:
        return json.load(f)


def test_info_and_lookup():
    fresh()
    p0 = Partition(Partition.RUNNING)
    assert p0.info() == (0, 0x10, 0x10000, SLOT, "ota_0", False)
    assert Partition("ota_1").info() == (0, 0x11, 0x10000 + SLOT, SLOT, "ota_1", False)
    assert p0.get_next_update().info()[4] == "ota_1"
    assert Partition("ota_1").get_next_update().info()[4] == "ota_0"
    assert Partition(Partition.BOOT).info()[4] == "ota_0"  # erased otadata: ota_0
    assert [p.info()[4] for p in Partition.find(Partition.TYPE_APP)] == ["ota_0", "ota_1"]
    assert Partition.find(Partition.TYPE_DATA) == []
    assert raises(Partition, "nvs")[0] == 2  # ENOENT, as esp32_partition_new raises
    try:
        Partition(7)
        raise AssertionError("no ValueError")
    except ValueError:
        pass


def test_ioctl_geometry():
    fresh()
    p = Partition("ota_1")
    assert p.ioctl(4, 0) == SLOT // 4096
    assert p.ioctl(5, 0) == 4096
    assert p.ioctl(1, 0) == 0 and p.ioctl(2, 0) == 0 and p.ioctl(3, 0) == 0
    assert p.ioctl(99, 0) is None


def test_erased_flash_reads_ff():
    fresh()
    p = Partition("ota_1")
    buf = bytearray(4096)
    p.readblocks(15, buf)
    assert buf == b"\xff" * 4096
    small = bytearray(10)
    p.readblocks(3, small, 4090)
    assert small == b"\xff" * 10


def test_writeblocks_without_offset_erases_first():
    fresh()
    p = Partition("ota_1")
    p.writeblocks(2, b"\x0f" * 4096)
    p.writeblocks(2, b"\xf0" * 4096)  # erase then program: exactly the new bytes
    buf = bytearray(4096)
    p.readblocks(2, buf)
    assert buf == b"\xf0" * 4096
    p.readblocks(1, buf)  # the gap before it stays erased
    assert buf == b"\xff" * 4096
    p.writeblocks(4, b"\x01" * 8192)  # several blocks at once
    p.readblocks(5, buf)
    assert buf == b"\x01" * 4096


def test_writeblocks_without_offset_needs_whole_blocks():
    fresh()
    p = Partition("ota_1")
    assert raises(p.writeblocks, 0, b"x" * 100) == (-0x104, "ESP_ERR_INVALID_SIZE")


def test_writeblocks_with_offset_only_clears_bits():
    fresh()
    p = Partition("ota_1")
    p.writeblocks(3, b"\x0f" * 300, 100)
    p.writeblocks(3, b"\x3c" * 300, 100)  # no erase: NOR flash ANDs
    buf = bytearray(500)
    p.readblocks(3, buf)
    assert buf[:100] == b"\xff" * 100
    assert buf[100:400] == b"\x0c" * 300
    assert buf[400:] == b"\xff" * 100
    assert p.ioctl(6, 3) == 0  # erase the block: all ones again
    p.readblocks(3, buf)
    assert buf == b"\xff" * 500


def test_out_of_range_is_an_esp_error():
    fresh()
    p = Partition("ota_1")
    assert raises(p.readblocks, 16, bytearray(1)) == (-0x104, "ESP_ERR_INVALID_SIZE")
    assert raises(p.readblocks, 17, bytearray(1)) == (-0x102, "ESP_ERR_INVALID_ARG")
    assert raises(p.writeblocks, 15, b"x" * 8192) == (-0x104, "ESP_ERR_INVALID_SIZE")
    assert raises(p.writeblocks, 15, b"x" * 2, 4095) == (-0x104, "ESP_ERR_INVALID_SIZE")


def test_writes_are_durable_per_call():
    d = fresh()
    Partition("ota_1").writeblocks(1, b"\x5a" * 4096)
    with open(d + "/ota_1.bin", "rb") as f:  # on "flash" as soon as the call returns
        f.seek(4096)
        assert f.read(4096) == b"\x5a" * 4096
    buf = bytearray(4096)
    Partition("ota_1").readblocks(1, buf)
    assert buf == b"\x5a" * 4096


def test_running_partition_is_not_writable():
    fresh()
    p = Partition(Partition.RUNNING)
    assert raises(p.writeblocks, 0, b"\x00" * 4096)[0] == 1
    assert raises(p.ioctl, 6, 0)[0] == 1


def test_littlefs_formats_and_mounts_on_a_slot():
    """The block protocol is complete enough for vfs, as a real Partition is."""
    import vfs

    fresh()
    p = Partition("ota_1")
    vfs.VfsLfs2.mkfs(p)
    fs = vfs.VfsLfs2(p)
    with fs.open("hello", "w") as f:
        f.write("world")
    fs2 = vfs.VfsLfs2(Partition("ota_1"))
    with fs2.open("hello", "r") as f:
        assert f.read() == "world"


def test_set_boot_verifies_the_image():
    d = fresh()
    nxt = Partition(Partition.RUNNING).get_next_update()
    assert raises(nxt.set_boot) == (-0x1503, "ESP_ERR_OTA_VALIDATE_FAILED")  # erased slot
    img = image("2.0.0", bytes(range(256)) * 20)
    bad = bytearray(img)
    bad[6000] ^= 1
    write_image(nxt, bad)
    assert raises(nxt.set_boot) == (-0x1503, "ESP_ERR_OTA_VALIDATE_FAILED")
    write_image(nxt, img)
    nxt.set_boot()
    od = otadata(d)
    assert od["boot"] == "ota_1" and od["state"]["ota_1"] == "NEW" and od["seq"] == 1
    assert Partition(Partition.BOOT).info()[4] == "ota_1"
    assert Partition(Partition.RUNNING).info()[4] == "ota_0"  # until the reset


def test_mark_app_valid_cancel_rollback_confirms_the_running_slot():
    d = fresh("ota_1", {"seq": 2, "boot": "ota_1",
                        "state": {"ota_0": "VALID", "ota_1": "PENDING_VERIFY"}})
    write_image(Partition("ota_0"), image("1.0.0", b"old"))
    st = esp32sim.ota_state()
    assert st["slot"] == "ota_1" and st["pending"] is True
    Partition.mark_app_valid_cancel_rollback()  # a classmethod, as in MicroPython
    assert otadata(d)["state"] == {"ota_0": "VALID", "ota_1": "VALID"}
    Partition.mark_app_valid_cancel_rollback()  # fine to call on every boot
    assert otadata(d)["seq"] == 2


def test_boot_after_rollback_is_the_other_slot():
    fresh("ota_0", {"seq": 2, "boot": "ota_1",
                    "state": {"ota_0": "VALID", "ota_1": "ABORTED"}})
    assert Partition(Partition.BOOT).info()[4] == "ota_0"
