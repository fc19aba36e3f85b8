"""The queue-level goals of issue 7 in one run, side by side: batch fill, lone-job latency,
critical-path overhead, scaling, submit memory, Redis bytes per queued job, enqueue rate and
worker memory growth. Each part also writes its own results file (see ops/bench/README.md).

    make bench                                   # = python -m ops.bench.goals        (~8 min)
    .venv/bin/python -m ops.bench.goals --full   # scaling to 16 workers, 1M-prompt submit, 500 batches
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from ops.bench import batching, scaling, submit_scale, worker_memory
from ops.bench.report import finish, new_results, run_line

logger = logging.getLogger(__name__)


def goal_rows(parts: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """``(goal, measured, target, met)`` rows; met None: reported, no target."""
    fill, lone = parts["batching"]["fill"], parts["batching"]["lone"]
    rows: list[tuple[str, str, str, bool | None]] = []
    for name, point in fill.items():
        rows.append(
            (
                f"batch fill, deep shuffled 10-size queue, {name}",
                f"{point['batch_fill']:.3f}",
                "≥ 0.95",
                point["batch_fill"] >= 0.95,
            )
        )
    for point in lone:
        where = "idle worker" if not point["behind"] else f"behind {point['behind']} jobs"
        rows.append(
            (f"lone job wait ÷ (max wait + batch), {where}", f"{point['ratio']:.3f}", "≤ 1.10", point["ratio"] <= 1.10)
        )
    points = parts["scaling"]["points"]
    for point in points:
        rows.append(
            (
                f"critical-path overhead, {point['workers']} simulated worker(s)",
                f"{point['overhead']:.3f}",
                "reported",
                None,
            )
        )
    for point in points[1:]:
        target = point["workers"] == 16
        rows.append(
            (
                f"scaling, {point['workers']} simulated workers (÷ linear)",
                f"{point['scaling']:.2f}",
                "≥ 0.90 at 16" if target else "reported",
                (point["scaling"] >= 0.90) if target else None,
            )
        )
    submits = parts["submit"]["points"]
    peaks = ", ".join(f"{p['prompts']:,}: {p['rss_peak_mib']:.0f}" for p in submits)
    flat = max(p["rss_peak_mib"] for p in submits) <= 1.10 * min(p["rss_peak_mib"] for p in submits)
    rows.append(("submit peak RSS (MiB) by prompts", peaks, "flat (within 10 %)", flat))
    biggest = submits[-1]
    rows.append(
        (
            "Redis bytes per queued job (100-char prompt)",
            f"{biggest['redis_bytes_per_job']:,.0f}",
            "≤ 600",
            biggest["redis_bytes_per_job"] <= 600,
        )
    )
    rate = min(p["jobs_per_s"] for p in submits)
    rows.append(("`Client.submit` enqueue rate (jobs/s, slowest size)", f"{rate:,.0f}", "≥ 5,000", rate >= 5000))
    memory = parts["memory"]["point"]
    growth = max(memory["main_mib"]["growth"], memory["pool_mib"]["growth"])
    rows.append(
        (
            f"worker RSS growth over {memory['batches']} batches (larger of main, pool)",
            f"{100 * growth:+.1f} %",
            "< 5 %",
            growth < 0.05,
        )
    )
    return rows


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Queue-level goals (issue 7)",
        "",
        f"{run_line(results)} {results['seconds']:.0f} s. "
        "Details: batching-latest, scaling-latest, submit-latest, worker-memory-latest (.md/.json).",
        "",
        "| goal | measured | target | met |",
        "| --- | ---: | ---: | :---: |",
    ]
    for goal, measured, target, met in results["goals"]:
        lines.append(f"| {goal} | {measured} | {target} | {'—' if met is None else ('yes' if met else '**no**')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="16 workers, a 1M-prompt submit, 500 batches")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = new_results()
    started = time.perf_counter()
    parts = {
        "batching": batching.main([]),
        "scaling": scaling.main(["--workers", "1,2,4,8,16" if args.full else "1,2,4", "--calls", "24"]),
        "submit": submit_scale.main(["--sizes", "10000,100000,1000000" if args.full else "10000,100000"]),
        "memory": worker_memory.main(["--batches", "500" if args.full else "200", "--warmup", "50"]),
    }
    results.update(seconds=time.perf_counter() - started, goals=goal_rows(parts))
    return finish(results, "goals-latest", markdown)


if __name__ == "__main__":
    main()
