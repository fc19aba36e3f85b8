"""Properties of the job contract and the prompt-file readers, checked on generated inputs.

- Any job that validates comes back unchanged through JSON and through a queue message body, and
  validating it again (as the worker does) gives the same job and the same job id.
- Job ids are deterministic and tell apart any two jobs that differ in run, position or recipe.
- What a writer puts in a .txt, .jsonl or .csv file is what the readers read back, for any
  Unicode prompt (commas, quotes, line breaks where the format can hold them).
- On arbitrary bytes or text the readers and the validation raise nothing but deepqueue's own
  errors.

Deterministic in CI (``derandomize``, no example database): the same examples every run.
``DEEPQUEUE_PROPERTY_EXAMPLES=2000`` runs more of them locally.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu.serialization import dumps, loads

from producer.enqueue import message_args, queue_message
from producer.entries import entries_of, make_jobs
from producer.errors import DeepQueueError, InvalidJobError, PromptFileError
from producer.job import (
    CACHE_BREAKING_SCHEDULERS,
    MAX_CACHE_BRANCH,
    MAX_GUIDANCE,
    MAX_INDEX,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    Job,
    JobDefaults,
    SchedulerName,
    job_id,
)
from producer.sources import read_rows

PROPERTIES = settings(
    max_examples=int(os.environ.get("DEEPQUEUE_PROPERTY_EXAMPLES", "60")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SCHEDULERS: tuple[str, ...] = SchedulerName.__args__  # type: ignore[attr-defined]

# -- strategies -------------------------------------------------------------------------------------

#: Any Unicode text a prompt may hold (every category but lone surrogates, which are not text).
prompts = st.text(min_size=1, max_size=120).filter(lambda text: text.strip())
long_prompts = st.text(min_size=MAX_PROMPT_CHARS - 5, max_size=MAX_PROMPT_CHARS).filter(lambda text: text.strip())
run_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
sides = st.integers(8, 256).map(lambda n: n * 8)


@st.composite
def recipes(draw: st.DrawFn) -> dict[str, Any]:
    """Valid recipe fields, each present or left to its default."""
    scheduler = draw(st.sampled_from([None, *SCHEDULERS]))
    interval = st.sampled_from([None, 1]) if scheduler in CACHE_BREAKING_SCHEDULERS else st.none() | st.integers(1, 20)
    fields = {
        "prompt": draw(st.one_of(prompts, long_prompts) if draw(st.booleans()) else prompts),
        "seed": draw(st.integers(0, MAX_SEED)),
        "negative_prompt": draw(st.none() | st.text(max_size=60)),
        "height": draw(sides),
        "width": draw(sides),
        "steps": draw(st.integers(1, MAX_STEPS)),
        "guidance": draw(st.floats(0, MAX_GUIDANCE, allow_nan=False) | st.integers(0, 30)),
        "scheduler": scheduler,
        "cache_interval": draw(interval),
        "cache_branch": draw(st.none() | st.integers(0, MAX_CACHE_BRANCH)),
        "format": draw(st.sampled_from(["png", "webp", "jpeg"])),
    }
    keep = draw(st.sets(st.sampled_from(sorted(fields))))
    return {key: value for key, value in fields.items() if key in keep | {"prompt", "seed"}}


@st.composite
def jobs(draw: st.DrawFn) -> Job:
    fields = {**draw(recipes()), "run_id": draw(run_ids), "index": draw(st.integers(0, MAX_INDEX))}
    return Job.model_validate(fields)


# -- the job contract -------------------------------------------------------------------------------


@PROPERTIES
@given(jobs())
def test_a_valid_job_round_trips_through_json_and_the_message_body(job):
    again = Job.model_validate_json(job.model_dump_json())
    assert again == job and again.job_id == job.job_id

    # What the producer publishes, serialised as kombu does, read as the worker reads it.
    args, kwargs = message_args(entries_of([job]), 1.8e9)
    content_type, encoding, body = dumps((args, kwargs, {}), serializer="json")
    received_args, received_kwargs, _embed = loads(body, content_type, encoding)
    received = Job.model_validate(received_args[0])
    assert received == job and received.job_id == job.job_id
    assert set(received_kwargs) == {"enqueued_at"}

    # Validating again is a no-op, whichever way the job is given.
    assert Job.model_validate(job.model_dump()) == job
    assert Job.model_validate(job.model_dump(exclude_unset=True)) == job
    assert Job.model_validate(job.model_dump(mode="json")).job_id == job.job_id


@PROPERTIES
@given(jobs())
def test_a_message_holds_the_job_once_and_its_prompt_only_in_the_body(job):
    message = json.loads(queue_message(entries_of([job]), queue="deepqueue", enqueued_at=1.8e9))
    assert message["headers"] == {"task": "deepqueue.generate", "id": job.job_id}
    assert set(message) == {"body", "content-encoding", "content-type", "headers", "properties"}
    [[body], kwargs, embed] = json.loads(message["body"])
    assert Job.model_validate(body) == job and Job.model_validate(body).job_id == job.job_id
    assert (kwargs, embed) == ({"enqueued_at": 1.8e9}, {})


@PROPERTIES
@given(jobs())
def test_job_ids_are_deterministic_and_sort_by_position(job):
    assert job.job_id == job_id(job.run_id, job.index, job.recipe())
    assert Job.model_validate(job.model_dump()).job_id == job.job_id
    position, _, digest = job.job_id.partition("-")
    assert position == f"{job.index:08d}" and len(digest) == 12 and int(digest, 16) >= 0


@PROPERTIES
@given(jobs(), jobs())
def test_job_ids_differ_exactly_when_run_position_or_recipe_differ(first, second):
    same = (first.run_id, first.index, first.recipe()) == (second.run_id, second.index, second.recipe())
    assert (first.job_id == second.job_id) is same


@PROPERTIES
@given(jobs(), st.data())
def test_changing_any_one_field_changes_the_job_id(job, data):
    changes = {
        "run_id": run_ids,
        "index": st.integers(0, MAX_INDEX),
        "prompt": prompts,
        "seed": st.integers(0, MAX_SEED),
        "negative_prompt": st.none() | st.text(max_size=20),
        "height": sides,
        "width": sides,
        "steps": st.integers(1, MAX_STEPS),
        "guidance": st.floats(0, MAX_GUIDANCE, allow_nan=False),
        "cache_branch": st.none() | st.integers(0, MAX_CACHE_BRANCH),
        "format": st.sampled_from(["png", "webp", "jpeg"]),
    }
    field = data.draw(st.sampled_from(sorted(changes)))
    value = data.draw(changes[field].filter(lambda new: new != getattr(job, field)))
    changed = Job.model_validate({**job.model_dump(), field: value})
    assert changed.job_id != job.job_id
    assert changed.job_id[:8] == job.job_id[:8] or field == "index"


@PROPERTIES
@given(st.lists(recipes(), min_size=1, max_size=8), run_ids, st.none() | st.integers(0, MAX_SEED))
def test_make_jobs_is_deterministic_and_names_distinct_jobs(rows, run_id, run_seed):
    def build() -> list[Job]:
        return make_jobs(
            [(f"item {n}", row) for n, row in enumerate(rows)], run_id=run_id, defaults=JobDefaults(), run_seed=run_seed
        )

    first, again = build(), build()
    assert first == again and [job.job_id for job in first] == [job.job_id for job in again]
    assert len({job.job_id for job in first}) == len(first)  # the position alone tells them apart
    assert [job.index for job in first] == list(range(len(rows)))


@PROPERTIES
@given(
    st.sampled_from(["height", "width", "steps", "guidance", "seed", "cache_interval", "cache_branch"]),
    st.one_of(st.integers(-(2**70), 2**70), st.floats(), st.booleans(), st.text(max_size=8)),
)
def test_a_bad_value_in_a_row_is_refused_naming_its_field(field, value):
    row = {"prompt": "a fox", field: value}
    try:
        [job] = make_jobs([("item 0", row)], run_id="r", defaults=JobDefaults())
    except InvalidJobError as error:
        assert error.problems and all(where == "job 0 (item 0)" for where, _ in error.problems)
        assert any(message.startswith(f"{field}: ") for _, message in error.problems)
    else:  # accepted: then it is in bounds and means what it said
        assert not isinstance(value, bool)
        assert getattr(job, field) == (float(value) if field == "guidance" else int(value))


# -- readers: what a writer writes is what is read ----------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("property-files")


no_line_breaks = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=80)
#: A byte-order mark opening the file is not data (test_sources checks that): not as a first line here.
txt_lines = st.lists(no_line_breaks, max_size=12).filter(lambda lines: not lines or lines[0][:1] != "\ufeff")


@PROPERTIES
@given(txt_lines, st.sampled_from(["\n", "\r\n", "\r"]), st.booleans())
def test_txt_reads_back_every_line_that_is_a_prompt(folder, lines, newline, final_newline):
    path = folder / "prompts.txt"
    path.write_bytes((newline.join(lines) + (newline if final_newline else "")).encode("utf-8"))
    expected = [
        (f"line {number} of prompts.txt", {"prompt": line.strip()})
        for number, line in enumerate(lines, start=1)
        if line.strip() and not line.strip().startswith("#")
    ]
    assert read_rows(path) == expected


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
jsonl_rows = st.one_of(
    prompts,
    st.fixed_dictionaries({"prompt": prompts}, optional={"steps": st.integers(1, 50), "note": json_values}),
)


@PROPERTIES
@given(st.lists(jsonl_rows, min_size=1, max_size=8), st.booleans(), st.sampled_from(["\n", "\r\n"]))
def test_jsonl_reads_back_every_row(folder, rows, ascii_only, newline):
    path = folder / "prompts.jsonl"
    text = newline.join(json.dumps(row, ensure_ascii=ascii_only) for row in rows) + newline
    path.write_bytes(text.encode("utf-8"))
    expected = [
        (f"line {number} of prompts.jsonl", {"prompt": row} if isinstance(row, str) else row)
        for number, row in enumerate(rows, start=1)
    ]
    assert read_rows(path) == expected


csv_rows = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=60)},
    optional={"negative_prompt": st.text(max_size=30), "steps": st.integers(1, 50).map(str)},
)


#: How writers end lines and quote: spreadsheets write \r\n and quote what needs it; with \n line
#: ends only quoting every cell keeps a bare \r inside a cell (a minimal writer leaves it unquoted).
csv_dialects = st.sampled_from([("\r\n", csv.QUOTE_MINIMAL), ("\r\n", csv.QUOTE_ALL), ("\n", csv.QUOTE_ALL)])


@PROPERTIES
@given(st.lists(csv_rows, min_size=1, max_size=8), csv_dialects)
def test_csv_reads_back_every_cell_with_commas_quotes_and_line_breaks(folder, rows, dialect):
    line_end, quoting = dialect
    path = folder / "prompts.csv"
    buffer = io.StringIO(newline="")
    columns = ["prompt", "negative_prompt", "steps"]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator=line_end, quoting=quoting)
    writer.writeheader()
    writer.writerows(rows)
    path.write_bytes(buffer.getvalue().encode("utf-8"))
    read = read_rows(path)
    # Empty cells mean "the run default": they are left out, every other cell comes back exactly.
    assert [fields for _, fields in read] == [{key: value for key, value in row.items() if value} for row in rows]
    lines = [int(where.split()[1]) for where, _ in read]
    assert lines == sorted(set(lines)) and all(where.endswith(" of prompts.csv") for where, _ in read)


# -- readers and validation: only deepqueue's own errors --------------------------------------------


def read_and_validate(path: Path) -> None:
    """Read and validate ``path`` as a submit does; only DeepQueueError may come out."""
    try:
        rows = read_rows(path)
    except DeepQueueError:
        return
    assert all(isinstance(where, str) and isinstance(fields, dict) for where, fields in rows)
    try:
        jobs = make_jobs(rows, run_id="fuzz", defaults=JobDefaults())
    except InvalidJobError:
        return
    assert all(isinstance(job, Job) for job in jobs)


@PROPERTIES
@given(st.sampled_from(["p.txt", "p.jsonl", "p.csv"]), st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_deepqueue_errors(folder, name, data):
    path = folder / name
    path.write_bytes(data)
    read_and_validate(path)


#: Text made of the characters the formats give meaning to, so that the fuzzing reaches the parsers.
syntax_text = st.text(alphabet='prompt,steps,size,seed"{}[]:\\ \t\n\r0123456789x.-e#\ufeff\x00é', max_size=200)


@PROPERTIES
@given(st.sampled_from(["p.txt", "p.jsonl", "p.csv"]), st.one_of(syntax_text, st.text(max_size=200)))
def test_arbitrary_text_raises_only_deepqueue_errors(folder, name, text):
    path = folder / name
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    read_and_validate(path)


@PROPERTIES
@given(st.lists(json_values | st.binary(max_size=5), max_size=5))
def test_arbitrary_in_memory_items_raise_only_deepqueue_errors(items):
    try:
        rows = read_rows(items)
        make_jobs(rows, run_id="fuzz", defaults=JobDefaults())
    except DeepQueueError:
        pass


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("p.csv", "prompt\n" + "x" * 200_000 + "\n", "line 2 of p.csv: not valid CSV (field larger than field limit"),
        ("p.jsonl", "[" * 100_000 + "\n", "line 1 of p.jsonl: not valid JSON (nested too deeply)"),
        ("p.jsonl", '{"prompt": "a", "seed": 1' + "0" * 5000 + "}\n", "line 1 of p.jsonl: not valid JSON (a number"),
    ],
    ids=["csv-cell-over-the-field-limit", "json-nested-too-deeply", "json-integer-too-long"],
)
def test_inputs_that_used_to_escape_as_other_errors(tmp_path, name, text, message):
    """Found while fuzzing: csv.Error, RecursionError and ValueError reached the user raw."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PromptFileError) as info:
        read_rows(path)
    assert str(info.value).startswith(message)
