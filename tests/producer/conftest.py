"""Fixtures of every producer test."""

from __future__ import annotations

import os

import pytest
import redis

from producer.state import RunStore


@pytest.fixture(autouse=True)
def no_deepqueue_env(monkeypatch, tmp_path):
    """A developer's own DEEPQUEUE_* settings must not leak into these tests; clients keep the
    jobs they send (``producer.sent``) in a folder of the test's own."""
    for name in [name for name in os.environ if name.startswith("DEEPQUEUE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("DEEPQUEUE_STORAGE", "local")
    monkeypatch.setenv("DEEPQUEUE_OUTPUT_DIR", str(tmp_path / "storage"))


@pytest.fixture
def backend(redis_urls) -> redis.Redis:
    """The result backend's database, for tests that look at the run state's keys themselves."""
    return redis.Redis.from_url(redis_urls[1])


@pytest.fixture
def store(backend) -> RunStore:
    return RunStore(backend)
