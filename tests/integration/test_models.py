"""Two models on one Redis: a real `deepqueue worker` per model (the tiny SD and the tiny SDXL
architectures, each declaring its alias), a run for each, and every image made by its run's
model, as its sidecar says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from ops.localstack import client_for, start_worker, stop, worker_env
from producer import JobState
from producer.layout import WORKER_QUEUES_KEY

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def sidecars(out: Path, run_id: str) -> list[dict]:
    return [json.loads(path.read_text()) for path in (out / run_id / "images").glob("*.json")]


def test_each_run_goes_to_the_workers_of_its_model(redis_server, tiny_model, sdxl_tiny, tmp_path) -> None:
    broker, backend = f"{redis_server}/6", f"{redis_server}/7"  # databases no other test file uses
    for url in (broker, backend):
        redis.Redis.from_url(url).flushdb()
    models = {"sd": tiny_model, "sdxl": sdxl_tiny}
    out = tmp_path / "out"
    workers = []
    try:
        for alias, model in models.items():
            env = worker_env(
                broker_url=broker,
                result_backend=backend,
                model=str(model),
                model_alias=alias,
                device="cpu",
                storage="local",
                output_dir=str(out),
                max_wait_s=0.5,
            )
            workers.append(start_worker(env, tmp_path / f"{alias}.log", "--hostname", f"{alias}@%h"))
        with client_for(env) as client:
            runs = {
                alias: client.submit(
                    [f"{alias} {i}" for i in range(4)], run=f"on-{alias}", model=alias, steps=3, width=64, height=64
                )
                for alias in models
            }
            for run in runs.values():
                assert run.wait(timeout=600).counts[JobState.DONE] == 4
            served = redis.Redis.from_url(broker).hgetall(WORKER_QUEUES_KEY)
            assert sorted(queue.decode() for queue in served.values()) == ["deepqueue.sd", "deepqueue.sdxl"]
            assert all(client.workers(queue=client.model_queue(alias)) for alias in models)
    finally:
        for worker in workers:
            stop(worker)
    for alias, model in models.items():
        made = sidecars(out, f"on-{alias}")
        assert len(made) == 4
        assert {(s["model"]["alias"], s["model"]["id"], s["worker"]["pipeline"]) for s in made} == {
            (alias, str(model), "StableDiffusionPipeline" if alias == "sd" else "StableDiffusionXLPipeline")
        }
