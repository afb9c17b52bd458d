"""Command line, start-up order and shutdown of jobsd.

Start-up order matters to callers: the store opens first, both HTTP ports listen, then the
MQTT subscription is acknowledged, and only then is the single `READY control=... data=...`
line printed. A test or script that waits for that line can use every interface at once.
The timer thread starts with the servers; executions whose deadline passed while jobsd was
down time out right then. With `--files DIR` the data listener also serves `/files/...`
(files.py). SIGTERM and SIGINT stop the servers, the timers and the MQTT connection and exit 0.

Defaults let `tools/jobsd` alone start against a local broker: --broker 127.0.0.1:1883,
--control 127.0.0.1:8440, --data 127.0.0.1:8441, --db build/jobsd/jobsd.sqlite3 in the
repository (its folder is created). With `--credentials FILE` (auth.py) both listeners demand
AWS Signature Version 4 from the key pairs in FILE; without it jobsd checks nothing, so it
refuses to listen anywhere but on loopback (exit 2). A --credentials file that cannot be used
is a start-up error (exit 1).

The control listener also serves the read-only dashboard at /dashboard (dashboard.py); with
--credentials it is opened by a presigned link, which `jobsd --dashboard-url --control HOST:PORT
--credentials FILE` prints (a stand-alone action, like --write-acl).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import secrets
import signal
import sqlite3
import sys
import threading
from typing import Optional
from collections.abc import Sequence

from .. import BUILD
from . import acl, auth, control, data
from .dashboard import URL_SECONDS, Dashboard, dashboard_url
from .files import FileStore
from .mqtt import MqttBridge
from .rest import RestServer
from .service import Service
from .store import Store
from .timers import TimerThread

log = logging.getLogger("jobsd")

DEFAULT_BROKER = "127.0.0.1:1883"
DEFAULT_CONTROL = "127.0.0.1:8440"
DEFAULT_DATA = "127.0.0.1:8441"


def default_db_path() -> str:
    """The database `tools/jobsd` uses without --db: build/jobsd/jobsd.sqlite3 in the repo."""
    return os.path.join(BUILD, "jobsd", "jobsd.sqlite3")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 (bracketed or not) and `localhost`."""
    name = host.strip()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return (host or "127.0.0.1"), int(port)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobsd", description="Local AWS IoT Jobs service.")
    if argv is None:
        argv = sys.argv[1:]
    if "--write-acl" in argv:  # a stand-alone action: needs none of the service's options
        a = argparse.ArgumentParser(prog="jobsd --write-acl")
        a.add_argument("--write-acl", metavar="FILE", required=True,
                       help="write the mosquitto ACL for the TLS listener to FILE and exit")
        return a.parse_args(argv)
    if "--dashboard-url" in argv:  # a stand-alone action: prints a link and exits
        d = argparse.ArgumentParser(prog="jobsd --dashboard-url",
                                    description="Print the dashboard's URL: a presigned SigV4 "
                                    "link when jobsd runs with --credentials.")
        d.add_argument("--dashboard-url", action="store_true", required=True)
        d.add_argument("--control", type=_host_port, default=DEFAULT_CONTROL,
                       help="jobsd's control listener (default: %(default)s)")
        d.add_argument("--credentials", metavar="FILE",
                       help="a shared-credentials file holding a key pair jobsd accepts; "
                            "without it the URL is not signed")
        d.add_argument("--profile", help="the section of FILE to sign with (default: the first)")
        d.add_argument("--region", default="us-east-1",
                       help="jobsd's --region (default: %(default)s)")
        d.add_argument("--expires", type=int, default=URL_SECONDS,
                       help="seconds the link stays usable, 1..604800 (default: %(default)s)")
        args = d.parse_args(argv)
        if not 1 <= args.expires <= auth.MAX_EXPIRES:
            d.error("--expires must be 1..604800 seconds")
        return args
    p.add_argument("--dashboard-url", action="store_true",
                   help="print the dashboard's URL (signed with --credentials FILE) and exit; "
                        "see `jobsd --dashboard-url --help`")
    p.add_argument("--write-acl", metavar="FILE",
                   help="write the mosquitto ACL for the TLS listener (each thing on its own "
                        "topics, identity from the client certificate) to FILE and exit")
    p.add_argument("--broker", type=_host_port, default=DEFAULT_BROKER,
                   help="MQTT broker plain listener, HOST:PORT (default: %(default)s)")
    p.add_argument("--data", type=_host_port, default=DEFAULT_DATA,
                   help="iot-jobs-data REST API listen address, port 0 picks one "
                        "(default: %(default)s)")
    p.add_argument("--control", type=_host_port, default=DEFAULT_CONTROL,
                   help="iot control-plane REST API listen address, port 0 picks one "
                        "(default: %(default)s)")
    p.add_argument("--db", default=default_db_path(),
                   help="SQLite database file, created if missing (default: %(default)s)")
    p.add_argument("--credentials", metavar="FILE",
                   help="AWS shared-credentials file (sections with aws_access_key_id and "
                        "aws_secret_access_key, each an accepted key pair): every request on "
                        "--control and every iot-jobs-data request on --data must then carry "
                        "a valid AWS Signature Version 4 (/files/ keeps its own signed URLs). "
                        "Without it jobsd listens on loopback addresses only")
    p.add_argument("--files", metavar="DIR",
                   help="serve DIR on the data listener under /files/ with signed URLs; the "
                        "S3 object s3://BUCKET/KEY is DIR/BUCKET/KEY (presigned-URL "
                        "placeholders in job documents, CreateJob documentSource)")
    p.add_argument("--files-url", metavar="URL",
                   help="base URL devices use for the file server (default: http://<data>)")
    p.add_argument("--region", default="us-east-1",
                   help="region of ARNs and of the SigV4 credential scope (default: %(default)s)")
    p.add_argument("--account", default="123456789012")
    p.add_argument("--minute-seconds", type=float, default=60.0,
                   help="length of a job-timer minute in seconds (tests shorten it)")
    p.add_argument("--client-id", default="jobsd", help="MQTT client id")
    p.add_argument("--stream-eof", choices=("strict", "clamp"), default="strict",
                   help="GetStream without `n` whose implied range (o + 128 KiB / l blocks) "
                        "runs past the end of the file: reject it InvalidRequest as AWS was "
                        "seen to (strict), or send what is left (clamp)")
    p.add_argument("--deletion-seconds", type=float, default=0.0,
                   help="how long a deleted job stays DELETION_IN_PROGRESS (at most 10 jobs at "
                        "a time, as AWS); default 0: gone at once")
    p.add_argument("--max-active-jobs", type=int, default=0,
                   help="account quota: CreateJob beyond N jobs IN_PROGRESS or SCHEDULED is "
                        "LimitExceededException (default 0: none)")
    p.add_argument("--max-concurrent-jobs", type=int, default=0,
                   help="account quota: at most N jobs rolling out at once; a staged CreateJob "
                        "beyond it is LimitExceededException and a scheduled job starting "
                        "beyond it is CANCELED (default 0: none)")
    p.add_argument("--test-hooks", action="store_true",
                   help="enable PUT /_jobsd/test-hooks on --control (fault injection for tests)")
    p.add_argument("--log-level", default="INFO",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    args = p.parse_args(argv)
    if args.minute_seconds <= 0:
        p.error("--minute-seconds must be positive")
    if args.credentials is None:
        for option, (host, port) in (("--control", args.control), ("--data", args.data)):
            if not is_loopback(host):
                p.error(f"{option} {host}:{port} is not a loopback address (127.0.0.0/8, ::1, "
                        "localhost): without authentication jobsd would take requests from "
                        "anyone who reaches it; pass --credentials FILE to have every request "
                        "signed (AWS Signature Version 4), or listen on loopback")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if getattr(args, "write_acl", None):
        acl.write(args.write_acl)
        return 0
    if getattr(args, "dashboard_url", False):
        try:
            print(dashboard_url(args.control, args.credentials, args.profile, args.region,
                                args.expires))
        except auth.CredentialsError as err:
            print(f"jobsd: --credentials: {err}", file=sys.stderr)
            return 1
        return 0
    logging.basicConfig(stream=sys.stderr, level=args.log_level,
                        format="jobsd %(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    verifiers: dict[str, Optional[auth.Verifier]] = {"iot": None, "iot-jobs-data": None}
    if args.credentials is not None:
        try:
            keys = auth.load_credentials(args.credentials)
        except auth.CredentialsError as err:
            log.error("--credentials: %s", err)
            return 1
        for service in verifiers:
            verifiers[service] = auth.Verifier(keys, auth.signing_name(service), args.region)
        log.info("SigV4 required on control and data (%d key pair(s) from %s: %s)", len(keys),
                 args.credentials, ", ".join(sorted(keys)))
    if args.db == default_db_path():
        try:
            os.makedirs(os.path.dirname(args.db), exist_ok=True)
        except OSError as err:
            log.error("cannot create %s: %s", os.path.dirname(args.db), err)
            return 1
    try:
        store = Store(args.db)
    except (OSError, sqlite3.Error, RuntimeError) as err:
        log.error("cannot open database %s: %s", args.db, err)
        return 1
    service = Service(store, lambda topic, payload, delivery=None: None, region=args.region,
                      account=args.account, minute_seconds=args.minute_seconds)
    service.stream_strict_eof = args.stream_eof == "strict"
    service.test_hooks = args.test_hooks
    if args.test_hooks:
        service.resume_test_clock()  # a restart keeps the clock tests moved forward
    service.deletion_seconds = max(0.0, args.deletion_seconds)
    service.max_active_jobs = max(0, args.max_active_jobs)
    service.max_concurrent_jobs = max(0, args.max_concurrent_jobs)
    servers: list[RestServer] = []
    bridge: Optional[MqttBridge] = None
    dashboard = Dashboard(service, args.db)  # read-only; watches device requests (last seen)
    timers = TimerThread(service)
    try:
        try:
            control_server = RestServer(args.control, control.build_router(service),
                                        verifiers["iot"])
            control_server.dashboard = dashboard
            servers.append(control_server)
            data_server = RestServer(args.data, data.build_router(service),
                                     verifiers["iot-jobs-data"])
            servers.append(data_server)
        except OSError as err:
            log.error("cannot listen: %s", err)
            return 1
        if args.files:
            try:
                secret = store.setting("files-hmac-secret", lambda: secrets.token_hex(32))
                files = FileStore(args.files, bytes.fromhex(secret),
                                  args.files_url or f"http://{data_server.address}")
            except (OSError, ValueError, sqlite3.Error) as err:
                log.error("cannot serve --files %s: %s", args.files, err)
                return 1
            service.files = data_server.files = files
        bridge = MqttBridge(service, *args.broker, client_id=args.client_id)
        service.set_publisher(bridge.publish)
        for server in servers:
            server.start()
        timers.start()
        bridge.start()
        while not bridge.subscribed.wait(0.2):
            if stop.is_set():
                return 0
        service.resume_ota_updates()  # OTA updates a stop left CREATE_PENDING
        print(f"READY control={control_server.address} data={data_server.address}", flush=True)
        log.info("ready: control=%s data=%s broker=%s:%d db=%s", control_server.address,
                 data_server.address, *args.broker, args.db)
        while not stop.wait(1.0):
            pass
        return 0
    finally:
        if bridge is not None:
            bridge.stop()
        dashboard.close()  # its event streams end within a second
        for server in servers:
            server.stop()
        timers.stop()
        with service.lock:  # between requests, so no transaction is cut in half
            store.close()
