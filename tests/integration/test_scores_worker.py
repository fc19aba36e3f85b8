"""Quality scores end to end on a real ``deepqueue worker`` (tiny pipeline, tiny random CLIP and
safety checker, real Redis, moto S3): ``deepqueue submit --scores clip,phash,nsfw`` fills the
parquet export's phash, clip_score and nsfw for every row, and rows that repeat an earlier
row's prompt and seed point at it in duplicate_of; a run that asks for nothing gets what the
worker's own ``DEEPQUEUE_SCORES`` computes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("imagehash")
pq = pytest.importorskip("pyarrow.parquet")

from ops.localstack import client_for, deepqueue_command, start_worker, stop  # noqa: E402
from producer import JobState  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DISTINCT = 10
#: Rows that repeat an earlier row's prompt and seed: repeat index -> original index.
REPEATS = {10: 1, 11: 4, 12: 1, 13: 7}


def prompt_rows() -> list[dict]:
    rows = [{"prompt": f"a lighthouse in a storm, study {index}", "seed": 9000 + index} for index in range(DISTINCT)]
    return rows + [dict(rows[original]) for original in REPEATS.values()]


def deepqueue(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([*deepqueue_command(), *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def exported_rows(env: dict[str, str], run: str, folder: Path) -> list[dict]:
    deepqueue(env, "export", run, "--format", "parquet", "--to", str(folder))
    return sorted(
        (row for path in sorted(folder.glob("*.parquet")) for row in pq.read_table(path).to_pylist()),
        key=lambda row: row["index"],
    )


def test_submit_with_scores_fills_the_export_and_finds_the_repeats(
    s3_worker_env, aws_env, score_models, tmp_path: Path
) -> None:
    env = {
        **s3_worker_env,
        "DEEPQUEUE_SCORES": "phash",  # the worker's own: every image gets a pHash
        "DEEPQUEUE_CLIP_MODEL": str(score_models["clip"]),
        "DEEPQUEUE_SAFETY_CHECKER": str(score_models["nsfw"]),
    }
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in prompt_rows()))
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        deepqueue(env, "submit", str(prompts), "--run", "scored", "--scores", "clip,phash,nsfw", "--size", "64x64",
                  "--steps", "2")  # fmt: skip
        deepqueue(env, "submit", "--template", "a {red|blue|green} boat", "--run", "plain", "--size", "64x64",
                  "--steps", "2")  # fmt: skip
        with client_for(env) as client:
            for run, count in (("scored", len(prompt_rows())), ("plain", 3)):
                assert client.run(run).wait(timeout=300).counts[JobState.DONE] == count
    finally:
        stop(worker)
    log = (tmp_path / "worker.log").read_text()
    assert "loaded the clip model" in log and "loaded the nsfw model" in log

    rows = exported_rows(env, "scored", tmp_path / "scored")
    assert len(rows) == len(prompt_rows())
    for row in rows:
        assert len(row["phash"]) == 16 and int(row["phash"], 16) >= 0
        assert 0.0 <= row["clip_score"] <= 100.0
        assert isinstance(row["nsfw"], bool)
        assert json.loads(row["sidecar"])["timing"]["batch_scores_s"] > 0
    job_ids = [row["job_id"] for row in rows]
    assert {row["index"]: row["duplicate_of"] for row in rows if row["duplicate_of"]} == {
        repeat: job_ids[original] for repeat, original in REPEATS.items()
    }
    with client_for(env) as client:
        stats = client.manifest("scored")
    assert stats["near_duplicates"]["duplicates"] == len(REPEATS)
    assert stats["scores"]["nsfw"]["count"] == stats["scores"]["clip_score"]["count"] == len(rows)

    plain = exported_rows(env, "plain", tmp_path / "plain")
    assert len(plain) == 3
    assert all(row["phash"] and row["clip_score"] is None and row["nsfw"] is None for row in plain)
