"""Every command and snippet of the README, run as written on the stack `make services` starts
(issue 14): the tour of every command, the console transcript, the Python client example (its
Redis URLs pointed at the stack: only the ports change), the export-loading snippet on a run that
mixes png, webp and jpeg, the runs sharing the workers, and `make demo`. The blocks not run here say why in NOT_RUN.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()

#: Code blocks this test does not run, by section, and where they are checked instead.
NOT_RUN = {
    "Scaling with docker compose": "no Docker engine here: tests/ops/test_compose.py validates the compose files "
    "and runs ops/compose/gpus.py as these lines do",
    "Completion webhooks": "needs a receiver: tests/integration/test_notify_workers.py submits with notify to one, "
    "and tests/producer/test_notify.py runs the verification snippet as written on a signed body",
    "Development": "the suite's own commands (make test-quick, pytest on one file): CI runs make test, whose "
    "tests include every one these select",
}


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    section: str


def blocks(text: str = README) -> list[Block]:
    """The README's fenced code blocks with a language, and the ``##`` section each is in."""
    found, section = [], ""
    for match in re.finditer(r"^## ([^\n]+)$|^```(\w+)\n(.*?)^```$", text, flags=re.M | re.S):
        if match.group(1):
            section = match.group(1)
        else:
            found.append(Block(match.group(2), match.group(3), section))
    return found


def one(language: str, section: str, containing: str = "") -> str:
    """The code of the one block of ``language`` in the section that begins ``section``."""
    [code] = [
        block.code
        for block in blocks()
        if block.language == language and block.section.startswith(section) and containing in block.code
    ]
    return code


def recipe(target: str) -> list[str]:
    """The commands of a Makefile target."""
    lines = (ROOT / "Makefile").read_text().split(f"\n{target}:", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    return [line.strip() for line in lines if line.startswith("\t")]


def shell_env() -> dict[str, str]:
    """A user's shell: none of this process's DEEPQUEUE_* settings, the project's commands on PATH."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("DEEPQUEUE_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def workspace(tiny_model, tmp_path_factory) -> Iterator[tuple[Path, dict[str, str]]]:
    """A checkout's view (examples/) with `make services` running in it: (folder, its exports)."""
    assert recipe("services") == ["$(PY) -m ops.services"]
    folder = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "examples", folder / "examples")
    (folder / "models").mkdir()
    (folder / "models" / "tiny").symlink_to(tiny_model)  # what `make services` builds in a checkout
    env = {**shell_env(), "DEEPQUEUE_MODEL": str(tiny_model), "DEEPQUEUE_DEVICE": "cpu"}
    command = [sys.executable, "-m", "ops.services", "--data-dir", str(folder / ".local-stack")]
    services = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    exports: dict[str, str] = {}
    for line in services.stdout:
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").strip().partition("=")
            exports[name] = value
        elif exports and not line.strip():
            break
    assert exports, "make services ended before it was ready"
    try:
        yield folder, exports
    finally:
        services.terminate()
        services.wait(timeout=120)


def bash(code: str, folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", code], cwd=folder, env=shell_env(), capture_output=True, text=True
    )


def test_every_command_of_the_table_runs_in_a_block():
    table = re.findall(r"^\| `deepqueue ([a-z-]+)", README.split("## Command line", 1)[1], flags=re.M)
    run = "\n".join(block.code for block in blocks() if block.language in ("bash", "console"))
    missing = [command for command in table if f"deepqueue {command}" not in run and command != "worker"]
    assert table and not missing, f"README commands no block runs: {missing}"
    assert recipe("services") == ["$(PY) -m ops.services"]  # and ops.services runs `deepqueue worker`


def test_the_tour_and_the_export_snippet_run_as_written(workspace):
    folder, _ = workspace
    tour = bash(one("bash", "Trying it", "source .local-stack/env"), folder)
    assert tour.returncode == 0, tour.stdout[-3000:] + tour.stderr[-3000:]
    assert "run tour finished: 24 images, 0 failed" in tour.stdout, tour.stdout
    assert "audit of tour" in tour.stdout and "would delete" not in tour.stdout
    formats = {Path(key).suffix for key in re.findall(r'"key": "([^"]+)"', tour.stdout)}
    assert formats == {".png", ".webp", ".jpg"}, formats
    snippet = subprocess.run(
        [sys.executable, "-c", one("python", "Outputs")],
        cwd=folder,
        env=shell_env(),
        capture_output=True,
        text=True,
    )
    assert snippet.returncode == 0, snippet.stderr[-3000:]


