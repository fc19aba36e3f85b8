"""The job argument of a task message: one job, or a *prompt batch* of jobs sent together.

A prompt batch is one dict: the fields its jobs share (the run, the recipe, the shape) once,
and ``jobs``, each job's own fields (its position, seed and prompt, and whatever else differs)::

    {"run_id": "r1", "height": 512, ..., "jobs": [{"index": 0, "seed": 7, "prompt": "a cat"}, ...]}

so a message of eight jobs costs Redis one envelope and one recipe, not eight. A ``Job`` forbids
a field named ``jobs``, so the two forms cannot be mistaken for each other. The producer sends
the jobs of one run and shape together (``prompt_batches``); the worker unpacks a batch into
its jobs (``unpack``) and validates each on its own, so one bad job fails alone.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from producer.entries import Entry

#: The field of a prompt batch that holds its jobs' own fields.
JOBS = "jobs"
#: JSON text without spaces, non-ASCII as is: how messages carry jobs.
compact_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
#: Jobs a prompt batch may carry (a worker's ``max_batch`` is at most this too).
MAX_JOBS = 64


class PromptBatchError(ValueError):
    """A message that says it is a prompt batch but cannot be one: nothing of it runs."""


def pack(entries: Sequence[Entry]) -> dict[str, Any]:
    """One job's fields, or a prompt batch of several: every field they all share once (for
    jobs of one kind, its shared fields and any of their own that happen to be equal)."""
    if len(entries) == 1:
        return entries[0].fields()
    base, common, fields = _split(entries)
    if not common:
        return {**base, JOBS: fields}
    return {
        **base,
        **common,
        JOBS: [{name: value for name, value in own.items() if name not in common} for own in fields],
    }


def payload_json(entries: Sequence[Entry]) -> str:
    """``pack(entries)`` as JSON text. The usual prompt batch (jobs of one kind with nothing
    else in common) is joined from its kind's JSON and each job's (``Entry.own_json``): dumping
    it whole cost more than the rest of a submit."""
    if len(entries) > 1:
        base, common, _ = _split(entries)
        if not common and base is entries[0].kind.shared:
            jobs = ",".join(entry.own_json() for entry in entries)
            return f'{entries[0].kind.shared_json[:-1]},"{JOBS}":[{jobs}]}}'
    return compact_json(pack(entries))


def _split(entries: Sequence[Entry]) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(fields the kind gives all of them, their other fields in common, each one's fields)."""
    first = entries[0]
    if all(entry.kind is first.kind for entry in entries):
        base, fields = first.kind.shared, [entry.own for entry in entries]
    else:
        base, fields = {}, [entry.fields() for entry in entries]
    rest = fields[1:]
    common = {name: value for name, value in fields[0].items() if all(other.get(name, ...) == value for other in rest)}
    return base, common, fields


def unpack(payload: Any) -> list[Any] | None:
    """The jobs of a prompt batch, each as one job's fields (not validated: the worker checks
    each), or None when ``payload`` is not a batch (it is then checked as one job). Raises
    PromptBatchError for a batch that holds no jobs or more than ``MAX_JOBS``."""
    if not isinstance(payload, dict) or JOBS not in payload:
        return None
    entries = payload[JOBS]
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_JOBS:
        what = f"{len(entries)} jobs" if isinstance(entries, list) else f"a {type(entries).__name__}"
        raise PromptBatchError(f"a prompt batch holds a list of 1 to {MAX_JOBS} jobs, this one {what}")
    shared = {name: value for name, value in payload.items() if name != JOBS}
    return [{**shared, **entry} if isinstance(entry, dict) else entry for entry in entries]


def batch_task_id(entries: Sequence[Entry]) -> str:
    """The task id of a message: its job's id, or for a batch the first job's and how many follow
    (``00000008-3f2a9c1b7d4e+7``), so that logs and dead letters point at the run's jobs."""
    first = entries[0].job_id
    return first if len(entries) == 1 else f"{first}+{len(entries) - 1}"


def prompt_batches(entries: Iterable[Entry], size: int) -> Iterator[list[Entry]]:
    """``entries`` in order, cut into messages of at most ``size`` neighbours of one run, model
    and shape (``producer.job.shape``): what a worker can batch together, so a message rarely
    splits. Send jobs of one shape next to each other (``grouped_by_shape``) to fill them."""
    for _, same in itertools.groupby(
        entries, key=lambda entry: (entry.kind.run_id, entry.kind.model, entry.kind.shape)
    ):
        while chunk := list(itertools.islice(same, size)):
            yield chunk
