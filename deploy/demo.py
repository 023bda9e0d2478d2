"""`make demo`: the whole system on this machine, making real restic backups.

Starts a local control plane (etcd, kube-apiserver, kube-controller-manager) with the CRDs,
the operator, and one agent; applies the examples in deploy/examples (a Repository in a
local directory, an Agent, a Schedule backing up a generated tree every 20 seconds); then
shows `kubectl get restic` as it changes until Ctrl-C or for $DEMO_SECONDS seconds, lists
the snapshots restic made, and tears everything down.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "testbin"))
import build  # noqa: E402
import controlplane  # noqa: E402

EXAMPLES = REPO / "deploy" / "examples"
WORK = Path("/var/tmp/restic-manager-demo")  # the paths the examples name
LOCAL = REPO / ".local" / "demo"
NAMESPACE = "default"
AGENT = "demo-host"
REFRESH_SECONDS = 2.0


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"==> {text}", flush=True)


def make_example_tree(root: Path) -> None:
    """A small tree to back up, changed a little before each view so snapshots differ."""
    for index in range(50):
        path = root / f"dir{index % 5}" / f"file{index}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"restic-manager demo file {index}\n" * (index + 1))


def wait_for_token(plane: controlplane.ControlPlane, *, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        agent = json.loads(plane.kubectl("-n", NAMESPACE, "get", "agent", AGENT, "-o", "json").stdout)
        secret_name = agent.get("status", {}).get("tokenSecretName")
        if secret_name:
            secret = json.loads(plane.kubectl("-n", NAMESPACE, "get", "secret", secret_name, "-o", "json").stdout)
            return base64.b64decode(secret["data"]["token"]).decode()
        time.sleep(0.5)
    raise controlplane.ControlPlaneError(f"the operator did not create a token Secret for Agent {AGENT} within {timeout:.0f}s")


def start(name: str, argv: list[str], *, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = open(LOCAL / f"{name}.log", "wb")  # noqa: SIM115 (the child holds it)
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    log.close()
    return process


def show(plane: controlplane.ControlPlane, until: float) -> None:
    interactive = sys.stdout.isatty()
    while time.monotonic() < until:
        table = plane.kubectl("-n", NAMESPACE, "get", "restic", check=False).stdout
        if interactive:
            print("\033[H\033[2J", end="")
        remaining = until - time.monotonic()
        print(f"$ kubectl get restic      ({time.strftime('%H:%M:%S')}, Ctrl-C to stop"
              + (f", {remaining:.0f}s left)" if remaining < 1e8 else ")"))
        print(table, flush=True)
        time.sleep(REFRESH_SECONDS)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # `kill` ends the demo as Ctrl-C does: with the teardown


def example_password() -> str:
    documents = yaml.safe_load_all((EXAMPLES / "repository.yaml").read_text())
    return next(d for d in documents if d["kind"] == "Secret")["stringData"]["password"]


def main() -> int:
    binaries = build.ensure(["etcd", "kubernetes", "restic"])
    restic_manager = Path(sys.executable).with_name("restic-manager")
    shutil.rmtree(LOCAL, ignore_errors=True)
    shutil.rmtree(WORK, ignore_errors=True)
    LOCAL.mkdir(parents=True)
    make_example_tree(WORK / "data")

    seconds = float(os.environ.get("DEMO_SECONDS", "inf"))
    plane = controlplane.ControlPlane(directory=LOCAL / "cluster", kubeconfig=LOCAL / "kubeconfig")
    processes: list[subprocess.Popen[bytes]] = []
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        say("starting etcd, kube-apiserver and kube-controller-manager; installing the CRDs")
        plane.start()
        env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig)}
        port = controlplane.free_port()
        say(f"starting the operator (agents connect to ws://127.0.0.1:{port}); log: {LOCAL / 'operator.log'}")
        # Plain ws:// on loopback, as the agent's --insecure below: nothing leaves this machine.
        processes.append(start("operator", [str(restic_manager), "operator", "--kubeconfig", str(plane.kubeconfig),
                                            "--listen", f"127.0.0.1:{port}", "--insecure-listen"], env=env))
        say("applying deploy/examples: Repository, Agent, Schedule")
        plane.kubectl("-n", NAMESPACE, "apply", "-f", str(EXAMPLES / "agent.yaml"))
        token_file = LOCAL / "agent-token"
        token_file.write_text(wait_for_token(plane))
        token_file.chmod(0o600)
        say(f"starting the agent {AGENT}; log: {LOCAL / 'agent.log'}")
        processes.append(start("agent", [
            str(restic_manager), "agent", "--server", f"ws://127.0.0.1:{port}", "--insecure",
            "--token-file", str(token_file), "--state-dir", str(LOCAL / "agent-state"),
            "--agent-name", AGENT, "--restic", str(binaries["restic"]),
        ], env=env))
        plane.kubectl("-n", NAMESPACE, "apply", "-f", str(EXAMPLES / "repository.yaml"), "-f", str(EXAMPLES / "schedule.yaml"))
        show(plane, time.monotonic() + seconds)
    except KeyboardInterrupt:
        print()
    except (controlplane.ControlPlaneError, build.BuildError) as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    finally:
        for process in reversed(processes):
            controlplane.stop_process(process.pid, wait=process.wait)
        if (WORK / "repo" / "config").exists():
            say(f"snapshots restic made in {WORK / 'repo'}:")
            subprocess.run([str(binaries["restic"]), "snapshots", "--compact"], check=False,
                           env={**os.environ, "RESTIC_REPOSITORY": str(WORK / "repo"),
                                "RESTIC_PASSWORD": example_password()})
        say("stopping the control plane")
        plane.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
