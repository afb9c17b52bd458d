"""Device images: MicroPython interpreters that model a board, built from MicroPython's source.

- `pip`: the unix port from the package registry (64-bit; our .mpy files load into its heap).
- `stock32`: the 32-bit unix port (i686), standard variant, freezing what a stock ESP32 image
  freezes from micropython-lib (boards/UNIX/manifest-stock32.py: umqtt.simple 1.8.0 among
  them) and nothing of ours: a stock ESP32 image with our .mpy files on its filesystem.
- `fleet32`: stock32 plus boards/UNIX/manifest.py frozen: a fleet image, our code in flash.

MicroPython's source comes from MICROPY_SRC: a checkout, or a .tar.xz archive of one (unpacked
once into build/micropython/, keyed by the archive's SHA-256). Unset, tag v1.28.0 is cloned
there with the submodules lib/mbedtls and lib/micropython-lib. Images are built into
build/images/<name>/ (never into the source tree) and rebuilt only when a stamp of their inputs
(the source's identity, the manifests, the frozen code) changes.

Needs the i686 cross compiler and 32-bit C library (`apt-get install gcc-i686-linux-gnu
libc6-dev-i386-cross libc6-i386`; tools/setup installs them)."""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile

from . import BUILD, ROOT, VENV_BIN

IMAGES = ("pip", "stock32", "fleet32")
TAG = "v1.28.0"
REPO = "https://github.com/micropython/micropython"
MPY_BUILD = os.path.join(BUILD, "micropython")
IMAGE_DIR = os.path.join(BUILD, "images")
UNIX_BOARD = os.path.join(ROOT, "boards", "UNIX")
STOCK_MANIFEST = os.path.join(UNIX_BOARD, "manifest-stock32.py")
FLEET_MANIFEST = os.path.join(UNIX_BOARD, "manifest.py")
MAKE_FLAGS = ["CROSS_COMPILE=i686-linux-gnu-", "MICROPY_PY_FFI=0", "MICROPY_PY_BTREE=0"]


class ImageError(RuntimeError):
    pass


def say(msg: str) -> None:
    print(f"images: {msg}", flush=True)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_source(path: str) -> bool:
    return all(os.path.isdir(os.path.join(path, d)) for d in ("py", "ports/unix", "mpy-cross"))


def source() -> tuple[str, str]:
    """(MicroPython source folder, an identity string for stamps)."""
    spec = os.environ.get("MICROPY_SRC", "").strip()
    if spec:
        spec = os.path.abspath(os.path.expanduser(spec))
        if os.path.isdir(spec):
            if not _is_source(spec):
                raise ImageError(f"MICROPY_SRC={spec} is not a MicroPython checkout (no py/, "
                                 "ports/unix/, mpy-cross/)")
            head = subprocess.run(["git", "-C", spec, "rev-parse", "HEAD"], capture_output=True,
                                  text=True)
            return spec, "dir:" + spec + ":" + (head.stdout.strip() if head.returncode == 0 else "")
        if os.path.isfile(spec) and spec.endswith((".tar.xz", ".txz")):
            return _unpack(spec)
        raise ImageError(f"MICROPY_SRC={spec}: neither a folder nor a .tar.xz archive")
    return _clone()


def _unpack(archive: str) -> tuple[str, str]:
    digest = _sha256_file(archive)
    dest = os.path.join(MPY_BUILD, "src-" + digest[:16])
    done = os.path.join(dest, ".unpacked")
    if not os.path.exists(done):
        say(f"unpacking {os.path.basename(archive)}")
        shutil.rmtree(dest, ignore_errors=True)
        os.makedirs(dest)
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
        open(done, "w").close()
    tops = [d for d in os.listdir(dest) if os.path.isdir(os.path.join(dest, d))]
    for top in [dest] + [os.path.join(dest, d) for d in tops]:
        if _is_source(top):
            return top, "archive:" + digest
    raise ImageError(f"{archive} holds no MicroPython source tree")


