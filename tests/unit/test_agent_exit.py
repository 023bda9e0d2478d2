"""An agent that cannot work stops at start with a message saying what to fix and an exit
status systemd does not restart it after (agent/retry.py's ExitCode); the process as a
host runs it, before it ever tries to connect."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from restic_manager.agent.retry import ExitCode

# Nothing listens there: any of these agents reaching its connection would retry for ever.
SERVER = "ws://127.0.0.1:9/agent"


def agent(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    argv = ["agent", "--config", str(tmp_path / "agent.yaml"), "--server", SERVER, "--insecure",
            "--token-file", str(token), "--agent-name", "web-01", *extra]
    (tmp_path / "agent.yaml").write_text("")
    return subprocess.run([sys.executable, "-m", "restic_manager.cli", *argv], capture_output=True, text=True,
                          timeout=60)


def under_a_file(tmp_path: Path) -> list[str]:
    (tmp_path / "file").write_text("")
    return ["--state-dir", str(tmp_path / "file" / "state")]


def state_file_is_a_directory(tmp_path: Path) -> list[str]:
    (tmp_path / "state" / "state.json").mkdir(parents=True)
    return ["--state-dir", str(tmp_path / "state")]


def no_restic(tmp_path: Path) -> list[str]:
    return ["--state-dir", str(tmp_path / "state"), "--restic", str(tmp_path / "no-restic")]


def no_server(tmp_path: Path) -> list[str]:
    return ["--state-dir", str(tmp_path / "state"), "--server", "https://operator.example.com"]


@pytest.mark.parametrize(("setup", "code", "says"), [
    (under_a_file, ExitCode.STATE, "/file/state: cannot write state.json.tmp there: Not a directory; give the agent "
                                   "a directory it may write (--state-dir, stateDir)"),
    (state_file_is_a_directory, ExitCode.STATE, "/state/state.json: cannot read it: Is a directory"),
    (no_restic, ExitCode.CONFIG, "/no-restic: No such file or directory; set --restic to the restic binary"),
    (no_server, ExitCode.CONFIG, "server 'https://operator.example.com' (from --server): expected wss://"),
], ids=["state-dir-not-writable", "state-unreadable", "restic-missing", "bad-server"])
def test_an_agent_that_cannot_work_stops_at_start_saying_why(
        tmp_path: Path, setup: Callable[[Path], list[str]], code: ExitCode, says: str) -> None:
    result = agent(tmp_path, *setup(tmp_path))
    assert result.returncode == code, result.stderr
    assert says in result.stderr
    assert "connected to the operator" not in result.stderr and "reconnecting" not in result.stderr
