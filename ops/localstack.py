"""Start the real servers deepqueue talks to, on loopback, for the demo, tests and benchmarks.

A private redis-server and a moto S3 server, each on a free port, and `deepqueue worker`
processes; every function returns when its server answers, and ``stop`` ends it. A server that
exits or does not answer within its ``timeout`` is stopped, and the error's first line says why
(a worker's: the line of its log that most looks like the cause).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # not up yet: connection refused, partial log
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not come up within {timeout:g} s")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (a worker's warm shutdown), then SIGKILL after 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _await_start(
    process: subprocess.Popen, ready: Callable[[], bool], what: str, timeout: float, log_path: Path | None = None
) -> None:
    """Return once ``ready()``; if the process exits first or ``timeout`` passes, stop it and raise
    an error whose first line says what happened (and the likeliest cause from ``log_path``)."""
    try:
        wait_for(lambda: ready() or process.poll() is not None, timeout, what)
    except TimeoutError as error:
        stop(process)
        raise TimeoutError(f"{error}{_log_cause(log_path)}") from None
    if process.poll() is not None:
        tail = f"\n{log_path.read_text()[-3000:]}" if log_path else ""
        raise RuntimeError(f"{what} exited with {process.returncode}{_log_cause(log_path)}{tail}")


def _log_cause(log_path: Path | None) -> str:
    """``"; log: LINE"``: the log's last line that names an error, else its last line ("" without one)."""
    lines = [line.strip() for line in log_path.read_text().splitlines() if line.strip()] if log_path else []
    errors = [line for line in lines if re.search(r"Error|ERROR|Exception|error:", line)]
    return f"; log: {(errors or lines)[-1]}" if lines else ""


def start_redis(
    data_dir: Path, *, port: int | None = None, persistent: bool = False, timeout: float = 10
) -> tuple[subprocess.Popen, str]:
    """A redis-server; returns (process, ``redis://127.0.0.1:PORT``). ``persistent``: an
    append-only file fsynced on every write in ``data_dir``, so a restart on the same port and
    folder (after SIGKILL too) comes back with every acknowledged write."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian/Ubuntu: apt-get install redis-server)")
    port = port or free_port()
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--databases", "64", "--save", "", *persistence]
        + ["--dir", str(data_dir)],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}"
    _await_start(process, lambda: redis.Redis.from_url(url).ping(), "redis-server", timeout)
    return process, url


def start_moto(*, port: int | None = None, timeout: float = 30) -> tuple[subprocess.Popen, str]:
    """moto's S3 server (real HTTP) in its own process; returns (process, endpoint URL)."""
    port = port or free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        return urllib.request.urlopen(f"{url}/moto-api/", timeout=1).status == 200

    _await_start(process, ready, "moto server", timeout)
    return process, url


@contextmanager
def redis_and_moto(data_dir: Path, *, timeout: float = 30) -> Iterator[tuple[str, str]]:
    """A redis-server and a moto S3 server; yields (redis URL, S3 endpoint) and stops both on
    exit (the first one too when the second does not start)."""
    with ExitStack() as stack:
        redis_process, redis_url = start_redis(data_dir, timeout=timeout)
        stack.callback(stop, redis_process)
        moto_process, s3 = start_moto(timeout=timeout)
        stack.callback(stop, moto_process)
        yield redis_url, s3


