"""LoRA adapters in the job contract (issue 18, item 3): validation with clear errors, job ids of
runs without LoRA unchanged, and the adapter set in the shape, the message and the manifest (the
batch key: tests/worker/test_lora.py)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from producer.audit import twin_row
from producer.cli import cli
from producer.cli_options import recipe_defaults
from producer.entries import entries_of, make_jobs
from producer.errors import InvalidJobError
from producer.job import Job, JobDefaults, run_defaults, run_recipe, shape
from producer.loras import MAX_LORAS, LoraSpec, parse_lora
from producer.manifest_schema import COLUMNS, arrow_schema, flatten
from producer.message import unpack
from producer.packing import grouped_by_shape, pack, prompt_batches


def job(index: int = 0, **fields) -> Job:
    return Job(run_id="loras", index=index, prompt="a red fox", seed=7, **fields)


def problems(**fields) -> list[str]:
    with pytest.raises(InvalidJobError) as info:
        run_defaults(fields)
    return [message for _, message in info.value.problems]


# --- the field: forms it takes ------------------------------------------------------------------


def test_every_form_gives_the_same_adapters():
    expected = (LoraSpec(id="owner/style", scale=0.5), LoraSpec(id="/models/ink.safetensors", scale=1.0))
    forms = [
        ["owner/style:0.5", "/models/ink.safetensors"],
        "owner/style:0.5,/models/ink.safetensors",  # a prompt file's cell
        [{"id": "owner/style", "scale": 0.5}, {"id": "/models/ink.safetensors"}],
        list(expected),
    ]
    for form in forms:
        assert job(loras=form).loras == expected, form


def test_parse_lora():
    assert parse_lora("a/b") == {"id": "a/b"}
    assert parse_lora(" ./loras/x:-1.5 ") == {"id": "./loras/x", "scale": -1.5}
    assert str(LoraSpec(id="a/b", scale=0.25)) == "a/b:0.25"


def test_no_adapters_is_the_base_model():
    assert job(loras=[]).loras is None and job(loras="").loras is None and job().loras is None


# --- validation: field, value and rule ----------------------------------------------------------


@pytest.mark.parametrize(
    ("loras", "expected"),
    [
        (["a b"], "loras: LoRA 'a b': ID[:SCALE] with ID a Hub id or path of 1 to 256 letters"),
        (["a:b:1"], "loras: LoRA 'a:b:1': ID[:SCALE]"),
        (["owner/x:strong"], "loras: LoRA 'owner/x:strong': the scale after ':' must be a number"),
        (["owner/x:4.5"], "loras.0.scale: Input should be less than or equal to 4, got 4.5"),
        ([{"id": "x", "scale": -5}], "loras.0.scale: Input should be greater than or equal to -4, got -5"),
        (["x:nan"], "loras.0.scale: Input should be a finite number"),
        (["a", "b", "c", "d", "e"], f"loras: at most {MAX_LORAS} LoRAs per job, 5 given"),
        (["a:0.5", "b", "a:1"], "loras: each LoRA at most once, with one scale: a given twice"),
        ([{"id": "a", "weight": 1}], "loras.0.weight: Extra inputs are not permitted"),
        ([{"id": "x" * 257}], "loras.0.id: String should have at most 256 characters"),
        (7, "loras: Input should be a valid tuple"),
    ],
)
def test_bad_loras_are_refused_with_field_value_and_rule(loras, expected):
    [message] = problems(loras=loras)
    assert message.startswith(expected), message


def test_a_bad_lora_in_a_row_names_the_row():
    with pytest.raises(InvalidJobError) as info:
        make_jobs(
            [("line 1", {"prompt": "ok"}), ("line 2", {"prompt": "x", "loras": "a:9"})],
            run_id="r",
            defaults=JobDefaults(),
        )
    [(where, message)] = info.value.problems
    assert where == "job 1 (line 2)" and message.startswith("loras.0.scale: Input should be less than or equal to 4")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--lora", "a/x:9"], "run defaults: loras.0.scale: Input should be less than or equal to 4"),
        (["--lora", "has space"], "run defaults: loras: LoRA 'has space': ID[:SCALE]"),
        ("--lora a --lora b --lora c --lora d --lora e".split(), "at most 4 LoRAs per job, 5 given"),
    ],
)
def test_submit_refuses_bad_lora_flags_before_sending_anything(tmp_path, flags, expected):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    result = CliRunner().invoke(cli, ["submit", str(prompts), *flags])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "nothing was enqueued" in result.output, result.output


def test_the_cli_flag_becomes_the_field():
    flags = {"size": None, "negative": None, "fmt": None, "steps": None}
    assert recipe_defaults(**flags) == {}
    assert recipe_defaults(**flags, lora=("a/b:0.5", "/c")) == {"loras": ["a/b:0.5", "/c"]}
    assert run_defaults(recipe_defaults(**flags, lora=("a/b:0.5",))).loras == (LoraSpec(id="a/b", scale=0.5),)


# --- job ids ------------------------------------------------------------------------------------


def test_job_ids_without_lora_are_unchanged():
    """Ids computed by deepqueue before jobs had a loras field (7c34d82)."""
    assert Job(run_id="golden", index=7, prompt="a red fox", seed=42).job_id == "00000007-6a1ddb8ad622"
    fields = dict(model="sdxl", negative_prompt="blur", steps=30, scheduler="euler", cache_interval=2, width=768)
    named = Job(run_id="golden", index=3, prompt="a koi", seed=9, format="webp", **fields)
    assert named.job_id == "00000003-7f5c83361e55"
    defaults = run_defaults({"steps": 12, "width": 256})
    rows = [("a", {"prompt": "x"}), ("b", {"prompt": "y", "seed": 5})]
    ids = [made.job_id for made in make_jobs(rows, run_id="golden-run", defaults=defaults, run_seed=11)]
    assert ids == ["00000000-7e4ff2c14c1e", "00000001-3ad2c10d0710"]
    assert "loras" not in run_recipe(defaults, run_id="golden-run", run_seed=11)
    assert "loras" not in named.recipe()


def test_an_empty_adapter_list_is_the_same_job_and_adapters_make_another():
    base = job()
    assert job(loras=[]).job_id == base.job_id
    styled = job(loras=["a/b"])
    assert styled.job_id != base.job_id
    assert styled.recipe()["loras"] == ({"id": "a/b", "scale": 1.0},)
    assert job(loras=["a/b:0.5"]).job_id != styled.job_id  # the scale decides the pixels too
    assert job(loras=["a/b", "c/d"]).job_id != job(loras=["c/d", "a/b"]).job_id
    recipe = run_recipe(run_defaults({"loras": ["a/b:0.5"]}), run_id="r", run_seed=1)
    assert recipe["loras"] == [{"id": "a/b", "scale": 0.5}]


# --- shape, message, manifest ------------------------------------------------------------------


def test_the_shape_separates_adapter_sets():
    jobs = [job(), job(loras=["a/x"]), job(loras=["a/x:0.5"]), job(loras=["a/x", "b/y"]), job(loras=["b/y", "a/x"])]
    assert len({shape(item) for item in jobs}) == 5
    assert shape(job(1, loras="a/x:1")) == shape(jobs[1])


def test_the_producer_sends_each_adapter_set_apart():
    jobs = [job(i, loras=["a/x"] if i % 2 else None) for i in range(6)]
    grouped = grouped_by_shape(entries_of(jobs))
    assert [item.own["index"] for item in grouped] == [0, 2, 4, 1, 3, 5]
    batches = list(prompt_batches(grouped, 8))
    assert [[item.own["index"] for item in batch] for batch in batches] == [[0, 2, 4], [1, 3, 5]]
    payload = pack(batches[1])
    assert payload["loras"] == [{"id": "a/x", "scale": 1.0}]  # shared: sent once per prompt batch
    assert "loras" not in pack(batches[0])  # unset: not sent at all
    assert [Job.model_validate(fields) for fields in unpack(payload)] == [jobs[1], jobs[3], jobs[5]]


def test_the_manifest_has_a_loras_column():
    names = [name for name, _ in COLUMNS]
    assert "loras" in names and names[-1] == "sidecar"
    assert arrow_schema().field("loras").type == "string"
    loras = [{"id": "a/x", "scale": 0.5, "sha256": "ab" * 32}]
    row = {"job_id": "j", "loras": loras}
    assert json.loads(flatten(row)["loras"]) == loras
    assert flatten({"job_id": "j", "loras": []})["loras"] is None
    assert flatten({"job_id": "j"})["loras"] is None  # sidecars written before LoRA


def test_an_audit_twin_keeps_the_adapters():
    """The uncached twin of an adapter image runs with the same adapters, else the audit would
    compare it against the base model."""
    sidecar = {"prompt": "p", "seed": 1, "height": 64, "width": 64, "steps": 4, "guidance": 7.5, "format": "png"}
    loras = [{"id": "a/x", "scale": 0.5, "sha256": "ab" * 32}]
    twin = twin_row({**sidecar, "loras": loras})
    assert twin["loras"] == [{"id": "a/x", "scale": 0.5}] and twin["cache_interval"] == 1
    assert Job(run_id="r.audit", index=0, **twin).loras == (LoraSpec(id="a/x", scale=0.5),)
    assert "loras" not in twin_row({**sidecar, "loras": []}) and "loras" not in twin_row(sidecar)
