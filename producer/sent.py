"""The jobs as sent, kept in the run's storage rather than in Redis: what ``Client.retry`` and
``Client.resume`` send again, and where ``deepqueue results`` finds each job's prompt.

A submit writes each chunk of jobs it claimed, before publishing them, as one gzipped JSON-lines
object ``{prefix}/{run}/jobs/{first index:09d}-{last index:09d}-{token}.jsonl.gz``
(``producer.layout.sent_key``), each line the jobs of one message as it carries them
(``producer.packing.pack``; objects written before prompt batches hold a job per line, read the
same way): a few bytes per job, against ~320 in Redis. Producers racing one run
each write what they claimed, under their own token.
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
from producer.message import unpack
from producer.spill import job_index
from producer.storage import Storage

_NAME = re.compile(r"(\d{9})-(\d{9})-[0-9a-z]+\.jsonl\.gz$")


def write_sent(storage: Storage, prefix: str, run_id: str, payloads: Sequence[str], first: int, last: int) -> None:
    """Keep the jobs of ``payloads`` (messages' job arguments, ``producer.enqueue.Message``; of
    one run, indexes ``first`` to ``last``) as one object; StorageError if it fails."""
    if not payloads:
        return
    token = f"{time.time_ns():x}{secrets.token_hex(4)}"
    lines = "\n".join(payloads) + "\n"
    key = sent_key(prefix, run_id, first, last, token)
    storage.put(key, gzip.compress(lines.encode(), compresslevel=1), content_type="application/gzip", metadata={})


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
        self._read: dict[str, dict[str, Job]] = {}

    def find(self, job_ids: Iterable[str]) -> dict[str, Job]:
        """The jobs as sent of those of ``job_ids`` that were kept."""
        found: dict[str, Job] = {}
        for job_id in job_ids:
            index = job_index(job_id)
            # The objects that may hold it: those that begin at or before it, back as far as the widest reaches.
            at = bisect.bisect_right(self._firsts, index) - 1
            while at >= 0 and self._spans[at][0] + self._widest >= index:
                first, last, key = self._spans[at]
                if index <= last and job_id in (jobs := self._jobs(key)):
                    found[job_id] = jobs[job_id]
                    break
                at -= 1
        return found

    def _jobs(self, key: str) -> dict[str, Job]:
        if key not in self._read:
            if len(self._read) >= self.KEPT:
                del self._read[next(iter(self._read))]
            jobs = []
            for line in gzip.decompress(self._storage.get(key)).decode().splitlines():
                payload = json.loads(line)
                jobs.extend(Job.model_validate(fields) for fields in unpack(payload) or [payload])
            self._read[key] = {job.job_id: job for job in jobs}
        return self._read[key]


def prompts(found: dict[str, Job], job_ids: Iterable[str]) -> list[str | None]:
    """Each job's prompt from ``SentJobs.find``'s answer (None: not kept)."""
    return [found[job_id].prompt if job_id in found else None for job_id in job_ids]
