"""How fast one worker drops the queued messages of cancelled and deleted runs.

A run of JOBS jobs is queued and then cancelled or deleted in its state only, while no worker
runs: its messages stay queued, as those a worker holds when its run stops, those of a run that
``Run.cancel`` stopped, or of a plain Celery producer's run (``deepqueue cancel`` and ``delete``
drop the waiting messages of a client's run at once: ``producer.fair``). Then one real
``deepqueue worker`` (default
settings, the tiny model, local files, a private redis-server) starts and drops them. The queue's
length is polled every 20 ms: the rate is the messages taken from the first drop until nothing is
left waiting or held, over that time. Nothing is generated: a message that reached the pipeline
would show as an image (checked). The two kinds alternate, ROUNDS each, one worker per round.

    .venv/bin/python -m ops.bench.drain [--jobs 10000] [--rounds 2] [--record]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import redis

from ops.bench import harness
from ops.bench.harness import Bench, running_worker
from ops.bench.report import run_line, summarize
from ops.localstack import client_for, worker_env
from producer import JobState
from producer.state import RunStore

logger = logging.getLogger(__name__)

KINDS = ("cancelled", "deleted")
QUEUE = "deepqueue"


def drain_once(
    url: str, model: Path, tmp: Path, kind: str, jobs: int, timeout_s: float, start_s: float
) -> dict[str, Any]:
    """One round on a fresh redis-server at ``url``: queue ``jobs``, stop the run ``kind``-wise,
    start a worker, time the drain."""
    broker, backend = f"{url}/0", f"{url}/1"
    out = tmp / "out"
    env = worker_env(broker_url=broker, result_backend=backend, model=str(model), storage="local", output_dir=str(out))
    with client_for(env) as client:
        client.submit([f"drain {i}" for i in range(jobs)], run="drain", width=64, height=64, steps=2)
        client.run("drain").cancel()  # the state only: the messages stay queued
        if kind == "deleted":
            RunStore.from_url(backend).delete("drain")
    db = redis.Redis.from_url(broker)
    messages = db.llen(QUEUE)  # prompt batches: fewer than the jobs
    with running_worker(env, tmp / f"worker-{kind}.log", timeout=start_s):
        first = last = None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            waiting, held = db.llen(QUEUE), db.hlen("unacked")
            now = time.perf_counter()
            if first is None and waiting < messages:
                first = (now, messages - waiting - held)
            if first is not None and waiting == 0 and held == 0:
                last = now
                break
            time.sleep(0.02)
        if first is None or last is None:
            raise TimeoutError(f"the {kind} run's {jobs} messages were not drained within {timeout_s} s")
    images = list(out.rglob("*.png")) if out.exists() else []
    if images:
        raise RuntimeError(f"{len(images)} images were generated for a {kind} run")
    if kind == "cancelled":
        with client_for(env) as client:
            counts = client.run("drain").status().counts
        if counts[JobState.CANCELLED] != jobs:
            raise RuntimeError(f"the cancelled run ends {counts}, not {jobs} cancelled")
    started, taken_before = first
    seconds = last - started
    rate = (messages - taken_before) / seconds
    return {
        "kind": kind,
        "jobs": jobs,
        "messages": messages,
        "seconds": seconds,
        "messages_per_s": rate,
        "jobs_per_s": rate * jobs / messages,
    }


def measure(bench: Bench, model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every round that worked, per kind; a round that failed is one line of the report."""
    per_kind: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    for round_ in range(args.rounds):
        for kind in KINDS:
            with bench.part(f"{kind} run, round {round_ + 1}"):
                folder = bench.scratch / f"{kind}-{round_}"
                folder.mkdir()
                with bench.servers.fresh_redis(folder) as url:
                    point = drain_once(url, model, folder, kind, args.jobs, args.timeout, args.start_timeout)
                logger.info("%s run, round %d: %.0f messages/s", kind, round_ + 1, point["messages_per_s"])
                per_kind[kind].append(point)
    return {
        kind: {
            "rounds": points,
            "messages_per_s": summarize([p["messages_per_s"] for p in points]),
            "jobs_per_s": summarize([p["jobs_per_s"] for p in points]),
        }
        for kind, points in per_kind.items()
        if points
    }


def markdown(results: dict[str, Any]) -> str:
    rows = [
        "# Draining cancelled and deleted runs",
        "",
        f"{run_line(results)} One worker (default settings), {results['jobs']} queued jobs per round, "
        f"{results['rounds']} rounds per kind; median (min–max).",
        "",
        "| run | messages dropped per second | jobs per second |",
        "| --- | ---: | ---: |",
    ]
    for kind, figures in results.get("drain", {}).items():
        cells = [
            f"{rate['median']:.0f} ({rate['min']:.0f}–{rate['max']:.0f})"
            for rate in (figures["messages_per_s"], figures["jobs_per_s"])
        ]
        rows.append(f"| {kind} | {' | '.join(cells)} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = harness.parser(__doc__, "drain-latest", tiny_model=True)
    parser.add_argument("--jobs", type=int, default=10_000, help="queued jobs per round (default 10000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per kind (default 2)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a drain may take")
    args = parser.parse_args(argv)
    with harness.session(args, markdown, jobs=args.jobs, rounds=args.rounds) as bench, bench.part("tiny model"):
        bench.results["drain"] = measure(bench, bench.servers.model(), args)
    return bench.results


if __name__ == "__main__":
    raise SystemExit(harness.exit_status(main()))
