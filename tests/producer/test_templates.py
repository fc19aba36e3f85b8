"""Prompt templates and wildcards (producer.templates): expansion, its determinism, its errors,
and a templated run submitted through a real Redis with flat memory and resubmitted as a no-op."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from dynamicprompts.generators import CombinatorialPromptGenerator
from dynamicprompts.wildcards import WildcardManager

from producer import Client
from producer.cli import cli
from producer.errors import InvalidJobError, PromptFileError
from producer.exits import EXIT_BAD_INPUT
from producer.templates import Expansion, expand_rows
from tests.helpers import queued_jobs

TEMPLATE = "a {red|blue|green} {car|bike} at __times__"


@pytest.fixture
def wildcards(tmp_path: Path) -> Path:
    folder = tmp_path / "wildcards"
    (folder / "styles").mkdir(parents=True)
    (folder / "times.txt").write_text("dawn\nnoon\n# a comment\nnight\n")
    (folder / "styles" / "film.txt").write_text("kodak portra\nilford hp5\n")
    return folder


@pytest.fixture
def client(redis_urls):
    with Client(*redis_urls) as client:
        yield client


def expanded(template: str, **expansion) -> list[tuple[str, dict]]:
    return [
        (where, fields) for where, fields in expand_rows([("item 0", {"template": template})], Expansion(**expansion))
    ]


def test_every_combination_in_dynamicprompts_own_order_with_each_part_named(wildcards):
    rows = expanded(TEMPLATE, wildcards=wildcards)
    library = CombinatorialPromptGenerator(WildcardManager(wildcards)).generate(TEMPLATE, max_prompts=None)
    assert [fields["prompt"] for _, fields in rows] == library and len(library) == 3 * 2 * 3
    where, first = rows[0]
    assert where == "item 0, prompt 0"
    assert first == {
        "prompt": "a red car at dawn",
        "template": TEMPLATE,
        "variables": {"v1": "red", "v2": "car", "times": "dawn"},
    }
    for _, fields in rows:  # each recorded value is the one in the prompt
        variables = fields["variables"]
        assert fields["prompt"] == f"a {variables['v1']} {variables['v2']} at {variables['times']}"


def test_parts_are_named_by_wildcard_path_variable_and_repeat(wildcards):
    [(_, fields)] = expanded("${season=!{summer}} __styles/film__ ${season} __times__ __times__", wildcards=wildcards)[
        :1
    ]
    assert fields["variables"] == {"styles/film": "ilford hp5", "season": "summer", "times": "dawn", "times_2": "dawn"}
    assert fields["prompt"] == "ilford hp5 summer dawn dawn"


def test_samples_are_drawn_from_the_seed_the_same_way_every_time(wildcards):
    first = expanded(TEMPLATE, wildcards=wildcards, samples=50, seed=7)
    assert expanded(TEMPLATE, wildcards=wildcards, samples=50, seed=7) == first
    assert len(first) == 50
    assert expanded(TEMPLATE, wildcards=wildcards, samples=50, seed=8) != first
    assert {fields["variables"]["times"] for _, fields in first} == {"dawn", "noon", "night"}


def test_rows_of_one_file_draw_independently_and_keep_their_other_fields(wildcards):
    rows = [("line 2", {"template": "{a|b|c|d|e|f|g|h}", "steps": 5}), ("line 3", {"template": "{a|b|c|d|e|f|g|h}"})]
    out = list(expand_rows(rows, Expansion(samples=20, seed=1)))
    first, second = (
        [f["prompt"] for w, f in out if w.startswith("line 2")],
        [f["prompt"] for w, f in out if w.startswith("line 3")],
    )
    assert len(first) == len(second) == 20 and first != second
    assert all(f["steps"] == 5 for w, f in out if w.startswith("line 2"))
    assert all("steps" not in f for w, f in out if w.startswith("line 3"))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"template": "a {red|blue"}, "template: not valid template syntax"),
        ({"template": "a __nope__"}, "template: no values for wildcard __nope__"),
        ({"template": "  "}, "template: a non-blank string is needed"),
        ({"template": 3}, "template: a non-blank string is needed"),
        ({"template": "a {x|y}", "prompt": "b"}, "give a prompt or a template, not both"),
        ({"template": "a {x|y}", "variables": {"v1": "x"}}, "variables: set by the template"),
        ({"prompt": "b", "variables": {"v1": "x"}}, "variables: set by a template"),
    ],
)
def test_a_bad_template_row_is_named_and_nothing_is_sent(client, row, message):
    with pytest.raises(InvalidJobError) as info:
        client.submit([{"prompt": "fine"}, row], run="bad-template")
    assert info.value.problems[0][0] in ("item 1", "job 1 (item 1)")
    assert message in info.value.problems[0][1]
    assert not client.runs() or "bad-template" not in client.runs()


def test_an_unknown_wildcard_names_the_folder(client, wildcards):
    with pytest.raises(InvalidJobError, match=f"no values for wildcard __colors__ in {wildcards}"):
        client.prepare([{"template": "a __colors__ car"}], wildcards=wildcards)
    with pytest.raises(PromptFileError, match="is not a folder"):
        client.prepare([{"template": "a car"}], wildcards=wildcards / "missing")


def test_a_template_column_in_a_csv_file(client, wildcards, tmp_path):
    path = tmp_path / "p.csv"
    path.write_text(f'prompt,template,steps\na plain row,,3\n,"{TEMPLATE}",4\n')
    jobs = client.prepare(path, run="csv", wildcards=wildcards)
    assert len(jobs) == 1 + 18 and [job.index for job in jobs] == list(range(19))
    assert jobs[0].template is None and jobs[0].steps == 3
    assert {job.template for job in jobs[1:]} == {TEMPLATE} and {job.steps for job in jobs[1:]} == {4}


def test_template_and_variables_travel_with_the_job_but_not_in_its_id(client, redis_urls, wildcards):
    run = client.submit([{"template": TEMPLATE}], run="travel", wildcards=wildcards, steps=2)
    assert run.submitted == 18
    sent = queued_jobs(redis_urls[0])
    assert {job["template"] for job in sent} == {TEMPLATE}
    assert {json.dumps(job["variables"], sort_keys=True) for job in sent} == {
        json.dumps(fields["variables"], sort_keys=True) for _, fields in expanded(TEMPLATE, wildcards=wildcards)
    }
    # The same prompt from a plain row names the same job: where a prompt came from is not its recipe.
    [plain] = client.prepare([{"prompt": "a red car at dawn", "seed": sent[0]["seed"]}], run="travel", steps=2)
    assert (
        plain.job_id == client.prepare([{"template": TEMPLATE}], run="travel", wildcards=wildcards, steps=2)[0].job_id
    )


def test_a_sampled_template_resubmits_as_a_no_op(client, wildcards):
    first = client.submit([{"template": TEMPLATE}], run="again", samples=40, wildcards=wildcards)
    again = client.submit([{"template": TEMPLATE}], run="again", samples=40, wildcards=wildcards)
    assert (first.submitted, again.submitted, again.skipped) == (40, 0, 40)
    more = client.submit([{"template": TEMPLATE}], run="again", samples=50, wildcards=wildcards)
    assert (more.submitted, more.skipped) == (10, 40)  # the first 40 draws are the same ones


def test_submit_memory_does_not_grow_with_the_expansion(client, redis_urls, monkeypatch):
    """Peak Python memory (tracemalloc) while submitting templates of 2,000 and 20,000 prompts
    in chunks of 500: ten times the prompts, about the same peak (the streaming test of plain
    files, for templates)."""
    import tracemalloc

    from producer import checked
    from producer import client as client_module

    monkeypatch.setattr(client_module, "SUBMIT_CHUNK", 500)
    monkeypatch.setattr(checked, "BLOCK", 500)  # the checked jobs kept on disk, read back a block at a time
    digits = "{0|1|2|3|4|5|6|7|8|9}"

    def peak(template: str, prompts: int) -> int:
        for url in redis_urls:
            redis.Redis.from_url(url).flushdb()
        tracemalloc.start()
        try:
            assert client.submit([{"template": template}], run=f"mem-{prompts}").submitted == prompts
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small = peak(f"a {{2|4}} {digits} {digits} {digits} {'x' * 80}", 2000)
    large = peak(f"a {{2|4}} {digits} {digits} {digits} {digits} {'x' * 80}", 20000)
    assert large < 2.5 * small, (small, large)  # holding every job: ~10x; a chance GC or buffer: < 2x


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), prog_name="deepqueue")


def test_the_cli_submits_a_template(redis_urls, monkeypatch, wildcards):
    monkeypatch.setenv("DEEPQUEUE_BROKER_URL", redis_urls[0])
    monkeypatch.setenv("DEEPQUEUE_RESULT_BACKEND", redis_urls[1])
    result = invoke("submit", "--template", TEMPLATE, "--wildcards", str(wildcards), "--samples", "5", "--run", "cli")
    assert result.exit_code == 0, result.output
    assert "run cli: 5 jobs enqueued" in result.output
    result = invoke("submit", "--template", TEMPLATE, "--wildcards", str(wildcards), "--run", "cli-all")
    assert "run cli-all: 18 jobs enqueued" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give a prompt FILE or --template, one of them"),
        (("--template", "a {b|c}", "--samples", "2", "--combinatorial"), "--combinatorial or --samples N, not both"),
        (("--template", "a __x__"), "no values for wildcard __x__"),
    ],
)
def test_the_cli_refuses_what_cannot_expand(redis_urls, monkeypatch, args, message):
    monkeypatch.setenv("DEEPQUEUE_BROKER_URL", redis_urls[0])
    monkeypatch.setenv("DEEPQUEUE_RESULT_BACKEND", redis_urls[1])
    result = invoke("submit", *args)
    assert result.exit_code == EXIT_BAD_INPUT and message in result.output, result.output
