"""producer.manifest and the modules it builds on (manifest_schema, manifest_stats, shards): the
pure parts (flattening, stats, buckets, ordered reads) and compaction of a run written as the
executor writes it (parts, sidecars, real Redis states) in a local folder."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")
pytest.importorskip("PIL")

import pyarrow.parquet as pq  # noqa: E402

from producer.layout import audit_rows_key, audit_summary_key, parts_prefix, shard_key  # noqa: E402
from producer.manifest import compact, ensure_manifest, fingerprint, is_current, read_stats  # noqa: E402
from producer.manifest_schema import COLUMNS, arrow_schema, flatten  # noqa: E402
from producer.manifest_stats import OTHER, TOP_KEPT, StatsBuilder, TopCounter, reason_kind  # noqa: E402
from producer.shards import ordered_map  # noqa: E402
from producer.spill import Buckets, job_index  # noqa: E402
from producer.state import JobResult, JobState, RunStore  # noqa: E402
from producer.storage import LocalStorage  # noqa: E402
from tests.manifest_helpers import make_jobs, store_outputs  # noqa: E402

RUN = "manifest-run"

# --- pure parts --------------------------------------------------------------------------------

SIDECAR = {
    "sidecar_version": 1,
    "job_id": "00000007-0123456789ab",
    "run_id": RUN,
    "index": 7,
    "image": "s3://b/manifest-run/images/00000007-0123456789ab.png",
    "image_reused": False,
    "prompt": "a fox",
    "negative_prompt": None,
    "seed": 42,
    "generator": "torch.Generator('cpu').manual_seed(seed), one per image",
    "height": 64,
    "width": 96,
    "steps": 3,
    "guidance": 7,
    "scheduler": "ddim",
    "format": "png",
    "model": {"id": "m", "revision": None, "hash": "sha256:ab"},
    "deepcache": {"enabled": False, "interval": 1, "branch": None},
    "batch": {"id": "b1", "size": 2, "index": 1, "job_ids": ["00000006-0123456789ab", "00000007-0123456789ab"]},
    "timing": {"started_at": 10.0, "finished_at": 11.0, "batch_inference_s": 2.0, "inference_s": 1.0},
    "worker": {"hostname": "h", "name": "w@h", "device": "cpu", "torch": "2.13"},
    "new_field": {"added": "later"},
}


def test_flatten_keeps_every_field_with_stable_types() -> None:
    row = {**SIDECAR, "key": "manifest-run/images/00000007-0123456789ab.png", "sidecar_key": "k.json", "bytes": 9}
    flat = flatten(row, {"job_id": SIDECAR["job_id"], "psnr": 31.5, "ssim": 0.97, "uncached_key": "u.png"})
    assert list(flat) == [name for name, _ in COLUMNS]
    assert (flat["width"], flat["height"], flat["guidance"], flat["seed"]) == (96, 64, 7.0, 42)
    assert isinstance(flat["guidance"], float)
    assert (flat["deepcache"], flat["cache_interval"], flat["cache_branch"]) == (False, 1, None)
    assert (flat["model_id"], flat["model_hash"], flat["batch_index"], flat["inference_s"]) == (
        "m",
        "sha256:ab",
        1,
        1.0,
    )
    assert flat["enqueued_at"] is None and flat["torch_version"] == "2.13" and flat["worker_name"] == "w@h"
    assert (flat["audit_psnr"], flat["audit_ssim"], flat["audit_uncached_key"]) == (31.5, 0.97, "u.png")
    assert json.loads(flat["sidecar"]) == SIDECAR  # every sidecar field, those added later too
    empty = flatten({"job_id": "x"})
    assert empty["audit_psnr"] is None and empty["batch_job_ids"] is None
    assert empty["template"] is None and empty["variables"] is None
    table = pa.Table.from_pylist([flat, empty], schema=arrow_schema())
    assert table.schema == arrow_schema() and table.num_rows == 2


def test_a_templates_variables_are_a_json_column_in_template_order() -> None:
    variables = {"v1": "rouge", "times": "dawn", "a": "é"}
    flat = flatten({**SIDECAR, "template": "{rouge|blue} __times__ {a|é}", "variables": variables})
    assert flat["template"] == "{rouge|blue} __times__ {a|é}"
    assert flat["variables"] == '{"v1":"rouge","times":"dawn","a":"é"}'


def test_job_index_and_failure_kinds() -> None:
    assert job_index("00000012-abcdef012345") == 12 and job_index("123456789-abcdef012345") == 123456789
    assert job_index("bad-task-id") == 0
    a = reason_kind("storing failed: upload of s3://b/r/images/00000001-abcdef012345.png failed: 503")
    b = reason_kind("storing failed: upload of s3://b/r/images/00000002-fedcba543210.png failed: 503")
    assert a == b == "storing failed: upload of <s3 object> failed: 503"
    assert reason_kind("writing /data/out/r/images/x.png failed: [Errno 28]") == "writing <path> failed: [Errno 28]"
    assert reason_kind(None) == "unknown"
    assert reason_kind("generation failed: RuntimeError('boom')") == "generation failed: RuntimeError('boom')"


def test_top_counter_is_bounded() -> None:
    counter = TopCounter()
    for value in range(TOP_KEPT + 50):
        counter.add(value)
    counter.add(3)
    assert len(counter) == TOP_KEPT + 1 and counter[OTHER] == 50 and counter["3"] == 2
    assert list(counter.top(1)) == [OTHER]


def test_stats_builder() -> None:
    stats = StatsBuilder()
    for started, size, cached in ((10.0, 100, True), (12.0, 300, False)):
        flat = flatten({**SIDECAR, "timing": {**SIDECAR["timing"], "started_at": started, "finished_at": started + 1}})
        stats.add_row({**flat, "bytes": size, "deepcache": cached, "cache_interval": 3, "cache_branch": 0})
    stats.add_result(JobResult("x", JobState.FAILED, reason="generation failed: out of memory"))
    stats.add_result(JobResult("y", JobState.DONE))
    built = stats.build(RUN, {"queued": 0, "running": 0, "done": 2, "failed": 1})
    assert (built["count"], built["done"], built["failed"], built["manifest_rows"]) == (3, 2, 1, 2)
    assert built["gpu_seconds"] == 2.0  # each image's share of its batch: 1.0 + 1.0
    assert (built["started_at"], built["finished_at"], built["duration_s"]) == (10.0, 13.0, 3.0)
    assert built["images_per_s"] == pytest.approx(2 / 3)
    assert built["bytes"] == {"total": 400, "mean": 200.0, "min": 100, "max": 300}
    assert built["deepcache"] == {"3/0": 1, "off": 1} and built["sizes"] == {"96x64": 2}
    assert built["failed_by_reason"] == {"generation failed: out of memory": 1}


def test_buckets_group_random_order_by_index(tmp_path: Path) -> None:
    buckets = Buckets(tmp_path, span=10, spill_bytes=200)  # spills often: several gzip members per file
    ids = [f"{index:08d}-0123456789ab" for index in range(45)]
    for job_id in reversed(ids):
        buckets.add("R", job_id, json.dumps({"job_id": job_id}))
    buckets.add("D", ids[3], "s3://b/k.png")
    assert buckets.ids() == [0, 1, 2, 3, 4]
    first = list(buckets.read(0))
    assert sorted(job_id for kind, job_id, _ in first if kind == "R") == ids[:10]
    assert ("D", ids[3], "s3://b/k.png") in first
    assert not (tmp_path / "bucket-00000000.gz").exists()  # read once, then gone
    with pytest.raises(ValueError):
        buckets.add("R", ids[0], "two\nlines")


def test_ordered_map_keeps_order_reads_ahead_boundedly_and_raises() -> None:
    threads_before = threading.active_count()  # other tests' daemon threads may still be about
    consumed = []

    def items():
        for n in range(100):
            consumed.append(n)
            yield n

    def slow(n: int) -> int:
        time.sleep(0.001 * (n % 5))
        return n * n

    results = ordered_map(slow, items(), threads=4)
    assert next(results) == (0, 0)
    assert len(consumed) <= 2 * 4 + 1  # never more than the window ahead
    assert [value for _, value in results] == [n * n for n in range(1, 100)]

    def fails(n: int) -> int:
        if n == 3:
            raise RuntimeError("read failed")
        return n

    with pytest.raises(RuntimeError, match="read failed"):
        list(ordered_map(fails, range(10), threads=3))
    assert list(ordered_map(str, range(3), threads=1)) == [(0, "0"), (1, "1"), (2, "2")]
    assert threading.active_count() <= threads_before + 4  # its pools are shut down, not left behind


# --- compaction ----------------------------------------------------------------------------------


@pytest.fixture
def run(redis_urls, tmp_path: Path):
    store = RunStore.from_url(redis_urls[1])
    storage = LocalStorage(tmp_path / "out")
    jobs = make_jobs(RUN, 11)
    store_outputs(storage, store, jobs, prefix="datasets", part_rows=4)  # parts of 4, 4, 3
    yield store, storage, jobs
    store.close()


def manifest_rows(storage: LocalStorage, stats: dict) -> list[dict]:
    tables = [pq.read_table(storage.root / key) for key in stats["manifest"]["shards"]]
    assert all(table.schema.remove_metadata() == arrow_schema() for table in tables)
    return [row for table in tables for row in table.to_pylist()]


def test_compaction_repairs_lost_parts_dedupes_and_joins_the_audit(run, tmp_path: Path) -> None:
    store, storage, jobs = run
    parts = [key for key, _ in storage.list(parts_prefix("datasets", RUN))]
    assert len(parts) == 3
    lost = parts[1]  # a worker killed before it flushed: 4 rows only its sidecars hold
    (storage.root / lost).unlink()
    # the same part twice (a retried upload that had gone through): rows count once
    (storage.root / parts[0]).with_name("copy-" + Path(parts[0]).name).write_bytes(
        (storage.root / parts[0]).read_bytes()
    )
    # a failed job, and a done job whose outputs are gone
    failed = make_jobs(RUN, 13)[11:]
    store.mark_queued(RUN, [job.job_id for job in failed])
    store.mark(RUN, failed[0].job_id, JobState.FAILED, reason=f"storing failed: upload of s3://b/{failed[0].job_id}")
    store.mark(RUN, failed[1].job_id, JobState.DONE, key=f"s3://b/datasets/{RUN}/images/{failed[1].job_id}.png")
    audit = [{"job_id": jobs[2].job_id, "psnr": 33.1, "ssim": 0.98, "uncached_key": "u/2.png"}]
    (storage.root / audit_rows_key("datasets", RUN)).write_text("".join(json.dumps(row) + "\n" for row in audit))
    (storage.root / audit_summary_key("datasets", RUN)).write_text(json.dumps({"audited": 1, "psnr_mean": 33.1}))

    stats = compact(store, storage, "datasets", RUN, shard_rows=4, bucket_span=3)

    rows = manifest_rows(storage, stats)
    assert [row["job_id"] for row in rows] == [job.job_id for job in jobs]  # every done image, in order
    assert len(stats["manifest"]["shards"]) == 3 and stats["manifest"]["rows"] == 11
    assert stats["manifest"]["shards"][0] == shard_key("datasets", RUN, 0)
    assert (stats["repaired_from_sidecars"], stats["duplicates"], stats["missing"]) == (4, 4, 1)
    assert stats["missing_examples"] == [failed[1].job_id] and stats["complete"] is False
    assert (stats["count"], stats["done"], stats["failed"], stats["queued"]) == (13, 12, 1, 0)
    assert stats["failed_by_reason"] == {"storing failed: upload of <s3 object>": 1}
    assert stats["audit"] == {"audited": 1, "psnr_mean": 33.1} and stats["audited"] == 1
    by_id = {row["job_id"]: row for row in rows}
    assert (by_id[jobs[2].job_id]["audit_psnr"], by_id[jobs[2].job_id]["audit_uncached_key"]) == (33.1, "u/2.png")
    assert by_id[jobs[3].job_id]["audit_psnr"] is None
    for job in jobs:
        row = by_id[job.job_id]
        image = storage.root / row["key"]
        assert row["bytes"] == image.stat().st_size
        assert json.loads(row["sidecar"]) == json.loads((storage.root / row["sidecar_key"]).read_text())
        assert (row["prompt"], row["seed"], row["width"], row["negative_prompt"]) == (
            job.prompt,
            job.seed,
            job.width,
            job.negative_prompt,
        )
    assert stats["gpu_seconds"] == pytest.approx(0.5 * 11)
    assert stats["sizes"] == {"64x64": 6, "72x64": 5} and stats["deepcache"] == {"3/0": 7, "off": 4}
    assert read_stats(storage, "datasets", RUN) == json.loads(json.dumps(stats))


def test_manifest_is_rebuilt_only_when_stale_and_old_shards_go(run) -> None:
    store, storage, jobs = run
    stats = compact(store, storage, "datasets", RUN, shard_rows=2)
    assert len(stats["manifest"]["shards"]) == 6
    assert is_current(read_stats(storage, "datasets", RUN), fingerprint(store, storage, "datasets", RUN))
    assert (
        ensure_manifest(store, storage, "datasets", RUN)["manifest"]["compacted_at"]
        == (stats["manifest"]["compacted_at"])
    )
    more = make_jobs(RUN, 12)[11:]
    store_outputs(storage, store, more, prefix="datasets")  # a new part and a new done job
    assert not is_current(read_stats(storage, "datasets", RUN), fingerprint(store, storage, "datasets", RUN))
    fresh = compact(store, storage, "datasets", RUN)  # one shard now: the other five are deleted
    assert fresh["manifest"]["shards"] == [shard_key("datasets", RUN, 0)]
    shards = [key for key, _ in storage.list(f"datasets/{RUN}/manifest/manifest-")]
    assert shards == [shard_key("datasets", RUN, 0)] and fresh["manifest_rows"] == 12


def test_a_run_without_parts_is_read_from_its_sidecars(run) -> None:
    """Runs stored before manifests existed, or every worker killed: the sidecars are the truth."""
    store, storage, jobs = run
    for key, _ in list(storage.list(parts_prefix("datasets", RUN))):
        storage.delete(key)
    stats = compact(store, storage, "datasets", RUN, threads=4)
    assert stats["repaired_from_sidecars"] == 11 and stats["complete"] is True
    assert [row["index"] for row in manifest_rows(storage, stats)] == list(range(11))
