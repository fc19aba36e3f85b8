"""Fair share and priorities between runs (``producer.fair``) on simulated workers
(``simulated:a=0.51,b=0.094``, the H200 calibration of ``ops.bench.scaling``): real ``deepqueue
worker`` processes, one redis-server, one moto S3 server.

- **share**: three runs weighted 1:1:2 (``--share-jobs`` jobs each, more than the workers finish
  in ``--share-seconds``) on ``--workers`` (4) workers. Every second the done count of each run
  is read; over every 60 s window (one every 10 s) from the moment all three have images, each
  run's part of the images is set against its weight's part (deviation: measured ÷ due - 1; the
  goal is within ±5 %), and the batch fill of the calls that started in the window (from the
  sidecars) against 0.95.
- **priority**: a ``high`` run of 100 jobs submitted while the workers are busy with a
  ``--backlog`` (100,000) job ``normal`` run. From the sidecars: how long after the first
  worker came free (the end of the first call that was running when the high run was sent)
  its first call started (the goal: within one call + ``max_wait_s``), and how many images the
  big run made from the high run's submit to its last image (the goal: fewer than 1,000).

    .venv/bin/python -m ops.bench.fairshare [--workers 4] [--share-seconds 240] [--backlog 100000]
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis

from ops.bench import harness
from ops.bench.harness import s3_sidecars
from ops.bench.report import run_line
from ops.bench.scaling import DEVICE, MAX_BATCH, start_workers
from ops.localstack import client_for, moto_s3_client, stop, worker_env
from producer import Client, JobState

logger = logging.getLogger(__name__)

WEIGHTS = {"share-a": 1.0, "share-b": 1.0, "share-c": 2.0}
WINDOW_S, STEP_S = 60.0, 10.0
#: Seconds per call of a full batch on the simulated device, and the workers' partial-batch wait.
CALL_S = 0.51 + 0.094 * MAX_BATCH
MAX_WAIT_S = 2.0
RECIPE = {"width": 64, "height": 64, "format": "jpeg"}

Sample = tuple[float, Mapping[str, int]]


def window_shares(samples: Sequence[Sample], weights: Mapping[str, float]) -> list[dict[str, Any]]:
    """For every ``WINDOW_S`` window (one per ``STEP_S``) from the first sample in which every run
    has images: each run's images in it, and its part of them ÷ its weight's part - 1."""
    live = [i for i, (_, done) in enumerate(samples) if all(done.get(run, 0) for run in weights)]
    if not live:
        return []
    total_weight = sum(weights.values())
    windows, start = [], live[0]
    while True:
        t0, before = samples[start]
        end = next((i for i in range(start, len(samples)) if samples[i][0] >= t0 + WINDOW_S), None)
        if end is None:
            return windows
        t1, after = samples[end]
        images = {run: after.get(run, 0) - before.get(run, 0) for run in weights}
        count = sum(images.values())
        windows.append(
            {
                "from_s": t0 - samples[live[0]][0],
                "seconds": t1 - t0,
                "start": t0,
                "images": images,
                "deviation": {
                    run: (images[run] / count) / (weight / total_weight) - 1 if count else None
                    for run, weight in weights.items()
                },
            }
        )
        start = next((i for i in range(start, len(samples)) if samples[i][0] >= t0 + STEP_S), len(samples) - 1)


def calls(sidecars: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each pipeline call once: worker, start, seconds, size."""
    seen: dict[str, dict[str, Any]] = {}
    for sidecar in sidecars:
        batch, timing = sidecar["batch"], sidecar["timing"]
        seen[batch["id"]] = {
            "worker": sidecar["worker"]["name"],
            "start": timing["started_at"],
            "seconds": timing["batch_inference_s"],
            "size": batch["size"],
        }
    return sorted(seen.values(), key=lambda call: call["start"])


def fill_between(all_calls: Sequence[Mapping[str, Any]], start: float, end: float) -> float | None:
    sizes = [call["size"] for call in all_calls if start <= call["start"] < end]
    return statistics.fmean(sizes) / MAX_BATCH if sizes else None


