"""Manifest compaction and exports at growing run sizes: peak memory (and time) per step.

For each size (1k and 10k images; ``--sizes``) a run is written the way workers write it, without
a model: a 64x64 PNG per job (the same ~1 KB image), its sidecar (``worker.output.sidecar``), its done
state in a private redis-server, and manifest parts of 1,000 rows (``worker.output.manifest_writer``); one
part in ten is then deleted, so compaction reads those jobs' sidecars as it would after a worker
was killed. Then a fresh Python process per step runs ``compact`` and each export (shards of
1,000 images, to a local folder) and reports its peak RSS (``VmHWM``) after its imports and at
the end: if memory is O(shard) the peaks stay put while the run grows tenfold.

    .venv/bin/python -m ops.bench.export_memory [--sizes 1000,10000,100000]
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Any

from ops.bench import harness
from ops.bench.harness import run_child
from ops.bench.report import run_line

logger = logging.getLogger(__name__)

RUN = "run-20261126-120000-abcd"
SHARD_SIZE = 1000
STEPS = ("compact", "parquet", "imagefolder", "webdataset")

#: One step in a fresh process: imports first, then the peak before and after.
CHILD = """
import json, sys, time
from pathlib import Path
from producer.export import export
from producer.export_target import resolve_target
from producer.manifest import compact
from producer.state import RunStore
from producer.storage import LocalStorage

def peak_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

step, root, redis_url, run, out, shard_size = sys.argv[1:]
store, storage = RunStore.from_url(redis_url), LocalStorage(root)
before = peak_mib()
started = time.perf_counter()
if step == "compact":
    rows = compact(store, storage, "", run)["manifest_rows"]
else:
    target = resolve_target(out, step, run_id=run, storage=storage, prefix="", endpoint_url=None)
    rows = export(store, storage, "", run, step, target, shard_size=int(shard_size)).rows
print(json.dumps({"rss_before_mib": before, "rss_peak_mib": peak_mib(), "seconds": time.perf_counter() - started,
                  "rows": rows}))
"""


def tiny_png() -> bytes:
    from PIL import Image

    image = Image.effect_noise((64, 64), 40).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_run(root: Path, redis_url: str, count: int) -> dict[str, Any]:
    """The outputs, states and parts of ``count`` done jobs, as workers write them."""
    from producer.job import Job
    from producer.layout import image_key, parts_prefix, sidecar_key
    from producer.manifest_parts import manifest_row
    from producer.state import JobState, RunStore
    from producer.storage import LocalStorage
    from worker.delivery.batching import RecipeDefaults, batch_key
    from worker.output.manifest_writer import ManifestWriter
    from worker.output.sidecar import BatchInfo, build_sidecar

    storage, store = LocalStorage(root), RunStore.from_url(redis_url)
    defaults = RecipeDefaults(model="bench-model", scheduler="ddim", cache_interval=3, cache_branch=0)
    writer = ManifestWriter(storage, "", "bench@host", max_rows=1000, timer=False)
    data = tiny_png()
    started = time.perf_counter()
    for start in range(0, count, 8):
        jobs = [
            Job(run_id=RUN, index=i, prompt=f"a benchmark prompt number {i}, " + "x" * 60, seed=i, width=64, height=64)
            for i in range(start, min(start + 8, count))
        ]
        store.mark_queued(RUN, [job.job_id for job in jobs])
        batch = BatchInfo(f"b{start:011d}", tuple(job.job_id for job in jobs), 1.0, time.time())
        for job in jobs:
            at = image_key("", RUN, job.job_id, "png")
            storage.put(at, data, content_type="image/png", metadata={})
            timing = {"started_at": batch.started_at, "finished_at": time.time(), "inference_s": 1.0 / batch.size}
            sidecar = build_sidecar(
                job=job,
                key=batch_key(job, defaults),
                image_url=storage.url(at),
                batch=batch,
                model={"id": "bench-model", "revision": None},
                worker={"hostname": "host", "name": "bench@host", "device": "cpu"},
                timing=timing,
            )
            storage.put(sidecar_key(at), json.dumps(sidecar, indent=1).encode(), content_type="x", metadata={})
            store.mark(RUN, job.job_id, JobState.DONE, key=storage.url(at))
            writer.add(RUN, manifest_row(sidecar, at, sidecar_key(at), len(data)))
    writer.close()
    parts = [key for key, _ in storage.list(parts_prefix("", RUN))]
    for key in parts[::10]:  # workers killed before they flushed: their jobs come from the sidecars
        storage.delete(key)
    store.close()
    return {"write_s": time.perf_counter() - started, "image_bytes": len(data), "parts_deleted": len(parts[::10])}


def measure(count: int, tmp: Path, redis_url: str) -> dict[str, Any]:
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    root = tmp / f"out-{count}"
    point: dict[str, Any] = {"images": count, **write_run(root, redis_url, count)}
    for step in STEPS:
        out = tmp / f"export-{count}-{step}"
        result = run_child(CHILD, step, str(root), redis_url, RUN, str(out), str(SHARD_SIZE))
        assert result["rows"] == count, result
        point[step] = result
        logger.info("%d images, %s: %s", count, step, result)
    return point


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Manifest and exports: memory as the run grows", ""]
    if not results["points"]:
        return "\n".join([*lines, run_line(results)]) + "\n"
    first, last = results["points"][0], results["points"][-1]
    lines += [
        f"{run_line(results)} A run written as workers write it (64x64 PNG of "
        f"{first['image_bytes']:,} bytes per image, sidecars, Redis states, parts of 1,000 rows, "
        f"one part in ten deleted), local storage; each step in a fresh process; exports in shards of {SHARD_SIZE:,}.",
        "",
        "| images | step | RSS after imports → peak | time | images/s |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for point in results["points"]:
        for step in STEPS:
            m = point[step]
            lines.append(
                f"| {point['images']:,} | {step} | {m['rss_before_mib']:.0f} → {m['rss_peak_mib']:.0f} MiB | "
                f"{m['seconds']:.1f} s | {point['images'] / m['seconds']:,.0f} |"
            )
    growth = ", ".join(f"{step} {last[step]['rss_peak_mib'] - first[step]['rss_peak_mib']:+.0f} MiB" for step in STEPS)
    lines += ["", f"Peak RSS from {first['images']:,} to {last['images']:,} images: {growth}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = harness.parser(__doc__, "export-memory-latest")
    parser.add_argument("--sizes", default="1000,10000", help="images per run, comma-separated")
    args = parser.parse_args(argv)
    with harness.session(args, markdown, points=[]) as bench, bench.part("redis-server"):
        redis_url = bench.servers.redis_url()
        for size in [int(text) for text in args.sizes.split(",")]:
            with bench.part(f"{size:,} images"):
                bench.results["points"].append(measure(size, bench.scratch, f"{redis_url}/0"))
    return bench.results


if __name__ == "__main__":
    raise SystemExit(harness.exit_status(main()))
