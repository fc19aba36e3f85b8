"""Jobs on their way to the queue, in the form a submit handles a million of: each job as its
*kind* (what it shares with the run's other jobs: the run, the recipe, the shape; one object for
all of them) and its own few fields (position, seed, prompt; a template's part values).

A ``Job`` costs ~10 µs to validate and ~2 µs to dump; a submit of 100,000 jobs a second has ~10 µs
for everything. So a row that sets only per-job fields (``OWN``), as a prompt file's rows mostly
do, is validated on its own against the very rules ``Job`` applies to those fields
(``producer.job.Prompt``, ``Seed``, ...), and joins the kind of the run's first such row, which
was validated whole. Any other row, or one that fails, goes through ``Job`` itself: its problems
read exactly as before. The job id comes from ``JobIds``, the recipe's canonical JSON built once
with holes for the prompt and the seed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Any

from pydantic import TypeAdapter, ValidationError
from typing_extensions import NotRequired, TypedDict

from producer.errors import InvalidJobError
from producer.job import (
    MAX_INDEX,
    RUN_OWNED,
    Job,
    JobDefaults,
    Prompt,
    Seed,
    Template,
    Variables,
    canonical_json,
    check_run,
    derive_seed,
    format_errors,
    hashed_id,
    shape,
)
from producer.message import compact_json

#: Job fields each job has of its own: never part of its kind.
OWN = ("index", "prompt", "seed", "template", "variables")

_PLAIN_OWN = '{"index":%d,"prompt":%s,"seed":%d}'


class _OwnRow(TypedDict):
    """A row of per-job fields only, with ``Job``'s rules for each."""

    prompt: Prompt
    seed: NotRequired[Seed]
    template: NotRequired[Template]
    variables: NotRequired[Variables]


_OWN_ROW = TypeAdapter(_OwnRow)
_OWN_ROW_KEYS = frozenset(_OwnRow.__annotations__)


class JobIds:
    """``producer.job.job_id`` for the jobs of one kind, which differ only in position, prompt
    and seed: the canonical JSON of ``[run_id, index, recipe]`` is cut once around those three,
    so an id costs one string join and one hash instead of a dump of the whole recipe."""

    def __init__(self, run_id: str, recipe: Mapping[str, Any]) -> None:
        names = sorted({*recipe, "prompt", "seed"})
        pieces, text = [], "{"
        for number, name in enumerate(names):
            text += ("," if number else "") + json.dumps(name) + ":"
            if name in ("prompt", "seed"):
                pieces.append(text)
                text = ""
            else:
                text += canonical_json(recipe[name])
        self._head = json.dumps([run_id])[:-1] + ","
        self._before_prompt, self._before_seed = pieces  # "prompt" sorts before "seed"
        self._tail = text + "}]"

    def __call__(self, index: int, prompt: str, seed: int) -> str:
        # json.dumps(prompt) does this for a str, at a fraction of the cost
        text = f"{self._head}{index},{self._before_prompt}{encode_basestring_ascii(prompt)}{self._before_seed}{seed}"
        return hashed_id(index, text + self._tail)


@dataclass(frozen=True, eq=False)
class Kind:
    """What jobs of one run and recipe share: sent once per message, the same object for each."""

    shared: dict[str, Any]  #: their common fields as JSON (None left out): run_id, the recipe
    model: str | None
    shape: tuple[Any, ...]  #: what a worker batches on (``producer.job.shape``)
    ids: JobIds

    @property
    def run_id(self) -> str:
        return self.shared["run_id"]

    @cached_property
    def shared_json(self) -> str:
        return compact_json(self.shared)


class Entry:
    """One job: its kind and its own fields (``OWN``, None left out)."""

    __slots__ = ("_job_id", "kind", "own")

    def __init__(self, kind: Kind, own: dict[str, Any]) -> None:
        self.kind, self.own = kind, own
        self._job_id: str | None = None

    def __repr__(self) -> str:
        return f"Entry({self.kind.run_id!r}, {self.own!r})"

    @property
    def job_id(self) -> str:
        if self._job_id is None:  # asked for by the claim, then by its message's task id
            self._job_id = self.kind.ids(self.own["index"], self.own["prompt"], self.own["seed"])
        return self._job_id

    def own_json(self) -> str:
        """``own`` as JSON text; the usual three fields formatted directly (5x faster)."""
        own = self.own
        if len(own) == 3 and "index" in own and "prompt" in own and "seed" in own:
            return _PLAIN_OWN % (own["index"], encode_basestring(own["prompt"]), own["seed"])
        return compact_json(own)

    def fields(self) -> dict[str, Any]:
        """The job's fields as one message of it would carry them."""
        return {**self.kind.shared, **self.own}

    def job(self) -> Job:
        return Job.model_validate(self.fields())


