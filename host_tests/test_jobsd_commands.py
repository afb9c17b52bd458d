"""AWS IoT commands in tools/jobsd: the control plane (boto3 `iot`), StartCommandExecution
(boto3 `iot-jobs-data`), delivery and device reports over MQTT, the status events, timeouts and
their survival across a restart, and a seeded fuzz. A real mosquitto and real jobsd processes;
a paho MQTT 5 client plays the device on the plain listener.

Oracles: botocore's `iot` / `iot-jobs-data` models, PROTOCOL.md 1.11 / 2.5 / 3.1, and the AWS
guide "Start and monitor command executions" (default timeout 10 s, at most 12 h; a TIMED_OUT set
by the service carries `$NO_RESPONSE_FROM_DEVICE` and can still be settled once by the device).

No sleeps: every wait is a condition with a deadline. To show that something did *not* happen
(no second delivery, no timeout of a finished execution) a test waits for a later event that
jobsd can only produce after it, on the same MQTT connection.
"""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import random
import re
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Union
from collections.abc import Callable, Iterator

import boto3
import paho.mqtt.client as paho
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from iotjobs_host import stack
from iotjobs_host.stack import Jobsd

TIMEOUT = 10.0
REGION, ACCOUNT = "us-east-1", "123456789012"
PREFIX = f"arn:aws:iot:{REGION}:{ACCOUNT}"
EXECUTION_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
ERROR_CODES = {"InvalidTopic", "InvalidJson", "InvalidRequest", "InvalidStateTransition",
               "ResourceNotFound", "VersionMismatch", "InternalError", "RequestThrottled",
               "TerminalStateReached"}


def thing_arn(name: str) -> str:
    return f"{PREFIX}:thing/{name}"


def client_arn(name: str) -> str:
    return f"{PREFIX}:client/{name}"


def command_arn(command_id: str) -> str:
    return f"{PREFIX}:command/{command_id}"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def error_of(err: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    return (err.value.response["Error"]["Code"],
            err.value.response["ResponseMetadata"]["HTTPStatusCode"])


def unvalidated(service: str, url: str) -> Any:
    """A boto3 client that sends what it is given (no client-side parameter validation), so the
    server's own validation is what answers."""
    return boto3.client(service, endpoint_url=url, region_name=REGION,
                        aws_access_key_id="local", aws_secret_access_key="local",
                        config=Config(retries={"max_attempts": 1}, parameter_validation=False))


def rest_call(url: str, method: str, path: str, body: Union[bytes, dict[str, Any], None] = None
         ) -> tuple[int, str, Any]:
    """(status, x-amzn-ErrorType, parsed JSON body) of one raw request."""
    host, port = url[len("http://"):].split(":")
    data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        raw = reply.read()
        kind = (reply.getheader("x-amzn-ErrorType") or "").split(":")[0]
        return reply.status, kind, json.loads(raw) if raw else None
    finally:
        conn.close()


# -- processes ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def broker(module_broker: stack.Mosquitto) -> stack.Mosquitto:
    return module_broker


@pytest.fixture(scope="module")
def jobsd(module_jobsd: Jobsd) -> Jobsd:
    """One jobsd for the module (conftest); each test works on fresh names."""
    return module_jobsd


# -- the device and the events watcher ----------------------------------------------------------

class Mqtt:
    """A paho MQTT 5 client on the plain listener; messages kept in arrival order."""

    def __init__(self, port: int, filters: list[str]) -> None:
        self.messages: list[paho.MQTTMessage] = []
        self._cond = threading.Condition()
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=unique("cmd"),
                                  protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(f, SubscribeOptions(qos=1)) for f in filters])
        assert subscribed.wait(TIMEOUT), "subscription not acknowledged"

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[paho.MQTTMessage], bool], what: str,
                 timeout: float = TIMEOUT, start: int = 0) -> paho.MQTTMessage:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self.messages[start:]:
                    if pred(msg):
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {what} within {timeout}s; saw "
                                         f"{[m.topic for m in self.messages]}")
                self._cond.wait(left)

    def matching(self, pred: Callable[[paho.MQTTMessage], bool]) -> list[paho.MQTTMessage]:
        with self._cond:
            return [m for m in self.messages if pred(m)]

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(TIMEOUT)

    def report_on(self, topic: str, payload: Union[dict[str, Any], bytes]
                  ) -> tuple[str, dict[str, Any]]:
        """Publish a status report on `topic` (`.../response/json`) and return (accepted |
        rejected, reply body); the client must be subscribed to the reply topics."""
        base = topic[:-len("/json")]
        replies = (base + "/accepted/json", base + "/rejected/json")
        start = len(self.messages)
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.publish(topic, data)
        reply = self.wait_for(lambda m: m.topic in replies, f"a reply on {base}", start=start)
        return reply.topic.split("/")[-2], json.loads(reply.payload)

    def close(self) -> None:
        self.client.disconnect()  # first, so the loop thread ends at once
        self.client.loop_stop()


class CommandDevice(Mqtt):
    """One device's commands topics, subscribed as the AWS guide's sample policy allows."""

    def __init__(self, port: int, name: str, kind: str = "things") -> None:
        self.name = name
        self.prefix = f"$aws/commands/{kind}/{name}/executions/"
        super().__init__(port, [self.prefix + "+/request/#",
                                self.prefix + "+/response/accepted/json",
                                self.prefix + "+/response/rejected/json"])

    def request(self, execution_id: str) -> paho.MQTTMessage:
        """The delivery of one execution's payload."""
        return self.wait_for(lambda m: m.topic.startswith(f"{self.prefix}{execution_id}/request"),
                             f"the request of {execution_id}")

    def requests(self, execution_id: str) -> list[paho.MQTTMessage]:
        return self.matching(lambda m: m.topic.startswith(f"{self.prefix}{execution_id}/request"))

    def report(self, execution_id: str, payload: Union[dict[str, Any], bytes]
               ) -> tuple[str, dict[str, Any]]:
        """UpdateCommandExecution on this device's own topic."""
        return self.report_on(f"{self.prefix}{execution_id}/response/json", payload)


class Events(Mqtt):
    """`$aws/events/commandExecution/+/#` as a cloud-side application subscribes to it."""

    def __init__(self, port: int) -> None:
        super().__init__(port, ["$aws/events/commandExecution/+/#"])

    def of(self, execution_id: str) -> list[tuple[str, dict[str, Any]]]:
        return [(m.topic, json.loads(m.payload)) for m in self.matching(
            lambda m: json.loads(m.payload).get("executionId") == execution_id)]

    def wait_status(self, execution_id: str, status: str,
                    timeout: float = TIMEOUT) -> dict[str, Any]:
        msg = self.wait_for(lambda m: m.topic.endswith("/" + status) and json.loads(
            m.payload).get("executionId") == execution_id,
            f"the {status} event of {execution_id}", timeout)
        return json.loads(msg.payload)


@pytest.fixture(scope="module")
def events(broker: stack.Mosquitto, jobsd: Jobsd) -> Iterator[Events]:
    watcher = Events(broker.port)
    try:
        yield watcher
    finally:
        watcher.close()


@pytest.fixture
def thing(jobsd: Jobsd) -> str:
    name = unique("cmd-thing")
    jobsd.iot.create_thing(thingName=name)
    return name


@pytest.fixture
def device(broker: stack.Mosquitto, thing: str) -> Iterator[CommandDevice]:
    dev = CommandDevice(broker.port, thing)
    try:
        yield dev
    finally:
        dev.close()


