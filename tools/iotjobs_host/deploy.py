"""`tools/deploy`: put the compiled job runner, the firmware wiring and a device's config onto a
board with mpremote, copying only the files that changed, then soft-reset it.

    tools/deploy --port /dev/ttyUSB0 [--board ESP32_GENERIC] [--config build/provision/dev1]
                 [--no-reset] [--dry-run]

1. builds the board (`tools/build --board`, build/<BOARD>/);
2. adds the device's config.json and certs/ from `--config DIR` (what `tools/provision` writes);
3. asks the board for the SHA-256 of each of those paths (one small script run by mpremote) and
   copies only the files whose hash differs or that are missing, one line of progress each;
4. soft-resets the board so main.py starts (`--no-reset` leaves it at the REPL).

The port is anything `mpremote connect` takes: /dev/ttyUSB0, COM3, a pseudo-terminal in front
of the unix port (how the tests drive it: PLATFORM.md, "mpremote against the unix port").
Every mpremote call uses `resume`, so nothing resets the board before the end.

`--romfs` puts the code into the board's ROMFS partition instead (../shared/ESP32-MEMORY.md,
section 3: bytecode read in place from flash, about half the heap of .mpy files):

    tools/deploy --port /dev/ttyUSB0 --romfs [--partitions my-table.csv] [--config DIR]
    tools/deploy --board UNIX --romfs-build lib.romfs      # only build the image, no board

1. the board's partition table (board.json "partitions", or `--partitions CSV`: the table of a
   custom image) must have a data partition labelled `romfs`, and the image must fit it; no
   stock table has one, so without it deploy refuses before touching the board;
2. the compiled modules (every .mpy of build/<BOARD>/) go into an image built by
   `mpremote romfs build` (kept as build/romfs/<BOARD>.romfs), written by `mpremote romfs
   deploy` (which refuses an image built without MICROPY_VFS_ROM: no `vfs.rom_ioctl`);
3. main.py, board.json, config.json and certs/ stay on the filesystem (copied when changed);
4. copies of those modules left on the filesystem by an earlier deploy or by mip (in / or /lib,
   both before /rom on sys.path) are removed, or they would be imported instead;
5. the soft reset mounts the new image at /rom."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

from . import BUILD, ROOT, VENV_BIN
from .build import BOARDS, board_info, build_board, size_report

MPREMOTE = os.path.join(VENV_BIN, "mpremote")
ROMFS_LABEL = "romfs"  # what the esp32 port looks for (esp32_partition.c: data, any subtype)
ROMFS_HEADER = b"\xd2\xcd\x31"
_BATCH = 6
_HASH_SCRIPT = """
import binascii, hashlib
def _h(p):
    try:
        d = hashlib.sha256()
        with open(p, "rb") as f:
            while True:
                b = f.read(512)
                if not b:
                    break
                d.update(b)
        return binascii.hexlify(d.digest()).decode()
    except OSError:
        return "-"
for _p in %s:
    print("@@", _p, _h(_p))
