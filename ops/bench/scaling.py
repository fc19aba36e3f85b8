"""Scaling to many workers without GPUs: N real ``deepqueue worker`` processes on the simulated
device (``simulated:a=A,b=B``), one redis-server and one moto S3 server, as they are.

The device is calibrated on the H200 figures in ops/bench/README.md (SD1.5 architecture, fp16,
512x512, 50 DDIM steps, DeepCache 3/0): 0.60 s per call at batch 1 and 1.26 s at batch 8, so
a = 0.51 s per call and b = 0.094 s per image. The images are 64x64 JPEG: two CPU cores must
encode and upload for up to 16 simulated GPUs, so the figures measure the queue, batching,
storage and state path, not the encoder.

For each N (1, 2, 4, 8, 16): N workers start, N x CALLS (24) x 8 jobs are submitted at once, and the
wall time from submit to the last job done gives images/s; scaling = that ÷ (N x one worker's).
From the sidecars: batch fill (mean batch size ÷ 8) and, per worker, the critical-path overhead:
the gaps between consecutive pipeline calls ÷ the calls' own time (0: the device never waits).

    .venv/bin/python -m ops.bench.scaling [--workers 1,2,4,8,16] [--calls 6]

Each N is a part of its own: if its workers do not all start (a loaded machine: ``--start-timeout``),
the report says so in one line and the other counts are still measured.
"""

from __future__ import annotations

import logging
import statistics
import subprocess
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis

from ops.bench import harness
from ops.bench.harness import s3_sidecars
from ops.bench.report import run_line
from ops.localstack import client_for, moto_s3_client, start_worker, stop, worker_env
from producer import JobState

logger = logging.getLogger(__name__)

#: H200 calibration (see the module docstring).
DEVICE = "simulated:a=0.51,b=0.094"
MAX_BATCH = 8


def critical_path(sidecars: list[dict[str, Any]]) -> dict[str, float]:
    """Per worker, gaps between consecutive pipeline calls ÷ call time; batch fill overall."""
    batches: dict[str, dict[str, tuple[float, float, int]]] = defaultdict(dict)
    for sidecar in sidecars:
        batch, timing = sidecar["batch"], sidecar["timing"]
        batches[sidecar["worker"]["name"]][batch["id"]] = (
            timing["started_at"],
            timing["batch_inference_s"],
            batch["size"],
        )
    gaps, calls, sizes = [], [], []
    for per_worker in batches.values():
        ordered = sorted(per_worker.values())
        sizes += [size for _, _, size in ordered]
        calls += [seconds for _, seconds, _ in ordered]
        gaps += [max(0.0, nxt[0] - (cur[0] + cur[1])) for cur, nxt in zip(ordered, ordered[1:], strict=False)]
    return {
        "batches": len(sizes),
        "batch_fill": statistics.fmean(sizes) / MAX_BATCH,
        "median_gap_s": statistics.median(gaps) if gaps else 0.0,
        "overhead": (sum(gaps) / sum(calls[: len(gaps)])) if gaps else 0.0,
    }


def start_workers(env: dict[str, str], n: int, tmp: Path, timeout: float) -> list[subprocess.Popen]:
    """``n`` workers started at once; if one does not start, the others are stopped and its error raised."""
    with ThreadPoolExecutor(n) as pool:
        futures = [
            pool.submit(start_worker, env, tmp / f"n{n}-w{i}.log", "--hostname", f"w{i}@%h", timeout=timeout)
            for i in range(n)
        ]
    errors = [future.exception() for future in futures if future.exception() is not None]
    started = [future.result() for future in futures if future.exception() is None]
    if errors:
        for worker in started:
            stop(worker)
        raise errors[0]
    return started


def measure(n: int, calls: int, redis_url: str, s3: str, tmp: Path, start_timeout: float) -> dict[str, Any]:
    """Images/s, batch fill and critical-path overhead of ``n`` simulated workers."""
    broker, backend = f"{redis_url}/0", f"{redis_url}/1"
    for url in (broker, backend):
        redis.Redis.from_url(url).flushdb()
    bucket = f"scaling-{n}"
    moto_s3_client(s3).create_bucket(Bucket=bucket)
    env = worker_env(broker_url=broker, result_backend=backend, s3_endpoint=s3, bucket=bucket, model=DEVICE)
    workers = start_workers(env, n, tmp, start_timeout)
    try:
        jobs = [{"prompt": f"scale {i}", "format": "jpeg"} for i in range(n * calls * MAX_BATCH)]
        with client_for(env) as client:
            started = time.perf_counter()
            run = client.submit(jobs, run=f"scale-{n}", width=64, height=64)
            while run.status().counts[JobState.DONE] < len(jobs):
                time.sleep(0.05)
            seconds = time.perf_counter() - started
    finally:
        for worker in workers:
            stop(worker)
    sidecars = s3_sidecars(s3, bucket, f"scale-{n}/")
    return {
        "workers": n,
        "jobs": len(jobs),
        "seconds": seconds,
        "images_per_s": len(jobs) / seconds,
        **critical_path(sidecars),
    }


def markdown(results: dict[str, Any]) -> str:
    rows = [
        "| workers | jobs | images/s | scaling (÷ linear) | batch fill | critical-path overhead | median gap |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for point in results["points"]:
        rows.append(
            f"| {point['workers']} | {point['jobs']} | {point['images_per_s']:.1f} | {point['scaling']:.2f} | "
            f"{point['batch_fill']:.2f} | {point['overhead']:.3f} | {point['median_gap_s'] * 1000:.0f} ms |"
        )
    return (
        f"# Scaling on the simulated device ({results['device']})\n\n{run_line(results)}\n\n" + "\n".join(rows) + "\n"
    )


def add_scaling(points: list[dict[str, Any]]) -> None:
    """Each point's scaling: its images/s ÷ (its workers x one worker's images/s), where one
    worker's is the 1-worker point's, or else the first point's per worker."""
    if not points:
        return
    ones = [p["images_per_s"] for p in points if p["workers"] == 1]
    single = ones[0] if ones else points[0]["images_per_s"] / points[0]["workers"]
    for point in points:
        point["scaling"] = point["images_per_s"] / (point["workers"] * single)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = harness.parser(__doc__, "scaling-latest")
    parser.add_argument("--workers", default="1,2,4,8,16", help="worker counts, comma-separated")
    parser.add_argument("--calls", type=int, default=24, help="full pipeline calls per worker (24: steady state)")
    args = parser.parse_args(argv)
    with harness.session(args, markdown, device=DEVICE, points=[]) as bench, bench.part("servers"):
        redis_url, s3 = bench.servers.redis_url(), bench.servers.s3_endpoint()
        for n in [int(count) for count in args.workers.split(",")]:
            with bench.part(f"{n} workers"):
                point = measure(n, args.calls, redis_url, s3, bench.scratch, args.start_timeout)
                logger.info(
                    "%d workers: %.1f images/s, fill %.2f, overhead %.3f",
                    n,
                    point["images_per_s"],
                    point["batch_fill"],
                    point["overhead"],
                )
                bench.results["points"].append(point)
        add_scaling(bench.results["points"])
    return bench.results


if __name__ == "__main__":
    raise SystemExit(harness.exit_status(main()))
