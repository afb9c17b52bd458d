"""A fleet on one PC: mosquitto, jobsd and N simulated devices, each behind its own link.

    fleet = Fleet(workdir, 50)      # tls=True, image="fleet32"
    fleet.start()                   # every device has asked for work when it returns
    fleet.jobsd.iot.create_job(jobId="j1", targets=[fleet.group_arn], document=...)
    fleet.power_cut("dev-007"); fleet.blackhole("dev-012", 30); fleet.restart_broker()
    fleet.stop()                    # every process it started, by PID; returns what leaked

Under `workdir`: `pki/` (one CA: the broker's certificate and one client certificate per
thing), `mosquitto/` (a loopback listener for jobsd and tools, a mutual-TLS listener for the
devices, jobsd's ACL), `jobsd/` (its database and log; it runs with `--files <workdir>/files
--test-hooks`), `files/` (what devices download: s3://BUCKET/KEY is files/BUCKET/KEY) and
`devices/dev-001/` ... (each device's `flash/`, its OTA slots `flash.ota/` and `device.log`).

Each device reaches the broker through its own netproxy.Proxy (bytes only: TLS stays end to
end), so one device's link can be cut, blackholed or slowed without touching the others. The
devices run tools/devsim with `--cut-at-write 0`, so power_cut_at_write() can arm a power cut
at one of their flash writes. Things are registered in jobsd (`dev-001`...) and put in the
thing group `fleet` (`group_arn`), so one job can target them all.

"Asked for work": a watcher on the loopback listener counts each thing's start-next requests
(a device sends one after every connection: at boot, after a reconnect). It survives broker
restarts (it reconnects and subscribes again); a request made while it is itself reconnecting
is not counted."""
from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import urllib.request
from typing import Optional

from . import devsim, pahofix, stack
from .netproxy import Proxy
from .pki import PKI

ACCOUNT_ARN = "arn:aws:iot:us-east-1:123456789012"
GROUP = "fleet"
STOP_TIMEOUT = 10.0


def thing_name(i: int) -> str:
    """dev-001, dev-002, ... (1-based)."""
    return f"dev-{i:03d}"


def thing_arn(thing: str) -> str:
    return f"{ACCOUNT_ARN}:thing/{thing}"


# -- processes, by PID and start time ---------------------------------------------------------------
def start_time(pid: int) -> Optional[str]:
    """Field 22 of /proc/PID/stat: a PID with another start time is another process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[19] if fields[0] not in ("Z", "X") else None


def children(pid: int) -> list[int]:
    """The PIDs of a process's children (its main thread's)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def is_firmware(pid: int) -> bool:
    """True when the process is a MicroPython firmware devsim exec'd (`-X heapsize=...`)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"\0heapsize=" in f.read()
    except OSError:
        return False


def listening_ports() -> set[int]:
    """TCP ports in LISTEN state on this machine (IPv4 and IPv6)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A":
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return ports


class _Watcher:
    """A paho client on the broker's loopback listener counting each thing's start-next
    requests; it reconnects (and subscribes again) after a broker restart."""

    TOPIC = "$aws/things/+/jobs/start-next"

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.counts: dict[str, int] = {}
        self.last: dict[str, float] = {}
        self.connects = 0
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"fleet-watch-{os.getpid()}-{port}")
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)  # type: ignore[arg-type]
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.stop()
            raise TimeoutError("the fleet's watcher did not subscribe")

    def _on_connect(self, client, userdata, flags, reason, properties=None) -> None:
        self.connects += 1
        client.subscribe(self.TOPIC, qos=0)

    def _on_message(self, client, userdata, msg) -> None:
        thing = msg.topic.split("/")[2]
        with self._cond:
            self.counts[thing] = self.counts.get(thing, 0) + 1
            self.last[thing] = time.monotonic()
            self._cond.notify_all()

    def count(self, thing: str) -> int:
        with self._cond:
            return self.counts.get(thing, 0)

    def stop(self) -> None:
        self.client.disconnect()
        pahofix.loop_stop(self.client)


