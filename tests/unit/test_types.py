"""The package type-checks under mypy with the configuration in pyproject.toml ([tool.mypy])."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from support.package_tree import REPO, assemble

# Kept between runs: a cold check reads all of kubernetes_asyncio's client (about half a minute
# here); mypy revalidates every cached module against its source, so a warm one takes seconds.
CACHE = Path(tempfile.gettempdir()) / "restic-manager-mypy-cache"


def mypy(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).with_name("mypy")), "--config-file", str(REPO / "pyproject.toml"),
         "--cache-dir", str(CACHE), "--package", "restic_manager"],
        cwd=root, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"},
    )


def test_the_package_type_checks(tmp_path: Path) -> None:
    assemble(tmp_path)  # mypy maps modules to files one directory per package
    result = mypy(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout


def test_the_configuration_is_strict(tmp_path: Path) -> None:
    # Plain mypy accepts an unannotated function; the pyproject settings must not.
    package = tmp_path / "restic_manager"
    package.mkdir()
    (package / "__init__.py").write_text("def untyped(value):\n    return value\n")
    result = mypy(tmp_path)
    assert result.returncode == 1
    assert "[no-untyped-def]" in result.stdout
