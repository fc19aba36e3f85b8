"""The job argument of a task message: one job, or a *prompt batch* of jobs sent together.

A prompt batch is one dict: the fields its jobs share (the run, the recipe, the shape) once,
and ``jobs``, each job's own fields (its position, seed and prompt, and whatever else differs)::

    {"run_id": "r1", "height": 512, ..., "jobs": [{"index": 0, "seed": 7, "prompt": "a cat"}, ...]}

so a message of eight jobs costs Redis one envelope and one recipe, not eight. A ``Job`` forbids
a field named ``jobs``, so the two forms cannot be mistaken for each other. The producer sends
the jobs of one run and shape together (``producer.packing``); the worker unpacks a batch into
its jobs (``unpack``) and validates each on its own, so one bad job fails alone.
"""

from __future__ import annotations

import json
from typing import Any

#: The field of a prompt batch that holds its jobs' own fields.
JOBS = "jobs"
#: JSON text without spaces, non-ASCII as is: how messages carry jobs.
compact_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
#: Jobs a prompt batch may carry (a worker's ``max_batch`` is at most this too).
MAX_JOBS = 64


class PromptBatchError(ValueError):
    """A message that says it is a prompt batch but cannot be one: nothing of it runs."""


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
