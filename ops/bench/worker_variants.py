"""Diagnosis: is a worker's pipeline call slower than the same call in a plain process, and why?

    python -m ops.bench.worker_variants [--model DIR] [--size 512] [--steps 50] [--jobs 64] [--device cuda]

Runs one ``deepqueue worker`` after another on a private Redis with local storage, each with one
thing changed (the CUDA fork guard's environment variable, one store thread instead of four,
JPEG instead of PNG, a solo pool instead of prefork), at batch 8 with DeepCache 3/0, and reads
every batch's ``batch_inference_s`` from the sidecars; then times the Engine in this process,
alone and while four threads encode PNGs (the background stores' load). Prints one JSON line per
variant and writes them all to ``--out``. Written from the script whose H200 run on 2026-11-26
is results/gpu-2026-11-26-h200-worker-variants.json (same variants and measurements); see
ops/bench/README.md.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import threading
from pathlib import Path
from typing import Any

import redis

from ops.bench.service_paths import engine_call, worker_process, worker_run
from ops.bench.service_plan import Plan
from ops.localstack import start_redis, stop
from producer import Client

#: name -> (extra environment, extra worker arguments, image format)
VARIANTS: dict[str, tuple[dict[str, str], list[str], str]] = {
    "default": ({}, [], "png"),
    "nvml-check-off": ({"PYTORCH_NVML_BASED_CUDA_CHECK": "0"}, [], "png"),
    "store-threads-1": ({"DEEPQUEUE_STORE_THREADS": "1"}, [], "png"),
    "jpeg": ({}, [], "jpeg"),
    "solo-pool": ({}, ["--pool=solo"], "png"),
    "default-again": ({}, [], "png"),
}


def in_process(plan: Plan, calls: int = 4) -> dict[str, list[float]]:
    """Engine seconds per batch-8 call at 3/0, alone, then beside four PNG-encoding threads."""
    import numpy as np
    from PIL import Image

    from worker.engine import Engine
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.worker_variants", description=__doc__)
    parser.add_argument("--model", type=Path, help="model folder (default: build the SD1.5 architecture)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("worker-variants.json"))
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="deepqueue-variants-"))
    model = args.model
    if model is None:
        from worker.testmodel import build_test_model

        model = build_test_model(scratch / "sd15", "sd15")
    plan = Plan(model=model, device=args.device, size=args.size, steps=args.steps)
    redis_process, redis_url = start_redis(scratch)
    results: dict[str, Any] = {}
    try:
        for name, (env_extra, worker_args, fmt) in VARIANTS.items():
            with worker_process(
                plan, redis_url, scratch / name, 8, args.device, 0, env_extra, tuple(worker_args)
            ) as env:
                with Client(env["DEEPQUEUE_BROKER_URL"], env["DEEPQUEUE_RESULT_BACKEND"]) as client:
                    worker_run(client, env, plan, 8, "3/0", 8, steps=3, fmt=fmt)  # first calls
                    run = worker_run(client, env, plan, 8, "3/0", args.jobs, args.steps, fmt=fmt)
            results[name] = {**run, "mean_batch_s": statistics.mean(run["batch_seconds"])}
            print(name, json.dumps(results[name]), flush=True)
            redis.Redis.from_url(redis_url).flushall()
        results["in-process"] = in_process(plan)
        print("in-process", json.dumps(results["in-process"]), flush=True)
    finally:
        stop(redis_process)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
