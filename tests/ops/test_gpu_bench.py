"""ops/bench/gpu.sh dry-runs on CPU with the tiny model, so the GPU benchmark cannot rot between
the rare sessions that have a GPU. Checks the shape of its results, not its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_gpu_bench_dry_run_on_cpu(tiny_model: Path, tmp_path: Path) -> None:
    args = ["--model", str(tiny_model), "--device", "cpu", "--size", "64", "--steps", "3", "--rounds", "1"]
    args += ["--jobs", "1:2,8:8", "--out", str(tmp_path), "--name", "dry"]
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    done = subprocess.run(
        ["bash", "ops/bench/gpu.sh", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads((tmp_path / "dry.json").read_text())
    assert not (tmp_path / "dry.partial.json").exists()
    assert results["fork_check"]["skipped"].startswith("no CUDA device")
    service = results["service"]
    assert service["device"] == "cpu"
    assert {(row["batch"], row["mode"]) for row in service["matrix"]} == {
        (batch, mode) for batch in (1, 4, 8) for mode in ("off", "3/0", "5/0", "5/1")
    }
    assert set(service["ratios"]) == {"1 off", "1 3/0", "8 off", "8 3/0"}
    for cell in service["ratios"].values():
        assert all(value > 0 for value in cell.values())
    assert service["worker"]["main_process_fork_safe"] is True
    assert service["worker"]["8 3/0"]["batch_sizes"] == {"8": 1}
    assert service["embedded"]["1 off"]["images"] == 2
    markdown = (tmp_path / "dry.md").read_text()
    assert "Service vs DeepCache's documented recipe" in markdown and "worker ÷ recipe" in markdown
