# restic-manager: everything a newcomer runs goes through here.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test venv binaries cluster cluster-down clean

# Python packages into .venv, reinstalled when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

# etcd, kube-apiserver, kube-controller-manager, kubectl, restic, helm from the pins in testbin/
# (cached in ~/.cache/restic-manager; the first build takes several minutes).
binaries:
	$(PYTHON) testbin/build.py

test: venv binaries
	$(BIN)/pytest $(PYTEST_ARGS)

cluster: binaries
	$(PYTHON) testbin/controlplane.py up

cluster-down:
	$(PYTHON) testbin/controlplane.py down

demo: venv binaries
	$(BIN)/python deploy/demo.py

clean: cluster-down
	rm -rf .local $(VENV)
