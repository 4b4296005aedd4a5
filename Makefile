# ubo: two commands for a fresh machine (README Quickstart):
#   make benchmark   create .venv if missing, install, build every data set (dvc repro), then
#                    run the study through Prefect (local server and workers) into MLflow;
#                    SMOKE=1: Coat only, one seed, 3 epochs. BENCHMARK_ARGS: more flows.local flags
#   make tune        tune every method on each data set's hyper-validation set through Prefect
#                    (`ubo/tune`), then write the chosen values into params.yaml (review the diff)
#   make report      docs/RESULTS.md and docs/figures/fig{1,2,3}_*.png from the study's MLflow runs
#                    of the checkout's code; REPORT_ARGS: more flags, e.g. --code-version <the
#                    version RESULTS.md names> to regenerate it after ubo_core has changed
#   make test        install if needed, lint, run the test suite
#   make ui          the MLflow UI on the study's store (light: one worker, no job runner);
#                    PREFECT=1 also the Prefect UI (UI_ARGS: more flows.ui flags)
#   make cluster-up  the several-machines setup on this machine (docs/SCALING.md): PostgreSQL,
#                    Prefect and MLflow servers on it, HOSTS worker hosts (own clones, homes, data;
#                    as root, own network namespaces too)
#   make cluster-down  stop it; make cluster-test: the study across hosts with a lost host and a
#                    database restart, and a worker killed mid-run (pytest -m cluster, ~8 min)
#
# TORCH_INDEX: where torch==2.13.0 comes from. The default CPU wheel index keeps a CPU machine
# from pulling the multi-GB CUDA build; on a GPU machine use `make ... TORCH_INDEX=` (PyPI's
# default CUDA build). torch is installed alone, without dependencies, because pip would
# otherwise query that extra index for every package of the project.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
INSTALLED := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PATH := $(BIN):$(PATH)

SMOKE ?=
BENCHMARK_ARGS ?=
REPORT_ARGS ?=
PREFECT ?=
UI_ARGS ?=

.PHONY: install benchmark data summary study tune report ui test lint format \
	cluster-install cluster-up cluster-down cluster-test

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
		{ echo "error: Python 3.11 is required (found $$($(PYTHON) --version)); set PYTHON=..." >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c 'import torch' 2>/dev/null || \
		$(BIN)/python -m pip install --no-deps --retries 0 --timeout 15 \
			$(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

benchmark: data summary study

study: $(INSTALLED)
	python -m flows.local --claim-ahead $(if $(SMOKE),--smoke) $(BENCHMARK_ARGS)

tune: $(INSTALLED)
	python -m flows.local --flow tune $(if $(SMOKE),--smoke) $(BENCHMARK_ARGS)
	$(if $(SMOKE),@echo "SMOKE: params.yaml left as it is",python -m flows.tune apply)

report: $(INSTALLED)
	python -m flows.report $(REPORT_ARGS)

HOSTS ?= 3
CLUSTER_DATASETS ?= coat

cluster-install: $(INSTALLED)
	python -m pip install --quiet -e '.[dev,cluster]'

cluster-up: cluster-install
	python -m flows.cluster up --hosts $(HOSTS) --datasets $(CLUSTER_DATASETS)

cluster-down: $(INSTALLED)
	python -m flows.cluster down

cluster-test: cluster-install
	python -m pytest -m cluster -o console_output_style=count --durations=5

ui: $(INSTALLED)
	python -m flows.ui $(if $(PREFECT),--prefect) $(UI_ARGS)

data: $(INSTALLED)
	dvc repro

summary: $(INSTALLED)
	python -m ubo_core.stages summary

# Progress and the 15 slowest tests at the end; the test files run in parallel, one process per
# core, each file in one process (its module fixtures, e.g. a Prefect stack, start once).
test: $(INSTALLED) lint
	python -m pytest -n auto --dist loadfile --durations=15

lint: $(INSTALLED)
	ruff check .
	ruff format --check .

format: $(INSTALLED)
	ruff check --fix .
	ruff format .
