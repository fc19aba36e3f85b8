"""Bad input, table by table: each is refused with a DeepQueueError (exit code 2 and one line from
the CLI) that names the item or line and the field, and nothing reaches Redis.

Where the count of distinct bad inputs comes from (``test_the_tally`` keeps it honest):

- ``CLIENT_CASES``: in-memory sources and keyword arguments of ``Client.submit``;
- ``FILE_CASES``: prompt files, each sent through ``Client.submit`` and through ``deepqueue submit``;
- ``CLI_CASES``: flags and settings of ``deepqueue submit``.

Together well over 40. Beside these: the unit tables of test_job.py and test_sources.py, the
client and CLI cases of test_client.py and test_producer_cli.py, click's own type checks, and
the 11 kinds of hand-made queue message in tests/integration/test_malformed.py.

"Nothing reaches Redis" is checked against a run submitted before each case: the queue and
every key of both databases are byte for byte what they were.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from producer import Client, DeepQueueError, InvalidJobError, PromptFileError, RecipeMismatchError
from producer.cli import cli

LONG = "p" * 2001
ROW = "job 0 (item 0)"  #: what names the first item of a list in an error


def row(**fields: Any) -> list[dict[str, Any]]:
    """A one-item source: a prompt and the given fields."""
    return [{"prompt": "a", **fields}]


@pytest.fixture
def client(redis_urls):
    """A client on a Redis that already holds one run ("baseline", default recipe, one job)."""
    with Client(*redis_urls) as client:
        client.submit(["the baseline run"], run="baseline")
        yield client


def snapshot(urls: tuple[str, str]) -> dict[str, dict[bytes, bytes]]:
    """Every key of both databases (the queue included), serialised by Redis itself."""
    state = {}
    for url in urls:
        db = redis.Redis.from_url(url)
        state[url] = {key: db.dump(key) for key in sorted(db.keys("*"))}
    return state


def case(case_id: str, source: Any, error: type[DeepQueueError], *fragments: str, **kwargs: Any) -> Any:
    """One client case: ``Client.submit(source, **kwargs)`` raises ``error`` naming every fragment."""
    return pytest.param(source, kwargs, error, list(fragments), id=case_id)


def file_case(case_id: str, name: str, content: str | bytes, *fragments: str) -> Any:
    return pytest.param(name, content, list(fragments), id=case_id)


def cli_case(case_id: str, flags: list[str], *fragments: str, **settings: str) -> Any:
    return pytest.param(flags, settings, list(fragments), id=case_id)


# (source, submit keyword arguments, error class, fragments the message must hold)
CLIENT_CASES = [
    case("row-height-not-a-multiple-of-8", row(height=500), InvalidJobError, ROW, "height", "multiple of 8", "500"),
    case("row-width-too-large", row(width=2056), InvalidJobError, ROW, "width", "2048"),
    case("row-width-too-small", row(width=56), InvalidJobError, ROW, "width", "64"),
    case("row-steps-zero", row(steps=0), InvalidJobError, ROW, "steps", "got 0"),
    case("row-steps-too-many", row(steps=201), InvalidJobError, ROW, "steps", "200"),
    case("row-steps-fraction", row(steps=2.5), InvalidJobError, ROW, "steps", "2.5"),
    case("row-guidance-negative", row(guidance=-1), InvalidJobError, ROW, "guidance", "-1"),
    case("row-guidance-infinite", row(guidance=float("inf")), InvalidJobError, ROW, "guidance", "finite"),
    case("row-seed-negative", row(seed=-1), InvalidJobError, ROW, "seed", "-1"),
    case("row-seed-too-large", row(seed=2**32), InvalidJobError, ROW, "seed", "4294967296"),
    case("row-seed-text", row(seed="abc"), InvalidJobError, ROW, "seed", "'abc'"),
    case("row-steps-boolean", row(steps=True), InvalidJobError, ROW, "steps", "true/false"),
    case("prompt-empty", [""], InvalidJobError, ROW, "prompt", "at least 1 character"),
    case("prompt-blank", [" \t"], InvalidJobError, ROW, "prompt", "blank"),
    case("prompt-too-long", [LONG], InvalidJobError, ROW, "prompt", "2000 characters"),
    case("prompt-missing", [{"steps": 5}], InvalidJobError, ROW, "prompt: Field required"),
    case("prompt-not-text", [{"prompt": 123}], InvalidJobError, ROW, "prompt", "string", "123"),
    case("prompt-lone-surrogate", ["a fox\udc80"], InvalidJobError, ROW, "prompt", "unicode"),
    case("negative-prompt-too-long", row(negative_prompt=LONG), InvalidJobError, ROW, "negative_prompt"),
    case("row-scheduler-unknown", row(scheduler="lms"), InvalidJobError, ROW, "scheduler", "'lms'", "'ddim'"),
    case("row-format-unknown", row(format="gif"), InvalidJobError, ROW, "format", "'gif'"),
    case("row-cache-interval-zero", row(cache_interval=0), InvalidJobError, ROW, "cache_interval", "got 0"),
    case("row-cache-branch-too-large", row(cache_branch=12), InvalidJobError, ROW, "cache_branch", "12"),
    case(
        "row-repeating-scheduler-with-deepcache",
        row(scheduler="heun", cache_interval=3),
        InvalidJobError,
        ROW,
        "'heun'",
        "cache_interval=1",
    ),
    case("row-unknown-field", row(colour="red"), InvalidJobError, ROW, "colour", "not permitted"),
    case("row-size-malformed", row(size="big"), PromptFileError, "item 0", "size", "WIDTHxHEIGHT", "'big'"),
    case("second-row-bad", ["ok", {"prompt": "b", "width": 100}], InvalidJobError, "job 1 (item 1)", "width"),
    case("item-a-number", ["ok", 123], InvalidJobError, "item 1", "got int 123"),
    case("item-none", [None], InvalidJobError, "item 0", "got NoneType None"),
    case("item-a-list", [["a", "list"]], InvalidJobError, "item 0", "got list"),
    case("source-one-dict", {"prompt": "a"}, PromptFileError, "got one dict"),
    case("source-bytes", b"a fox", PromptFileError, "got bytes"),
    case("source-empty", [], InvalidJobError, "input", "no prompts found"),
    case("source-missing-file", "/no/such/folder/p.txt", PromptFileError, "/no/such/folder/p.txt", "no such file"),
    case(
        "run-name-with-spaces", ["a"], InvalidJobError, "run", "run_id", "'no spaces allowed'", run="no spaces allowed"
    ),
    case("run-name-empty", ["a"], InvalidJobError, "run", "run_id", "got ''", run=""),
    case("run-name-too-long", ["a"], InvalidJobError, "run", "run_id", "1-64", run="x" * 65),
    case("run-name-with-slash", ["a"], InvalidJobError, "run", "run_id", "'a/b'", run="a/b"),
    case("run-seed-negative", ["a"], InvalidJobError, "run", "seed", "-1", seed=-1),
    case("run-seed-text", ["a"], InvalidJobError, "run", "seed", "'7'", seed="7"),
    case("default-steps-zero", ["a"], InvalidJobError, "run defaults", "steps", steps=0),
    case("default-misspelt", ["a"], InvalidJobError, "run defaults", "hieght", "not permitted", hieght=512),
    case("default-prompt", ["a"], InvalidJobError, "run defaults", "prompt", "not permitted", prompt="x"),
    case("default-height-boolean", ["a"], InvalidJobError, "run defaults", "height", "true/false", height=True),
    case("default-guidance-nan", ["a"], InvalidJobError, "run defaults", "guidance", "finite", guidance=float("nan")),
    case(
        "default-repeating-scheduler-with-deepcache",
        ["a"],
        InvalidJobError,
        "run defaults",
        "'kdpm2'",
        scheduler="kdpm2",
        cache_interval=2,
    ),
    case(
        "run-reused-with-another-recipe",
        ["a"],
        RecipeMismatchError,
        "run 'baseline'",
        "steps=25",
        "steps=6",
        run="baseline",
        steps=6,
    ),
]


@pytest.mark.parametrize(("source", "kwargs", "error", "fragments"), CLIENT_CASES)
def test_client_refuses_and_sends_nothing(client, redis_urls, source, kwargs, error, fragments):
    before = snapshot(redis_urls)
    with pytest.raises(error) as info:
        client.submit(source, **{"run": "bad", **kwargs})
    assert isinstance(info.value, DeepQueueError)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert snapshot(redis_urls) == before


# (file name, content, fragments the message must hold)
FILE_CASES = [
    file_case(
        "txt-prompt-too-long", "p.txt", "ok\n" + LONG + "\n", "job 1 (line 2 of p.txt)", "prompt", "2000 characters"
    ),
    file_case("txt-no-prompts", "p.txt", "# only a comment\n\n", "input", "no prompts found"),
    file_case("txt-not-utf8", "p.txt", "caf\xe9\n".encode("latin-1"), "p.txt", "not UTF-8"),
    file_case("jsonl-broken-json", "p.jsonl", '{"prompt": "a"}\n{"prompt": \n', "line 2 of p.jsonl", "not valid JSON"),
    file_case("jsonl-a-list", "p.jsonl", "[1, 2]\n", "line 1 of p.jsonl", "expected a JSON object or string, got list"),
    file_case("jsonl-a-number", "p.jsonl", "42\n", "line 1 of p.jsonl", "got int"),
    file_case(
        "jsonl-duplicate-key",
        "p.jsonl",
        '{"prompt": "a", "steps": 5, "steps": 6}\n',
        "line 1 of p.jsonl",
        "'steps'",
        "more than once",
    ),
    file_case(
        "jsonl-size-malformed", "p.jsonl", '{"prompt": "a", "size": "big"}\n', "line 1 of p.jsonl", "size", "'big'"
    ),
    file_case(
        "jsonl-unknown-field", "p.jsonl", '{"prompt": "a", "colour": "red"}\n', "job 0 (line 1 of p.jsonl)", "colour"
    ),
    file_case(
        "jsonl-height-text",
        "p.jsonl",
        '{"prompt": "a", "height": "tall"}\n',
        "job 0 (line 1 of p.jsonl)",
        "height",
        "'tall'",
    ),
    file_case("jsonl-nested-too-deeply", "p.jsonl", "[" * 100_000 + "\n", "line 1 of p.jsonl", "nested too deeply"),
    file_case(
        "jsonl-integer-too-long",
        "p.jsonl",
        '{"prompt": "a", "seed": 1' + "0" * 5000 + "}\n",
        "line 1 of p.jsonl",
        "number too long",
    ),
    file_case("csv-no-prompt-column", "p.csv", "text,steps\na,1\n", "p.csv", "'prompt' column"),
    file_case("csv-empty", "p.csv", "", "p.csv", "'prompt' column"),
    file_case("csv-duplicate-column", "p.csv", "prompt,steps,steps\na,1,2\n", "p.csv", "'steps' more than once"),
    file_case("csv-extra-cells", "p.csv", "prompt\na,b\n", "line 2 of p.csv", "more cells than header columns"),
    file_case(
        "csv-steps-not-a-number", "p.csv", "prompt,steps\na,many\n", "job 0 (line 2 of p.csv)", "steps", "'many'"
    ),
    file_case(
        "csv-scheduler-unknown", "p.csv", "prompt,scheduler\na,dpm\n", "job 0 (line 2 of p.csv)", "scheduler", "'dpm'"
    ),
    file_case("csv-size-malformed", "p.csv", "prompt,size\na,64*64\n", "line 2 of p.csv", "size", "'64*64'"),
    file_case(
        "csv-cell-over-the-field-limit", "p.csv", "prompt\n" + "x" * 200_000 + "\n", "line 2 of p.csv", "not valid CSV"
    ),
    file_case("unknown-file-type", "p.yaml", "- a fox\n", "p.yaml", "unknown prompt file type"),
]


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), prog_name="deepqueue")


def assert_one_line_exit_2(result: Any) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    [line] = result.output.splitlines()
    assert line.startswith("Error: ")
    return line


@pytest.mark.parametrize(("name", "content", "fragments"), FILE_CASES)
def test_files_refused_by_client_and_cli_alike(client, redis_urls, monkeypatch, tmp_path, name, content, fragments):
    path = write(tmp_path, name, content)
    before = snapshot(redis_urls)
    with pytest.raises(DeepQueueError) as info:
        client.submit(path, run="bad")
    for fragment in fragments:
        assert fragment in str(info.value)
    assert snapshot(redis_urls) == before

    monkeypatch.setenv("DEEPQUEUE_BROKER_URL", redis_urls[0])
    monkeypatch.setenv("DEEPQUEUE_RESULT_BACKEND", redis_urls[1])
    line = assert_one_line_exit_2(invoke("submit", str(path), "--run", "bad"))
    assert line == f"Error: {info.value}"
    assert snapshot(redis_urls) == before


# (flags after `deepqueue submit p.txt`, DEEPQUEUE_* settings, fragments the message must hold)
CLI_CASES = [
    cli_case("size-not-a-multiple-of-8", ["--size", "504x500"], "run defaults", "height", "multiple of 8", "500"),
    cli_case("size-too-wide", ["--size", "4096x64"], "run defaults", "width", "2048"),
    cli_case("size-a-word", ["--size", "large"], "--size", "WIDTHxHEIGHT", "'large'"),
    cli_case("size-empty", ["--size", ""], "--size", "WIDTHxHEIGHT", "''"),
    cli_case("size-three-sides", ["--size", "64x64x64"], "--size", "'64x64x64'"),
    cli_case("steps-zero", ["--steps", "0"], "run defaults", "steps", "got 0"),
    cli_case("steps-too-many", ["--steps", "201"], "run defaults", "steps", "200"),
    cli_case("guidance-too-high", ["--guidance", "31"], "run defaults", "guidance", "30"),
    cli_case("guidance-negative", ["--guidance", "-1"], "run defaults", "guidance", "-1"),
    cli_case("guidance-nan", ["--guidance", "nan"], "run defaults", "guidance", "finite"),
    cli_case("seed-negative", ["--seed", "-1"], "run", "seed", "-1"),
    cli_case("seed-too-large", ["--seed", "4294967296"], "run", "seed", "4294967296"),
    cli_case(
        "repeating-scheduler-with-deepcache",
        ["--scheduler", "heun", "--cache-interval", "3"],
        "run defaults",
        "'heun'",
        "cache_interval=1",
    ),
    cli_case("cache-interval-zero", ["--cache-interval", "0"], "run defaults", "cache_interval", "got 0"),
    cli_case("cache-interval-too-large", ["--cache-interval", "21"], "run defaults", "cache_interval", "20"),
    cli_case("cache-branch-too-large", ["--cache-branch", "12"], "run defaults", "cache_branch", "12"),
    cli_case("cache-branch-negative", ["--cache-branch", "-1"], "run defaults", "cache_branch", "-1"),
    cli_case("negative-too-long", ["--negative", LONG], "run defaults", "negative_prompt", "2000 characters"),
    cli_case("run-with-spaces", ["--run", "no spaces allowed"], "run", "run_id", "'no spaces allowed'"),
    cli_case("run-empty", ["--run", ""], "run", "run_id", "got ''"),
    cli_case("run-starting-with-a-dash", ["--run", "-dash-first"], "run", "run_id", "'-dash-first'"),
    cli_case(
        "run-reused-with-another-recipe",
        ["--run", "baseline", "--steps", "6"],
        "run 'baseline'",
        "steps=25",
        "steps=6",
        "--allow-recipe-change",
    ),
    cli_case(
        "setting-visibility-timeout-zero",
        [],
        "invalid setting",
        "DEEPQUEUE_VISIBILITY_TIMEOUT_S",
        "'0'",
        DEEPQUEUE_VISIBILITY_TIMEOUT_S="0",
    ),
    cli_case(
        "setting-visibility-timeout-a-word",
        [],
        "invalid setting",
        "DEEPQUEUE_VISIBILITY_TIMEOUT_S",
        "'soon'",
        DEEPQUEUE_VISIBILITY_TIMEOUT_S="soon",
    ),
]


@pytest.mark.parametrize(("flags", "settings", "fragments"), CLI_CASES)
def test_cli_refuses_with_one_line_and_exit_2(client, redis_urls, monkeypatch, tmp_path, flags, settings, fragments):
    path = write(tmp_path, "p.txt", "a red fox\n")
    monkeypatch.setenv("DEEPQUEUE_BROKER_URL", redis_urls[0])
    monkeypatch.setenv("DEEPQUEUE_RESULT_BACKEND", redis_urls[1])
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    before = snapshot(redis_urls)
    args = ["submit", str(path), *flags]
    if "--run" not in flags:
        args += ["--run", "bad"]
    line = assert_one_line_exit_2(invoke(*args))
    for fragment in fragments:
        assert fragment in line
    assert snapshot(redis_urls) == before


def test_the_tally():
    """The count the module docstring promises: distinct bad inputs through the client and the CLI."""
    ids = [case.id for case in CLIENT_CASES + FILE_CASES + CLI_CASES]
    assert len(CLIENT_CASES) >= 40 and len(ids) >= 90
    assert len({case.id for case in CLIENT_CASES}) == len(CLIENT_CASES)
    assert len({case.id for case in FILE_CASES}) == len(FILE_CASES)
    assert len({case.id for case in CLI_CASES}) == len(CLI_CASES)
