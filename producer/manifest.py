"""A run's compacted manifest and its stats, built on demand from the workers' parts.

Workers write their rows in parts (``worker.manifest_writer``); parts are an optimisation, never the
truth. ``compact`` makes the manifest whole:

1. read every part, the audit rows (``audit.jsonl``, if any) and every job's state in
   Redis (HSCAN), and spread them over temporary bucket files on local disk by job index
   (``BUCKET_SPAN`` indexes per bucket);
2. per bucket, in index order: dedupe the rows by job id; read the sidecar of every job that
   Redis says is done but no part holds (a worker killed before it flushed, a run older than
   parts) and add it; join the audit results; flatten; append to the Parquet shards
   ``{prefix}/{run}/manifest/manifest-00000.parquet`` ... (``SHARD_ROWS`` rows each), which
   are written to a temporary file and uploaded whole;
3. write ``{prefix}/{run}/stats.json``: counts per state, failures by reason, images/s,
   GPU-seconds, time span, sizes, models, DeepCache settings, and the fingerprint of what it was
   built from (parts, their bytes, the audit rows, the done count), so an export can tell
   whether the manifest is still current.

Memory does not grow with the run: parts are read ``2 * READ_THREADS`` at a time (still
gzipped), the bucket files take at most ``SPILL_BYTES`` of buffered lines, and one bucket
(``BUCKET_SPAN`` jobs, about 1.5 KB of JSON text each) is in memory at a time, with one Parquet
row group (``ROW_GROUP_ROWS``) being built: about 200 MB in all, measured flat from 1k to 100k
images (``ops/bench/export_memory.py``). Several recipes per index (a sweep under one run name)
make a bucket that many times larger. What does grow is temporary disk: the bucket files hold the
run's manifest rows gzipped (a few hundred bytes per image, some GB for 10M images), in
``tmp_dir`` (default: the system's temporary folder).

Columns are fixed (``COLUMNS``), in a stable order, and typed the same in every shard whatever
values are missing: the recipe and timing flattened into scalar columns, ``batch_job_ids`` a
list, and ``sidecar`` the full sidecar as JSON, so no field is lost, including fields added
after this schema.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
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
from producer.manifest_parts import ROW_EXTRAS, decode_part, manifest_row
from producer.spill import Buckets, sort_key
from producer.state import JobResult, JobState, RunStore
from producer.storage import Storage

logger = logging.getLogger(__name__)

#: Rows per compacted manifest shard, and per Parquet row group.
SHARD_ROWS = 100_000
ROW_GROUP_ROWS = 2_000
#: Job indexes per temporary bucket: the rows of one bucket are in memory at a time.
BUCKET_SPAN = 10_000
#: Concurrent reads from storage (parts, sidecars of missing rows).
READ_THREADS = 16
#: Distinct values kept per stats counter; the rest count as "(other)".
TOP_KEPT = 1000
#: Failure reasons listed in stats.json, the most frequent first.
TOP_REASONS = 20
STATS_VERSION = 1
OTHER = "(other)"

# --- columns ---------------------------------------------------------------------------------

_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int64": pa.int64(),
    "int32": pa.int32(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "list<string>": pa.list_(pa.string()),
}

#: (name, type) of every manifest column, in order.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("job_id", "string"),
    ("run_id", "string"),
    ("index", "int64"),
    ("prompt", "string"),
    ("negative_prompt", "string"),
    ("seed", "int64"),
    ("width", "int32"),
    ("height", "int32"),
    ("steps", "int32"),
    ("guidance", "float64"),
    ("scheduler", "string"),
    ("format", "string"),
    ("model_id", "string"),
    ("model_revision", "string"),
    ("model_hash", "string"),
    ("deepcache", "bool"),
    ("cache_interval", "int32"),
    ("cache_branch", "int32"),
    ("batch_id", "string"),
    ("batch_size", "int32"),
    ("batch_index", "int32"),
    ("batch_job_ids", "list<string>"),
    ("enqueued_at", "float64"),
    ("received_at", "float64"),
    ("started_at", "float64"),
    ("finished_at", "float64"),
    ("queue_wait_s", "float64"),
    ("batch_inference_s", "float64"),
    ("inference_s", "float64"),
    ("encode_s", "float64"),
    ("upload_s", "float64"),
    ("worker_name", "string"),
    ("worker_hostname", "string"),
    ("worker_device", "string"),
    ("worker_dtype", "string"),
    ("worker_pipeline", "string"),
    ("torch_version", "string"),
    ("diffusers_version", "string"),
    ("deepcache_version", "string"),
    ("image_url", "string"),
    ("image_reused", "bool"),
    ("key", "string"),
    ("sidecar_key", "string"),
    ("bytes", "int64"),
    ("audit_psnr", "float64"),
    ("audit_ssim", "float64"),
    ("audit_uncached_key", "string"),
    ("sidecar", "string"),
)


def arrow_schema(columns: Iterable[tuple[str, str]] = COLUMNS) -> pa.Schema:
    return pa.schema([pa.field(name, _TYPES[kind]) for name, kind in columns])


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def flatten(row: Mapping[str, Any], audit: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A manifest row (sidecar + key, sidecar_key, bytes) as ``COLUMNS``. Pure."""
    model = row.get("model") or {}
    deepcache = row.get("deepcache") or {}
    batch = row.get("batch") or {}
    timing = row.get("timing") or {}
    worker = row.get("worker") or {}
    audit = audit or {}
    sidecar = {name: value for name, value in row.items() if name not in ROW_EXTRAS}
    return {
        "job_id": row.get("job_id"),
        "run_id": row.get("run_id"),
        "index": _int(row.get("index")),
        "prompt": row.get("prompt"),
        "negative_prompt": row.get("negative_prompt"),
        "seed": _int(row.get("seed")),
        "width": _int(row.get("width")),
        "height": _int(row.get("height")),
        "steps": _int(row.get("steps")),
        "guidance": _float(row.get("guidance")),
        "scheduler": row.get("scheduler"),
        "format": row.get("format"),
        "model_id": _str(model.get("id")),
        "model_revision": _str(model.get("revision")),
        "model_hash": _str(model.get("hash")),
        "deepcache": deepcache.get("enabled"),
        "cache_interval": _int(deepcache.get("interval")),
        "cache_branch": _int(deepcache.get("branch")),
        "batch_id": batch.get("id"),
        "batch_size": _int(batch.get("size")),
        "batch_index": _int(batch.get("index")),
        "batch_job_ids": batch.get("job_ids"),
        **{name: _float(timing.get(name)) for name in _TIMING},
        "worker_name": _str(worker.get("name")),
        "worker_hostname": _str(worker.get("hostname")),
        "worker_device": _str(worker.get("device")),
        "worker_dtype": _str(worker.get("dtype")),
        "worker_pipeline": _str(worker.get("pipeline")),
        "torch_version": _str(worker.get("torch")),
        "diffusers_version": _str(worker.get("diffusers")),
        "deepcache_version": _str(worker.get("deepcache")),
        "image_url": row.get("image"),
        "image_reused": row.get("image_reused"),
        "key": row.get("key"),
        "sidecar_key": row.get("sidecar_key"),
        "bytes": _int(row.get("bytes")),
        "audit_psnr": _float(audit.get("psnr")),
        "audit_ssim": _float(audit.get("ssim")),
        "audit_uncached_key": _str(audit.get("uncached_key")),
        "sidecar": json.dumps(sidecar, ensure_ascii=False, separators=(",", ":")),
    }


