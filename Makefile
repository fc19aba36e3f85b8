# The two commands of the README: `make demo` (the main job end to end) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv demo services run test test-quick bench bench-full lint
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml ops/setup.sh
	bash ops/setup.sh
	touch $@

# Redis + an S3 server + a worker, `deepqueue submit --wait`, then S3's contents in demo-out/.
demo: venv
	$(PY) -m ops.demo

# Redis + an S3 server (bucket created) + a worker in the foreground for the README's examples;
# prints the DEEPQUEUE_* lines to export; Ctrl-C stops them all.
services: venv
	$(PY) -m ops.services

# Embedded mode: the same batching and pipeline in one process, no servers.
run: venv
	test -f models/tiny/model_index.json || $(VENV)/bin/deepqueue make-test-model models/tiny --arch tiny
	$(VENV)/bin/deepqueue run examples/prompts.jsonl --out out --model models/tiny --steps 20

# Test files run TEST_WORKERS at a time (pytest-xdist; a file's tests stay in one process, so
# its fixtures are built once), the longest files first (tests/conftest.py LONGEST_FIRST; pytest-xdist
# would otherwise order files by their number of tests). Four on 2 cores: much of the suite waits
# on real servers, workers and faults (Redis down 20 s, S3 down 30 s), and the others compute meanwhile.
TEST_WORKERS ?= 4
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Every test: one line per test (name, outcome, progress), the slowest at the end, then pytest's
# closing "N passed" line.
test: venv
	$(PY) -m pytest $(XDIST) -v --durations=15

# Unit and contract tests, for the edit loop: no slow, integration, fault or GPU tests.
test-quick: venv
	$(PY) -m pytest $(XDIST) -v --durations=10 -m "not slow and not integration and not faults and not gpu"

# Fresh results go to a new folder under ops/bench/results/runs/; RECORD=1 writes over the
# committed ops/bench/results/*-latest.* instead.
RECORD_FLAG := $(if $(RECORD),--record)

# Queue-level goals side by side (batch fill, latency, scaling, submit, Redis bytes, worker memory).
bench: venv
	$(PY) -m ops.bench.goals $(RECORD_FLAG)

# The goals at full size (16 workers, 1M prompts, 500 batches), then worker throughput and DeepCache;
# the second runs even if a part of the first failed, and the target fails if either did.
bench-full: venv
	status=0; \
	$(PY) -m ops.bench.goals --full $(RECORD_FLAG) || status=1; \
	$(PY) -m ops.bench.run $(RECORD_FLAG) || status=1; \
	exit $$status

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
