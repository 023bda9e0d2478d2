"""`restic-manager operator`: command-line options and the process's top-level lifecycle."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `restic-manager operator`."""


def run(args: argparse.Namespace) -> int:
    print("restic-manager operator: not implemented yet", file=sys.stderr)
    return 2
