"""The README keeps up with the code: every setting documented, the two commands real."""

from __future__ import annotations

from pathlib import Path

from producer import __all__ as public_names
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_readme():
    missing = [
        f"DEEPQUEUE_{name.upper()}" for name in WorkerSettings.model_fields if f"DEEPQUEUE_{name.upper()}" not in README
    ]
    assert not missing, f"document these in README.md's configuration table: {missing}"


def test_the_two_commands_exist_and_ci_runs_the_test_command():
    makefile = (ROOT / "Makefile").read_text()
    assert "make demo" in README and "make test" in README
    assert "\ndemo:" in makefile and "\ntest:" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_client_example_uses_the_public_surface():
    for name in ("Client", "JobState"):
        assert name in public_names and "from producer import Client, JobState" in README
