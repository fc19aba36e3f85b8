"""worker.output.manifest_writer: the part layout, and ManifestWriter's flushes (count, age, close), retries and
threads, against an in-memory sink and a real local folder."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from producer.errors import StorageError
from producer.layout import part_key, parts_prefix, safe_name
from producer.manifest_parts import decode_part, encode_part, manifest_row
from producer.storage import LocalStorage
from worker.output.manifest_writer import RETRY_FACTOR, ManifestWriter


class Sink:
    """Records every part written; ``failures`` puts fail first."""

    def __init__(self, failures: int = 0) -> None:
        self.parts: dict[str, list[dict[str, Any]]] = {}
        self.failures = failures
        self.lock = threading.Lock()

    def put(self, key: str, data: bytes, *, content_type: str, metadata: dict[str, str]) -> bool:
        with self.lock:
            if self.failures:
                self.failures -= 1
                raise StorageError(f"upload of {key} failed: 503 SlowDown")
            assert key not in self.parts and content_type == "application/gzip"
            self.parts[key] = decode_part(data)
        return True

    def delete(self, key: str) -> None:
        with self.lock:
            del self.parts[key]

    def rows(self) -> list[dict[str, Any]]:
        return [row for rows in self.parts.values() for row in rows]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def row(index: int, run: str = "run-1") -> dict[str, Any]:
    sidecar = {"job_id": f"{index:08d}-0123456789ab", "run_id": run, "index": index, "prompt": f"ünïcode {index}"}
    return manifest_row(sidecar, f"{run}/images/{index:08d}-0123456789ab.png", f"{run}/images/x.json", 100 + index)


def test_part_layout() -> None:
    key = part_key("datasets/", "run-1", "gpu0@host-a:1234", 1700000000123456789, "a1b2c3")
    assert key == "datasets/run-1/manifest-parts/gpu0_host-a_1234-1700000000123456789-a1b2c3.jsonl.gz"
    assert key.startswith(parts_prefix("datasets", "run-1"))
    assert part_key("", "r", "w", 1, "t") == "r/manifest-parts/w-1-t.jsonl.gz"
    assert safe_name("../../etc") == "etc" and safe_name("@@@") == "worker" and len(safe_name("x" * 200)) == 64


def test_part_round_trip_and_damage() -> None:
    rows = [row(0), row(1)]
    assert decode_part(encode_part(rows)) == rows
    assert rows[0]["key"].endswith(".png") and rows[0]["bytes"] == 100 and rows[0]["prompt"] == "ünïcode 0"
    with pytest.raises(ValueError, match="gzipped"):
        decode_part(b"not gzip")
    with pytest.raises(ValueError):
        decode_part(encode_part([]) + b"trailing")


def test_flushes_a_part_per_full_buffer_then_the_rest_at_close() -> None:
    sink = Sink()
    writer = ManifestWriter(sink, "", "w", max_rows=3, max_age_s=30, timer=False)
    for index in range(7):
        writer.add("run-1", row(index))
    assert len(sink.parts) == 2 and writer.pending() == 1
    assert [len(rows) for rows in sink.parts.values()] == [3, 3]
    writer.close()
    assert len(sink.parts) == 3 and writer.pending() == 0
    assert sorted(r["index"] for r in sink.rows()) == list(range(7))
    assert all(key.startswith("run-1/manifest-parts/w-") for key in sink.parts)
    assert sink.rows()[0] == row(0)  # complete: the sidecar and key, sidecar_key, bytes


def test_flushes_by_age_and_per_run() -> None:
    sink, clock = Sink(), Clock()
    writer = ManifestWriter(sink, "p", "w", max_rows=100, max_age_s=10, clock=clock, timer=False)
    writer.add("run-1", row(0))
    clock.now += 6
    writer.add("run-2", row(1, "run-2"))
    assert writer.flush(due_only=True) == 0
    clock.now += 4  # run-1's oldest row is 10 s old, run-2's 4 s
    assert writer.flush(due_only=True) == 1
    assert [key.split("/")[1] for key in sink.parts] == ["run-1"]
    clock.now += 6
    assert writer.flush(due_only=True) == 1
    assert sorted(key.split("/")[1] for key in sink.parts) == ["run-1", "run-2"]
    assert writer.flush() == 0  # nothing left


def test_timer_writes_an_idle_runs_rows() -> None:
    sink = Sink()
    writer = ManifestWriter(sink, "", "w", max_rows=100, max_age_s=0.2)
    writer.add("run-1", row(0))
    deadline = time.monotonic() + 5
    while not sink.parts and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(sink.parts) == 1
    writer.close()
    assert len(sink.parts) == 1


def test_a_failed_write_waits_for_the_next_flush() -> None:
    sink, clock = Sink(failures=1), Clock()
    writer = ManifestWriter(sink, "", "w", max_rows=2, max_age_s=10, clock=clock, timer=False)
    writer.add("run-1", row(0))
    writer.add("run-1", row(1))  # full: the write fails, the rows are kept
    assert not sink.parts and writer.pending() == 2
    writer.add("run-1", row(2))  # held back until the timer's next try: no write per add in an outage
    assert not sink.parts
    clock.now += 10
    assert writer.flush(due_only=True) == 1
    assert [r["index"] for r in sink.rows()] == [0, 1, 2]


def test_rows_are_dropped_when_an_outage_lasts() -> None:
    sink, clock = Sink(failures=10_000), Clock()
    writer = ManifestWriter(sink, "", "w", max_rows=2, max_age_s=1, clock=clock, timer=False)
    for index in range(2 * RETRY_FACTOR + 5):
        writer.add("run-1", row(index))
        clock.now += 1
        writer.flush(due_only=True)
    assert writer.rows_dropped > 0 and writer.pending() <= 2 * RETRY_FACTOR
    writer.close()  # gives up on the rest, without raising
    assert writer.pending() == 0 and not sink.parts


def test_concurrent_adds_write_every_row_once() -> None:
    sink = Sink()
    writer = ManifestWriter(sink, "", "w", max_rows=50, max_age_s=0.05)

    def add(thread: int) -> None:
        for index in range(250):
            writer.add(f"run-{thread % 2}", row(thread * 1000 + index, f"run-{thread % 2}"))

    threads = [threading.Thread(target=add, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    indexes = [r["index"] for r in sink.rows()]
    assert len(indexes) == 2000 and len(set(indexes)) == 2000
    assert all(len(rows) <= 50 for rows in sink.parts.values())


def test_parts_in_a_local_folder(tmp_path) -> None:
    storage = LocalStorage(tmp_path)
    writer = ManifestWriter(storage, "datasets", "gpu0@host", max_rows=2, timer=False)
    for index in range(3):
        writer.add("run-1", row(index))
    writer.close()
    listed = list(storage.list(parts_prefix("datasets", "run-1")))
    assert len(listed) == 2 and all(size > 0 for _, size in listed)
    assert [r["index"] for key, _ in listed for r in decode_part(storage.get(key))] == [0, 1, 2]


def test_a_deleted_run_gets_no_part() -> None:
    """Its rows are dropped before a write; a part written as its tombstone came is removed."""
    sink, tombstones = Sink(), set()
    writer = ManifestWriter(sink, "", "w", max_rows=2, timer=False, deleted=tombstones.__contains__)
    writer.add("gone", row(0, "gone"))
    writer.add("kept", row(1, "kept"))
    tombstones.add("gone")
    assert writer.flush() == 1 and [r["run_id"] for r in sink.rows()] == ["kept"] and writer.pending() == 0

    answers = iter([False, True])  # not deleted before the put, deleted once it is written
    writer = ManifestWriter(sink, "", "w", max_rows=1, timer=False, deleted=lambda run: next(answers))
    writer.add("racing", row(2, "racing"))
    assert [r["run_id"] for r in sink.rows()] == ["kept"] and writer.pending() == 0
