"""Cron expressions evaluated with restic-manager's time semantics (SPEC §4).

An expression has five fields (minute hour day-of-month month day-of-week), six with
seconds first, or is a macro (``@daily``, ``@hourly-random``, ...). croniter parses and
expands the fields (numbers, names, ranges, steps, ``?``, ``H``); this module matches the
expanded values against wall-clock time in an IANA zone, with cronie's rules where
wall-clock time is not a plain line:

* a wall-clock time that occurs twice (clocks go back) fires a *fixed-time* expression
  once, at its first occurrence, and any other expression at both occurrences;
* skipped wall-clock times (clocks go forward) fire a fixed-time expression once, at the
  first instant after the gap, and are simply skipped by any other expression.

An expression is fixed-time when neither its minute nor its hour field starts with ``*``.
Likewise a day field starting with ``*`` (or ``?``, accepted there as in Quartz) is
unrestricted; when neither day field is, a day matches if either does (classic cron).

``H`` (in any field, alone or in a list: ``H``, ``H(a-b)``, ``H/n``, ``H(a-b)/n``) and the
``@*-random`` macros are replaced by values croniter's H derives from the schedule's
``namespace/name`` (given a SHA-256 of it per field, see :func:`_resolve_hash`), so a fleet
spreads its load and a schedule keeps its time; :attr:`Cron.resolved` is the expression
after that replacement (what agents receive and the Schedule's status shows). Releases that
resolved H without croniter chose other values: upgrading moves each H schedule once.

Refused, with a message naming the token, because croniter reads them in ways cron users
would not expect or SPEC leaves out: ``L``, ``W`` and ``#`` (last day, nearest weekday,
nth weekday), ``R`` (random on every evaluation), ranges that run backwards (croniter
wraps them, inconsistently with steps) and ranges with equal ends (croniter reads ``2-2``
as the whole field).

Internally instants are whole seconds since the epoch (fire times never carry fractions) and
wall-clock times are naive datetimes. The matcher jumps field by field to the next matching
wall-clock time, so finding the next fire costs a handful of zone look-ups however dense
the expression is.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter
from croniter.croniter import DOW_ALPHAS, M_ALPHAS, HashExpander


class CronError(ValueError):
    """A cron expression or time zone that cannot be evaluated; the message says which part and why."""


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    index: int  # croniter's index of the field in its expansion
    names: tuple[str, ...] = ()

    def describe_range(self) -> str:
        names = f" or {self.names[0].upper()}-{self.names[-1].upper()}" if self.names else ""
        return f"{self.low}-{self.high}{names}"

    def number(self, text: str) -> int | None:
        """The value `text` spells, or None if it is neither a number nor one of the field's names."""
        if text.isascii() and text.isdigit():
            return int(text)
        lowered = text.lower()
        return self.low + self.names.index(lowered) if lowered in self.names else None


_SECOND = _Field("second", 0, 59, 5)
_MINUTE = _Field("minute", 0, 59, 0)
_HOUR = _Field("hour", 0, 23, 1)
_DAY_OF_MONTH = _Field("day-of-month", 1, 31, 2)
_MONTH = _Field("month", 1, 12, 3, tuple(sorted(M_ALPHAS, key=M_ALPHAS.__getitem__)))
# 7 is Sunday too, as in every cron.
_DAY_OF_WEEK = _Field("day-of-week", 0, 7, 4, tuple(sorted(DOW_ALPHAS, key=DOW_ALPHAS.__getitem__)))
_FIELDS = (_SECOND, _MINUTE, _HOUR, _DAY_OF_MONTH, _MONTH, _DAY_OF_WEEK)

# croniter knows the plain macros too, but with a hash id it reads them as H expressions, and
# it has no @*-random ones: one table of ours keeps both kinds and the fixed-time rule plain.
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
    "@hourly-random": "H * * * *",
    "@daily-random": "H H * * *",
    "@weekly-random": "H H * * H",
    # Days 29-31 would skip the months that lack them.
    "@monthly-random": "H H H(1-28) * *",
}
# Tokens croniter accepts that restic-manager does not, by field: what each means.
_UNSUPPORTED = {
    _DAY_OF_MONTH: {"L": "the last day of the month", "W": "the nearest weekday"},
    _DAY_OF_WEEK: {"L": "the last such weekday of the month", "#": "the nth such weekday of the month"},
}
_SYNTAX = "a value, a-b, */n, a/n, a-b/n, H, H(a-b), H/n, or a list of those"
# Longest each month can be, so that a day-of-month that exists only in leap years still counts.
_LONGEST_MONTH = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31, 11: 30, 12: 31}

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_SECOND = timedelta(seconds=1)


class _Invalid(Exception):
    """What is wrong with an expression; Cron adds the expression to the message."""


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
        try:
            self.resolved, texts = _resolve(expression, name)
            self.has_seconds = len(texts) == 6
            if not self.has_seconds:
                texts = ["0", *texts]
            self._calendar = _calendar(tuple(texts))
        except _Invalid as error:
            raise CronError(f"{expression!r}: {error}") from None
        self.fixed_time = not texts[1].startswith("*") and not texts[2].startswith("*")

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


