"""The package in its installed shape, for tools that read source trees rather than imports.

On disk operator/ and agent/ sit beside restic_manager/; pyproject's package-dir installs them
as restic_manager.operator and restic_manager.agent. Tools that walk one directory per
package (import-linter, mypy) need the installed shape, assembled here as a wheel would.
"""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def assemble(root: Path) -> Path:
    """Copy the package into `root` in its installed shape; returns `root`/restic_manager."""
    package = root / "restic_manager"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "restic_manager", package, ignore=ignore)
    shutil.copytree(REPO / "operator", package / "operator", ignore=ignore)
    shutil.copytree(REPO / "agent", package / "agent", ignore=ignore)
    return package
