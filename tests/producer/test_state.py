"""RunStore against a real Redis: transitions, counts that agree with records, streaming results."""

from __future__ import annotations

from collections import Counter

import pytest
import redis

from producer.layout import RUNS_KEY
from producer.state import STATES, JobResult, JobState, RunStatus, RunStore, format_duration, images_per_s, rate_minutes

RUN = "run-a"
QUEUED, RUNNING, DONE, FAILED, CANCELLED = tuple(JobState)


def sent(job_ids) -> list[str]:
    return list(job_ids)


def consistent_counts(store: RunStore, run_id: str) -> dict[JobState, int]:
    """Counts from the per-state sets, checked against the records themselves."""
    counts = store.counts(run_id)
    from_records = Counter(result.state for result in store.results(run_id))
    assert counts == {state: from_records.get(state, 0) for state in STATES}
    return counts


def test_from_url_talks_to_that_database(redis_urls):
    store = RunStore.from_url(redis_urls[1])
    store.mark_queued(RUN, sent(["j0"]))
    assert redis.Redis.from_url(redis_urls[1]).zscore(RUNS_KEY, RUN) is not None
    assert redis.Redis.from_url(redis_urls[0]).zscore(RUNS_KEY, RUN) is None


def test_mark_queued_new_jobs(store):
    assert store.states(RUN, ["j0", "j1"]) == [None, None]
    store.mark_queued(RUN, sent(["j0", "j1", "j2"]))
    assert store.states(RUN, ["j0", "j1", "j2", "nope"]) == [QUEUED, QUEUED, QUEUED, None]
    assert consistent_counts(store, RUN) == {QUEUED: 3, RUNNING: 0, DONE: 0, FAILED: 0, CANCELLED: 0}


def test_mark_queued_empty_registers_the_run(store):
    store.mark_queued(RUN, sent([]))
    assert store.states(RUN, []) == []
    assert store.exists(RUN)


def test_mark_queued_leaves_running_and_done_alone(store):
    store.mark_queued(RUN, sent(["q", "r", "d", "f"]))
    assert store.mark(RUN, "r", RUNNING)
    assert store.mark(RUN, "d", DONE, key="runs/run-a/d.png")
    assert store.mark(RUN, "f", FAILED, reason="boom")
    assert store.states(RUN, ["q", "r", "d", "f", "new"]) == [QUEUED, RUNNING, DONE, FAILED, None]
    store.mark_queued(RUN, sent(["q", "r", "d", "f", "new"]))
    states = {result.job_id: result.state for result in store.results(RUN)}
    assert states == {"q": QUEUED, "r": RUNNING, "d": DONE, "f": QUEUED, "new": QUEUED}
    assert consistent_counts(store, RUN) == {QUEUED: 3, RUNNING: 1, DONE: 1, FAILED: 0, CANCELLED: 0}
    # the refused transitions left the records as they were
    assert store.get(RUN, "d").key == "runs/run-a/d.png"


def test_requeue_of_failed_job_drops_its_reason(store):
    store.mark_queued(RUN, sent(["f"]))
    store.mark(RUN, "f", FAILED, reason="boom")
    store.mark_queued(RUN, sent(["f"]))
    result = store.get(RUN, "f")
    assert result.state == QUEUED and result.reason is None


@pytest.mark.parametrize("after", [RUNNING, FAILED, QUEUED])
def test_done_is_final(store, after):
    store.mark_queued(RUN, sent(["j"]))
    store.mark(RUN, "j", RUNNING)
    assert store.mark(RUN, "j", DONE, key="k")
    assert store.mark(RUN, "j", after, reason="late redelivery") is False
    result = store.get(RUN, "j")
    assert result.state == DONE and result.key == "k" and result.reason is None
    assert consistent_counts(store, RUN)[DONE] == 1


def test_done_twice_keeps_the_first_record_and_one_count(store):
    """The first record matches the write-once sidecar; a duplicate delivery must not replace it."""
    store.mark_queued(RUN, sent(["j"]))
    assert store.mark(RUN, "j", DONE, key="first")
    assert store.mark(RUN, "j", DONE, key="second") is False
    assert store.get(RUN, "j").key == "first"
    assert consistent_counts(store, RUN) == {QUEUED: 0, RUNNING: 0, DONE: 1, FAILED: 0, CANCELLED: 0}


