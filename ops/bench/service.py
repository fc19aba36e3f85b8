"""The service against DeepCache's documented recipe, on one model, device and recipe.

Four paths make the same images (same prompts, size, steps, guidance, DDIM):

- ``recipe``: DeepCache's README usage: ``DiffusionPipeline.from_pretrained`` + ``DeepCacheSDHelper``,
  ``set_params`` / ``enable`` / ``pipe(prompts)`` in a loop (its own copy of the pipeline);
- ``engine``: the worker's ``Engine.generate`` alone;
- ``embedded``: ``run_embedded`` (batching, generate, background encode + local files);
- ``worker``: a real ``deepqueue worker`` process on a private Redis with local storage,
  timed from ``Client.submit`` to every job ``done``.

``recipe`` and ``engine`` run interleaved in the same rounds (the order alternates per round),
beside the DeepCache matrix (modes x batch sizes, with peak device memory); the ratios compare
medians of those rounds. ``embedded`` and ``worker`` are timed end to end over ``jobs`` images.
"""

from __future__ import annotations

import gc
import json
import logging
import secrets
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ops.bench.report import summarize
from producer.job import Job

logger = logging.getLogger(__name__)

#: DeepCache settings by label: (interval, branch); interval 1 is no caching.
MODES = {"off": (1, 0), "3/0": (3, 0), "5/0": (5, 0), "5/1": (5, 1)}
#: The comparison table's modes: caching off and DeepCache's default recipe.
TABLE_MODES = ("off", "3/0")
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
    jobs: dict[int, int] = field(default_factory=lambda: {1: 16, 8: 64})  # end-to-end jobs per batch size
    sliced_check: bool = True  # one more matrix cell: batch max, 3/0, VAE slicing forced on


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
    from worker.batching import RecipeDefaults, batch_key

    jobs = jobs_for(plan, batch, mode)
    if steps is not None:
        jobs = [job.model_copy(update={"steps": steps}) for job in jobs]
    defaults = RecipeDefaults(model=str(plan.model), scheduler="ddim", cache_interval=1, cache_branch=0)
    started = time.perf_counter()
    engine.generate(batch_key(jobs[0], defaults), jobs)
    return time.perf_counter() - started


def bench_in_process(engine: Any, recipe: Recipe, plan: Plan) -> dict[str, Any]:
    """The matrix (Engine: modes x batches) and the recipe at the table's cells, interleaved."""
    device = engine.device
    for batch in plan.batches:  # first calls at each shape: kernels, allocator, DeepCache hooks
        engine_call(engine, plan, batch, "3/0", steps=3)
        if batch in plan.table_batches:
            recipe([PROMPT.format(i=i) for i in range(batch)], "3/0", plan.size, 3)
    engine_s: dict[tuple[int, str], list[float]] = {}
    recipe_s: dict[tuple[int, str], list[float]] = {}
    peaks: dict[tuple[int, str], float | None] = {}
    cells = [(batch, mode) for batch in plan.batches for mode in MODES]
    for round_ in range(plan.rounds):
        for batch, mode in cells:
            in_table = batch in plan.table_batches and mode in TABLE_MODES
            order = ["engine", "recipe"] if round_ % 2 == 0 else ["recipe", "engine"]
            for path in order if in_table else ["engine"]:
                if path == "recipe":
                    prompts = [PROMPT.format(i=i) for i in range(batch)]
                    recipe_s.setdefault((batch, mode), []).append(recipe(prompts, mode, plan.size, plan.steps))
                else:
                    peak_memory_reset(device)
                    engine_s.setdefault((batch, mode), []).append(engine_call(engine, plan, batch, mode))
                    peaks[batch, mode] = peak_memory_gib(device)
        logger.info("in-process round %d of %d done", round_ + 1, plan.rounds)
    matrix = []
    for batch, mode in cells:
        seconds = summarize(engine_s[batch, mode])
        off = statistics.median(engine_s[batch, "off"])
        matrix.append(
            {
                "batch": batch,
                "mode": mode,
                "seconds_per_call": seconds,
                "images_per_s": batch / seconds["median"],
                "speedup_vs_off": off / seconds["median"],
                "peak_memory_gib": peaks[batch, mode],
            }
        )
    table = {
        f"{batch} {mode}": {
            "batch": batch,
            "mode": mode,
            "recipe_s": summarize(recipe_s[batch, mode]),
            "engine_s": summarize(engine_s[batch, mode]),
            "recipe_images_per_s": batch / statistics.median(recipe_s[batch, mode]),
            "engine_images_per_s": batch / statistics.median(engine_s[batch, mode]),
            "engine_over_recipe": statistics.median(recipe_s[batch, mode]) / statistics.median(engine_s[batch, mode]),
        }
        for batch in plan.table_batches
        for mode in TABLE_MODES
    }
    result: dict[str, Any] = {"matrix": matrix, "table": table}
    if plan.sliced_check:
        result["vae_slicing"] = sliced_decode_check(engine, plan)
    return result


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
    batches = {car["batch"]["id"]: car for car in cars}
    return {
        "images": len(cars),
        "pipeline_s": sum(car["timing"]["batch_inference_s"] for car in batches.values()),
        "batch_sizes": dict(Counter(car["batch"]["size"] for car in batches.values())),
        "device": cars[0]["worker"]["device"] if cars else None,
    }


