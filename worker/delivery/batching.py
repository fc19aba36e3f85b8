"""Which jobs may share a pipeline call, and the buffer that groups them. Pure logic."""

from __future__ import annotations

from bisect import insort
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from producer.job import Job, cache_problem
from producer.loras import adapter_set

T = TypeVar("T")


@dataclass(frozen=True)
class RecipeDefaults:
    """What a worker uses for the recipe fields a job leaves to it."""

    model: str
    scheduler: str
    cache_interval: int
    cache_branch: int
    #: The model encodes a missing negative prompt as "" (see worker.pipeline.model.empty_negative_is_default):
    #: then jobs with and without one share a call; unknown, they are kept apart.
    empty_negative_is_default: bool = False


@dataclass(frozen=True)
class BatchKey:
    """Everything one pipeline call must share. Seeds and prompts are per image."""

    model: str
    height: int
    width: int
    steps: int
    guidance: float
    scheduler: str
    cache_interval: int
    cache_branch: int
    negative_prompt: bool
    format: str
    #: The LoRA adapters, as ``(id, scale)`` in the job's order (``producer.loras``); empty: the
    #: base model. Another order is another key: the same adapters stacked differently.
    loras: tuple[tuple[str, float], ...] = ()

    @property
    def deepcache(self) -> bool:
        return self.cache_interval > 1

    def problem(self) -> str | None:
        """Why no worker can run this combination, or None."""
        return cache_problem(self.scheduler, self.cache_interval)


def batch_key(job: Job, defaults: RecipeDefaults) -> BatchKey:
    interval = job.cache_interval if job.cache_interval is not None else defaults.cache_interval
    branch = job.cache_branch if job.cache_branch is not None else defaults.cache_branch
    return BatchKey(
        model=defaults.model,
        height=job.height,
        width=job.width,
        steps=job.steps,
        guidance=job.guidance,
        scheduler=job.scheduler or defaults.scheduler,
        cache_interval=interval,
        # The branch means nothing without caching: let such jobs batch together.
        cache_branch=branch if interval > 1 else 0,
        # Whether the call gets a list of negative prompts ("" for a job with none).
        negative_prompt=defaults.empty_negative_is_default or job.negative_prompt is not None,
        format=job.format,
        loras=adapter_set(job.loras),
    )


class BatchBuffer(Generic[T]):
    """Items waiting for peers with the same key; hands out batches of 1..max_batch.

    A key is ready when it holds ``max_batch`` items, or when its oldest item has waited
    ``max_wait_s``. Items of a lower ``rank`` (a higher priority class: ``producer.fair``) go
    first, in their key and among keys; within a rank, the older first. Time is passed in, so
    the policy is tested without clocks.
    """

    def __init__(self, max_batch: int, max_wait_s: float) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        # key -> [(rank, arrival time, item)] in that order; keys in the order of their first item
        self._groups: OrderedDict[Hashable, list[tuple[int, float, T]]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(group) for group in self._groups.values())

    def add(self, key: Hashable, item: T, now: float, rank: int = 0) -> bool:
        """Buffer ``item``; True if it starts a group (due ``max_wait_s`` from ``now``)."""
        group = self._groups.setdefault(key, [])
        entry = (rank, now, item)
        insort(group, entry, key=_order)
        if group[0] is entry and any(_order(other[0]) > _order(entry) for other in self._groups.values()):
            self._resort()  # it goes before another key's first (a retry, a higher class): up the line
        return len(group) == 1

    def take(self, now: float, *, allow_partial: bool = True) -> tuple[Hashable, list[T]] | None:
        """The next batch to run, or None: the first key, by its first item, of those that are
        full or whose oldest item has waited ``max_wait_s`` (due). A due partial key is handed out
        only with ``allow_partial`` (a pool slot is idle); until then it holds the line, so that
        a steady stream of younger full batches never starves it."""
        for key, group in self._groups.items():
            if len(group) >= self.max_batch:
                return key, self._pop(key, self.max_batch)
            if now - min(arrival for _, arrival, _ in group) >= self.max_wait_s:
                return (key, self._pop(key, self.max_batch)) if allow_partial else None
        return None

    def drain(self) -> Iterable[tuple[Hashable, list[T]]]:
        """Every item, as batches, regardless of wait (end of input, shutdown)."""
        while self._groups:
            key = next(iter(self._groups))
            yield key, self._pop(key, self.max_batch)

    def _pop(self, key: Hashable, count: int) -> list[T]:
        group = self._groups[key]
        taken, rest = group[:count], group[count:]
        if rest:
            # Leftovers keep their ranks and arrival times; the key moves back in the line only
            # if its first is now behind another key's.
            self._groups[key] = rest
            self._resort()
        else:
            del self._groups[key]
        return [item for _, _, item in taken]

    def _resort(self) -> None:
        self._groups = OrderedDict(sorted(self._groups.items(), key=lambda entry: _order(entry[1][0])))


def _order(entry: tuple[int, float, object]) -> tuple[int, float]:
    """Where a buffered item stands: by rank, then arrival."""
    return entry[0], entry[1]
