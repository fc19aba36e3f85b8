"""The real worker on CUDA: skipped where there is none (CI, development machines).

What failed on the first GPU (forked pool processes could not use CUDA) must be proven on one:
``ops/bench/gpu.sh`` runs this file on a lent GPU machine before the GPU benchmark. On CPU the
same trap is caught by tests/integration/test_startup.py and tests/worker/test_model_info.py.
"""

from __future__ import annotations

import json

import pytest

from ops.localstack import client_for, start_worker, stop, worker_env
from producer import JobState

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_worker_serves_on_cuda_in_fp16(redis_urls, tiny_model, tmp_path):
    broker, backend = redis_urls
    out = tmp_path / "out"
    env = worker_env(
        broker_url=broker,
        result_backend=backend,
        model=str(tiny_model),
        device="cuda",
        storage="local",
        output_dir=str(out),
        max_wait_s=0.5,
    )
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    try:
        assert "main process is fork-safe" in log.read_text()
        with client_for(env) as client:
            run = client.submit([f"gpu {i}" for i in range(20)], run="gpu", steps=10, width=64, height=64)
            status = run.wait(timeout=300)
            failures = [result.reason for result in run.results(JobState.FAILED)]
        assert status.counts[JobState.DONE] == 20, failures
    finally:
        stop(worker)
    cars = [json.loads(path.read_text()) for path in out.rglob("*.json")]
    assert len(cars) == 20
    assert all(car["worker"]["device"].startswith("cuda") and car["worker"]["dtype"] == "float16" for car in cars)
    assert max(car["batch"]["size"] for car in cars) == 8
