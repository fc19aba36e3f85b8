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
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ops.bench.report import (
    START_TIMEOUT_S,
    add_run_args,
    exit_status,
    finish,
    new_results,
    output_dir,
    part,
    run_line,
    summarize,
)
from ops.bench.service_report import E2E_MODE, markdown
from producer.job import Job
from worker.pipeline.acceleration import LEVELS

logger = logging.getLogger(__name__)

#: DeepCache settings by label: (interval, branch); interval 1 is no caching.
MODES = {"off": (1, 0), "3/0": (3, 0), "5/0": (5, 0), "5/1": (5, 1)}
#: The comparison table's modes: caching off, DeepCache's default recipe and a longer interval.
TABLE_MODES = ("off", "3/0", "5/0")
#: Levels that compile (their first calls and worker start-ups include compiling).
COMPILED = ("compile", "graphs")
#: Quality gate (issue 15): PSNR of an accelerated image against the eager one, same seeds.
PSNR_GATE_DB = {"float16": 35.0, "bfloat16": 35.0, "float32": 50.0}
#: Dense fp16/bf16 tensor TFLOPs by card name fragment (NVIDIA datasheets, no sparsity).
DENSE_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "RTX 4090": 165.0}
#: One SD1.5 UNet pass at 512x512: 0.678 TFLOPs (338.8 GMACs, T-GATE README); a shallow
#: DeepCache 3/0 step costs 0.144 of a full one (29.5 of 67.8 TFLOPs per 50-step image).
UNET_PASS_TFLOPS_512 = 0.678
SHALLOW_SHARE = 0.144
PROMPT = "a photo of an astronaut riding a horse on the moon, detailed, {i}"
GUIDANCE = 7.5
SEED = 1234


@dataclass(frozen=True)
class Plan:
    model: Path
    device: str = "auto"
    size: int = 512
    steps: int = 50
    rounds: int = 3
    batches: tuple[int, ...] = (1, 4, 8)  # the matrix
    table_batches: tuple[int, ...] = (1, 8)  # recipe / engine / embedded / worker
    jobs: dict[int, int] = field(default_factory=lambda: {1: 8, 8: 48})  # end-to-end jobs per batch size
    e2e_rounds: int = 2  # rounds that also run embedded and worker (the slow paths)
    sliced_check: bool = True  # one more matrix cell: batch max, 3/0, VAE slicing forced on
    start_timeout: float = START_TIMEOUT_S  # seconds a worker may take to start
    levels: tuple[str, ...] = ("off",)  # acceleration levels (graphs only where CUDA is)
    compile_cache: Path | None = None  # DEEPQUEUE_COMPILE_CACHE of Engines and workers (default: in scratch)
    sd15_shaped: bool = False  # the model has SD1.5's UNet: report the share of dense peak
    table_modes: tuple[str, ...] = TABLE_MODES  # DeepCache modes of the comparison table
    matrix_modes: tuple[str, ...] = tuple(MODES)  # and of the matrix ("off" first: the speed-ups' base)


def tiny_plan(
    model: Path, *, device: str, size: int, steps: int, rounds: int, levels: tuple[str, ...], start_timeout: float
) -> Plan:
    """The CPU plan (tiny model): batches 1 and 8, 8 and 32 end-to-end jobs, no slicing check."""
    return Plan(
        model=model,
        device=device,
        size=size,
        steps=steps,
        rounds=rounds,
        jobs={1: 8, 8: 32},
        sliced_check=False,
        start_timeout=start_timeout,
        levels=levels,
    )


def jobs_for(plan: Plan, count: int, mode: str, *, run_id: str = "bench") -> list[Job]:
    interval, branch = MODES[mode]
    return [
        Job(
            run_id=run_id,
            index=i,
            prompt=PROMPT.format(i=i),
            seed=SEED + i,
            height=plan.size,
            width=plan.size,
            steps=plan.steps,
            guidance=GUIDANCE,
            scheduler="ddim",
            cache_interval=interval,
            cache_branch=branch,
        )
        for i in range(count)
    ]


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


# ---------------------------------------------------------------------------------------------
# In-process paths: the documented recipe and the Engine, interleaved; the DeepCache matrix.


