"""Malformed messages on a real queue, from any producer: each is dropped with one log line that
names its task id, the worker stays up, nothing is deserialised beyond JSON or executed, and the
next good job is served (issue 6, part 1). The same for raw entries on the queue's list that are
no message at all (issue 14)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from ops.localstack import client_for, start_worker, stop, worker_env
from producer import JobState
from producer.contract import TASK_NAME
from producer.enqueue import producer_app
from producer.settings import ClientSettings
from tests.helpers import malformed, publish_raw, raw_entries

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]


def local_worker_env(redis_urls: tuple[str, str], model: Path, tmp_path: Path) -> dict[str, str]:
    """A CPU worker on the test Redis writing local files."""
    broker, backend = redis_urls
    return worker_env(
        broker_url=broker,
        result_backend=backend,
        model=str(model),
        device="cpu",
        storage="local",
        output_dir=str(tmp_path / "out"),
        max_wait_s=0.5,
    )


def test_malformed_messages_are_dropped_and_the_worker_keeps_serving(redis_urls, tiny_model, tmp_path):
    broker, backend = redis_urls
    log = tmp_path / "worker.log"
    env = local_worker_env(redis_urls, tiny_model, tmp_path)
    worker = start_worker(env, log)
    kinds = malformed(tmp_path)
    try:
        ids = publish_raw(broker, kinds)
        with client_for(env) as client:
            # A valid job with a countdown: refused with its reason, not held unacknowledged for an hour.
            (later,) = client.prepare(["later"], run="later", steps=2, width=64, height=64)
            app = producer_app(ClientSettings(broker_url=broker))
            app.send_task(TASK_NAME, args=[later.model_dump(mode="json")], countdown=3600)
            app.close()
            run = client.submit(["after the malformed ones"], run="after", steps=2, width=64, height=64)
            assert run.wait(timeout=120).counts[JobState.DONE] == 1
            refused = client.run("later").wait(timeout=60)
            [result] = client.run("later").results()
            assert refused.counts[JobState.FAILED] == 1 and "eta/countdown is not supported" in result.reason
        assert worker.poll() is None, "a malformed message stopped the worker"
    finally:
        stop(worker)
    text = log.read_text()
    dropped = [line for line in text.splitlines() if "dropping malformed message" in line]
    failed = [line for line in text.splitlines() if "invalid job" in line and "no run to record it in" in line]
    for name, task_id in ids.items():
        if name == "no-id-header":
            continue
        # A readable task with unusable arguments is not dropped: it fails alone, with the reason.
        lines = failed if name == "args-not-a-list" else dropped
        assert any(task_id in line for line in lines), f"{name}: no log line names {task_id}\n{text[-3000:]}"
    assert any("(no id)" in line for line in dropped)
    assert "Unrecoverable error" not in text
    assert not (tmp_path / "executed").exists(), "a message body was deserialised unsafely"
    db = redis.Redis.from_url(broker)
    assert db.llen("deepqueue") == 0 and db.hlen("unacked") == 0, "malformed messages must not come back"
    # Kept for inspection: `deepqueue dead-letters` lists every dropped one, newest first, with why.
    with client_for(env) as client:
        letters = {letter["task_id"]: letter for letter in client.dead_letters()}
    kept = {name for name, task_id in ids.items() if task_id in letters}
    assert kept == set(ids) - {"no-id-header", "args-not-a-list"} and "(no id)" in letters
    assert letters[ids["not-json"]]["body"] == "{not json" and letters[ids["not-json"]]["reason"]


def test_raw_entries_on_the_list_are_dead_lettered_and_the_worker_keeps_serving(redis_urls, tiny_model, tmp_path):
    """Entries pushed straight onto the list (not kombu envelopes) used to stop every worker (not
    JSON: an unrecoverable error) or make it reconnect forever behind healthy probes (no
    ``properties``: a KeyError, which kombu counts as a lost connection)."""
    broker, backend = redis_urls
    log = tmp_path / "worker.log"
    env = local_worker_env(redis_urls, tiny_model, tmp_path)
    worker = start_worker(env, log)
    entries = raw_entries()
    db = redis.Redis.from_url(broker)
    try:
        db.lpush("deepqueue", *entries.values())
        with client_for(env) as client:
            run = client.submit(["after the raw entries"], run="after-raw", steps=2, width=64, height=64)
            assert run.wait(timeout=120).counts[JobState.DONE] == 1
            letters = client.dead_letters()
        assert worker.poll() is None, "a raw entry stopped the worker"
    finally:
        stop(worker)
    text = log.read_text()
    assert "Unrecoverable error" not in text and "Connection to broker lost" not in text
    kept = [letter["body"].encode() for letter in letters]
    for name, entry in entries.items():
        head = entry[:4096].decode("utf-8", errors="replace").encode()
        assert kept.count(head) == 1, f"{name}: not in the dead letters once"
    assert all(letter["reason"].startswith("unreadable queue entry: ") for letter in letters)
    assert db.llen("deepqueue") == 0 and db.hlen("unacked") == 0 and not db.keys("deepqueue:taking:*")
