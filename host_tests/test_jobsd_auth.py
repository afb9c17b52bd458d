"""jobsd `--credentials`: AWS Signature Version 4 on the control plane and the iot-jobs-data API,
the errors AWS gives for missing, malformed, expired and wrong signatures (nothing is touched),
presigned query strings, /files/ still on its own signed URLs; the start-up errors of a bad
credentials file, the loopback-only rule without credentials, and the defaults of `tools/jobsd`.

A real mosquitto and jobsd; boto3 with our own keys is the client, botocore's signer and
http.client build the hand-made requests (a past or future signing time, a tampered body, ...).
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import importlib
import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional
from unittest import mock
from urllib.parse import urlsplit

import boto3
import botocore.auth
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from iotjobs_host import BUILD, ROOT, TOOLS, stack
from iotjobs_host.jobsd import main as jobsd_main
from iotjobs_host.jobsd.auth import KeyPair, Verifier, load_credentials, CredentialsError

REGION = "us-east-1"
ACCOUNT = "123456789012"
KEY1, SECRET1 = "AKIAJOBSDTEST0000001", "wJalrXUtnFEMI/K7MDENG+bPxRfiCY%first"
KEY2, SECRET2 = "AKIAJOBSDTEST0000002", "second-secret-0123456789abcdef"
MISMATCH = ("The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method. Consult the service "
            "documentation for details.")
BAD_TOKEN = "The security token included in the request is invalid."
BUCKET = "fw"
IMAGE = b"firmware image bytes " * 50
PLACEHOLDER = f"${{aws:iot:s3-presigned-url:https://s3.amazonaws.com/{BUCKET}/app.bin}}"
STAMP = r"\d{8}T\d{6}Z"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def thing_arn(thing: str) -> str:
    return f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/{thing}"


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# -- the service -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def credentials_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("creds") / "credentials"
    path.write_text(f"[default]\naws_access_key_id = {KEY1}\naws_secret_access_key = {SECRET1}\n\n"
                    f"[operator]\naws_access_key_id={KEY2}\naws_secret_access_key={SECRET2}\n")
    return path


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("files")
    (root / BUCKET).mkdir()
    (root / BUCKET / "app.bin").write_bytes(IMAGE)
    return root


@pytest.fixture(scope="module")
def jobsd(module_broker: stack.Mosquitto, tmp_path_factory: pytest.TempPathFactory,
          credentials_file: Path, files_dir: Path) -> Iterator[stack.Jobsd]:
    j = stack.Jobsd(str(tmp_path_factory.mktemp("jobsd-auth")), module_broker.broker,
                    files=str(files_dir),
                    extra=["--credentials", str(credentials_file), "--test-hooks"])
    try:
        yield j
    finally:
        j.stop()


def client(service: str, url: str, key: str = KEY1, secret: str = SECRET1,
           region: str = REGION) -> Any:
    return boto3.client(service, endpoint_url=url, region_name=region, aws_access_key_id=key,
                        aws_secret_access_key=secret, config=Config(retries={"max_attempts": 1}))


@pytest.fixture(scope="module")
def iot(jobsd: stack.Jobsd) -> Any:
    return client("iot", jobsd.control_url)


@pytest.fixture(scope="module")
def data(jobsd: stack.Jobsd) -> Any:
    return client("iot-jobs-data", jobsd.data_url)


def new_thing(iot: Any) -> str:
    name = unique("auth-thing")
    iot.create_thing(thingName=name)
    return name


@pytest.fixture(scope="module")
def thing(iot: Any) -> str:
    """The module's thing: the target of jobs that are never looked for in lists."""
    return new_thing(iot)


@contextlib.contextmanager
def signing_clock(at: datetime.datetime) -> Iterator[None]:
    """botocore's signers (the Python one and, with awscrt installed, the CRT one boto3 clients
    then use) sign as if it were `at`."""
    with contextlib.ExitStack() as stack_:
        for module in ("botocore.auth", "botocore.crt.auth"):
            try:
                importlib.import_module(module)
            except ImportError:  # no awscrt
                continue
            stack_.enter_context(mock.patch(f"{module}.get_current_datetime",
                                            lambda remove_tzinfo=True: at))
        yield


# -- raw requests ------------------------------------------------------------------------------------
Reply = tuple[int, dict[str, str], Any]


def sign(method: str, url: str, body: bytes = b"", *, key: str = KEY1, secret: str = SECRET1,
         service: str = "iot", region: str = REGION, at: Optional[datetime.datetime] = None,
         headers: Optional[dict[str, str]] = None, sign_all: bool = False) -> dict[str, str]:
    """The headers botocore's signer adds to `method url` (signed at `at`, default now).
    `sign_all`: sign User-Agent and the other headers botocore leaves out, as other SDKs may."""
    request = AWSRequest(method=method, url=url, data=body,
                         headers={"Content-Type": "application/json", **(headers or {})})
    signer = SigV4Auth(Credentials(key, secret), service, region)
    with mock.patch("botocore.auth.get_current_datetime", return_value=at or utcnow()), \
            mock.patch("botocore.auth.SIGNED_HEADERS_BLACKLIST", [] if sign_all else
                       botocore.auth.SIGNED_HEADERS_BLACKLIST):
        signer.add_auth(request)
    return dict(request.headers.items())


