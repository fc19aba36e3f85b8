"""`deepqueue run` (embedded mode) and `deepqueue make-test-model` through the real CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from producer.cli import cli  # noqa: E402


def test_run_writes_images_and_sidecars_and_a_summary(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na red fox\na blue heron\n\nan old lighthouse\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        ["run", str(prompts), "--out", str(out), "--model", str(tiny_model), "--device", "cpu",
         "--size", "64x64", "--steps", "4", "--run", "cli-embedded", "--format", "webp"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "3 images in 1 batches (1 of 3)" in result.output
    images = sorted((out / "cli-embedded" / "images").glob("*.webp"))
    sidecars = sorted((out / "cli-embedded" / "images").glob("*.json"))
    assert len(images) == len(sidecars) == 3
    assert [json.loads(path.read_text())["prompt"] for path in sidecars] == [
        "a red fox",
        "a blue heron",
        "an old lighthouse",
    ]

    again = CliRunner().invoke(
        cli, ["run", str(prompts), "--out", str(out), "--model", str(tiny_model), "--device", "cpu",
              "--size", "64x64", "--steps", "4", "--run", "cli-embedded", "--format", "webp"],
    )  # fmt: skip
    assert again.exit_code == 0 and "skipped 3 jobs already in" in again.output


def test_run_refuses_bad_flags_and_missing_models_clearly(tiny_model, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n")
    bad_steps = CliRunner().invoke(
        cli, ["run", str(prompts), "--out", str(tmp_path), "--model", str(tiny_model), "--steps", "0"]
    )
    assert bad_steps.exit_code == 2 and "run defaults: steps" in bad_steps.output
    no_model = CliRunner().invoke(cli, ["run", str(prompts), "--out", str(tmp_path), "--model", str(tmp_path / "nope")])
    assert no_model.exit_code != 0 and "make-test-model" in no_model.output


def test_make_test_model_refuses_to_overwrite(tiny_model):
    result = CliRunner().invoke(cli, ["make-test-model", str(tiny_model)])
    assert result.exit_code == 2 and "model_index.json" in result.output


def test_run_a_template_records_it_and_its_variables_with_each_image(tiny_model, tmp_path):
    wildcards = tmp_path / "wildcards"
    wildcards.mkdir()
    (wildcards / "times.txt").write_text("dawn\nnight\n")
    out = tmp_path / "out"
    template = "a {red|blue} fox at __times__"
    result = CliRunner().invoke(
        cli,
        ["run", "--template", template, "--wildcards", str(wildcards), "--out", str(out), "--model", str(tiny_model),
         "--device", "cpu", "--size", "64x64", "--steps", "2", "--run", "templated"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    sidecars = [json.loads(path.read_text()) for path in sorted((out / "templated" / "images").glob("*.json"))]
    assert [(s["prompt"], s["template"], s["variables"]) for s in sidecars] == [
        ("a red fox at dawn", template, {"v1": "red", "times": "dawn"}),
        ("a red fox at night", template, {"v1": "red", "times": "night"}),
        ("a blue fox at dawn", template, {"v1": "blue", "times": "dawn"}),
        ("a blue fox at night", template, {"v1": "blue", "times": "night"}),
    ]
