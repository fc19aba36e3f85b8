"""ops/bench/gpu.sh dry-runs on CPU with the tiny model, so the GPU benchmark cannot rot between
the rare sessions that have a GPU. Checks the shape of its results, not its figures. The variants
run first: the dry run waits for the run's compiled kernels (``compiled_tiny``) meanwhile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
REPO_ROOT = Path(__file__).resolve().parents[2]
# Compiling (SD1.5's UNet, the benches' models) takes 4-10 min on 2 cores, more beside other work:
# the timeout only bounds a hang.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]


def test_worker_variants_dry_run_on_cpu(tiny_model: Path, tmp_path: Path) -> None:
    """The diagnosis that explains a worker slower than its Engine also runs on CPU."""
    args = ["--model", str(tiny_model), "--device", "cpu", "--size", "64", "--steps", "2", "--jobs", "8"]
    done = subprocess.run(
        [sys.executable, "-m", "ops.bench.worker_variants", *args, "--out", str(tmp_path), "--name", "variants"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads((tmp_path / "variants.json").read_text())
    from ops.bench.worker_variants import VARIANTS

    assert "failed" not in results and set(results["variants"]) == set(VARIANTS)
    variants = results["variants"]
    assert all(variants[name]["images"] == 8 and variants[name]["batch_sizes"] == {"8": 1} for name in VARIANTS)
    assert len(results["in_process"]["alone_s"]) == len(results["in_process"]["with_png_threads_s"]) == 4
    assert "| solo-pool |" in (tmp_path / "variants.md").read_text()


def test_gpu_bench_dry_run_on_cpu(tiny_model: Path, sdxl_tiny: Path, compiled_tiny: Path, tmp_path: Path) -> None:
    """Every level's columns (graphs left out: no CUDA), the quality gate and a warm restart, at one
    batch size (each shape a compiled level meets compiles for minutes on 2 cores); then the SDXL
    part on the tiny SDXL pipeline at the levels that do not compile."""
    args = ["--model", str(tiny_model), "--device", "cpu", "--size", "64", "--steps", "3", "--rounds", "1"]
    args += ["--batches", "2", "--jobs", "2:4", "--e2e-rounds", "1", "--out", str(tmp_path), "--name", "dry"]
    args += ["--sdxl-model", str(sdxl_tiny), "--sdxl-size", "64", "--sdxl-batch", "2", "--sdxl-jobs", "2"]
    args += ["--sdxl-rounds", "1", "--sdxl-levels", "off,fuse", "--table-modes", "off,3/0,5/0", "--restarts", "2"]
    args += ["--compile-cache", str(compiled_tiny)]  # the run's: the tiny model's kernels are read back
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    done = subprocess.run(
        ["bash", "ops/bench/gpu.sh", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=2400
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads((tmp_path / "dry.json").read_text())
    assert not (tmp_path / "dry.partial.json").exists()
    assert results["fork_check"]["skipped"].startswith("no CUDA device")
    service = results["service"]
    assert service["device"] == "cpu"
    assert service["levels"] == ["off", "fuse", "compile"]
    assert {(row["batch"], row["mode"]) for row in service["matrix"]} == {
        (2, mode) for mode in ("off", "3/0", "5/0", "5/1")
    }
    assert set(service["table"]) == {"2 off", "2 3/0", "2 5/0"}
    engines = {f"engine:{level}" for level in service["levels"]}
    end_to_end = {f"{path}:{level}" for path in ("embedded", "worker") for level in service["levels"]}
    for cell, row in service["table"].items():
        assert set(row["over_recipe"]) == (engines | end_to_end if cell == "2 3/0" else engines), cell
        assert all(ratio["median"] > 0 for ratio in row["over_recipe"].values())
    quality = service["quality"]
    assert quality["gate_db"] == 50 and set(quality["levels"]) == {"fuse", "compile"}
    assert all(row["passes"] for row in quality["levels"].values()), quality
    assert set(service["first_calls_s"]) == {"off", "fuse", "compile"}
    restart = service["warm_restart"]
    assert restart["level"] == "compile" and len(restart["start_s"]) == 2
    assert "cache_hits" in restart["warm_up_line"] and "cache_misses" not in restart["warm_up_line"], restart
    assert service["worker_main_process_fork_safe"] is True
    assert [run["batch_sizes"] for run in service["runs"]["worker:compile"]["2 3/0"]] == [{"2": 2}]
    assert [run["images"] for run in service["runs"]["embedded:fuse"]["2 3/0"]] == [4]
    sdxl = results["sdxl"]
    assert sdxl["levels"] == ["off", "fuse"] and set(sdxl["table"]) == {"2 3/0"}
    assert {(row["batch"], row["mode"]) for row in sdxl["matrix"]} == {(2, "off"), (2, "3/0")}
    assert set(sdxl["table"]["2 3/0"]["over_recipe"]) == {
        f"{path}:{level}" for path in ("engine", "embedded", "worker") for level in ("off", "fuse")
    }
    assert set(sdxl["quality"]["levels"]) == {"fuse"} and sdxl["quality"]["levels"]["fuse"]["passes"]
    markdown = (tmp_path / "dry.md").read_text()
    assert "Service vs DeepCache's documented recipe" in markdown and "Quality gate" in markdown
    assert "| 2 | 3/0 | worker | compile |" in markdown
    assert "## SDXL architecture: 64x64" in markdown
