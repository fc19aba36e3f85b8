"""Per-job state in Redis, written by producer and worker, read by the client.

Layout (``{run}`` is a Redis Cluster hash tag, so one run's keys live together):

- ``deepqueue:{run}:jobs``   hash  job_id -> JSON record (state, at, and key/reason/...)
- ``deepqueue:{run}:<state>`` set   job ids currently in that state (O(1) counts)
- ``deepqueue:{run}:pending`` hash  job_id -> the job as sent (JSON), until it is done: what
  ``Client.retry`` sends again when a message was lost
- ``deepqueue:{run}:losses``  hash  job_id -> times its pool process died under it (poison jobs)
- ``deepqueue:{run}:recipes`` hash  canonical JSON of a recipe the run was submitted with (its
  run-wide settings and run seed) -> time first seen; one unless a submit allowed a change
- ``deepqueue:runs``          zset  run ids by first submission time

Every transition is one Lua call, so the record and the sets never disagree. ``done`` is
final: a redelivered job can neither turn a finished job back into ``running`` or ``failed``
nor replace its record (which matches the write-once sidecar).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import redis


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"

    def __str__(self) -> str:  # print(result.state) shows "done", not "JobState.DONE"
        return self.value


STATES = tuple(JobState)
RUNS_KEY = "deepqueue:runs"

# KEYS: jobs hash, one set per state in STATES order, pending hash. ARGV: the new state, then for
# each job its id, its record and the job as sent ('' for none; for 'queued', kept in pending until
# the job is done). A job moves unless it is done, or running and asked to be queued again.
# Returns how many moved.
_TRANSITION = """
local new = ARGV[1]
local sets = {queued = KEYS[2], running = KEYS[3], done = KEYS[4], failed = KEYS[5]}
local moved = 0
for i = 2, #ARGV, 3 do
  local id = ARGV[i]
  local current = redis.call('HGET', KEYS[1], id)
  local old = current and cjson.decode(current)['state'] or false
  if old ~= 'done' and not (new == 'queued' and old == 'running') then
    redis.call('HSET', KEYS[1], id, ARGV[i + 1])
    if old and old ~= new then redis.call('SREM', sets[old], id) end
    redis.call('SADD', sets[new], id)
    if new == 'done' then redis.call('HDEL', KEYS[6], id) end
    if ARGV[i + 2] ~= '' then redis.call('HSET', KEYS[6], id, ARGV[i + 2]) end
    moved = moved + 1
  end
