# svcproxy developer entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: all deps venv lint typecheck unit test example demo clean

all: test

deps:
	@scripts/install-deps.sh

$(STAMP): pyproject.toml | deps
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(STAMP)

lint: venv
	$(VENV)/bin/ruff check core plugins demo tests examples benchmarks

typecheck: venv
	VENV=$(VENV) scripts/typecheck.sh

unit: venv
	$(VENV)/bin/pytest tests/unit -q $(PYTEST_ARGS)

test: venv lint typecheck
	$(VENV)/bin/pytest tests -q $(PYTEST_ARGS)

# The main job on the bundled example cluster: the dry run, then a real sync in
# a throwaway network namespace (IPVS, or the iptables fallback), then cleanup.
example: venv
	scripts/example.sh

# The newcomer's one command: a throwaway node in network namespaces, svcproxy
# with this kernel's best datapath, real requests and a rolling update.
demo: venv
	$(VENV)/bin/svcproxy demo

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
