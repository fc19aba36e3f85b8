"""Benchmark 2: images/s of one real ``deepqueue worker`` process, DeepCache off vs on.

The stack is the integration test's: a private redis-server, moto's S3 server over HTTP and a
``deepqueue worker`` process (prefork, one pool process) serving the tiny random-weight model.
Off (``cache_interval=1``) and on runs use the same prompts, seeds and sizes, and alternate
(off, on, off, on, ...) in the same worker process, so both see the same machine load.

Per run: wall time from just before ``Client.submit`` to the moment every job is done (polled
every 50 ms), and the sum of ``batch_inference_s`` over the run's batches read from the S3
sidecars (the pipeline calls alone); their difference is queue, batching wait, encode, upload
and state overhead. The first round of each mode is preceded by an unmeasured warm-up run.
"""

from __future__ import annotations

import json
import logging
import secrets
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from ops.bench.harness import START_TIMEOUT_S, running_worker
from ops.bench.report import load_average, ratio, summarize
from ops.localstack import client_for, moto_s3_client, worker_env
from producer import Client, JobState

logger = logging.getLogger(__name__)

BUCKET = "deepqueue-bench"
RUN_SEED = 1234
POLL_S = 0.05
WARMUP_JOBS = 8


@contextmanager
def worker_stack(
    redis_url: str, s3_endpoint: str, model: Path, log_path: Path, device: str, start_timeout: float
) -> Iterator[dict[str, str]]:
    """A worker on its own broker/state databases and bucket; yields its environment."""
    broker, backend = f"{redis_url}/2", f"{redis_url}/3"
    for url in (broker, backend):
        redis.Redis.from_url(url).flushdb()
    moto_s3_client(s3_endpoint).create_bucket(Bucket=BUCKET)
    env = worker_env(
        broker_url=broker,
        result_backend=backend,
        s3_endpoint=s3_endpoint,
        bucket=BUCKET,
        model=str(model),
        device=device,
    )
    with running_worker(env, log_path, "--hostname", "bench@%h", timeout=start_timeout):
        yield env


def worker_defaults() -> dict[str, Any]:
    """The settings the worker runs with: its defaults (DEEPQUEUE_* of the caller are not passed)."""
    from worker.settings import WorkerSettings

    fields = WorkerSettings.model_fields
    names = ("max_batch", "max_wait_s", "prefetch", "scheduler", "cache_interval", "cache_branch")
    return {name: fields[name].default for name in names} | {"pool": "prefork, concurrency 1"}


def sidecars(s3: Any, run_id: str) -> list[dict[str, Any]]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{run_id}/")
    keys = [item["Key"] for page in pages for item in page.get("Contents", []) if item["Key"].endswith(".json")]
    return [json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()) for key in keys]


def one_run(
    client: Client, s3: Any, *, mode: str, cache: tuple[int, int], jobs: int, recipe: dict[str, Any]
) -> dict[str, Any]:
    """Submit ``jobs`` prompts, wait for all, and read back what the sidecars say."""
    run_id = f"bench-{mode}-{secrets.token_hex(3)}"
    deepcache = {"cache_interval": 1} if mode == "off" else {"cache_interval": cache[0], "cache_branch": cache[1]}
    texts = [f"a benchmark prompt {i}" for i in range(jobs)]
    load_before = load_average()
    started = time.perf_counter()
    run = client.submit(texts, run=run_id, seed=RUN_SEED, **recipe, **deepcache)
    status = run.wait(timeout=3600, poll_s=POLL_S)
    wall = time.perf_counter() - started
    if status.counts[JobState.DONE] != jobs:
        failed = [r.reason for r in run.results(JobState.FAILED)][:3]
        raise RuntimeError(f"{run_id}: {status}; first failures: {failed}")
    cars = sidecars(s3, run_id)
    if len(cars) != jobs:
        raise RuntimeError(f"{run_id}: {len(cars)} sidecars for {jobs} jobs")
    expected = {
        "enabled": mode == "on",
        "interval": deepcache["cache_interval"],
        "branch": deepcache.get("cache_branch"),
    }
    if any(car["deepcache"] != expected for car in cars):
        raise RuntimeError(f"{run_id}: sidecars say deepcache {cars[0]['deepcache']}, expected {expected}")
    batches = {car["batch"]["id"]: car for car in cars}
    compute = sum(car["timing"]["batch_inference_s"] for car in batches.values())
    return {
        "run_id": run_id,
        "wall_s": wall,
        "loadavg_before": load_before,
        "compute_s": compute,
        "encode_s": sum(car["timing"]["encode_s"] for car in cars),
        "upload_s": sum(car["timing"]["upload_s"] for car in cars),
        "batch_sizes": dict(Counter(car["batch"]["size"] for car in batches.values())),
        "device": cars[0]["worker"]["device"],
    }