def new_command(jobsd: Jobsd, content: bytes = b'{"command": "ping"}',
                content_type: Optional[str] = "application/json", **extra: Any) -> str:
    command_id = unique("cmd")
    payload: dict[str, Any] = {"content": content}
    if content_type is not None:
        payload["contentType"] = content_type
    out = jobsd.iot.create_command(commandId=command_id, payload=payload, **extra)
    assert out == {"commandId": command_id, "commandArn": command_arn(command_id),
                   "ResponseMetadata": out["ResponseMetadata"]}
    return command_id


def start(jobsd: Jobsd, target: str, command_id: str, **extra: Any) -> str:
    execution_id = jobsd.data.start_command_execution(
        targetArn=target, commandArn=command_arn(command_id), **extra)["executionId"]
    assert EXECUTION_ID.fullmatch(execution_id)
    return execution_id


def get_execution(jobsd: Jobsd, execution_id: str, target: str, **extra: Any) -> dict[str, Any]:
    out = jobsd.iot.get_command_execution(executionId=execution_id, targetArn=target, **extra)
    out.pop("ResponseMetadata")
    return out


# -- control plane -------------------------------------------------------------------------------

def test_command_lifecycle(jobsd: Jobsd) -> None:
    iot = jobsd.iot
    content = b"\x00\xffbinary\x80payload"
    command_id = unique("cmd")
    mandatory = [{"name": "delay", "type": "INTEGER", "defaultValue": {"I": 5},
                  "description": "seconds"},
                 {"name": "blob", "type": "BINARY", "value": {"BIN": b"\x01\x02"}}]
    iot.create_command(commandId=command_id, displayName="Reboot", description="reboot it",
                       payload={"content": content, "contentType": "application/octet-stream"},
                       mandatoryParameters=mandatory, tags=[{"Key": "team", "Value": "a"}])
    got = iot.get_command(commandId=command_id)
    assert got["commandId"] == command_id and got["commandArn"] == command_arn(command_id)
    assert got["namespace"] == "AWS-IoT"
    assert got["displayName"] == "Reboot" and got["description"] == "reboot it"
    assert got["payload"] == {"content": content, "contentType": "application/octet-stream"}
    assert got["mandatoryParameters"] == mandatory
    assert got["deprecated"] is False and got["pendingDeletion"] is False
    assert isinstance(got["createdAt"], datetime.datetime)
    assert got["lastUpdatedAt"] == got["createdAt"]

    with pytest.raises(ClientError) as err:
        iot.create_command(commandId=command_id, payload={"content": b"x"})
    assert error_of(err) == ("ConflictException", 409)
    assert err.value.response["resourceId"] == command_id

    updated = iot.update_command(commandId=command_id, displayName="Reboot now",
                                 deprecated=True)
    assert updated["displayName"] == "Reboot now" and updated["deprecated"] is True
    assert updated["description"] == "reboot it"
    assert updated["lastUpdatedAt"] >= got["createdAt"]
    assert iot.get_command(commandId=command_id)["deprecated"] is True
    assert iot.update_command(commandId=command_id, deprecated=False)["deprecated"] is False

    # deleting a command that is not deprecated (or only recently) schedules the deletion
    deleted = iot.delete_command(commandId=command_id)
    assert deleted["statusCode"] == 202
    assert deleted["ResponseMetadata"]["HTTPStatusCode"] == 202
    assert iot.get_command(commandId=command_id)["pendingDeletion"] is True
    assert iot.delete_command(commandId=command_id)["statusCode"] == 202
    with pytest.raises(ClientError) as err:
        iot.update_command(commandId=command_id, description="too late")
    assert error_of(err) == ("ConflictException", 409)
    with pytest.raises(ClientError) as err:
        iot.create_command(commandId=command_id, payload={"content": b"x"})
    assert error_of(err) == ("ConflictException", 409)


def test_unknown_and_invalid_command_ids(jobsd: Jobsd) -> None:
    iot = jobsd.iot
    missing = unique("missing")
    for call in (lambda: iot.get_command(commandId=missing),
                 lambda: iot.update_command(commandId=missing, displayName="x")):
        with pytest.raises(ClientError) as err:
            call()
        assert error_of(err) == ("ResourceNotFoundException", 404)
    # nothing to delete: DeleteCommand models no ResourceNotFoundException, it just succeeds
    assert iot.delete_command(commandId=missing)["statusCode"] == 204
    for bad in ("bad.id", "a" * 65, "sp ace"):
        for call in (lambda b=bad: iot.get_command(commandId=b),
                     lambda b=bad: iot.create_command(commandId=b, payload={"content": b"x"}),
                     lambda b=bad: iot.delete_command(commandId=b)):
            with pytest.raises(ClientError) as err:
                call()
            assert error_of(err) == ("ValidationException", 400), bad


CREATE_ERRORS: list[tuple[str, dict[str, Any]]] = [
    ("no payload", {}),
    ("payload not an object", {"payload": "x"}),
    ("no content", {"payload": {"contentType": "application/json"}}),
    ("content not base64", {"payload": {"content": "***"}}),
    ("empty content", {"payload": {"content": ""}}),
    ("content too large", {"payload": {"content": base64.b64encode(b"x" * 131073).decode()}}),
    ("contentType not a MIME type", {"payload": {"content": "eA==", "contentType": "json"}}),
    ("contentType empty", {"payload": {"content": "eA==", "contentType": ""}}),
    ("unknown namespace", {"namespace": "AWS-Other", "payload": {"content": "eA=="}}),
    ("FleetWise", {"namespace": "AWS-IoT-FleetWise", "payload": {"content": "eA=="}}),
    ("roleArn with AWS-IoT", {"roleArn": "arn:aws:iam::123456789012:role/r",
                              "payload": {"content": "eA=="}}),
    ("payloadTemplate", {"payloadTemplate": "{}", "payload": {"content": "eA=="}}),
    ("displayName too long", {"displayName": "d" * 65, "payload": {"content": "eA=="}}),
    ("description control", {"description": "a\nb", "payload": {"content": "eA=="}}),
    ("description not a string", {"description": 5, "payload": {"content": "eA=="}}),
    ("mandatory empty", {"mandatoryParameters": [], "payload": {"content": "eA=="}}),
    ("mandatory bad name", {"mandatoryParameters": [{"name": "a b"}],
                            "payload": {"content": "eA=="}}),
    ("mandatory no name", {"mandatoryParameters": [{"type": "STRING"}],
                           "payload": {"content": "eA=="}}),
    ("mandatory twice", {"mandatoryParameters": [{"name": "a"}, {"name": "a"}],
                         "payload": {"content": "eA=="}}),
    ("mandatory bad type", {"mandatoryParameters": [{"name": "a", "type": "TEXT"}],
                            "payload": {"content": "eA=="}}),
    ("mandatory type mismatch", {"mandatoryParameters": [
        {"name": "a", "type": "STRING", "defaultValue": {"I": 1}}],
        "payload": {"content": "eA=="}}),
    ("mandatory bad value", {"mandatoryParameters": [{"name": "a", "value": {"I": "1"}}],
                             "payload": {"content": "eA=="}}),
    ("tag without key", {"tags": [{"Value": "v"}], "payload": {"content": "eA=="}}),
    ("tags not a list", {"tags": {"Key": "k"}, "payload": {"content": "eA=="}}),
]


