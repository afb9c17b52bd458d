"""A simulated device: firmware/ under the MicroPython unix port, its flash a host folder.

Like an ESP32 it boots, runs main, and boots again after a reset (iotjobs_board.reset() ends the
process with RESET_EXIT) or a crash. The device sees only its flash folder (cwd) and the
compiled code in build/mpy/host (its frozen modules, in board terms).

devsim is also the device's bootloader. Beside the flash folder, `<flash>.ota/` holds what an
ESP32 with the 4 MB OTA partition table keeps outside its filesystem: the partition table
(`partitions.json`), two app slots (`ota_0.bin`, `ota_1.bin`; bytes past a file's end are
erased flash) and `otadata.json`. The firmware reaches them through firmware/esp32sim.py (the
esp32.Partition twin). At every boot devsim does what the ESP-IDF bootloader does with app
rollback enabled: the slot otadata selects goes NEW -> PENDING_VERIFY; if it is still
PENDING_VERIFY (the image booted and never called mark_app_valid_cancel_rollback) it becomes
ABORTED and the other slot boots; a slot whose image fails verification (magic, lengths,
SHA-256) is never booted. The code that runs is always build/mpy/host; the image in the slot
decides the firmware's version and flags. The firmware learns the outcome from the environment
(IOTJOBS_OTA, IOTJOBS_RUNNING, IOTJOBS_ROLLED_BACK) and otadata.

Image format (make_image() builds one): block 0 is a header, then the payload from byte 4096:
  0  b"IJFW"   4  u16 format (1)   6  u16 metadata length M   8  u32 payload length P
  12 sha256(metadata || payload)   44 metadata: JSON object {"version": "1.2.0", ...flags}
  44+M..4095 0xFF                  4096 payload (P bytes)
Flags are free-form metadata the firmware can read (tests use {"selftest": "fail"}).

`--lib DIR|IMAGE` moves the library (iotjobs, umqtt) off build/mpy/host: the device imports it
from DIR (what `mip install --target DIR` wrote: a board's /lib) or from a ROMFS image
(`tools/deploy --romfs-build`, or the bytes of a romfs partition) mounted at /rom. The rest of
build/mpy/host (main, app, iotjobs_board, the twins) is reached through `<flash>.code/`, links to
it without iotjobs/ and umqtt/, so the library can only come from there or from the image's
frozen modules. sys.path is then ['', '.frozen', DIR, <flash>.code] or ['', '.frozen', '/rom',
'/rom/lib', <flash>.code]: frozen modules first, as on a board, so on fleet32 the frozen
library still wins (use pip, or stock32 whose only frozen piece of it is umqtt.simple). The
unix port cannot map flash: the image is read into the heap (a board maps it), so give it a
heap larger by the image's size.

`--cut-at-write N` cuts the power (SIGKILL) just before the firmware's N-th flash write: a
write() to a file it opened for writing, opening one for "w" (a truncation), os.rename,
os.remove, os.mkdir, os.rmdir, in the flash folder or the OTA slots alike (the journal, its
temporary file, downloads, OTA blocks, otadata). That flash write does not happen; those before
it did. The count is kept in `<flash>.cut` (a number, beside the flash folder): devsim writes N
there at start, a test or tools/iotjobs_host/fleet.py may write one while the device runs, and
the firmware reads it at its next write, counts from then (and again from 1 after a reset), and
removes it as the power goes. `--cut-at-write 0` only installs the counter (a hook around
`open` and `os` in the firmware process, a few KB of heap) so that the file can arm it later.

The devsim process itself stays small while its firmware runs (a fleet runs fifty): it imports
no more than os, sys, signal and time; parsing the options, provisioning, compiling the code and
the bootloader's checks each run in a short-lived forked child, and the firmware is started by
fork and exec."""
from __future__ import annotations

import marshal
import os
import signal
import struct
import sys
import time

