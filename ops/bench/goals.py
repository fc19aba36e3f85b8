"""The queue-level goals of issue 7 in one run, side by side: batch fill, lone-job latency,
critical-path overhead, scaling, fair share and priority between runs, submit memory, Redis
bytes per queued job, enqueue rate and worker memory growth, and the service against
DeepCache's recipe at every acceleration level (tiny model). Each part also writes its own
results file (see ops/bench/README.md), all in one new folder under results/runs/
(``--record``: over the committed results/*-latest.*).

    make bench                                   # = python -m ops.bench.goals (its service part ~6 min)
    .venv/bin/python -m ops.bench.goals --full   # scaling to 16 workers, 1M-prompt submit, 500 batches
    .venv/bin/python -m ops.bench.goals --only scaling --start-timeout 1200

A part that fails (a worker that does not start in time) is one line in the report; the other
parts and goals are still measured, and the command exits 1 once the report is written.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ops.bench import batching, fairshare, harness, scaling, service, submit_scale, worker_memory
from ops.bench.report import run_line
from ops.bench.service_report import E2E_MODE

logger = logging.getLogger(__name__)

#: The parts, in the order they run: name -> the benchmark's ``main``.
PARTS: dict[str, Callable[[list[str]], dict[str, Any]]] = {
    "batching": batching.main,
    "scaling": scaling.main,
    "fairshare": fairshare.main,
    "submit": submit_scale.main,
    "memory": worker_memory.main,
    "service": service.main,
}
Row = tuple[str, str, str, bool | None]
#: Jobs/s ``Client.submit`` should enqueue from a .jsonl (issue 17; issue 7 asked 5,000).
ENQUEUE_GOAL = 100_000


def goal_rows(parts: dict[str, Any]) -> list[Row]:
    """``(goal, measured, target, met)`` rows of whatever the parts measured; met None: reported, no target."""
    return [
        *batching_rows(parts.get("batching", {})),
        *scaling_rows(parts.get("scaling", {}).get("points", [])),
        *fairshare_rows(parts.get("fairshare", {})),
        *submit_rows(parts.get("submit", {}).get("points", [])),
        *memory_rows(parts.get("memory", {}).get("point")),
        *service_rows(parts.get("service", {}).get("service")),
    ]


def batching_rows(batching: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for name, point in batching.get("fill", {}).items():
        fill = point["batch_fill"]
        rows.append((f"batch fill, deep shuffled 10-size queue, {name}", f"{fill:.3f}", "≥ 0.95", fill >= 0.95))
    for point in batching.get("lone", []):
        where = "idle worker" if not point["behind"] else f"behind {point['behind']} jobs"
        rows.append(
            (f"lone job wait ÷ (max wait + batch), {where}", f"{point['ratio']:.3f}", "≤ 1.10", point["ratio"] <= 1.10)
        )
    return rows


def scaling_rows(points: list[dict[str, Any]]) -> list[Row]:
    rows: list[Row] = [
        (f"critical-path overhead, {p['workers']} simulated worker(s)", f"{p['overhead']:.3f}", "reported", None)
        for p in points
    ]
    for point in points:
        if point["workers"] == 1:
            continue
        target = point["workers"] == 16
        rows.append(
            (
                f"scaling, {point['workers']} simulated workers (÷ linear)",
                f"{point['scaling']:.2f}",
                "≥ 0.90 at 16" if target else "reported",
                (point["scaling"] >= 0.90) if target else None,
            )
        )
    return rows


def fairshare_rows(results: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    share = results.get("share")
    if share and share["windows"]:
        deviation, fill = share["max_deviation"], share["min_fill"]
        goal = "runs weighted 1:1:2, 4 simulated workers: largest deviation from the weights, any 60 s window"
        rows.append((goal, f"{deviation:.1%}", "≤ 5 %", deviation <= 0.05))
        rows.append(("batch fill while sharing, lowest 60 s window", f"{fill:.3f}", "≥ 0.95", fill >= 0.95))
    point = results.get("priority")
    if point and point["first_call_after_free_s"] is not None:
        delay, bound = point["first_call_after_free_s"], point["bound_s"]
        goal = f"100-job high run behind {point['backlog']:,} normal: first call after the first free worker (s)"
        rows.append((goal, f"{delay:.2f}", f"≤ {bound:.2f} (a call + max wait)", delay <= bound))
        made = point["bulk_images_meanwhile"]
        rows.append(("images of the normal run until the high run is done", f"{made:,}", "< 1,000", made < 1000))
    return rows


def submit_rows(points: list[dict[str, Any]]) -> list[Row]:
    if not points:
        return []
    peaks = ", ".join(f"{p['prompts']:,}: {p['rss_peak_mib']:.0f}" for p in points)
    flat = max(p["rss_peak_mib"] for p in points) <= 1.10 * min(p["rss_peak_mib"] for p in points)
    per_job, per_done = points[-1]["redis_bytes_per_job"], points[-1]["redis_bytes_per_done_job"]
    rate = min(p["jobs_per_s"] for p in points)
    return [
        ("submit peak RSS (MiB) by prompts", peaks, "flat (within 10 %)", flat),
        ("Redis bytes per queued job (100-char prompt)", f"{per_job:,.0f}", "≤ 300", per_job <= 300),
        ("Redis bytes per done job", f"{per_done:,.1f}", "≤ 16", per_done <= 16),
        (
            "`Client.submit` enqueue rate (jobs/s, slowest size)",
            f"{rate:,.0f}",
            f"≥ {ENQUEUE_GOAL:,}",
            rate >= ENQUEUE_GOAL,
        ),
    ]


def memory_rows(point: dict[str, Any] | None) -> list[Row]:
    if point is None:
        return []
    growth = max(point["main_mib"]["growth"], point["pool_mib"]["growth"])
    goal = f"worker RSS growth over {point['batches']} batches (larger of main, pool)"
    return [(goal, f"{100 * growth:+.1f} %", "< 5 %", growth < 0.05)]


def service_rows(bench: dict[str, Any] | None) -> list[Row]:
    """Each level's worker ÷ recipe at the largest batch, 3/0 (a trend off a GPU), and its quality gate."""
    if not bench:
        return []
    batch = max(bench["plan"]["table_batches"])
    cell = bench["table"].get(f"{batch} {E2E_MODE}", {"over_recipe": {}})
    trend = "" if bench["device"].startswith("cuda") else " (CPU: trend only)"
    rows: list[Row] = []
    for level in bench["levels"]:
        ratio = cell["over_recipe"].get(f"worker:{level}")
        if ratio is not None:
            goal = f"worker ÷ recipe, acceleration {level}, batch {batch}, {E2E_MODE}{trend}"
            rows.append((goal, f"{ratio['median']:.3f}", "reported", None))
    gate = bench.get("quality", {})
    for level, row in gate.get("levels", {}).items():
        worst = min(row["psnr_db"].values())
        rows.append(
            (
                f"PSNR vs eager, acceleration {level} ({gate['dtype']})",
                f"{worst:.1f} dB",
                f"≥ {gate['gate_db']:g} dB",
                row["passes"],
            )
        )
    return rows


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Queue-level goals (issue 7)",
        "",
        f"{run_line(results)} {results['seconds']:.0f} s. "
        "Details: batching-latest, scaling-latest, fairshare-latest, submit-latest, worker-memory-latest, "
        "service-latest (.md/.json).",
        "",
        "| goal | measured | target | met |",
        "| --- | ---: | ---: | :---: |",
    ]
    for goal, measured, target, met in results["goals"]:
        lines.append(f"| {goal} | {measured} | {target} | {'—' if met is None else ('yes' if met else '**no**')} |")
    return "\n".join(lines) + "\n"


