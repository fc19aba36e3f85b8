"""Prompt batches on a real queue and a real worker (issue 17, item 1): a message carries several
jobs; one bad job fails alone, a batch that is none is dead-lettered, and a batch delivered again
runs only its jobs that are not final. Clients send prompt batches everywhere else in the suite,
so the fault suite runs on them too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from ops.localstack import client_for, start_worker, stop
from producer import JobState
from producer.contract import TASK_NAME
from producer.enqueue import producer_app, queue_message
from producer.entries import entries_of
from producer.packing import pack
from producer.settings import ClientSettings
from producer.state import RunStore
from tests.helpers import wait_until
from tests.integration.test_malformed import local_worker_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECIPE = {"steps": 2, "width": 64, "height": 64}


def images(out: Path, job_id: str) -> list[Path]:
    return list(out.rglob(f"{job_id}.png"))


def test_a_bad_job_fails_alone_and_a_batch_that_is_none_is_dead_lettered(redis_urls, tiny_model, tmp_path):
    """Sent by Celery's own producer: four jobs, one of them invalid, and an entry that is not a
    job at all; and a 'batch' with no jobs. The good ones are done, the invalid one fails in its
    run with the reason, the entry with no run is logged, the empty batch is in the dead letters,
    and nothing stays on the queue."""
    broker, backend = redis_urls
    env = local_worker_env(redis_urls, tiny_model, tmp_path)
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        with client_for(env) as client:
            jobs = client.prepare(["a fox", "an owl", "bad", "a koi"], run="mixed", **RECIPE)
            payload = pack(entries_of(jobs))
            payload["jobs"][2]["steps"] = 0
            payload["jobs"].append("not a job")
            app = producer_app(ClientSettings(broker_url=broker))
            app.send_task(TASK_NAME, args=[payload], task_id="mixed-batch")
            app.send_task(TASK_NAME, args=[{"run_id": "mixed", "jobs": []}], task_id="empty-batch")
            app.close()
            store = RunStore.from_url(backend)
            ended = (JobState.DONE, JobState.FAILED)
            wait_until(lambda: sum(store.counts("mixed")[s] for s in ended) == 4, 120, "the batch's jobs to end")
            results = {result.job_id: result for result in client.run("mixed").results()}
            wait_until(client.dead_letters, 60, "the empty batch's dead letter")
            letters = {letter["task_id"]: letter for letter in client.dead_letters()}
        assert worker.poll() is None
    finally:
        stop(worker)
    assert store.counts("mixed")[JobState.FAILED] == 1
    assert all(results[job.job_id].state is JobState.DONE for job in (jobs[0], jobs[1], jobs[3]))
    assert "steps: Input should be greater than or equal to 1" in results["mixed-batch#2"].reason
    assert "task mixed-batch#4: invalid job" in (tmp_path / "worker.log").read_text()
    assert "a prompt batch holds a list of 1 to 64 jobs" in letters["empty-batch"]["reason"]
    db = redis.Redis.from_url(broker)
    assert db.llen("deepqueue") == 0 and db.hlen("unacked") == 0


def test_a_batch_delivered_again_runs_only_its_jobs_that_are_not_final(redis_urls, tiny_model, tmp_path):
    """A message goes back to the queue when one of its jobs could not be decided; when it comes
    again, its jobs that ended meanwhile (done, failed, cancelled) end at once: nothing of them is
    generated or written again, and a failed one keeps its reason."""
    broker, backend = redis_urls
    env = local_worker_env(redis_urls, tiny_model, tmp_path)
    store = RunStore.from_url(backend)
    with client_for(env) as client:
        jobs = client.prepare([f"prompt {i}" for i in range(4)], run="again", **RECIPE)
    done, failed, *rest = jobs
    store.mark_queued("again", [job.job_id for job in jobs])
    store.mark("again", done.job_id, JobState.RUNNING, worker="earlier")
    store.mark("again", done.job_id, JobState.DONE, key="file:///earlier/done.png")
    store.mark("again", failed.job_id, JobState.FAILED, reason="an earlier delivery failed it")
    message = json.loads(queue_message(entries_of(jobs), queue="deepqueue", enqueued_at=1.8e9))
    message["headers"]["redelivered"] = True  # as kombu marks a message it restores
    redis.Redis.from_url(broker).lpush("deepqueue", json.dumps(message))
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        with client_for(env) as client:
            status = client.run("again").wait(timeout=120)
            results = {result.job_id: result for result in client.run("again").results()}
    finally:
        stop(worker)
    assert status.counts[JobState.DONE] == 3 and status.counts[JobState.FAILED] == 1
    out = tmp_path / "out"
    assert all(len(images(out, job.job_id)) == 1 for job in rest)
    assert not images(out, done.job_id) and not images(out, failed.job_id)
    assert results[done.job_id].key == "file:///earlier/done.png"
    assert results[failed.job_id].reason == "an earlier delivery failed it"
    db = redis.Redis.from_url(broker)
    assert db.llen("deepqueue") == 0 and db.hlen("unacked") == 0