RESET_EXIT = 3  # firmware/iotjobs_board.py
# The default heap of a simulated device (the pip port, 64-bit, code loaded into the heap): the
# measured need of its heaviest default path (a `ping` command, then a steps job with a side
# effect, over mutual TLS: `tools/bench --only heap`) plus a margin of at least 25%. README,
# "When memory runs out", has the figures.
DEFAULT_HEAP = "128K"
# The default image: the fleet image (our code frozen, 32-bit), the firmware a fleet runs. Its
# need is far below DEFAULT_HEAP (25 KB for the same path); the heap stays the one measured on
# pip, the heaviest image, so that any image runs with the defaults.
DEFAULT_IMAGE = "fleet32"
TLS_FILES = ("ca.der", "cert.der", "key.der")
LIBRARY = ("iotjobs", "umqtt")  # what --lib takes off build/mpy/host
ROMFS_HEADER = b"\xd2\xcd\x31"
# Run instead of `-m main` with a ROMFS image: mount it as a board's runtime does at boot
# (py/runtime.c, MICROPY_VFS_ROM_IOCTL), /rom and /rom/lib right after the frozen modules.
_ROMFS_BOOT = """import sys, vfs
f = open(%r, "rb")
vfs.mount(vfs.VfsRom(f.read(%d)), "/rom")
f.close()
del f
i = sys.path.index(".frozen") + 1
sys.path[i:i] = ["/rom", "/rom/lib"]
del i
import main
"""

BLOCK = 4096
SLOT_SIZE = 0x180000  # ota_0 and ota_1 of MicroPython's 4 MiB OTA table (1.5 MiB each)
FIRST_SLOT_ADDR = 0x10000
APP_TYPE, OTA_0_SUBTYPE = 0, 0x10
MAGIC = b"IJFW"
_HEAD = struct.Struct("<4sHHI32s")  # 44 bytes
FACTORY_VERSION = "1.0.0"
# otadata states (esp_ota_img_states_t)
NEW, PENDING_VERIFY, VALID = "NEW", "PENDING_VERIFY", "VALID"
INVALID, ABORTED, UNDEFINED = "INVALID", "ABORTED", "UNDEFINED"


# -- firmware images -------------------------------------------------------------------------------
def make_image(version: str, payload: bytes | None = None, size: int | None = None,
               **flags: str) -> bytes:
    """An app image: the header block, then `payload` (or random bytes making the whole image
    `size` bytes long, e.g. 1 MiB for benchmarks). Keyword flags go into the metadata."""
    import hashlib
    import json

    meta = json.dumps({"version": version, **flags}, separators=(",", ":")).encode()
    if _HEAD.size + len(meta) > BLOCK:
        raise ValueError("image metadata does not fit the header block")
    if payload is None:
        payload = os.urandom(max(0, (size or 2 * BLOCK) - BLOCK))
    digest = hashlib.sha256(meta + payload).digest()
    head = _HEAD.pack(MAGIC, 1, len(meta), len(payload), digest) + meta
    return head + b"\xff" * (BLOCK - len(head)) + payload


def parse_image(data: bytes) -> dict | None:
    """The metadata of a valid image (what the bootloader checks), else None. `data` may carry
    trailing bytes (a whole slot)."""
    import hashlib
    import json

    if len(data) < BLOCK:
        return None
    magic, fmt, mlen, plen, digest = _HEAD.unpack_from(data)
    if magic != MAGIC or fmt != 1 or _HEAD.size + mlen > BLOCK or len(data) < BLOCK + plen:
        return None
    meta = data[_HEAD.size:_HEAD.size + mlen]
    if hashlib.sha256(meta + data[BLOCK:BLOCK + plen]).digest() != digest:
        return None
    try:
        info = json.loads(meta)
    except ValueError:
        return None
    return info if isinstance(info, dict) and isinstance(info.get("version"), str) else None


# -- OTA slots and the bootloader --------------------------------------------------------------------
def ota_dir(flash: str) -> str:
    """The folder beside the flash folder that holds the partition table, slots and otadata."""
    return os.path.normpath(flash) + ".ota"


def _write_json(path: str, obj: object) -> None:
    import json

    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def provision_ota(folder: str, slot_size: int = SLOT_SIZE, version: str = FACTORY_VERSION) -> None:
    """As esptool flashes a new board: the partition table, the factory image in ota_0, an
    empty ota_1 and erased otadata. An existing folder is left alone (flash persists)."""
    import hashlib

    table = os.path.join(folder, "partitions.json")
    if os.path.exists(table):
        return
    if slot_size % BLOCK or slot_size < 2 * BLOCK:
        raise ValueError("slot size must be a multiple of 4096, at least 8192")
    os.makedirs(folder, exist_ok=True)
    image = make_image(version, payload=hashlib.sha256(version.encode()).digest() * 256)
    with open(os.path.join(folder, "ota_0.bin"), "wb") as f:
        f.write(image)
    open(os.path.join(folder, "ota_1.bin"), "wb").close()
    _write_json(table, [{"label": f"ota_{i}", "type": APP_TYPE, "subtype": OTA_0_SUBTYPE + i,
                         "addr": FIRST_SLOT_ADDR + i * slot_size, "size": slot_size}
                        for i in range(2)])


