"""worker.pipeline.executor: check -> skip finished -> group -> generate -> encode + upload -> report,
on the real tiny pipeline (CPU, 64 px, 3 steps), a local folder and an in-memory reporter."""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
Image = pytest.importorskip("PIL.Image")

from producer.errors import StorageError  # noqa: E402
from producer.job import Job  # noqa: E402
from producer.layout import image_key, sidecar_key  # noqa: E402
from producer.state import JobState  # noqa: E402
from producer.storage import LocalStorage, S3Storage  # noqa: E402
from tests import helpers  # noqa: E402
from tests.helpers import SIDECAR_FIELDS, TIMING_FIELDS, local_worker_settings  # noqa: E402
from worker.embedded import MemoryReporter  # noqa: E402
from worker.pipeline.engine import Engine  # noqa: E402
from worker.pipeline.executor import BatchExecutor, Delivery, Outcome  # noqa: E402
from worker.pipeline.generated import Generated  # noqa: E402
from worker.settings import WorkerSettings  # noqa: E402

RUN = "exec-run"


@pytest.fixture(scope="module")
def engine(tiny_model: Path, tmp_path_factory) -> Engine:
    return Engine.load(local_worker_settings(tiny_model, tmp_path_factory.mktemp("unused")))


make_job = partial(helpers.make_job, run_id=RUN, steps=3)


def deliver(job: Job, enqueued_at: float | None = None) -> Delivery:
    """What the Celery strategy hands over: the task id is the job id, the payload is JSON."""
    now = time.time()
    return Delivery(job.job_id, job.model_dump(mode="json"), enqueued_at or now - 1.0, now)


class Setup:
    def __init__(self, engine: Engine, settings: WorkerSettings) -> None:
        self.settings = settings
        self.storage = LocalStorage(settings.output_dir)
        self.reporter = MemoryReporter()
        self.executor = BatchExecutor(engine, self.storage, self.reporter, settings)

    def paths(self, job: Job) -> tuple[Path, Path]:
        from producer.layout import EXTENSIONS

        image = image_key(self.settings.s3_prefix, job.run_id, job.job_id, EXTENSIONS[job.format])
        return self.settings.output_dir / image, self.settings.output_dir / sidecar_key(image)

    def sidecar(self, job: Job) -> dict[str, Any]:
        return json.loads(self.paths(job)[1].read_text(encoding="utf-8"))


@pytest.fixture
def setup(engine: Engine, tiny_model: Path, tmp_path: Path) -> Setup:
    return Setup(engine, local_worker_settings(tiny_model, tmp_path / "out"))


def assert_complete_sidecar(sidecar: dict[str, Any], job: Job) -> None:
    """Every field the sidecar must carry, with the executor's worker and timing parts."""
    assert SIDECAR_FIELDS <= sidecar.keys()
    assert (sidecar["job_id"], sidecar["run_id"], sidecar["prompt"], sidecar["seed"]) == (
        job.job_id,
        job.run_id,
        job.prompt,
        job.seed,
    )
    assert (sidecar["height"], sidecar["width"], sidecar["steps"], sidecar["guidance"]) == (
        job.height,
        job.width,
        job.steps,
        job.guidance,
    )
    assert sidecar["negative_prompt"] == job.negative_prompt
    assert sidecar["scheduler"] == (job.scheduler or "ddim")
    model = sidecar["model"]
    assert model["id"] and (model.get("revision") or model.get("hash"))
    assert set(sidecar["deepcache"]) == {"enabled", "interval", "branch"}
    batch = sidecar["batch"]
    assert {"id", "size", "index", "job_ids"} <= set(batch)
    assert batch["size"] == len(batch["job_ids"]) and batch["job_ids"][batch["index"]] == job.job_id
    timing = sidecar["timing"]
    assert TIMING_FIELDS <= set(timing)
    assert all(isinstance(timing[name], float) and timing[name] >= 0 for name in TIMING_FIELDS)
    assert timing["enqueued_at"] <= timing["started_at"] <= timing["finished_at"]
    assert timing["queue_wait_s"] == pytest.approx(timing["started_at"] - timing["enqueued_at"])
    assert timing["inference_s"] == pytest.approx(timing["batch_inference_s"] / batch["size"])
    worker = sidecar["worker"]
    assert {"hostname", "device", "torch", "diffusers", "deepcache"} <= set(worker)
    assert worker["hostname"] == socket.gethostname()
    assert worker["device"] == "cpu" and worker["deepcache"] == "0.1.1"


