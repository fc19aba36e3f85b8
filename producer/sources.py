"""Read prompts from the places users keep them: a list, a .txt, .jsonl or .csv file.

Every reader yields ``(where, fields)`` pairs; ``where`` names the line so that validation
errors point at the input to fix.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from producer.errors import InvalidJobError, PromptFileError
from producer.job import JobDefaults

Row = tuple[str, dict[str, Any]]
Source = str | os.PathLike | Iterable[str | Mapping[str, Any] | JobDefaults]
SUFFIXES = (".txt", ".jsonl", ".csv")


def read_rows(source: Source) -> list[Row]:
    """All rows of ``source``: a path to a prompt file, or an iterable of prompts/dicts/Jobs."""
    if isinstance(source, (str, os.PathLike)):
        return list(read_file(Path(source)))
    if isinstance(source, Mapping):  # iterating it would make one job of each key
        raise PromptFileError("got one dict: pass a list of jobs ([{...}]) or a prompt file's path")
    if isinstance(source, (bytes, bytearray)):
        raise PromptFileError("got bytes: pass a list of prompt strings or a prompt file's path")
    rows, problems = [], []
    for i, item in enumerate(source):
        if isinstance(item, (str, Mapping, JobDefaults)):
            rows.append((f"item {i}", _item_fields(item, f"item {i}")))
        else:
            shown = repr(item)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            kind = type(item).__name__
            problems.append(
                (f"item {i}", f"expected a prompt string, a dict of job fields or a Job, got {kind} {shown}")
            )
    if problems:
        raise InvalidJobError(problems)
    return rows


def read_file(path: Path) -> Iterator[Row]:
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise PromptFileError(f"{path}: unknown prompt file type {path.suffix!r}, use one of {SUFFIXES}")
    if not path.is_file():
        raise PromptFileError(f"{path}: no such file")
    # utf-8-sig: spreadsheet exports often start with a byte-order mark; it is not part of the data.
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            yield from reader(handle, path.name)
    except UnicodeDecodeError as error:
        raise PromptFileError(f"{path}: not UTF-8 text ({error.reason}); save it as UTF-8") from error
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
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        where = f"line {number} of {name}"
        try:
            value = json.loads(line, object_pairs_hook=partial(_unique_keys, where))
        except PromptFileError:
            raise
        except json.JSONDecodeError as error:
            raise PromptFileError(f"{where}: not valid JSON ({error.msg})") from error
        except ValueError as error:  # Python reads no integer of more than 4300 digits
            raise PromptFileError(f"{where}: not valid JSON (a number too long to read)") from error
        except RecursionError as error:  # thousands of nested [[[...
            raise PromptFileError(f"{where}: not valid JSON (nested too deeply)") from error
        if isinstance(value, str):
            value = {"prompt": value}
        if not isinstance(value, dict):
            raise PromptFileError(f"{where}: expected a JSON object or string, got {type(value).__name__}")
        yield where, _normalise(value, where)


def _read_csv(handle: Iterable[str], name: str) -> Iterator[Row]:
    reader = csv.DictReader(handle)
    try:
        yield from _csv_rows(reader, name)
    except csv.Error as error:  # a cell over the csv module's field limit (128 KiB)
        raise PromptFileError(f"line {reader.line_num + 1} of {name}: not valid CSV ({error})") from error


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


def _unique_keys(where: str, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (json keeps the last one silently)."""
    counts = Counter(key for key, _ in pairs)
    twice = sorted(key for key, count in counts.items() if count > 1)
    if twice:
        raise PromptFileError(f"{where}: the key(s) {', '.join(map(repr, twice))} appear more than once")
    return dict(pairs)


def _normalise(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """Accept ``size: "WxH"`` as a shorthand for width and height."""
    size = fields.pop("size", None)
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
