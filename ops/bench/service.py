"""The service against DeepCache's documented recipe, on one model, device and recipe.

Four paths make the same images (same prompts, size, steps, guidance, DDIM):

- ``recipe``: DeepCache's README usage: ``DiffusionPipeline.from_pretrained`` + ``DeepCacheSDHelper``,
  ``set_params`` / ``enable`` / ``pipe(prompts)`` in a loop (its own copy of the pipeline);
- ``engine``: the worker's ``Engine.generate`` alone;
- ``embedded``: ``run_embedded`` (batching, generate, background encode + local files);
- ``worker``: a real ``deepqueue worker`` process on a private Redis with local storage,
  timed from ``Client.submit`` to every job ``done``.

All four run round by round, each path in turn (the order alternating), beside the DeepCache
matrix (Engine: modes x batch sizes, with peak device memory): a GPU's speed drifts over minutes
of load (seen on an H200: the same call 5-10% slower late in a run), so each ratio is taken
against the recipe of the same round. ``embedded`` and ``worker`` are timed end to end over
``jobs`` images, the workers started (one per batch size) before the first round.
"""

from __future__ import annotations

import json
import logging
import secrets
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ops.bench.report import START_TIMEOUT_S, summarize
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
    jobs: dict[int, int] = field(default_factory=lambda: {1: 8, 8: 48})  # end-to-end jobs per batch size
    e2e_rounds: int = 2  # rounds that also run embedded and worker (the slow paths)
    sliced_check: bool = True  # one more matrix cell: batch max, 3/0, VAE slicing forced on
    start_timeout: float = START_TIMEOUT_S  # seconds a worker may take to start


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
) -> Iterator[dict[str, str]]:
    """A ``deepqueue worker`` with max_batch ``batch``, on Redis databases 2 + 2 x slot and the next."""
    import redis

    from ops.localstack import start_worker, stop, worker_env

    broker, backend = f"{redis_url}/{2 + 2 * slot}", f"{redis_url}/{3 + 2 * slot}"
    for url in (broker, backend):
        redis.Redis.from_url(url).flushdb()
    env = worker_env(
        broker_url=broker,
        result_backend=backend,
        model=str(plan.model),
        device=device,
        max_batch=batch,
        storage="local",
        output_dir=str(scratch / f"worker-{batch}"),
    )
    scratch.mkdir(parents=True, exist_ok=True)
    log = scratch / f"worker-{batch}.log"
    process = start_worker(
        {**env, **(extra_env or {})}, log, "--hostname", f"bench{batch}@%h", *worker_args, timeout=plan.start_timeout
    )
    try:
        yield env | {"log": str(log)}
    except BaseException:
        logger.error("worker log (last 3000 characters):\n%s", log.read_text()[-3000:])
        raise
    finally:
        stop(process)


def embedded_run(engine: Any, plan: Plan, scratch: Path, batch: int, mode: str, count: int) -> dict[str, Any]:
    """``run_embedded`` on the bench's engine: images / wall time, and what the sidecars say."""
    from worker.embedded import run_embedded
    from worker.settings import WorkerSettings

    run_id = f"embedded-{batch}-{mode.replace('/', '')}-{secrets.token_hex(3)}"
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


def run_service_bench(
    plan: Plan,
    redis_url: str,
    scratch: Path,
    *,
    worker: bool = True,
    checkpoint: Callable[[dict[str, Any]], None] = lambda partial: None,
) -> dict[str, Any]:
    """Every path above, interleaved round by round (a GPU's speed drifts over minutes of load);
    returns JSON-ready results and hands them to ``checkpoint`` after each round."""
    from producer import Client
    from worker.engine import Engine
    from worker.settings import WorkerSettings

    started = time.perf_counter()
    engine = Engine.load(WorkerSettings(model=str(plan.model), device=plan.device, storage="local"))
    recipe = Recipe(plan.model, engine.device, engine.pipe.unet.dtype)
    cells = [(batch, mode) for batch in plan.table_batches for mode in TABLE_MODES]
    with ExitStack() as stack:
        workers = {}
        if worker:
            for slot, batch in enumerate(plan.table_batches):
                env = stack.enter_context(worker_process(plan, redis_url, scratch, batch, engine.device, slot))
                client = stack.enter_context(Client(env["DEEPQUEUE_BROKER_URL"], env["DEEPQUEUE_RESULT_BACKEND"]))
                workers[batch] = (env, client)
        logger.info("engine, recipe and %d workers up in %.0f s", len(workers), time.perf_counter() - started)
        # First calls at each shape (kernels, allocator, DeepCache hooks), in every process.
        for batch in plan.batches:
            engine_call(engine, plan, batch, "3/0", steps=3)
        for batch, mode in cells:
            recipe([PROMPT.format(i=i) for i in range(batch)], mode, plan.size, 3)
            if batch in workers:
                worker_run(workers[batch][1], workers[batch][0], plan, batch, mode, batch, steps=3)
        samples = Samples()
        results: dict[str, Any] = {
            "plan": {**asdict(plan), "model": str(plan.model), "jobs": {str(k): v for k, v in plan.jobs.items()}},
            "device": engine.describe()["device"],
            "dtype": str(engine.pipe.unet.dtype).removeprefix("torch."),
        }
        for round_ in range(plan.rounds):
            flip = round_ % 2 == 1  # alternate who goes first
            for batch in plan.batches:
                for mode in MODES:
                    cell = f"{batch} {mode}"
                    paths = ["engine", "recipe"] if (batch, mode) in cells else ["engine"]
                    for path in reversed(paths) if flip else paths:
                        if path == "recipe":
                            prompts = [PROMPT.format(i=i) for i in range(batch)]
                            samples.add("recipe", cell, round_, batch / recipe(prompts, mode, plan.size, plan.steps))
                        else:
                            peak_memory_reset(engine.device)
                            samples.add("engine", cell, round_, batch / engine_call(engine, plan, batch, mode))
                            samples.peaks[cell] = peak_memory_gib(engine.device)
            if round_ < plan.e2e_rounds:
                for batch, mode in reversed(cells) if flip else cells:
                    cell, count = f"{batch} {mode}", plan.jobs[batch]
                    run = embedded_run(engine, plan, scratch, batch, mode, count)
                    samples.add("embedded", cell, round_, run["images_per_s"], run)
                    if batch in workers:
                        env, client = workers[batch]
                        run = worker_run(client, env, plan, batch, mode, count, plan.steps)
                        samples.add("worker", cell, round_, run["images_per_s"], run)
            results.update(samples.summary(plan, cells))
            checkpoint(results)
            logger.info("round %d of %d done", round_ + 1, plan.rounds)
        if plan.sliced_check:
            results["vae_slicing"] = sliced_decode_check(engine, plan)
        logs = [Path(env["log"]).read_text() for env, _ in workers.values()]
        results["worker_main_process_fork_safe"] = all("main process is fork-safe" in log for log in logs) or None
    return results


