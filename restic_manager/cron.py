"""Cron expressions evaluated with restic-manager's time semantics (SPEC §4).

An expression has five fields (minute hour day-of-month month day-of-week), six with
seconds first, or is a macro (``@daily``, ``@hourly-random``, ...). It is matched against
wall-clock time in an IANA zone, with cronie's rules where wall-clock time is not a plain
line:

* a wall-clock time that occurs twice (clocks go back) fires a *fixed-time* expression
  once, at its first occurrence, and any other expression at both occurrences;
* skipped wall-clock times (clocks go forward) fire a fixed-time expression once, at the
  first instant after the gap, and are simply skipped by any other expression.

An expression is fixed-time when neither its minute nor its hour field starts with ``*``.
Likewise a day field starting with ``*`` (or ``?``, accepted there as in Quartz) is
unrestricted; when neither day field is, a day matches if either does (classic cron).

``H`` (in the minute and hour fields) and the ``@*-random`` macros are replaced by values
derived from a SHA-256 of the schedule's ``namespace/name``, so a fleet spreads its load and
a schedule keeps its time; :attr:`Cron.resolved` is the expression after that replacement.

Internally instants are whole seconds since the epoch (fire times never carry fractions) and
wall-clock times are naive datetimes. The matcher jumps field by field to the next matching
wall-clock time, so finding the next fire costs a handful of zone look-ups however dense
the expression is.
"""

from __future__ import annotations

import hashlib
import re
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


class CronError(ValueError):
    """A cron expression or time zone that cannot be evaluated; the message says which part and why."""


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: Mapping[str, int] = field(default_factory=dict)

    def describe_range(self) -> str:
        if not self.names:
            return f"{self.low}-{self.high}"
        by_value = sorted(self.names, key=self.names.__getitem__)
        return f"{self.low}-{self.high} or {by_value[0]}-{by_value[-1]}"


_MONTH_NAMES = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_WEEKDAY_NAMES = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")

_SECOND = _Field("second", 0, 59)
_MINUTE = _Field("minute", 0, 59)
_HOUR = _Field("hour", 0, 23)
_DAY_OF_MONTH = _Field("day-of-month", 1, 31)
_MONTH = _Field("month", 1, 12, {name: number for number, name in enumerate(_MONTH_NAMES, 1)})
# 7 is Sunday too, as in every cron.
_DAY_OF_WEEK = _Field("day-of-week", 0, 7, {name: number for number, name in enumerate(_WEEKDAY_NAMES)})
_FIELDS = (_SECOND, _MINUTE, _HOUR, _DAY_OF_MONTH, _MONTH, _DAY_OF_WEEK)

_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_RANDOM_MACROS = ("@hourly-random", "@daily-random", "@weekly-random", "@monthly-random")
# Longest each month can be, so that a day-of-month that exists only in leap years still counts.
_LONGEST_MONTH = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31, 11: 30, 12: 31}

_HASH_TERM = re.compile(r"H(?:\((?P<first>\d+)-(?P<last>\d+)\))?(?:/(?P<step>\d+))?")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_SECOND = timedelta(seconds=1)


def _spread(name: str, spec: _Field, first: int, last: int) -> int:
    """A value in first..last fixed by `name`: sha256, because Python's hash() changes per process."""
    digest = hashlib.sha256(f"{name}\0{spec.name}".encode()).digest()
    return first + int.from_bytes(digest[:8], "big") % (last - first + 1)


def _random_macro(macro: str, name: str) -> str:
    minute = _spread(name, _MINUTE, 0, 59)
    hour = _spread(name, _HOUR, 0, 23)
    if macro == "@hourly-random":
        return f"{minute} * * * *"
    if macro == "@daily-random":
        return f"{minute} {hour} * * *"
    if macro == "@weekly-random":
        return f"{minute} {hour} * * {_spread(name, _DAY_OF_WEEK, 0, 6)}"
    # @monthly-random: days 29-31 would skip the months that lack them.
    return f"{minute} {hour} {_spread(name, _DAY_OF_MONTH, 1, 28)} * *"