class Recipe:
    """DeepCache's documented usage, on its own copy of the pipeline."""

    def __init__(self, model: Path, device: str, dtype: Any) -> None:
        from DeepCache import DeepCacheSDHelper
        from diffusers import DDIMScheduler, DiffusionPipeline

        self.pipe = DiffusionPipeline.from_pretrained(str(model), torch_dtype=dtype).to(device)
        self.pipe.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)
        self.helper = DeepCacheSDHelper(pipe=self.pipe)
        self.device = device

    def __call__(self, prompts: list[str], mode: str, size: int, steps: int) -> float:
        interval, branch = MODES[mode]
        if interval > 1:
            self.helper.set_params(cache_interval=interval, cache_branch_id=branch)
            self.helper.enable()
        try:
            started = time.perf_counter()
            self.pipe(prompt=prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=GUIDANCE)
            synchronize(self.device)
            return time.perf_counter() - started
        finally:
            if interval > 1:
                self.helper.disable()


def engine_call(engine: Any, plan: Plan, batch: int, mode: str, steps: int | None = None) -> float:
    from worker.delivery.batching import RecipeDefaults, batch_key

    jobs = jobs_for(plan, batch, mode)
    if steps is not None:
        jobs = [job.model_copy(update={"steps": steps}) for job in jobs]
    defaults = RecipeDefaults(model=str(plan.model), scheduler="ddim", cache_interval=1, cache_branch=0)
    started = time.perf_counter()
    engine.generate(batch_key(jobs[0], defaults), jobs)
    return time.perf_counter() - started


def sliced_decode_check(engine: Any, plan: Plan) -> dict[str, Any]:
    """The largest batch at 3/0 with VAE slicing forced on and off: what slicing costs, in time
    and memory (the engine's ``auto`` picks one per batch)."""
    batch = max(plan.batches)
    rows = {}
    setting = engine.vae_slicing
    try:
        for slicing in ("on", "off"):
            engine.vae_slicing = slicing
            times = []
            for _ in range(max(1, plan.rounds - 1)):
                peak_memory_reset(engine.device)
                times.append(engine_call(engine, plan, batch, "3/0"))
            rows[slicing] = {"seconds_per_call": summarize(times), "peak_memory_gib": peak_memory_gib(engine.device)}
    finally:
        engine.vae_slicing = setting
    return {"batch": batch, "mode": "3/0", **rows}


# ---------------------------------------------------------------------------------------------
# End-to-end paths: embedded mode and a real worker.


def sidecar_stats(out_dir: Path) -> dict[str, Any]:
    cars = [json.loads(path.read_text()) for path in out_dir.rglob("*.json")]
    batches = sorted({car["batch"]["id"]: car for car in cars}.values(), key=lambda car: car["timing"]["started_at"])
    return {
        "images": len(cars),
        "pipeline_s": sum(car["timing"]["batch_inference_s"] for car in batches),
        "batch_seconds": [round(car["timing"]["batch_inference_s"], 4) for car in batches],
        "batch_sizes": dict(Counter(car["batch"]["size"] for car in batches)),
        "device": cars[0]["worker"]["device"] if cars else None,
    }


@contextmanager
def worker_process(
    plan: Plan,
    redis_url: str,
    scratch: Path,
    batch: int,
    device: str,
    slot: int,
    extra_env: dict[str, str] | None = None,
    worker_args: tuple[str, ...] = (),
    level: str = "off",
) -> Iterator[dict[str, str]]:
    """A ``deepqueue worker`` with max_batch ``batch`` at acceleration ``level``, on Redis
    databases 2 + 2 x slot and the next. A compiling level warms its batch shape before ready,
    with the compile cache in ``scratch/compile-cache``. Yields its environment, log path and
    ``start_s`` (start to ready)."""
    import redis

    from ops.localstack import start_worker, stop, worker_env

    broker, backend = f"{redis_url}/{2 + 2 * slot}", f"{redis_url}/{3 + 2 * slot}"
    for url in (broker, backend):
        redis.Redis.from_url(url).flushdb()
    name = f"worker-{batch}" if level == "off" else f"worker-{level}-{batch}"
    env = worker_env(
        broker_url=broker,
        result_backend=backend,
        model=str(plan.model),
        device=device,
        max_batch=batch,
        storage="local",
        output_dir=str(scratch / name),
        acceleration=level,
        compile_cache=str(plan.compile_cache or scratch / "compile-cache"),
        load_timeout_s=plan.start_timeout,
        **({"warm_shapes": f"{plan.size}x{plan.size}:{batch}"} if level in COMPILED else {}),
    )
    scratch.mkdir(parents=True, exist_ok=True)
    log = scratch / f"{name}.log"
    started = time.perf_counter()
    process = start_worker(
        {**env, **(extra_env or {})},
        log,
        "--hostname",
        f"bench{batch}{level}@%h",
        *worker_args,
        timeout=plan.start_timeout,
    )
    try:
        yield env | {"log": str(log), "start_s": f"{time.perf_counter() - started:.1f}"}
    except BaseException:
        logger.error("worker log (last 3000 characters):\n%s", log.read_text()[-3000:])
        raise
    finally:
        stop(process)


