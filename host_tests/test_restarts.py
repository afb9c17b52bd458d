"""Power cuts at every point of a job's life: the device process is killed (SIGKILL) where it
stands, devsim boots it again, and the job must still end in the right terminal state exactly
once, with its side effect applied exactly once (the `effect` test handler appends the job id to
effects.log in the device's flash, with checkpoints around it), or at least once for a handler
that declares itself idempotent (`rerun`).

The device halts at the named point (config "halt_at", once: a marker file in flash) and prints
`@@HALT <point>`; the test then cuts the power, so the cut lands exactly there."""
import json
import os

import pytest

from conftest import stack, thing_arn, wait_execution

# every test here runs on each device image: fleet32, stock32 and pip
pytestmark = pytest.mark.images()

TERMINAL = {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED", "REMOVED"}
POINTS = [
    "before-start-next",      # at boot, before asking for work
    "start-next-sent",        # the service has moved the job IN_PROGRESS; no reply seen yet
    "start-next-accepted",    # reply seen, nothing journaled yet
    "journaled",              # job in the journal, handler not started
    "handler-before-effect",  # checkpoint says "effect", effect not done
    "handler-after-effect",   # effect done, checkpoint not yet "done"
    "handler-checkpointed",   # effect done and checkpointed
    "handler-done",           # handler returned, outcome not journaled
    "outbox-written",         # terminal update in the outbox, not sent
    "update-sent",            # terminal update published, its reply not seen
    "update-answered",        # reply seen, outbox not cleared
    "outbox-cleared",         # done; the next start-next not yet sent
]


def halt_and_cut(dev, point, timeout=30):
    stack.wait_until(lambda: f"@@HALT {point}" in dev.log_text(10**7) or not dev.proc.alive(),
                     timeout, f"the device to halt at {point}")
    assert dev.proc.alive(), dev.log_text()
    return dev.power_cut()


def effects(dev):
    try:
        with open(os.path.join(dev.flash, "effects.log")) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


def terminal_updates(watch, thing, job_id):
    """(accepted, rejected) replies to terminal updates of job_id, matched by clientToken."""
    base = f"$aws/things/{thing}/jobs/{job_id}/update"
    tokens = {p.get("clientToken") for t, p in watch.messages
              if t == base and isinstance(p, dict) and p.get("status") in TERMINAL}
    accepted = [p for t, p in watch.messages if t == base + "/accepted" and p.get("clientToken") in tokens]
    rejected = [p for t, p in watch.messages if t == base + "/rejected" and p.get("clientToken") in tokens]
    return accepted, rejected


@pytest.mark.parametrize("point", POINTS)
def test_power_cut_at_each_point(point, jobsd, iot, device, spy):
    thing = "cut-" + point
    iot.create_thing(thingName=thing)
    iot.create_job(jobId="job-1", targets=[thing_arn(thing)], document=json.dumps({"operation": "effect"}))
    watch = spy(thing)
    dev = device(thing, config={"test_handlers": True, "halt_at": point, "progress_min_ms": 0})
    halt_and_cut(dev, point)
    stack.wait_until(lambda: len(dev.boots()) >= 2, 30, "devsim to boot the device again")
    stack.wait_until(lambda: "] connected" in dev.log_text(10**7).rsplit("devsim: boot 2", 1)[-1],
                     30, "the rebooted device to connect")
    ex = wait_execution(iot, "job-1", thing, TERMINAL, 40, device=dev)
    assert ex["status"] == "SUCCEEDED", (ex, dev.log_text())
    accepted, _ = terminal_updates(watch, thing, "job-1")
    assert len(accepted) <= 1, accepted  # the service took the terminal status once
    # The device goes on working: a second job completes without a cut.
    iot.create_job(jobId="job-2", targets=[thing_arn(thing)], document=json.dumps({"operation": "effect"}))
    ex2 = wait_execution(iot, "job-2", thing, TERMINAL, 30, device=dev)
    assert ex2["status"] == "SUCCEEDED", ex2
    assert effects(dev) == ["job-1", "job-2"], "each side effect exactly once"
    assert "Traceback" not in dev.log_text(10**7)


def test_idempotent_handler_is_simply_run_again(jobsd, iot, device):
    thing = "cut-rerun"
    iot.create_thing(thingName=thing)
    iot.create_job(jobId="job-r", targets=[thing_arn(thing)], document=json.dumps({"operation": "rerun"}))
    dev = device(thing, config={"test_handlers": True, "halt_at": "handler-after-effect"})
    halt_and_cut(dev, "handler-after-effect")
    ex = wait_execution(iot, "job-r", thing, TERMINAL, 40, device=dev)
    assert ex["status"] == "SUCCEEDED", ex
    assert effects(dev) == ["job-r", "job-r"], "an idempotent handler runs again after the cut"


def test_job_cancelled_while_the_device_was_down_is_abandoned(jobsd, iot, device):
    thing = "cut-cancel"
    iot.create_thing(thingName=thing)
    iot.create_job(jobId="job-c", targets=[thing_arn(thing)], document=json.dumps({"operation": "effect"}))
    dev = device(thing, config={"test_handlers": True, "halt_at": "journaled"})
    stack.wait_until(lambda: "@@HALT journaled" in dev.log_text(10**7), 30, "the halt")
    # While the device is stuck (as good as off), the operator force-cancels the job.
    iot.cancel_job(jobId="job-c", force=True)
    dev.power_cut()
    stack.wait_until(lambda: "abandoned" in dev.log_text(10**7), 30, "the device to abandon the job")
    assert effects(dev) == [], "a cancelled job's handler must not run"
    ex = iot.describe_job_execution(jobId="job-c", thingName=thing)["execution"]
    assert ex["status"] == "CANCELED"
    iot.create_job(jobId="job-d", targets=[thing_arn(thing)], document=json.dumps({"operation": "effect"}))
    assert wait_execution(iot, "job-d", thing, TERMINAL, 30, device=dev)["status"] == "SUCCEEDED"
    assert effects(dev) == ["job-d"]