@dataclass(frozen=True)
class _Calendar:
    """The matching wall-clock times of an expression, without zone or DST."""

    seconds: tuple[int, ...]
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    either_day: bool  # both day fields restricted: a day matches if either does (classic cron)

    def day_matches(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        by_date = day.day in self.days
        by_weekday = day.isoweekday() % 7 in self.weekdays
        return (by_date or by_weekday) if self.either_day else (by_date and by_weekday)

    def first_at_or_after(self, wall: datetime) -> datetime:
        """The earliest matching wall-clock time at or after `wall` (whole seconds)."""
        day = wall.date()
        clock: tuple[int, ...] = (wall.hour, wall.minute, wall.second)
        while True:
            if self.day_matches(day):
                time = _smallest_at_least((self.hours, self.minutes, self.seconds), clock)
                if time is not None:
                    hour, minute, second = time
                    return datetime(day.year, day.month, day.day, hour, minute, second)
            if day.month in self.months:
                day += timedelta(days=1)
            else:
                day = date(day.year + day.month // 12, day.month % 12 + 1, 1)
            clock = (0, 0, 0)


def _smallest_at_least(
    choices: Sequence[tuple[int, ...]], start: Sequence[int]
) -> tuple[int, ...] | None:
    """The lexicographically smallest tuple of the product of sorted `choices` that is >= `start`."""
    if not choices:
        return ()
    head, rest = choices[0], choices[1:]
    index = bisect_left(head, start[0])
    if index < len(head) and head[index] == start[0]:
        tail = _smallest_at_least(rest, start[1:])
        if tail is not None:
            return (head[index], *tail)
        index += 1
    if index < len(head):
        return (head[index], *(values[0] for values in rest))
    return None


@dataclass(frozen=True)
class _Shift:
    """A stretch of wall-clock time around a change of UTC offset, skipped or repeated."""

    at: int  # the first instant with the new offset
    start: datetime  # first wall-clock time in the stretch
    end: datetime  # first wall-clock time after it


class Cron:
    """A cron expression in a time zone; answers when it fires."""

    def __init__(self, expression: str, time_zone: str = "UTC", *, name: str = "") -> None:
        self.expression = expression
        self.name = name
        try:
            self.zone = ZoneInfo(time_zone)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise CronError(f"unknown time zone {time_zone!r}") from None
        self.resolved, texts = _expand(expression, name)
        self.has_seconds = len(texts) == 6
        if not self.has_seconds:
            texts = ["0", *texts]
        second, minute, hour, day, month, weekday = (
            _parse_field(text, spec, expression) for text, spec in zip(texts, _FIELDS)
        )
        self.fixed_time = not texts[1].startswith("*") and not texts[2].startswith("*")
        either_day = not _unrestricted(texts[3]) and not _unrestricted(texts[5])
        if not either_day and not any(d <= _LONGEST_MONTH[m] for m in month for d in day):
            raise CronError(f"{expression!r}: day-of-month {texts[3]} never occurs in month {texts[4]}")
        self._calendar = _Calendar(
            seconds=tuple(sorted(second)),
            minutes=tuple(sorted(minute)),
            hours=tuple(sorted(hour)),
            days=frozenset(day),
            months=frozenset(month),
            weekdays=frozenset(value % 7 for value in weekday),
            either_day=either_day,
        )

    def __repr__(self) -> str:
        return f"Cron({self.expression!r}, {self.zone.key!r}, name={self.name!r})"

    def next_after(self, instant: datetime) -> datetime:
        """The first fire time strictly after `instant`, in the schedule's zone."""
        return self._local(self._first_fire_from(_floor_seconds(instant, "instant") + 1))

    def iter_after(self, instant: datetime, *, count: int) -> Iterator[datetime]:
        """The next `count` fire times strictly after `instant`."""
        return self._fires_from(_floor_seconds(instant, "instant") + 1, count)

    def _fires_from(self, start: int, count: int) -> Iterator[datetime]:
        for _ in range(count):
            fire = self._first_fire_from(start)
            yield self._local(fire)
            start = fire + 1

    def latest_between(self, after: datetime, until: datetime) -> datetime | None:
        """The newest fire time t with after < t <= until, or None.

        A binary search over next-fire look-ups: about log2(span in seconds) of them, so a week of
        an every-second schedule costs some twenty look-ups rather than 600,000.
        """
        low = _floor_seconds(after, "after") + 1
        last = _floor_seconds(until, "until")
        if low > last or self._first_fire_from(low) > last:
            return None
        # The first fire from `low` is in the span and the first from `last + 1` is not: find the
        # earliest start whose first fire is past the span; the start before it gives the answer.
        past = _first_where(low, last + 1, lambda start: self._first_fire_from(start) > last)
        return self._local(self._first_fire_from(past - 1))

    def _first_fire_from(self, start: int) -> int:
        """The earliest fire time at or after `start` (seconds since the epoch)."""
        local = datetime.fromtimestamp(start, self.zone)
        wall = local.replace(tzinfo=None)
        if self.fixed_time:
            before = datetime.fromtimestamp(start - 1, self.zone).replace(tzinfo=None)
            if wall - before > _ONE_SECOND and self._calendar.first_at_or_after(before + _ONE_SECOND) < wall:
                # `start` is the first instant after a skipped stretch the expression matches in:
                # its catch-up is now (the loop below would look only from `wall` on).
                return start
        if local.fold == 0 and not self.fixed_time:
            first, second = self._occurrences(wall)
            if first < second:
                # `start` is in the first pass through a repeated stretch: the rest of that pass
                # comes first, then the whole second pass (handled by the loop below).
                shift = self._shift(wall, first, second)
                match = self._calendar.first_at_or_after(wall)
                if match < shift.end:
                    return self._instant(match, fold=0)
                wall = shift.start
        while True:
            wall = self._calendar.first_at_or_after(wall)
            first, second = self._occurrences(wall)
            if first == second:
                return first
            if first < second:  # repeated
                if first >= start:
                    return first
                if not self.fixed_time:
                    return second
            elif self.fixed_time:  # skipped
                return self._shift(wall, first, second).at
            wall = self._shift(wall, first, second).end

    def _instant(self, wall: datetime, *, fold: int) -> int:
        return (wall.replace(tzinfo=self.zone, fold=fold) - _EPOCH) // _ONE_SECOND

    def _occurrences(self, wall: datetime) -> tuple[int, int]:
        """`wall` read with fold 0 and fold 1: equal if it occurs once, ascending if it occurs
        twice, descending if it is skipped (PEP 495)."""
        return self._instant(wall, fold=0), self._instant(wall, fold=1)

    def _shift(self, wall: datetime, first: int, second: int) -> _Shift:
        """The skipped or repeated stretch that `wall` lies in, given its two readings.

        The offset changes once between the two readings; bisect for the instant it does.
        """
        low, high = sorted((first, second))
        before = self._offset(low)
        at = _first_where(low, high, lambda instant: self._offset(instant) != before)
        return _Shift(at=at, start=wall - timedelta(seconds=high - at), end=wall + timedelta(seconds=at - low))

    def _offset(self, instant: int) -> timedelta | None:
        return datetime.fromtimestamp(instant, self.zone).utcoffset()

    def _local(self, instant: int) -> datetime:
        return datetime.fromtimestamp(instant, self.zone)


def _first_where(low: int, high: int, holds: Callable[[int], bool]) -> int:
    """The smallest x in (low, high] for which `holds`, given it holds from some point on and at `high`."""
    while high - low > 1:
        middle = (low + high) // 2
        if holds(middle):
            high = middle
        else:
            low = middle
    return high


def _floor_seconds(instant: datetime, parameter: str) -> int:
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"{parameter} {instant.isoformat()} has no time zone; pass an aware datetime")
    return (instant - _EPOCH) // _ONE_SECOND


def _expand(expression: str, name: str) -> tuple[str, list[str]]:
    """The resolved expression and its field texts (seconds first when it has them)."""
    text = expression.strip()
    if text.startswith("@"):
        macro = text.lower()
        if macro in _MACROS:
            return expression, _MACROS[macro].split()
        if macro in _RANDOM_MACROS:
            resolved = _random_macro(macro, name)
            return resolved, resolved.split()
        known = ", ".join([*_MACROS, *_RANDOM_MACROS])
        raise CronError(f"{expression!r}: unknown macro; use one of {known}")
    texts = text.split()
    if len(texts) not in (5, 6):
        raise CronError(f"{expression!r}: expected 5 fields (or 6 with seconds first), got {len(texts)}")
    fields = _FIELDS if len(texts) == 6 else _FIELDS[1:]
    resolved_texts = [_resolve_hash(part, spec, name, expression) for part, spec in zip(texts, fields)]
    return (expression if resolved_texts == texts else " ".join(resolved_texts)), resolved_texts


def _resolve_hash(text: str, spec: _Field, name: str, expression: str) -> str:
    """`text` with its H terms replaced by values spread by `name`."""
    terms = text.split(",")
    if not any(term.startswith("H") for term in terms):
        return text
    if spec not in (_MINUTE, _HOUR):
        raise CronError(f"{expression!r}: {spec.name} cannot use H; only minute and hour can")
    return ",".join(_resolve_hash_term(term, spec, name, expression) for term in terms)


def _resolve_hash_term(term: str, spec: _Field, name: str, expression: str) -> str:
    if not term.startswith("H"):
        return term
    match = _HASH_TERM.fullmatch(term)
    if match is None:
        raise CronError(f"{expression!r}: {spec.name} has {term!r}; use H, H(a-b), H/n or H(a-b)/n")
    first, last = spec.low, spec.high
    if match["first"] is not None:
        first = _value(match["first"], spec, expression)
        last = _value(match["last"], spec, expression)
        if last < first:
            raise CronError(f"{expression!r}: {spec.name} range {term!r} runs backwards")
    if match["step"] is None:
        return str(_spread(name, spec, first, last))
    step = _step(match["step"], spec, expression)
    # Bound the offset by the range so that a step wider than the range still fires once.
    offset = _spread(name, spec, 0, min(step, last - first + 1) - 1)
    return f"{first + offset}-{last}/{step}"


def _unrestricted(text: str) -> bool:
    return text.startswith(("*", "?"))


def _parse_field(text: str, spec: _Field, expression: str) -> set[int]:
    values: set[int] = set()
    for term in text.split(","):
        base, slash, step_text = term.partition("/")
        step = _step(step_text, spec, expression) if slash else 1
        if base == "*" or (base == "?" and spec in (_DAY_OF_MONTH, _DAY_OF_WEEK)):
            first, last = spec.low, spec.high
        else:
            first_text, dash, last_text = base.partition("-")
            first = _value(first_text, spec, expression)
            # "a/n" means a, a+n, ... up to the field's end (Vixie cron, robfig).
            last = _value(last_text, spec, expression) if dash else (spec.high if slash else first)
            if last < first:
                raise CronError(f"{expression!r}: {spec.name} range {base!r} runs backwards")
        values.update(range(first, last + 1, step))
    return values


def _value(text: str, spec: _Field, expression: str) -> int:
    if text.isascii() and text.isdigit():
        value = int(text)
    elif text.upper() in spec.names:
        value = spec.names[text.upper()]
    else:
        raise CronError(f"{expression!r}: {spec.name} has unknown value {text!r}; use {spec.describe_range()}")
    if not spec.low <= value <= spec.high:
        raise CronError(f"{expression!r}: {spec.name} must be {spec.describe_range()}")
    return value


def _step(text: str, spec: _Field, expression: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise CronError(f"{expression!r}: {spec.name} step must be a positive whole number, not {text!r}")
    return int(text)