def test_queued_after_running_refused(store):
    store.mark_queued(RUN, sent(["j"]))
    store.mark(RUN, "j", RUNNING, worker="gpu0")
    assert store.mark(RUN, "j", QUEUED) is False
    assert store.get(RUN, "j").state == RUNNING
    assert store.get(RUN, "j").details["worker"] == "gpu0"


@pytest.mark.parametrize(
    ("path", "final"),
    [
        ([QUEUED, RUNNING, DONE], DONE),
        ([QUEUED, RUNNING, FAILED], FAILED),
        ([QUEUED, RUNNING, RUNNING, DONE], DONE),  # redelivered while running
        ([QUEUED, RUNNING, FAILED, RUNNING, DONE], DONE),  # retried after a failure
        ([QUEUED, FAILED, QUEUED, RUNNING, FAILED], FAILED),
        ([RUNNING, DONE], DONE),  # a job never marked queued (other producer)
    ],
)
def test_allowed_paths(store, path, final):
    for state in path:
        assert store.mark(RUN, "j", state)
    assert store.get(RUN, "j").state == final
    counts = consistent_counts(store, RUN)
    assert counts[final] == 1 and sum(counts.values()) == 1


def test_counts_of_many_jobs_in_every_state(store):
    ids = [f"j{n:03d}" for n in range(40)]
    store.mark_queued(RUN, sent(ids))
    for job in ids[:30]:
        store.mark(RUN, job, RUNNING)
    for job in ids[:12]:
        store.mark(RUN, job, DONE, key=f"{job}.png")
    for job in ids[12:20]:
        store.mark(RUN, job, FAILED, reason="oom")
    assert consistent_counts(store, RUN) == {QUEUED: 10, RUNNING: 10, DONE: 12, FAILED: 8, CANCELLED: 0}


def test_runs_are_kept_apart(store):
    store.mark_queued("run-a", sent(["same-id"]))
    store.mark_queued("run-b", sent(["same-id"]))
    store.mark(RUN, "same-id", DONE)
    assert store.get("run-b", "same-id").state == QUEUED
    assert store.counts("run-b")[QUEUED] == 1 and store.counts("run-a")[DONE] == 1


def test_results_stream_all_of_a_large_run(store):
    ids = [f"{n:08d}-abc" for n in range(2500)]
    for start in range(0, len(ids), 1000):
        store.mark_queued(RUN, sent(ids[start : start + 1000]))
    for job in ids[:700]:
        store.mark(RUN, job, DONE, key=f"out/{job}.png")
    results = list(store.results(RUN))
    assert len(results) == 2500
    assert sorted(result.job_id for result in results) == ids
    assert consistent_counts(store, RUN) == {QUEUED: 1800, RUNNING: 0, DONE: 700, FAILED: 0, CANCELLED: 0}
    assert all(result.key == f"out/{result.job_id}.png" for result in results if result.state == DONE)


def test_results_of_unknown_run_are_empty(store):
    assert list(store.results("nope")) == []
    assert store.counts("nope") == {QUEUED: 0, RUNNING: 0, DONE: 0, FAILED: 0, CANCELLED: 0}
    assert store.get("nope", "j") is None


def test_runs_and_exists(store):
    assert store.runs() == [] and not store.exists("first")
    store.mark_queued("first", sent(["j"]))
    store.mark_queued("second", sent(["j"]))
    store.mark_queued("first", sent(["k"]))  # resubmission keeps the first submission time
    assert store.runs() == ["first", "second"]
    assert store.exists("first") and store.exists("second") and not store.exists("third")


def test_a_run_only_workers_wrote_exists_but_is_not_listed(store):
    """Hand-made messages name runs no client submitted: their failures stay readable."""
    store.mark("worker-only", "j", FAILED, reason="invalid job")
    assert store.exists("worker-only")
    assert "worker-only" not in store.runs()


