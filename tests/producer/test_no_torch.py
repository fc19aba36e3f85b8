"""The producer side never needs torch: it imports without it and the base install leaves it out."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Worker-side packages (heavy, GPU-bound) that importing the producer must not pull in.
WORKER_ONLY = ["torch", "diffusers", "transformers", "DeepCache", "accelerate", "safetensors", "boto3", "PIL", "worker"]


def run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_producer_imports_with_torch_unavailable(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import producer, producer.cli, producer.client, producer.enqueue, producer.state, producer.sources
        from click.testing import CliRunner

        def loaded():
            return sorted(name for name in sys.modules
                          if name.split(".")[0] in {WORKER_ONLY!r} and sys.modules[name] is not None)

        for args in (["--help"], ["submit", "--help"], ["worker", "--help"]):
            result = CliRunner().invoke(producer.cli.cli, args)
            assert result.exit_code == 0, (args, result.output)
            # `worker --help` lists the worker's settings: those modules, and nothing heavy
            allowed = ["worker", "worker.delivery", "worker.delivery.batching", "worker.pipeline",
                       "worker.pipeline.model", "worker.pipeline.scores",
                       "worker.settings"] if args[0] == "worker" else []
            assert loaded() == allowed, (args, loaded())
        print("ok")
        """
    )
    result = run([sys.executable, "-c", code], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok"


def copy_of_repo(destination: Path) -> Path:
    """The repository's files as a clean source tree (setuptools builds in the tree it is given)."""
    ignore = shutil.ignore_patterns(
        ".git",
        ".venv",
        "venv",
        "build",
        "dist",
        "*.egg-info",
        "__pycache__",
        ".pytest_cache",
        ".ruff_cache",
        "models",
        "out",
        "demo-out",
    )
    shutil.copytree(REPO_ROOT, destination, ignore=ignore)
    return destination


@pytest.mark.slow
def test_base_install_has_no_torch_and_runs_the_cli(tmp_path):
    source = copy_of_repo(tmp_path / "src")
    venv = tmp_path / "venv"
    created = run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, timeout=120)
    assert created.returncode == 0, created.stderr
    bin_dir = venv / ("Scripts" if sys.platform == "win32" else "bin")

    installed = run(
        [str(bin_dir / "pip"), "install", "--disable-pip-version-check", str(source)], cwd=tmp_path, timeout=500
    )
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    # cwd is tmp_path, so `import producer` can only resolve to the installed copy.
    where = run(
        [str(bin_dir / "python"), "-c", "import producer, producer.cli; print(producer.__file__)"],
        cwd=tmp_path,
        timeout=60,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv)

    help_text = run([str(bin_dir / "deepqueue"), "--help"], cwd=tmp_path, timeout=60)
    assert help_text.returncode == 0, help_text.stderr
    assert "submit" in help_text.stdout

    for package in ("torch", "diffusers"):
        shown = run([str(bin_dir / "pip"), "show", package], cwd=tmp_path, timeout=60)
        assert shown.returncode != 0, f"the base install pulled in {package}:\n{shown.stdout}"
