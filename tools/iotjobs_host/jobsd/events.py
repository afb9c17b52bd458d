"""Job and job-execution events (`$aws/events/job/...`, `$aws/events/jobExecution/...`), sent
only when UpdateEventConfigurations enabled them (FLEET.md 6.3)."""
from __future__ import annotations

from typing import Any, Optional

from .store import Execution, Job


class EventsApi:
    def _job_event(self, tracker: Any, job: Job, operation: str,
                   extra: Optional[dict[str, Any]] = None) -> None:
        """`$aws/events/job/<jobId>/<operation>` after the commit, when JOB events are on."""

    def _execution_event(self, tracker: Any, ex: Execution) -> None:
        """`$aws/events/jobExecution/<jobId>/<status>` for an execution that just turned
        terminal, when JOB_EXECUTION events are on."""


def add_routes(router: Any, service: Any) -> None:
    """The control-plane operations of this part (control.py calls it)."""
