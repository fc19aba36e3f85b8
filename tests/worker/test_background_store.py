"""Storing in the background while the next batch generates (worker.output.backlog, worker.pipeline.executor).

The real tiny pipeline and local files; storage and engine are wrapped only to observe the
order of events and to hold an upload back (a slow S3 that cannot be caused otherwise without
timing). No assertion depends on how long anything takes.
"""

from __future__ import annotations

import threading
from functools import partial
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from producer.errors import StorageError  # noqa: E402
from producer.job import Job  # noqa: E402
from producer.state import JobState  # noqa: E402
from producer.storage import LocalStorage  # noqa: E402
from tests.helpers import deliveries as make_deliveries  # noqa: E402
from tests.helpers import local_worker_settings, make_job  # noqa: E402
from worker.embedded import MemoryReporter  # noqa: E402
from worker.output.backlog import Backlog  # noqa: E402
from worker.pipeline.engine import Engine  # noqa: E402
from worker.pipeline.executor import BatchExecutor  # noqa: E402

RUN = "store-run"
WAIT_S = 60  # only a bound on a hang; every wait below ends as soon as its event happens


@pytest.fixture(scope="module")
def engine(tiny_model: Path, tmp_path_factory) -> Engine:
    return Engine.load(local_worker_settings(tiny_model, tmp_path_factory.mktemp("unused")))


job = partial(make_job, run_id=RUN, steps=2)
deliveries = partial(make_deliveries, run_id=RUN, steps=2)


