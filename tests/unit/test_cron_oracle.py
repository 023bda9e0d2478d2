"""SPEC §4 "Cron syntax and time semantics", checked against an independent brute-force oracle.

The oracle shares no code with restic_manager.cron or croniter: expressions are generated as
sets of values per field and rendered into cron text, so which wall-clock times match is
known without parsing. It then walks UTC instants one by one (every minute, or every second
for six fields), reads each in the zone and applies the SPEC's DST rules literally:

* a repeated wall-clock time fires a fixed-time expression only at its first occurrence;
* a fixed-time expression matching any skipped wall-clock time fires once, at the first
  instant after the gap; other expressions simply skip those times.

Cron must give the same fires from every starting point, around every change of UTC offset
of several zones over many years (found by scanning the zones, not written down).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cache
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from restic_manager.cron import Cron, CronError

ZONES = ("America/New_York", "Europe/London", "Europe/Berlin", "Australia/Lord_Howe", "Asia/Kolkata",
         "America/Santiago", "Pacific/Chatham", "UTC")
# Old rules, recent changes (Santiago moved its dates several times after 2010), the present,
# and the far future where zoneinfo extrapolates the POSIX rule. Kolkata changed offset only
# in the 1940s; UTC never does, so those contribute plain days.
YEARS = (1942, 1945, 1996, 2011, 2016, 2019, 2022, 2026, 2027, 2031, 2038, 2047)

MONTH_NAMES = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
WEEKDAY_NAMES = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")


def _offset(zone: ZoneInfo, instant: int) -> timedelta | None:
    return datetime.fromtimestamp(instant, zone).utcoffset()


def transitions(zone_name: str, year: int) -> list[int]:
    """The first instant of every new UTC offset in `year`: a scan every six hours, then bisection."""
    zone = ZoneInfo(zone_name)
    start = int(datetime(year, 1, 1, tzinfo=timezone.utc).timestamp())
    end = int(datetime(year + 1, 1, 1, tzinfo=timezone.utc).timestamp())
    found = []
    for low in range(start, end, 6 * 3600):
        high = low + 6 * 3600
        if _offset(zone, low) == _offset(zone, high):
            continue
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if _offset(zone, middle) != _offset(zone, low) else (middle, high)
        found.append(high)
    return found


@cache
def points() -> list[tuple[str, int]]:
    """(zone, instant) pairs: every transition of every zone in YEARS, and a plain day when there is none."""
    found = []
    for zone in ZONES:
        for year in YEARS:
            changes = transitions(zone, year)
            found += [(zone, at) for at in changes] or [(zone, int(datetime(year, 7, 1, 5).timestamp()))]
    return found


def test_the_scan_finds_known_transitions() -> None:
    assert ("Europe/London", int(datetime.fromisoformat("2026-03-29T01:00:00+00:00").timestamp())) in points()
    # Lord Howe shifts by 30 minutes, Chatham's clocks change at 02:45.
    assert ("Australia/Lord_Howe", int(datetime.fromisoformat("2026-10-04T02:30:00+11:00").timestamp())) in points()
    assert ("Pacific/Chatham", int(datetime.fromisoformat("2026-09-27T03:45:00+13:45").timestamp())) in points()
    assert len(points()) > 120


# --- the oracle ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rendered:
    """One field: its text and the values it stands for."""

    text: str
    values: frozenset[int]

    @property
    def star(self) -> bool:
        return self.text.startswith("*")


@dataclass(frozen=True)
class Expression:
    second: Rendered | None  # None: five fields
    minute: Rendered
    hour: Rendered
    day: Rendered
    month: Rendered
    weekday: Rendered

    @property
    def text(self) -> str:
        fields = (self.minute, self.hour, self.day, self.month, self.weekday)
        return " ".join(field.text for field in ((self.second, *fields) if self.second else fields))

    @property
    def fixed(self) -> bool:
        return not self.minute.star and not self.hour.star

    def matches(self, wall: datetime) -> bool:
        seconds = self.second.values if self.second else frozenset({0})
        if wall.second not in seconds or wall.minute not in self.minute.values or wall.hour not in self.hour.values:
            return False
        if wall.month not in self.month.values:
            return False
        by_day, by_weekday = wall.day in self.day.values, wall.isoweekday() % 7 in self.weekday.values
        restricted = not self.day.text.startswith(("*", "?")) and not self.weekday.text.startswith(("*", "?"))
        return (by_day or by_weekday) if restricted else (by_day and by_weekday)


def oracle(expression: Expression, zone: ZoneInfo, start: int, end: int) -> list[int]:
    """Every fire in [start, end), one instant at a time."""
    step = 1 if expression.second else 60
    fires = []
    previous = datetime.fromtimestamp(start - step, zone)
    for instant in range(start, end, step):
        local = datetime.fromtimestamp(instant, zone)
        wall = local.replace(tzinfo=None)
        fire = expression.matches(wall) and not (expression.fixed and local.fold == 1)
        if expression.fixed and local.utcoffset() > previous.utcoffset():  # type: ignore[operator]
            # The wall-clock times strictly between the previous instant's and this one's never happened.
            skipped = previous.replace(tzinfo=None) + timedelta(seconds=step)
            while not fire and skipped < wall:
                fire = expression.matches(skipped)
                skipped += timedelta(seconds=step)
        if fire:
            fires.append(instant)
        previous = local
    return fires


def test_oracle_reads_the_spec_on_a_known_gap_and_repeat() -> None:
    every = Rendered("*", frozenset(range(32)))
    london = ZoneInfo("Europe/London")
    half_past_one = Expression(None, Rendered("30", frozenset({30})), Rendered("1", frozenset({1})), every,
                               every, every)
    gap = int(datetime.fromisoformat("2026-03-29T00:00:00+00:00").timestamp())
    assert oracle(half_past_one, london, gap, gap + 3 * 3600) == [gap + 3600]  # 02:00 BST
    repeat = int(datetime.fromisoformat("2026-10-25T00:00:00+01:00").timestamp())
    assert oracle(half_past_one, london, repeat, repeat + 3 * 3600) == [repeat + 5400]  # 01:30 BST only


# --- generated expressions ----------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    low: int
    high: int
    names: tuple[str, ...] = ()  # names[i] is low + i


SECOND, MINUTE, HOUR = Spec(0, 59), Spec(0, 59), Spec(0, 23)
DAY, MONTH, WEEKDAY = Spec(1, 31), Spec(1, 12, MONTH_NAMES), Spec(0, 6, WEEKDAY_NAMES)


def _spell(draw: st.DrawFn, spec: Spec, value: int, *, alone: bool = False) -> str:
    if draw(st.booleans()) and spec.names:
        name = spec.names[value - spec.low]
        return draw(st.sampled_from([name, name.lower(), name.title()]))
    if alone and spec is WEEKDAY and value == 0 and draw(st.booleans()):
        return "7"  # Sunday, as in every cron
    return str(value)


@st.composite
def terms(draw: st.DrawFn, spec: Spec, anchors: tuple[int, ...], highest: int) -> Rendered:
    """A single value, a range, a stepped range or a stepped start, around `anchors` more often than not."""
    value = st.sampled_from([anchor for anchor in anchors if anchor <= highest] or [spec.low]) | st.integers(
        spec.low, highest)
    first = draw(value)
    kind = draw(st.sampled_from(["value", "range", "range-step", "start-step"]))
    if kind == "value":
        return Rendered(_spell(draw, spec, first, alone=True), frozenset({first}))
    step = draw(st.integers(1, spec.high - spec.low + 1))
    if kind == "start-step":
        return Rendered(f"{_spell(draw, spec, first)}/{step}", frozenset(range(first, spec.high + 1, step)))
    last = draw(value)
    first, last = min(first, last), max(first, last)
    if first == last:
        return Rendered(_spell(draw, spec, first, alone=True), frozenset({first}))
    text = f"{_spell(draw, spec, first)}-{_spell(draw, spec, last)}"
    if kind == "range":
        return Rendered(text, frozenset(range(first, last + 1)))
    return Rendered(f"{text}/{step}", frozenset(range(first, last + 1, step)))


@st.composite
def fields(draw: st.DrawFn, spec: Spec, anchors: tuple[int, ...], *, kinds: tuple[str, ...],
           highest: int | None = None) -> Rendered:
    """One of `kinds` (repeated ones are likelier): `*`, `*/n`, `?`, or a list of terms."""
    everything = frozenset(range(spec.low, spec.high + 1))
    kind = draw(st.sampled_from(kinds))
    if kind == "star":
        return Rendered("*", everything)
    if kind == "question":
        return Rendered("?", everything)
    if kind == "star-step":
        step = draw(st.integers(1, spec.high - spec.low + 1))
        return Rendered(f"*/{step}", frozenset(range(spec.low, spec.high + 1, step)))
    parts = draw(st.lists(terms(spec, anchors, spec.high if highest is None else highest), min_size=1, max_size=3))
    return Rendered(",".join(part.text for part in parts), frozenset().union(*(part.values for part in parts)))


@st.composite
def expressions(draw: st.DrawFn, zone: ZoneInfo, at: int, *, seconds: bool) -> Expression:
    """An expression whose fields lean towards the wall-clock times around the instant `at`."""
    walls = [datetime.fromtimestamp(at + delta, zone).replace(tzinfo=None)
             for delta in (-3601, -1801, -1, 0, 1800, 3600)]
    before, after = datetime.fromtimestamp(at - 1, zone), datetime.fromtimestamp(at, zone)
    shift = after.utcoffset() - before.utcoffset()  # type: ignore[operator]
    if shift > timedelta(0):  # wall-clock times that do not exist
        walls += [before.replace(tzinfo=None) + timedelta(seconds=1), before.replace(tzinfo=None) + shift / 2]
    anchors = {name: tuple(sorted({getattr(wall, name) for wall in walls})) for name in
               ("second", "minute", "hour", "day", "month")}
    # Mostly fixed times on mostly every day, as those are what the DST rules are about. Days
    # past the 28th only where they exist: an expression that never fires is refused.
    times = ("star", "star-step", "list", "list", "list", "list")
    days = ("star", "star", "star", "star-step", "question", "list", "list")
    return Expression(
        second=draw(fields(SECOND, anchors["second"] + (59,), kinds=times)) if seconds else None,
        minute=draw(fields(MINUTE, anchors["minute"] + (59,), kinds=times)),
        hour=draw(fields(HOUR, anchors["hour"], kinds=times)),
        day=draw(fields(DAY, anchors["day"], kinds=days, highest=28)),
        month=draw(fields(MONTH, anchors["month"], kinds=("star", "star", "star-step", "list"))),
        weekday=draw(fields(WEEKDAY, tuple(wall.isoweekday() % 7 for wall in walls), kinds=days)),
    )


# --- the comparison -----------------------------------------------------------------------------

def check(expression: Expression, zone: ZoneInfo, at: int, half_span: int, starts: list[int]) -> None:
    """Cron's fires around `at` are the oracle's, from every start in `starts` and around `at`."""
    step = 1 if expression.second else 60
    low, high = at - at % 60 - half_span, at - at % 60 + half_span
    expected = oracle(expression, zone, low, high)
    try:
        cron = Cron(expression.text, zone.key)
    except CronError as error:
        raise AssertionError(f"{expression.text!r} refused: {error}") from None

    def local(instant: int | float) -> datetime:
        return datetime.fromtimestamp(instant, zone)

    def expected_after(instant: float) -> int | None:
        index = bisect_right(expected, instant)
        return expected[index] if index < len(expected) else None

    got = []
    for fire in cron.iter_after(local(low - 1), count=len(expected) + 1):
        if fire.timestamp() >= high:
            break
        got.append(fire)
    assert [fire.isoformat() for fire in got] == [local(fire).isoformat() for fire in expected], expression.text

    # The seconds around the change, each fire and the second before it (an agent searches from
    # its last fire), and `starts`, a fraction of a second late too.
    sample = expected[:: max(1, len(expected) // 20)]
    around = [*range(at - 3 * step, at + 3 * step), *sample, *(fire - 1 for fire in sample)]
    for start in [*around, *(low + offset for offset in starts)]:
        for instant in (start, start + 0.5):
            want = expected_after(instant)
            fire = cron.next_after(local(instant))
            if want is None:
                assert fire.timestamp() >= high, (expression.text, local(instant).isoformat())
            else:
                assert fire.isoformat() == local(want).isoformat(), (expression.text, local(instant).isoformat())

    for first, last in zip(starts, starts[1:]):
        after, until = low + min(first, last), low + max(first, last)
        inside = [fire for fire in expected if after < fire <= until]
        latest = cron.latest_between(local(after), local(until))
        assert (latest.isoformat() if latest else None) == (local(inside[-1]).isoformat() if inside else None), (
            expression.text, local(after).isoformat(), local(until).isoformat())


Case = tuple[Expression, ZoneInfo, int, list[int]]


@st.composite
def cases(draw: st.DrawFn, *, seconds: bool, half_span: int) -> Case:
    """An expression around a transition (or a plain day), and starting points as offsets into the span."""
    zone_name, at = draw(st.sampled_from(points()))
    zone = ZoneInfo(zone_name)
    expression = draw(expressions(zone, at, seconds=seconds))
    starts = draw(st.lists(st.integers(0, 2 * half_span - 1), min_size=2, max_size=12))
    return expression, zone, at, starts


FIVE_FIELD_SPAN = 6 * 3600
SIX_FIELD_SPAN = 80 * 60  # every second: long enough for any gap or repeat (at most an hour)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(seconds=False, half_span=FIVE_FIELD_SPAN))
def test_five_fields_match_the_oracle_around_every_transition(case: Case) -> None:
    expression, zone, at, starts = case
    check(expression, zone, at, FIVE_FIELD_SPAN, starts)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(seconds=True, half_span=SIX_FIELD_SPAN))
def test_six_fields_match_the_oracle_around_every_transition(case: Case) -> None:
    expression, zone, at, starts = case
    check(expression, zone, at, SIX_FIELD_SPAN, starts)


def _exactly(*values: int) -> Rendered:
    return Rendered(",".join(str(value) for value in sorted(set(values))), frozenset(values))


def _every(spec: Spec) -> Rendered:
    return Rendered("*", frozenset(range(spec.low, spec.high + 1)))


def gaps() -> list[tuple[str, int]]:
    return [(zone, at) for zone, at in points()
            if _offset(ZoneInfo(zone), at) > _offset(ZoneInfo(zone), at - 1)]  # type: ignore[operator]


def test_every_gap_fires_its_fixed_times_once_after_it() -> None:
    """Random expressions rarely hit a gap, so every one gets fixed times inside it: its first
    skipped minute, its middle, and (with seconds) the last second before it with a skipped one."""
    assert len(gaps()) > 50
    days = (_every(DAY), _every(MONTH), _every(WEEKDAY))
    for zone_name, at in gaps():
        zone = ZoneInfo(zone_name)
        last = datetime.fromtimestamp(at - 1, zone)
        shift = datetime.fromtimestamp(at, zone).utcoffset() - last.utcoffset()  # type: ignore[operator]
        last = last.replace(tzinfo=None)
        first, middle = last + timedelta(seconds=1), last + shift / 2
        for wall in (first, middle):
            check(Expression(None, _exactly(wall.minute), _exactly(wall.hour), *days), zone, at, 2 * 3600, [0, 1])
        seconds = Expression(_exactly(last.second, middle.second), _exactly(last.minute, middle.minute),
                             _exactly(last.hour, middle.hour), *days)
        check(seconds, zone, at, SIX_FIELD_SPAN, [0, 1])