def first_free(all_calls: Sequence[Mapping[str, Any]], at: float) -> float | None:
    """When the first worker came free after ``at``: the earliest end of a call running then."""
    ends = (call["start"] + call["seconds"] for call in all_calls)
    return min((end for end in ends if end > at), default=None)


def done_counts(client: Client, runs: Sequence[str]) -> dict[str, int]:
    return {run: client.run(run).status().counts[JobState.DONE] for run in runs}


def drain(client: Client, broker: redis.Redis, queue: str, runs: Sequence[str]) -> None:
    """Cancel ``runs`` and wait until the workers dropped their messages."""
    for run in runs:
        client.cancel(run)
    deadline = time.monotonic() + 600
    while (broker.llen(queue) or broker.hlen("unacked")) and time.monotonic() < deadline:
        time.sleep(0.5)


def measure_share(client: Client, seconds: float, jobs: int) -> list[Sample]:
    """Done counts each second until ``seconds`` after the first images, or until a run has no
    more jobs queued (its share would then go to the others)."""
    for run, weight in WEIGHTS.items():
        client.submit(({"prompt": f"{run} {i}"} for i in range(jobs)), run=run, weight=weight, **RECIPE)
    samples: list[Sample] = []
    deadline = time.time() + seconds + 30  # the first images take a few seconds
    while time.time() < deadline:
        now, statuses = time.time(), {run: client.run(run).status() for run in WEIGHTS}
        if any(not status.counts[JobState.QUEUED] for status in statuses.values()):
            break
        samples.append((now, {run: status.counts[JobState.DONE] for run, status in statuses.items()}))
        time.sleep(max(0.0, 1.0 - (time.time() - now)))
    return samples


def measure_priority(client: Client, backlog: int, s3: str, bucket: str) -> dict[str, Any]:
    client.submit(({"prompt": f"bulk {i}"} for i in range(backlog)), run="bulk", **RECIPE)
    while done_counts(client, ["bulk"])["bulk"] < 100:  # the workers are busy with it
        time.sleep(0.2)
    bulk_before = done_counts(client, ["bulk"])["bulk"]
    sent_at = time.time()
    client.submit([f"urgent {i}" for i in range(100)], run="urgent", priority="high", **RECIPE)
    submitted_at = time.time()
    while done_counts(client, ["urgent"])["urgent"] < 100:
        time.sleep(0.1)
    bulk_after = done_counts(client, ["bulk"])["bulk"]
    urgent = calls(s3_sidecars(s3, bucket, "urgent/"))
    bulk = calls(s3_sidecars(s3, bucket, "bulk/"))
    free = first_free(bulk, submitted_at)
    first = urgent[0]["start"]
    last_end = max(call["start"] + call["seconds"] for call in urgent)
    return {
        "backlog": backlog,
        "submit_s": submitted_at - sent_at,
        "first_free_after_submit_s": None if free is None else free - submitted_at,
        "first_call_after_free_s": None if free is None else first - free,
        "bound_s": CALL_S + MAX_WAIT_S,
        "first_image_after_submit_s": first + urgent[0]["seconds"] - submitted_at,
        "all_done_after_submit_s": last_end - submitted_at,
        "bulk_images_meanwhile": bulk_after - bulk_before,
        "urgent_calls": len(urgent),
        "urgent_fill": statistics.fmean(call["size"] for call in urgent) / MAX_BATCH,
    }