def bench_embedded(engine: Any, plan: Plan, scratch: Path) -> dict[str, Any]:
    from worker.embedded import run_embedded
    from worker.settings import WorkerSettings

    results = {}
    for batch in plan.table_batches:
        for mode in TABLE_MODES:
            out = scratch / f"embedded-{batch}-{mode.replace('/', '_')}"
            settings = WorkerSettings(
                model=str(plan.model), device=engine.device, max_batch=batch, storage="local", output_dir=out
            )
            jobs = jobs_for(plan, plan.jobs[batch], mode, run_id=f"embedded-{batch}")
            summary = run_embedded(jobs, settings, progress=False, engine=engine)
            if summary.failed or summary.images != len(jobs):
                raise RuntimeError(f"embedded run failed: {[o.reason for o in summary.failed][:3]}")
            stats = sidecar_stats(out)
            results[f"{batch} {mode}"] = {
                "batch": batch,
                "mode": mode,
                "jobs": len(jobs),
                "wall_s": summary.seconds,
                "images_per_s": summary.images_per_s,
                **stats,
            }
            logger.info("embedded batch %d %s: %.2f images/s", batch, mode, summary.images_per_s)
    return results


@contextmanager
def worker_process(plan: Plan, redis_url: str, scratch: Path, batch: int, device: str) -> Iterator[dict[str, str]]:
    from ops.localstack import start_worker, stop, worker_env

    env = worker_env(
        broker_url=f"{redis_url}/4",
        result_backend=f"{redis_url}/5",
        model=str(plan.model),
        device=device,
        max_batch=batch,
        storage="local",
        output_dir=str(scratch / f"worker-{batch}"),
    )
    log = scratch / f"worker-{batch}.log"
    process = start_worker(env, log, "--hostname", f"bench{batch}@%h")
    try:
        yield env | {"log": str(log)}
    except BaseException:
        logger.error("worker log (last 3000 characters):\n%s", log.read_text()[-3000:])
        raise
    finally:
        stop(process)


def bench_worker(plan: Plan, redis_url: str, scratch: Path, device: str) -> dict[str, Any]:
    import redis

    from producer import Client, JobState

    results: dict[str, Any] = {}
    for batch in plan.table_batches:
        for url in (f"{redis_url}/4", f"{redis_url}/5"):
            redis.Redis.from_url(url).flushdb()
        with worker_process(plan, redis_url, scratch, batch, device) as env:
            log_text = Path(env["log"]).read_text()
            with Client(env["DEEPQUEUE_BROKER_URL"], env["DEEPQUEUE_RESULT_BACKEND"]) as client:

                def submit(mode: str, count: int, steps: int, batch: int = batch) -> tuple[str, float]:
                    run_id = f"w{batch}-{mode.replace('/', '')}-{secrets.token_hex(3)}"
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
                    )
                    status = run.wait(timeout=1800, poll_s=0.02)
                    wall = time.perf_counter() - started
                    if status.counts[JobState.DONE] != count:
                        raise RuntimeError(f"worker run {run_id}: {status}")
                    return run_id, wall

                for mode in TABLE_MODES:  # the new process's first calls at this shape
                    submit(mode, batch, 3)
                for mode in TABLE_MODES:
                    run_id, wall = submit(mode, plan.jobs[batch], plan.steps)
                    stats = sidecar_stats(Path(env["DEEPQUEUE_OUTPUT_DIR"]) / run_id)
                    results[f"{batch} {mode}"] = {
                        "batch": batch,
                        "mode": mode,
                        "jobs": plan.jobs[batch],
                        "wall_s": wall,
                        "images_per_s": plan.jobs[batch] / wall,
                        **stats,
                    }
                    logger.info("worker batch %d %s: %.2f images/s", batch, mode, plan.jobs[batch] / wall)
        fork_safe = "main process is fork-safe" in log_text
        results["main_process_fork_safe"] = results.get("main_process_fork_safe", True) and fork_safe
    return results