@dataclass
class Samples:
    """Images/s by path, table cell and round, and what each end-to-end run reported."""

    rates: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    peaks: dict[str, float | None] = field(default_factory=dict)

    def add(self, path: str, cell: str, round_: int, rate: float, run: dict[str, Any] | None = None) -> None:
        self.rates.setdefault(path, {}).setdefault(cell, {})[round_] = rate
        if run is not None:
            self.runs.setdefault(path, {}).setdefault(cell, []).append(run)

    def summary(self, plan: Plan, cells: list[tuple[int, str]]) -> dict[str, Any]:
        """The matrix (Engine), and per table cell each path's images/s and its ratio to the
        recipe: the median over rounds of (path ÷ recipe in the same round)."""
        engine = self.rates["engine"]
        matrix = []
        for batch in plan.batches:
            off = statistics.median(engine[f"{batch} off"].values())
            for mode in MODES:
                rates = list(engine[f"{batch} {mode}"].values())
                matrix.append(
                    {
                        "batch": batch,
                        "mode": mode,
                        "seconds_per_call": summarize([batch / rate for rate in rates]),
                        "images_per_s": statistics.median(rates),
                        "speedup_vs_off": statistics.median(rates) / off,
                        "peak_memory_gib": self.peaks.get(f"{batch} {mode}"),
                    }
                )
        table = {}
        for batch, mode in cells:
            cell = f"{batch} {mode}"
            recipe = self.rates["recipe"][cell]
            row: dict[str, Any] = {"batch": batch, "mode": mode, "images_per_s": {}, "over_recipe": {}}
            for path, by_cell in self.rates.items():
                if cell not in by_cell:
                    continue
                row["images_per_s"][path] = summarize(list(by_cell[cell].values()))
                paired = [rate / recipe[r] for r, rate in by_cell[cell].items() if r in recipe]
                if path != "recipe":
                    row["over_recipe"][path] = summarize(paired)
            table[cell] = row
        return {"matrix": matrix, "table": table, "runs": self.runs}


PATHS = ("recipe", "engine", "embedded", "worker")


def markdown(results: dict[str, Any], title: str) -> list[str]:
    """The comparison table, the matrix and the slicing check, as markdown lines."""
    plan = results["plan"]
    e2e_rounds = min(plan["e2e_rounds"], plan["rounds"])
    lines = [
        f"## {title}: {plan['size']}x{plan['size']}, {plan['steps']} DDIM steps, {results['device']}, "
        f"{results['dtype']}",
        "",
        f"Model `{plan['model']}`. {plan['rounds']} rounds; in each, every path runs in turn (order alternating): "
        f"recipe and Engine one call per cell, embedded and worker (in {e2e_rounds} of them) "
        f"{plan['jobs']} jobs by batch size, the worker timed from `Client.submit` to all done. "
        "Images/s: median over rounds; ÷ recipe: median over rounds of the ratio to the recipe of the same round.",
        "",
        "| batch | DeepCache | "
        + " | ".join(f"{p} img/s" for p in PATHS)
        + " | "
        + " | ".join(f"{p} ÷ recipe" for p in PATHS[1:])
        + " |",
        "|---:|---|" + "---:|" * (2 * len(PATHS) - 1),
    ]
    for row in results["table"].values():
        rates = [_num(row["images_per_s"].get(p, {}).get("median")) for p in PATHS]
        ratios = [_num(row["over_recipe"].get(p, {}).get("median"), 3) for p in PATHS[1:]]
        lines.append(f"| {row['batch']} | {row['mode']} | " + " | ".join(rates + ratios) + " |")
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
    for path, by_cell in results["runs"].items():
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
