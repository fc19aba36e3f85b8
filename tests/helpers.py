"""What several test modules share: the sidecar's required fields, a local worker, one job
factory (``make_job``, ``deliveries``), malformed messages, and the one way a test waits for
something (``wait_until``, ``wait_for_count``)."""

from __future__ import annotations

import json
import os
import pickle
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from producer.contract import TASK_NAME
from producer.fair import TOKEN, queue_keys
from producer.job import Job
from producer.layout import run_list_key
from producer.message import unpack

#: The sidecar fields the job contract promises (issue #2), and its timing fields.
SIDECAR_FIELDS = frozenset(
    {"job_id", "run_id", "prompt", "negative_prompt", "seed", "height", "width", "steps", "guidance",
     "scheduler", "model", "deepcache", "batch", "timing", "worker"}
)  # fmt: skip
TIMING_FIELDS = frozenset(
    {"enqueued_at", "started_at", "finished_at", "queue_wait_s", "batch_inference_s", "inference_s",
     "encode_s", "upload_s"}
)  # fmt: skip


def queued_entries(broker: redis.Redis | str, queue: str = "deepqueue") -> list[bytes]:
    """The messages waiting in ``queue`` as Redis holds them: those on its list, oldest first,
    then each run's (``producer.fair``), oldest first."""
    client = redis.Redis.from_url(broker) if isinstance(broker, str) else broker
    # kombu LPUSHes and BRPOPs: the tail is the oldest
    entries = [raw for raw in reversed(client.lrange(queue, 0, -1)) if raw != TOKEN]
    for key in sorted(client.scan_iter(run_list_key(queue, "*"))):
        entries += reversed(client.lrange(key, 0, -1))
    return entries


def lose_queue(broker: redis.Redis | str, queue: str = "deepqueue") -> None:
    """Delete everything ``queue`` holds (a queue lost): its list, its runs' lists, its fair share."""
    client = redis.Redis.from_url(broker) if isinstance(broker, str) else broker
    client.delete(queue, *client.scan_iter(run_list_key(queue, "*")), *queue_keys(queue))


def queued_messages(broker: redis.Redis | str, queue: str = "deepqueue") -> list[dict[str, Any]]:
    """``queued_entries`` as kombu envelopes."""
    return [json.loads(raw) for raw in queued_entries(broker, queue)]


def queued_jobs(broker: redis.Redis | str, queue: str = "deepqueue") -> list[dict[str, Any]]:
    """The jobs waiting in ``queue`` (as ``queued_messages`` orders them), each as its fields:
    what the messages carry, one job or a prompt batch each, unpacked as a worker does
    (hand-made messages are deepqueue's JSON ones)."""
    jobs = []
    for message in queued_messages(broker, queue):
        [payload, *_], _kwargs, _embed = json.loads(message["body"])
        jobs += unpack(payload) or [payload]
    return jobs


def make_job(index: int = 0, **fields: Any) -> Job:
    """A valid job of run ``run-1`` at 64x64, its prompt and seed from ``index``; ``fields``
    replace any field (a module's own defaults: ``functools.partial(make_job, ...)``)."""
    return Job(
        **{"run_id": "run-1", "index": index, "prompt": f"a cat {index}", "seed": 1000 + index, "height": 64,
           "width": 64, **fields}
    )  # fmt: skip


def deliveries(*indexes: int, **fields: Any) -> list[Any]:
    """What the strategy hands a pool process for ``make_job(index, **fields)`` of each index."""
    from worker.pipeline.executor import Delivery

    jobs = [make_job(index, **fields) for index in indexes]
    return [Delivery(job.job_id, job.model_dump(mode="json")) for job in jobs]


def wait_until(condition: Callable[[], object], timeout: float, what: str, poll_s: float = 0.05) -> None:
    """Poll ``condition`` until it is true. ``timeout`` only bounds a hang: make it generous, the
    wait ends as soon as the condition holds. A Redis connection error counts as "not yet" (the
    fault under test may be going on)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except redis.ConnectionError:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)


def wait_for_count(count: Callable[[], int], target: int, stall_s: float, what: str, poll_s: float = 0.5) -> None:
    """Wait until ``count()`` reaches ``target``, failing only when it has not grown for
    ``stall_s``: a loaded machine makes a long run slower, not stuck, so no total is assumed."""
    seen, moved_at = -1, time.monotonic()
    while True:
        try:
            now = count()
        except redis.ConnectionError:
            now = seen
        if now >= target:
            return
        if now > seen:
            seen, moved_at = now, time.monotonic()
        assert time.monotonic() - moved_at < stall_s, f"{what}: stuck at {seen} of {target} for {stall_s:g} s"
        time.sleep(poll_s)


def local_worker_settings(model: Path, out: Path, **overrides: Any) -> Any:
    """WorkerSettings for the tiny model on CPU, local storage, independent of DEEPQUEUE_* vars."""
    from worker.settings import WorkerSettings

    fields: dict[str, Any] = dict(
        model=str(model),
        device="cpu",
        max_batch=4,
        scheduler="ddim",
        cache_interval=3,
        cache_branch=0,
        storage="local",
        output_dir=out,
        s3_prefix="",
    )
    return WorkerSettings(**{**fields, **overrides})


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
        # Celery itself drops these before any deepqueue code sees them: kept as dead letters all the same.
        "no-task-header": (good_body, "application/json", {}),
        "unregistered-task": (good_body, "application/json", {"task": "someone.elses.task"}),
        "compression-mismatch": (good_body, "application/json", {**task, "compression": "application/x-gzip"}),
    }


def publish_raw(broker_url: str, kinds: dict[str, tuple[bytes, str, dict]]) -> dict[str, str]:
    """Put hand-made messages (see ``malformed``) on the deepqueue queue; returns name -> task id
    (the ``no-id-header`` kind goes without one)."""
    from kombu import Connection, Exchange, Queue

    queue = Queue("deepqueue", Exchange("deepqueue", "direct"), "deepqueue")
    ids = {}
    with Connection(broker_url) as connection:
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
    return ids


def raw_entries() -> dict[str, bytes]:
    """name -> bytes pushed straight onto the queue's list, no kombu envelope around them (issue 14):
    what another application sharing the Redis, or a typo at a redis-cli prompt, can leave there."""
    return {
        "not-json": b"this is not json",
        "no-properties": b'{"body": "x", "headers": {}}',
        "array": b"[1, 2, 3]",
        "null": b"null",
        "1mb-random": os.urandom(1 << 20),
        "json-not-envelope": b'{"task": "deepqueue.generate", "args": [{"prompt": "a cat"}], "kwargs": {}}',
    }


def get(url: str) -> tuple[int | None, str]:
    """(status, body) of an HTTP GET; status None: nothing listens yet."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None, ""


class FakeClock:
    """Time that moves only when the code under test sleeps."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
