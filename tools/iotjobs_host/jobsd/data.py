"""The iot-jobs-data REST API on `--data` (PROTOCOL.md section 2), the HTTPS twin of the MQTT
device API: same service calls, REST spellings (jobDocument as a JSON string, no clientToken
or timestamp), and MQTT codes mapped to the modelled exception shapes (section 2.3).
VersionMismatch has no REST shape; it is answered 409 InvalidStateTransitionException with a
message naming the mismatch (PROTOCOL.md 8, A3).

StartCommandExecution (PROTOCOL.md 2.5) shares the endpoint; its errors are the shapes its model
lists (ValidationException, ConflictException, ResourceNotFoundException), malformed bodies
included.
"""

from __future__ import annotations

from typing import Any, Optional
from collections.abc import Callable

from . import views
from .rest import Request, Router
from .rules import (NEXT, ApiError, DescribeRequest, DeviceError, parse_start_next,
                    parse_update)
from .service import Service

_REST_ERRORS = {
    "InvalidRequest": ("InvalidRequestException", 400),
    "InvalidJson": ("InvalidRequestException", 400),
    "InvalidTopic": ("InvalidRequestException", 400),
    "ResourceNotFound": ("ResourceNotFoundException", 404),
    "InvalidStateTransition": ("InvalidStateTransitionException", 409),
    "VersionMismatch": ("InvalidStateTransitionException", 409),
    "TerminalStateReached": ("TerminalStateException", 410),
    "RequestThrottled": ("ThrottlingException", 429),
    "InternalError": ("ServiceUnavailableException", 503),
}


Handler = Callable[[Request], Optional[dict[str, Any]]]


def _rest(fn: Handler) -> Handler:
    """Translate DeviceError into the REST exception shape for the same condition."""
    def wrapped(req: Request) -> Optional[dict[str, Any]]:
        try:
            return fn(req)
        except DeviceError as err:
            error_type, status = _REST_ERRORS.get(err.code, ("InvalidRequestException", 400))
            extra: dict[str, Any] = {}
            if err.state is not None:  # the docs say the 409 body also carries executionState
                extra["executionState"] = views.execution_state(err.state)
            raise ApiError(error_type, status, err.message, **extra) from None
    return wrapped


def build_router(service: Service) -> Router:
    router = Router("data")

    @_rest
    def get_pending(req: Request) -> dict[str, Any]:
        in_progress, queued = service.get_pending(req.labels["thingName"])
        return {"inProgressJobs": [views.summary(ex) for ex in in_progress],
                "queuedJobs": [views.summary(ex) for ex in queued]}

    @_rest
    def describe(req: Request) -> dict[str, Any]:
        number = req.q_int("executionNumber")
        if number is not None and number < 1:
            raise DeviceError("InvalidRequest", "executionNumber must be a positive integer")
        include = req.q_bool("includeJobDocument", True)
        found = service.describe(req.labels["thingName"], req.labels["jobId"],
                                 DescribeRequest(number, include))
        if found is None:
            return {}
        return {"execution": views.device_execution(found[0], found[1] if include else None,
                                                    as_string=True,
                                                    seconds_left=service.seconds_left(found[0]))}

    @_rest
    def start_next(req: Request) -> dict[str, Any]:
        started = service.start_next(req.labels["thingName"], parse_start_next(req.body))
        if started is None:
            return {}
        return {"execution": views.device_execution(started[0], started[1], as_string=True,
                                                    seconds_left=service.seconds_left(started[0]))}

    @_rest
    def update(req: Request) -> dict[str, Any]:
        if req.labels["jobId"] == NEXT:
            raise DeviceError("InvalidRequest", "$next is not a valid jobId for an update")
        body = parse_update(req.body)
        ex, document = service.update(req.labels["thingName"], req.labels["jobId"], body)
        out: dict[str, Any] = {}
        if body.include_state:
            out["executionState"] = views.execution_state(ex)
        if body.include_document:
            out["jobDocument"] = document
        return out

    def start_command_execution(req: Request) -> dict[str, Any]:
        return service.start_command_execution(req.body)

    router.add("GET", "/things/{thingName}/jobs", get_pending)
    router.add("GET", "/things/{thingName}/jobs/{jobId}", describe)
    router.add("PUT", "/things/{thingName}/jobs/$next", start_next)
    router.add("POST", "/things/{thingName}/jobs/{jobId}", update)
    router.add("POST", "/command-executions", start_command_execution, "ValidationException")
    return router
