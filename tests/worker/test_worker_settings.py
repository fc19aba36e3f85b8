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
