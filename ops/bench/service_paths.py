"""The four paths the service benchmark (``ops.bench.service``) times: DeepCache's documented
recipe and the worker's ``Engine`` in this process, embedded mode and a real ``deepqueue worker``
end to end. Each call returns its seconds (or images/s and what its sidecars say), nothing else,
so that the benchmark can interleave them round by round."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from ops.bench.harness import running_worker
from ops.bench.report import summarize
from ops.bench.service_plan import COMPILED, GUIDANCE, MODES, PROMPT, SEED, Plan, jobs_for
from ops.localstack import worker_env

logger = logging.getLogger(__name__)


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
    with the plan's compile cache (else ``scratch/compile-cache``). Yields its environment, log path and
    ``start_s`` (start to ready)."""
    import redis

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
    args = ("--hostname", f"bench{batch}{level}@%h", *worker_args)
    with running_worker({**env, **(extra_env or {})}, log, *args, timeout=plan.start_timeout):
        yield env | {"log": str(log), "start_s": f"{time.perf_counter() - started:.1f}"}


def start_workers(
    stack: ExitStack,
    plan: Plan,
    redis_url: str,
    scratch: Path,
    device: str,
    specs: list[tuple[str, int]],
) -> dict[tuple[str, int], dict[str, str]]:
    """``worker_process`` for every (level, batch) of ``specs``, started side by side (compiled
    ones spend most of their start tracing the UNet, one core each); each is stopped when
    ``stack`` closes, also when another fails to start. Each ``start_s`` is its own start to ready,
    with the others starting beside it."""

    def start(slot: int, level: str, batch: int) -> dict[str, str]:
        manager = worker_process(plan, redis_url, scratch, batch, device, slot, level=level)
        env = manager.__enter__()
        stack.push(manager.__exit__)
        return env

    with ThreadPoolExecutor(max_workers=max(1, len(specs))) as pool:
        futures = {spec: pool.submit(start, slot, *spec) for slot, spec in enumerate(specs)}
        wait(futures.values())
    return {spec: future.result() for spec, future in futures.items()}


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


def engine_images(engine: Any, plan: Plan, batch: int, mode: str) -> Any:
    """One call's images as a float array in [0, 1] (the quality gate's input)."""
    import numpy as np

    from worker.delivery.batching import RecipeDefaults, batch_key

    jobs = jobs_for(plan, batch, mode)
    defaults = RecipeDefaults(model=str(plan.model), scheduler="ddim", cache_interval=1, cache_branch=0)
    images = engine.generate(batch_key(jobs[0], defaults), jobs).images
    return np.stack([np.asarray(image, dtype=np.float64) / 255 for image in images])
