"""``deepqueue``: submit and follow runs; start a worker; generate without servers."""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic_settings import BaseSettings

from producer.client import Client, run_id_or_new
from producer.contract import WORKER_GONE_S
from producer.errors import DeepQueueError, InvalidJobError, PromptFileError, StorageError, WaitTimeoutError
from producer.exits import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_JOB_FAILED,
    EXIT_STORAGE,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    CommandError,
)
from producer.job import ImageFormat, JobDefaults, SchedulerName
from producer.run import Run
from producer.settings import ClientSettings, redact_url
from producer.sources import parse_size
from producer.spill import job_index
from producer.state import JobState, RunStatus, format_duration

T = TypeVar("T")

#: Results whose prompts are read from Redis in one round trip.
RESULTS_CHUNK = 1000

SCHEDULERS = SchedulerName.__args__  # type: ignore[attr-defined]
FORMATS = ImageFormat.__args__  # type: ignore[attr-defined]


#: Scheduler and DeepCache flags: run-wide recipe flags of ``submit`` and ``run``, a worker's own
#: defaults for ``worker``; either way, for the jobs that name none.
CACHE_FLAGS = [
    click.option(
        "--scheduler",
        type=click.Choice(SCHEDULERS),
        help="Scheduler of jobs that name none [default: the worker's DEEPQUEUE_SCHEDULER].",
    ),
    click.option(
        "--cache-interval",
        type=int,
        help="DeepCache interval of jobs that name none; 1 turns caching off "
        "[default: the worker's DEEPQUEUE_CACHE_INTERVAL].",
    ),
    click.option(
        "--cache-branch",
        type=int,
        help="DeepCache branch of jobs that name none [default: the worker's DEEPQUEUE_CACHE_BRANCH].",
    ),
]

#: Model and batching flags of ``worker`` and ``run``; each overrides its DEEPQUEUE_* variable.
ENGINE_FLAGS = [
    click.option("--model", help="Model id or folder [default: DEEPQUEUE_MODEL]."),
    click.option("--device", help="auto, cpu, cuda or cuda:N [default: DEEPQUEUE_DEVICE]."),
    click.option("--max-batch", type=int, help="Images per pipeline call at most [default: DEEPQUEUE_MAX_BATCH, 8]."),
]


def with_flags(*options: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator adding ``options`` to a command, shown in --help in this order."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def recipe_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run-wide recipe flags shared by ``submit`` and ``run``; rows of the file override them."""
    default = {name: info.default for name, info in JobDefaults.model_fields.items()}
    options = [
        click.option(
            "--size",
            metavar="WxH",
            help=f"Width x height, multiples of 8 [default: {default['width']}x{default['height']}].",
        ),
        click.option("--steps", type=int, help=f"Denoising steps [default: {default['steps']}]."),
        click.option(
            "--guidance", type=float, help=f"Classifier-free guidance scale [default: {default['guidance']}]."
        ),
        click.option("--seed", type=int, help="Run seed; job seeds derive from it and their position."),
        click.option("--negative", help="Negative prompt for every job."),
        *CACHE_FLAGS,
        click.option(
            "--format", "fmt", type=click.Choice(FORMATS), help=f"Image format [default: {default['format']}]."
        ),
        click.option(
            "--run",
            "run_id",
            help="Run name (default: generated). Reusing one resumes it, with the same recipe flags.",
        ),
        click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path)),
    ]
    return with_flags(*options)(command)


def recipe_defaults(size: str | None, negative: str | None, fmt: str | None, **flags: Any) -> dict[str, Any]:
    """CLI flags -> Job defaults, leaving out what the user did not set."""
    defaults = {key: value for key, value in flags.items() if value is not None}
    if size is not None:
        try:
            defaults.update(parse_size(size))
        except PromptFileError as error:
            raise PromptFileError(f"--size: {error}") from error
    if negative is not None:
        defaults["negative_prompt"] = negative
    if fmt:
        defaults["format"] = fmt
    return defaults


class InputError(click.ClickException):
    """Bad input or an unknown run: exit 2, apart from 1 for "a job failed"."""

    exit_code = EXIT_BAD_INPUT


