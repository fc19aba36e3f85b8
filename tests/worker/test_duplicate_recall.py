"""Near-duplicate recall on real pixels: embedded mode (``deepqueue run``'s code: the worker's
batching and executor) generates a run with the tiny pipeline in which 40 rows repeat an earlier
row's prompt and seed, landing in other batches of other sizes (so their pixels may differ a
little). The workers' pHashes, run through the run-level index, must find at least 95% of the
planted pairs and flag none of the distinct images."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("imagehash")

from producer.entries import make_jobs  # noqa: E402
from producer.job import JobDefaults  # noqa: E402
from producer.layout import image_key, sidecar_key  # noqa: E402
from producer.near_dups import DEFAULT_THRESHOLD, near_duplicates, parse_phash  # noqa: E402
from tests.helpers import local_worker_settings  # noqa: E402
from worker.embedded import run_embedded  # noqa: E402

pytestmark = pytest.mark.slow

DISTINCT = 80
PLANTED = 40


def planted_rows() -> tuple[list[dict], dict[int, int]]:
    """``DISTINCT`` rows with their own prompt and seed, and ``PLANTED`` repeats of some of them
    spread among them, each after its original; returns the rows and repeat position -> original
    position."""
    rng = random.Random(2026)
    rows = [{"prompt": f"an old map of island {index}, ink", "seed": 40_000 + 7 * index} for index in range(DISTINCT)]
    for original in rng.sample(range(DISTINCT), PLANTED):
        row = {"prompt": f"an old map of island {original}, ink", "seed": 40_000 + 7 * original}
        rows.insert(rng.randrange(rows.index(row) + 1, len(rows) + 1), row)
    repeats, seen = {}, {}
    for position, row in enumerate(rows):
        key = (row["prompt"], row["seed"])
        if key in seen:
            repeats[position] = seen[key]
        else:
            seen[key] = position
    assert len(repeats) == PLANTED
    return rows, repeats


def test_planted_repeats_are_found_and_distinct_images_are_not(tiny_model: Path, tmp_path: Path) -> None:
    rows, repeats = planted_rows()
    jobs = make_jobs(
        [(f"row {position}", row) for position, row in enumerate(rows)],
        run_id="recall",
        defaults=JobDefaults(height=64, width=64, steps=3, scores=["phash"]),
    )
    settings = local_worker_settings(tiny_model, tmp_path / "out", max_batch=8)
    summary = run_embedded(jobs, settings, progress=False)
    assert summary.images == len(jobs) and not summary.failed
    assert len(summary.batch_sizes) >= 1

    hashes = []
    for job in jobs:
        key = sidecar_key(image_key(settings.s3_prefix, job.run_id, job.job_id, "png"))
        hashes.append(parse_phash(json.loads((settings.output_dir / key).read_text())["scores"]["phash"]))
    assert None not in hashes
    found = near_duplicates(hashes, DEFAULT_THRESHOLD)

    hits = sum(found[repeat] == original for repeat, original in repeats.items())
    recall = hits / len(repeats)
    false_positives = [
        position for position, match in enumerate(found) if match is not None and position not in repeats
    ]
    wrong_original = [repeat for repeat, original in repeats.items() if found[repeat] not in (None, original)]
    distances = sorted((hashes[repeat] ^ hashes[original]).bit_count() for repeat, original in repeats.items())
    distinct = [value for position, value in enumerate(hashes) if position not in repeats]
    closest = min((a ^ b).bit_count() for i, a in enumerate(distinct) for b in distinct[i + 1 :])
    print(f"recall {recall:.3f} ({hits}/{len(repeats)}), repeat distances {distances}, closest distinct {closest}")
    assert recall >= 0.95, distances
    assert false_positives == [] and wrong_original == []
