"""Exports of a run as Parquet, an imagefolder or WebDataset shards, streamed from its manifest.

Every format reads the compacted manifest (``producer.manifest``, compacted first when it is
missing or stale) shard by shard and the images one at a time (``READ_THREADS`` in flight), and
writes shard by shard: a shard is built in a temporary file, then moved to the target (a folder,
or uploaded to S3), then deleted. Memory: one Parquet row group of images (``GROUP_BYTES``) or
one image per thread, plus one manifest record batch, whatever the run's size.

- ``parquet``: ``part-00000.parquet``, ... with an ``image`` column (``struct<bytes, path>``)
  and every manifest column. The schema carries Hugging Face features metadata
  (``huggingface`` -> ``{"info": {"features": ...}}``, as ``datasets`` writes it), so
  ``datasets.load_dataset("parquet", ...)`` decodes ``image`` as a PIL image; pyarrow and
  pandas read it as a struct.
- ``imagefolder``: ``00000/{job_id}.png`` ... and one ``00000/metadata.jsonl`` per folder
  (``file_name`` + recipe columns), what ``datasets.load_dataset("imagefolder", data_dir=...)``
  loads. ``datasets`` takes the column types from the first metadata lines it reads, so a column
  that is null there and set later fails the load: the metadata keeps only columns that always
  have a value (``negative_prompt`` is ``""`` when none was given, which is what the pipeline
  used; ``cache_branch`` is 0 when DeepCache is off, as in the batch key; ``phash`` and
  ``duplicate_of`` are ``""`` when there is none). ``clip_score`` and ``nsfw`` are left out
  there, having no value that could stand for "not scored"; Parquet and WebDataset carry them.
- ``webdataset``: img2dataset's layout and columns. ``00000.tar`` with ``{key}.png`` (or
  .webp/.jpg), ``{key}.json`` (the row) and ``{key}.txt`` (the prompt) per sample, plus
  ``00000.parquet`` (the rows, without images) and ``00000_stats.json``. A row is the manifest
  row with img2dataset's columns first (``WEBDATASET_COLUMNS``): ``key`` is the sample's key in
  the tar (its job id: no dots, so one WebDataset key), so the parquet joins the tar on it;
  ``status`` is ``success`` (an export holds done jobs only), ``error_message`` null, ``caption``
  the prompt; the image's object key, the manifest's ``key``, moves to ``image_key``.

Targets (``producer.export_target``): a folder, or ``s3://bucket/prefix`` on the run's S3
endpoint (images are copied server-side when the run is on S3 too); by default
``{prefix}/{run}/exports/{format}/`` beside the run. A target must be empty unless
``overwrite``, which empties it first, or ``resume``.

Every file is published whole (a temporary file renamed, or one S3 PUT), and a shard's last file
(``DONE_FILE``) is written after all its others. An export records what it is in
``_deepqueue_export.json`` (pyarrow and ``datasets`` skip names starting with ``_``) before its
first shard; ``resume`` on a target holding the same export (run, format, shard size, and the
manifest built from the same parts, audit and done count)
keeps its complete shards, writes the others again, and skips the complete shards' rows without
reading their images: an export killed half-way resumes at its last complete shard.
"""

from __future__ import annotations

import io
import itertools
import json
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from producer.errors import ExportError
from producer.export_target import Target
from producer.layout import image_content_type
from producer.manifest import ensure_manifest, iter_manifest
from producer.manifest_schema import COLUMNS, arrow_schema
from producer.near_dups import DEFAULT_THRESHOLD
from producer.shards import READ_THREADS, ParquetShards, ordered_map
from producer.state import RunStore
from producer.storage import Storage

FORMATS = ("parquet", "imagefolder", "webdataset")
#: Each format's file that a shard writes last: its presence means the shard is complete.
DONE_FILE = {
    "parquet": "part-{shard:05d}.parquet",
    "imagefolder": "{shard:05d}/metadata.jsonl",
    "webdataset": "{shard:05d}_stats.json",
}
#: What an export records about itself in its target, for ``resume``.
RECORD_FILE = "_deepqueue_export.json"
DEFAULT_SHARD_SIZE = 10_000
#: Image bytes per Parquet row group (and at most ``GROUP_ROWS`` rows).
GROUP_BYTES = 64 << 20
GROUP_ROWS = 1000
IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])

