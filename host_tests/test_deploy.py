"""tools/deploy and the REPL against the unix port behind a pseudo-terminal, the way CI stands in
for a board on a serial port (PLATFORM.md, "mpremote against the unix port"): socat makes the
pty, MicroPython's raw REPL answers mpremote, the board's filesystem is a temporary folder."""
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, stack

sys.path.insert(0, os.path.join(ROOT, "tools"))
from iotjobs_host import build as B  # noqa: E402

MPREMOTE = os.path.join(ROOT, ".venv", "bin", "mpremote")
MICROPYTHON = os.path.join(ROOT, ".venv", "bin", "micropython")


class SerialBoard:
    """The unix port on a pty at `port`; its cwd (`flash`) is the board's filesystem."""

    def __init__(self, folder):
        self.flash = str(folder / "flash")
        os.makedirs(self.flash)
        self.port = str(folder / "ttyMP")
        self.proc = subprocess.Popen(
            ["socat", f"PTY,link={self.port},rawer",
             f"EXEC:{MICROPYTHON},pty,rawer,stderr,setsid,ctty"],
            cwd=self.flash, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        stack.wait_until(lambda: os.path.exists(self.port) or self.proc.poll() is not None, 10,
                         "the pty")
        assert self.proc.poll() is None, self.proc.stderr.read()

    def alive(self):
        return self.proc.poll() is None

    def exec(self, code):
        r = subprocess.run([MPREMOTE, "connect", self.port, "resume", "exec", code],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def board(tmp_path):
    b = SerialBoard(tmp_path)
    yield b
    b.stop()


def deploy(board, *extra):
    return subprocess.run([os.path.join(ROOT, "tools", "deploy"), "--port", board.port,
                           "--board", "UNIX", "--no-reset", *extra],
                          capture_output=True, text=True, timeout=300)


def test_deploy_copies_only_what_changed_and_the_code_runs_on_the_board(board, tmp_path):
    config = tmp_path / "provisioned"
    (config / "certs").mkdir(parents=True)
    (config / "config.json").write_text('{"thing": "dev1", "host": "127.0.0.1", "port": 1883}')
    (config / "certs" / "ca.der").write_bytes(b"\x30\x03\x02\x01\x01")
    r = deploy(board, "--config", str(config))
    assert r.returncode == 0, r.stdout + r.stderr
    files = {rel: n for rel, n in B.size_report(os.path.join(ROOT, "build", "UNIX"))}
    n = len(files) + 2
    assert f"deploy: {n} file(s) for UNIX, {n} changed" in r.stdout, r.stdout
    assert f"[{n}/{n}]" in r.stdout
    for rel in files:
        with open(os.path.join(ROOT, "build", "UNIX", rel), "rb") as a, \
                open(os.path.join(board.flash, rel), "rb") as b:
            assert a.read() == b.read(), rel
    with open(os.path.join(board.flash, "config.json")) as f:
        assert '"dev1"' in f.read()
    # the deployed library imports and runs on the "board"
    out = board.exec("import sys\nsys.path.insert(0, '')\nfrom iotjobs import topics\n"
                     "print('max', topics.THING_MAX, topics.Topics('dev1').notify_next)")
    assert "max 128 b'$aws/things/dev1/jobs/notify-next'" in out, out
    # a second deploy copies nothing; a changed config copies one file
    r = deploy(board, "--config", str(config))
    assert f"{n} changed" not in r.stdout and ", 0 changed" in r.stdout, r.stdout
    (config / "config.json").write_text('{"thing": "dev2", "host": "127.0.0.1", "port": 1883}')
    r = deploy(board, "--config", str(config))
    assert ", 1 changed" in r.stdout and "[1/1] config.json" in r.stdout, r.stdout
    with open(os.path.join(board.flash, "config.json")) as f:
        assert '"dev2"' in f.read()


def test_deploy_removes_the_retired_platform_module(board):
    """The board module was `platform` (platform.mpy on the board) before it was renamed
    iotjobs_board; a deploy removes the old compiled file and leaves a user's platform.py."""
    for name in ("platform.mpy", "platform.py"):
        with open(os.path.join(board.flash, name), "wb") as f:
            f.write(b"old")
    r = deploy(board)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "removed what an earlier release left: platform.mpy" in r.stdout, r.stdout
    assert not os.path.exists(os.path.join(board.flash, "platform.mpy"))
    assert os.path.exists(os.path.join(board.flash, "platform.py"))
    assert os.path.exists(os.path.join(board.flash, "iotjobs_board.mpy"))
    r = deploy(board)
    assert r.returncode == 0 and "earlier release" not in r.stdout, r.stdout


def test_deploy_refuses_a_missing_config_and_an_unknown_board(board, tmp_path):
    r = deploy(board, "--config", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "config.json is missing" in r.stderr, r.stderr
    r = subprocess.run([os.path.join(ROOT, "tools", "deploy"), "--port", board.port,
                        "--board", "NOPE"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown board 'NOPE'" in r.stderr, r.stderr


def test_deploy_soft_resets_at_the_end(board):
    """A soft reset restarts main.py on a board; the unix port ends its process on it."""
    r = subprocess.run([os.path.join(ROOT, "tools", "deploy"), "--port", board.port,
                        "--board", "UNIX"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "deploy: soft reset" in r.stdout
    stack.wait_until(lambda: not board.alive(), 20, "the unix port to end at the soft reset")


def test_repl_over_the_pty(board):
    """`make repl` is `mpremote connect PORT repl`: type an expression, read the answer,
    leave with Ctrl-]."""
    master, slave = os.openpty()
    p = subprocess.Popen([MPREMOTE, "connect", board.port, "resume", "repl"], stdin=slave,
                         stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    seen = b""

    def read_until(text, timeout=20):
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} in {seen[-300:]!r}"
            if select.select([master], [], [], left)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
        return seen

    try:
        read_until(b"Connected to MicroPython")
        os.write(master, b"\r")
        read_until(b">>> ")
        os.write(master, b"6 * 7\r")
        read_until(b"42")
        os.write(master, b"\x1d")  # Ctrl-]: leave mpremote's REPL
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
    assert board.alive(), "leaving the REPL leaves the board running"
    assert "ok" in board.exec("print('ok')")


def test_make_targets_name_the_port():
    with open(os.path.join(ROOT, "Makefile")) as f:
        text = f.read()
    assert "tools/deploy --port $(PORT)" in text and "mpremote connect $(PORT) repl" in text
