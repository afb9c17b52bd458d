"""`tools/stubcheck`: check the device code against each ESP32 board's real API surface.

The device code runs in CI on the unix port, whose modules differ from an ESP32's: a function
that exists only on unix, or a call with the wrong arguments, passes every test there and fails
on the board. The MicroPython stubs (PyPI's `micropython-esp32-esp32-generic-stubs` and its S3
and C3 siblings, with `micropython-stdlib-stubs`; pinned in requirements-stubs.txt) describe each
port's modules; pyright (requirements.txt) reads them as its typeshed.

    tools/stubcheck                      # every ESP32 board (boards/*/board.json "stubs")
    tools/stubcheck --board ESP32_GENERIC_C3 [FILE ...]   # these files instead (imports resolve
                                                          # as for the device code)
    tools/stubcheck --install            # only install the stubs (tools/setup does this)
    tools/stubcheck --editor [BOARD]     # write pyrightconfig.json at the root for an editor

Checked: lib/iotjobs, firmware/app.py, firmware/main.py and boards/esp32/ (the board module),
or the FILEs given. Reported (CHECKS): imports that do not resolve, attributes a module or class
does not have, calls that match no signature, arguments of the wrong type, undefined names.
Not reported: what only a fully typed program would care about (Optional narrowing, return
types). A false positive of the stubs is marked at its line with
`# pyright: ignore[rule]` and the reason. Exit status 1 when anything is reported, 2 on a usage
or set-up error.

Each board's stubs go into build/stubs/<BOARD>/ (`pip install --target`, re-done only when
requirements-stubs.txt changes); the configuration pyright reads is written to
build/stubcheck/<BOARD>/pyrightconfig.json."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from typing import Optional

from . import BUILD, ROOT, VENV_BIN
from .build import board_info, board_names

REQUIREMENTS = os.path.join(ROOT, "requirements-stubs.txt")
STUBS = os.path.join(BUILD, "stubs")
CONFIGS = os.path.join(BUILD, "stubcheck")
PYRIGHT = os.path.join(VENV_BIN, "pyright")
STDLIB_STUBS = "micropython-stdlib-stubs"
# What the device code is: the library, the firmware wiring, the ESP32 board module. The unix
# twins (firmware/iotjobs_board.py, esp32sim.py) and test aids never run on a board.
DEVICE_CODE = ["lib/iotjobs", "firmware/app.py", "firmware/main.py", "boards/esp32"]
# Where imports resolve, as on the board: / and /lib hold the library and the firmware, the
# board module is deployed in place of the twin; umqtt comes from the stubs (the stock image
# freezes umqtt.simple).
IMPORT_PATHS = ["boards/esp32", "lib", "firmware"]
CHECKS = {
    "reportMissingImports": "error",
    "reportAttributeAccessIssue": "error",
    "reportCallIssue": "error",
    "reportArgumentType": "error",
    "reportUndefinedVariable": "error",
}


class StubError(Exception):
    pass


def pins() -> dict[str, str]:
    """requirements-stubs.txt: package name -> `name==version`."""
    out = {}
    with open(REQUIREMENTS) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, sep, version = line.partition("==")
                if not sep or not version:
                    raise StubError(f"{REQUIREMENTS}: {line!r} is not pinned (name==version)")
                out[name.strip().lower()] = line
    return out


def esp32_boards() -> list[str]:
    """The boards whose board.json names a stubs package (every ESP32 board)."""
    return [b for b in board_names() if board_info(b).get("stubs")]


def stubs_dir(board: str) -> str:
    return os.path.join(STUBS, board)


def install(board: str, quiet: bool = True) -> str:
    """The board's stubs in build/stubs/<BOARD>/ (pip --target, no dependencies: exactly the
    pinned packages); done again only when the pins change. Returns the folder."""
    info = board_info(board)
    name = info.get("stubs")
    if not name:
        raise StubError(f"board {board} names no stubs package (board.json \"stubs\")")
    p = pins()
    want = [p[n] for n in (name.lower(), STDLIB_STUBS) if n in p]
    if len(want) != 2:
        raise StubError(f"{REQUIREMENTS} pins no version of {name} or {STDLIB_STUBS}")
    stamp_value = hashlib.sha256("\n".join(want).encode()).hexdigest()
    out = stubs_dir(board)
    stamp = os.path.join(out, ".pins.sha256")
    try:
        with open(stamp) as f:
            if f.read().strip() == stamp_value:
                return out
    except OSError:
        pass
    if os.path.isdir(out):
        import shutil

        shutil.rmtree(out)
    cmd = [os.path.join(VENV_BIN, "python"), "-m", "pip", "install", "--quiet", "--no-deps",
           "--disable-pip-version-check", "--target", out, *want]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise StubError(f"pip could not install {' '.join(want)}:\n{r.stdout}{r.stderr}")
    if not os.path.isfile(os.path.join(out, "stdlib", "VERSIONS")):
        raise StubError(f"{out} holds no typeshed stdlib/VERSIONS: not a MicroPython stubs set")
    with open(stamp, "w") as f:
        f.write(stamp_value + "\n")
    if not quiet:
        print(f"stubcheck: {board}: installed {', '.join(want)}")
    return out


def config(board: str, files: Optional[list[str]] = None, where: Optional[str] = None) -> str:
    """Write the pyright configuration for one board (into `where`, default
    build/stubcheck/<BOARD>/); returns its path. Paths in it are relative to its folder, as
    pyright wants them."""
    where = where or os.path.join(CONFIGS, board)
    os.makedirs(where, exist_ok=True)

    def rel(p: str) -> str:
        return os.path.relpath(os.path.join(ROOT, p), where)

    cfg = {
        "include": [rel(p) for p in (files or DEVICE_CODE)],
        "exclude": ["**/__pycache__"],
        "typeshedPath": rel(os.path.relpath(stubs_dir(board), ROOT)),
        "stubPath": rel(os.path.relpath(stubs_dir(board), ROOT)),
        "extraPaths": [rel(p) for p in IMPORT_PATHS],
        "pythonVersion": "3.8",  # what MicroPython's grammar is closest to; the stubs say 3.8+
        "pythonPlatform": "Linux",
        "typeCheckingMode": "off",  # then only CHECKS: what makes a board fail
        "disableBytesTypePromotions": False,  # bytearray and memoryview pass where bytes do
        "reportMissingModuleSource": "none",  # a stub with no .py behind it is the point
        **CHECKS,
    }
    path = os.path.join(where, "pyrightconfig.json")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)
        f.write("\n")
    return path


def run_pyright(cfg: str) -> list[dict]:
    """pyright over one configuration; its diagnostics (errors and warnings)."""
    env = dict(os.environ, PYRIGHT_PYTHON_IGNORE_WARNINGS="1")  # no update check on PyPI
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    r = subprocess.run([PYRIGHT, "--outputjson", "-p", cfg], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    try:
        report = json.loads(r.stdout)
    except ValueError:
        raise StubError(f"pyright did not run (exit {r.returncode}):\n{r.stdout[-2000:]}"
                        f"{r.stderr[-2000:]}") from None
    return [d for d in report.get("generalDiagnostics", [])
            if d.get("severity") in ("error", "warning")]


def check(board: str, files: Optional[list[str]] = None) -> list[str]:
    """The problems pyright reports for `files` (default: the device code) on `board`, one line
    each: `path:line:col: rule: message`."""
    install(board)
    out = []
    for d in run_pyright(config(board, files)):
        path = os.path.relpath(d.get("file", "?"), ROOT)
        start = (d.get("range") or {}).get("start") or {}
        msg = " ".join(d.get("message", "").split())
        out.append(f"{path}:{start.get('line', 0) + 1}:{start.get('character', 0) + 1}: "
                   f"{d.get('rule', d.get('severity'))}: {msg}")
    return out


def editor_config(board: str, where: str = ROOT) -> str:
    """pyrightconfig.json (at the root unless told) for an editor (Pylance, pyright's language
    server): the same settings as the check, for the device code of `board`."""
    install(board)
    return config(board, where=where)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/stubcheck", description=__doc__.split("\n\n")[0])
    ap.add_argument("--board", action="append",
                    help="an ESP32 board (default: every board whose board.json names stubs)")
    ap.add_argument("--install", action="store_true", help="only install the stubs")
    ap.add_argument("--editor", nargs="?", const="ESP32_GENERIC", metavar="BOARD",
                    help="write pyrightconfig.json at the root for an editor (default board "
                         "ESP32_GENERIC) and exit")
    ap.add_argument("--out", metavar="DIR", default=ROOT,
                    help="with --editor: write the file into DIR (default: the root)")
    ap.add_argument("files", nargs="*", help="check these files instead of the device code")
    args = ap.parse_args(argv)
    try:
        known = esp32_boards()
        if args.editor:
            if args.editor not in known:
                raise StubError(f"unknown board {args.editor} (one of {', '.join(known)})")
            path = editor_config(args.editor, os.path.abspath(args.out))
            print(f"stubcheck: wrote {path} for {args.editor}")
            return 0
        boards = args.board or known
        for b in boards:
            if b not in known:
                raise StubError(f"unknown board {b} (one of {', '.join(known)})")
        files = [os.path.relpath(os.path.abspath(f), ROOT) for f in args.files]
        for f, given in zip(files, args.files, strict=True):
            if not os.path.exists(os.path.join(ROOT, f)):
                raise StubError(f"{given}: no such file or folder")
        if args.install:
            for b in boards:
                install(b, quiet=False)
            return 0
        failed = 0
        for b in boards:
            problems = check(b, files or None)
            for p in problems:
                print(f"{b}: {p}")
            what = ", ".join(files) if files else "the device code"
            print(f"stubcheck: {b}: {what}: {len(problems)} problem(s)")
            failed += bool(problems)
        return 1 if failed else 0
    except StubError as e:
        print(f"stubcheck: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
