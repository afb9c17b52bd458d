"""`make bench`: speed and memory figures of the device on the local stack.

Written to build/bench.json and printed. A benchmark, not a test: nothing here passes or fails
on a number. Figures:
- heap_min_kb: the smallest `-X heapsize` (1 KB steps) at which a device boots over mutual TLS
  and completes a demo job (PLATFORM.md: mem_peak() is not a usable peak measure);
- boot_to_ready_ms: device process start to its first start-next (TLS handshake, CONNECT,
  5 SUBSCRIBEs), median;
- job_ms: notify-next of a new job to the device's SUCCEEDED update being accepted, for a job
  with no steps, median over N jobs (wire times seen by a client on the broker);
- code_bytes: compiled size of the device code (build/mpy/host);
- jobsd: the service under load, see bench_jobsd.py.

`tools/bench --only device|jobsd` runs one half."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time

from . import BUILD
from . import stack
from .build import build, size_report
from .pki import PKI

ARN = "arn:aws:iot:us-east-1:123456789012:thing/"


class Bench:
    def __init__(self, work: str) -> None:
        self.work = work
        self.pki = PKI(os.path.join(work, "pki"))
        self.mosq = stack.Mosquitto(os.path.join(work, "mosquitto"), self.pki)
        self.jobsd = stack.Jobsd(os.path.join(work, "jobsd"), self.mosq.broker)
        self.n = 0

    def stop(self) -> None:
        self.jobsd.stop()
        self.mosq.stop()

    def device(self, heap: str):
        self.n += 1
        thing = f"bench-{self.n}"
        self.jobsd.iot.create_thing(thingName=thing)
        times: list[tuple[float, str, object]] = []
        spy = stack.Spy(self.mosq.port, thing,
                        on_message=lambda t, p: times.append((time.monotonic(), t, p)))
        t0 = time.monotonic()
        dev = stack.Device(os.path.join(self.work, thing), thing, self.mosq.tls_broker,
                           tls_dir=self.pki.thing(thing), heap=heap)
        return thing, spy, dev, t0, times

    def job_ok(self, thing: str, dev, timeout: float = 8.0) -> bool:
        self.n += 1
        job = f"j{self.n}"
        self.jobsd.iot.create_job(jobId=job, targets=[ARN + thing],
                                  document=json.dumps({"operation": "demo", "steps": 1}))

        def done():
            if not dev.proc.alive() or "boot 2" in dev.log_text():
                return "crash"
            st = self.jobsd.iot.describe_job_execution(jobId=job, thingName=thing)["execution"]["status"]
            return st if st not in ("QUEUED", "IN_PROGRESS") else None

        try:
            return stack.wait_until(done, timeout, "job", 0.05) == "SUCCEEDED"
        except TimeoutError:
            return False

    def passes(self, heap_kb: int) -> bool:
        thing, spy, dev, _, _ = self.device(f"{heap_kb}K")
        try:
            return self.job_ok(thing, dev)
        finally:
            dev.stop()
            spy.stop()

    def heap_min_kb(self, lo: int = 16, hi: int = 96) -> int:
        if not self.passes(hi):
            raise RuntimeError(f"the device fails even with {hi} KB")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.passes(mid):
                hi = mid
            else:
                lo = mid
        return hi

    def timings(self, jobs: int = 20) -> tuple[list[float], list[float]]:
        boots: list[float] = []
        lat: list[float] = []
        for _ in range(3):
            thing, spy, dev, t0, times = self.device("80K")
            try:
                first = spy.wait_for(lambda t, p: t.endswith("/start-next"), 20, "start-next")
                boots.append(next(ts for ts, t, _ in times if t == first[0]) - t0)
                for _ in range(jobs // 3 + 1):
                    mark = len(times)
                    job_prefix = f"j{self.n + 1}"
                    assert self.job_ok(thing, dev)
                    seen = times[mark:]
                    start = next(ts for ts, t, p in seen if t.endswith("/notify-next")
                                 and isinstance(p, dict)
                                 and p.get("execution", {}).get("jobId") == job_prefix)
                    end = next(ts for ts, t, _ in seen if t.endswith(f"/{job_prefix}/update/accepted"))
                    lat.append(end - start)
            finally:
                dev.stop()
                spy.stop()
        return boots, lat


def device_figures(work: str) -> dict:
    build("host")
    build("xtensawin")
    b = Bench(work)
    try:
        heap = b.heap_min_kb()
        boots, lat = b.timings()
    finally:
        b.stop()
    sizes = dict(size_report("host"))
    return {
        "heap_min_kb": heap,
        "boot_to_ready_ms": round(statistics.median(boots) * 1000, 1),
        "job_ms_median": round(statistics.median(lat) * 1000, 1),
        "job_ms_max": round(max(lat) * 1000, 1),
        "jobs_timed": len(lat),
        "code_bytes": sum(sizes.values()),
        "code_bytes_by_file": sizes,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    from . import bench_jobsd

    ap = argparse.ArgumentParser(prog="tools/bench", description=__doc__)
    ap.add_argument("--only", choices=["device", "jobsd"])
    args = ap.parse_args(argv)
    work = os.path.join(BUILD, "bench")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    result: dict = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "host": f"{os.uname().machine}, {os.cpu_count()} cpus"}
    if args.only in (None, "device"):
        d = result["device"] = device_figures(os.path.join(work, "device"))
        print(f"device: smallest heap for a job over mutual TLS : {d['heap_min_kb']} KB")
        print(f"device: boot to first start-next (median)       : {d['boot_to_ready_ms']} ms")
        print(f"device: notify-next to SUCCEEDED accepted       : median {d['job_ms_median']} ms, "
              f"max {d['job_ms_max']} ms over {d['jobs_timed']} jobs")
        print(f"device: code (.mpy, incl. umqtt)                : {d['code_bytes']} bytes")
    if args.only in (None, "jobsd"):
        pki = PKI(os.path.join(work, "pki"))
        j = result["jobsd"] = bench_jobsd.run(os.path.join(work, "jobsd"), pki)
        print(f"jobsd: {j['executions']} executions ({j['things']} things x {j['jobs_per_thing']} jobs, "
              f"{j['connections']} paho connections) in {j['wall_s']} s = {j['executions_per_s']}/s")
        print(f"jobsd: start-next round trip under load p50 {j['start_next_ms_p50']} ms, "
              f"p99 {j['start_next_ms_p99']} ms; update p50 {j['update_ms_p50']} ms, "
              f"p99 {j['update_ms_p99']} ms")
        print(f"jobsd: floor under the same load (echo responder instead of jobsd): "
              f"{j['floor_executions_per_s']}/s, round trip p50 {j['floor_loaded_rtt_ms_p50']} ms, "
              f"p99 {j['floor_loaded_rtt_ms_p99']} ms; jobsd p50 = {j['loaded_rtt_p50_vs_floor']}x, "
              f"rate = {j['executions_per_s_vs_floor']}x the floor")
        print(f"jobsd: one request at a time: floor p50 {j['floor_rtt_ms_p50']} ms, jobsd p50 "
              f"{j['jobsd_sequential_rtt_ms_p50']} ms = {j['jobsd_sequential_vs_floor']}x")
    with open(os.path.join(BUILD, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("written to build/bench.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
