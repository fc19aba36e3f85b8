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
    args += ["--jobs", "1:2,8:8", "--e2e-rounds", "1", "--out", str(tmp_path), "--name", "dry"]
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
    assert set(service["table"]) == {"1 off", "1 3/0", "8 off", "8 3/0"}
    for row in service["table"].values():
        assert set(row["over_recipe"]) == {"engine", "embedded", "worker"}
        assert all(ratio["median"] > 0 for ratio in row["over_recipe"].values())
    assert service["worker_main_process_fork_safe"] is True
    assert [run["batch_sizes"] for run in service["runs"]["worker"]["8 3/0"]] == [{"8": 1}]
    assert [run["images"] for run in service["runs"]["embedded"]["1 off"]] == [2]
    markdown = (tmp_path / "dry.md").read_text()
    assert "Service vs DeepCache's documented recipe" in markdown and "worker ÷ recipe" in markdown


def test_worker_variants_dry_run_on_cpu(tiny_model: Path, tmp_path: Path) -> None:
    """The diagnosis that explains a worker slower than its Engine also runs on CPU."""
    out = tmp_path / "variants.json"
    args = ["--model", str(tiny_model), "--device", "cpu", "--size", "64", "--steps", "2", "--jobs", "8"]
    done = subprocess.run(
        [sys.executable, "-m", "ops.bench.worker_variants", *args, "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads(out.read_text())
    from ops.bench.worker_variants import VARIANTS

    assert set(results) == {*VARIANTS, "in-process"}
    assert all(results[name]["images"] == 8 and results[name]["batch_sizes"] == {"8": 1} for name in VARIANTS)
    assert len(results["in-process"]["alone_s"]) == len(results["in-process"]["with_png_threads_s"]) == 4
