"""The timer thread: times out executions at their step / in-progress deadlines.

It sleeps on a Condition bound to the service lock until the earliest stored deadline, or until
a request sets an earlier one (`Service.on_deadline` -> `wake`); there is no polling. Deadlines
are absolute and live in SQLite, so after a restart the first pass times out, at once, every
execution whose deadline passed while jobsd was down.
"""

from __future__ import annotations

import logging
import threading
from typing import Optional
from collections.abc import Callable

from .service import Service

log = logging.getLogger("jobsd.timers")


class TimerThread:
    def __init__(self, service: Service, clock: Optional[Callable[[], float]] = None) -> None:
        self._service = service
        self._clock = clock or service.clock  # the service's clock, moved by tests too
        self._cond = threading.Condition(service.lock)
        self._stopping = False
        self._scheduled: Optional[float] = None  # the deadline the thread is sleeping towards
        self._thread = threading.Thread(target=self._loop, name="timers", daemon=True)
        service.on_deadline = self.wake

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def wake(self, deadline: float) -> None:
        """A request set `deadline`; wake the thread if it would otherwise sleep past it.
        Called with the service lock held (inside the request)."""
        with self._cond:
            if self._scheduled is None or deadline < self._scheduled:
                self._scheduled = deadline
                self._cond.notify()

    def _loop(self) -> None:
        with self._cond:
            while not self._stopping:
                try:
                    upcoming = self._service.expire_due()
                except Exception:  # e.g. the database is briefly unavailable: try again soon
                    log.exception("timing out executions failed")
                    upcoming = self._clock() + 1.0
                self._scheduled = upcoming
                timeout = None if upcoming is None else max(0.0, upcoming - self._clock())
                self._cond.wait(timeout)