def read_otadata(folder: str) -> dict:
    import json

    try:
        with open(os.path.join(folder, "otadata.json")) as f:
            od = json.load(f)
        if isinstance(od, dict) and isinstance(od.get("state"), dict):
            return od
    except (OSError, ValueError):
        pass
    return {"seq": 0, "boot": None, "state": {}}


def slot_image(folder: str, label: str) -> dict | None:
    """The metadata of the valid image in slot `label`, else None."""
    try:
        with open(os.path.join(folder, label + ".bin"), "rb") as f:
            return parse_image(f.read())
    except OSError:
        return None


class BootChoice:
    def __init__(self, slot: str | None, image: dict | None, rolled_back: str | None,
                 state: str) -> None:
        self.slot = slot  # None: nothing bootable
        self.image = image
        self.rolled_back = rolled_back  # the slot abandoned at this boot
        self.state = state  # the running slot's otadata state


def bootloader(folder: str) -> BootChoice:
    """Pick the slot to run and update otadata, as the ESP-IDF bootloader with app rollback."""
    import json

    with open(os.path.join(folder, "partitions.json")) as f:
        labels = [p["label"] for p in json.load(f) if p["type"] == APP_TYPE]
    od = read_otadata(folder)
    state = od["state"]
    boot = od.get("boot")
    aborted = None
    if boot in labels:
        if state.get(boot) == PENDING_VERIFY:  # booted before and never confirmed: roll back
            state[boot] = ABORTED
            aborted = boot
            _write_json(os.path.join(folder, "otadata.json"), od)
        elif state.get(boot) == NEW:
            state[boot] = PENDING_VERIFY
            _write_json(os.path.join(folder, "otadata.json"), od)
    candidates = []
    if boot in labels and state.get(boot) not in (INVALID, ABORTED):
        candidates.append(boot)
    candidates += [s for s in labels
                   if s != boot and state.get(s, UNDEFINED) in (VALID, UNDEFINED)]
    for slot in candidates:
        image = slot_image(folder, slot)
        if image is not None:
            return BootChoice(slot, image, aborted if aborted != slot else None,
                              state.get(slot, UNDEFINED))
        print(f"devsim: bootloader: {slot} holds no valid image; skipped", flush=True)
    return BootChoice(None, None, aborted, UNDEFINED)


def provision(flash: str, thing: str, broker: str, tls: str | None, keepalive: int = 60,
              extra: dict | None = None) -> None:
    """Write config.json (and the TLS files) into a fresh flash folder, as provisioning would.

    `extra` is merged into the config (tests use it for runner settings and halt points)."""
    import json
    import shutil

    os.makedirs(flash, exist_ok=True)
    cfg_path = os.path.join(flash, "config.json")
    if os.path.exists(cfg_path):
        return
    host, port = broker.rsplit(":", 1)
    cfg: dict = {"thing": thing, "host": host, "port": int(port), "keepalive": keepalive}
    cfg.update(extra or {})
    if tls:
        certs = os.path.join(flash, "certs")
        os.makedirs(certs, exist_ok=True)
        for name in TLS_FILES:
            shutil.copyfile(os.path.join(tls, name), os.path.join(certs, name))
        cfg["tls"] = {"ca": "certs/ca.der", "cert": "certs/cert.der", "key": "certs/key.der",
                      "hostname": "localhost"}
    tmp = cfg_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=1)
    os.replace(tmp, cfg_path)


def romfs_length(data: bytes) -> int | None:
    """The length of the ROMFS image at the start of `data` (a partition may hold more bytes
    after it), or None if `data` does not start with one."""
    if not data.startswith(ROMFS_HEADER):
        return None
    size, i = 0, len(ROMFS_HEADER)
    while i < len(data):
        b = data[i]
        i += 1
        size = (size << 7) | (b & 0x7F)
        if not b & 0x80:
            return i + size if i + size <= len(data) else None
    return None


