"""Benchmark 4 (optional, slow; ``ops.bench.run --sd15``): the SD1.5 architecture with random
weights, in this process.

The worker's own ``Engine`` (``from_pretrained``, DDIM, the DeepCache guard) generates one image
at a time, plain and with DeepCache, alternating (plain, cached, plain, cached, ...). Each mode
first runs one unmeasured 2-step call. Checks DESIGN.md's ~2.4x at 256x256, 20 steps, 3/0.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ops.bench.report import summarize
from producer.job import Job

logger = logging.getLogger(__name__)

PROMPT = "a photo of a cat sitting on a red sofa"
SEED = 1234


def bench_sd15(
    model: Path, *, rounds: int, size: int, steps: int, cache: tuple[int, int], device: str = "auto"
) -> dict[str, Any]:
    """Seconds per image, plain and cached, of ``model`` (``ops.bench.run`` builds it when not given)."""
    from worker.delivery.batching import RecipeDefaults, batch_key
    from worker.pipeline.engine import Engine
    from worker.settings import WorkerSettings

    engine = Engine.load(WorkerSettings(model=str(model), device=device, storage="local"))
    defaults = RecipeDefaults(model=engine.model["id"], scheduler="ddim", cache_interval=1, cache_branch=0)
    modes = {"plain": {"cache_interval": 1}, "deepcache": {"cache_interval": cache[0], "cache_branch": cache[1]}}

    def generate(mode: str, n_steps: int) -> float:
        job = Job(
            run_id="bench-sd15",
            index=0,
            prompt=PROMPT,
            seed=SEED,
            height=size,
            width=size,
            steps=n_steps,
            scheduler="ddim",
            **modes[mode],
        )
        return engine.generate(batch_key(job, defaults), [job]).seconds

    for mode in modes:
        generate(mode, 2)
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_ in range(rounds):
        for mode in modes:
            seconds[mode].append(generate(mode, steps))
            logger.info("sd15 round %d %s: %.1f s", round_ + 1, mode, seconds[mode][-1])
    plain = summarize(seconds["plain"])
    rows = {}
    for mode, values in seconds.items():
        summary = summarize(values)
        rows[mode] = {
            "label": "off" if mode == "plain" else f"on ({cache[0]}/{cache[1]})",
            "seconds": summary,
            "speedup": plain["median"] / summary["median"],
        }
    return {
        "model": str(model),
        "device": engine.device,
        "dtype": str(engine.pipe.unet.dtype).removeprefix("torch."),
        "rounds": rounds,
        "width": size,
        "height": size,
        "steps": steps,
        "batch": 1,
        "modes": rows,
        "speedup_per_round": [p / c for p, c in zip(seconds["plain"], seconds["deepcache"], strict=True)],
    }
