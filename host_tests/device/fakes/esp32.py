# Fake of MicroPython's `esp32` module (the Partition class) for tests of
# boards/esp32/iotjobs_board.py: a flash of bytearrays with a partition table, the ESP-IDF OTA calls
# MicroPython wraps, and the second-stage bootloader's slot choice (boot()).
#
# Partition behaves as docs.micropython.org (library/esp32.html) documents it and
# ports/esp32/esp32_partition.c implements it over ESP-IDF:
#   - Partition(id, block_size=4096): id is BOOT, RUNNING or a label (app partitions are
#     searched first, then data); unknown label: OSError(ENOENT); other ints: ValueError;
#   - find(type=TYPE_APP, subtype=0xff, label=None, block_size=4096) -> list;
#     info() -> (type, subtype, addr, size, label, encrypted);
#   - readblocks/writeblocks/ioctl: the extended block protocol; writeblocks without an offset
#     erases first (esp_partition_erase_range: whole 4 KB sectors only), with an offset it only
#     programs (NOR: bits go from 1 to 0); erased flash reads 0xFF; errors are
#     OSError(-esp_err_t, name) as the firmware's check_esp_err raises them;
#   - set_boot() (esp_ota_set_boot_partition), get_next_update()
#     (esp_ota_get_next_update_partition), mark_app_valid_cancel_rollback()
#     (esp_ota_mark_app_valid_cancel_rollback, OSError(-261) without rollback support).
# otadata is written byte for byte as ESP-IDF writes it (app_update/esp_ota_ops.c:
# esp_rewrite_ota_data, rewrite_ota_seq, compute_ota_seq_for_target_slot): two 4 KB sectors,
# each starting with esp_ota_select_entry_t {u32 ota_seq, u8 seq_label[20], u32 ota_state,
# u32 crc}, crc = crc32_le(UINT32_MAX, &ota_seq, 4) = binascii.crc32(seq, 0xFFFFFFFF); a
# sector is erased before its entry is written. boot() follows bootloader_support's
# bootloader_utility_get_selected_boot_partition / bootloader_utility_load_boot_image /
# set_actual_ota_seq with CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE (ROLLBACK = True).
# Simplification: an image is "valid" (esp_image_verify) when it starts with the image magic
# 0xE9 and has the app descriptor magic at offset 32; no segment or SHA-256 check.
import binascii
import struct

BLOCK = 4096
TYPE_APP = 0
TYPE_DATA = 1
SUBTYPE_FACTORY = 0x00
SUBTYPE_OTA_0 = 0x10
SUBTYPE_DATA_OTA = 0x00
NEW = 0
PENDING_VERIFY = 1
VALID = 2
INVALID = 3
ABORTED = 4
UNDEFINED = 0xFFFFFFFF
APP_DESC_MAGIC = 0xABCD5432

ESP_FAIL = -1
ESP_ERR_INVALID_ARG = 0x102
ESP_ERR_INVALID_SIZE = 0x104
ESP_ERR_NOT_FOUND = 0x105
ESP_ERR_OTA_VALIDATE_FAILED = 0x1503
_ENOENT = 2
_EPERM = 1
_NAMES = {ESP_FAIL: "ESP_FAIL", ESP_ERR_INVALID_ARG: "ESP_ERR_INVALID_ARG",
          ESP_ERR_INVALID_SIZE: "ESP_ERR_INVALID_SIZE", ESP_ERR_NOT_FOUND: "ESP_ERR_NOT_FOUND",
          ESP_ERR_OTA_VALIDATE_FAILED: "ESP_ERR_OTA_VALIDATE_FAILED"}

ROLLBACK = True
_table = []
_running = None


def _err(code):
    return OSError(-code, _NAMES.get(code, "ESP_ERR"))