def send(base: str, method: str, target: str, body: bytes = b"",
         headers: Optional[dict[str, str]] = None,
         conn: Optional[http.client.HTTPConnection] = None) -> Reply:
    """One request, the target sent exactly as written; JSON replies decoded."""
    parts = urlsplit(base)
    own = conn is None
    c = conn or http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        c.request(method, target, body=body, headers=headers or {})
        reply = c.getresponse()
        raw = reply.read()
        got = {k.lower(): v for k, v in reply.getheaders()}
        if got.get("content-type") == "application/json":
            return reply.status, got, json.loads(raw)
        return reply.status, got, raw
    finally:
        if own:
            c.close()


def refused(reply: Reply) -> tuple[int, str, str]:
    """(status, x-amzn-ErrorType, message) of an error reply whose body is only `message`."""
    status, headers, body = reply
    assert isinstance(body, dict) and set(body) == {"message"}, body
    return status, headers.get("x-amzn-errortype", ""), body["message"]


def client_error(err: pytest.ExceptionInfo[ClientError]) -> tuple[int, str, str]:
    r = err.value.response
    return r["ResponseMetadata"]["HTTPStatusCode"], r["Error"]["Code"], r["Error"]["Message"]


def create_job_request(jobsd: stack.Jobsd, job_id: str, thing: str) -> tuple[str, bytes]:
    """CreateJob as botocore sends it: PUT /jobs/{jobId} with a JSON body."""
    body = json.dumps({"targets": [thing_arn(thing)],
                       "document": json.dumps({"operation": "noop", "v": 1})}).encode()
    return f"/jobs/{job_id}", body


def assert_no_job(iot: Any, job_id: str) -> None:
    with pytest.raises(ClientError) as err:
        iot.describe_job(jobId=job_id)
    assert client_error(err)[:2] == (404, "ResourceNotFoundException")


# -- the right keys ----------------------------------------------------------------------------------
def test_right_keys_work_on_both_planes(jobsd: stack.Jobsd, iot: Any, data: Any) -> None:
    thing = new_thing(iot)
    job_id = unique("job")
    iot.create_job(jobId=job_id, targets=[thing_arn(thing)],
                   document=json.dumps({"operation": "noop"}))
    assert iot.describe_job(jobId=job_id)["job"]["jobId"] == job_id
    assert job_id in [j["jobId"] for j in iot.list_jobs()["jobs"]]
    queued = data.get_pending_job_executions(thingName=thing)["queuedJobs"]
    assert job_id in [j["jobId"] for j in queued]
    execution = data.describe_job_execution(thingName=thing, jobId=job_id)["execution"]
    assert execution["status"] == "QUEUED"
    # the second key pair of the file is accepted too, on both listeners
    other = client("iot", jobsd.control_url, KEY2, SECRET2)
    assert other.describe_job(jobId=job_id)["job"]["jobId"] == job_id
    other_data = client("iot-jobs-data", jobsd.data_url, KEY2, SECRET2)
    assert other_data.describe_job_execution(thingName=thing, jobId=job_id)["execution"][
        "jobId"] == job_id
    # commands: created on the control plane, started on the data plane
    command_id = unique("cmd")
    command_arn = iot.create_command(commandId=command_id, payload={
        "content": b'{"do": "ping"}', "contentType": "application/json"})["commandArn"]
    execution_id = data.start_command_execution(targetArn=thing_arn(thing),
                                                commandArn=command_arn)["executionId"]
    got = iot.get_command_execution(executionId=execution_id, targetArn=thing_arn(thing))
    assert got["executionId"] == execution_id


def test_a_signature_fourteen_minutes_old_is_still_good(jobsd: stack.Jobsd, thing: str) -> None:
    url = f"{jobsd.control_url}/things/{thing}"
    headers = sign("GET", url, at=utcnow() - datetime.timedelta(minutes=14))
    status, _, body = send(jobsd.control_url, "GET", f"/things/{thing}", headers=headers)
    assert (status, body["thingName"]) == (200, thing)


# -- refusals on the control plane -------------------------------------------------------------------
def _wrong_secret(jobsd: stack.Jobsd, job_id: str, thing: str) -> tuple[int, str, str]:
    with pytest.raises(ClientError) as err:
        client("iot", jobsd.control_url, KEY1, "not-" + SECRET1).create_job(
            jobId=job_id, targets=[thing_arn(thing)], document="{}")
    return client_error(err)


def _unknown_key(jobsd: stack.Jobsd, job_id: str, thing: str) -> tuple[int, str, str]:
    with pytest.raises(ClientError) as err:
        client("iot", jobsd.control_url, "AKIAUNKNOWN000000000", SECRET1).create_job(
            jobId=job_id, targets=[thing_arn(thing)], document="{}")
    return client_error(err)


def _wrong_region(jobsd: stack.Jobsd, job_id: str, thing: str) -> tuple[int, str, str]:
    with pytest.raises(ClientError) as err:
        client("iot", jobsd.control_url, region="us-west-2").create_job(
            jobId=job_id, targets=[thing_arn(thing)], document="{}")
    return client_error(err)


def _tampered_body(jobsd: stack.Jobsd, job_id: str, thing: str) -> tuple[int, str, str]:
    iot = client("iot", jobsd.control_url)
    seen: list[bytes] = []

    def tamper(request: Any, **_: Any) -> None:  # after signing, before the bytes leave
        body = bytes(request.body)
        assert b"noop" in body
        request.body = body.replace(b"noop", b"n00p")  # same length: framing intact
        seen.append(request.body)

    iot.meta.events.register("before-send.iot.CreateJob", tamper)
    with pytest.raises(ClientError) as err:
        iot.create_job(jobId=job_id, targets=[thing_arn(thing)],
                       document=json.dumps({"operation": "noop"}))
    assert len(seen) == 1
    return client_error(err)


