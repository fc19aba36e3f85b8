"""The service against DeepCache's documented recipe, on one model, device and recipe.

Four paths make the same images (same prompts, size, steps, guidance, DDIM):

- ``recipe``: DeepCache's README usage: ``DiffusionPipeline.from_pretrained`` + ``DeepCacheSDHelper``,
  ``set_params`` / ``enable`` / ``pipe(prompts)`` in a loop (its own copy of the pipeline);
- ``engine``: the worker's ``Engine.generate`` alone;
- ``embedded``: ``run_embedded`` (batching, generate, background encode + local files);
- ``worker``: a real ``deepqueue worker`` process on a private Redis with local storage,
  timed from ``Client.submit`` to every job ``done``.

The last three run once per acceleration level (``worker.pipeline.acceleration``: an Engine, and workers,
per level), so a path's name is ``engine:compile``, ``worker:off``... All run round by round,
each in turn (the order alternating), beside the DeepCache matrix (the ``off`` Engine: modes x
batch sizes, with peak device memory): a GPU's speed drifts over minutes of load (seen on an
H200: the same call 5-10% slower late in a run), so each ratio is taken against the recipe of
the same round. ``embedded`` and ``worker`` are timed end to end over ``jobs`` images at 3/0,
the workers started (one per level and batch size) before the first round.

Per level it also records the first calls' seconds (compiling), a compiled worker's cold start
and warm restart (start to ready, the compile cache filled by the first), peak memory, the
quality gate (PSNR of its images against the ``off`` Engine's, same seeds) and, on a GPU with a
known dense fp16 peak, the share of that peak the Engine reaches on SD1.5-shaped work.

The plan and its jobs are in ``service_plan``, the four paths in ``service_paths``, the
markdown in ``service_report``; this module runs them round by round and sums them up.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ops.bench import harness
from ops.bench.report import one_line, run_line, summarize
from ops.bench.service_paths import (
    Recipe,
    embedded_run,
    engine_call,
    engine_images,
    peak_memory_gib,
    peak_memory_reset,
    sliced_decode_check,
    start_workers,
    worker_process,
    worker_run,
)
from ops.bench.service_plan import COMPILED, MODES, PROMPT, Plan, first_call_modes, levels_for, tiny_plan
from ops.bench.service_report import E2E_MODE, markdown
from ops.localstack import client_for
from worker.pipeline.acceleration import LEVELS

logger = logging.getLogger(__name__)

#: Quality gate (issue 15): PSNR of an accelerated image against the eager one, same seeds.
PSNR_GATE_DB = {"float16": 35.0, "bfloat16": 35.0, "float32": 50.0}
#: Dense fp16/bf16 tensor TFLOPs by card name fragment (NVIDIA datasheets, no sparsity).
DENSE_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "RTX 4090": 165.0}
#: One SD1.5 UNet pass at 512x512: 0.678 TFLOPs (338.8 GMACs, T-GATE README); a shallow
#: DeepCache 3/0 step costs 0.144 of a full one (29.5 of 67.8 TFLOPs per 50-step image).
UNET_PASS_TFLOPS_512 = 0.678
SHALLOW_SHARE = 0.144


def psnr_db(a: Any, b: Any) -> float:
    import numpy as np

    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def tflops_per_image(plan: Plan, mode: str) -> float:
    """SD1.5 UNet TFLOPs for one image (guided, so two passes per step) at this size and mode."""
    interval, _ = MODES[mode]
    full = -(-plan.steps // interval)
    shallow = plan.steps - full
    per_step = 2 * UNET_PASS_TFLOPS_512 * (plan.size / 512) ** 2
    return per_step * (full + SHALLOW_SHARE * shallow)


def dense_tflops(device: str) -> float | None:
    return next((tflops for name, tflops in DENSE_TFLOPS.items() if name in device), None)


def quality_gate(engines: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Per level and mode, PSNR of its images against the ``off`` Engine's at the largest table
    batch (same prompts and seeds), and whether it passes the gate for this dtype."""
    batch = max(plan.table_batches)
    dtype = str(engines["off"].pipe.unet.dtype).removeprefix("torch.")
    gate = PSNR_GATE_DB.get(dtype, PSNR_GATE_DB["float16"])
    reference = {mode: engine_images(engines["off"], plan, batch, mode) for mode in plan.table_modes}
    rows: dict[str, Any] = {}
    for level, engine in engines.items():
        if level == "off":
            continue
        psnr = {mode: psnr_db(engine_images(engine, plan, batch, mode), reference[mode]) for mode in plan.table_modes}
        rows[level] = {"psnr_db": psnr, "passes": all(value >= gate for value in psnr.values())}
    return {"batch": batch, "gate_db": gate, "dtype": dtype, "modes": list(plan.table_modes), "levels": rows}