def setup(factory=False, slots=2, slot_blocks=16, otadata=True, rollback=True, running=None):
    """A fresh flash (all erased) with: otadata (8 KB), optionally factory, `slots` OTA app
    slots of `slot_blocks` 4 KB blocks, and a small `vfs` data partition. The running app is
    `running` or the first app partition."""
    global _running, ROLLBACK
    ROLLBACK = rollback
    _table.clear()
    addr = 0x9000

    def add(label, type, subtype, size):
        nonlocal addr
        _table.append({"label": label, "type": type, "subtype": subtype, "addr": addr,
                       "size": size, "data": bytearray(b"\xff" * size)})
        addr += size

    add("nvs", TYPE_DATA, 0x02, 4 * BLOCK)
    if otadata:
        add("otadata", TYPE_DATA, SUBTYPE_DATA_OTA, 2 * BLOCK)
    add("phy_init", TYPE_DATA, 0x01, BLOCK)
    addr = 0x10000
    if factory:
        add("factory", TYPE_APP, SUBTYPE_FACTORY, slot_blocks * BLOCK)
    for i in range(slots):
        add("ota_%d" % i, TYPE_APP, SUBTYPE_OTA_0 + i, slot_blocks * BLOCK)
    add("vfs", TYPE_DATA, 0x81, 4 * BLOCK)
    apps = [p for p in _table if p["type"] == TYPE_APP]
    _running = running or (apps[0]["label"] if apps else None)


def _by_label(label, type=None):
    for p in _table:
        if p["label"] == label and (type is None or p["type"] == type):
            return p
    return None


def _find(type, subtype):
    for p in _table:
        if p["type"] == type and p["subtype"] == subtype:
            return p
    return None


# -- raw flash (what esptool or a power cut leaves) -------------------------------------------
def flash(label, data, offset=0):
    """Write bytes into a partition as esptool would (no erase, no checks)."""
    p = _by_label(label)
    p["data"][offset:offset + len(data)] = data


def raw(label):
    return _by_label(label)["data"]


def app_image(version, project="iotjobs", size=2 * BLOCK):
    """A minimal ESP-IDF app image: esp_image_header_t (24 bytes, magic 0xE9), one segment
    header (8 bytes), then esp_app_desc_t (256 bytes: magic 0xABCD5432, secure_version,
    reserv1[2], version[32], project_name[32], time[16], date[16], idf_ver[32], ...)."""
    head = struct.pack("<BBBBIB3sHBHH4sB", 0xE9, 1, 2, 0x20, 0x400D0000, 0xEE, b"\0\0\0", 0, 0,
                       0, 0, b"\0\0\0\0", 1)
    seg = struct.pack("<II", 0x3F400020, 256)
    desc = struct.pack("<IIII32s32s16s16s32s", APP_DESC_MAGIC, 0, 0, 0, version.encode(),
                       project.encode(), b"12:00:00", b"Jan  1 2026", b"v5.2.2")
    img = head + seg + desc + b"\0" * (256 - len(desc))
    return img + b"\xff" * (size - len(img))


def _image_ok(p):
    d = p["data"]
    return d[0] == 0xE9 and struct.unpack_from("<I", d, 32)[0] == APP_DESC_MAGIC


# -- otadata ---------------------------------------------------------------------------------
def ota_crc(seq):
    """bootloader_common_ota_select_crc: crc32_le(UINT32_MAX, &ota_seq, 4)."""
    return binascii.crc32(struct.pack("<I", seq), 0xFFFFFFFF)


def entry_bytes(seq, state, crc=None, seq_label=b"\xff" * 20):
    """One esp_ota_select_entry_t (32 bytes); crc None: the right one."""
    return struct.pack("<I20sII", seq, seq_label, state, ota_crc(seq) if crc is None else crc)


def write_entry(sector, seq, state, crc=None):
    """Erase otadata sector `sector` and write an entry there (as rewrite_ota_seq does)."""
    d = raw("otadata")
    d[sector * BLOCK:(sector + 1) * BLOCK] = b"\xff" * BLOCK
    d[sector * BLOCK:sector * BLOCK + 32] = entry_bytes(seq, state, crc)


def read_entries():
    """[[seq, seq_label, state, crc], [...]] as read_otadata copies them from flash."""
    d = raw("otadata")
    return [list(struct.unpack_from("<I20sII", d, i * BLOCK)) for i in (0, 1)]


def _write_sector(e, i):
    d = raw("otadata")
    d[i * BLOCK:(i + 1) * BLOCK] = b"\xff" * BLOCK
    d[i * BLOCK:i * BLOCK + 32] = struct.pack("<I20sII", *e[i])


def _crc_ok(x):
    return x[3] == ota_crc(x[0])


def _select_invalid(x):  # bootloader_common_ota_select_invalid
    return x[0] == 0xFFFFFFFF or x[2] == INVALID or x[2] == ABORTED


