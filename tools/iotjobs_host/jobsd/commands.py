"""AWS IoT commands: names, limits, request validation, topics and wire shapes.

Pure functions, no I/O and no state; `Service` holds the behaviour (service.py), as rules.py and
views.py do for jobs. Sources: botocore's `iot` and `iot-jobs-data` models (shapes, limits),
PROTOCOL.md 1.11 / 2.5 / 3.1 (topics, update payload, states), and the AWS developer guide page
"Start and monitor command executions" for what the models leave open:

* `executionTimeoutSeconds` defaults to 10 s and is at most 12 hours;
* a TIMED_OUT set by the service (reasonCode `$NO_RESPONSE_FROM_DEVICE`) is not final: the
  device may still report SUCCEEDED, FAILED, REJECTED or TIMED_OUT once, and then it is; every
  other terminal status is final at once;
* `completedAt` is set when the device reports a terminal status, not by the service's timeout;
  `startedAt` is the creation time (the guide's ListCommandExecutions example);
* `result` entries use lowercase `s` / `b` / `bin` on MQTT; the control plane spells them
  `S` / `B` / `BIN` (the model's CommandExecutionResult).

Request (REST) failures are `ApiError` ValidationException 400; device (MQTT) failures are
`DeviceError` with the jobs codes (PROTOCOL.md 1.11, A12).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Optional

from .rules import MAX_LONG, MIN_LONG, ApiError, DeviceError, is_int

NAMESPACE = "AWS-IoT"
FLEETWISE = "AWS-IoT-FleetWise"
NAMESPACES = (NAMESPACE, FLEETWISE)

MAX_COMMAND_ID = 64
MAX_DISPLAY_NAME = 64
MAX_DESCRIPTION = 2028
MAX_PARAMETER_NAME = 192
MAX_PAYLOAD = 128 * 1024        # an MQTT message on AWS IoT Core (PROTOCOL.md 4)
MAX_ARN = 2048
MAX_CLIENT_TOKEN = 64
MAX_REASON_CODE = 64
MAX_REASON_DESCRIPTION = 1024
MAX_RESULT_NAME = 32
MAX_TAG_KEY, MAX_TAG_VALUE = 128, 256
MAX_RESULTS = 100               # ListCommands / ListCommandExecutions maxResults
DEFAULT_RESULTS = 25            # "By default, the API returns up to a maximum of 25 results"

DEFAULT_TIMEOUT = 10            # seconds, when StartCommandExecution gives none (AWS guide)
MAX_TIMEOUT = 12 * 3600         # "a maximum value of 12 hours" (AWS guide)
DELETION_WINDOW = MAX_TIMEOUT   # DeleteCommand: how long a deprecated command must have been so
                                # for an immediate delete (204); otherwise pending deletion (202)

NO_RESPONSE = "$NO_RESPONSE_FROM_DEVICE"  # reasonCode of a service-side TIMED_OUT

STATUSES = ("CREATED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT")
DEVICE_STATUSES = ("IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT")
TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT")

_ID_RE = re.compile(r"[a-zA-Z0-9_-]{1,%d}" % MAX_COMMAND_ID)  # command and execution ids
_NAME_RE = re.compile(r"[a-zA-Z0-9:_-]{1,128}")                # thing names and client ids
_PARAMETER_RE = re.compile(r"[.$a-zA-Z0-9_-]{1,%d}" % MAX_PARAMETER_NAME)
_TOKEN_RE = re.compile(r"[\x21-\x7E]{1,%d}" % MAX_CLIENT_TOKEN)
_REASON_CODE_RE = re.compile(r"[A-Z0-9_-]{1,%d}" % MAX_REASON_CODE)
_RESULT_NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,%d}" % MAX_RESULT_NAME)
_UL_RE = re.compile(r"[0-9]{1,20}")
_MIME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_ARN_RE = re.compile(r"arn:aws:iot:([^:/]*):([^:/]*):(thing|client|command)/(.*)", re.DOTALL)

MIN_INT, MAX_INT = -(2**31), 2**31 - 1
MAX_UNSIGNED_LONG = 2**64 - 1

# CommandParameter.type -> the CommandParameterValue member it takes
PARAMETER_TYPES = {"STRING": "S", "INTEGER": "I", "DOUBLE": "D", "LONG": "L",
                   "UNSIGNEDLONG": "UL", "BOOLEAN": "B", "BINARY": "BIN"}


def validation(message: str) -> ApiError:
    return ApiError("ValidationException", 400, message)


def valid_id(value: Any) -> bool:
    """Command ids and execution ids: [a-zA-Z0-9_-]{1,64}."""
    return isinstance(value, str) and bool(_ID_RE.fullmatch(value))


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch).startswith("C") for ch in text)


def _text(body: dict[str, Any], name: str, limit: int) -> Optional[str]:
    """An optional `[^\\p{C}]*` string of at most `limit` characters."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit or _has_control(value):
        raise validation(f"{name} must be a string of at most {limit} characters without"
                         " control characters")
    return value