def warm_restart(plan: Plan, redis_url: str, scratch: Path, device: str, level: str, slot: int) -> dict[str, Any]:
    """A compiled worker started ``plan.restarts`` times on the compile cache the benchmark's Engines and workers
    filled: seconds from start to ready, and the last warm-up's counts (only cache hits, when the
    cache works)."""
    batch = max(plan.table_batches)
    times = []
    for _ in range(plan.restarts):
        with worker_process(plan, redis_url, scratch / "restart", batch, device, slot, level=level) as env:
            times.append(float(env["start_s"]))
            log = Path(env["log"]).read_text()
    warmed = [line for line in log.splitlines() if "warmed up" in line]
    return {"level": level, "batch": batch, "start_s": times, "warm_up_line": warmed[-1][-200:] if warmed else None}


def run_service_bench(
    plan: Plan,
    redis_url: str,
    scratch: Path,
    *,
    worker: bool = True,
    checkpoint: Callable[[dict[str, Any]], None] = lambda partial: None,
) -> dict[str, Any]:
    """Every path above at every level, interleaved round by round (a GPU's speed drifts over
    minutes of load); returns JSON-ready results and hands them to ``checkpoint`` after each round."""
    from worker.pipeline.engine import Engine
    from worker.settings import WorkerSettings

    started = time.perf_counter()
    # One compile cache for every Engine, worker and restart of the run (the restarts' scratch differs).
    plan = replace(plan, compile_cache=plan.compile_cache or scratch / "compile-cache")
    first = Engine.load(WorkerSettings(model=str(plan.model), device=plan.device, storage="local", acceleration="off"))
    device = first.device
    engines = {"off": first}
    compile_s: dict[str, float] = {}
    failed_levels: dict[str, str] = {}
    results: dict[str, Any] = {
        "plan": {
            **asdict(plan),
            "model": str(plan.model),
            "compile_cache": str(plan.compile_cache),
            "jobs": {str(k): v for k, v in plan.jobs.items()},
        },
        "device": first.describe()["device"],
        "dtype": str(first.pipe.unet.dtype).removeprefix("torch."),
        "first_calls_s": compile_s,
    }
    # Each level's Engine and its first calls at each shape and mode it will meet (kernels,
    # allocator, DeepCache hooks; compiling and capturing, at the levels that do). A level that
    # fails here is left out of the run, with its error, instead of ending the benchmark.
    for level in levels_for(plan, device):
        try:
            if level != "off":
                settings = WorkerSettings(
                    model=str(plan.model),
                    device=plan.device,
                    storage="local",
                    acceleration=level,
                    compile_cache=plan.compile_cache,
                )
                engines[level] = Engine.load(settings)
            began = time.perf_counter()
            for batch in sorted({*plan.table_batches, *(plan.batches if level == "off" else ())}):
                for mode in first_call_modes(plan, level):
                    engine_call(engines[level], plan, batch, mode, steps=3)
            compile_s[level] = round(time.perf_counter() - began, 1)
            logger.info("level %s: first calls in %.0f s", level, compile_s[level])
        except Exception as error:
            if level == "off":
                raise
            engines.pop(level, None)
            failed_levels[level] = one_line(error)
            logger.exception("level %s left out of the run", level)
        checkpoint(results | {"failed_levels": failed_levels})
    levels = tuple(engines)
    results |= {
        "levels": list(levels),
        "failed_levels": failed_levels,
        "engines": {level: engine.describe() for level, engine in engines.items()},  # CUDA graphs captured...
        "quality": quality_gate(engines, plan),
    }
    checkpoint(results)
    recipe = Recipe(plan.model, device, first.pipe.unet.dtype)
    cells = [(batch, mode) for batch in plan.table_batches for mode in plan.table_modes]
    e2e_cells = [(batch, E2E_MODE) for batch in plan.table_batches]
    with ExitStack() as stack:
        workers: dict[tuple[str, int], tuple[dict[str, str], Any]] = {}
        if worker:
            specs = [(level, batch) for level in levels for batch in plan.table_batches]
            started_envs = start_workers(stack, plan, redis_url, scratch, device, specs)
            for key, env in started_envs.items():
                client = stack.enter_context(client_for(env))
                workers[key] = (env, client)
        logger.info("engines, recipe and %d workers up in %.0f s", len(workers), time.perf_counter() - started)
        results["worker_start_s"] = {
            f"{level} {batch}": float(env["start_s"]) for (level, batch), (env, _) in workers.items()
        }
        checkpoint(results)
        for batch, mode in cells:
            recipe([PROMPT.format(i=i) for i in range(batch)], mode, plan.size, 3)
        for (_, batch), (env, client) in workers.items():
            worker_run(client, env, plan, batch, E2E_MODE, batch, steps=3)
        samples = Samples()
        for round_ in range(plan.rounds):
            flip = round_ % 2 == 1  # alternate who goes first
            for batch in plan.batches:
                for mode in plan.matrix_modes:
                    cell = f"{batch} {mode}"
                    peak_memory_reset(device)
                    samples.add("engine:off", cell, round_, batch / engine_call(first, plan, batch, mode))
                    samples.peaks[f"engine:off {cell}"] = peak_memory_gib(device)
            for batch, mode in reversed(cells) if flip else cells:
                cell = f"{batch} {mode}"
                paths = ["recipe", *(f"engine:{level}" for level in levels if level != "off")]
                for path in reversed(paths) if flip else paths:
                    peak_memory_reset(device)
                    if path == "recipe":
                        prompts = [PROMPT.format(i=i) for i in range(batch)]
                        samples.add("recipe", cell, round_, batch / recipe(prompts, mode, plan.size, plan.steps))
                    else:
                        engine = engines[path.partition(":")[2]]
                        samples.add(path, cell, round_, batch / engine_call(engine, plan, batch, mode))
                    samples.peaks[f"{path} {cell}"] = peak_memory_gib(device)
            if round_ < plan.e2e_rounds:
                for batch, mode in reversed(e2e_cells) if flip else e2e_cells:
                    cell, count = f"{batch} {mode}", plan.jobs[batch]
                    for level in reversed(levels) if flip else levels:
                        run = embedded_run(engines[level], plan, scratch, batch, mode, count)
                        samples.add(f"embedded:{level}", cell, round_, run["images_per_s"], run)
                        if (level, batch) in workers:
                            env, client = workers[level, batch]
                            run = worker_run(client, env, plan, batch, mode, count, plan.steps)
                            samples.add(f"worker:{level}", cell, round_, run["images_per_s"], run)
            results.update(samples.summary(plan, cells, dense_tflops(results["device"]) if plan.sd15_shaped else None))
            checkpoint(results)
            logger.info("round %d of %d done", round_ + 1, plan.rounds)
        if plan.sliced_check:
            results["vae_slicing"] = sliced_decode_check(first, plan)
        logs = [Path(env["log"]).read_text() for env, _ in workers.values()]
        results["worker_main_process_fork_safe"] = all("main process is fork-safe" in log for log in logs) or None
    compiled = [level for level in levels if level in COMPILED]
    if worker and compiled and plan.restarts > 0:
        results["warm_restart"] = warm_restart(plan, redis_url, scratch, device, compiled[-1], len(workers))
        checkpoint(results)
    return results