def _select_valid(x):  # bootloader_common_ota_select_valid
    return not _select_invalid(x) and _crc_ok(x)


def _active(e):  # bootloader_common_get_active_otadata
    v0, v1 = _select_valid(e[0]), _select_valid(e[1])
    if v0 and v1:
        return 0 if max(e[0][0], e[1][0]) == e[0][0] else 1
    return 0 if v0 else (1 if v1 else -1)


def _app_count():
    n = 0
    while _find(TYPE_APP, SUBTYPE_OTA_0 + n) is not None:
        n += 1
    return n


def _rewrite_ota_seq(e, seq, i):
    e[i][0] = seq
    e[i][3] = ota_crc(seq)
    _write_sector(e, i)


def _rewrite_ota_data(subtype):  # esp_rewrite_ota_data
    if _by_label("otadata") is None:
        raise _err(ESP_ERR_NOT_FOUND)
    e = read_entries()
    n = _app_count()
    slot = subtype & 0x0F
    if slot >= n:
        raise _err(ESP_ERR_INVALID_ARG)
    a = _active(e)
    if a != -1:
        if (e[a][0] - 1) % n == slot:
            nxt, seq = a, e[a][0]
        else:
            nxt = (~a) & 1
            base = (slot + 1) % n  # compute_ota_seq_for_target_slot
            i = 0
            while e[a][0] > base + i * n:
                i += 1
            seq = base + i * n
    else:
        nxt, seq = 0, slot + 1
    e[nxt][2] = NEW if ROLLBACK else UNDEFINED
    _rewrite_ota_seq(e, seq, nxt)


def _default_boot():  # find_default_boot_partition
    p = _find(TYPE_APP, SUBTYPE_FACTORY)
    if p is not None:
        return p
    for s in range(SUBTYPE_OTA_0, SUBTYPE_OTA_0 + 16):
        p = _find(TYPE_APP, s)
        if p is not None:
            return p
    return None


def _boot_partition():  # esp_ota_get_boot_partition
    if _by_label("otadata") is None:
        return None
    e = read_entries()
    n = _app_count()
    if (_select_invalid(e[0]) and _select_invalid(e[1])) or n == 0:
        return _default_boot()
    a = _active(e)
    if a == -1:
        return _default_boot()
    return _find(TYPE_APP, SUBTYPE_OTA_0 + (e[a][0] - 1) % n)


def boot():
    """A reset: the second-stage bootloader chooses and starts an app. Returns its label."""
    global _running
    n = _app_count()
    factory = _find(TYPE_APP, SUBTYPE_FACTORY)
    initial = False
    idx = -1  # FACTORY_INDEX
    if _by_label("otadata") is not None:
        e = read_entries()
        if ROLLBACK:
            for i in (0, 1):
                if e[i][2] == PENDING_VERIFY:  # not confirmed during its trial boot
                    e[i][2] = ABORTED
                    _write_sector(e, i)
        if (_select_invalid(e[0]) and _select_invalid(e[1])) or n == 0:
            if factory is None:
                idx = 0
                initial = all(x[0] == 0xFFFFFFFF or not _crc_ok(x) for x in e)
        else:
            a = _active(e)
            if a != -1:
                idx = (e[a][0] - 1) % n
                if ROLLBACK and e[a][2] == NEW:
                    e[a][2] = PENDING_VERIFY
                    _write_sector(e, a)
    elif factory is None:
        idx = 0
    # bootloader_utility_load_boot_image: from idx down to the factory app, then upwards
    for j in list(range(idx, -2, -1)) + list(range(idx + 1, n)):
        p = factory if j == -1 else _find(TYPE_APP, SUBTYPE_OTA_0 + j)
        if p is None or not _image_ok(p):
            continue
        if initial and j >= 0:  # set_actual_ota_seq
            d = raw("otadata")
            d[0:BLOCK] = b"\xff" * BLOCK
            d[0:32] = entry_bytes(j + 1, VALID)
        _running = p["label"]
        return _running
    raise RuntimeError("no bootable app partition")


