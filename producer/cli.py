"""``deepqueue``: submit and follow runs; start a worker; generate without servers."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from producer.client import Client, Run
from producer.contract import WORKER_GONE_S
from producer.errors import DeepQueueError, PromptFileError, WaitTimeoutError
from producer.job import ImageFormat, SchedulerName
from producer.settings import ClientSettings, redact_url
from producer.sources import parse_size
from producer.state import JobState, RunStatus

SCHEDULERS = SchedulerName.__args__  # type: ignore[attr-defined]
FORMATS = ImageFormat.__args__  # type: ignore[attr-defined]


def recipe_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run-wide recipe flags shared by ``submit`` and ``run``; rows of the file override them."""
    options = [
        click.option("--size", metavar="WxH", help="Width x height, e.g. 768x512 (multiples of 8)."),
        click.option("--steps", type=int, help="Denoising steps."),
        click.option("--guidance", type=float, help="Classifier-free guidance scale."),
        click.option("--seed", type=int, help="Run seed; job seeds derive from it and their position."),
        click.option("--negative", help="Negative prompt for every job."),
        click.option("--scheduler", type=click.Choice(SCHEDULERS), help="Scheduler (default: the worker's)."),
        click.option("--cache-interval", type=int, help="DeepCache interval; 1 turns caching off."),
        click.option("--cache-branch", type=int, help="DeepCache branch id."),
        click.option("--format", "fmt", type=click.Choice(FORMATS), help="Image format (default png)."),
        click.option(
            "--run",
            "run_id",
            help="Run name (default: generated). Reusing one resumes it, with the same recipe flags.",
        ),
        click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path)),
    ]
    for option in reversed(options):
        command = option(command)
    return command


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


#: Exit codes, one meaning each (also in the README).
EXIT_JOB_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 3
EXIT_TIMEOUT = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


class InputError(click.ClickException):
    """Bad input or an unknown run: exit 2, apart from 1 for "a job failed"."""

    exit_code = EXIT_BAD_INPUT


class CommandError(click.ClickException):
    """A one-line error with its own exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deepqueue")
def cli() -> None:
    """deepqueue: bulk image generation with warm DeepCache workers.

    Connection settings come from DEEPQUEUE_BROKER_URL and DEEPQUEUE_RESULT_BACKEND.
    """


@cli.command()
@recipe_options
@click.option("--wait", "wait_", is_flag=True, help="Wait for the run to finish, with a progress bar.")
@click.option("--timeout", type=float, help="With --wait: give up after this many seconds.")
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
    **flags: Any,
) -> None:
    """Validate FILE (.txt, .jsonl, .csv, .tsv, .json, .parquet; the text ones also .gz) and
    enqueue one job per prompt, streaming: memory stays flat whatever its size.

    Submitting a run again sends only its new and failed jobs (and, with --resend-queued, the
    queued ones). A run keeps the recipe flags of its first submit: a submit of the same run
    with others is refused, unless --allow-recipe-change.
    """
    defaults = recipe_defaults(**flags)
    with Client() as client:
        run = client.submit(
            file,
            run=run_id,
            seed=seed,
            progress=True,
            resend_queued=resend_queued,
            allow_recipe_change=allow_recipe_change,
            **defaults,
        )
        click.echo(f"run {run.run_id}: {run.submitted} jobs enqueued, {run.skipped} already queued, running or done")
        if wait_:
            _finish(client, run, timeout)


@cli.command()
@click.argument("run_id")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the run to finish, with a progress bar.")
@click.option("--timeout", type=float, help="With --wait: give up after this many seconds.")
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
@click.option("--json", "as_json", is_flag=True, help="One JSON object: run, total and a count per state.")
def status(run_id: str, as_json: bool) -> None:
    """Counts of RUN_ID's jobs per state."""
    with Client() as client:
        current = client.run(run_id).status()
        click.echo(json.dumps(status_record(current)) if as_json else str(current))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def runs(as_json: bool) -> None:
    """Every submitted run, oldest first: its jobs per state and when it was first submitted."""
    with Client() as client:
        for run_id, since in client.run_times().items():
            current = client.run(run_id).status()
            if as_json:
                click.echo(json.dumps({**status_record(current), "submitted_at": since}))
            else:
                click.echo(f"{current}, first submitted {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}")


