"""The health probes and metrics server of a worker, served by its main process.

``GET /metrics`` (Prometheus text format, ``worker.metrics``), ``GET /livez`` and ``GET /readyz``
on ``DEEPQUEUE_METRICS_HOST:DEEPQUEUE_METRICS_PORT`` (``0.0.0.0:9808``; port 0 turns the server
off). ``MetricsServer`` is a worker bootstep that starts the server right after the pool forks,
while the pool process is still loading the pipeline: ``/livez`` answers 200 ``ok`` as long as
the main process runs, its lease thread lives and its consumer is not stuck reconnecting to the
broker (``worker.delivery.consumer.ReconnectLoop``), else 503 with the reason; ``/readyz`` answers 503 with
a one-line reason (``loading pipeline``, ``shutting down``) until ``PipelineGate`` has seen the
pipeline built, and 200 ``ready`` from then on until the worker begins to shut down. A port
already taken stops the worker before it is ready (exit code 70), as any other start-up failure
does.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from celery import bootsteps
from celery.worker import state as worker_state
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from worker.runtime import Runtime, WorkerRuntime
from worker.startup import StartupError

logger = logging.getLogger(__name__)


class HealthServer(ThreadingHTTPServer):
    """``/metrics``, ``/livez``, ``/readyz``; a probe is a function that returns why it fails, or None."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        *,
        live: Callable[[], str | None],
        ready: Callable[[], str | None],
    ) -> None:
        self.registry = registry
        self.probes = {"/livez": (live, "ok"), "/readyz": (ready, "ready")}
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: HealthServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body = generate_latest(self.server.registry)
            except Exception as error:  # a broken collector: say so, keep serving the probes
                logger.exception("cannot render /metrics")
                self._send(500, f"cannot render metrics: {error!r}\n".encode(), "text/plain; charset=utf-8")
                return
            self._send(200, body, CONTENT_TYPE_LATEST)
        elif path in self.server.probes:
            probe, fine = self.server.probes[path]
            problem = probe()
            self._send(200 if problem is None else 503, f"{problem or fine}\n".encode(), "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found: try /metrics, /livez or /readyz\n", "text/plain; charset=utf-8")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("metrics server: " + format, *args)


def start_server(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    live: Callable[[], str | None],
    ready: Callable[[], str | None],
) -> HealthServer:
    """Serve ``registry`` and the probes on a daemon thread (``port`` 0: any free port).

    Processes forked later (a pool process replacing one that died) close their copy of the
    listening socket, so that only this process holds the port.
    """
    server = HealthServer((host, port), registry, live=live, ready=ready)
    threading.Thread(target=server.serve_forever, name="deepqueue-metrics", daemon=True).start()
    reference = weakref.ref(server)

    def close_in_child() -> None:
        forked = reference()
        if forked is not None:
            forked.socket.close()

    os.register_at_fork(after_in_child=close_in_child)
    return server


def not_live(worker: Any) -> str | None:
    """Why the main process should be restarted, or None."""
    if not worker.deepqueue.leases.alive():
        return "lease keeper thread stopped"
    loop = getattr(getattr(worker, "consumer", None), "reconnect_loop", None)
    return loop.problem(time.monotonic()) if loop is not None else None


def not_ready(runtime: WorkerRuntime) -> str | None:
    """Why the worker takes no jobs, or None."""
    if worker_state.should_stop is not None or worker_state.should_terminate is not None:
        return "shutting down"
    if not runtime.serving:
        return "loading pipeline"
    return None


class MetricsServer(bootsteps.StartStopStep):
    """Worker bootstep: the worker's metrics and health server (see the module's docstring).

    It starts after the pool has forked (no server thread or socket is copied into the pool
    process) and before ``PipelineGate`` waits for the pipeline, which requires it.
    """

    requires = ("celery.worker.components:Pool", Runtime)
    label = "MetricsServer"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        runtime: WorkerRuntime = worker.deepqueue
        runtime.metrics.ready.set_function(lambda: float(not_ready(runtime) is None))
        self.server: HealthServer | None = None
        super().__init__(worker, **kwargs)

    def start(self, worker: Any) -> None:
        runtime: WorkerRuntime = worker.deepqueue
        settings = runtime.settings
        if not settings.metrics_port:
            logger.info("metrics and health server off (DEEPQUEUE_METRICS_PORT=0)")
            return
        try:
            self.server = start_server(
                runtime.metrics.registry,
                settings.metrics_host,
                settings.metrics_port,
                live=partial(not_live, worker),
                ready=partial(not_ready, runtime),
            )
        except OSError as error:
            raise StartupError(
                f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} ({error}): "
                "set DEEPQUEUE_METRICS_PORT to a free port, or 0 to turn the server off"
            ) from error
        logger.info(
            "metrics and health on http://%s:%d (/metrics, /livez, /readyz)",
            settings.metrics_host,
            settings.metrics_port,
        )

    def stop(self, worker: Any) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