@dataclass
class Samples:
    """Images/s by path, table cell and round, and what each end-to-end run reported."""

    rates: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    peaks: dict[str, float | None] = field(default_factory=dict)  # "path cell" -> GiB

    def add(self, path: str, cell: str, round_: int, rate: float, run: dict[str, Any] | None = None) -> None:
        self.rates.setdefault(path, {}).setdefault(cell, {})[round_] = rate
        if run is not None:
            self.runs.setdefault(path, {}).setdefault(cell, []).append(run)

    def summary(self, plan: Plan, cells: list[tuple[int, str]], peak_tflops: float | None) -> dict[str, Any]:
        """The matrix (the ``off`` Engine), and per table cell each path's images/s, its ratio to
        the recipe (the median over rounds of path ÷ recipe in the same round), peak memory and,
        given the card's dense peak, the share of it reached."""
        engine = self.rates["engine:off"]
        matrix = []
        for batch in plan.batches:
            off = statistics.median(engine[f"{batch} off"].values())
            for mode in plan.matrix_modes:
                rates = list(engine[f"{batch} {mode}"].values())
                matrix.append(
                    {
                        "batch": batch,
                        "mode": mode,
                        "seconds_per_call": summarize([batch / rate for rate in rates]),
                        "images_per_s": statistics.median(rates),
                        "speedup_vs_off": statistics.median(rates) / off,
                        "peak_memory_gib": self.peaks.get(f"engine:off {batch} {mode}"),
                    }
                )
        table = {}
        for batch, mode in cells:
            cell = f"{batch} {mode}"
            recipe = self.rates["recipe"][cell]
            row: dict[str, Any] = {
                "batch": batch,
                "mode": mode,
                "images_per_s": {},
                "over_recipe": {},
                "peak_memory_gib": {},
                "dense_peak_share": {},
            }
            for path, by_cell in self.rates.items():
                if cell not in by_cell:
                    continue
                median = statistics.median(by_cell[cell].values())
                row["images_per_s"][path] = summarize(list(by_cell[cell].values()))
                if path != "recipe":
                    row["over_recipe"][path] = summarize(
                        [rate / recipe[r] for r, rate in by_cell[cell].items() if r in recipe]
                    )
                if f"{path} {cell}" in self.peaks:
                    row["peak_memory_gib"][path] = self.peaks[f"{path} {cell}"]
                if peak_tflops:
                    row["dense_peak_share"][path] = median * tflops_per_image(plan, mode) / peak_tflops
            table[cell] = row
        return {"matrix": matrix, "table": table, "runs": self.runs}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The service against the recipe at every level on the tiny model (``make bench``'s part
    ``service``; on a GPU, ops/bench/gpu.py runs the same on SD1.5's architecture)."""
    parser = harness.parser(main.__doc__ or "", "service-latest", tiny_model=True)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    parser.add_argument("--size", type=int, default=64, help="image side (default 64)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, 2 of them end to end (default 3)")
    parser.add_argument(
        "--levels",
        type=lambda t: tuple(t.split(",")),
        default=LEVELS,
        help="acceleration levels (default all; graphs only on CUDA)",
    )
    args = parser.parse_args(argv)
    with harness.session(args, service_markdown) as bench, bench.part("service"):
        servers = bench.servers
        plan = tiny_plan(
            servers.model(),
            device=args.device,
            size=args.size,
            steps=args.steps,
            rounds=args.rounds,
            levels=args.levels,
            start_timeout=args.start_timeout,
        )
        bench.results["service"] = run_service_bench(plan, servers.redis_url(), bench.scratch)
        bench.results["service"]["plan"]["model"] = servers.model_label()
    return bench.results


def service_markdown(results: dict[str, Any]) -> str:
    lines = ["# The service against DeepCache's documented recipe, by acceleration level", "", run_line(results), ""]
    if "service" in results:
        lines += markdown(results["service"], "Service vs recipe")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(harness.exit_status(main()))