def test_mixed_deliveries(setup: Setup, tiny_model: Path) -> None:
    square = [make_job(i) for i in (0, 2, 5)]
    wide = [make_job(i, width=96, format="webp", negative_prompt="blurry") for i in (1, 4)]
    bad_height = {**make_job(3).model_dump(mode="json"), "height": 500}
    bad_run = {**make_job(7).model_dump(mode="json"), "run_id": "../escape", "seed": -1}
    deliveries = [
        deliver(square[0]),
        deliver(wide[0]),
        Delivery("task-bad-height", bad_height),
        deliver(square[1]),
        Delivery("task-not-a-dict", "generate a cat please"),
        deliver(wide[1]),
        Delivery("task-bad-run", bad_run),
        deliver(square[2]),
        Delivery("task-none", None),
    ]
    outcomes = setup.executor.execute(deliveries)

    assert [o.task_id for o in outcomes] == [d.task_id for d in deliveries]
    by_task = {o.task_id: o for o in outcomes}
    # Invalid payloads: failed with a reason naming the field and the value.
    bad = by_task["task-bad-height"]
    assert not bad.ok and bad.job_id is None and bad.batch_size == 0
    assert "height" in bad.reason and "500" in bad.reason and "multiple of 8" in bad.reason
    recorded = setup.reporter.get(RUN, "task-bad-height")
    assert recorded is not None and recorded.state is JobState.FAILED and recorded.reason == bad.reason
    assert not by_task["task-not-a-dict"].ok and "invalid job" in by_task["task-not-a-dict"].reason
    assert {by_task[task].error for task in ("task-bad-height", "task-not-a-dict", "task-none")} == {"invalid_job"}
    assert not by_task["task-none"].ok
    assert "run_id" in by_task["task-bad-run"].reason and "seed" in by_task["task-bad-run"].reason
    # Nothing recorded where the payload names no usable run.
    recorded_ids = {job_id for _, job_id in setup.reporter.states}
    assert not {"task-not-a-dict", "task-bad-run", "task-none"} & recorded_ids

    # Valid ones: one pipeline call per shape, files and sidecars written, reported done.
    for group, size, fmt in ((square, 3, "PNG"), (wide, 2, "WEBP")):
        batch_ids = None
        for job in group:
            outcome = by_task[job.job_id]
            image_path, sidecar_path = setup.paths(job)
            assert outcome == Outcome(job.job_id, True, job.job_id, str(image_path), batch_size=size)
            assert set(outcome.seconds) == {"queue_wait", "encode", "upload"}  # for the worker's metrics
            decoded = Image.open(io.BytesIO(image_path.read_bytes()))
            assert decoded.format == fmt and decoded.size == (job.width, job.height)
            sidecar = setup.sidecar(job)
            assert_complete_sidecar(sidecar, job)
            assert sidecar["image"] == str(image_path)
            assert sidecar["model"]["id"] == str(tiny_model)
            assert sidecar["deepcache"] == {"enabled": True, "interval": 3, "branch": 0}
            # The batch composition: which jobs shared the call, in order.
            assert sidecar["batch"]["job_ids"] == [j.job_id for j in group]
            assert sidecar["batch"]["size"] == size
            batch_ids = batch_ids or sidecar["batch"]["id"]
            assert sidecar["batch"]["id"] == batch_ids
            state = setup.reporter.get(RUN, job.job_id)
            assert state.state is JobState.DONE and state.key == str(image_path)
    assert setup.sidecar(wide[1])["negative_prompt"] == "blurry"
    files = sorted(p.name for p in setup.settings.output_dir.rglob("*") if p.is_file() and "manifest" not in p.parts)
    assert len(files) == 10 and not [name for name in files if name.startswith(".part-")]


def test_finished_jobs_are_skipped(setup: Setup, engine: Engine, monkeypatch) -> None:
    jobs = [make_job(i) for i in range(2)]
    first = setup.executor.execute([deliver(job) for job in jobs])
    assert all(o.ok for o in first)
    before = {job.job_id: setup.paths(job)[0].stat().st_mtime_ns for job in jobs}

    calls: list[int] = []
    generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda key, batch: calls.append(len(batch)) or generate(key, batch))
    third = make_job(2)
    again = setup.executor.execute([deliver(jobs[0]), deliver(third), deliver(jobs[1])])
    assert calls == [1]  # only the new job ran
    assert [o.ok for o in again] == [True, True, True]
    assert again[0] == Outcome(jobs[0].job_id, True, jobs[0].job_id, first[0].key, skipped="done")  # batch_size 0
    assert again[2].key == first[1].key and again[2].batch_size == 0
    assert again[1].batch_size == 1
    assert {job.job_id: setup.paths(job)[0].stat().st_mtime_ns for job in jobs} == before
    assert setup.reporter.get(RUN, jobs[0].job_id).state is JobState.DONE


