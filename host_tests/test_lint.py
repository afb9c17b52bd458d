"""`make lint` stays clean: ruff over the device and host code (ruff.toml)."""
import os
import subprocess

from conftest import ROOT

PATHS = ["lib", "firmware", "tools/iotjobs_host", "host_tests", "tools/jobsd", "tools/devsim",
         "tools/build", "tools/demo", "tools/jobs", "tools/bench", "tools/sign"]


def test_ruff_finds_nothing():
    r = subprocess.run([os.path.join(ROOT, ".venv", "bin", "ruff"), "check", *PATHS],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