def test_job_result_fields(store):
    store.mark_queued(RUN, sent(["ok", "bad", "run"]))
    store.mark(RUN, "ok", DONE, key="s3://bucket/run-a/ok.png")
    store.mark(RUN, "bad", FAILED, reason="prompt too long for the tokenizer")
    store.mark(RUN, "run", RUNNING, worker="gpu0@host")
    ok, bad, running = store.get(RUN, "ok"), store.get(RUN, "bad"), store.get(RUN, "run")
    assert isinstance(ok, JobResult)
    assert (ok.job_id, ok.state, ok.key, ok.reason, ok.details) == ("ok", DONE, "s3://bucket/run-a/ok.png", None, {})
    assert (bad.state, bad.key, bad.reason, bad.details) == (FAILED, None, "prompt too long for the tokenizer", {})
    assert (running.state, running.details) == (RUNNING, {"worker": "gpu0@host"})
    assert {result.job_id: result for result in store.results(RUN)} == {"ok": ok, "bad": bad, "run": running}
    assert store.meta(RUN)["last_failed_at"] > 0  # when the run's last job failed


def test_keys_share_one_cluster_hash_tag(store, backend):
    store.mark_queued("tagged", sent(["j", "00000001-0123456789ab"]))
    store.mark("tagged", "j", RUNNING, worker="w")
    keys = sorted(key.decode() for key in backend.keys("deepqueue:*"))
    assert keys == [
        "deepqueue:runs",
        "deepqueue:{tagged}:blocks",
        "deepqueue:{tagged}:counts",
        "deepqueue:{tagged}:meta",
        "deepqueue:{tagged}:others",
        "deepqueue:{tagged}:running",
        "deepqueue:{tagged}:slots:0",
    ]


def test_job_state_is_a_string_enum():
    assert JobState("done") is DONE and DONE == "done"
    assert [state.value for state in STATES] == ["queued", "running", "done", "failed", "cancelled"]


def test_run_status_properties_and_text():
    status = RunStatus("r", {QUEUED: 1, RUNNING: 2, DONE: 3, FAILED: 4, CANCELLED: 0})
    assert (status.total, status.finished, status.is_finished) == (10, 7, False)
    assert str(status) == "r: 10 jobs (queued 1, running 2, done 3, failed 4, cancelled 0)"
    assert RunStatus("r", {QUEUED: 0, RUNNING: 0, DONE: 2, FAILED: 1, CANCELLED: 0}).is_finished


# -- recipes ----------------------------------------------------------------------------------------


def test_the_first_claim_records_the_recipe_and_later_ones_read_it(store, backend):
    assert store.recipes(RUN) == []
    assert store.claim_recipe(RUN, {"steps": 5, "seed": 1}) == [{"steps": 5, "seed": 1}]
    assert store.claim_recipe(RUN, {"seed": 1, "steps": 5}) == [{"steps": 5, "seed": 1}]  # key order is not a change
    assert store.claim_recipe(RUN, {"steps": 6, "seed": 1}) == [{"steps": 5, "seed": 1}]  # read, not recorded
    assert store.recipes(RUN) == [{"steps": 5, "seed": 1}]
    assert backend.hlen("deepqueue:{run-a}:recipes") == 1


def test_adding_a_recipe_keeps_the_order_they_came_in(store):
    store.claim_recipe(RUN, {"steps": 5})
    assert store.claim_recipe(RUN, {"steps": 6}, add=True) == [{"steps": 5}, {"steps": 6}]
    assert store.claim_recipe(RUN, {"steps": 5}, add=True) == [{"steps": 5}, {"steps": 6}]
    assert store.recipes(RUN) == [{"steps": 5}, {"steps": 6}]


def test_a_run_with_jobs_but_no_recipe_is_left_alone(store, backend):
    """Submitted by a client from before recipes were recorded: nothing to compare, nothing written."""
    store.mark_queued(RUN, sent(["j"]))
    assert store.claim_recipe(RUN, {"steps": 5}) is None
    assert store.claim_recipe(RUN, {"steps": 5}, add=True) is None
    assert not backend.exists("deepqueue:{run-a}:recipes")


# -- cancel, delete, rate ---------------------------------------------------------------------------


def test_cancel_ends_queued_jobs_and_lets_running_ones_finish(store):
    store.mark_queued(RUN, sent(["q0", "q1", "r", "f"]))
    store.mark(RUN, "r", RUNNING)
    store.mark(RUN, "f", FAILED, reason="bad")
    assert store.cancel(RUN) == 2
    assert consistent_counts(store, RUN) == {QUEUED: 0, RUNNING: 1, DONE: 0, FAILED: 1, CANCELLED: 2}
    assert store.get(RUN, "q0").reason == "run cancelled"
    assert store.mark(RUN, "r", DONE, key="k")  # a running job finishes
    assert store.status(RUN).is_finished
    assert store.cancel(RUN) == 0 and "cancelled_at" in store.meta(RUN)


