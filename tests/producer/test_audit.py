"""The audit's pure parts: PSNR and SSIM, the sample, the twin jobs, the summary."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from producer.audit import (
    as_array,
    audit_record,
    audit_run_id,
    psnr,
    sample,
    ssim,
    summarize,
    twin_row,
)
from producer.job import Job, is_run_id
from producer.state import JobResult, JobState


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def noise(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3)).astype(np.float64)


def test_psnr_of_a_known_error_and_of_identical_images():
    a = np.full((16, 16, 3), 100.0)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 1) == pytest.approx(10 * math.log10(255**2))  # mse 1: 48.13 dB
    assert psnr(a, a + 10) == pytest.approx(10 * math.log10(255**2 / 100))


def test_ssim_of_flat_images_is_their_luminance_term():
    """Constant images have no variance: SSIM reduces to (2ab + C1) / (a^2 + b^2 + C1)."""
    c1 = (0.01 * 255) ** 2
    a, b = np.full((32, 32, 3), 80.0), np.full((32, 32, 3), 120.0)
    assert ssim(a, b) == pytest.approx((2 * 80 * 120 + c1) / (80**2 + 120**2 + c1))
    assert ssim(a, a) == pytest.approx(1.0)


def test_ssim_falls_with_noise_and_is_symmetric():
    base = noise(1)
    slight = np.clip(base + np.random.default_rng(2).normal(0, 5, base.shape), 0, 255)
    heavy = np.clip(base + np.random.default_rng(3).normal(0, 60, base.shape), 0, 255)
    assert ssim(base, base) == pytest.approx(1.0)
    assert 1.0 > ssim(base, slight) > ssim(base, heavy) > 0.0
    assert ssim(base, slight) == pytest.approx(ssim(slight, base))
    assert ssim(base, noise(9)) < 0.1  # unrelated images


def test_images_of_different_sizes_are_refused():
    with pytest.raises(ValueError, match="differ in size"):
        psnr(noise(1, 32), noise(1, 64))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(noise(1, 8), noise(2, 8))


def test_audit_record_decodes_the_files():
    a = noise(4)
    record = audit_record("00000001-abc", png(a), png(a), "run.audit/images/x.png")
    assert record == {"job_id": "00000001-abc", "psnr": None, "ssim": 1.0, "uncached_key": "run.audit/images/x.png"}
    assert as_array(png(a)).shape == (64, 64, 3)
    other = audit_record("00000001-abc", png(a), png(np.clip(a + 3, 0, 255)), "k")
    assert 35 < other["psnr"] < 50 and other["ssim"] < 1.0


def test_the_sample_is_stable_whatever_the_order_and_no_bigger_than_asked():
    results = [JobResult(f"{i:08d}-x", JobState.DONE) for i in range(500)]
    chosen = sample(results, 10)
    assert len(chosen) == 10 and [r.job_id for r in chosen] == sorted(r.job_id for r in chosen)
    assert sample(reversed(results), 10) == chosen
    assert sample(iter(results[:3]), 10) == results[:3]
    assert {r.job_id for r in sample(results, 20)} >= {r.job_id for r in chosen}  # a larger sample keeps it


def test_the_twin_is_the_recorded_recipe_with_caching_off():
    sidecar = {
        "prompt": "a fox",
        "negative_prompt": None,
        "seed": 7,
        "height": 64,
        "width": 96,
        "steps": 4,
        "guidance": 7.5,
        "scheduler": "ddim",
        "format": "webp",
        "deepcache": {"enabled": True, "interval": 3, "branch": 0},
        "job_id": "00000003-abc",
    }
    row = twin_row(sidecar)
    assert row == {
        "prompt": "a fox",
        "seed": 7,
        "height": 64,
        "width": 96,
        "steps": 4,
        "guidance": 7.5,
        "scheduler": "ddim",
        "format": "webp",
        "cache_interval": 1,
    }
    Job(run_id="r.audit", index=0, **row)  # a valid job
    named = twin_row({**sidecar, "model": {"id": "/models/xl", "alias": "sdxl"}})
    assert named == {**row, "model": "sdxl"}  # the twin runs on the same model's workers
    assert twin_row({**sidecar, "model": {"id": "/models/tiny", "alias": None}}) == row


def test_twin_run_names_are_valid_run_ids():
    assert audit_run_id("foxes-v1") == "foxes-v1.audit"
    long = "r" * 64
    assert is_run_id(audit_run_id(long)) and len(audit_run_id(long)) <= 64
    assert audit_run_id(long) != audit_run_id("r" * 63 + "s")


def test_summary_mean_and_worst():
    records = [
        {"job_id": "a", "psnr": 30.0, "ssim": 0.9, "uncached_key": "k"},
        {"job_id": "b", "psnr": 20.0, "ssim": 0.95, "uncached_key": "k"},
        {"job_id": "c", "psnr": None, "ssim": 1.0, "uncached_key": "k"},
    ]
    summary = summarize(records, run_id="r", requested=4, deepcache={"enabled": True, "interval": 3, "branch": 0})
    assert summary["psnr_db"] == {"mean": 25.0, "worst": 20.0, "worst_job": "b"}
    assert summary["ssim"]["worst"] == 0.9 and summary["ssim"]["worst_job"] == "a"
    assert (summary["requested"], summary["audited"], summary["identical"]) == (4, 3, 1)
    assert summary["twin_run"] == "r.audit"
