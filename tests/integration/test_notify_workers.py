"""Completion webhooks with three real workers (issue 18, item 4): a run's notification is POSTed
once, by whichever process sees its end, retried after the receiver's 500, signed, with the run's
counts; a cancelled run is notified once, by the cancel, and not again when its last jobs end."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from ops.localstack import client_for, start_worker, stop
from producer import JobState
from producer.contract import TASK_NAME
from producer.enqueue import producer_app
from producer.notify import EVENT_HEADER
from producer.settings import ClientSettings
from tests.helpers import wait_until
from tests.webhook import Receiver

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECRET = "whsec_integration"
RECIPE = {"steps": 2, "width": 64, "height": 64}


@pytest.fixture
def env(s3_worker_env) -> dict[str, str]:
    """Workers that each hold at most ten jobs (so a run of 24 spreads over them), at the bucket's
    top level, signing with the secret; the client has the same settings."""
    return {
        **s3_worker_env,
        "DEEPQUEUE_S3_PREFIX": "",
        "DEEPQUEUE_WEBHOOK_SECRET": SECRET,
        "DEEPQUEUE_MAX_BATCH": "2",
        "DEEPQUEUE_MIXED_SHAPES": "1",
        "DEEPQUEUE_PROMPT_BATCH": "1",
    }


def test_three_workers_notify_each_run_once(env, tmp_path):
    with Receiver([500]) as receiver, client_for(env) as client:
        # One bad job of the run first, sent as a plain Celery producer would: it fails with its
        # reason. The run has no URL yet, so its end then (one failed job) notifies nobody.
        (bad,) = client.prepare(["bad"], run="hooked", **RECIPE)
        payload = bad.model_dump(mode="json") | {"steps": 0}
        app = producer_app(ClientSettings(broker_url=env["DEEPQUEUE_BROKER_URL"]))
        app.send_task(TASK_NAME, args=[payload], task_id="hooked-bad")
        app.close()
        with ThreadPoolExecutor(3) as pool:
            workers = list(pool.map(lambda n: start_worker(env, tmp_path / f"worker{n}.log"), range(3)))
        try:
            wait_until(lambda: client.run("hooked").status().counts[JobState.FAILED] == 1, 300, "the bad job")
            client.submit([f"hooked {i}" for i in range(24)], run="hooked", notify=receiver.url, **RECIPE)
            final = client.run("hooked").wait(timeout=600)
            wait_until(lambda: receiver.delivered("hooked"), 300, "the run's notification")

            # A run cancelled while the workers serve it: the cancel notifies, before it returns.
            halt = client.submit(
                [f"halt {i}" for i in range(600)], run="halt", notify=receiver.url, **{**RECIPE, "steps": 4}
            )
            wait_until(lambda: halt.status().counts[JobState.DONE] > 0, 300, "a done job of the run to cancel")
            cancelled = client.cancel("halt")
            assert cancelled > 0, "the machine finished 600 jobs before the cancel: make the run longer"
            assert len(receiver.delivered("halt")) == 1
            halted = halt.wait(timeout=300)  # its running jobs end: the run's end, seen by workers
            states = {run_id: client.notify_state(run_id) for run_id in ("hooked", "halt")}
        finally:
            with ThreadPoolExecutor(3) as pool:
                list(pool.map(stop, workers))
    # Every worker is gone: whatever was to be sent has been.
    assert final.counts[JobState.DONE] == 24 and final.counts[JobState.FAILED] == 1
    first, second = receiver.of("hooked")
    assert (first.answered, second.answered) == (500, 200)
    assert first.body == second.body and first.verifies(SECRET) and second.verifies(SECRET)
    document = second.document
    assert second.headers[EVENT_HEADER] == "finished" and document["event"] == "finished"
    assert document["counts"] == {"queued": 0, "running": 0, "done": 24, "failed": 1, "cancelled": 0}
    assert document["failed_by_reason"] == {"invalid job": 1} and document["total"] == 25
    assert document["gpu_seconds"] > 0 and document["images_per_s"] > 0
    bucket = env["DEEPQUEUE_S3_BUCKET"]
    assert document["outputs_url"] == f"s3://{bucket}/hooked/images/"
    assert document["manifest_url"] == f"s3://{bucket}/hooked/manifest/"
    assert str(states["hooked"]) == "notify finished: delivered (2 tries)"

    first, second = receiver.of("halt")  # the cancel's, retried after the 500; none at the run's end
    assert (first.answered, second.answered) == (500, 200) and second.verifies(SECRET)
    document = second.document
    assert document["event"] == "cancelled" and document["counts"]["cancelled"] == cancelled
    assert halted.counts[JobState.CANCELLED] >= cancelled and halted.is_finished
    assert str(states["halt"]) == "notify cancelled: delivered (2 tries)"
