"""SPEC §4 "Cron syntax and time semantics": tables of (expression, zone, after) → fire times.

The hand-written tables pin the DST rules on real transitions, the syntax, H and the error
messages; test_cron_oracle.py checks the same rules against a brute-force oracle around every
transition of several zones over many years.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from restic_manager.cron import Cron, CronError


def fires(expression: str, zone: str, after: str, count: int, *, name: str = "") -> list[str]:
    cron = Cron(expression, zone, name=name)
    return [fire.isoformat() for fire in cron.iter_after(datetime.fromisoformat(after), count=count)]


# Transitions used below (2026):
#   Europe/London        29 Mar 01:00 GMT -> 02:00 BST     25 Oct 02:00 BST -> 01:00 GMT
#   America/New_York     8 Mar 02:00 EST -> 03:00 EDT      1 Nov 02:00 EDT -> 01:00 EST
#   Australia/Lord_Howe  4 Oct 02:00 +10:30 -> 02:30 +11   5 Apr 02:00 +11 -> 01:30 +10:30
#   America/Santiago     6 Sep 00:00 -04 -> 01:00 -03 (the whole first hour of the day is skipped)


def test_lord_howe_shifts_by_thirty_minutes() -> None:
    zone = ZoneInfo("Australia/Lord_Howe")
    assert datetime(2026, 4, 5, 1, 45, tzinfo=zone, fold=0).utcoffset() == timedelta(hours=11)
    assert datetime(2026, 4, 5, 1, 45, tzinfo=zone, fold=1).utcoffset() == timedelta(hours=10, minutes=30)


REPEATED_HOUR = [
    pytest.param(
        "*/30 * * * *", "Europe/London", "2026-10-25T00:45:00+01:00",
        ["2026-10-25T01:00:00+01:00", "2026-10-25T01:30:00+01:00", "2026-10-25T01:00:00+00:00",
         "2026-10-25T01:30:00+00:00", "2026-10-25T02:00:00+00:00"],
        id="london-every-30-min-keeps-cadence",
    ),
    pytest.param(
        "30 1 * * *", "Europe/London", "2026-10-24T12:00:00+01:00",
        ["2026-10-25T01:30:00+01:00", "2026-10-26T01:30:00+00:00"],
        id="london-fixed-fires-once-at-first-occurrence",
    ),
    pytest.param(
        "0 1-3 * * *", "Europe/London", "2026-10-24T12:00:00+01:00",
        ["2026-10-25T01:00:00+01:00", "2026-10-25T02:00:00+00:00", "2026-10-25T03:00:00+00:00",
         "2026-10-26T01:00:00+00:00"],
        id="london-fixed-range-skips-second-pass",
    ),
    pytest.param(
        "0 * * * *", "Europe/London", "2026-10-25T00:30:00+01:00",
        ["2026-10-25T01:00:00+01:00", "2026-10-25T01:00:00+00:00", "2026-10-25T02:00:00+00:00"],
        id="london-hourly-fires-both-occurrences",
    ),
    pytest.param(
        "30 1 * * *", "America/New_York", "2026-11-01T00:00:00-04:00",
        ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"],
        id="new-york-fixed",
    ),
    pytest.param(
        "*/30 * * * *", "America/New_York", "2026-11-01T00:45:00-04:00",
        ["2026-11-01T01:00:00-04:00", "2026-11-01T01:30:00-04:00", "2026-11-01T01:00:00-05:00",
         "2026-11-01T01:30:00-05:00", "2026-11-01T02:00:00-05:00"],
        id="new-york-every-30-min",
    ),
    pytest.param(
        "*/15 * * * *", "Australia/Lord_Howe", "2026-04-05T01:20:00+11:00",
        ["2026-04-05T01:30:00+11:00", "2026-04-05T01:45:00+11:00", "2026-04-05T01:30:00+10:30",
         "2026-04-05T01:45:00+10:30", "2026-04-05T02:00:00+10:30"],
        id="lord-howe-every-15-min-through-repeated-half-hour",
    ),
    pytest.param(
        "45 1 * * *", "Australia/Lord_Howe", "2026-04-04T12:00:00+11:00",
        ["2026-04-05T01:45:00+11:00", "2026-04-06T01:45:00+10:30"],
        id="lord-howe-fixed",
    ),
    pytest.param(
        "*/20 30 1 * * *", "America/New_York", "2026-11-01T01:00:00-04:00",
        ["2026-11-01T01:30:00-04:00", "2026-11-01T01:30:20-04:00", "2026-11-01T01:30:40-04:00",
         "2026-11-02T01:30:00-05:00"],
        id="seconds-fixed-fires-first-pass-only",
    ),
    pytest.param(
        "0 */30 * * * *", "Europe/London", "2026-10-25T01:15:00+01:00",
        ["2026-10-25T01:30:00+01:00", "2026-10-25T01:00:00+00:00", "2026-10-25T01:30:00+00:00"],
        id="seconds-every-30-min",
    ),
]


@pytest.mark.parametrize(("expression", "zone", "after", "expected"), REPEATED_HOUR)
def test_clocks_go_back_fixed_time_fires_once_others_at_every_occurrence(
    expression: str, zone: str, after: str, expected: list[str]
) -> None:
    assert fires(expression, zone, after, len(expected)) == expected


SKIPPED_HOUR = [
    pytest.param(
        "30 1 * * *", "Europe/London", "2026-03-28T12:00:00+00:00",
        ["2026-03-29T02:00:00+01:00", "2026-03-30T01:30:00+01:00"],
        id="london-fixed-fires-at-first-instant-after-gap",
    ),
    pytest.param(
        "0 1-3 * * *", "Europe/London", "2026-03-28T12:00:00+00:00",
        # 01:00 is skipped (one fire at 02:00, which 02:00 itself matches too), then 03:00.
        ["2026-03-29T02:00:00+01:00", "2026-03-29T03:00:00+01:00", "2026-03-30T01:00:00+01:00"],
        id="london-fixed-range-one-fire-for-gap-then-normal-times",
    ),
    pytest.param(
        "0-59/10 1 * * *", "Europe/London", "2026-03-28T12:00:00+00:00",
        ["2026-03-29T02:00:00+01:00", "2026-03-30T01:00:00+01:00"],
        id="london-six-skipped-matches-one-fire",
    ),
    pytest.param(
        "*/10 1 * * *", "Europe/London", "2026-03-28T12:00:00+00:00",
        ["2026-03-30T01:00:00+01:00", "2026-03-30T01:10:00+01:00"],
        id="london-same-times-written-with-star-are-not-fixed-and-skip",
    ),
    pytest.param(
        "*/30 * * * *", "Europe/London", "2026-03-29T00:00:00+00:00",
        ["2026-03-29T00:30:00+00:00", "2026-03-29T02:00:00+01:00", "2026-03-29T02:30:00+01:00"],
        id="london-every-30-min-skips",
    ),
    pytest.param(
        "30 * * * *", "Europe/London", "2026-03-29T00:00:00+00:00",
        ["2026-03-29T00:30:00+00:00", "2026-03-29T02:30:00+01:00"],
        id="london-hourly-at-30-skips",
    ),
    pytest.param(
        "30 2 * * *", "America/New_York", "2026-03-07T12:00:00-05:00",
        ["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"],
        id="new-york-fixed",
    ),
    pytest.param(
        "*/30 * * * *", "America/New_York", "2026-03-08T01:00:00-05:00",
        ["2026-03-08T01:30:00-05:00", "2026-03-08T03:00:00-04:00"],
        id="new-york-every-30-min-skips",
    ),
    pytest.param(
        "15 2 * * *", "Australia/Lord_Howe", "2026-10-03T12:00:00+10:30",
        ["2026-10-04T02:30:00+11:00", "2026-10-05T02:15:00+11:00"],
        id="lord-howe-fixed-half-hour-gap",
    ),
    pytest.param(
        "*/15 * * * *", "Australia/Lord_Howe", "2026-10-04T01:40:00+10:30",
        ["2026-10-04T01:45:00+10:30", "2026-10-04T02:30:00+11:00", "2026-10-04T02:45:00+11:00"],
        id="lord-howe-every-15-min-skips",
    ),
    pytest.param(
        "*/20 30 2 * * *", "America/New_York", "2026-03-08T00:00:00-05:00",
        ["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"],
        id="seconds-fixed-once",
    ),
    pytest.param(
        "@daily", "America/Santiago", "2026-09-05T12:00:00-04:00",
        ["2026-09-06T01:00:00-03:00", "2026-09-07T00:00:00-03:00"],
        id="daily-macro-is-fixed-time-midnight-skipped",
    ),
    # From the last second before the gap, and from the instant before that: the catch-up
    # at the first instant after the gap is the very next fire.
    pytest.param(
        "30 1 * * *", "Europe/London", "2026-03-29T00:59:59+00:00",
        ["2026-03-29T02:00:00+01:00", "2026-03-30T01:30:00+01:00"],
        id="london-fixed-from-the-last-second-before-the-gap",
    ),
    pytest.param(
        "30 1 * * *", "Europe/London", "2026-03-29T00:59:59.500000+00:00",
        ["2026-03-29T02:00:00+01:00"],
        id="london-fixed-from-within-the-last-second-before-the-gap",
    ),
    pytest.param(
        "59 59 0 * * *", "Europe/London", "2026-03-29T00:59:59+00:00",
        ["2026-03-30T00:59:59+01:00"],
        id="london-a-fire-in-the-last-second-before-a-gap-it-does-not-match",
    ),
    pytest.param(
        "15 2 * * *", "Australia/Lord_Howe", "2026-10-04T01:59:59+10:30",
        ["2026-10-04T02:30:00+11:00"],
        id="lord-howe-fixed-from-the-last-second-before-the-half-hour-gap",
    ),
    # The search starting at the last second before the gap (the instant after 01:59:58),
    # and a previous fire in that last second: the catch-up still follows.
    pytest.param(
        "30 2 * * *", "America/New_York", "2027-03-14T01:59:58-05:00",
        ["2027-03-14T03:00:00-04:00", "2027-03-15T02:30:00-04:00"],
        id="new-york-fixed-searched-from-the-last-second-before-the-gap",
    ),
    pytest.param(
        "30 2 * * *", "America/New_York", "2027-03-14T01:59:59.250000-05:00",
        ["2027-03-14T03:00:00-04:00"],
        id="new-york-fixed-from-within-the-last-second-before-the-gap",
    ),
    pytest.param(
        "59,0 59,30 1,2 * * *", "America/New_York", "2027-03-14T01:59:58-05:00",
        ["2027-03-14T01:59:59-05:00", "2027-03-14T03:00:00-04:00", "2027-03-15T01:30:00-04:00"],
        id="new-york-seconds-fire-in-the-last-second-then-the-catch-up",
    ),
]


@pytest.mark.parametrize(("expression", "zone", "after", "expected"), SKIPPED_HOUR)
def test_clocks_go_forward_fixed_time_fires_once_after_gap_others_skip(
    expression: str, zone: str, after: str, expected: list[str]
) -> None:
    assert fires(expression, zone, after, len(expected)) == expected


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        # From inside the first pass: the rest of it, then the whole second pass.
        ("*/15 * * * *", "2026-10-25T01:20:00+01:00",
         ["2026-10-25T01:30:00+01:00", "2026-10-25T01:45:00+01:00", "2026-10-25T01:00:00+00:00"]),
        ("5 * * * *", "2026-10-25T01:20:00+01:00", ["2026-10-25T01:05:00+00:00", "2026-10-25T02:05:00+00:00"]),
        # From inside the second pass.
        ("*/15 * * * *", "2026-10-25T01:20:00+00:00", ["2026-10-25T01:30:00+00:00"]),
        ("30 1 * * *", "2026-10-25T01:40:00+01:00", ["2026-10-26T01:30:00+00:00"]),
        ("30 1 * * *", "2026-10-25T01:10:00+00:00", ["2026-10-26T01:30:00+00:00"]),
        # Exactly on the change of offset.
        ("*/30 * * * *", "2026-10-25T01:00:00+00:00", ["2026-10-25T01:30:00+00:00"]),
        ("*/30 * * * *", "2026-10-25T00:59:59+00:00", ["2026-10-25T01:00:00+00:00"]),
    ],
)
def test_starting_inside_the_repeated_hour(expression: str, after: str, expected: list[str]) -> None:
    assert fires(expression, "Europe/London", after, len(expected)) == expected


@pytest.mark.parametrize(
    ("expression", "fixed"),
    [
        ("30 2 * * *", True),
        ("0 1-3 * * *", True),
        ("0,30 1,13 * * *", True),
        ("*/15 * * * *", False),
        ("0 */2 * * *", False),
        ("* 2 * * *", False),
        ("30 * * * *", False),
        ("* 30 2 * * *", True),  # seconds don't count: only minute and hour do
        ("0 */5 2 * * *", False),
        ("@daily", True),
        ("@weekly", True),
        ("@monthly", True),
        ("@yearly", True),
        ("@hourly", False),
        ("H H * * *", True),
        ("H * * * *", False),
        ("@hourly-random", False),
        ("@daily-random", True),
    ],
)
def test_fixed_time_is_neither_minute_nor_hour_starting_with_star(expression: str, fixed: bool) -> None:
    assert Cron(expression).fixed_time is fixed


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        ("*/20 * * * * *", "2026-01-01T00:00:00+00:00",
         ["2026-01-01T00:00:20+00:00", "2026-01-01T00:00:40+00:00", "2026-01-01T00:01:00+00:00"]),
        ("* * * * * *", "2026-01-01T00:00:00.250000+00:00",
         ["2026-01-01T00:00:01+00:00", "2026-01-01T00:00:02+00:00"]),
        ("15,45 30 12 * * *", "2026-01-01T12:30:15+00:00",
         ["2026-01-01T12:30:45+00:00", "2026-01-02T12:30:15+00:00"]),
        ("0 0 0 1 1 *", "2026-06-01T00:00:00+00:00", ["2027-01-01T00:00:00+00:00"]),
    ],
)
def test_six_fields_have_seconds_first(expression: str, after: str, expected: list[str]) -> None:
    cron = Cron(expression)
    assert cron.has_seconds
    assert fires(expression, "UTC", after, len(expected)) == expected


def test_five_fields_fire_on_whole_minutes() -> None:
    cron = Cron("* * * * *")
    assert not cron.has_seconds
    assert fires("* * * * *", "UTC", "2026-01-01T00:00:30+00:00", 2) == [
        "2026-01-01T00:01:00+00:00", "2026-01-01T00:02:00+00:00"]


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        # Both restricted: the 13th or any Friday (Feb 2026: Fridays 6, 13, 20; 13th is a Friday).
        ("0 0 13 * FRI", "2026-02-01T00:00:00+00:00",
         ["2026-02-06T00:00:00+00:00", "2026-02-13T00:00:00+00:00", "2026-02-20T00:00:00+00:00",
          "2026-02-27T00:00:00+00:00", "2026-03-06T00:00:00+00:00", "2026-03-13T00:00:00+00:00"]),
        ("0 0 1,15 * 1", "2026-06-01T00:00:00+00:00",
         ["2026-06-08T00:00:00+00:00", "2026-06-15T00:00:00+00:00", "2026-06-22T00:00:00+00:00"]),
        # Only one restricted: that one alone decides.
        ("0 0 13 * *", "2026-02-01T00:00:00+00:00", ["2026-02-13T00:00:00+00:00", "2026-03-13T00:00:00+00:00"]),
        ("0 0 * * FRI", "2026-02-01T00:00:00+00:00", ["2026-02-06T00:00:00+00:00", "2026-02-13T00:00:00+00:00"]),
        # A field starting with * counts as unrestricted (cronie): odd days that are Fridays.
        ("0 0 */2 * FRI", "2026-02-01T00:00:00+00:00", ["2026-02-13T00:00:00+00:00", "2026-02-27T00:00:00+00:00"]),
        # Feb 29 exists only in leap years.
        ("0 0 29 2 *", "2026-01-01T00:00:00+00:00", ["2028-02-29T00:00:00+00:00", "2032-02-29T00:00:00+00:00"]),
    ],
)
def test_day_of_month_or_day_of_week(expression: str, after: str, expected: list[str]) -> None:
    assert fires(expression, "UTC", after, len(expected)) == expected


@pytest.mark.parametrize(
    ("macro", "equivalent"),
    [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
        ("@DAILY", "0 0 * * *"),
    ],
)
def test_macros(macro: str, equivalent: str) -> None:
    after = "2026-10-24T00:00:00+01:00"
    assert fires(macro, "Europe/London", after, 30) == fires(equivalent, "Europe/London", after, 30)
    assert Cron(macro).resolved == macro


@pytest.mark.parametrize(
    ("named", "numbered"),
    [
        ("0 0 * JAN,mar,Dec *", "0 0 * 1,3,12 *"),
        ("0 0 * * MON-FRI", "0 0 * * 1-5"),
        ("0 0 * * sun", "0 0 * * 0"),
        ("0 0 * * 7", "0 0 * * 0"),
        ("0 0 * * 5-7", "0 0 * * 0,5,6"),
        ("0 0 * FEB-NOV/3 SAT", "0 0 * 2,5,8,11 6"),
        ("10/20 * * * *", "10,30,50 * * * *"),
        ("0 0 1-10/3 * *", "0 0 1,4,7,10 * *"),
        ("0 0 ? * MON", "0 0 * * 1"),
        # a/n runs to the field's end; in day-of-week that is Saturday (croniter).
        ("0 0 * * 1/2", "0 0 * * 1,3,5"),
        ("0 0 * * 0-7", "0 0 * * *"),
        ("h 0 * * *", "H 0 * * *"),
    ],
)
def test_names_ranges_and_steps(named: str, numbered: str) -> None:
    after = "2026-01-01T00:00:00+00:00"
    assert fires(named, "UTC", after, 20) == fires(numbered, "UTC", after, 20)


def test_results_are_in_the_schedules_zone_whatever_zone_the_instant_is_in() -> None:
    cron = Cron("30 9 * * *", "America/New_York")
    for after in ("2026-07-01T12:00:00+00:00", "2026-07-01T08:00:00-04:00", "2026-07-01T21:30:00+09:30"):
        fire = cron.next_after(datetime.fromisoformat(after))
        assert fire.tzinfo == ZoneInfo("America/New_York")
        assert fire.isoformat() == "2026-07-01T09:30:00-04:00"


def test_next_after_is_strictly_after() -> None:
    cron = Cron("0 2 * * *")
    assert cron.next_after(datetime(2026, 1, 1, 2, tzinfo=timezone.utc)).isoformat() == "2026-01-02T02:00:00+00:00"
    assert cron.next_after(datetime(2026, 1, 1, 1, 59, 59, 999999, tzinfo=timezone.utc)).isoformat() == (
        "2026-01-01T02:00:00+00:00")


def test_iter_after_yields_count_fires() -> None:
    cron = Cron("0 * * * *")
    after = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert list(cron.iter_after(after, count=0)) == []
    assert len(list(cron.iter_after(after, count=7))) == 7


@pytest.mark.parametrize("call", ["next_after", "iter_after", "latest_between"])
def test_naive_datetimes_are_refused(call: str) -> None:
    cron = Cron("* * * * *")
    naive = datetime(2026, 1, 1)
    with pytest.raises(ValueError, match="has no time zone"):
        if call == "next_after":
            cron.next_after(naive)
        elif call == "iter_after":
            cron.iter_after(naive, count=1)
        else:
            cron.latest_between(naive, datetime(2026, 1, 2, tzinfo=timezone.utc))


# --- H and @*-random -------------------------------------------------------------------------

# Pinned: a Schedule keeps its time across processes, hosts and releases (a croniter that
# hashed differently would move every H schedule, and fails here first).
@pytest.mark.parametrize(
    ("expression", "name", "resolved"),
    [
        ("H H * * *", "backups/nightly", "8 4 * * *"),
        ("H H * * *", "backups/weekly", "1 5 * * *"),
        ("H H * * *", "", "41 20 * * *"),
        ("@hourly-random", "backups/nightly", "8 * * * *"),
        ("@daily-random", "backups/nightly", "8 4 * * *"),
        ("@weekly-random", "backups/nightly", "8 4 * * 3"),
        ("@monthly-random", "backups/nightly", "8 4 14 * *"),
        ("H/15 * * * *", "backups/nightly", "8-59/15 * * * *"),
        ("H(0-29)/15 H(1-4) * * *", "backups/nightly", "8-29/15 1 * * *"),
        ("0 H/4 * * *", "backups/nightly", "0 0-23/4 * * *"),
        ("0 H 1 * MON", "backups/nightly", "0 4 1 * MON"),
        ("0 H,30 H * * *", "backups/nightly", "0 8,30 4 * * *"),
        ("h h * * *", "backups/nightly", "8 4 * * *"),
        # Any field, seconds too.
        ("H H H H H H", "backups/nightly", "34 8 4 19 2 3"),
    ],
)
def test_hash_resolution_is_stable(expression: str, name: str, resolved: str) -> None:
    cron = Cron(expression, name=name)
    assert cron.resolved == resolved
    assert cron.expression == expression
    after = "2026-01-01T00:00:00+00:00"
    assert fires(expression, "UTC", after, 10, name=name) == fires(resolved, "UTC", after, 10)


def test_expression_without_hash_resolves_to_itself() -> None:
    assert Cron("0  2 * * *", name="ns/a").resolved == "0  2 * * *"


NAMES = [f"team-{index % 7}/backup-{index}" for index in range(200)]


def _resolved_fields(expression: str, name: str) -> list[int]:
    return [int(value) for value in Cron(expression, name=name).resolved.split() if value != "*"]


def test_hash_spreads_schedules_over_the_day() -> None:
    times = [tuple(_resolved_fields("H H * * *", name)) for name in NAMES]
    assert times == [tuple(_resolved_fields("H H * * *", name)) for name in NAMES]
    assert len({minute for minute, _ in times}) >= 50
    assert len({hour for _, hour in times}) == 24
    assert len(set(times)) >= 180


def test_hash_respects_ranges() -> None:
    for name in NAMES:
        minute, hour = _resolved_fields("H(15-44) H(1-4) * * *", name)
        assert 15 <= minute <= 44 and 1 <= hour <= 4
        minute, hour, day = _resolved_fields("@monthly-random", name)
        assert 1 <= day <= 28
        *_, weekday = _resolved_fields("@weekly-random", name)
        assert 0 <= weekday <= 6
        start = Cron("H/15 * * * *", name=name).resolved.split()[0]
        assert start.endswith("-59/15") and 0 <= int(start.split("-")[0]) < 15
    assert {tuple(_resolved_fields("@monthly-random", name))[2] for name in NAMES} == set(range(1, 29))
    assert {tuple(_resolved_fields("@weekly-random", name))[2] for name in NAMES} == set(range(7))


def test_random_macros_agree_with_h() -> None:
    for name in NAMES[:20]:
        assert Cron("@daily-random", name=name).resolved == Cron("H H * * *", name=name).resolved


# --- errors ----------------------------------------------------------------------------------

SYNTAX = "a value, a-b, */n, a/n, a-b/n, H, H(a-b), H/n, or a list of those"


@pytest.mark.parametrize(
    ("expression", "zone", "message"),
    [
        ("61 * * * *", "UTC", "'61 * * * *': minute must be 0-59"),
        ("0 24 * * *", "UTC", "'0 24 * * *': hour must be 0-23"),
        ("0 0 0 * *", "UTC", "'0 0 0 * *': day-of-month must be 1-31"),
        ("0 0 * 13 *", "UTC", "'0 0 * 13 *': month must be 1-12 or JAN-DEC"),
        ("0 0 * * 8", "UTC", "'0 0 * * 8': day-of-week must be 0-7 or SUN-SAT"),
        ("60 0 0 * * *", "UTC", "'60 0 0 * * *': second must be 0-59"),
        ("0 0 * FOO *", "UTC", "'0 0 * FOO *': month has 'FOO'; use 1-12 or JAN-DEC: " + SYNTAX),
        ("x * * * *", "UTC", "'x * * * *': minute has 'x'; use 0-59: " + SYNTAX),
        ("1,,2 * * * *", "UTC", "'1,,2 * * * *': minute has '1,,2'; use 0-59: " + SYNTAX),
        ("-5 * * * *", "UTC", "'-5 * * * *': minute has '-5'; use 0-59: " + SYNTAX),
        ("? * * * *", "UTC", "'? * * * *': minute has '?'; use 0-59: " + SYNTAX),
        ("0 0 ?/2 * *", "UTC", "'0 0 ?/2 * *': day-of-month has '?/2'; use 1-31: " + SYNTAX),
        ("*/0 * * * *", "UTC", "'*/0 * * * *': minute step must be a positive whole number, not '0'"),
        ("*/x * * * *", "UTC", "'*/x * * * *': minute step must be a positive whole number, not 'x'"),
        ("0 5-1 * * *", "UTC", "'0 5-1 * * *': hour range '5-1' runs backwards"),
        ("0 0 * * FRI-MON", "UTC", "'0 0 * * FRI-MON': day-of-week range 'FRI-MON' runs backwards"),
        ("0 0 * * 7-0", "UTC", "'0 0 * * 7-0': day-of-week range '7-0' runs backwards"),
        # croniter reads a range with equal ends as the whole field.
        ("0 2-2 * * *", "UTC", "'0 2-2 * * *': hour range '2-2' has equal ends; write 2"),
        ("0 0 * * MON-1/2", "UTC", "'0 0 * * MON-1/2': day-of-week range 'MON-1' has equal ends; write MON"),
        ("* * * *", "UTC", "'* * * *': expected 5 fields (or 6 with seconds first), got 4"),
        ("* * * * * * *", "UTC", "'* * * * * * *': expected 5 fields (or 6 with seconds first), got 7"),
        # croniter's seventh field, the year, is not SPEC's.
        ("0 0 0 1 1 * 2030", "UTC", "'0 0 0 1 1 * 2030': expected 5 fields (or 6 with seconds first), got 7"),
        ("", "UTC", "'': expected 5 fields (or 6 with seconds first), got 0"),
        ("0 0 30 2 *", "UTC", "'0 0 30 2 *': day-of-month 30 never occurs in month 2"),
        ("0 0 31 4,JUN *", "UTC", "'0 0 31 4,JUN *': day-of-month 31 never occurs in month 4,JUN"),
        # What croniter reads beyond SPEC is refused, naming the token.
        ("0 0 L * *", "UTC", "'0 0 L * *': day-of-month has 'L': L (the last day of the month) is not supported"),
        ("0 0 1-L * *", "UTC", "'0 0 1-L * *': day-of-month has '1-L': L (the last day of the month) is not supported"),
        ("0 0 15W * *", "UTC", "'0 0 15W * *': day-of-month has '15W': W (the nearest weekday) is not supported"),
        ("0 0 * * 5#2", "UTC",
         "'0 0 * * 5#2': day-of-week has '5#2': # (the nth such weekday of the month) is not supported"),
        ("0 0 * * l5", "UTC",
         "'0 0 * * l5': day-of-week has 'l5': L (the last such weekday of the month) is not supported"),
        ("R * * * *", "UTC", "'R * * * *': minute has 'R': R, a new random value at every evaluation, is not "
         "supported; H gives a value fixed by the Schedule's name"),
        ("H(5) * * * *", "UTC", "'H(5) * * * *': minute has 'H(5)'; use H, H(a-b), H/n or H(a-b)/n with a<b in 0-59"),
        ("H(0-60) * * * *", "UTC",
         "'H(0-60) * * * *': minute has 'H(0-60)'; use H, H(a-b), H/n or H(a-b)/n with a<b in 0-59"),
        ("H(9-3) * * * *", "UTC",
         "'H(9-3) * * * *': minute has 'H(9-3)'; use H, H(a-b), H/n or H(a-b)/n with a<b in 0-59"),
        ("0 0 * * H/0", "UTC",
         "'0 0 * * H/0': day-of-week has 'H/0'; use H, H(a-b), H/n or H(a-b)/n with a<b in 0-7 or SUN-SAT"),
        ("@fortnightly", "UTC", "'@fortnightly': unknown macro; use one of @yearly, @annually, @monthly, "
         "@weekly, @daily, @midnight, @hourly, @hourly-random, @daily-random, @weekly-random, @monthly-random"),
        ("0 0 * * *", "Mars/Base", "unknown time zone 'Mars/Base'"),
        ("0 0 * * *", "", "unknown time zone ''"),
        ("0 0 * * *", "Europe", "unknown time zone 'Europe'"),
        ("0 0 * * *", "../etc/passwd", "unknown time zone '../etc/passwd'"),
    ],
)
def test_errors_name_the_field_and_the_problem(expression: str, zone: str, message: str) -> None:
    with pytest.raises(CronError) as caught:
        Cron(expression, zone)
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)


# --- latest_between --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("expression", "zone", "after", "until", "expected"),
    [
        ("0 2 * * *", "UTC", "2026-01-01T00:00:00+00:00", "2026-01-05T12:00:00+00:00", "2026-01-05T02:00:00+00:00"),
        # `after` is exclusive, `until` inclusive.
        ("0 2 * * *", "UTC", "2026-01-05T02:00:00+00:00", "2026-01-06T02:00:00+00:00", "2026-01-06T02:00:00+00:00"),
        ("0 2 * * *", "UTC", "2026-01-05T02:00:00+00:00", "2026-01-06T01:59:59+00:00", None),
        ("0 2 * * *", "UTC", "2026-01-06T00:00:00+00:00", "2026-01-05T00:00:00+00:00", None),
        ("0 2 * * *", "UTC", "2026-01-06T00:00:00+00:00", "2026-01-06T00:00:00+00:00", None),
        ("* * * * * *", "UTC", "2026-01-01T00:00:00+00:00", "2026-01-08T00:00:00.5+00:00", "2026-01-08T00:00:00+00:00"),
        ("0 0 29 2 *", "UTC", "2026-01-01T00:00:00+00:00", "2036-01-01T00:00:00+00:00", "2032-02-29T00:00:00+00:00"),
        ("*/30 * * * *", "Europe/London", "2026-10-25T00:00:00+00:00", "2026-10-25T01:20:00+00:00",
         "2026-10-25T01:00:00+00:00"),
        ("30 1 * * *", "Europe/London", "2026-10-25T00:00:00+00:00", "2026-10-25T01:40:00+00:00",
         "2026-10-25T01:30:00+01:00"),
        ("30 1 * * *", "Europe/London", "2026-03-28T12:00:00+00:00", "2026-03-29T03:00:00+01:00",
         "2026-03-29T02:00:00+01:00"),
    ],
)
def test_latest_between(expression: str, zone: str, after: str, until: str, expected: str | None) -> None:
    latest = Cron(expression, zone).latest_between(datetime.fromisoformat(after), datetime.fromisoformat(until))
    assert (latest.isoformat() if latest else None) == expected


@pytest.mark.parametrize(
    ("expression", "span"),
    [("* * * * * *", timedelta(days=7)), ("*/5 * * * *", timedelta(days=365)), ("0 3 * * *", timedelta(days=3650))],
)
def test_latest_between_is_a_search_not_a_walk(
    monkeypatch: pytest.MonkeyPatch, expression: str, span: timedelta
) -> None:
    """Each look-up of the next fire is counted: the work grows with log(span), not with the
    number of fires in the span (a week of every second is 604,800 of them)."""
    calls = 0
    original = Cron._first_fire_from

    def counted(self: Cron, start: int) -> int:
        nonlocal calls
        calls += 1
        return original(self, start)

    monkeypatch.setattr(Cron, "_first_fire_from", counted)
    after = datetime(2026, 1, 1, 0, 0, 0, 500000, tzinfo=timezone.utc)
    latest = Cron(expression, "Europe/London").latest_between(after, after + span)
    assert latest is not None and latest <= after + span
    assert calls <= 40
