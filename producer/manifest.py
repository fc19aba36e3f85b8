"""A run's compacted manifest and its stats, built on demand from the workers' parts.

Workers write their rows in parts (``worker.output.manifest_writer``); parts are an optimisation, never
the truth. ``compact`` makes the manifest whole:

1. read every part, the audit rows (``audit.jsonl``, if any) and every job's state in
   Redis (HSCAN), and spread them over temporary bucket files on local disk by job index
   (``BUCKET_SPAN`` indexes per bucket);
2. per bucket, in index order: dedupe the rows by job id; read the sidecar of every job that
   Redis says is done but no part holds (a worker killed before it flushed, a run older than
   parts) and add it; join the audit results; flatten; append to the Parquet shards
   ``{prefix}/{run}/manifest/manifest-00000.parquet`` ... (``SHARD_ROWS`` rows each), which
   are written to a temporary file and uploaded whole;
3. write ``{prefix}/{run}/stats.json``: counts per state, failures by reason, images/s,
   GPU-seconds, time span, sizes, models, DeepCache settings, quality scores, near-duplicates,
   and the fingerprint of what it was built from (parts, their bytes, the audit rows, the done
   count), so an export can tell whether the manifest is still current.

Memory does not grow with the run: parts are read ``2 * READ_THREADS`` at a time (still
gzipped), the bucket files take at most ``SPILL_BYTES`` of buffered lines, and one bucket
(``BUCKET_SPAN`` jobs, about 1.5 KB of JSON text each) is in memory at a time, with one Parquet
row group (``ROW_GROUP_ROWS``) being built: about 200 MB in all, measured flat from 1k to 100k
images (``ops/bench/export_memory.py``). Several recipes per index (a sweep under one run name)
make a bucket that many times larger. What does grow is temporary disk: the bucket files hold the
run's manifest rows gzipped (a few hundred bytes per image, some GB for 10M images), in
``tmp_dir`` (default: the system's temporary folder).

Near-duplicates: rows come out in index order, so each row's pHash is looked up among the
earlier rows' in a banded index (``producer.near_dups``: about 100 bytes per image, some 100 MB
at a million) and ``duplicate_of`` names the first one within ``duplicate_threshold`` bits.

Columns: ``producer.manifest_schema``; stats: ``producer.manifest_stats``; the bounded reads and
the Parquet shard writer, shared with exports: ``producer.shards``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from tqdm import tqdm

from producer.errors import StorageError
from producer.layout import (
    PART_SUFFIX,
    audit_rows_key,
    audit_summary_key,
    image_key,
    manifest_prefix,
    parts_prefix,
    shard_key,
    sidecar_key,
    stats_key,
    url_extension,
)
from producer.manifest_parts import decode_part, manifest_row
from producer.manifest_schema import COLUMNS, arrow_schema, flatten
from producer.manifest_stats import STATS_VERSION, StatsBuilder
from producer.near_dups import DEFAULT_THRESHOLD, RunDuplicates
from producer.shards import READ_THREADS, ParquetShards, ordered_map
from producer.spill import Buckets, sort_key
from producer.state import JobState, RunStore
from producer.storage import Storage

logger = logging.getLogger(__name__)

#: Rows per compacted manifest shard.
SHARD_ROWS = 100_000
#: Job indexes per temporary bucket: the rows of one bucket are in memory at a time.
BUCKET_SPAN = 10_000

_SHARD_NAME = re.compile(r"manifest-(\d+)\.parquet$")


def fingerprint(store: RunStore, storage: Storage, prefix: str, run_id: str) -> dict[str, Any]:
    """What a manifest is built from: parts (count, bytes), the audit rows' size, the done count."""
    parts = parts_bytes = 0
    for key, size in storage.list(parts_prefix(prefix, run_id)):
        if key.endswith(PART_SUFFIX):
            parts, parts_bytes = parts + 1, parts_bytes + size
    done = store.counts(run_id)[JobState.DONE]
    return {
        "parts": parts,
        "parts_bytes": parts_bytes,
        "audit_bytes": storage.size(audit_rows_key(prefix, run_id)),
        "done": done,
    }


def read_stats(storage: Storage, prefix: str, run_id: str) -> dict[str, Any] | None:
    """The run's stats.json, or None if it was never written (or cannot be parsed)."""
    key = stats_key(prefix, run_id)
    if storage.size(key) is None:
        return None
    try:
        return json.loads(storage.get(key))
    except ValueError:
        return None


def is_current(stats: Mapping[str, Any] | None, now: Mapping[str, Any]) -> bool:
    """Whether a manifest (its stats.json) was built from what ``fingerprint`` finds now."""
    if not stats or stats.get("stats_version") != STATS_VERSION:
        return False
    built = stats.get("manifest", {}).get("source", {})
    return all(built.get(name) == value for name, value in now.items())


