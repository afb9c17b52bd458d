"""Where the device's heap goes: a no-op job or a 1 MiB signed OTA on one image, with the heap
dumped at the runner's named points (the smallest heaps: `tools/bench --only heaps`).

A measuring aid, not a test. It drives tools/iotjobs_host/bench.py's Bench (mosquitto, jobsd,
devsim) unchanged; for `noop` and `ota` the firmware starts through a probe `main` module put in
front of the device code on MICROPYPATH, which wraps app.ticking (the runner's on_point) so that
every named point first runs gc.collect() and prints gc.mem_alloc(), gc.mem_free() and
micropython.mem_info() (mem_info(1), the block map, at the points named in MEMPROBE_MAP). The
device's log is printed at the end.

  .venv/bin/python host_tests/scripts/memprobe.py noop --image fleet32 [--plain] [--heap 64]
  .venv/bin/python host_tests/scripts/memprobe.py ota --image fleet32 [--plain] [--heap 96]

The probe module itself takes a little heap (about 1 KB: it is compiled from source at boot).
"""
from __future__ import annotations

import argparse
import os
import shutil
import stat
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tools"))

PROBE_MAIN = """\
import gc
import micropython
import os

_MAP = (os.getenv("MEMPROBE_MAP") or "").split(",")
_ONCE = ("ota-block", "ota-checkpoint", "app-file", "app-checkpoint")
_seen = {}


def _dump(at):
    n = _seen.get(at, 0) + 1
    _seen[at] = n
    if at in _ONCE and n not in (1, 2, 100):
        return
    gc.collect()
    print("@@MEM %s#%d alloc=%d free=%d" % (at, n, gc.mem_alloc(), gc.mem_free()))
    micropython.mem_info(1 if at in _MAP else 0)


_dump("boot")
import app  # noqa: E402

_dump("app-imported")
_ticking = app.ticking


def _probe_ticking(hook):
    inner = _ticking(hook)

    def on_point(at):
        _dump(at)
        inner(at)

    return on_point


app.ticking = _probe_ticking
_selftest = app.selftest


def _probe_selftest(runner, cfg):
    _dump("built")
    _selftest(runner, cfg)


app.selftest = _probe_selftest
app.main()
"""


def _devsim(argv: list[str]) -> int:
    """tools/devsim with the probe's folder in front of the device code on MICROPYPATH."""
    from iotjobs_host import devsim

    build = devsim.build
    probe = os.environ["MEMPROBE_DIR"]
    devsim.build = lambda target: probe + ":" + build(target)
    return devsim.main(argv)


def _probe_tools(work: str) -> str:
    """A folder with a `devsim` that runs _devsim (stack.Device starts TOOLS/devsim)."""
    probe = os.path.join(work, "probe")
    os.makedirs(probe, exist_ok=True)
    with open(os.path.join(probe, "main.py"), "w") as f:
        f.write(PROBE_MAIN)
    tools = os.path.join(work, "probe-tools")
    os.makedirs(tools, exist_ok=True)
    exe = os.path.join(tools, "devsim")
    with open(exe, "w") as f:
        f.write(f"#!/bin/sh\nexec {sys.executable} {os.path.abspath(__file__)} --devsim \"$@\"\n")
    os.chmod(exe, os.stat(exe).st_mode | stat.S_IEXEC)
    os.environ["MEMPROBE_DIR"] = probe
    return tools


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--devsim"]:
        return _devsim(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("what", choices=["noop", "ota"])
    ap.add_argument("--image", default="fleet32")
    ap.add_argument("--plain", action="store_true", help="plain TCP instead of mutual TLS")
    ap.add_argument("--heap", type=int, default=0, help="KB (default: noop 64, ota 96)")
    ap.add_argument("--map", default="", help="points whose block map is printed")
    ap.add_argument("--noprobe", action="store_true", help="noop, ota: the plain firmware (its log only)")
    args = ap.parse_args(argv)

    from iotjobs_host import BUILD, stack
    from iotjobs_host.bench import Bench
    from iotjobs_host.build import build

    work = os.path.join(BUILD, "memprobe", args.what + ("-plain" if args.plain else "") + "-" + args.image)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    build("host")
    b = Bench(work, args.image)
    try:
        if not args.noprobe:
            stack.TOOLS = _probe_tools(work)  # after mosquitto and jobsd: only devsim is replaced
        os.environ["MEMPROBE_MAP"] = args.map
        devices = []
        device = stack.Device

        def keep(*a, **kw):
            d = device(*a, **kw)
            devices.append(d)
            return d

        stack.Device = keep  # to print the device's log afterwards
        if args.what == "noop":
            thing, spy, dev, _, _ = b.device(f"{args.heap or 64}K", not args.plain)
            try:
                print("job ok:", b.job_ok(thing, dev))
            finally:
                dev.stop()
                spy.stop()
        else:
            print("ota seconds:", b.ota(args.heap or 96, tls=not args.plain))
        for d in devices:
            print(d.log_text(10**7))
        return 0
    finally:
        b.stop()


if __name__ == "__main__":
    sys.exit(main())
