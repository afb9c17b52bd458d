"""Names, limits and request validation shared by the MQTT and HTTPS device APIs.

Both device transports carry the same request members under the same names (PROTOCOL.md 1.5-1.7
and 2.2), so they share one parser; each front end only decides how an error is spelled on its
wire. Limits come from PROTOCOL.md section 4; a value outside them is an `InvalidRequest`, never
an exception that could reach the transport.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Optional

MAX_THING_NAME = 128
MAX_JOB_ID = 64
MAX_DETAILS_KEY = 128
MAX_DETAILS_VALUE = 1024
MAX_DOCUMENT = 32768
MAX_DESCRIPTION = 2028
MAX_STEP_MINUTES = 10080
MAX_PENDING_LISTED = 10  # GetPendingJobExecutions and notify (no scheduling config here)

NEXT = "$next"

PENDING = ("QUEUED", "IN_PROGRESS")
TERMINAL = ("SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "REMOVED", "CANCELED")
ALL_STATUSES = PENDING + TERMINAL
DEVICE_STATUSES = ("IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED")

_THING_RE = re.compile(r"[a-zA-Z0-9:_-]{1,%d}" % MAX_THING_NAME)
_JOB_RE = re.compile(r"[a-zA-Z0-9_-]{1,%d}" % MAX_JOB_ID)
_KEY_RE = re.compile(r"[a-zA-Z0-9:_-]{1,%d}" % MAX_DETAILS_KEY)
_DIGITS_RE = re.compile(r"[0-9]{1,19}")


class DeviceError(Exception):
    """A device-API failure, named by its MQTT `code` (PROTOCOL.md 1.8).

    `state` is the execution whose JobExecutionState goes into the rejection; only
    InvalidStateTransition and VersionMismatch carry one.
    """

    def __init__(self, code: str, message: str, state: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.state = state


class ApiError(Exception):
    """An HTTP API failure in restJson1 terms: error shape name, HTTP status, message, and any
    extra body members the shape models (e.g. resourceId)."""

    def __init__(self, error_type: str, status: int, message: str, **extra: Any) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.status = status
        self.message = message
        self.extra = extra


def valid_thing_name(name: str) -> bool:
    return bool(_THING_RE.fullmatch(name))


def valid_job_id(job_id: str) -> bool:
    return bool(_JOB_RE.fullmatch(job_id))


MIN_LONG, MAX_LONG = -(2**63), 2**63 - 1  # the models' `long`


def is_int(value: Any) -> bool:
    """JSON integers that fit the models' `long` (bool is an int in Python, never on the wire)."""
    return isinstance(value, int) and not isinstance(value, bool) and MIN_LONG <= value <= MAX_LONG


def is_number(value: Any) -> bool:
    """A JSON number (integer or float, not bool, not NaN or infinite)."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value)


def parse_long(text: str) -> int:
    """A `long` from a query string or path label; ValueError outside the 64-bit range."""
    value = int(text)
    if not MIN_LONG <= value <= MAX_LONG:
        raise ValueError(f"{text[:40]} is out of range")
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def parse_json(data: bytes | str, surrogates: bool = False) -> Any:
    """json.loads that fails with ValueError for every unusable input: not UTF-8, not JSON,
    nested deeper than the parser's recursion limit, or (unless `surrogates`) holding a lone
    UTF-16 surrogate: valid JSON text, but no UTF-8 store, log or device can carry it. The MQTT
    requests allow them: nothing of theirs is stored unvalidated, and a clientToken holding one
    is still echoed (escaped)."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError("JSON is nested too deeply") from None
    if not surrogates and _SURROGATE_ESCAPE.search(text) and not _utf8_clean(value):
        raise ValueError("JSON string holds a lone surrogate")
    return value


