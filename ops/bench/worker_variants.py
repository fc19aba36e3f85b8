"""Diagnosis: is a worker's pipeline call slower than the same call in a plain process, and why?

    python -m ops.bench.worker_variants [--model DIR] [--size 512] [--steps 50] [--jobs 64] [--device cuda]

Runs one ``deepqueue worker`` after another on a private Redis with local storage, each with one
thing changed (the CUDA fork guard's environment variable, one store thread instead of four,
JPEG instead of PNG, a solo pool instead of prefork), at batch 8 with DeepCache 3/0, and reads
every batch's ``batch_inference_s`` from the sidecars; then times the Engine in this process,
alone and while four threads encode PNGs (the background stores' load). Prints one JSON line per
variant and writes them all as ``worker-variants.json`` and ``.md`` (``ops.bench.harness``: a
new folder under results/runs/, ``--out DIR`` or ``--record``). Written from the script whose
H200 run on 2026-11-26 is results/gpu-2026-11-26-h200-worker-variants.json (same variants and
measurements); see ops/bench/README.md.
"""

from __future__ import annotations

import io
import json
import statistics
import threading
from pathlib import Path
from typing import Any

import redis

from ops.bench import harness
from ops.bench.report import run_line
from ops.bench.service_paths import engine_call, worker_process, worker_run
from ops.bench.service_plan import Plan
from ops.localstack import client_for

#: name -> (extra environment, extra worker arguments, image format)
VARIANTS: dict[str, tuple[dict[str, str], list[str], str]] = {
    "default": ({}, [], "png"),
    "nvml-check-off": ({"PYTORCH_NVML_BASED_CUDA_CHECK": "0"}, [], "png"),
    "store-threads-1": ({"DEEPQUEUE_STORE_THREADS": "1"}, [], "png"),
    "jpeg": ({}, [], "jpeg"),
    "solo-pool": ({}, ["--pool=solo"], "png"),
    "default-again": ({}, [], "png"),
}


def variant(
    plan: Plan, redis_url: str, folder: Path, env: dict[str, str], worker_args: list[str], fmt: str, jobs: int
) -> dict[str, Any]:
    """One worker with one thing changed: its batches' pipeline seconds after a warm-up run."""
    with worker_process(plan, redis_url, folder, 8, plan.device, 0, env, tuple(worker_args)) as worker_env:
        with client_for(worker_env) as client:
            worker_run(client, worker_env, plan, 8, "3/0", 8, steps=3, fmt=fmt)  # first calls
            run = worker_run(client, worker_env, plan, 8, "3/0", jobs, plan.steps, fmt=fmt)
    return {**run, "mean_batch_s": statistics.mean(run["batch_seconds"])}


def in_process(plan: Plan, calls: int = 4) -> dict[str, list[float]]:
    """Engine seconds per batch-8 call at 3/0, alone, then beside four PNG-encoding threads."""
    import numpy as np
    from PIL import Image

    from worker.pipeline.engine import Engine
    from worker.settings import WorkerSettings

    engine = Engine.load(WorkerSettings(model=str(plan.model), device=plan.device, storage="local"))
    engine_call(engine, plan, 8, "3/0")
    alone = [engine_call(engine, plan, 8, "3/0") for _ in range(calls)]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (plan.size, plan.size, 3), dtype=np.uint8))
    done = threading.Event()

    def encode() -> None:
        while not done.is_set():
            image.save(io.BytesIO(), format="PNG", compress_level=6)

    threads = [threading.Thread(target=encode) for _ in range(4)]
    for thread in threads:
        thread.start()
    busy = [engine_call(engine, plan, 8, "3/0") for _ in range(calls)]
    done.set()
    for thread in threads:
        thread.join()
    return {"alone_s": alone, "with_png_threads_s": busy}


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Worker variants side by side", "", run_line(results), ""]
    lines += ["| variant | images/s | mean s per batch |", "| --- | ---: | ---: |"]
    for name, run in results["variants"].items():
        lines.append(f"| {name} | {run['images_per_s']:.2f} | {run['mean_batch_s']:.3f} |")
    if "in_process" in results:
        alone, busy = results["in_process"]["alone_s"], results["in_process"]["with_png_threads_s"]
        lines += ["", f"Engine in this process, s per call: alone {alone}, beside four PNG threads {busy}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, "worker-variants")
    parser.add_argument("--model", type=Path, help="model folder (default: build the SD1.5 architecture)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=64)
    args = parser.parse_args(argv)
    with harness.session(args, markdown, variants={}) as bench:
        model = args.model or bench.servers.model("sd15")
        plan = Plan(model=model, device=args.device, size=args.size, steps=args.steps)
        redis_url = bench.servers.redis_url()
        for name, (env_extra, worker_args, fmt) in VARIANTS.items():
            with bench.part(name):
                run = variant(plan, redis_url, bench.scratch / name, env_extra, worker_args, fmt, args.jobs)
                bench.results["variants"][name] = run
                print(name, json.dumps(run), flush=True)
            redis.Redis.from_url(redis_url).flushall()
        with bench.part("in-process"):
            bench.results["in_process"] = in_process(plan)
    return harness.exit_status(bench.results)


if __name__ == "__main__":
    raise SystemExit(main())
