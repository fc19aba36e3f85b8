"""LoRA runs on one real worker (issue 18, item 3): two runs with different adapters and a run of
the base model, sent in alternating parts, served by one CPU worker on the test Redis and moto's
S3. Every image's sidecar names its adapters (id, scale, sha256 of the weights), each batch holds
one adapter set, each adapter is loaded once, an adapter run's images differ from the base run's
for the same prompt and seed, the manifest has the loras column, and a LoRA the worker cannot
load fails its run's jobs with the reason while the worker keeps serving.

The load and switch seconds the sidecars record are printed (``-s``), never asserted on.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ops.localstack import moto_s3_client, start_worker, stop
from producer import Client, JobState
from producer.layout import sidecar_key

pytestmark = [pytest.mark.integration, pytest.mark.slow]

np = pytest.importorskip("numpy")
Image = pytest.importorskip("PIL.Image")
pq = pytest.importorskip("pyarrow.parquet")

RECIPE: dict[str, Any] = {"steps": 4, "width": 64, "height": 64, "seed": 5}
PROMPTS = [f"a lantern on a hill, study {i}" for i in range(6)]


@pytest.fixture
def env(s3_worker_env, monkeypatch) -> dict[str, str]:
    """The worker's environment, runs at the bucket's top level, also set for the client; batches
    of two, so that each run takes several calls and the runs' calls alternate (fair share)."""
    env = {**s3_worker_env, "DEEPQUEUE_S3_PREFIX": "", "DEEPQUEUE_MAX_BATCH": "2"}
    for name, value in env.items():
        if name.startswith(("DEEPQUEUE_", "AWS_")):
            monkeypatch.setenv(name, value)
    return env


def stored(env: dict[str, str], run_id: str) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Each image of ``run_id`` as (pixels, sidecar), by job id."""
    s3 = moto_s3_client(env["DEEPQUEUE_S3_ENDPOINT_URL"])
    bucket = env["DEEPQUEUE_S3_BUCKET"]
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{run_id}/images/")
    found = {}
    for key in [item["Key"] for page in pages for item in page.get("Contents", []) if item["Key"].endswith(".png")]:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        sidecar = json.loads(s3.get_object(Bucket=bucket, Key=sidecar_key(key))["Body"].read())
        found[sidecar["job_id"]] = (np.asarray(Image.open(io.BytesIO(body)), dtype=np.int16), sidecar)
    return found


def manifest_loras(env: dict[str, str], client: Client, run_id: str) -> list[str | None]:
    stats = client.manifest(run_id)
    s3 = moto_s3_client(env["DEEPQUEUE_S3_ENDPOINT_URL"])
    column: list[str | None] = []
    for shard in stats["manifest"]["shards"]:
        body = s3.get_object(Bucket=env["DEEPQUEUE_S3_BUCKET"], Key=shard)["Body"].read()
        column += pq.read_table(io.BytesIO(body), columns=["loras"]).column("loras").to_pylist()
    return column


def sha256(folder: Path) -> str:
    return hashlib.sha256((folder / "pytorch_lora_weights.safetensors").read_bytes()).hexdigest()


def test_two_adapter_runs_and_a_base_run_interleaved_on_one_worker(env, tiny_loras, tmp_path):
    la, lb = tiny_loras
    adapters = {
        "style-a": [{"id": str(la), "scale": 1.0, "sha256": sha256(la)}],
        "style-b": [{"id": str(lb), "scale": 0.7, "sha256": sha256(lb)}],
        "plain": [],
    }
    asked = {"style-a": [str(la)], "style-b": [f"{lb}:0.7"], "plain": None}
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        with Client() as client:
            runs = {}
            for part in (3, 6):  # each run in two parts, alternating: the queue holds them interleaved
                for name, loras in asked.items():
                    extra = {"loras": loras} if loras else {}
                    runs[name] = client.submit(PROMPTS[:part], run=name, **RECIPE, **extra)
            for name, run in runs.items():
                counts = run.wait(timeout=300).counts
                assert (counts[JobState.DONE], counts[JobState.FAILED]) == (6, 0), (name, counts)
            missing = client.submit(PROMPTS[:2], run="missing-lora", loras=[str(tmp_path / "nowhere")], **RECIPE)
            assert missing.wait(timeout=120).counts[JobState.FAILED] == 2
            reasons = {result.reason for result in missing.results(JobState.FAILED)}
            again = client.submit(PROMPTS[:1], run="after-the-failure", **RECIPE)  # the worker still serves
            assert again.wait(timeout=120).counts[JobState.DONE] == 1
            assert worker.poll() is None
    finally:
        stop(worker)
    assert reasons == {f"LoRA {str(tmp_path / 'nowhere')!r}: no such file or folder on this worker"}

    images = {name: stored(env, name) for name in asked}
    sidecars = [sidecar for run in images.values() for _, sidecar in run.values()]
    assert len(sidecars) == 18 and len({sidecar["worker"]["name"] for sidecar in sidecars}) == 1
    run_of = {sidecar["job_id"]: sidecar["run_id"] for sidecar in sidecars}
    for name, run in images.items():
        for _, sidecar in run.values():
            assert sidecar["loras"] == adapters[name], sidecar["loras"]  # every image names its adapters
            assert {run_of[job_id] for job_id in sidecar["batch"]["job_ids"]} == {name}  # one set per call
    # The same prompts and seeds: an adapter run's images differ from the base run's, pixel by pixel.
    base = {sidecar["index"]: (pixels, sidecar) for pixels, sidecar in images["plain"].values()}
    for name in ("style-a", "style-b"):
        for pixels, sidecar in images[name].values():
            base_pixels, base_sidecar = base[sidecar["index"]]
            assert (sidecar["prompt"], sidecar["seed"]) == (base_sidecar["prompt"], base_sidecar["seed"])
            assert np.abs(pixels - base_pixels).mean() > 1.0, (name, sidecar["index"])
    # Each adapter was loaded once: one batch (its first) paid the load.
    batches = {sidecar["batch"]["id"]: sidecar for sidecar in sidecars}
    loads = Counter(s["run_id"] for s in batches.values() if s["timing"].get("lora_load_s"))
    assert loads == {"style-a": 1, "style-b": 1}, loads

    with Client() as client:
        for name, expected in adapters.items():
            column = manifest_loras(env, client, name)
            assert len(column) == 6
            assert all((json.loads(cell) if cell else []) == expected for cell in column), column

    order = sorted(batches.values(), key=lambda sidecar: sidecar["timing"]["started_at"])
    switches = sum(1 for one, two in itertools.pairwise(order) if one["run_id"] != two["run_id"])
    print(f"\n{len(order)} batches, {switches} adapter-set switches, in order:")
    for sidecar in order:
        timing = sidecar["timing"]
        print(
            f"  {sidecar['run_id']:8} x{sidecar['batch']['size']}  load {timing.get('lora_load_s', 0):.4f} s  "
            f"switch {timing.get('lora_switch_s', 0):.4f} s  inference {timing['batch_inference_s']:.3f} s"
        )
