"""The consumer's guess of which runs are stopped (``worker.delivery.stopped``), on passed-in times."""

from __future__ import annotations

from worker.delivery.stopped import MAX_RUNS, StoppedRuns


class Fetch:
    def __init__(self) -> None:
        self.stopped: set[str] = set()
        self.asked: list[str] = []

    def __call__(self, run_id: str) -> bool:
        self.asked.append(run_id)
        return run_id in self.stopped


def test_an_answer_is_reused_for_its_ttl_then_asked_again():
    fetch = Fetch()
    runs = StoppedRuns(fetch, ttl_s=1.0)
    assert not runs.maybe_stopped("a", 10.0)
    fetch.stopped.add("a")  # cancelled now: the guess is stale for up to the ttl
    assert not runs.maybe_stopped("a", 10.9)
    assert runs.maybe_stopped("a", 11.0)
    assert fetch.asked == ["a", "a"]


def test_the_lua_calls_answer_replaces_the_guess():
    fetch = Fetch()
    fetch.stopped.add("a")
    runs = StoppedRuns(fetch, ttl_s=1.0)
    assert runs.maybe_stopped("a", 0.0)
    runs.learn("a", False, 0.5)  # resumed: the settling call found it live
    assert not runs.maybe_stopped("a", 1.2) and fetch.asked == ["a"]


def test_answers_kept_are_bounded():
    runs = StoppedRuns(Fetch())
    for i in range(MAX_RUNS + 10):
        runs.maybe_stopped(f"run-{i}", 0.0)
    assert len(runs._known) == MAX_RUNS and "run-0" not in runs._known
