"""A run's per-job state as fixed-size slots, indexed by the job's position: the compact layout
``producer.state`` keeps in Redis. Pure: what a slot holds and where, read by Python here and
written by the Lua in ``producer.state_scripts`` (which spells the same layout).

A job id is ``{index:08d}-{12 hex}`` (``producer.job.job_id``). Job ``index`` lives in block
``index // BLOCK_SLOTS`` (one Redis string each), at byte ``(index % BLOCK_SLOTS) * SLOT_BYTES``:

- byte 0: its state's code (``CODES``; 0: no job here);
- byte 1: a done job's image extension (``EXTENSION_CODES``), else ``-``;
- bytes 2-7: the id's 12 hex digits as 6 bytes, which tell it from a job of another recipe at the
  same position (that one, and any id of another form, is kept in the run's ``others`` hash).

A block is made whole (32 KiB) by its first job, so Redis allocates it once and exactly: a done
job costs Redis 8 bytes, a run's 10M jobs 80 MB in 2,443 strings, and a run of one job 32 KiB.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import NamedTuple

SLOT_BYTES = 8
#: Slots per block string: 32,760 bytes, which with Redis' string header fill jemalloc's 32 KiB
#: size class (4,096 would take the 40 KiB one). A small run or a sparse index costs little.
BLOCK_SLOTS = 4095
#: State name -> its one-byte code (the values of ``producer.state.JobState``).
CODES = {"queued": b"q", "running": b"r", "done": b"d", "failed": b"f", "cancelled": b"c"}
STATE_OF_CODE = {code[0]: name for name, code in CODES.items()}
#: A done job's image extension -> its code; ``?``: its key is kept whole (``keys`` hash);
#: ``-``: no extension recorded (not done, or done without a key).
EXTENSION_CODES = {"png": b"p", "webp": b"w", "jpg": b"j"}
EXTENSION_OF_CODE = {code[0]: ext for ext, code in EXTENSION_CODES.items()}

_ID = re.compile(r"(?:[1-9]\d{8}|\d{8})-[0-9a-f]{12}", re.ASCII)


class Place(NamedTuple):
    index: int
    tag: bytes  #: the id's hash part, as stored

    @property
    def block(self) -> int:
        return self.index // BLOCK_SLOTS

    @property
    def offset(self) -> int:
        """The slot's first byte in its block."""
        return self.index % BLOCK_SLOTS * SLOT_BYTES


class Slot(NamedTuple):
    job_id: str
    state: str  #: a ``JobState`` value
    extension: str | None  #: a done job's image extension; None if not known from the slot
    whole_key: bool  #: a done job whose key is kept whole (``keys`` hash)


def place(job_id: str) -> Place | None:
    """Where the job's slot is, or None for an id that has none (kept in ``others``)."""
    if not _ID.fullmatch(job_id):
        return None
    return Place(int(job_id[:-13]), bytes.fromhex(job_id[-12:]))


def indexes_of(job_ids: Iterable[str]) -> list[int | None]:
    """``place(job_id).index`` of each id (None: it has no place), without making the tags."""
    return [int(job_id[:-13]) if _ID.fullmatch(job_id) else None for job_id in job_ids]


def packed_tags(job_ids: Iterable[str]) -> bytes:
    """The tags of ids that have a place, one after another (6 bytes each)."""
    return bytes.fromhex("".join(job_id[-12:] for job_id in job_ids))


def job_id_at(block: int, position: int, tag: bytes) -> str:
    return f"{block * BLOCK_SLOTS + position:08d}-{tag.hex()}"


def decode(job_id: str, value: bytes) -> Slot | None:
    """A slot's first two bytes (or an ``others`` entry) as a Slot; None for an empty one."""
    if not value or value[0] == 0:
        return None
    extension_code = value[1] if len(value) > 1 else 0
    return Slot(job_id, STATE_OF_CODE[value[0]], EXTENSION_OF_CODE.get(extension_code), extension_code == ord("?"))


def read_slot(job_id: str, place_: Place, value: bytes) -> Slot | None:
    """The slot read at ``place_`` if it holds ``job_id`` (None: empty, or another job's)."""
    if len(value) < SLOT_BYTES or value[2:SLOT_BYTES] != place_.tag:
        return None
    return decode(job_id, value)


def slots_of_block(block: int, data: bytes) -> Iterator[Slot]:
    """Every filled slot of one block string, by position."""
    view = memoryview(data)
    for offset in range(0, len(data) - SLOT_BYTES + 1, SLOT_BYTES):
        if data[offset]:
            tag = bytes(view[offset + 2 : offset + SLOT_BYTES])
            slot = decode(job_id_at(block, offset // SLOT_BYTES, tag), data[offset : offset + 2])
            if slot is not None:
                yield slot
