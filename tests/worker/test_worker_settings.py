"""WorkerSettings refuse combinations no batch could run with."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from worker.delivery.batching import BatchBuffer
from worker.settings import WorkerSettings


def test_a_default_scheduler_that_breaks_deepcache_needs_caching_off():
    with pytest.raises(ValidationError, match="DEEPQUEUE_CACHE_INTERVAL=1"):
        WorkerSettings(scheduler="heun", cache_interval=3)
    assert WorkerSettings(scheduler="heun", cache_interval=1).scheduler == "heun"


def test_store_backlog_defaults_to_two_batches():
    assert WorkerSettings(max_batch=4).store_backlog_count == 8
    assert WorkerSettings(max_batch=4, store_backlog=3).store_backlog_count == 3


def test_store_retry_defaults_to_minutes_and_reads_the_environment(monkeypatch):
    assert WorkerSettings().store_retry_s == 600
    monkeypatch.setenv("DEEPQUEUE_STORE_RETRY_S", "90")
    assert WorkerSettings().store_retry_s == 90
    with pytest.raises(ValidationError, match="store_retry_s"):
        WorkerSettings(store_retry_s=-1)


def test_default_prefetch_fills_batches_from_mixed_shapes_beside_what_is_busy():
    settings = WorkerSettings()
    # 10 shapes x 7 + 1: some shape always has 8; plus a batch running, one ahead, 16 being stored.
    assert settings.buffer_for_full_batches == 71 and settings.busy_jobs == 32
    assert settings.prefetch_count == 103
    assert WorkerSettings(mixed_shapes=2, max_batch=4, store_backlog=4).prefetch_count == 7 + 12


@pytest.mark.parametrize("seed", range(20))
def test_a_buffer_of_that_size_always_holds_a_full_batch(seed):
    """Messages of `mixed_shapes` keys in any order: once the buffer holds that many, a full
    batch is ready; one fewer can be all partial (every key one short)."""
    settings = WorkerSettings(mixed_shapes=10, max_batch=8)
    rng = random.Random(seed)
    buffer: BatchBuffer[int] = BatchBuffer(settings.max_batch, max_wait_s=60)
    keys = [rng.randrange(settings.mixed_shapes) for _ in range(settings.buffer_for_full_batches)]
    for item, key in enumerate(keys):
        buffer.add(key, item, now=0.0)
    assert buffer.take(0.0, allow_partial=False) is not None
    worst: BatchBuffer[int] = BatchBuffer(settings.max_batch, max_wait_s=60)
    for item in range(settings.buffer_for_full_batches - 1):
        worst.add(item % settings.mixed_shapes, item, now=0.0)
    assert worst.take(0.0, allow_partial=False) is None


@pytest.mark.parametrize("prefetch", [8, 39])
def test_a_prefetch_that_leaves_nothing_to_batch_from_is_refused(prefetch):
    with pytest.raises(ValidationError, match=r"prefetch \(\d+\) must be at least 40"):
        WorkerSettings(prefetch=prefetch)
    assert WorkerSettings(prefetch=40).prefetch_count == 40


def test_a_visibility_timeout_shorter_than_a_lease_is_refused():
    with pytest.raises(ValidationError, match="visibility_timeout_s"):
        WorkerSettings(visibility_timeout_s=10)
    assert WorkerSettings(visibility_timeout_s=20).visibility_timeout_s == 20
