"""Submitting big prompt files: producer memory, enqueue rate and Redis bytes per queued job.

For each size (10k, 100k, 1M prompts of 100 characters; ``--sizes``) a ``.jsonl`` file is
written, and a fresh Python process submits it with ``Client.submit`` to a private
redis-server (no worker). That process reports its peak RSS before and after the submit
(``VmHWM``) and the submit's wall time; the server's ``used_memory`` before and after gives
the bytes each queued job costs Redis (messages and run state together), and ``MEMORY USAGE``
of each key how they split. Then the queue is emptied and every job settled done, as workers
would mark them (running, then done with its image's key): ``used_memory`` again gives the
bytes each done job keeps costing Redis.

With ``--template`` the file is one row, a template of ``{0|1|...|9}`` parts that expands to
each size (a power of ten) as 100-character prompts, and the run is then submitted again, as
a resume would: the second submit must send nothing.

    .venv/bin/python -m ops.bench.submit_scale [--sizes 10000,100000,1000000] [--template]
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import redis

from ops.bench import harness
from ops.bench.harness import run_child
from ops.bench.report import run_line
from producer.fair import FairQueue
from producer.state import MARK_BATCH, JobState, RunStore

logger = logging.getLogger(__name__)

RUN = "run-20261126-120000-abcd"  # as long as a generated run name
PROMPT_CHARS = 100


def write_prompts(path: Path, count: int) -> None:
    base = "a photograph of a red fox standing in fresh snow at dawn, soft light, shallow depth of field, "
    with path.open("w") as out:
        for i in range(count):
            prompt = f"{i:09d} {base}".ljust(PROMPT_CHARS, "x")[:PROMPT_CHARS]
            out.write(json.dumps({"prompt": prompt}) + "\n")


def write_template(path: Path, count: int) -> None:
    """One row: a template of ``log10(count)`` ten-way parts, padded to 100-character prompts."""
    parts = len(str(count)) - 1
    if count != 10**parts:
        raise ValueError(f"--template sizes are powers of ten, got {count}")
    text = " a photograph of a red fox standing in fresh snow at dawn, soft light, "
    template = "{0|1|2|3|4|5|6|7|8|9}" * parts + text + "x" * (PROMPT_CHARS - parts - len(text))
    path.write_text(json.dumps({"template": template}) + "\n")


#: The submitting process: nothing imported but what a user's script needs (``python -c``).
CHILD = """
import json, sys, time
from producer import Client, ClientSettings

def peak_mib():  # VmHWM: this process's peak resident memory (ru_maxrss would carry the parent's over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

path, broker, backend, run, storage, again = sys.argv[1:]
settings = ClientSettings(storage="local", output_dir=storage)  # where the submit keeps the jobs it sends
with Client(broker, backend, settings=settings) as client:
    client.submit(["warm-up"], run="warm-up", width=512, height=512)  # connections, scripts
    before = peak_mib()
    started = time.perf_counter()
    sent = client.submit(path, run=run, width=512, height=512).submitted
    seconds = time.perf_counter() - started
    result = {"rss_before_mib": before, "rss_peak_mib": peak_mib(), "seconds": seconds, "sent": sent}
    if again == "again":
        started = time.perf_counter()
        result["resent"] = client.submit(path, run=run, width=512, height=512).submitted
        result["resubmit_seconds"] = time.perf_counter() - started
        result["rss_peak_after_resubmit_mib"] = peak_mib()