class Group(click.Group):
    """Turn errors a user can act on into one line and an exit code that says which kind."""

    def invoke(self, ctx: click.Context) -> Any:
        from kombu.exceptions import OperationalError
        from pydantic import ValidationError
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        # Every message goes through redact_url: a Redis URL in it never shows its password.
        try:
            return super().invoke(ctx)
        except WaitTimeoutError as error:
            raise CommandError(redact_url(str(error)), EXIT_TIMEOUT) from error
        except StorageError as error:
            raise CommandError(storage_message(error), EXIT_STORAGE) from error
        except DeepQueueError as error:
            raise InputError(redact_url(str(error))) from error
        except (RedisConnectionError, RedisTimeoutError, OperationalError) as error:
            raise CommandError(unreachable_message(error), EXIT_UNREACHABLE) from error
        except ValidationError as error:
            if not error.title.endswith("Settings"):  # job errors arrive as InvalidJobError; others are bugs
                raise
            raise InputError(redact_url(settings_message(error))) from error
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)


def storage_message(error: Exception) -> str:
    """One line: what the run's storage failed on, and the settings to check."""
    reason = " ".join(str(error).split())
    return redact_url(f"storage: {reason} (check DEEPQUEUE_STORAGE, DEEPQUEUE_S3_* or DEEPQUEUE_OUTPUT_DIR)")


def unreachable_message(error: Exception) -> str:
    """One line: what failed, and the two settings (passwords hidden) to check."""
    try:
        settings = ClientSettings()
        where = f" (broker {settings.broker_url}, result backend {settings.result_backend})"
    except ValueError:  # the settings themselves are broken: the error says enough
        where = ""
    reason = " ".join(str(error).split())  # one line, whatever the library put in it
    return redact_url(f"cannot reach Redis ({reason}); check DEEPQUEUE_BROKER_URL and DEEPQUEUE_RESULT_BACKEND{where}")


def settings_message(error: Any) -> str:
    """A pydantic settings error as one line naming each DEEPQUEUE_* variable, value and rule."""
    problems = []
    for item in error.errors():
        name = f"DEEPQUEUE_{str(item['loc'][0]).upper()}" if item["loc"] else "settings"
        got = f", got {item['input']!r}" if item["loc"] and item["type"] != "missing" else ""
        problems.append(f"{name}: {item['msg'].removeprefix('Value error, ')}{got}")
    return "invalid setting: " + "; ".join(problems)


def settings_help(settings: type[BaseSettings], *, leave_out: type[BaseSettings] | None = None) -> str:
    """Every DEEPQUEUE_* variable of ``settings`` with its default and description, for --help."""
    skip = set(leave_out.model_fields) if leave_out else set()
    lines = ["\b", "Settings (environment variables):"]
    for name, info in settings.model_fields.items():
        if name not in skip:
            default = "unset" if info.default is None else info.default
            lines.append(f"  DEEPQUEUE_{name.upper()}={default}  {info.description or ''}".rstrip())
    return "\n".join(lines)


