"""The main job end to end: client -> Redis -> a real `deepqueue worker` process -> moto S3.

Everything here is real: a private redis-server, moto's S3 server over HTTP, the Celery worker
as a separate process running the tiny random-weight pipeline through ``from_pretrained``.
"""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from ops.localstack import client_for, deepqueue_command, moto_s3_client, start_worker, stop, worker_env
from producer import Client, JobState
from producer.contract import TASK_NAME
from producer.enqueue import producer_app
from tests.helpers import SIDECAR_FIELDS, TIMING_FIELDS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SIZES = [(64, 64), (96, 64), (64, 96)]  # (width, height)
DONE = JobState.DONE


@pytest.fixture(scope="module")
def stack(redis_server, s3_endpoint, tiny_model, tmp_path_factory) -> Iterator[dict[str, str]]:
    """One worker process for the module, with its broker, state store and bucket."""
    broker, backend = f"{redis_server}/2", f"{redis_server}/3"
    for url in (broker, backend):
        redis.Redis.from_url(url).flushdb()
    bucket = f"dq-{uuid.uuid4().hex[:12]}"
    env = worker_env(
        broker_url=broker,
        result_backend=backend,
        s3_endpoint=s3_endpoint,
        bucket=bucket,
        model=str(tiny_model),
        device="cpu",
        s3_prefix="datasets",
        max_wait_s=1.0,
    )
    moto_s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    process = start_worker(env, log_path, "--hostname", "itest@%h")
    try:
        yield env
    finally:
        stop(process)
        print(log_path.read_text()[-5000:])  # shown by pytest when a test failed