def moto_s3_client(endpoint_url: str):
    """A boto3 S3 client for the moto server, with its test credentials."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=AWS_ENV["AWS_DEFAULT_REGION"],
    )


def worker_env(
    *,
    broker_url: str,
    result_backend: str,
    model: str,
    s3_endpoint: str | None = None,
    bucket: str | None = None,
    keep_user_settings: bool = False,
    **settings: object,
) -> dict[str, str]:
    """The environment of a worker on these servers; ``settings`` are more DEEPQUEUE_* values
    (``max_wait_s=1.0``). Unless ``keep_user_settings``, the caller's own DEEPQUEUE_* variables
    are dropped, so the worker runs with exactly these and the defaults (tests, benchmarks).
    Without an S3 endpoint and bucket, pass ``storage="local"`` and an ``output_dir``. The metrics
    server is off unless ``metrics_port`` is given (or kept): several workers share this host."""
    inherited = {
        key: value for key, value in os.environ.items() if keep_user_settings or not key.startswith("DEEPQUEUE_")
    }
    s3 = {"s3_endpoint_url": s3_endpoint, "s3_bucket": bucket}
    given = {
        "broker_url": broker_url,
        "result_backend": result_backend,
        "model": model,
        **{key: value for key, value in s3.items() if value is not None},
        **settings,
    }
    return {
        "DEEPQUEUE_METRICS_PORT": "0",
        **inherited,
        **AWS_ENV,
        "PYTHONUNBUFFERED": "1",
        **{f"DEEPQUEUE_{key.upper()}": str(value) for key, value in given.items()},
    }


def default_model(root: Path) -> str:
    """``DEEPQUEUE_MODEL``, or the offline tiny model in ``root/models/tiny`` (built on first use)."""
    model = os.environ.get("DEEPQUEUE_MODEL") or str(root / "models" / "tiny")
    if not Path(model, "model_index.json").exists() and model.startswith(str(root)):
        subprocess.run([*deepqueue_command(), "make-test-model", model, "--arch", "tiny"], check=True)
    return model


#: The score models' settings: variable, the offline random model it defaults to here, its builder.
SCORE_MODELS = {
    "clip_model": ("DEEPQUEUE_CLIP_MODEL", "clip-tiny", "build_test_clip"),
    "safety_checker": ("DEEPQUEUE_SAFETY_CHECKER", "safety-tiny", "build_test_safety_checker"),
}


def default_score_models(root: Path) -> dict[str, str]:
    """The CLIP model and safety checker of ``--scores clip,nsfw``: ``DEEPQUEUE_CLIP_MODEL`` and
    ``DEEPQUEUE_SAFETY_CHECKER``, or else offline random ones in ``root/models/`` (built on first
    use, in a child process: this one imports no torch; their scores are noise), so the local
    stack scores without the Hub."""
    chosen = {}
    for name, (variable, folder, builder) in SCORE_MODELS.items():
        chosen[name] = os.environ.get(variable) or str(root / "models" / folder)
        if chosen[name] == str(root / "models" / folder) and not Path(chosen[name]).exists():
            code = f"import sys; from worker.pipeline.testscores import {builder}; {builder}(sys.argv[1])"
            subprocess.run([sys.executable, "-c", code, chosen[name]], check=True)
    return chosen


def deepqueue_command() -> list[str]:
    """The ``deepqueue`` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("deepqueue")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from producer.cli import main; main()"]


def start_worker(env: Mapping[str, str], log_path: Path, *args: str, timeout: float = 180) -> subprocess.Popen:
    """A ``deepqueue worker`` process; returns once Celery says it is ready (log in log_path)."""
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*deepqueue_command(), "worker", *args], env=dict(env), stdout=log, stderr=subprocess.STDOUT
        )
    _await_start(process, lambda: "ready." in log_path.read_text(), "deepqueue worker", timeout, log_path)
    return process


@contextmanager
def client_for(env: Mapping[str, str]) -> Iterator[Any]:
    """A client with a worker's DEEPQUEUE_* settings (its Redis and its storage, where a submit
    keeps the jobs it sends) and, while it is open, its AWS_* credentials: as a user who exported
    them has. They win over the test's environment, which is left as it was."""
    from producer import Client
    from producer.settings import ClientSettings

    fields = {
        name.removeprefix("DEEPQUEUE_").lower(): value for name, value in env.items() if name.startswith("DEEPQUEUE_")
    }
    credentials = {name: value for name, value in env.items() if name.startswith("AWS_")}
    before = {name: os.environ.get(name) for name in credentials}
    os.environ.update(credentials)
    try:
        with Client(settings=ClientSettings(**fields)) as client:
            yield client
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
