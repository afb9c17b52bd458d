"""`make size`: does each configuration fit each board?

Per ESP32 board (boards/*/board.json, its "memory" facts and their source) and per configuration:
- stock: a stock MicroPython image with our .mpy files on its filesystem (heap figures measured
  on the stock32 image);
- frozen: a fleet image with the library frozen in (figures from fleet32).
For each it prints the code size (frozen: against the OTA app slot), then, for each job type,
the GC heap the job needs (the smallest heap it completes in on the matching 32-bit image, over
TLS: MQTT over mutual TLS and its files over HTTPS), what the heap becomes on the board, the TLS
sessions held at once and the ESP-IDF heap that leaves, and FITS or DOES NOT FIT with the margin.

The model (ESP32-MEMORY.md s1 and s2):
- the GC heap starts at gc_heap_boot_kb; a job that needs more grows it once, to
  gc_heap_grown_kb, taking the difference from the ESP-IDF heap; one that needs more than that
  does not fit (a second growth takes what Wi-Fi and TLS need);
- the ESP-IDF heap left for TLS is idf_reserve_kb after the growth, plus the growth itself when
  the heap never grows;
- mbedTLS lives in the ESP-IDF heap: the sessions open at once hold tls_session_held_kb each, and
  the one being set up needs tls_handshake_peak_kb at its handshake; a job that downloads over
  HTTPS holds two (MQTT and HTTPS), the others one (an update over MQTT, a stream, included);
- the margin is the smaller of what is left of the GC heap and of the ESP-IDF heap. Where a board
  has no known ESP-IDF reserve (null in board.json), the verdict says so (UNKNOWN) instead of
  guessing.

Heap figures come from build/heaps.json (written by `make bench` and by this command); an image
whose figures are missing or older than its code is measured first (a few minutes each).
Exits 1 when a configuration README recommends (RECOMMENDED) does not fit a board."""
from __future__ import annotations

import argparse
import json
import sys

from . import build as B

CONFIGS = {"stock": "stock32", "frozen": "fleet32"}  # configuration -> the image that models it
RECOMMENDED = ("frozen",)  # README recommends the frozen image on every ESP32 board
JOBS = (("noop", "no-op job", 1), ("command", "ping command", 1),
        ("download", "download-file over HTTPS", 2), ("ota", "1 MiB signed OTA over HTTPS", 2),
        ("ota_mqtt", "1 MiB signed OTA over MQTT", 1),
        ("app_update", "app-update, 17 files over HTTPS", 2))
FACTS = ("gc_heap_boot_kb", "gc_heap_grown_kb", "idf_reserve_kb", "tls_session_held_kb",
         "tls_handshake_peak_kb")


def fit(mem: dict, need_kb: int, sessions: int) -> dict:
    """One job on one board: the verdict of the model above, with its parts."""
    boot, grown = mem["gc_heap_boot_kb"], mem["gc_heap_grown_kb"]
    reserve = mem.get("idf_reserve_kb")
    idf_need = sessions * mem["tls_session_held_kb"] + (mem["tls_handshake_peak_kb"]
                                                        - mem["tls_session_held_kb"])
    out = {"need_kb": need_kb, "sessions": sessions, "idf_need_kb": idf_need}
    if need_kb <= boot:
        out.update(heap_kb=boot, growths=0)
        idf_free = None if reserve is None else reserve + grown - boot
    elif need_kb <= grown:
        out.update(heap_kb=grown, growths=1)
        idf_free = reserve
    else:
        out.update(heap_kb=grown, growths=2, idf_free_kb=None, margin_kb=grown - need_kb,
                   verdict="DOES NOT FIT",
                   why=f"needs {need_kb} KB of GC heap, more than one growth gives ({grown} KB)")
        return out
    gc_margin = out["heap_kb"] - need_kb
    out["idf_free_kb"] = idf_free
    if idf_free is None:
        out.update(margin_kb=gc_margin, verdict="UNKNOWN",
                   why="the GC heap fits; the ESP-IDF heap left after Wi-Fi is not known here")
        return out
    idf_margin = idf_free - idf_need
    out["margin_kb"] = min(gc_margin, idf_margin)
    if idf_margin < 0:
        out.update(verdict="DOES NOT FIT",
                   why=f"{sessions} TLS session(s) need {idf_need} KB of ESP-IDF heap, "
                       f"{idf_free} KB left")
    else:
        out.update(verdict="FITS", why="")
    return out


def evaluate(boards: dict[str, dict], heaps: dict[str, dict]) -> list[dict]:
    """Every (board, configuration, job): `boards` name -> board.json, `heaps` image -> {job:
    {tls, plain}} (KB)."""
    rows = []
    for name, info in boards.items():
        mem = info["memory"]
        for config, image in CONFIGS.items():
            for job, label, sessions in JOBS:
                need = heaps[image][job]["tls"]
                r = fit(mem, need, sessions)
                r.update(board=name, config=config, image=image, job=job, label=label,
                         plain_kb=heaps[image][job].get("plain"),
                         recommended=config in RECOMMENDED)
                rows.append(r)
    return rows


def failures(rows: list[dict]) -> list[dict]:
    """The rows that break the exit status: a recommended configuration that does not fit."""
    return [r for r in rows if r["recommended"] and r["verdict"] == "DOES NOT FIT"]


