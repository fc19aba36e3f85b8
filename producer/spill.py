"""Job-indexed lines spilled to local disk, so a run of any size is read in index order with flat
memory (the manifest's compaction, ``deepqueue results``).

Job ids begin with the job's position (``00000042-3f9a1c0b7e21``). Redis hands a run's records
back in no order (HSCAN); ``Buckets`` spreads them over gzipped files by index range, and each
bucket, read back whole, is small enough to sort in memory.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from pathlib import Path

#: Buffered bucket lines are written out once they reach this many bytes.
SPILL_BYTES = 16 << 20

_INDEX = re.compile(r"^(\d+)-")


def job_index(job_id: str) -> int:
    """The position a job id starts with (``00000012-abcdef012345`` -> 12); 0 for any other id."""
    match = _INDEX.match(job_id)
    return int(match.group(1)) if match else 0


def sort_key(job_id: str) -> tuple[int, str]:
    return job_index(job_id), job_id


class Buckets:
    """Lines spread over gzipped files on local disk by job index (``span`` indexes each).

    A line is ``kind``, job id and payload; lines are buffered and appended as one gzip member
    per bucket once ``spill_bytes`` are buffered, so random order (Redis' HSCAN) costs no more
    than sorted order.
    """

    def __init__(self, folder: Path, span: int, spill_bytes: int = SPILL_BYTES) -> None:
        self.folder = folder
        self.span = span
        self.spill_bytes = spill_bytes
        self._buffered: dict[int, list[str]] = {}
        self._size = 0
        self._written: set[int] = set()

    def add(self, kind: str, job_id: str, payload: str) -> None:
        if "\n" in payload or "\t" in job_id:
            raise ValueError(f"bucket lines hold one line each: {job_id!r}")
        line = f"{kind}\t{job_id}\t{payload}\n"
        self._buffered.setdefault(job_index(job_id) // self.span, []).append(line)
        self._size += len(line)
        if self._size >= self.spill_bytes:
            self.spill()

    def spill(self) -> None:
        for bucket, lines in self._buffered.items():
            with open(self.folder / f"bucket-{bucket:08d}.gz", "ab") as out:
                out.write(gzip.compress("".join(lines).encode(), compresslevel=1))
            self._written.add(bucket)
        self._buffered.clear()
        self._size = 0

    def ids(self) -> list[int]:
        self.spill()
        return sorted(self._written)

    def read(self, bucket: int) -> Iterator[tuple[str, str, str]]:
        """``(kind, job_id, payload)`` of one bucket, then its file is removed."""
        path = self.folder / f"bucket-{bucket:08d}.gz"
        with gzip.open(path, "rt", encoding="utf-8") as lines:
            for line in lines:
                kind, job_id, payload = line.rstrip("\n").split("\t", 2)
                yield kind, job_id, payload
        path.unlink()
