"""Manifest and exports end to end: the executor generates a run with the tiny model into a moto
S3 server with its states in a real Redis, writing manifest parts as it stores; one part is lost
(a worker killed before it flushed), one job failed, two were audited. Compaction makes the
manifest whole; every export, to a folder and to S3, loads with its real reader."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("pyarrow")
datasets = pytest.importorskip("datasets")
wds = pytest.importorskip("webdataset")

import pyarrow.parquet as pq  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from ops.localstack import AWS_ENV, client_for  # noqa: E402
from producer import Client, ClientSettings, Job, JobState  # noqa: E402
from producer.cli import cli  # noqa: E402
from producer.layout import audit_rows_key, audit_summary_key, parts_prefix  # noqa: E402
from producer.manifest_parts import decode_part  # noqa: E402
from producer.state import RunStore  # noqa: E402
from tests.helpers import local_worker_settings  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN = "export-e2e"
PREFIX = "datasets"
COUNT = 10


def jobs() -> list[Job]:
    return [
        Job(
            run_id=RUN,
            index=index,
            prompt=f"a watercolor fox number {index}",
            seed=500 + index,
            height=64,
            width=64 if index < 6 else 72,  # two shapes: two batch keys
            steps=3,
            negative_prompt="blurry" if index % 3 == 0 else None,
            cache_interval=1 if index % 4 == 0 else None,
        )
        for index in range(COUNT + 1)
    ]


@pytest.fixture(scope="module")
def generated(redis_server: str, s3_endpoint: str, tiny_model: Path, tmp_path_factory) -> Iterator[SimpleNamespace]:
    import boto3

    from producer.storage import S3Storage
    from worker.pipeline.engine import Engine
    from worker.pipeline.executor import BatchExecutor, Delivery

    with pytest.MonkeyPatch.context() as env:
        for name, value in AWS_ENV.items():
            env.setenv(name, value)
        backend = f"{redis_server}/5"
        redis.Redis.from_url(backend).flushdb()
        bucket = f"dq-{uuid.uuid4().hex[:12]}"
        s3 = boto3.client("s3", endpoint_url=s3_endpoint)
        s3.create_bucket(Bucket=bucket)
        settings = local_worker_settings(
            tiny_model,
            tmp_path_factory.mktemp("unused"),
            storage="s3",
            s3_bucket=bucket,
            s3_endpoint_url=s3_endpoint,
            s3_prefix=PREFIX,
            manifest_part_rows=4,
            result_backend=backend,
        )
        store = RunStore.from_url(backend)
        storage = S3Storage.connect(bucket, s3_endpoint)
        executor = BatchExecutor(Engine.load(settings), storage, store, settings, name="gpu0@test")
        all_jobs = jobs()
        made, failed = all_jobs[:COUNT], all_jobs[COUNT]
        store.mark_queued(RUN, [job.job_id for job in all_jobs])
        now = time.time()
        outcomes = executor.execute([Delivery(job.job_id, job.model_dump(mode="json"), now, now) for job in made])
        assert all(outcome.ok for outcome in outcomes), outcomes
        executor.close()  # the last part goes at close
        store.mark(RUN, failed.job_id, JobState.FAILED, reason="generation failed: RuntimeError('boom')")

        parts = [key for key, _ in storage.list(parts_prefix(PREFIX, RUN))]
        rows = [row for key in parts for row in decode_part(storage.get(key))]
        lost = decode_part(storage.get(parts[0]))
        storage.delete(parts[0])  # a worker killed before it flushed this part

        audit = [
            {"job_id": made[1].job_id, "psnr": 35.5, "ssim": 0.991, "uncached_key": "audit/1.png"},
            {"job_id": made[7].job_id, "psnr": 29.25, "ssim": 0.95, "uncached_key": "audit/7.png"},
        ]
        body = "".join(json.dumps(row) + "\n" for row in audit).encode()
        storage.put(audit_rows_key(PREFIX, RUN), body, content_type="application/x-ndjson", metadata={})
        summary = {"audited": 2, "psnr_mean": 32.375}
        storage.put(audit_summary_key(PREFIX, RUN), json.dumps(summary).encode(), content_type="x", metadata={})

        client_settings = ClientSettings(
            broker_url=f"{redis_server}/4",
            result_backend=backend,
            storage="s3",
            s3_bucket=bucket,
            s3_prefix=PREFIX,
            s3_endpoint_url=s3_endpoint,
        )
        yield SimpleNamespace(
            jobs=made,
            failed=failed,
            parts=parts,
            rows=rows,
            lost=lost,
            audit=audit,
            summary=summary,
            storage=storage,
            s3=s3,
            bucket=bucket,
            settings=client_settings,
            env=env,
        )
        store.close()


def download(s3, bucket: str, prefix: str, folder: Path) -> list[str]:
    """Every object under ``prefix`` into ``folder`` (same layout); returns the relative names."""
    names = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            name = item["Key"][len(prefix) + 1 :]
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, item["Key"], str(folder / name))
            names.append(name)
    return sorted(names)


def test_the_executor_writes_a_row_per_stored_image(generated) -> None:
    assert len(generated.parts) == 3  # 4 + 4 rows when full, 2 at close
    assert all(key.startswith(f"{PREFIX}/{RUN}/manifest-parts/gpu0_test-") for key in generated.parts)
    assert sorted(row["job_id"] for row in generated.rows) == sorted(job.job_id for job in generated.jobs)
    for row in generated.rows:
        sidecar = json.loads(generated.storage.get(row["sidecar_key"]))
        assert {name: row[name] for name in sidecar} == sidecar  # the full sidecar
        assert row["bytes"] == generated.storage.size(row["key"]) and row["key"].endswith(".png")


def test_compaction_makes_the_manifest_whole(generated, tmp_path: Path) -> None:
    with Client(settings=generated.settings) as client:
        stats = client.manifest(RUN)
    assert (stats["count"], stats["done"], stats["failed"], stats["manifest_rows"]) == (11, 10, 1, 10)
    assert stats["repaired_from_sidecars"] == len(generated.lost) == 4 and stats["complete"] is True
    assert stats["failed_by_reason"] == {"generation failed: RuntimeError('boom')": 1}
    assert stats["audit"] == generated.summary and stats["audited"] == 2
    assert stats["sizes"] == {"64x64": 6, "72x64": 4} and stats["models"] and stats["duration_s"] > 0
    batches = {row["batch"]["id"]: row["timing"]["batch_inference_s"] for row in generated.rows}
    assert stats["gpu_seconds"] == pytest.approx(sum(batches.values()), abs=1e-5)  # rounded to µs
    assert stats["images_per_s"] == pytest.approx(10 / stats["duration_s"])
    stored = json.loads(generated.storage.get(f"{PREFIX}/{RUN}/stats.json"))
    assert stored["manifest"]["shards"] == [f"{PREFIX}/{RUN}/manifest/manifest-00000.parquet"]

    folder = tmp_path / "manifest"
    download(generated.s3, generated.bucket, f"{PREFIX}/{RUN}/manifest", folder)
    assert sorted(path.name for path in folder.iterdir()) == ["manifest-00000.parquet"]  # parts, audit rows elsewhere
    frame = pq.ParquetDataset(folder).read().to_pandas()  # the folder reads as one dataset
    assert list(frame["job_id"]) == [job.job_id for job in generated.jobs]  # in order, no gaps
    assert list(frame["prompt"]) == [job.prompt for job in generated.jobs]
    audited = frame.set_index("job_id")
    assert audited.loc[generated.jobs[7].job_id, "audit_psnr"] == 29.25
    assert audited.loc[generated.jobs[1].job_id, "audit_uncached_key"] == "audit/1.png"
    assert frame["audit_ssim"].isna().sum() == 8
    assert set(frame["worker_name"]) == {"gpu0@test"} and (frame["bytes"] > 0).all()


def load(fmt: str, folder: Path, cache: Path) -> list[tuple[str, tuple[int, int], str, int]]:
    """(job id, image size, prompt, seed) of every sample, read with the format's own reader."""
    if fmt == "parquet":
        files = sorted(str(path) for path in folder.glob("*.parquet"))
        assert pq.ParquetDataset(files).read().num_rows == COUNT  # pyarrow reads it as it is
        loaded = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(cache))
        assert isinstance(loaded.features["image"], datasets.Image)
        return [(r["job_id"], r["image"].size, r["prompt"], r["seed"]) for r in loaded]
    if fmt == "imagefolder":
        loaded = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=str(cache))
        recipe = {"image", "prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance"}
        assert recipe | {"scheduler", "cache_interval", "cache_branch", "deepcache", "model"} <= set(loaded.features)
        return sorted((r["job_id"], r["image"].size, r["prompt"], r["seed"]) for r in loaded)
    urls = sorted(str(path) for path in folder.glob("*.tar"))
    samples = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "png", "json", "txt")
    out = []
    for key, image, meta, text in samples:
        assert meta["job_id"] == key and text == meta["prompt"]
        out.append((key, image.size, text, meta["seed"]))
    return out


