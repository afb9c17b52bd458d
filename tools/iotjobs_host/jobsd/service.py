"""jobsd's service: AWS IoT Jobs, the thing registry, commands and streams behind one lock.

`Service` is composed of one part per subject, each in its own module; the front ends (mqtt.py,
control.py, data.py) call it and translate wire formats only.

| module | what it holds |
|---|---|
| core.py | the lock, one transaction per request, notify/notify-next after the commit, ARNs, documents |
| jobs.py | the device API, jobs and executions on the control plane, execution timers |
| campaign.py | rollout, abort, retries, scheduling and maintenance windows: what happens when an execution ends and when a job's time comes |
| registry.py | things, thing groups, and what membership does to continuous jobs |
| command_service.py | AWS IoT commands and their executions |
| stream_service.py | streams, OTA updates, the device's stream requests |
| template_service.py | job templates, custom and AWS managed; CreateJob from a template |
| events.py | job and job-execution events (UpdateEventConfigurations) |
"""

from __future__ import annotations

import logging
from typing import Optional

from . import commands as cmds
from .command_service import CommandsApi
from .core import Delivery, Publish, ServiceBase, _Tracker, encode, jobs_topic
from .events import EventsApi
from .campaign import CampaignApi
from .jobs import JobsApi
from .registry import RegistryApi
from .stream_service import StreamsApi
from .template_service import TemplatesApi

__all__ = ["Delivery", "Publish", "Service", "encode", "jobs_topic"]

log = logging.getLogger("jobsd.service")


class Service(CampaignApi, JobsApi, RegistryApi, CommandsApi, StreamsApi, TemplatesApi, EventsApi,
              ServiceBase):
    """All jobsd behaviour behind one lock; front ends translate wire formats only."""

    def next_deadline(self) -> Optional[float]:
        with self.lock:
            return self._next_deadline()

    def expire_due(self) -> Optional[float]:
        """Time out every execution whose deadline has passed, remove commands whose pending
        deletion is due; return the next deadline."""
        def op(tracker: _Tracker, now: int) -> Optional[float]:
            at = self._clock()
            for cx in self._store.due_command_executions(at):
                log.info("command execution %s on %s/%s timed out", cx.execution_id,
                         cx.target_kind, cx.target_name)
                cx.status = "TIMED_OUT"
                cx.status_reason = {"reasonCode": cmds.NO_RESPONSE}
                cx.last_updated_at = self._stamp()
                cx.timeout_at = None
                self._store.save_command_execution(cx)
                self._command_event(cx, tracker)
            for command_id in self._store.due_command_deletions(at):
                log.info("command %s deleted (its pending deletion is due)", command_id)
                self._store.delete_command(command_id)
            for ex in self._store.due_executions(self._clock()):
                log.info("execution %s #%d on %s timed out", ex.job_id, ex.execution_number,
                         ex.thing_name)
                tracker.touch(ex.thing_name)
                ex.status = "TIMED_OUT"
                ex.last_updated_at = now
                ex.version_number += 1
                self._end_timers(ex)
                self._store.save_execution(ex)
                self._execution_ended(ex, now, tracker)
            self._campaign_due(tracker, now)
            return self._next_deadline()
        return self._run(op)