def _raw(jobsd: stack.Jobsd, job_id: str, thing: str, **how: Any) -> tuple[int, str, str]:
    target, body = create_job_request(jobsd, job_id, thing)
    headers = sign("PUT", jobsd.control_url + target, body, **how)
    return refused(send(jobsd.control_url, "PUT", target, body, headers))


def _wrong_service(jobsd: stack.Jobsd, job_id: str, thing: str) -> tuple[int, str, str]:
    return _raw(jobsd, job_id, thing, service="iot-jobs-data")


def _expired(jobsd: stack.Jobsd, job_id: str, thing: str) -> tuple[int, str, str]:
    return _raw(jobsd, job_id, thing, at=utcnow() - datetime.timedelta(minutes=16))


def _not_yet_current(jobsd: stack.Jobsd, job_id: str, thing: str) -> tuple[int, str, str]:
    return _raw(jobsd, job_id, thing, at=utcnow() + datetime.timedelta(minutes=16))


def _missing(jobsd: stack.Jobsd, job_id: str, thing: str) -> tuple[int, str, str]:
    target, body = create_job_request(jobsd, job_id, thing)
    return refused(send(jobsd.control_url, "PUT", target, body,
                        {"Content-Type": "application/json"}))


def _malformed(jobsd: stack.Jobsd, job_id: str, thing: str) -> tuple[int, str, str]:
    target, body = create_job_request(jobsd, job_id, thing)
    headers = sign("PUT", jobsd.control_url + target, body)
    headers["Authorization"] = headers["Authorization"].split(",")[0]  # only Credential=
    return refused(send(jobsd.control_url, "PUT", target, body, headers))


def _host_not_signed(jobsd: stack.Jobsd, job_id: str, thing: str) -> tuple[int, str, str]:
    target, body = create_job_request(jobsd, job_id, thing)
    headers = sign("PUT", jobsd.control_url + target, body)
    headers["Authorization"] = headers["Authorization"].replace(
        "SignedHeaders=content-type;host;x-amz-date", "SignedHeaders=content-type;x-amz-date")
    return refused(send(jobsd.control_url, "PUT", target, body, headers))


def _other_path(jobsd: stack.Jobsd, job_id: str, thing: str) -> tuple[int, str, str]:
    """A good signature for another job id, replayed against this one."""
    target, body = create_job_request(jobsd, job_id, thing)
    headers = sign("PUT", f"{jobsd.control_url}/jobs/{unique('other')}", body)
    return refused(send(jobsd.control_url, "PUT", target, body, headers))


def _other_host(jobsd: stack.Jobsd, job_id: str, thing: str) -> tuple[int, str, str]:
    """A good signature made for AWS's endpoint, replayed against jobsd."""
    target, body = create_job_request(jobsd, job_id, thing)
    headers = sign("PUT", f"https://iot.{REGION}.amazonaws.com{target}", body)
    return refused(send(jobsd.control_url, "PUT", target, body, headers))


def _both(jobsd: stack.Jobsd, job_id: str, thing: str) -> tuple[int, str, str]:
    target, body = create_job_request(jobsd, job_id, thing)
    headers = sign("PUT", jobsd.control_url + target, body)
    return refused(send(jobsd.control_url, "PUT", target + "?X-Amz-Algorithm=AWS4-HMAC-SHA256",
                        body, headers))


