"""The ``deepqueue`` CLI through click's runner, against a real Redis from DEEPQUEUE_* settings."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner, Result

from ops.localstack import free_port
from producer import Client, Job, JobState
from producer.cli import cli
from producer.exits import EXIT_BAD_INPUT
from producer.fair import Share
from producer.job import derive_seed
from producer.layout import WORKER_QUEUES_KEY, WORKERS_KEY
from producer.state import RunStore
from tests.helpers import lose_queue, queued_jobs

QUEUED, RUNNING, DONE, FAILED, CANCELLED = tuple(JobState)
COMMANDS = [
    "submit",
    "status",
    "runs",
    "wait",
    "results",
    "cancel",
    "resume",
    "delete",
    "prune",
    "worker",
    "run",
    "make-test-model",
]


@pytest.fixture
def env(redis_urls, monkeypatch) -> tuple[str, str]:
    """Point the CLI at the test Redis the way a user would: DEEPQUEUE_* variables (no others
    are set but the test's storage folder: see conftest's ``no_deepqueue_env``)."""
    monkeypatch.setenv("DEEPQUEUE_BROKER_URL", redis_urls[0])
    monkeypatch.setenv("DEEPQUEUE_RESULT_BACKEND", redis_urls[1])
    return redis_urls


@pytest.fixture
def store(env) -> RunStore:
    return RunStore.from_url(env[1])


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), prog_name="deepqueue")


def jobs_on_queue(broker_url: str) -> list[Job]:
    """The jobs waiting in the default queue, oldest first."""
    return [Job.model_validate(fields) for fields in queued_jobs(broker_url)]


def prompt_file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def submitted_run(tmp_path: Path, run_id: str, prompts: list[str]) -> None:
    result = invoke("submit", str(prompt_file(tmp_path, "p.txt", "\n".join(prompts))), "--run", run_id)
    assert result.exit_code == 0, result.output


# -- help -------------------------------------------------------------------------------------------


def test_top_level_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    for command in COMMANDS:
        assert command in result.output
    assert "DEEPQUEUE_BROKER_URL" in result.output


def test_version_is_the_installed_packages():
    from importlib.metadata import version

    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"deepqueue, version {version('deepqueue')}"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_has_help(command, flag):
    result = invoke(command, flag)
    assert result.exit_code == 0, result.output
    assert f"Usage: deepqueue {command}" in result.output


def test_help_shows_defaults_and_settings():
    submit = " ".join(invoke("submit", "--help").output.split())  # as read, not as wrapped
    assert "[default: 512x512]" in submit and "[default: 25]" in submit and "[default: 7.5]" in submit
    top = invoke("--help").output
    for name in [
        "DEEPQUEUE_RESULT_BACKEND=redis://127.0.0.1:6379/1",
        "DEEPQUEUE_QUEUE=deepqueue",
        "DEEPQUEUE_S3_BUCKET",
    ]:
        assert name in top
    worker = invoke("worker", "--help").output
    assert "DEEPQUEUE_MAX_BATCH=8" in worker and "DEEPQUEUE_CACHE_INTERVAL=3" in worker
    assert "DEEPQUEUE_BROKER_URL" not in worker  # the top-level help has the connection settings


@pytest.mark.parametrize("command", ["submit", "run"])
def test_recipe_flags_documented(command):
    output = invoke(command, "--help").output
    for flag in [
        "--size",
        "--steps",
        "--guidance",
        "--seed",
        "--negative",
        "--scheduler",
        "--cache-interval",
        "--cache-branch",
        "--format",
        "--run",
    ]:
        assert flag in output


# -- submit -----------------------------------------------------------------------------------------


def test_submit_with_size_enqueues_jobs_of_that_size(env, tmp_path, store):
    path = prompt_file(tmp_path, "p.txt", "a red fox\na blue heron\n")
    result = invoke("submit", str(path), "--size", "64x64", "--run", "small")
    assert result.exit_code == 0, result.output
    assert "run small: 2 jobs enqueued, 0 already queued, running or done" in result.output
    jobs = jobs_on_queue(env[0])
    assert [(job.prompt, job.width, job.height) for job in jobs] == [("a red fox", 64, 64), ("a blue heron", 64, 64)]
    assert store.counts("small")[QUEUED] == 2


def test_submit_passes_every_recipe_flag(env, tmp_path):
    path = prompt_file(tmp_path, "p.txt", "a fox\n")
    result = invoke(
        "submit",
        str(path),
        "--run",
        "flags",
        "--size",
        "128x64",
        "--steps",
        "4",
        "--guidance",
        "3.5",
        "--seed",
        "11",
        "--negative",
        "blurry",
        "--scheduler",
        "ddim",
        "--cache-interval",
        "2",
        "--cache-branch",
        "1",
        "--format",
        "webp",
    )
    assert result.exit_code == 0, result.output
    [job] = jobs_on_queue(env[0])
    assert (job.width, job.height, job.steps, job.guidance) == (128, 64, 4, 3.5)
    assert (job.negative_prompt, job.scheduler, job.cache_interval, job.cache_branch, job.format) == (
        "blurry",
        "ddim",
        2,
        1,
        "webp",
    )
    assert job.seed == derive_seed(11, 0)


def test_submit_rows_override_flags(env, tmp_path):
    path = prompt_file(tmp_path, "p.csv", "prompt,size,steps\nbig,256x128,\nsmall,,3\n")
    assert invoke("submit", str(path), "--size", "64x64", "--steps", "9").exit_code == 0
    jobs = jobs_on_queue(env[0])
    assert [(job.width, job.height, job.steps) for job in jobs] == [(256, 128, 9), (64, 64, 3)]


def test_submit_bad_csv_row_names_line_and_field_and_enqueues_nothing(env, tmp_path):
    path = prompt_file(tmp_path, "prompts.csv", "prompt,height\na fox,64\na heron,500\na frog,\n")
    result = invoke("submit", str(path), "--run", "bad")
    assert result.exit_code != 0
    assert "line 3 of prompts.csv" in result.output and "height" in result.output and "500" in result.output
    assert "nothing was enqueued" in result.output
    assert "Traceback" not in result.output
    assert redis.Redis.from_url(env[0]).dbsize() == 0 and redis.Redis.from_url(env[1]).dbsize() == 0


def test_submit_bad_jsonl_names_the_line(env, tmp_path):
    path = prompt_file(tmp_path, "p.jsonl", '"ok"\n{"prompt": \n')
    result = invoke("submit", str(path))
    assert result.exit_code != 0 and "line 2 of p.jsonl" in result.output
    assert redis.Redis.from_url(env[0]).dbsize() == 0


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--size", "500x500"], ["run defaults", "height", "500"]),
        (["--size", "large"], ["WIDTHxHEIGHT", "'large'"]),
        (["--steps", "0"], ["run defaults", "steps"]),
        (["--guidance", "31"], ["run defaults", "guidance"]),
        (["--scheduler", "heun", "--cache-interval", "3"], ["'heun'", "cache_interval=1"]),
        (["--cache-branch", "12"], ["cache_branch", "12"]),
        (["--run", "no spaces allowed"], ["run_id"]),
    ],
)
def test_submit_bad_flags_refused_with_a_clear_message(env, tmp_path, flags, expected):
    path = prompt_file(tmp_path, "p.txt", "a fox\n")
    result = invoke("submit", str(path), *flags)
    assert result.exit_code != 0
    for text in expected:
        assert text in result.output
    assert "Traceback" not in result.output
    assert redis.Redis.from_url(env[0]).dbsize() == 0


@pytest.mark.parametrize("flags", [["--scheduler", "lms"], ["--format", "gif"], ["--steps", "many"]])
def test_submit_choices_and_types_checked_by_click(env, tmp_path, flags):
    path = prompt_file(tmp_path, "p.txt", "a fox\n")
    result = invoke("submit", str(path), *flags)
    assert result.exit_code == 2 and flags[0] in result.output


def test_submit_missing_file_is_a_usage_error(env, tmp_path):
    result = invoke("submit", str(tmp_path / "nope.txt"))
    assert result.exit_code == 2 and "nope.txt" in result.output


def test_submit_unknown_file_type(env, tmp_path):
    result = invoke("submit", str(prompt_file(tmp_path, "p.yaml", "- a fox\n")))
    assert result.exit_code != 0 and "unknown prompt file type" in result.output


def test_submit_again_skips_running_and_done_jobs(env, tmp_path, store):
    submitted_run(tmp_path, "again", ["a", "b", "c"])
    ids = [job.job_id for job in jobs_on_queue(env[0])]
    store.mark("again", ids[0], RUNNING)
    store.mark("again", ids[1], DONE, key="k")
    result = invoke("submit", str(tmp_path / "p.txt"), "--run", "again")
    assert result.exit_code == 0, result.output
    assert "run again: 0 jobs enqueued, 3 already queued, running or done" in result.output
    resend = invoke("submit", str(tmp_path / "p.txt"), "--run", "again", "--resend-queued")
    assert "run again: 1 jobs enqueued, 2 already queued, running or done" in resend.output


def test_submit_wait_times_out(env, tmp_path):
    path = prompt_file(tmp_path, "p.txt", "a fox\n")
    result = invoke("submit", str(path), "--run", "nobody-works", "--wait", "--timeout", "0.01")
    assert result.exit_code == 4  # timed out: its own code, not "bad input"
    assert "1 jobs enqueued" in result.output and "not finished" in result.output


# -- status, results, wait --------------------------------------------------------------------------


def test_status_of_a_run(env, tmp_path, store):
    submitted_run(tmp_path, "st", ["a", "b", "c"])
    ids = [job.job_id for job in jobs_on_queue(env[0])]
    store.mark("st", ids[0], RUNNING)
    store.mark("st", ids[0], DONE, key="k")
    store.mark("st", ids[1], FAILED, reason="r")
    result = invoke("status", "st")
    assert result.exit_code == 0, result.output
    text = result.output.strip()
    assert text.startswith("st: 3 jobs (queued 1, running 0, done 1, failed 1, cancelled 0), "), text
    assert " img/s, ETA " in text and text.endswith(", 0 workers online; priority normal, weight 1")


def test_a_runs_priority_and_weight_are_set_at_submit_and_changed_while_it_runs(env, tmp_path):
    path = prompt_file(tmp_path, "p.txt", "a fox\nan owl\n")
    assert invoke("submit", str(path), "--run", "urgent", "--priority", "high", "--weight", "2.5").exit_code == 0
    assert invoke("status", "urgent").output.strip().endswith("; priority high, weight 2.5")
    changed = invoke("run-set", "urgent", "--priority", "low")
    assert (changed.exit_code, changed.output) == (0, "run urgent: priority low, weight 2.5\n")
    assert json.loads(invoke("status", "urgent", "--json").output)["priority"] == "low" and Client().share(
        "urgent"
    ) == Share("low", 2.5)
    assert "nothing to change" in invoke("run-set", "urgent").output
    assert invoke("run-set", "nope", "--weight", "2").exit_code == EXIT_BAD_INPUT
    bad = invoke("submit", str(path), "--run", "x", "--priority", "asap")
    assert bad.exit_code == 2 and "'asap' is not one of 'high', 'normal', 'low'" in bad.output
    assert invoke("submit", str(path), "--run", "x", "--weight", "0").exit_code == 2
    assert [job["run_id"] for job in queued_jobs(env[0])] == ["urgent", "urgent"]


def test_status_json_and_runs_list_every_run(env, tmp_path, store):
    submitted_run(tmp_path, "first", ["a", "b"])
    submitted_run(tmp_path, "second", ["c"])
    store.mark("first", jobs_on_queue(env[0])[0].job_id, DONE, key="k")
    live_worker(env[0], "gpu0@host:1", "deepqueue")
    live_worker(env[0], "xl@host:1", "deepqueue.sdxl")  # serves another model's runs: not counted
    result = invoke("status", "first", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "run": "first",
        "total": 2,
        "queued": 1,
        "running": 0,
        "done": 1,
        "failed": 0,
        "cancelled": 0,
        "images_per_s": None,  # no job was seen starting
        "eta_s": None,
        "workers": 1,
        "priority": "normal",
        "weight": 1.0,
    }
    listed = [json.loads(line) for line in invoke("runs", "--json").output.splitlines()]
    assert [(r["run"], r["total"], r["done"]) for r in listed] == [("first", 2, 1), ("second", 1, 0)]
    assert listed[0]["submitted_at"] <= listed[1]["submitted_at"]
    text = invoke("runs").output.splitlines()
    assert text[0].startswith("first: 2 jobs (queued 1, running 0, done 1, failed 0, cancelled 0), submitted ")
    assert text[0].endswith("s ago")


def test_cancel_then_delete_a_run(env, tmp_path, store):
    submitted_run(tmp_path, "stop", ["a", "b", "c"])
    ids = [job.job_id for job in jobs_on_queue(env[0])]
    store.mark("stop", ids[0], RUNNING)
    refused = invoke("delete", "stop")
    assert refused.exit_code == 2 and "3 queued or running jobs: cancel it first" in refused.output
    result = invoke("cancel", "stop")
    assert result.exit_code == 0, result.output
    assert "run stop: 2 queued jobs cancelled; stop: 3 jobs (queued 0, running 1, done 0, failed 0, cancelled 2)" in (
        result.output
    )
    again = invoke("submit", str(prompt_file(tmp_path, "p.txt", "d\n")), "--run", "stop")
    assert again.exit_code == 2 and "run 'stop' was cancelled" in again.output
    resend = invoke("retry", "stop")
    assert resend.exit_code == 2 and "run 'stop' was cancelled" in resend.output
    assert "deepqueue resume stop" in resend.output
    busy = invoke("delete", "stop")
    assert busy.exit_code == 2 and "1 queued or running jobs" in busy.output
    assert invoke("delete", "stop", "--force").exit_code == 0
    assert invoke("status", "stop").exit_code == 2  # no such run any more
    assert "stop" not in invoke("runs").output
    reused = invoke("submit", str(prompt_file(tmp_path, "p.txt", "d\n")), "--run", "stop")
    assert reused.exit_code == 0, reused.output  # a deleted run's name starts a new run


def test_resume_sends_the_cancelled_jobs_again(env, tmp_path, store):
    submitted_run(tmp_path, "undo", ["a", "b", "c"])
    ids = [job.job_id for job in jobs_on_queue(env[0])]
    store.mark("undo", ids[0], RUNNING)
    store.mark("undo", ids[0], DONE, key="k")
    assert invoke("cancel", "undo").exit_code == 0
    lose_queue(env[0])  # the workers drained the cancelled messages
    result = invoke("resume", "undo")
    assert result.exit_code == 0 and "run undo resumed: 2 cancelled jobs sent again" in result.output, result.output
    assert sorted(job.job_id for job in jobs_on_queue(env[0])) == sorted(ids[1:])
    assert store.counts("undo")[QUEUED] == 2 and store.counts("undo")[DONE] == 1
    again = invoke("resume", "undo")
    assert again.exit_code == 2 and "is not cancelled" in again.output
    assert invoke("submit", str(prompt_file(tmp_path, "p.txt", "d\n")), "--run", "undo").exit_code == 0
    assert invoke("resume", "no-such-run").exit_code == 2


def test_delete_and_prune_outputs_reach_a_run_deleted_before(env, tmp_path, store, monkeypatch):
    """A run's files can outlive its state (deleted without --outputs, or by a worker that was
    storing as the run was deleted): delete --outputs and prune --outputs still find them."""
    monkeypatch.setenv("DEEPQUEUE_STORAGE", "local")
    monkeypatch.setenv("DEEPQUEUE_OUTPUT_DIR", str(tmp_path / "out"))
    for run in ("kept-files", "pruned-files"):
        submitted_run(tmp_path, run, ["a"])
        (tmp_path / "out" / run / "images").mkdir(parents=True)
        (tmp_path / "out" / run / "images" / "late.png").write_bytes(b"stored after the delete")
        assert invoke("delete", run, "--force").exit_code == 0
    result = invoke("delete", "kept-files", "--outputs")
    assert result.exit_code == 0, result.output
    # the late image, and the jobs the submit kept (producer.sent)
    assert "run kept-files was deleted before, 2 objects deleted from storage" in result.output
    assert not (tmp_path / "out" / "kept-files" / "images" / "late.png").exists()
    assert invoke("prune", "--older-than", "0", "--dry-run").output == ""  # state gone: nothing without --outputs
    pruned = invoke("prune", "--older-than", "0", "--outputs")
    assert pruned.output.splitlines() == ["deleted kept-files", "deleted pruned-files"], pruned.output
    assert not (tmp_path / "out" / "pruned-files" / "images" / "late.png").exists()


def test_prune_deletes_finished_runs_older_than_the_age(env, tmp_path, store):
    submitted_run(tmp_path, "old-done", ["a"])
    submitted_run(tmp_path, "old-busy", ["b"])
    [done] = [job for job in jobs_on_queue(env[0]) if job.run_id == "old-done"]
    store.mark("old-done", done.job_id, DONE, key="k")
    assert invoke("prune", "--older-than", "1h").output == ""  # both too young
    dry = invoke("prune", "--older-than", "0s", "--dry-run")
    assert dry.exit_code == 0 and dry.output.splitlines() == ["would delete old-done"]
    assert invoke("prune", "--older-than", "0").output.splitlines() == ["deleted old-done"]
    assert [line.split(":")[0] for line in invoke("runs").output.splitlines()] == ["old-busy"]
    assert invoke("prune", "--older-than", "soon").exit_code == 2


@pytest.mark.parametrize("command", ["status", "wait", "results"])
def test_unknown_run_is_a_clear_error(env, command):
    result = invoke(command, "no-such-run")
    assert result.exit_code != 0
    assert "no run named 'no-such-run'" in result.output and "deepqueue runs lists them" in result.output
    assert "Traceback" not in result.output


def test_an_unknown_run_close_to_a_known_one_is_named(env, tmp_path):
    submitted_run(tmp_path, "foxes-v1", ["a"])
    result = invoke("status", "foxes-v2")
    assert result.exit_code == 2 and "did you mean 'foxes-v1'?" in result.output, result.output


def test_runs_says_when_there_is_none(env):
    assert invoke("runs").output == "no runs yet: submit one with deepqueue submit FILE\n"
    assert invoke("runs", "--json").output == ""


def test_results_come_in_index_order_across_temporary_files(env, tmp_path, monkeypatch):
    """More jobs than one temporary file holds: the order still runs across them."""
    monkeypatch.setattr("producer.run.RESULTS_SPAN", 7)
    submitted_run(tmp_path, "many", [f"p{i}" for i in range(40)])
    lines = [json.loads(line) for line in invoke("results", "many").output.splitlines()]
    assert [record["index"] for record in lines] == list(range(40))
    assert [record["prompt"] for record in lines] == [f"p{i}" for i in range(40)]


def test_a_submit_refused_by_validation_names_no_new_run(env, tmp_path):
    result = invoke("submit", str(prompt_file(tmp_path, "bad.jsonl", '{"prompt": "x", "width": 500}\n')))
    assert result.exit_code == 2 and "a new name" not in result.output and "multiple of 8" in result.output
    fine = invoke("submit", str(prompt_file(tmp_path, "good.txt", "a cat\n")))
    assert fine.exit_code == 0 and "(a new name: pass --run" in fine.output


def test_results_one_json_line_per_job_and_state_filter(env, tmp_path, store):
    submitted_run(tmp_path, "res", ["a", "b", "c"])
    ids = [job.job_id for job in jobs_on_queue(env[0])]
    store.mark("res", ids[0], DONE, key="res/a.png")
    store.mark("res", ids[1], FAILED, reason="too dark")

    result = invoke("results", "res")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [record["index"] for record in lines] == [0, 1, 2]  # by index, whatever order Redis keeps
    records = {record["job_id"]: record for record in lines}
    assert set(records) == set(ids)
    # every prompt, from the jobs the submit kept in the run's storage
    done = {"index": 0, "job_id": ids[0], "state": "done", "prompt": "a", "key": "res/a.png", "reason": None}
    assert records[ids[0]] == done
    failed = {"index": 1, "job_id": ids[1], "state": "failed", "prompt": "b", "key": None, "reason": "too dark"}
    assert records[ids[1]] == failed
    assert records[ids[2]]["state"] == "queued" and records[ids[2]]["prompt"] == "c"

    failed = invoke("results", "res", "--state", "failed")
    assert failed.exit_code == 0
    assert [json.loads(line)["job_id"] for line in failed.output.splitlines()] == [ids[1]]
    assert invoke("results", "res", "--state", "bogus").exit_code == 2


def test_wait_exits_1_and_prints_the_reason_when_a_job_failed(env, tmp_path, store):
    submitted_run(tmp_path, "w", ["a", "b"])
    ids = [job.job_id for job in jobs_on_queue(env[0])]
    store.mark("w", ids[0], DONE, key="k")
    store.mark("w", ids[1], FAILED, reason="CUDA out of memory")
    result = invoke("wait", "w")
    assert result.exit_code == 1
    assert f"run w finished: 1 images, 1 failed; files in {tmp_path}/storage/w/images/" in result.stdout
    assert f"failed {ids[1]}: CUDA out of memory" in result.stderr


def test_wait_exits_0_when_every_job_is_done(env, tmp_path, store):
    submitted_run(tmp_path, "ok", ["a", "b"])
    for job in jobs_on_queue(env[0]):
        store.mark("ok", job.job_id, DONE, key="k")
    result = invoke("wait", "ok", "--timeout", "5")
    assert result.exit_code == 0, result.output
    assert f"run ok finished: 2 images, 0 failed; files in {tmp_path}/storage/ok/images/" in result.output
    assert "\nfailed " not in "\n" + result.stderr  # no failed job listed


def test_wait_timeout(env, tmp_path):
    submitted_run(tmp_path, "slow", ["a"])
    result = invoke("wait", "slow", "--timeout", "0.01")
    assert result.exit_code == 4
    assert "run slow not finished after 0.01 s" in result.output


def live_worker(broker_url: str, name: str, queue: str) -> None:
    """A worker renewing its leases, as its lease thread records it."""
    broker = redis.Redis.from_url(broker_url)
    broker.hset(WORKERS_KEY, name, time.time())
    broker.hset(WORKER_QUEUES_KEY, name, queue)


def test_wait_says_when_no_worker_serves_the_queue(env, tmp_path):
    submitted_run(tmp_path, "unserved", ["a"])
    result = invoke("wait", "unserved", "--timeout", "0.01")
    assert "no worker of queue 'deepqueue' has renewed its leases in the last 60 s" in result.stderr
    assert "or the run will not progress" in result.stderr
    live_worker(env[0], "xl@host:1", "deepqueue.sdxl")  # another model's worker does not serve it
    assert "no worker" in invoke("wait", "unserved", "--timeout", "0.01").stderr
    live_worker(env[0], "gpu0@host:1", "deepqueue")
    assert "no worker" not in invoke("wait", "unserved", "--timeout", "0.01").stderr
    prompts = str(prompt_file(tmp_path, "xl.txt", "an owl\n"))
    assert invoke("submit", prompts, "--run", "xl", "--model", "sdxl").exit_code == 0
    assert "no worker" not in invoke("wait", "xl", "--timeout", "0.01").stderr  # its model's worker lives


def test_submit_to_a_model_says_when_no_worker_serves_it(env, tmp_path):
    broker = redis.Redis.from_url(env[0])
    prompts = str(prompt_file(tmp_path, "p.txt", "a fox\nan owl\n"))
    result = invoke("submit", prompts, "--run", "for-sdxl", "--model", "sdxl", "--steps", "4")
    assert result.exit_code == 0, result.output
    assert "no worker serves model 'sdxl' (queue 'deepqueue.sdxl') now" in result.stderr
    assert "DEEPQUEUE_MODEL_ALIAS=sdxl" in result.stderr
    assert (len(queued_jobs(broker, "deepqueue.sdxl")), broker.llen("deepqueue")) == (2, 0)
    broker.hset(WORKERS_KEY, "sd@host:1", time.time())  # a live worker, but of another model
    broker.hset(WORKER_QUEUES_KEY, "sd@host:1", "deepqueue.sd")
    assert "no worker serves" in invoke("submit", prompts, "--run", "for-sdxl-2", "--model", "sdxl").stderr
    broker.hset(WORKERS_KEY, "sdxl@host:1", time.time())
    broker.hset(WORKER_QUEUES_KEY, "sdxl@host:1", "deepqueue.sdxl")
    assert "no worker" not in invoke("submit", prompts, "--run", "for-sdxl-3", "--model", "sdxl").stderr
    refused = invoke("submit", prompts, "--run", "for-sdxl", "--model", "sd", "--steps", "4")
    assert refused.exit_code == 2 and "model='sdxl'" in refused.output  # a run keeps its model


def test_submit_with_an_empty_run_name_is_refused(env, tmp_path):
    """``--run "$RUN"`` with RUN unset: exit 2 and nothing sent, not a new random run."""
    result = invoke("submit", str(prompt_file(tmp_path, "p.txt", "a fox\n")), "--run", "")
    assert result.exit_code == 2, result.output
    assert "run_id" in result.output and "got ''" in result.output
    assert jobs_on_queue(env[0]) == []


@pytest.mark.parametrize("broker_up", [False, True])
def test_unreachable_redis_is_one_line_and_exit_3(redis_urls, monkeypatch, tmp_path, broker_up):
    """Redis down (a closed port): one line naming the settings to check, exit code 3."""
    closed = f"redis://127.0.0.1:{free_port()}"
    monkeypatch.setenv("DEEPQUEUE_BROKER_URL", redis_urls[0] if broker_up else f"{closed}/0")
    monkeypatch.setenv("DEEPQUEUE_RESULT_BACKEND", f"{closed}/1")
    for args in (["submit", str(prompt_file(tmp_path, "p.txt", "a fox\n")), "--run", "down"], ["status", "down"]):
        result = invoke(*args)
        assert result.exit_code == 3, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "cannot reach Redis" in errors[0] and "DEEPQUEUE_RESULT_BACKEND" in errors[0]
        assert "Traceback" not in result.output


def test_ctrl_c_exits_130(env, tmp_path, monkeypatch):
    """Interruption has its own code (faked: Client.submit raising KeyboardInterrupt, as Ctrl-C would)."""
    from producer import client as client_module

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(client_module.Client, "submit", interrupted)
    result = invoke("submit", str(prompt_file(tmp_path, "p.txt", "a fox\n")))
    assert result.exit_code == 130 and "interrupted" in result.output


def test_submit_again_with_other_recipe_flags_is_refused_unless_allowed(env, tmp_path, store):
    """``--steps 6`` after ``--steps 5`` used to add a second set of jobs (24 + 24) to the run."""
    path = prompt_file(tmp_path, "p.txt", "a koi\na carp\n")
    assert invoke("submit", str(path), "--run", "koi", "--steps", "5").exit_code == 0
    refused = invoke("submit", str(path), "--run", "koi", "--steps", "6")
    assert refused.exit_code == 2
    assert refused.output == (
        "Error: run 'koi' was submitted with steps=5; this submit has steps=6: use another run name, or pass the "
        "same settings, or allow_recipe_change=True (--allow-recipe-change) to add these jobs to the run as well; "
        "nothing was enqueued\n"
    )
    assert len(jobs_on_queue(env[0])) == 2
    resumed = invoke("submit", str(path), "--run", "koi", "--steps", "5")
    assert "0 jobs enqueued, 2 already queued" in resumed.output
    allowed = invoke("submit", str(path), "--run", "koi", "--steps", "6", "--allow-recipe-change")
    assert allowed.exit_code == 0 and "2 jobs enqueued, 0 already queued" in allowed.output
    assert store.counts("koi")[QUEUED] == 4


def test_submit_again_without_the_first_flags_is_refused_naming_them(env, tmp_path):
    """Leaving a flag out means its default, which is a different recipe: say which values differ."""
    path = prompt_file(tmp_path, "p.txt", "a koi\n")
    assert invoke("submit", str(path), "--run", "koi", "--size", "64x64", "--seed", "3").exit_code == 0
    refused = invoke("submit", str(path), "--run", "koi")
    assert refused.exit_code == 2
    assert "was submitted with height=64, seed=3, width=64; this submit has height=512, seed=" in refused.output
    assert ", width=512: " in refused.output


def test_retry_resends_a_lost_queue_without_the_prompt_file(env, tmp_path):

    submitted_run(tmp_path, "relost", ["a fox", "a heron"])
    lose_queue(env[0])  # the queue is lost
    result = invoke("retry", "relost")
    assert result.exit_code == 0, result.output
    assert "run relost: 2 jobs sent again" in result.output
    assert sorted(job.prompt for job in jobs_on_queue(env[0])) == ["a fox", "a heron"]


def test_retry_of_an_unknown_run_is_bad_input(env):
    result = invoke("retry", "never-submitted")
    assert result.exit_code == 2 and "no run named 'never-submitted'" in result.output


def test_dead_letters_lists_what_workers_dropped_newest_first(env):
    import json

    import redis

    from producer.layout import DEAD_LETTERS_KEY

    broker = redis.Redis.from_url(env[0])
    for task_id in ("older", "newer"):
        broker.lpush(DEAD_LETTERS_KEY, json.dumps({"task_id": task_id, "reason": "not JSON", "body": "{x"}))
    result = invoke("dead-letters")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["task_id"] for line in result.output.splitlines()] == ["newer", "older"]


@pytest.mark.parametrize(
    "command",
    [
        ("delete", "gone-store", "--force", "--outputs"),
        ("prune", "--older-than", "0", "--outputs"),
        ("audit", "gone-store", "--sample", "1", "--timeout", "5"),
        ("manifest", "gone-store"),
        ("export", "gone-store", "--format", "parquet"),
    ],
    ids=lambda command: command[0],
)
def test_storage_down_is_one_line_and_exit_5(env, tmp_path, store, monkeypatch, command):
    """The run's S3 endpoint refuses connections (nothing listens on its port, a real fault):
    every command that reads or deletes the run's files says so in one line, exit code 5."""
    submitted_run(tmp_path, "gone-store", ["a"])
    store.mark("gone-store", jobs_on_queue(env[0])[0].job_id, DONE, key="gone-store/images/a.png")
    monkeypatch.setenv("DEEPQUEUE_STORAGE", "s3")
    monkeypatch.setenv("DEEPQUEUE_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    result = invoke(*command)
    assert result.exit_code == 5, result.output
    [line] = result.output.strip().splitlines()[-1:]
    assert line.startswith("Error: storage: ") and "check DEEPQUEUE_STORAGE" in line, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("wait", "x", "--timeout", "-5"), "-5"),
        (("dead-letters", "--limit", "-5"), "-5"),
        (("dead-letters", "--limit", "0"), "0"),
    ],
)
def test_negative_counts_and_timeouts_are_refused_before_anything_runs(env, args, message):
    result = invoke(*args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_a_broker_url_that_is_no_redis_url_is_a_setting_error(env, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPQUEUE_BROKER_URL", "notaurl")
    result = invoke("submit", str(prompt_file(tmp_path, "p.txt", "a\n")), "--run", "bad-url")
    assert result.exit_code == 2, result.output
    assert "DEEPQUEUE_BROKER_URL: must be a Redis URL" in result.output and "Traceback" not in result.output