def test_a_cancelled_run_cancels_what_would_start_or_be_queued(store):
    """A worker starting a job (first time, or again after its process died) and a producer
    queueing one, after the cancel: the job ends cancelled, so the run can finish."""
    store.mark_queued(RUN, sent(["late", "again"]))
    store.mark(RUN, "again", RUNNING)  # its pool process dies; it will be run again
    store.cancel(RUN)
    assert not store.mark(RUN, "late", RUNNING)  # refused: the worker drops it
    assert not store.mark(RUN, "again", RUNNING)
    store.mark_queued(RUN, sent(["new"]))
    assert store.states(RUN, ["late", "again", "new"]) == [CANCELLED, CANCELLED, CANCELLED]
    assert store.status(RUN).is_finished
    assert not store.mark(RUN, "late", DONE, key="k")  # cancelled is final


def test_a_resumed_run_queues_its_cancelled_jobs_again_and_only_them(store):
    store.mark_queued(RUN, sent(["q", "r", "d"]))
    store.mark(RUN, "r", RUNNING)
    store.mark(RUN, "d", RUNNING)
    store.mark(RUN, "d", DONE, key="k")
    store.cancel(RUN)
    assert not store.resume("never-cancelled") and store.resume(RUN) and not store.resume(RUN)
    assert "cancelled_at" not in store.meta(RUN)
    assert list(store.job_ids(RUN, CANCELLED)) == ["q"]
    assert not store.mark(RUN, "q", RUNNING)  # a message of the cancel's time: still cancelled
    store.mark_queued(RUN, ["q", "d"])  # what Client.resume sends
    assert store.states(RUN, ["q", "r", "d"]) == [QUEUED, RUNNING, DONE]
    assert store.mark(RUN, "q", RUNNING) and store.mark(RUN, "q", DONE, key="k2")


def test_drop_if_stopped_settles_a_stopped_runs_jobs_and_leaves_a_live_runs_alone(store):
    """What a worker asks of the messages of runs it believes stopped (``worker.delivery.stopped``)."""
    store.mark_queued(RUN, sent(["q", "r", "d"]))
    store.mark(RUN, "r", RUNNING)  # its pool process died: its message comes again
    store.mark(RUN, "d", RUNNING)
    store.mark(RUN, "d", DONE, key="k")
    assert not store.stopped(RUN) and not store.drop_if_stopped(RUN, ["q", "r", "d"])
    assert store.states(RUN, ["q", "r", "d"]) == [QUEUED, RUNNING, DONE]  # a live run: nothing written
    store._redis.hset(f"deepqueue:{{{RUN}}}:meta", "cancelled_at", 1.0)  # cancelled, the queued job not yet marked
    assert store.stopped(RUN) and store.drop_if_stopped(RUN, ["q", "r", "d"])
    assert store.states(RUN, ["q", "r", "d"]) == [CANCELLED, CANCELLED, DONE]
    assert store.status(RUN).is_finished and store.get(RUN, "r").reason == "run cancelled"
    store.delete(RUN)
    assert store.stopped(RUN) and store.drop_if_stopped(RUN, ["q"]) and not store.exists(RUN)


def test_a_deleted_run_leaves_only_a_tombstone_that_writes_nothing(store, backend):
    store.mark_queued(RUN, sent(["a", "b"]))
    store.mark(RUN, "a", RUNNING)
    store.count_loss(RUN, "a")
    store.claim_recipe(RUN, {"steps": 4})
    store.delete(RUN)
    assert not store.exists(RUN) and RUN not in store.runs()
    assert [key.decode() for key in backend.keys(f"deepqueue:{{{RUN}}}:*")] == [f"deepqueue:{{{RUN}}}:meta"]
    assert 0 < backend.ttl(f"deepqueue:{{{RUN}}}:meta") <= 7 * 86400
    assert not store.mark(RUN, "b", RUNNING) and not store.mark(RUN, "a", DONE, key="k")
    assert backend.keys(f"deepqueue:{{{RUN}}}:counts") == []  # a message still queued recreates nothing
    assert store.deleted(RUN) and [name for name, _ in store.deleted_since()] == [RUN]
    store.reuse_deleted(RUN)
    assert not store.deleted(RUN) and store.deleted_since() == []
    store.mark_queued(RUN, sent(["a"]))
    assert store.states(RUN, ["a"]) == [QUEUED]


