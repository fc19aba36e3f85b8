"""The scaling benchmark's arithmetic, and one tiny run of it end to end (real workers on the
simulated device), so `python -m ops.bench.scaling` cannot rot between full runs."""

from __future__ import annotations

import json

import pytest

from ops.bench import scaling


def sidecar(worker: str, batch: str, started: float, seconds: float, size: int) -> dict:
    return {
        "worker": {"name": worker},
        "batch": {"id": batch, "size": size},
        "timing": {"started_at": started, "batch_inference_s": seconds},
    }


def test_critical_path_counts_gaps_between_one_workers_calls_only() -> None:
    sidecars = [
        *[sidecar("a", "a1", 0.0, 1.0, 8)] * 8,  # one sidecar per image of the batch
        *[sidecar("a", "a2", 1.1, 1.0, 8)] * 8,  # 0.1 s after a1 ended
        *[sidecar("b", "b1", 0.5, 1.0, 4)] * 4,  # another worker, overlapping: no gap
    ]
    result = scaling.critical_path(sidecars)
    assert result["batches"] == 3
    assert result["batch_fill"] == pytest.approx((8 + 8 + 4) / 3 / 8)
    assert result["median_gap_s"] == pytest.approx(0.1)
    assert result["overhead"] == pytest.approx(0.1 / 1.0)


@pytest.mark.integration
@pytest.mark.slow
def test_scaling_bench_runs_end_to_end(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(scaling, "DEVICE", "simulated:a=0.05,b=0.01")
    scaling.main(["--workers", "1,2", "--calls", "1", "--name", "dry", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "dry.json").read_text())
    assert "failed" not in results, results["failed"]
    assert [point["workers"] for point in results["points"]] == [1, 2]
    assert all(point["images_per_s"] > 0 and 0 < point["batch_fill"] <= 1 for point in results["points"])
    assert "| 2 | 16 |" in (tmp_path / "dry.md").read_text()
