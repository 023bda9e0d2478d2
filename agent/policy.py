"""What this host's owner lets the cluster make the agent do, and the check of every
``command.run`` against it before restic runs.

Whoever may create a ResticJob, a Schedule or a Repository in the Agent's namespace can ask
the agent for any backup, restore or repository; the host's owner, through the agent's own
config, decides which of those it carries out:

* ``backupPaths``: a backup may read only at or under these (default: ``/``, everything);
* ``restoreTargets``: a restore may write only at or under these (default: one dedicated
  directory, :data:`DEFAULT_RESTORE_TARGET`; ``/`` only if listed explicitly);
* ``repositories``: shell-style patterns a repository URL must match (default: ``*``).

The agent's own token file, state directory and config file are never backed up (a backup
that covers them gets them as ``--exclude``) and never restored into. Paths are compared
after the runner has resolved symbolic links (agent/runner.py): this module does no I/O.
"""

from __future__ import annotations

import fnmatch
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from restic_manager.protocol import BackupArgs, CommandRun, RestoreArgs

DEFAULT_BACKUP_PATHS = ("/",)
DEFAULT_RESTORE_TARGET = "/var/lib/restic-manager-restore"
DEFAULT_REPOSITORIES = ("*",)


@dataclass(frozen=True)
class HostPolicy:
    backup_paths: tuple[str, ...] = DEFAULT_BACKUP_PATHS
    restore_targets: tuple[str, ...] = (DEFAULT_RESTORE_TARGET,)
    repositories: tuple[str, ...] = DEFAULT_REPOSITORIES
    protected: tuple[str, ...] = ()  # the agent's own token file, state directory and config file

    def excluded(self, paths: Sequence[str]) -> list[str]:
        """The protected paths a backup of ``paths`` would otherwise read."""
        return [guarded for guarded in self.protected if any(_within(guarded, path) for path in paths)]


def paths_of(command: CommandRun) -> list[str]:
    """The host paths ``command`` reads (a backup's) or writes (a restore's target)."""
    if isinstance(command.args, BackupArgs):
        return list(command.args.paths)
    if isinstance(command.args, RestoreArgs):
        return [command.args.target]
    return []


def refusal(command: CommandRun, policy: HostPolicy, resolved: Mapping[str, str]) -> str | None:
    """Why this host does not carry out ``command`` (None: it does). ``resolved`` maps each of
    :func:`paths_of` to its real path, symbolic links followed."""
    url = command.repository.url
    if not any(fnmatch.fnmatchcase(url, pattern) for pattern in policy.repositories):
        return (f"this host's agent config does not allow the repository {url} "
                f"(repositories: {', '.join(policy.repositories)})")
    if isinstance(command.args, BackupArgs):
        for path in command.args.paths:
            if problem := _check(path, resolved, allowed=policy.backup_paths, what="backupPaths"):
                return f"backup of {path}: {problem}"
            if any(_within(resolved[path], guarded) for guarded in policy.protected):
                return f"backup of {path}: it is the agent's own token, state or config, which are never backed up"
    if isinstance(command.args, RestoreArgs):
        target = command.args.target
        if problem := _check(target, resolved, allowed=policy.restore_targets, what="restoreTargets"):
            return f"restore to {target}: {problem}"
        real = resolved[target]
        if any(_within(real, guarded) or _within(guarded, real) for guarded in policy.protected):
            return (f"restore to {target}: it holds or is inside the agent's own token, state or config, "
                    "which are never restored into")
    return None


def _check(path: str, resolved: Mapping[str, str], *, allowed: Sequence[str], what: str) -> str | None:
    if not PurePosixPath(path).is_absolute():
        return "not an absolute path"
    real = resolved.get(path, path)
    if not any(_within(real, root) for root in allowed):
        shown = real if real == posixpath.normpath(path) else f"{real} (where {path} leads)"
        return f"{shown} is not at or under a path this host's agent config allows ({what}: {', '.join(allowed)})"
    return None


def _within(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or below it (both absolute; compared as normalised paths)."""
    path, root = posixpath.normpath(path), posixpath.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")
