"""Run the deepqueue benchmarks and write their results (JSON + markdown) under ops/bench/results/.

    python -m ops.bench.run                       # enqueue, worker, service vs recipe (~7 min on 2 quiet cores)
    python -m ops.bench.run --sd15                # also the SD1.5-architecture check (+~2 min)
    python -m ops.bench.run --only enqueue --jobs 5000

Every server is private: a redis-server and a moto S3 server on free loopback ports, and a
``deepqueue worker`` process, all stopped at the end. Results go to a new folder under
results/runs/ (``--record``: results/latest.*). A benchmark that fails is one line in the
report, the others still run, and the command exits 1 once the report is written. See
ops/bench/README.md.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ops.bench.report import (
    add_run_args,
    exit_status,
    load_average,
    log_written,
    machine_info,
    markdown,
    output_dir,
    part,
    write_results,
)
from ops.localstack import start_moto, start_redis, stop

logger = logging.getLogger("ops.bench")
DEFAULT = ("enqueue", "worker", "service")
BUILT_TINY = "tiny (built by worker.testmodel into a temporary folder)"


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
    add_run_args(parser, "latest")
    return parser.parse_args(argv)


@dataclass
class Servers:
    """The private servers and the tiny model, each started (or built) when a benchmark first asks."""

    args: argparse.Namespace
    stack: ExitStack
    scratch: Path
    started: dict[str, str] = field(default_factory=dict)

    def redis_url(self) -> str:
        return self._start("redis", lambda: start_redis(self.scratch, timeout=self.args.start_timeout))

    def s3_endpoint(self) -> str:
        return self._start("s3", lambda: start_moto(timeout=self.args.start_timeout))

    def _start(self, name: str, start: Callable[[], tuple[Any, str]]) -> str:
        if name not in self.started:
            process, self.started[name] = start()
            self.stack.callback(stop, process)
        return self.started[name]

    def tiny_model(self) -> Path:
        if self.args.model is not None:
            return self.args.model
        from worker.testmodel import build_test_model

        built = self.scratch / "tiny"
        return built if (built / "model_index.json").exists() else build_test_model(built, "tiny")


def run_enqueue(args: argparse.Namespace, servers: Servers) -> dict[str, Any]:
    from ops.bench.enqueue import bench_enqueue

    redis_url = servers.redis_url()
    logger.info("enqueue rate: %d jobs x %d rounds on %s", args.jobs, args.enqueue_rounds, redis_url)
    return bench_enqueue(redis_url, jobs=args.jobs, rounds=args.enqueue_rounds)


def run_worker(args: argparse.Namespace, servers: Servers) -> dict[str, Any]:
    from ops.bench.throughput import bench_worker

    model = servers.tiny_model()
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
    if args.model is None:
        results["model"] = BUILT_TINY
    return results


def run_service(args: argparse.Namespace, servers: Servers) -> dict[str, Any]:
    from ops.bench.service import run_service_bench
    from ops.bench.service_plan import tiny_plan

    plan = tiny_plan(
        servers.tiny_model(),
        device=args.device,
        size=args.size,
        steps=args.service_steps,
        rounds=args.service_rounds,
        levels=args.service_levels,
        start_timeout=args.start_timeout,
    )
    logger.info("service vs recipe: %s", plan)
    results = run_service_bench(plan, servers.redis_url(), servers.scratch)
    if args.model is None:
        results["plan"]["model"] = BUILT_TINY
    return results


def run_sd15(args: argparse.Namespace, servers: Servers) -> dict[str, Any]:
    from ops.bench.sd15 import bench_sd15

    return bench_sd15(
        args.sd15_model,
        rounds=args.sd15_rounds,
        size=args.sd15_size,
        steps=args.sd15_steps,
        cache=args.cache,
        device=args.device,
    )


#: The benchmarks by ``--only`` name, in the order they run.
BENCHMARKS: dict[str, Callable[[argparse.Namespace, Servers], dict[str, Any]]] = {
    "enqueue": run_enqueue,
    "worker": run_worker,
    "service": run_service,
    "sd15": run_sd15,
}


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
        servers = Servers(args, stack, scratch)
        for name, run in BENCHMARKS.items():
            if name in selected:
                with part(results, name):
                    results[name] = run(args, servers)
    results["machine"]["loadavg_end"] = load_average()
    results["machine"]["duration_s"] = round(time.perf_counter() - started, 1)
    paths = write_results(results, output_dir(args), args.name)
    print(markdown(results))
    log_written(paths, results)
    return exit_status(results)


if __name__ == "__main__":
    raise SystemExit(main())
