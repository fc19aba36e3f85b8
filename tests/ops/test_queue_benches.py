"""The issue-7 benchmarks (batch fill, submit at scale, worker memory, the goals table): their
arithmetic, and each run end to end at a tiny size with real servers and workers, so that
`make bench` cannot rot between full runs. No timing is asserted."""

from __future__ import annotations

import json

import pytest

from ops.bench import batching, drain, goals, scores, submit_scale, worker_memory


def sidecar(batch: str, size: int, width: int = 64) -> dict:
    return {"batch": {"id": batch, "size": size}, "width": width, "height": 64}


def test_fill_counts_batches_once_and_compares_with_the_best_possible() -> None:
    sidecars = [*[sidecar("a", 8)] * 8, *[sidecar("b", 2)] * 2, *[sidecar("c", 8, 72)] * 8, *[sidecar("d", 1, 72)]]
    result = batching.fill(sidecars)
    assert (result["jobs"], result["batches"], result["best_batches"]) == (19, 4, 4)
    assert result["batch_fill"] == pytest.approx(19 / 4 / 8) and result["fill_vs_best"] == 1.0
    assert result["histogram"] == {1: 1, 2: 1, 8: 2}


def test_shuffled_jobs_mix_every_size_and_both_negative_forms() -> None:
    rows = batching.shuffled_jobs("r", 4, seed=1)
    assert len(rows) == 4 * len(batching.SIZES)
    assert {(row["width"], row["height"]) for row in rows} == set(batching.SIZES)
    assert sum("negative_prompt" in row for row in rows) == len(rows) // 2
    assert rows != batching.shuffled_jobs("r", 4, seed=2)


def test_goal_rows_say_met_or_not_from_the_figures() -> None:
    parts = {
        "batching": {
            "fill": {"submit": {"batch_fill": 0.97}, "shuffled": {"batch_fill": 0.9}},
            "lone": [{"behind": 0, "ratio": 1.01}, {"behind": 80, "ratio": 1.2}],
        },
        "scaling": {
            "points": [
                {"workers": 1, "overhead": 0.2, "scaling": 1.0},
                {"workers": 16, "overhead": 0.3, "scaling": 0.8},
            ]
        },
        "submit": {
            "points": [
                {"prompts": 10, "rss_peak_mib": 70, "redis_bytes_per_job": 700, "jobs_per_s": 110_000},
                {
                    "prompts": 100,
                    "rss_peak_mib": 71,
                    "redis_bytes_per_job": 650,
                    "redis_bytes_per_done_job": 8.4,
                    "jobs_per_s": 120_000,
                },
            ]
        },
        "memory": {"point": {"batches": 500, "main_mib": {"growth": 0.01}, "pool_mib": {"growth": 0.06}}},
    }
    met = {goal: ok for goal, _, _, ok in goals.goal_rows(parts)}
    assert met["batch fill, deep shuffled 10-size queue, submit"] is True
    assert met["batch fill, deep shuffled 10-size queue, shuffled"] is False
    assert [met[g] for g in met if g.startswith("lone job")] == [True, False]
    assert met["scaling, 16 simulated workers (÷ linear)"] is False
    assert met["submit peak RSS (MiB) by prompts"] is True
    assert met["Redis bytes per queued job (100-char prompt)"] is False
    assert met["Redis bytes per done job"] is True
    assert met["`Client.submit` enqueue rate (jobs/s, slowest size)"] is True
    assert met["worker RSS growth over 500 batches (larger of main, pool)"] is False
    assert "| **no** |" in goals.markdown(
        {
            "command": "c",
            "seconds": 1,
            "machine": {},
            "load_before": None,
            "load_after": None,
            "goals": goals.goal_rows(parts),
        }
    )


def test_goal_rows_come_from_the_parts_that_measured_something() -> None:
    """A failed part leaves its results empty (or absent): its goals have no row, the others do."""
    memory = {"point": {"batches": 200, "main_mib": {"growth": 0.0}, "pool_mib": {"growth": 0.01}}}
    parts = {"batching": {"fill": {}, "lone": []}, "scaling": {"points": []}, "memory": memory}
    [(goal, measured, _, met)] = goals.goal_rows(parts)
    assert (goal, measured, met) == ("worker RSS growth over 200 batches (larger of main, pool)", "+1.0 %", True)
    assert goals.goal_rows({}) == []


