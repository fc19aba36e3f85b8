"""Run the deepqueue benchmarks and write their results (JSON + markdown) under ops/bench/results/.

    python -m ops.bench.run                       # enqueue, worker, service vs recipe (~3 min on 2 quiet cores)
    python -m ops.bench.run --sd15                # also the SD1.5-architecture check (+~2 min)
    python -m ops.bench.run --only enqueue --jobs 5000

Every server is private: a redis-server and a moto S3 server on free loopback ports, and a
``deepqueue worker`` process, all stopped at the end (``ops.bench.harness``). Results go to a
new folder under results/runs/ (``--record``: results/latest.*). A benchmark that fails is one
line in the report, the others still run, and the command exits 1 once the report is written.
See ops/bench/README.md.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ops.bench import harness
from ops.bench.harness import Servers
from ops.bench.report import markdown

logger = logging.getLogger("ops.bench")
DEFAULT = ("enqueue", "worker", "service")


def cache_setting(text: str) -> tuple[int, int]:
    """``INTERVAL/BRANCH``, e.g. ``3/0``."""
    try:
        interval, branch = (int(piece) for piece in text.split("/"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected INTERVAL/BRANCH such as 3/0, got {text!r}") from error
    if interval < 2:
        raise argparse.ArgumentTypeError(f"a DeepCache interval below 2 is no caching, got {text!r}")
    return interval, branch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = harness.parser(__doc__, "latest", tiny_model=True)
    parser.add_argument(
        "--only",
        choices=BENCHMARKS,
        action="append",
        help="run only this benchmark (repeatable; default: enqueue, worker, service, and sd15 with --sd15)",
    )
    parser.add_argument("--sd15", action="store_true", help="also run the slow SD1.5-architecture benchmark")
    group = parser.add_argument_group("enqueue rate")
    group.add_argument("--jobs", type=int, default=20000, help="jobs per variant and round (default 20000)")
    group.add_argument("--enqueue-rounds", type=int, default=3, help="interleaved rounds (default 3)")
    group = parser.add_argument_group("worker throughput (tiny model)")
    group.add_argument("--worker-jobs", type=int, default=32, help="jobs per run (default 32)")
    group.add_argument("--worker-rounds", type=int, default=3, help="off/on pairs (default 3)")
    group.add_argument("--size", type=int, default=64, help="image width and height (default 64)")
    group.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    group.add_argument(
        "--cache", type=cache_setting, default=(3, 0), help="DeepCache on: INTERVAL/BRANCH (default 3/0)"
    )
    group = parser.add_argument_group(
        "service vs DeepCache's documented recipe (tiny model; on a GPU: ops/bench/gpu.py)"
    )
    group.add_argument("--service-steps", type=int, default=10, help="DDIM steps (default 10)")
    group.add_argument("--service-rounds", type=int, default=3, help="rounds, 2 of them end to end (default 3)")
    group.add_argument(
        "--service-levels",
        type=lambda t: tuple(t.split(",")),
        default=("off",),
        help="acceleration levels (default off; make bench runs every level)",
    )
    group = parser.add_argument_group("SD1.5 architecture (with --sd15)")
    group.add_argument("--sd15-model", type=Path, help="SD1.5-architecture folder (default: built, 4 GB, ~25 s)")
    group.add_argument("--sd15-rounds", type=int, default=1, help="plain/cached pairs (default 1)")
    group.add_argument("--sd15-size", type=int, default=256, help="image side (default 256)")
    group.add_argument("--sd15-steps", type=int, default=20, help="DDIM steps (default 20)")
    parser.add_argument("--device", default="auto", help="worker and SD1.5 device: auto, cpu, cuda (default auto)")
    return parser.parse_args(argv)


def run_enqueue(args: argparse.Namespace, servers: Servers) -> dict[str, Any]:
    from ops.bench.enqueue import bench_enqueue

    redis_url = servers.redis_url()
    logger.info("enqueue rate: %d jobs x %d rounds on %s", args.jobs, args.enqueue_rounds, redis_url)
    return bench_enqueue(redis_url, servers.scratch / "enqueue-storage", jobs=args.jobs, rounds=args.enqueue_rounds)


def run_worker(args: argparse.Namespace, servers: Servers) -> dict[str, Any]:
    from ops.bench.throughput import bench_worker

    model = servers.model()
    logger.info("worker throughput: %d jobs, %d off/on pairs, model %s", args.worker_jobs, args.worker_rounds, model)
    results = bench_worker(
        servers.redis_url(),
        servers.s3_endpoint(),
        model,
        servers.scratch / "worker.log",
        jobs=args.worker_jobs,
        rounds=args.worker_rounds,
        width=args.size,
        height=args.size,
        steps=args.steps,
        cache=args.cache,
        device=args.device,
        start_timeout=args.start_timeout,
    )
    results["model"] = servers.model_label()
    return results


def run_service(args: argparse.Namespace, servers: Servers) -> dict[str, Any]:
    from ops.bench.service import run_service_bench
    from ops.bench.service_plan import tiny_plan

    plan = tiny_plan(
        servers.model(),
        device=args.device,
        size=args.size,
        steps=args.service_steps,
        rounds=args.service_rounds,
        levels=args.service_levels,
        start_timeout=args.start_timeout,
    )
    logger.info("service vs recipe: %s", plan)
    results = run_service_bench(plan, servers.redis_url(), servers.scratch)
    results["plan"]["model"] = servers.model_label()
    return results


def run_sd15(args: argparse.Namespace, servers: Servers) -> dict[str, Any]:
    from ops.bench.sd15 import bench_sd15

    model = args.sd15_model or servers.model("sd15")
    results = bench_sd15(
        model,
        rounds=args.sd15_rounds,
        size=args.sd15_size,
        steps=args.sd15_steps,
        cache=args.cache,
        device=args.device,
    )
    if args.sd15_model is None:
        results["model"] = servers.model_label("sd15")
    return results


#: The benchmarks by ``--only`` name, in the order they run.
BENCHMARKS: dict[str, Callable[[argparse.Namespace, Servers], dict[str, Any]]] = {
    "enqueue": run_enqueue,
    "worker": run_worker,
    "service": run_service,
    "sd15": run_sd15,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    selected = args.only or [*DEFAULT, *(["sd15"] if args.sd15 else [])]
    with harness.session(args, markdown) as bench:
        for name, run in BENCHMARKS.items():
            if name in selected:
                with bench.part(name):
                    bench.results[name] = run(args, bench.servers)
    return harness.exit_status(bench.results)


if __name__ == "__main__":
    raise SystemExit(main())