class SettingsEpilog(click.Command):
    """A command whose --help ends with the settings it reads (built only when asked for)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from worker.settings import WorkerSettings

        formatter.write("\n" + settings_help(WorkerSettings, leave_out=ClientSettings).removeprefix("\b\n") + "\n")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=settings_help(ClientSettings))
@click.version_option(package_name="deepqueue")
def cli() -> None:
    """deepqueue: bulk image generation with warm DeepCache workers.

    Connection settings come from DEEPQUEUE_BROKER_URL and DEEPQUEUE_RESULT_BACKEND; where
    images go (read back by export and audit) from DEEPQUEUE_STORAGE and DEEPQUEUE_S3_*.
    """


@cli.command()
@recipe_options
@click.option("--wait", "wait_", is_flag=True, help="Wait for the run to finish, with a progress bar.")
@click.option("--timeout", type=click.FloatRange(min=0), help="With --wait: give up after this many seconds.")
@click.option(
    "--audit",
    "audit_sample",
    type=click.IntRange(min=1),
    metavar="K",
    help="With --wait: then audit K of the images against DeepCache off (see deepqueue audit).",
)
@click.option("--resend-queued", is_flag=True, help="Also send jobs still queued (after the queue itself was lost).")
@click.option(
    "--allow-recipe-change",
    is_flag=True,
    help="Add jobs to an existing run even though its recipe flags differ from its first submit's.",
)
def submit(
    file: Path,
    run_id: str | None,
    seed: int | None,
    wait_: bool,
    timeout: float | None,
    resend_queued: bool,
    allow_recipe_change: bool,
    audit_sample: int | None,
    **flags: Any,
) -> None:
    """Validate FILE (.txt, .jsonl, .csv, .tsv, .json, .parquet; the text ones also .gz) and
    enqueue one job per prompt, streaming: memory stays flat whatever its size.

    Submitting a run again sends only its new and failed jobs (and, with --resend-queued, the
    queued ones). A run keeps the recipe flags of its first submit: a submit of the same run
    with others is refused, unless --allow-recipe-change.
    """
    defaults = recipe_defaults(**flags)
    if audit_sample and not wait_:
        raise click.UsageError("--audit needs --wait (or run `deepqueue audit RUN --sample K` once the run is done)")
    with Client() as client:
        new, run_id = run_id is None, run_id_or_new(run_id)
        named = f"run {run_id} (a new name: pass --run {run_id} to resume it, or follow it with deepqueue wait)"
        try:
            run = client.submit(
                file,
                run=run_id,
                seed=seed,
                progress=True,
                resend_queued=resend_queued,
                allow_recipe_change=allow_recipe_change,
                **defaults,
            )
        except (InvalidJobError, PromptFileError):
            raise  # nothing was sent: no name to remember
        except BaseException:
            if new:  # interrupted or failed while sending: the name resumes it
                click.echo(named, err=True)
            raise
        if new:
            click.echo(named)
        click.echo(f"run {run.run_id}: {run.submitted} jobs enqueued, {run.skipped} already queued, running or done")
        if wait_:
            _finish(client, run, timeout, audit_sample=audit_sample)


@cli.command()
@click.argument("run_id")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the run to finish, with a progress bar.")
@click.option("--timeout", type=click.FloatRange(min=0), help="With --wait: give up after this many seconds.")
def retry(run_id: str, wait_: bool, timeout: float | None) -> None:
    """Send again every job of RUN_ID that is not done: queued, failed, or running on a worker
    that is gone. Jobs running on a live worker are left to it."""
    with Client() as client:
        run = client.retry(run_id, progress=True)
        click.echo(f"run {run.run_id}: {run.submitted} jobs sent again")
        if run.skipped:
            click.echo(f"{run.skipped} jobs not done predate kept jobs: submit their file again")
        if wait_:
            _finish(client, run, timeout)


@cli.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: counts per state, rate, ETA, workers.")
def status(run_id: str, as_json: bool) -> None:
    """RUN_ID's jobs per state, images/s (the last 5 minutes; overall once finished), ETA and
    the workers online."""
    with Client() as client:
        current = replace(client.run(run_id).status(), workers=len(client.workers()))
        click.echo(json.dumps(status_record(current)) if as_json else str(current))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def runs(as_json: bool) -> None:
    """Every submitted run, oldest first: its jobs per state, rate and age."""
    with Client() as client:
        now = time.time()
        times = client.run_times()
        if not times and not as_json:
            click.echo("no runs yet: submit one with deepqueue submit FILE")
        for run_id, since in times.items():
            current = client.run(run_id).status()
            if as_json:
                click.echo(json.dumps({**status_record(current), "submitted_at": since}))
            else:
                click.echo(f"{current}, submitted {format_duration(now - since)} ago")


def status_record(current: RunStatus) -> dict[str, Any]:
    return {
        "run": current.run_id,
        "total": current.total,
        **{state.value: n for state, n in current.counts.items()},
        "images_per_s": current.images_per_s,
        "eta_s": current.eta_s,
        **({} if current.workers is None else {"workers": current.workers}),
    }


@cli.command()
@click.argument("run_id")
def cancel(run_id: str) -> None:
    """Cancel RUN_ID: its queued jobs end cancelled without being generated (workers drop their
    messages as they reach them); running jobs finish. A cancelled run takes no new jobs until it
    is resumed (deepqueue resume)."""
    with Client() as client:
        run = client.run(run_id)
        cancelled = run.cancel()
        click.echo(f"run {run_id}: {cancelled} queued jobs cancelled; {run.status()}")


@cli.command()
@click.argument("run_id")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the run to finish, with a progress bar.")
@click.option("--timeout", type=click.FloatRange(min=0), help="With --wait: give up after this many seconds.")
def resume(run_id: str, wait_: bool, timeout: float | None) -> None:
    """Take back a cancel of RUN_ID: its cancelled jobs are sent again and run; it takes new jobs
    again. Done, failed and running jobs stay as they are."""
    with Client() as client:
        run = client.resume(run_id, progress=True)
        click.echo(f"run {run.run_id} resumed: {run.submitted} cancelled jobs sent again")
        if wait_:
            _finish(client, run, timeout)


@cli.command()
@click.argument("run_id")
@click.option("--outputs", is_flag=True, help="Also delete its images, sidecars and manifest from storage.")
@click.option("--force", is_flag=True, help="Delete a run that still has queued or running jobs (cancels it first).")
def delete(run_id: str, outputs: bool, force: bool) -> None:
    """Delete RUN_ID's state from Redis (and with --outputs its files). Its messages still
    queued are dropped by workers; the run name can be used again."""
    with Client() as client:
        before = client.deleted(run_id)
        removed = client.delete(run_id, outputs=outputs, force=force)
        files = f", {removed} objects deleted from storage" if outputs else ""
        click.echo(f"run {run_id} {'was deleted before' if before else 'deleted'}{files}")


@cli.command()
@click.option(
    "--older-than", "older_than", required=True, metavar="AGE", help="First submitted before this: 7d, 12h, 30m."
)
@click.option("--outputs", is_flag=True, help="Also delete their images, sidecars and manifests.")
@click.option("--dry-run", is_flag=True, help="List the runs that would be deleted, delete nothing.")
def prune(older_than: str, outputs: bool, dry_run: bool) -> None:
    """Delete the state of finished runs first submitted more than AGE ago (a clean-up to run
    from cron); runs with queued or running jobs are kept."""
    with Client() as client:
        for run_id in client.prune(parse_age(older_than), outputs=outputs, dry_run=dry_run):
            click.echo(f"{'would delete' if dry_run else 'deleted'} {run_id}")


def parse_age(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``45s`` (or plain seconds) as seconds."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise click.BadParameter(f"{text!r}: a number with d, h, m or s, e.g. 7d") from None
    if seconds < 0:
        raise click.BadParameter(f"{text!r}: an age cannot be negative")
    return seconds


@cli.command()
@click.argument("run_id")
@click.option("--timeout", type=click.FloatRange(min=0), help="Give up after this many seconds.")
def wait(run_id: str, timeout: float | None) -> None:
    """Wait for RUN_ID to finish, with a progress bar; exit 1 if any job failed."""
    with Client() as client:
        _finish(client, client.run(run_id), timeout)


@cli.command()
@click.argument("run_id")
@click.option("--state", type=click.Choice([state.value for state in JobState]), help="Only this state.")
def results(run_id: str, state: str | None) -> None:
    """One JSON line per job, by index: index, id, state, prompt, storage key or failure reason.
    The prompt is there while Redis keeps the job (until it is done); a done job's prompt is in
    its sidecar beside the image, and in the run's manifest."""
    with Client() as client:
        run = client.run(run_id)
        for chunk in batched(run.results(JobState(state) if state else None, ordered=True), RESULTS_CHUNK):
            prompts = run.prompts([result.job_id for result in chunk])
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