def test_failed_jobs_are_retried_and_redelivery_writes_once(setup: Setup, engine: Engine) -> None:
    job = make_job(0)
    setup.reporter.mark(RUN, job.job_id, JobState.FAILED, reason="earlier failure")
    (outcome,) = setup.executor.execute([deliver(job)])
    assert outcome.ok and outcome.batch_size == 1
    image_path, sidecar_path = setup.paths(job)
    stamps = (image_path.stat().st_mtime_ns, sidecar_path.stat().st_mtime_ns)
    # A redelivery the state store does not know about (e.g. run twice at once on two workers):
    # it runs again, but the create-only storage keeps the first files.
    fresh = Setup(engine, setup.settings)
    (second,) = fresh.executor.execute([deliver(job)])
    assert second.ok and second.key == outcome.key
    assert (image_path.stat().st_mtime_ns, sidecar_path.stat().st_mtime_ns) == stamps
    assert json.loads(sidecar_path.read_text())["image_reused"] is False


def test_a_sidecar_written_after_an_earlier_image_says_so(setup: Setup, engine: Engine) -> None:
    """An earlier delivery stored the image and died before its sidecar: the new sidecar
    describes this batch, and flags that the stored pixels came from the earlier one."""
    job = make_job(0)
    setup.executor.execute([deliver(job)])
    image_path, sidecar_path = setup.paths(job)
    sidecar_path.unlink()
    (again,) = Setup(engine, setup.settings).executor.execute([deliver(job)])
    assert again.ok
    assert json.loads(sidecar_path.read_text())["image_reused"] is True


class PoisonEngine(Engine):
    """Fault injection: a real pipeline has no way to make one prompt of a batch fail, so this
    stub raises for any batch holding a prompt with POISON, alone or not."""

    calls: list[int]

    def generate(self, key, jobs: Sequence[Job]) -> Generated:
        self.calls.append(len(jobs))
        if any("POISON" in job.prompt for job in jobs):
            raise RuntimeError("poisoned prompt")
        return super().generate(key, jobs)


def test_one_bad_job_does_not_fail_its_batch(tiny_model: Path, tmp_path: Path) -> None:
    settings = local_worker_settings(tiny_model, tmp_path / "out")
    poison_engine = PoisonEngine.load(settings)
    poison_engine.calls = []
    setup = Setup(poison_engine, settings)
    jobs = [make_job(i, prompt="POISON cat" if i == 2 else f"cat {i}") for i in range(4)]
    outcomes = setup.executor.execute([deliver(job) for job in jobs])

    assert poison_engine.calls == [4, 1, 1, 1, 1]  # the batch, then each job alone
    assert outcomes[2].error == "generation" and [o.error for o in outcomes if o.ok] == [None] * 3
    calls = setup.executor.take_calls()  # what the worker's metrics count
    sizes_and_errors = [(call.size, call.error) for call in calls]
    assert sizes_and_errors == [(4, "generation"), (1, None), (1, None), (1, "generation"), (1, None)]
    assert all(call.seconds > 0 for call in calls if call.error is None) and setup.executor.take_calls() == []
    assert [o.ok for o in outcomes] == [True, True, False, True]
    assert "generation failed" in outcomes[2].reason and "poisoned prompt" in outcomes[2].reason
    assert outcomes[2].job_id == jobs[2].job_id
    state = setup.reporter.get(RUN, jobs[2].job_id)
    assert state.state is JobState.FAILED and "poisoned prompt" in state.reason
    assert not setup.paths(jobs[2])[0].exists()
    for job, outcome in zip(jobs, outcomes, strict=True):
        if job.index == 2:
            continue
        assert outcome.batch_size == 1
        sidecar = setup.sidecar(job)
        assert sidecar["batch"]["size"] == 1 and sidecar["batch"]["job_ids"] == [job.job_id]
        assert setup.reporter.get(RUN, job.job_id).state is JobState.DONE


class OutOfMemoryEngine(Engine):
    """Fault injection: a CPU has no device memory to run out of, so this engine raises torch's own
    OutOfMemoryError, as a GPU does, for any batch larger than ``fits`` images and for any batch
    holding a prompt with HUGE (too big even alone). It records the batch sizes tried and how
    often the executor emptied the allocator."""

    calls: list[int]
    fits: int
    freed: int

    def generate(self, key, jobs: Sequence[Job]) -> Generated:
        import torch

        self.calls.append(len(jobs))
        if len(jobs) > self.fits or any("HUGE" in job.prompt for job in jobs):
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(jobs)} GiB (injected)")
        return super().generate(key, jobs)

    def free_memory(self) -> None:
        self.freed += 1
        super().free_memory()