def test_deleted_runs_are_listed_by_first_submit_while_their_tombstones_last(store, backend):
    store.mark_queued("old", sent(["a"]))
    backend.zadd("deepqueue:runs", {"old": 1000.0})
    store.delete("old")
    store.delete("never-submitted")
    listed = dict(store.deleted_since())
    assert listed["old"] == 1000.0 and listed["never-submitted"] > 1000.0
    backend.delete("deepqueue:{old}:meta")  # its tombstone expired
    assert [name for name, _ in store.deleted_since()] == ["never-submitted"]
    assert backend.zscore("deepqueue:deleted", "old") is None


def test_rate_lately_while_running_and_overall_once_finished():
    now = 1_000_000.0 * 60 + 30  # 30 s into a minute
    minutes = rate_minutes(now)
    assert minutes[-1] == int(now // 60) and len(minutes) == 6  # 5 minutes back, and this one
    meta = {"first_started_at": now - 3600, "last_done_at": now - 10}
    counts = [0] * 5 + [33]
    # the 6 minutes' counts over the time since the first one began: 330 s
    assert images_per_s(meta, 1000, counts, now, finished=False) == pytest.approx(33 / 330)
    assert images_per_s({"first_started_at": now - 20}, 10, counts, now, finished=False) == pytest.approx(33 / 20)
    assert images_per_s(meta, 1000, counts, now, finished=True) == pytest.approx(1000 / 3590)
    assert images_per_s({}, 0, counts, now, finished=False) is None


def test_store_status_has_the_rate_and_eta(store):
    store.mark_queued(RUN, sent(["a", "b", "c"]))
    for job in ("a", "b"):
        store.mark(RUN, job, RUNNING)
        store.mark(RUN, job, DONE, key="k")
    status = store.status(RUN)
    assert status.images_per_s > 0 and status.eta_s == pytest.approx(1 / status.images_per_s)
    assert format_duration(42) == "42s" and format_duration(185) == "3m05s" and format_duration(7620) == "2h07m"


def test_a_claim_takes_new_and_failed_jobs_once_and_a_failed_publish_gives_them_back(store):
    store.mark_queued(RUN, sent(["q", "r", "d", "f"]))
    store.mark(RUN, "r", RUNNING)
    store.mark(RUN, "d", DONE)
    store.mark(RUN, "f", FAILED, reason="boom")
    claimed = store.claim_queued(RUN, sent(["q", "r", "d", "f", "new"]))
    assert claimed == {"f": "fboom", "new": ""}  # what each was: failed (with its reason), or nothing
    assert store.claim_queued(RUN, sent(["q", "r", "d", "f", "new"])) == {}  # a second producer: nothing
    assert set(store.claim_queued(RUN, sent(["q", "f", "new"]), resend_queued=True)) == {"q", "f", "new"}
    store.unclaim(RUN, claimed)
    assert store.states(RUN, ["q", "r", "d", "f", "new"]) == [QUEUED, RUNNING, DONE, FAILED, None]
    assert store.get(RUN, "f").reason == "boom"
    assert consistent_counts(store, RUN) == {QUEUED: 1, RUNNING: 1, DONE: 1, FAILED: 1, CANCELLED: 0}


def test_an_unclaim_leaves_jobs_a_worker_took_meanwhile(store):
    claimed = store.claim_queued(RUN, sent(["taken", "left"]))
    store.mark(RUN, "taken", RUNNING)  # its message was flushed before the publish failed
    store.unclaim(RUN, claimed)
    assert store.states(RUN, ["taken", "left"]) == [RUNNING, None]


def test_a_claim_in_a_cancelled_run_queues_nothing(store):
    store.mark_queued(RUN, sent(["a"]))
    store.cancel(RUN)
    assert store.claim_queued(RUN, sent(["b"])) == {}
    assert store.states(RUN, ["a", "b"]) == [CANCELLED, CANCELLED]


def test_a_run_no_client_submitted_is_listed_when_its_first_job_starts(store):
    store.mark("by-hand", "j0", RUNNING)
    assert "by-hand" in store.runs()
    at = dict(store.runs_since())["by-hand"]
    store.mark("by-hand", "j1", RUNNING)
    assert dict(store.runs_since())["by-hand"] == at  # listed once, at its first start
