"""A fault suite (marker ``faults``): real Redis, S3 and worker processes, and real faults.

Every test reports its counts the same way (``FaultCounts``): jobs accepted, done, failed with a
reason, lost, objects written twice, and seconds from the end of the fault to the last job done.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ops.localstack import client_for, free_port, moto_s3_client, start_redis, stop, worker_env
from producer import JobState


class RestartableRedis:
    """A redis-server with an fsync-always append-only file, on one port across restarts."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process, _ = start_redis(self.data_dir, port=self.port, persistent=True)

    def kill(self) -> None:
        """SIGKILL: what was acknowledged is in the append-only file, nothing else survives."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop(self.process)


def pool_processes(worker: subprocess.Popen) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def kill_worker(worker: subprocess.Popen) -> None:
    """SIGKILL a worker and its pool processes: a machine or container gone at once."""
    for pid in (*pool_processes(worker), worker.pid):
        os.kill(pid, signal.SIGKILL)
    worker.wait()


def stop_running(*workers: subprocess.Popen | None) -> None:
    """Warm-stop the workers a test started that are still running."""
    for worker in workers:
        if worker is not None and worker.poll() is None:
            stop(worker)


@pytest.fixture
def restartable_redis(tmp_path) -> Iterator[RestartableRedis]:
    server = RestartableRedis(tmp_path / "redis")
    server.data_dir.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fault_env(restartable_redis, s3_endpoint, tiny_model) -> dict[str, str]:
    """A CPU worker's environment on the restartable Redis and a new versioned bucket (a second
    write of a key would show as a second version)."""
    bucket = f"dq-{uuid.uuid4().hex[:12]}"
    s3 = moto_s3_client(s3_endpoint)
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return worker_env(
        broker_url=f"{restartable_redis.url}/0",
        result_backend=f"{restartable_redis.url}/1",
        s3_endpoint=s3_endpoint,
        bucket=bucket,
        model=str(tiny_model),
        device="cpu",
        max_wait_s=0.5,
    )


@dataclass
class FaultCounts:
    accepted: int
    done: int
    failed: int
    lost: int
    written_twice: int
    recovery_s: float | None  # fault end -> last job done or failed

    @classmethod
    def measure(cls, env: dict[str, str], runs: dict[str, int], fault_ended_at: float) -> FaultCounts:
        """Counts over ``runs`` (run name -> jobs accepted), read from Redis and the bucket."""
        done = failed = 0
        finished_at = 0.0
        with client_for(env) as client:
            for run_id in runs:
                run = client.run(run_id)
                finished_at = max(finished_at, (run.span() or (0.0, 0.0))[1])
                for result in run.results():
                    if result.state is JobState.DONE:
                        done += 1
                    elif result.state is JobState.FAILED:
                        failed += 1
                        assert result.reason, f"job {result.job_id} failed without a reason"
        versions = versions_per_key(env)
        accepted = sum(runs.values())
        return cls(
            accepted=accepted,
            done=done,
            failed=failed,
            lost=accepted - done - failed,
            written_twice=sum(count > 1 for count in versions.values()),
            recovery_s=round(finished_at - fault_ended_at, 1) if finished_at else None,
        )

    def report(self, fault: str) -> None:
        print(
            f"\n[fault] {fault}: accepted {self.accepted}, done {self.done}, failed with reason {self.failed}, "
            f"lost {self.lost}, written twice {self.written_twice}, fault end -> last finished {self.recovery_s} s"
        )


def versions_per_key(env: dict[str, str]) -> dict[str, int]:
    s3 = moto_s3_client(env["DEEPQUEUE_S3_ENDPOINT_URL"])
    counts: dict[str, int] = {}
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=env["DEEPQUEUE_S3_BUCKET"]):
        for version in page.get("Versions", []):
            if not version["Key"].startswith(".deepqueue/"):
                counts[version["Key"]] = counts.get(version["Key"], 0) + 1
    return counts


class CuttableProxy:
    """A TCP proxy on loopback in front of a server: ``cut()`` closes its port and every
    connection through it (clients get "connection refused", a real network fault), ``restore()``
    listens on the same port again. The server behind it keeps its state throughout."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            sockets, self._connections = [self._listener, *self._connections], []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._connections += [client, upstream]
            state: dict[str, bytes] = {}  # what one connection's pipes know of it
            for source, sink in ((client, upstream), (upstream, client)):
                args = (source, sink, source is client, state)
                threading.Thread(target=self._pipe, args=args, daemon=True).start()

    def passes(self, data: bytes, from_client: bool, state: dict[str, bytes]) -> bool:
        """Whether data goes through; if not, it is dropped with its connection."""
        return True

    def _pipe(self, source: socket.socket, sink: socket.socket, from_client: bool, state: dict[str, bytes]) -> None:
        try:
            while (data := source.recv(65536)) and self.passes(data, from_client, state):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class DeliveryCutter(CuttableProxy):
    """A proxy in front of Redis that cuts a worker's connection between taking a message and
    recording it as held, every time for ``window_s`` from the first (redis-py's retries meet
    the same fault):

    - ``drop="record"``: drops kombu's record of a delivered message (the transaction with
      ``HSET unacked``, sent after the pop) and its connection;
    - ``drop="reply"``: drops Redis's reply to a blocking pop that took a message (``BRPOP`` or
      ``BLMOVE``), and its connection: Redis took the message, the worker never got it.
    """

    RECORD = b"$4\r\nHSET\r\n$7\r\nunacked\r\n"
    POPS = (b"BRPOP\r\n", b"BLMOVE\r\n")
    NO_MESSAGE = (b"*-1", b"$-1", b"_")

    def __init__(self, target_port: int, window_s: float, drop: str) -> None:
        super().__init__(target_port)
        self.window_s, self.drop = window_s, drop
        self.cuts = 0
        self.first_cut_at: float | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def passes(self, data: bytes, from_client: bool, state: dict[str, bytes]) -> bool:
        if from_client:
            state["last"] = data
            hit = self.drop == "record" and self.RECORD in data
        else:
            popped = any(pop in state.get("last", b"") for pop in self.POPS)
            hit = self.drop == "reply" and popped and not data.startswith(self.NO_MESSAGE)
        if not hit:
            return True
        now = time.time()
        self.first_cut_at = self.first_cut_at or now
        if now - self.first_cut_at > self.window_s:
            return True
        self.cuts += 1
        return False


@pytest.fixture
def s3_proxy(s3_endpoint) -> Iterator[CuttableProxy]:
    proxy = CuttableProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    yield proxy
    proxy.cut()