def embedded_run(engine: Any, plan: Plan, scratch: Path, batch: int, mode: str, count: int) -> dict[str, Any]:
    """``run_embedded`` on the bench's engine: images / wall time, and what the sidecars say."""
    from worker.embedded import run_embedded
    from worker.settings import WorkerSettings

    run_id = f"embedded-{engine.accelerator.level}-{batch}-{mode.replace('/', '')}-{secrets.token_hex(3)}"
    out = scratch / "embedded"
    settings = WorkerSettings(
        model=str(plan.model), device=engine.device, max_batch=batch, storage="local", output_dir=out
    )
    summary = run_embedded(jobs_for(plan, count, mode, run_id=run_id), settings, progress=False, engine=engine)
    if summary.failed or summary.images != count:
        raise RuntimeError(f"embedded run {run_id} failed: {[o.reason for o in summary.failed][:3]}")
    return {"wall_s": summary.seconds, "images_per_s": summary.images_per_s, **sidecar_stats(out / run_id)}


def worker_run(
    client: Any, env: dict[str, str], plan: Plan, batch: int, mode: str, count: int, steps: int, fmt: str = "png"
) -> dict[str, Any]:
    """Submit ``count`` jobs to a worker and wait for all: images / wall time from submit to done."""
    from producer import JobState

    run_id = f"worker-{batch}-{mode.replace('/', '')}-{secrets.token_hex(3)}"
    interval, branch = MODES[mode]
    started = time.perf_counter()
    run = client.submit(
        [PROMPT.format(i=i) for i in range(count)],
        run=run_id,
        seed=SEED,
        height=plan.size,
        width=plan.size,
        steps=steps,
        guidance=GUIDANCE,
        scheduler="ddim",
        cache_interval=interval,
        cache_branch=branch,
        format=fmt,
    )
    status = run.wait(timeout=1800, poll_s=0.02)
    wall = time.perf_counter() - started
    if status.counts[JobState.DONE] != count:
        raise RuntimeError(f"worker run {run_id}: {status}")
    return {"wall_s": wall, "images_per_s": count / wall, **sidecar_stats(Path(env["DEEPQUEUE_OUTPUT_DIR"]) / run_id)}


# ---------------------------------------------------------------------------------------------
# The whole benchmark: every path, round by round, so each ratio compares neighbours in time.


def levels_for(plan: Plan, device: str) -> tuple[str, ...]:
    """The plan's levels this device runs: ``graphs`` needs CUDA (elsewhere it is ``compile``)."""
    return tuple(level for level in plan.levels if level != "graphs" or device.startswith("cuda"))


