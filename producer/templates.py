"""Prompt templates and wildcards (the ``dynamicprompts`` syntax Stable Diffusion users write):
a row with a ``template`` instead of a ``prompt`` becomes one row per prompt it expands to.

``a {red|blue} {car|bike} at __times__`` gives every combination (``Expansion()``), or
``samples`` of them drawn at random from the run seed (``Expansion(samples=N, seed=...)``).
Each expanded row keeps the row's other fields and records ``template`` and ``variables``: the
value chosen for each part of the template, named by the wildcard (``times``), the variable
(``${season}``) or the variant's place among the template's variants (``v1``, ``v2``, ...), so a
dataset can be filtered by them.

Expansion is a generator (a template of 10M prompts costs no more memory than one of ten) and
deterministic (the same template, wildcard files and seed give the same rows in the same order),
so a resubmit names the same jobs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from producer.errors import PromptFileError, RowProblem
from producer.job import check_run

if TYPE_CHECKING:
    from dynamicprompts.commands import Command
    from dynamicprompts.sampling_context import SamplingContext

#: Prompts one template may give at most, combinations or samples (``producer.job.MAX_INDEX``).
MAX_PROMPTS = 10**9


@dataclass(frozen=True)
class Expansion:
    """How template rows expand: every combination (``samples`` None) or ``samples`` random
    draws per template, seeded by ``seed``; ``wildcards`` is the folder of ``__name__`` files."""

    samples: int | None = None
    wildcards: Path | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples is not None and not 1 <= self.samples <= MAX_PROMPTS:
            raise PromptFileError(f"samples: a whole number from 1 to {MAX_PROMPTS}, got {self.samples}")
        if self.wildcards is not None and not Path(self.wildcards).is_dir():
            raise PromptFileError(f"wildcards: {self.wildcards} is not a folder")


def run_expansion(
    run_id: str, run_seed: int | None, samples: int | None, wildcards: str | os.PathLike | None
) -> Expansion:
    """The expansion of a run's template rows: random draws seeded by the run seed, so that a
    resubmit draws the same prompts (InvalidJobError for a bad run name or seed)."""
    folder = Path(wildcards) if wildcards else None
    return Expansion(samples=samples, wildcards=folder, seed=check_run(run_id, run_seed))


class TemplateError(ValueError):
    """A template that cannot be expanded: bad syntax, an unknown wildcard, nothing to give."""


def expand_rows(rows: Iterable[tuple[str, Any]], expansion: Expansion) -> Iterator[tuple[str, Any]]:
    """``rows`` with each template row replaced by the rows of its prompts (``where`` then names
    the prompt too: ``line 3 of p.csv, prompt 12``); a template that cannot expand is one
    problem row (a ``str``, as ``producer.sources`` reports rows that are no job)."""
    expander: _Expander | None = None
    for number, (where, fields) in enumerate(rows):
        if not isinstance(fields, dict) or ("template" not in fields and "variables" not in fields):
            yield where, fields
            continue
        problem = _row_problem(fields)
        if problem:
            yield where, RowProblem(problem)
            continue
        expander = expander or _Expander(expansion)
        own = {name: value for name, value in fields.items() if name != "template"}
        try:
            prompts = expander.expand(fields["template"], _row_seed(expansion.seed, number))
            first = next(prompts, None)
            if first is None:
                raise TemplateError("it expands to no prompt")
        except TemplateError as error:
            yield where, RowProblem(f"template: {error}")
            continue
        for k, (prompt, variables) in enumerate(chain([first], prompts)):
            fields_k = {**own, "prompt": prompt, "template": fields["template"], "variables": variables}
            yield f"{where}, prompt {k}", fields_k


def _row_problem(fields: dict[str, Any]) -> str | None:
    if "template" not in fields:
        return "variables: set by a template, not by a row"
    if "variables" in fields:
        return "variables: set by the template, not by a row"
    if "prompt" in fields:
        return "give a prompt or a template, not both"
    if not isinstance(fields["template"], str) or not fields["template"].strip():
        return f"template: a non-blank string is needed, got {fields['template']!r}"
    return None


def _row_seed(seed: int, number: int) -> int:
    """A template row's own random stream: rows drawn from one run seed stay independent."""
    return int.from_bytes(hashlib.sha256(f"{seed}:template:{number}".encode()).digest()[:8], "big")


