"""Worker memory over a long run: one real ``deepqueue worker`` (default settings) serving the
tiny random-weight model on this machine's device, moto S3 and a private redis-server.

BATCHES x 8 jobs of 64x64 (2 DDIM steps: the pipeline, its DeepCache wrapper, the encoder,
the uploads and the state writes all run every batch, at a cost the machine can repeat 500
times) are queued at once. The resident memory (``VmRSS``) of the worker's main process and of
its pool process is read while it works: after the warm-up batches and at the end. Growth =
(end − after warm-up) ÷ after warm-up; goal < 5 % over 500 batches.

    .venv/bin/python -m ops.bench.worker_memory [--batches 500] [--warmup 50]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from ops.bench.report import add_run_args, exit_status, finish, new_results, output_dir, part, run_line
from ops.localstack import moto_s3_client, redis_and_moto, start_worker, stop, worker_env
from producer import Client, JobState

logger = logging.getLogger(__name__)

MAX_BATCH = 8


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def pool_pid(worker_pid: int) -> int:
    children = Path(f"/proc/{worker_pid}/task/{worker_pid}/children").read_text().split()
    if len(children) != 1:
        raise RuntimeError(f"expected one pool process under {worker_pid}, found {children}")
    return int(children[0])


def measure(model: Path, batches: int, warmup: int, tmp: Path, start_timeout: float) -> dict[str, Any]:
    with redis_and_moto(tmp, timeout=start_timeout) as (redis_url, s3):
        broker, backend = f"{redis_url}/0", f"{redis_url}/1"
        moto_s3_client(s3).create_bucket(Bucket="memory")
        env = worker_env(broker_url=broker, result_backend=backend, s3_endpoint=s3, bucket="memory", model=str(model))
        worker = start_worker(env, tmp / "worker.log", timeout=start_timeout)
        try:
            pool = pool_pid(worker.pid)
            with Client(broker, backend) as client:
                run = client.submit(
                    [f"memory {i}" for i in range(batches * MAX_BATCH)],
                    run="memory",
                    width=64,
                    height=64,
                    steps=2,
                    format="jpeg",
                )
                samples: list[tuple[int, float, float]] = []
                started = time.perf_counter()
                while (done := run.status().counts[JobState.DONE]) < batches * MAX_BATCH:
                    samples.append((done // MAX_BATCH, rss_mib(worker.pid), rss_mib(pool)))
                    time.sleep(0.5)
                seconds = time.perf_counter() - started
                samples.append((batches, rss_mib(worker.pid), rss_mib(pool)))
            if pool_pid(worker.pid) != pool:
                raise RuntimeError("the pool process was replaced during the run: its memory is not one process's")
        finally:
            stop(worker)
    after_warmup = next(sample for sample in samples if sample[0] >= warmup)
    end = samples[-1]
    return {
        "batches": batches,
        "warmup_batches": warmup,
        "seconds": seconds,
        "main_mib": {"after_warmup": after_warmup[1], "end": end[1], "growth": end[1] / after_warmup[1] - 1},
        "pool_mib": {"after_warmup": after_warmup[2], "end": end[2], "growth": end[2] / after_warmup[2] - 1},
        "samples": samples,
    }


def markdown(results: dict[str, Any]) -> str:
    point = results.get("point")
    if point is None:
        return f"# Worker memory\n\n{run_line(results)}\n"
    rows = [
        f"# Worker memory over {point['batches']} batches",
        "",
        f"{run_line(results)} Tiny model, 8 x 64x64 per batch, "
        f"2 DDIM steps, JPEG to moto S3; {point['seconds']:.0f} s.",
        "",
        f"| process | RSS after {point['warmup_batches']} batches | RSS at the end | growth (goal < 5 %) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, key in (("main (consumer)", "main_mib"), ("pool (pipeline)", "pool_mib")):
        figures = point[key]
        before, end, growth = figures["after_warmup"], figures["end"], 100 * figures["growth"]
        rows.append(f"| {name} | {before:.0f} MiB | {end:.0f} MiB | {growth:+.1f} % |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=500, help="batches of 8 (default 500)")
    parser.add_argument("--warmup", type=int, default=50, help="batches before the first reading (default 50)")
    parser.add_argument("--model", type=Path, help="tiny model folder (default: built into a temporary folder)")
    add_run_args(parser, "worker-memory-latest")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = new_results()
    with tempfile.TemporaryDirectory() as tmp, part(results, "worker memory"):
        model = args.model
        if model is None:
            from worker.pipeline.testmodel import build_test_model

            model = build_test_model(Path(tmp) / "tiny", "tiny")
        results["point"] = measure(model, args.batches, args.warmup, Path(tmp), args.start_timeout)
    return finish(results, markdown, out_dir=output_dir(args), name=args.name)


if __name__ == "__main__":
    raise SystemExit(exit_status(main()))