end
return moved
"""

#: Jobs per _TRANSITION call when marking many: Redis serves no other client meanwhile.
MARK_BATCH = 500


# KEYS: recipes hash, jobs hash. ARGV: canonical recipe JSON, time, '1' to add it to a run that
# has other recipes. Returns the run's recipes as HGETALL does, after recording this one if the
# run had none; false for a run submitted before recipes were recorded (jobs but no recipes),
# which is left as it was. One call, so two first submits racing record one recipe, not two.
_CLAIM_RECIPE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  if redis.call('EXISTS', KEYS[2]) == 1 then return false end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
elseif ARGV[3] == '1' then
  redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
end
return redis.call('HGETALL', KEYS[1])
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


def _transition_keys(run_id: str) -> list[str]:
    return [*_keys(run_id), f"deepqueue:{{{run_id}}}:pending"]


def _recipes_key(run_id: str) -> str:
    return f"deepqueue:{{{run_id}}}:recipes"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class RunStore:
    """Thin layer over a Redis client it is given."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._transition = client.register_script(_TRANSITION)
        self._claim_recipe = client.register_script(_CLAIM_RECIPE)

    @classmethod
    def from_url(cls, url: str) -> RunStore:
        return cls(redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10))

    def mark(self, run_id: str, job_id: str, state: JobState, **details: Any) -> bool:
        """Move one job to ``state``; False if its current state forbids that."""
        record = json.dumps({"state": state.value, "at": time.time(), **details})
        return bool(self._transition(keys=_transition_keys(run_id), args=[state.value, job_id, record, ""]))

    def states(self, run_id: str, job_ids: Sequence[str]) -> list[JobState | None]:
        """Each job's state (None: never submitted), in one round trip."""
        raws = self._redis.hmget(_keys(run_id)[0], job_ids) if job_ids else []
        return [None if raw is None else JobState(json.loads(raw)["state"]) for raw in raws]

    def mark_queued(self, run_id: str, sent: Mapping[str, str]) -> None:
        """Mark sent jobs (job_id -> the job as sent, JSON) queued, keeping each until it is
        done; those a worker already took stay as they are. One round trip per few thousand."""
        self._redis.zadd(RUNS_KEY, {run_id: time.time()}, nx=True)
        record = json.dumps({"state": JobState.QUEUED.value, "at": time.time()})
        items = list(sent.items())
        pipe = self._redis.pipeline(transaction=False)
        for start in range(0, len(items), MARK_BATCH):
            args = [value for job_id, job in items[start : start + MARK_BATCH] for value in (job_id, record, job)]
            self._transition(keys=_transition_keys(run_id), args=[JobState.QUEUED.value, *args], client=pipe)
        pipe.execute()

    def pending(self, run_id: str, job_ids: Sequence[str]) -> list[str | None]:
        """The jobs as sent (JSON) of these unfinished jobs; None where none was kept (a job
        submitted before they were kept, or done)."""
        raws = self._redis.hmget(_transition_keys(run_id)[-1], job_ids) if job_ids else []
        return [None if raw is None else raw.decode() for raw in raws]

    def count_loss(self, run_id: str, job_id: str) -> int:
        """One more time this job's pool process died (or timed out) under it; returns the total."""
        return int(self._redis.hincrby(f"deepqueue:{{{run_id}}}:losses", job_id, 1))

    def claim_recipe(self, run_id: str, recipe: Mapping[str, Any], *, add: bool = False) -> list[dict[str, Any]] | None:
        """Record ``recipe`` as the run's if the run has none yet (``add``: also if it has
        others), and return the run's recipes, the first submitted first.

        None for a run submitted before recipes were recorded: nothing is recorded for it.
        """
        raw = self._claim_recipe(
            keys=[_recipes_key(run_id), _keys(run_id)[0]], args=[canonical_json(recipe), time.time(), int(add)]
        )
        return None if raw is None else _in_order(dict(zip(raw[0::2], raw[1::2], strict=True)))

    def recipes(self, run_id: str) -> list[dict[str, Any]]:
        """The run's recorded recipes, the first submitted first (empty: none recorded)."""
        return _in_order(self._redis.hgetall(_recipes_key(run_id)))

    def counts(self, run_id: str) -> dict[JobState, int]:
        pipe = self._redis.pipeline(transaction=False)
        for key in _keys(run_id)[1:]:
            pipe.scard(key)
        return dict(zip(STATES, pipe.execute(), strict=True))

    def exists(self, run_id: str) -> bool:
        """Submitted by a client, or named by a job a worker recorded (hand-made messages too)."""
        return self._redis.zscore(RUNS_KEY, run_id) is not None or bool(self._redis.exists(_keys(run_id)[0]))

    def runs(self) -> list[str]:
        return [name for name, _ in self.runs_since()]

    def runs_since(self) -> list[tuple[str, float]]:
        """Every submitted run and the time of its first submit, oldest first."""
        return [(name.decode(), at) for name, at in self._redis.zrange(RUNS_KEY, 0, -1, withscores=True)]

    def close(self) -> None:
        self._redis.close()

    def get(self, run_id: str, job_id: str) -> JobResult | None:
        raw = self._redis.hget(_keys(run_id)[0], job_id)
        return None if raw is None else _result(job_id, raw)

    def results(self, run_id: str) -> Iterator[JobResult]:
        """Every job of the run, streamed (HSCAN), in no particular order."""
        for job_id, raw in self._redis.hscan_iter(_keys(run_id)[0], count=1000):
            yield _result(job_id.decode(), raw)


def _in_order(recipes: Mapping[bytes, bytes]) -> list[dict[str, Any]]:
    """Recipes (canonical JSON -> time recorded) as dicts, the first recorded first."""
    return [json.loads(text) for text, _ in sorted(recipes.items(), key=lambda item: float(item[1]))]


def _result(job_id: str, raw: bytes) -> JobResult:
    record = json.loads(raw)
    return JobResult(
        job_id=job_id,
        state=JobState(record.pop("state")),
        key=record.pop("key", None),
        reason=record.pop("reason", None),
        details=record,
    )
