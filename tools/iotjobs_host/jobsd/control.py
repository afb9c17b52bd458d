"""The `iot` control-plane subset on `--control`: paths and members as boto3's `iot` client
sends them (botocore `iot/2015-05-28/service-2.json`, restJson1).

Only routing and query/label decoding live here; behaviour is in `Service`. Streams and OTA
updates (CreateStream ... DeleteOTAUpdate) answer InvalidRequestException as their model says;
`PUT /_jobsd/test-hooks` is jobsd's own (fault injection for tests, off unless --test-hooks). The AWS IoT commands
operations report malformed input as ValidationException (their model has no
InvalidRequestException); DeleteCommand answers 202 or 204 as its `statusCode` says.
"""

from __future__ import annotations

from typing import Any, Optional

from .rest import Reply, Request, Router
from .rules import ALL_STATUSES, ApiError, parse_long
from .campaign import add_routes as campaign_routes
from .events import add_routes as event_routes
from .service import Service
from .template_service import add_routes as template_routes


def _status_filter(req: Request, allowed: tuple[str, ...]) -> Optional[str]:
    status = req.q_str("status")
    if status is not None and status not in allowed:
        raise ApiError("InvalidRequestException", 400,
                       f"status must be one of {', '.join(allowed)}")
    return status


def build_router(service: Service) -> Router:
    router = Router("control")

    def create_thing(req: Request) -> dict[str, Any]:
        return service.create_thing(req.labels["thingName"], req.body)

    def describe_thing(req: Request) -> dict[str, Any]:
        return service.describe_thing(req.labels["thingName"])

    def list_things(req: Request) -> dict[str, Any]:
        return service.list_things(req.q_int("maxResults"), req.q_str("nextToken"))

    def create_job(req: Request) -> dict[str, Any]:
        return service.create_job(req.labels["jobId"], req.body)

    def describe_job(req: Request) -> dict[str, Any]:
        return service.describe_job(req.labels["jobId"])

    def get_job_document(req: Request) -> dict[str, Any]:
        return service.get_job_document(req.labels["jobId"],
                                        req.q_bool("beforeSubstitution", False))

    def list_jobs(req: Request) -> dict[str, Any]:
        status = _status_filter(req, ("IN_PROGRESS", "CANCELED", "COMPLETED",
                                      "DELETION_IN_PROGRESS", "SCHEDULED"))
        selection = req.q_str("targetSelection")
        if req.q_str("thingGroupId"):
            raise ApiError("InvalidRequestException", 400,
                           "filter by thingGroupName; thingGroupId is not supported by jobsd")
        return service.list_jobs(status, selection, req.q_str("thingGroupName"),
                                 req.q_int("maxResults"), req.q_str("nextToken"))

    def cancel_job(req: Request) -> dict[str, Any]:
        return service.cancel_job(req.labels["jobId"], req.q_bool("force", False), req.body)

    def delete_job(req: Request) -> None:
        service.delete_job(req.labels["jobId"], req.q_bool("force", False))

    def describe_job_execution(req: Request) -> dict[str, Any]:
        return service.describe_job_execution(req.labels["jobId"], req.labels["thingName"],
                                              req.q_int("executionNumber"))

    def list_for_job(req: Request) -> dict[str, Any]:
        return service.list_executions_for_job(req.labels["jobId"],
                                               _status_filter(req, ALL_STATUSES),
                                               req.q_int("maxResults"), req.q_str("nextToken"))

    def list_for_thing(req: Request) -> dict[str, Any]:
        return service.list_executions_for_thing(req.labels["thingName"],
                                                 _status_filter(req, ALL_STATUSES),
                                                 req.q_str("jobId"), req.q_int("maxResults"),
                                                 req.q_str("nextToken"))

    def cancel_job_execution(req: Request) -> None:
        service.cancel_job_execution(req.labels["jobId"], req.labels["thingName"],
                                     req.q_bool("force", False), req.body)

    def delete_job_execution(req: Request) -> None:
        try:
            number = parse_long(req.labels["executionNumber"])
        except ValueError:
            raise ApiError("InvalidRequestException", 400,
                           "executionNumber must be an integer") from None
        service.delete_job_execution(req.labels["jobId"], req.labels["thingName"], number,
                                     req.q_bool("force", False))

    def create_thing_group(req: Request) -> dict[str, Any]:
        return service.create_thing_group(req.labels["thingGroupName"], req.body)

    def describe_thing_group(req: Request) -> dict[str, Any]:
        return service.describe_thing_group(req.labels["thingGroupName"])

    def delete_thing_group(req: Request) -> None:
        service.delete_thing_group(req.labels["thingGroupName"], req.q_int("expectedVersion"))

    def list_thing_groups(req: Request) -> dict[str, Any]:
        return service.list_thing_groups(req.q_str("parentGroup"), req.q_str("namePrefixFilter"),
                                         req.q_bool("recursive", True), req.q_int("maxResults"),
                                         req.q_str("nextToken"))

    def list_thing_groups_for_thing(req: Request) -> dict[str, Any]:
        return service.list_thing_groups_for_thing(req.labels["thingName"],
                                                   req.q_int("maxResults"),
                                                   req.q_str("nextToken"))

    def add_thing_to_thing_group(req: Request) -> None:
        service.add_thing_to_thing_group(req.body)

    def remove_thing_from_thing_group(req: Request) -> None:
        service.remove_thing_from_thing_group(req.body)

    def list_things_in_thing_group(req: Request) -> dict[str, Any]:
        return service.list_things_in_thing_group(req.labels["thingGroupName"],
                                                  req.q_bool("recursive", False),
                                                  req.q_int("maxResults"), req.q_str("nextToken"))

    def create_command(req: Request) -> dict[str, Any]:
        return service.create_command(req.labels["commandId"], req.body)

    def get_command(req: Request) -> dict[str, Any]:
        return service.get_command(req.labels["commandId"])

    def list_commands(req: Request) -> dict[str, Any]:
        return service.list_commands(req.q_str("namespace"), req.q_str("commandParameterName"),
                                     req.q_str("sortOrder"), req.q_int("maxResults"),
                                     req.q_str("nextToken"))

    def update_command(req: Request) -> dict[str, Any]:
        return service.update_command(req.labels["commandId"], req.body)

    def delete_command(req: Request) -> Reply:
        return Reply(service.delete_command(req.labels["commandId"]), {})

    def get_command_execution(req: Request) -> dict[str, Any]:
        return service.get_command_execution(req.labels["executionId"], req.q_str("targetArn"),
                                             req.q_bool("includeResult", True))

    def list_command_executions(req: Request) -> dict[str, Any]:
        return service.list_command_executions(req.body, req.q_int("maxResults"),
                                               req.q_str("nextToken"))

    def delete_command_execution(req: Request) -> None:
        service.delete_command_execution(req.labels["executionId"], req.q_str("targetArn"))

    def create_stream(req: Request) -> dict[str, Any]:
        return service.create_stream(req.labels["streamId"], req.body)

    def describe_stream(req: Request) -> dict[str, Any]:
        return service.describe_stream(req.labels["streamId"])

    def list_streams(req: Request) -> dict[str, Any]:
        return service.list_streams(req.q_int("maxResults"), req.q_str("nextToken"),
                                    req.q_bool("isAscendingOrder", False))

    def update_stream(req: Request) -> dict[str, Any]:
        return service.update_stream(req.labels["streamId"], req.body)

    def delete_stream(req: Request) -> None:
        service.delete_stream(req.labels["streamId"])

    def create_ota_update(req: Request) -> dict[str, Any]:
        return service.create_ota_update(req.labels["otaUpdateId"], req.body)

    def get_ota_update(req: Request) -> dict[str, Any]:
        return service.get_ota_update(req.labels["otaUpdateId"])

    def list_ota_updates(req: Request) -> dict[str, Any]:
        return service.list_ota_updates(req.q_str("otaUpdateStatus"), req.q_int("maxResults"),
                                        req.q_str("nextToken"))

    def delete_ota_update(req: Request) -> None:
        service.delete_ota_update(req.labels["otaUpdateId"], req.q_bool("deleteStream", False),
                                  req.q_bool("forceDeleteAWSJob", False))

    def test_hooks(req: Request) -> dict[str, Any]:
        return service.set_test_hooks(req.body)

    router.add("POST", "/things/{thingName}", create_thing)
    router.add("GET", "/things/{thingName}", describe_thing)
    router.add("GET", "/things", list_things)
    router.add("PUT", "/jobs/{jobId}", create_job)
    router.add("GET", "/jobs/{jobId}", describe_job)
    router.add("GET", "/jobs/{jobId}/job-document", get_job_document)
    router.add("GET", "/jobs", list_jobs)
    router.add("PUT", "/jobs/{jobId}/cancel", cancel_job)
    router.add("DELETE", "/jobs/{jobId}", delete_job)
    router.add("GET", "/jobs/{jobId}/things", list_for_job)
    router.add("GET", "/things/{thingName}/jobs", list_for_thing)
    router.add("GET", "/things/{thingName}/jobs/{jobId}", describe_job_execution)
    router.add("PUT", "/things/{thingName}/jobs/{jobId}/cancel", cancel_job_execution)
    router.add("DELETE", "/things/{thingName}/jobs/{jobId}/executionNumber/{executionNumber}",
               delete_job_execution)
    # fixed paths before the {thingGroupName} templates they would otherwise match
    router.add("PUT", "/thing-groups/addThingToThingGroup", add_thing_to_thing_group)
    router.add("PUT", "/thing-groups/removeThingFromThingGroup", remove_thing_from_thing_group)
    router.add("POST", "/thing-groups/{thingGroupName}", create_thing_group)
    router.add("GET", "/thing-groups/{thingGroupName}", describe_thing_group)
    router.add("DELETE", "/thing-groups/{thingGroupName}", delete_thing_group)
    router.add("GET", "/thing-groups", list_thing_groups)
    router.add("GET", "/thing-groups/{thingGroupName}/things", list_things_in_thing_group)
    router.add("GET", "/things/{thingName}/thing-groups", list_thing_groups_for_thing)
    commands = (("PUT", "/commands/{commandId}", create_command),
                ("GET", "/commands/{commandId}", get_command),
                ("GET", "/commands", list_commands),
                ("PATCH", "/commands/{commandId}", update_command),
                ("DELETE", "/commands/{commandId}", delete_command),
                ("GET", "/command-executions/{executionId}", get_command_execution),
                ("POST", "/command-executions", list_command_executions),
                ("DELETE", "/command-executions/{executionId}", delete_command_execution))
    for method, template, handler in commands:
        router.add(method, template, handler, "ValidationException")
    router.add("POST", "/streams/{streamId}", create_stream)
    router.add("GET", "/streams/{streamId}", describe_stream)
    router.add("GET", "/streams", list_streams)
    router.add("PUT", "/streams/{streamId}", update_stream)
    router.add("DELETE", "/streams/{streamId}", delete_stream)
    router.add("POST", "/otaUpdates/{otaUpdateId}", create_ota_update)
    router.add("GET", "/otaUpdates/{otaUpdateId}", get_ota_update)
    router.add("GET", "/otaUpdates", list_ota_updates)
    router.add("DELETE", "/otaUpdates/{otaUpdateId}", delete_ota_update)
    # not AWS: flips fault injection for tests (404 unless jobsd runs with --test-hooks)
    router.add("PUT", "/_jobsd/test-hooks", test_hooks)
    template_routes(router, service)   # job templates, custom and managed
    event_routes(router, service)      # Describe/UpdateEventConfigurations
    campaign_routes(router, service)   # UpdateJob, AssociateTargetsWithJob
    return router
