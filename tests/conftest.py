"""Real servers for the tests: a Redis and a moto S3 server on loopback, and a tiny model.

Each is started once per session on a free port, so the suite never touches a developer's
own Redis data and runs the same in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from ops.localstack import AWS_ENV, start_moto, start_redis, stop


def pytest_configure(config: pytest.Config) -> None:
    # One OpenMP thread per torch process. The suite runs many at once (pytest-xdist's workers,
    # each test's worker and pool processes) on few cores, where OpenMP's spinning threads wait
    # on each other: a 0.2 s batch of the tiny model took 14 s under load, past its time limit.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


#: The files that take longest on 2 cores (compiles, fault runs, real workers), longest first:
#: collected first, so pytest-xdist (``--dist loadfile --no-loadscope-reorder``; by default it
#: reorders files by their number of tests) starts them first and the short files fill in beside
#: them, instead of one worker running a long file alone at the end.
LONGEST_FIRST = (
    "tests/worker/test_acceleration_sd15.py",
    "tests/worker/test_acceleration.py",
    "tests/ops/test_gpu_bench.py",
    "tests/faults/test_redis_and_worker_faults.py",
    "tests/faults/test_all_faults_in_one_run.py",
    "tests/integration/test_faults.py",
    "tests/integration/test_startup.py",
    "tests/integration/test_readme.py",
    "tests/faults/test_storage_and_poison_faults.py",
    "tests/ops/test_queue_benches.py",
    "tests/faults/test_unreadable_entries.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[str]:
    """``redis://127.0.0.1:PORT``: a private redis-server (or DEEPQUEUE_TEST_REDIS_URL)."""
    if os.environ.get("DEEPQUEUE_TEST_REDIS_URL"):
        yield os.environ["DEEPQUEUE_TEST_REDIS_URL"].rstrip("/")
        return
    process, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    stop(process)


@pytest.fixture
def redis_urls(redis_server: str) -> Iterator[tuple[str, str]]:
    """(broker URL, result backend URL) on two empty databases."""
    broker, backend = f"{redis_server}/0", f"{redis_server}/1"
    for url in (broker, backend):
        redis.Redis.from_url(url).flushdb()
    yield broker, backend


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server (real HTTP on loopback) in its own process."""
    process, url = start_moto()
    yield url
    stop(process)


@pytest.fixture
def aws_env(monkeypatch) -> dict[str, str]:
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    return AWS_ENV


@pytest.fixture
def s3_bucket(s3_endpoint: str, aws_env) -> str:
    """A new, empty bucket on the moto server."""
    import boto3

    name = f"dq-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


def run_folder(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The run's temporary folder, shared by all of pytest-xdist's workers."""
    root = tmp_path_factory.getbasetemp()
    return root if worker_id == "master" else root.parent


def made_once(path: Path, make: Callable[[Path], object]) -> Path:
    """``path``, made by ``make(partial)`` and renamed into place by the first pytest-xdist worker
    to ask; the others wait on a lock beside it, then use it. Models and kernels built once per run
    are also one model id and one compile cache folder for every worker."""
    from filelock import FileLock

    with FileLock(f"{path}.lock"):
        if not path.exists():
            partial = path.with_name(f"{path.name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            make(partial)
            partial.rename(path)
    return path


def shared_model(tmp_path_factory: pytest.TempPathFactory, worker_id: str, arch: str) -> Path:
    pytest.importorskip("torch")
    from worker.pipeline.testmodel import build_test_model

    folder = run_folder(tmp_path_factory, worker_id) / f"model-{arch}"
    return made_once(folder, lambda path: build_test_model(path, arch))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, worker_id: str) -> Path:
    """The tiny random-weight SD pipeline, built once per run and loaded via from_pretrained."""
    return shared_model(tmp_path_factory, worker_id, "tiny")


