"""What a benchmark run leaves behind: a part that fails is one line in the report (the run goes
on, writes its report and exits 1, with no traceback at the end), and a plain run writes beside
the committed results, never over them. The faults are real: a worker whose model folder does not
exist, a server given no time to start."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ops.bench import harness, submit_scale

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def bench(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m ops.bench.MODULE ARGS`` as a user runs it, stdout and stderr in one stream."""
    return subprocess.run(
        [sys.executable, "-m", f"ops.bench.{module}", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )


def assert_ends_with_the_report(done: subprocess.CompletedProcess, failed: int) -> None:
    assert done.returncode == 1, done.stdout[-4000:]
    assert "Traceback" not in done.stdout, done.stdout[-4000:]
    assert done.stdout.strip().splitlines()[-1].endswith(f"; {failed} part(s) failed")


def test_a_worker_that_cannot_start_is_one_line_and_the_other_benchmarks_are_measured(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    done = bench(
        "run",
        "--only",
        "enqueue",
        "--only",
        "worker",
        "--jobs",
        "200",
        "--enqueue-rounds",
        "1",
        "--model",
        str(missing),
        "--out",
        str(tmp_path),
    )
    assert_ends_with_the_report(done, failed=1)
    text = (tmp_path / "latest.md").read_text()
    assert "## Enqueue rate: 200 jobs" in text and "| `Client.submit`" in text
    [line] = [line for line in text.splitlines() if line.startswith("- worker: ")]
    assert line.startswith("- worker: RuntimeError: deepqueue worker exited with 70; log: Error: cannot read model")
    assert str(missing) in line
    results = json.loads((tmp_path / "latest.json").read_text())
    assert set(results["enqueue"]["variants"]) >= {"send_task_loop", "client_submit"} and "worker" not in results
    assert "Traceback" in results["failed"]["worker"]["traceback"]


def test_goals_report_a_part_that_failed_and_write_every_file_in_one_folder(tmp_path: Path) -> None:
    done = bench("goals", "--only", "memory", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path))
    assert_ends_with_the_report(done, failed=1)
    goals = (tmp_path / "goals-latest.md").read_text()
    assert "- memory: worker memory: RuntimeError: deepqueue worker exited with 70; log: Error:" in goals
    assert "worker RSS growth" not in goals  # no figure: no goal row
    memory = (tmp_path / "worker-memory-latest.md").read_text()
    assert "- worker memory: RuntimeError: deepqueue worker exited with 70" in memory


def test_a_start_up_timeout_is_reported_not_raised(tmp_path: Path) -> None:
    results = submit_scale.main(["--sizes", "100", "--start-timeout", "0", "--out", str(tmp_path)])
    assert results["failed"]["redis-server"]["error"] == "TimeoutError: redis-server did not come up within 0 s"
    text = (tmp_path / "submit-latest.md").read_text()
    assert "## Failed: 1 part(s)" in text and "- redis-server: TimeoutError:" in text
    assert harness.exit_status(results) == 1


def test_a_plain_run_writes_beside_the_committed_results_and_record_over_them(tmp_path: Path, monkeypatch) -> None:
    committed = tmp_path / "results"
    shutil.copytree(harness.RESULTS, committed, ignore=shutil.ignore_patterns("runs"))
    monkeypatch.setattr(harness, "RESULTS", committed)  # the folder only: the run itself is real
    before = {path.name: path.read_bytes() for path in committed.iterdir()}
    assert {"submit-latest.md", "submit-latest.json", "goals-latest.md"} <= set(before)

    results = submit_scale.main(["--sizes", "100"])
    assert "failed" not in results, results["failed"]
    assert {path.name: path.read_bytes() for path in committed.iterdir() if path.is_file()} == before
    [run] = (committed / "runs").iterdir()
    assert "| 100 |" in (run / "submit-latest.md").read_text()

    submit_scale.main(["--sizes", "100", "--record"])
    assert "| 100 |" in (committed / "submit-latest.md").read_text()
    assert len(list((committed / "runs").iterdir())) == 1


def test_fresh_results_are_ignored_by_git() -> None:
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    path = harness.output_dir(argparse.Namespace(out=None, record=False)) / "goals-latest.md"
    done = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO_ROOT)
    assert done.returncode == 0, f"{path} is not git-ignored"


def test_an_interrupted_benchmark_writes_what_it_measured(tmp_path: Path) -> None:
    """A GPU lease's time limit sends SIGINT: the parts measured so far are written, marked."""
    args = argparse.Namespace(out=tmp_path, record=False, name="cut", start_timeout=5.0)
    with harness.session(args, lambda results: f"measured: {results.get('measured')}") as bench:
        bench.results["measured"] = 42
        raise KeyboardInterrupt
    written = json.loads((tmp_path / "cut.json").read_text())
    assert written["measured"] == 42 and "interrupted" in written["failed"]["run"]["error"]
    assert harness.exit_status(written) == 1
    assert "measured: 42" in (tmp_path / "cut.md").read_text()


def test_the_service_report_reads_a_run_cut_before_its_first_round() -> None:
    """What the GPU bench checkpoints before the rounds (levels, first calls, gate) renders."""
    from dataclasses import asdict

    from ops.bench.service_plan import Plan
    from ops.bench.service_report import markdown

    plan = {**asdict(Plan(model=Path("m"))), "model": "m", "jobs": {"8": 32}}
    gate = {"batch": 8, "gate_db": 35.0, "dtype": "float16", "modes": ["3/0"], "levels": {}}
    partial = {"plan": plan, "device": "cuda", "dtype": "float16", "levels": ["off", "graphs"], "quality": gate}
    partial |= {"first_calls_s": {"off": 5.0, "graphs": 117.0}, "failed_levels": {"fuse": "boom"}}
    text = "\n".join(markdown(partial, "Service"))
    assert "graphs 117 s" in text and "Level **fuse left out**" in text
