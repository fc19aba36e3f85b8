# The two commands of the README: `make demo` (the main job end to end) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv demo services run test bench bench-full lint
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

test: venv
	$(PY) -m pytest -q

# Queue-level goals side by side (batch fill, latency, scaling, submit, Redis bytes, worker memory).
bench: venv
	$(PY) -m ops.bench.goals

# The goals at full size (16 workers, 1M prompts, 500 batches), then worker throughput and DeepCache.
bench-full: venv
	$(PY) -m ops.bench.goals --full
	$(PY) -m ops.bench.run

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