CASES = {  # case: (attempt, x-amzn-ErrorType, regular expression the message matches)
    "wrong-secret": (_wrong_secret, "InvalidSignatureException", re.escape(MISMATCH + "\n\n")),
    "unknown-key": (_unknown_key, "UnrecognizedClientException", re.escape(BAD_TOKEN) + "$"),
    "wrong-region": (_wrong_region, "InvalidSignatureException",
                     re.escape("Credential should be scoped to a valid region, not 'us-west-2'. ")
                     + "$"),
    "wrong-service": (_wrong_service, "InvalidSignatureException",
                      re.escape("Credential should be scoped to correct service: 'iot'. ") + "$"),
    "tampered-body": (_tampered_body, "InvalidSignatureException", re.escape(MISMATCH)),
    "expired": (_expired, "InvalidSignatureException",
                rf"Signature expired: {STAMP} is now earlier than {STAMP} \({STAMP} - 15 min\.\)$"),
    "not-yet-current": (_not_yet_current, "InvalidSignatureException",
                        rf"Signature not yet current: {STAMP} is still later than {STAMP} "
                        rf"\({STAMP} \+ 15 min\.\)$"),
    "missing": (_missing, "MissingAuthenticationTokenException", "Missing Authentication Token$"),
    "malformed": (_malformed, "IncompleteSignatureException", re.escape(
        "Authorization header requires 'Signature' parameter. Authorization header requires "
        f"'SignedHeaders' parameter. Authorization=AWS4-HMAC-SHA256 Credential={KEY1}/")),
    "host-not-signed": (_host_not_signed, "InvalidSignatureException", re.escape(
        "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.") + "$"),
    "other-path": (_other_path, "InvalidSignatureException", re.escape(MISMATCH)),
    "other-host": (_other_host, "InvalidSignatureException", re.escape(MISMATCH)),
    "header-and-query": (_both, "InvalidSignatureException", re.escape(
        "Found both 'X-Amz-Algorithm' as a query-string param and 'Authorization' as HTTP "
        "header.") + "$"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_and_nothing_created(jobsd: stack.Jobsd, iot: Any, thing: str, case: str) -> None:
    attempt, error_type, pattern = CASES[case]
    job_id = unique("refused")
    status, got_type, got_message = attempt(jobsd, job_id, thing)
    assert (status, got_type) == (403, error_type), got_message
    assert re.match(pattern, got_message), got_message
    assert_no_job(iot, job_id)
    # the same request, signed right, does create the job: the refusal was the signature's
    target, body = create_job_request(jobsd, job_id, thing)
    status, _, reply = send(jobsd.control_url, "PUT", target, body,
                            sign("PUT", jobsd.control_url + target, body))
    assert (status, reply["jobId"]) == (200, job_id)
    assert iot.describe_job(jobId=job_id)["job"]["status"] == "IN_PROGRESS"


def test_expired_message_names_the_times(jobsd: stack.Jobsd, thing: str) -> None:
    signed_at = (utcnow() - datetime.timedelta(hours=2)).replace(microsecond=0)
    url = f"{jobsd.control_url}/things/{thing}"
    before = utcnow().replace(microsecond=0)
    status, kind, message = refused(send(jobsd.control_url, "GET", f"/things/{thing}",
                                         headers=sign("GET", url, at=signed_at)))
    after = utcnow()
    m = re.fullmatch(rf"Signature expired: ({STAMP}) is now earlier than ({STAMP}) "
                     rf"\(({STAMP}) - 15 min\.\)", message)
    assert (status, kind) == (403, "InvalidSignatureException") and m, message
    fmt = "%Y%m%dT%H%M%SZ"
    assert m.group(1) == signed_at.strftime(fmt)
    now = datetime.datetime.strptime(m.group(3), fmt).replace(tzinfo=datetime.UTC)
    assert before <= now <= after
    assert m.group(2) == (now - datetime.timedelta(minutes=15)).strftime(fmt)


# -- the data plane ----------------------------------------------------------------------------------
def test_data_plane_refusals_touch_nothing(jobsd: stack.Jobsd, iot: Any, data: Any,
                                           thing: str) -> None:
    job_id = unique("job")
    iot.create_job(jobId=job_id, targets=[thing_arn(thing)], document='{"operation": "noop"}')
    wrong = client("iot-jobs-data", jobsd.data_url, KEY1, "not-" + SECRET1)
    with pytest.raises(ClientError) as err:
        wrong.get_pending_job_executions(thingName=thing)
    assert client_error(err)[:2] == (403, "InvalidSignatureException")
    # an update whose body was changed after signing leaves the execution QUEUED
    tampering = client("iot-jobs-data", jobsd.data_url)

    def tamper(request: Any, **_: Any) -> None:
        request.body = bytes(request.body).replace(b"IN_PROGRESS", b"IN_PROGRESZ")

    tampering.meta.events.register("before-send.iot-jobs-data.UpdateJobExecution", tamper)
    with pytest.raises(ClientError) as err:
        tampering.update_job_execution(thingName=thing, jobId=job_id, status="IN_PROGRESS")
    status, kind, message = client_error(err)
    assert (status, kind) == (403, "InvalidSignatureException") and message.startswith(MISMATCH)
    assert data.describe_job_execution(thingName=thing, jobId=job_id)["execution"][
        "status"] == "QUEUED"
    # a control-plane signature is no good on the data plane
    target = f"/things/{thing}/jobs"
    headers = sign("GET", jobsd.data_url + target, service="iot")
    assert refused(send(jobsd.data_url, "GET", target, headers=headers)) == (
        403, "InvalidSignatureException",
        "Credential should be scoped to correct service: 'iot-jobs-data'. ")
    # StartCommandExecution with an unknown key starts nothing
    command_arn = iot.create_command(commandId=unique("cmd"), payload={
        "content": b"{}", "contentType": "application/json"})["commandArn"]
    stranger = client("iot-jobs-data", jobsd.data_url, "AKIAUNKNOWN000000000", SECRET1)
    with pytest.raises(ClientError) as err:
        stranger.start_command_execution(targetArn=thing_arn(thing), commandArn=command_arn)
    assert client_error(err) == (403, "UnrecognizedClientException", BAD_TOKEN)
    listed = iot.list_command_executions(commandArn=command_arn)["commandExecutions"]
    assert listed == []
    with pytest.raises(ClientError) as err:
        client("iot-jobs-data", jobsd.data_url, region="eu-west-1").start_command_execution(
            targetArn=thing_arn(thing), commandArn=command_arn)
    assert client_error(err)[:2] == (403, "InvalidSignatureException")
    assert iot.list_command_executions(commandArn=command_arn)["commandExecutions"] == []
    data.start_command_execution(targetArn=thing_arn(thing), commandArn=command_arn)
    assert len(iot.list_command_executions(commandArn=command_arn)["commandExecutions"]) == 1
    # unsigned: refused on the data listener as on the control listener
    assert refused(send(jobsd.data_url, "GET", target))[:2] == (
        403, "MissingAuthenticationTokenException")


def test_test_hooks_route_needs_a_signature(jobsd: stack.Jobsd) -> None:
    target = "/_jobsd/test-hooks"
    fault = json.dumps({"streamFault": "InternalError"}).encode()
    assert refused(send(jobsd.control_url, "PUT", target, fault,
                        {"Content-Type": "application/json"})) == (
        403, "MissingAuthenticationTokenException", "Missing Authentication Token")
    headers = sign("PUT", jobsd.control_url + target, fault, secret="wrong")
    assert refused(send(jobsd.control_url, "PUT", target, fault, headers))[:2] == (
        403, "InvalidSignatureException")
    # signed: answers with the current state, which the refused requests did not change
    status, _, body = send(jobsd.control_url, "PUT", target, b"{}",
                           sign("PUT", jobsd.control_url + target, b"{}"))
    assert (status, body["streamFault"]) == (200, None)


def test_presigned_query_strings(jobsd: stack.Jobsd, iot: Any, data: Any) -> None:
    thing = new_thing(iot)
    job_id = unique("job")
    iot.create_job(jobId=job_id, targets=[thing_arn(thing)], document='{"operation": "noop"}')
    url = data.generate_presigned_url("get_pending_job_executions",
                                      Params={"thingName": thing}, ExpiresIn=300)
    parts = urlsplit(url)
    assert "X-Amz-Signature=" in parts.query and "X-Amz-Credential=" in parts.query
    status, _, body = send(jobsd.data_url, "GET", f"{parts.path}?{parts.query}")
    assert status == 200 and job_id in [j["jobId"] for j in body["queuedJobs"]]
    # the same signature on another thing's path
    other = parts.path.replace(thing, thing + "x")
    assert refused(send(jobsd.data_url, "GET", f"{other}?{parts.query}"))[:2] == (
        403, "InvalidSignatureException")
    # a presigned URL used after X-Amz-Expires
    with signing_clock(utcnow() - datetime.timedelta(minutes=3)):
        old = urlsplit(data.generate_presigned_url("get_pending_job_executions",
                                                   Params={"thingName": thing}, ExpiresIn=60))
    status, kind, message = refused(send(jobsd.data_url, "GET", f"{old.path}?{old.query}"))
    assert (status, kind) == (403, "InvalidSignatureException")
    assert message.startswith("Signature expired: "), message
    # a query signature lacking its signature
    stripped = re.sub(r"&?X-Amz-Signature=[0-9a-f]+", "", parts.query)
    assert refused(send(jobsd.data_url, "GET", f"{parts.path}?{stripped}")) == (
        403, "IncompleteSignatureException",
        "AWS query-string parameters must include 'X-Amz-Signature'. "
        "Re-examine the query-string parameters.")


def test_refused_request_keeps_the_connection_usable(jobsd: stack.Jobsd, thing: str) -> None:
    parts = urlsplit(jobsd.control_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        job_id = unique("refused")
        target, body = create_job_request(jobsd, job_id, thing)
        status, headers, _ = send(jobsd.control_url, "PUT", target, body * 20,
                                  {"Content-Type": "application/json"}, conn=conn)
        assert status == 403 and headers.get("connection", "").lower() != "close"
        sock = conn.sock
        assert sock is not None
        status, _, reply = send(jobsd.control_url, "GET", f"/things/{thing}",
                                headers=sign("GET", f"{jobsd.control_url}/things/{thing}"),
                                conn=conn)
        assert (status, reply["thingName"]) == (200, thing)
        assert conn.sock is sock  # the same TCP connection: the refused body was read
    finally:
        conn.close()


def test_refusals_are_logged_with_the_key_id_not_the_secret(jobsd: stack.Jobsd,
                                                            thing: str) -> None:
    wrong = "wrong-secret-" + uuid.uuid4().hex
    with pytest.raises(ClientError):
        client("iot", jobsd.control_url, KEY2, wrong).describe_thing(thingName=thing)
    log = open(jobsd.proc.log_path, encoding="utf-8", errors="replace").read()
    lines = [ln for ln in log.splitlines() if " WARNING " in ln and f"access key {KEY2}" in ln]
    assert lines and "InvalidSignatureException" in lines[-1], log[-2000:]
    assert wrong not in log and SECRET2 not in log and SECRET1 not in log


# -- /files/ keeps its own signed URLs ---------------------------------------------------------------
def test_files_urls_work_without_sigv4(jobsd: stack.Jobsd, iot: Any, data: Any,
                                       thing: str) -> None:
    job_id = unique("dl")
    iot.create_job(jobId=job_id, targets=[thing_arn(thing)],
                   document=json.dumps({"operation": "download", "url": PLACEHOLDER}),
                   presignedUrlConfig={"roleArn": f"arn:aws:iam::{ACCOUNT}:role/s3",
                                       "expiresInSec": 120})
    document = json.loads(data.describe_job_execution(
        thingName=thing, jobId=job_id, includeJobDocument=True)["execution"]["jobDocument"])
    url = urlsplit(document["url"])
    assert f"{url.scheme}://{url.netloc}" == jobsd.data_url
    status, _, body = send(jobsd.data_url, "GET", f"{url.path}?{url.query}")
    assert (status, body) == (200, IMAGE)
    # still guarded by its own signature (S3-style XML errors, not SigV4's)
    status, headers, body = send(jobsd.data_url, "GET", url.path)
    assert status == 403 and headers["content-type"] == "application/xml", body
    assert b"<Code>AccessDenied</Code>" in body


# -- without credentials -----------------------------------------------------------------------------
def test_without_credentials_nothing_is_checked(module_broker: stack.Mosquitto,
                                                tmp_path: Path) -> None:
    j = stack.Jobsd(str(tmp_path / "jobsd"), module_broker.broker)
    try:
        name = unique("open")
        status, _, _ = send(j.control_url, "POST", f"/things/{name}", b"{}")
        assert status == 200
        status, _, body = send(j.control_url, "GET", f"/things/{name}")
        assert (status, body["thingName"]) == (200, name)
    finally:
        assert j.stop() == 0


def run_jobsd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.path.join(TOOLS, "jobsd"), *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("option,address", [("--control", "0.0.0.0:0"),
                                            ("--data", "192.0.2.1:0"),
                                            ("--control", "example.com:0")])
def test_non_loopback_without_credentials_exits_2(tmp_path: Path, option: str,
                                                  address: str) -> None:
    listeners = {"--control": "127.0.0.1:0", "--data": "127.0.0.1:0", option: address}
    r = run_jobsd("--broker", "127.0.0.1:9", "--db", str(tmp_path / "db.sqlite3"),
                  *[x for kv in listeners.items() for x in kv])
    assert r.returncode == 2, r.stderr
    assert f"{option} {address} is not a loopback address" in r.stderr
    assert "--credentials" in r.stderr
    assert not (tmp_path / "db.sqlite3").exists()


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("LocalHost", True), ("0.0.0.0", False), ("10.0.0.1", False),
    ("::", False), ("128.0.0.1", False), ("example.com", False), ("localhost.example", False)])
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert jobsd_main.is_loopback(host) is loopback


def test_loopback_rule_in_argument_parsing() -> None:
    assert jobsd_main.parse_args(["--control", "localhost:0"]).control == ("localhost", 0)
    assert jobsd_main.parse_args(["--data", ":0"]).data == ("127.0.0.1", 0)
    with pytest.raises(SystemExit) as exit_:
        jobsd_main.parse_args(["--data", "0.0.0.0:8441"])
    assert exit_.value.code == 2
    # with credentials any address may be asked for (not listened on here)
    args = jobsd_main.parse_args(["--control", "0.0.0.0:0", "--data", "192.0.2.1:0",
                                  "--credentials", "somewhere"])
    assert (args.control, args.data) == (("0.0.0.0", 0), ("192.0.2.1", 0))


# -- a credentials file that cannot be used ----------------------------------------------------------
BAD_FILES = {
    "missing-secret": (f"[default]\naws_access_key_id = {KEY1}\n",
                       "section [default] has no aws_secret_access_key"),
    "missing-key-id": (f"[default]\naws_access_key_id = {KEY1}\naws_secret_access_key = s\n"
                       "[ci]\naws_secret_access_key = s2\n",
                       "section [ci] has no aws_access_key_id"),
    "empty-value": (f"[x]\naws_access_key_id = {KEY1}\naws_secret_access_key =\n",
                    "section [x] has no aws_secret_access_key"),
    "no-section-header": (f"aws_access_key_id = {KEY1}\n",
                          "is not a shared-credentials file: File contains no section headers"),
    "duplicate-section": ("[a]\naws_access_key_id = K1\naws_secret_access_key = s\n"
                          "[a]\naws_access_key_id = K2\naws_secret_access_key = s\n",
                          "is not a shared-credentials file: While reading from"),
    "not-key-value": ("[a]\nthis line is nonsense\n",
                      "is not a shared-credentials file: Source contains parsing errors"),
    "duplicate-key-id": (f"[a]\naws_access_key_id = {KEY1}\naws_secret_access_key = s\n"
                         f"[b]\naws_access_key_id = {KEY1}\naws_secret_access_key = t\n",
                         f"section [b]: aws_access_key_id {KEY1} is already in section [a]"),
    "empty": ("", "holds no key pair"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_credentials_file_is_a_startup_error(tmp_path: Path, case: str) -> None:
    text, message = BAD_FILES[case]
    path = tmp_path / "credentials"
    path.write_text(text)
    db = tmp_path / "db.sqlite3"
    # the broker port is closed: a jobsd that got past the file would wait for it, not exit
    r = run_jobsd("--credentials", str(path), "--broker", "127.0.0.1:9", "--control",
                  "127.0.0.1:0", "--data", "127.0.0.1:0", "--db", str(db))
    assert r.returncode == 1, r.stderr
    assert "--credentials" in r.stderr and message in r.stderr, r.stderr
    assert str(path) in r.stderr
    assert not db.exists()  # refused before anything was opened


def test_unreadable_credentials_file(tmp_path: Path) -> None:
    r = run_jobsd("--credentials", str(tmp_path / "nope"), "--broker", "127.0.0.1:9",
                  "--control", "127.0.0.1:0", "--data", "127.0.0.1:0",
                  "--db", str(tmp_path / "db.sqlite3"))
    assert r.returncode == 1 and f"cannot read {tmp_path / 'nope'}" in r.stderr, r.stderr


def test_credentials_file_format(tmp_path: Path) -> None:
    path = tmp_path / "credentials"
    path.write_text("# comment\n[default]\naws_access_key_id = AKIA1\n"
                    "aws_secret_access_key = a%b=c/d+e\n\n[DEFAULT]\n"
                    "aws_access_key_id=AKIA2\naws_secret_access_key=two\n"
                    "aws_session_token = tok\nregion = eu-west-1\n")
    keys = load_credentials(str(path))
    assert sorted(keys) == ["AKIA1", "AKIA2"]
    assert (keys["AKIA1"].secret_key, keys["AKIA1"].token) == ("a%b=c/d+e", None)
    assert (keys["AKIA2"].secret_key, keys["AKIA2"].token) == ("two", "tok")
    assert "a%b" not in repr(keys["AKIA1"])
    with pytest.raises(CredentialsError):
        load_credentials(str(tmp_path))  # a folder


# -- the verifier's messages, with a fixed clock ------------------------------------------------------
NOW = datetime.datetime(2025, 6, 9, 10, 0, 15, tzinfo=datetime.UTC)


class Signed:
    """A request signed by botocore at a fixed time, as jobsd's HTTP handler sees it."""

    def __init__(self, method: str = "GET", target: str = "/things/t1", body: bytes = b"",
                 at: datetime.datetime = NOW, key: str = KEY1, secret: str = SECRET1,
                 service: str = "iot", region: str = REGION,
                 headers: Optional[dict[str, str]] = None, sign_all: bool = False) -> None:
        self.method, self.target, self.body = method, target, body
        self.headers = {"Host": "127.0.0.1:8440",
                        **sign(method, "http://127.0.0.1:8440" + target, body, key=key,
                               secret=secret, service=service, region=region, at=at,
                               headers=headers, sign_all=sign_all)}

    def verify(self, verifier: Verifier, **changes: Any) -> Any:
        from email.message import Message

        headers = Message()
        for name, value in {**self.headers, **changes.pop("headers", {})}.items():
            if value is not None:
                headers[name] = value
        return verifier.verify(changes.get("method", self.method),
                               changes.get("target", self.target), headers,
                               changes.get("body", self.body))


@pytest.fixture
def verifier() -> Verifier:
    keys = {KEY1: KeyPair(KEY1, SECRET1), "AKIATOKEN": KeyPair("AKIATOKEN", "s", "session-tok")}
    return Verifier(keys, "iot", REGION, clock=lambda: NOW)


def test_verifier_accepts_botocore_signatures(verifier: Verifier) -> None:
    assert Signed().verify(verifier) is None
    assert Signed("PUT", "/jobs/j1", b'{"a": 1}').verify(verifier) is None
    assert Signed("GET", "/things/t1/jobs/%24next?includeJobDocument=true&x=a%2Fb%20c").verify(
        verifier) is None
    assert Signed(at=NOW - datetime.timedelta(minutes=15)).verify(verifier) is None
    assert Signed(at=NOW + datetime.timedelta(minutes=15)).verify(verifier) is None
    # signed with a Date header instead of X-Amz-Date
    dated = Signed(headers={"Date": "Mon, 09 Jun 2025 10:00:15 GMT"})
    assert "X-Amz-Date" not in dated.headers and "date;" in dated.headers["Authorization"]
    assert dated.verify(verifier) is None
    # botocore never signs User-Agent, other signers may: the client's SignedHeaders rule
    s = Signed(headers={"User-Agent": "sdk/1", "X-Amz-Target": "a  b"}, sign_all=True)
    assert "user-agent" in s.headers["Authorization"]
    assert s.verify(verifier) is None
    assert s.verify(verifier, headers={"User-Agent": "sdk/2"}).message.startswith(MISMATCH)


def test_verifier_messages(verifier: Verifier) -> None:
    s = Signed(at=datetime.datetime(2025, 6, 9, 9, 45, 14, tzinfo=datetime.UTC))
    r = s.verify(verifier)
    assert (r.error_type, r.message, r.key_id) == (
        "InvalidSignatureException", "Signature expired: 20250609T094514Z is now earlier than "
        "20250609T094515Z (20250609T100015Z - 15 min.)", KEY1)
    r = Signed(at=datetime.datetime(2025, 6, 9, 10, 15, 16, tzinfo=datetime.UTC)).verify(verifier)
    assert r.message == ("Signature not yet current: 20250609T101516Z is still later than "
                         "20250609T101515Z (20250609T100015Z + 15 min.)")
    good = Signed()
    auth = good.headers["Authorization"]
    scope = f"{KEY1}/20250609/{REGION}/iot/aws4_request"
    wrong_scope = auth.replace(scope, f"{KEY1}/20250608/eu-west-1/s3/aws5_request")
    r = good.verify(verifier, headers={"Authorization": wrong_scope})
    assert (r.error_type, r.message) == ("InvalidSignatureException", (
        "Credential should be scoped to a valid region, not 'eu-west-1'. "
        "Credential should be scoped to correct service: 'iot'. "
        "Credential should be scoped with a valid terminator: 'aws4_request', not "
        "'aws5_request'. Date in Credential scope does not match YYYYMMDD from ISO-8601 version "
        "of date from HTTP: '20250608' != '20250609', from '20250609T100015Z'."))
    r = good.verify(verifier, headers={"Authorization": auth.replace(scope, "a/b/c/d")})
    assert (r.error_type, r.message) == (
        "IncompleteSignatureException", "Credential must have exactly 5 slash-delimited "
        "elements, e.g. keyid/date/region/service/term, got 'a/b/c/d'")
    r = good.verify(verifier, headers={"Authorization": auth.replace("AWS4-HMAC-SHA256",
                                                                     "AWS4-HMAC-SHA512")})
    assert (r.error_type, r.message) == (
        "IncompleteSignatureException",
        "Unsupported AWS 'algorithm': 'AWS4-HMAC-SHA512' (only AWS4-HMAC-SHA256 for now). ")
    r = good.verify(verifier, headers={"X-Amz-Date": "2025-06-09T10:00:15Z"})
    assert (r.error_type, r.message) == (
        "IncompleteSignatureException", "Date must be in ISO-8601 'basic format'. Got "
        "'2025-06-09T10:00:15Z'. See http://en.wikipedia.org/wiki/ISO_8601")
    r = good.verify(verifier, headers={"X-Amz-Date": "Mon, 09 Jun 2025 10:00:15 GMT"})
    assert r.error_type == "IncompleteSignatureException"  # an HTTP-date only in Date:
    r = good.verify(verifier, headers={"X-Amz-Date": None})
    assert (r.error_type, r.message) == (
        "IncompleteSignatureException", "Authorization header requires existence of either a "
        f"'X-Amz-Date' or a 'Date' header. Authorization={auth}")
    garbled = auth.replace("Credential=", "Credential ")
    r = good.verify(verifier, headers={"Authorization": garbled})
    assert r.error_type == "IncompleteSignatureException" and r.message.startswith(
        f"'Credential {KEY1}/20250609/us-east-1/iot/aws4_request' not a valid key=value pair "
        "(missing equal-sign) in Authorization header: ")
    for other in ("Bearer abc", "AWS AKID:sig"):
        r = good.verify(verifier, headers={"Authorization": other})
        assert (r.error_type, r.message) == ("MissingAuthenticationTokenException",
                                             "Missing Authentication Token")


def test_verifier_presigned(verifier: Verifier) -> None:
    request = AWSRequest(method="GET", url="http://127.0.0.1:8440/things/t1?a=b%2Fc")
    with signing_clock(NOW - datetime.timedelta(seconds=60)):
        botocore.auth.SigV4QueryAuth(Credentials(KEY1, SECRET1), "iot", REGION,
                                     expires=60).add_auth(request)
    parts = urlsplit(request.url)
    s = Signed()
    target = f"{parts.path}?{parts.query}"
    assert s.verify(verifier, target=target, headers={"Authorization": None}) is None
    late = Verifier(verifier.keys, "iot", REGION, clock=lambda: NOW + datetime.timedelta(seconds=1))
    r = s.verify(late, target=target, headers={"Authorization": None})
    assert (r.error_type, r.message) == (
        "InvalidSignatureException", "Signature expired: 20250609T095915Z is now earlier than "
        "20250609T095916Z (20250609T100016Z - 60 sec.)")
    r = s.verify(verifier, target=target.replace("X-Amz-Expires=60", "X-Amz-Expires=604801"),
                 headers={"Authorization": None})
    assert r.error_type == "IncompleteSignatureException" and "604800" in r.message
    r = s.verify(verifier, target=target.replace("a=b%2Fc", "a=b%2Fd"),
                 headers={"Authorization": None})
    assert r.error_type == "InvalidSignatureException" and r.message.startswith(MISMATCH)


def test_verifier_body_and_headers(verifier: Verifier) -> None:
    s = Signed("PUT", "/jobs/j1", b'{"a": 1}')
    assert s.verify(verifier, body=b'{"a": 2}').message.startswith(MISMATCH)
    assert s.verify(verifier, method="POST").message.startswith(MISMATCH)
    assert s.verify(verifier, target="/jobs/j1?x=1").message.startswith(MISMATCH)
    assert s.verify(verifier, headers={"Content-Type": "text/plain"}).message.startswith(MISMATCH)
    assert s.verify(verifier, headers={"Host": "127.0.0.1:8441"}).message.startswith(MISMATCH)
    assert s.verify(verifier, headers={"User-Agent": "unsigned, so free"}) is None
    # a signed x-amz-content-sha256 must be the body's hash
    h = Signed("PUT", "/jobs/j1", b"{}", headers={"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"})
    assert h.verify(verifier).message == MISMATCH
    # a session token: required when the key pair has one, refused when it has none
    t = Signed(key="AKIATOKEN", secret="s", headers={"X-Amz-Security-Token": "session-tok"})
    assert t.verify(verifier) is None
    t2 = Signed(key="AKIATOKEN", secret="s")
    assert (t2.verify(verifier).error_type, t2.verify(verifier).message) == (
        "UnrecognizedClientException", "The security token included in the request is invalid")
    t3 = Signed(headers={"X-Amz-Security-Token": "made-up"})
    assert t3.verify(verifier).error_type == "UnrecognizedClientException"


# -- defaults ------------------------------------------------------------------------------------------
def test_default_database_path() -> None:
    assert jobsd_main.default_db_path() == os.path.join(ROOT, "build", "jobsd", "jobsd.sqlite3")
    assert jobsd_main.default_db_path().startswith(BUILD + os.sep)
    args = jobsd_main.parse_args([])
    assert args.db == jobsd_main.default_db_path()
    assert (args.broker, args.control, args.data) == (
        ("127.0.0.1", 1883), ("127.0.0.1", 8440), ("127.0.0.1", 8441))
    assert args.credentials is None and args.region == REGION


def test_help_shows_the_defaults() -> None:
    r = subprocess.run([os.path.join(TOOLS, "jobsd"), "--help"], capture_output=True, text=True,
                       timeout=30, env={**os.environ, "COLUMNS": "400"})
    assert r.returncode == 0, r.stderr
    for text in ("(default: 127.0.0.1:1883)", "(default: 127.0.0.1:8440)",
                 "(default: 127.0.0.1:8441)", f"(default: {jobsd_main.default_db_path()})",
                 "--credentials FILE"):
        assert text in r.stdout, (text, r.stdout)
