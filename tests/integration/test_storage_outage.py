"""An S3 outage mid-run, caused for real: the S3 server stops (its port closed: connection refused)
for about 5 s and comes back on the same port. Every job ends done and each object is written
once; while storage is down no new batch generates once the backlog is full, nothing is failed or
reported final, and the worker logs one line when storage goes and one when it is back.

The server is moto's S3 app served over real HTTP from this test's process (as moto's
ThreadedMotoServer does, but closing its port on stop and answering one request per connection,
so no kept-alive connection outlives the stop). Its buckets live in this process's memory, so
they survive the restart as a real S3's do; a moto subprocess restarted on the same port would
come back empty. The executor's S3 client makes one attempt per call (botocore's own retries
off), so the retrying seen here is deepqueue's.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_until

pytest.importorskip("torch")
pytest.importorskip("diffusers")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

from botocore.config import Config  # noqa: E402
from moto.moto_server.werkzeug_app import (  # noqa: E402
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server  # noqa: E402

from ops.localstack import free_port  # noqa: E402
from producer.job import Job  # noqa: E402
from producer.storage import S3Storage  # noqa: E402
from tests.helpers import deliveries as make_deliveries  # noqa: E402
from tests.helpers import local_worker_settings, make_job  # noqa: E402
from worker.embedded import MemoryReporter  # noqa: E402
from worker.pipeline.engine import Engine  # noqa: E402
from worker.pipeline.executor import BatchExecutor, Outcome  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN = "outage"
OUTAGE_S = 5.0
WAIT_S = 120  # only a bound on a hang


class OneRequestPerConnection(MotoRequestHandler):
    protocol_version = "HTTP/1.0"  # no keep-alive: a stop leaves no open connection behind


class RestartableS3:
    """moto's S3 on one loopback port across stops and starts, its data kept in this process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._app = DomainDispatcherApplication(create_backend_app)
        self._server: Any = None

    def start(self) -> None:
        self._server = make_server(
            "127.0.0.1", self.port, self._app, threaded=True, request_handler=OneRequestPerConnection
        )
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Stop serving and close the port: new connections are refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def s3_server(aws_env):
    server = RestartableS3()
    server.start()
    yield server
    server.stop()


class CountingEngine:
    """The real engine; counts its pipeline calls."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.calls = engine, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def generate(self, key: Any, jobs: list[Job]) -> Any:
        self.calls += 1
        return self.engine.generate(key, jobs)


job = partial(make_job, run_id=RUN, steps=2)
deliveries = partial(make_deliveries, run_id=RUN, steps=2)


def test_jobs_wait_through_an_s3_outage_and_are_written_once(
    s3_server: RestartableS3, tiny_model: Path, tmp_path: Path, caplog
) -> None:
    config = Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10)
    client = boto3.client("s3", endpoint_url=s3_server.url, config=config)
    bucket = "outage"
    client.create_bucket(Bucket=bucket)
    # Versioned: a second write of a key would show as a second version.
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    settings = local_worker_settings(
        tiny_model,
        tmp_path,
        storage="s3",
        s3_bucket=bucket,
        s3_endpoint_url=s3_server.url,
        max_batch=2,
        store_backlog=2,
        store_threads=2,
        store_retry_s=WAIT_S,
    )
    engine = CountingEngine(Engine.load(settings))
    executor = BatchExecutor(engine, S3Storage(client, bucket), MemoryReporter(), settings)  # type: ignore[arg-type]
    outcomes: list[Outcome] = []
    with caplog.at_level(logging.INFO, logger="worker.output.store_retry"):
        outcomes += executor.execute(deliveries(0, 1))  # S3 up
        assert executor.store_retry.available

        s3_server.stop()
        down_at = time.monotonic()
        outcomes += executor.submit(deliveries(2, 3))  # generates; its uploads fail and wait
        third = threading.Thread(target=lambda: outcomes.extend(executor.submit(deliveries(4, 5))))
        third.start()
        wait_until(lambda: not executor.store_retry.available, WAIT_S, "the uploads to fail")
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
        # Paused: the full backlog holds the third batch back; nothing failed, nothing is final.
        assert engine.calls == 2 and third.is_alive()
        assert executor.collect() == [] and executor.backlog.pending == 2

        s3_server.start()
        back_at = time.monotonic()
        third.join(WAIT_S)
        assert not third.is_alive()
        outcomes += executor.collect(wait=True, timeout=WAIT_S)
        recovered_s = time.monotonic() - back_at
    executor.close()

    assert sorted(o.job_id for o in outcomes) == sorted(job(i).job_id for i in range(6))
    assert all(o.ok for o in outcomes), [o.reason for o in outcomes if not o.ok]
    assert engine.calls == 3 and recovered_s < 60
    # Written once: one version per key, and every sidecar says its image was written by this run.
    versions = client.list_object_versions(Bucket=bucket, Prefix=f"{RUN}/images/")  # not the manifest part
    keys = [version["Key"] for version in versions.get("Versions", [])]
    assert len(keys) == 12 and len(set(keys)) == 12 and not versions.get("DeleteMarkers")
    for i in range(6):
        sidecar = client.get_object(Bucket=bucket, Key=f"{RUN}/images/{job(i).job_id}.json")["Body"].read()
        assert json.loads(sidecar)["image_reused"] is False
    # One line when storage went, one when it came back (again only if it flapped), not one per attempt.
    lines = [record.getMessage() for record in caplog.records if record.name == "worker.output.store_retry"]
    went = [line for line in lines if line.startswith("storage unavailable (")]
    back = [line for line in lines if line.startswith("storage available again after")]
    assert len(went) == len(back) >= 1 and len(lines) == 2 * len(went)
    assert "Could not connect" in went[0]
