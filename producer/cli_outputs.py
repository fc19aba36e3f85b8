"""``deepqueue`` commands that read back what runs produced: results, dead-letters, manifest,
export and audit."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import click

from producer.client import Client
from producer.spill import job_index
from producer.state import JobState, format_duration

T = TypeVar("T")

#: Results whose prompts are read from Redis in one round trip.
RESULTS_CHUNK = 1000

#: ``producer.export.FORMATS``, without importing pyarrow for ``--help``.
EXPORT_FORMATS = ("parquet", "imagefolder", "webdataset")


@click.command("manifest")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the whole stats.json.")
def manifest_command(run_id: str, as_json: bool) -> None:
    """Compact RUN_ID's manifest: Parquet shards {run}/manifest/manifest-*.parquet with one row
    per image (every sidecar field, its key and size) and {run}/stats.json (counts, failures by
    reason, images/s, GPU-seconds, time span, sizes, models). Jobs done but missing from the
    workers' parts are read from their sidecars. Needs the export extra."""
    with Client() as client:
        stats = client.manifest(run_id, progress=True)
    if as_json:
        click.echo(json.dumps(stats, indent=1, ensure_ascii=False))
        return
    for line in manifest_lines(stats):
        click.echo(line)


def manifest_lines(stats: dict[str, Any]) -> list[str]:
    manifest = stats["manifest"]
    lines = [
        f"{stats['run_id']}: {manifest['rows']} images in {len(manifest['shards'])} manifest shards "
        f"({stats['repaired_from_sidecars']} read from sidecars, {stats['missing']} missing)",
        f"jobs: {stats['count']} ("
        + ", ".join(f"{state.value} {stats.get(state.value, 0)}" for state in JobState)
        + ")",
    ]
    if stats.get("duration_s"):
        lines.append(
            f"{stats['images_per_s']:.3g} images/s over {format_duration(stats['duration_s'])}, "
            f"{stats['gpu_seconds']:.1f} GPU-seconds"
        )
    lines += [f"failed {count}: {reason}" for reason, count in list(stats["failed_by_reason"].items())[:10]]
    return lines


@click.command("export")
@click.argument("run_id")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True, help="What to write.")
@click.option(
    "--to",
    metavar="s3://BUCKET/PREFIX|DIR",
    help="Where (S3 on the run's endpoint, or a folder); default: {run}/exports/{format}/ beside the run.",
)
@click.option("--shard-size", type=click.IntRange(min=1), default=10_000, show_default=True, help="Images per shard.")
@click.option("--overwrite", is_flag=True, help="Empty the target first if it is not empty.")
@click.option(
    "--resume",
    is_flag=True,
    help="Finish an export of this run, format and shard size that stopped half-way there: its complete "
    "shards are kept, the rest written again.",
)
def export_command(run_id: str, fmt: str, to: str | None, shard_size: int, overwrite: bool, resume: bool) -> None:
    """Export RUN_ID's images with their recipes: parquet (an image column datasets decodes),
    imagefolder (metadata.jsonl per folder, for datasets' imagefolder) or webdataset (tar
    shards with .png/.json/.txt per image and a parquet per shard, as img2dataset writes them).
    Streamed shard by shard; the manifest is compacted first if it is missing or stale."""
    with Client() as client:
        result = client.export(
            run_id, fmt, to, shard_size=shard_size, overwrite=overwrite, resume=resume, progress=True
        )
    kept = f", {result.kept_shards} complete shards kept" if result.kept_shards else ""
    click.echo(
        f"exported {result.rows} images of {run_id} as {fmt} in {result.shards} shards to {result.to} "
        f"({result.seconds:.1f} s{kept})"
    )


@click.command()
@click.argument("run_id")
@click.option("--state", type=click.Choice([state.value for state in JobState]), help="Only this state.")
def results(run_id: str, state: str | None) -> None:
    """One JSON line per job, by index: index, id, state, prompt, storage key or failure reason.
    The prompt is read from the jobs the submit kept in the run's storage (none for jobs a plain
    Celery producer sent); it is also in each image's sidecar and in the run's manifest."""
    with Client() as client:
        run = client.run(run_id)
        for chunk in batched(run.results(JobState(state) if state else None, ordered=True), RESULTS_CHUNK):
            prompts = client.prompts(run_id, [result.job_id for result in chunk])
            for result, prompt in zip(chunk, prompts, strict=True):
                record = {
                    "index": job_index(result.job_id),
                    "job_id": result.job_id,
                    "state": result.state.value,
                    "prompt": prompt,
                    "key": result.key,
                    "reason": result.reason,
                }
                click.echo(json.dumps(record, ensure_ascii=False))


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of ``size`` items (the last one shorter)."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


@click.command("dead-letters")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="The newest this many.")
def dead_letters(limit: int) -> None:
    """One JSON line per message a worker dropped as unreadable, newest first."""
    with Client() as client:
        for record in client.dead_letters(limit):
            click.echo(json.dumps(record, ensure_ascii=False))


@click.command()
@click.argument("run_id")
@click.option("--sample", type=click.IntRange(min=1), default=16, show_default=True, help="Images to compare.")
@click.option(
    "--timeout", type=click.FloatRange(min=0), help="Give up waiting for the uncached twins after this many seconds."
)
def audit(run_id: str, sample: int, timeout: float | None) -> None:
    """Regenerate a sample of RUN_ID's images with DeepCache off (same seeds and settings, on the
    workers, as run RUN_ID.audit) and record PSNR and SSIM of each pair in the run's manifest and
    audit.json. The way to choose DEEPQUEUE_CACHE_INTERVAL and _BRANCH for a model."""
    with Client() as client:
        click.echo(f"auditing {sample} images of {run_id} against twins made without DeepCache")
        click.echo(audit_text(client.audit(run_id, sample=sample, timeout=timeout, progress=True)))


def audit_text(summary: dict[str, Any]) -> str:
    psnr, ssim, cache = summary["psnr_db"], summary["ssim"], summary["deepcache"]
    setting = f"interval {cache.get('interval')}, branch {cache.get('branch')}" if cache.get("enabled") else "off"

    def shown(value: float | None, digits: int) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    return (
        f"audit of {summary['run']} (DeepCache {setting}): {summary['audited']} of {summary['requested']} images "
        f"compared; PSNR mean {shown(psnr['mean'], 2)} dB, worst {shown(psnr['worst'], 2)} dB ({psnr['worst_job']}); "
        f"SSIM mean {shown(ssim['mean'], 4)}, worst {shown(ssim['worst'], 4)} ({ssim['worst_job']}); "
        f"per image in the manifest's audit_* columns"
    )