def oom_setup(tiny_model: Path, tmp_path: Path, fits: int) -> tuple[Setup, OutOfMemoryEngine]:
    settings = local_worker_settings(tiny_model, tmp_path / "out", max_batch=8)
    engine = OutOfMemoryEngine.load(settings)
    engine.calls, engine.fits, engine.freed = [], fits, 0
    return Setup(engine, settings), engine


def test_out_of_memory_splits_the_batch_in_halves(tiny_model: Path, tmp_path: Path) -> None:
    setup, engine = oom_setup(tiny_model, tmp_path, fits=2)
    jobs = [make_job(i, steps=2) for i in range(8)]
    outcomes = setup.executor.execute([deliver(job) for job in jobs])

    assert engine.calls == [8, 4, 2, 2, 4, 2, 2]  # 8 -> 4 + 4 -> 2 + 2 each; never one by one
    assert engine.freed == 3  # after each failed try
    assert all(o.ok for o in outcomes) and [o.batch_size for o in outcomes] == [2] * 8
    assert setup.sidecar(jobs[0])["batch"]["job_ids"] == [jobs[0].job_id, jobs[1].job_id]
    assert all(setup.reporter.get(RUN, job.job_id).state is JobState.DONE for job in jobs)


def test_a_job_out_of_memory_alone_fails_alone_with_the_reason(tiny_model: Path, tmp_path: Path) -> None:
    setup, engine = oom_setup(tiny_model, tmp_path, fits=8)
    jobs = [make_job(i, steps=2, prompt="HUGE cat" if i == 2 else f"cat {i}") for i in range(4)]
    outcomes = setup.executor.execute([deliver(job) for job in jobs])

    assert engine.calls == [4, 2, 2, 1, 1]  # the whole, its halves, then the failing half's jobs
    assert [o.ok for o in outcomes] == [True, True, False, True]
    assert [o.batch_size for o in outcomes] == [2, 2, 0, 1]
    reason = outcomes[2].reason
    assert reason.startswith("out of memory with this job alone: OutOfMemoryError(") and "injected" in reason
    assert outcomes[2].error == "out_of_memory"
    state = setup.reporter.get(RUN, jobs[2].job_id)
    assert state.state is JobState.FAILED and state.reason == reason


def test_out_of_memory_is_told_from_other_errors() -> None:
    import torch

    from worker.pipeline.engine import is_out_of_memory

    try:  # a real one: torch's CPU allocator refusing 4 PiB (more than any address space)
        torch.empty(2**50)
    except RuntimeError as error:
        real = error
    else:
        pytest.fail("allocating 4 PiB succeeded")
    assert "can't allocate memory" in str(real) and is_out_of_memory(real)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB)"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("poisoned prompt"))
    assert not is_out_of_memory(ValueError("out of memory, says a validator"))  # not a runtime error


def test_unsupported_recipes_fail_with_a_reason(setup: Setup) -> None:
    branch = make_job(1, cache_branch=7)  # valid in the contract, not in the tiny UNet
    fine = make_job(2)
    outcomes = setup.executor.execute([deliver(branch), deliver(fine)])
    assert [o.ok for o in outcomes] == [False, True]
    assert "cache_branch 7" in outcomes[0].reason and outcomes[0].batch_size == 0
    assert outcomes[0].error == "unsupported"
    assert setup.reporter.get(RUN, branch.job_id).state is JobState.FAILED
    assert not setup.paths(branch)[0].exists()


def test_a_job_for_another_model_fails_alone_and_sidecars_name_the_alias(
    engine: Engine, tiny_model: Path, tmp_path: Path
) -> None:
    """A worker serving alias "sd": a job naming "sdxl" (sent to the wrong queue by hand) fails
    with the reason; its batch peers, naming "sd" or no model, are made, their sidecars saying so."""
    setup = Setup(engine, local_worker_settings(tiny_model, tmp_path / "out", model_alias="sd"))
    other, named, plain = make_job(1, model="sdxl"), make_job(2, model="sd"), make_job(3)
    outcomes = setup.executor.execute([deliver(other), deliver(named), deliver(plain)])
    assert [o.ok for o in outcomes] == [False, True, True]
    assert outcomes[0].reason == "the job asks for model 'sdxl'; this worker serves model 'sd'"
    assert outcomes[0].error == "unsupported" and not setup.paths(other)[0].exists()
    assert setup.reporter.get(RUN, other.job_id).state is JobState.FAILED
    for job in (named, plain):
        model = setup.sidecar(job)["model"]
        assert model["alias"] == "sd" and model["id"] == str(tiny_model)