#: The imagefolder metadata columns: each always has a value (see the module docstring).
IMAGEFOLDER_COLUMNS = (
    "file_name",
    "job_id",
    "index",
    "prompt",
    "negative_prompt",
    "template",
    "variables",
    "seed",
    "width",
    "height",
    "steps",
    "guidance",
    "scheduler",
    "format",
    "model",
    "deepcache",
    "cache_interval",
    "cache_branch",
    "batch_id",
    "batch_size",
    "phash",
    "duplicate_of",
)

_VALUE_DTYPES = {
    pa.string(): "string",
    pa.int64(): "int64",
    pa.int32(): "int32",
    pa.float64(): "float64",
    pa.bool_(): "bool",
}


# --- pure parts ------------------------------------------------------------------------------


def hf_features(schema: pa.Schema) -> dict[str, Any]:
    """The ``huggingface`` schema metadata ``datasets`` reads features from: ``image`` as an
    Image, scalars as Values. List columns are left out: ``datasets`` infers them from their
    Arrow type (their spelling changed between versions, ``Sequence`` -> ``List``)."""
    features: dict[str, Any] = {}
    for field in schema:
        if field.name == "image" and field.type == IMAGE_TYPE:
            features["image"] = {"_type": "Image"}
        elif field.type in _VALUE_DTYPES:
            features[field.name] = {"dtype": _VALUE_DTYPES[field.type], "_type": "Value"}
    return {"info": {"features": features}}


def parquet_schema() -> pa.Schema:
    """``image`` first, then the manifest's columns, with the features metadata."""
    schema = pa.schema([pa.field("image", IMAGE_TYPE), *arrow_schema()])
    return schema.with_metadata({"huggingface": json.dumps(hf_features(schema))})


def extension(row: Mapping[str, Any]) -> str:
    """The image's file extension, from its object key (png, webp, jpg)."""
    return str(row["key"]).rsplit(".", 1)[-1]


def imagefolder_record(row: Mapping[str, Any], file_name: str) -> dict[str, Any]:
    """One ``metadata.jsonl`` line: ``file_name`` and the recipe, never null (stable types)."""
    record = {
        "file_name": file_name,
        "job_id": row["job_id"],
        "index": int(row["index"]),
        "prompt": row["prompt"],
        "negative_prompt": row.get("negative_prompt") or "",
        "template": row.get("template") or "",
        "variables": row.get("variables") or "{}",
        "seed": int(row["seed"]),
        "width": int(row["width"]),
        "height": int(row["height"]),
        "steps": int(row["steps"]),
        "guidance": float(row["guidance"]),
        "scheduler": row.get("scheduler") or "",
        "format": row.get("format") or extension(row),
        "model": row.get("model_id") or "",
        "deepcache": bool(row.get("deepcache")),
        "cache_interval": int(row.get("cache_interval") or 1),
        "cache_branch": int(row.get("cache_branch") or 0),
        "batch_id": row.get("batch_id") or "",
        "batch_size": int(row.get("batch_size") or 1),
        "phash": row.get("phash") or "",  # "" when not scored
        "duplicate_of": row.get("duplicate_of") or "",  # "" when it repeats no earlier image
    }
    assert tuple(record) == IMAGEFOLDER_COLUMNS
    return record


#: img2dataset's columns, before the manifest's in a WebDataset export's rows (``webdataset_row``).
I2D_COLUMNS = (("key", "string"), ("status", "string"), ("error_message", "string"), ("caption", "string"))
#: A WebDataset export's row: img2dataset's columns, then the manifest's, its ``key`` as ``image_key``.
WEBDATASET_COLUMNS = (*I2D_COLUMNS, *(("image_key" if name == "key" else name, kind) for name, kind in COLUMNS))


def webdataset_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest row as img2dataset writes its rows (``WEBDATASET_COLUMNS``). Pure."""
    i2d = {"key": row["job_id"], "status": "success", "error_message": None, "caption": row.get("prompt")}
    rest = {("image_key" if name == "key" else name): value for name, value in row.items()}
    return i2d | rest


def sample_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """A WebDataset sample's ``.json``: its row, without the raw sidecar text."""
    return {name: value for name, value in row.items() if name != "sidecar"}


def shard_of(position: int, shard_size: int) -> int:
    return position // shard_size