# -- the class MicroPython exposes -----------------------------------------------------------
class Partition:
    BOOT = 0
    RUNNING = 1
    TYPE_APP = TYPE_APP
    TYPE_DATA = TYPE_DATA

    def __init__(self, id, block_size=BLOCK):
        if isinstance(id, str):
            p = _by_label(id, TYPE_APP) or _by_label(id, TYPE_DATA)
        elif id == Partition.BOOT:
            p = _boot_partition()
        elif id == Partition.RUNNING:
            p = _by_label(_running)
        else:
            raise ValueError()
        if p is None:
            raise OSError(_ENOENT)
        self._p = p
        self.block_size = block_size

    def __eq__(self, other):
        return isinstance(other, Partition) and other._p is self._p

    def __repr__(self):
        p = self._p
        return "<Partition type=%u, subtype=%u, address=%u, size=%u, label=%s, encrypted=0>" % (
            p["type"], p["subtype"], p["addr"], p["size"], p["label"])

    @staticmethod
    def find(type=TYPE_APP, subtype=0xFF, label=None, block_size=BLOCK):
        return [Partition(p["label"], block_size) for p in _table
                if p["type"] == type and subtype in (0xFF, p["subtype"])
                and label in (None, p["label"])]

    def info(self):
        p = self._p
        return (p["type"], p["subtype"], p["addr"], p["size"], p["label"], False)

    def _check(self, off, n):  # esp_partition_read/write/erase_range bounds
        if off > self._p["size"]:
            raise _err(ESP_ERR_INVALID_ARG)
        if off + n > self._p["size"]:
            raise _err(ESP_ERR_INVALID_SIZE)

    def _writable(self):
        # CONFIG_SPI_FLASH_DANGEROUS_WRITE_ABORTS: the real chip aborts; the fake refuses.
        if self._p["label"] == _running:
            raise OSError(_EPERM, "write to the running app partition")

    def _erase(self, off, n):
        if off % BLOCK:
            raise _err(ESP_ERR_INVALID_ARG)
        if n % BLOCK:
            raise _err(ESP_ERR_INVALID_SIZE)
        self._check(off, n)
        self._writable()
        self._p["data"][off:off + n] = b"\xff" * n

    def readblocks(self, block, buf, offset=0):
        off = block * self.block_size + offset
        self._check(off, len(buf))
        mv = memoryview(buf)
        mv[:] = memoryview(self._p["data"])[off:off + len(buf)]

    def writeblocks(self, block, buf, offset=None):
        off = block * self.block_size + (offset or 0)
        n = len(buf)
        if offset is None:
            self._erase(off, n)
        self._check(off, n)
        self._writable()
        d = self._p["data"]
        for i in range(n):
            d[off + i] &= buf[i]

    def ioctl(self, op, arg):
        if op in (1, 2, 3):
            return 0
        if op == 4:
            return self._p["size"] // self.block_size
        if op == 5:
            return self.block_size
        if op == 6:
            self._erase(arg * self.block_size, self.block_size)
            return 0
        return None

    def set_boot(self):
        p = self._p
        if p["type"] != TYPE_APP:
            raise _err(ESP_ERR_INVALID_ARG)
        if not _image_ok(p):
            raise _err(ESP_ERR_OTA_VALIDATE_FAILED)
        if p["subtype"] == SUBTYPE_FACTORY:
            od = _by_label("otadata")
            if od is None:
                raise _err(ESP_ERR_NOT_FOUND)
            od["data"][:] = b"\xff" * od["size"]
            return
        _rewrite_ota_data(p["subtype"])

    def get_next_update(self):
        default = None
        next_is_result = False
        for s in range(SUBTYPE_OTA_0, SUBTYPE_OTA_0 + 16):
            p = _find(TYPE_APP, s)
            if p is None:
                continue
            if default is None:
                default = p
            if p is self._p:
                next_is_result = True
            elif next_is_result:
                return Partition(p["label"])
        if default is None:
            raise OSError(_ENOENT)
        return Partition(default["label"])

    @classmethod
    def mark_app_valid_cancel_rollback(cls):
        if not ROLLBACK:
            raise _err(ESP_ERR_NOT_FOUND)  # OSError(-261), as the MicroPython docs say
        if _by_label("otadata") is None:
            raise _err(ESP_ERR_NOT_FOUND)
        e = read_entries()
        a = _active(e)
        if a == -1 or _app_count() == 0:
            raise _err(ESP_FAIL)  # "Running firmware is factory"
        if e[a][2] != VALID:
            e[a][2] = VALID
            _rewrite_ota_seq(e, e[a][0], a)


setup()
