"""The manifest's columns: fixed (``COLUMNS``), in a stable order, and typed the same in every
shard whatever values are missing. ``flatten`` turns a manifest row (sidecar + key, sidecar_key,
bytes) into them: the recipe and timing as scalar columns, ``batch_job_ids`` a list, and
``sidecar`` the full sidecar as JSON, so no field is lost, including fields added after this
schema. Pure.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

from producer.manifest_parts import ROW_EXTRAS

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
    ("template", "string"),
    ("variables", "string"),  # JSON: {"v1": "red", "times": "dawn"}; polars: .str.json_path_match("$.times")
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
    ("model_alias", "string"),
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
    ("loras", "string"),  # JSON: [{"id", "scale", "sha256"}, ...]; null for the base model
    # Quality scores (worker.pipeline.scores; null where not asked for or failed) and, from the
    # whole run's pHashes at compaction (producer.near_dups), the first image this one nearly repeats.
    ("phash", "string"),
    ("clip_score", "float64"),
    ("nsfw", "bool"),
    ("duplicate_of", "string"),
    ("sidecar", "string"),
)


def arrow_schema(columns: Iterable[tuple[str, str]] = COLUMNS) -> pa.Schema:
    return pa.schema([pa.field(name, _TYPES[kind]) for name, kind in columns])


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


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
    scores = row.get("scores") or {}
    sidecar = {name: value for name, value in row.items() if name not in ROW_EXTRAS}
    return {
        "job_id": row.get("job_id"),
        "run_id": row.get("run_id"),
        "index": _int(row.get("index")),
        "prompt": row.get("prompt"),
        "negative_prompt": row.get("negative_prompt"),
        "template": row.get("template"),
        "variables": _json(row.get("variables")),
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
        "model_alias": _str(model.get("alias")),
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
        "loras": _json(row.get("loras") or None),
        "phash": _str(scores.get("phash")),
        "clip_score": _float(scores.get("clip_score")),
        "nsfw": None if scores.get("nsfw") is None else bool(scores["nsfw"]),
        "duplicate_of": None,  # set at compaction, where the run's rows meet (producer.manifest)
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