def test_the_service_part_reports_each_levels_worker_ratio_and_quality_gate() -> None:
    service = {
        "device": "cpu",
        "plan": {"table_batches": [1, 8]},
        "levels": ["off", "compile"],
        "table": {"8 3/0": {"over_recipe": {"worker:off": {"median": 0.95}, "worker:compile": {"median": 1.2}}}},
        "quality": {
            "dtype": "float32",
            "gate_db": 50.0,
            "levels": {"compile": {"psnr_db": {"off": 80.0, "3/0": 49.0}, "passes": False}},
        },
    }
    rows = goals.goal_rows({"service": {"service": service}})
    assert rows == [
        ("worker ÷ recipe, acceleration off, batch 8, 3/0 (CPU: trend only)", "0.950", "reported", None),
        ("worker ÷ recipe, acceleration compile, batch 8, 3/0 (CPU: trend only)", "1.200", "reported", None),
        ("PSNR vs eager, acceleration compile (float32)", "49.0 dB", "≥ 50 dB", False),
    ]


@pytest.mark.integration
@pytest.mark.slow
def test_batching_bench_runs_end_to_end(tmp_path) -> None:
    results = batching.main(["--jobs-per-size", "8", "--name", "dry", "--out", str(tmp_path)])
    assert "failed" not in results, results["failed"]
    assert set(json.loads((tmp_path / "dry.json").read_text())) >= {"fill", "lone"}
    for point in results["fill"].values():
        assert point["jobs"] == 160 and 0 < point["batch_fill"] <= 1
    assert [point["behind"] for point in results["lone"]] == [0, 80]


@pytest.mark.integration
def test_submit_bench_runs_end_to_end(tmp_path) -> None:
    results = submit_scale.main(["--sizes", "500,1000", "--name", "dry", "--out", str(tmp_path)])
    assert "failed" not in results, results["failed"]
    assert [point["prompts"] for point in results["points"]] == [500, 1000]
    for point in results["points"]:
        # Redis's own overheads (scripts, buffers) swamp a few hundred jobs: only the 1M figures count.
        assert point["sent"] == point["prompts"] and point["redis_bytes_per_job"] > 0
        assert point["redis_bytes_per_done_job"] > 0
        assert 0 < point["rss_before_mib"] <= point["rss_peak_mib"]
        assert point["redis_bytes_per_job_by_key"]["deepqueue"] > 0
    assert "| 1,000 |" in (tmp_path / "dry.md").read_text()


@pytest.mark.integration
def test_submit_bench_of_a_template_resubmits_nothing(tmp_path) -> None:
    results = submit_scale.main(["--template", "--sizes", "100,1000", "--out", str(tmp_path)])
    assert "failed" not in results, results["failed"]
    assert [(point["sent"], point["resent"]) for point in results["points"]] == [(100, 0), (1000, 0)]
    assert "| 1,000 |" in (tmp_path / "submit-template-latest.md").read_text()
    with pytest.raises(ValueError, match="powers of ten"):
        submit_scale.write_template(tmp_path / "t.jsonl", 300)


@pytest.mark.integration
@pytest.mark.slow
def test_worker_memory_bench_runs_end_to_end(tmp_path, tiny_model) -> None:
    args = ["--batches", "6", "--warmup", "2", "--model", str(tiny_model), "--name", "dry", "--out", str(tmp_path)]
    results = worker_memory.main(args)
    assert "failed" not in results, results["failed"]
    point = results["point"]
    assert point["batches"] == 6 and point["pool_mib"]["end"] > point["main_mib"]["end"] > 0


@pytest.mark.integration
@pytest.mark.slow
def test_drain_bench_runs_end_to_end(tmp_path, tiny_model) -> None:
    """A cancelled and a deleted run drained by a real worker; nothing generated (checked inside)."""
    args = ["--jobs", "200", "--rounds", "1", "--model", str(tiny_model), "--name", "dry", "--out", str(tmp_path)]
    results = drain.main(args)
    assert "failed" not in results, results["failed"]
    assert set(results["drain"]) == {"cancelled", "deleted"}
    assert all(figures["messages_per_s"]["median"] > 0 for figures in results["drain"].values())
    assert (tmp_path / "dry.md").read_text().count("| cancelled |") == 1


@pytest.mark.integration
def test_scores_bench_runs_end_to_end(tmp_path, tiny_model) -> None:
    args = ["--rounds", "1", "--index-sizes", "2000", "--model", str(tiny_model), "--out", str(tmp_path)]
    results = scores.main(args)
    assert "failed" not in results, results["failed"]
    assert 0 < results["tiny"]["share_all"] < 1 and set(results["tiny"]["median_s"]) >= {"pipeline", "all"}
    [index] = results["index"]
    assert index["rows"] == 2000 and index["planted"] == 20 and index["planted_missed"] == 0
    assert "| 2,000 |" in (tmp_path / "scores-latest.md").read_text()