def compact(
    store: RunStore,
    storage: Storage,
    prefix: str,
    run_id: str,
    *,
    progress: bool = False,
    shard_rows: int = SHARD_ROWS,
    bucket_span: int = BUCKET_SPAN,
    threads: int = READ_THREADS,
    tmp_dir: str | Path | None = None,
    duplicate_threshold: int = DEFAULT_THRESHOLD,
) -> dict[str, Any]:
    """Build the run's manifest shards and stats.json from its parts, sidecars and Redis; returns
    the stats. See the module docstring for the steps and the memory bound. Images whose pHashes
    differ in at most ``duplicate_threshold`` bits of 64 are near-duplicates."""
    began = time.time()
    duplicates = RunDuplicates(duplicate_threshold)
    source = fingerprint(store, storage, prefix, run_id)
    counts = {state.value: count for state, count in store.counts(run_id).items()}
    stats = StatsBuilder()
    with tempfile.TemporaryDirectory(prefix="deepqueue-manifest-", dir=tmp_dir) as tmp:
        folder = Path(tmp)
        buckets = Buckets(folder, bucket_span)
        # 1. Spread parts, audit rows and done jobs over the buckets.
        damaged = _read_parts(storage, prefix, run_id, buckets, threads=threads, progress=progress)
        audit_summary = _read_audit(storage, prefix, run_id, buckets, folder)
        for result in store.results(run_id):
            stats.add_result(result)
            if result.state is JobState.DONE:
                buckets.add("D", result.job_id, result.key or "")

        # 2. One bucket at a time: dedupe, repair, join, flatten, write.
        def publish(index: int, path: Path) -> None:
            storage.upload(shard_key(prefix, run_id, index), path, content_type="application/vnd.apache.parquet")

        shards = ParquetShards(folder, arrow_schema(), publish, shard_rows=shard_rows)
        totals: Counter[str] = Counter()
        missing: list[str] = []  # the first few; totals["missing"] counts them all
        with tqdm(total=source["done"], unit="row", desc="compact", disable=not progress) as bar:
            for bucket in buckets.ids():
                for flat in _bucket_rows(buckets.read(bucket), storage, prefix, run_id, totals, missing, threads):
                    flat["duplicate_of"] = duplicates.duplicate_of(flat["job_id"], flat["phash"])
                    stats.add_row(flat)
                    shards.add(flat)
                    bar.update()
        count = shards.close()
        # 3. Shards of an earlier, larger manifest go; stats.json last: it marks the manifest done.
        for key, _ in list(storage.list(manifest_prefix(prefix, run_id) + "manifest-")):
            match = _SHARD_NAME.search(key)
            if match and int(match.group(1)) >= count:
                storage.delete(key)
        result = stats.build(
            run_id,
            counts,
            repaired_from_sidecars=totals["repaired"],
            not_done_in_redis=totals["not_done"],
            duplicates=totals["duplicates"],
            missing=totals["missing"],
            complete=not totals["missing"],
            missing_examples=missing,
            damaged_parts=damaged,
            near_duplicates=duplicates.summary(),
            manifest={
                "shards": [shard_key(prefix, run_id, index) for index in range(count)],
                "rows": stats.rows,
                "columns": [name for name, _ in COLUMNS],
                "compacted_at": time.time(),
                "compact_s": round(time.time() - began, 3),
                "source": source,
            },
            **({"audit": audit_summary} if audit_summary is not None else {}),
        )
        path = folder / "stats.json"
        path.write_text(json.dumps(result, indent=1, ensure_ascii=False))
        storage.upload(stats_key(prefix, run_id), path, content_type="application/json")
    return result


def _read_parts(storage: Storage, prefix: str, run_id: str, buckets: Buckets, *, threads: int, progress: bool) -> int:
    """Spread every part's rows over ``buckets``; returns how many parts could not be read."""
    keys = (key for key, _ in storage.list(parts_prefix(prefix, run_id)) if key.endswith(PART_SUFFIX))
    damaged = 0

    def fetch(key: str) -> bytes | StorageError:
        try:
            return storage.get(key)  # still gzipped: the read-ahead window holds a few MB
        except StorageError as error:
            return error

    for key, data in tqdm(ordered_map(fetch, keys, threads), unit="part", desc="read parts", disable=not progress):
        try:
            if isinstance(data, StorageError):
                raise data
            rows = decode_part(data)
        except (ValueError, StorageError) as error:  # its rows are repaired from the sidecars
            logger.warning("manifest part %s cannot be read: %s; its jobs' sidecars are read instead", key, error)
            damaged += 1
            continue
        for row in rows:
            job_id = row.get("job_id")
            if isinstance(job_id, str):
                buckets.add("R", job_id, json.dumps(row, ensure_ascii=False, separators=(",", ":")))
    return damaged


