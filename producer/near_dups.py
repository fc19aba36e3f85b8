"""Near-duplicate images within a run, by perceptual hash (the ``phash`` the workers record). Pure.

Two images are near-duplicates when their 64-bit pHashes differ in at most ``threshold`` bits
(Hamming distance; default ``DEFAULT_THRESHOLD`` = 6 of 64). Each image that has an earlier
near-duplicate (earlier: added before it, which the manifest does in job-index order) points
at the *first* of them, so a cluster of copies names one original.

Comparing every pair is O(n²): 5·10¹¹ comparisons for a million images. The index here is a
banded one (pigeonhole): the 64 bits are cut into ``threshold + 1`` bands; two hashes that differ
in at most ``threshold`` bits cannot differ in every band, so they agree exactly on at least one.
Each band keeps a table from band value to the positions with that value; a new hash is
compared (vectorised, numpy popcount) only with the positions that share one of its bands, and
the match is then checked on all 64 bits, so nothing is found that brute force would not find,
and nothing brute force finds is missed.

Cost: with 7 bands of 9-10 bits, a uniformly spread hash shares a band with about 7·n/2⁹ of the
n earlier ones, compared in one numpy call per image. Measured on a 2-core VM
(``ops/bench/scores.py``): 1M random hashes in 55 s, 100k in 5 s, so the index is still
quadratic, 1/73 of brute force's pairs; at 10M it would take hours and want a vectorised
chunked join instead. Fewer, wider bands (``band_count``) probed within
``threshold // band_count`` bits of each band (multi-index hashing) see fewer candidates but
pay a dict lookup per probe: 4 bands of 16 bits took 100 s for 1M in Python, so the default is
the exact ``threshold + 1``. Memory: 8 bytes per hash plus 8 per band entry (about 64 bytes per
image).

Workers run apart, so this runs where a run's rows meet: the manifest compaction
(``producer.manifest``) feeds it one row at a time in index order.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from itertools import combinations
from math import comb

import numpy as np

#: Bits of 64 two pHashes may differ in and still be near-duplicates.
DEFAULT_THRESHOLD = 6
HASH_BITS = 64
#: Values probed per band at most (fewer, wider bands probe every value within a radius).
MAX_PROBES = 1024


def parse_phash(text: object) -> int | None:
    """A pHash as written in sidecars (16 hex digits) as an int, or None if it is not one."""
    if not isinstance(text, str) or len(text) != HASH_BITS // 4:
        return None
    try:
        return int(text, 16)
    except ValueError:
        return None


def bands(threshold: int, count: int | None = None, bits: int = HASH_BITS) -> list[tuple[int, int]]:
    """``(shift, mask)`` of each of ``count`` (default ``threshold + 1``) bands that cut ``bits``
    as evenly as possible (a band is ``(value >> shift) & mask``)."""
    if not 0 <= threshold < bits:
        raise ValueError(f"threshold must be from 0 to {bits - 1} bits, got {threshold}")
    count = threshold + 1 if count is None else count
    if not 1 <= count <= bits:
        raise ValueError(f"bands must be from 1 to {bits}, got {count}")
    widths = [bits // count + (1 if band < bits % count else 0) for band in range(count)]
    cuts, shift = [], 0
    for width in widths:
        cuts.append((shift, (1 << width) - 1))
        shift += width
    return cuts


class NearDuplicateIndex:
    """Hashes added one at a time; each ``add`` says which earlier one it is a near-duplicate of."""

    def __init__(self, threshold: int = DEFAULT_THRESHOLD, band_count: int | None = None) -> None:
        self.threshold = threshold
        self._bands = bands(threshold, band_count)
        # Pigeonhole: if two hashes differ in at most ``threshold`` bits, some band differs in at
        # most ``threshold // bands`` of its bits (0 with threshold + 1 bands: an exact match).
        # Each band is probed at its own value and every value that close to it.
        self.radius = threshold // len(self._bands)
        widest = max(mask.bit_length() for _, mask in self._bands)
        probes = sum(comb(widest, r) for r in range(self.radius + 1))
        if probes > MAX_PROBES:
            raise ValueError(
                f"{len(self._bands)} bands at threshold {threshold} probe {probes:,} values per band (more than "
                f"{MAX_PROBES:,}): use more bands, e.g. threshold + 1 = {threshold + 1}"
            )
        self._probes = [
            [sum(1 << bit for bit in flipped) for r in range(self.radius + 1) for flipped in combinations(range(w), r)]
            for w in (mask.bit_length() for _, mask in self._bands)
        ]
        self._tables: list[dict[int, array]] = [{} for _ in self._bands]
        self._hashes = np.zeros(1024, dtype=np.uint64)
        self.size = 0

    def add(self, value: int) -> int | None:
        """Add a 64-bit hash; returns the position (order of ``add``, from 0) of the first
        earlier hash within ``threshold`` bits of it, or None."""
        keys = [(value >> shift) & mask for shift, mask in self._bands]
        found = self._first_match(value, keys)
        position = self.size
        if position == len(self._hashes):
            self._hashes = np.concatenate([self._hashes, np.zeros(len(self._hashes), dtype=np.uint64)])
        self._hashes[position] = value
        self.size += 1
        for table, key in zip(self._tables, keys, strict=True):
            table.setdefault(key, array("q")).append(position)
        return found

    def _first_match(self, value: int, keys: list[int]) -> int | None:
        parts = [
            np.frombuffer(found, dtype=np.int64)
            for table, key, probes in zip(self._tables, keys, self._probes, strict=True)
            for probe in probes
            if (found := table.get(key ^ probe)) is not None
        ]
        if not parts:
            return None
        candidates = np.concatenate(parts) if len(parts) > 1 else parts[0]
        distances = _popcount(self._hashes[candidates] ^ np.uint64(value))
        close = candidates[distances <= self.threshold]
        return int(close.min()) if len(close) else None


def _popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy 2's ``bitwise_count``; unpacked bytes on numpy 1)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    return np.unpackbits(values.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


def near_duplicates(
    hashes: Iterable[int | None], threshold: int = DEFAULT_THRESHOLD, band_count: int | None = None
) -> list[int | None]:
    """For each hash in order, the position of the first earlier one within ``threshold`` bits,
    or None (also for a missing hash, which matches nothing)."""
    index = NearDuplicateIndex(threshold, band_count)
    positions: list[int] = []  # index position -> position in ``hashes``
    found: list[int | None] = []
    for position, value in enumerate(hashes):
        if value is None:
            found.append(None)
            continue
        match = index.add(value)
        positions.append(position)
        found.append(None if match is None else positions[match])
    return found


def near_duplicates_brute_force(hashes: Sequence[int | None], threshold: int = DEFAULT_THRESHOLD) -> list[int | None]:
    """``near_duplicates`` by comparing every pair: the reference the index is tested against."""
    found: list[int | None] = []
    for position, value in enumerate(hashes):
        match = None
        if value is not None:
            for earlier in range(position):
                other = hashes[earlier]
                if other is not None and (value ^ other).bit_count() <= threshold:
                    match = earlier
                    break
        found.append(match)
    return found


class RunDuplicates:
    """``duplicate_of`` for a run's manifest rows, met one at a time in index order: the job id
    of the first earlier row whose pHash is within ``threshold`` bits, or None. Job ids are
    kept packed (about 30 bytes per hashed row)."""

    def __init__(self, threshold: int = DEFAULT_THRESHOLD, band_count: int | None = None) -> None:
        self.index = NearDuplicateIndex(threshold, band_count)
        self.duplicates = 0
        self._ids = bytearray()
        self._ends = array("q")

    def duplicate_of(self, job_id: str, phash: object) -> str | None:
        """Add a row; the job id it nearly repeats, or None (also when it has no pHash)."""
        value = parse_phash(phash)
        if value is None:
            return None
        match = self.index.add(value)
        self._ids += job_id.encode()
        self._ends.append(len(self._ids))
        if match is None:
            return None
        self.duplicates += 1
        start = self._ends[match - 1] if match else 0
        return self._ids[start : self._ends[match]].decode()

    def summary(self) -> dict[str, object]:
        """stats.json's ``near_duplicates``."""
        return {
            "threshold": self.index.threshold,
            "bits": HASH_BITS,
            "hashed": self.index.size,
            "duplicates": self.duplicates,
        }
