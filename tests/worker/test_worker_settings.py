"""WorkerSettings refuse combinations no batch could run with."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

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
