"""The ``deepqueue`` commands that run worker code: ``worker``, ``run`` (embedded) and
``make-test-model``. The only place ``producer`` imports ``worker``, inside each command, so
that the rest of the CLI installs and runs without torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from producer.cli_options import (
    CACHE_FLAGS,
    ENGINE_FLAGS,
    InputError,
    PromptInput,
    recipe_defaults,
    recipe_options,
    settings_help,
    with_flags,
)
from producer.settings import ClientSettings


class SettingsEpilog(click.Command):
    """A command whose --help ends with the settings it reads (built only when asked for)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from worker.settings import WorkerSettings

        formatter.write("\n" + settings_help(WorkerSettings, leave_out=ClientSettings).removeprefix("\b\n") + "\n")


@click.command(cls=SettingsEpilog, context_settings={"ignore_unknown_options": True})
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


@click.command("run")
@recipe_options
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder."
)
@with_flags(*ENGINE_FLAGS)
def run_embedded(
    file: Path | None,
    run_id: str | None,
    seed: int | None,
    out_dir: Path,
    model: str | None,
    device: str | None,
    max_batch: int | None,
    **flags: Any,
) -> None:
    """Generate the prompts of FILE or --template in this process, no servers: images and
    sidecars under --out."""
    from worker.cli import run_local

    prompts = PromptInput.take(file, flags)
    overrides = {"model": model, "device": device, "max_batch": max_batch, "output_dir": out_dir}
    run_local(prompts, run_id=run_id, seed=seed, defaults=recipe_defaults(**flags), overrides=overrides)


@click.command("make-test-model")
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


@click.command("make-test-lora")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The saved model the LoRA is for (a make-test-model folder).",
)
@click.option("--seed", type=int, default=0, show_default=True)
def make_test_lora(directory: Path, model_dir: Path, seed: int) -> None:
    """Build a random-weight LoRA for MODEL in DIRECTORY (offline; submit it with --lora DIRECTORY)."""
    from worker.pipeline.testlora import build_test_lora

    try:
        path = build_test_lora(model_dir, directory, seed=seed)
    except FileExistsError as error:
        raise InputError(str(error)) from error
    click.echo(f"wrote a LoRA for {model_dir} to {path}")
