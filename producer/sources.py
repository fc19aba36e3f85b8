"""Read prompts from the places users keep them: a list, or a .txt, .jsonl, .csv, .tsv, .json
(an array), .parquet file, the text ones also gzip'd (``.jsonl.gz``, ...).

Every reader streams ``(where, fields)`` rows (``where`` names the line so that validation errors
point at the input to fix), in constant memory whatever the file's size. ``Rows`` can be read
more than once: ``Client.submit`` checks every row before it sends any.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import IO, Any

from producer.errors import InvalidJobError, PromptFileError, RowProblem
from producer.job import JobDefaults
from producer.templates import Expansion, expand_rows

Row = tuple[str, "dict[str, Any] | RowProblem"]
Source = str | os.PathLike | Iterable[str | Mapping[str, Any] | JobDefaults]
SUFFIXES = (".txt", ".jsonl", ".csv", ".tsv", ".json", ".parquet")
GZIPPED = (".txt", ".jsonl", ".csv", ".tsv", ".json")  # also read as NAME.gz


class Rows(Iterable[Row]):
    """The rows of a source: a file or a list is read afresh on every iteration, any other
    iterable (a generator) once. A row with a ``template`` becomes the rows of its prompts
    (``producer.templates``), the same ones on every iteration."""

    def __init__(self, source: Source, expansion: Expansion | None = None) -> None:
        self._expansion = expansion or Expansion()
        if isinstance(source, Mapping):  # iterating it would make one job of each key
            raise PromptFileError("got one dict: pass a list of jobs ([{...}]) or a prompt file's path")
        if isinstance(source, (bytes, bytearray)):
            raise PromptFileError("got bytes: pass a list of prompt strings or a prompt file's path")
        self._read: Callable[[], Iterator[Row]]
        if isinstance(source, (str, os.PathLike)):
            self._read = partial(read_file, Path(source))
            check_readable(Path(source))
        else:
            self._read = partial(_read_items, source)

    def __iter__(self) -> Iterator[Row]:
        return expand_rows(self._read(), self._expansion)


def read_rows(source: Source, expansion: Expansion | None = None) -> list[tuple[str, dict[str, Any]]]:
    """All rows of ``source`` in a list (small inputs; ``Rows`` streams), raising
    InvalidJobError naming every item that is no job at all."""
    rows = list(Rows(source, expansion))
    problems = [(where, str(fields)) for where, fields in rows if isinstance(fields, RowProblem)]
    if problems:
        raise InvalidJobError(problems)
    return rows  # type: ignore[return-value]


def _read_items(items: Iterable[Any]) -> Iterator[Row]:
    for i, item in enumerate(items):
        where = f"item {i}"
        if isinstance(item, (str, Mapping, JobDefaults)):
            yield where, _item_fields(item, where)
        else:
            shown = repr(item)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            kind = type(item).__name__
            yield where, RowProblem(f"expected a prompt string, a dict of job fields or a Job, got {kind} {shown}")


def file_format(path: Path) -> tuple[str, bool]:
    """``(suffix, gzipped)`` of a prompt file, or PromptFileError for a format not read here."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    gzipped = bool(suffixes) and suffixes[-1] == ".gz"
    suffix = (suffixes[-2] if len(suffixes) > 1 else "") if gzipped else (suffixes[-1] if suffixes else "")
    if suffix not in (GZIPPED if gzipped else SUFFIXES):
        known = ", ".join((*SUFFIXES, *(f"{name}.gz" for name in GZIPPED)))
        raise PromptFileError(f"{path}: unknown prompt file type {''.join(path.suffixes)!r}, use one of {known}")
    return suffix, gzipped


def check_readable(path: Path) -> None:
    file_format(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: no such file")


def read_file(path: Path) -> Iterator[Row]:
    suffix, gzipped = file_format(path)
    check_readable(path)
    if suffix == ".parquet":
        yield from _read_parquet(path)
        return
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv, ".tsv": _read_tsv, ".json": _read_json}
    # utf-8-sig: spreadsheet exports often start with a byte-order mark; it is not part of the data.
    opener = partial(gzip.open, path, "rt") if gzipped else path.open
    try:
        with opener(encoding="utf-8-sig", newline="") as handle:
            yield from readers[suffix](handle, path.name)
    except UnicodeDecodeError as error:
        raise PromptFileError(f"{path}: not UTF-8 text ({error.reason}); save it as UTF-8") from error
    except (gzip.BadGzipFile, EOFError) as error:
        raise PromptFileError(f"{path}: not a complete gzip file ({error})") from error
    except OSError as error:  # no permission, a FIFO gone, an I/O error
        raise PromptFileError(f"{path}: cannot be read ({error.strerror or error})") from error


def _item_fields(item: str | Mapping[str, Any] | JobDefaults, where: str) -> dict[str, Any]:
    if isinstance(item, str):
        return {"prompt": item}
    if isinstance(item, JobDefaults):  # a Job from another run: keep its recipe, not its place
        return item.model_dump(exclude={"run_id", "index"}, exclude_unset=True)
    return _normalise(dict(item), where)


def _read_txt(handle: Iterable[str], name: str) -> Iterator[Row]:
    for number, line in enumerate(handle, start=1):
        prompt = line.strip()
        if prompt and not prompt.startswith("#"):
            yield f"line {number} of {name}", {"prompt": prompt}