def code_without_library(code: str, dest: str) -> str:
    """`dest` made a folder of links to everything in `code` but the library's packages."""
    os.makedirs(dest, exist_ok=True)
    want = {n for n in os.listdir(code) if n not in LIBRARY and not n.endswith(".tmp")}
    for name in os.listdir(dest):
        link = os.path.join(dest, name)
        if name not in want or os.readlink(link) != os.path.join(code, name):
            os.remove(link)
    for name in want:
        if not os.path.lexists(os.path.join(dest, name)):
            os.symlink(os.path.join(code, name), os.path.join(dest, name))
    return dest


def build(arch: str) -> str:
    """build.build (imported when a boot needs it: a forked child's import, not devsim's)."""
    from .build import build as _build

    return _build(arch)


def cut_file(flash: str) -> str:
    """The file beside the flash folder that arms a power cut at the firmware's N-th flash write."""
    return os.path.normpath(flash) + ".cut"


# Run before main when the flash-write counter is on (--cut-at-write): `open` and the `os`
# module the firmware imports count every flash write; at the armed count the power goes
# (SIGKILL from a shell: the unix port has no kill()) before that write is made. It allocates
# nothing on a write until the count is reached (the firmware writes under memory pressure).
_CUT_HOOK = """import builtins, io, os, sys
def _cut_hook(path):
    _os = os
    _open = builtins.open
    st = [0, 0]
    def op(what, name):
        if not st[0]:
            try:
                _os.stat(path)
                with _open(path) as f:
                    st[0] = int(f.read())
            except (OSError, ValueError):
                return
            st[1] = 0
        st[1] += 1
        if st[1] < st[0]:
            return
        try:
            _os.remove(path)
        except OSError:
            pass
        print("devsim: power cut at flash write %d (%s %s)" % (st[1], what, name))
        _os.system("kill -9 $PPID")
        import time
        while True:
            time.sleep(1)
    class File(io.IOBase):
        def __init__(self, f, name):
            self._f = f
            self._n = name
        def write(self, b):
            op("write", self._n)
            return self._f.write(b)
        def readinto(self, b):
            return self._f.readinto(b)
        def read(self, *a):
            return self._f.read(*a)
        def seek(self, *a):
            return self._f.seek(*a)
        def tell(self):
            return self._f.tell()
        def flush(self):
            return self._f.flush()
        def close(self):
            return self._f.close()
        def __enter__(self):
            return self
        def __exit__(self, *a):
            self._f.close()
        def __getattr__(self, name):
            return getattr(self._f, name)
    def open_(name, mode="r", *a):
        if "w" in mode:
            op("truncate", name)
        f = _open(name, mode, *a)
        if "w" in mode or "a" in mode or "+" in mode:
            return File(f, name)
        return f
    class Os:
        def __getattr__(self, name):
            return getattr(_os, name)
        def rename(self, a, b):
            op("rename", a)
            _os.rename(a, b)
        def remove(self, p):
            op("remove", p)
            _os.remove(p)
        def unlink(self, p):
            op("remove", p)
            _os.remove(p)
        def mkdir(self, p, *a):
            op("mkdir", p)
            _os.mkdir(p, *a)
        def rmdir(self, p):
            op("rmdir", p)
            _os.rmdir(p)
    builtins.open = open_
    sys.modules["os"] = Os()
_cut_hook(os.getenv("IOTJOBS_CUT"))
del _cut_hook, builtins, io, os, sys
"""


class ChildFailed(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"exit status {code}")
        self.code = code


def in_child(fn, *args):
    """fn(*args) in a forked child: what it imports, and the memory that takes, ends with it.
    Its result (marshal-able) comes back through a pipe. A SystemExit (argparse) or an exception
    (its traceback printed) in the child raises ChildFailed with the child's exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        status = 0
        try:
            os.close(r)
            try:
                data = marshal.dumps(fn(*args))
                while data:
                    data = data[os.write(w, data):]
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if e.code is not None and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
            except BaseException:
                import traceback

                traceback.print_exc()
                status = 1
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code != 0 or not chunks:
        raise ChildFailed(code if code != 0 else 1)
    return marshal.loads(b"".join(chunks))


def spawn(argv: list[str], cwd: str, env: dict) -> int:
    """argv[0] started by fork and exec (subprocess is a large import), stdin /dev/null, in
    `cwd`; its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.chdir(cwd)
            fd = os.open(os.devnull, os.O_RDONLY)
            os.dup2(fd, 0)
            os.close(fd)
            os.execve(argv[0], argv, env)
        except BaseException as e:
            try:
                os.write(2, f"devsim: cannot start {argv[0]}: {e}\n".encode())
            finally:
                os._exit(127)
    return pid


