"""Fixtures that start, and always stop, the real processes of the local stack, and the
collector that runs MicroPython-side unit tests (host_tests/device/test_*.py) under the unix
port, one pytest item per test function."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from iotjobs_host import pahofix, stack  # noqa: E402
from iotjobs_host.pki import PKI  # noqa: E402

MICROPYTHON = os.path.join(ROOT, ".venv", "bin", "micropython")
DEVICE_TESTS = os.path.join(HERE, "device")
# The images the MicroPython unit tests run on: the 64-bit pip port and the 32-bit stock image
# (tools/images; make setup builds it).
DEVICE_TEST_IMAGES = ("pip", "stock32")
# The image system tests' devices run on: the fleet image, unless a test says otherwise or is
# marked `images(...)` (IOTJOBS_IMAGE overrides the default).
DEVICE_IMAGE = os.environ.get("IOTJOBS_IMAGE", "fleet32")
ALL_IMAGES = ("fleet32", "stock32", "pip")


def pytest_configure(config):
    pahofix.patch()  # paho's loop_stop() races its thread (tools/iotjobs_host/pahofix.py)
    config.addinivalue_line("markers", "images(*names): run the test once on each of these "
                            "device images (the `device` fixture's default image)")


def pytest_generate_tests(metafunc):
    m = metafunc.definition.get_closest_marker("images")
    if m is not None and "device_image" in metafunc.fixturenames:
        metafunc.parametrize("device_image", m.args or ALL_IMAGES, indirect=True)


# The longest tests, started first: with three workers the suite otherwise ends waiting on the
# 2-minute short soak that the collection order reached last (measured: 8 min 53 s that way).
LONG_FIRST = ("test_soak.py::test_short_soak_holds_every_invariant",
              "test_network.py::test_dead_link_mid_job_is_noticed_within_two_keepalives",
              "test_streams_faults.py::test_a_dead_link_for_30_s_mid_stream_resumes",
              "test_lint.py::test_device_code_uses_only_what_every_esp32_board_has")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        for i, name in enumerate(LONG_FIRST):
            if name in item.nodeid:
                return i
        return len(LONG_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture
def device_image(request):
    """The image the `device` fixture's devices run on (parametrized by the images marker)."""
    return getattr(request, "param", DEVICE_IMAGE)


# -- processes -----------------------------------------------------------------------------------
@pytest.fixture
def procs(request):
    """Processes a test started; their logs are attached to the report when it fails."""
    started: list = []
    request.node._stack_procs = started
    yield started
    for p in reversed(started):
        p.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for p in getattr(item, "_stack_procs", []):
            proc = getattr(p, "proc", p)
            rep.sections.append((f"log of {proc.name} (pid {proc.pid})", proc.log_text()))


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> PKI:
    return PKI(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture
def mosquitto(tmp_path, pki, procs) -> stack.Mosquitto:
    m = stack.Mosquitto(str(tmp_path / "mosquitto"), pki)
    procs.append(m)
    return m


@pytest.fixture
def files(tmp_path):
    """jobsd's --files folder: s3://BUCKET/KEY is files/BUCKET/KEY."""
    d = tmp_path / "files"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory, pki: PKI):
    """One mosquitto for a whole test module (modules that work on fresh names per test)."""
    m = stack.Mosquitto(str(tmp_path_factory.mktemp("broker")), pki)
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="module")
def module_jobsd(request, module_broker, tmp_path_factory):
    """One jobsd for a whole test module on `module_broker`. The module may set JOBSD_EXTRA
    (more command-line options) and JOBSD_FILES (the name of a fixture giving its --files)."""
    files = getattr(request.module, "JOBSD_FILES", None)
    service = stack.Jobsd(str(tmp_path_factory.mktemp("jobsd")), module_broker.broker,
                          files=str(request.getfixturevalue(files)) if files else None,
                          extra=list(getattr(request.module, "JOBSD_EXTRA", [])))
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def jobsd(tmp_path, mosquitto, procs, files) -> stack.Jobsd:
    j = stack.Jobsd(str(tmp_path / "jobsd"), mosquitto.broker, files=str(files))
    procs.append(j)
    return j


@pytest.fixture
def iot(jobsd):
    """boto3 `iot` (control plane) client of the test's jobsd."""
    return jobsd.iot