# ---------------------------------------------------------------------------------------------
# The whole benchmark.


def run_service_bench(
    plan: Plan,
    redis_url: str,
    scratch: Path,
    *,
    worker: bool = True,
    checkpoint: Callable[[dict[str, Any]], None] = lambda partial: None,
) -> dict[str, Any]:
    """Every part above, in one process (plus the worker's); returns JSON-ready results, and
    hands them to ``checkpoint`` after each part (a lease on a GPU machine can end any time)."""
    import torch

    from worker.engine import Engine
    from worker.settings import WorkerSettings

    started = time.perf_counter()
    engine = Engine.load(WorkerSettings(model=str(plan.model), device=plan.device, storage="local"))
    dtype = engine.pipe.unet.dtype
    recipe = Recipe(plan.model, engine.device, dtype)
    logger.info("loaded engine and recipe on %s as %s in %.0f s", engine.device, dtype, time.perf_counter() - started)
    results: dict[str, Any] = {
        "plan": {**asdict(plan), "model": str(plan.model), "jobs": {str(k): v for k, v in plan.jobs.items()}},
        "device": engine.describe()["device"],
        "dtype": str(dtype).removeprefix("torch."),
    }
    results.update(bench_in_process(engine, recipe, plan))
    checkpoint(results)
    del recipe
    gc.collect()
    if engine.device.startswith("cuda"):
        torch.cuda.empty_cache()
    results["embedded"] = bench_embedded(engine, plan, scratch)
    checkpoint(results)
    device = engine.device
    del engine
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the worker's pool process needs the memory
    if worker:
        results["worker"] = bench_worker(plan, redis_url, scratch, device)
    results["ratios"] = ratios(results)
    return results


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Each path's images/s over the recipe's, at the same batch size and DeepCache mode."""
    out: dict[str, Any] = {}
    for cell, row in results["table"].items():
        recipe = row["recipe_images_per_s"]
        out[cell] = {
            "engine": row["engine_images_per_s"] / recipe,
            "embedded": results["embedded"][cell]["images_per_s"] / recipe if cell in results["embedded"] else None,
            "worker": results["worker"][cell]["images_per_s"] / recipe if cell in results.get("worker", {}) else None,
        }
    return out


def markdown(results: dict[str, Any], title: str) -> list[str]:
    """The comparison table, the matrix and the slicing check, as markdown lines."""
    plan = results["plan"]
    lines = [
        f"## {title}: {plan['size']}x{plan['size']}, {plan['steps']} DDIM steps, {results['device']}, "
        f"{results['dtype']}",
        "",
        f"Model `{plan['model']}`. Recipe and Engine: median seconds per call over {plan['rounds']} interleaved "
        f"rounds; embedded and worker: images / wall time over {plan['jobs']} jobs (by batch size), "
        "worker timed from `Client.submit` to all done.",
        "",
        "| batch | DeepCache | recipe img/s | Engine img/s | embedded img/s | worker img/s "
        "| Engine ÷ recipe | embedded ÷ recipe | worker ÷ recipe |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell, row in results["table"].items():
        r = results["ratios"][cell]
        embedded = results["embedded"].get(cell, {})
        worker = results.get("worker", {}).get(cell, {})
        lines.append(
            f"| {row['batch']} | {row['mode']} | {row['recipe_images_per_s']:.2f} | {row['engine_images_per_s']:.2f} "
            f"| {_num(embedded.get('images_per_s'))} | {_num(worker.get('images_per_s'))} | {r['engine']:.3f} "
            f"| {_num(r['embedded'], 3)} | {_num(r['worker'], 3)} |"
        )
    lines += [
        "",
        "DeepCache matrix (Engine, seconds per call, median (min–max); peak device memory of the call):",
        "",
        "| batch | DeepCache | s/call | images/s | speed-up vs off | peak GiB |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in results["matrix"]:
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
    for path in ("embedded", "worker"):
        rows = {cell: row for cell, row in results.get(path, {}).items() if isinstance(row, dict)}
        if rows:
            share = ", ".join(
                f"{cell}: {row['pipeline_s'] / row['wall_s']:.3f} (batches {row['batch_sizes']})"
                for cell, row in rows.items()
            )
            lines += ["", f"{path}: share of wall time in pipeline calls — {share}."]
    if "worker" in results:
        fork_safe = results["worker"]["main_process_fork_safe"]
        lines.append(f"Worker main process fork-safe (no torch/diffusers): {fork_safe}.")
    return lines + [""]


def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"