@pytest.mark.parametrize("where", ["folder", "s3"])
@pytest.mark.parametrize("fmt", ["parquet", "imagefolder", "webdataset"])
def test_each_export_loads_with_its_reader(generated, fmt: str, where: str, tmp_path: Path) -> None:
    folder = tmp_path / "export"
    to = str(folder) if where == "folder" else f"s3://{generated.bucket}/exports/{fmt}"
    with Client(settings=generated.settings) as client:
        result = client.export(RUN, fmt, to, shard_size=4)
    assert (result.rows, result.shards) == (COUNT, 3)
    if where == "s3":
        names = download(generated.s3, generated.bucket, f"exports/{fmt}", folder)
        expected = {
            "parquet": ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"],
            "imagefolder": [f"0000{shard}/metadata.jsonl" for shard in range(3)],
            "webdataset": [f"0000{shard}{suffix}" for shard in range(3) for suffix in (".parquet", ".tar")],
        }[fmt]
        assert set(expected) <= set(names)
    expected = [(job.job_id, (job.width, job.height), job.prompt, job.seed) for job in generated.jobs]
    assert load(fmt, folder, tmp_path / "hf") == expected


def test_cli_manifest_and_export(generated, tmp_path: Path, monkeypatch) -> None:
    settings = generated.settings
    for name, value in {
        "DEEPQUEUE_BROKER_URL": settings.broker_url,
        "DEEPQUEUE_RESULT_BACKEND": settings.result_backend,
        "DEEPQUEUE_STORAGE": "s3",
        "DEEPQUEUE_S3_BUCKET": settings.s3_bucket,
        "DEEPQUEUE_S3_PREFIX": PREFIX,
        "DEEPQUEUE_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        **AWS_ENV,
    }.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    shown = runner.invoke(cli, ["manifest", RUN])
    assert shown.exit_code == 0, shown.output
    assert f"{RUN}: 10 images in 1 manifest shards" in shown.output and "failed 1: generation failed" in shown.output
    as_json = runner.invoke(cli, ["manifest", RUN, "--json"])
    assert json.loads(as_json.stdout)["done"] == 10  # the progress bars go to stderr

    exported = runner.invoke(cli, ["export", RUN, "--format", "webdataset", "--shard-size", "5"])
    assert exported.exit_code == 0, exported.output
    beside = f"s3://{settings.s3_bucket}/{PREFIX}/{RUN}/exports/webdataset"
    assert f"exported 10 images of {RUN} as webdataset in 2 shards to {beside}" in exported.output
    again = runner.invoke(cli, ["export", RUN, "--format", "webdataset"])
    assert again.exit_code == 2 and "not empty" in again.output and "--overwrite" in again.output
    replaced = runner.invoke(cli, ["export", RUN, "--format", "webdataset", "--overwrite"])  # one shard now
    assert replaced.exit_code == 0 and "in 1 shards" in replaced.output, replaced.output
    left = generated.s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=f"{PREFIX}/{RUN}/exports/webdataset/")
    assert sorted(item["Key"].rsplit("/", 1)[1] for item in left["Contents"]) == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
        "_deepqueue_export.json",
    ]

    unknown = runner.invoke(cli, ["export", "no-such-run", "--format", "parquet", "--to", str(tmp_path / "x")])
    assert unknown.exit_code == 2 and "no run named 'no-such-run'" in unknown.output
    with monkeypatch.context() as without:  # the export extra not installed
        without.setitem(sys.modules, "pyarrow", None)
        for module in ("producer.manifest", "producer.manifest_schema", "producer.shards", "producer.export"):
            without.delitem(sys.modules, module, raising=False)
        missing = runner.invoke(cli, ["export", RUN, "--format", "parquet", "--to", str(tmp_path / "y")])
    assert missing.exit_code == 2, missing.output
    assert "pip install 'deepqueue[export]'" in missing.output


