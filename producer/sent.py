"""The jobs as sent, kept in the run's storage rather than in Redis: what ``Client.retry`` and
``Client.resume`` send again, and where ``deepqueue results`` finds each job's prompt.

A submit writes each chunk of jobs it claimed, before publishing them, as one gzipped JSON-lines
object ``{prefix}/{run}/jobs/{first index:09d}-{last index:09d}-{token}.jsonl.gz``
(``producer.layout.sent_key``): a few tens of bytes per job, against ~320 in Redis. Producers
racing one run each write what they claimed, under their own token.
"""

from __future__ import annotations

import bisect
import gzip
import json
import re
import secrets
import time
from collections.abc import Iterable, Sequence

from producer.job import Job
from producer.layout import sent_key, sent_prefix
from producer.spill import job_index
from producer.storage import Storage

_NAME = re.compile(r"(\d{9})-(\d{9})-[0-9a-z]+\.jsonl\.gz$")


def write_sent(storage: Storage, prefix: str, run_id: str, jobs: Sequence[Job]) -> None:
    """Keep ``jobs`` (of one run, as they are sent) as one object; StorageError if it fails."""
    if not jobs:
        return
    indexes = [job.index for job in jobs]
    token = f"{time.time_ns():x}{secrets.token_hex(4)}"
    body = gzip.compress(
        "".join(job.model_dump_json(exclude_none=True) + "\n" for job in jobs).encode(), compresslevel=5
    )
    key = sent_key(prefix, run_id, min(indexes), max(indexes), token)
    storage.put(key, body, content_type="application/gzip", metadata={})


class SentJobs:
    """Reads a run's kept jobs by id. The objects are listed once; each is read when a job it
    may hold is asked for, and the last few read are kept (ask in index order to read each once)."""

    KEPT = 4

    def __init__(self, storage: Storage, prefix: str, run_id: str) -> None:
        self._storage = storage
        spans = sorted(
            (int(match.group(1)), int(match.group(2)), key)
            for key, _ in storage.list(sent_prefix(prefix, run_id))
            if (match := _NAME.search(key))
        )
        self._firsts = [first for first, _, _ in spans]
        self._spans = spans
        self._widest = max((last - first for first, last, _ in spans), default=0)
        self._read: dict[str, dict[str, str]] = {}

    def find(self, job_ids: Iterable[str]) -> dict[str, str]:
        """The jobs as sent (JSON) of those of ``job_ids`` that were kept."""
        found: dict[str, str] = {}
        for job_id in job_ids:
            index = job_index(job_id)
            # The objects that may hold it: those that begin at or before it, back as far as the widest reaches.
            at = bisect.bisect_right(self._firsts, index) - 1
            while at >= 0 and self._spans[at][0] + self._widest >= index:
                first, last, key = self._spans[at]
                if index <= last and job_id in (lines := self._lines(key)):
                    found[job_id] = lines[job_id]
                    break
                at -= 1
        return found

    def _lines(self, key: str) -> dict[str, str]:
        if key not in self._read:
            if len(self._read) >= self.KEPT:
                del self._read[next(iter(self._read))]
            lines = gzip.decompress(self._storage.get(key)).decode().splitlines()
            self._read[key] = {Job.model_validate_json(line).job_id: line for line in lines}
        return self._read[key]


def prompts(found: dict[str, str], job_ids: Iterable[str]) -> list[str | None]:
    """Each job's prompt from ``SentJobs.find``'s answer (None: not kept)."""
    return [json.loads(found[job_id])["prompt"] if job_id in found else None for job_id in job_ids]
