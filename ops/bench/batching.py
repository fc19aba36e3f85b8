"""Batch fill and latency on the simulated device: one real ``deepqueue worker`` (default
settings), one redis-server and one moto S3 server.

- **Deep shuffled queue, two ways.** Two runs of jobs over 10 sizes, in random order, half with
  ``negative_prompt: ""`` and half with none (one batch key per size on an SD 1.x model), all
  queued before the worker starts:
  - *submit*: sent by ``Client.submit`` (which sends each chunk's jobs grouped by shape);
  - *shuffled messages*: the same jobs published one message per job in their random order, as
    other producers might (``producer.enqueue.publish`` without grouping): the worker's buffer
    alone must find full batches.
  Batch fill = mean batch size ÷ max batch. Since each key's last batch of a run may be
  partial, the table also gives fill ÷ the best possible (Σ ceil(jobs of a key ÷ 8) batches).
- **Lone job.** An idle worker gets one job of a size nobody else has: its wait in the worker
  (pipeline start − arrival, from its sidecar) ÷ ``max_wait_s``; goal ≤ 1.10.
- **No starvation.** The same lone job sent right after a deep queue of another size: its wait
  ÷ (``max_wait_s`` + one batch's time); goal ≤ 1.10.

    .venv/bin/python -m ops.bench.batching [--jobs-per-size 40] [--device simulated:a=0.05,b=0.01]

Each scenario is a part of its own: one that fails (a worker that does not start) is reported
in one line and the others still run.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from ops.bench import harness
from ops.bench.harness import running_worker, s3_sidecars
from ops.bench.report import run_line
from ops.localstack import client_for, moto_s3_client, worker_env
from producer import Client, JobState
from producer.enqueue import publish
from producer.entries import entries_of, make_jobs
from producer.job import run_defaults

logger = logging.getLogger(__name__)

SIZES = [(64, 64), (64, 72), (72, 64), (64, 80), (80, 64), (72, 72), (64, 88), (88, 64), (80, 80), (96, 64)]
LONE_SIZE = (104, 64)
MAX_BATCH = 8
MAX_WAIT_S = 2.0  # the worker's default
#: The deep-queue scenarios: name -> sent grouped by shape (``Client.submit``) or one message per job.
FILL_SCENARIOS = {"`Client.submit` (grouped by shape)": True, "shuffled messages, one per job": False}


def shuffled_jobs(run: str, per_size: int, seed: int) -> list[dict[str, Any]]:
    rows = [
        {
            "prompt": f"{run} {w}x{h} {i}",
            "width": w,
            "height": h,
            "format": "jpeg",
            **({"negative_prompt": ""} if i % 2 else {}),
        }
        for w, h in SIZES
        for i in range(per_size)
    ]
    random.Random(seed).shuffle(rows)
    return rows


def best_batches(sizes: Counter) -> int:
    return sum(math.ceil(count / MAX_BATCH) for count in sizes.values())


def fill(sidecars: list[dict[str, Any]]) -> dict[str, Any]:
    batches = {
        sidecar["batch"]["id"]: (sidecar["batch"]["size"], (sidecar["width"], sidecar["height"]))
        for sidecar in sidecars
    }
    sizes = [size for size, _ in batches.values()]
    jobs_per_key = Counter(shape for shape in ((s["width"], s["height"]) for s in sidecars))
    return {
        "jobs": len(sidecars),
        "batches": len(batches),
        "best_batches": best_batches(jobs_per_key),
        "batch_fill": statistics.fmean(sizes) / MAX_BATCH,
        "fill_vs_best": best_batches(jobs_per_key) / len(batches),
        "histogram": dict(sorted(Counter(sizes).items())),
    }


@dataclass(frozen=True)
class Stack:
    """The servers, the simulated device and how long a worker may take to start; a fresh bucket
    and flushed Redis per scenario."""

    tmp: Path
    device: str
    redis_url: str
    s3: str
    start_timeout: float

    @property
    def broker(self) -> str:
        return f"{self.redis_url}/0"

    @property
    def backend(self) -> str:
        return f"{self.redis_url}/1"

    def fresh(self, name: str) -> dict[str, str]:
        for url in (self.broker, self.backend):
            redis.Redis.from_url(url).flushdb()
        moto_s3_client(self.s3).create_bucket(Bucket=name)
        return worker_env(
            broker_url=self.broker, result_backend=self.backend, s3_endpoint=self.s3, bucket=name, model=self.device
        )

    def wait_done(self, client: Client, runs: dict[str, int], timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while any(client.run(run).status().counts[JobState.DONE] < count for run, count in runs.items()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"runs {runs} not done after {timeout} s")
            time.sleep(0.1)


def deep_queue(stack: Stack, per_size: int, *, grouped: bool) -> dict[str, Any]:
    bucket = "fill-submit" if grouped else "fill-shuffled"
    env = stack.fresh(bucket)
    runs = {"fill-a": shuffled_jobs("fill-a", per_size, 1), "fill-b": shuffled_jobs("fill-b", per_size, 2)}
    with client_for(env) as client:
        for run, rows in runs.items():
            if grouped:
                client.submit(rows, run=run)
            else:  # one message per job, in the rows' random order: no grouping anywhere
                jobs = make_jobs([(str(i), row) for i, row in enumerate(rows)], run_id=run, defaults=run_defaults({}))
                publish(redis.Redis.from_url(stack.broker), client.settings.queue, entries_of(jobs))
                client._store.mark_queued(run, [job.job_id for job in jobs])
        with running_worker(env, stack.tmp / f"{bucket}.log", timeout=stack.start_timeout):
            stack.wait_done(client, {run: len(rows) for run, rows in runs.items()})
    return fill(s3_sidecars(stack.s3, bucket))


def lone_job(stack: Stack, *, behind: int) -> dict[str, Any]:
    """One job of its own size, sent after ``behind`` jobs of another size (0: an idle worker)."""
    bucket = f"lone-{behind}"
    env = stack.fresh(bucket)
    with client_for(env) as client:
        with running_worker(env, stack.tmp / f"{bucket}.log", timeout=stack.start_timeout):
            if behind:
                client.submit([f"deep {i}" for i in range(behind)], run="deep", width=64, height=64, format="jpeg")
            client.submit(["alone"], run="lone", width=LONE_SIZE[0], height=LONE_SIZE[1], format="jpeg")
            stack.wait_done(client, {"lone": 1, **({"deep": behind} if behind else {})})
    sidecars = s3_sidecars(stack.s3, bucket)
    [lone] = [s for s in sidecars if s["run_id"] == "lone"]
    calls = {s["batch"]["id"]: s["timing"]["batch_inference_s"] for s in sidecars if s["run_id"] == "deep"}
    batch_s = statistics.median(calls.values()) if calls else 0.0
    wait = lone["timing"]["started_at"] - lone["timing"]["received_at"]
    return {
        "behind": behind,
        "wait_s": wait,
        "batch_s": batch_s,
        "ratio": wait / (MAX_WAIT_S + (batch_s if behind else 0.0)),
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Batch fill and latency on the simulated device ({results['device']})",
        "",
        f"{run_line(results)} One worker, default settings "
        f"(max batch {MAX_BATCH}, max wait {MAX_WAIT_S} s, prefetch 103).",
        "",
        "| deep shuffled queue (2 runs x 10 sizes) | jobs | batches | best possible | batch fill | fill ÷ best "
        "| sizes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, point in results["fill"].items():
        lines.append(
            f"| {name} | {point['jobs']} | {point['batches']} | {point['best_batches']} | "
            f"{point['batch_fill']:.3f} | {point['fill_vs_best']:.3f} | {point['histogram']} |"
        )
    lines += [
        "",
        "| lone job | wait in worker | one batch | wait ÷ (max wait + batch) (goal ≤ 1.10) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for point in results["lone"]:
        what = "idle worker" if not point["behind"] else f"behind {point['behind']} jobs of another size"
        lines.append(f"| {what} | {point['wait_s']:.2f} s | {point['batch_s']:.2f} s | {point['ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = harness.parser(__doc__, "batching-latest")
    parser.add_argument("--jobs-per-size", type=int, default=40, help="jobs per size and run (x 10 sizes x 2 runs)")
    parser.add_argument("--device", default="simulated:a=0.05,b=0.01", help="simulated device of the worker")
    args = parser.parse_args(argv)
    with harness.session(args, markdown, device=args.device, fill={}, lone=[]) as bench, bench.part("servers"):
        servers = bench.servers
        stack = Stack(bench.scratch, args.device, servers.redis_url(), servers.s3_endpoint(), args.start_timeout)
        for name, grouped in FILL_SCENARIOS.items():
            with bench.part(f"batch fill, {name}"):
                bench.results["fill"][name] = deep_queue(stack, args.jobs_per_size, grouped=grouped)
        for behind in (0, 10 * MAX_BATCH):
            with bench.part(f"lone job behind {behind} jobs"):
                bench.results["lone"].append(lone_job(stack, behind=behind))
    return bench.results


if __name__ == "__main__":
    raise SystemExit(harness.exit_status(main()))
