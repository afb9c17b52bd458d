"""`make bench`: speed and memory figures of the device on the local stack.

Written to build/bench.json and printed. A benchmark, not a test: nothing here passes or fails
on a number. Figures:
- heap_min_kb / heap_min_kb_plain: the smallest `-X heapsize` (1 KB steps) at which a device
  boots over mutual TLS (or plain TCP) and completes a no-op job (PLATFORM.md: mem_peak() is not
  a usable peak measure); code_heap_bytes: how much of it the imported .mpy code itself takes
  (on a board the code is frozen into flash and costs no heap);
- heap_min_kb_by_job: the same (2 KB steps) for each job type, TLS (MQTT over mutual TLS, files
  over HTTPS: two sessions at once) and plain (MQTT over TCP, HTTP): a no-op job, a ping
  command, a 256 KiB download-file, a 1 MiB signed OTA, a 17-file app-update; also kept in
  build/heaps.json, where `make size` reads them;
- jobs_per_s: one device running 200 queued no-op jobs back to back against jobsd (start-next,
  journal, handler, journal, update, journal per job), beside the same 200 executions driven by
  a paho client that does nothing else (the service-only floor), in the same run;
- journal writes and bytes per job, from the device's own counters;
- boot_to_ready_ms: device process start to its first start-next (TLS handshake, CONNECT,
  5 SUBSCRIBEs), median;
- job_ms: notify-next of a new job to the device's SUCCEEDED update being accepted, for a job
  with no steps, median over N jobs (wire times seen by a client on the broker);
- code_bytes: compiled size of the device code (build/mpy/host);
- jobsd: the service under load, see bench_jobsd.py.

`tools/bench --only device|jobsd` runs one half; `--only heaps [--images ...]` just the heaps
per job type."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import time

from . import BUILD
from . import images
from . import stack
from .build import build, size_report, sources
from .pki import PKI

ARN = "arn:aws:iot:us-east-1:123456789012:thing/"


class Bench:
    def __init__(self, work: str, image: str = "pip") -> None:
        self.work = work
        self.image = image  # the device image every device of this bench runs (tools/images)
        self.pki = PKI(os.path.join(work, "pki"))
        self.mosq = stack.Mosquitto(os.path.join(work, "mosquitto"), self.pki)
        self.files = os.path.join(work, "files")
        os.makedirs(self.files, exist_ok=True)
        self.jobsd = stack.Jobsd(os.path.join(work, "jobsd"), self.mosq.broker, files=self.files)
        self.n = 0
        self.servers: list = []  # file servers (fileserver.FlakyServer) to stop with the bench

    def stop(self) -> None:
        for srv in self.servers:
            srv.stop()
        self.jobsd.stop()
        self.mosq.stop()

    def device(self, heap: str, tls: bool = True, jobs: int = 0):
        self.n += 1
        thing = f"bench-{self.n}"
        self.jobsd.iot.create_thing(thingName=thing)
        for k in range(jobs):  # queued before the device boots
            self.jobsd.iot.create_job(jobId=f"{thing}-q{k}", targets=[ARN + thing],
                                      document=json.dumps({"operation": "demo", "steps": 0}))
        times: list[tuple[float, str, object]] = []
        spy = stack.Spy(self.mosq.port, thing,
                        on_message=lambda t, p: times.append((time.monotonic(), t, p)))
        t0 = time.monotonic()
        dev = stack.Device(os.path.join(self.work, thing), thing,
                           self.mosq.tls_broker if tls else self.mosq.broker,
                           tls_dir=self.pki.thing(thing) if tls else None, heap=heap, image=self.image)
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

    def passes(self, heap_kb: int, tls: bool) -> bool:
        thing, spy, dev, _, _ = self.device(f"{heap_kb}K", tls)
        try:
            return self.job_ok(thing, dev)
        finally:
            dev.stop()
            spy.stop()

    def heap_min_kb(self, tls: bool = True, lo: int = 16, hi: int = 128) -> int:
        if not self.passes(hi, tls):
            raise RuntimeError(f"the device fails even with {hi} KB")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.passes(mid, tls):
                hi = mid
            else:
                lo = mid
        return hi

    def throughput(self, jobs: int = 200) -> dict:
        """One device, `jobs` queued no-op jobs: jobs per second, journal traffic per job."""
        thing, spy, dev, _, times = self.device(stack.DEFAULT_HEAP, True, jobs)
        try:
            last = f"{thing}-q{jobs - 1}/update/accepted"
            stack.wait_until(lambda: any(t.endswith(last) for _, t, _ in times) or not dev.proc.alive(),
                             120, "the device to finish its queue", 0.05)
            first = next(ts for ts, t, _ in times if t.endswith("/start-next"))
            end = next(ts for ts, t, _ in times if t.endswith(last))
            import re

            m = re.findall(r"heap free=\d+ alloc=\d+ journal=(\d+)/(\d+)", dev.log_text(10**7))
            writes, nbytes = (int(m[-1][0]), int(m[-1][1])) if m else (0, 0)
            return {"jobs": jobs, "seconds": end - first, "writes": writes, "bytes": nbytes}
        finally:
            dev.stop()
            spy.stop()

    def https(self, body: bytes):
        """An HTTPS server on loopback serving `body` at every path, with a certificate from the
        bench's CA (the one the devices trust); stopped with the bench."""
        from .fileserver import FlakyServer

        server = self.pki.server("localhost", name="https-files")
        srv = FlakyServer(body, tls=(server["cert_pem"], server["key_pem"]))
        self.servers.append(srv)
        return srv

    def ota(self, heap_kb: int, size: int = 1 << 20, timeout: float = 60,
            tls: bool = True, mqtt: bool = False) -> float | None:
        """A signed firmware update of `size` bytes: seconds from the job's start-next to its
        "rebooting" report (download, hash, signature, set_boot), or None if it failed. `tls`:
        MQTT over TLS and the image over HTTPS (two TLS sessions at once, as on AWS); else plain
        MQTT and the image over HTTP from jobsd's presigned URL. `mqtt`: the image comes over
        the MQTT connection instead (a jobsd stream; one TLS session)."""
        import base64
        import hashlib

        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        from .devsim import make_image

        key = ec.generate_private_key(ec.SECP256R1())
        img = make_image("2.0.0", size=size)
        self.n += 1
        thing = f"ota-{self.n}"
        if mqtt:
            os.makedirs(os.path.join(self.files, "fw"), exist_ok=True)
            with open(os.path.join(self.files, "fw", f"{thing}.bin"), "wb") as f:
                f.write(img)
            self.jobsd.iot.create_stream(
                streamId=thing, roleArn="arn:aws:iam::123456789012:role/bench",
                files=[{"fileId": 0, "s3Location": {"bucket": "fw", "key": f"{thing}.bin"}}])
            url, allow = None, None
        elif tls:
            url, allow = self.https(img).url + "fw/bench.bin", "https://localhost:"
        else:
            os.makedirs(os.path.join(self.files, "fw"), exist_ok=True)
            with open(os.path.join(self.files, "fw", "bench.bin"), "wb") as f:
                f.write(img)
            url = "${aws:iot:s3-presigned-url:https://s3.amazonaws.com/fw/bench.bin}"
            allow = "http://127.0.0.1:"
        pub = os.path.join(self.work, f"{thing}-pub.der")
        with open(pub, "wb") as f:
            f.write(key.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
        self.jobsd.iot.create_thing(thingName=thing)
        doc = {"operation": "ota", "url": url,
               "size": len(img), "sha256": hashlib.sha256(img).hexdigest(), "version": "2.0.0",
               "signature": base64.b64encode(key.sign(img, ec.ECDSA(hashes.SHA256()))).decode()}
        config: dict = {"ota": {"pubkey": pub, "allow": [allow] if allow else []}}
        if mqtt:
            del doc["url"]
            doc["stream"] = {"id": thing, "fileId": 0}
            config["transfer"] = "mqtt"
        self.jobsd.iot.create_job(jobId=f"{thing}-job", targets=[ARN + thing], document=json.dumps(doc))
        times = self.fresh_job(thing, heap_kb, config, timeout, tls)
        return None if times is None else times["rebooting"] - times["start"]

    def download(self, heap_kb: int, size: int = 256 * 1024, tls: bool = True,
                 timeout: float = 60) -> float | None:
        """A download-file job of `size` bytes with its sha256: seconds from start-next to the
        last accepted update, or None if it failed. `tls`: MQTT over TLS and the file over HTTPS;
        else plain MQTT and HTTP."""
        import hashlib

        body = os.urandom(size)
        self.n += 1
        thing = f"dl-{self.n}"
        if tls:
            url, allow = self.https(body).url + "bench.bin", "https://localhost:"
        else:
            from .fileserver import FlakyServer

            srv = FlakyServer(body)
            self.servers.append(srv)
            url, allow = srv.url + "bench.bin", "http://127.0.0.1:"
        self.jobsd.iot.create_thing(thingName=thing)
        doc = {"operation": "download-file", "url": url, "path": "bench.bin",
               "sha256": hashlib.sha256(body).hexdigest()}
        self.jobsd.iot.create_job(jobId=f"{thing}-job", targets=[ARN + thing], document=json.dumps(doc))
        times = self.fresh_job(thing, heap_kb, {"download": {"allow": [allow], "root": "data"}},
                               timeout, tls, boots=1)
        return None if times is None else times["accepted"] - times["start"]

    def fresh_job(self, thing: str, heap_kb: int, config: dict, timeout: float,
                  tls: bool = True, boots: int = 2) -> dict | None:
        """Run the job `<thing>-job` (already created) on a new device with `config`: monotonic
        times of its start-next, its "rebooting" report (updates only) and the last accepted
        update, or None if it did not succeed or the device booted more than `boots` times (an
        update's own reset is one; a crash or a reset for memory fails the run)."""
        times: list[tuple[float, str, object]] = []
        spy = stack.Spy(self.mosq.port, thing,
                        on_message=lambda t, p: times.append((time.monotonic(), t, p)))
        dev = stack.Device(os.path.join(self.work, thing), thing,
                           self.mosq.tls_broker if tls else self.mosq.broker,
                           tls_dir=self.pki.thing(thing) if tls else None, heap=f"{heap_kb}K",
                           config=config, image=self.image)
        try:
            def done():
                if f"devsim: boot {boots + 1} " in dev.log_text(10**7):
                    return "REBOOTED"
                ex = self.jobsd.iot.describe_job_execution(jobId=f"{thing}-job", thingName=thing)
                st = ex["execution"]["status"]
                return st if st not in ("QUEUED", "IN_PROGRESS") else None

            try:
                status = stack.wait_until(done, timeout, "the job", 0.1)
            except TimeoutError:
                return None
            if status != "SUCCEEDED":
                return None
            return {
                "start": next(ts for ts, t, p in times if t.endswith("/start-next/accepted")
                              and isinstance(p, dict) and p.get("execution")),
                "rebooting": next((ts for ts, t, p in times if t.endswith("/update")
                                   and isinstance(p, dict)
                                   and p.get("statusDetails", {}).get("step") == "rebooting"), None),
                "accepted": max(ts for ts, t, p in times if t.endswith("/update/accepted")),
            }
        finally:
            dev.stop()
            spy.stop()

    def app_update(self, heap_kb: int = 160, files: int = 16, file_size: int = 16 * 1024,
                   timeout: float = 60, tls: bool = True) -> dict | None:
        """A signed application bundle of `files` modules and an entry module: seconds from
        start-next to the "rebooting" report (manifest, signature, download, hashes, switch)
        and to the last accepted update (plus the reset, the start on trial, the confirmation).
        `tls`: MQTT over TLS and the files over HTTPS; else plain MQTT and HTTP (jobsd)."""
        from . import sign

        self.n += 1
        thing = f"app-{self.n}"
        src = os.path.join(self.work, f"{thing}-src")
        os.makedirs(src)
        for i in range(files):
            with open(os.path.join(src, f"m{i:02d}.py"), "wb") as f:
                f.write(b"# " + os.urandom(file_size).hex().encode()[: file_size - 3] + b"\n")
        with open(os.path.join(src, "application.py"), "w") as f:
            f.write("def start(api):\n    api.log('bench app started')\n")
        keys = os.path.join(self.work, f"{thing}-keys")
        sign.keygen(keys)
        out = os.path.join(self.work, f"{thing}-doc.json")
        where = ["--bucket", "apps", "--files", self.files, "--key-prefix", f"bench/{thing}",
                 "--presign-files"]
        allow = "http://127.0.0.1:"
        if tls:  # the bundle's objects on an HTTPS server, as from S3
            stage = os.path.join(self.work, f"{thing}-stage")
            os.makedirs(stage)
            from .fileserver import FlakyServer

            server = self.pki.server("localhost", name="https-files")
            srv = FlakyServer(None, tls=(server["cert_pem"], server["key_pem"]), root=stage)
            self.servers.append(srv)
            where, allow = ["--stage", stage, "--base-url", srv.url], "https://localhost:"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = sign.main(["bundle", src, "--key", os.path.join(keys, sign.KEY_FILE),
                            "--version", "1.0", "--out", out] + where)
        if rc != 0:
            raise RuntimeError("tools/sign bundle failed")
        with open(out) as f:
            doc = f.read()
        self.jobsd.iot.create_thing(thingName=thing)
        self.jobsd.iot.create_job(jobId=f"{thing}-job", targets=[ARN + thing], document=doc)
        pub = os.path.join(keys, sign.PUB_DER_FILE)
        times = self.fresh_job(thing, heap_kb, {"ota": {"pubkey": pub, "allow": [allow]}},
                               timeout, tls)
        if times is None:
            return None
        return {"files": files + 1, "bytes": files * file_size,
                "staged_s": round(times["rebooting"] - times["start"], 3),
                "confirmed_s": round(times["accepted"] - times["start"], 3)}

    @staticmethod
    def smallest_heap_kb(passes, lo: int, hi: int) -> int:
        """The smallest heap (KB, within 2) at which `passes(heap_kb)` is true."""
        if not passes(hi):
            raise RuntimeError(f"fails even with {hi} KB")
        while hi - lo > 2:
            mid = (lo + hi) // 2
            if passes(mid):
                hi = mid
            else:
                lo = mid
        return hi

    def ping_arn(self) -> str:
        """The ARN of the bench's `ping` command (created on first use)."""
        if not getattr(self, "_ping", None):
            self.jobsd.iot.create_command(commandId="bench-ping", payload={
                "content": b'{"command": "ping"}', "contentType": "application/json"})
            self._ping = "arn:aws:iot:us-east-1:123456789012:command/bench-ping"
        return self._ping

    def ping_then_steps(self, heap_kb: int, timeout: float = 20) -> bool:
        """A fresh device (TLS, test handlers) runs a `ping` command, then a steps job with a
        side effect ([effect, demo]): both SUCCEEDED? The system tests' heaviest default path,
        which picks devsim's default heap (devsim.DEFAULT_HEAP)."""
        self.n += 1
        thing = f"heap-{self.n}"
        self.jobsd.iot.create_thing(thingName=thing)
        dev = stack.Device(os.path.join(self.work, thing), thing, self.mosq.tls_broker,
                           tls_dir=self.pki.thing(thing), heap=f"{heap_kb}K",
                           config={"test_handlers": True}, image=self.image)
        try:
            try:
                stack.wait_until(lambda: "heap free=" in dev.log_text(10**6)
                                 or "boot 2" in dev.log_text(10**6), timeout, "online", 0.05)
            except TimeoutError:
                return False
            if "boot 2" in dev.log_text(10**6):
                return False
            eid = self.jobsd.data.start_command_execution(targetArn=ARN + thing,
                                                          commandArn=self.ping_arn())["executionId"]
            doc = {"version": "1.0", "steps": [
                {"action": {"name": "e", "type": "runHandler", "input": {"handler": "effect.sh"}}},
                {"action": {"name": "d", "type": "runHandler", "input": {"handler": "demo.sh"}}}]}
            self.jobsd.iot.create_job(jobId=f"{thing}-steps", targets=[ARN + thing],
                                      document=json.dumps(doc))
            end = ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED", "REMOVED")

            def done():
                c = self.jobsd.iot.get_command_execution(executionId=eid,
                                                         targetArn=ARN + thing)["status"]
                j = self.jobsd.iot.describe_job_execution(
                    jobId=f"{thing}-steps", thingName=thing)["execution"]["status"]
                return (c, j) if c in end and j in end else None

            try:
                c, j = stack.wait_until(done, timeout, "ping and steps", 0.05)
            except TimeoutError:
                return False
            return c == "SUCCEEDED" and j == "SUCCEEDED" and "boot 2" not in dev.log_text(10**6)
        finally:
            dev.stop()

    def ping_steps_heap_min_kb(self, lo: int = 48, hi: int = 192) -> int:
        return self.smallest_heap_kb(self.ping_then_steps, lo, hi)

    def command_ok(self, heap_kb: int, tls: bool = True, timeout: float = 20) -> bool:
        """A fresh device (default handlers) runs one `ping` command: SUCCEEDED, no reset?"""
        self.n += 1
        thing = f"cmd-heap-{self.n}"
        self.jobsd.iot.create_thing(thingName=thing)
        dev = stack.Device(os.path.join(self.work, thing), thing,
                           self.mosq.tls_broker if tls else self.mosq.broker,
                           tls_dir=self.pki.thing(thing) if tls else None, heap=f"{heap_kb}K",
                           image=self.image)
        try:
            try:
                stack.wait_until(lambda: "heap free=" in dev.log_text(10**6)
                                 or "boot 2" in dev.log_text(10**6), timeout, "online", 0.05)
            except TimeoutError:
                return False
            eid = self.jobsd.data.start_command_execution(targetArn=ARN + thing,
                                                          commandArn=self.ping_arn())["executionId"]
            end = ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT")

            def done():
                st = self.jobsd.iot.get_command_execution(executionId=eid,
                                                          targetArn=ARN + thing)["status"]
                return st if st in end else None

            try:
                st = stack.wait_until(done, timeout, "the ping", 0.05)
            except TimeoutError:
                return False
            return st == "SUCCEEDED" and "boot 2" not in dev.log_text(10**6)
        finally:
            dev.stop()

    def job_heaps(self) -> dict:
        """The smallest heap (KB) each job type needs, over TLS and plain: {job: {tls, plain}}.
        TLS: MQTT over mutual TLS and downloads over HTTPS (two sessions at once); plain: MQTT
        over TCP and HTTP. The app-update downloads its files over HTTP in both (jobsd's
        presigned URLs); the OTA and download rows show what HTTPS adds."""
        out: dict = {}
        for tls, key in ((True, "tls"), (False, "plain")):
            out.setdefault("noop", {})[key] = self.heap_min_kb(tls, lo=8)
            out.setdefault("command", {})[key] = self.smallest_heap_kb(
                lambda kb, t=tls: self.command_ok(kb, t), 8, 160)
            out.setdefault("download", {})[key] = self.smallest_heap_kb(
                lambda kb, t=tls: self.download(kb, tls=t) is not None, 8, 224)
            out.setdefault("ota", {})[key] = self.smallest_heap_kb(
                lambda kb, t=tls: self.ota(kb, tls=t) is not None, 8, 224)
            out.setdefault("ota_mqtt", {})[key] = self.smallest_heap_kb(
                lambda kb, t=tls: self.ota(kb, tls=t, mqtt=True) is not None, 8, 224)
            out.setdefault("app_update", {})[key] = self.smallest_heap_kb(
                lambda kb, t=tls: self.app_update(kb, tls=t) is not None, 8, 224)
        return out

    def floor(self, jobs: int = 200) -> float:
        """The same executions driven by one paho client (bench_jobsd.Fleet): jobs per second."""
        from .bench_jobsd import Fleet

        self.n += 1
        thing = f"floor-{self.n}"
        self.jobsd.iot.create_thing(thingName=thing)
        for k in range(jobs):
            self.jobsd.iot.create_job(jobId=f"{thing}-q{k}", targets=[ARN + thing],
                                      document='{"operation":"noop"}')
        fleet = Fleet(self.mosq.port, [thing], 1)
        try:
            wall = fleet.run()
            return fleet.done / wall
        finally:
            fleet.stop()

    def timings(self, jobs: int = 20) -> tuple[list[float], list[float]]:
        boots: list[float] = []
        lat: list[float] = []
        for _ in range(3):
            thing, spy, dev, t0, times = self.device(stack.DEFAULT_HEAP)
            try:
                first = spy.wait_for(lambda t, p: t.endswith("/start-next"), 20, "start-next")
                boots.append(next(ts for ts, t, _ in times if t == first[0]) - t0)
                for _ in range(jobs // 3 + 1):
                    mark = len(times)
                    job_prefix = f"j{self.n + 1}"
                    assert self.job_ok(thing, dev)
                    suffix = f"/{job_prefix}/update/accepted"
                    stack.wait_until(lambda sx=suffix, tm=times, m=mark:
                                     any(t.endswith(sx) for _, t, _ in tm[m:]),
                                     10, "the spy to see the last reply")  # the spy is async
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

    def command_latency(self, n: int = 20) -> dict:
        """A `ping` command n times on one TLS device: from the request's publication to the
        report's acceptance as a spy sees them (device round trip), and from the REST call
        StartCommandExecution to that acceptance (end to end)."""
        self.n += 1
        thing = f"cmd-{self.n}"
        self.jobsd.iot.create_thing(thingName=thing)
        times: list[tuple[float, str, object]] = []
        spy = stack.Spy(self.mosq.port, thing, commands=True,
                        on_message=lambda t, p: times.append((time.monotonic(), t, p)))
        dev = stack.Device(os.path.join(self.work, thing), thing, self.mosq.tls_broker,
                           tls_dir=self.pki.thing(thing), heap=stack.DEFAULT_HEAP, image=self.image)
        cmd = f"ping-{self.n}"
        self.jobsd.iot.create_command(commandId=cmd, payload={
            "content": b'{"command": "ping"}', "contentType": "application/json"})
        device_rt: list[float] = []
        e2e: list[float] = []
        try:
            stack.wait_until(lambda: "heap free=" in dev.log_text(10**6), 30, "the device online")
            for _ in range(n):
                t0 = time.monotonic()
                eid = self.jobsd.data.start_command_execution(
                    targetArn=ARN + thing, commandArn=ARN.replace(":thing/", ":command/") + cmd,
                    executionTimeoutSeconds=10)["executionId"]
                acc = f"/executions/{eid}/response/accepted/json"
                stack.wait_until(lambda a=acc: any(t.endswith(a) for _, t, _ in times), 10,
                                 "the report accepted", 0.001)
                req = next(ts for ts, t, _ in times if t.endswith(f"/executions/{eid}/request/json"))
                end = next(ts for ts, t, _ in times if t.endswith(acc))
                device_rt.append(end - req)
                e2e.append(end - t0)
        finally:
            dev.stop()
            spy.stop()
        return {"device_ms_median": round(statistics.median(device_rt) * 1000, 1),
                "end_to_end_ms_median": round(statistics.median(e2e) * 1000, 1),
                "end_to_end_ms_max": round(max(e2e) * 1000, 1), "commands": n}


CORE = ("iotjobs/topics.mpy", "iotjobs/codec.mpy", "iotjobs/transport.mpy", "iotjobs/client.mpy",
        "iotjobs/journal.mpy", "iotjobs/runner.mpy")


def code_heap_bytes(image: str = "pip") -> int:
    """Heap taken by importing the device code on an image, after gc.collect() (.mpy files on
    pip and stock32; almost nothing on fleet32, where the code is frozen)."""
    import subprocess

    probe = ("import gc\ngc.collect()\nb = gc.mem_alloc()\n"
             "import ssl, umqtt.simple, iotjobs.transport, iotjobs.client, iotjobs.journal\n"
             "import iotjobs.runner, app\ngc.collect()\nprint(gc.mem_alloc() - b)\n")
    out = subprocess.run([images.interpreter(image), "-X", "heapsize=256K", "-c", probe],
                         capture_output=True, text=True, env=dict(os.environ, MICROPYPATH=".frozen:"
                         + os.path.join(BUILD, "mpy", "host")), check=True)
    return int(out.stdout.split()[-1])


def ecdsa_ms(image: str = "pip") -> float:
    """Median time of one ECDSA P-256 verification in MicroPython (an image, this host)."""
    import subprocess

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    msg = b"benchmark"
    sig = key.sign(msg, ec.ECDSA(hashes.SHA256()))
    pub = key.public_key().public_bytes(serialization.Encoding.X962,
                                        serialization.PublicFormat.UncompressedPoint)
    probe = os.path.join(BUILD, "bench", "ecdsa_probe.py")
    with open(probe, "w") as f:
        f.write("import time, binascii\nfrom iotjobs import ecdsa\n"
                f"pub = binascii.unhexlify({pub.hex()!r})\nsig = binascii.unhexlify({sig.hex()!r})\n"
                "ts = []\nfor i in range(15):\n    t = time.ticks_us()\n"
                "    assert ecdsa.verify(pub, sig, b'benchmark')\n"
                "    ts.append(time.ticks_diff(time.ticks_us(), t))\nts.sort()\nprint(ts[7])\n")
    out = subprocess.run([images.interpreter(image), "-X", "heapsize=32K", probe],
                         capture_output=True, text=True, check=True,
                         env=dict(os.environ, MICROPYPATH=".frozen:" + os.path.join(BUILD, "mpy", "host")))
    return int(out.stdout.split()[-1]) / 1000


HEAPS = os.path.join(BUILD, "heaps.json")
JOBS = ("noop", "command", "download", "ota", "ota_mqtt", "app_update")


def heap_fingerprint(image: str) -> str:
    """What the smallest heaps depend on: the image's stamp and the device code."""
    import hashlib

    h = hashlib.sha256()
    try:
        with open(os.path.join(images.IMAGE_DIR, image, ".stamp"), "rb") as f:
            h.update(f.read())
    except OSError:
        h.update(image.encode())
    for src, rel in sources():
        h.update(rel.encode())
        with open(src, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def load_heaps() -> dict:
    try:
        with open(HEAPS) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def save_heaps(image: str, heaps: dict) -> None:
    """Keep an image's smallest heaps per job type in build/heaps.json (`make size` reads
    them while the image and the device code are unchanged)."""
    data = load_heaps()
    data[image] = {"fingerprint": heap_fingerprint(image), "kb": heaps,
                   "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.makedirs(BUILD, exist_ok=True)
    with open(HEAPS + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(HEAPS + ".tmp", HEAPS)


def measure_heaps(image: str) -> dict:
    """The smallest heap of each job type on an image (a new bench of its own)."""
    build("host")
    work = os.path.join(BUILD, "bench-heaps", image)
    shutil.rmtree(work, ignore_errors=True)
    b = Bench(work, image)
    try:
        heaps = b.job_heaps()
    finally:
        b.stop()
    save_heaps(image, heaps)
    return heaps


def device_figures(work: str, image: str = "pip") -> dict:
    build("host")
    build("xtensawin")
    b = Bench(work, image)
    try:
        heaps = b.job_heaps()
        save_heaps(image, heaps)
        heap_ping_steps = b.ping_steps_heap_min_kb(lo=8)
        boots, lat = b.timings()
        tp = b.throughput()
        floor = b.floor()
        ota_s = b.ota(192)
        ota_mqtt_s = b.ota(192, mqtt=True)
        app = b.app_update(heap_kb=224)
        cmd = b.command_latency()
        if app:
            app["heap_min_kb"] = heaps["app_update"]["tls"]
    finally:
        b.stop()
    sizes = dict(size_report("host"))
    rate = tp["jobs"] / tp["seconds"]
    return {
        "image": image,
        "heap_min_kb": heaps["noop"]["tls"],
        "heap_min_kb_plain": heaps["noop"]["plain"],
        "heap_min_kb_by_job": heaps,
        "heap_min_kb_ping_then_steps": heap_ping_steps,
        "devsim_default_heap": stack.DEFAULT_HEAP,
        "code_heap_bytes": code_heap_bytes(image),
        "boot_to_ready_ms": round(statistics.median(boots) * 1000, 1),
        "job_ms_median": round(statistics.median(lat) * 1000, 1),
        "job_ms_max": round(max(lat) * 1000, 1),
        "jobs_timed": len(lat),
        "jobs_per_s": round(rate, 1),
        "floor_jobs_per_s": round(floor, 1),
        "jobs_per_s_vs_floor": round(rate / floor, 2),
        "ota_1mib_s": round(ota_s, 3) if ota_s else None,
        "ota_kib_per_s": round(1024 / ota_s) if ota_s else None,
        "ota_heap_min_kb": heaps["ota"]["tls"],
        "ota_mqtt_1mib_s": round(ota_mqtt_s, 3) if ota_mqtt_s else None,
        "ota_mqtt_blocks_per_s": round(256 / ota_mqtt_s) if ota_mqtt_s else None,
        "ota_mqtt_heap_min_kb": heaps["ota_mqtt"]["tls"],
        "ecdsa_verify_ms": ecdsa_ms(image),
        "app_update": app,
        "command_ping": cmd,
        "journal_writes_per_job": round(tp["writes"] / tp["jobs"], 2),
        "journal_bytes_per_job": round(tp["bytes"] / tp["jobs"], 1),
        "core_bytes": sum(sizes.get(m, 0) for m in CORE),
        "code_bytes": sum(sizes.values()),
        "code_bytes_by_file": sizes,
    }


def _side_by_side(figures: dict) -> None:
    """The heap figures of every image in one table (README's "Device images")."""
    def both(job):
        return lambda d: "{tls} / {plain}".format(**d["heap_min_kb_by_job"][job])

    rows = [("no-op job, TLS / plain (KB)", both("noop")),
            ("ping command, TLS / plain (KB)", both("command")),
            ("download-file 256 KiB, TLS / plain (KB)", both("download")),
            ("1 MiB signed OTA, TLS / plain (KB)", both("ota")),
            ("1 MiB signed OTA over MQTT (a stream), TLS / plain (KB)", both("ota_mqtt")),
            ("app-update 17 files, TLS / plain (KB)", both("app_update")),
            ("ping then a steps job, TLS (KB)", lambda d: str(d["heap_min_kb_ping_then_steps"])),
            ("code in the heap (bytes)", lambda d: str(d["code_heap_bytes"])),
            ("no-op jobs per second", lambda d: str(d["jobs_per_s"]))]
    names = list(figures)
    print("| smallest heap / figure | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, get in rows:
        print(f"| {label} | " + " | ".join(get(figures[n]) for n in names) + " |")


def main(argv: list[str] | None = None) -> int:
    import argparse

    from . import bench_jobsd

    ap = argparse.ArgumentParser(prog="tools/bench", description=__doc__)
    ap.add_argument("--only", choices=["device", "jobsd", "streams", "heap", "heaps"],
                    help="heap: devsim's default heap figures on --image; heaps: the smallest "
                         "heap of each job type on --images (build/heaps.json, read by make size)")
    ap.add_argument("--image", choices=["pip", "stock32", "fleet32"], default="pip",
                    help="with --only heap: the device image (tools/images)")
    ap.add_argument("--images", nargs="+", choices=["pip", "stock32", "fleet32"],
                    help="the device figures on these images (default: all three, side by side)")
    args = ap.parse_args(argv)
    if args.only == "heap":  # just the figures that pick devsim's default heap
        work = os.path.join(BUILD, "bench-heap")
        shutil.rmtree(work, ignore_errors=True)
        build("host")
        b = Bench(work, args.image)
        try:
            kb = b.ping_steps_heap_min_kb(lo=8)
            tls = b.heap_min_kb(True, lo=8)
            plain = b.heap_min_kb(False, lo=8)
        finally:
            b.stop()
        print(f"image {args.image}: smallest heap for a no-op job, TLS / plain: {tls} / {plain} KB; "
              f"a ping then a steps job (TLS): {kb} KB (devsim's default {stack.DEFAULT_HEAP})")
        return 0
    if args.only == "heaps":
        for image in args.images or ["stock32", "fleet32"]:
            kb = measure_heaps(image)
            print(f"image {image}: " + "; ".join(f"{job} {kb[job]['tls']} / {kb[job]['plain']} KB"
                                                  for job in JOBS) + " (TLS / plain)")
        return 0
    work = os.path.join(BUILD, "bench")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    result: dict = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "host": f"{os.uname().machine}, {os.cpu_count()} cpus"}
    if args.only in (None, "device"):
        result["device"] = {}
        for image in args.images or ["pip", "stock32", "fleet32"]:
            d = result["device"][image] = device_figures(os.path.join(work, "device-" + image),
                                                         image)
            print(f"== image {image}")
            print(f"device: smallest heap for a job, TLS / plain    : {d['heap_min_kb']} KB / "
                  f"{d['heap_min_kb_plain']} KB (imported code alone: {d['code_heap_bytes']} bytes)")
            print("device: smallest heap per job type, TLS / plain : " + "; ".join(
                f"{job} {d['heap_min_kb_by_job'][job]['tls']} / {d['heap_min_kb_by_job'][job]['plain']} KB"
                for job in JOBS))
            print(f"device: smallest heap, ping then a steps job    : {d['heap_min_kb_ping_then_steps']} KB "
                  f"(devsim's default: {d['devsim_default_heap']})")
            print(f"device: no-op jobs per second, one device       : {d['jobs_per_s']} "
                  f"(service-only floor {d['floor_jobs_per_s']}, {d['jobs_per_s_vs_floor']}x)")
            print(f"device: journal per job                         : {d['journal_writes_per_job']} writes, "
                  f"{d['journal_bytes_per_job']} bytes")
            print(f"device: core .mpy (lib/iotjobs)                 : {d['core_bytes']} bytes")
            print(f"device: 1 MiB signed firmware OTA on loopback    : {d['ota_1mib_s']} s "
                  f"({d['ota_kib_per_s']} KiB/s, download+hash+ECDSA+set_boot); smallest heap "
                  f"{d['ota_heap_min_kb']} KB; ECDSA verify {d['ecdsa_verify_ms']} ms")
            print(f"device: 1 MiB signed OTA over MQTT (a stream)   : {d['ota_mqtt_1mib_s']} s "
                  f"(over HTTPS {d['ota_1mib_s']} s); smallest heap {d['ota_mqtt_heap_min_kb']} KB "
                  f"(HTTPS {d['ota_heap_min_kb']} KB)")
            a = d["app_update"] or {}
            print(f"device: app-update, {a.get('files')} files / {a.get('bytes')} bytes  : staged, "
                  f"verified and switched in {a.get('staged_s')} s; confirmed after the reset at "
                  f"{a.get('confirmed_s')} s; smallest heap {a.get('heap_min_kb')} KB")
            c = d["command_ping"]
            print(f"device: ping command, request -> report accepted : median {c['device_ms_median']} ms; "
                  f"from StartCommandExecution median {c['end_to_end_ms_median']} ms, "
                  f"max {c['end_to_end_ms_max']} ms")
            print(f"device: boot to first start-next (median)       : {d['boot_to_ready_ms']} ms")
            print(f"device: notify-next to SUCCEEDED accepted       : median {d['job_ms_median']} ms, "
                  f"max {d['job_ms_max']} ms over {d['jobs_timed']} jobs")
            print(f"device: code (.mpy, incl. umqtt)                : {d['code_bytes']} bytes")
        _side_by_side(result["device"])
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
    if args.only in (None, "jobsd", "streams"):
        from .bench_streams import bench_streams

        st = result["streams"] = {fmt: bench_streams(work=os.path.join(work, "streams-" + fmt),
                                                     fmt=fmt) for fmt in ("json", "cbor")}
        for fmt, r in st.items():
            print(f"jobsd streams ({fmt}): 1 MiB in 4 KiB blocks, {r['blocks_per_request']} per request, "
                  f"one request in flight: {r['jobsd']['blocks_per_s']} blocks/s "
                  f"({r['jobsd']['mib_per_s']} MiB/s); the broker's own floor "
                  f"{r['floor']['blocks_per_s']} blocks/s = {r['jobsd_vs_floor']}x")
    path = os.path.join(BUILD, "bench.json")
    if args.only:  # a partial run updates its part of the last full one
        try:
            with open(path) as f:
                result = dict(json.load(f), **result)
        except (OSError, ValueError):
            pass
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("written to build/bench.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