"""


class DeployError(Exception):
    pass


def plan(board: str, config: Optional[str]) -> list[tuple[str, str]]:
    """(local file, path on the board) of everything that belongs on the board."""
    board_info(board)  # a clear error for an unknown board
    out = build_board(board)
    files = [(os.path.join(out, rel), rel) for rel, _ in size_report(out)]
    if config:
        cfg = os.path.join(config, "config.json")
        if not os.path.isfile(cfg):
            raise DeployError(f"{cfg} is missing: run tools/provision first")
        try:
            with open(cfg) as f:
                json.load(f)
        except ValueError as e:
            raise DeployError(f"{cfg} is not JSON: {e}") from None
        files.append((cfg, "config.json"))
        certs = os.path.join(config, "certs")
        if os.path.isdir(certs):
            for name in sorted(os.listdir(certs)):
                files.append((os.path.join(certs, name), f"certs/{name}"))
    return files


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def mpremote(port: str, *args: str, capture: bool = True, timeout: float = 60):
    cmd = [MPREMOTE, "connect", port, "resume", *args]
    try:
        r = subprocess.run(cmd, capture_output=capture, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DeployError(f"mpremote did not finish in {timeout:.0f} s: {shlex.join(cmd)}") from None
    if r.returncode != 0:
        raise DeployError(f"mpremote failed ({r.returncode}): {(r.stderr or r.stdout or '').strip()}")
    return r.stdout or ""


def remote_hashes(port: str, paths: list[str]) -> dict[str, str]:
    out = mpremote(port, "exec", _HASH_SCRIPT % json.dumps(paths))
    hashes = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "@@":
            hashes[parts[1]] = parts[2]
    missing = [p for p in paths if p not in hashes]
    if missing:
        raise DeployError(f"the board did not report {len(missing)} file(s): {missing[:3]}")
    return hashes


def deploy(port: str, board: str, config: Optional[str], reset: bool, dry_run: bool,
           log=print) -> list[str]:
    """Copy what changed; returns the board paths copied."""
    files = plan(board, config)
    if dry_run:
        for local, rel in files:
            log(f"would copy {os.path.relpath(local, ROOT)} -> :{rel}")
        return [rel for _, rel in files]
    todo = copy_changed(port, files, f"deploy: {len(files)} file(s) for {board}", log)
    remove_retired(port, log)
    if reset:
        soft_reset(port, log)
    return [rel for _, rel in todo]


# What earlier releases deployed and this one no longer uses: the board module was `platform`
# until it was renamed iotjobs_board (MicroPython has a built-in `platform`). Only the compiled
# file is ours (deploy never copied a platform.py): a user's own source is left alone.
RETIRED = ("platform.mpy",)


def remove_retired(port: str, log=print) -> list[str]:
    """Remove from the board's filesystem root what RETIRED names; returns what was removed."""
    out = mpremote(port, "exec", _REMOVE_SCRIPT % (json.dumps(list(RETIRED)), "[]"))
    gone = [ln[3:] for ln in out.splitlines() if ln.startswith("@@ ")]
    if gone:
        log(f"deploy: removed what an earlier release left: {', '.join(gone)}")
    return gone


def soft_reset(port: str, log=print) -> None:
    # A soft reset restarts main.py on a board (on the unix port it ends the process).
    subprocess.run([MPREMOTE, "connect", port, "soft-reset"], capture_output=True, timeout=30)
    log("deploy: soft reset")


def copy_changed(port: str, files: list[tuple[str, str]], what: str,
                 log=print) -> list[tuple[str, str]]:
    """Copy the files whose hash on the board differs; returns those copied."""
    have = remote_hashes(port, [rel for _, rel in files])
    todo = [(local, rel) for local, rel in files if have[rel] != _sha(local)]
    log(f"{what}, {len(todo)} changed")
    dirs = sorted({os.path.dirname(rel) for _, rel in todo if os.path.dirname(rel)})
    for d in dirs:  # mkdir of an existing folder fails: ask the board to make them quietly
        mpremote(port, "exec", f"import os\ntry:\n    os.mkdir({d!r})\nexcept OSError:\n    pass")
    done = 0
    for k in range(0, len(todo), _BATCH):  # one mpremote call per batch: a connection costs ~0.3 s
        batch = todo[k:k + _BATCH]
        args: list[str] = []
        for local, rel in batch:
            args += [*(["+"] if args else []), "fs", "cp", local, f":{rel}"]
        mpremote(port, *args, timeout=60 + 10 * len(batch))
        for local, rel in batch:
            done += 1
            log(f"[{done}/{len(todo)}] {rel} ({os.path.getsize(local)} bytes)")
    return todo


