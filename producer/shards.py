"""Bounded-memory I/O shared by manifest compaction and exports: storage reads a few at a time,
in order (``ordered_map``), and rows written into Parquet shards of a fixed size, each built in
a temporary file and handed on whole (``ParquetShards``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

#: Concurrent reads from storage (parts, sidecars of missing rows, images).
READ_THREADS = 16
#: Rows per Parquet row group.
ROW_GROUP_ROWS = 2_000

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
    handed to ``publish(index, path)`` when full; row groups of ``group_rows`` rows. Indexes
    start at ``first`` (a resumed export's next shard)."""

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
        first: int = 0,
    ) -> None:
        self.folder, self.schema, self.publish = folder, schema, publish
        self.shard_rows, self.group_rows, self.compression = (
            shard_rows,
            max(1, min(group_rows, shard_rows)),
            compression,
        )
        self.group_bytes = group_bytes  # with rows that hold an ``image`` struct: bytes per row group
        self.shards = first
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
        """Publish the last shard; returns the index after it (how many there are, from 0)."""
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