class Journal:
    """Every observed event, in order, from any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, str]] = []

    def add(self, what: str, detail: str) -> None:
        with self.lock:
            self.events.append((what, detail))

    def index(self, what: str, detail: str) -> int:
        return self.events.index((what, detail))


class ObservedStorage(LocalStorage):
    """Local files; each put is journaled, and may wait for ``gate`` (a slow S3) or fail."""

    def __init__(self, root: Path, journal: Journal, gate: threading.Event | None = None, failing: str = "") -> None:
        super().__init__(root)
        self.journal, self.gate, self.failing = journal, gate, failing

    def put(self, key: str, data: bytes, *, content_type: str, metadata: dict[str, str]) -> bool:
        if self.gate is not None:
            assert self.gate.wait(WAIT_S), "the test never opened the storage gate"
        if self.failing and self.failing in key:
            raise StorageError(f"upload of {key} failed: injected")
        wrote = super().put(key, data, content_type=content_type, metadata=metadata)
        self.journal.add("put", key.rsplit("/", 1)[-1])
        return wrote


class ObservedReporter(MemoryReporter):
    def __init__(self, journal: Journal) -> None:
        super().__init__()
        self.journal = journal

    def mark(self, run_id: str, job_id: str, state: JobState, **details: Any) -> bool:
        self.journal.add(state.value, job_id)
        return super().mark(run_id, job_id, state, **details)


class ObservedEngine:
    """The real engine; each generate call is journaled and counted."""

    def __init__(self, engine: Engine, journal: Journal) -> None:
        self.engine, self.journal, self.calls = engine, journal, 0
        self.generating = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def generate(self, key: Any, jobs: list[Job]) -> Any:
        self.calls += 1
        self.journal.add("generate", ",".join(j.job_id for j in jobs))
        self.generating.set()
        return self.engine.generate(key, jobs)


def make_executor(engine: Engine, tiny_model: Path, out: Path, journal: Journal, **storage: Any) -> BatchExecutor:
    settings = local_worker_settings(tiny_model, out, max_batch=2, store_backlog=2, store_threads=2)
    return BatchExecutor(
        ObservedEngine(engine, journal), ObservedStorage(out, journal, **storage), ObservedReporter(journal), settings
    )


def test_outcome_only_after_image_sidecar_and_state(engine: Engine, tiny_model: Path, tmp_path: Path) -> None:
    journal, gate = Journal(), threading.Event()
    executor = make_executor(engine, tiny_model, tmp_path, journal, gate=gate)
    assert executor.submit(deliveries(0, 1)) == []  # the device is free; nothing is final yet
    assert executor.collect() == [] and executor.backlog.pending == 2  # held: nothing may be acked
    gate.set()
    outcomes = executor.collect(wait=True, timeout=WAIT_S)
    assert sorted(o.job_id for o in outcomes) == sorted(job(i).job_id for i in (0, 1)) and all(o.ok for o in outcomes)
    for i in (0, 1):
        job_id = job(i).job_id
        image, sidecar, done = (
            journal.index("put", f"{job_id}.png"),
            journal.index("put", f"{job_id}.json"),
            journal.index("done", job_id),
        )
        assert journal.index("generate", f"{job(0).job_id},{job(1).job_id}") < image < sidecar < done
    assert executor.backlog.pending == 0


def test_the_next_batch_generates_while_the_last_one_is_stored(
    engine: Engine, tiny_model: Path, tmp_path: Path
) -> None:
    """The uploads of batch 1 wait until batch 2 has started generating: serial storing would hang."""
    journal = Journal()
    executor = make_executor(engine, tiny_model, tmp_path, journal)
    observed: ObservedEngine = executor.engine  # type: ignore[assignment]
    second_started = threading.Event()
    executor.storage.gate = second_started  # type: ignore[attr-defined]
    executor.submit(deliveries(0, 1))
    observed.generating.clear()
    thread = threading.Thread(target=lambda: (observed.generating.wait(WAIT_S), second_started.set()))
    thread.start()
    executor.backlog.limit = 4  # room for both batches: this test is about overlap, not back-pressure
    executor.submit(deliveries(2, 3))
    thread.join()
    outcomes = executor.collect(wait=True, timeout=WAIT_S)
    assert len(outcomes) == 4 and all(o.ok for o in outcomes)
    assert journal.index("generate", f"{job(2).job_id},{job(3).job_id}") < journal.index("put", f"{job(0).job_id}.png")


def test_back_pressure_holds_generation_until_stores_finish(engine: Engine, tiny_model: Path, tmp_path: Path) -> None:
    journal, gate = Journal(), threading.Event()
    executor = make_executor(engine, tiny_model, tmp_path, journal, gate=gate)  # backlog: 2 images
    observed: ObservedEngine = executor.engine  # type: ignore[assignment]
    executor.submit(deliveries(0, 1))
    second = threading.Thread(target=executor.submit, args=(deliveries(2, 3),))
    second.start()
    second.join(0.5)
    assert second.is_alive() and observed.calls == 1, "a full backlog must hold the next batch back"
    assert executor.backlog.pending == 2
    gate.set()
    second.join(WAIT_S)
    assert not second.is_alive() and observed.calls == 2
    outcomes = executor.collect(wait=True, timeout=WAIT_S)
    assert len(outcomes) == 4 and all(o.ok for o in outcomes)


def test_a_failing_upload_fails_only_its_job_in_the_background(
    engine: Engine, tiny_model: Path, tmp_path: Path
) -> None:
    journal = Journal()
    executor = make_executor(engine, tiny_model, tmp_path, journal, failing=job(1).job_id)
    executor.submit(deliveries(0, 1))
    outcomes = {o.job_id: o for o in executor.collect(wait=True, timeout=WAIT_S)}
    assert outcomes[job(0).job_id].ok
    failed = outcomes[job(1).job_id]
    assert not failed.ok and not failed.retry and "storing failed" in failed.reason
    assert executor.reporter.get(RUN, job(1).job_id).state is JobState.FAILED


def test_state_that_cannot_be_recorded_sends_the_job_back(engine: Engine, tiny_model: Path, tmp_path: Path) -> None:
    """Redis refusing the final state write (faked: a reporter that raises) must not ack the job."""
    journal = Journal()
    executor = make_executor(engine, tiny_model, tmp_path, journal)

    def refuse_done(run_id: str, job_id: str, state: JobState, **details: Any) -> bool:
        if state is JobState.DONE:
            raise ConnectionError("Redis is down")
        return MemoryReporter.mark(executor.reporter, run_id, job_id, state, **details)  # type: ignore[arg-type]

    executor.reporter.mark = refuse_done  # type: ignore[method-assign]
    executor.submit(deliveries(0))
    (outcome,) = executor.collect(wait=True, timeout=WAIT_S)
    assert outcome.retry and not outcome.ok and "Redis is down" in outcome.reason


def test_execute_refuses_to_mix_with_pending_background_work(engine: Engine, tiny_model: Path, tmp_path: Path) -> None:
    journal, gate = Journal(), threading.Event()
    executor = make_executor(engine, tiny_model, tmp_path, journal, gate=gate)
    executor.submit(deliveries(0))
    with pytest.raises(RuntimeError, match="idle executor"):
        executor.execute(deliveries(1))
    gate.set()
    executor.collect(wait=True, timeout=WAIT_S)


# Backlog alone: pure threading, no pipeline.


def test_backlog_results_and_errors() -> None:
    backlog: Backlog[str] = Backlog(threads=2, limit=4)
    assert backlog.reserve(2)
    backlog.submit(lambda: "ok", on_error=lambda error: f"error {error}")
    backlog.submit(lambda: 1 / 0, on_error=lambda error: f"error {type(error).__name__}")
    assert sorted(backlog.collect(wait=True, timeout=WAIT_S)) == ["error ZeroDivisionError", "ok"]
    assert backlog.pending == 0 and backlog.collect() == []
    backlog.close()


def test_backlog_reserve_waits_for_room_and_admits_an_oversized_batch_alone() -> None:
    backlog: Backlog[int] = Backlog(threads=1, limit=2)
    assert backlog.reserve(2)
    assert not backlog.reserve(1, timeout=0.01)  # full
    backlog.release(2)
    assert backlog.reserve(5)  # larger than the limit: admitted because nothing else is pending
    assert not backlog.reserve(1, timeout=0.01)
    backlog.release(5)
    assert backlog.pending == 0
    backlog.close()


def test_backlog_refuses_nonsense_sizes() -> None:
    with pytest.raises(ValueError):
        Backlog(threads=0, limit=1)


# Storage down for real: an S3 client on a loopback port nobody listens on (connection refused).


def dead_s3_executor(engine: Engine, tiny_model: Path, out: Path, **settings: Any) -> BatchExecutor:
    import socket

    boto3 = pytest.importorskip("boto3")
    from botocore.config import Config

    from producer.storage import S3Storage

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=2)
    client = boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{port}", config=config, aws_access_key_id="x", aws_secret_access_key="x"
    )
    full = local_worker_settings(tiny_model, out, max_batch=2, store_backlog=2, store_threads=2, **settings)
    return BatchExecutor(engine, S3Storage(client, "bucket"), MemoryReporter(), full)


def test_an_outage_longer_than_the_budget_fails_the_job_with_the_cause(
    engine: Engine, tiny_model: Path, tmp_path: Path, caplog
) -> None:
    executor = dead_s3_executor(engine, tiny_model, tmp_path, store_retry_s=0.3)
    with caplog.at_level("WARNING", logger="worker.output.store_retry"):
        executor.submit(deliveries(0, 1))
        outcomes = executor.collect(wait=True, timeout=WAIT_S)
    assert len(outcomes) == 2
    for outcome in outcomes:
        assert not outcome.ok and not outcome.retry
        assert outcome.reason.startswith("storing failed after 0.3 s of retries: upload of s3://bucket/")
        assert "Could not connect" in outcome.reason
        assert executor.reporter.get(RUN, outcome.job_id).state is JobState.FAILED
    # Two jobs, several attempts each: one warning.
    warnings = [r.getMessage() for r in caplog.records if r.name == "worker.output.store_retry"]
    assert len(warnings) == 1 and warnings[0].startswith("storage unavailable (upload of s3://bucket/")
    executor.close()


def test_shutdown_during_an_outage_sends_the_jobs_back_instead_of_waiting(
    engine: Engine, tiny_model: Path, tmp_path: Path
) -> None:
    executor = dead_s3_executor(engine, tiny_model, tmp_path, store_retry_s=600)
    executor.submit(deliveries(0, 1))
    deadline = threading.Event()
    for _ in range(WAIT_S * 100):  # until the uploads are failing and waiting to be retried
        if not executor.store_retry.available:
            break
        deadline.wait(0.01)
    assert executor.collect() == [] and executor.backlog.pending == 2  # waiting, not failed
    closer = threading.Thread(target=executor.close)
    closer.start()
    closer.join(WAIT_S)  # well under the 600 s budget
    assert not closer.is_alive()
    outcomes = executor.collect()
    assert len(outcomes) == 2
    for outcome in outcomes:
        assert outcome.retry and not outcome.ok and "interrupted by shutdown" in outcome.reason
        assert executor.reporter.get(RUN, outcome.job_id).state is JobState.RUNNING  # neither done nor failed


class DeletableReporter(ObservedReporter):
    """The run store as it is once ``deepqueue delete`` set the run's tombstone: nothing recorded."""

    def __init__(self, journal: Journal) -> None:
        super().__init__(journal)
        self.gone = False

    def mark(self, run_id: str, job_id: str, state: JobState, **details: Any) -> bool:
        return not self.gone and super().mark(run_id, job_id, state, **details)

    def deleted(self, run_id: str) -> bool:
        return self.gone