def engine_images(engine: Any, plan: Plan, batch: int, mode: str) -> Any:
    """One call's images as a float array in [0, 1] (the quality gate's input)."""
    import numpy as np

    from worker.delivery.batching import RecipeDefaults, batch_key

    jobs = jobs_for(plan, batch, mode)
    defaults = RecipeDefaults(model=str(plan.model), scheduler="ddim", cache_interval=1, cache_branch=0)
    images = engine.generate(batch_key(jobs[0], defaults), jobs).images
    return np.stack([np.asarray(image, dtype=np.float64) / 255 for image in images])


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
    """A compiled worker started twice on the compile cache the benchmark's Engines and workers
    filled: seconds from start to ready, and the last warm-up's counts (only cache hits, when the
    cache works)."""
    batch = max(plan.table_batches)
    times = []
    for _ in range(2):
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
    from producer import Client
    from worker.pipeline.engine import Engine
    from worker.settings import WorkerSettings

    started = time.perf_counter()
    first = Engine.load(WorkerSettings(model=str(plan.model), device=plan.device, storage="local", acceleration="off"))
    device = first.device
    levels = levels_for(plan, device)
    engines = {"off": first}
    compile_s: dict[str, float] = {}
    for level in levels:
        if level != "off":
            settings = WorkerSettings(
                model=str(plan.model),
                device=plan.device,
                storage="local",
                acceleration=level,
                compile_cache=plan.compile_cache or scratch / "compile-cache",
            )
            engines[level] = Engine.load(settings)
    recipe = Recipe(plan.model, device, first.pipe.unet.dtype)
    cells = [(batch, mode) for batch in plan.table_batches for mode in plan.table_modes]
    e2e_cells = [(batch, E2E_MODE) for batch in plan.table_batches]
    with ExitStack() as stack:
        # First calls at each shape (kernels, allocator, DeepCache hooks; compiling, at the
        # levels that compile), in every engine and process.
        for level, engine in engines.items():
            began = time.perf_counter()
            for batch in sorted({*plan.table_batches, *(plan.batches if level == "off" else ())}):
                for mode in ("off", E2E_MODE):
                    engine_call(engine, plan, batch, mode, steps=3)
            compile_s[level] = round(time.perf_counter() - began, 1)
            logger.info("level %s: first calls in %.0f s", level, compile_s[level])
        workers: dict[tuple[str, int], tuple[dict[str, str], Any]] = {}
        if worker:
            for level in levels:
                for batch in plan.table_batches:
                    slot = len(workers)
                    env = stack.enter_context(
                        worker_process(plan, redis_url, scratch, batch, device, slot, level=level)
                    )
                    client = stack.enter_context(Client(env["DEEPQUEUE_BROKER_URL"], env["DEEPQUEUE_RESULT_BACKEND"]))
                    workers[level, batch] = (env, client)
        logger.info("engines, recipe and %d workers up in %.0f s", len(workers), time.perf_counter() - started)
        for batch, mode in cells:
            recipe([PROMPT.format(i=i) for i in range(batch)], mode, plan.size, 3)
        for (_, batch), (env, client) in workers.items():
            worker_run(client, env, plan, batch, E2E_MODE, batch, steps=3)
        samples = Samples()
        results: dict[str, Any] = {
            "plan": {
                **asdict(plan),
                "model": str(plan.model),
                "compile_cache": str(plan.compile_cache) if plan.compile_cache else None,
                "jobs": {str(k): v for k, v in plan.jobs.items()},
            },
            "device": first.describe()["device"],
            "dtype": str(first.pipe.unet.dtype).removeprefix("torch."),
            "levels": list(levels),
            "first_calls_s": compile_s,
            "worker_start_s": {
                f"{level} {batch}": float(env["start_s"]) for (level, batch), (env, _) in workers.items()
            },
        }
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
        results["quality"] = quality_gate(engines, plan)
        checkpoint(results)
        if plan.sliced_check:
            results["vae_slicing"] = sliced_decode_check(first, plan)
        logs = [Path(env["log"]).read_text() for env, _ in workers.values()]
        results["worker_main_process_fork_safe"] = all("main process is fork-safe" in log for log in logs) or None
    compiled = [level for level in levels if level in COMPILED]
    if worker and compiled:
        results["warm_restart"] = warm_restart(plan, redis_url, scratch, device, compiled[-1], len(workers))
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
    from ops.localstack import start_redis, stop

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", type=Path, help="tiny model folder (default: built)")
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
    add_run_args(parser, "service-latest")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = new_results()
    with tempfile.TemporaryDirectory(prefix="deepqueue-service-") as tmp, part(results, "service"):
        scratch = Path(tmp)
        model = args.model
        if model is None:
            from worker.pipeline.testmodel import build_test_model

            model = build_test_model(scratch / "tiny", "tiny")
        redis_process, redis_url = start_redis(scratch, timeout=args.start_timeout)
        try:
            plan = tiny_plan(
                model,
                device=args.device,
                size=args.size,
                steps=args.steps,
                rounds=args.rounds,
                levels=args.levels,
                start_timeout=args.start_timeout,
            )
            results["service"] = run_service_bench(plan, redis_url, scratch)
        finally:
            stop(redis_process)
        if args.model is None:
            results["service"]["plan"]["model"] = "tiny (built by worker.pipeline.testmodel, random weights)"
    return finish(results, service_markdown, out_dir=output_dir(args), name=args.name)


def service_markdown(results: dict[str, Any]) -> str:
    lines = ["# The service against DeepCache's documented recipe, by acceleration level", "", run_line(results), ""]
    if "service" in results:
        lines += markdown(results["service"], "Service vs recipe")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(exit_status(main()))
