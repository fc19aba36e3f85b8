"""`deepqueue worker` and `deepqueue run` share their model and batching flags, and refuse what
they cannot serve with the README's exit codes, before anything starts. (A worker that the flags
start is in tests/integration/test_startup.py.)"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from producer.cli import cli

SHARED = ("--model", "--device", "--max-batch")
CACHE = ("--scheduler", "--cache-interval", "--cache-branch")


def test_worker_help_shows_the_flags_it_takes_over_the_environment():
    result = CliRunner().invoke(cli, ["worker", "--help"])
    assert result.exit_code == 0, result.output
    for flag in (*SHARED, "--max-wait-s", *CACHE):
        assert flag in result.output
    assert "DEEPQUEUE_MAX_BATCH" in result.output and "DEEPQUEUE_STARTUP_RETRY_S" in result.output


def test_run_has_the_same_model_and_batching_flags():
    result = CliRunner().invoke(cli, ["run", "--help"])
    assert result.exit_code == 0, result.output
    for flag in (*SHARED, *CACHE):
        assert flag in result.output


def test_a_bad_flag_value_is_bad_input(monkeypatch):
    monkeypatch.setenv("DEEPQUEUE_MAX_BATCH", "8")
    result = CliRunner().invoke(cli, ["worker", "--max-batch", "0"])
    assert result.exit_code == 2, result.output
    assert "DEEPQUEUE_MAX_BATCH: Input should be greater than or equal to 1, got 0" in result.output


@pytest.mark.parametrize(("command", "code"), [("worker", 70), ("run", 2)])
def test_a_model_that_is_not_there(command, code, tmp_path):
    """70: a worker that cannot serve; 2: `run`'s --model is bad input (1 would mean a job failed)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n")
    args = ["worker"] if command == "worker" else ["run", str(prompts), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, [*args, "--model", str(tmp_path / "nothing")])
    assert result.exit_code == code, result.output
    assert "cannot read model" in result.output and "--model or DEEPQUEUE_MODEL" in result.output
