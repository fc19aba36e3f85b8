"""``deepqueue submit`` and ``wait``: send a run and follow it to the end; ``finish_run`` is the
end of every command's ``--wait`` (progress, summary, failures, exit 1 if a job failed)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from producer.cli_options import SHARE_FLAGS, WAIT_FLAGS, PromptInput, recipe_defaults, recipe_options, with_flags
from producer.cli_outputs import audit_text
from producer.client import Client, run_id_or_new
from producer.contract import WORKER_GONE_S
from producer.errors import InvalidJobError, NotifyError, PromptFileError
from producer.exits import EXIT_JOB_FAILED
from producer.notify import checked_url
from producer.run import Run
from producer.state import JobState, RunStatus, format_duration


@click.command()
@recipe_options
@with_flags(*WAIT_FLAGS)
@click.option(
    "--audit",
    "audit_sample",
    type=click.IntRange(min=1),
    metavar="K",
    help="With --wait: then audit K of the images against DeepCache off (see deepqueue audit).",
)
@click.option(
    "--model",
    metavar="ALIAS",
    help="The model to run on: jobs go to the workers started with DEEPQUEUE_MODEL_ALIAS=ALIAS "
    "[default: the workers of the plain queue].",
)
@with_flags(*SHARE_FLAGS)
@click.option(
    "--max-queued",
    type=click.IntRange(min=1),
    metavar="N",
    help="Keep at most N of the run's jobs waiting in the queue: send more as workers take them.",
)
@click.option("--resend-queued", is_flag=True, help="Also send jobs still queued (after the queue itself was lost).")
@click.option(
    "--allow-recipe-change",
    is_flag=True,
    help="Add jobs to an existing run even though its recipe flags differ from its first submit's.",
)
@click.option(
    "--notify",
    metavar="URL",
    callback=lambda _ctx, _param, url: notify_url(url),
    help="POST a signed JSON summary to URL (http/https) once when the run finishes or is cancelled "
    "(signed with DEEPQUEUE_WEBHOOK_SECRET; see the README).",
)
def submit(
    file: Path | None,
    run_id: str | None,
    seed: int | None,
    wait_: bool,
    timeout: float | None,
    resend_queued: bool,
    allow_recipe_change: bool,
    audit_sample: int | None,
    model: str | None,
    priority: str | None,
    weight: float | None,
    max_queued: int | None,
    notify: str | None,
    **flags: Any,
) -> None:
    """Validate FILE (.txt, .jsonl, .csv, .tsv, .json, .parquet; the text ones also .gz) or
    --template and enqueue one job per prompt, streaming: memory stays flat whatever its size.
    A row with a template (a "template" column) stands for the prompts it expands to.

    Submitting a run again sends only its new and failed jobs (and, with --resend-queued, the
    queued ones). A run keeps the recipe flags of its first submit: a submit of the same run
    with others is refused, unless --allow-recipe-change. Runs share the workers by --priority
    (strictly) and --weight (in proportion); deepqueue run-set changes them while a run runs.
    """
    prompts = PromptInput.take(file, flags)
    defaults = recipe_defaults(**flags) | ({"model": model} if model else {})
    if audit_sample and not wait_:
        raise click.UsageError("--audit needs --wait (or run `deepqueue audit RUN --sample K` once the run is done)")
    with Client() as client:
        new, run_id = run_id is None, run_id_or_new(run_id)
        named = f"run {run_id} (a new name: pass --run {run_id} to resume it, or follow it with deepqueue wait)"
        try:
            run = client.submit(
                prompts.source,
                run=run_id,
                seed=seed,
                progress=True,
                resend_queued=resend_queued,
                allow_recipe_change=allow_recipe_change,
                priority=priority,
                weight=weight,
                max_queued=max_queued,
                notify=notify,
                **prompts.expansion(),
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
        queue = client.model_queue(model)
        if model and not client.workers(queue=queue):
            click.echo(
                f"no worker serves model {model!r} (queue {queue!r}) now: the jobs wait there until one starts "
                f"with DEEPQUEUE_MODEL_ALIAS={model}",
                err=True,
            )
        if wait_:
            finish_run(client, run, timeout, audit_sample=audit_sample)


def notify_url(url: str | None) -> str | None:
    """``--notify``'s check, before anything is read or sent."""
    try:
        return None if url is None else checked_url(url)
    except NotifyError as error:
        raise click.BadParameter(str(error).removeprefix("notify: "), param_hint="'--notify'") from None


@click.command()
@click.argument("run_id")
@click.option("--timeout", type=click.FloatRange(min=0), help="Give up after this many seconds.")
def wait(run_id: str, timeout: float | None) -> None:
    """Wait for RUN_ID to finish, with a progress bar; exit 1 if any job failed."""
    with Client() as client:
        finish_run(client, client.run(run_id), timeout)


def finish_run(client: Client, run: Run, timeout: float | None, *, audit_sample: int | None = None) -> None:
    """Wait for ``run`` with a progress bar, print its summary (and audit), list failures; exit 1 if any."""
    queue = client.run_queue(run.run_id)
    if not run.status().is_finished and not client.workers(queue=queue):
        click.echo(
            f"no worker of queue {queue!r} has renewed its leases in the last {WORKER_GONE_S:.0f} s: start one "
            f"(deepqueue worker), or the run will not progress",
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
