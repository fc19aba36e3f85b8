"""Flags, defaults and the input error the ``deepqueue`` commands share, so that each flag is
declared once and reads the same in every command's --help."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from pydantic_settings import BaseSettings

from producer.errors import PromptFileError
from producer.exits import EXIT_BAD_INPUT
from producer.fair import PRIORITIES
from producer.job import ImageFormat, JobDefaults, SchedulerName
from producer.loras import MAX_LORAS, MAX_SCALE, MIN_SCALE
from producer.sources import parse_size
from producer.templates import MAX_PROMPTS

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


#: ``--wait`` and its ``--timeout``, for the commands that can follow the run they start.
WAIT_FLAGS = [
    click.option("--wait", "wait_", is_flag=True, help="Wait for the run to finish, with a progress bar."),
    click.option("--timeout", type=click.FloatRange(min=0), help="With --wait: give up after this many seconds."),
]


#: A run's share of the workers against other runs (``producer.fair``).
SHARE_FLAGS = [
    click.option(
        "--priority",
        type=click.Choice(PRIORITIES),
        help="Priority class: every queued job of a higher class goes before a lower one's [default: normal].",
    ),
    click.option(
        "--weight",
        type=click.FloatRange(0.001, 1000),
        metavar="W",
        help="Share within its class: runs get jobs in proportion to their weights [default: 1].",
    ),
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
            "--lora",
            "lora",
            multiple=True,
            metavar="ID[:SCALE]",
            help=f"A LoRA adapter (Hub id, or a folder or .safetensors file the workers can read) and its "
            f"scale ({MIN_SCALE:g} to {MAX_SCALE:g}, default 1); repeat for up to {MAX_LORAS}.",
        ),
        click.option(
            "--run",
            "run_id",
            help="Run name (default: generated). Reusing one resumes it, with the same recipe flags.",
        ),
        click.option(
            "--scores",
            metavar="LIST",
            help="Quality scores for every image, comma-separated: phash, clip, nsfw (on top of the workers' "
            "DEEPQUEUE_SCORES); manifest columns phash, clip_score, nsfw and duplicate_of. Not part of the recipe.",
        ),
        *TEMPLATE_FLAGS,
        click.argument("file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path)),
    ]
    return with_flags(*options)(command)


#: How prompts come from a template (``producer.templates``): ``--template`` instead of FILE,
#: and how any template (also a ``template`` column of FILE) expands.
TEMPLATE_FLAGS = [
    click.option(
        "--template",
        metavar="TEMPLATE",
        help="A prompt template instead of FILE, e.g. 'a {red|blue} {car|bike} at __times__' "
        "(dynamicprompts syntax): one job per prompt it expands to.",
    ),
    click.option(
        "--wildcards",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="Folder of wildcard files: __times__ takes a line of times.txt.",
    ),
    click.option("--combinatorial", is_flag=True, help="Every combination of each template [the default]."),
    click.option(
        "--samples",
        type=click.IntRange(1, MAX_PROMPTS),
        metavar="N",
        help="N prompts of each template drawn at random (from the run seed: a resubmit draws the same).",
    ),
]


@dataclass(frozen=True)
class PromptInput:
    """Where a command's prompts come from: FILE or ``--template``, and how templates expand."""

    source: Path | list[dict[str, str]]
    samples: int | None
    wildcards: Path | None

    @classmethod
    def take(cls, file: Path | None, flags: dict[str, Any]) -> PromptInput:
        """The prompt input of a command's FILE and flags, taking the template flags out of ``flags``."""
        template, samples = flags.pop("template"), flags.pop("samples")
        if flags.pop("combinatorial") and samples is not None:
            raise click.UsageError("--combinatorial or --samples N, not both")
        if (file is None) == (template is None):
            raise click.UsageError("give a prompt FILE or --template, one of them")
        source = file if file is not None else [{"template": template}]
        return cls(source=source, samples=samples, wildcards=flags.pop("wildcards"))

    def expansion(self) -> dict[str, Any]:
        """The template arguments of ``Client.submit`` and ``Client.prepare``."""
        return {"samples": self.samples, "wildcards": self.wildcards}


def recipe_defaults(
    size: str | None, negative: str | None, fmt: str | None, lora: tuple[str, ...] = (), **flags: Any
) -> dict[str, Any]:
    """CLI flags -> Job defaults, leaving out what the user did not set."""
    defaults = {key: value for key, value in flags.items() if value is not None}
    if lora:
        defaults["loras"] = list(lora)
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


def settings_help(settings: type[BaseSettings], *, leave_out: type[BaseSettings] | None = None) -> str:
    """Every DEEPQUEUE_* variable of ``settings`` with its default and description, for --help."""
    skip = set(leave_out.model_fields) if leave_out else set()
    lines = ["\b", "Settings (environment variables):"]
    for name, info in settings.model_fields.items():
        if name not in skip:
            default = "unset" if info.default is None else info.default
            lines.append(f"  DEEPQUEUE_{name.upper()}={default}  {info.description or ''}".rstrip())
    return "\n".join(lines)