def _resolve(expression: str, name: str) -> tuple[str, list[str]]:
    """The resolved expression and its field texts (seconds first when it has them)."""
    text = expression.strip()
    if text.startswith("@"):
        macro = _MACROS.get(text.lower())
        if macro is None:
            raise _Invalid(f"unknown macro; use one of {', '.join(_MACROS)}")
        texts = macro.split()
    else:
        texts = text.split()
        if len(texts) not in (5, 6):
            raise _Invalid(f"expected 5 fields (or 6 with seconds first), got {len(texts)}")
    fields = _FIELDS if len(texts) == 6 else _FIELDS[1:]
    resolved = [
        ",".join(_resolve_hash(term, spec, name) for term in part.split(",")) for part, spec in zip(texts, fields)
    ]
    return (expression if resolved == texts else " ".join(resolved)), resolved


# croniter's hashing reads only the field ranges of the instance it is given.
_HASHER = HashExpander(croniter("* * * * *"))


def _resolve_hash(term: str, spec: _Field, name: str) -> str:
    """`term` with an H term replaced by croniter's value for `name` (croniter itself takes H only
    as a whole field, not in a list)."""
    if not term.startswith(("H", "h")):
        return term
    # croniter derives every field from one CRC-32 of the hash id, shifted by the field's index:
    # with one id, minute and hour together take only 240 of the day's 1,440 times. An id per
    # field keeps them independent; a digest, because CRC-32s of similar names are similar.
    hash_id = hashlib.sha256(f"{name}\0{spec.name}".encode()).digest()
    try:
        value = _HASHER.expand("", spec.index, term.lower(), hash_id=hash_id)
    except CroniterError:
        value = term.lower()
    if value == term.lower():
        raise _Invalid(f"{spec.name} has {term!r}; use H, H(a-b), H/n or H(a-b)/n with a<b in {spec.describe_range()}")
    return value


@lru_cache(maxsize=1024)
def _calendar(texts: tuple[str, ...]) -> _Calendar:
    """The matching wall-clock times of six field texts (seconds first), expanded by croniter.

    Cached: a fleet's schedules share a few expressions, and Crons with equal fields can share
    one calendar.
    """
    for text, spec in zip(texts, _FIELDS):
        for term in text.split(","):
            _check_term(term, spec)
    try:
        expanded, _ = croniter.expand(" ".join(texts), second_at_beginning=True)
    except CroniterError as error:
        raise _Invalid(_field_problem(texts, error)) from None
    second, minute, hour, day, month, weekday = (_values(expanded[spec.index], spec) for spec in _FIELDS)
    either_day = not _unrestricted(texts[3]) and not _unrestricted(texts[5])
    if not either_day and not any(d <= _LONGEST_MONTH[m] for m in month for d in day):
        raise _Invalid(f"day-of-month {texts[3]} never occurs in month {texts[4]}")
    return _Calendar(
        seconds=tuple(sorted(second)),
        minutes=tuple(sorted(minute)),
        hours=tuple(sorted(hour)),
        days=frozenset(day),
        months=frozenset(month),
        weekdays=frozenset(value % 7 for value in weekday),
        either_day=either_day,
    )


def _values(expanded: Sequence[int | str], spec: _Field) -> list[int]:
    """croniter's values for a field, where ["*"] stands for all of them."""
    return list(range(spec.low, spec.high + 1)) if expanded == ["*"] else [int(value) for value in expanded]


def _check_term(term: str, spec: _Field) -> None:
    """Refuse what croniter would read differently from cron, or without naming the field."""
    if term.startswith(("R", "r")):
        raise _Invalid(f"{spec.name} has {term!r}: R, a new random value at every evaluation, is not "
                       "supported; H gives a value fixed by the Schedule's name")
    for token, meaning in _UNSUPPORTED.get(spec, {}).items():
        if token in term.upper():
            raise _Invalid(f"{spec.name} has {term!r}: {token} ({meaning}) is not supported")
    bounds, slash, step = term.partition("/")
    if slash and not (step.isascii() and step.isdigit() and int(step) > 0):
        raise _Invalid(f"{spec.name} step must be a positive whole number, not {step!r}")
    first_text, dash, last_text = bounds.partition("-")
    first, last = spec.number(first_text), spec.number(last_text)
    if any(value is not None and not spec.low <= value <= spec.high for value in (first, last)):
        raise _Invalid(f"{spec.name} must be {spec.describe_range()}")
    if dash and first is not None and last is not None:
        if last < first:
            raise _Invalid(f"{spec.name} range {bounds!r} runs backwards")
        if last == first:
            raise _Invalid(f"{spec.name} range {bounds!r} has equal ends; write {first_text}")


def _field_problem(texts: tuple[str, ...], error: CroniterError) -> str:
    """Which field croniter could not read, found by trying each alone."""
    for index, spec in enumerate(_FIELDS):
        alone = ["*"] * len(_FIELDS)
        alone[index] = texts[index]
        try:
            croniter.expand(" ".join(alone), second_at_beginning=True)
        except CroniterError:
            return f"{spec.name} has {texts[index]!r}; use {spec.describe_range()}: {_SYNTAX}"
    return f"croniter cannot read it: {error}"


def _unrestricted(text: str) -> bool:
    return text.startswith(("*", "?"))
