"""The device images are what they claim (tools/images, built by make setup): pip is the 64-bit
port loading our .mpy files; stock32 a 32-bit port freezing micropython-lib's umqtt.simple but
none of our code; fleet32 the same with our library frozen. Then the transport and a whole job
on each, since the 32-bit images bring umqtt.simple 1.8.0 where pip has 1.3.4."""
import json
import os
import subprocess

import pytest

from conftest import ROOT, stack, thing_arn, wait_execution
from iotjobs_host import images
from iotjobs_host.build import build

CODE = os.path.join(ROOT, "build", "mpy", "host")
PROBE = """
import sys
import iotjobs.runner
import umqtt.simple
print("MAXSIZE", sys.maxsize)
print("RUNNER", iotjobs.runner.__file__)
print("UMQTT", umqtt.simple.__file__)
"""


@pytest.fixture(scope="module", autouse=True)
def compiled():
    build("host")


def probe(image: str) -> dict:
    r = subprocess.run([images.interpreter(image), "-c", PROBE], capture_output=True, text=True,
                       timeout=30, env=dict(os.environ, MICROPYPATH=".frozen:" + CODE),
                       cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    return dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)


def test_pip_is_64_bit_and_loads_our_mpy_files():
    p = probe("pip")
    assert int(p["MAXSIZE"]) == 2**63 - 1
    assert p["RUNNER"] == os.path.join(CODE, "iotjobs", "runner.mpy")
    assert p["UMQTT"] == os.path.join(CODE, "umqtt", "simple.mpy")  # 1.3.4 from the registry


def test_stock32_is_32_bit_freezes_umqtt_but_loads_our_code_from_files():
    p = probe("stock32")
    assert int(p["MAXSIZE"]) == 2**31 - 1
    assert p["RUNNER"] == os.path.join(CODE, "iotjobs", "runner.mpy")
    assert p["UMQTT"] == "umqtt/simple.py"  # frozen: no path on the filesystem


def test_fleet32_is_32_bit_with_our_library_frozen():
    p = probe("fleet32")
    assert int(p["MAXSIZE"]) == 2**31 - 1
    assert p["RUNNER"] == "iotjobs/runner.py"
    assert p["UMQTT"] == "umqtt/simple.py"


def test_images_are_rebuilt_only_when_their_inputs_change():
    src, identity = images.source()
    stamp = images.stamp_of("fleet32", identity)
    assert stamp != images.stamp_of("stock32", identity)
    assert stamp != images.stamp_of("fleet32", identity + "x")
    for name in ("stock32", "fleet32"):
        with open(os.path.join(images.IMAGE_DIR, name, ".stamp")) as f:
            assert f.read().strip() == images.stamp_of(name, identity), name
    # built and current: asking again builds nothing (no make run, so no log is rewritten)
    log = os.path.join(images.IMAGE_DIR, "fleet32.log")
    before = os.stat(log).st_mtime_ns
    assert images.build_image("fleet32", src, identity) == images.interpreter("fleet32")
    assert os.stat(log).st_mtime_ns == before


@pytest.mark.parametrize("image", images.IMAGES)
def test_transport_on_each_umqtt(mosquitto, tmp_path, image):
    topic = "$aws/things/dev/jobs/" + "x" * 150 + "/update/accepted"
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"port": mosquitto.port, "topic": topic, "expect": 1}))
    r = subprocess.run([images.interpreter(image), "-X", "heapsize=64K",
                        os.path.join(ROOT, "host_tests", "scripts", "long_topic.py"), str(args)],
                       capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, MICROPYPATH=".frozen:" + CODE))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"GOT {len(topic)} from-device" in r.stdout, r.stdout


@pytest.mark.parametrize("image", ["stock32", "fleet32"])
def test_a_job_and_a_command_on_a_32_bit_image(jobsd, iot, device, image):
    thing = f"img-{image}"
    iot.create_thing(thingName=thing)
    dev = device(thing, image=image, heap="96K")
    iot.create_job(jobId=f"{thing}-j", targets=[thing_arn(thing)],
                   document=json.dumps({"operation": "demo", "steps": 2}))
    ex = wait_execution(iot, f"{thing}-j", thing, {"SUCCEEDED", "FAILED", "REJECTED"}, device=dev)
    assert ex["status"] == "SUCCEEDED", (ex, dev.log_text())
    assert f"(image {image}, heap 96K" in dev.log_text()
    iot.create_command(commandId=f"ping-{image}", payload={
        "content": b'{"command": "ping"}', "contentType": "application/json"})
    eid = jobsd.data.start_command_execution(
        targetArn=thing_arn(thing),
        commandArn=f"arn:aws:iot:us-east-1:123456789012:command/ping-{image}")["executionId"]

    def done():
        c = iot.get_command_execution(executionId=eid, targetArn=thing_arn(thing))
        return c if c["status"] not in ("CREATED", "IN_PROGRESS") else None

    c = stack.wait_until(done, 30, "the ping command")
    assert c["status"] == "SUCCEEDED", (c, dev.log_text())
