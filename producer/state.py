"""Per-job state in Redis, written by producer and worker, read by the client.

Keys (named in ``producer.layout``; ``{run}`` is a Redis Cluster hash tag, so one run's keys
live together):

- ``deepqueue:{run}:jobs``   hash  job_id -> JSON record (state, at, and key/reason/...)
- ``deepqueue:{run}:<state>`` set   job ids currently in that state (O(1) counts)
- ``deepqueue:{run}:pending`` hash  job_id -> the job as sent (JSON), until it is done: what
  ``Client.retry`` sends again when a message was lost, and ``Client.resume`` after a cancel
- ``deepqueue:{run}:losses``  hash  job_id -> times its pool process died under it (poison jobs)
- ``deepqueue:{run}:recipes`` hash  canonical JSON of a recipe the run was submitted with (its
  run-wide settings and run seed) -> time first seen; one unless a submit allowed a change
- ``deepqueue:{run}:meta``    hash  first_started_at, last_done_at (Redis clock), cancelled_at,
  deleted_at (a deleted run's tombstone, kept ``TOMBSTONE_S`` so its messages still queued
  recreate nothing)
- ``deepqueue:{run}:minutes`` hash  minute (Unix time // 60) -> jobs done in it: the run's rate
- ``deepqueue:runs``          zset  run ids by first submission time (a run no client submitted,
  by its first job's start)
- ``deepqueue:deleted``       zset  deleted run ids by first submission time, while their
  tombstones last: ``prune --outputs`` still finds their files

Every transition is one Lua call (``producer.state_scripts``), so the record and the sets never
disagree. ``done`` and ``cancelled`` are final: a redelivered job can neither turn a finished
job back into ``running`` or ``failed`` nor replace its record (which matches the write-once
sidecar). In a cancelled run, a job that a worker is about to start, or a producer to queue,
ends ``cancelled`` instead. Once a run is resumed (no longer cancelled), its cancelled jobs can
be queued again, and only that.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import redis

from producer.layout import DELETED_KEY, RUNS_KEY, state_key
from producer.state_scripts import CLAIM_RECIPE, TRANSITION


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:  # print(result.state) shows "done", not "JobState.DONE"
        return self.value


STATES = tuple(JobState)


#: Jobs per ``TRANSITION`` call when marking many: Redis serves no other client meanwhile.
MARK_BATCH = 500


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
    #: images done per second: lately (the last ``RATE_WINDOW_S``) while the run goes on, over its
    #: whole span once it has finished; None before its first image
    images_per_s: float | None = None
    workers: int | None = None  #: workers serving the queue, when asked for

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        return self.counts[JobState.DONE] + self.counts[JobState.FAILED] + self.counts[JobState.CANCELLED]

    @property
    def is_finished(self) -> bool:
        return self.finished == self.total

    @property
    def eta_s(self) -> float | None:
        """Seconds until every job is final at the current rate (None: no rate yet)."""
        if self.is_finished:
            return 0.0
        return (self.total - self.finished) / self.images_per_s if self.images_per_s else None

    def __str__(self) -> str:
        parts = ", ".join(f"{state.value} {self.counts[state]}" for state in STATES)
        extra = ""
        if self.images_per_s is not None:
            extra += f", {self.images_per_s:.3g} img/s"
        if self.eta_s and not self.is_finished:
            extra += f", ETA {format_duration(self.eta_s)}"
        if self.workers is not None:
            extra += f", {self.workers} worker{'' if self.workers == 1 else 's'} online"
        return f"{self.run_id}: {self.total} jobs ({parts}){extra}"


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``, ``3d04h``: short, for progress lines."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


#: The span the rate of a running run is measured over.
RATE_WINDOW_S = 300.0
#: How long a deleted run's tombstone stays: its messages still queued are dropped meanwhile.
TOMBSTONE_S = 7 * 86400


def rate_minutes(now: float, window_s: float = RATE_WINDOW_S) -> list[int]:
    """The minutes (Unix time // 60) whose done counts make the rate at ``now``."""
    return list(range(int((now - window_s) // 60), int(now // 60) + 1))


def images_per_s(
    meta: Mapping[str, float], done: int, minute_counts: Sequence[int], now: float, *, finished: bool
) -> float | None:
    """The run's rate: done over its whole span once finished; else the jobs done in the minutes
    of ``rate_minutes(now)`` over the time they cover (from the run's first start if later)."""
    started = meta.get("first_started_at")
    if started is None:
        return None
    if finished:
        span = meta.get("last_done_at", started) - started
        return done / span if span > 0 else None
    first_minute = rate_minutes(now)[0] * 60
    span = now - max(first_minute, started)
    return sum(minute_counts) / span if span > 0 else None


def _keys(run_id: str) -> list[str]:
    return [state_key(run_id, "jobs"), *(state_key(run_id, state.value) for state in STATES)]


def _transition_keys(run_id: str) -> list[str]:
    return [*_keys(run_id), _pending_key(run_id), _meta_key(run_id), state_key(run_id, "minutes")]


def _pending_key(run_id: str) -> str:
    return state_key(run_id, "pending")


def _meta_key(run_id: str) -> str:
    return state_key(run_id, "meta")


def _recipes_key(run_id: str) -> str:
    return state_key(run_id, "recipes")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class RunStore:
    """Thin layer over a Redis client it is given."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._transition = client.register_script(TRANSITION)
        self._claim_recipe = client.register_script(CLAIM_RECIPE)

    @classmethod
    def from_url(cls, url: str) -> RunStore:
        return cls(redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10))

    def mark(self, run_id: str, job_id: str, state: JobState, **details: Any) -> bool:
        """Move one job to ``state``; False if its current state forbids that. A job that starts
        lists its run (if it is not yet) at the time it started: a run sent by any producer,
        a plain Celery ``send_task`` one too, is then in ``runs`` and ``prune``."""
        record = json.dumps({"state": state.value, "at": time.time(), **details})
        moved = bool(self._transition(keys=_transition_keys(run_id), args=[state.value, job_id, record, ""]))
        if moved and state is JobState.RUNNING:
            self._redis.zadd(RUNS_KEY, {run_id: time.time()}, nx=True)
        return moved

    def states(self, run_id: str, job_ids: Sequence[str]) -> list[JobState | None]:
        """Each job's state (None: never submitted), in one round trip."""
        raws = self._redis.hmget(_keys(run_id)[0], job_ids) if job_ids else []
        return [None if raw is None else JobState(json.loads(raw)["state"]) for raw in raws]

    def mark_queued(self, run_id: str, sent: Mapping[str, str]) -> None:
        """Mark sent jobs (job_id -> the job as sent, JSON) queued, keeping each until it is
        done; those a worker already took stay as they are. One round trip per few thousand."""
        pipe = self._redis.pipeline(transaction=False)
        for args in self._queued_batches(run_id, sent):
            self._transition(keys=_transition_keys(run_id), args=[JobState.QUEUED.value, *args], client=pipe)
        pipe.execute()

    def claim_queued(self, run_id: str, sent: Mapping[str, str], *, resend_queued: bool = False) -> dict[str, str]:
        """Before sending: mark queued those of ``sent`` (job_id -> the job as sent, JSON) that are
        new or failed (``resend_queued``: or queued), keeping each until it is done, and return
        them, each with the record it had ('' for a new job), for ``unclaim``. One call per
        ``MARK_BATCH`` jobs: producers racing one run claim, and so send, each job once."""
        mode = "claim+queued" if resend_queued else "claim"
        claimed: dict[str, str] = {}
        for args in self._queued_batches(run_id, sent):
            raw = self._transition(keys=_transition_keys(run_id), args=[mode, *args])
            if raw:  # 0 in a deleted run
                claimed.update(zip((v.decode() for v in raw[0::2]), (v.decode() for v in raw[1::2]), strict=True))
        return claimed

    def unclaim(self, run_id: str, claimed: Mapping[str, str]) -> None:
        """Put back what ``claim_queued`` took, for jobs still queued (their publish failed)."""
        for args in _flat_batches(claimed.items()):
            self._transition(keys=_transition_keys(run_id), args=["unclaim", *args])

    def _queued_batches(self, run_id: str, sent: Mapping[str, str]) -> Iterator[list[str]]:
        """List the run, then ``sent`` as the transition script's (id, queued record, job as sent) arguments."""
        self._redis.zadd(RUNS_KEY, {run_id: time.time()}, nx=True)
        record = json.dumps({"state": JobState.QUEUED.value, "at": time.time()})
        return _flat_batches((job_id, record, job) for job_id, job in sent.items())

    def pending(self, run_id: str, job_ids: Sequence[str]) -> list[str | None]:
        """The jobs as sent (JSON) of these unfinished jobs; None where none was kept (a job
        submitted before they were kept, or done)."""
        raws = self._redis.hmget(_pending_key(run_id), job_ids) if job_ids else []
        return [None if raw is None else raw.decode() for raw in raws]

    def count_loss(self, run_id: str, job_id: str) -> int:
        """One more time this job's pool process died (or timed out) under it; returns the total."""
        return int(self._redis.hincrby(state_key(run_id, "losses"), job_id, 1))

    def claim_recipe(self, run_id: str, recipe: Mapping[str, Any], *, add: bool = False) -> list[dict[str, Any]] | None:
        """Record ``recipe`` as the run's if the run has none yet (``add``: also if it has
        others), and return the run's recipes, the first submitted first.

        None for a run submitted before recipes were recorded: nothing is recorded for it.
        """
        raw = self._claim_recipe(
            keys=[_recipes_key(run_id), _keys(run_id)[0]], args=[canonical_json(recipe), time.time(), int(add)]
        )
        return None if raw is None else _in_order(dict(zip(raw[0::2], raw[1::2], strict=True)))

    def forget_recipe(self, run_id: str, recipe: Mapping[str, Any]) -> None:
        """Take back a recipe a submit recorded but sent no job of (it was refused half-way)."""
        self._redis.hdel(_recipes_key(run_id), canonical_json(recipe))

    def recipes(self, run_id: str) -> list[dict[str, Any]]:
        """The run's recorded recipes, the first submitted first (empty: none recorded)."""
        return _in_order(self._redis.hgetall(_recipes_key(run_id)))

    def counts(self, run_id: str) -> dict[JobState, int]:
        return self.status(run_id).counts

    def status(self, run_id: str, now: float | None = None) -> RunStatus:
        """Counts per state and the rate (see ``images_per_s``), in one round trip."""
        now = time.time() if now is None else now
        minutes = rate_minutes(now)
        pipe = self._redis.pipeline(transaction=False)
        for key in _keys(run_id)[1:]:
            pipe.scard(key)
        pipe.hgetall(_meta_key(run_id))
        pipe.hmget(_transition_keys(run_id)[-1], minutes)
        *sizes, meta, per_minute = pipe.execute()
        status = RunStatus(run_id, dict(zip(STATES, sizes, strict=True)))
        done, counts = status.counts[JobState.DONE], [int(n or 0) for n in per_minute]
        rate = images_per_s(_floats(meta), done, counts, now, finished=status.is_finished)
        return replace(status, images_per_s=rate)

    def meta(self, run_id: str) -> dict[str, float]:
        """first_started_at, last_done_at, cancelled_at, deleted_at: those the run has."""
        return _floats(self._redis.hgetall(_meta_key(run_id)))

    def cancel(self, run_id: str) -> int:
        """Cancel the run: its queued jobs end ``cancelled`` now, and any job a worker or a
        producer comes to later (a message still queued) ends so too. Running jobs finish.
        Returns how many jobs this call cancelled."""
        self._redis.hsetnx(_meta_key(run_id), "cancelled_at", time.time())
        record = json.dumps({"state": JobState.CANCELLED.value, "at": time.time(), "reason": "run cancelled"})
        cancelled, chunk = 0, []
        queued = _keys(run_id)[1 + STATES.index(JobState.QUEUED)]
        for job_id in self._redis.sscan_iter(queued, count=MARK_BATCH):
            chunk.append(job_id)
            if len(chunk) == MARK_BATCH:
                cancelled += self._cancel(run_id, chunk, record)
                chunk = []
        return cancelled + (self._cancel(run_id, chunk, record) if chunk else 0)

    def stopped(self, run_id: str) -> bool:
        """Whether the run is cancelled or deleted (a guess for ``drop_if_stopped``: it may change)."""
        return any(value is not None for value in self._redis.hmget(_meta_key(run_id), ["cancelled_at", "deleted_at"]))

    def drop_if_stopped(self, run_id: str, job_ids: Sequence[str]) -> bool:
        """If the run is cancelled or deleted, settle these jobs as a worker starting them would
        (a cancelled run's end ``cancelled`` unless final; a deleted run's write nothing) and
        return True: their messages can be dropped. Else write nothing and return False. One Lua
        call per ``MARK_BATCH`` jobs, so the answer and the writes agree."""
        stopped = True
        for start in range(0, len(job_ids), MARK_BATCH):
            args = [value for job_id in job_ids[start : start + MARK_BATCH] for value in (job_id, "", "")]
            stopped = int(self._transition(keys=_transition_keys(run_id), args=["drop", *args])) >= 0 and stopped
        return stopped

    def resume(self, run_id: str) -> bool:
        """Take back a cancel: the run takes jobs again, and its cancelled jobs may be queued
        again (``Client.resume`` sends them). Returns whether the run was cancelled."""
        return bool(self._redis.hdel(_meta_key(run_id), "cancelled_at"))

    def job_ids(self, run_id: str, state: JobState) -> Iterator[str]:
        """The ids of the run's jobs in ``state``, streamed (SSCAN)."""
        for job_id in self._redis.sscan_iter(_keys(run_id)[1 + STATES.index(state)], count=MARK_BATCH):
            yield job_id.decode()

    def _cancel(self, run_id: str, job_ids: list[bytes], record: str) -> int:
        args = [value for job_id in job_ids for value in (job_id, record, "")]
        return int(self._transition(keys=_transition_keys(run_id), args=[JobState.CANCELLED.value, *args]))

    def delete(self, run_id: str) -> None:
        """Forget the run: every key of its state goes (UNLINK: freed without blocking Redis),
        and a tombstone stays ``TOMBSTONE_S``: its messages still queued write nothing, and a
        worker that finishes storing an image for it removes what it stored (``deleted``)."""
        keys = [*_transition_keys(run_id), state_key(run_id, "losses"), _recipes_key(run_id)]
        now = time.time()
        submitted = self._redis.zscore(RUNS_KEY, run_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.unlink(*keys)
        pipe.hset(_meta_key(run_id), "deleted_at", now)
        pipe.expire(_meta_key(run_id), TOMBSTONE_S)
        pipe.zrem(RUNS_KEY, run_id)
        pipe.zadd(DELETED_KEY, {run_id: now if submitted is None else submitted})
        pipe.execute()

    def deleted(self, run_id: str) -> bool:
        """Whether the run has a tombstone: deleted, and not submitted again since."""
        return bool(self._redis.hexists(_meta_key(run_id), "deleted_at"))

    def deleted_since(self) -> list[tuple[str, float]]:
        """Deleted runs whose tombstones last, with the time of their first submit, oldest first
        (those whose tombstones expired are forgotten here)."""
        listed = [(name.decode(), at) for name, at in self._redis.zrange(DELETED_KEY, 0, -1, withscores=True)]
        pipe = self._redis.pipeline(transaction=False)
        for name, _ in listed:
            pipe.hexists(_meta_key(name), "deleted_at")
        alive = pipe.execute() if listed else []
        expired = [name for (name, _), kept in zip(listed, alive, strict=True) if not kept]
        if expired:
            self._redis.zrem(DELETED_KEY, *expired)
        return [entry for entry, kept in zip(listed, alive, strict=True) if kept]

    def reuse_deleted(self, run_id: str) -> None:
        """Drop a deleted run's tombstone so that its name can be submitted again."""
        self._redis.pipeline(transaction=True).unlink(_meta_key(run_id)).zrem(DELETED_KEY, run_id).execute()

    def exists(self, run_id: str) -> bool:
        """Submitted by a client, or named by a job a worker recorded (hand-made messages too)."""
        return self._redis.zscore(RUNS_KEY, run_id) is not None or bool(self._redis.exists(_keys(run_id)[0]))

    def runs(self) -> list[str]:
        return [name for name, _ in self.runs_since()]

    def runs_since(self) -> list[tuple[str, float]]:
        """Every run and the time of its first submit (or, for a run no client submitted, of its
        first job's start), oldest first."""
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


def _flat_batches(rows: Iterable[tuple[str, ...]]) -> Iterator[list[str]]:
    """``rows`` flattened into one argument list per ``MARK_BATCH`` of them (one script call each)."""
    batch: list[str] = []
    for count, row in enumerate(rows, 1):
        batch.extend(row)
        if count % MARK_BATCH == 0:
            yield batch
            batch = []
    if batch:
        yield batch


def _floats(fields: Mapping[bytes, bytes]) -> dict[str, float]:
    return {name.decode(): float(value) for name, value in fields.items()}


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
