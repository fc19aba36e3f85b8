"""worker.pipeline.model: what the worker's main process learns about a model without torch or diffusers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from worker.pipeline.model import ModelError, check_pipeline_class, read_model_index

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_read_model_index_of_a_local_model(tiny_model: Path) -> None:
    index = read_model_index(str(tiny_model))
    assert check_pipeline_class(str(tiny_model), index) == "StableDiffusionPipeline"


def test_a_missing_or_broken_model_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read model"):
        read_model_index(str(tmp_path))  # a folder without model_index.json
    (tmp_path / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="not a JSON object"):
        read_model_index(str(tmp_path))
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelError, match="JSONDecodeError"):
        read_model_index(str(tmp_path))


@pytest.mark.parametrize(
    ("name", "served_as"),
    [
        ("StableDiffusionPipeline", "StableDiffusionPipeline"),
        ("StableDiffusionXLPipeline", "StableDiffusionXLPipeline"),
        ("StableDiffusionImg2ImgPipeline", "StableDiffusionPipeline"),
        ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLPipeline"),
    ],
)
def test_served_pipeline_classes(name: str, served_as: str) -> None:
    assert check_pipeline_class("m", {"_class_name": name}) == served_as


@pytest.mark.parametrize("index", [{"_class_name": "FluxPipeline"}, {"_class_name": "StableDiffusion3Pipeline"}, {}])
def test_other_pipelines_are_refused_with_what_is_served(index: dict) -> None:
    with pytest.raises(ModelError, match="deepqueue serves StableDiffusionPipeline and StableDiffusionXLPipeline"):
        check_pipeline_class("some/model", index)


def test_worker_main_process_code_imports_no_torch(tiny_model: Path, tmp_path: Path) -> None:
    """What runs in a worker's main process (CLI, app, strategy, start-up checks) must not import
    torch or diffusers: a forked pool process could not use CUDA afterwards."""
    code = textwrap.dedent(
        f"""
        import sys
        from producer.cli import cli
        from worker.cli import _settings, check_model
        from worker.app import create_app
        import worker.delivery.strategy, worker.readiness, worker.runtime
        import worker.pipeline.executor, worker.pipeline.engine

        settings = _settings(model={str(tiny_model)!r}, device="cpu")
        check_model(settings)
        app = create_app(settings)
        app.loader.import_default_modules()
        assert worker.readiness.fork_unsafe_imports() == [], worker.readiness.fork_unsafe_imports()
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok"


def test_fork_unsafe_imports_names_what_is_loaded() -> None:
    from worker.readiness import fork_unsafe_imports

    assert fork_unsafe_imports({"torch": object(), "json": object()}) == ["torch"]
    assert fork_unsafe_imports({"diffusers": object(), "transformers": object()}) == ["diffusers", "transformers"]
    assert fork_unsafe_imports({}) == []
