"""What the host's owner allows (agent/policy.py): each command.run is checked against the
agent's own config before restic runs; the agent's own token, state and config are never
backed up or restored into."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from restic_manager import protocol
from restic_manager.agent.policy import DEFAULT_RESTORE_TARGET, HostPolicy, paths_of, refusal

OWN = ("/etc/restic-manager/token", "/var/lib/restic-manager", "/etc/restic-manager/agent.yaml")
DEFAULTS = HostPolicy(protected=OWN)
NARROW = HostPolicy(backup_paths=("/srv", "/home"), restore_targets=("/srv/restore",),
                    repositories=("s3:https://s3.example.com/backups/*",), protected=OWN)


def command(job_type: str, args: dict[str, Any], *, url: str = "s3:https://s3.example.com/backups/web") -> protocol.CommandRun:
    return msgspec.convert({"job": "ns/j", "type": job_type, "args": args,
                            "repository": {"url": url, "env": {"RESTIC_PASSWORD": "pw"}}}, protocol.CommandRun)


CASES = [
    # (case, policy, job type, args, url, real paths where they differ, refusal (a part of it) or None)
    ("a backup of anything, by default", DEFAULTS, "backup", {"paths": ["/etc", "/home"]}, None, {}, None),
    ("a backup of the agent's token", DEFAULTS, "backup", {"paths": ["/etc/restic-manager/token"]}, None, {},
     "backup of /etc/restic-manager/token: it is the agent's own token, state or config"),
    ("a backup inside its state directory", DEFAULTS, "backup", {"paths": ["/var/lib/restic-manager/state.json"]},
     None, {}, "never backed up"),
    ("a backup through a link to its state", DEFAULTS, "backup", {"paths": ["/srv/innocent"]}, None,
     {"/srv/innocent": "/var/lib/restic-manager"}, "never backed up"),
    ("a relative backup path", DEFAULTS, "backup", {"paths": ["etc"]}, None, {}, "backup of etc: not an absolute path"),
    ("a backup under an allowed path", NARROW, "backup", {"paths": ["/srv/www", "/home"]}, None, {}, None),
    ("a backup outside them", NARROW, "backup", {"paths": ["/srv", "/etc/passwd"]}, None, {},
     "backup of /etc/passwd: /etc/passwd is not at or under a path this host's agent config allows "
     "(backupPaths: /srv, /home)"),
    ("a backup that climbs out with ..", NARROW, "backup", {"paths": ["/srv/../etc"]}, None,
     {"/srv/../etc": "/etc"}, "backup of /srv/../etc: /etc is not at or under"),
    ("a prefix is not a parent", NARROW, "backup", {"paths": ["/srvx"]}, None, {}, "is not at or under"),
    ("a restore into the default directory", DEFAULTS, "restore", {"target": f"{DEFAULT_RESTORE_TARGET}/web-01"},
     None, {}, None),
    ("a restore to /", DEFAULTS, "restore", {"target": "/"}, None, {},
     f"restore to /: / is not at or under a path this host's agent config allows (restoreTargets: {DEFAULT_RESTORE_TARGET})"),
    ("a restore to /root/.ssh", DEFAULTS, "restore", {"target": "/root/.ssh"}, None, {}, "is not at or under"),
    ("a restore through a link out of the directory", DEFAULTS, "restore",
     {"target": f"{DEFAULT_RESTORE_TARGET}/x"}, None, {f"{DEFAULT_RESTORE_TARGET}/x": "/root"}, "where"),
    ("a restore to / that the owner allows", HostPolicy(restore_targets=("/",), protected=OWN), "restore",
     {"target": "/"}, None, {}, "it holds or is inside the agent's own token, state or config"),
    ("a restore into its state directory", HostPolicy(restore_targets=("/var",), protected=OWN), "restore",
     {"target": "/var/lib/restic-manager/x"}, None, {}, "never restored into"),
    ("a repository it allows", NARROW, "forget", {"keepLast": 1}, None, {}, None),
    ("a repository it does not", NARROW, "prune", {}, "/tmp/tenant-repo", {},
     "this host's agent config does not allow the repository /tmp/tenant-repo "
     "(repositories: s3:https://s3.example.com/backups/*)"),
]


@pytest.mark.parametrize(("policy", "job_type", "args", "url", "real", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_refusal(policy: HostPolicy, job_type: str, args: dict[str, Any], url: str | None,
                 real: dict[str, str], expected: str | None) -> None:
    run = command(job_type, args, **({"url": url} if url else {}))
    resolved = {path: real.get(path, path) for path in paths_of(run)}
    found = refusal(run, policy, resolved)
    if expected is None:
        assert found is None
    else:
        assert found is not None and expected in found, found


def test_a_backup_that_covers_the_agents_own_files_leaves_them_out() -> None:
    assert DEFAULTS.excluded(["/"]) == list(OWN)
    assert DEFAULTS.excluded(["/etc"]) == ["/etc/restic-manager/token", "/etc/restic-manager/agent.yaml"]
    assert DEFAULTS.excluded(["/home"]) == []