_TIMING = (
    "enqueued_at",
    "received_at",
    "started_at",
    "finished_at",
    "queue_wait_s",
    "batch_inference_s",
    "inference_s",
    "encode_s",
    "upload_s",
)

# --- stats (pure) ----------------------------------------------------------------------------

_VOLATILE = (
    (re.compile(r"\b\d{8,}-[0-9a-f]{12}\b"), "<job>"),
    (re.compile(r"s3://\S+"), "<s3 object>"),
    (re.compile(r"(?<![\w.])/[^\s:'\"]+"), "<path>"),
    (re.compile(r"\b0x[0-9a-f]+\b|\b[0-9a-f]{12,}\b"), "<id>"),
)


def reason_kind(reason: str | None) -> str:
    """A failure reason with what differs from job to job (ids, object keys, paths) taken out,
    so the same failure counts once: ``storing failed: upload of s3://b/r/images/0001-ab.png
    failed`` -> ``storing failed: upload of <s3 object> failed``."""
    text = " ".join((reason or "unknown").split())
    for pattern, replacement in _VOLATILE:
        text = pattern.sub(replacement, text)
    return text[:300]


class TopCounter(Counter):
    """A Counter that keeps at most ``TOP_KEPT`` distinct values; later ones count as OTHER."""

    def add(self, value: Any, count: int = 1) -> None:
        key = "none" if value is None else str(value)
        if key not in self and len(self) >= TOP_KEPT:
            key = OTHER
        self[key] += count

    def top(self, n: int | None = None) -> dict[str, int]:
        return dict(self.most_common(n))


