"""Cron expressions evaluated with restic-manager's time semantics (SPEC §4). Not implemented yet."""

from __future__ import annotations


class CronError(ValueError):
    pass
