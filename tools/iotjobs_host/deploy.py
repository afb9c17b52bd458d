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
Every mpremote call uses `resume`, so nothing resets the board before the end."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
from typing import Optional

from . import ROOT, VENV_BIN
from .build import board_info, build_board, size_report

MPREMOTE = os.path.join(VENV_BIN, "mpremote")
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
    have = remote_hashes(port, [rel for _, rel in files])
    todo = [(local, rel) for local, rel in files if have[rel] != _sha(local)]
    log(f"deploy: {len(files)} file(s) for {board}, {len(todo)} changed")
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
    if reset:
        # A soft reset restarts main.py on a board (on the unix port it ends the process).
        subprocess.run([MPREMOTE, "connect", port, "soft-reset"], capture_output=True, timeout=30)
        log("deploy: soft reset")
    return [rel for _, rel in todo]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/deploy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", required=True, help="what `mpremote connect` takes")
    ap.add_argument("--board", default="ESP32_GENERIC", help="boards/<BOARD> (default ESP32_GENERIC)")
    ap.add_argument("--config", metavar="DIR", help="config.json and certs/ (tools/provision --out)")
    ap.add_argument("--no-reset", action="store_true", help="leave the board at the REPL")
    ap.add_argument("--dry-run", action="store_true", help="list what would be copied")
    a = ap.parse_args(argv)
    try:
        deploy(a.port, a.board, a.config, not a.no_reset, a.dry_run)
    except (DeployError, ValueError) as e:
        print(f"deploy: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"deploy: build failed: {e}", file=sys.stderr)
        return 1
    return 0