def render(boards: dict[str, dict], rows: list[dict], code: dict[str, dict]) -> str:
    """The fit table of each board; `code` board -> {frozen_bytes, ours_bytes, slot_bytes,
    mpy_bytes}."""
    lines = []
    for name, info in boards.items():
        m = info["memory"]
        reserve = "unknown" if m.get("idf_reserve_kb") is None else f"{m['idf_reserve_kb']} KB"
        lines.append(f"## {name} ({info['chip']}): GC heap {m['gc_heap_boot_kb']} KB at boot, "
                     f"{m['gc_heap_grown_kb']} KB after one growth; ESP-IDF heap after the growth "
                     f"{reserve}; TLS {m['tls_session_held_kb']} KB held per session, "
                     f"{m['tls_handshake_peak_kb']} KB at a handshake")
        c = code.get(name) or {}
        if c:
            slot = c.get("slot_bytes") or 0
            share = f" ({100 * c['frozen_bytes'] / slot:.1f}% of it)" if slot else ""
            lines.append(f"- stock: {c['mpy_bytes']} bytes of .mpy on the filesystem; frozen: "
                         f"{c['frozen_bytes']} bytes of frozen .mpy ({c['ours_bytes']} ours, the "
                         f"rest the stock set) in an OTA app slot of {slot} bytes{share}, beside "
                         "MicroPython itself")
        lines.append("")
        lines.append("| configuration | job | GC heap needed (plain) | heap on the board | TLS "
                     "sessions | ESP-IDF left / needed | verdict |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in rows:
            if r["board"] != name:
                continue
            heap = f"{r['heap_kb']} KB" + (" (grown once)" if r["growths"] == 1 else
                                            " (grown twice: no)" if r["growths"] == 2 else "")
            idf = ("-" if r.get("idf_free_kb") is None and r["growths"] == 2 else
                   f"? / {r['idf_need_kb']} KB" if r.get("idf_free_kb") is None else
                   f"{r['idf_free_kb']} / {r['idf_need_kb']} KB")
            verdict = f"{r['verdict']} ({r['margin_kb']:+d} KB)"
            if r["why"]:
                verdict += f": {r['why']}"
            config = r["config"] + (" (recommended)" if r["recommended"] else "")
            lines.append(f"| {config} | {r['label']} | {r['need_kb']} KB ({r['plain_kb']}) | "
                         f"{heap} | {r['sessions']} | {idf} | {verdict} |")
        lines.append("")
    return "\n".join(lines)


def load_boards(names: list[str] | None) -> dict[str, dict]:
    out = {}
    for name in names or B.board_names():
        info = B.board_info(name)
        if info.get("chip") == "unix":
            continue
        missing = [k for k in FACTS if k not in info.get("memory", {})]
        if missing:
            raise ValueError(f"boards/{name}/board.json: memory lacks {', '.join(missing)}")
        out[name] = info
    return out


def code_sizes(boards: dict[str, dict]) -> dict[str, dict]:
    from . import images

    out = {}
    for name, info in boards.items():
        fz = images.freeze_board(name, info["arch"])
        built = B.build_board(name)
        out[name] = {"frozen_bytes": fz["bytes"], "ours_bytes": fz["ours_bytes"],
                     "slot_bytes": B.ota_slot_bytes(info),
                     "mpy_bytes": sum(n for _, n in B.size_report(built))}
    return out


def current_heaps(measure: bool = True) -> dict[str, dict]:
    """image -> {job: {tls, plain}} from build/heaps.json, measuring an image whose figures are
    missing or were made from other code or another build of the image."""
    from . import bench

    data = bench.load_heaps()
    out = {}
    for image in sorted(set(CONFIGS.values())):
        entry = data.get(image) or {}
        if entry.get("fingerprint") != bench.heap_fingerprint(image) or \
                any(job not in entry.get("kb", {}) for job, _, _ in JOBS):
            if not measure:
                raise ValueError(f"build/heaps.json has no current figures for {image}")
            print(f"size: measuring the smallest heap of each job type on {image} "
                  "(a few minutes; kept in build/heaps.json)", flush=True)
            out[image] = bench.measure_heaps(image)
        else:
            out[image] = entry["kb"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/size", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--board", action="append", metavar="NAME", help="only this board")
    ap.add_argument("--heaps", metavar="FILE",
                    help="take the heap figures from FILE ({image: {job: {tls, plain}}}) "
                         "instead of measuring")
    ap.add_argument("--json", metavar="FILE", help="also write every row to FILE")
    args = ap.parse_args(argv)
    try:
        boards = load_boards(args.board)
        if args.heaps:
            with open(args.heaps) as f:
                heaps = json.load(f)
            for image in CONFIGS.values():
                for job, _, _ in JOBS:
                    if not isinstance(heaps.get(image, {}).get(job, {}).get("tls"), int):
                        raise ValueError(f"{args.heaps}: no {image} {job} tls figure")
        else:
            heaps = current_heaps()
        code = code_sizes(boards)
    except (OSError, ValueError) as e:
        print(f"size: {e}", file=sys.stderr)
        return 2
    rows = evaluate(boards, heaps)
    print(render(boards, rows, code))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "code": code, "heaps": heaps}, f, indent=1)
    bad = failures(rows)
    for r in bad:
        print(f"size: {r['board']} {r['config']} (recommended): {r['label']} DOES NOT FIT "
              f"({r['margin_kb']:+d} KB): {r['why']}", file=sys.stderr)
    if not bad:
        print("size: every recommended configuration fits (UNKNOWN: not enough facts to say)")
    return 1 if bad else 0
