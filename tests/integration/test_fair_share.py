"""Fair share and priorities between runs with a real worker (issue 17, item 3): runs queued
before the worker starts, so the order in which it serves them is the scheduler's alone
(``producer.fair``), whatever the speed of the machine."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from ops.localstack import client_for, start_worker, stop
from producer import JobState
from tests.helpers import wait_until
from tests.integration.test_malformed import local_worker_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECIPE = {"steps": 2, "width": 64, "height": 64}


def runs_in_call_order(out: Path) -> list[str]:
    """The run of each image, by the order in which their pipeline calls started (the sidecars).
    However calls are cut (full, or partial on a slow machine), the worker's buffer hands jobs
    of one shape out in the order it took them."""
    calls: dict[str, tuple[float, list[str]]] = {}
    for path in out.rglob("*.json"):
        sidecar = json.loads(path.read_text())
        calls.setdefault(sidecar["batch"]["id"], (sidecar["timing"]["started_at"], []))[1].append(sidecar["run_id"])
    return [run for _, runs in sorted(calls.values()) for run in runs]


def test_a_high_run_goes_first_and_runs_share_by_weight(redis_urls, tiny_model, tmp_path):
    env = local_worker_env(redis_urls, tiny_model, tmp_path) | {"DEEPQUEUE_MAX_BATCH": "4"}
    with client_for({**env, "DEEPQUEUE_PROMPT_BATCH": "1"}) as client:  # one job a message: a share per job
        client.submit([f"light {i}" for i in range(16)], run="light", **RECIPE)
        client.submit([f"heavy {i}" for i in range(16)], run="heavy", weight=3, **RECIPE)
        client.submit([f"urgent {i}" for i in range(4)], run="urgent", priority="high", **RECIPE)
        worker = start_worker(env, tmp_path / "worker.log")
        try:
            runs = [client.run(run) for run in ("light", "heavy", "urgent")]
            wait_until(lambda: sum(run.status().counts[JobState.DONE] for run in runs) == 36, 300, "every job done")
        finally:
            stop(worker)
    order = runs_in_call_order(tmp_path / "out")
    assert order[:4] == ["urgent"] * 4  # sent last, served first
    assert Counter(order[4:20]) == {"heavy": 12, "light": 4}  # 3 : 1 while both had jobs