@pytest.fixture
def device(tmp_path, mosquitto, pki, procs, device_image):
    """Factory: device(thing, tls=True, heap=DEFAULT_HEAP) starts a tools/devsim process."""

    def start(thing: str, tls: bool = True, heap: str = stack.DEFAULT_HEAP, extra=None, config=None,
              keepalive: int = 60, broker: str | None = None,
              image: str | None = None) -> stack.Device:
        d = stack.Device(
            str(tmp_path / ("device-" + thing)),
            thing,
            broker or (mosquitto.tls_broker if tls else mosquitto.broker),
            tls_dir=pki.thing(thing) if tls else None,
            heap=heap,
            extra=extra,
            config=config,
            keepalive=keepalive,
            image=image or device_image,
        )
        procs.append(d)
        return d

    return start


ACCOUNT_ARN = "arn:aws:iot:us-east-1:123456789012"


def thing_arn(thing: str) -> str:
    return f"{ACCOUNT_ARN}:thing/{thing}"


def wait_execution(iot, job_id: str, thing: str, statuses, timeout: float = 30.0,
                   device: stack.Device | None = None) -> dict:
    """Poll DescribeJobExecution until the execution reaches one of `statuses`."""
    last: dict = {}

    def reached():
        nonlocal last
        last = iot.describe_job_execution(jobId=job_id, thingName=thing)["execution"]
        return last if last["status"] in statuses else None

    try:
        return stack.wait_until(reached, timeout, f"{job_id} on {thing} to become {statuses}", 0.05)
    except TimeoutError as e:
        extra = ("\ndevice log:\n" + device.log_text()) if device else ""
        raise AssertionError(f"{e}; last seen {last}{extra}") from None


# -- MicroPython-side unit tests -------------------------------------------------------------------
def run_micropython(module: str, *args: str, heap: str | None = None, timeout: float = 60.0,
                    scratch: str | None = None, image: str = "pip"):
    env = dict(os.environ)
    if scratch:
        env["IOTJOBS_TEST_TMP"] = scratch  # the test's scratch folder (removed after it)
    env["MICROPYPATH"] = ":".join([".frozen", DEVICE_TESTS, os.path.join(ROOT, "lib"),
                                   os.path.join(ROOT, "firmware"), os.path.join(ROOT, "build")])
    from iotjobs_host import images

    argv = [images.interpreter(image)]
    if heap:
        argv += ["-X", f"heapsize={heap}"]
    argv += [os.path.join(DEVICE_TESTS, "_runner.py"), module, *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=DEVICE_TESTS,
                          timeout=timeout)


class MicroPythonFailure(Exception):
    pass


class MicroPythonModule(pytest.File):
    def collect(self):
        mod = self.path.stem
        r = run_micropython(mod, "--list")
        names = [ln[len("TEST "):] for ln in r.stdout.splitlines() if ln.startswith("TEST ")]
        if r.returncode != 0:
            raise MicroPythonFailure(f"{self.path.name} does not import under MicroPython:\n"
                                     f"{r.stdout}{r.stderr}")
        for name in names:
            for image in DEVICE_TEST_IMAGES:
                item = MicroPythonItem.from_parent(self, name=f"{name}[{image}]")
                item.function, item.image = name, image
                yield item


class MicroPythonItem(pytest.Item):
    def runtest(self):
        import shutil
        import tempfile

        scratch = tempfile.mkdtemp(prefix="iotjobs-mp-")
        try:
            # 2 MB: the pip port's default heap, on every image (the 32-bit build's default is
            # 1 MB; the power-cut tests keep flash snapshots of 128 KB)
            r = run_micropython(self.parent.path.stem, self.function, scratch=scratch,
                                image=self.image, heap="2M")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        results = [json.loads(ln[len("RESULT "):]) for ln in r.stdout.splitlines()
                   if ln.startswith("RESULT ")]
        if r.returncode != 0 or not results or not results[0]["ok"]:
            tb = results[0]["traceback"] if results else ""
            out = "\n".join(ln for ln in r.stdout.splitlines() if not ln.startswith("RESULT "))
            raise MicroPythonFailure(f"{tb}\n--- output ---\n{out}\n{r.stderr}".strip())

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, MicroPythonFailure):
            return f"MicroPython {self.parent.path.name}::{self.name}\n{excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.parent.path.name}::{self.name} (micropython)"


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path, parent):
    """host_tests/device/test_*.py are MicroPython modules: run them there, not in CPython."""
    if os.path.dirname(str(module_path)) == DEVICE_TESTS:
        return MicroPythonModule.from_parent(parent, path=module_path)
    return None


# -- watching the wire ---------------------------------------------------------------------------
@pytest.fixture
def spy(mosquitto):
    spies: list[stack.Spy] = []

    def start(thing: str) -> stack.Spy:
        s = stack.Spy(mosquitto.port, thing)
        spies.append(s)
        return s

    yield start
    for s in spies:
        s.stop()