@pytest.mark.parametrize("case", CREATE_ERRORS, ids=[c[0] for c in CREATE_ERRORS])
def test_create_command_validation(jobsd: Jobsd, case: tuple[str, dict[str, Any]]) -> None:
    command_id = unique("bad")
    status, kind, body = rest_call(jobsd.control_url, "PUT", f"/commands/{command_id}", case[1])
    assert (status, kind) == (400, "ValidationException"), body
    assert body["message"]
    status, kind, _ = rest_call(jobsd.control_url, "GET", f"/commands/{command_id}")
    assert (status, kind) == (404, "ResourceNotFoundException")  # nothing was stored


def test_malformed_control_requests_are_validation_errors(jobsd: Jobsd) -> None:
    url = jobsd.control_url
    for method, path, body in (
            ("PUT", f"/commands/{unique('c')}", b"{not json"),
            ("PUT", f"/commands/{unique('c')}", b"[1, 2]"),
            ("PATCH", f"/commands/{unique('c')}", b"\xff\xfe"),
            ("GET", "/commands?maxResults=abc", None),
            ("GET", "/commands?maxResults=0", None),
            ("GET", "/commands?maxResults=101", None),
            ("GET", "/commands?nextToken=zz", None),
            ("GET", "/commands?sortOrder=UP", None),
            ("GET", "/commands?namespace=Other", None),
            ("GET", f"/command-executions/{uuid.uuid4()}", None),  # targetArn is required
            ("GET", f"/command-executions/{uuid.uuid4()}?targetArn=nope", None),
            ("GET", f"/command-executions/{uuid.uuid4()}?targetArn={thing_arn('t')}"
                    "&includeResult=maybe", None),
            ("POST", "/command-executions", {"status": "DONE"}),
            ("POST", "/command-executions", {"sortOrder": "SIDEWAYS"}),
            ("POST", "/command-executions", {"targetArn": thing_arn("t"),
                                             "commandArn": command_arn("c")}),
            ("POST", "/command-executions", {"startedTimeFilter": {"after": "2024-01-01T00:00"},
                                             "completedTimeFilter": {"after": "2024-01-01"}}),
            ("POST", "/command-executions", {"startedTimeFilter": {"after": "yesterday"}}),
            ("DELETE", f"/command-executions/{uuid.uuid4()}", None)):
        status, kind, reply = rest_call(url, method, path, body)
        assert (status, kind) == (400, "ValidationException"), (method, path, body, reply)
        assert reply["message"]


def test_list_commands_pagination_order_and_filters(jobsd: Jobsd) -> None:
    iot = jobsd.iot
    parameter = unique("p")  # only this test's commands name it
    ids = [new_command(jobsd, mandatoryParameters=[{"name": parameter}]) for _ in range(5)]
    other = new_command(jobsd)

    def listed(**kw: Any) -> list[str]:
        out, token = [], None
        while True:
            page = iot.list_commands(commandParameterName=parameter, maxResults=2,
                                     **kw, **({"nextToken": token} if token else {}))
            assert len(page["commands"]) <= 2
            out += [c["commandId"] for c in page["commands"]]
            token = page.get("nextToken")
            if not token:
                return out

    assert listed() == ids[::-1]  # newest first by default
    assert listed(sortOrder="DESCENDING") == ids[::-1]
    assert listed(sortOrder="ASCENDING") == ids
    assert other not in listed()
    summary = iot.list_commands(commandParameterName=parameter, maxResults=1,
                                sortOrder="ASCENDING")["commands"][0]
    assert set(summary) == {"commandArn", "commandId", "deprecated", "createdAt",
                            "lastUpdatedAt", "pendingDeletion"}
    assert summary["commandArn"] == command_arn(ids[0]) and summary["deprecated"] is False
    all_ids = [c["commandId"] for c in iot.list_commands(maxResults=100,
                                                         namespace="AWS-IoT")["commands"]]
    assert set(ids + [other]) <= set(all_ids)
    assert iot.list_commands(namespace="AWS-IoT-FleetWise")["commands"] == []
    assert len(iot.list_commands()["commands"]) <= 25  # the documented default page


# -- StartCommandExecution and delivery ----------------------------------------------------------

DELIVERIES = [("application/json", "/request/json"), ("application/cbor", "/request/cbor"),
              ("text/plain", "/request"), (None, "/request"),
              ("application/json; charset=utf-8", "/request/json")]


@pytest.mark.parametrize("content_type,suffix", DELIVERIES)
def test_payload_delivered_on_the_content_type_topic(jobsd: Jobsd, device: CommandDevice,
                                                     events: Events, content_type: Optional[str],
                                                     suffix: str) -> None:
    content = (b'{"command": "ping", "n": 1}' if content_type and "json" in content_type
               else bytes(range(256)))
    command_id = new_command(jobsd, content, content_type)
    execution_id = start(jobsd, thing_arn(device.name), command_id, executionTimeoutSeconds=30)
    msg = device.request(execution_id)
    assert msg.topic == f"$aws/commands/things/{device.name}/executions/{execution_id}{suffix}"
    assert msg.payload == content  # the bytes exactly as configured, no envelope
    props = msg.properties
    assert getattr(props, "ContentType", None) == content_type
    assert 0 < props.MessageExpiryInterval <= 30
    created = events.wait_status(execution_id, "CREATED")
    assert created["eventType"] == "COMMAND_EXECUTION" and created["status"] == "CREATED"
    assert created["commandArn"] == command_arn(command_id)
    assert created["targetArn"] == thing_arn(device.name)
    got = get_execution(jobsd, execution_id, thing_arn(device.name))
    assert got["status"] == "CREATED" and got["executionTimeoutSeconds"] == 30
    assert got["commandArn"] == command_arn(command_id)
    assert got["startedAt"] == got["createdAt"] == got["lastUpdatedAt"]
    assert "completedAt" not in got and "result" not in got and "statusReason" not in got
    # the event timestamp is the creation instant in epoch milliseconds
    assert isinstance(created["timestamp"], int)
    assert abs(created["timestamp"] / 1000 - got["createdAt"].timestamp()) < 1


def test_client_target(jobsd: Jobsd, broker: stack.Mosquitto, events: Events) -> None:
    client_id = unique("client")  # an MQTT client id, not a registered thing
    dev = CommandDevice(broker.port, client_id, kind="clients")
    try:
        command_id = new_command(jobsd)
        execution_id = start(jobsd, client_arn(client_id), command_id)
        msg = dev.request(execution_id)
        assert msg.topic == (f"$aws/commands/clients/{client_id}/executions/{execution_id}"
                             "/request/json")
        assert dev.report(execution_id, {"status": "SUCCEEDED"}) == (
            "accepted", {"executionId": execution_id})
        assert events.wait_status(execution_id, "SUCCEEDED")["targetArn"] == client_arn(client_id)
        got = get_execution(jobsd, execution_id, client_arn(client_id))
        assert got["status"] == "SUCCEEDED" and got["targetArn"] == client_arn(client_id)
        # the same id under the things kind is another device
        with pytest.raises(ClientError) as err:
            get_execution(jobsd, execution_id, thing_arn(client_id))
        assert error_of(err) == ("ResourceNotFoundException", 404)
    finally:
        dev.close()


GOOD_PARAMETERS: list[tuple[str, Any, Any]] = [
    # (member, value sent, value boto3 reads back)
    ("S", "x", "x"), ("S", "ünïcode ✓", "ünïcode ✓"),
    ("B", True, True), ("B", False, False),
    ("I", 0, 0), ("I", 2**31 - 1, 2**31 - 1), ("I", -(2**31), -(2**31)),
    ("L", 2**63 - 1, 2**63 - 1), ("L", -(2**63), -(2**63)),
    ("D", 1.5, 1.5), ("D", 3, 3), ("D", -1e300, -1e300),
    ("BIN", base64.b64encode(b"\x00\x01").decode(), b"\x00\x01"),
    ("UL", "0", "0"), ("UL", "18446744073709551615", "18446744073709551615"),
    ("UL", "00000000000000000001", "00000000000000000001"),
]