def _clone() -> tuple[str, str]:
    dest = os.path.join(MPY_BUILD, "git-" + TAG)
    if not _is_source(dest):
        say(f"MICROPY_SRC is unset: cloning {REPO} {TAG} (set MICROPY_SRC to a checkout or an "
            "archive where GitHub cannot be reached)")
        shutil.rmtree(dest, ignore_errors=True)
        try:
            subprocess.run(["git", "clone", "--depth", "1", "--branch", TAG, REPO, dest],
                           check=True)
            subprocess.run(["git", "-C", dest, "submodule", "update", "--init", "--depth", "1",
                            "lib/mbedtls", "lib/micropython-lib"], check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise ImageError(f"cloning MicroPython failed ({e}); set MICROPY_SRC") from None
    return dest, "git:" + TAG


def _make(args: list[str], log: str) -> None:
    with open(log, "w") as f:
        r = subprocess.run(["make", "-j2", *args], stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise ImageError(f"make {' '.join(args[:2])} failed (log {log}):\n{tail}")


def mpy_cross(src: str) -> str:
    """MicroPython's own mpy-cross for this source (built in the source tree, where its
    Makefile puts it)."""
    exe = os.path.join(src, "mpy-cross", "build", "mpy-cross")
    if not os.access(exe, os.X_OK):
        os.makedirs(IMAGE_DIR, exist_ok=True)
        say("building mpy-cross")
        _make(["-C", os.path.join(src, "mpy-cross")], os.path.join(IMAGE_DIR, "mpy-cross.log"))
    return exe


def _frozen_inputs(name: str) -> list[str]:
    """The files whose content decides an image: its manifests and the code they freeze."""
    files = [STOCK_MANIFEST]
    if name == "fleet32":
        files.append(FLEET_MANIFEST)
        for base in (os.path.join(ROOT, "lib", "iotjobs"),):
            files += sorted(os.path.join(base, f) for f in os.listdir(base) if f.endswith(".py"))
        files += [os.path.join(ROOT, "firmware", f) for f in ("app.py", "iotjobs_board.py",
                                                            "esp32sim.py")]
    return files


def stamp_of(name: str, identity: str) -> str:
    h = hashlib.sha256((name + "\n" + identity + "\n" + " ".join(MAKE_FLAGS)).encode())
    for path in _frozen_inputs(name):
        h.update(os.path.relpath(path, ROOT).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def interpreter(name: str) -> str:
    """The path of an image's interpreter (built or not)."""
    if name == "pip":
        return os.path.join(VENV_BIN, "micropython")
    if name not in IMAGES:
        raise ImageError(f"unknown image {name!r} (one of {', '.join(IMAGES)})")
    return os.path.join(IMAGE_DIR, name, "micropython")


def build_image(name: str, src: str | None = None, identity: str | None = None) -> str:
    """Build one image if its inputs changed; the interpreter's path."""
    exe = interpreter(name)
    if name == "pip":
        return exe
    if src is None or identity is None:
        src, identity = source()
    out = os.path.dirname(exe)
    stamp_file = os.path.join(out, ".stamp")
    want = stamp_of(name, identity)
    if os.access(exe, os.X_OK) and os.path.exists(stamp_file):
        with open(stamp_file) as f:
            if f.read().strip() == want:
                return exe
    if shutil.which("i686-linux-gnu-gcc") is None:
        raise ImageError("i686-linux-gnu-gcc is missing: apt-get install gcc-i686-linux-gnu "
                         "libc6-dev-i386-cross libc6-i386 (tools/setup does it as root)")
    mpy_cross(src)
    manifest = STOCK_MANIFEST
    if name == "fleet32":
        manifest = os.path.join(IMAGE_DIR, "fleet32-manifest.py")
        os.makedirs(IMAGE_DIR, exist_ok=True)
        with open(manifest, "w") as f:
            f.write("# generated by tools/iotjobs_host/images.py: stock32 plus the fleet code\n"
                    f"include({STOCK_MANIFEST!r})\ninclude({FLEET_MANIFEST!r})\n")
    say(f"building {name} (32-bit unix port, frozen {os.path.relpath(manifest, ROOT)})")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    _make(["-C", os.path.join(src, "ports", "unix"), f"BUILD={out}", *MAKE_FLAGS,
           f"FROZEN_MANIFEST={manifest}"], os.path.join(IMAGE_DIR, name + ".log"))
    if not os.access(exe, os.X_OK):
        raise ImageError(f"{name}: make succeeded but left no {exe}")
    with open(stamp_file, "w") as f:
        f.write(want + "\n")
    return exe


def build_all(names: tuple[str, ...] = IMAGES) -> dict[str, str]:
    src, identity = source()
    return {n: build_image(n, src, identity) for n in names}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/images", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", metavar="IMAGE", help="pip, stock32, fleet32 (default: all)")
    ap.add_argument("--path", action="store_true", help="print each image's interpreter path")
    args = ap.parse_args(argv)
    try:
        built = build_all(tuple(args.names) or IMAGES)
    except ImageError as e:
        print(f"images: {e}", file=sys.stderr)
        return 1
    for name, exe in built.items():
        print(f"{name}: {exe}" if args.path else f"images: {name} ready")
    return 0


# -- ESP32 boards: their freeze manifests through MicroPython's own tooling ---------------------
ESP32_STOCK = "boards/manifest.py"  # under ports/esp32: what a stock image freezes


def _manifest_targets(src: str, manifest: str, skip: str | None = None) -> set[str]:
    """The device paths a manifest freezes (manifestfile, MicroPython's own parser); with
    `skip`, without what including that manifest brings (the board's own additions)."""
    sys.path.insert(0, os.path.join(src, "tools"))
    try:
        import manifestfile as mf
    finally:
        sys.path.pop(0)
    path_vars = {"MPY_DIR": src, "PORT_DIR": os.path.join(src, "ports", "esp32"),
                 "MPY_LIB_DIR": os.path.join(src, "lib", "micropython-lib"),
                 "BOARD_DIR": os.path.dirname(manifest)}

    class Own(mf.ManifestFile):
        def include(self, manifest_path, is_require=False, **kwargs):
            if (skip and not is_require and isinstance(manifest_path, str)
                    and self._resolve_path(manifest_path) == skip):
                return None
            return super().include(manifest_path, is_require=is_require, **kwargs)

    m = Own(mf.MODE_FREEZE, path_vars)
    cwd = os.getcwd()
    try:
        m.execute(manifest)
    except mf.ManifestFileError as e:
        raise ImageError(f"{os.path.relpath(manifest, ROOT)}: {e}") from None
    finally:
        os.chdir(cwd)
    return {f.target_path for f in m.files()}


def freeze_board(board: str, arch: str, manifest: str | None = None,
                 out: str | None = None) -> dict:
    """Run a board's manifest through MicroPython's tools/makemanifest.py with the ESP32 port's
    folder and mpy-cross for the board's architecture. Fails (ImageError) on a manifest that
    names a missing file or freezes again a module the stock image already freezes. Returns
    the frozen .mpy sizes: all of them and ours (iotjobs/, app, iotjobs_board)."""
    src, _ = source()
    mpy_cross(src)
    manifest = manifest or os.path.join(ROOT, "boards", board, "manifest.py")
    stock = os.path.join(src, "ports", "esp32", ESP32_STOCK)
    again = _manifest_targets(src, manifest, skip=stock) & _manifest_targets(src, stock)
    if again:
        raise ImageError(f"{os.path.relpath(manifest, ROOT)} freezes again what the stock "
                         f"image already freezes: {', '.join(sorted(again))}")
    out = out or os.path.join(BUILD, "frozen", board)  # not under build/<board>/: deployed
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    r = subprocess.run([sys.executable, os.path.join(src, "tools", "makemanifest.py"),
                        "-o", os.path.join(out, "frozen_content.c"),
                        "-v", f"MPY_DIR={src}", "-v", f"PORT_DIR={os.path.join(src, 'ports', 'esp32')}",
                        "-v", f"MPY_LIB_DIR={os.path.join(src, 'lib', 'micropython-lib')}",
                        "-b", out, f"-f-march={arch}", manifest],
                       capture_output=True, text=True)
    # Without ESP-IDF the tool stops where it needs the port's generated qstr header, after
    # every module is compiled: that stop is expected, anything else is the manifest's fault.
    if r.returncode != 0 and "qstrdefs.preprocessed.h" not in r.stderr + r.stdout:
        raise ImageError(f"makemanifest.py failed on {os.path.relpath(manifest, ROOT)}:\n"
                         + (r.stderr or r.stdout)[-2000:])
    frozen = os.path.join(out, "frozen_mpy")
    sizes = {}
    for dirpath, _, files in os.walk(frozen):
        for name in files:
            p = os.path.join(dirpath, name)
            sizes[os.path.relpath(p, frozen)] = os.path.getsize(p)
    ours = {k: v for k, v in sizes.items()
            if k.startswith("iotjobs/") or k in ("app.mpy", "iotjobs_board.mpy")}
    if not ours:
        raise ImageError(f"{os.path.relpath(manifest, ROOT)}: nothing of ours was frozen")
    return {"modules": len(sizes), "bytes": sum(sizes.values()), "ours_bytes": sum(ours.values()),
            "ours_modules": len(ours)}