@pytest.fixture(scope="session")
def sdxl_tiny(tmp_path_factory, worker_id: str) -> Path:
    """The tiny random-weight SDXL pipeline (two text encoders, ``text_time``), built once per run."""
    return shared_model(tmp_path_factory, worker_id, "sdxl-tiny")


@pytest.fixture(scope="session")
def tiny_loras(tiny_model: Path, tmp_path_factory, worker_id: str) -> tuple[Path, Path]:
    """Two random LoRAs for the tiny model (seeds 1 and 2), built once per run: folders holding
    ``pytorch_lora_weights.safetensors``, as ``deepqueue make-test-lora`` writes them."""
    from worker.pipeline.testlora import build_test_lora

    root = run_folder(tmp_path_factory, worker_id)
    return tuple(  # type: ignore[return-value]
        made_once(root / f"lora-tiny-{seed}", lambda path, seed=seed: build_test_lora(tiny_model, path, seed=seed))
        for seed in (1, 2)
    )


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory, worker_id: str) -> Path:
    """One DEEPQUEUE_COMPILE_CACHE for the whole run, shared by pytest-xdist's workers (inductor
    writes its cache entries atomically, so two processes may fill it at once)."""
    path = run_folder(tmp_path_factory, worker_id) / "compile-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def compiled_tiny(tiny_model: Path, compile_cache: Path) -> Path:
    """``compile_cache`` holding the tiny model's kernels at 64x64, two images, guided: DeepCache's
    full and shallow steps, plain steps and the VAE decoder. Compiled once per run (about 90 s of
    CPU on 2 cores); the tests and workers that meet these shapes read them back, as a restarted
    worker does, instead of each compiling them again."""

    def compile_kernels(done: Path) -> None:
        import torch

        from tests.helpers import make_job
        from worker.delivery.batching import batch_key
        from worker.pipeline.engine import Engine
        from worker.settings import WorkerSettings

        settings = WorkerSettings(
            model=str(tiny_model), device="cpu", acceleration="compile", compile_cache=compile_cache
        )
        engine, defaults = Engine.load(settings), settings.recipe_defaults()
        compiles = []
        for cache_interval in (3, 1):  # DeepCache's steps, then plain steps
            jobs = [make_job(i, cache_interval=cache_interval, steps=3) for i in range(2)]
            compiles.append(engine.generate(batch_key(jobs[0], defaults), jobs).compiles)
        torch._dynamo.reset()  # this process's compiled code must not serve its later tests
        done.write_text(json.dumps(compiles))

    made_once(compile_cache / "tiny-64x64x2.json", compile_kernels)
    return compile_cache


@pytest.fixture
def s3_worker_env(redis_urls, s3_endpoint, tiny_model) -> dict[str, str]:
    """The environment of a CPU worker on the test Redis, a new bucket and the tiny model."""
    from ops.localstack import moto_s3_client, worker_env

    bucket = f"dq-{uuid.uuid4().hex[:12]}"
    moto_s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    broker, backend = redis_urls
    return worker_env(
        broker_url=broker,
        result_backend=backend,
        s3_endpoint=s3_endpoint,
        bucket=bucket,
        model=str(tiny_model),
        device="cpu",
        max_wait_s=0.5,
    )


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port on loopback that accepts every connection and never answers: an S3 or Redis that
    hangs (a proxy whose backend died, a server still starting, a full backlog)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()
    for connection in held:
        connection.close()


@pytest.fixture(scope="session")
def score_models(tmp_path_factory, worker_id: str) -> dict[str, Path]:
    """The tiny random CLIP and safety checker (``worker.pipeline.testscores``), built once per
    run: ``{"clip": folder, "nsfw": folder}``."""
    pytest.importorskip("torch")
    from worker.pipeline.testscores import build_test_clip, build_test_safety_checker

    root = run_folder(tmp_path_factory, worker_id)
    return {
        "clip": made_once(root / "score-clip-tiny", build_test_clip),
        "nsfw": made_once(root / "score-nsfw-tiny", build_test_safety_checker),
    }