@pytest.mark.parametrize("member,value,back", GOOD_PARAMETERS,
                         ids=[f"{m}={v!r}"[:40] for m, v, _ in GOOD_PARAMETERS])
def test_good_parameter_values(jobsd: Jobsd, thing: str, member: str, value: Any,
                               back: Any) -> None:
    command_id = new_command(jobsd)
    status, kind, body = rest_call(jobsd.data_url, "POST", "/command-executions", {
        "targetArn": thing_arn(thing), "commandArn": command_arn(command_id),
        "parameters": {"p.$_-1": {member: value}}})
    assert status == 200, (kind, body)
    got = get_execution(jobsd, body["executionId"], thing_arn(thing))
    assert got["parameters"] == {"p.$_-1": {member: back}}


BAD_PARAMETERS: list[tuple[str, Any]] = [
    ("S empty", {"p": {"S": ""}}), ("S number", {"p": {"S": 5}}),
    ("B string", {"p": {"B": "true"}}), ("B number", {"p": {"B": 1}}),
    ("I too big", {"p": {"I": 2**31}}), ("I too small", {"p": {"I": -(2**31) - 1}}),
    ("I float", {"p": {"I": 1.5}}), ("I string", {"p": {"I": "5"}}), ("I bool", {"p": {"I": True}}),
    ("L too big", {"p": {"L": 2**63}}), ("L float", {"p": {"L": 1.0}}),
    ("L null", {"p": {"L": None}}),
    ("D string", {"p": {"D": "1.5"}}), ("D bool", {"p": {"D": False}}),
    ("D huge", {"p": {"D": 10**400}}),
    ("BIN empty", {"p": {"BIN": ""}}), ("BIN not base64", {"p": {"BIN": "!!!"}}),
    ("BIN number", {"p": {"BIN": 5}}),
    ("UL empty", {"p": {"UL": ""}}), ("UL above 2^64-1", {"p": {"UL": "18446744073709551616"}}),
    ("UL negative", {"p": {"UL": "-1"}}), ("UL 21 digits", {"p": {"UL": "1" * 21}}),
    ("UL number", {"p": {"UL": 5}}), ("UL decimal", {"p": {"UL": "1.5"}}),
    ("two members", {"p": {"S": "a", "I": 1}}), ("no member", {"p": {}}),
    ("unknown member", {"p": {"BOOL": True}}), ("value not an object", {"p": "a"}),
    ("bad name", {"a b": {"S": "x"}}), ("name too long", {"n" * 193: {"S": "x"}}),
    ("empty name", {"": {"S": "x"}}), ("empty map", {}), ("not a map", [{"S": "x"}]),
]


@pytest.mark.parametrize("case", BAD_PARAMETERS, ids=[c[0] for c in BAD_PARAMETERS])
def test_bad_parameter_values(jobsd: Jobsd, thing: str, case: tuple[str, Any]) -> None:
    command_id = new_command(jobsd)
    status, kind, body = rest_call(jobsd.data_url, "POST", "/command-executions", {
        "targetArn": thing_arn(thing), "commandArn": command_arn(command_id),
        "parameters": case[1]})
    assert (status, kind) == (400, "ValidationException"), body
    assert jobsd.iot.list_command_executions(
        targetArn=thing_arn(thing))["commandExecutions"] == []


def test_nan_and_infinity_are_not_doubles(jobsd: Jobsd, thing: str) -> None:
    command_id = new_command(jobsd)
    for token in (b"NaN", b"Infinity", b"-Infinity"):
        body = (b'{"targetArn": "%s", "commandArn": "%s", "parameters": {"p": {"D": %s}}}'
                % (thing_arn(thing).encode(), command_arn(command_id).encode(), token))
        status, kind, _ = rest_call(jobsd.data_url, "POST", "/command-executions", body)
        assert (status, kind) == (400, "ValidationException"), token


def test_mandatory_parameters(jobsd: Jobsd, thing: str) -> None:
    command_id = new_command(jobsd, mandatoryParameters=[
        {"name": "mode", "type": "STRING"},
        {"name": "delay", "type": "INTEGER", "defaultValue": {"I": 5}}])
    target = thing_arn(thing)
    with pytest.raises(ClientError) as err:
        start(jobsd, target, command_id)
    assert error_of(err) == ("ValidationException", 400)
    assert "mode" in err.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as err:
        start(jobsd, target, command_id, parameters={"mode": {"I": 1}})
    assert error_of(err) == ("ValidationException", 400)
    execution_id = start(jobsd, target, command_id,
                         parameters={"mode": {"S": "safe"}, "extra": {"B": True}})
    assert get_execution(jobsd, execution_id, target)["parameters"] == {
        "mode": {"S": "safe"}, "delay": {"I": 5}, "extra": {"B": True}}


def test_start_errors(jobsd: Jobsd, thing: str) -> None:
    data = unvalidated("iot-jobs-data", jobsd.data_url)
    command_id = new_command(jobsd)
    good = {"targetArn": thing_arn(thing), "commandArn": command_arn(command_id)}
    validation: list[dict[str, Any]] = [
        {"commandArn": good["commandArn"]},
        {"targetArn": good["targetArn"]},
        {**good, "targetArn": "not-an-arn"},
        {**good, "targetArn": f"{PREFIX}:thinggroup/g"},
        {**good, "targetArn": f"{PREFIX}:thing/bad name"},
        {**good, "targetArn": f"{PREFIX}:thing/" + "t" * 129},
        {**good, "targetArn": f"{PREFIX}:client/"},
        {**good, "targetArn": "a" * 2049},
        {**good, "commandArn": f"{PREFIX}:job/{command_id}"},
        {**good, "commandArn": f"{PREFIX}:command/bad.id"},
        {**good, "executionTimeoutSeconds": 0},
        {**good, "executionTimeoutSeconds": -1},
        {**good, "executionTimeoutSeconds": 43201},
        {**good, "executionTimeoutSeconds": "10"},
        {**good, "executionTimeoutSeconds": 1.5},
        {**good, "clientToken": ""},
        {**good, "clientToken": "has space"},
        {**good, "clientToken": "t" * 65},
        {**good, "clientToken": "ünï"},
    ]
    for body in validation:
        with pytest.raises(ClientError) as err:
            data.start_command_execution(**body)
        assert error_of(err) == ("ValidationException", 400), body
    for raw in (b"{not json", b"[]", b'"x"', b"\xff"):
        status, kind, _ = rest_call(jobsd.data_url, "POST", "/command-executions", raw)
        assert (status, kind) == (400, "ValidationException"), raw
    not_found = [
        {**good, "targetArn": thing_arn(unique("no-such-thing"))},
        {**good, "commandArn": command_arn(unique("no-such-command"))},
        {**good, "targetArn": f"arn:aws:iot:eu-west-1:{ACCOUNT}:thing/{thing}"},
        {**good, "commandArn": f"arn:aws:iot:{REGION}:999999999999:command/{command_id}"},
    ]
    for body in not_found:
        with pytest.raises(ClientError) as err:
            data.start_command_execution(**body)
        assert error_of(err) == ("ResourceNotFoundException", 404), body
    assert jobsd.iot.list_command_executions(targetArn=thing_arn(thing))["commandExecutions"] == []
    # a deprecated command refuses executions until it is restored
    jobsd.iot.update_command(commandId=command_id, deprecated=True)
    with pytest.raises(ClientError) as err:
        start(jobsd, good["targetArn"], command_id)
    assert error_of(err) == ("ValidationException", 400)
    jobsd.iot.update_command(commandId=command_id, deprecated=False)
    start(jobsd, good["targetArn"], command_id, executionTimeoutSeconds=43200)
    # so does one pending deletion
    assert jobsd.iot.delete_command(commandId=command_id)["statusCode"] == 202
    with pytest.raises(ClientError) as err:
        start(jobsd, good["targetArn"], command_id)
    assert error_of(err) == ("ValidationException", 400)


