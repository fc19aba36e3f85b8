"""The service benchmark's section of a report (``ops.bench.service``'s results as markdown),
apart from the benchmark itself so that the combined report (``ops.bench.report``) can render it
without importing the benchmark, which imports the report's helpers."""

from __future__ import annotations

import statistics
from typing import Any

#: The mode the end-to-end paths (embedded, worker) run.
E2E_MODE = "3/0"

#: The table's kinds of path, in order; each but the recipe runs at every level.
PATHS = ("recipe", "engine", "embedded", "worker")


def markdown(results: dict[str, Any], title: str) -> list[str]:
    """The comparison table by level, the quality gate, start-up costs, the matrix and the
    slicing check, as markdown lines."""
    plan = results["plan"]
    levels = results.get("levels", ["off"])
    e2e_rounds = min(plan["e2e_rounds"], plan["rounds"])
    lines = [
        f"## {title}: {plan['size']}x{plan['size']}, {plan['steps']} DDIM steps, {results['device']}, "
        f"{results['dtype']}",
        "",
        f"Model `{plan['model']}`. Acceleration levels: {', '.join(levels)}. {plan['rounds']} rounds; in each, every "
        f"path runs in turn (order alternating): recipe and Engines one call per cell, embedded and worker (at "
        f"{E2E_MODE}, in {e2e_rounds} of them) {plan['jobs']} jobs by batch size, the worker timed from "
        "`Client.submit` to all done. Images/s: median over rounds; ÷ recipe: median over rounds of the ratio to "
        "the recipe of the same round.",
        "",
        "| batch | DeepCache | path | level | img/s | ÷ recipe | peak GiB | share of dense peak |",
        "|---:|---|---|---|---:|---:|---:|---:|",
    ]
    for row in results.get("table", {}).values():  # none yet in a run cut before its first round
        for path in [
            "recipe",
            *(f"{kind}:{level}" for level in levels for kind in PATHS[1:]),
        ]:
            if path not in row["images_per_s"]:
                continue
            kind, _, level = path.partition(":")
            share = row.get("dense_peak_share", {}).get(path)
            lines.append(
                f"| {row['batch']} | {row['mode']} | {kind} | {level or '–'} "
                f"| {_num(row['images_per_s'][path]['median'])} "
                f"| {_num(row['over_recipe'].get(path, {}).get('median'), 3)} "
                f"| {_num(row.get('peak_memory_gib', {}).get(path))} "
                f"| {f'{100 * share:.1f}%' if share else '–'} |"
            )
    if "quality" in results and results["quality"]["levels"]:
        q = results["quality"]
        lines += [
            "",
            f"Quality gate: PSNR of each level's images against the `off` Engine's (same seeds, batch {q['batch']}, "
            f"{q['dtype']}; gate {q['gate_db']:g} dB):",
            "",
            "| level | " + " | ".join(f"PSNR {mode}" for mode in q["modes"]) + " | passes |",
            "|---|" + "---:|" * len(q["modes"]) + "---|",
        ]
        for level, row in q["levels"].items():
            values = " | ".join(_num(row["psnr_db"][mode], 1) for mode in q["modes"])
            lines.append(f"| {level} | {values} | {'yes' if row['passes'] else '**no**'} |")
    if results.get("first_calls_s"):
        calls = ", ".join(f"{level} {seconds:.0f} s" for level, seconds in results["first_calls_s"].items())
        lines += ["", f"First calls per Engine (compiling, at compile and graphs): {calls}."]
    if results.get("worker_start_s"):
        starts = ", ".join(f"{key}: {seconds:.0f} s" for key, seconds in results["worker_start_s"].items())
        lines.append(
            f"Worker start to ready (level batch; started side by side; compiled levels warm their shape first): "
            f"{starts}."
        )
    captured = {level: e for level, e in (results.get("engines") or {}).items() if "cuda_graphs" in e}
    for level, described in captured.items():
        lines.append(
            f"CUDA graphs held by the {level} Engine after the run's first calls: {described['cuda_graphs']}"
            + (
                f"; shapes left uncaptured: {described['cuda_graphs_uncaptured']}"
                if "cuda_graphs_uncaptured" in described
                else ""
            )
            + "."
        )
    for level, error in (results.get("failed_levels") or {}).items():
        lines.append(f"Level **{level} left out**: its Engine failed to load or to make its first images: {error}")
    if "warm_restart" in results:
        w = results["warm_restart"]
        lines.append(
            f"Warm restart ({w['level']}, batch {w['batch']}, compile cache filled): start to ready "
            + ", ".join(f"{seconds:.0f} s" for seconds in w["start_s"])
            + (f" ({w['warm_up_line'].strip()})" if w.get("warm_up_line") else "")
            + "."
        )
    lines += [
        "",
        "DeepCache matrix (the `off` Engine, seconds per call, median (min–max); peak device memory of the call):",
        "",
        "| batch | DeepCache | s/call | images/s | speed-up vs off | peak GiB |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in results.get("matrix", []):
        s = row["seconds_per_call"]
        lines.append(
            f"| {row['batch']} | {row['mode']} | {s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f}) "
            f"| {row['images_per_s']:.2f} | {row['speedup_vs_off']:.2f}x | {_num(row['peak_memory_gib'])} |"
        )
    if "vae_slicing" in results:
        v = results["vae_slicing"]
        lines += [
            "",
            f"VAE slicing at batch {v['batch']}, 3/0: on {v['on']['seconds_per_call']['median']:.3f} s/call "
            f"(peak {_num(v['on']['peak_memory_gib'])} GiB), off {v['off']['seconds_per_call']['median']:.3f} s/call "
            f"(peak {_num(v['off']['peak_memory_gib'])} GiB).",
        ]
    for path, by_cell in results.get("runs", {}).items():
        share = ", ".join(
            f"{cell}: {statistics.median(r['pipeline_s'] / r['wall_s'] for r in runs):.3f}"
            for cell, runs in by_cell.items()
        )
        lines += ["", f"{path}: share of wall time inside pipeline calls (median of runs) — {share}."]
    if results.get("worker_main_process_fork_safe") is not None:
        lines.append(f"Worker main process fork-safe (no torch/diffusers): {results['worker_main_process_fork_safe']}.")
    return lines + [""]


def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"
