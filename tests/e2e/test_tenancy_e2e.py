"""Who may make a host do what (docs/deployment.md, "What a host allows"), on the real control
plane with the real operator, agent and restic: a tenant whose Role allows only Schedules,
ResticJobs and Repositories in its namespace asks the host's agent for what its owner did not
allow, and is refused before restic runs; what the owner allows still works."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from e2e.harness import World

pytestmark = [pytest.mark.cluster, pytest.mark.restic]

TENANT = "tenant"


def as_tenant(world: World, manifest: str) -> None:
    """``kubectl apply`` as the tenant's ServiceAccount (impersonated): its Role decides."""
    world.kubectl("apply", f"--as=system:serviceaccount:{world.namespace}:{TENANT}", "-f", "-",
                  input=textwrap.dedent(manifest))


def tenant_role(world: World) -> None:
    world.apply(f"""
        apiVersion: v1
        kind: ServiceAccount
        metadata: {{name: {TENANT}}}
        ---
        apiVersion: rbac.authorization.k8s.io/v1
        kind: Role
        metadata: {{name: {TENANT}}}
        rules:
          - apiGroups: [resticmanager.io]
            resources: [schedules, resticjobs, repositories]
            verbs: [get, list, watch, create, update, patch, delete]
        ---
        apiVersion: rbac.authorization.k8s.io/v1
        kind: RoleBinding
        metadata: {{name: {TENANT}}}
        roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {TENANT}}}
        subjects: [{{kind: ServiceAccount, name: {TENANT}, namespace: {world.namespace}}}]
    """)


def job(name: str, spec: dict[str, object]) -> str:
    return json.dumps({"apiVersion": "resticmanager.io/v1alpha1", "kind": "ResticJob", "metadata": {"name": name},
                       "spec": {"agent": "web-01", "repository": "local", **spec}})


def refused(world: World, name: str) -> str:
    world.wait(f"resticjob/{name}", "jsonpath={.status.phase}=Failed")
    status = (world.get(f"resticjob/{name}") or {})["status"]
    assert status["reason"] == "RefusedByAgent", status
    assert "startTime" not in status  # restic never started
    return str(status["message"])


def test_a_tenant_cannot_make_the_agent_read_its_own_files_or_write_outside_its_restore_directory(
    world: World, tmp_path: Path
) -> None:
    repository = world.repository()
    tree = world.source_tree()
    restores = tmp_path / "restores"
    restores.mkdir()
    host_root = tmp_path / "host-root"  # stands for the host's / (its .ssh and all)
    (host_root / ".ssh").mkdir(parents=True)
    world.start_operator()
    world.add_agent("web-01", extra=["--backup-path", str(world.directory), "--restore-target", str(restores)])
    tenant_role(world)

    # The agent's token lies under an allowed backup path, and is still never read.
    token = world.directory / "web-01.token"
    as_tenant(world, job("steal-token", {"type": "backup", "backup": {"paths": [str(token)]}}))
    assert refused(world, "steal-token") == (
        f"refused by this host: backup of {token}: it is the agent's own token, state or config, "
        "which are never backed up")
    as_tenant(world, job("outside", {"type": "backup", "backup": {"paths": ["/etc/passwd"]}}))
    assert "(backupPaths: " in refused(world, "outside")
    # A backup that covers the agent's own files succeeds without them.
    as_tenant(world, job("covers", {"type": "backup", "backup": {
        "paths": [str(world.directory)], "exclude": [str(repository), str(world.directory / "restic-cache")]}}))
    world.wait("resticjob/covers", "jsonpath={.status.phase}=Succeeded")
    listed = world.run_restic(repository, "ls", "--json", "latest")
    paths = {json.loads(line).get("path") for line in listed.splitlines()}
    assert str(token) not in paths and str(world.directory / "web-01-state") not in paths
    assert str(tree / "notes.txt") in paths

    as_tenant(world, job("to-root", {"type": "restore", "restore": {"target": str(host_root)}}))
    assert f"restore to {host_root}: {host_root} is not at or under" in refused(world, "to-root")
    (restores / "link").symlink_to(host_root)  # a link in the restore directory leads out of it
    as_tenant(world, job("via-link", {"type": "restore", "restore": {"target": str(restores / "link")}}))
    assert f"{host_root} (where {restores / 'link'} leads) is not at or under" in refused(world, "via-link")
    assert list((host_root / ".ssh").iterdir()) == []

    # Allowed: a restore into the host's restore directory gives back the bytes.
    as_tenant(world, job("allowed", {"type": "restore", "restore": {"target": str(restores / "web-01")}}))
    world.wait("resticjob/allowed", "jsonpath={.status.phase}=Succeeded")
    restored = restores / "web-01" / str(tree / "notes.txt").lstrip("/")
    assert restored.read_text() == (tree / "notes.txt").read_text()


def test_a_tenant_cannot_have_the_operator_hand_an_agent_a_secret_it_cannot_read(world: World) -> None:
    repository = world.repository()  # its password Secret is labelled: the cluster admin's choice
    tree = world.source_tree()
    world.apply("""
        apiVersion: v1
        kind: Secret
        metadata: {name: database}
        stringData: {DATABASE_PASSWORD: not-for-tenants}
    """)
    world.start_operator()
    world.add_agent("web-01")
    tenant_role(world)
    denied = world.kubectl("get", "secret/database", f"--as=system:serviceaccount:{world.namespace}:{TENANT}",
                           check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()

    as_tenant(world, f"""
        apiVersion: resticmanager.io/v1alpha1
        kind: Repository
        metadata: {{name: borrowed}}
        spec:
          url: {repository}
          passwordSecretRef: {{name: local-password, key: password}}
          envFrom: [{{secretRef: {{name: database}}}}]
    """)
    as_tenant(world, job("borrow", {"repository": "borrowed", "type": "backup",
                                    "backup": {"paths": [str(tree)]}}))
    world.wait("resticjob/borrow", "jsonpath={.status.reason}=SecretNotOptedIn")
    status = (world.get("resticjob/borrow") or {})["status"]
    assert status["phase"] == "Pending" and "Secret database is not labelled resticmanager.io/repository-secret=true" \
        in status["message"], status
    agent_files = [world.directory / "agent-web-01.log", *(world.directory / "web-01-state").iterdir()]
    assert not [path for path in agent_files if "not-for-tenants" in path.read_text(errors="replace")]

    # Allowed: once someone who may change the Secret labels it, the job runs with it.
    world.kubectl("label", "secret/database", "resticmanager.io/repository-secret=true")
    world.wait("resticjob/borrow", "jsonpath={.status.phase}=Succeeded")
