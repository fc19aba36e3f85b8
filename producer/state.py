"""Per-job state in Redis, written by producer and worker, read by the client.

Keys (named in ``producer.layout``; ``{run}`` is a Redis Cluster hash tag, so one run's keys
live together). A job costs 8 bytes: its state is a slot in a packed string; only failed and
running jobs keep more. The jobs as sent are kept in the run's storage (``producer.sent``).

- ``deepqueue:{run}:slots:<n>`` string  jobs ``n * 4095`` ... as 8-byte slots: state, a done
  job's image extension, the id's hash (``producer.slots``)
- ``deepqueue:{run}:blocks``  set   the block numbers ``n`` the run has
- ``deepqueue:{run}:others``  hash  job_id -> state and extension codes, for a job whose slot
  another job of the run holds (a second recipe at the same position) or whose id has no index
- ``deepqueue:{run}:counts``  hash  state -> jobs in it (O(1) status)
- ``deepqueue:{run}:reasons`` hash  job_id -> why it failed, while it is failed
- ``deepqueue:{run}:running`` hash  job_id -> the worker running it, while it runs
- ``deepqueue:{run}:images``  string  the folder (URL) of the run's images: a done job's key is
  ``{images}/{job_id}.{extension}``; ``deepqueue:{run}:keys`` hash job_id -> key, for a done job
  stored elsewhere
- ``deepqueue:{run}:losses``  hash  job_id -> times its pool process died under it (poison jobs)
- ``deepqueue:{run}:recipes`` hash  canonical JSON of a recipe the run was submitted with (its
  run-wide settings and run seed) -> time first seen; one unless a submit allowed a change
- ``deepqueue:{run}:meta``    hash  first_started_at, last_done_at, last_failed_at (Redis clock),
  cancelled_at, deleted_at (a deleted run's tombstone, kept ``TOMBSTONE_S`` so its messages
  still queued recreate nothing), gpu_s (its images' shares of pipeline time)
- ``deepqueue:{run}:minutes`` hash  minute (Unix time // 60) -> jobs done in it: the run's rate
- ``deepqueue:{run}:notify``, ``:notify-claim``: its completion webhook (``producer.notify_state``)
- ``deepqueue:runs``          zset  run ids by first submission time (a run no client submitted,
  by its first job's start)
- ``deepqueue:deleted``       zset  deleted run ids by first submission time, while their
  tombstones last: ``prune --outputs`` still finds their files

Every transition is one Lua call (``producer.state_scripts``), so slots, counts and details never
disagree. ``done`` and ``cancelled`` are final: a redelivered job can neither turn a finished
job back into ``running`` or ``failed`` nor replace its key (which matches the write-once
sidecar). In a cancelled run, a job that a worker is about to start, or a producer to queue,
ends ``cancelled`` instead. Once a run is resumed (no longer cancelled), its cancelled jobs can
be queued again, and only that.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import redis

from producer.job import canonical_json
from producer.layout import DELETED_KEY, NOTIFY_CLAIM_NAME, NOTIFY_NAME, NOTIFY_PENDING_KEY, RUNS_KEY, state_key
from producer.settings import redis_client
from producer.slots import (
    BLOCK_SLOTS,
    SLOT_BYTES,
    Slot,
    decode,
    indexes_of,
    packed_tags,
    place,
    read_slot,
    slots_of_block,
)
from producer.state_scripts import CANCEL_BLOCK, CLAIM_RECIPE, TRANSITION


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:  # print(result.state) shows "done", not "JobState.DONE"
        return self.value


STATES = tuple(JobState)


#: Jobs per ``TRANSITION`` call when marking or claiming many: Redis serves no other client
#: meanwhile (a few ms for jobs that each need work; a claim's new jobs cost far less).
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


#: The run's keys every transition may touch, in ``TRANSITION``'s KEYS order.
STATE_KEYS = ("counts", "others", "reasons", "running", "meta", "minutes", "blocks", "keys", "images")
#: A cancelled job's reason, implied by its state.
CANCELLED_REASON = "run cancelled"


def _transition_keys(run_id: str) -> list[str]:
    return [state_key(run_id, name) for name in STATE_KEYS]


def _blocks_prefix(run_id: str) -> str:
    return state_key(run_id, "slots:")


class RunStore:
    """Thin layer over a Redis client it is given."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._transition = client.register_script(TRANSITION)
        self._cancel_block = client.register_script(CANCEL_BLOCK)
        self._claim_recipe = client.register_script(CLAIM_RECIPE)

    @classmethod
    def from_url(cls, url: str) -> RunStore:
        return cls(redis_client(url))

    def _call(self, run_id: str, mode: str, args: Sequence[str | bytes | int], client: Any = None) -> Any:
        """One ``TRANSITION`` call: ``mode`` for the jobs in ``args`` (see the script)."""
        return self._transition(
            keys=_transition_keys(run_id), args=[mode, _blocks_prefix(run_id), *args], client=client
        )

    def mark(
        self,
        run_id: str,
        job_id: str,
        state: JobState,
        *,
        key: str | None = None,
        reason: str | None = None,
        worker: str | None = None,
    ) -> bool:
        """Move one job to ``state`` (done: with its image's ``key``; failed: with its ``reason``;
        running: on ``worker``); False if its current state forbids that. A job that starts
        lists its run (if it is not yet) at the time it started: a run sent by any producer,
        a plain Celery ``send_task`` one too, is then in ``runs`` and ``prune``."""
        detail = {JobState.DONE: key, JobState.FAILED: reason, JobState.RUNNING: worker}.get(state)
        return self.mark_many(run_id, state, {job_id: detail or ""}) == 1

    def mark_many(self, run_id: str, state: JobState, details: Mapping[str, str]) -> int:
        """``mark`` for many jobs (job_id -> its key, reason or worker, as ``state`` needs; ''
        for none), one script call per ``MARK_BATCH``: for tools that settle many jobs at once
        (the benchmarks). Returns how many moved."""
        moved = 0
        for args in _flat_batches(details.items()):
            moved += int(self._call(run_id, state.value, args))
        if moved and state is JobState.RUNNING:
            self._redis.zadd(RUNS_KEY, {run_id: time.time()}, nx=True)
        return moved

    def states(self, run_id: str, job_ids: Sequence[str]) -> list[JobState | None]:
        """Each job's state (None: never submitted)."""
        return [None if slot is None else JobState(slot.state) for slot in self._slots(run_id, job_ids)]

    def mark_queued(self, run_id: str, job_ids: Iterable[str]) -> None:
        """Mark sent jobs queued; those a worker already took stay as they are. One round trip
        per few thousand."""
        pipe = self._listing(run_id)
        for args in _flat_batches((job_id, "") for job_id in job_ids):
            self._call(run_id, JobState.QUEUED.value, args, client=pipe)
        pipe.execute()

    def claim_queued(self, run_id: str, job_ids: Iterable[str], *, resend_queued: bool = False) -> dict[str, str]:
        """Before sending: mark queued those of ``job_ids`` that are new or failed
        (``resend_queued``: or queued), and return them, each with what it was ('' for a new
        job), for ``unclaim``. One script call per ``MARK_BATCH`` jobs, all in one round trip:
        producers racing one run claim, and so send, each job once."""
        mode = "claim+queued" if resend_queued else "claim"
        ids = list(job_ids)
        pipe = self._listing(run_id)
        orders: list[list[str]] = []  # each call's ids, in the order of its flags
        for start in range(0, len(ids), MARK_BATCH):
            order, args = _claim_args(ids[start : start + MARK_BATCH])
            self._call(run_id, mode, args, client=pipe)
            orders.append(order)
        claimed: dict[str, str] = {}
        for order, raw in zip(orders, pipe.execute()[1:], strict=True):  # [0]: the listing
            if raw:  # 0 in a deleted run
                flags, *before = raw
                claimed.update((job_id, "") for job_id, flag in zip(order, flags.decode(), strict=True) if flag == "1")
                claimed.update(zip((v.decode() for v in before[0::2]), (v.decode() for v in before[1::2]), strict=True))
        return claimed

    def unclaim(self, run_id: str, claimed: Mapping[str, str]) -> None:
        """Put back what ``claim_queued`` took, for jobs still queued (their publish failed)."""
        for args in _flat_batches(claimed.items()):
            self._call(run_id, "unclaim", args)

    def _listing(self, run_id: str) -> redis.client.Pipeline:
        """A pipeline that first lists the run: the calls of a submit's chunk follow."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.zadd(RUNS_KEY, {run_id: time.time()}, nx=True)
        return pipe

    def count_loss(self, run_id: str, job_id: str) -> int:
        """One more time this job's pool process died (or timed out) under it; returns the total."""
        return int(self._redis.hincrby(state_key(run_id, "losses"), job_id, 1))

    def claim_recipe(self, run_id: str, recipe: Mapping[str, Any], *, add: bool = False) -> list[dict[str, Any]] | None:
        """Record ``recipe`` as the run's if the run has none yet (``add``: also if it has
        others), and return the run's recipes, the first submitted first.

        None for a run submitted before recipes were recorded: nothing is recorded for it.
        """
        raw = self._claim_recipe(
            keys=[state_key(run_id, "recipes"), state_key(run_id, "counts")],
            args=[canonical_json(recipe), time.time(), int(add)],
        )
        return None if raw is None else _in_order(dict(zip(raw[0::2], raw[1::2], strict=True)))

    def forget_recipe(self, run_id: str, recipe: Mapping[str, Any]) -> None:
        """Take back a recipe a submit recorded but sent no job of (it was refused half-way)."""
        self._redis.hdel(state_key(run_id, "recipes"), canonical_json(recipe))

    def recipes(self, run_id: str) -> list[dict[str, Any]]:
        """The run's recorded recipes, the first submitted first (empty: none recorded)."""
        return _in_order(self._redis.hgetall(state_key(run_id, "recipes")))

    def counts(self, run_id: str) -> dict[JobState, int]:
        return self.status(run_id).counts

    def status(self, run_id: str, now: float | None = None) -> RunStatus:
        """Counts per state and the rate (see ``images_per_s``), in one round trip."""
        now = time.time() if now is None else now
        minutes = rate_minutes(now)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hmget(state_key(run_id, "counts"), [state.value for state in STATES])
        pipe.hgetall(state_key(run_id, "meta"))
        pipe.hmget(state_key(run_id, "minutes"), minutes)
        sizes, meta, per_minute = pipe.execute()
        status = RunStatus(run_id, {state: int(size or 0) for state, size in zip(STATES, sizes, strict=True)})
        done, counts = status.counts[JobState.DONE], [int(n or 0) for n in per_minute]
        rate = images_per_s(_floats(meta), done, counts, now, finished=status.is_finished)
        return replace(status, images_per_s=rate)

    def meta(self, run_id: str) -> dict[str, float]:
        """first_started_at, last_done_at, last_failed_at, cancelled_at, deleted_at, gpu_s: those
        the run has."""
        return _floats(self._redis.hgetall(state_key(run_id, "meta")))

    def add_gpu_seconds(self, run_id: str, seconds: float) -> None:
        """Count ``seconds`` of pipeline time towards the run (meta ``gpu_s``): a worker adds each
        image's share of its batch's inference time as it stores it."""
        self._redis.hincrbyfloat(state_key(run_id, "meta"), "gpu_s", seconds)

    def failure_reasons(self, run_id: str) -> Iterator[str]:
        """The reason of each failed job, streamed (those of the run's failed jobs only)."""
        for _, reason in self._redis.hscan_iter(state_key(run_id, "reasons"), count=1000):
            yield reason.decode(errors="replace")

    def cancel(self, run_id: str) -> int:
        """Cancel the run: its queued jobs end ``cancelled`` now, and any job a worker or a
        producer comes to later (a message still queued) ends so too. Running jobs finish.
        Returns how many jobs this call cancelled."""
        self._redis.hsetnx(state_key(run_id, "meta"), "cancelled_at", time.time())
        keys, prefix = _transition_keys(run_id), _blocks_prefix(run_id)
        cancelled = sum(int(self._cancel_block(keys=keys, args=[prefix, block])) for block in self._blocks(run_id))
        others = (job_id for job_id, slot in self._others(run_id) if slot.state == JobState.QUEUED.value)
        for args in _flat_batches((job_id, "") for job_id in others):
            cancelled += int(self._call(run_id, JobState.CANCELLED.value, args))
        return cancelled

    def stopped(self, run_id: str) -> bool:
        """Whether the run is cancelled or deleted (a guess for ``drop_if_stopped``: it may change)."""
        fields = self._redis.hmget(state_key(run_id, "meta"), ["cancelled_at", "deleted_at"])
        return any(value is not None for value in fields)

    def drop_if_stopped(self, run_id: str, job_ids: Sequence[str]) -> bool:
        """If the run is cancelled or deleted, settle these jobs as a worker starting them would
        (a cancelled run's end ``cancelled`` unless final; a deleted run's write nothing) and
        return True: their messages can be dropped. Else write nothing and return False. One Lua
        call per ``MARK_BATCH`` jobs, so the answer and the writes agree."""
        stopped = True
        for args in _flat_batches((job_id, "") for job_id in job_ids):
            stopped = int(self._call(run_id, "drop", args)) >= 0 and stopped
        return stopped

    def resume(self, run_id: str) -> bool:
        """Take back a cancel: the run takes jobs again, and its cancelled jobs may be queued
        again (``Client.resume`` sends them). Returns whether the run was cancelled."""
        return bool(self._redis.hdel(state_key(run_id, "meta"), "cancelled_at"))

    def job_ids(self, run_id: str, state: JobState) -> Iterator[str]:
        """The ids of the run's jobs in ``state``, by index (those kept in ``others`` last)."""
        for slot in self._every_slot(run_id):
            if slot.state == state.value:
                yield slot.job_id

    def delete(self, run_id: str) -> None:
        """Forget the run: every key of its state goes (UNLINK: freed without blocking Redis),
        and a tombstone stays ``TOMBSTONE_S``: its messages still queued write nothing, and a
        worker that finishes storing an image for it removes what it stored (``deleted``)."""
        blocks = [_blocks_prefix(run_id) + str(block) for block in self._blocks(run_id)]
        keys = [*_transition_keys(run_id), state_key(run_id, "losses"), state_key(run_id, "recipes"), *blocks]
        keys += [state_key(run_id, NOTIFY_NAME), state_key(run_id, NOTIFY_CLAIM_NAME)]
        meta = state_key(run_id, "meta")
        now = time.time()
        submitted = self._redis.zscore(RUNS_KEY, run_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.unlink(*keys)
        pipe.hset(meta, "deleted_at", now)
        pipe.expire(meta, TOMBSTONE_S)
        pipe.zrem(RUNS_KEY, run_id)
        pipe.zadd(DELETED_KEY, {run_id: now if submitted is None else submitted})
        pipe.zrem(NOTIFY_PENDING_KEY, run_id)
        pipe.execute()

    def deleted(self, run_id: str) -> bool:
        """Whether the run has a tombstone: deleted, and not submitted again since."""
        return bool(self._redis.hexists(state_key(run_id, "meta"), "deleted_at"))

    def deleted_since(self) -> list[tuple[str, float]]:
        """Deleted runs whose tombstones last, with the time of their first submit, oldest first
        (those whose tombstones expired are forgotten here)."""
        listed = [(name.decode(), at) for name, at in self._redis.zrange(DELETED_KEY, 0, -1, withscores=True)]
        pipe = self._redis.pipeline(transaction=False)
        for name, _ in listed:
            pipe.hexists(state_key(name, "meta"), "deleted_at")
        alive = pipe.execute() if listed else []
        expired = [name for (name, _), kept in zip(listed, alive, strict=True) if not kept]
        if expired:
            self._redis.zrem(DELETED_KEY, *expired)
        return [entry for entry, kept in zip(listed, alive, strict=True) if kept]

    def reuse_deleted(self, run_id: str) -> None:
        """Drop a deleted run's tombstone so that its name can be submitted again."""
        self._redis.pipeline(transaction=True).unlink(state_key(run_id, "meta")).zrem(DELETED_KEY, run_id).execute()

    def exists(self, run_id: str) -> bool:
        """Submitted by a client, or named by a job a worker recorded (hand-made messages too)."""
        return self._redis.zscore(RUNS_KEY, run_id) is not None or bool(self._redis.exists(state_key(run_id, "counts")))

    def runs(self) -> list[str]:
        return [name for name, _ in self.runs_since()]

    def runs_since(self) -> list[tuple[str, float]]:
        """Every run and the time of its first submit (or, for a run no client submitted, of its
        first job's start), oldest first."""
        return [(name.decode(), at) for name, at in self._redis.zrange(RUNS_KEY, 0, -1, withscores=True)]

    def close(self) -> None:
        self._redis.close()

    def get(self, run_id: str, job_id: str) -> JobResult | None:
        slot = self._slots(run_id, [job_id])[0]
        return None if slot is None else self._results(run_id, [slot], self._images(run_id))[0]

    def results(self, run_id: str) -> Iterator[JobResult]:
        """Every job of the run, streamed a block at a time, by index (those kept in ``others``
        last)."""
        images, slots = self._images(run_id), self._every_slot(run_id)
        while chunk := list(itertools.islice(slots, BLOCK_SLOTS)):
            yield from self._results(run_id, chunk, images)

    def _blocks(self, run_id: str) -> list[int]:
        return sorted(int(block) for block in self._redis.smembers(state_key(run_id, "blocks")))

    def _images(self, run_id: str) -> str | None:
        folder = self._redis.get(state_key(run_id, "images"))
        return None if folder is None else folder.decode()

    def _others(self, run_id: str) -> Iterator[tuple[str, Slot]]:
        for job_id, value in self._redis.hscan_iter(state_key(run_id, "others"), count=1000):
            slot = decode(job_id.decode(), value)
            if slot is not None:
                yield slot.job_id, slot

    def _every_slot(self, run_id: str) -> Iterator[Slot]:
        """Each job's slot: the blocks' by index, then those in ``others``."""
        prefix = _blocks_prefix(run_id)
        for block in self._blocks(run_id):
            yield from slots_of_block(block, self._redis.get(prefix + str(block)) or b"")
        for _, slot in self._others(run_id):
            yield slot

    def _slots(self, run_id: str, job_ids: Sequence[str]) -> list[Slot | None]:
        """These jobs' slots (None: no such job), read where the script keeps them: at their
        place if it is free or theirs (a slot keeps its tag once taken), else in ``others``. Two
        round trips at most."""
        places = [place(job_id) for job_id in job_ids]
        pipe = self._redis.pipeline(transaction=False)
        for at in places:
            if at is not None:
                pipe.getrange(_blocks_prefix(run_id) + str(at.block), at.offset, at.offset + SLOT_BYTES - 1)
        values = iter(pipe.execute() if any(at is not None for at in places) else [])
        found: list[Slot | None] = []
        elsewhere: list[int] = []
        for position, (job_id, at) in enumerate(zip(job_ids, places, strict=True)):
            value = None if at is None else next(values)
            if at is not None and value is not None and (value[2:SLOT_BYTES] == at.tag or not value.strip(b"\0")):
                found.append(read_slot(job_id, at, value))
            else:
                found.append(None)
                elsewhere.append(position)
        if elsewhere:
            values_elsewhere = self._redis.hmget(state_key(run_id, "others"), [job_ids[i] for i in elsewhere])
            for position, value in zip(elsewhere, values_elsewhere, strict=True):
                found[position] = None if value is None else decode(job_ids[position], value)
        return found

    def _results(self, run_id: str, slots: Sequence[Slot], images: str | None) -> list[JobResult]:
        """Slots as JobResults, with the details kept apart: failure reasons, the workers of
        running jobs, done jobs' keys (in the run's image folder, or kept whole)."""
        ids = {
            "reasons": [slot.job_id for slot in slots if slot.state == JobState.FAILED.value],
            "running": [slot.job_id for slot in slots if slot.state == JobState.RUNNING.value],
            "keys": [slot.job_id for slot in slots if slot.whole_key],
        }
        asked = {name: job_ids for name, job_ids in ids.items() if job_ids}
        pipe = self._redis.pipeline(transaction=False)
        for name, job_ids in asked.items():
            pipe.hmget(state_key(run_id, name), job_ids)
        details: dict[str, dict[str, str]] = {name: {} for name in ids}
        for (name, job_ids), values in zip(asked.items(), pipe.execute() if asked else [], strict=True):
            details[name] = {job_id: v.decode() for job_id, v in zip(job_ids, values, strict=True) if v is not None}
        results = []
        for slot in slots:
            key = details["keys"].get(slot.job_id)
            if key is None and slot.extension and images is not None:
                key = f"{images}/{slot.job_id}.{slot.extension}"
            reason = CANCELLED_REASON if slot.state == JobState.CANCELLED.value else details["reasons"].get(slot.job_id)
            worker = details["running"].get(slot.job_id)
            details_ = {} if worker is None else {"worker": worker}
            results.append(JobResult(slot.job_id, JobState(slot.state), key=key, reason=reason, details=details_))
        return results


def _flat_batches(rows: Iterable[tuple[str, ...]]) -> Iterator[list[str | bytes | int]]:
    """``rows`` (a job id, then the rest of its arguments) flattened into one argument list per
    ``MARK_BATCH`` of them (one script call each), each id followed by its index and tag: placed
    here, so the script need not parse ids."""
    batch: list[str | bytes | int] = []
    for count, (job_id, *rest) in enumerate(rows, 1):
        batch.extend(_placed(job_id))
        batch.extend(rest)
        if count % MARK_BATCH == 0:
            yield batch
            batch = []
    if batch:
        yield batch


def _placed(job_id: str) -> tuple[str, int | str, bytes | str]:
    """A job as the script takes it one by one: its id, then its index and tag ('' and '' for
    an id of another form)."""
    at = place(job_id)
    return (job_id, "", "") if at is None else (job_id, at.index, at.tag)


def _claim_args(job_ids: Sequence[str]) -> tuple[list[str], list[str | bytes | int]]:
    """A claim's arguments after the prefix (see ``TRANSITION``), and its ids in the order of the
    flags it returns: jobs at consecutive indexes of one block as a run (its first index and its
    tags), then the others one by one: ids of another form, and any whose index a run has (a job
    listed twice, or another recipe's at that index), which the script must see after the runs."""
    runs: dict[int, list[str]] = {}  # first index -> the run's ids
    alone: list[str] = []
    seen: set[int] = set()
    run: list[str] = []
    follows = -1  # the index that would extend the last run
    for job_id, index in zip(job_ids, indexes_of(job_ids), strict=True):
        if index is None or index in seen:
            alone.append(job_id)
            continue
        seen.add(index)
        if index == follows and index % BLOCK_SLOTS:
            run.append(job_id)
        else:
            run = runs[index] = [job_id]
        follows = index + 1
    args: list[str | bytes | int] = [len(runs)]
    for first, ids in runs.items():
        args += [first, packed_tags(ids)]
    for job_id in alone:
        args += (*_placed(job_id), "")
    return [job_id for ids in runs.values() for job_id in ids] + alone, args


def _floats(fields: Mapping[bytes, bytes]) -> dict[str, float]:
    return {name.decode(): float(value) for name, value in fields.items()}


def _in_order(recipes: Mapping[bytes, bytes]) -> list[dict[str, Any]]:
    """Recipes (canonical JSON -> time recorded) as dicts, the first recorded first."""
    return [json.loads(text) for text, _ in sorted(recipes.items(), key=lambda item: float(item[1]))]