def s3_objects(env: dict[str, str], run_id: str) -> dict[str, bytes]:
    s3 = moto_s3_client(env["DEEPQUEUE_S3_ENDPOINT_URL"])
    bucket = env["DEEPQUEUE_S3_BUCKET"]
    keys = [
        item["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"datasets/{run_id}/")
        for item in page.get("Contents", [])
    ]
    return {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def test_the_demo_prompts_come_out_as_three_full_batches(stack):
    """examples/prompts.jsonl (what `make demo` submits): 24 prompts over three sizes, some with
    a negative prompt and some without. On an SD 1.x model they batch together: 3 batches of 8."""
    prompts = Path(__file__).resolve().parents[2] / "examples" / "prompts.jsonl"
    with client_for(stack) as client:
        run = client.submit(prompts, run="itest-demo", steps=4)
        assert run.wait(timeout=300).counts[JobState.DONE] == 24
    sidecars = [json.loads(v) for k, v in s3_objects(stack, run.run_id).items() if k.endswith(".json")]
    batches = {sidecar["batch"]["id"]: sidecar["batch"]["size"] for sidecar in sidecars}
    assert sorted(batches.values()) == [8, 8, 8]
    assert {sidecar["negative_prompt"] is None for sidecar in sidecars} == {True, False}  # both kinds, batched together


def test_mixed_resolutions_land_in_s3_in_homogeneous_batches(stack):
    from PIL import Image

    rng = random.Random(7)
    rows = [
        {"prompt": f"test prompt {i} {'✓ ünïcode' if i % 5 == 0 else ''}", "width": w, "height": h}
        for i, (w, h) in enumerate(SIZES[i % 3] for i in range(36))
    ]
    rng.shuffle(rows)
    with client_for(stack) as client:
        run = client.submit(rows, run="itest-mixed", steps=4, seed=1234)
        assert run.submitted == 36
        status = run.wait(timeout=300)
        results = {result.job_id: result for result in run.results()}

    assert status.counts[JobState.DONE] == 36, status
    assert len(results) == 36
    objects = s3_objects(stack, run.run_id)
    images = {k: v for k, v in objects.items() if k.endswith(".png")}
    sidecars = {k: json.loads(v) for k, v in objects.items() if k.endswith(".json")}
    # Every job exactly once, under the documented layout.
    assert len(images) == len(sidecars) == 36
    for job_id, result in results.items():
        key = f"datasets/{run.run_id}/images/{job_id}.png"
        assert result.key == f"s3://{stack['DEEPQUEUE_S3_BUCKET']}/{key}"
        sidecar = sidecars[key.removesuffix(".png") + ".json"]
        assert SIDECAR_FIELDS <= sidecar.keys()
        assert TIMING_FIELDS <= sidecar["timing"].keys()
        assert all(sidecar["timing"][field] is not None for field in TIMING_FIELDS)
        assert {"hostname", "device", "torch", "diffusers", "deepcache"} <= sidecar["worker"].keys()
        assert sidecar["deepcache"] == {"enabled": True, "interval": 3, "branch": 0}
        assert sidecar["model"]["hash"].startswith("sha256:")
        image = Image.open(io.BytesIO(images[key]))
        assert image.size == (sidecar["width"], sidecar["height"])
    # Batches: 1..8 images, all of one shape, and the sidecars agree on their composition.
    batches: dict[str, list[dict]] = defaultdict(list)
    for sidecar in sidecars.values():
        batches[sidecar["batch"]["id"]].append(sidecar)
    for members in batches.values():
        assert 1 <= len(members) <= 8
        assert {(m["width"], m["height"], m["steps"]) for m in members} == {
            (members[0]["width"], members[0]["height"], 4)
        }
        assert all(m["batch"]["size"] == len(members) for m in members)
        assert sorted(m["batch"]["index"] for m in members) == list(range(len(members)))
    assert max(len(members) for members in batches.values()) == 8, "jobs were not batched"
    # Nothing left unacknowledged in the broker.
    broker = redis.Redis.from_url(stack["DEEPQUEUE_BROKER_URL"])
    assert broker.llen("deepqueue") == 0 and broker.hlen("unacked") == 0


def test_resubmitting_a_finished_run_sends_nothing(stack):
    with client_for(stack) as client:
        first = client.submit(["a", "b", "c"], run="itest-resubmit", steps=4, width=64, height=64)
        first.wait(timeout=120)
        again = client.submit(["a", "b", "c"], run="itest-resubmit", steps=4, width=64, height=64)
    assert (again.submitted, again.skipped) == (0, 3)
    assert len([key for key in s3_objects(stack, "itest-resubmit") if "/images/" in key]) == 6


def test_a_bad_message_fails_alone_and_its_batch_peers_succeed(stack):
    """A message put on the queue by hand, skipping the client's validation."""
    with client_for(stack) as client:
        jobs = client.prepare(["peer one", "peer two", "peer three"], run="itest-bad", steps=4, width=64, height=64)
    bad_fields = {**jobs[0].model_dump(mode="json"), "index": 3, "height": 500}
    app = producer_app(client.settings)
    with app.producer_or_acquire() as producer:
        app.send_task(
            TASK_NAME, args=[bad_fields], kwargs={"enqueued_at": time.time()}, task_id="bad-height", producer=producer
        )
        app.send_task(TASK_NAME, args=["not a job"], task_id="not-a-job", producer=producer)
        for job in jobs:
            app.send_task(TASK_NAME, args=[job.model_dump(mode="json")], task_id=job.job_id, producer=producer)
    with client_for(stack) as client:
        client._store.mark_queued("itest-bad", [job.job_id for job in jobs])
        run = client.run("itest-bad")
        deadline = time.monotonic() + 120
        while run.status().counts[JobState.DONE] < 3 or run.status().counts[JobState.FAILED] < 1:
            assert time.monotonic() < deadline, run.status()
            time.sleep(0.2)
        results = {result.job_id: result for result in run.results()}
    assert results["bad-height"].state is JobState.FAILED
    assert "height" in results["bad-height"].reason and "500" in results["bad-height"].reason
    assert all(results[job.job_id].state is JobState.DONE for job in jobs)
    # The unrecordable message was consumed and acknowledged too, not left to redeliver.
    broker = redis.Redis.from_url(stack["DEEPQUEUE_BROKER_URL"])
    deadline = time.monotonic() + 30
    while broker.llen("deepqueue") or broker.hlen("unacked"):
        assert time.monotonic() < deadline, "messages left in the broker"
        time.sleep(0.2)


def test_a_run_sent_by_plain_celery_is_listed_and_pruned(stack):
    """A producer that is not deepqueue's client (``send_task``, one message per job): the run
    is in ``runs`` once a worker starts it, and ``prune`` deletes it once finished."""
    with client_for(stack) as client:
        jobs = client.prepare(["by celery one", "by celery two"], run="itest-celery", steps=4, width=64, height=64)
        app = producer_app(client.settings)
        with app.producer_or_acquire() as producer:
            for job in jobs:
                app.send_task(TASK_NAME, args=[job.model_dump(mode="json")], task_id=job.job_id, producer=producer)
        deadline = time.monotonic() + 120
        while not client._store.exists("itest-celery") or client.run("itest-celery").status().counts[DONE] < 2:
            assert time.monotonic() < deadline, "the celery-sent jobs did not finish"
            time.sleep(0.2)
        assert "itest-celery" in client.runs()
        assert "itest-celery" in client.prune(older_than_s=0, dry_run=True)
        client.prune(older_than_s=0)
        assert "itest-celery" not in client.runs() and client.deleted("itest-celery")


def test_cli_submit_wait_over_three_resolutions(stack, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"cli prompt {i}", "size": f"{w}x{h}"}) + "\n" for i, (w, h) in enumerate(SIZES * 3)
        )
    )
    done = subprocess.run(
        [
            *deepqueue_command(),
            "submit",
            str(prompts),
            "--run",
            "itest-cli",
            "--steps",
            "4",
            "--wait",
            "--timeout",
            "300",
        ],
        env=stack,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr
    bucket = stack["DEEPQUEUE_S3_BUCKET"]
    assert "run itest-cli finished: 9 images, 0 failed in " in done.stdout
    assert f"img/s); files in s3://{bucket}/datasets/itest-cli/images/" in done.stdout
    assert "itest-cli: 9 jobs (queued 0, running 0, done 9, failed 0, cancelled 0)" in done.stderr  # the last line
    status = subprocess.run(
        [*deepqueue_command(), "status", "itest-cli", "--json"], env=stack, capture_output=True, text=True
    )
    record = json.loads(status.stdout)
    assert (record["done"], record["total"], record["eta_s"], record["workers"]) == (9, 9, 0.0, 1)
    assert record["images_per_s"] > 0
    listed = subprocess.run([*deepqueue_command(), "runs", "--json"], env=stack, capture_output=True, text=True)
    runs = {entry["run"]: entry for entry in map(json.loads, listed.stdout.splitlines())}
    assert runs["itest-cli"]["done"] == 9 and runs["itest-cli"]["submitted_at"] <= time.time()
    assert len([key for key in s3_objects(stack, "itest-cli") if "/images/" in key]) == 18  # not manifest parts


def test_cancel_drops_queued_jobs_and_delete_removes_the_run(stack, monkeypatch):
    """Cancel mid-run: the worker drops the queued jobs without generating them, the run ends with
    done + cancelled = all; then delete --outputs removes its state and its files."""
    rows = [f"cancel me {i}" for i in range(160)]
    broker = redis.Redis.from_url(stack["DEEPQUEUE_BROKER_URL"])
    for name, value in stack.items():  # the worker's settings and S3 credentials, as a user's shell has them
        if name.startswith(("DEEPQUEUE_", "AWS_")):
            monkeypatch.setenv(name, value)
    with Client() as client:
        run = client.submit(rows, run="itest-cancel", steps=4, width=64, height=64)
        deadline = time.monotonic() + 120
        while run.status().counts[JobState.DONE] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        cancelled = run.cancel()
        final = run.wait(timeout=120)
        counts = final.counts
        assert cancelled > 0 and counts[JobState.CANCELLED] >= cancelled, counts
        assert counts[JobState.DONE] + counts[JobState.CANCELLED] == 160 and counts[JobState.FAILED] == 0, counts
        while (
            broker.llen(stack.get("DEEPQUEUE_QUEUE", "deepqueue")) and time.monotonic() < deadline
        ):  # dropped, not kept
            time.sleep(0.1)
        assert broker.llen(stack.get("DEEPQUEUE_QUEUE", "deepqueue")) == 0
        images = {
            key.rsplit("/", 1)[1].removesuffix(".png") for key in s3_objects(stack, run.run_id) if key.endswith(".png")
        }
        assert images == {result.job_id for result in run.results(JobState.DONE)}  # nothing made for cancelled jobs
        assert client.delete(run.run_id, outputs=True) >= 2 * len(images)  # and manifest parts, if flushed yet
        assert s3_objects(stack, run.run_id) == {}
        assert "itest-cancel" not in client.runs()


def test_audit_writes_psnr_and_ssim_of_a_sample_into_the_manifest(stack, monkeypatch):
    """`deepqueue audit`: twins with DeepCache off are made by the same worker, and each pair's
    PSNR and SSIM land in the run's manifest and audit.json (random weights: the figures mean
    nothing, the mechanism does)."""
    import pyarrow.parquet as pq

    for name, value in stack.items():
        if name.startswith(("DEEPQUEUE_", "AWS_")):
            monkeypatch.setenv(name, value)
    with Client() as client:
        run = client.submit([f"audit me {i}" for i in range(6)], run="itest-audit", steps=4, width=64, height=64)
        assert run.wait(timeout=120).counts[JobState.DONE] == 6
    done = subprocess.run(
        [*deepqueue_command(), "audit", "itest-audit", "--sample", "3", "--timeout", "120"],
        env=stack,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "audit of itest-audit (DeepCache interval 3, branch 0): 3 of 3 images compared; PSNR mean " in done.stdout
    objects = s3_objects(stack, "itest-audit")
    summary = json.loads(objects["datasets/itest-audit/audit.json"])
    assert summary["audited"] == 3 and summary["twin_run"] == "itest-audit.audit"
    assert summary["deepcache"] == {"enabled": True, "interval": 3, "branch": 0}
    twins = [json.loads(v) for k, v in s3_objects(stack, "itest-audit.audit").items() if k.endswith(".json")]
    assert len(twins) == 3 and all(twin["deepcache"]["enabled"] is False for twin in twins)
    shards = [
        io.BytesIO(v) for k, v in sorted(objects.items()) if k.startswith("datasets/itest-audit/manifest/manifest-")
    ]
    rows = [row for shard in shards for row in pq.read_table(shard).to_pylist()]
    assert len(rows) == 6
    audited = [row for row in rows if row["audit_ssim"] is not None]
    assert len(audited) == 3
    assert all(-1 <= row["audit_ssim"] < 1 and row["audit_psnr"] > 0 for row in audited)
    assert all(row["audit_uncached_key"].startswith("datasets/itest-audit.audit/images/") for row in audited)


def test_celery_tools_find_the_app_with_dash_a(stack):
    """``celery -A worker.app`` works as Celery users expect: here ``inspect ping`` reaches the
    running worker through the app built from the same DEEPQUEUE_* settings."""
    celery = Path(sys.executable).with_name("celery")
    result = subprocess.run(
        [str(celery), "-A", "worker.app", "inspect", "ping", "--timeout", "10"],
        env=stack,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "itest@" in result.stdout and "pong" in result.stdout
