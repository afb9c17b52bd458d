"""`make lint` stays clean: ruff over the device and host code (ruff.toml)."""
import os
import subprocess

from conftest import ROOT


def _lint_paths():
    """The Makefile's LINT_PATHS: one list for `make lint` and this test."""
    with open(os.path.join(ROOT, "Makefile")) as f:
        for line in f:
            if line.startswith("LINT_PATHS :="):
                return line.split(":=", 1)[1].split()
    raise AssertionError("no LINT_PATHS in the Makefile")


PATHS = _lint_paths()


def test_ruff_finds_nothing():
    r = subprocess.run([os.path.join(ROOT, ".venv", "bin", "ruff"), "check", *PATHS],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
