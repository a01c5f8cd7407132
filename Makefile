# Two commands for a newcomer on a fresh machine:
#   make demo   set up .venv and run the whole pipeline (data, training, contamination check, evaluation,
#               report) on the embedded default spec, offline
#   make test   set up .venv and run the test suite
# Every cache stays inside the work tree (.cache/); nothing is written to $HOME.
SHELL := /bin/bash
export UV_CACHE_DIR ?= $(CURDIR)/.cache/uv
export PREFECT_HOME ?= $(CURDIR)/.cache/prefect
export HF_HOME ?= $(CURDIR)/.cache/hf
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export TOKENIZERS_PARALLELISM ?= false
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
SPEC ?= demo
# optional: a folder of benchmark files (<name>/<split>.jsonl) to check the training data against, e.g.
#   make demo BENCHMARKS=../shared/data/benchmarks DEMO_ARGS=--decontaminate
BENCHMARKS ?=
DEMO_ARGS ?=

.PHONY: setup demo data test lock bench

setup:
	@bash scripts/setup.sh

demo: setup
	@mkdir -p "$(PREFECT_HOME)" "$(HF_HOME)" "$(TORCH_EXTENSIONS_DIR)"
	.venv/bin/hrm pipeline $(SPEC) $(if $(BENCHMARKS),--benchmarks $(BENCHMARKS)) $(DEMO_ARGS)

# the data stages only (no training or evaluation)
data: setup
	@mkdir -p "$(PREFECT_HOME)" "$(HF_HOME)" "$(TORCH_EXTENSIONS_DIR)"
	.venv/bin/hrm run $(SPEC) $(if $(BENCHMARKS),--benchmarks $(BENCHMARKS)) $(DEMO_ARGS)

test: setup
	@mkdir -p "$(PREFECT_HOME)" "$(HF_HOME)" "$(TORCH_EXTENSIONS_DIR)"
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

lock:
	@bash scripts/lock.sh

bench: setup
	.venv/bin/python benchmarks/dedup.py --docs 200000