class StatsBuilder:
    """stats.json, one row and one job state at a time (constant memory)."""

    def __init__(self) -> None:
        self.rows = 0
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.gpu_seconds = 0.0
        self.bytes_total = 0
        self.bytes_known = 0
        self.bytes_min: int | None = None
        self.bytes_max: int | None = None
        self.sizes, self.models, self.schedulers = TopCounter(), TopCounter(), TopCounter()
        self.deepcache, self.formats, self.steps, self.workers = TopCounter(), TopCounter(), TopCounter(), TopCounter()
        self.failed_by_reason = TopCounter()
        self.audited = 0

    def add_row(self, flat: Mapping[str, Any]) -> None:
        self.rows += 1
        started, finished = flat.get("started_at"), flat.get("finished_at")
        if started is not None:
            self.started_at = started if self.started_at is None else min(self.started_at, started)
        if finished is not None:
            self.finished_at = finished if self.finished_at is None else max(self.finished_at, finished)
        # Each image carries its share of its batch's time: the sum is the batches' total.
        self.gpu_seconds += flat.get("inference_s") or 0.0
        size = flat.get("bytes")
        if size is not None:
            self.bytes_total += size
            self.bytes_known += 1
            self.bytes_min = size if self.bytes_min is None else min(self.bytes_min, size)
            self.bytes_max = size if self.bytes_max is None else max(self.bytes_max, size)
        self.sizes.add(f"{flat.get('width')}x{flat.get('height')}")
        self.models.add(flat.get("model_id"))
        self.schedulers.add(flat.get("scheduler"))
        self.formats.add(flat.get("format"))
        self.steps.add(flat.get("steps"))
        self.workers.add(flat.get("worker_name") or flat.get("worker_hostname"))
        if flat.get("deepcache"):
            self.deepcache.add(f"{flat.get('cache_interval')}/{flat.get('cache_branch')}")
        else:
            self.deepcache.add("off")
        if flat.get("audit_psnr") is not None or flat.get("audit_ssim") is not None:
            self.audited += 1

    def add_result(self, result: JobResult) -> None:
        if result.state is JobState.FAILED:
            self.failed_by_reason.add(reason_kind(result.reason))

    def build(self, run_id: str, counts: Mapping[str, int], **extra: Any) -> dict[str, Any]:
        span = None
        if self.started_at is not None and self.finished_at is not None:
            span = max(self.finished_at - self.started_at, 0.0)
        return {
            "stats_version": STATS_VERSION,
            "run_id": run_id,
            "count": sum(counts.values()),
            **{state: counts.get(state, 0) for state in counts},
            "manifest_rows": self.rows,
            "failed_by_reason": self.failed_by_reason.top(TOP_REASONS),
            "failed_reasons_distinct": len(self.failed_by_reason),
            "images_per_s": self.rows / span if span else None,
            "gpu_seconds": round(self.gpu_seconds, 6),
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration_s": span,
            "bytes": {
                "total": self.bytes_total,
                "mean": self.bytes_total / self.bytes_known if self.bytes_known else None,
                "min": self.bytes_min,
                "max": self.bytes_max,
            },
            "sizes": self.sizes.top(),
            "models": self.models.top(),
            "schedulers": self.schedulers.top(),
            "steps": self.steps.top(),
            "deepcache": self.deepcache.top(),
            "formats": self.formats.top(),
            "workers": self.workers.top(),
            "audited": self.audited,
            **extra,
        }


