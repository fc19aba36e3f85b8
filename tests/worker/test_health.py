"""worker.health: what a worker's /livez and /readyz say, and its server on a real socket."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from types import SimpleNamespace

from celery.worker import state as worker_state
from prometheus_client.parser import text_string_to_metric_families

from worker.delivery.consumer import LOOP_LOSSES, ReconnectLoop
from worker.health import not_live, not_ready, start_server
from worker.metrics import WorkerMetrics
from worker.runtime import WorkerRuntime
from worker.settings import WorkerSettings


def runtime() -> WorkerRuntime:
    """A worker's runtime as its first bootstep makes it (nothing starts, nothing connects)."""
    return WorkerRuntime.create(WorkerSettings(broker_url="redis://127.0.0.1:6379/9"), "gpu0@host")


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode(), response.headers["Content-Type"]
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), error.headers["Content-Type"]


def test_the_server_answers_metrics_and_probes() -> None:
    metrics = WorkerMetrics()
    state = {"ready": "loading pipeline"}
    server = start_server(metrics.registry, "127.0.0.1", 0, live=lambda: None, ready=lambda: state["ready"])
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert get(f"{base}/livez")[:2] == (200, "ok\n")
        assert get(f"{base}/readyz")[:2] == (503, "loading pipeline\n")
        state["ready"] = None
        assert get(f"{base}/readyz?verbose")[:2] == (200, "ready\n")
        status, body, content_type = get(f"{base}/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=")
        names = {family.name for family in text_string_to_metric_families(body)}
        assert {"deepqueue_images", "deepqueue_stage_seconds", "deepqueue_worker_info"} <= names
        assert get(f"{base}/")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


def test_ready_means_a_built_pipeline_and_no_shutdown(monkeypatch) -> None:
    state = runtime()
    assert not_ready(state) == "loading pipeline"
    state.serving = True
    assert not_ready(state) is None
    monkeypatch.setattr(worker_state, "should_stop", 0)  # what Celery's SIGTERM handler sets: EX_OK
    assert not_ready(state) == "shutting down"


def test_live_means_a_lease_thread_that_runs_and_a_consumer_not_stuck_reconnecting() -> None:
    worker = SimpleNamespace(deepqueue=runtime(), consumer=SimpleNamespace(reconnect_loop=ReconnectLoop()))
    assert not_live(worker) is None  # its lease thread not started yet
    now = time.monotonic()
    for second in range(LOOP_LOSSES):
        worker.consumer.reconnect_loop.lost(now - second, ConnectionError("reset"))
    problem = not_live(worker)
    assert problem is not None and problem.startswith("stuck reconnecting")
    worker.consumer = None
    worker.deepqueue.leases._thread = SimpleNamespace(is_alive=lambda: False)  # died, not stopped
    assert not_live(worker) == "lease keeper thread stopped"
