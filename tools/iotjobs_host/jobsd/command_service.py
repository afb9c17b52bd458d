"""AWS IoT commands, the service side (commands.py has the rules and their sources).

StartCommandExecution stores a CREATED execution with an absolute deadline (creation +
executionTimeoutSeconds, real seconds: `--minute-seconds` is for job timers only) and, after
the commit, publishes the command's payload bytes to the target's request topic and a CREATED
status event. Device reports move it through IN_PROGRESS to a terminal status; the timer
thread's `expire_due()` sets TIMED_OUT (reasonCode `$NO_RESPONSE_FROM_DEVICE`) on executions
still CREATED or IN_PROGRESS at their deadline, which the device may still settle once. Every
status change publishes an event on `$aws/events/commandExecution/<commandId>/<status>`.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Optional

from . import commands as cmds
from . import views
from .rules import ApiError, DeviceError
from .store import Command, CommandExecution
from .core import Delivery, _not_found, _page, _sort_order, _Tracker

log = logging.getLogger("jobsd.service")


class CommandsApi:
    def _stamp(self) -> float:
        """Command timestamps: epoch seconds with milliseconds (botocore `timestamp`)."""
        return round(self._clock(), 3)

    def _here(self, region: str, account: str, arn: str) -> None:
        """ARNs of another region or account name nothing this service has."""
        if (region, account) != (self.region, self.account):
            raise _not_found(f"{arn} is not in {self.region}/{self.account}")

    def _command_event(self, cx: CommandExecution, tracker: _Tracker) -> None:
        tracker.publish(cmds.event_topic(cx.command_id, cx.status),
                        views.command_event(cx, self.command_arn(cx.command_id),
                                            self.target_arn(cx.target_kind, cx.target_name),
                                            self._clock()))

    def _command_or_404(self, command_id: str) -> Command:
        if not cmds.valid_id(command_id):
            raise cmds.validation("commandId must match [a-zA-Z0-9_-]{1,64}")
        cmd = self._store.get_command(command_id)
        if cmd is None:
            raise _not_found(f"Command {command_id} cannot be found.")
        return cmd

    # -- AWS IoT commands: control plane --------------------------------------------------------
    def create_command(self, command_id: str, body: dict[str, Any]) -> dict[str, Any]:
        spec = cmds.parse_create(command_id, body)

        def op(_: _Tracker, __: int) -> dict[str, Any]:
            if self._store.get_command(command_id) is not None:
                raise ApiError("ConflictException", 409, f"Command {command_id} already exists.",
                               resourceId=command_id)
            now = self._stamp()
            self._store.insert_command(Command(
                command_id=command_id, seq=self._store.next_counter("command"),
                namespace=spec.namespace, display_name=spec.display_name,
                description=spec.description, content=spec.content,
                content_type=spec.content_type, mandatory=spec.mandatory, created_at=now,
                last_updated_at=now, tags=spec.tags))
            return {"commandId": command_id, "commandArn": self.command_arn(command_id)}
        return self._run(op)

    def get_command(self, command_id: str) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            cmd = self._command_or_404(command_id)
            return views.command_view(cmd, self.command_arn(command_id))
        return self._run(op)

    def list_commands(self, namespace: Optional[str], parameter: Optional[str],
                      order: Optional[str], max_results: Optional[int],
                      token: Optional[str]) -> dict[str, Any]:
        if namespace is not None and namespace not in cmds.NAMESPACES:
            raise cmds.validation(f"namespace must be one of {', '.join(cmds.NAMESPACES)}")
        descending = _sort_order(order)

        def op(_: _Tracker, __: int) -> dict[str, Any]:
            found = [c for c in self._store.list_commands()
                     if (namespace is None or c.namespace == namespace)
                     and (parameter is None
                          or any(p["name"] == parameter for p in c.mandatory or []))]
            if descending:
                found.reverse()
            rows = [views.command_summary(c, self.command_arn(c.command_id)) for c in found]
            return _page(rows, "commands", max_results, token, default=cmds.DEFAULT_RESULTS,
                         limit=cmds.MAX_RESULTS, invalid=cmds.validation)
        return self._run(op)

    def update_command(self, command_id: str, body: dict[str, Any]) -> dict[str, Any]:
        change = cmds.parse_update_command(body)

        def op(_: _Tracker, __: int) -> dict[str, Any]:
            cmd = self._command_or_404(command_id)
            if cmd.pending_deletion:
                raise ApiError("ConflictException", 409,
                               f"Command {command_id} is pending deletion.",
                               resourceId=command_id)
            now = self._stamp()
            if change.display_name is not None:
                cmd.display_name = change.display_name
            if change.description is not None:
                cmd.description = change.description
            if change.deprecated is not None and change.deprecated != cmd.deprecated:
                cmd.deprecated = change.deprecated
                cmd.deprecated_at = now if change.deprecated else None
            cmd.last_updated_at = now
            self._store.save_command(cmd)
            out: dict[str, Any] = {"commandId": command_id}
            if cmd.display_name is not None:
                out["displayName"] = cmd.display_name
            if cmd.description is not None:
                out["description"] = cmd.description
            out.update(deprecated=cmd.deprecated, lastUpdatedAt=cmd.last_updated_at)
            return out
        return self._run(op)

    def delete_command(self, command_id: str) -> int:
        """The HTTP status DeleteCommand answers with (the model's `statusCode`): 204 when the
        command is gone now (it had been deprecated for longer than the 12-hour maximum
        execution timeout, or never existed), else 202: it is pending deletion, refuses new
        executions, and the timer thread removes it when that window has passed."""
        if not cmds.valid_id(command_id):
            raise cmds.validation("commandId must match [a-zA-Z0-9_-]{1,64}")

        def op(tracker: _Tracker, __: int) -> int:
            cmd = self._store.get_command(command_id)
            if cmd is None:
                return 204
            now = self._clock()
            if (cmd.deprecated and cmd.deprecated_at is not None
                    and now - cmd.deprecated_at >= cmds.DELETION_WINDOW):
                self._store.delete_command(command_id)
                return 204
            if cmd.delete_at is None:
                start = cmd.deprecated_at if cmd.deprecated and cmd.deprecated_at else now
                cmd.delete_at = start + cmds.DELETION_WINDOW
                cmd.last_updated_at = self._stamp()
                self._store.save_command(cmd)
                tracker.deadline(cmd.delete_at)
            return 202
        return self._run(op)

    def _target(self, target_arn: Optional[str]) -> tuple[str, str]:
        """(kind, name) of a targetArn query or filter."""
        if target_arn is None:
            raise cmds.validation("targetArn is required")
        region, account, kind, name = cmds.parse_arn(target_arn, "targetArn",
                                                     ("thing", "client"))
        self._here(region, account, target_arn)
        return kind, name

    def _execution_of(self, execution_id: str, target: tuple[str, str]) -> CommandExecution:
        if not cmds.valid_id(execution_id):
            raise cmds.validation("executionId must match [a-zA-Z0-9_-]{1,64}")
        cx = self._store.get_command_execution(execution_id)
        if cx is None or (cx.target_kind, cx.target_name) != target:
            raise _not_found(f"Command execution {execution_id} on"
                             f" {self.target_arn(*target)} cannot be found.")
        return cx

    def get_command_execution(self, execution_id: str, target_arn: Optional[str],
                              include_result: bool) -> dict[str, Any]:
        target = self._target(target_arn)

        def op(_: _Tracker, __: int) -> dict[str, Any]:
            cx = self._execution_of(execution_id, target)
            return views.command_execution(cx, self.command_arn(cx.command_id),
                                           self.target_arn(*target), include_result)
        return self._run(op)

    def list_command_executions(self, body: dict[str, Any], max_results: Optional[int],
                                token: Optional[str]) -> dict[str, Any]:
        namespace, status = body.get("namespace"), body.get("status")
        if namespace is not None and namespace not in cmds.NAMESPACES:
            raise cmds.validation(f"namespace must be one of {', '.join(cmds.NAMESPACES)}")
        if status is not None and status not in cmds.STATUSES:
            raise cmds.validation(f"status must be one of {', '.join(cmds.STATUSES)}")
        descending = _sort_order(body.get("sortOrder"))
        if body.get("targetArn") is not None and body.get("commandArn") is not None:
            raise cmds.validation("Filter by targetArn or by commandArn, not both")
        target = None if body.get("targetArn") is None else self._target(body["targetArn"])
        command_id = None
        if body.get("commandArn") is not None:
            region, account, _, command_id = cmds.parse_arn(body["commandArn"], "commandArn",
                                                            ("command",))
            self._here(region, account, body["commandArn"])
        started, completed = body.get("startedTimeFilter"), body.get("completedTimeFilter")
        if started is not None and completed is not None:
            raise cmds.validation("Give startedTimeFilter or completedTimeFilter, not both")
        window: Optional[tuple[str, Optional[float], Optional[float]]] = None
        if started is not None:
            window = ("started_at", *cmds.parse_time_filter(started, "startedTimeFilter"))
        elif completed is not None:
            window = ("completed_at", *cmds.parse_time_filter(completed, "completedTimeFilter"))

        def within(cx: CommandExecution) -> bool:
            if window is None:
                return True
            when = getattr(cx, window[0])
            return when is not None and (window[1] is None or when >= window[1]) and (
                window[2] is None or when <= window[2])

        def op(_: _Tracker, __: int) -> dict[str, Any]:
            found = [] if namespace == cmds.FLEETWISE else [
                cx for cx in self._store.list_command_executions(command_id, target, status)
                if within(cx)]
            if descending:
                found.reverse()
            rows = [views.command_execution_summary(
                cx, self.command_arn(cx.command_id),
                self.target_arn(cx.target_kind, cx.target_name)) for cx in found]
            return _page(rows, "commandExecutions", max_results, token,
                         default=cmds.DEFAULT_RESULTS, limit=cmds.MAX_RESULTS,
                         invalid=cmds.validation)
        return self._run(op)

    def delete_command_execution(self, execution_id: str, target_arn: Optional[str]) -> None:
        """Only a terminal execution can be deleted (ConflictException otherwise); deleting one
        that does not exist succeeds (the model lists no ResourceNotFoundException here)."""
        target = self._target(target_arn)
        if not cmds.valid_id(execution_id):
            raise cmds.validation("executionId must match [a-zA-Z0-9_-]{1,64}")

        def op(_: _Tracker, __: int) -> None:
            cx = self._store.get_command_execution(execution_id)
            if cx is None or (cx.target_kind, cx.target_name) != target:
                return
            if cx.status not in cmds.TERMINAL:
                raise ApiError("ConflictException", 409,
                               f"Command execution {execution_id} is {cx.status}; only a"
                               " terminal execution can be deleted.", resourceId=execution_id)
            self._store.delete_command_execution(cx)
        self._run(op)

    # -- AWS IoT commands: StartCommandExecution (iot-jobs-data) ---------------------------------
    def start_command_execution(self, body: dict[str, Any]) -> dict[str, Any]:
        req = cmds.parse_start(body)
        (t_region, t_account, kind, name), command = req.target, req.command
        key = req.key()

        def op(tracker: _Tracker, __: int) -> dict[str, Any]:
            if req.client_token is not None:
                earlier = self._store.command_execution_by_token(req.client_token)
                if earlier is not None:
                    if earlier.request_key != key:
                        raise ApiError("ConflictException", 409,
                                       "clientToken was already used with a different request",
                                       resourceId=earlier.execution_id)
                    return {"executionId": earlier.execution_id}
            self._here(command[0], command[1], body["commandArn"])
            cmd = self._store.get_command(command[3])
            if cmd is None:
                raise _not_found(f"Command {command[3]} cannot be found.")
            if cmd.deprecated:
                raise cmds.validation(f"Command {cmd.command_id} is deprecated; restore it with"
                                      " UpdateCommand first.")
            if cmd.pending_deletion:
                raise cmds.validation(f"Command {cmd.command_id} is pending deletion.")
            self._here(t_region, t_account, body["targetArn"])
            if kind == "thing" and self._store.get_thing(name) is None:
                raise _not_found(f"Thing {name} cannot be found.")
            parameters = cmds.apply_mandatory(cmd.mandatory, req.parameters)
            now = self._stamp()
            cx = self._store.insert_command_execution(CommandExecution(
                execution_id=str(uuid.uuid4()), command_id=cmd.command_id, target_kind=kind,
                target_name=name, status="CREATED", timeout_seconds=req.timeout,
                request_key=key, created_at=now, last_updated_at=now, started_at=now,
                parameters=parameters, client_token=req.client_token,
                timeout_at=now + req.timeout))
            tracker.deadline(cx.timeout_at)
            tracker.publish(cmds.request_topic(kind, name, cx.execution_id, cmd.content_type),
                            cmd.content or b"", Delivery(cmd.content_type, req.timeout))
            self._command_event(cx, tracker)
            return {"executionId": cx.execution_id}
        return self._run(op)

    # -- AWS IoT commands: UpdateCommandExecution (MQTT) -----------------------------------------
    def update_command_execution(self, kind: str, name: str, execution_id: str,
                                 update: cmds.CommandUpdate) -> None:
        """Apply a device's report; DeviceError with the jobs codes otherwise. Terminal is final,
        except a TIMED_OUT the service set, which the device may settle once with a terminal
        status of its own (AWS guide, "Time out value and TIMED_OUT execution status")."""
        if kind == "thing":
            self._seen(name)

        def op(tracker: _Tracker, __: int) -> None:
            cx = self._store.get_command_execution(execution_id)
            if cx is None or (cx.target_kind, cx.target_name) != (kind, name):
                raise DeviceError("ResourceNotFound",
                                  f"Command execution {execution_id} not found for"
                                  f" {cmds.DEVICE_KINDS[kind]}/{name}")
            if cx.completed_at is not None or (cx.status in cmds.TERMINAL
                                               and cx.status != "TIMED_OUT"):
                raise DeviceError("InvalidStateTransition",
                                  f"Command execution is already in terminal state {cx.status}")
            if cx.status == "TIMED_OUT" and update.status not in cmds.TERMINAL:
                raise DeviceError("InvalidStateTransition",
                                  "Command execution timed out; only a terminal status can"
                                  f" follow, not {update.status}")
            changed = update.status != cx.status
            if update.status_reason is not None:
                cx.status_reason = update.status_reason
            elif changed:
                cx.status_reason = None  # a reason explains one status, not the next
            if update.result is not None:
                cx.result = update.result
            cx.status = update.status
            now = self._stamp()
            cx.last_updated_at = now
            if update.status in cmds.TERMINAL:
                cx.completed_at = now
                cx.timeout_at = None
            self._store.save_command_execution(cx)
            if changed:
                self._command_event(cx, tracker)
        self._run(op)

    # -- streams: shared -------------------------------------------------------------------------
