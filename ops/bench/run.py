"""Run the deepqueue benchmarks and write their results (JSON + markdown) to ops/bench/results/.

    python -m ops.bench.run                       # enqueue, worker, service vs recipe (~7 min on 2 quiet cores)
    python -m ops.bench.run --sd15                # also the SD1.5-architecture check (+~2 min)
    python -m ops.bench.run --only enqueue --jobs 5000

Every server is private: a redis-server and a moto S3 server on free loopback ports, and a
``deepqueue worker`` process, all stopped at the end. See ops/bench/README.md.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ops.bench.report import load_average, machine_info, markdown, write_results
from ops.localstack import start_moto, start_redis, stop

logger = logging.getLogger("ops.bench")
BENCHMARKS = ("enqueue", "worker", "service", "sd15")
DEFAULT = ("enqueue", "worker", "service")
RESULTS = Path(__file__).resolve().parent / "results"


def cache_setting(text: str) -> tuple[int, int]:
    """``INTERVAL/BRANCH``, e.g. ``3/0``."""
    try:
        interval, branch = (int(part) for part in text.split("/"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected INTERVAL/BRANCH such as 3/0, got {text!r}") from error
    if interval < 2:
        raise argparse.ArgumentTypeError(f"a DeepCache interval below 2 is no caching, got {text!r}")
    return interval, branch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ops.bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    group.add_argument("--model", type=Path, help="tiny model folder (default: built into a temporary folder)")
    group = parser.add_argument_group(
        "service vs DeepCache's documented recipe (tiny model; on a GPU: ops/bench/gpu.py)"
    )
    group.add_argument("--service-steps", type=int, default=10, help="DDIM steps (default 10)")
    group.add_argument("--service-rounds", type=int, default=3, help="rounds, 2 of them end to end (default 3)")
    group = parser.add_argument_group("SD1.5 architecture (with --sd15)")
    group.add_argument("--sd15-model", type=Path, help="SD1.5-architecture folder (default: built, 4 GB, ~25 s)")
    group.add_argument("--sd15-rounds", type=int, default=1, help="plain/cached pairs (default 1)")
    group.add_argument("--sd15-size", type=int, default=256, help="image side (default 256)")
    group.add_argument("--sd15-steps", type=int, default=20, help="DDIM steps (default 20)")
    parser.add_argument("--device", default="auto", help="worker and SD1.5 device: auto, cpu, cuda (default auto)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    parser.add_argument("--name", default="latest", help="results file name, without extension (default latest)")
    return parser.parse_args(argv)


def tiny_model(args: argparse.Namespace, scratch: Path) -> Path:
    if args.model is not None:
        return args.model
    from worker.testmodel import build_test_model

    built = scratch / "tiny"
    return built if (built / "model_index.json").exists() else build_test_model(built, "tiny")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    selected = args.only or [*DEFAULT, *(["sd15"] if args.sd15 else [])]
    results: dict[str, Any] = {"machine": machine_info()}
    busy = results["machine"]["loadavg_start"]
    if busy and busy[0] > 0.5 * (results["machine"]["usable_cores"] or 1):
        logger.warning("load average %s at start: other work shares this machine, expect noisy numbers", busy)
    started = time.perf_counter()
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="deepqueue-bench-")))
        if {"enqueue", "worker", "service"} & set(selected):
            redis_process, redis_url = start_redis(scratch)
            stack.callback(stop, redis_process)
        if "enqueue" in selected:
            from ops.bench.enqueue import bench_enqueue

            logger.info("enqueue rate: %d jobs x %d rounds on %s", args.jobs, args.enqueue_rounds, redis_url)
            results["enqueue"] = bench_enqueue(redis_url, jobs=args.jobs, rounds=args.enqueue_rounds)
        if "worker" in selected:
            from ops.bench.throughput import bench_worker

            moto_process, s3_endpoint = start_moto()
            stack.callback(stop, moto_process)
            model = tiny_model(args, scratch)
            logger.info(
                "worker throughput: %d jobs, %d off/on pairs, model %s", args.worker_jobs, args.worker_rounds, model
            )
            results["worker"] = bench_worker(
                redis_url,
                s3_endpoint,
                model,
                scratch / "worker.log",
                jobs=args.worker_jobs,
                rounds=args.worker_rounds,
                width=args.size,
                height=args.size,
                steps=args.steps,
                cache=args.cache,
                device=args.device,
            )
            if args.model is None:
                results["worker"]["model"] = "tiny (built by worker.testmodel into a temporary folder)"
        if "service" in selected:
            from ops.bench.service import Plan, run_service_bench

            plan = Plan(
                model=tiny_model(args, scratch),
                device=args.device,
                size=args.size,
                steps=args.service_steps,
                rounds=args.service_rounds,
                jobs={1: 8, 8: 32},
            )
            logger.info("service vs recipe: %s", plan)
            results["service"] = run_service_bench(plan, redis_url, scratch)
            if args.model is None:
                results["service"]["plan"]["model"] = "tiny (built by worker.testmodel into a temporary folder)"
    if "sd15" in selected:
        from ops.bench.sd15 import bench_sd15

        results["sd15"] = bench_sd15(
            args.sd15_model,
            rounds=args.sd15_rounds,
            size=args.sd15_size,
            steps=args.sd15_steps,
            cache=args.cache,
            device=args.device,
        )
    results["machine"]["loadavg_end"] = load_average()
    results["machine"]["duration_s"] = round(time.perf_counter() - started, 1)
    json_path, md_path = write_results(results, args.out, args.name)
    print(markdown(results))
    logger.info("wrote %s and %s in %.0f s", json_path, md_path, results["machine"]["duration_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