class _Expander:
    """Parses and samples templates with dynamicprompts, naming each part's chosen value."""

    def __init__(self, expansion: Expansion) -> None:
        from dynamicprompts.enums import SamplingMethod
        from dynamicprompts.sampling_context import SamplingContext
        from dynamicprompts.wildcards import WildcardManager

        self._expansion = expansion
        method = SamplingMethod.COMBINATORIAL if expansion.samples is None else SamplingMethod.RANDOM
        self._context = SamplingContext(
            wildcard_manager=WildcardManager(expansion.wildcards),
            default_sampling_method=method,
        )

    def expand(self, template: str, seed: int) -> Iterator[tuple[str, dict[str, str]]]:
        """``(prompt, variables)`` for each prompt of ``template``, lazily."""
        context = dataclasses.replace(self._context, rand=random.Random(seed))
        tokens, context = context.process_variable_assignments(self._parts(template))
        self._check_wildcards(tokens)
        names = _part_names(tokens)
        if self._expansion.samples is None:
            draws = _combinations(context, tokens)
        else:
            draws = (_sample(context, tokens) for _ in range(self._expansion.samples))
        for values in islice(draws, MAX_PROMPTS):
            variables = {name: value for name, value in zip(names, values, strict=True) if name is not None}
            yield "".join(values).strip(), variables

    def _parts(self, template: str) -> list[Command]:
        from dynamicprompts.commands import SequenceCommand
        from dynamicprompts.parser.parse import parse

        try:
            command = parse(template, parser_config=self._context.parser_config)
        except Exception as error:  # pyparsing's ParseException and friends
            raise TemplateError(f"not valid template syntax ({error})") from error
        return list(command.tokens) if isinstance(command, SequenceCommand) else [command]

    def _check_wildcards(self, tokens: list[Command]) -> None:
        """Refuse an unknown ``__name__`` (dynamicprompts would write it into the prompt as is)."""
        manager = self._context.wildcard_manager
        for name in sorted(_wildcards(tokens)):
            if not manager.get_values(name):
                where = f"in {manager.path}" if manager.path else "(no wildcards folder given: --wildcards DIR)"
                raise TemplateError(f"no values for wildcard __{name}__ {where}")


def _combinations(context: SamplingContext, tokens: list[Command]) -> Iterator[list[str]]:
    """Every combination of the parts' values, the first part changing slowest (as
    dynamicprompts' combinatorial sampler orders them); a part sampled at random (``{~a|b}``)
    takes its next draw for each combination."""
    if not tokens:
        yield []
        return
    first, rest = tokens[0], tokens[1:]
    values = context.generator_from_command(first)
    if context.get_effective_sampling_method(first).is_nonfinite():
        for tail in _combinations(context, rest):
            yield [str(next(values)), *tail]
        return
    for value in values:
        for tail in _combinations(context, rest):
            yield [str(value), *tail]


def _sample(context: SamplingContext, tokens: list[Command]) -> list[str]:
    return [str(next(iter(context.generator_from_command(token)))) for token in tokens]


def _part_names(tokens: list[Command]) -> list[str | None]:
    """The name of each part's value in ``variables``: None for literal text."""
    from dynamicprompts.commands import LiteralCommand, VariantCommand, WildcardCommand
    from dynamicprompts.commands.variable_commands import VariableAccessCommand

    names: list[str | None] = []
    seen: Counter[str] = Counter()
    variants = 0
    for token in tokens:
        if isinstance(token, LiteralCommand):
            name = None
        elif isinstance(token, WildcardCommand) and isinstance(token.wildcard, str):
            name = token.wildcard
        elif isinstance(token, VariableAccessCommand):
            name = token.name
        elif (
            isinstance(token, VariantCommand)
            and len(token.values) == 1
            and isinstance(token.values[0], WildcardCommand)
            and isinstance(token.values[0].wildcard, str)
        ):
            name = token.values[0].wildcard  # {2$$__colors__}: two of the wildcard's values
        else:
            variants += 1
            name = f"v{variants}"
        if name is not None:  # the same wildcard twice: times, times_2, ...
            seen[name] += 1
            name = name if seen[name] == 1 else f"{name}_{seen[name]}"
        names.append(name)
    return names


def _wildcards(command: Any) -> set[str]:
    """The literal names of every wildcard anywhere in ``command`` (lists, variants, nesting)."""
    from dynamicprompts.commands import Command, WildcardCommand

    if isinstance(command, (list, tuple)):
        return set().union(*(_wildcards(item) for item in command)) if command else set()
    if isinstance(command, WildcardCommand):
        return {command.wildcard} if isinstance(command.wildcard, str) else _wildcards(command.wildcard)
    if isinstance(command, Command) or dataclasses.is_dataclass(command):
        return _wildcards([getattr(command, field.name) for field in dataclasses.fields(command)])
    return set()
