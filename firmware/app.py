# Device wiring: read config.json, build transport -> client -> runner with its handlers, run.
#
# config.json (written by tools/devsim or tools/provision):
#   {"thing": "dev1", "host": "127.0.0.1", "port": 8883,
#    "tls": {"ca": "ca.der", "cert": "cert.der", "key": "key.der", "hostname": "localhost"},
#    "keepalive": 60, "client_id": "dev1"}
# "tls" absent means plain TCP (only for a local broker).
import json
import time
import platform
from iotjobs.transport import Transport
from iotjobs.client import JobsClient
from iotjobs.runner import Runner, JobFailed

CONFIG = "config.json"


def log(msg):
    print("[%d] %s" % (time.ticks_ms(), msg))


def load_config(path=CONFIG):
    with open(path) as f:
        cfg = json.load(f)
    for key in ("thing", "host", "port"):
        if key not in cfg:
            raise ValueError("config.json lacks %r" % key)
    return cfg


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def ssl_context(tls):
    """Mutual TLS that verifies the broker: DER files only (mbedTLS in MicroPython)."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED  # the unix port defaults to CERT_NONE
    ctx.load_cert_chain(_read(tls["cert"]), _read(tls["key"]))
    ctx.load_verify_locations(cadata=_read(tls["ca"]))
    return ctx


def demo(job):
    """The demonstration handler: `{"operation": "demo", "steps": 3, "step_ms": 0, "fail": "why"}`.

    Reports each step as IN_PROGRESS (after step_ms of "work"), then succeeds, or raises when
    `fail` is given."""
    doc = job.document
    steps = doc.get("steps", 3)
    step_ms = doc.get("step_ms", 0)
    if not isinstance(steps, int) or not 0 <= steps <= 100:
        raise JobFailed("BAD_ARGUMENT", "steps must be an integer 0..100")
    if not isinstance(step_ms, int) or not 0 <= step_ms <= 10000:
        raise JobFailed("BAD_ARGUMENT", "step_ms must be an integer 0..10000")
    for i in range(steps):
        if step_ms:
            platform.sleep_ms(step_ms)
        job.progress(step="%d/%d" % (i + 1, steps))
    if doc.get("fail"):
        raise RuntimeError(doc["fail"])
    return {"steps": str(steps)}


def build(cfg):
    tls = cfg.get("tls")
    transport = Transport(
        cfg.get("client_id", cfg["thing"]),
        cfg["host"],
        cfg["port"],
        ssl=ssl_context(tls) if tls else None,
        server_hostname=(tls or {}).get("hostname"),
        keepalive=cfg.get("keepalive", 60),
        log=log,
    )
    client = JobsClient(transport, cfg["thing"], log=log)
    runner = Runner(client, {"demo": demo}, log=log)
    return runner


def main():
    cfg = load_config()
    log("iotjobs on %s, thing %s" % (platform.NAME, cfg["thing"]))
    platform.connect_network(cfg, log)
    runner = build(cfg)
    runner.run()
