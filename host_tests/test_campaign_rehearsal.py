"""Issue 15 acceptance: a staged firmware campaign rehearsed end to end. Twenty simulated ESP32s
(devsim over mutual TLS, all running at once) against jobsd with a controllable clock; a signed
OTA released at 5 a minute (`jobExecutionsRolloutConfig.maximumPerMinute`) with an abort at 30 %
FAILED once 4 things have executed (`abortConfig`).

- A bad image (fails its self-test, the bootloader rolls it back, the device reports FAILED)
  stops the campaign within its first batch: the job is CANCELED by the abort after the 4th
  executed thing, nothing more is ever released, the unreleased devices have no execution and
  still run the factory firmware.
- A good image ends COMPLETED, one batch a minute, every device SUCCEEDED on the new version.
- A device whose first download fails (the server answers 404 once) is retried
  (`jobExecutionsRetryConfig`): execution 2, retryAttempt 1, SUCCEEDS.

The rollout minutes come from the test: jobsd runs with `--test-hooks` and the test moves its
clock (`advanceClock`) one minute at a time, only once every released device has reported (a
batch takes seconds of real time, far less than the real minute after which jobsd would release
the next batch by itself). In the bad campaign one released device halts right after taking its
execution, so the abort is seen to fire on the 4th executed thing without waiting for a 5th;
that device is then power-cut, finishes, and its late FAILED is counted by the CANCELED job."""
from __future__ import annotations

import json
import re
import urllib.request

import pytest

from conftest import stack, thing_arn
from iotjobs_host import sign
from iotjobs_host.devsim import FACTORY_VERSION, make_image, ota_dir, read_otadata, slot_image
from iotjobs_host.fileserver import FlakyServer

FLEET = 20
RATE = 5
ROLLOUT = {"maximumPerMinute": RATE}
ABORT = {"criteriaList": [{"failureType": "FAILED", "action": "CANCEL",
                           "thresholdPercentage": 30, "minNumberOfExecutedThings": 4}]}
RETRY = {"criteriaList": [{"failureType": "FAILED", "numberOfRetries": 1}]}
MINUTE = 60                  # a rollout minute of jobsd's clock (no --minute-seconds)
IMAGE_SIZE = 64 * 1024       # small images keep 20 downloads and signature checks quick
BOOT_DEADLINE = 120          # 20 devices starting at once on 2 cores, TLS handshakes included
BATCH_DEADLINE = 120         # 5 devices downloading, verifying, rebooting, reporting
REASON_CODE = re.compile(r"[A-Z0-9_]{1,128}")  # FLEET.md 2.3: the pattern of reasonCode