# --- helpers ---------------------------------------------------------------------------------

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int = READ_THREADS) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` in the order of ``items``, ``threads`` calls at a time, reading
    ``items`` no further ahead than twice that (memory stays bounded). Errors propagate."""
    if threads <= 1:
        for item in items:
            yield item, fn(item)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="deepqueue-read") as pool:
        window: deque[tuple[T, Future[R]]] = deque()
        try:
            for item in items:
                window.append((item, pool.submit(fn, item)))
                if len(window) >= 2 * threads:
                    first, future = window.popleft()
                    yield first, future.result()
            while window:
                first, future = window.popleft()
                yield first, future.result()
        finally:
            for _, future in window:
                future.cancel()


class ParquetShards:
    """Rows into Parquet shards of ``shard_rows`` rows, each written to a temporary file and
    handed to ``publish(index, path)`` when full; row groups of ``group_rows`` rows."""

    def __init__(
        self,
        folder: Path,
        schema: pa.Schema,
        publish: Callable[[int, Path], None],
        *,
        shard_rows: int,
        group_rows: int = ROW_GROUP_ROWS,
        group_bytes: int | None = None,
        compression: str = "zstd",
    ) -> None:
        self.folder, self.schema, self.publish = folder, schema, publish
        self.shard_rows, self.group_rows, self.compression = (
            shard_rows,
            max(1, min(group_rows, shard_rows)),
            compression,
        )
        self.group_bytes = group_bytes  # with rows that hold an ``image`` struct: bytes per row group
        self.shards = 0
        self._group_size = 0
        self._writer: pq.ParquetWriter | None = None
        self._path: Path | None = None
        self._group: list[dict[str, Any]] = []
        self._in_shard = 0

    def add(self, row: dict[str, Any]) -> None:
        self._group.append(row)
        self._in_shard += 1
        if self.group_bytes is not None:
            self._group_size += len((row.get("image") or {}).get("bytes") or b"")
        if len(self._group) >= self.group_rows or (self.group_bytes and self._group_size >= self.group_bytes):
            self._write_group()
        if self._in_shard >= self.shard_rows:
            self._finish_shard()

    def close(self) -> int:
        """Publish the last shard; returns how many were published."""
        if self._in_shard:
            self._finish_shard()
        return self.shards

    def _write_group(self) -> None:
        if not self._group:
            return
        if self._writer is None:
            self._path = self.folder / f"shard-{self.shards:05d}.parquet"
            self._writer = pq.ParquetWriter(self._path, self.schema, compression=self.compression)
        self._writer.write_table(pa.Table.from_pylist(self._group, schema=self.schema))
        self._group, self._group_size = [], 0

    def _finish_shard(self) -> None:
        self._write_group()
        assert self._writer is not None and self._path is not None
        self._writer.close()
        self.publish(self.shards, self._path)
        self._path.unlink(missing_ok=True)
        self._writer, self._path, self._in_shard = None, None, 0
        self.shards += 1


# --- compaction --------------------------------------------------------------------------------

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
) -> dict[str, Any]:
    """Build the run's manifest shards and stats.json from its parts, sidecars and Redis; returns
    the stats. See the module docstring for the steps and the memory bound."""
    began = time.time()
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
    store: RunStore, storage: Storage, prefix: str, run_id: str, *, progress: bool = False
) -> dict[str, Any]:
    """The run's stats (with its manifest), compacting first if the manifest is missing or was
    built before the latest parts, audit rows or done jobs."""
    stats = read_stats(storage, prefix, run_id)
    if is_current(stats, fingerprint(store, storage, prefix, run_id)):
        assert stats is not None
        return stats
    return compact(store, storage, prefix, run_id, progress=progress)


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
