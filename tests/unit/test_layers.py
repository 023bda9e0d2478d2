"""The import direction of STYLE §3, enforced by import-linter (contracts in pyproject.toml):
cli on top, operator and agent side by side and independent, the session rules under them,
protocol and cron at the bottom."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from support.package_tree import REPO, assemble


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=root, capture_output=True,
        text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
    )


def test_import_contracts_hold(tmp_path: Path) -> None:
    assemble(tmp_path)  # import-linter walks one directory per package
    result = lint_imports(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_a_wrong_way_import_is_caught(tmp_path: Path) -> None:
    package = tmp_path / "restic_manager"
    (package / "agent").mkdir(parents=True)
    (package / "operator").mkdir()
    for module in ("__init__.py", "protocol.py", "cron.py", "cli.py", "session.py"):
        (package / module).write_text("")
    (package / "operator" / "__init__.py").write_text("")
    (package / "agent" / "__init__.py").write_text("from restic_manager import operator\n")
    (package / "protocol.py").write_text("from restic_manager import cli\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "0 kept, 2 broken" in result.stdout
