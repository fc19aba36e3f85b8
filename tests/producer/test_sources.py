"""Prompt sources: .txt, .jsonl, .csv files and in-memory lists, each row labelled by its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.entries import make_jobs
from producer.errors import InvalidJobError, PromptFileError
from producer.job import Job, JobDefaults
from producer.sources import parse_size, read_rows


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- .txt -------------------------------------------------------------------------------------------


def test_txt_skips_blank_and_comment_lines_and_labels_line_numbers(tmp_path):
    path = write(tmp_path, "p.txt", "# a comment\na red fox\n\n   \n  a blue heron  \n   # indented comment\nlast\n")
    assert read_rows(path) == [
        ("line 2 of p.txt", {"prompt": "a red fox"}),
        ("line 5 of p.txt", {"prompt": "a blue heron"}),
        ("line 7 of p.txt", {"prompt": "last"}),
    ]


def test_txt_without_trailing_newline_and_with_crlf(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"one\r\ntwo\r\nthree")
    assert [fields["prompt"] for _, fields in read_rows(path)] == ["one", "two", "three"]


def test_txt_keeps_unicode(tmp_path):
    path = write(tmp_path, "p.txt", "un renard roux \u00e9t\u00e9 \u72d0\n")
    assert read_rows(path)[0][1]["prompt"] == "un renard roux \u00e9t\u00e9 \u72d0"


def test_txt_accepts_str_path_and_uppercase_suffix(tmp_path):
    path = write(tmp_path, "P.TXT", "a\n")
    assert read_rows(str(path)) == [("line 1 of P.TXT", {"prompt": "a"})]


def test_empty_txt_gives_no_rows(tmp_path):
    assert read_rows(write(tmp_path, "p.txt", "\n# only comments\n")) == []


def test_txt_line_numbers_reach_the_job_error(tmp_path):
    path = write(tmp_path, "p.txt", "fine\n\n" + "x" * 2001 + "\n")
    with pytest.raises(InvalidJobError) as info:
        make_jobs(read_rows(path), run_id="r", defaults=JobDefaults())
    [(where, message)] = info.value.problems
    assert where == "job 1 (line 3 of p.txt)" and message.startswith("prompt:")


# -- .jsonl -----------------------------------------------------------------------------------------


def test_jsonl_objects_and_bare_strings(tmp_path):
    path = write(
        tmp_path,
        "p.jsonl",
        '{"prompt": "a fox", "steps": 10, "size": "768x512"}\n\n"a bare heron"\n  \n{"prompt": "x", "seed": 3}\n',
    )
    assert read_rows(path) == [
        ("line 1 of p.jsonl", {"prompt": "a fox", "steps": 10, "width": 768, "height": 512}),
        ("line 3 of p.jsonl", {"prompt": "a bare heron"}),
        ("line 5 of p.jsonl", {"prompt": "x", "seed": 3}),
    ]


def test_jsonl_bad_json_names_the_line(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"prompt": "ok"}\n{"prompt": "broken"\n')
    with pytest.raises(PromptFileError, match=r"line 2 of p\.jsonl: not valid JSON"):
        read_rows(path)


@pytest.mark.parametrize(("line", "kind"), [("[1, 2]", "list"), ("42", "int"), ("null", "NoneType"), ("true", "bool")])
def test_jsonl_non_object_refused(tmp_path, line, kind):
    path = write(tmp_path, "p.jsonl", f'"fine"\n{line}\n')
    with pytest.raises(PromptFileError, match=rf"line 2 of p\.jsonl: expected a JSON object or string, got {kind}"):
        read_rows(path)


def test_jsonl_fields_are_validated_by_make_jobs(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"prompt": "a", "height": 500}\n{"prompt": "b", "colour": "red"}\n')
    with pytest.raises(InvalidJobError) as info:
        make_jobs(read_rows(path), run_id="r", defaults=JobDefaults())
    assert [(where, message.split(":")[0]) for where, message in info.value.problems] == [
        ("job 0 (line 1 of p.jsonl)", "height"),
        ("job 1 (line 2 of p.jsonl)", "colour"),
    ]


def test_jsonl_bad_size_refused(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"prompt": "a", "size": "big"}\n')
    with pytest.raises(PromptFileError, match="WIDTHxHEIGHT"):
        read_rows(path)


# -- .csv -------------------------------------------------------------------------------------------


def test_csv_rows_with_empty_cells_left_to_defaults(tmp_path):
    path = write(tmp_path, "p.csv", 'prompt,steps,size,seed\na fox,10,768x512,5\na heron,,,\n"with, comma",4,,\n')
    rows = read_rows(path)
    assert rows == [
        ("line 2 of p.csv", {"prompt": "a fox", "steps": "10", "width": 768, "height": 512, "seed": "5"}),
        ("line 3 of p.csv", {"prompt": "a heron"}),
        ("line 4 of p.csv", {"prompt": "with, comma", "steps": "4"}),
    ]
    jobs = make_jobs(rows, run_id="r", defaults=JobDefaults(steps=30, height=64, width=64))
    assert [(job.steps, job.width, job.height) for job in jobs] == [(10, 768, 512), (30, 64, 64), (4, 64, 64)]
    assert jobs[0].seed == 5


def test_csv_header_must_have_prompt(tmp_path):
    path = write(tmp_path, "p.csv", "text,steps\na fox,10\n")
    with pytest.raises(PromptFileError, match="'prompt' column"):
        read_rows(path)


def test_empty_csv_refused(tmp_path):
    with pytest.raises(PromptFileError, match="'prompt' column"):
        read_rows(write(tmp_path, "p.csv", ""))


def test_csv_extra_cells_refused_naming_the_line(tmp_path):
    path = write(tmp_path, "p.csv", "prompt,steps\nok,10\nfox,10,surplus\n")
    with pytest.raises(PromptFileError, match=r"line 3 of p\.csv: more cells than header columns"):
        read_rows(path)


def test_csv_short_rows_and_blank_lines(tmp_path):
    path = write(tmp_path, "p.csv", "prompt,steps\n\na fox\n,\n")
    assert read_rows(path) == [("line 3 of p.csv", {"prompt": "a fox"})]


def test_csv_line_numbers_count_multiline_cells(tmp_path):
    path = write(tmp_path, "p.csv", 'prompt,height\n"two\nlines",64\nbad,500\n')
    rows = read_rows(path)
    assert rows[1] == ("line 4 of p.csv", {"prompt": "bad", "height": "500"})
    with pytest.raises(InvalidJobError) as info:
        make_jobs(rows, run_id="r", defaults=JobDefaults())
    [(where, message)] = info.value.problems
    assert where == "job 1 (line 4 of p.csv)" and message.startswith("height:") and "'500'" in message


def test_csv_unknown_column_refused_by_make_jobs(tmp_path):
    path = write(tmp_path, "p.csv", "prompt,stepz\na,10\n")
    with pytest.raises(InvalidJobError) as info:
        make_jobs(read_rows(path), run_id="r", defaults=JobDefaults())
    assert info.value.problems[0][1].startswith("stepz: Extra inputs are not permitted")


def test_csv_strings_coerced_by_the_job(tmp_path):
    path = write(
        tmp_path, "p.csv", "prompt,guidance,cache_interval,cache_branch,scheduler,format\nx,4.5,3,1,ddim,webp\n"
    )
    [job] = make_jobs(read_rows(path), run_id="r", defaults=JobDefaults())
    assert (job.guidance, job.cache_interval, job.cache_branch, job.scheduler, job.format) == (
        4.5,
        3,
        1,
        "ddim",
        "webp",
    )


# -- files in general -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["p.yaml", "prompts", "p.txt.bak", "p.gz", "p.parquet.gz", "p.yaml.gz"])
def test_unknown_suffix_refused(tmp_path, name):
    path = write(tmp_path, name, "a\n")
    with pytest.raises(PromptFileError, match="unknown prompt file type") as info:
        read_rows(path)
    assert ".txt" in str(info.value) and ".jsonl" in str(info.value) and ".csv" in str(info.value)


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl", "missing.csv"])
def test_missing_file_refused(tmp_path, name):
    with pytest.raises(PromptFileError, match="no such file") as info:
        read_rows(tmp_path / name)
    assert name in str(info.value)


def test_directory_refused(tmp_path):
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(PromptFileError, match="no such file"):
        read_rows(tmp_path / "dir.txt")


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("p.csv", b"prompt,steps\na fox,4\n", {"prompt": "a fox", "steps": "4"}),
        ("p.txt", b"a fox\n", {"prompt": "a fox"}),
        ("p.jsonl", b'{"prompt": "a fox"}\n', {"prompt": "a fox"}),
    ],
)
def test_utf8_byte_order_mark_is_not_data(tmp_path, name, data, expected):
    """Spreadsheet "CSV UTF-8" exports start with a BOM; it must not end up in a header or prompt."""
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + data)
    assert read_rows(path) == [(f"line 1 of {name}" if name != "p.csv" else "line 2 of p.csv", expected)]


@pytest.mark.parametrize("name", ["p.txt", "p.csv", "p.jsonl"])
def test_non_utf8_file_is_a_prompt_file_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes("prompt\ncaf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match="not UTF-8") as info:
        read_rows(path)
    assert name in str(info.value)


# -- in-memory sources ------------------------------------------------------------------------------


def test_list_of_strings():
    assert read_rows(["a", "b"]) == [("item 0", {"prompt": "a"}), ("item 1", {"prompt": "b"})]


def test_list_of_dicts_with_size_and_not_mutated():
    row = {"prompt": "a", "size": "64x128", "steps": 3}
    assert read_rows([row]) == [("item 0", {"prompt": "a", "width": 64, "height": 128, "steps": 3})]
    assert row == {"prompt": "a", "size": "64x128", "steps": 3}


def test_tuple_and_generator_sources():
    assert read_rows(("a",)) == [("item 0", {"prompt": "a"})]
    assert read_rows(prompt for prompt in ["a", "b"])[1] == ("item 1", {"prompt": "b"})


def test_mixed_list_including_a_job_from_another_run():
    [old] = make_jobs([("x", {"prompt": "old fox", "steps": 7})], run_id="old-run", defaults=JobDefaults(), run_seed=1)
    rows = read_rows(["new", {"prompt": "dict"}, old])
    assert rows[0] == ("item 0", {"prompt": "new"})
    assert rows[1] == ("item 1", {"prompt": "dict"})
    where, fields = rows[2]
    assert where == "item 2"
    assert "run_id" not in fields and "index" not in fields
    assert fields["prompt"] == "old fox" and fields["steps"] == 7 and fields["seed"] == old.seed

    jobs = make_jobs(rows, run_id="new-run", defaults=JobDefaults())
    assert (jobs[2].run_id, jobs[2].index, jobs[2].prompt, jobs[2].seed) == ("new-run", 2, "old fox", old.seed)
    assert isinstance(jobs[2], Job)


def test_list_items_labelled_in_errors():
    with pytest.raises(InvalidJobError) as info:
        make_jobs(read_rows(["ok", " ", "ok"]), run_id="r", defaults=JobDefaults())
    assert [where for where, _ in info.value.problems] == ["job 1 (item 1)"]


def test_empty_list():
    assert read_rows([]) == []


# -- parse_size -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("768x512", {"width": 768, "height": 512}),
        ("64X64", {"width": 64, "height": 64}),
        (" 512 x 768 ", {"width": 512, "height": 768}),
        ("500x500", {"width": 500, "height": 500}),  # bounds are the Job's business
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "512", "x512", "512x", "512*512", "a x b", "-64x64", "64.0x64", "64x64x64", "\u00b2x64", "64x\u2155", "big"],
)
def test_parse_size_errors(text):
    with pytest.raises(PromptFileError, match="WIDTHxHEIGHT") as info:
        parse_size(text)
    assert repr(text) in str(info.value)


# -- what read_rows refuses instead of misreading (issue 6, part 4) ------------------------------


def test_one_dict_is_refused_not_read_as_one_job_per_key():
    with pytest.raises(PromptFileError, match=r"got one dict: pass a list of jobs \(\[\{\.\.\.\}\]\)"):
        read_rows({"prompt": "a koi pond", "width": 64})


def test_bytes_are_refused():
    with pytest.raises(PromptFileError, match="got bytes"):
        read_rows(b"a fox")


def test_items_of_the_wrong_type_are_named_all_at_once():
    with pytest.raises(InvalidJobError) as info:
        read_rows(["fine", 123, None, ["a", "list"], {"prompt": "also fine"}, b"bytes", 4.5])
    assert [where for where, _ in info.value.problems] == ["item 1", "item 2", "item 3", "item 5", "item 6"]
    messages = [message for _, message in info.value.problems]
    assert messages[0] == "expected a prompt string, a dict of job fields or a Job, got int 123"
    assert messages[1].endswith("got NoneType None") and messages[2].endswith("got list ['a', 'list']")
    assert isinstance(info.value, ValueError)  # a DeepQueueError that is also a ValueError


def test_a_long_bad_item_is_shortened_in_the_message():
    with pytest.raises(InvalidJobError) as info:
        read_rows([list(range(100))])
    assert len(info.value.problems[0][1]) < 130 and info.value.problems[0][1].endswith("...")


def test_duplicate_csv_columns_are_refused(tmp_path):
    path = write(tmp_path, "p.csv", "prompt,steps,steps\na fox,5,6\n")
    with pytest.raises(PromptFileError, match="the header row names 'steps' more than once"):
        read_rows(path)


def test_duplicate_json_keys_are_refused_naming_the_line(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "steps": 5, "steps": 6}\n')
    with pytest.raises(PromptFileError, match=r"line 2 of p.jsonl: the key\(s\) 'steps' appear more than once"):
        read_rows(path)


# -- streamed formats: .tsv, .json arrays, .parquet, gzip'd text (issue 7) --------------------------

ROWS = [
    {"prompt": "a red fox", "steps": 5},
    {"prompt": "a koi pond", "size": "64x128"},
    {"prompt": 'tabs\tand "quotes"'},
]
WANTED = [
    {"prompt": "a red fox", "steps": 5},
    {"prompt": "a koi pond", "width": 64, "height": 128},
    {"prompt": 'tabs\tand "quotes"'},
]


def write_format(tmp_path, suffix: str, rows: list[dict]) -> Path:
    """``rows`` written the way other tools write that format."""
    import csv
    import gzip
    import io
    import json

    path = tmp_path / f"prompts{suffix}"
    inner = suffix.removesuffix(".gz")
    if inner == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = list(dict.fromkeys(key for row in rows for key in row))
        pq.write_table(
            pa.table({column: [row.get(column) for row in rows] for column in columns}), path, row_group_size=2
        )
        return path
    text = io.StringIO()
    if inner in (".csv", ".tsv"):
        columns = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(text, columns, delimiter="\t" if inner == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(rows)
    elif inner == ".json":
        json.dump(rows, text, indent=1)
    else:
        text.writelines(json.dumps(row) + "\n" for row in rows)
    data = text.getvalue().encode()
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    return path


@pytest.mark.parametrize("suffix", [".tsv", ".json", ".parquet", ".jsonl.gz", ".csv.gz", ".tsv.gz", ".json.gz"])
def test_every_format_reads_the_same_rows(tmp_path, suffix):
    rows = read_rows(write_format(tmp_path, suffix, ROWS))
    got = [{key: (int(v) if key == "steps" else v) for key, v in fields.items()} for _, fields in rows]
    assert got == WANTED
    jobs = make_jobs(rows, run_id="r", defaults=JobDefaults(height=64, width=64))
    assert [job.prompt for job in jobs] == [row["prompt"] for row in ROWS]


def test_txt_gz_reads_lines(tmp_path):
    import gzip

    path = tmp_path / "p.txt.gz"
    path.write_bytes(gzip.compress(b"a fox\n# note\n\nan owl\n"))
    assert read_rows(path) == [
        ("line 1 of p.txt.gz", {"prompt": "a fox"}),
        ("line 4 of p.txt.gz", {"prompt": "an owl"}),
    ]


def test_json_array_of_strings_and_where_errors_point(tmp_path):
    path = write(tmp_path, "p.json", '["a fox", {"prompt": "an owl", "steps": 3}]')  # noqa: E501
    assert read_rows(path) == [
        ("item 0 of p.json", {"prompt": "a fox"}),
        ("item 1 of p.json", {"prompt": "an owl", "steps": 3}),
    ]
    with pytest.raises(PromptFileError, match=r"item 1 of q.json: expected a JSON object or string, got int"):
        read_rows(write(tmp_path, "q.json", '["a", 5]'))
    with pytest.raises(PromptFileError, match=r"after item 0 of r.json: not a valid JSON array"):
        read_rows(write(tmp_path, "r.json", '["a", {"prompt": '))
    with pytest.raises(PromptFileError, match=r"item 1 of d.json: the key\(s\) 'steps' appear more than once"):
        read_rows(write(tmp_path, "d.json", '["a", {"prompt": "b", "steps": 1, "steps": 2}]'))


def test_a_parquet_row_with_a_null_prompt_is_refused_by_its_row_number(tmp_path):
    """Not skipped: every later row would shift to another job id and seed."""
    path = write_format(tmp_path, ".parquet", [{"prompt": "a"}, {"prompt": None}, {"prompt": "c"}])
    with pytest.raises(InvalidJobError) as info:
        make_jobs(read_rows(path), run_id="r", defaults=JobDefaults())
    [(where, message)] = info.value.problems
    assert where == "job 1 (row 1 of prompts.parquet)" and message.startswith("prompt:"), (where, message)


def test_parquet_without_a_prompt_column_and_nulls_as_defaults(tmp_path):
    with pytest.raises(PromptFileError, match="must have a 'prompt' column"):
        read_rows(write_format(tmp_path, ".parquet", [{"text": "a"}]))
    rows = read_rows(
        write_format(tmp_path / "..", ".parquet", [{"prompt": "a", "steps": None}, {"prompt": "b", "steps": 4}])
    )
    assert rows == [
        ("row 0 of prompts.parquet", {"prompt": "a"}),
        ("row 1 of prompts.parquet", {"prompt": "b", "steps": 4}),
    ]


def test_not_parquet_and_truncated_gzip_are_refused(tmp_path):
    with pytest.raises(PromptFileError, match="not a readable Parquet file"):
        read_rows(write(tmp_path, "p.parquet", "not parquet"))
    import gzip

    path = tmp_path / "p.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"prompt": "a"}\n' * 1000)[:-40])
    with pytest.raises(PromptFileError, match="not a complete gzip file"):
        read_rows(path)


def test_size_beside_width_or_height_is_refused(tmp_path):
    path = write(tmp_path, "p.csv", "prompt,size,width\na,512x512,768\n")
    with pytest.raises(PromptFileError, match="line 2 of p.csv: give size or width and height, not both"):
        read_rows(path)