def test_a_real_worker_writes_its_parts_and_flushes_them_when_it_stops(s3_worker_env, aws_env, tmp_path: Path) -> None:
    """``deepqueue worker`` (prefork, simulated device): parts of 5 rows while it serves, the rest
    when its pool process shuts down; compaction then needs no sidecar."""
    from ops.localstack import moto_s3_client, start_worker, stop

    env = {**s3_worker_env, "DEEPQUEUE_MODEL": "simulated:a=0.01,b=0.001", "DEEPQUEUE_MANIFEST_PART_ROWS": "5"}
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        with client_for(env) as client:
            run = client.submit([f"served {i}" for i in range(12)], run="served", width=64, height=64)
            assert run.wait(timeout=120).counts[JobState.DONE] == 12
    finally:
        stop(worker)  # SIGTERM: a warm shutdown, the pool process flushes what it holds
    s3 = moto_s3_client(env["DEEPQUEUE_S3_ENDPOINT_URL"])
    parts = s3.list_objects_v2(Bucket=env["DEEPQUEUE_S3_BUCKET"], Prefix="served/manifest-parts/").get("Contents", [])
    assert len(parts) == 3, [part["Key"] for part in parts]  # 5 + 5 while serving, 2 at shutdown
    settings = ClientSettings(
        broker_url=env["DEEPQUEUE_BROKER_URL"],
        result_backend=env["DEEPQUEUE_RESULT_BACKEND"],
        s3_bucket=env["DEEPQUEUE_S3_BUCKET"],
        s3_endpoint_url=env["DEEPQUEUE_S3_ENDPOINT_URL"],
    )
    with Client(settings=settings) as client:
        stats = client.manifest("served")
    assert (stats["manifest_rows"], stats["repaired_from_sidecars"], stats["complete"]) == (12, 0, True)