@cli.command("dead-letters")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="The newest this many.")
def dead_letters(limit: int) -> None:
    """One JSON line per message a worker dropped as unreadable, newest first."""
    with Client() as client:
        for record in client.dead_letters(limit):
            click.echo(json.dumps(record, ensure_ascii=False))


@cli.command()
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


def _finish(client: Client, run: Run, timeout: float | None, *, audit_sample: int | None = None) -> None:
    if not run.status().is_finished and not client.workers():
        click.echo(
            f"no worker has renewed its leases in the last {WORKER_GONE_S:.0f} s: start one "
            f"(deepqueue worker) on queue {client.settings.queue!r}, or the run will not progress",
            err=True,
        )
    final: RunStatus = run.wait(progress=True, timeout=timeout)
    click.echo(summary(final, run.span(), client.outputs_url(run.run_id)))
    if audit_sample and final.counts[JobState.DONE]:
        click.echo(audit_text(client.audit(run.run_id, sample=audit_sample, timeout=timeout, progress=True)))
    failed = list(run.results(JobState.FAILED))
    for result in failed[:10]:
        click.echo(f"failed {result.job_id}: {result.reason}", err=True)
    if len(failed) > 10:
        click.echo(f"... and {len(failed) - 10} more: deepqueue results {run.run_id} --state failed", err=True)
    if failed:
        sys.exit(EXIT_JOB_FAILED)


