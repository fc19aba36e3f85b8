"""worker.embedded: the worker's batching and executor in one process, writing a local folder."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
Image = pytest.importorskip("PIL.Image")

from producer.entries import make_jobs  # noqa: E402
from producer.job import Job, JobDefaults  # noqa: E402
from producer.state import JobState  # noqa: E402
from tests.helpers import local_worker_settings  # noqa: E402
from worker.embedded import MemoryReporter, Summary, run_embedded  # noqa: E402
from worker.pipeline.executor import Outcome  # noqa: E402

RUN = "embedded-run"


def ten_jobs() -> list[Job]:
    """Ten jobs over two sizes, interleaved as a prompt file might list them."""
    rows = [(f"line {i + 1}", {"prompt": f"a cat number {i}", **({"width": 96} if i % 2 else {})}) for i in range(10)]
    return make_jobs(rows, run_id=RUN, defaults=JobDefaults(height=64, width=64, steps=2), run_seed=7)


def files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_run_and_rerun(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    jobs = ten_jobs()
    assert Counter((job.width, job.height) for job in jobs) == {(64, 64): 5, (96, 64): 5}
    summary = run_embedded(jobs, local_worker_settings(tiny_model, out), progress=False)

    assert summary.images == 10 and summary.skipped == 0 and summary.failed == []
    assert summary.batch_sizes == Counter({4: 2, 1: 2})  # 5 per size, max_batch 4
    assert summary.out_dir == out and summary.seconds > 0 and summary.images_per_s > 0
    images = sorted((out / RUN / "images").glob("*.png"))
    sidecars = sorted((out / RUN / "images").glob("*.json"))
    assert [p.stem for p in images] == [p.stem for p in sidecars] == sorted(job.job_id for job in jobs)
    compositions = set()
    for job in jobs:
        image = Image.open(out / RUN / "images" / f"{job.job_id}.png")
        assert image.size == (job.width, job.height)
        sidecar = json.loads((out / RUN / "images" / f"{job.job_id}.json").read_text(encoding="utf-8"))
        assert (sidecar["job_id"], sidecar["prompt"], sidecar["seed"]) == (job.job_id, job.prompt, job.seed)
        assert sidecar["image"] == str(out / RUN / "images" / f"{job.job_id}.png")
        assert sidecar["timing"]["queue_wait_s"] is not None
        assert sidecar["worker"]["device"] == "cpu"
        compositions.add(tuple(sidecar["batch"]["job_ids"]))
    # Four calls, each of one size, covering every job once.
    assert sorted(len(c) for c in compositions) == [1, 1, 4, 4]
    assert sorted(j for c in compositions for j in c) == sorted(job.job_id for job in jobs)
    widths = {job.job_id: job.width for job in jobs}
    assert all(len({widths[j] for j in c}) == 1 for c in compositions)
    lines = summary.lines()
    assert lines[0].startswith("10 images in 4 batches (2 of 4, 2 of 1)")
    assert lines[1] == f"files: {out}"

    before = files(out)
    again = run_embedded(jobs, local_worker_settings(tiny_model, out), progress=False)
    assert again.skipped == 10 and again.images == 0 and again.failed == []
    assert again.batch_sizes == Counter()
    assert files(out) == before  # nothing rewritten
    assert f"skipped 10 jobs already in {out}" in again.lines()


def test_rerun_finishes_what_is_missing(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    jobs = ten_jobs()[:3]
    run_embedded(jobs[:2], local_worker_settings(tiny_model, out), progress=False)
    # An image without its sidecar (a run killed between the two uploads) is not "done".
    (out / RUN / "images" / f"{jobs[1].job_id}.json").unlink()
    summary = run_embedded(jobs, local_worker_settings(tiny_model, out), progress=False)
    assert (summary.skipped, summary.images) == (1, 2)
    assert (out / RUN / "images" / f"{jobs[1].job_id}.json").is_file()


def test_failures_are_counted_not_raised(tiny_model: Path, tmp_path: Path) -> None:
    jobs = ten_jobs()[:2]
    jobs.append(
        make_jobs(
            [("line 3", {"prompt": "x", "cache_branch": 7})],  # no such branch in the tiny UNet
            run_id=RUN,
            defaults=JobDefaults(height=64, width=64, steps=2),
        )[0]
    )
    summary = run_embedded(jobs, local_worker_settings(tiny_model, tmp_path), progress=False)
    assert summary.images == 2
    assert [o.job_id for o in summary.failed] == [jobs[2].job_id]
    assert "cache_branch 7" in summary.failed[0].reason
    assert any(line.startswith(f"failed {jobs[2].job_id}: ") for line in summary.lines())


def test_memory_reporter() -> None:
    reporter = MemoryReporter()
    assert reporter.get("r", "j") is None
    assert reporter.mark("r", "j", JobState.RUNNING, worker="host") is True
    assert reporter.get("r", "j").details == {"worker": "host"}
    reporter.mark("r", "j", JobState.DONE, key="out/x.png")
    result = reporter.get("r", "j")
    assert (result.state, result.key, result.reason, result.details) == (JobState.DONE, "out/x.png", None, {})
    reporter.mark("r", "k", JobState.FAILED, reason="bad")
    assert reporter.get("r", "k").reason == "bad" and reporter.get("other", "k") is None


def test_summary_lines_when_nothing_ran(tmp_path: Path) -> None:
    summary = Summary(out_dir=tmp_path)
    assert summary.images_per_s == 0.0
    assert summary.lines()[0] == "0 images in 0 batches (none) in 0.0 s: 0.00 images/s"
    summary.failed.append(Outcome("task-1", False, None, reason="invalid job: x"))
    assert summary.lines()[-1] == "failed task-1: invalid job: x"