def _base64(value: Any, what: str) -> bytes:
    """A non-empty base64 blob as restJson1 carries it."""
    if not isinstance(value, str):
        raise validation(f"{what} must be a base64 string")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise validation(f"{what} is not valid base64") from None
    if not data:
        raise validation(f"{what} must not be empty")
    return data


# -- parameters (CreateCommand mandatoryParameters, StartCommandExecution parameters) -----------

def parameter_value(name: str, value: Any) -> dict[str, Any]:
    """A CommandParameterValue: exactly one typed member, checked against its type; returned in
    its canonical REST spelling (BIN re-encoded)."""
    if not isinstance(value, dict) or len(value) != 1:
        raise validation(f"parameter {name!r} must have exactly one of S, B, I, L, D, BIN, UL")
    ((kind, v),) = value.items()
    if kind == "S":
        if not isinstance(v, str) or not v:
            raise validation(f"parameter {name!r}: S must be a non-empty string")
    elif kind == "B":
        if not isinstance(v, bool):
            raise validation(f"parameter {name!r}: B must be a boolean")
    elif kind == "I":
        if not is_int(v) or not MIN_INT <= v <= MAX_INT:
            raise validation(f"parameter {name!r}: I must be a 32-bit integer")
    elif kind == "L":
        if not is_int(v) or not MIN_LONG <= v <= MAX_LONG:
            raise validation(f"parameter {name!r}: L must be a 64-bit integer")
    elif kind == "D":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise validation(f"parameter {name!r}: D must be a number")
        try:
            finite = math.isfinite(float(v))
        except OverflowError:
            finite = False
        if not finite:
            raise validation(f"parameter {name!r}: D must be a finite double")
    elif kind == "BIN":
        v = base64.b64encode(_base64(v, f"parameter {name!r}: BIN")).decode()
    elif kind == "UL":
        if not isinstance(v, str) or not _UL_RE.fullmatch(v) or int(v) > MAX_UNSIGNED_LONG:
            raise validation(f"parameter {name!r}: UL must be 1..20 decimal digits"
                             f" not above {MAX_UNSIGNED_LONG}")
    else:
        raise validation(f"parameter {name!r}: unknown member {kind[:20]!r}; use one of S, B,"
                         " I, L, D, BIN, UL")
    return {kind: v}


def _parameter_name(name: Any) -> str:
    if not isinstance(name, str) or not _PARAMETER_RE.fullmatch(name):
        raise validation(f"parameter name {str(name)[:200]!r} must match"
                         f" ^[.$a-zA-Z0-9_-]+$, 1..{MAX_PARAMETER_NAME} characters")
    return name


def parse_parameters(value: Any) -> Optional[dict[str, dict[str, Any]]]:
    """StartCommandExecution `parameters`: a map of at least one entry, or None."""
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise validation("parameters must be a map with at least one entry")
    return {_parameter_name(k): parameter_value(k, v) for k, v in value.items()}