class FleetDevice:
    """One simulated device of the fleet."""

    def __init__(self, thing: str, workdir: str, proxy: Proxy, proc: stack.Device,
                 tls_dir: Optional[str]) -> None:
        self.thing = thing
        self.workdir = workdir
        self.proxy = proxy
        self.proc = proc  # stack.Device: the devsim process
        self.flash = proc.flash
        self.ota = devsim.ota_dir(proc.flash)
        self.tls_dir = tls_dir
        self.pid = proc.proc.pid  # devsim's
        self.start = start_time(self.pid)
        self.firmware_seen: dict[int, Optional[str]] = {}  # firmware pid -> its start time

    def alive(self) -> bool:
        return self.proc.proc.alive()

    def firmware_pid(self) -> Optional[int]:
        """The running firmware process (devsim's child), or None between two boots."""
        if not self.alive():
            return None
        for pid in children(self.pid):
            if not is_firmware(pid):  # devsim's short-lived bootloader helper, or not exec'd yet
                continue
            st = start_time(pid)
            if st is not None:
                self.firmware_seen.setdefault(pid, st)
                return pid
        return None

    def boots(self) -> list[int]:
        """The firmware PIDs devsim has started, oldest first (from its log)."""
        return self.proc.boots()

    def log_text(self, tail: int = 8000) -> str:
        return self.proc.log_text(tail)


