"""The import direction of STYLE §3, enforced by import-linter (contracts in pyproject.toml):
cli on top, operator and agent side by side and independent, the session rules under them,
protocol and cron at the bottom; inside the operator, its layers, and decisions without I/O."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert "4 kept, 0 broken" in result.stdout


def test_a_wrong_way_import_is_caught(tmp_path: Path) -> None:
    package = assemble(tmp_path)
    for path, line in ((package / "agent" / "__init__.py", "from restic_manager import operator"),
                       (package / "protocol.py", "from restic_manager import cli")):
        path.write_text(path.read_text() + f"\n{line}\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "2 kept, 2 broken" in result.stdout
    broken = result.stdout.split("Broken contracts")[1]
    assert "CLI on top" in broken and "never import each other" in broken


@pytest.mark.parametrize(("module", "line", "broken"), [
    pytest.param("kube/client.py", "from restic_manager.operator import handlers", "The operator's layers import",
                 id="the API client imports the kopf handlers"),
    pytest.param("status/writer.py", "from restic_manager.operator.jobs import dispatch", "The operator's layers import",
                 id="status imports jobs"),
    pytest.param("jobs/fires.py", "import aiohttp", "The operator's decisions do no I/O",
                 id="a decision imports an HTTP client"),
    pytest.param("kube/cache.py", "from restic_manager.operator.kube import client", "The operator's decisions do no I/O",
                 id="the view imports the API client"),
])
def test_a_wrong_way_import_inside_the_operator_is_caught(tmp_path: Path, module: str, line: str,
                                                          broken: str) -> None:
    package = assemble(tmp_path)
    path = package / "operator" / module
    path.write_text(path.read_text() + f"\n{line}\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "3 kept, 1 broken" in result.stdout
    assert broken in result.stdout.split("Broken contracts")[1]
