"""`restic-manager next` (SPEC §7): the fire times, one ISO 8601 line each, exactly as scheduled."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from restic_manager.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    code = main(["next", *argv])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


@pytest.mark.parametrize(
    ("argv", "lines"),
    [
        pytest.param(
            ["*/30 * * * *", "--tz", "Europe/London", "--after", "2026-10-25T00:45:00+01:00"],
            ["2026-10-25T01:00:00+01:00", "2026-10-25T01:30:00+01:00", "2026-10-25T01:00:00+00:00",
             "2026-10-25T01:30:00+00:00", "2026-10-25T02:00:00+00:00"],
            id="default-count-is-5-and-repeated-hour-fires-twice",
        ),
        pytest.param(
            ["30 1 * * *", "--tz", "Europe/London", "--after", "2026-10-24T12:00:00Z", "--count", "2"],
            ["2026-10-25T01:30:00+01:00", "2026-10-26T01:30:00+00:00"],
            id="fixed-time-once-in-repeated-hour",
        ),
        pytest.param(
            ["30 1 * * *", "--tz", "Europe/London", "--after", "2026-03-28T12:00:00Z", "--count", "2"],
            ["2026-03-29T02:00:00+01:00", "2026-03-30T01:30:00+01:00"],
            id="fixed-time-after-skipped-hour",
        ),
        pytest.param(
            ["0 2 * * *", "--after", "2026-01-01T02:00:00Z", "--count", "2"],
            ["2026-01-02T02:00:00+00:00", "2026-01-03T02:00:00+00:00"],
            id="strictly-after-and-utc-by-default",
        ),
        pytest.param(
            ["0 9 * * *", "--tz", "America/New_York", "--after", "2026-07-01T09:00", "--count", "1"],
            ["2026-07-02T09:00:00-04:00"],
            id="after-without-offset-is-read-in-tz",
        ),
        pytest.param(
            ["0 9 * * *", "--tz", "America/New_York", "--after", "2026-07-01T09:00:00+02:00", "--count", "1"],
            ["2026-07-01T09:00:00-04:00"],
            id="after-in-another-zone",
        ),
        pytest.param(
            ["*/20 * * * * *", "--after", "2026-01-01T00:00:00Z", "--count", "3"],
            ["2026-01-01T00:00:20+00:00", "2026-01-01T00:00:40+00:00", "2026-01-01T00:01:00+00:00"],
            id="seconds-first",
        ),
        pytest.param(
            ["@weekly", "--tz", "Australia/Lord_Howe", "--after", "2026-10-01T00:00:00+10:30", "--count", "2"],
            ["2026-10-04T00:00:00+10:30", "2026-10-11T00:00:00+11:00"],
            id="macro-across-half-hour-dst",
        ),
    ],
)
def test_prints_fire_times(capsys: pytest.CaptureFixture[str], argv: list[str], lines: list[str]) -> None:
    assert run(capsys, *argv) == (0, lines, "")


def test_name_resolves_h_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, err = run(capsys, "H H * * *", "--name", "backups/nightly", "--after", "2026-01-01T00:00:00Z",
                           "--count", "2")
    assert (code, lines) == (0, ["2026-01-01T04:08:00+00:00", "2026-01-02T04:08:00+00:00"])
    assert err == "# H H * * * resolves to 8 4 * * * for backups/nightly\n"

    code, other, _ = run(capsys, "H H * * *", "--name", "backups/weekly", "--after", "2026-01-01T00:00:00Z",
                         "--count", "2")
    assert code == 0 and other != lines


def test_after_defaults_to_now(capsys: pytest.CaptureFixture[str]) -> None:
    before = datetime.now(timezone.utc)
    code, lines, err = run(capsys, "* * * * * *")
    fires = [datetime.fromisoformat(line) for line in lines]
    assert (code, len(fires), err) == (0, 5, "")
    assert fires[0] > before
    assert [later - earlier for earlier, later in zip(fires, fires[1:])] == [timedelta(seconds=1)] * 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["61 * * * *"], "'61 * * * *': minute must be 0-59"),
        (["* * * *"], "'* * * *': expected 5 fields (or 6 with seconds first), got 4"),
        (["0 0 L * *"], "'0 0 L * *': day-of-month has 'L': L (the last day of the month) is not supported"),
        (["H(0-99) * * * *", "--name", "ns/a"],
         "'H(0-99) * * * *': minute has 'H(0-99)'; use H, H(a-b), H/n or H(a-b)/n with a<b in 0-59"),
        (["0 0 * * *", "--tz", "Mars/Base"], "unknown time zone 'Mars/Base'"),
        (["0 0 * * *", "--after", "yesterday"],
         "--after 'yesterday' is not an ISO 8601 time, e.g. 2026-10-25T00:00:00+01:00"),
        (["0 0 * * *", "--count", "0"], "--count must be at least 1"),
    ],
)
def test_bad_input_exits_non_zero_with_a_clear_message(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert run(capsys, *argv) == (2, [], f"restic-manager next: {message}\n")


def test_count_must_be_a_number(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["next", "0 0 * * *", "--count", "many"])
    assert exited.value.code == 2
    assert "argument --count: invalid int value: 'many'" in capsys.readouterr().err


# --- which modules each subcommand loads ---------------------------------------------------

# Runs a subcommand's --help in a fresh interpreter (the parser is built as for a real run,
# its module imported) and prints the top-level packages then loaded.
LOADED = """
import sys
from restic_manager.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(" ".join(sorted({name.split(".")[0] for name in sys.modules} | set(sys.modules))))
"""


def loaded_by(*argv: str) -> set[str]:
    result = subprocess.run([sys.executable, "-c", LOADED, *argv], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


@pytest.mark.parametrize(
    ("argv", "loads", "never"),
    [
        pytest.param(["agent", "--help"], {"restic_manager.agent.main"},
                     {"kopf", "kubernetes", "aiohttp", "restic_manager.operator"}, id="agent"),
        pytest.param(["operator", "--help"], {"restic_manager.operator.main", "kopf"}, set(), id="operator"),
        # croniter parses the expression.
        pytest.param(["next", "0 0 * * *", "--count", "1"], {"croniter"},
                     {"kopf", "restic_manager.operator", "restic_manager.agent"}, id="next"),
    ],
)
def test_a_subcommand_loads_only_its_own_module(argv: list[str], loads: set[str], never: set[str]) -> None:
    loaded = loaded_by(*argv)

    assert loads <= loaded
    assert not loaded & never


def test_the_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])

    out = capsys.readouterr().out
    assert exited.value.code == 0
    assert all(f"    {name} " in out for name in ("operator", "agent", "next"))