def status_record(current: RunStatus) -> dict[str, Any]:
    return {"run": current.run_id, "total": current.total, **{state.value: n for state, n in current.counts.items()}}


@cli.command()
@click.argument("run_id")
@click.option("--timeout", type=float, help="Give up after this many seconds.")
def wait(run_id: str, timeout: float | None) -> None:
    """Wait for RUN_ID to finish, with a progress bar; exit 1 if any job failed."""
    with Client() as client:
        _finish(client, client.run(run_id), timeout)


@cli.command()
@click.argument("run_id")
@click.option("--state", type=click.Choice([state.value for state in JobState]), help="Only this state.")
def results(run_id: str, state: str | None) -> None:
    """One JSON line per job: id, state, storage key or failure reason."""
    with Client() as client:
        for result in client.run(run_id).results(JobState(state) if state else None):
            record = {"job_id": result.job_id, "state": result.state.value, "key": result.key, "reason": result.reason}
            click.echo(json.dumps(record))


@cli.command("dead-letters")
@click.option("--limit", type=int, default=100, show_default=True, help="The newest this many.")
def dead_letters(limit: int) -> None:
    """One JSON line per message a worker dropped as unreadable, newest first."""
    with Client() as client:
        for record in client.dead_letters(limit):
            click.echo(json.dumps(record, ensure_ascii=False))


def _finish(client: Client, run: Run, timeout: float | None) -> None:
    if not run.status().is_finished and not client.workers():
        click.echo(
            f"no worker has renewed its leases in the last {WORKER_GONE_S:.0f} s: start one "
            f"(deepqueue worker) on queue {client.settings.queue!r}, or the run will not progress",
            err=True,
        )
    final: RunStatus = run.wait(progress=True, timeout=timeout)
    click.echo(str(final))
    failed = list(run.results(JobState.FAILED))
    for result in failed[:10]:
        click.echo(f"failed {result.job_id}: {result.reason}", err=True)
    if failed:
        sys.exit(EXIT_JOB_FAILED)


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--model", help="Model id or folder (default DEEPQUEUE_MODEL).")
@click.option("--device", help="auto, cpu, cuda or cuda:N (default DEEPQUEUE_DEVICE).")
@click.option("--loglevel", default="INFO", show_default=True)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(model: str | None, device: str | None, loglevel: str, celery_args: tuple[str, ...]) -> None:
    """Start a Celery worker: one warm pipeline, batching by shape.

    Other settings come from DEEPQUEUE_* variables; extra arguments go to `celery worker`
    (e.g. --hostname gpu0@%h).
    """
    from worker.cli import start_worker

    start_worker(model=model, device=device, loglevel=loglevel, extra=list(celery_args))


@cli.command("run")
@recipe_options
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder."
)
@click.option("--model", help="Model id or folder (default DEEPQUEUE_MODEL).")
@click.option("--device", help="auto, cpu, cuda or cuda:N.")
@click.option("--max-batch", type=int, help="Images per pipeline call at most (default 8).")
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
@click.option("--arch", type=click.Choice(["tiny", "sd15", "sdxl-tiny"]), default="tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def make_test_model(directory: Path, arch: str, seed: int) -> None:
    """Build a random-weight pipeline in DIRECTORY (offline; loads like a real model)."""
    from worker.testmodel import build_test_model

    try:
        path = build_test_model(directory, arch, seed=seed)  # type: ignore[arg-type]
    except FileExistsError as error:
        raise InputError(str(error)) from error
    click.echo(f"wrote {arch} model to {path}")


def main() -> None:
    cli(prog_name="deepqueue")
