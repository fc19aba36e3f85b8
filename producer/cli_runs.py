"""``deepqueue`` run management: status, runs, cancel, resume, retry, delete and prune."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import click

from producer.cli_options import SHARE_FLAGS, WAIT_FLAGS, with_flags
from producer.cli_submit import finish_run
from producer.client import Client
from producer.notify_state import NotifyState
from producer.state import RunStatus, format_duration


@click.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: counts per state, rate, ETA, workers.")
def status(run_id: str, as_json: bool) -> None:
    """RUN_ID's jobs per state, images/s (the last 5 minutes; overall once finished), ETA and
    the workers online that serve it (its model's)."""
    with Client() as client:
        current = replace(client.run(run_id).status(), workers=len(client.workers(queue=client.run_queue(run_id))))
        share = client.share(run_id)
        notified = client.notify_state(run_id)
        if as_json:
            record = {**status_record(current), "priority": share.priority, "weight": share.weight}
            click.echo(json.dumps(record | ({} if notified is None else {"notify": notify_record(notified)})))
        else:
            click.echo(f"{current}; priority {share.priority}, weight {share.weight:g}")
            if notified is not None:
                click.echo(str(notified))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def runs(as_json: bool) -> None:
    """Every run, oldest first (also those sent by a plain Celery producer): its jobs per state, rate and age."""
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


def notify_record(notified: NotifyState) -> dict[str, Any]:
    """A run's webhook in ``status --json``: its outcome and tries (the URL is left out: it may hold a token)."""
    outcome = "delivered" if notified.delivered_at else "failed" if notified.failed_at else None
    outcome = outcome or ("sending" if notified.sending else "waiting")
    return {"state": outcome, "event": notified.event, "tries": notified.tries, "last": notified.last}


@click.command("run-set")
@click.argument("run_id")
@with_flags(*SHARE_FLAGS)
def run_set(run_id: str, priority: str | None, weight: float | None) -> None:
    """Change RUN_ID's --priority or --weight while it runs: workers use them from the next
    message they take (jobs they hold already keep their place)."""
    if priority is None and weight is None:
        raise click.UsageError("nothing to change: pass --priority and/or --weight")
    with Client() as client:
        share = client.set_share(run_id, priority=priority, weight=weight)
    click.echo(f"run {run_id}: priority {share.priority}, weight {share.weight:g}")


@click.command()
@click.argument("run_id")
def cancel(run_id: str) -> None:
    """Cancel RUN_ID: its queued jobs end cancelled without being generated (workers drop their
    messages as they reach them); running jobs finish. A cancelled run takes no new jobs until it
    is resumed (deepqueue resume). A run submitted with --notify is notified now."""
    with Client() as client:
        cancelled = client.cancel(run_id)
        click.echo(f"run {run_id}: {cancelled} queued jobs cancelled; {client.run(run_id).status()}")
        notified = client.notify_state(run_id)
        if notified is not None:
            click.echo(str(notified))


@click.command()
@click.argument("run_id")
@with_flags(*WAIT_FLAGS)
def resume(run_id: str, wait_: bool, timeout: float | None) -> None:
    """Take back a cancel of RUN_ID: its cancelled jobs are sent again and run; it takes new jobs
    again. Done, failed and running jobs stay as they are."""
    with Client() as client:
        run = client.resume(run_id, progress=True)
        click.echo(f"run {run.run_id} resumed: {run.submitted} cancelled jobs sent again")
        if wait_:
            finish_run(client, run, timeout)


@click.command()
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


@click.command()
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


@click.command()
@click.argument("run_id")
@with_flags(*WAIT_FLAGS)
def retry(run_id: str, wait_: bool, timeout: float | None) -> None:
    """Send again every job of RUN_ID that is not done: queued, failed, or running on a worker
    that is gone. Jobs running on a live worker are left to it."""
    with Client() as client:
        run = client.retry(run_id, progress=True)
        click.echo(f"run {run.run_id}: {run.submitted} jobs sent again")
        if run.skipped:
            click.echo(f"{run.skipped} jobs not done predate kept jobs: submit their file again")
        if wait_:
            finish_run(client, run, timeout)