def _read_jsonl(handle: Iterable[str], name: str) -> Iterator[Row]:
    decode = json.JSONDecoder(object_pairs_hook=_unique_keys).decode  # one decoder for the file
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        where = f"line {number} of {name}"
        try:
            value = decode(line)
        except _KeysTwice as error:
            raise PromptFileError(f"{where}: {error}") from None
        except json.JSONDecodeError as error:
            raise PromptFileError(f"{where}: not valid JSON ({error.msg})") from error
        except ValueError as error:  # Python reads no integer of more than 4300 digits
            raise PromptFileError(f"{where}: not valid JSON (a number too long to read)") from error
        except RecursionError as error:  # thousands of nested [[[...
            raise PromptFileError(f"{where}: not valid JSON (nested too deeply)") from error
        yield where, _json_fields(value, where)


def _json_fields(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        value = {"prompt": value}
    if not isinstance(value, dict):
        raise PromptFileError(f"{where}: expected a JSON object or string, got {type(value).__name__}")
    return _normalise(dict(value), where)


def _read_csv(handle: Iterable[str], name: str, delimiter: str = ",") -> Iterator[Row]:
    reader = csv.DictReader(handle, delimiter=delimiter)
    try:
        yield from _csv_rows(reader, name)
    except csv.Error as error:  # a cell over the csv module's field limit (128 KiB)
        raise PromptFileError(f"line {reader.line_num + 1} of {name}: not valid CSV ({error})") from error


_read_tsv = partial(_read_csv, delimiter="\t")


def _read_json(handle: IO[str], name: str) -> Iterator[Row]:
    """A JSON array of prompt strings or job objects, streamed (ijson): constant memory."""
    import ijson

    number = -1
    try:
        for number, value in enumerate(ijson.items(handle, "item", use_float=True, map_type=_KeysSeen)):
            where = f"item {number} of {name}"
            if isinstance(value, _KeysSeen) and value.twice:
                twice = ", ".join(map(repr, sorted(value.twice)))
                raise PromptFileError(f"{where}: the key(s) {twice} appear more than once")
            yield where, _json_fields(value, where)
    except ijson.JSONError as error:
        where = f"after item {number} of {name}" if number >= 0 else name
        raise PromptFileError(f"{where}: not a valid JSON array of prompts or job objects ({error})") from error


class _KeysSeen(dict):
    """A JSON object as ijson builds it, noting keys given twice (json keeps the last silently;
    raising here would unwind through ijson's C backend)."""

    def __init__(self) -> None:
        super().__init__()
        self.twice: set[str] = set()

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self:
            self.twice.add(key)
        super().__setitem__(key, value)


def _read_parquet(path: Path) -> Iterator[Row]:
    """A Parquet table with a ``prompt`` column (and any job fields), read a row group at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise PromptFileError(f"{path}: reading Parquet needs pyarrow: pip install 'deepqueue[parquet]'") from error
    try:
        table = pq.ParquetFile(path)
        columns = table.schema_arrow.names
        if "prompt" not in columns:
            raise PromptFileError(f"{path.name}: the table must have a 'prompt' column, got {columns}")
        number = 0
        for batch in table.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                where = f"row {number} of {path.name}"
                number += 1
                # null: the run default. A row stays a row even with a null prompt (refused by the
                # job's check, naming it): skipped, it would shift every later row's job id and seed.
                fields = {key: value for key, value in row.items() if value is not None}
                yield where, _normalise(fields, where)
    except (OSError, ValueError) as error:
        if isinstance(error, PromptFileError):
            raise
        raise PromptFileError(f"{path}: not a readable Parquet file ({error})") from error


def _csv_rows(reader: csv.DictReader, name: str) -> Iterator[Row]:
    if not reader.fieldnames or "prompt" not in reader.fieldnames:
        raise PromptFileError(f"{name}: the header row must have a 'prompt' column, got {reader.fieldnames}")
    twice = sorted({column for column in reader.fieldnames if reader.fieldnames.count(column) > 1})
    if twice:
        raise PromptFileError(f"{name}: the header row names {', '.join(map(repr, twice))} more than once")
    for row in reader:
        if None in row:
            raise PromptFileError(f"line {reader.line_num} of {name}: more cells than header columns")
        # Empty cells mean "use the run default", not "empty string".
        fields = {key: value for key, value in row.items() if value not in ("", None)}
        if fields:
            where = f"line {reader.line_num} of {name}"
            yield where, _normalise(fields, where)


class _KeysTwice(ValueError):
    """A JSON object that gives a key more than once (its reader says where)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (json keeps the last one silently)."""
    fields = dict(pairs)
    if len(fields) < len(pairs):
        twice = sorted(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise _KeysTwice(f"the key(s) {', '.join(map(repr, twice))} appear more than once")
    return fields


def _normalise(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """Accept ``size: "WxH"`` as a shorthand for width and height."""
    size = fields.pop("size", None)
    if size is not None and ({"width", "height"} & set(fields)):
        raise PromptFileError(f"{where}: give size or width and height, not both (size {size!r})")
    if size is not None:
        try:
            fields.update(parse_size(str(size)))
        except PromptFileError as error:
            raise PromptFileError(f"{where}: {error}") from error
    return fields


def parse_size(text: str) -> dict[str, Any]:
    """``"768x512"`` -> ``{"width": 768, "height": 512}``; bounds are checked by the Job."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.strip().isdecimal() or not height.strip().isdecimal():
        raise PromptFileError(f"size must look like WIDTHxHEIGHT (e.g. 768x512), got {text!r}")
    return {"width": int(width), "height": int(height)}
