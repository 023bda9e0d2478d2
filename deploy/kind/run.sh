#!/usr/bin/env bash
# The laptop path: restic-manager on a real kind cluster, then the whole test suite against it.
#
#   deploy/kind/run.sh           # create (or reuse) the cluster, build and load the images,
#                                # install the chart, smoke it, run the suite, delete the cluster
#   deploy/kind/run.sh --keep    # the same, but leave the cluster running
#
# Environment: KIND_CLUSTER (default restic-manager), IMAGE_TAG (default dev), PYTEST_ARGS
# (extra pytest arguments, e.g. "-k deploy").
#
# Needs docker with a running engine, kind, and what `make test` needs (Python >= 3.11, Go,
# make, openssl). Not run in CI: CI has no container engine. docs/deployment.md explains
# each step.
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT=$PWD
CLUSTER=${KIND_CLUSTER:-restic-manager}
TAG=${IMAGE_TAG:-dev}
RELEASE_NAMESPACE=restic-manager-system
SMOKE_NAMESPACE=restic-manager-smoke
WORK=$ROOT/.local/kind
KUBECONFIG_FILE=$WORK/kubeconfig
KEEP=false
[[ ${1:-} == --keep ]] && KEEP=true

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'deploy/kind/run.sh: %s\n' "$*" >&2; exit 1; }

command -v kind >/dev/null || die "kind is not installed (https://kind.sigs.k8s.io)"
docker info >/dev/null 2>&1 || die "docker cannot reach a container engine (is Docker running?)"

say "Python packages and the pinned binaries (helm, kubectl, restic, ...)"
make venv binaries
HELM=$ROOT/.local/bin/helm
KUBECTL=$ROOT/.local/bin/kubectl
RESTIC=$ROOT/.local/bin/restic
kubectl() { "$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

mkdir -p "$WORK"
if kind get clusters | grep -qx "$CLUSTER"; then
  say "reusing kind cluster $CLUSTER"
  kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG_FILE"
else
  say "creating kind cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG_FILE" --wait 120s
fi

PIDS=()
# ${PIDS[@]+...}: macOS's bash 3.2 calls an empty array unbound under set -u.
stop_background() {
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill "$pid" 2>/dev/null || true; done
  PIDS=()
}
cleanup() {
  stop_background
  if [[ $KEEP == false ]]; then
    say "deleting kind cluster $CLUSTER (--keep leaves it)"
    kind delete cluster --name "$CLUSTER"
  else
    say "cluster $CLUSTER kept: export KUBECONFIG=$KUBECONFIG_FILE"
  fi
}
trap cleanup EXIT

say "building the images (deploy/images/Dockerfile) and loading them into the cluster"
for target in operator agent; do
  docker build --file deploy/images/Dockerfile --target "$target" --tag "restic-manager/$target:$TAG" .
  kind load docker-image --name "$CLUSTER" "restic-manager/$target:$TAG"
done

# The operator in the cluster manages only the smoke namespace, so that it never competes
# with the operators the test suite starts for its own namespaces.
say "installing the chart; waiting for the operator to be Ready"
kubectl create namespace "$SMOKE_NAMESPACE" --dry-run=client -o yaml | kubectl apply -f -
"$HELM" upgrade --install restic-manager deploy/helm/restic-manager \
  --kubeconfig "$KUBECONFIG_FILE" --namespace "$RELEASE_NAMESPACE" --create-namespace \
  --set "operator.image.tag=$TAG" --set "agentDaemonSet.image.tag=$TAG" \
  --set "operator.watchNamespaces={$SMOKE_NAMESPACE}" \
  --set operator.insecureListen=true \
  --wait --timeout 5m

say "smoke: an agent on this machine, through a port-forward, backs up to a local repository"
kubectl -n "$RELEASE_NAMESPACE" port-forward service/restic-manager 18765:8765 >"$WORK/port-forward.log" 2>&1 &
PIDS+=($!)
kubectl -n "$SMOKE_NAMESPACE" apply -f deploy/examples/agent.yaml
kubectl -n "$SMOKE_NAMESPACE" wait --for=jsonpath='{.status.tokenSecretName}' agent/demo-host --timeout=60s
secret=$(kubectl -n "$SMOKE_NAMESPACE" get agent demo-host -o jsonpath='{.status.tokenSecretName}')
(umask 077 && kubectl -n "$SMOKE_NAMESPACE" get secret "$secret" -o jsonpath='{.data.token}' | base64 --decode >"$WORK/token")
# The examples back up /var/tmp/restic-manager-demo/data into .../repo (deploy/demo.py makes the same tree).
mkdir -p /var/tmp/restic-manager-demo/data
date >/var/tmp/restic-manager-demo/data/hello.txt
password=$(sed -n 's/^ *password: *//p' deploy/examples/repository.yaml)
[[ -f /var/tmp/restic-manager-demo/repo/config ]] ||
  RESTIC_PASSWORD=$password "$RESTIC" init --repo /var/tmp/restic-manager-demo/repo
.venv/bin/restic-manager agent --server ws://127.0.0.1:18765 --insecure --token-file "$WORK/token" \
  --state-dir "$WORK/agent-state" --agent-name demo-host --restic "$RESTIC" >"$WORK/agent.log" 2>&1 &
PIDS+=($!)
kubectl -n "$SMOKE_NAMESPACE" wait --for=condition=Connected agent/demo-host --timeout=60s
kubectl -n "$SMOKE_NAMESPACE" apply -f deploy/examples/repository.yaml -f deploy/examples/schedule.yaml
kubectl -n "$SMOKE_NAMESPACE" wait --for=condition=Applied schedule/every-20s --timeout=60s
kubectl -n "$SMOKE_NAMESPACE" wait --for=jsonpath='{.status.lastSuccessfulTime}' schedule/every-20s --timeout=120s
kubectl -n "$SMOKE_NAMESPACE" get restic
kubectl -n "$SMOKE_NAMESPACE" delete schedule every-20s --cascade=foreground --timeout=60s
stop_background

say "the test suite against the kind cluster"
make test PYTEST_ARGS="--kubeconfig $KUBECONFIG_FILE ${PYTEST_ARGS:-}"
say "all done"
