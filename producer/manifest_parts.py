"""The manifest part codec, shared by the worker that writes parts (``worker.output.manifest_writer``)
and the compaction that reads them (``producer.manifest``). Pure.

A part is one gzipped JSON-lines object of manifest rows (its key: ``producer.layout.part_key``).
A row is the image's full sidecar plus ``key`` (the image's object key), ``sidecar_key`` and
``bytes`` (the image's size; None when an earlier delivery stored the image).
"""

from __future__ import annotations

import gzip
import json
from typing import Any

PART_CONTENT_TYPE = "application/gzip"
#: What a manifest row adds to the sidecar (``manifest_row``).
ROW_EXTRAS = ("key", "sidecar_key", "bytes")


def manifest_row(sidecar: dict[str, Any], key: str, sidecar_at: str, size: int | None) -> dict[str, Any]:
    """One manifest row: the sidecar, where the image and sidecar are, and the image's size."""
    return {**sidecar, "key": key, "sidecar_key": sidecar_at, "bytes": size}


def encode_part(rows: list[dict[str, Any]]) -> bytes:
    """Rows as gzipped JSON lines; ``mtime=0``, so equal rows make equal bytes."""
    lines = "".join(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n" for row in rows)
    return gzip.compress(lines.encode(), compresslevel=6, mtime=0)


def decode_part(data: bytes) -> list[dict[str, Any]]:
    """A part's rows; raises ValueError (gzip or JSON) for a damaged part."""
    try:
        text = gzip.decompress(data).decode()
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise ValueError(f"not a gzipped JSON-lines part: {error}") from error
    return [json.loads(line) for line in text.splitlines() if line.strip()]