def test_a_repeating_scheduler_without_a_cache_setting_runs_uncached(setup: Setup) -> None:
    """The contract turns caching off for heun when the job names no interval, so the worker's
    default interval (3 here) cannot break it."""
    heun = make_job(0, scheduler="heun", steps=2)
    assert heun.cache_interval == 1
    (outcome,) = setup.executor.execute([deliver(heun)])
    assert outcome.ok, outcome.reason
    assert setup.sidecar(heun)["deepcache"]["enabled"] is False


class FlakyStorage(LocalStorage):
    """Fault injection: the upload of one key fails."""

    def __init__(self, root: Path, failing: str) -> None:
        super().__init__(root)
        self.failing = failing

    def put(self, key: str, data: bytes, *, content_type: str, metadata: dict[str, str]) -> bool:
        if self.failing in key:
            raise StorageError(f"upload of {key} failed: injected")
        return super().put(key, data, content_type=content_type, metadata=metadata)


def test_a_failed_upload_fails_only_its_job(setup: Setup, engine: Engine) -> None:
    jobs = [make_job(i) for i in range(3)]
    setup.executor.storage = FlakyStorage(setup.settings.output_dir, jobs[1].job_id)
    outcomes = setup.executor.execute([deliver(job) for job in jobs])
    assert [o.ok for o in outcomes] == [True, False, True]
    assert "storing failed" in outcomes[1].reason and jobs[1].job_id in outcomes[1].reason
    assert outcomes[1].error == "storage" and outcomes[1].seconds == {}
    assert setup.reporter.get(RUN, jobs[1].job_id).state is JobState.FAILED
    assert setup.sidecar(jobs[2])["batch"]["size"] == 3


def test_s3_storage_with_a_non_ascii_prompt(
    engine: Engine, tiny_model: Path, tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    import boto3

    settings = local_worker_settings(
        tiny_model, tmp_path, storage="s3", s3_bucket=s3_bucket, s3_prefix="/datasets/", s3_endpoint_url=s3_endpoint
    )
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    reporter = MemoryReporter()
    executor = BatchExecutor(engine, S3Storage(client, s3_bucket), reporter, settings)
    job = make_job(0, prompt="日本の猫 — “quoted” émoji 🐱", format="jpeg", steps=2)
    (outcome,) = executor.execute([deliver(job)])
    assert outcome.ok, outcome.reason
    key = f"datasets/{RUN}/images/{job.job_id}.jpg"
    assert outcome.key == f"s3://{s3_bucket}/{key}"
    head = client.head_object(Bucket=s3_bucket, Key=key)
    assert head["ContentType"] == "image/jpeg"
    assert head["Metadata"]["job-id"] == job.job_id and head["Metadata"]["seed"] == str(job.seed)
    assert all(value.isascii() for value in head["Metadata"].values())
    body = client.get_object(Bucket=s3_bucket, Key=key.replace(".jpg", ".json"))["Body"].read()
    sidecar = json.loads(body.decode("utf-8"))
    assert sidecar["prompt"] == job.prompt and sidecar["image"] == outcome.key
    assert_complete_sidecar(sidecar, job)
    assert Image.open(io.BytesIO(client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())).format == "JPEG"


def test_executor_groups_what_direct_callers_mix(setup: Setup) -> None:
    """More same-shape jobs than max_batch: split into calls of at most max_batch."""
    jobs = [make_job(i, steps=2) for i in range(6)]
    outcomes = setup.executor.execute([deliver(job) for job in jobs])
    assert [o.batch_size for o in outcomes] == [4, 4, 4, 4, 2, 2]
    assert setup.sidecar(jobs[5])["batch"]["job_ids"] == [jobs[4].job_id, jobs[5].job_id]


def test_no_enqueue_time_gives_no_queue_wait(setup: Setup) -> None:
    job = make_job(0, steps=2)
    (outcome,) = setup.executor.execute([Delivery(job.job_id, job.model_dump(mode="json"))])
    assert outcome.ok
    timing = setup.sidecar(job)["timing"]
    assert timing["enqueued_at"] is None and timing["queue_wait_s"] is None
    assert set(outcome.seconds) == {"encode", "upload"}  # no queue wait to measure
