"""`restic-manager agent`: command-line options and the process's top-level lifecycle."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `restic-manager agent`."""


def run(args: argparse.Namespace) -> int:
    print("restic-manager agent: not implemented yet", file=sys.stderr)
    return 2