def summary(final: RunStatus, span: tuple[float, float] | None, where: str) -> str:
    """The end of a wait: images, failures, time and rate, and where the files are."""
    counts = final.counts
    text = f"run {final.run_id} finished: {counts[JobState.DONE]} images, {counts[JobState.FAILED]} failed"
    if counts[JobState.CANCELLED]:
        text += f", {counts[JobState.CANCELLED]} cancelled"
    if span is not None and span[1] > span[0]:
        text += f" in {format_duration(span[1] - span[0])}"
    if final.images_per_s:
        text += f" ({final.images_per_s:.3g} img/s)"
    return f"{text}; files in {where}"


@cli.command(cls=SettingsEpilog, context_settings={"ignore_unknown_options": True})
@with_flags(
    *ENGINE_FLAGS,
    click.option(
        "--max-wait-s",
        type=float,
        help="Longest a partial batch waits for peers of its shape [default: DEEPQUEUE_MAX_WAIT_S, 2.0].",
    ),
    *CACHE_FLAGS,
)
@click.option("--loglevel", default="INFO", show_default=True)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(loglevel: str, celery_args: tuple[str, ...], **settings: Any) -> None:
    """Start a Celery worker: one warm pipeline, batching by shape.

    Flags override their DEEPQUEUE_* variables; other settings come from those variables
    (below); extra arguments go to `celery worker` (e.g. --hostname gpu0@%h).
    """
    from worker.cli import start_worker

    start_worker(overrides=settings, loglevel=loglevel, extra=list(celery_args))


@cli.command("run")
@recipe_options
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder."
)
@with_flags(*ENGINE_FLAGS)
def run_embedded(
    file: Path,
    run_id: str | None,
    seed: int | None,
    out_dir: Path,
    model: str | None,
    device: str | None,
    max_batch: int | None,
    **flags: Any,
) -> None:
    """Generate FILE's prompts in this process, no servers: images and sidecars under --out."""
    from worker.cli import run_local

    overrides = {"model": model, "device": device, "max_batch": max_batch, "output_dir": out_dir}
    run_local(file, run_id=run_id, seed=seed, defaults=recipe_defaults(**flags), overrides=overrides)


@cli.command("make-test-model")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--arch", type=click.Choice(["tiny", "sd15", "sdxl", "sdxl-tiny"]), default="tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def make_test_model(directory: Path, arch: str, seed: int) -> None:
    """Build a random-weight pipeline in DIRECTORY (offline; loads like a real model)."""
    from worker.pipeline.testmodel import build_test_model

    try:
        path = build_test_model(directory, arch, seed=seed)  # type: ignore[arg-type]
    except FileExistsError as error:
        raise InputError(str(error)) from error
    click.echo(f"wrote {arch} model to {path}")


#: ``producer.export.FORMATS``, without importing pyarrow for ``--help``.
EXPORT_FORMATS = ("parquet", "imagefolder", "webdataset")


@cli.command("manifest")
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


@cli.command("export")
@click.argument("run_id")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True, help="What to write.")
@click.option(
    "--to",
    metavar="s3://BUCKET/PREFIX|DIR",
    help="Where (S3 on the run's endpoint, or a folder); default: {run}/exports/{format}/ beside the run.",
)
@click.option("--shard-size", type=click.IntRange(min=1), default=10_000, show_default=True, help="Images per shard.")
@click.option("--overwrite", is_flag=True, help="Empty the target first if it is not empty.")
def export_command(run_id: str, fmt: str, to: str | None, shard_size: int, overwrite: bool) -> None:
    """Export RUN_ID's images with their recipes: parquet (an image column datasets decodes),
    imagefolder (metadata.jsonl per folder, for datasets' imagefolder) or webdataset (tar
    shards with .png/.json/.txt per image and a parquet per shard, as img2dataset writes them).
    Streamed shard by shard; the manifest is compacted first if it is missing or stale."""
    with Client() as client:
        result = client.export(run_id, fmt, to, shard_size=shard_size, overwrite=overwrite, progress=True)
    click.echo(
        f"exported {result.rows} images of {run_id} as {fmt} in {result.shards} shards to {result.to} "
        f"({result.seconds:.1f} s)"
    )


def main() -> None:
    cli(prog_name="deepqueue")