def bench_worker(
    redis_url: str,
    s3_endpoint: str,
    model: Path,
    log_path: Path,
    *,
    jobs: int,
    rounds: int,
    width: int,
    height: int,
    steps: int,
    cache: tuple[int, int],
    device: str = "auto",
    start_timeout: float = START_TIMEOUT_S,
) -> dict[str, Any]:
    recipe = {"width": width, "height": height, "steps": steps}
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    order: list[str] = []
    with worker_stack(redis_url, s3_endpoint, model, log_path, device, start_timeout) as env:
        s3 = moto_s3_client(s3_endpoint)
        with client_for(env) as client:
            for mode in runs:  # first pipeline calls, DeepCache hooks, S3 connections: not measured
                one_run(client, s3, mode=mode, cache=cache, jobs=WARMUP_JOBS, recipe=recipe)
            for round_ in range(rounds):
                for mode in runs:
                    result = one_run(client, s3, mode=mode, cache=cache, jobs=jobs, recipe=recipe)
                    runs[mode].append(result)
                    order.append(mode)
                    logger.info(
                        "worker round %d deepcache %s: %.1f s wall (%.2f img/s), %.1f s in the pipeline (%.2f img/s)",
                        round_ + 1,
                        mode,
                        result["wall_s"],
                        jobs / result["wall_s"],
                        result["compute_s"],
                        jobs / result["compute_s"],
                    )
    modes = {}
    for mode, results in runs.items():
        modes[mode] = {
            "label": "off (interval 1)" if mode == "off" else f"on ({cache[0]}/{cache[1]})",
            "wall_images_per_s": summarize([jobs / r["wall_s"] for r in results]),
            "compute_images_per_s": summarize([jobs / r["compute_s"] for r in results]),
            "overhead_s": summarize([r["wall_s"] - r["compute_s"] for r in results]),
            "runs": results,
        }
    sizes: Counter[int] = Counter()
    for results in runs.values():
        for r in results:
            sizes.update(r["batch_sizes"])
    wall_pairs = [off["wall_s"] / on["wall_s"] for off, on in zip(runs["off"], runs["on"], strict=True)]
    compute_pairs = [off["compute_s"] / on["compute_s"] for off, on in zip(runs["off"], runs["on"], strict=True)]
    return {
        "jobs": jobs,
        "rounds": rounds,
        "width": width,
        "height": height,
        "steps": steps,
        "model": str(model),
        "order": order,
        "worker_settings": worker_defaults(),
        "device": runs["off"][0]["device"] if runs["off"] else device,
        "modes": modes,
        # Paired ratios first: each pair ran back to back, under about the same machine load.
        "on_over_off": {
            "wall": statistics.median(wall_pairs),
            "compute": statistics.median(compute_pairs),
            "wall_pairs": wall_pairs,
            "compute_pairs": compute_pairs,
            "wall_ratio_of_medians": ratio(modes["on"]["wall_images_per_s"], modes["off"]["wall_images_per_s"]),
            "compute_ratio_of_medians": ratio(
                modes["on"]["compute_images_per_s"], modes["off"]["compute_images_per_s"]
            ),
        },
        "batch_sizes": {str(size): count for size, count in sorted(sizes.items())},
    }
