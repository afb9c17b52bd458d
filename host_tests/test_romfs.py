"""`tools/deploy --romfs`: the compiled library in a ROMFS image (`mpremote romfs build`), written
into the board's `romfs` partition (`mpremote romfs deploy`), and booted.

The unix port has `vfs.VfsRom` (MICROPY_VFS_ROM) on every image here, but no `vfs.rom_ioctl`
(MICROPY_VFS_ROM_IOCTL is 0 in its variants: no partition to write, nothing mounted at boot).
So: the image is mounted with `vfs.VfsRom` on each image; a device (tools/devsim --lib IMAGE,
which mounts it at /rom as a board's runtime does at boot) imports the library only from it and
runs a job; and for `mpremote romfs deploy` the unix port behind a pty is given a `romfs`
partition the way esp32_partition.c offers one: `vfs.rom_ioctl(2, 0)` returns an object with
ioctl (block count, block size, erase) and writeblocks, here over a file (a shim module loaded
with `micropython -i`, standing in for the C code). The partition's bytes are then booted."""
import hashlib
import json
import os
import subprocess

import pytest

from conftest import ROOT, stack, thing_arn, wait_execution
from test_deploy import MICROPYTHON, SerialBoard, board  # noqa: F401 - a board without ROMFS

DEPLOY = os.path.join(ROOT, "tools", "deploy")
UNIX_BUILD = os.path.join(ROOT, "build", "UNIX")
PART_SIZE = 0x20000  # 128 KiB, as ports/esp32/partitions-4MiB-romfs.csv
HEAP = "320K"  # the unix port reads the image into its heap (a board maps it from flash)

ROM_SHIM = """
import sys, vfs as _vfs
_PATH = %r
_BLOCK = 4096


class _Partition:  # what esp32_partition.c's rom_ioctl(2) returns, over a file
    def ioctl(self, op, arg):
        if op == 4:
            return %d // _BLOCK
        if op == 5:
            return _BLOCK
        if op == 6:
            with open(_PATH, "r+b") as f:
                f.seek(arg * _BLOCK)
                f.write(b"\\xff" * _BLOCK)
            return 0
        return -22

    def writeblocks(self, block, buf, offset=0):
        with open(_PATH, "r+b") as f:
            f.seek(block * _BLOCK + offset)
            f.write(buf)


class _Vfs:
    def __getattr__(self, name):
        return getattr(_vfs, name)

    def rom_ioctl(self, op, *args):
        if op == 1:
            return 1
        if op == 2:
            return _PART if args[0] == 0 else -22
        return -22


_PART = _Partition()
sys.modules["vfs"] = _Vfs()
"""


