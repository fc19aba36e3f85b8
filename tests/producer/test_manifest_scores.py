"""Quality scores in the compacted manifest: the columns phash, clip_score, nsfw from the
sidecars, and duplicate_of from the whole run's pHashes (across buckets, shards and parts), with
the counts in stats.json. Real Redis, local storage, no torch."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from producer.manifest import compact, ensure_manifest
from producer.manifest_schema import COLUMNS, arrow_schema, flatten
from producer.state import RunStore
from producer.storage import LocalStorage
from tests.manifest_helpers import make_jobs, store_outputs

RUN = "scored-run"
COUNT = 14


def flip(value: int, *bits: int) -> int:
    for bit in bits:
        value ^= 1 << bit
    return value


def planted_hashes() -> dict[int, int | None]:
    """Index -> pHash: random ones, with 5 three bits from 1, 9 equal to 5 (both repeat 1, the
    first), 11 seven bits from 2 (past the default threshold of 6, within 7), 3 unscored."""
    rng = random.Random(11)
    hashes: dict[int, int | None] = {index: rng.getrandbits(64) for index in range(COUNT)}
    hashes[5] = flip(hashes[1], 0, 17, 63)
    hashes[9] = hashes[5]
    hashes[11] = flip(hashes[2], *range(20, 27))
    hashes[3] = None
    return hashes


def scores_of(hashes: dict[int, int | None]):
    def scores(job):
        if hashes[job.index] is None:
            return {}
        return {"phash": f"{hashes[job.index]:016x}", "clip_score": 10.0 + job.index, "nsfw": job.index == 4}

    return scores


@pytest.fixture
def run(redis_urls, tmp_path: Path):
    store = RunStore.from_url(redis_urls[1])
    storage = LocalStorage(tmp_path / "out")
    jobs = make_jobs(RUN, COUNT)
    store_outputs(storage, store, jobs, prefix="p", part_rows=3, scores=scores_of(planted_hashes()))
    yield store, storage, jobs
    store.close()


def rows_of(storage: LocalStorage, stats: dict) -> list[dict]:
    tables = [pq.read_table(storage.root / key) for key in stats["manifest"]["shards"]]
    assert all(table.schema.remove_metadata() == arrow_schema() for table in tables)
    return [row for table in tables for row in table.to_pylist()]


def test_scores_and_near_duplicates_in_the_manifest_and_stats(run) -> None:
    store, storage, jobs = run
    stats = compact(store, storage, "p", RUN, shard_rows=4, bucket_span=4)
    rows = rows_of(storage, stats)
    assert [row["job_id"] for row in rows] == [job.job_id for job in jobs]
    hashes = planted_hashes()
    for row in rows:
        index = row["index"]
        if hashes[index] is None:
            assert (row["phash"], row["clip_score"], row["nsfw"], row["duplicate_of"]) == (None, None, None, None)
        else:
            assert int(row["phash"], 16) == hashes[index]
            assert row["clip_score"] == 10.0 + index and row["nsfw"] is (index == 4)
    duplicate_of = {row["index"]: row["duplicate_of"] for row in rows if row["duplicate_of"]}
    assert duplicate_of == {5: jobs[1].job_id, 9: jobs[1].job_id}
    assert stats["near_duplicates"] == {"threshold": 6, "bits": 64, "hashed": COUNT - 1, "duplicates": 2}
    assert stats["scores"] == {
        "phash": COUNT - 1,
        "clip_score": {"count": COUNT - 1, "mean": pytest.approx(sum(10.0 + i for i in range(COUNT) if i != 3) / 13)},
        "nsfw": {"count": COUNT - 1, "flagged": 1},
    }


def test_another_threshold_rebuilds_the_manifest(run) -> None:
    store, storage, jobs = run
    first = ensure_manifest(store, storage, "p", RUN)
    assert ensure_manifest(store, storage, "p", RUN)["manifest"]["compacted_at"] == first["manifest"]["compacted_at"]
    wider = ensure_manifest(store, storage, "p", RUN, duplicate_threshold=7)
    assert wider["manifest"]["compacted_at"] != first["manifest"]["compacted_at"]
    duplicate_of = {row["index"]: row["duplicate_of"] for row in rows_of(storage, wider) if row["duplicate_of"]}
    assert duplicate_of == {5: jobs[1].job_id, 9: jobs[1].job_id, 11: jobs[2].job_id}
    assert wider["near_duplicates"]["duplicates"] == 3


def test_score_columns_sit_before_the_sidecar_with_stable_types() -> None:
    names = [name for name, _ in COLUMNS]
    assert names[-5:] == ["phash", "clip_score", "nsfw", "duplicate_of", "sidecar"]
    assert dict(COLUMNS)["clip_score"] == "float64" and dict(COLUMNS)["nsfw"] == "bool"
    flat = flatten({"job_id": "j", "scores": {"phash": "00000000000000ff", "clip_score": 31, "nsfw": 0}})
    assert (flat["phash"], flat["clip_score"], flat["nsfw"], flat["duplicate_of"]) == (
        "00000000000000ff",
        31.0,
        False,
        None,
    )
    assert isinstance(flat["clip_score"], float)
    empty = flatten({"job_id": "j"})
    assert (empty["phash"], empty["clip_score"], empty["nsfw"]) == (None, None, None)