# -- the stack ------------------------------------------------------------------------------------
class Campaign:
    """jobsd with test hooks, a signing key, and the fleet of devsim processes."""

    def __init__(self, tmp_path, mosquitto, procs, files, device, image):
        self.tmp, self.files, self.device = tmp_path, files, device
        # the default heap of the default image (fleet32); the pip image (IOTJOBS_IMAGE=pip)
        # needs test_ota.py's 176K for an OTA
        self.heap = "176K" if image == "pip" else stack.DEFAULT_HEAP
        self.jobsd = stack.Jobsd(str(tmp_path / "jobsd"), mosquitto.broker, files=str(files),
                                 extra=["--test-hooks"])
        procs.append(self.jobsd)
        self.iot = self.jobsd.iot
        self.keys = sign.keygen(str(tmp_path / "keys"))  # tools/sign keygen
        self.devices: dict[str, stack.Device] = {}

    # jobsd's clock
    def advance(self, seconds: float) -> float:
        """Move jobsd's clock; it does what is then due (a rollout minute) before replying."""
        req = urllib.request.Request(self.jobsd.control_url + "/_jobsd/test-hooks", method="PUT",
                                     data=json.dumps({"advanceClock": seconds}).encode(),
                                     headers={"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback
        with opener.open(req, timeout=30) as r:
            return json.load(r)["now"]

    # images and jobs
    def signed(self, version: str, name: str, url: str | None = None, **flags) -> dict:
        """A firmware image signed by tools/sign (as `tools/jobs ota` does): placed in jobsd's
        files (s3://firmware/NAME, a presigned-URL placeholder) or, with `url`, served elsewhere."""
        path = self.tmp / name
        path.write_bytes(make_image(version, size=IMAGE_SIZE, **flags))
        argv = ["image", str(path), "--key", self.keys["signing-key.pem"], "--version", version]
        argv += ["--url", url] if url else ["--bucket", "firmware", "--files", str(self.files)]
        return sign.image(sign.parser().parse_args(argv))

    def create_job(self, job_id: str, doc: dict, things: list[str], **configs) -> None:
        self.iot.create_job(jobId=job_id, targets=[thing_arn(t) for t in things],
                            document=json.dumps(doc), **configs)

    # the fleet
    def register(self, things: list[str]) -> None:
        for t in things:
            self.iot.create_thing(thingName=t)

    def start(self, things: list[str], config: dict | None = None) -> None:
        """Boot devices (registered things), all at once: each is its own process, started
        without waiting for the others; then wait until every one has reached the broker and
        subscribed. `config`: thing -> more config.json for that one."""
        cfg = {"ota": {"pubkey": self.keys["signing-pub.der"], "allow": ["http://127.0.0.1:"]}}
        for t in things:
            self.devices[t] = self.device(t, heap=self.heap,
                                          config={**cfg, **((config or {}).get(t, {}))})
        self.wait(lambda: all("] connected" in d.log_text(10**7) for d in self.devices.values()),
                  BOOT_DEADLINE, "every device to connect")

    def wait(self, cond, timeout, what):
        def check():
            dead = [t for t, d in self.devices.items() if not d.proc.alive()]
            if dead:
                raise AssertionError(f"devsim of {dead} exited while waiting for {what}:\n"
                                     + self.devices[dead[0]].log_text(3000))
            return cond()

        try:
            return stack.wait_until(check, timeout, what, 0.1)
        except TimeoutError as e:
            quiet = [t for t, d in self.devices.items() if "] connected" not in d.log_text(10**7)]
            logs = "".join(f"\n--- {t}\n{self.devices[t].log_text(3000)}" for t in quiet[:3])
            raise AssertionError(f"{e}; devices not connected: {quiet}{logs}") from None

    # what jobsd says
    def job(self, job_id: str) -> dict:
        return self.iot.describe_job(jobId=job_id)["job"]

    def executions(self, job_id: str) -> dict[str, list[dict]]:
        """thing -> its executions of the job (JobExecutionSummary), oldest first."""
        out: dict[str, list[dict]] = {}
        kw: dict = {"jobId": job_id, "maxResults": 100}
        while True:
            page = self.iot.list_job_executions_for_job(**kw)
            for s in page.get("executionSummaries", []):
                out.setdefault(s["thingArn"].rsplit("/", 1)[1], []).append(
                    s["jobExecutionSummary"])
            if not page.get("nextToken"):
                break
            kw["nextToken"] = page["nextToken"]
        for v in out.values():
            v.sort(key=lambda e: e["executionNumber"])
        return out

    def executions_for_thing(self, thing: str, job_id: str) -> list[dict]:
        page = self.iot.list_job_executions_for_thing(thingName=thing, maxResults=100)
        assert not page.get("nextToken")
        return sorted((s["jobExecutionSummary"] for s in page.get("executionSummaries", [])
                       if s["jobId"] == job_id), key=lambda e: e["executionNumber"])

    def details(self, job_id: str, thing: str, number: int | None = None) -> dict:
        kw = {"executionNumber": number} if number is not None else {}
        return self.iot.describe_job_execution(jobId=job_id, thingName=thing, **kw)["execution"]

    def wait_status(self, job_id: str, want: str, timeout: float = BATCH_DEADLINE) -> dict:
        """Wait until the job leaves IN_PROGRESS (or SCHEDULED); it must then be `want`."""
        job = self.wait(lambda: (lambda j: j if j["status"] not in ("IN_PROGRESS", "SCHEDULED")
                                 else None)(self.job(job_id)),
                        timeout, f"{job_id} to become {want}")
        assert job["status"] == want, f"{job}\n{self.failures(job_id)}"
        return job

    def wait_counters(self, job_id: str, done: int) -> dict:
        """Wait until `done` executions of the job have SUCCEEDED (describe_job counters) and none
        is QUEUED or IN_PROGRESS; any failure ends the wait at once."""
        last: dict = {}

        def settled():
            nonlocal last
            last = self.job(job_id)
            p = last.get("jobProcessDetails", {})
            failed = p.get("numberOfFailedThings", 0) + p.get("numberOfRejectedThings", 0) + \
                p.get("numberOfTimedOutThings", 0)
            if failed:
                raise AssertionError(f"{job_id}: an execution failed: {p}\n{self.failures(job_id)}")
            ended = failed + p.get("numberOfSucceededThings", 0)
            busy = p.get("numberOfQueuedThings", 0) + p.get("numberOfInProgressThings", 0)
            return last if ended >= done and busy == 0 else None

        try:
            return self.wait(settled, BATCH_DEADLINE, f"{done} executions of {job_id} to end")
        except AssertionError as e:
            raise AssertionError(f"{e}\nlast DescribeJob: {last}") from None

    def failures(self, job_id: str) -> str:
        out = []
        for thing, exs in self.executions(job_id).items():
            for e in exs:
                if e["status"] not in ("SUCCEEDED", "QUEUED", "IN_PROGRESS"):
                    d = self.details(job_id, thing, e["executionNumber"])
                    out.append(f"{thing} #{e['executionNumber']}: {e['status']} "
                               f"{d.get('statusDetails')}\n{self.devices[thing].log_text(2000)}")
        return "\n".join(out)


@pytest.fixture
def campaign(tmp_path, mosquitto, procs, files, device, device_image):
    return Campaign(tmp_path, mosquitto, procs, files, device, device_image)


def names(prefix: str, n: int = FLEET) -> list[str]:
    return [f"{prefix}-{i:02d}" for i in range(n)]


def firmware(dev: stack.Device) -> tuple[str | None, str | None, dict]:
    """What the board runs, as its bootloader sees it: (slot, version of that slot's image,
    otadata). A board never updated boots the factory image in ota_0 (otadata erased)."""
    folder = ota_dir(dev.flash)
    od = read_otadata(folder)
    slot = od.get("boot") or "ota_0"
    if od["state"].get(slot) in ("ABORTED", "INVALID"):
        slot = "ota_0" if slot == "ota_1" else "ota_1"
    image = slot_image(folder, slot)
    return slot, image and image["version"], od


def assert_untouched(dev: stack.Device, job_id: str | None) -> None:
    """Still the factory firmware, never reset, nothing written to the other slot; with
    `job_id`, the device never even mentioned the job."""
    slot, version, od = firmware(dev)
    assert (slot, version) == ("ota_0", FACTORY_VERSION), (slot, version, od)
    assert od.get("boot") in (None, "ota_0") and not od["state"], od
    assert slot_image(ota_dir(dev.flash), "ota_1") is None, "nothing was written to ota_1"
    log = dev.log_text(10**7)
    assert len(dev.boots()) == 1, log
    assert job_id is None or job_id not in log, f"{dev.thing} saw {job_id}:\n{log}"


# -- the bad image --------------------------------------------------------------------------------
def test_bad_image_campaign_is_aborted_within_its_first_batch(campaign, spy):
    c, job_id = campaign, "fw-bad"
    things = names("bad")
    doc = c.signed("2.0.0", "bad.bin", selftest="fail")
    c.register(things)
    wire = {t: spy(t) for t in things}  # every jobs message of every thing, from the start
    c.create_job(job_id, doc, things, jobExecutionsRolloutConfig=ROLLOUT, abortConfig=ABORT)

    # The first minute's batch is released at once: 5 executions, the other 15 things have none
    first = c.executions(job_id)
    assert len(first) == RATE and all(len(v) == 1 for v in first.values()), first
    released = sorted(first)
    # One released device halts right after it took its execution (IN_PROGRESS at jobsd), so
    # the abort is seen to fire once the other 4 have failed, not after all 5 executed.
    slow = released[-1]
    c.start(things, {slow: {"halt_at": "start-next-accepted"}})

    job = c.wait_status(job_id, "CANCELED")  # by its abort criteria
    p = job["jobProcessDetails"]
    assert p.get("numberOfFailedThings") == 4 and p.get("numberOfSucceededThings", 0) == 0, p
    assert not job.get("forceCanceled"), job
    assert REASON_CODE.fullmatch(job.get("reasonCode", "")), job
    assert job.get("comment"), job
    assert "completedAt" not in job, job
    slow_status = c.details(job_id, slow)["status"]
    # IN_PROGRESS if it had taken its execution before the abort (left to finish), CANCELED if
    # it was still QUEUED: either way the abort did not wait for a 5th executed thing
    assert slow_status in ("IN_PROGRESS", "CANCELED"), slow_status

    if slow_status == "IN_PROGRESS":
        # its late result still lands and is counted; the job stays CANCELED
        dev = c.devices[slow]
        c.wait(lambda: "@@HALT start-next-accepted" in dev.log_text(10**7), 30, "the halt")
        dev.power_cut()
        c.wait(lambda: c.details(job_id, slow)["status"] == "FAILED", BATCH_DEADLINE,
               f"the late result of {slow}")
        job = c.job(job_id)
        assert job["status"] == "CANCELED", job
        assert job["jobProcessDetails"].get("numberOfFailedThings") == 5, job

    # Every released device has reported: the rollout minutes that follow release nothing more
    for _ in range(3):
        c.advance(MINUTE)
        assert sorted(c.executions(job_id)) == released
        assert c.job(job_id)["status"] == "CANCELED"

    for t in released:
        ex = c.details(job_id, t)
        if t == slow and slow_status == "CANCELED":
            assert ex["status"] == "CANCELED", ex
            assert_untouched(c.devices[t], None)
            continue
        details = ex.get("statusDetails", {}).get("detailsMap", {})
        assert ex["status"] == "FAILED" and details.get("reason") == "rolled_back", ex
        assert details.get("version") == FACTORY_VERSION, details
        slot, version, od = firmware(c.devices[t])
        assert (slot, version) == ("ota_0", FACTORY_VERSION), (t, od)
        assert od["state"].get("ota_1") == "ABORTED", (t, od)  # the bad image never confirmed
        assert "rollback" in c.devices[t].log_text(10**7)

    for t in things:
        if t in released:
            continue
        assert c.executions_for_thing(t, job_id) == [], t
        with pytest.raises(c.iot.exceptions.ResourceNotFoundException):
            c.details(job_id, t)
        assert_untouched(c.devices[t], job_id)
        # it talked to the jobs service (nothing pending) and never heard of the job
        seen = wire[t].messages
        assert any(topic.endswith("/accepted") for topic, _ in seen), wire[t].topics()
        assert not [m for m in seen if job_id in json.dumps(m[1], default=str)], seen
    assert sorted(c.executions(job_id)) == released
    assert all(any(job_id in json.dumps(m[1], default=str) for m in wire[t].messages)
               for t in released)


# -- the good image -------------------------------------------------------------------------------
def test_good_image_campaign_completes_one_batch_a_minute(campaign):
    c, job_id = campaign, "fw-good"
    things = names("good")
    doc = c.signed("2.0.0", "good.bin")
    c.register(things)
    c.start(things)
    c.create_job(job_id, doc, things, jobExecutionsRolloutConfig=ROLLOUT, abortConfig=ABORT)

    batches = FLEET // RATE
    seen: list[str] = []
    for minute in range(batches):
        if minute:
            c.advance(MINUTE)
        now = c.executions(job_id)
        new = sorted(set(now) - set(seen))
        assert len(now) == RATE * (minute + 1) and len(new) == RATE, (minute, sorted(now))
        seen += new
        if minute + 1 < batches:
            job = c.job(job_id)
            assert job["status"] == "IN_PROGRESS" and job.get("isConcurrent") is True, job
        job = c.wait_counters(job_id, RATE * (minute + 1))
        assert job["jobProcessDetails"]["numberOfSucceededThings"] == RATE * (minute + 1), job
        # everyone released has reported, and still no more than this minute's share is out
        assert len(c.executions(job_id)) == RATE * (minute + 1)

    job = c.wait_status(job_id, "COMPLETED", 30)
    assert job["jobProcessDetails"]["numberOfSucceededThings"] == FLEET, job
    assert not job.get("isConcurrent"), job
    assert sorted(seen) == things
    for t in things:
        exs = c.executions_for_thing(t, job_id)
        assert [(e["executionNumber"], e["status"]) for e in exs] == [(1, "SUCCEEDED")], (t, exs)
        details = c.details(job_id, t)["statusDetails"]["detailsMap"]
        assert details["version"] == "2.0.0", (t, details)
        slot, version, od = firmware(c.devices[t])
        assert (slot, version) == ("ota_1", "2.0.0") and od["state"]["ota_1"] == "VALID", (t, od)
        assert "firmware 2.0.0 confirmed" in c.devices[t].log_text(10**7)


# -- a retry --------------------------------------------------------------------------------------
def test_device_failing_a_download_once_succeeds_on_its_retry(campaign):
    """The image server answers 404 to the first request (a transient error of the file
    store): that device's first execution FAILED DOWNLOAD_FAILED; the retry is a new
    execution (executionNumber 2, retryAttempt 1), which the device runs as new, and it
    SUCCEEDS. Three devices under the campaign's configs: 1 failed attempt of 4 stays below
    the abort threshold."""
    c, job_id = campaign, "fw-retry"
    things = names("retry", 3)
    (c.tmp / "srv").mkdir()
    srv = FlakyServer(None, fail_status=404, fails=1, root=str(c.tmp / "srv"))
    try:
        img_doc = c.signed("2.0.0", "srv/fw.bin", url=srv.url + "fw.bin")
        c.register(things)
        c.start(things)
        c.create_job(job_id, img_doc, things, jobExecutionsRolloutConfig=ROLLOUT,
                     abortConfig=ABORT, jobExecutionsRetryConfig=RETRY)
        # a retry is created in the same transaction as the FAILED report: the job cannot look
        # COMPLETED in between
        job = c.wait_status(job_id, "COMPLETED")
    finally:
        srv.stop()
    p = job["jobProcessDetails"]
    # counters count attempts
    assert p.get("numberOfFailedThings") == 1 and p.get("numberOfSucceededThings") == 3, (
        p, c.failures(job_id))
    retried = [t for t, exs in c.executions(job_id).items() if len(exs) > 1]
    assert len(retried) == 1, c.executions(job_id)
    t = retried[0]
    exs = c.executions_for_thing(t, job_id)
    assert [(e["executionNumber"], e.get("retryAttempt"), e["status"]) for e in exs] == [
        (1, 0, "FAILED"), (2, 1, "SUCCEEDED")], exs
    first = c.details(job_id, t, 1)["statusDetails"]["detailsMap"]
    assert first.get("reason") == "DOWNLOAD_FAILED", first
    second = c.details(job_id, t, 2)["statusDetails"]["detailsMap"]
    assert second.get("version") == "2.0.0" and second.get("reason") == "OK", second
    log = c.devices[t].log_text(10**7)
    assert "already finished" not in log and "ALREADY_DONE" not in log, log
    for thing in things:
        slot, version, od = firmware(c.devices[thing])
        assert (slot, version) == ("ota_1", "2.0.0") and od["state"]["ota_1"] == "VALID", od
    assert srv.ranges == [0] * (len(things) + 1), srv.ranges  # one 404, then three downloads