def _utf8_clean(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return True


def check_status_details(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise DeviceError("InvalidRequest", "statusDetails must be an object of strings")
    for key, item in value.items():
        if not _KEY_RE.fullmatch(key):
            raise DeviceError("InvalidRequest",
                              f"statusDetails key {key[:140]!r} must match [a-zA-Z0-9:_-]{{1,128}}")
        if not isinstance(item, str):
            raise DeviceError("InvalidRequest", f"statusDetails value for {key!r} must be a string")
        if not 1 <= len(item) <= MAX_DETAILS_VALUE:
            raise DeviceError("InvalidRequest",
                              f"statusDetails value for {key!r} must be"
                              f" 1..{MAX_DETAILS_VALUE} characters")
        if any(unicodedata.category(ch).startswith("C") for ch in item):
            raise DeviceError("InvalidRequest",
                              f"statusDetails value for {key!r} contains a control character")
    return dict(value)


def _optional_bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise DeviceError("InvalidRequest", f"{name} must be a boolean")
    return value


def _optional_execution_number(body: dict[str, Any]) -> Optional[int]:
    value = body.get("executionNumber")
    if value is None:
        return None
    if not is_int(value) or value < 1:
        raise DeviceError("InvalidRequest", "executionNumber must be a positive integer")
    return value


def _step_timeout(body: dict[str, Any], allow_cancel: bool) -> Optional[int]:
    value = body.get("stepTimeoutInMinutes")
    if value is None:
        return None
    if is_int(value) and (1 <= value <= MAX_STEP_MINUTES or (allow_cancel and value == -1)):
        return value
    allowed = f"1..{MAX_STEP_MINUTES}" + (" or -1" if allow_cancel else "")
    raise DeviceError("InvalidRequest", f"stepTimeoutInMinutes must be an integer in {allowed}")


def check_client_token(body: dict[str, Any]) -> None:
    token = body.get("clientToken")
    if token is not None and not isinstance(token, str):
        raise DeviceError("InvalidRequest", "clientToken must be a string")


@dataclass
class StartNextRequest:
    status_details: Optional[dict[str, str]] = None
    step_timeout: Optional[int] = None


@dataclass
class DescribeRequest:
    execution_number: Optional[int] = None
    include_document: bool = True  # PROTOCOL.md 8, A5


@dataclass
class UpdateRequest:
    status: str
    status_details: Optional[dict[str, str]] = None
    expected_version: Optional[int] = None
    execution_number: Optional[int] = None
    include_state: bool = False
    include_document: bool = False
    step_timeout: Optional[int] = None


def parse_start_next(body: dict[str, Any]) -> StartNextRequest:
    check_client_token(body)
    details = body.get("statusDetails")
    return StartNextRequest(
        status_details=None if "statusDetails" not in body else check_status_details(details),
        step_timeout=_step_timeout(body, allow_cancel=False))


def parse_describe(body: dict[str, Any]) -> DescribeRequest:
    check_client_token(body)
    return DescribeRequest(execution_number=_optional_execution_number(body),
                           include_document=_optional_bool(body, "includeJobDocument", True))


def parse_update(body: dict[str, Any]) -> UpdateRequest:
    check_client_token(body)
    status = body.get("status")
    if status is None:
        raise DeviceError("InvalidRequest", "status is required")
    if not isinstance(status, str) or status not in ALL_STATUSES:
        raise DeviceError("InvalidRequest",
                          "status must be one of " + ", ".join(DEVICE_STATUSES))
    expected = body.get("expectedVersion")
    if expected is not None:
        # PROTOCOL.md 8, A2: a JSON number or a string of digits (the embedded C library's form).
        if isinstance(expected, str) and _DIGITS_RE.fullmatch(expected):
            expected = int(expected)
        elif not is_int(expected) or expected < 0:
            raise DeviceError("InvalidRequest",
                              "expectedVersion must be a non-negative integer"
                              " or a string of digits")
    return UpdateRequest(
        status=status,
        status_details=(None if "statusDetails" not in body
                        else check_status_details(body["statusDetails"])),
        expected_version=expected,
        execution_number=_optional_execution_number(body),
        include_state=_optional_bool(body, "includeJobExecutionState", False),
        include_document=_optional_bool(body, "includeJobDocument", False),
        step_timeout=_step_timeout(body, allow_cancel=True))