class Devsim:
    def __init__(self, flash: str, heap: str, ota: str | None = None, image: str = "pip",
                 lib: str | None = None, cut_hook: bool = False) -> None:
        self.flash = flash
        self.heap = heap
        self.image = image
        self.lib = os.path.abspath(lib) if lib else None
        self.ota = os.path.abspath(ota or ota_dir(flash))
        self.cut_hook = cut_hook
        self.child: int | None = None  # the running firmware's pid
        self.stopping = False
        self.boots = 0

    def plan(self) -> dict | None:
        """What the next boot runs (the bootloader's choice and the firmware's command line and
        environment), or None when nothing is bootable. Run in a child (in_child)."""
        from . import images

        code = build("host")
        choice = bootloader(self.ota)
        if choice.rolled_back:
            print(f"devsim: rollback: {choice.rolled_back} was not confirmed", flush=True)
        if choice.slot is None or choice.image is None:
            print("devsim: bootloader: no bootable app partition; halted", flush=True)
            return None
        print(f"devsim: bootloader: {choice.slot} version {choice.image['version']} "
              f"({choice.state})", flush=True)
        env = {"MICROPYPATH": ".frozen:" + code}
        boot = "import main\n"
        if self.lib:
            rest = code_without_library(code, os.path.normpath(self.flash) + ".code")
            if os.path.isdir(self.lib):
                env["MICROPYPATH"] = ".frozen:" + self.lib + ":" + rest
            else:
                with open(self.lib, "rb") as f:
                    n = romfs_length(f.read())
                if n is None:
                    print(f"devsim: {self.lib} holds no ROMFS image; halted", flush=True)
                    return None
                env["MICROPYPATH"] = ".frozen:" + rest
                boot = _ROMFS_BOOT % (self.lib, n)
        run = ["-m", "main"]
        if self.cut_hook:
            env["IOTJOBS_CUT"] = os.path.abspath(cut_file(self.flash))
            run = ["-c", _CUT_HOOK + boot]
        elif boot != "import main\n":
            run = ["-c", boot]
        env["IOTJOBS_OTA"] = self.ota
        env["IOTJOBS_RUNNING"] = choice.slot
        env["IOTJOBS_ROLLED_BACK"] = choice.rolled_back or ""
        return {"exe": images.interpreter(self.image), "run": run, "env": env}

    def boot(self) -> int | None:
        """One boot: the bootloader's choice, then the firmware until it ends. None when no
        slot holds a bootable image (the board is bricked)."""
        plan = in_child(self.plan)
        if plan is None:
            return None
        if self.stopping:
            return 0
        env = dict(os.environ)
        env.update(plan["env"])
        self.boots += 1
        self.child = spawn([plan["exe"], "-X", f"heapsize={self.heap}", *plan["run"]],
                           self.flash, env)
        # tests kill the firmware process (a power cut) by this pid
        print(f"devsim: boot {self.boots} (image {self.image}, heap {self.heap}, "
              f"pid {self.child})", flush=True)
        if self.stopping:  # SIGTERM came between the fork and the line above
            self.stop()
        try:
            rc = os.waitstatus_to_exitcode(os.waitpid(self.child, 0)[1])
        finally:
            self.child = None
        return rc

    def stop(self, *_: object) -> None:
        self.stopping = True
        if self.child is not None:
            try:
                os.kill(self.child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        while not self.stopping:
            try:
                rc = self.boot()
            except ChildFailed as e:
                if e.code < 0 and not self.stopping:
                    # the bootloader's helper was killed (a power cut aimed at the firmware
                    # that came while the bootloader ran): the board boots again
                    print(f"devsim: the bootloader was cut ({e}); resetting", flush=True)
                    time.sleep(1)
                    continue
                print(f"devsim: the boot failed ({e}); halted", flush=True)
                return 1
            if self.stopping:
                break
            if rc is None:
                while not self.stopping:  # bricked: stays dead until stopped
                    time.sleep(0.2)
                break
            if rc == RESET_EXIT:
                print("devsim: reset", flush=True)
            else:
                # An ESP32 whose main.py dies is reset by the watchdog; so is this one, after a
                # pause that keeps a crash loop from spinning the host.
                print(f"devsim: firmware exited with {rc}; resetting", flush=True)
                time.sleep(1)
        return 0


def setup(argv: list[str] | None) -> dict:
    """Parse the options, check them and provision the flash folder (first start): the
    arguments of Devsim. SystemExit(2) with the reason on a bad option."""
    import argparse
    import json

    from . import images

    ap = argparse.ArgumentParser(prog="tools/devsim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--thing", required=True)
    ap.add_argument("--broker", required=True, help="HOST:PORT of the MQTT broker")
    ap.add_argument("--flash", required=True, help="folder that is the device's filesystem")
    ap.add_argument("--heap", default=DEFAULT_HEAP,
                    help=f"MicroPython heap, e.g. 96K (default {DEFAULT_HEAP})")
    ap.add_argument("--tls", help="folder with the thing's ca.der, cert.der and key.der")
    ap.add_argument("--image", choices=images.IMAGES, default=DEFAULT_IMAGE,
                    help=f"the interpreter (tools/images builds them; default {DEFAULT_IMAGE})")
    ap.add_argument("--keepalive", type=int, default=60, help="MQTT keepalive, seconds")
    ap.add_argument("--config", default="{}",
                    help="JSON object merged into the device's config.json on first start")
    ap.add_argument("--ota", help="folder of the OTA slots and otadata (default: <flash>.ota)")
    ap.add_argument("--slot-size", type=lambda v: int(v, 0), default=SLOT_SIZE,
                    help="bytes per OTA app slot on first start (default 0x180000)")
    ap.add_argument("--factory-version", default=FACTORY_VERSION,
                    help="version of the image flashed into ota_0 on first start")
    ap.add_argument("--lib", metavar="DIR|IMAGE",
                    help="import the library (iotjobs, umqtt) from this folder (what mip "
                         "installed) or ROMFS image (mounted at /rom), not from build/mpy/host; "
                         "frozen modules still come first")
    ap.add_argument("--cut-at-write", type=int, metavar="N",
                    help="cut the power just before the firmware's N-th flash write (0: only "
                         "count, so that <flash>.cut can arm a cut later)")
    args = ap.parse_args(argv)

    def fail(msg: str):
        print(f"devsim: {msg}", file=sys.stderr)
        raise SystemExit(2)

    try:
        extra = json.loads(args.config)
        if not isinstance(extra, dict):
            raise ValueError("not an object")
    except ValueError as e:
        fail(f"--config must be a JSON object: {e}")
    if args.cut_at_write is not None and args.cut_at_write < 0:
        fail("--cut-at-write must be 0 or more")
    if args.tls:
        missing = [n for n in TLS_FILES if not os.path.exists(os.path.join(args.tls, n))]
        if missing:
            fail(f"--tls {args.tls} lacks {', '.join(missing)}")
    provision(args.flash, args.thing, args.broker, args.tls, args.keepalive, extra)
    ota = args.ota or ota_dir(args.flash)
    try:
        provision_ota(ota, args.slot_size, args.factory_version)
    except ValueError as e:
        fail(f"--slot-size: {e}")
    exe = images.interpreter(args.image)
    if not os.access(exe, os.X_OK):
        fail(f"image {args.image} is not built ({exe}): run make setup")
    if args.lib:
        if os.path.isfile(args.lib):
            with open(args.lib, "rb") as f:
                if romfs_length(f.read()) is None:
                    fail(f"--lib {args.lib} is neither a folder nor a ROMFS image")
            print(f"devsim: library from the ROMFS image {args.lib} at /rom", flush=True)
        elif os.path.isdir(args.lib):
            print(f"devsim: library from {args.lib}", flush=True)
        else:
            fail(f"--lib {args.lib} does not exist")
    if args.cut_at_write:
        _write_text(cut_file(args.flash), f"{args.cut_at_write}\n")
    return {"flash": args.flash, "heap": args.heap, "ota": ota, "image": args.image,
            "lib": args.lib, "cut_hook": args.cut_at_write is not None}


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def arm_cut(flash: str, n: int) -> None:
    """Cut the power of the device on `flash` just before its n-th flash write from now (it must
    run with --cut-at-write)."""
    if n < 1:
        raise ValueError("n must be 1 or more")
    _write_text(cut_file(flash), f"{n}\n")


def main(argv: list[str] | None = None) -> int:
    # The options, the checks and the provisioning run in a child, so that this process, which
    # lives as long as the device, never holds argparse, json and the rest.
    try:
        kw = in_child(setup, argv)
    except ChildFailed as e:
        return e.code
    return Devsim(**kw).run()