def test_the_several_runs_block_runs_as_written(workspace):
    folder, _ = workspace
    result = bash(one("bash", "Several runs at once"), folder)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "run faces: priority normal, weight 1\n" in result.stdout
    assert "; priority normal, weight 1\n" in result.stdout  # deepqueue status faces
    assert "run later finished: 24 images, 0 failed" in result.stdout, result.stdout


def test_the_dataset_walkthrough_runs_as_written(workspace):
    folder, _ = workspace
    result = bash(one("bash", "Building a dataset"), folder)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "run foxes-ds finished: 16 images, 0 failed" in result.stdout, result.stdout
    assert "run foxes-ds: 0 jobs enqueued, 16 already queued, running or done" in result.stdout, result.stdout
    snippet = subprocess.run(
        [sys.executable, "-c", one("python", "Building a dataset")],
        cwd=folder,
        env=shell_env(),
        capture_output=True,
        text=True,
    )
    assert snippet.returncode == 0, snippet.stderr[-3000:]
    first, second = snippet.stdout.splitlines()
    assert re.match(r"16 images, \d+ white: a white (fox|heron) at \w+, .+ \(64, 64\)$", first), first
    assert re.match(r"1[0-6] kept; CLIP scores [\d.]+ to [\d.]+ ; pHash [0-9a-f]{16}$", second), second


def test_the_lora_block_runs_as_written(workspace):
    folder, _ = workspace
    result = bash(one("bash", "LoRA adapters"), folder)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "run inked finished: 24 images, 0 failed" in result.stdout, result.stdout


def test_the_console_transcript_runs_as_written(workspace):
    folder, _ = workspace
    commands = [
        line.removeprefix("$ ") for line in one("console", "Choosing DeepCache").splitlines() if line[:2] == "$ "
    ]
    result = bash(f"source .local-stack/env\n{chr(10).join(commands)}\n", folder)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"audit of run-\S+ \(DeepCache interval 3, branch 0\): 4 of 4 images compared", result.stdout)


def test_the_python_client_example_runs_as_written(workspace):
    folder, exports = workspace
    code = one("python", "Python client")
    urls = '"redis://localhost:6379/0", "redis://localhost:6379/1"'
    assert urls in code
    code = code.replace(urls, f'"{exports["DEEPQUEUE_BROKER_URL"]}", "{exports["DEEPQUEUE_RESULT_BACKEND"]}"')
    # after `source .local-stack/env`, as the tour says: the storage settings come from there
    env = {**shell_env(), **exports}
    result = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.splitlines()
    assert any(
        line.startswith("foxes-v1: 2 jobs (queued 0, running 0, done 2, failed 0, cancelled 0)") for line in printed
    )
    done = [line.split() for line in printed if line.startswith("0000")]
    assert len(done) == 2 and all(state == "done" and key.startswith("s3://") for _, state, key in done)


def test_make_demo_runs_as_written(tiny_model, tmp_path):
    """`make demo` is `make venv` (done: this suite runs in it) and then ops.demo."""
    assert "make demo" in one("bash", "The two commands") and recipe("demo") == ["$(PY) -m ops.demo"]
    assert "make services" in one("bash", "Trying it", "terminal 1")  # run by the workspace fixture
    env = {**shell_env(), "DEEPQUEUE_MODEL": str(tiny_model), "DEEPQUEUE_DEVICE": "cpu"}
    out = tmp_path / "demo-out"
    result = subprocess.run(
        [sys.executable, "-m", "ops.demo", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "24 images + sidecars copied from S3" in result.stdout and "batches:  3 of 8" in result.stdout


def test_no_block_is_left_out_unexplained():
    """Every block with a language is run above, or named in NOT_RUN with the reason."""
    ran = {("bash", "The two commands"), ("bash", "Trying it"), ("console", "Choosing DeepCache")}
    ran |= {("bash", "Several runs"), ("python", "Python client"), ("python", "Outputs")}
    ran |= {("bash", "Building a dataset"), ("python", "Building a dataset"), ("bash", "LoRA adapters")}
    for block in blocks():
        if block.language in ("text", "diff"):
            continue
        covered = any(block.language == lang and block.section.startswith(prefix) for lang, prefix in ran)
        assert covered or block.section in NOT_RUN, f"a {block.language} block in {block.section!r} is not run"
