"""`tools/jobs`: create, list, describe, cancel and watch jobs, for people.

Talks to the AWS IoT control plane through boto3's `iot` client, so the same commands work
against jobsd (`--endpoint http://127.0.0.1:PORT`, or IOTJOBS_ENDPOINT) and against AWS IoT
(no endpoint: boto3's usual credentials and region)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional

TERMINAL = {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED", "REMOVED"}


def client(args: argparse.Namespace, service: str = "iot", endpoint: Optional[str] = None):
    """boto3 `iot` on --endpoint (or `iot-jobs-data` on --data-endpoint); AWS without one."""
    import boto3

    kw: dict[str, Any] = {"region_name": args.region}
    endpoint = endpoint if service != "iot" else args.endpoint
    if endpoint:
        kw["endpoint_url"] = endpoint
        # jobsd with --credentials (tools/stack: `. build/stack/env`) checks the signature with
        # the key boto3 finds as usual; a jobsd without them checks nothing, but boto3 still
        # wants a key to sign with
        if boto3.Session(region_name=args.region).get_credentials() is None:
            kw["aws_access_key_id"] = kw["aws_secret_access_key"] = "local"
    return boto3.client(service, **kw)


def _targets(iot, things: list[str], groups: list[str]) -> list[str]:
    """ARNs as the service spells them (asked, not built: the account id is the service's)."""
    arns = [iot.describe_thing(thingName=t)["thingArn"] for t in things]
    arns += [iot.describe_thing_group(thingGroupName=g)["thingGroupArn"] for g in groups]
    return arns


def cmd_create(iot, a: argparse.Namespace) -> int:
    with open(a.document, "rb") as f:
        raw = f.read()
    try:
        doc = json.loads(raw)
    except ValueError as e:
        print(f"jobs: {a.document} is not JSON: {e}", file=sys.stderr)
        return 2
    if not isinstance(doc, dict):
        print(f"jobs: {a.document} must hold a JSON object", file=sys.stderr)
        return 2
    if not a.thing and not a.group:
        print("jobs: name at least one --thing or --group", file=sys.stderr)
        return 2
    kw: dict[str, Any] = {
        "jobId": a.job_id,
        "targets": _targets(iot, a.thing, a.group),
        "document": json.dumps(doc, separators=(",", ":")),
        "targetSelection": "CONTINUOUS" if a.continuous else "SNAPSHOT",
    }
    if a.description:
        kw["description"] = a.description
    if a.timeout_minutes:
        kw["timeoutConfig"] = {"inProgressTimeoutInMinutes": a.timeout_minutes}
    out = iot.create_job(**kw)
    print(f"created {out['jobId']} ({out['jobArn']}) for {len(kw['targets'])} target(s)")
    return 0


def _signed_job(iot, a: argparse.Namespace, argv: list[str], make) -> Optional[dict]:
    """Run a tools/sign command (`make` = sign.image or sign.bundle) and create the job with
    its document; the document, or None after printing why not."""
    from . import sign

    if not a.thing and not a.group:
        print("jobs: name at least one --thing or --group", file=sys.stderr)
        return None
    if a.force:
        argv += ["--force"]
    try:
        doc = make(sign.parser().parse_args(argv))
    except sign.SignError as e:
        print(f"jobs: {e}", file=sys.stderr)
        return None
    if getattr(a, "allow_downgrade", False):
        doc["allowDowngrade"] = True
    iot.create_job(jobId=a.job_id, targets=_targets(iot, a.thing, a.group),
                   document=json.dumps(doc, separators=(",", ":")),
                   targetSelection="CONTINUOUS" if a.continuous else "SNAPSHOT")
    return doc


STREAM_ROLE = "arn:aws:iam::123456789012:role/iotjobs-streams"  # jobsd does not check roles


def _stream(iot, a: argparse.Namespace, stream_id: str, files: list[tuple[int, str, str]]) -> str:
    """Create (or, with --force, update) a stream of (fileId, bucket, key) objects: the MQTT
    way to the same files (STREAMS.md 1). Returns its id."""
    from botocore.exceptions import ClientError

    spec = [{"fileId": fid, "s3Location": {"bucket": bucket, "key": key}}
            for fid, bucket, key in files]
    try:
        iot.create_stream(streamId=stream_id, files=spec, roleArn=a.role_arn,
                          description=f"tools/jobs {a.cmd} {a.job_id}")
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") != "ResourceAlreadyExistsException" or not a.force:
            raise
        iot.update_stream(streamId=stream_id, files=spec, roleArn=a.role_arn)
    return stream_id


def _over(doc: dict, protocol: str, stream_id: str, file_id: int = 0) -> dict:
    """A document that fetches over `protocol`: "http" as signed, "mqtt" (the stream instead of
    the URL) or "both" (the device picks by its `transfer` setting)."""
    if protocol == "http":
        return doc
    ota = doc.get("afr_ota")
    if isinstance(ota, dict):
        ota["protocols"] = ["MQTT", "HTTP"] if protocol == "both" else ["MQTT"]
        ota["streamname"] = stream_id
        if protocol == "mqtt":
            for f in ota["files"]:
                f.pop("update_data_url", None)
                f.pop("auth_scheme", None)
        return doc
    doc["stream"] = {"id": stream_id, "fileId": file_id}
    if protocol == "mqtt":
        doc.pop("url", None)
    return doc


def cmd_ota(iot, a: argparse.Namespace) -> int:
    """Sign a firmware image, place it in jobsd's files folder, create the OTA job: one step.
    `--protocol mqtt` also makes it a stream and sends the device there instead (one TLS
    session on the device)."""
    from . import sign

    argv = ["image", a.image, "--key", a.key, "--bucket", a.bucket, "--files", a.files]
    if a.version:
        argv += ["--version", a.version]
    if a.afr_ota:
        argv += ["--afr-ota"]
    key = os.path.basename(a.image)

    def make(args):
        doc = sign.image(args)
        if a.protocol != "http":
            _over(doc, a.protocol, _stream(iot, a, a.job_id, [(0, a.bucket, key)]))
        return doc

    doc = _signed_job(iot, a, argv, make)
    if doc is None:
        return 2
    print(f"created OTA job {a.job_id}: {os.path.basename(a.image)} "
          f"({doc.get('size') or doc['afr_ota']['files'][0]['filesize']} bytes, signed"
          + (f", stream {a.job_id}" if a.protocol != "http" else "") + ")")
    return 0


def cmd_download(iot, a: argparse.Namespace) -> int:
    """Publish a file to jobsd's files folder and create a download-file job for it (its
    sha256 checked on the device), over HTTP (a presigned URL) or MQTT (a stream)."""
    import hashlib

    from . import sign

    if not a.thing and not a.group:
        print("jobs: name at least one --thing or --group", file=sys.stderr)
        return 2
    if not os.path.isfile(a.file):
        print(f"jobs: {a.file} is not a regular file", file=sys.stderr)
        return 2
    try:
        sign.check_bucket(a.bucket)
        key = sign.check_key(a.key_name or os.path.basename(a.file))
        sign.put_object(os.path.join(a.files, a.bucket), key, src=a.file, force=a.force)
    except sign.SignError as e:
        print(f"jobs: {e}", file=sys.stderr)
        return 2
    with open(a.file, "rb") as f:
        data = f.read()
    doc: dict[str, Any] = {"operation": "download-file", "url": sign.presigned(a.bucket, key),
                           "path": a.path, "sha256": hashlib.sha256(data).hexdigest(),
                           "size": len(data)}
    if a.protocol != "http":
        _over(doc, a.protocol, _stream(iot, a, a.job_id, [(0, a.bucket, key)]))
    iot.create_job(jobId=a.job_id, targets=_targets(iot, a.thing, a.group),
                   document=json.dumps(doc, separators=(",", ":")),
                   targetSelection="CONTINUOUS" if a.continuous else "SNAPSHOT")
    print(f"created download job {a.job_id}: {os.path.basename(a.file)} -> {a.path} "
          f"({len(data)} bytes, {a.protocol})")
    return 0


def cmd_app(iot, a: argparse.Namespace) -> int:
    """Sign an application folder, publish it to jobsd's files folder, create the app-update
    job (one presigned URL per file): one step. `--protocol mqtt`: the bundle as one stream
    named after the job (the manifest file 0, the k-th file of the manifest file k + 1)."""
    from . import sign

    argv = ["bundle", a.dir, "--key", a.key, "--bucket", a.bucket, "--files", a.files,
            "--version", a.version, "--presign-files"]
    for pattern in a.exclude:
        argv += ["--exclude", pattern]

    def make(args):
        doc = sign.bundle(args)
        if a.protocol == "http":
            return doc
        prefix = f"app/{a.version}"  # sign's default key prefix
        paths = list(doc["urls"])  # manifest order
        if len(paths) + 1 > 50:
            raise sign.SignError(f"a stream holds at most 50 files; this bundle has "
                                 f"{len(paths)} and its manifest (use --protocol http)")
        objs = [(0, a.bucket, f"{prefix}/{sign.MANIFEST}")]
        objs += [(k + 1, a.bucket, f"{prefix}/{sign.FILES_DIR}/{p}") for k, p in enumerate(paths)]
        doc["stream"] = {"id": _stream(iot, a, a.job_id, objs), "manifest": 0}
        if a.protocol == "mqtt":
            for key in ("manifest", "base", "urls"):
                doc.pop(key, None)
        return doc

    doc = _signed_job(iot, a, argv, make)
    if doc is None:
        return 2
    n = len(doc["urls"]) if "urls" in doc else "all"
    print(f"created app-update job {a.job_id}: version {a.version}, {n} file(s), signed"
          + (f", stream {a.job_id}" if a.protocol != "http" else ""))
    return 0


def cmd_command(iot, a: argparse.Namespace) -> int:
    """Start an AWS IoT command on one thing and wait for its outcome (exit 0 on SUCCEEDED)."""
    from botocore.exceptions import ClientError

    payload = a.payload or json.dumps({"command": a.command_id})
    try:
        body = json.loads(payload)
    except ValueError as e:
        print(f"jobs: --payload is not JSON: {e}", file=sys.stderr)
        return 2
    if not isinstance(body, dict):
        print("jobs: --payload must be a JSON object", file=sys.stderr)
        return 2
    content = json.dumps(body, separators=(",", ":")).encode()
    try:
        cmd = iot.get_command(commandId=a.command_id)
        have = (cmd.get("payload") or {}).get("content")
        if a.payload and have is not None and have != content:
            print(f"jobs: command {a.command_id} exists with another payload; pick another id",
                  file=sys.stderr)
            return 2
        arn = cmd["commandArn"]
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
            raise
        arn = iot.create_command(commandId=a.command_id, payload={
            "content": content, "contentType": "application/json"})["commandArn"]
    target = iot.describe_thing(thingName=a.thing)["thingArn"]
    data = client(a, "iot-jobs-data", a.data_endpoint)
    eid = data.start_command_execution(targetArn=target, commandArn=arn,
                                       executionTimeoutSeconds=a.timeout)["executionId"]
    print(f"started {a.command_id} on {a.thing}: execution {eid}")
    deadline = time.monotonic() + a.timeout + 5
    while True:
        ex = iot.get_command_execution(executionId=eid, targetArn=target)
        if ex["status"] in ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT"):
            break
        if time.monotonic() > deadline:
            print(f"{eid}: still {ex['status']}", file=sys.stderr)
            return 3
        time.sleep(0.2)  # polling the service
    result = {k: next(iter(v.values())) for k, v in (ex.get("result") or {}).items()}
    reason = ex.get("statusReason") or {}
    print(f"{ex['status']}" + (f" {reason.get('reasonCode')}" if reason else "")
          + (f" {json.dumps(result, sort_keys=True)}" if result else ""))
    return 0 if ex["status"] == "SUCCEEDED" else 1


def cmd_list(iot, a: argparse.Namespace) -> int:
    kw: dict[str, Any] = {"status": a.status} if a.status else {}
    rows = []
    for page in iot.get_paginator("list_jobs").paginate(**kw):
        rows += page["jobs"]
    for j in rows:
        print(f"{j['jobId']:<40} {j['status']:<12} {j.get('targetSelection', ''):<10} "
              f"{_ts(j.get('createdAt'))}")
    if not rows:
        print("no jobs")
    return 0


def _ts(t: Any) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S") if hasattr(t, "strftime") else str(t or "")


def _executions(iot, job_id: str) -> list[dict]:
    out = []
    for page in iot.get_paginator("list_job_executions_for_job").paginate(jobId=job_id):
        out += page["executionSummaries"]
    return out


def cmd_describe(iot, a: argparse.Namespace) -> int:
    job = iot.describe_job(jobId=a.job_id)["job"]
    doc = iot.get_job_document(jobId=a.job_id)["document"]
    print(f"job {job['jobId']}: {job['status']} ({job.get('targetSelection')})")
    if job.get("description"):
        print(f"  description: {job['description']}")
    print(f"  document: {doc}")
    counts = {k: v for k, v in job.get("jobProcessDetails", {}).items() if v}
    print(f"  executions: {json.dumps(counts)}")
    for ex in _executions(iot, a.job_id):
        thing = ex["thingArn"].rsplit("/", 1)[-1]
        print(f"  {thing:<32} {ex['jobExecutionSummary']['status']}")
    return 0


def cmd_cancel(iot, a: argparse.Namespace) -> int:
    kw: dict[str, Any] = {"jobId": a.job_id, "force": a.force}
    if a.reason:
        kw["reasonCode"] = a.reason
    if a.comment:
        kw["comment"] = a.comment
    iot.cancel_job(**kw)
    print(f"cancelled {a.job_id}" + (" (in-progress executions too)" if a.force else ""))
    return 0


def cmd_watch(iot, a: argparse.Namespace) -> int:
    """One line per change of any thing's status or statusDetails, until all are terminal."""
    seen: dict[str, tuple] = {}
    t0 = time.monotonic()
    while True:
        things = [ex["thingArn"].rsplit("/", 1)[-1] for ex in _executions(iot, a.job_id)]
        states = {}
        for thing in things:
            ex = iot.describe_job_execution(jobId=a.job_id, thingName=thing)["execution"]
            details = ex.get("statusDetails", {}).get("detailsMap", {})
            states[thing] = (ex["status"], json.dumps(details, sort_keys=True))
            if seen.get(thing) != states[thing]:
                seen[thing] = states[thing]
                print(f"{time.monotonic() - t0:7.1f}s  {thing:<32} {ex['status']:<12} {states[thing][1]}",
                      flush=True)
        if things and all(s in TERMINAL for s, _ in states.values()):
            ok = all(s == "SUCCEEDED" for s, _ in states.values())
            print(f"all {len(states)} execution(s) terminal: "
                  f"{sum(s == 'SUCCEEDED' for s, _ in states.values())} succeeded")
            return 0 if ok else 1
        if a.timeout and time.monotonic() - t0 > a.timeout:
            print(f"jobs: not finished after {a.timeout}s", file=sys.stderr)
            return 3
        time.sleep(a.interval)  # polling the service: the interval is the user's choice


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/jobs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", default=os.environ.get("IOTJOBS_ENDPOINT"),
                    help="control-plane URL of jobsd (default: $IOTJOBS_ENDPOINT, else AWS)")
    ap.add_argument("--data-endpoint", default=os.environ.get("IOTJOBS_DATA_ENDPOINT"),
                    help="jobsd's --data URL for `command` (default: $IOTJOBS_DATA_ENDPOINT, "
                         "else AWS)")
    ap.add_argument("--region", default=os.environ.get("AWS_REGION", "us-east-1"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="create a job from a JSON document file")
    c.add_argument("job_id")
    c.add_argument("--document", required=True, help="file holding the job document (JSON object)")
    c.add_argument("--thing", action="append", default=[], help="target thing (repeatable)")
    c.add_argument("--group", action="append", default=[], help="target thing group (repeatable)")
    c.add_argument("--continuous", action="store_true",
                   help="CONTINUOUS: things added to a target group later get the job too")
    c.add_argument("--timeout-minutes", type=int, help="in-progress timeout (1..10080)")
    c.add_argument("--description")
    o = sub.add_parser("ota", help="sign a firmware image, publish it to jobsd's files folder "
                                   "and create the OTA job")
    o.add_argument("job_id")
    o.add_argument("--image", required=True, help="the firmware image file")
    o.add_argument("--key", required=True, metavar="KEY.pem", help="signing key (tools/sign keygen)")
    o.add_argument("--files", required=True, metavar="DIR", help="jobsd's --files folder")
    o.add_argument("--bucket", default="firmware", help="bucket (first folder under --files)")
    o.add_argument("--version", help="the image's version (the device refuses downgrades)")
    o.add_argument("--afr-ota", action="store_true", help="AWS OTA (afr_ota) document")
    o.add_argument("--force", action="store_true", help="replace an object (and stream) that differs")
    o.add_argument("--thing", action="append", default=[])
    o.add_argument("--group", action="append", default=[])
    o.add_argument("--continuous", action="store_true")
    o.add_argument("--protocol", choices=["http", "mqtt", "both"], default="http",
                   help="http: a presigned URL; mqtt: a stream named after the job (one TLS "
                        "session on the device); both: the device picks (default http)")
    o.add_argument("--role-arn", default=STREAM_ROLE, help="the stream's role (AWS)")
    dl = sub.add_parser("download", help="publish a file to jobsd's files folder and create a "
                                         "download-file job for it, over HTTP or MQTT")
    dl.add_argument("job_id")
    dl.add_argument("--file", required=True, help="the file to send")
    dl.add_argument("--path", required=True, help="where it goes on the device (relative to its "
                                                  "download folder)")
    dl.add_argument("--files", required=True, metavar="DIR", help="jobsd's --files folder")
    dl.add_argument("--bucket", default="files", help="bucket (first folder under --files)")
    dl.add_argument("--key-name", metavar="K", help="object key (default: the file's name)")
    dl.add_argument("--protocol", choices=["http", "mqtt", "both"], default="http")
    dl.add_argument("--role-arn", default=STREAM_ROLE, help="the stream's role (AWS)")
    dl.add_argument("--force", action="store_true", help="replace an object (and stream) that differs")
    dl.add_argument("--thing", action="append", default=[])
    dl.add_argument("--group", action="append", default=[])
    dl.add_argument("--continuous", action="store_true")
    p = sub.add_parser("app", help="sign an application folder, publish it to jobsd's files "
                                   "folder and create the app-update job")
    p.add_argument("job_id")
    p.add_argument("--dir", required=True, help="the application folder (application.py, ...)")
    p.add_argument("--version", required=True, help="its version (the device refuses downgrades)")
    p.add_argument("--key", required=True, metavar="KEY.pem", help="signing key (tools/sign keygen)")
    p.add_argument("--files", required=True, metavar="DIR", help="jobsd's --files folder")
    p.add_argument("--bucket", default="apps", help="bucket (first folder under --files)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out matching paths or names (repeatable), e.g. '__pycache__'")
    p.add_argument("--allow-downgrade", action="store_true")
    p.add_argument("--force", action="store_true", help="replace a published bundle")
    p.add_argument("--protocol", choices=["http", "mqtt", "both"], default="http",
                   help="http: presigned URLs; mqtt: one stream named after the job; both")
    p.add_argument("--role-arn", default=STREAM_ROLE, help="the stream's role (AWS)")
    p.add_argument("--thing", action="append", default=[])
    p.add_argument("--group", action="append", default=[])
    p.add_argument("--continuous", action="store_true")
    k = sub.add_parser("command", help="run an AWS IoT command on a thing and print its outcome")
    k.add_argument("command_id", help="the command (created with --payload if it is new)")
    k.add_argument("--thing", required=True)
    k.add_argument("--payload", help='JSON object (default: {"command": COMMAND_ID})')
    k.add_argument("--timeout", type=int, default=10, help="executionTimeoutSeconds (default 10)")
    ls = sub.add_parser("list", help="list jobs")
    ls.add_argument("--status", choices=["IN_PROGRESS", "CANCELED", "COMPLETED", "DELETION_IN_PROGRESS"])
    d = sub.add_parser("describe", help="a job, its document and each thing's status")
    d.add_argument("job_id")
    x = sub.add_parser("cancel", help="cancel a job")
    x.add_argument("job_id")
    x.add_argument("--force", action="store_true", help="also cancel IN_PROGRESS executions")
    x.add_argument("--reason", help="reason code")
    x.add_argument("--comment")
    w = sub.add_parser("watch", help="live progress per thing until every execution is terminal; "
                                     "exit 0 only if all SUCCEEDED")
    w.add_argument("job_id")
    w.add_argument("--interval", type=float, default=0.5, help="seconds between polls")
    w.add_argument("--timeout", type=float, default=0, help="give up after this many seconds (exit 3)")
    a = ap.parse_args(argv)
    from botocore.exceptions import BotoCoreError, ClientError

    iot = client(a)
    try:
        return {"create": cmd_create, "ota": cmd_ota, "app": cmd_app, "download": cmd_download,
                "command": cmd_command, "list": cmd_list, "describe": cmd_describe,
                "cancel": cmd_cancel, "watch": cmd_watch}[a.cmd](iot, a)
    except ClientError as e:
        err = e.response.get("Error", {})
        print(f"jobs: {err.get('Code')}: {err.get('Message')}", file=sys.stderr)
        return 2
    except (BotoCoreError, OSError) as e:
        print(f"jobs: {e}", file=sys.stderr)
        return 2