def run_parts(bench: harness.Bench, args: Any) -> None:
    redis_url, s3 = bench.servers.redis_url(), bench.servers.s3_endpoint()
    broker_url, backend = f"{redis_url}/0", f"{redis_url}/1"
    for url in (broker_url, backend):
        redis.Redis.from_url(url).flushdb()
    bucket = "fairshare"
    moto_s3_client(s3).create_bucket(Bucket=bucket)
    env = worker_env(broker_url=broker_url, result_backend=backend, s3_endpoint=s3, bucket=bucket, model=DEVICE)
    broker = redis.Redis.from_url(broker_url)
    workers = start_workers(env, args.workers, bench.scratch, args.start_timeout)
    try:
        with client_for(env) as client:
            with bench.part("share"):
                samples = measure_share(client, args.share_seconds, args.share_jobs)
                all_calls = calls(s3_sidecars(s3, bucket))
                windows = window_shares(samples, WEIGHTS)
                for window in windows:
                    window["fill"] = fill_between(all_calls, window["start"], window["start"] + window["seconds"])
                bench.results["share"] = summarize_share(windows)
                drain(client, broker, client.settings.queue, list(WEIGHTS))
            with bench.part("priority"):
                bench.results["priority"] = measure_priority(client, args.backlog, s3, bucket)
                drain(client, broker, client.settings.queue, ["bulk"])
    finally:
        for worker in workers:
            stop(worker)


def summarize_share(windows: list[dict[str, Any]]) -> dict[str, Any]:
    deviations = [abs(d) for window in windows for d in window["deviation"].values() if d is not None]
    fills = [window["fill"] for window in windows if window["fill"] is not None]
    return {
        "weights": WEIGHTS,
        "windows": windows,
        "max_deviation": max(deviations, default=None),
        "min_fill": min(fills, default=None),
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Fair share and priorities ({results['device']}, {results['workers']} workers)", "", run_line(results)]
    share = results.get("share")
    if share:
        runs, weights = list(share["weights"]), share["weights"]
        lines += [
            "",
            f"## Share: weights {' : '.join(f'{weights[run]:g}' for run in runs)} ({', '.join(runs)})",
            "",
            f"Largest deviation from the weights over any 60 s window: **{share['max_deviation']:.1%}**; "
            f"lowest batch fill: **{share['min_fill']:.3f}**."
            if share["windows"]
            else "No 60 s window with all three runs live and queued.",
            "",
            "| window from | images | " + " | ".join(f"{r} images (deviation)" for r in runs) + " | fill |",
            "| ---: | ---: | " + " | ".join("---:" for _ in runs) + " | ---: |",
        ]
        for window in share["windows"]:
            cells = [f"{window['images'][r]} ({window['deviation'][r]:+.1%})" for r in runs]
            fill = "" if window["fill"] is None else f"{window['fill']:.3f}"
            lines.append(
                f"| {window['from_s']:.0f} s | {sum(window['images'].values())} | {' | '.join(cells)} | {fill} |"
            )
    point = results.get("priority")
    if point:
        lines += [
            "",
            f"## Priority: 100 high jobs behind {point['backlog']:,} normal ones",
            "",
            f"- first high call started {point['first_call_after_free_s']:.2f} s after the first worker came free "
            f"(bound: one call + max_wait_s = {point['bound_s']:.2f} s); first high image "
            f"{point['first_image_after_submit_s']:.2f} s after the submit returned ({point['submit_s']:.2f} s)",
            f"- all 100 done {point['all_done_after_submit_s']:.2f} s after the submit, in {point['urgent_calls']} "
            f"calls (fill {point['urgent_fill']:.3f}); meanwhile the big run made "
            f"**{point['bulk_images_meanwhile']}** images (goal: fewer than 1,000)",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = harness.parser(__doc__, "fairshare-latest")
    parser.add_argument("--workers", type=int, default=4, help="simulated workers (default 4)")
    parser.add_argument("--share-seconds", type=float, default=240.0, help="how long the share is measured")
    parser.add_argument("--share-jobs", type=int, default=4000, help="jobs per run of the share part")
    parser.add_argument("--backlog", type=int, default=100_000, help="jobs of the normal run of the priority part")
    args = parser.parse_args(argv)
    with harness.session(args, markdown, device=DEVICE, workers=args.workers) as bench, bench.part("servers"):
        run_parts(bench, args)
    return bench.results


if __name__ == "__main__":
    raise SystemExit(harness.exit_status(main()))
