"""Maintenance-window start expressions: EventBridge-style cron, six fields, UTC.

    minutes hours day-of-month month day-of-week year      e.g. cron(0 22 ? * MON-FRI *)

Each field takes `*`, a value, a range `a-b`, a step `*/n` or `a-b/n` or `a/n`, and lists of
those; months JAN-DEC, days of week SUN-SAT = 1-7 (EventBridge numbering); `?` (any) in
day-of-month or day-of-week, and one of the two must be `?`. `L`, `W` and `#` are refused
(CronError says so): jobsd does not evaluate them. The `cron(...)` wrapper is optional.
(FLEET.md 4.3 [P]: AWS documents no dialect for maintenance windows; EventBridge's is the one
AWS IoT documentation points to.)
"""
from __future__ import annotations

import calendar
import datetime
from dataclasses import dataclass

_MONTHS = {m.upper(): i for i, m in enumerate(calendar.month_abbr) if m}
_DAYS = {"SUN": 1, "MON": 2, "TUE": 3, "WED": 4, "THU": 5, "FRI": 6, "SAT": 7}
_FIELDS = (("minutes", 0, 59, {}), ("hours", 0, 23, {}), ("day-of-month", 1, 31, {}),
           ("month", 1, 12, _MONTHS), ("day-of-week", 1, 7, _DAYS), ("year", 1970, 2199, {}))
MAX_SEARCH_DAYS = 5 * 366


class CronError(ValueError):
    pass


def _value(text: str, lo: int, hi: int, names: dict[str, int], field: str) -> int:
    t = text.upper()
    if t in names:
        return names[t]
    if not t.isdigit():
        raise CronError(f"{field}: {text!r} is not a number{' or a name' if names else ''}")
    v = int(t)
    if not lo <= v <= hi:
        raise CronError(f"{field}: {v} is outside {lo}-{hi}")
    return v


def _field(text: str, index: int) -> frozenset[int] | None:
    """The values a field allows; None for `?` or `*` (any)."""
    name, lo, hi, names = _FIELDS[index]
    if text in ("?",):
        if index not in (2, 4):
            raise CronError(f"{name}: `?` is only allowed in day-of-month and day-of-week")
        return None
    if index in (2, 4):
        bare = text.upper()
        for n in names:
            bare = bare.replace(n, "")
        if any(c in bare for c in "LW#"):
            raise CronError(f"{name}: L, W and # are not supported by jobsd")
    if text == "*":
        return None
    out: set[int] = set()
    for part in text.split(","):
        if not part:
            raise CronError(f"{name}: empty list item in {text!r}")
        base, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronError(f"{name}: bad step in {part!r}")
            step = int(step_text)
        if base == "*":
            a, b = lo, hi
        elif "-" in base:
            x, _, y = base.partition("-")
            a, b = _value(x, lo, hi, names, name), _value(y, lo, hi, names, name)
            if a > b:
                raise CronError(f"{name}: range {part!r} runs backwards")
        else:
            a = _value(base, lo, hi, names, name)
            b = hi if step_text else a
        out.update(range(a, b + 1, step))
    return frozenset(out)


@dataclass(frozen=True)
class Cron:
    text: str
    minutes: frozenset[int] | None
    hours: frozenset[int] | None
    dom: frozenset[int] | None
    months: frozenset[int] | None
    dow: frozenset[int] | None
    years: frozenset[int] | None

    def _day_ok(self, d: datetime.date) -> bool:
        if self.years is not None and d.year not in self.years:
            return False
        if self.months is not None and d.month not in self.months:
            return False
        if self.dom is not None and d.day not in self.dom:
            return False
        # Python: Monday 0 .. Sunday 6; EventBridge: Sunday 1 .. Saturday 7
        if self.dow is not None and (d.weekday() + 1) % 7 + 1 not in self.dow:
            return False
        return True

    def next_after(self, t: float) -> float | None:
        """The first start strictly after epoch second `t` (None within 5 years: never)."""
        start = datetime.datetime.fromtimestamp(int(t) // 60 * 60 + 60, datetime.UTC)
        hours = sorted(self.hours) if self.hours is not None else list(range(24))
        minutes = sorted(self.minutes) if self.minutes is not None else list(range(60))
        day = start.date()
        for _ in range(MAX_SEARCH_DAYS):
            if self._day_ok(day):
                for h in hours:
                    for m in minutes:
                        at = datetime.datetime(day.year, day.month, day.day, h, m,
                                               tzinfo=datetime.UTC)
                        if at >= start:
                            return at.timestamp()
            day += datetime.timedelta(days=1)
        return None


def parse(text: str) -> Cron:
    if not isinstance(text, str) or not 1 <= len(text) <= 256:
        raise CronError("a maintenance window's startTime must be a cron expression of 1..256 "
                        "characters")
    body = text.strip()
    if body.startswith("cron(") and body.endswith(")"):
        body = body[5:-1]
    parts = body.split()
    if len(parts) != 6:
        raise CronError(f"{text!r}: a cron expression has six fields (minutes hours "
                        f"day-of-month month day-of-week year), got {len(parts)}")
    fields = [_field(p, i) for i, p in enumerate(parts)]
    if (parts[2] == "?") == (parts[4] == "?"):
        raise CronError(f"{text!r}: exactly one of day-of-month and day-of-week must be `?`")
    return Cron(text, *fields)