def test_client_token_idempotency(jobsd: Jobsd, device: CommandDevice) -> None:
    command_id = new_command(jobsd)
    target = thing_arn(device.name)
    token = unique("tok")
    first = start(jobsd, target, command_id, clientToken=token, parameters={"a": {"I": 1}})
    again = start(jobsd, target, command_id, clientToken=token, parameters={"a": {"I": 1}})
    assert again == first
    for different in ({"parameters": {"a": {"I": 2}}},
                      {"parameters": {"a": {"I": 1}}, "executionTimeoutSeconds": 99},
                      {"parameters": {"a": {"I": 1}}, "commandArn": command_arn(new_command(jobsd))}):
        body = {"targetArn": target, "commandArn": command_arn(command_id), "clientToken": token,
                **different}
        with pytest.raises(ClientError) as err:
            jobsd.data.start_command_execution(**body)
        assert error_of(err) == ("ConflictException", 409)
        assert err.value.response["resourceId"] == first
    # a fresh token is a fresh execution; its delivery comes after anything the retry sent
    later = start(jobsd, target, command_id, parameters={"a": {"I": 1}})
    assert later != first
    device.request(later)
    assert len(device.requests(first)) == 1  # the retry published nothing
    # without a timeout the documented default applies
    assert get_execution(jobsd, later, target)["executionTimeoutSeconds"] == 10


# -- device reports ------------------------------------------------------------------------------

def test_device_reports_and_terminal_is_final(jobsd: Jobsd, device: CommandDevice,
                                              events: Events) -> None:
    command_id = new_command(jobsd)
    target = thing_arn(device.name)
    execution_id = start(jobsd, target, command_id, executionTimeoutSeconds=60)
    device.request(execution_id)
    blob = base64.b64encode(b"\x01\x02\x03").decode()
    assert device.report(execution_id, {
        "status": "IN_PROGRESS",
        "statusReason": {"reasonCode": "STARTED", "reasonDescription": "working on it"},
        "result": {"progress": {"s": "50%"}, "ok": {"b": True}, "raw": {"bin": blob}},
        "executionId": execution_id, "deviceId": device.name,  # extra members are ignored
    }) == ("accepted", {"executionId": execution_id})
    got = get_execution(jobsd, execution_id, target)
    assert got["status"] == "IN_PROGRESS"
    assert got["statusReason"] == {"reasonCode": "STARTED", "reasonDescription": "working on it"}
    assert got["result"] == {"progress": {"S": "50%"}, "ok": {"B": True},
                             "raw": {"BIN": b"\x01\x02\x03"}}
    assert "completedAt" not in got
    assert "result" not in get_execution(jobsd, execution_id, target, includeResult=False)

    # a progress report keeps the status: accepted, no event
    assert device.report(execution_id, {"status": "IN_PROGRESS"})[0] == "accepted"
    assert device.report(execution_id, {"status": "SUCCEEDED", "result": {
        "stdout": {"s": "done"}}}) == ("accepted", {"executionId": execution_id})
    done = get_execution(jobsd, execution_id, target)
    assert done["status"] == "SUCCEEDED" and "statusReason" not in done
    assert done["result"] == {"stdout": {"S": "done"}}
    assert done["completedAt"] >= done["startedAt"]
    assert done["lastUpdatedAt"] == done["completedAt"]
    for status in ("FAILED", "IN_PROGRESS", "SUCCEEDED", "TIMED_OUT", "REJECTED"):
        outcome, body = device.report(execution_id, {"status": status})
        assert outcome == "rejected"
        assert body["error"] == "InvalidStateTransition" and body["executionId"] == execution_id
        assert body["errorMessage"] and "clientToken" not in body
    assert get_execution(jobsd, execution_id, target)["status"] == "SUCCEEDED"

    events.wait_status(execution_id, "SUCCEEDED")
    seen = events.of(execution_id)
    assert [t for t, _ in seen] == [f"$aws/events/commandExecution/{command_id}/{s}"
                                    for s in ("CREATED", "IN_PROGRESS", "SUCCEEDED")]
    in_progress = seen[1][1]
    assert in_progress == {"executionId": execution_id, "status": "IN_PROGRESS",
                           "statusReason": {"reasonCode": "STARTED",
                                            "reasonDescription": "working on it"},
                           "eventType": "COMMAND_EXECUTION", "commandArn": command_arn(command_id),
                           "targetArn": target, "timestamp": in_progress["timestamp"]}
    stamps = [body["timestamp"] for _, body in seen]
    assert all(isinstance(s, int) and s > 10**12 for s in stamps)  # milliseconds
    assert stamps == sorted(stamps)


@pytest.mark.parametrize("status", ["FAILED", "REJECTED", "TIMED_OUT"])
def test_device_can_end_a_created_execution(jobsd: Jobsd, device: CommandDevice,
                                            events: Events, status: str) -> None:
    execution_id = start(jobsd, thing_arn(device.name), new_command(jobsd))
    reason = {"reasonCode": "DEVICE_TOO_BUSY", "reasonDescription": ""}
    assert device.report(execution_id, {"status": status, "statusReason": reason})[0] == "accepted"
    got = get_execution(jobsd, execution_id, thing_arn(device.name))
    assert got["status"] == status and got["statusReason"] == reason and "completedAt" in got
    assert events.wait_status(execution_id, status)["statusReason"] == reason
    assert device.report(execution_id, {"status": "SUCCEEDED"})[1]["error"] == (
        "InvalidStateTransition")


