"""A message's jobs, packed: how entries (``producer.entries``) become the job argument a
message carries (``producer.message``: a prompt batch, or one job), and which of them go in
one message."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from producer.entries import Entry
from producer.message import JOBS, compact_json


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


def grouped_by_shape(items: Iterable[Entry]) -> list[Entry]:
    """``items`` with each shape's jobs together, shapes in order of first appearance, each
    shape's jobs in their order."""
    groups: dict[tuple[Any, ...], list[Entry]] = {}
    for entry in items:
        groups.setdefault(entry.kind.shape, []).append(entry)
    return [entry for group in groups.values() for entry in group]