class Kinds:
    """One ``Kind`` per distinct set of shared fields met: entries of a kind share its object.
    The last ``KEPT`` are remembered (a sweep of a setting per row makes a kind per row)."""

    KEPT = 1024

    def __init__(self) -> None:
        self._kinds: dict[str, Kind] = {}

    def entry(self, job: Job) -> Entry:
        shared = job.model_dump(mode="json", exclude_none=True)
        own = {name: shared.pop(name) for name in OWN if name in shared}
        key = canonical_json(shared)
        kind = self._kinds.get(key)
        if kind is None:
            recipe = {name: value for name, value in job.recipe().items() if name not in ("prompt", "seed")}
            kind = Kind(shared, job.model, shape(job), JobIds(job.run_id, recipe))
            if len(self._kinds) >= self.KEPT:
                del self._kinds[next(iter(self._kinds))]
            self._kinds[key] = kind
        return Entry(kind, own)


def entries_of(jobs: Iterable[Job]) -> list[Entry]:
    """Jobs (sent again, or made by hand) as entries."""
    kinds = Kinds()
    return [kinds.entry(job) for job in jobs]


def entries(
    rows: Iterable[tuple[str, Mapping[str, Any] | str]],
    *,
    run_id: str,
    defaults: JobDefaults,
    run_seed: int | None = None,
) -> Iterator[Entry | list[tuple[str, str]]]:
    """Each ``(where, fields)`` row as an Entry, or as its problems (``(where, message)`` lines).

    ``where`` says where a row came from (``"line 4 of prompts.csv"``); fields that are a string
    are a reason the row is no job at all. Row fields override ``defaults``; a row without
    ``seed`` gets one derived from the run seed and its position. An entry is the job
    ``Job.model_validate`` makes of the row, whichever way it was checked (a property test holds
    them equal).
    """
    base_seed = check_run(run_id, run_seed)
    base = defaults.model_dump(exclude_unset=True)
    kinds = Kinds()
    own_kind: Kind | None = None  # the kind of rows of per-job fields only, once one passed whole
    for index, (where, row) in enumerate(rows):
        if isinstance(row, str):
            yield [(where, row)]
            continue
        if own_kind is not None and row.keys() <= _OWN_ROW_KEYS and index <= MAX_INDEX:
            try:
                own = _OWN_ROW.validate_python(row)
            except ValidationError:
                pass  # Job says what is wrong, as for any row
            else:
                if "seed" not in own:
                    own["seed"] = derive_seed(base_seed, index)
                own = {"index": index, **own}
                if None in own.values():
                    own = {name: value for name, value in own.items() if value is not None}
                yield Entry(own_kind, own)
                continue
        owned = sorted(RUN_OWNED & set(row))
        if owned:  # silently overwritten, a row's own run or position would be lost without a word
            yield [(f"job {index} ({where})", f"{name}: set by the run, not by a row") for name in owned]
            continue
        fields = {**base, **row, "run_id": run_id, "index": index}
        fields.setdefault("seed", derive_seed(base_seed, index))
        try:
            job = Job.model_validate(fields)
        except ValidationError as error:
            yield [(f"job {index} ({where})", line) for line in format_errors(error)]
            continue
        entry = kinds.entry(job)
        if row.keys() <= _OWN_ROW_KEYS:
            own_kind = entry.kind
        yield entry


def make_jobs(
    rows: Iterable[tuple[str, Mapping[str, Any] | str]],
    *,
    run_id: str,
    defaults: JobDefaults,
    run_seed: int | None = None,
) -> list[Job]:
    """Turn rows into validated jobs (see ``entries``), or raise one error naming every problem."""
    jobs: list[Job] = []
    problems: list[tuple[str, str]] = []
    for item in entries(rows, run_id=run_id, defaults=defaults, run_seed=run_seed):
        if isinstance(item, Entry):
            jobs.append(item.job())
        else:
            problems.extend(item)
    refuse_bad_input(problems, 0, len(jobs))
    return jobs


def refuse_bad_input(problems: list[tuple[str, str]], omitted: int, jobs: int) -> None:
    """InvalidJobError if any row was bad, or if the rows made no job at all."""
    if problems:
        raise InvalidJobError(problems, omitted=omitted)
    if not jobs:
        raise InvalidJobError([("input", "no prompts found")])