# -- ROMFS -------------------------------------------------------------------------------------
def _size(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(t[-1:], 1)
    return int(t[:-1] if mult > 1 else t, 0) * mult


def partition_table(board: str, partitions: Optional[str] = None) -> tuple[str, list[dict]]:
    """(path, rows) of the board's partition table: `partitions`, else board.json's."""
    if partitions is None:
        name = board_info(board).get("partitions")
        if not name:
            raise DeployError(
                f"board {board} has no partition table (board.json \"partitions\" is null), so "
                "no romfs partition to deploy to; give a table with --partitions, or build the "
                "image with --romfs-build FILE (tools/devsim --lib FILE boots the unix port from it)")
        partitions = os.path.join(BOARDS, "partitions", name)
    rows = []
    try:
        with open(partitions) as f:
            for n, line in enumerate(f, 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                cols = [c.strip() for c in line.split(",")]
                if len(cols) < 5:
                    raise DeployError(f"{partitions}:{n}: a row needs name, type, subtype, "
                                      "offset, size")
                try:
                    size = _size(cols[4])
                except ValueError:
                    raise DeployError(f"{partitions}:{n}: size {cols[4]!r} is not a number") from None
                rows.append({"name": cols[0], "type": cols[1].lower(), "subtype": cols[2],
                             "offset": cols[3], "size": size})
    except OSError as e:
        raise DeployError(f"partition table {partitions}: {e.strerror}") from None
    return partitions, rows


def romfs_partition(board: str, partitions: Optional[str] = None) -> dict:
    """The board's `romfs` row (its size); DeployError naming the table when there is none."""
    path, rows = partition_table(board, partitions)
    shown = os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path
    found = [r for r in rows if r["name"] == ROMFS_LABEL]
    if not found:
        raise DeployError(
            f"{board}: the partition table {shown} has no partition labelled `{ROMFS_LABEL}` "
            f"(it has {', '.join(r['name'] for r in rows) or 'none'}). ROMFS needs a MicroPython "
            "image built with MICROPY_VFS_ROM and a table with a `romfs, data, ...` row, which no "
            "stock esp32 image has (../shared/ESP32-MEMORY.md, section 3); give that table with "
            "--partitions FILE")
    row = found[0]
    if row["type"] not in ("data", "0x01", "1"):
        raise DeployError(f"{shown}: the `{ROMFS_LABEL}` partition has type {row['type']!r}; "
                          "the esp32 port mounts only a data partition")
    return {**row, "table": shown}


def romfs_split(files: list[tuple[str, str]]) -> tuple[list, list]:
    """(what goes into the ROMFS image: the compiled modules, what stays on the filesystem)."""
    image, fs = [], []
    for local, rel in files:
        (image if rel.endswith(".mpy") else fs).append((local, rel))
    return image, fs


def build_romfs(files: list[tuple[str, str]], out: str, log=print) -> int:
    """Build a ROMFS image of `files` ((local, path in the image)) into `out` with
    `mpremote romfs build`; returns its size."""
    staging = tempfile.mkdtemp(prefix="romfs-")
    try:
        tree = os.path.join(staging, "tree")
        for local, rel in files:
            os.makedirs(os.path.dirname(os.path.join(tree, rel)), exist_ok=True)
            shutil.copyfile(local, os.path.join(tree, rel))
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        tmp = os.path.join(staging, "image.romfs")
        # --no-mpy: the files are compiled already, for the board's architecture
        cmd = [MPREMOTE, "romfs", "--no-mpy", "-o", tmp, "build", tree]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode != 0 or not os.path.isfile(tmp):
            raise DeployError(f"mpremote romfs build failed ({r.returncode}): "
                              f"{(r.stderr or r.stdout).strip()}")
        with open(tmp, "rb") as f:
            head = f.read(3)
        if head != ROMFS_HEADER:
            raise DeployError(f"mpremote romfs build wrote no ROMFS image: {head!r}")
        shutil.move(tmp, out + f".{os.getpid()}.tmp")
        os.replace(out + f".{os.getpid()}.tmp", out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = os.path.getsize(out)
    log(f"deploy: ROMFS image {os.path.relpath(out, ROOT) if out.startswith(ROOT) else out}: "
        f"{len(files)} file(s), {size} bytes")
    return size


def image_files(board: str) -> list[tuple[str, str]]:
    return romfs_split(plan(board, None))[0]


_REMOVE_SCRIPT = """
import os
def _exists(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False
for _p in %s:
    if _exists(_p):
        os.remove(_p)
        print("@@", _p)
for _d in %s:
    if _exists(_d):
        try:
            os.rmdir(_d)
            print("@@", _d)
        except OSError:
            print("!!", _d)
"""


def shadows(image_rels: list[str]) -> tuple[list[str], list[str]]:
    """(files, folders) on the filesystem that would be imported before /rom: each module of
    the image as .mpy or .py in / and in /lib (an earlier plain deploy, a mip install), and
    their folders (deepest first: a folder left behind still hides the package in /rom)."""
    files, dirs = [], set()
    for rel in image_rels:
        for base in ("", "lib/"):
            files += [base + rel, base + rel[:-4] + ".py"]
            d = os.path.dirname(rel)
            while d:
                dirs.add(base + d)
                d = os.path.dirname(d)
    return files, sorted(dirs, key=lambda d: (-d.count("/"), d))


def deploy_romfs(port: Optional[str], board: str, config: Optional[str], reset: bool,
                 dry_run: bool, partitions: Optional[str] = None, out: Optional[str] = None,
                 log=print) -> dict:
    """The code into the board's romfs partition, the rest onto its filesystem."""
    part = romfs_partition(board, partitions)
    files = plan(board, config)
    in_image, on_fs = romfs_split(files)
    out = out or os.path.join(BUILD, "romfs", board + ".romfs")
    size = build_romfs(in_image, out, log)
    if size > part["size"]:
        raise DeployError(f"the ROMFS image ({size} bytes) does not fit the `{ROMFS_LABEL}` "
                          f"partition of {part['table']} ({part['size']} bytes)")
    log(f"deploy: `{ROMFS_LABEL}` partition of {part['table']}: {part['size']} bytes, "
        f"{100 * size // part['size']}% used")
    result = {"image": out, "size": size, "in_image": [rel for _, rel in in_image],
              "on_fs": [rel for _, rel in on_fs], "removed": [], "kept": []}
    if dry_run:
        for _, rel in in_image:
            log(f"would put {rel} into the ROMFS image")
        for local, rel in on_fs:
            log(f"would copy {os.path.relpath(local, ROOT)} -> :{rel}")
        return result
    if port is None:
        raise DeployError("--romfs needs --port")
    # mpremote refuses an image larger than the board's partition and a board without ROMFS
    r = subprocess.run([MPREMOTE, "connect", port, "resume", "romfs", "deploy", out],
                       capture_output=True, text=True, timeout=600)
    said = (r.stdout + r.stderr).strip()
    if r.returncode != 0 or "ROMFS image deployed" not in r.stdout:
        if "ROMFS is not enabled" in said:
            raise DeployError("the board's MicroPython has no ROMFS (no vfs.rom_ioctl: built "
                              "without MICROPY_VFS_ROM); mpremote said: " + said.splitlines()[-1])
        raise DeployError(f"mpremote romfs deploy failed ({r.returncode}): {said[-500:]}")
    log(f"deploy: ROMFS image written ({size} bytes)")
    copy_changed(port, on_fs, f"deploy: {len(on_fs)} file(s) on the filesystem", log)
    paths, dirs = shadows(result["in_image"])
    paths += [p for p in RETIRED if p not in paths]
    said = mpremote(port, "exec", _REMOVE_SCRIPT % (json.dumps(paths), json.dumps(dirs)))
    result["removed"] = [ln[3:] for ln in said.splitlines() if ln.startswith("@@ ")]
    result["kept"] = [ln[3:] for ln in said.splitlines() if ln.startswith("!! ")]
    if result["removed"]:
        log(f"deploy: removed from the filesystem (imported before /rom): "
            f"{', '.join(result['removed'])}")
    for d in result["kept"]:
        log(f"deploy: warning: the folder {d} holds other files and hides the package of the "
            "same name in /rom: remove it")
    if reset:
        soft_reset(port, log)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/deploy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", help="what `mpremote connect` takes (not needed to only build an image)")
    ap.add_argument("--board", default="ESP32_GENERIC", help="boards/<BOARD> (default ESP32_GENERIC)")
    ap.add_argument("--config", metavar="DIR", help="config.json and certs/ (tools/provision --out)")
    ap.add_argument("--no-reset", action="store_true", help="leave the board at the REPL")
    ap.add_argument("--dry-run", action="store_true", help="list what would be copied")
    ap.add_argument("--romfs", action="store_true",
                    help="the code into the board's `romfs` partition (mpremote romfs deploy)")
    ap.add_argument("--partitions", metavar="CSV",
                    help="with --romfs: the partition table of the board's image, when it is not "
                         "board.json's (a custom image with a romfs row)")
    ap.add_argument("--romfs-build", metavar="FILE",
                    help="build the board's ROMFS image into FILE; alone, only that (no board, "
                         "no partition table: tools/devsim --lib FILE boots the unix port from "
                         "it); with --romfs, the image deployed (default build/romfs/BOARD.romfs)")
    a = ap.parse_args(argv)
    if a.port is None and not (a.romfs_build and not a.romfs):
        ap.error("--port is required (only --romfs-build FILE alone does without)")
    try:
        out = os.path.abspath(a.romfs_build) if a.romfs_build else None
        if a.romfs:
            deploy_romfs(a.port, a.board, a.config, not a.no_reset, a.dry_run, a.partitions, out)
        elif out:
            build_romfs(image_files(a.board), out)
        else:
            deploy(a.port, a.board, a.config, not a.no_reset, a.dry_run)
    except (DeployError, ValueError) as e:
        print(f"deploy: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"deploy: build failed: {e}", file=sys.stderr)
        return 1
    return 0
