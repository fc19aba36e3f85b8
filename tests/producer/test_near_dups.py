"""The banded near-duplicate index (``producer.near_dups``) finds exactly what comparing every
pair finds: property-tested against brute force on hashes built to sit near each other, at
every threshold, with missing hashes mixed in. Deterministic (``derandomize``)."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer.near_dups import (
    DEFAULT_THRESHOLD,
    NearDuplicateIndex,
    bands,
    near_duplicates,
    near_duplicates_brute_force,
    parse_phash,
)

EXAMPLES = int(os.environ.get("DEEPQUEUE_PROPERTY_EXAMPLES", "200"))
PROPERTY = settings(
    max_examples=EXAMPLES, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def flip(value: int, bits: list[int]) -> int:
    for bit in bits:
        value ^= 1 << bit
    return value


@st.composite
def clustered_hashes(draw: st.DrawFn) -> tuple[list[int | None], int]:
    """A few random centres and hashes a few bits away from them (so pairs near the threshold,
    on both sides of it, are common), some missing; and a threshold."""
    threshold = draw(st.integers(0, 12))
    centres = draw(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=4))
    hashes: list[int | None] = []
    for _ in range(draw(st.integers(0, 40))):
        if draw(st.integers(0, 9)) == 0:
            hashes.append(None)
            continue
        centre = draw(st.sampled_from(centres))
        bits = draw(st.lists(st.integers(0, 63), max_size=threshold + 3))
        hashes.append(flip(centre, bits))
    return hashes, threshold


@PROPERTY
@given(clustered_hashes())
def test_index_finds_what_brute_force_finds(case: tuple[list[int | None], int]) -> None:
    hashes, threshold = case
    assert near_duplicates(hashes, threshold) == near_duplicates_brute_force(hashes, threshold)


@PROPERTY
@given(clustered_hashes(), st.data())
def test_fewer_wider_bands_probed_within_a_radius_find_the_same(case: tuple[list[int | None], int], data) -> None:
    """With fewer bands than threshold + 1, some band differs in at most threshold // bands bits,
    and the index probes every value that close: still exactly brute force's answer."""
    hashes, threshold = case
    count = data.draw(st.integers(threshold // 2 + 1, threshold + 1))  # radius 0 or 1
    assert near_duplicates(hashes, threshold, count) == near_duplicates_brute_force(hashes, threshold)


@PROPERTY
@given(st.lists(st.integers(0, 2**64 - 1), max_size=60), st.integers(0, 63))
def test_index_on_random_hashes(hashes: list[int], threshold: int) -> None:
    assert near_duplicates(hashes, threshold) == near_duplicates_brute_force(hashes, threshold)


@pytest.mark.parametrize("threshold", [0, 1, 6, 9, 31, 63])
def test_bands_cover_every_bit_once(threshold: int) -> None:
    cuts = bands(threshold)
    assert len(cuts) == threshold + 1
    covered = 0
    for shift, mask in cuts:
        assert covered & (mask << shift) == 0
        covered |= mask << shift
    assert covered == 2**64 - 1
    widths = [mask.bit_count() for _, mask in cuts]
    assert max(widths) - min(widths) <= 1


def test_a_pair_at_the_threshold_differing_in_every_band_but_one_is_found() -> None:
    # The worst case of the pigeonhole: each band but the last holds one of the differing bits.
    cuts = bands(DEFAULT_THRESHOLD)
    other = flip(0, [shift for shift, _ in cuts[:-1]])
    assert other.bit_count() == DEFAULT_THRESHOLD
    assert near_duplicates([0, other]) == [None, 0]
    assert near_duplicates([0, flip(other, [63])]) == [None, None]


def test_first_earlier_match_is_named() -> None:
    base = random.Random(1).getrandbits(64)
    hashes = [flip(base, [1]), base ^ (2**64 - 1), base, flip(base, [2, 3])]
    # 2 and 3 match 0 (the first), not each other or a later one
    assert near_duplicates(hashes) == [None, None, 0, 0]


def test_many_hashes_against_brute_force() -> None:
    rng = random.Random(7)
    hashes: list[int | None] = [rng.getrandbits(64) for _ in range(1500)]
    for _ in range(200):  # planted near-copies, 0..8 bits away, anywhere later
        source = rng.randrange(len(hashes))
        hashes.insert(
            rng.randrange(source + 1, len(hashes) + 1), flip(hashes[source], rng.sample(range(64), rng.randint(0, 8)))
        )
    assert near_duplicates(hashes) == near_duplicates_brute_force(hashes)


def test_index_grows_past_its_first_allocation() -> None:
    rng = random.Random(3)
    values = [rng.getrandbits(64) for _ in range(3000)]
    index = NearDuplicateIndex(3)
    assert [index.add(value) for value in values] == near_duplicates_brute_force(values, 3)
    assert index.size == 3000
    assert (
        index.add(flip(values[2500], [0, 40]))
        == near_duplicates_brute_force([*values, flip(values[2500], [0, 40])], 3)[-1]
    )


@pytest.mark.parametrize(
    ("text", "value"),
    [("ffffffffffffffff", 2**64 - 1), ("00000000000000a0", 160), ("xyz", None), (None, None), ("g" * 16, None)],
)
def test_parse_phash(text: object, value: int | None) -> None:
    assert parse_phash(text) == value


def test_a_band_count_that_would_probe_too_many_values_is_refused() -> None:
    with pytest.raises(ValueError, match="use more bands"):
        NearDuplicateIndex(12, 1)
    assert NearDuplicateIndex(6, 4).radius == 1
