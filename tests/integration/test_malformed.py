"""Malformed messages on a real queue, from any producer: each is dropped with one log line that
names its task id, the worker stays up, nothing is deserialised beyond JSON or executed, and the
next good job is served (issue 6, part 1)."""

from __future__ import annotations

import pickle
import uuid
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Queue

from ops.localstack import start_worker, stop, worker_env
from producer import Client, JobState
from producer.contract import TASK_NAME
from producer.enqueue import producer_app
from producer.settings import ClientSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class CreatesFile:
    """Unpickling this creates a file: the test checks that nobody unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def malformed(tmp_path: Path) -> dict[str, tuple[bytes, str, dict]]:
    """name -> (body, content type, headers); every one is a message a worker must survive."""
    task = {"task": TASK_NAME}
    canary = tmp_path / "executed"
    good_body = b'[[{"run_id": "x", "index": 0, "prompt": "p", "seed": 1}], {}, {}]'
    return {
        "not-json": (b"{not json", "application/json", task),
        "pickle": (pickle.dumps(CreatesFile(canary)), "application/x-python-serialize", task),
        "yaml": (f"!!python/object/apply:os.system ['touch {canary}']".encode(), "application/x-yaml", task),
        "json-null": (b"null", "application/json", task),
        "json-string": (b'"generate a cat"', "application/json", task),
        "json-object": (b'{"prompt": "a cat"}', "application/json", task),
        "two-elements": (b'[[{"prompt": "a cat"}], {}]', "application/json", task),
        "no-id-header": (good_body, "application/json", task),
        "task-header-list": (good_body, "application/json", {"task": [TASK_NAME]}),
        "task-header-dict": (good_body, "application/json", {"task": {"name": TASK_NAME}}),
        "args-not-a-list": (b'[{"prompt": "a cat"}, {}, {}]', "application/json", task),
    }


def test_malformed_messages_are_dropped_and_the_worker_keeps_serving(redis_urls, tiny_model, tmp_path):
    broker, backend = redis_urls
    env = worker_env(
        broker_url=broker,
        result_backend=backend,
        model=str(tiny_model),
        device="cpu",
        storage="local",
        output_dir=str(tmp_path / "out"),
        max_wait_s=0.5,
    )
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    kinds = malformed(tmp_path)
    ids = {}
    try:
        queue = Queue("deepqueue", Exchange("deepqueue", "direct"), "deepqueue")
        with Connection(broker) as connection:
            producer = connection.Producer()
            for name, (body, content_type, headers) in kinds.items():
                ids[name] = f"bad-{name}-{uuid.uuid4().hex[:6]}"
                extra = {} if name == "no-id-header" else {"id": ids[name]}
                producer.publish(
                    body,
                    exchange=queue.exchange,
                    routing_key="deepqueue",
                    declare=[queue],
                    content_type=content_type,
                    content_encoding="utf-8" if content_type != "application/x-python-serialize" else "binary",
                    headers={**headers, **extra},
                )
        with Client(broker, backend) as client:
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
    import redis

    db = redis.Redis.from_url(broker)
    assert db.llen("deepqueue") == 0 and db.hlen("unacked") == 0, "malformed messages must not come back"