# --- the export ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    run_id: str
    format: str
    to: str
    rows: int
    shards: int
    bytes: int  # image bytes exported
    seconds: float
    kept_shards: int = 0  # complete shards a resumed export found and kept


def export(
    store: RunStore,
    storage: Storage,
    prefix: str,
    run_id: str,
    fmt: str,
    target: Target,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    threads: int = READ_THREADS,
    tmp_dir: str | Path | None = None,
    duplicate_threshold: int = DEFAULT_THRESHOLD,
) -> ExportResult:
    """Export the run's images and manifest as ``fmt`` to ``target`` (see the module docstring)."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if shard_size < 1:
        raise ExportError(f"shard size must be at least 1, got {shard_size}")
    began = time.perf_counter()
    stats = ensure_manifest(store, storage, prefix, run_id, progress=progress, duplicate_threshold=duplicate_threshold)
    manifest = stats["manifest"]
    total = manifest["rows"]
    record = {"run": run_id, "format": fmt, "shard_size": shard_size, "rows": total, "manifest": manifest.get("source")}
    kept = _kept_shards(target, record, fmt, resume=resume, overwrite=overwrite)
    if not kept:
        target.put_bytes(RECORD_FILE, json.dumps(record).encode(), "application/json")
    writer = {"parquet": _parquet, "imagefolder": _imagefolder, "webdataset": _webdataset}[fmt]
    with tempfile.TemporaryDirectory(prefix="deepqueue-export-", dir=tmp_dir) as tmp:
        folder = Path(tmp)
        rows = itertools.islice(iter_manifest(storage, stats, folder), kept * shard_size, None)
        skipped = min(total, kept * shard_size)
        with tqdm(total=total, initial=skipped, unit="img", desc=f"export {fmt}", disable=not progress) as bar:
            counted = _Counted(bar)
            written = writer(_Job(rows, storage, target, folder, shard_size, threads, counted, first_shard=kept))
    seconds = time.perf_counter() - began
    return ExportResult(run_id, fmt, target.url, counted.rows, kept + written, counted.bytes, seconds, kept)


def _kept_shards(target: Target, record: dict[str, Any], fmt: str, *, resume: bool, overwrite: bool) -> int:
    """How many complete shards of this very export ``target`` holds (``resume``), 0 for an empty
    target (``overwrite``: emptied first); raises ExportError for a target in other use."""
    if target.is_empty():
        return 0
    if resume:
        try:
            found = json.loads(target.storage.get(target.key(RECORD_FILE)))
        except Exception:  # no record, or not one: another export, or other files
            found = None
        if found == record:
            shard = 0
            while target.storage.exists(target.key(DONE_FILE[fmt].format(shard=shard))):
                shard += 1
            return shard
        if not overwrite:
            raise ExportError(
                f"{target.url} holds no unfinished export of {record['run']} as {fmt} in shards of "
                f"{record['shard_size']} (of the manifest as it is now): pass --overwrite to empty it"
            )
    elif not overwrite:
        raise ExportError(
            f"{target.url} is not empty: choose another target, pass --resume to finish an export "
            "there, or --overwrite to empty it"
        )
    target.clear()
    return 0


class _Counted:
    def __init__(self, bar: Any) -> None:
        self.bar, self.rows, self.bytes = bar, 0, 0

    def add(self, size: int) -> None:
        self.rows += 1
        self.bytes += size
        self.bar.update()


@dataclass
class _Job:
    rows: Iterator[dict[str, Any]]
    storage: Storage
    target: Target
    folder: Path
    shard_size: int
    threads: int
    counted: _Counted
    first_shard: int = 0  # the first shard to write (a resumed export's); ``rows`` start there

    def positioned(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(position in the manifest, row)``."""
        return enumerate(self.rows, self.first_shard * self.shard_size)

    def with_images(self) -> Iterator[tuple[int, dict[str, Any], bytes]]:
        """``(position, row, image bytes)`` in manifest order, ``threads`` reads in flight."""

        def fetch(item: tuple[int, dict[str, Any]]) -> bytes:
            return self.storage.get(item[1]["key"])

        for (position, row), data in ordered_map(fetch, self.positioned(), self.threads):
            yield position, row, data