def stored_files(out: Path) -> list[Path]:
    return sorted(path for path in (out / RUN).rglob("*") if path.is_file()) if (out / RUN).exists() else []


@pytest.mark.parametrize("when", ["while-uploading", "before-storing"])
def test_a_run_deleted_while_its_batch_is_stored_keeps_no_file(
    engine: Engine, tiny_model: Path, tmp_path: Path, when: str
) -> None:
    """Deleted as its uploads were on their way (they finish, then the worker removes them), or
    after its batch generated but before its images' store began (nothing is uploaded): either
    way nothing of it stays, manifest part included, and its jobs end dropped, not failed."""
    journal, uploads, stores = Journal(), threading.Event(), threading.Event()
    settings = local_worker_settings(tiny_model, tmp_path, max_batch=2, store_backlog=3, store_threads=1)
    reporter = DeletableReporter(journal)
    storage = ObservedStorage(tmp_path, journal, gate=uploads)
    executor = BatchExecutor(ObservedEngine(engine, journal), storage, reporter, settings)
    if when == "before-storing":  # the one store thread is busy: the batch's stores wait behind it
        executor.backlog.reserve(1)
        executor.backlog.submit(lambda: stores.wait(WAIT_S), lambda error: None)
        uploads.set()
    assert executor.submit(deliveries(0, 1)) == []  # generated; its images wait to be stored
    reporter.gone = True  # deepqueue delete RUN --outputs --force
    stores.set()
    uploads.set()
    outcomes = [o for o in executor.collect(wait=True, timeout=WAIT_S) if o is not True]
    executor.close()
    assert len(outcomes) == 2 and all(o.ok and o.skipped == "cancelled" for o in outcomes)
    assert stored_files(tmp_path) == []
    put = [event for event in journal.events if event[0] == "put"]
    assert bool(put) == (when == "while-uploading")  # the first job's image and sidecar were on their way
