"""The worker side of the ``deepqueue`` command (imported only when a worker command runs)."""

from __future__ import annotations

import os
import sys
from typing import Any

import click
from celery import signals

from producer.cli_options import PromptInput
from producer.client import run_id_or_new
from producer.entries import make_jobs
from producer.exits import EXIT_BAD_INPUT, EXIT_CANNOT_SERVE, CommandError
from producer.job import run_defaults
from producer.sources import read_rows
from producer.templates import run_expansion
from worker.pipeline.model import ModelError, check_pipeline_class, read_model_index
from worker.settings import WorkerSettings


def _settings(**overrides: Any) -> WorkerSettings:
    return WorkerSettings(**{key: value for key, value in overrides.items() if value is not None})


def check_model(settings: WorkerSettings, *, exit_code: int = EXIT_CANNOT_SERVE) -> None:
    """Fail with ``exit_code`` (a worker's: it cannot serve) before starting anything if the model
    has no diffusers config of a served pipeline.

    Reads ``model_index.json`` only: the worker's main process must not import diffusers.
    """
    try:
        check_pipeline_class(settings.model, read_model_index(settings.model, settings.model_revision))
    except ModelError as error:
        raise CommandError(
            f"{error} (--model or DEEPQUEUE_MODEL)\n"
            "Build an offline test model with: deepqueue make-test-model DIR --arch tiny",
            exit_code,
        ) from error


def node_name(name: str | None, host: str | None) -> str:
    """The Celery node name ``NAME@HOST`` a worker takes unless given ``--hostname``.

    ``name`` (DEEPQUEUE_WORKER_NAME: ``gpu0`` in docker compose, the pod's name in Kubernetes)
    defaults to ``worker``; ``host`` (DEEPQUEUE_HOST: the machine's name; the node's name in
    Kubernetes) to ``%h``, which Celery expands to this container's or machine's hostname.
    So each host's GPU-0 worker is ``gpu0@node-a``, ``gpu0@node-b``: unique across hosts and
    readable. Leases add a random part of their own (``worker.delivery.leases``), so two workers never
    share one even when their node names collide.
    """
    return f"{(name or '').strip() or 'worker'}@{(host or '').strip() or '%h'}"


def _names_node(extra: list[str]) -> bool:
    """Whether the extra ``celery worker`` arguments set the node name themselves."""
    return any(arg in ("-n", "--hostname") or arg.startswith(("-n", "--hostname=")) for arg in extra)


def start_worker(*, overrides: dict[str, Any], loglevel: str, extra: list[str]) -> None:
    """Run a worker until it stops; ``overrides`` (the command's flags) take precedence over
    DEEPQUEUE_* (None values are left out). A model it cannot serve exits 70 at once."""
    # A second guard besides worker.readiness: torch, if something imported it here after all,
    # then checks CUDA through NVML, which leaves a forked pool process able to use CUDA.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    from worker.app import create_app

    settings = _settings(**overrides)
    check_model(settings)
    app = create_app(settings)
    # prefork: the pipeline lives in a child process, so a crash there requeues its batch at
    # once (task_reject_on_worker_lost) and the parent keeps acking and heartbeating.
    argv = [
        "worker",
        "--pool=prefork",
        "--concurrency=1",
        "--task-events",
        # Gossip (workers watching each other over a fanout) serves nothing here, where leases
        # say which workers live; its restart after every lost connection logged a traceback.
        "--without-gossip",
        f"--loglevel={loglevel}",
        f"--queues={settings.serving_queue}",
        *extra,
    ]
    if not _names_node(extra):
        name, host = os.environ.get("DEEPQUEUE_WORKER_NAME"), os.environ.get("DEEPQUEUE_HOST")
        argv.append(f"--hostname={node_name(name, host)}")
    # app.worker_main drops the worker's exit code; a worker that stops because it cannot
    # build its pipeline must exit non-zero so that its supervisor sees it.
    exit_codes: list[int] = []
    signals.worker_shutdown.connect(lambda sender, **_: exit_codes.append(sender.exitcode or 0), weak=False)
    app.worker_main(argv)
    sys.exit(exit_codes[-1] if exit_codes else 0)


def run_local(
    prompts: PromptInput, *, run_id: str | None, seed: int | None, defaults: dict[str, Any], overrides: dict[str, Any]
) -> None:
    """Embedded mode; ``overrides`` take precedence over DEEPQUEUE_* (None values are left out)."""
    settings = _settings(**overrides, storage="local")
    check_model(settings, exit_code=EXIT_BAD_INPUT)
    from worker.embedded import run_embedded

    run_id = run_id_or_new(run_id)
    jobs = make_jobs(
        read_rows(prompts.source, run_expansion(run_id, seed, prompts.samples, prompts.wildcards)),
        run_id=run_id,
        defaults=run_defaults(defaults),
        run_seed=seed,
    )
    summary = run_embedded(jobs, settings)
    for line in summary.lines():
        click.echo(line)
    if summary.failed:
        raise SystemExit(1)