def _parquet(job: _Job) -> int:
    schema = parquet_schema()

    def publish(index: int, path: Path) -> None:
        job.target.put_file(f"part-{index:05d}.parquet", path, "application/vnd.apache.parquet")

    shards = ParquetShards(
        job.folder,
        schema,
        publish,
        shard_rows=job.shard_size,
        group_rows=GROUP_ROWS,
        group_bytes=GROUP_BYTES,
        first=job.first_shard,
    )
    for _, row, data in job.with_images():
        shards.add({"image": {"bytes": data, "path": f"{row['job_id']}.{extension(row)}"}, **row})
        job.counted.add(len(data))
    return shards.close() - job.first_shard


def _imagefolder(job: _Job) -> int:
    def transfer(item: tuple[int, dict[str, Any]]) -> int:
        position, row = item
        name = f"{shard_of(position, job.shard_size):05d}/{row['job_id']}.{extension(row)}"
        job.target.copy_image(job.storage, row["key"], name, image_content_type(extension(row)))
        return int(row.get("bytes") or 0)

    shards, current, metadata = 0, -1, None
    path = job.folder / "metadata.jsonl"

    def finish(shard: int) -> None:
        assert metadata is not None
        metadata.close()
        job.target.put_file(f"{shard:05d}/metadata.jsonl", path, "application/x-ndjson")

    for (position, row), size in ordered_map(transfer, job.positioned(), job.threads):
        shard = shard_of(position, job.shard_size)
        if shard != current:
            if metadata is not None:
                finish(current)
            metadata, current, shards = path.open("w", encoding="utf-8"), shard, shards + 1
        file_name = f"{row['job_id']}.{extension(row)}"
        metadata.write(json.dumps(imagefolder_record(row, file_name), ensure_ascii=False) + "\n")
        job.counted.add(size)
    if metadata is not None:
        finish(current)
    return shards


def _webdataset(job: _Job) -> int:
    shards = 0
    tar: tarfile.TarFile | None = None
    rows: ParquetShards | None = None
    current, stats = -1, _ShardStats()

    def finish(shard: int) -> None:
        assert tar is not None and rows is not None
        tar.close()
        job.target.put_file(f"{shard:05d}.tar", job.folder / "shard.tar", "application/x-tar")
        rows.close()
        job.target.put_bytes(
            f"{shard:05d}_stats.json", json.dumps(stats.build(), indent=1).encode(), "application/json"
        )

    for position, row, data in job.with_images():
        shard = shard_of(position, job.shard_size)
        if shard != current:
            if tar is not None:
                finish(current)
            tar = tarfile.open(job.folder / "shard.tar", "w")
            rows = _rows_parquet(job, shard)
            current, shards, stats = shard, shards + 1, _ShardStats()
        assert tar is not None and rows is not None
        when = int(row.get("finished_at") or 0)
        sample = webdataset_row(row)
        key = sample["key"]
        _add_member(tar, f"{key}.{extension(row)}", data, when)
        _add_member(tar, f"{key}.json", json.dumps(sample_json(sample), ensure_ascii=False).encode(), when)
        _add_member(tar, f"{key}.txt", (row.get("prompt") or "").encode(), when)
        rows.add(sample)
        stats.add(len(data))
        job.counted.add(len(data))
    if tar is not None:
        finish(current)
    return shards


def _rows_parquet(job: _Job, shard: int) -> ParquetShards:
    """The shard's rows (no images) as ``{shard}.parquet``, written as one file."""

    def publish(_: int, path: Path) -> None:
        job.target.put_file(f"{shard:05d}.parquet", path, "application/vnd.apache.parquet")

    return ParquetShards(job.folder, arrow_schema(WEBDATASET_COLUMNS), publish, shard_rows=job.shard_size)


class _ShardStats:
    """``{shard}_stats.json`` as img2dataset writes it (every sample here is a success)."""

    def __init__(self) -> None:
        self.start = time.time()
        self.count = 0
        self.bytes = 0

    def add(self, size: int) -> None:
        self.count += 1
        self.bytes += size

    def build(self) -> dict[str, Any]:
        end = time.time()
        return {
            "count": self.count,
            "successes": self.count,
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "duration": end - self.start,
            "start_time": self.start,
            "end_time": end,
            "status_dict": {"success": self.count},
            "bytes": self.bytes,
        }


def _add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    tar.addfile(info, io.BytesIO(data))
