"""A simulated device: firmware/ under the MicroPython unix port, its flash a host folder.

Like an ESP32 it boots, runs main, and boots again after a reset (platform.reset() ends the
process with RESET_EXIT) or a crash. The device sees only its flash folder (cwd) and the
compiled code in build/mpy/host (its frozen modules, in board terms)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from . import VENV_BIN
from .build import build

RESET_EXIT = 3  # firmware/platform.py
TLS_FILES = ("ca.der", "cert.der", "key.der")


def provision(flash: str, thing: str, broker: str, tls: str | None, keepalive: int = 60,
              extra: dict | None = None) -> None:
    """Write config.json (and the TLS files) into a fresh flash folder, as provisioning would.

    `extra` is merged into the config (tests use it for runner settings and halt points)."""
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


class Devsim:
    def __init__(self, flash: str, heap: str) -> None:
        self.flash = flash
        self.heap = heap
        self.child: subprocess.Popen | None = None
        self.stopping = False
        self.boots = 0

    def boot(self) -> int:
        code = build("host")
        env = dict(os.environ)
        env["MICROPYPATH"] = ".frozen:" + code
        self.boots += 1
        self.child = subprocess.Popen(
            [os.path.join(VENV_BIN, "micropython"), "-X", f"heapsize={self.heap}", "-m", "main"],
            cwd=self.flash, env=env, stdin=subprocess.DEVNULL,
        )
        # tests kill the firmware process (a power cut) by this pid
        print(f"devsim: boot {self.boots} (heap {self.heap}, pid {self.child.pid})", flush=True)
        rc = self.child.wait()
        self.child = None
        return rc

    def stop(self, *_: object) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        while not self.stopping:
            rc = self.boot()
            if self.stopping:
                break
            if rc == RESET_EXIT:
                print("devsim: reset", flush=True)
            else:
                # An ESP32 whose main.py dies is reset by the watchdog; so is this one, after a
                # pause that keeps a crash loop from spinning the host.
                print(f"devsim: firmware exited with {rc}; resetting", flush=True)
                time.sleep(1)
        return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/devsim", description=__doc__)
    ap.add_argument("--thing", required=True)
    ap.add_argument("--broker", required=True, help="HOST:PORT of the MQTT broker")
    ap.add_argument("--flash", required=True, help="folder that is the device's filesystem")
    ap.add_argument("--heap", default="80K", help="MicroPython heap, e.g. 80K (default)")
    ap.add_argument("--tls", help="folder with the thing's ca.der, cert.der and key.der")
    ap.add_argument("--keepalive", type=int, default=60, help="MQTT keepalive, seconds")
    ap.add_argument("--config", default="{}",
                    help="JSON object merged into the device's config.json on first start")
    args = ap.parse_args(argv)
    try:
        extra = json.loads(args.config)
        if not isinstance(extra, dict):
            raise ValueError("not an object")
    except ValueError as e:
        print(f"devsim: --config must be a JSON object: {e}", file=sys.stderr)
        return 2
    if args.tls:
        missing = [n for n in TLS_FILES if not os.path.exists(os.path.join(args.tls, n))]
        if missing:
            print(f"devsim: --tls {args.tls} lacks {', '.join(missing)}", file=sys.stderr)
            return 2
    provision(args.flash, args.thing, args.broker, args.tls, args.keepalive, extra)
    return Devsim(args.flash, args.heap).run()