class Fleet:
    """mosquitto, jobsd and `devices` simulated devices (dev-001 ...), each behind its own proxy.

    `image`: the devices' interpreter (devsim --image); `tls`: mutual TLS with a certificate per
    thing (else plain MQTT); `heap`: devsim --heap (default: devsim's); `seed`: seeds `rng`
    (random.Random) for whoever picks devices or moments at random (printed by the CLI);
    `jobsd_extra`: more jobsd options (e.g. ["--minute-seconds", "0.2"]). `keepalive` (MQTT
    seconds, devsim's default 60) bounds how long a blackholed device takes to notice; `config`
    is merged into every device's config.json on its first start; `start_timeout`: how long
    start() waits for every device to ask for work (default 30 s + 1.5 s per device)."""

    def __init__(self, workdir: str, devices: int, image: str = "fleet32", tls: bool = True,
                 heap: Optional[str] = None, seed: Optional[int] = None,
                 jobsd_extra: tuple[str, ...] | list[str] = (), keepalive: int = 60,
                 config: Optional[dict] = None, start_timeout: Optional[float] = None) -> None:
        if devices < 0 or devices > 999:
            raise ValueError("devices must be 0..999")
        self.workdir = os.path.abspath(workdir)
        self.size = devices
        self.image = image
        self.tls = tls
        self.heap = heap or stack.DEFAULT_HEAP
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**32)
        self.rng = random.Random(self.seed)
        self.jobsd_extra = list(jobsd_extra)
        self.keepalive = keepalive
        self.config = dict(config or {})
        self.start_timeout = start_timeout if start_timeout is not None else 30.0 + 1.5 * devices
        self.files = os.path.join(self.workdir, "files")
        self.things = [thing_name(i + 1) for i in range(devices)]
        self.group_arn = f"{ACCOUNT_ARN}:thinggroup/{GROUP}"
        self.pki: Optional[PKI] = None
        self.mosquitto: Optional[stack.Mosquitto] = None
        self.jobsd: Optional[stack.Jobsd] = None
        self.watcher: Optional[_Watcher] = None
        self.devices: list[FleetDevice] = []
        self._by_thing: dict[str, FleetDevice] = {}
        self._jobsd_ports: Optional[tuple[str, str]] = None  # control, data (host:port)
        self._started: dict[int, Optional[str]] = {}  # every pid started -> its start time
        self._ports: set[int] = set()  # every port we listened on
        self.started_at: Optional[float] = None

    # -- start and stop ----------------------------------------------------------------------------
    def start(self) -> Fleet:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        from . import images
        from .build import build

        exe = images.interpreter(self.image)
        if not os.access(exe, os.X_OK):
            raise RuntimeError(f"image {self.image} is not built ({exe}): run make setup")
        build("host")  # once here, so that the devices find the code up to date
        os.makedirs(self.files, exist_ok=True)
        self.pki = PKI(os.path.join(self.workdir, "pki"), days=30, load=True)
        self.mosquitto = stack.Mosquitto(os.path.join(self.workdir, "mosquitto"), self.pki)
        self._track(self.mosquitto.proc.pid)
        self._ports |= {self.mosquitto.port, self.mosquitto.tls_port}
        self.watcher = _Watcher(self.mosquitto.port)
        self._start_jobsd()
        self._register()
        target = self.mosquitto.tls_port if self.tls else self.mosquitto.port
        for thing in self.things:
            self._start_device(thing, target)
        self.started_at = time.monotonic()
        self.wait_asked(self.things, self.start_timeout, "every device to ask for work")

    def _start_jobsd(self) -> None:
        assert self.mosquitto is not None
        extra = ["--test-hooks", *self.jobsd_extra]
        if self._jobsd_ports:  # a restart: the same ports (URLs given out stay valid)
            extra += ["--control", self._jobsd_ports[0], "--data", self._jobsd_ports[1]]
        self.jobsd = stack.Jobsd(os.path.join(self.workdir, "jobsd"), self.mosquitto.broker,
                                 files=self.files, extra=extra,
                                 db=os.path.join(self.workdir, "jobsd", "jobsd.sqlite3"))
        self._track(self.jobsd.proc.pid)
        control = self.jobsd.control_url.split("//", 1)[1]
        data = self.jobsd.data_url.split("//", 1)[1]
        self._jobsd_ports = (control, data)
        self._ports |= {int(control.rsplit(":", 1)[1]), int(data.rsplit(":", 1)[1])}

    def _register(self) -> None:
        """Every thing registered in jobsd and in the thing group `fleet`, and no other thing in
        that group (again on a restart of the same folder: the calls are idempotent)."""
        iot = self.iot
        try:
            iot.create_thing_group(thingGroupName=GROUP)
        except iot.exceptions.ResourceAlreadyExistsException:
            pass
        for thing in self.things:
            iot.create_thing(thingName=thing)
            iot.add_thing_to_thing_group(thingGroupName=GROUP, thingName=thing)
        # an earlier, larger fleet in this folder: its extra things leave the group (a job to
        # the group must not wait for devices that do not run)
        mine, extra, kw = set(self.things), [], {"thingGroupName": GROUP, "maxResults": 250}
        while True:
            page = iot.list_things_in_thing_group(**kw)
            extra += [t for t in page.get("things", []) if t not in mine]
            if not page.get("nextToken"):
                break
            kw["nextToken"] = page["nextToken"]
        for thing in extra:
            iot.remove_thing_from_thing_group(thingGroupName=GROUP, thingName=thing)

    def _start_device(self, thing: str, target: int) -> None:
        assert self.pki is not None
        folder = os.path.join(self.workdir, "devices", thing)
        proxy = Proxy(target)
        self._ports.add(proxy.port)
        try:
            tls_dir = self.pki.thing(thing) if self.tls else None
            _point_at(os.path.join(folder, "flash"), proxy.port)
            proc = stack.Device(folder, thing, proxy.address, tls_dir=tls_dir, heap=self.heap,
                                extra=["--cut-at-write", "0"], config=self.config or None,
                                keepalive=self.keepalive, image=self.image)
        except BaseException:
            proxy.stop()
            raise
        dev = FleetDevice(thing, folder, proxy, proc, tls_dir)
        self._track(dev.pid)
        self.devices.append(dev)
        self._by_thing[thing] = dev

    def _track(self, pid: int) -> None:
        self._started[pid] = start_time(pid)

    def stop(self) -> list[str]:
        """Stop everything start() started, by PID (devices first, then their proxies, the
        watcher, jobsd, mosquitto). Returns what is left behind (processes still running,
        ports still listening): [] when clean."""
        for d in self.devices:  # note the firmware processes, to check they end too
            d.firmware_pid()
        for d in self.devices:  # all at once: each devsim ends its firmware
            if d.alive():
                try:
                    d.proc.proc.popen.send_signal(signal.SIGTERM)
                except OSError:
                    pass
        for d in self.devices:
            d.proc.stop()
            d.proxy.stop()
            self._started.update(d.firmware_seen)
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        if self.jobsd is not None:
            self.jobsd.stop()
        if self.mosquitto is not None:
            self.mosquitto.stop()
        # a firmware whose devsim was killed from outside has no parent to end it
        for pid, st in self._started.items():
            if st is not None and start_time(pid) == st:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        return self.leaks()

    def leaks(self) -> list[str]:
        """Processes this fleet started that still run, ports it listened on still listening."""
        left = [f"pid {pid}" for pid, st in self._started.items()
                if st is not None and start_time(pid) == st]
        open_ports = listening_ports() & self._ports
        return left + [f"port {p}" for p in sorted(open_ports)]

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what it is --------------------------------------------------------------------------------
    @property
    def iot(self):
        """boto3 `iot` on jobsd's control plane (the current jobsd's)."""
        assert self.jobsd is not None, "the fleet is not started"
        return self.jobsd.iot

    @property
    def control_url(self) -> str:
        assert self.jobsd is not None
        return self.jobsd.control_url

    @property
    def dashboard_url(self) -> str:
        return self.control_url + "/dashboard"

    def device(self, thing: str) -> FleetDevice:
        try:
            return self._by_thing[thing]
        except KeyError:
            raise KeyError(f"no device {thing!r} in this fleet") from None

    def random_thing(self) -> str:
        return self.rng.choice(self.things)

    def asked(self, thing: str) -> int:
        """How many start-next requests the thing has made (the watcher's count)."""
        return self.watcher.count(thing) if self.watcher else 0

    def wait_asked(self, things: list[str], timeout: float, what: str = "devices to ask for work",
                   since: Optional[dict[str, int]] = None) -> None:
        """Wait until each of `things` has asked for work (more often than `since[thing]`
        times); AssertionError naming the quiet ones (and the end of a log) otherwise, at once
        when a devsim process has ended."""
        since = since or {}
        assert self.watcher is not None
        w = self.watcher

        def done():
            dead = [t for t in things if not self.device(t).alive()]
            if dead:
                raise AssertionError(f"devsim of {dead} exited while waiting for {what}:\n"
                                     + self.device(dead[0]).log_text(3000))
            with w._cond:
                return all(w.counts.get(t, 0) > since.get(t, 0) for t in things)

        try:
            stack.wait_until(done, timeout, what, 0.05)
        except TimeoutError as e:
            quiet = [t for t in things if self.asked(t) <= since.get(t, 0)]
            logs = "".join(f"\n--- {t}\n{self.device(t).log_text(2000)}" for t in quiet[:3])
            raise AssertionError(f"{e}; quiet: {quiet}{logs}") from None

    def counts(self) -> dict[str, int]:
        return {t: self.asked(t) for t in self.things}

    def processes(self) -> dict[str, int]:
        """name -> pid of what runs now: mosquitto, jobsd, and per device devsim and firmware."""
        out = {}
        if self.mosquitto is not None:
            out["mosquitto"] = self.mosquitto.proc.pid
        if self.jobsd is not None:
            out["jobsd"] = self.jobsd.proc.pid
        for d in self.devices:
            out[f"{d.thing}/devsim"] = d.pid
            fw = d.firmware_pid()
            if fw is not None:
                out[f"{d.thing}/firmware"] = fw
        return out

    def status(self) -> dict:
        """A JSON-able summary: endpoints, processes and each device's link and boots."""
        assert self.mosquitto is not None and self.jobsd is not None
        return {
            "workdir": self.workdir,
            "seed": self.seed,
            "image": self.image,
            "tls": self.tls,
            "mqtt": self.mosquitto.broker,
            "mqtt_tls": self.mosquitto.tls_broker,
            "control_url": self.jobsd.control_url,
            "data_url": self.jobsd.data_url,
            "dashboard_url": self.dashboard_url,
            "files": self.files,
            "mosquitto": {"pid": self.mosquitto.proc.pid, "alive": self.mosquitto.proc.alive()},
            "jobsd": {"pid": self.jobsd.proc.pid, "alive": self.jobsd.proc.alive()},
            "devices": [{
                "thing": d.thing, "devsim_pid": d.pid, "firmware_pid": d.firmware_pid(),
                "alive": d.alive(), "boots": len(d.boots()), "asked": self.asked(d.thing),
                "proxy": d.proxy.address, "connections": d.proxy.open_connections(),
                "cut": d.proxy.is_cut, "slow": d.proxy.is_slow,
                "cut_pending": os.path.exists(devsim.cut_file(d.flash)),
                "flash": d.flash,
            } for d in self.devices],
        }

    # -- faults ------------------------------------------------------------------------------------
    def power_cut(self, thing: str) -> Optional[int]:
        """SIGKILL the thing's firmware process where it stands; devsim boots it again (after
        its one-second watchdog pause). The killed pid, or None when it was between boots."""
        d = self.device(thing)
        pid = d.firmware_pid()
        if pid is None:
            return None
        st = d.firmware_seen.get(pid)
        if start_time(pid) != st:  # it ended (and was reaped) since: nothing to cut
            return None
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        # the power is off when this returns (the process has died; devsim may not have
        # reaped it yet)
        stack.wait_until(lambda: start_time(pid) != st, STOP_TIMEOUT, f"pid {pid} to die", 0.005)
        return pid

    def power_cut_at_write(self, thing: str, n: int) -> None:
        """Cut the thing's power just before its n-th flash write from now (devsim
        --cut-at-write): the journal's, a download's, an OTA block's or otadata's. The count
        starts again at the next boot if the firmware resets first; the device log says
        `devsim: power cut at flash write N (...)` when it happens."""
        devsim.arm_cut(self.device(thing).flash, n)

    def cut_pending(self, thing: str) -> bool:
        """A power_cut_at_write() not yet reached."""
        return os.path.exists(devsim.cut_file(self.device(thing).flash))

    def restart_broker(self) -> None:
        """mosquitto stopped and started again on the same ports: every client is
        disconnected (and, with no persistence, sessions are lost)."""
        assert self.mosquitto is not None
        self.mosquitto.restart()
        self._track(self.mosquitto.proc.pid)

    def kill_jobsd(self) -> int:
        """SIGKILL jobsd, then start it again on the same database and ports; the new pid."""
        assert self.jobsd is not None
        old = self.jobsd.proc
        old.popen.kill()
        old.popen.wait(STOP_TIMEOUT)
        old.stop()  # closes its log and pipe
        self._start_jobsd()
        assert self.jobsd is not None
        return self.jobsd.proc.pid

    def link_cut(self, thing: str) -> None:
        """Close the thing's connections at once (a NAT or broker that forgets its flows): the
        device sees its socket end and reconnects."""
        self.device(thing).proxy.drop_all()

    def blackhole(self, thing: str, seconds: Optional[float]) -> None:
        """A dead link for `seconds` (None: until heal()): nothing forwarded, nothing closed; the
        device finds out only through its own timers (keepalive: about 1.5 keepalives)."""
        self.device(thing).proxy.cut(seconds)

    def slow_link(self, thing: str, delay_ms: float = 0, *, rate: Optional[float] = None,
                  seconds: Optional[float] = None) -> None:
        """A slow link for `seconds` (None: until heal()): each chunk held delay_ms, and/or at
        most `rate` bytes a second each way. rate and seconds are keyword-only (a swapped
        positional call would make a very different link)."""
        self.device(thing).proxy.slow(delay_ms, rate, seconds)

    def heal(self, thing: Optional[str] = None) -> None:
        """End blackholes and slow links (of one thing, or of all)."""
        for d in [self.device(thing)] if thing else self.devices:
            d.proxy.restore()
            d.proxy.fast()

    def advance_clock(self, seconds: float) -> float:
        """Move jobsd's clock forward (test hook advanceClock); jobsd does what is then due
        (timeouts, rollout minutes, schedules) before it answers. jobsd's `now`."""
        req = urllib.request.Request(self.control_url + "/_jobsd/test-hooks", method="PUT",
                                     data=json.dumps({"advanceClock": seconds}).encode(),
                                     headers={"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback
        with opener.open(req, timeout=30) as r:
            return json.load(r)["now"]


def _point_at(flash: str, port: int) -> None:
    """A flash folder provisioned by an earlier run of the fleet: its config.json is pointed at
    this run's proxy (the rest of the flash is kept, as a board keeps it)."""
    path = os.path.join(flash, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return
    if cfg.get("port") == port and cfg.get("host") == "127.0.0.1":
        return
    cfg["host"], cfg["port"] = "127.0.0.1", port
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=1)
    os.replace(tmp, path)
