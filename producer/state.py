"""Per-job state in Redis, written by producer and worker, read by the client.

Layout (``{run}`` is a Redis Cluster hash tag, so one run's keys live together):

- ``deepqueue:{run}:jobs``   hash  job_id -> JSON record (state, at, and key/reason/...)
- ``deepqueue:{run}:<state>`` set   job ids currently in that state (O(1) counts)
- ``deepqueue:runs``          zset  run ids by first submission time

Every transition is one Lua call, so the record and the sets never disagree. ``done`` is
final: a redelivered job can neither turn a finished job back into ``running`` or ``failed``
nor replace its record (which matches the write-once sidecar).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import redis


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


STATES = tuple(JobState)
RUNS_KEY = "deepqueue:runs"

# KEYS: jobs hash, then one set per state in STATES order. ARGV: job_id, new state, record.
# Returns 1 if the transition happened, 0 if the current state forbids it.
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
local old = current and cjson.decode(current)['state'] or false
local new = ARGV[2]
if old == 'done' then return 0 end
if new == 'queued' and old == 'running' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
local sets = {queued = KEYS[2], running = KEYS[3], done = KEYS[4], failed = KEYS[5]}
if old and old ~= new then redis.call('SREM', sets[old], ARGV[1]) end
redis.call('SADD', sets[new], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class JobResult:
    """What the client learns about one job."""

    job_id: str
    state: JobState
    key: str | None = None
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    counts: dict[JobState, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        return self.counts[JobState.DONE] + self.counts[JobState.FAILED]

    @property
    def is_finished(self) -> bool:
        return self.finished == self.total

    def __str__(self) -> str:
        parts = ", ".join(f"{state.value} {self.counts[state]}" for state in STATES)
        return f"{self.run_id}: {self.total} jobs ({parts})"


def _keys(run_id: str) -> list[str]:
    base = f"deepqueue:{{{run_id}}}"
    return [f"{base}:jobs", *(f"{base}:{state.value}" for state in STATES)]


class RunStore:
    """Thin layer over a Redis client it is given."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._transition = client.register_script(_TRANSITION)

    @classmethod
    def from_url(cls, url: str) -> RunStore:
        return cls(redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10))

    def mark(self, run_id: str, job_id: str, state: JobState, **details: Any) -> bool:
        """Move one job to ``state``; False if its current state forbids that."""
        return bool(self._transition(keys=_keys(run_id), args=self._args(job_id, state, details)))

    def states(self, run_id: str, job_ids: Sequence[str]) -> list[JobState | None]:
        """Each job's state (None: never submitted), in one round trip."""
        raws = self._redis.hmget(_keys(run_id)[0], job_ids) if job_ids else []
        return [None if raw is None else JobState(json.loads(raw)["state"]) for raw in raws]

    def mark_queued(self, run_id: str, job_ids: Iterable[str]) -> None:
        """Mark sent jobs queued in one round trip (those a worker already took stay as they are)."""
        self._redis.zadd(RUNS_KEY, {run_id: time.time()}, nx=True)
        pipe = self._redis.pipeline(transaction=False)
        keys = _keys(run_id)
        for job_id in job_ids:
            self._transition(keys=keys, args=self._args(job_id, JobState.QUEUED, {}), client=pipe)
        pipe.execute()

    def counts(self, run_id: str) -> dict[JobState, int]:
        pipe = self._redis.pipeline(transaction=False)
        for key in _keys(run_id)[1:]:
            pipe.scard(key)
        return dict(zip(STATES, pipe.execute(), strict=True))

    def exists(self, run_id: str) -> bool:
        """Submitted by a client, or named by a job a worker recorded (hand-made messages too)."""
        return self._redis.zscore(RUNS_KEY, run_id) is not None or bool(self._redis.exists(_keys(run_id)[0]))

    def runs(self) -> list[str]:
        return [name.decode() for name in self._redis.zrange(RUNS_KEY, 0, -1)]

    def get(self, run_id: str, job_id: str) -> JobResult | None:
        raw = self._redis.hget(_keys(run_id)[0], job_id)
        return None if raw is None else _result(job_id, raw)

    def results(self, run_id: str) -> Iterator[JobResult]:
        """Every job of the run, streamed (HSCAN), in no particular order."""
        for job_id, raw in self._redis.hscan_iter(_keys(run_id)[0], count=1000):
            yield _result(job_id.decode(), raw)

    @staticmethod
    def _args(job_id: str, state: JobState, details: dict[str, Any]) -> list[str]:
        record = {"state": state.value, "at": time.time(), **details}
        return [job_id, state.value, json.dumps(record)]


def _result(job_id: str, raw: bytes) -> JobResult:
    record = json.loads(raw)
    return JobResult(
        job_id=job_id,
        state=JobState(record.pop("state")),
        key=record.pop("key", None),
        reason=record.pop("reason", None),
        details=record,
    )
