# The unix-port twin of esp32.Partition: the ESP32's two OTA app slots and its otadata, kept in
# files that tools/devsim (the bootloader) owns. Only firmware/iotjobs_board.py imports it.
#
# Semantics follow MicroPython's esp32.Partition over ESP-IDF (esp32_partition.c, esp_ota_ops):
#   - 4096-byte blocks; writeblocks(block, buf) erases the range first and needs whole blocks
#     (esp_partition_erase_range), writeblocks(block, buf, offset) only programs, so bits can
#     only go from 1 to 0 (NOR flash); erased flash reads 0xFF;
#   - errors are OSError(-esp_err_t, name), as check_esp_err raises them;
#   - set_boot() verifies the image first (ESP_ERR_OTA_VALIDATE_FAILED) and marks the slot NEW;
#     the bootloader turns NEW into PENDING_VERIFY at the next boot and a PENDING_VERIFY slot
#     that boots again unconfirmed into ABORTED (rollback);
#   - mark_app_valid_cancel_rollback() makes the running slot VALID.
# Every call is durable when it returns (a SIGKILL between calls keeps it): slot writes go to
# the file at once, otadata is replaced by write-temp-then-rename.
#
# Files in the OTA folder (tools/devsim creates them; see its docstring):
#   partitions.json  the partition table: [{"label", "type", "subtype", "addr", "size"}, ...]
#   ota_0.bin ...    slot contents; bytes past the end of the file are erased (0xFF)
#   otadata.json     {"seq": n, "boot": "ota_1", "state": {"ota_0": "VALID", "ota_1": "NEW"}};
#                    absent = erased otadata (a board fresh from esptool boots ota_0)
# The running slot and a rollback at this boot come from devsim in the environment:
#   IOTJOBS_OTA (the folder), IOTJOBS_RUNNING (label), IOTJOBS_ROLLED_BACK (label or empty).
import json
import os
from micropython import const

BLOCK = const(4096)
_HEAD = const(44)  # magic 4, format 2, meta length 2, payload length 4, sha256 32
MAGIC = b"IJFW"

# esp_err_t values (OSError(-code, name) as MicroPython's check_esp_err raises them)
ESP_FAIL = const(-1)
ESP_ERR_INVALID_ARG = const(0x102)
ESP_ERR_INVALID_SIZE = const(0x104)
ESP_ERR_NOT_FOUND = const(0x105)
ESP_ERR_OTA_VALIDATE_FAILED = const(0x1503)
_ENOENT = const(2)
_EPERM = const(1)

# otadata states (esp_ota_img_states_t)
NEW = "NEW"
PENDING_VERIFY = "PENDING_VERIFY"
VALID = "VALID"
INVALID = "INVALID"
ABORTED = "ABORTED"
UNDEFINED = "UNDEFINED"

_FF = b"\xff" * 256
_dir = None
_table = None
_running = None
_rolled_back = None
_scratch = None


def _err(code, name):
    return OSError(-code, name)


def attach(folder=None, running=None, rolled_back=None):
    """Use the OTA folder `folder` with `running` as the running slot (default: what devsim put
    in the environment). Tests call it directly."""
    global _dir, _table, _running, _rolled_back
    folder = folder or os.getenv("IOTJOBS_OTA")
    if not folder:
        raise OSError(_ENOENT, "no OTA partitions (not started by devsim)")
    with open(folder + "/partitions.json") as f:
        _table = json.load(f)
    _dir = folder
    _running = running or os.getenv("IOTJOBS_RUNNING") or "ota_0"
    _rolled_back = rolled_back if rolled_back is not None else (os.getenv("IOTJOBS_ROLLED_BACK") or None)


def _layout():
    if _table is None:
        attach()
    return _table


def _entry(label):
    for p in _layout():
        if p["label"] == label:
            return p
    raise OSError(_ENOENT)


