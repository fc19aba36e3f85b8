"""A real ``deepqueue worker`` on the simulated device: queue, batching, encoding, S3 and state
all real, no model and no GPU (the tool for queue-level figures, issue 7)."""

from __future__ import annotations

import json

import pytest

from ops.localstack import client_for, moto_s3_client, start_worker, stop
from producer import JobState

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_simulated_worker_serves_full_batches_into_s3(s3_worker_env, tmp_path):
    env = {**s3_worker_env, "DEEPQUEUE_MODEL": "simulated:a=0.05,b=0.01"}
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    try:
        with client_for(env) as client:
            prompts = [{"prompt": f"sim {i}", "negative_prompt": "" if i % 2 else None} for i in range(24)]
            run = client.submit(prompts, run="sim", width=256, height=256)
            assert run.wait(timeout=120).counts[JobState.DONE] == 24
            keys = [result.key for result in run.results()]
        s3 = moto_s3_client(env["DEEPQUEUE_S3_ENDPOINT_URL"])
        sidecar_key = keys[0].split("/", 3)[3].rsplit(".", 1)[0] + ".json"
        sidecar = json.loads(s3.get_object(Bucket=env["DEEPQUEUE_S3_BUCKET"], Key=sidecar_key)["Body"].read())
        assert sidecar["worker"]["device"] == "simulated" and sidecar["model"]["id"] == "simulated:a=0.05,b=0.01"
        assert sidecar["batch"]["size"] == 8  # with and without a negative prompt, in full batches
        assert "main process is fork-safe" in log.read_text()
    finally:
        stop(worker)