def part_args(args: argparse.Namespace, out: Path) -> dict[str, list[str]]:
    """Each part's command line: its size (quick or ``--full``), the shared folder and start-up timeout."""
    shared = ["--out", str(out), "--start-timeout", str(args.start_timeout)]
    model = ["--model", str(args.tiny_model)] if args.tiny_model else []
    return {
        "batching": shared,
        "scaling": ["--workers", "1,2,4,8,16" if args.full else "1,2,4", "--calls", "24", *shared],
        "fairshare": ["--share-seconds", "240" if args.full else "120", *shared],
        "submit": ["--sizes", "10000,100000,1000000" if args.full else "10000,100000", *shared],
        "memory": ["--batches", "500" if args.full else "200", "--warmup", "50", *model, *shared],
        "service": [*model, *shared],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = harness.parser(__doc__, "goals-latest", tiny_model=True)
    parser.add_argument("--full", action="store_true", help="16 workers, a 1M-prompt submit, 500 batches")
    parser.add_argument("--only", choices=PARTS, action="append", help="run only this part (repeatable)")
    args = parser.parse_args(argv)
    parts: dict[str, dict[str, Any]] = {}
    with harness.session(args, markdown) as bench:
        for name in args.only or PARTS:
            with bench.part(name):
                parts[name] = PARTS[name](part_args(args, bench.out_dir)[name])
            for label, failure in parts.get(name, {}).get("failed", {}).items():
                bench.results.setdefault("failed", {})[f"{name}: {label}"] = failure
        bench.results["goals"] = goal_rows(parts)
    return bench.results


if __name__ == "__main__":
    raise SystemExit(harness.exit_status(main()))