def read_otadata():
    """otadata as a dict; erased (absent) otadata is {"seq": 0, "boot": None, "state": {}}."""
    _layout()
    try:
        with open(_dir + "/otadata.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"seq": 0, "boot": None, "state": {}}


def _write_otadata(od):
    tmp = _dir + "/otadata.json.tmp"
    with open(tmp, "w") as f:
        json.dump(od, f)
    os.rename(tmp, _dir + "/otadata.json")


def _ota_labels():
    return [p["label"] for p in _layout() if p["type"] == 0 and 0x10 <= p["subtype"] < 0x20]


def boot_label(od=None):
    """The slot the bootloader will pick (esp_ota_get_boot_partition): otadata's choice unless
    it was rolled back or invalidated, then the other usable slot; ota_0 with erased otadata."""
    od = od or read_otadata()
    state = od["state"]
    boot = od.get("boot")
    if boot and state.get(boot) not in (INVALID, ABORTED):
        return boot
    for label in _ota_labels():
        if label != boot and state.get(label, UNDEFINED) in (VALID, UNDEFINED):
            return label
    return _ota_labels()[0]


class Partition:
    BOOT = const(0)
    RUNNING = const(1)
    TYPE_APP = const(0)
    TYPE_DATA = const(1)

    def __init__(self, id, block_size=BLOCK):
        if block_size != BLOCK:
            raise ValueError("the twin supports block_size 4096 only")
        if id == Partition.BOOT:
            label = boot_label()
        elif id == Partition.RUNNING:
            _layout()
            label = _running
        elif isinstance(id, str):
            label = id
        else:
            raise ValueError(id)
        p = _entry(label)
        self._p = p
        self.label = label
        self.size = p["size"]
        self._path = _dir + "/" + label + ".bin"

    def __repr__(self):
        p = self._p
        return "<Partition type=%u, subtype=%u, address=%u, size=%u, label=%s, encrypted=0>" % (
            p["type"], p["subtype"], p["addr"], p["size"], p["label"])

    @staticmethod
    def find(type=0, subtype=0xFF, label=None, block_size=BLOCK):
        return [Partition(p["label"], block_size) for p in _layout()
                if p["type"] == type and subtype in (0xFF, p["subtype"])
                and label in (None, p["label"])]

    def info(self):
        p = self._p
        return (p["type"], p["subtype"], p["addr"], p["size"], p["label"], False)

    # -- block protocol --------------------------------------------------------------------------
    def _check(self, off, n):
        if off > self.size:
            raise _err(ESP_ERR_INVALID_ARG, "ESP_ERR_INVALID_ARG")
        if off + n > self.size:
            raise _err(ESP_ERR_INVALID_SIZE, "ESP_ERR_INVALID_SIZE")

    def _writable(self):
        # CONFIG_SPI_FLASH_DANGEROUS_WRITE_ABORTS: a board aborts (and resets) on a write into
        # the app it runs; the twin refuses instead.
        if self.label == _running:
            raise OSError(_EPERM, "write to the running app partition")

    def readblocks(self, block, buf, offset=0):
        off = block * BLOCK + offset
        n = len(buf)
        self._check(off, n)
        mv = memoryview(buf)
        got = 0
        try:
            with open(self._path, "rb") as f:
                f.seek(off)
                got = f.readinto(mv) or 0
        except OSError:
            pass
        ff = memoryview(_FF)
        while got < n:  # past the end of the file: erased
            k = min(n - got, len(_FF))
            mv[got:got + k] = ff[:k]
            got += k

    def writeblocks(self, block, buf, offset=None):
        off = block * BLOCK + (offset or 0)
        n = len(buf)
        self._check(off, n)
        self._writable()
        if offset is None:
            # esp_partition_erase_range(off, len(buf)) then program: whole erase blocks only
            if n % BLOCK:
                raise _err(ESP_ERR_INVALID_SIZE, "ESP_ERR_INVALID_SIZE")
            with self._open() as f:
                self._extend(f, off)
                f.seek(off)
                f.write(buf)
            return
        with self._open() as f:
            self._extend(f, off)
            self._program(f, off, memoryview(buf))

    def ioctl(self, op, arg):
        if op in (1, 2, 3):  # init, deinit, sync
            return 0
        if op == 4:
            return self.size // BLOCK
        if op == 5:
            return BLOCK
        if op == 6:
            off = arg * BLOCK
            self._check(off, BLOCK)
            self._writable()
            with self._open() as f:
                end = f.seek(0, 2)
                if off < end:
                    f.seek(off)
                    self._fill(f, min(BLOCK, end - off))
            return 0
        return None

    def _open(self):
        try:
            return open(self._path, "r+b")
        except OSError:
            return open(self._path, "w+b")

    def _fill(self, f, n):
        """Write n bytes of 0xFF (erased flash) at the file position."""
        ff = memoryview(_FF)
        while n > 0:
            k = min(n, len(_FF))
            f.write(ff[:k])
            n -= k

    def _extend(self, f, off):
        end = f.seek(0, 2)
        if end < off:
            self._fill(f, off - end)

    def _program(self, f, off, data):
        """NOR programming: each bit can only be cleared (new = old AND data)."""
        s = _buf()
        pos = 0
        n = len(data)
        while pos < n:
            k = min(n - pos, len(s))
            f.seek(off + pos)
            got = f.readinto(memoryview(s)[:k]) or 0
            f.seek(off + pos)
            if not got or (got == k == len(_FF) and s == _FF):
                f.write(data[pos:pos + k])  # erased (past the end is erased): plain programming
            else:
                for i in range(got, k):
                    s[i] = 0xFF
                for i in range(k):
                    s[i] &= data[pos + i]
                f.write(memoryview(s)[:k])
            pos += k

    # -- OTA ------------------------------------------------------------------------------------
    def get_next_update(self):
        labels = _ota_labels()
        i = labels.index(self.label) if self.label in labels else -1
        return Partition(labels[(i + 1) % len(labels)])

    def set_boot(self):
        if self._p["type"] != 0:
            raise _err(ESP_ERR_INVALID_ARG, "ESP_ERR_INVALID_ARG")
        if verify(self) is None:
            raise _err(ESP_ERR_OTA_VALIDATE_FAILED, "ESP_ERR_OTA_VALIDATE_FAILED")
        od = read_otadata()
        od["seq"] = od.get("seq", 0) + 1
        od["boot"] = self.label
        od["state"][self.label] = NEW
        _write_otadata(od)

    @classmethod
    def mark_app_valid_cancel_rollback(cls):
        od = read_otadata()
        if od["state"].get(_running, UNDEFINED) not in (VALID, UNDEFINED):
            od["state"][_running] = VALID
            _write_otadata(od)


def _buf():
    global _scratch
    if _scratch is None:
        _scratch = bytearray(256)
    return _scratch


def verify(part):
    """The image's metadata dict if `part` holds a valid image (magic, lengths, SHA-256 over
    metadata and payload, as esp_image_verify checks an app), else None."""
    import hashlib
    import struct

    head = bytearray(_HEAD)
    part.readblocks(0, head)
    if head[:4] != MAGIC:
        return None
    fmt, mlen, plen = struct.unpack_from("<HHI", head, 4)
    if fmt != 1 or _HEAD + mlen > BLOCK or BLOCK + plen > part.size:
        return None
    meta = bytearray(mlen)
    part.readblocks(0, meta, _HEAD)
    h = hashlib.sha256(meta)
    # A small chunk: the real bootloader checks the image in C, off the MicroPython heap.
    chunk = _buf()
    mv = memoryview(chunk)
    off = BLOCK
    left = plen
    while left > 0:
        n = min(left, len(chunk))
        part.readblocks(off // BLOCK, mv[:n], off % BLOCK)
        h.update(mv[:n])
        left -= n
        off += n
    if h.digest() != bytes(head[12:44]):
        return None
    try:
        meta = json.loads(meta)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("version"), str) else None


def _meta(part):
    """An image's metadata read from its header, unverified; None if there is no header."""
    import struct

    head = bytearray(_HEAD)
    part.readblocks(0, head)
    mlen = struct.unpack_from("<H", head, 6)[0]
    if head[:4] != MAGIC or _HEAD + mlen > BLOCK:
        return None
    meta = bytearray(mlen)
    part.readblocks(0, meta, _HEAD)
    try:
        meta = json.loads(meta)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def app_description():
    """The running image's metadata (esp_app_get_description): {"version": ..., flags...}."""
    return _meta(Partition(Partition.RUNNING)) or {}


def ota_state():
    """{"slot", "version", "pending", "rolled_back", "last_invalid", "flags"}: what the running
    firmware needs to finish or report an update. `rolled_back` is true on the boot at which the
    bootloader abandoned an unconfirmed image; `last_invalid` (esp_ota_get_last_invalid_partition)
    names the slot, state and version of the image that was rolled back or invalidated, until
    that slot is written and set to boot again."""
    od = read_otadata()
    desc = app_description()
    last = None
    for label in _ota_labels():
        st = od["state"].get(label)
        if label != _running and st in (INVALID, ABORTED):
            meta = _meta(Partition(label)) or {}
            last = {"slot": label, "state": st, "version": meta.get("version")}
    flags = {}
    for k in desc:
        if k != "version":
            flags[k] = desc[k]
    return {
        "slot": _running,
        "version": desc.get("version"),
        "pending": od["state"].get(_running) == PENDING_VERIFY,
        "rolled_back": bool(_rolled_back),
        "last_invalid": last,
        "flags": flags,
    }
