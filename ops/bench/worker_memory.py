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

import logging
import time
from pathlib import Path
from typing import Any

from ops.bench import harness
from ops.bench.harness import Servers, running_worker
from ops.bench.report import run_line
from ops.localstack import client_for, worker_env
from producer import JobState

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


def measure(servers: Servers, batches: int, warmup: int) -> dict[str, Any]:
    redis_url, model = servers.redis_url(), servers.model()
    broker, backend = f"{redis_url}/0", f"{redis_url}/1"
    s3 = servers.bucket("memory")
    env = worker_env(broker_url=broker, result_backend=backend, s3_endpoint=s3, bucket="memory", model=str(model))
    with running_worker(env, servers.scratch / "worker.log", timeout=servers.start_timeout) as worker:
        pool = pool_pid(worker.pid)
        with client_for(env) as client:
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
    parser = harness.parser(__doc__, "worker-memory-latest", tiny_model=True)
    parser.add_argument("--batches", type=int, default=500, help="batches of 8 (default 500)")
    parser.add_argument("--warmup", type=int, default=50, help="batches before the first reading (default 50)")
    args = parser.parse_args(argv)
    with harness.session(args, markdown) as bench, bench.part("worker memory"):
        bench.results["point"] = measure(bench.servers, args.batches, args.warmup)
    return bench.results


if __name__ == "__main__":
    raise SystemExit(harness.exit_status(main()))
