"""Start and stop the local stack's real processes: mosquitto, jobsd, devsim.

Shared by the pytest fixtures and `make demo`. Every process is started by us, logs to a file
of its own, and is ended by its PID (terminate, then kill after a deadline)."""
from __future__ import annotations

import os
import shutil
import signal
import json
import socket
import subprocess
import time
from typing import IO, Optional
from collections.abc import Callable

from . import TOOLS, pahofix
from .pki import PKI
from .devsim import DEFAULT_HEAP, DEFAULT_IMAGE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.02):
    """Poll `cond` until it returns something truthy; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if not found:
        raise RuntimeError("mosquitto is not installed: run `make setup`")
    return found


class Proc:
    """A child process with its output in a log file; stop() ends it and nothing else."""

    def __init__(self, name: str, argv: list[str], log_path: str, cwd: Optional[str] = None,
                 env: Optional[dict] = None, stdout_pipe: bool = False) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")
        self.popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        p = self.popen
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout)
        if p.stdout:
            p.stdout.close()
        self._log.close()
        return p.returncode

    def log_text(self, tail: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                data = f.read()
        except OSError:
            return ""
        return data[-tail:].decode(errors="replace")


class Mosquitto:
    """mosquitto with a plain listener and a mutual-TLS listener (client CN = MQTT username)."""

    def __init__(self, workdir: str, pki: PKI, acl: bool = True,
                 port: Optional[int] = None, tls_port: Optional[int] = None) -> None:
        os.makedirs(workdir, exist_ok=True)
        self.host = "127.0.0.1"
        self.workdir, self.pki, self.acl = workdir, pki, acl
        self.log_path = os.path.join(workdir, "mosquitto.log")
        for attempt in range(5):
            self.port = port or free_port()
            self.tls_port = tls_port or free_port()
            self._write_conf()
            try:
                self._start()
                return
            except RuntimeError as e:
                # A free port taken by another process between the pick and the bind: pick again
                if "Address already in use" not in str(e) or (port and tls_port) or attempt == 4:
                    raise

    def _write_conf(self) -> None:
        pki, workdir = self.pki, self.workdir
        srv = pki.server()
        conf = os.path.join(workdir, "mosquitto.conf")
        lines = [
            "per_listener_settings true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "persistence false",
            "set_tcp_nodelay true",
            # loopback plain listener: jobsd and host tools (trusted, no ACL)
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            # devices: mutual TLS, the certificate CN is the username (= thing name)
            f"listener {self.tls_port} 127.0.0.1",
            f"cafile {pki.ca_pem}",
            f"certfile {srv['cert_pem']}",
            f"keyfile {srv['key_pem']}",
            "require_certificate true",
            "use_identity_as_username true",
            "allow_anonymous false",
        ]
        if self.acl:
            # jobsd writes the ACL that keeps each thing on its own topics
            acl_file = os.path.join(workdir, "things.acl")
            subprocess.run([os.path.join(TOOLS, "jobsd"), "--write-acl", acl_file], check=True)
            lines.append(f"acl_file {acl_file}")
        if os.geteuid() == 0:
            lines.insert(0, "user root")
        with open(conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.conf = conf

    def _start(self) -> None:
        self.proc = Proc("mosquitto", [mosquitto_binary(), "-c", self.conf], self.log_path)
        try:
            wait_until(lambda: (port_open(self.port) and port_open(self.tls_port)) or not self.proc.alive(),
                       10, "mosquitto to listen")
            if not self.proc.alive():
                raise RuntimeError("mosquitto exited:\n" + self.proc.log_text())
        except Exception:
            self.proc.stop()
            raise

    @property
    def broker(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def tls_broker(self) -> str:
        return f"{self.host}:{self.tls_port}"

    def stop(self) -> Optional[int]:
        return self.proc.stop()

    def restart(self) -> None:
        """Stop and start again on the same ports (every client loses its connection)."""
        self.proc.stop()
        self._start()


class Jobsd:
    """tools/jobsd on free ports; ready when it prints its READY line."""

    def __init__(self, workdir: str, broker: str, files: Optional[str] = None,
                 extra: Optional[list[str]] = None, db: Optional[str] = None,
                 log_name: str = "jobsd.log", ready_timeout: float = 60.0) -> None:
        # 60 s: jobsd is ready in about a second, but a restart on a loaded machine (a 50-device
        # soak on two cores, its store in recovery) has taken over 20
        os.makedirs(workdir, exist_ok=True)
        argv = [os.path.join(TOOLS, "jobsd"), "--broker", broker, "--data", "127.0.0.1:0",
                "--control", "127.0.0.1:0", "--db", db or os.path.join(workdir, "jobsd.sqlite3")]
        if files:
            argv += ["--files", files]
        argv += extra or []
        self.proc = Proc("jobsd", argv, os.path.join(workdir, log_name), stdout_pipe=True)
        try:
            line = self._ready_line(ready_timeout)
        except Exception:
            self.proc.stop()
            raise
        fields = dict(kv.split("=", 1) for kv in line.split()[1:])
        self.control_url = "http://" + fields["control"]
        self.data_url = "http://" + fields["data"]
        # boto3 clients, as an operator (`iot`) and an HTTPS device (`iot-jobs-data`) use them
        self.iot = boto3_client("iot", self.control_url)
        self.data = boto3_client("iot-jobs-data", self.data_url)

    def _ready_line(self, timeout: float) -> str:
        import selectors

        out = self.proc.popen.stdout
        assert out is not None
        sel = selectors.DefaultSelector()
        sel.register(out, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise TimeoutError("jobsd did not print READY:\n" + self.proc.log_text())
            line = out.readline().decode(errors="replace")
            if not line:
                raise RuntimeError("jobsd exited:\n" + self.proc.log_text())
            if line.startswith("READY "):
                return line.strip()

    def stop(self) -> Optional[int]:
        return self.proc.stop()


def boto3_client(service: str, url: str):
    import boto3
    from botocore.config import Config

    return boto3.client(
        service,
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
        config=Config(retries={"max_attempts": 1}),
    )


class Device:
    """One tools/devsim process: a simulated board running firmware/ under the unix port."""

    def __init__(self, workdir: str, thing: str, broker: str, tls_dir: Optional[str] = None,
                 heap: str = DEFAULT_HEAP, extra: Optional[list[str]] = None,
                 config: Optional[dict] = None, keepalive: int = 60,
                 image: str = DEFAULT_IMAGE) -> None:
        os.makedirs(workdir, exist_ok=True)
        self.thing = thing
        self.image = image
        self.flash = os.path.join(workdir, "flash")
        argv = [os.path.join(TOOLS, "devsim"), "--thing", thing, "--broker", broker,
                "--flash", self.flash, "--heap", heap, "--keepalive", str(keepalive),
                "--image", image]
        if tls_dir:
            argv += ["--tls", tls_dir]
        if config:
            argv += ["--config", json.dumps(config)]
        argv += extra or []
        self.proc = Proc("devsim-" + thing, argv, os.path.join(workdir, "device.log"))

    def log_text(self, tail: int = 8000) -> str:
        return self.proc.log_text(tail)

    def boots(self) -> list[int]:
        """PIDs of the firmware processes devsim has started, oldest first."""
        import re

        return [int(m) for m in re.findall(r"devsim: boot \d+ \(image \S+, heap \S+, pid (\d+)\)",
                                            self.proc.log_text(10**7))]

    def power_cut(self) -> int:
        """SIGKILL the running firmware process (devsim boots it again); returns its pid."""
        pid = self.boots()[-1]
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self) -> Optional[int]:
        return self.proc.stop()


class Spy:
    """A paho client on the plain listener that records every jobs message of one thing."""

    def __init__(self, broker_port: int, thing: str, on_message=None,
                 commands: bool = False) -> None:
        """`commands`: also record the thing's AWS IoT commands topics."""
        import threading

        import paho.mqtt.client as mqtt

        self.on_message = on_message
        self.messages: list[tuple[str, object]] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="spy-" + thing)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect("127.0.0.1", broker_port)
        filters = [(f"$aws/things/{thing}/jobs/#", 1)]
        if commands:
            filters.append((f"$aws/commands/things/{thing}/executions/#", 1))
        self.client.subscribe(filters)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("spy did not subscribe")

    def _on_message(self, client, userdata, msg) -> None:
        try:
            payload = json.loads(msg.payload)
        except (ValueError, RecursionError):
            payload = msg.payload
        with self._cond:
            self.messages.append((msg.topic, payload))
            self._cond.notify_all()
        if self.on_message:
            self.on_message(msg.topic, payload)

    def wait_for(self, pred, timeout: float = 20.0, what: str = "a message"):
        """The first recorded (topic, payload) satisfying pred(topic, payload)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages:
                    if pred(*m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    topics = [t for t, _ in self.messages]
                    raise AssertionError(f"no {what} within {timeout}s; saw {topics}")
                self._cond.wait(left)

    def topics(self) -> list[str]:
        with self._cond:
            return [t for t, _ in self.messages]

    def stop(self) -> None:
        self.client.disconnect()  # first, so the loop thread ends at once
        pahofix.loop_stop(self.client)
