"""A worker's webhook side never costs a job anything (``worker.notifier``): with the result
backend unreachable for the notifier, or the GPU-seconds count failing, the job's own state is
recorded as it would be, and the thread goes on."""

from __future__ import annotations

import logging
import socket

import pytest

from producer.settings import ClientSettings
from producer.state import JobState, RunStore
from tests.helpers import wait_until
from worker.embedded import MemoryReporter
from worker.notifier import Notifier, ObservedReporter


@pytest.fixture
def dead_redis_url() -> str:
    """A Redis URL on a loopback port nothing listens on: every call is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


def test_a_notifier_that_cannot_reach_redis_fails_no_job(dead_redis_url, caplog):
    notifier = Notifier(ClientSettings(result_backend=dead_redis_url))
    reporter = ObservedReporter(MemoryReporter(), notifier)
    try:
        with caplog.at_level(logging.WARNING, logger="worker.notifier"):
            assert reporter.mark("r", "r#0", JobState.RUNNING, worker="w")
            assert reporter.mark("r", "r#0", JobState.DONE, key="s3://b/r/images/r#0.png")
            wait_until(lambda: "could not notify its end" in caplog.text, 30, "the notifier's warning")
            assert reporter.mark("r", "r#1", JobState.FAILED, reason="generation failed: x")  # it goes on
            wait_until(lambda: caplog.text.count("could not notify its end") >= 2, 30, "a second warning")
    finally:
        notifier.stop()
    assert reporter.get("r", "r#0").state is JobState.DONE and reporter.get("r", "r#1").state is JobState.FAILED


def test_counting_gpu_seconds_on_an_unreachable_redis_is_logged_not_raised(dead_redis_url, caplog):
    reporter = ObservedReporter(RunStore.from_url(dead_redis_url), Notifier(ClientSettings()))
    with caplog.at_level(logging.WARNING, logger="worker.notifier"):
        reporter.add_gpu_seconds("r", 0.5)
    assert "could not count 0.500 GPU seconds" in caplog.text


def test_only_final_states_that_moved_wake_the_notifier():
    class Recording(Notifier):
        def __init__(self) -> None:
            super().__init__(ClientSettings())
            self.seen: list[str] = []

        def observe(self, run_id: str) -> None:
            self.seen.append(run_id)

    notifier = Recording()
    reporter = ObservedReporter(MemoryReporter(), notifier)
    reporter.mark("r", "r#0", JobState.RUNNING, worker="w")
    assert notifier.seen == []
    reporter.mark("r", "r#0", JobState.DONE, key="k")
    reporter.mark("r", "r#0", JobState.FAILED, reason="late")  # refused: done is final
    assert notifier.seen == ["r"]