def test_reports_for_unknown_or_foreign_executions(jobsd: Jobsd, broker: stack.Mosquitto,
                                                   device: CommandDevice) -> None:
    other_name = unique("other")
    jobsd.iot.create_thing(thingName=other_name)
    other = CommandDevice(broker.port, other_name)
    wire = Mqtt(broker.port, ["$aws/commands/#"])  # sees replies on any commands topic
    try:
        execution_id = start(jobsd, thing_arn(device.name), new_command(jobsd))
        # another thing reporting on its own topic for this execution: not its execution
        outcome, body = other.report(execution_id, {"status": "SUCCEEDED"})
        assert (outcome, body["error"]) == ("rejected", "ResourceNotFound")
        assert body["executionId"] == execution_id
        unknown = str(uuid.uuid4())
        outcome, body = device.report(unknown, {"status": "SUCCEEDED"})
        assert (outcome, body["error"]) == ("rejected", "ResourceNotFound")
        # the same execution id under the clients kind is not the thing's execution
        outcome, body = wire.report_on(
            f"$aws/commands/clients/{device.name}/executions/{execution_id}/response/json",
            {"status": "SUCCEEDED"})
        assert (outcome, body["error"]) == ("rejected", "ResourceNotFound")
        for bad in (f"$aws/commands/robots/{device.name}/executions/{execution_id}/response/json",
                    f"$aws/commands/things/{device.name}/executions/bad.id/response/json",
                    f"$aws/commands/things/bad name/executions/{execution_id}/response/json"):
            outcome, body = wire.report_on(bad, {"status": "SUCCEEDED"})
            assert (outcome, body["error"]) == ("rejected", "InvalidTopic"), bad
        # forged replies and other formats are not reports: no answer, no effect
        for topic in (f"{device.prefix}{execution_id}/response/accepted/json",
                      f"{device.prefix}{execution_id}/response/cbor",
                      f"{device.prefix}{execution_id}/response"):
            wire.publish(topic, b'{"status": "SUCCEEDED"}')
        assert get_execution(jobsd, execution_id, thing_arn(device.name))["status"] == "CREATED"
        assert device.report(execution_id, {"status": "SUCCEEDED"})[0] == "accepted"
        # in order on one connection: one reply per report, none for the rest (the forged
        # accepted/json is the wire's own publication, echoed by its `#` subscription)
        own = f"{device.prefix}{execution_id}/response"
        wire.wait_for(lambda m: m.topic == own + "/accepted/json" and json.loads(m.payload) == {
            "executionId": execution_id}, "the last reply, seen by the wire")
        replies = [m.topic for m in wire.matching(lambda m: m.topic.endswith(
            ("/accepted/json", "/rejected/json")))]
        assert replies == [
            f"$aws/commands/things/{other_name}/executions/{execution_id}/response/rejected/json",
            f"{device.prefix}{unknown}/response/rejected/json",
            f"$aws/commands/clients/{device.name}/executions/{execution_id}"
            "/response/rejected/json",
            f"$aws/commands/robots/{device.name}/executions/{execution_id}"
            "/response/rejected/json",
            f"{device.prefix}bad.id/response/rejected/json",
            f"$aws/commands/things/bad name/executions/{execution_id}/response/rejected/json",
            own + "/accepted/json", own + "/accepted/json"]
    finally:
        wire.close()
        other.close()


MALFORMED_REPORTS: list[tuple[str, Union[bytes, Any], str]] = [
    ("not JSON", b"{status: SUCCEEDED}", "InvalidJson"),
    ("not UTF-8", b"\xff\xfe", "InvalidJson"),
    ("empty", b"", "InvalidJson"),
    ("array", [], "InvalidRequest"),
    ("string", "SUCCEEDED", "InvalidRequest"),
    ("no status", {}, "InvalidRequest"),
    ("unknown status", {"status": "DONE"}, "InvalidRequest"),
    ("CREATED is the service's", {"status": "CREATED"}, "InvalidRequest"),
    ("lowercase status", {"status": "succeeded"}, "InvalidRequest"),
    ("status number", {"status": 1}, "InvalidRequest"),
    ("statusReason string", {"status": "FAILED", "statusReason": "x"}, "InvalidRequest"),
    ("statusReason without code", {"status": "FAILED", "statusReason": {}}, "InvalidRequest"),
    ("reasonCode lowercase", {"status": "FAILED", "statusReason": {"reasonCode": "busy"}},
     "InvalidRequest"),
    ("reasonCode empty", {"status": "FAILED", "statusReason": {"reasonCode": ""}},
     "InvalidRequest"),
    ("reasonCode 65", {"status": "FAILED", "statusReason": {"reasonCode": "A" * 65}},
     "InvalidRequest"),
    ("reasonCode number", {"status": "FAILED", "statusReason": {"reasonCode": 500}},
     "InvalidRequest"),
    ("reasonDescription 1025", {"status": "FAILED", "statusReason": {
        "reasonCode": "X", "reasonDescription": "d" * 1025}}, "InvalidRequest"),
    ("reasonDescription newline", {"status": "FAILED", "statusReason": {
        "reasonCode": "X", "reasonDescription": "a\nb"}}, "InvalidRequest"),
    ("reasonDescription number", {"status": "FAILED", "statusReason": {
        "reasonCode": "X", "reasonDescription": 5}}, "InvalidRequest"),
    ("result empty", {"status": "SUCCEEDED", "result": {}}, "InvalidRequest"),
    ("result list", {"status": "SUCCEEDED", "result": [{"s": "x"}]}, "InvalidRequest"),
    ("result plain value", {"status": "SUCCEEDED", "result": {"a": "v"}}, "InvalidRequest"),
    ("result s number", {"status": "SUCCEEDED", "result": {"a": {"s": 1}}}, "InvalidRequest"),
    ("result s empty", {"status": "SUCCEEDED", "result": {"a": {"s": ""}}}, "InvalidRequest"),
    ("result uppercase S", {"status": "SUCCEEDED", "result": {"a": {"S": "x"}}},
     "InvalidRequest"),
    ("result two members", {"status": "SUCCEEDED", "result": {"a": {"s": "x", "b": True}}},
     "InvalidRequest"),
    ("result b string", {"status": "SUCCEEDED", "result": {"a": {"b": "true"}}},
     "InvalidRequest"),
    ("result bin not base64", {"status": "SUCCEEDED", "result": {"a": {"bin": "!!"}}},
     "InvalidRequest"),
    ("result bin empty", {"status": "SUCCEEDED", "result": {"a": {"bin": ""}}},
     "InvalidRequest"),
    ("result bad name", {"status": "SUCCEEDED", "result": {"a b": {"s": "x"}}},
     "InvalidRequest"),
    ("result name 33", {"status": "SUCCEEDED", "result": {"n" * 33: {"s": "x"}}},
     "InvalidRequest"),
    ("deeply nested", b"[" * 100000 + b"]" * 100000, "InvalidJson"),
]


def test_malformed_reports_are_each_rejected(jobsd: Jobsd, device: CommandDevice) -> None:
    execution_id = start(jobsd, thing_arn(device.name), new_command(jobsd))
    for name, payload, code in MALFORMED_REPORTS:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        outcome, body = device.report(execution_id, data)
        assert (outcome, body.get("error")) == ("rejected", code), name
        assert body["executionId"] == execution_id and body["errorMessage"], name
    got = get_execution(jobsd, execution_id, thing_arn(device.name))
    assert got["status"] == "CREATED" and "result" not in got  # nothing was applied
    assert device.report(execution_id, {"status": "SUCCEEDED"})[0] == "accepted"


# -- timeouts ------------------------------------------------------------------------------------

def test_timed_out_then_settled_once_by_the_device(jobsd: Jobsd, device: CommandDevice,
                                                   events: Events) -> None:
    target = thing_arn(device.name)
    command_id = new_command(jobsd)
    finished = start(jobsd, target, command_id, executionTimeoutSeconds=2)
    assert device.report(finished, {"status": "SUCCEEDED"})[0] == "accepted"
    left = start(jobsd, target, command_id, executionTimeoutSeconds=2)
    assert device.report(left, {"status": "IN_PROGRESS"})[0] == "accepted"
    timed_out = events.wait_status(left, "TIMED_OUT")
    assert timed_out["statusReason"] == {"reasonCode": "$NO_RESPONSE_FROM_DEVICE"}
    got = get_execution(jobsd, left, target)
    assert got["status"] == "TIMED_OUT"
    assert got["statusReason"] == {"reasonCode": "$NO_RESPONSE_FROM_DEVICE"}
    assert "completedAt" not in got  # the service's timeout does not complete it
    # `finished` had an earlier deadline: had it timed out, its event would have come first
    assert [t.rsplit("/", 1)[1] for t, _ in events.of(finished)] == ["CREATED", "SUCCEEDED"]
    assert get_execution(jobsd, finished, target)["status"] == "SUCCEEDED"
    # after the service's TIMED_OUT the device may settle it once, with a terminal status
    outcome, body = device.report(left, {"status": "IN_PROGRESS"})
    assert (outcome, body["error"]) == ("rejected", "InvalidStateTransition")
    assert device.report(left, {"status": "SUCCEEDED", "result": {"late": {"b": True}}}) == (
        "accepted", {"executionId": left})
    settled = get_execution(jobsd, left, target)
    assert settled["status"] == "SUCCEEDED" and "completedAt" in settled
    assert "statusReason" not in settled and settled["result"] == {"late": {"B": True}}
    events.wait_status(left, "SUCCEEDED")
    outcome, body = device.report(left, {"status": "FAILED"})
    assert (outcome, body["error"]) == ("rejected", "InvalidStateTransition")