def _read_audit(storage: Storage, prefix: str, run_id: str, buckets: Buckets, folder: Path) -> dict[str, Any] | None:
    """Spread the audit rows over ``buckets``; returns the audit summary (audit.json), if any."""
    rows_key = audit_rows_key(prefix, run_id)
    if storage.size(rows_key) is not None:
        path = folder / "audit.jsonl"
        storage.download(rows_key, path)
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    buckets.add("A", str(row["job_id"]), json.dumps(row, separators=(",", ":")))
                except (ValueError, KeyError, TypeError) as error:
                    logger.warning("%s line %d skipped: %s", rows_key, number, error)
        path.unlink()
    summary_key = audit_summary_key(prefix, run_id)
    if storage.size(summary_key) is None:
        return None
    try:
        return json.loads(storage.get(summary_key))
    except ValueError as error:
        logger.warning("%s cannot be parsed: %s", summary_key, error)
        return None


def _bucket_rows(
    lines: Iterator[tuple[str, str, str]],
    storage: Storage,
    prefix: str,
    run_id: str,
    totals: Counter[str],
    missing: list[str],
    threads: int,
) -> Iterator[dict[str, Any]]:
    """One bucket's flattened rows, sorted by job index: deduped, repaired, joined."""
    rows: dict[str, str | dict[str, Any]] = {}  # JSON text until its turn: a third of the memory
    done: dict[str, str] = {}
    audits: dict[str, str] = {}
    for kind, job_id, payload in lines:
        if kind == "R":
            if job_id in rows:
                totals["duplicates"] += 1
            else:
                rows[job_id] = payload
        elif kind == "D":
            done[job_id] = payload
        else:
            audits[job_id] = payload

    def repair(job_id: str) -> dict[str, Any] | None:
        return _from_sidecar(storage, prefix, run_id, job_id, done[job_id])

    for job_id, repaired in ordered_map(repair, [job_id for job_id in done if job_id not in rows], threads):
        if repaired is None:
            totals["missing"] += 1
            if len(missing) < 20:
                missing.append(job_id)
        else:
            rows[job_id] = repaired
            totals["repaired"] += 1
    for job_id in sorted(rows, key=sort_key):
        payload = rows.pop(job_id)
        row = json.loads(payload) if isinstance(payload, str) else payload
        if row.get("bytes") is None and row.get("key"):  # an image an earlier delivery stored
            with contextlib.suppress(StorageError):
                row["bytes"] = storage.size(row["key"])
        if job_id not in done:
            totals["not_done"] += 1
        audit = json.loads(audits[job_id]) if job_id in audits else None
        yield flatten(row, audit)


def _from_sidecar(storage: Storage, prefix: str, run_id: str, job_id: str, url: str) -> dict[str, Any] | None:
    """The manifest row of a done job that no part holds, from its sidecar (None: unreadable)."""
    key = image_key(prefix, run_id, job_id, url_extension(url))
    try:
        sidecar = json.loads(storage.get(sidecar_key(key)))
        size = storage.size(key)
    except (StorageError, ValueError) as error:
        logger.warning("job %s is done but its sidecar cannot be read: %s", job_id, error)
        return None
    return manifest_row(sidecar, key, sidecar_key(key), size)


def ensure_manifest(
    store: RunStore,
    storage: Storage,
    prefix: str,
    run_id: str,
    *,
    progress: bool = False,
    duplicate_threshold: int = DEFAULT_THRESHOLD,
) -> dict[str, Any]:
    """The run's stats (with its manifest), compacting first if the manifest is missing, was
    built before the latest parts, audit rows or done jobs, or with another near-duplicate
    threshold."""
    stats = read_stats(storage, prefix, run_id)
    if is_current(stats, fingerprint(store, storage, prefix, run_id)):
        assert stats is not None
        if stats.get("near_duplicates", {}).get("threshold") == duplicate_threshold:
            return stats
    return compact(store, storage, prefix, run_id, progress=progress, duplicate_threshold=duplicate_threshold)


def iter_manifest(storage: Storage, stats: Mapping[str, Any], folder: Path, batch_rows: int = 1000) -> Iterator[dict]:
    """The compacted manifest's rows (``COLUMNS``), shard by shard, ``batch_rows`` in memory."""
    for index, key in enumerate(stats["manifest"]["shards"]):
        path = folder / f"manifest-{index:05d}.parquet"
        storage.download(key, path)
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
                yield from batch.to_pylist()
        finally:
            path.unlink(missing_ok=True)
