"""Real servers for the tests: a Redis and a moto S3 server on loopback, and a tiny model.

Each is started once per session on a free port, so the suite never touches a developer's
own Redis data and runs the same in CI.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from ops.localstack import AWS_ENV, start_moto, start_redis, stop


def pytest_configure(config: pytest.Config) -> None:
    # One OpenMP thread per torch process. The suite runs many at once (pytest-xdist's workers,
    # each test's worker and pool processes) on few cores, where OpenMP's spinning threads wait
    # on each other: a 0.2 s batch of the tiny model took 14 s under load, past its time limit.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


#: Files whose tests take minutes on 2 cores (compiles, the all-faults run). They are collected
#: first, so pytest-xdist starts them first and the short files fill in beside them, instead of
#: one worker running them alone at the end.
LONGEST_FIRST = (
    "tests/ops/test_gpu_bench.py",
    "tests/worker/test_acceleration.py",
    "tests/faults/test_all_faults_in_one_run.py",
    "tests/integration/test_startup.py",
    "tests/integration/test_acceleration_worker.py",
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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny random-weight SD pipeline, built once and loaded via from_pretrained."""
    pytest.importorskip("torch")
    from worker.pipeline.testmodel import build_test_model

    return build_test_model(tmp_path_factory.mktemp("models") / "tiny", "tiny")


@pytest.fixture(scope="session")
def sdxl_tiny(tmp_path_factory) -> Path:
    """The tiny random-weight SDXL pipeline (two text encoders, ``text_time``), built once."""
    pytest.importorskip("torch")
    from worker.pipeline.testmodel import build_test_model

    return build_test_model(tmp_path_factory.mktemp("models") / "sdxl-tiny", "sdxl-tiny")


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory, worker_id: str) -> Path:
    """One DEEPQUEUE_COMPILE_CACHE for the whole run, shared by pytest-xdist's workers: a graph
    compiles once (minutes on 2 cores), then every later test and worker process reads it back
    (inductor writes its cache entries atomically, so two processes may fill it at once)."""
    root = tmp_path_factory.getbasetemp()
    path = (root if worker_id == "master" else root.parent) / "compile-cache"
    path.mkdir(exist_ok=True)
    return path


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