def test_device_confirms_a_timeout(jobsd: Jobsd, device: CommandDevice, events: Events) -> None:
    target = thing_arn(device.name)
    execution_id = start(jobsd, target, new_command(jobsd), executionTimeoutSeconds=1)
    events.wait_status(execution_id, "TIMED_OUT")
    reason = {"reasonCode": "DEVICE_TIMEOUT", "reasonDescription": "took too long"}
    assert device.report(execution_id, {"status": "TIMED_OUT", "statusReason": reason})[0] == (
        "accepted")
    got = get_execution(jobsd, execution_id, target)
    assert got["status"] == "TIMED_OUT" and got["statusReason"] == reason
    assert "completedAt" in got
    outcome, body = device.report(execution_id, {"status": "SUCCEEDED"})
    assert (outcome, body["error"]) == ("rejected", "InvalidStateTransition")


def test_timeout_survives_a_restart(tmp_path: Path, mosquitto: stack.Mosquitto) -> None:
    db = str(tmp_path / "jobs.db")
    first = Jobsd(str(tmp_path), mosquitto.broker, db=db, log_name="jobsd1.log")
    second: Optional[Jobsd] = None
    watcher = Events(mosquitto.port)
    try:
        first.iot.create_thing(thingName="restart-thing")
        command_id = new_command(first)
        early = start(first, thing_arn("restart-thing"), command_id, executionTimeoutSeconds=1)
        late = start(first, thing_arn("restart-thing"), command_id, executionTimeoutSeconds=5)
        watcher.wait_status(late, "CREATED")
        assert first.stop() == 0
        with sqlite3.connect(db) as conn:
            deadlines = dict(conn.execute(
                "SELECT execution_id, timeout_at FROM command_executions"))
            created = dict(conn.execute("SELECT execution_id, created_at FROM command_executions"))
        assert deadlines[early] == pytest.approx(created[early] + 1)  # absolute deadlines
        assert deadlines[late] == pytest.approx(created[late] + 5)
        stack.wait_until(lambda: time.time() > deadlines[early] + 0.1, 5,
                         "the early deadline to pass while jobsd is down")
        assert watcher.of(early)[-1][1]["status"] == "CREATED"  # nobody timed it out
        second = Jobsd(str(tmp_path), mosquitto.broker, db=db, log_name="jobsd2.log")
        # the deadline that passed while jobsd was down fires after the start, the other on its own
        watcher.wait_status(early, "TIMED_OUT")
        watcher.wait_status(late, "TIMED_OUT")
        for execution_id in (early, late):
            got = get_execution(second, execution_id, thing_arn("restart-thing"))
            assert got["status"] == "TIMED_OUT"
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT COUNT(*) FROM command_executions WHERE timeout_at IS NOT"
                                " NULL").fetchone()[0] == 0
    finally:
        watcher.close()
        if second is not None:
            second.stop()
        first.stop()


def test_command_deletion_windows(tmp_path: Path, mosquitto: stack.Mosquitto) -> None:
    """DeleteCommand: 204 and gone at once for a command deprecated longer than 12 h; a pending
    deletion is removed for good when its window ends, also across a restart. The 12 hours are
    moved into the past in the database while jobsd is stopped."""
    db = str(tmp_path / "jobs.db")
    first = Jobsd(str(tmp_path), mosquitto.broker, db=db, log_name="jobsd1.log")
    second: Optional[Jobsd] = None
    try:
        old = new_command(first)
        first.iot.update_command(commandId=old, deprecated=True)
        pending = new_command(first)
        assert first.iot.delete_command(commandId=pending)["statusCode"] == 202
        target = thing_arn("t-del")
        first.iot.create_thing(thingName="t-del")
        kept = start(first, target, new_command(first))
        assert first.stop() == 0
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE commands SET deprecated_at = deprecated_at - 43201"
                         " WHERE command_id=?", (old,))
            conn.execute("UPDATE commands SET delete_at = ? WHERE command_id=?",
                         (time.time() - 1, pending))
        second = Jobsd(str(tmp_path), mosquitto.broker, db=db, log_name="jobsd2.log")

        def gone(command_id: str) -> bool:
            try:
                second.iot.get_command(commandId=command_id)
            except ClientError as err:
                return err.response["Error"]["Code"] == "ResourceNotFoundException"
            return False

        stack.wait_until(lambda: gone(pending), 5, "the due pending deletion")
        assert second.iot.get_command(commandId=old)["deprecated"] is True
        deleted = second.iot.delete_command(commandId=old)
        assert deleted["statusCode"] == 204 and deleted["ResponseMetadata"]["HTTPStatusCode"] == 204
        assert gone(old)
        # executions outlive their command
        assert get_execution(second, kept, target)["status"] in ("CREATED", "TIMED_OUT")
    finally:
        if second is not None:
            second.stop()
        first.stop()


# -- executions on the control plane -----------------------------------------------------------

def test_list_command_executions(jobsd: Jobsd, device: CommandDevice) -> None:
    iot = jobsd.iot
    target = thing_arn(device.name)
    command_a, command_b = new_command(jobsd), new_command(jobsd)
    a = [start(jobsd, target, command_a) for _ in range(3)]
    b = start(jobsd, target, command_b)
    assert device.report(a[1], {"status": "SUCCEEDED"})[0] == "accepted"

    def ids(**kw: Any) -> list[str]:
        out, token = [], None
        while True:
            page = iot.list_command_executions(maxResults=2, **kw,
                                               **({"nextToken": token} if token else {}))
            assert len(page["commandExecutions"]) <= 2
            out += [e["executionId"] for e in page["commandExecutions"]]
            token = page.get("nextToken")
            if not token:
                return out

    assert ids(targetArn=target) == [b, a[2], a[1], a[0]]  # newest first by default
    assert ids(targetArn=target, sortOrder="ASCENDING") == [a[0], a[1], a[2], b]
    assert ids(commandArn=command_arn(command_a), sortOrder="ASCENDING") == a
    assert ids(targetArn=target, status="SUCCEEDED") == [a[1]]
    assert ids(targetArn=target, status="CREATED", sortOrder="ASCENDING") == [a[0], a[2], b]
    assert ids(targetArn=target, namespace="AWS-IoT-FleetWise") == []
    assert set(ids(status="SUCCEEDED")) >= {a[1]}
    now = datetime.datetime.now(datetime.UTC)
    hour = datetime.timedelta(hours=1)
    fmt = "%Y-%m-%dT%H:%M"
    assert ids(targetArn=target, startedTimeFilter={"after": (now - hour).strftime(fmt)},
               sortOrder="ASCENDING") == [a[0], a[1], a[2], b]
    assert ids(targetArn=target, startedTimeFilter={"before": (now - hour).strftime(fmt)}) == []
    assert ids(targetArn=target, completedTimeFilter={"after": (now - hour).strftime(fmt)}) == [
        a[1]]
    summary = iot.list_command_executions(commandArn=command_arn(command_b))["commandExecutions"]
    assert len(summary) == 1
    assert set(summary[0]) == {"commandArn", "executionId", "targetArn", "status", "createdAt",
                               "startedAt"}
    assert summary[0]["targetArn"] == target and summary[0]["status"] == "CREATED"
    raw = unvalidated("iot", jobsd.control_url)
    for bad in ({"maxResults": 0}, {"maxResults": 101}, {"nextToken": "x"},
                {"targetArn": target, "commandArn": command_arn(command_a)}):
        with pytest.raises(ClientError) as err:
            raw.list_command_executions(**bad)
        assert error_of(err) == ("ValidationException", 400), bad