print(json.dumps(result))
"""


def measure(count: int, tmp: Path, redis_url: str, *, template: bool = False) -> dict[str, Any]:
    path = tmp / f"prompts-{count}.jsonl"
    (write_template if template else write_prompts)(path, count)
    broker, backend = f"{redis_url}/0", f"{redis_url}/1"
    server = redis.Redis.from_url(broker)
    server.flushall()
    base = server.info("memory")["used_memory"]
    again = "again" if template else "once"
    result = run_child(CHILD, str(path), broker, backend, RUN, str(tmp / f"storage-{count}"), again)
    used = server.info("memory")["used_memory"] - base
    keys: dict[str, float] = {}
    for db in (0, 1):
        client = redis.Redis.from_url(f"{redis_url}/{db}")
        for key in client.scan_iter(count=1000):
            keys[key.decode()] = client.memory_usage(key, samples=0) / count
    settle_done(redis_url, count)
    done_bytes = server.info("memory")["used_memory"] - base
    server.flushall()
    path.unlink()
    assert result["sent"] == count and result.get("resent", 0) == 0, result
    return {
        "prompts": count,
        **result,
        "jobs_per_s": count / result["seconds"],
        "redis_bytes_per_job": used / count,
        "redis_bytes_per_done_job": done_bytes / count,
        "redis_bytes_per_job_by_key": {key: round(value, 1) for key, value in keys.items() if value >= 1},
    }


def settle_done(redis_url: str, count: int) -> None:
    """Empty the queue (as workers would) and mark every job running, then done with its image's
    key, through the script workers use (many jobs per call): what stays is the run's state
    once it is done."""
    broker, backend = redis.Redis.from_url(f"{redis_url}/0"), redis.Redis.from_url(f"{redis_url}/1")
    FairQueue(broker, "deepqueue").drop(RUN)  # what workers taking every message leave
    store = RunStore(backend)
    folder = f"s3://deepqueue/{RUN}/images"
    queued = list(store.job_ids(RUN, JobState.QUEUED))
    for start in range(0, len(queued), MARK_BATCH * 10):
        chunk = queued[start : start + MARK_BATCH * 10]
        store.mark_many(RUN, JobState.RUNNING, dict.fromkeys(chunk, "gpu0@bench"))
        store.mark_many(RUN, JobState.DONE, {job_id: f"{folder}/{job_id}.png" for job_id in chunk})
    assert store.counts(RUN)[JobState.DONE] == count


def markdown(results: dict[str, Any]) -> str:
    template = results.get("template")
    source = (
        "one template row in a .jsonl file expanding to 100-character prompts, submitted, then submitted again"
        if template
        else "100-character prompts in a .jsonl file"
    )
    again = " resubmit (sent) | RSS peak after |" if template else ""
    lines = [
        "# Submitting a big template" if template else "# Submitting big prompt files",
        "",
        f"{run_line(results)} {source}, "
        "512x512 jobs, run name of 24 characters, one `Client.submit` in a fresh process, no worker.",
        "",
        "| prompts | producer RSS before → peak | submit | jobs/s | Redis bytes per queued job | per done job |"
        + again,
        "| ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if template else ""),
    ]
    for point in results["points"]:
        line = (
            f"| {point['prompts']:,} | {point['rss_before_mib']:.0f} → {point['rss_peak_mib']:.0f} MiB | "
            f"{point['seconds']:.1f} s | {point['jobs_per_s']:,.0f} | {point['redis_bytes_per_job']:,.0f} | "
            f"{point['redis_bytes_per_done_job']:,.1f} |"
        )
        if template:
            line += (
                f" {point['resubmit_seconds']:.1f} s ({point['resent']}) | "
                f"{point['rss_peak_after_resubmit_mib']:.0f} MiB |"
            )
        lines.append(line)
    if results["points"]:
        last = results["points"][-1]["redis_bytes_per_job_by_key"]
        lines += ["", "Redis bytes per queued job, by key: " + ", ".join(f"`{k}` {v:,.0f}" for k, v in last.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = harness.parser(__doc__, "submit-latest")
    parser.add_argument("--sizes", default="10000,100000,1000000", help="prompt counts, comma-separated")
    parser.add_argument("--template", action="store_true", help="one template row expanding to each size")
    args = parser.parse_args(argv)
    if args.template and args.name == "submit-latest":
        args.name = "submit-template-latest"
    with harness.session(args, markdown, points=[], template=args.template) as bench, bench.part("redis-server"):
        redis_url = bench.servers.redis_url()
        for count in [int(text) for text in args.sizes.split(",")]:
            with bench.part(f"submit of {count:,} prompts"):
                bench.results["points"].append(measure(count, bench.scratch, redis_url, template=args.template))
                logger.info("submit of %d: %s", count, bench.results["points"][-1])
    return bench.results


if __name__ == "__main__":
    raise SystemExit(harness.exit_status(main()))
