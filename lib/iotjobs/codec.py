# Request payloads, response parsing, statusDetails limits and job-document recognition
# (PROTOCOL.md 1.2-1.8, 4). Pure: no I/O. Payloads leave as bytes.
import json
from micropython import const

DETAIL_KEY_MAX = const(128)
DETAIL_VALUE_MAX = const(1024)
DETAILS_MAX = const(16)  # our own bound: keeps every update small (AWS documents none)

# Statuses the device may report.
IN_PROGRESS = "IN_PROGRESS"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
REJECTED = "REJECTED"
TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "REMOVED", "CANCELED")


def _key_char(c):
    return (
        "0" <= c <= "9" or "A" <= c <= "Z" or "a" <= c <= "z" or c == "-" or c == "_" or c == ":"
    )


def clean_key(key):
    """A statusDetails key AWS accepts: 1..128 of [a-zA-Z0-9:_-]; other characters become '_'."""
    key = str(key)[:DETAIL_KEY_MAX]
    if not key:
        return "_"
    for c in key:
        if not _key_char(c):
            return "".join(c if _key_char(c) else "_" for c in key)
    return key


def clean_value(value):
    """A statusDetails value AWS accepts: 1..1024 characters, no control characters."""
    value = value if isinstance(value, str) else str(value)
    if len(value) > DETAIL_VALUE_MAX:
        value = value[: DETAIL_VALUE_MAX - 3] + "..."
    for c in value:
        if c < " " or c == "\x7f":
            value = "".join(" " if (c < " " or c == "\x7f") else c for c in value)
            break
    return value or "-"


def clean_details(details):
    """statusDetails the service will not reject, whatever a handler returned.

    A rejected terminal update would leave the job IN_PROGRESS forever, so the device repairs
    details instead of refusing them: keys and values are coerced, at most DETAILS_MAX kept."""
    if details is None:
        return None
    if not isinstance(details, dict):
        details = {"result": details}
    out = {}
    for k in details:
        if len(out) >= DETAILS_MAX:
            break
        v = details[k]
        if v is None:
            continue
        out[clean_key(k)] = clean_value(v)
    return out


def start_next_request(token, details=None, step_timeout=None):
    req = {"clientToken": token}
    if details:
        req["statusDetails"] = clean_details(details)
    if step_timeout:
        req["stepTimeoutInMinutes"] = step_timeout
    return json.dumps(req).encode()


def describe_request(token, include_document=True, execution_number=None):
    req = {"clientToken": token}
    if not include_document:
        req["includeJobDocument"] = False
    if execution_number is not None:
        req["executionNumber"] = execution_number
    return json.dumps(req).encode()


def update_request(token, status, details=None, expected_version=None, step_timeout=None,
                   execution_number=None, include_state=False):
    req = {"status": status, "clientToken": token}
    if details is not None:
        req["statusDetails"] = clean_details(details)
    if expected_version is not None:
        req["expectedVersion"] = expected_version
    if step_timeout is not None:
        req["stepTimeoutInMinutes"] = step_timeout
    if execution_number is not None:
        req["executionNumber"] = execution_number
    if include_state:
        req["includeJobExecutionState"] = True
    return json.dumps(req).encode()


def parse(payload):
    """The JSON object in a payload, or None for anything else. Raises only MemoryError: a
    payload the heap cannot parse now is not a malformed one."""
    if not payload:
        return None
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeError, RuntimeError):
        return None  # RuntimeError: nested deeper than the parser's recursion limit
    return doc if isinstance(doc, dict) else None


def handler_name(name):
    """Operation name of a Device Client handler script: `reboot.sh` -> `reboot`."""
    name = name[name.rfind("/") + 1 :]
    for suffix in (".sh", ".py"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def operation(document):
    """The handler name a native job document asks for, or None when it names none."""
    if not isinstance(document, dict):
        return None
    op = document.get("operation")
    if isinstance(op, str) and op:
        return handler_name(op)
    if isinstance(document.get("afr_ota"), dict):
        return "afr_ota"
    return None


def _action(entry):
    """(operation, input) of a Device Client v1.0 step, or None when it is not one we run."""
    action = entry.get("action") if isinstance(entry, dict) else None
    if not isinstance(action, dict) or action.get("type") != "runHandler":
        return None
    inp = action.get("input")
    if not isinstance(inp, dict) or not isinstance(inp.get("handler"), str) or not inp["handler"]:
        return None
    args = inp.get("args", [])
    if not isinstance(args, list):
        return None
    op = handler_name(inp["handler"])
    step = {"operation": op, "args": args}
    if isinstance(action.get("name"), str):
        step["name"] = action["name"]
    return op, step, action.get("ignoreStepFailure") == "true"


def steps(document):
    """The steps a job document asks for: a list of (operation, step document, ignore failure).

    Native documents are one step (the document itself); the AWS managed templates' documents
    (Device Client schema version 1.0) are their `steps` then `finalStep`, each a `runHandler`
    action mapped onto the handler named by its script (`download-file.sh` -> `download-file`).
    Raises ValueError with a reason code when the document is none of these."""
    if not isinstance(document, dict):
        raise ValueError("BAD_DOCUMENT")
    if "operation" not in document and "steps" in document:
        if document.get("version") != "1.0":
            raise ValueError("UNSUPPORTED_VERSION")
        raw = document["steps"]
        if not isinstance(raw, list) or not raw:
            raise ValueError("BAD_DOCUMENT")
        final = document.get("finalStep")
        out = []
        for entry in raw + ([final] if final is not None else []):
            step = _action(entry)
            if step is None:
                raise ValueError("UNSUPPORTED_ACTION")
            out.append(step)
        return out
    op = operation(document)
    if op is None:
        raise ValueError("UNKNOWN_OPERATION")
    return [(op, document, False)]