def test_get_and_delete_command_execution(jobsd: Jobsd, device: CommandDevice) -> None:
    iot = jobsd.iot
    target = thing_arn(device.name)
    command_id = new_command(jobsd)
    token = unique("tok")
    execution_id = start(jobsd, target, command_id, clientToken=token)
    with pytest.raises(ClientError) as err:
        get_execution(jobsd, execution_id, thing_arn(unique("someone-else")))
    assert error_of(err) == ("ResourceNotFoundException", 404)
    with pytest.raises(ClientError) as err:
        get_execution(jobsd, str(uuid.uuid4()), target)
    assert error_of(err) == ("ResourceNotFoundException", 404)
    with pytest.raises(ClientError) as err:
        iot.delete_command_execution(executionId=execution_id, targetArn=target)
    assert error_of(err) == ("ConflictException", 409)
    assert err.value.response["resourceId"] == execution_id
    assert device.report(execution_id, {"status": "REJECTED"})[0] == "accepted"
    out = iot.delete_command_execution(executionId=execution_id, targetArn=target)
    assert out["ResponseMetadata"]["HTTPStatusCode"] == 200
    with pytest.raises(ClientError) as err:
        get_execution(jobsd, execution_id, target)
    assert error_of(err) == ("ResourceNotFoundException", 404)
    iot.delete_command_execution(executionId=execution_id, targetArn=target)  # idempotent
    # a report for a deleted execution finds nothing
    outcome, body = device.report(execution_id, {"status": "SUCCEEDED"})
    assert (outcome, body["error"]) == ("rejected", "ResourceNotFound")
    # the token is free again once its execution is gone
    assert start(jobsd, target, command_id, clientToken=token) != execution_id


# -- fuzz ----------------------------------------------------------------------------------------

SEED = 0xC0FFEE
FUZZ_STARTS = 150
FUZZ_REPORTS = 150
START_ANSWERS = {(200, ""), (400, "ValidationException"), (404, "ResourceNotFoundException"),
                 (409, "ConflictException")}
SCALARS: list[Any] = [None, True, False, 0, 1, -1, 10, 43200, 43201, 2**31, 2**63, 2**64, 1.5,
                      1e308, "", "x", "SUCCEEDED", "IN_PROGRESS", "\u0000", "ü" * 70, "A" * 65,
                      "AAEC", "!!", "18446744073709551616", [], {}]


def _rand(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 2 or roll < 0.6:
        return rng.choice(SCALARS)
    if roll < 0.8:
        return [_rand(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["S", "B", "I", "L", "D", "BIN", "UL", "s", "b", "bin", "x", ""]):
            _rand(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def fuzz_start_body(rng: random.Random, good: dict[str, Any]) -> bytes:
    roll = rng.random()
    if roll < 0.08:
        return rng.choice([b"", b"{", b"null", b"[]", b"\xff\xfe", b'{"a": NaN}', b"1e999"])
    body = {k: v for k, v in good.items() if rng.random() < 0.85}
    for name in rng.sample(["targetArn", "commandArn", "parameters", "executionTimeoutSeconds",
                            "clientToken", "junk"], rng.randint(1, 3)):
        if name == "parameters" and rng.random() < 0.6:
            body[name] = {rng.choice(["p", "a.b", "$x", "bad key", ""]): _rand(rng, 1)
                          for _ in range(rng.randint(0, 3))}
        elif name in ("targetArn", "commandArn") and rng.random() < 0.5:
            kind = rng.choice(["thing", "client", "command", "job", "thinggroup"])
            body[name] = f"arn:aws:iot:{rng.choice([REGION, 'x'])}:{ACCOUNT}:{kind}/" + \
                rng.choice(["fz", "fz-thing", "a b", "", "x" * 130, "fz-cmd"])
        else:
            body[name] = _rand(rng)
    return json.dumps(body).encode()


def fuzz_report(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.1:
        return rng.choice([b"", b"{", b"\xff", b"null", b"[" * 5000, b'{"status": NaN}'])
    body: dict[str, Any] = {}
    if rng.random() < 0.8:
        body["status"] = rng.choice(["IN_PROGRESS", "SUCCEEDED", "FAILED", "CREATED", "done",
                                     None, 3])
    if rng.random() < 0.5:
        body["statusReason"] = rng.choice([_rand(rng), {"reasonCode": _rand(rng)},
                                           {"reasonCode": "OK", "reasonDescription": _rand(rng)}])
    if rng.random() < 0.5:
        body["result"] = rng.choice([_rand(rng), {"r": _rand(rng, 1)},
                                     {rng.choice(["r", "bad name", "x" * 40]): {"s": "v"}}])
    return json.dumps(body).encode()


def test_fuzz_start_and_reports(jobsd: Jobsd, device: CommandDevice) -> None:
    rng = random.Random(SEED)
    command_id = new_command(jobsd)
    good = {"targetArn": thing_arn(device.name), "commandArn": command_arn(command_id),
            "parameters": {"p": {"S": "v"}}, "executionTimeoutSeconds": 600,
            "clientToken": "fuzz-token"}
    answers: dict[tuple[int, str], int] = {}
    for _ in range(FUZZ_STARTS):
        body = fuzz_start_body(rng, good)
        status, kind, reply = rest_call(jobsd.data_url, "POST", "/command-executions", body)
        assert (status, kind) in START_ANSWERS, (body[:300], status, kind, reply)
        if status == 200:
            assert EXECUTION_ID.fullmatch(reply["executionId"])
        else:
            assert reply["message"]
        answers[(status, kind)] = answers.get((status, kind), 0) + 1
    assert answers.get((400, "ValidationException"), 0) > FUZZ_STARTS // 3, answers

    execution_id = start(jobsd, thing_arn(device.name), command_id, executionTimeoutSeconds=600)
    for i in range(FUZZ_REPORTS):
        payload = fuzz_report(rng)
        target = execution_id if rng.random() < 0.8 else rng.choice(
            [str(uuid.uuid4()), "x" * 64])
        outcome, body = device.report(target, payload)
        assert body["executionId"] == target, (i, payload)
        if outcome == "rejected":
            assert body["error"] in ERROR_CODES - {"InternalError"}, (payload, body)
            assert isinstance(body["errorMessage"], str) and body["errorMessage"]
        else:
            assert body == {"executionId": target}
    assert jobsd.proc.alive()
    with open(jobsd.proc.log_path, errors="replace") as f:
        assert "Traceback" not in f.read()
    # still serving: a new execution is delivered and completes
    fresh = start(jobsd, thing_arn(device.name), command_id)
    device.request(fresh)
    assert device.report(fresh, {"status": "SUCCEEDED"})[0] == "accepted"