class RomBoard(SerialBoard):
    """The unix port behind a pty with a `romfs` partition of `size` bytes in `self.part`."""

    def __init__(self, folder, size=PART_SIZE):
        self.part = str(folder / "romfs.part")
        with open(self.part, "wb") as f:
            f.write(b"\xff" * size)
        shim = folder / "romshim.py"
        shim.write_text(ROM_SHIM % (self.part, size))
        self.flash = str(folder / "flash")
        os.makedirs(self.flash)
        self.port = str(folder / "ttyROM")
        self.proc = subprocess.Popen(
            ["socat", f"PTY,link={self.port},rawer",
             f"EXEC:{MICROPYTHON} -i {shim},pty,rawer,stderr,setsid,ctty"],
            cwd=self.flash, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        stack.wait_until(lambda: os.path.exists(self.port) or self.proc.poll() is not None, 10,
                         "the pty")
        assert self.proc.poll() is None, self.proc.stderr.read()


@pytest.fixture
def romboard(tmp_path):
    b = RomBoard(tmp_path)
    yield b
    b.stop()


def run_deploy(*args, timeout=300):
    return subprocess.run([DEPLOY, *args], capture_output=True, text=True, timeout=timeout)


def table(path, romfs_row="romfs,    data, 0x8f,    0x1E0000, 0x20000,"):
    path.write_text("# Name, Type, SubType, Offset, Size, Flags\n"
                    "nvs,      data, nvs,     0x9000,  0x6000,\n"
                    "factory,  app,  factory, 0x10000, 0x1D0000,\n" + romfs_row + "\n")
    return str(path)


def image_modules():
    """{path in the image: bytes}: every compiled module of the UNIX board's build."""
    out = {}
    for dirpath, _, names in os.walk(UNIX_BUILD):
        for n in names:
            if n.endswith(".mpy"):
                p = os.path.join(dirpath, n)
                with open(p, "rb") as f:
                    out[os.path.relpath(p, UNIX_BUILD)] = f.read()
    return out


@pytest.fixture
def image(tmp_path):
    out = tmp_path / "lib.romfs"
    r = run_deploy("--board", "UNIX", "--romfs-build", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert out.read_bytes()[:3] == b"\xd2\xcd\x31"
    return out


MOUNT_CHECK = """
import sys, os, vfs, hashlib, binascii
vfs.mount(vfs.VfsRom(open(%r, "rb").read()), "/rom")
def walk(d, rel):
    for name, kind, *_ in os.ilistdir(d):
        if kind == 0x4000:
            walk(d + "/" + name, rel + name + "/")
        else:
            print("F", rel + name, binascii.hexlify(hashlib.sha256(open(d + "/" + name, "rb").read()).digest()).decode())
walk("/rom", "")
sys.path.insert(0, "/rom")  # ahead of .frozen: fleet32's frozen copy would win otherwise
import iotjobs.runner, iotjobs.topics, umqtt.simple
print("M", iotjobs.runner.__file__, umqtt.simple.__file__)
print("T", iotjobs.topics.Topics("dev1").notify_next)
"""


@pytest.mark.parametrize("img", ["pip", "stock32", "fleet32"])
def test_the_image_mounts_with_vfsrom_and_the_library_imports_from_it(img, image, tmp_path):
    import sys

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from iotjobs_host import images

    r = subprocess.run([images.interpreter(img), "-X", "heapsize=1M", "-c",
                        MOUNT_CHECK % str(image)], capture_output=True, text=True, timeout=30,
                       cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    files = {ln.split()[1]: ln.split()[2] for ln in r.stdout.splitlines() if ln.startswith("F ")}
    want = {rel: hashlib.sha256(data).hexdigest() for rel, data in image_modules().items()}
    assert files == want, "the image holds exactly the board's compiled modules"
    assert not any(n in files for n in ("main.py", "board.json")), "those stay on the filesystem"
    assert "M /rom/iotjobs/runner.mpy /rom/umqtt/simple.mpy" in r.stdout, r.stdout
    assert "T b'$aws/things/dev1/jobs/notify-next'" in r.stdout, r.stdout


def test_a_damaged_image_does_not_mount_and_devsim_refuses_it(image, tmp_path):
    bad = tmp_path / "bad.romfs"
    bad.write_bytes(b"\x00" + image.read_bytes()[1:])
    r = subprocess.run([MICROPYTHON, "-c", f"import vfs\nvfs.VfsRom(open({str(bad)!r}, 'rb').read())"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "OSError: [Errno 19] ENODEV" in r.stdout + r.stderr, r.stdout
    r = subprocess.run([os.path.join(ROOT, "tools", "devsim"), "--thing", "x", "--broker",
                        "127.0.0.1:1", "--flash", str(tmp_path / "flash"), "--lib", str(bad)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "neither a folder nor a ROMFS image" in r.stderr, r.stderr


def boot_and_run(iot, device, spy, thing, lib, image="pip", flash_of=None):
    iot.create_thing(thingName=thing)
    watch = spy(thing)
    dev = device(thing, extra=["--lib", lib], image=image, heap=HEAP)
    watch.wait_for(lambda t, p: t.endswith("/jobs/start-next"), what="the first start-next")
    iot.create_job(jobId="job-" + thing, targets=[thing_arn(thing)],
                   document=json.dumps({"operation": "demo", "steps": 2}))
    ex = wait_execution(iot, "job-" + thing, thing, {"SUCCEEDED", "FAILED", "REJECTED"}, device=dev)
    assert ex["status"] == "SUCCEEDED", ex
    assert f"devsim: library from the ROMFS image {lib} at /rom" in dev.log_text()
    return dev


@pytest.mark.parametrize("img", ["pip", "stock32"])  # nothing of the library frozen / umqtt only
def test_a_device_imports_the_library_from_the_image_and_runs_a_job(img, image, jobsd, iot,
                                                                    device, spy, tmp_path):
    boot_and_run(iot, device, spy, "dev-rom-" + img, str(image), image=img)
    code = tmp_path / f"device-dev-rom-{img}" / "flash.code"
    assert not {"iotjobs", "umqtt"} & set(os.listdir(code)), "no other copy of the library"


def test_an_image_without_a_module_fails_to_boot(tmp_path, mosquitto, device):
    """The image is the only place the device finds the library: take a module out and the
    firmware cannot start."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from iotjobs_host import deploy as D

    files = [(lo, rel) for lo, rel in D.image_files("UNIX") if rel != "iotjobs/runner.mpy"]
    out = str(tmp_path / "partial.romfs")
    D.build_romfs(files, out, log=lambda m: None)
    dev = device("dev-rom-partial", tls=False, extra=["--lib", out], image="pip", heap=HEAP)
    stack.wait_until(lambda: "firmware exited" in dev.log_text(), 20, "the firmware to fail")
    assert "ImportError" in dev.log_text() and "iotjobs.runner" in dev.log_text(), dev.log_text()


def test_deploy_romfs_writes_the_partition_and_the_board_runs_from_it(romboard, tmp_path, pki,
                                                                      jobsd, mosquitto, iot,
                                                                      procs, spy):
    thing = "dev-romfs"
    config = tmp_path / "provisioned"
    (config / "certs").mkdir(parents=True)
    for name in ("ca.der", "cert.der", "key.der"):
        with open(os.path.join(pki.thing(thing), name), "rb") as f:
            (config / "certs" / name).write_bytes(f.read())
    host, port = mosquitto.tls_broker.rsplit(":", 1)
    (config / "config.json").write_text(json.dumps({
        "thing": thing, "host": host, "port": int(port),
        "tls": {"ca": "certs/ca.der", "cert": "certs/cert.der", "key": "certs/key.der",
                "hostname": "localhost"}}))
    # what an earlier plain deploy or a mip install left: imported before /rom, so removed
    flash = romboard.flash
    for rel in ("iotjobs/runner.mpy", "iotjobs/topics.mpy", "app.mpy", "lib/iotjobs/runner.py",
                "lib/umqtt/simple.py", "lib/umqtt/robust.py"):
        os.makedirs(os.path.dirname(os.path.join(flash, rel)), exist_ok=True)
        with open(os.path.join(flash, rel), "w") as f:
            f.write("raise ImportError('stale copy')\n")
    img = tmp_path / "deployed.romfs"
    r = run_deploy("--port", romboard.port, "--board", "UNIX", "--romfs", "--partitions",
                   table(tmp_path / "table.csv"), "--romfs-build", str(img), "--config",
                   str(config), "--no-reset")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    size = img.stat().st_size
    assert f"ROMFS image written ({size} bytes)" in out, out
    assert f"partition of {tmp_path / 'table.csv'}: {PART_SIZE} bytes" in out, out
    with open(romboard.part, "rb") as f:
        part = f.read()
    assert part[:size] == img.read_bytes(), "the partition holds the image"
    assert "deploy: 6 file(s) on the filesystem, 6 changed" in out, out
    for rel in ("main.py", "board.json", "config.json", "certs/key.der"):
        assert os.path.isfile(os.path.join(flash, rel)), rel
    for rel in ("iotjobs", "app.mpy", "lib/iotjobs", "lib/umqtt/simple.py"):
        assert not os.path.exists(os.path.join(flash, rel)), rel
    assert os.path.exists(os.path.join(flash, "lib/umqtt/robust.py")), "not ours: kept"
    assert "the folder lib/umqtt holds other files" in out, out
    # a second deploy rewrites the image, copies nothing and removes nothing
    r = run_deploy("--port", romboard.port, "--board", "UNIX", "--romfs", "--partitions",
                   table(tmp_path / "table.csv"), "--romfs-build", str(img), "--config",
                   str(config), "--no-reset")
    assert r.returncode == 0 and ", 0 changed" in r.stdout and "removed" not in r.stdout, r.stdout
    romboard.stop()
    os.remove(os.path.join(flash, "lib/umqtt/robust.py"))  # the warning's advice

    # the board boots: config.json and main.py from its filesystem, the code from the partition
    iot.create_thing(thingName=thing)
    watch = spy(thing)
    dev = stack.Device(str(tmp_path), thing, mosquitto.tls_broker, heap=HEAP, image="pip",
                       extra=["--lib", romboard.part])
    procs.append(dev)
    watch.wait_for(lambda t, p: t.endswith("/jobs/start-next"), what="the first start-next")
    iot.create_job(jobId="job-romfs", targets=[thing_arn(thing)],
                   document=json.dumps({"operation": "demo", "steps": 1}))
    ex = wait_execution(iot, "job-romfs", thing, {"SUCCEEDED", "FAILED", "REJECTED"}, device=dev)
    assert ex["status"] == "SUCCEEDED", ex


def test_deploy_romfs_refuses_before_touching_the_board(tmp_path):
    nowhere = str(tmp_path / "no-such-port")
    r = run_deploy("--port", nowhere, "--board", "ESP32_GENERIC", "--romfs")
    assert r.returncode == 2, r.stdout + r.stderr
    assert ("ESP32_GENERIC: the partition table boards/partitions/ota-4MiB.csv has no partition "
            "labelled `romfs`") in r.stderr, r.stderr
    r = run_deploy("--port", nowhere, "--board", "UNIX", "--romfs")
    assert r.returncode == 2 and "board UNIX has no partition table" in r.stderr, r.stderr
    small = table(tmp_path / "small.csv", "romfs, data, 0x8f, 0x1E0000, 16K,")
    r = run_deploy("--port", nowhere, "--board", "UNIX", "--romfs", "--partitions", small)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "does not fit the `romfs` partition" in r.stderr and "(16384 bytes)" in r.stderr
    app = table(tmp_path / "app.csv", "romfs, app, ota_0, 0x1E0000, 0x20000,")
    r = run_deploy("--port", nowhere, "--board", "UNIX", "--romfs", "--partitions", app)
    assert r.returncode == 2 and "has type 'app'" in r.stderr, r.stderr
    r = run_deploy("--port", nowhere, "--board", "UNIX", "--romfs", "--partitions",
                   str(tmp_path / "none.csv"))
    assert r.returncode == 2 and "No such file" in r.stderr, r.stderr
    r = run_deploy("--board", "UNIX", "--romfs")
    assert r.returncode == 2 and "--port is required" in r.stderr, r.stderr
    # --dry-run builds the image and lists both halves
    r = run_deploy("--port", nowhere, "--board", "UNIX", "--romfs", "--dry-run", "--partitions",
                   table(tmp_path / "t.csv"), "--romfs-build", str(tmp_path / "d.romfs"))
    assert r.returncode == 0, r.stderr
    assert "would put iotjobs/runner.mpy into the ROMFS image" in r.stdout
    assert "would copy build/UNIX/main.py -> :main.py" in r.stdout, r.stdout


def test_deploy_romfs_to_a_board_without_romfs_is_refused(board, tmp_path):  # noqa: F811
    """The unix port as it is: VfsRom, but no vfs.rom_ioctl (as an esp32 image built without
    MICROPY_VFS_ROM): mpremote refuses, deploy says why, the filesystem is untouched."""
    r = run_deploy("--port", board.port, "--board", "UNIX", "--romfs", "--partitions",
                   table(tmp_path / "table.csv"), "--romfs-build", str(tmp_path / "x.romfs"),
                   "--no-reset")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "has no ROMFS (no vfs.rom_ioctl" in r.stderr, r.stderr
    assert os.listdir(board.flash) == []
    assert board.alive()