def parse_mandatory(value: Any) -> Optional[list[dict[str, Any]]]:
    """CreateCommand `mandatoryParameters`: names, optional type, value / defaultValue (checked
    against the type), description; valueConditions are kept as given but not evaluated."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise validation("mandatoryParameters must be a list with at least one entry")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for item in value:
        if not isinstance(item, dict):
            raise validation("each mandatoryParameters entry must be an object")
        name = _parameter_name(item.get("name"))
        if name in seen:
            raise validation(f"parameter {name!r} is listed twice")
        seen.add(name)
        entry: dict[str, Any] = {"name": name}
        kind = item.get("type")
        if kind is not None:
            if kind not in PARAMETER_TYPES:
                raise validation(f"parameter {name!r}: type must be one of"
                                 f" {', '.join(PARAMETER_TYPES)}")
            entry["type"] = kind
        for member in ("value", "defaultValue"):
            if item.get(member) is not None:
                v = parameter_value(name, item[member])
                if kind is not None and next(iter(v)) != PARAMETER_TYPES[kind]:
                    raise validation(f"parameter {name!r}: {member} does not match type {kind}")
                entry[member] = v
        conditions = item.get("valueConditions")
        if conditions is not None:
            if not isinstance(conditions, list) or not conditions:
                raise validation(f"parameter {name!r}: valueConditions must be a non-empty list")
            entry["valueConditions"] = conditions
        description = _text(item, "description", MAX_DESCRIPTION)
        if description is not None:
            entry["description"] = description
        out.append(entry)
    return out


def apply_mandatory(mandatory: Optional[list[dict[str, Any]]],
                    given: Optional[dict[str, dict[str, Any]]]
                    ) -> Optional[dict[str, dict[str, Any]]]:
    """The parameters an execution runs with: the given ones, plus the value / defaultValue of
    each mandatory parameter left out; a mandatory parameter with neither, or a given value of
    another type than the command declares, is a ValidationException."""
    params = dict(given or {})
    for entry in mandatory or []:
        name = entry["name"]
        if name in params:
            kind = entry.get("type")
            if kind is not None and next(iter(params[name])) != PARAMETER_TYPES[kind]:
                raise validation(f"parameter {name!r} must be of type {kind}"
                                 f" ({PARAMETER_TYPES[kind]})")
            continue
        fallback = entry.get("value") or entry.get("defaultValue")
        if fallback is None:
            raise validation(f"mandatory parameter {name!r} is missing")
        params[name] = fallback
    return params or None


# -- CreateCommand / UpdateCommand -----------------------------------------------------------

@dataclass
class CommandSpec:
    namespace: str
    display_name: Optional[str]
    description: Optional[str]
    content: bytes
    content_type: Optional[str]
    mandatory: Optional[list[dict[str, Any]]]
    tags: list[dict[str, str]]


def _tags(value: Any) -> list[dict[str, str]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise validation("tags must be a list of Key/Value objects")
    out = []
    for tag in value:
        if not isinstance(tag, dict):
            raise validation("tags must be a list of Key/Value objects")
        key, val = tag.get("Key"), tag.get("Value", "")
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_TAG_KEY:
            raise validation(f"tag Key must be 1..{MAX_TAG_KEY} characters")
        if not isinstance(val, str) or len(val) > MAX_TAG_VALUE:
            raise validation(f"tag Value must be at most {MAX_TAG_VALUE} characters")
        out.append({"Key": key, "Value": val})
    return out


def parse_create(command_id: str, body: dict[str, Any]) -> CommandSpec:
    if not valid_id(command_id):
        raise validation("commandId must match [a-zA-Z0-9_-]{1,64}")
    namespace = body.get("namespace", NAMESPACE)
    if namespace not in NAMESPACES:
        raise validation(f"namespace must be one of {', '.join(NAMESPACES)}")
    if namespace == FLEETWISE:
        raise validation("the AWS-IoT-FleetWise namespace is not supported by jobsd")
    if body.get("roleArn") is not None:
        raise validation("roleArn is only used with the AWS-IoT-FleetWise namespace")
    for unsupported in ("payloadTemplate", "preprocessor"):
        if body.get(unsupported) is not None:
            raise validation(f"{unsupported} (dynamic commands) is not supported by jobsd;"
                             " send a static payload")
    payload = body.get("payload")
    if not isinstance(payload, dict):
        raise validation("payload is required for a command in the AWS-IoT namespace")
    content = _base64(payload.get("content"), "payload.content")
    if len(content) > MAX_PAYLOAD:
        raise validation(f"payload.content is larger than {MAX_PAYLOAD} bytes")
    content_type = payload.get("contentType")
    if content_type is not None and (not isinstance(content_type, str) or not _MIME_RE.fullmatch(
            content_type.split(";", 1)[0].strip())):
        raise validation("payload.contentType must be a MIME type such as application/json")
    return CommandSpec(namespace=namespace,
                       display_name=_text(body, "displayName", MAX_DISPLAY_NAME),
                       description=_text(body, "description", MAX_DESCRIPTION),
                       content=content, content_type=content_type,
                       mandatory=parse_mandatory(body.get("mandatoryParameters")),
                       tags=_tags(body.get("tags")))


@dataclass
class CommandChange:
    display_name: Optional[str]
    description: Optional[str]
    deprecated: Optional[bool]


def parse_update_command(body: dict[str, Any]) -> CommandChange:
    deprecated = body.get("deprecated")
    if deprecated is not None and not isinstance(deprecated, bool):
        raise validation("deprecated must be a boolean")
    return CommandChange(_text(body, "displayName", MAX_DISPLAY_NAME),
                         _text(body, "description", MAX_DESCRIPTION), deprecated)


# -- ARNs ------------------------------------------------------------------------------------

def parse_arn(value: Any, what: str, kinds: tuple[str, ...]) -> tuple[str, str, str, str]:
    """(region, account, kind, name) of a thing, client or command ARN."""
    if not isinstance(value, str) or not value or len(value) > MAX_ARN:
        raise validation(f"{what} must be an ARN of at most {MAX_ARN} characters")
    m = _ARN_RE.fullmatch(value)
    if m is None or m.group(3) not in kinds:
        shapes = " or ".join(f"arn:aws:iot:<region>:<account>:{k}/<name>" for k in kinds)
        raise validation(f"{what} must look like {shapes}")
    region, account, kind, name = m.groups()
    ok = valid_id(name) if kind == "command" else bool(_NAME_RE.fullmatch(name))
    if not ok:
        raise validation(f"{what} names an invalid {kind} {name[:140]!r}")
    return region, account, kind, name


# -- StartCommandExecution -------------------------------------------------------------------

@dataclass
class StartRequest:
    target: tuple[str, str, str, str]     # region, account, "thing" | "client", name
    command: tuple[str, str, str, str]    # region, account, "command", command id
    parameters: Optional[dict[str, dict[str, Any]]]
    timeout: int
    client_token: Optional[str]

    def key(self) -> str:
        """The request as idempotency compares it: same token, same key -> same execution."""
        return json.dumps({"targetArn": self.target, "commandArn": self.command,
                           "parameters": self.parameters, "timeout": self.timeout},
                          sort_keys=True, separators=(",", ":"))


def parse_start(body: dict[str, Any]) -> StartRequest:
    target = parse_arn(body.get("targetArn"), "targetArn", ("thing", "client"))
    command = parse_arn(body.get("commandArn"), "commandArn", ("command",))
    timeout = body.get("executionTimeoutSeconds")
    if timeout is None:
        timeout = DEFAULT_TIMEOUT
    elif not is_int(timeout) or not 1 <= timeout <= MAX_TIMEOUT:
        raise validation(f"executionTimeoutSeconds must be an integer in 1..{MAX_TIMEOUT}")
    token = body.get("clientToken")
    if token is not None and (not isinstance(token, str) or not _TOKEN_RE.fullmatch(token)):
        raise validation(f"clientToken must be 1..{MAX_CLIENT_TOKEN} printable ASCII characters"
                         " without spaces")
    return StartRequest(target, command, parse_parameters(body.get("parameters")), timeout,
                        token)


# -- ListCommandExecutions time filters ------------------------------------------------------

def parse_time_filter(value: Any, what: str) -> tuple[Optional[float], Optional[float]]:
    """(after, before) as epoch seconds from a TimeFilter of `yyyy-MM-dd'T'HH:mm` strings (UTC;
    any ISO 8601 date-time is accepted too)."""
    from datetime import UTC, datetime

    if not isinstance(value, dict):
        raise validation(f"{what} must be an object with after and/or before")
    out: list[Optional[float]] = []
    for bound in ("after", "before"):
        text = value.get(bound)
        if text is None:
            out.append(None)
            continue
        if not isinstance(text, str) or not 1 <= len(text) <= 64:
            raise validation(f"{what}.{bound} must be a date-time such as 2024-11-01T03:00")
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise validation(f"{what}.{bound} must be a date-time such as 2024-11-01T03:00"
                             ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        out.append(when.timestamp())
    return out[0], out[1]


# -- UpdateCommandExecution (MQTT) -----------------------------------------------------------

@dataclass
class CommandUpdate:
    status: str
    status_reason: Optional[dict[str, str]]
    result: Optional[dict[str, dict[str, Any]]]   # REST spelling (S, B, BIN)


def _status_reason(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise DeviceError("InvalidRequest", "statusReason must be an object")
    code = value.get("reasonCode")
    if not isinstance(code, str) or not _REASON_CODE_RE.fullmatch(code):
        raise DeviceError("InvalidRequest", "statusReason.reasonCode is required and must match"
                                            f" [A-Z0-9_-]+, at most {MAX_REASON_CODE} characters")
    out = {"reasonCode": code}
    description = value.get("reasonDescription")
    if description is not None:
        if (not isinstance(description, str) or len(description) > MAX_REASON_DESCRIPTION
                or _has_control(description)):
            raise DeviceError("InvalidRequest",
                              "statusReason.reasonDescription must be a string of at most"
                              f" {MAX_REASON_DESCRIPTION} characters without control characters")
        out["reasonDescription"] = description
    return out


def _result(value: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict) or not value:
        raise DeviceError("InvalidRequest", "result must be an object with at least 1 entry")
    out: dict[str, dict[str, Any]] = {}
    for name, item in value.items():
        if not _RESULT_NAME_RE.fullmatch(name):
            raise DeviceError("InvalidRequest", f"result name {name[:40]!r} must match"
                                                f" [a-zA-Z0-9_-]{{1,{MAX_RESULT_NAME}}}")
        if not isinstance(item, dict) or len(item) != 1:
            raise DeviceError("InvalidRequest",
                              f"result {name!r} must have exactly one of s, b, bin")
        ((kind, v),) = item.items()
        if kind == "s" and isinstance(v, str) and v:
            out[name] = {"S": v}
        elif kind == "b" and isinstance(v, bool):
            out[name] = {"B": v}
        elif kind == "bin" and isinstance(v, str):
            try:
                data = base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError):
                data = b""
            if not data:
                raise DeviceError("InvalidRequest",
                                  f"result {name!r}: bin must be non-empty base64")
            out[name] = {"BIN": base64.b64encode(data).decode()}
        else:
            raise DeviceError("InvalidRequest",
                              f"result {name!r}: use s (non-empty string), b (boolean) or bin"
                              " (base64 string), lowercase")
    return out


def parse_update(body: Any) -> CommandUpdate:
    """The device's status report. Members other than status, statusReason and result are
    ignored (the AWS guide's own example carries deviceId and executionId)."""
    if not isinstance(body, dict):
        raise DeviceError("InvalidRequest", "Payload must be a JSON object")
    status = body.get("status")
    if status is None:
        raise DeviceError("InvalidRequest", "status is required")
    if not isinstance(status, str) or status not in DEVICE_STATUSES:
        raise DeviceError("InvalidRequest", "status must be one of " + ", ".join(DEVICE_STATUSES))
    reason = body.get("statusReason")
    result = body.get("result")
    return CommandUpdate(status, None if reason is None else _status_reason(reason),
                         None if result is None else _result(result))


# -- topics ----------------------------------------------------------------------------------

RESPONSE_SUBSCRIPTION = "$aws/commands/+/+/executions/+/response/json"
DEVICE_KINDS = {"thing": "things", "client": "clients"}   # target kind -> topic segment


def request_topic(kind: str, name: str, execution_id: str, content_type: Optional[str]) -> str:
    """Where the payload goes: `/request/json`, `/request/cbor`, or `/request` for any other
    (or no) content type (PROTOCOL.md 1.11)."""
    base = f"$aws/commands/{DEVICE_KINDS[kind]}/{name}/executions/{execution_id}/request"
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "application/json":
        return base + "/json"
    if media == "application/cbor":
        return base + "/cbor"
    return base


def event_topic(command_id: str, status: str) -> str:
    return f"$aws/events/commandExecution/{command_id}/{status}"


def route_response(topic: str) -> Optional[tuple[str, str, str]]:
    """(target kind, name, execution id) of `$aws/commands/<things|clients>/<id>/executions/<E>/
    response/json`; None for any other topic. Names are not validated here."""
    parts = topic.split("/")
    if (len(parts) != 8 or parts[0] != "$aws" or parts[1] != "commands"
            or parts[4] != "executions" or parts[6:] != ["response", "json"]):
        return None
    kinds = {v: k for k, v in DEVICE_KINDS.items()}
    return kinds.get(parts[2], ""), parts[3], parts[5]


def valid_target_name(name: str) -> bool:
    return bool(_NAME_RE.fullmatch(name))

