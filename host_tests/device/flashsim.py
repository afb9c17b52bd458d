# A RAM flash chip for littlefs, with power-cut injection (PLATFORM.md, "littlefs flash
# simulation in the unix port"). Geometry as on an ESP32 data partition: 4096-byte erase blocks.
#
#   f = Flash()                 # erased chip (all 0xFF)
#   f.format(); f.mount()       # VfsLfs2 at /flash
#   f.cut_at(n, TORN)           # the n-th program/erase from now on is torn and the power goes
#   ...                         # littlefs raises OSError(EIO) from then on
#   g = f.survivor()            # a fresh chip holding the bytes that survived
#   g.mount()                   # unmounts whatever was at /flash first
#
# After the cut every call returns -EIO instead of raising, so littlefs turns it into a clean
# OSError(5) and a GC finaliser closing a half-written file does not print errors.
import vfs
from micropython import const

BLOCK_SIZE = const(4096)
BLOCKS = const(32)
MOUNT = "/flash"
_EIO = const(-5)

# cut styles
TORN = "torn"  # the operation hit by the cut changes only the first half of its range
NONE = "none"  # the operation hit by the cut changes nothing


class Flash:
    def __init__(self, blocks=BLOCKS, block_size=BLOCK_SIZE, data=None):
        self.blocks = blocks
        self.block_size = block_size
        if data is None:
            data = bytearray(b"\xff" * (blocks * block_size))
        assert len(data) == blocks * block_size
        self.mem = data
        self.mv = memoryview(data)
        self._ff = b"\xff" * block_size
        self.writes = 0  # program operations (writeblocks calls)
        self.erases = 0  # erase operations (ioctl 6)
        self.erased = [0] * blocks  # erases per block (wear)
        self.ops = 0  # both, the unit a cut point counts in
        self.dead = False
        self._cut = 0
        self._style = NONE
        self.vfs = None
        self.mounted_at = None

    # -- power ---------------------------------------------------------------------------------
    def cut_at(self, n, style=TORN):
        """Lose power at the n-th program or erase operation counted from now (n >= 1)."""
        assert n >= 1 and style in (TORN, NONE)
        self._cut = self.ops + n
        self._style = style

    def reset_counts(self):
        self.writes = self.erases = self.ops = 0
        self.erased = [0] * self.blocks
        self._cut = 0

    def _hit(self):
        """Count one operation; True if it is the one the power cut hits."""
        self.ops += 1
        if self._cut and self.ops == self._cut:
            self.dead = True
            return True
        return False

    # -- block device protocol (the extended form littlefs uses) -------------------------------
    def readblocks(self, block, buf, off=0):
        if self.dead:
            return _EIO
        a = block * self.block_size + off
        buf[:] = self.mv[a:a + len(buf)]
        return 0

    def writeblocks(self, block, buf, off=None):
        if self.dead:
            return _EIO
        if off is None:  # the simple protocol: whole blocks, erase implied
            for i in range(len(buf) // self.block_size):
                self.ioctl(6, block + i)
            if self.dead:
                return _EIO
            off = 0
        self.writes += 1
        a = block * self.block_size + off
        n = len(buf)
        if self._hit():
            if self._style == TORN:
                h = n // 2
                self.mv[a:a + h] = memoryview(buf)[:h]
            return _EIO
        self.mv[a:a + n] = buf
        return 0

    def ioctl(self, op, arg):
        if op == 4:
            return self.blocks
        if op == 5:
            return self.block_size
        if self.dead:
            return _EIO
        if op == 6:
            self.erases += 1
            self.erased[arg] += 1
            a = arg * self.block_size
            n = self.block_size
            if self._hit():
                if self._style == TORN:
                    n //= 2
                else:
                    return _EIO
            self.mv[a:a + n] = memoryview(self._ff)[:n]
            return _EIO if self.dead else 0
        return 0  # 1 init, 2 deinit, 3 sync

    # -- filesystem ----------------------------------------------------------------------------
    def format(self):
        vfs.VfsLfs2.mkfs(self)

    def mount(self, path=MOUNT):
        unmount(path)
        self.vfs = vfs.VfsLfs2(self)
        vfs.mount(self.vfs, path)
        self.mounted_at = path
        return path

    def unmount(self):
        if self.mounted_at:
            unmount(self.mounted_at)
            self.mounted_at = None

    def snapshot(self):
        """The bytes on the chip now (after a cut: what survived)."""
        return bytearray(self.mem)

    def survivor(self):
        """A fresh, powered chip holding a copy of this one's bytes (the old mount is dropped)."""
        self.unmount()
        return Flash(self.blocks, self.block_size, self.snapshot())


def unmount(path=MOUNT):
    try:
        vfs.umount(path)
    except OSError:
        pass  # nothing mounted there
