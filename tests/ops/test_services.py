"""``make services`` (``python -m ops.services``): a local stack for the README's examples, run as
a user runs it: it prints the lines to export, serves a job submitted with them, and Ctrl-C
stops the worker, the S3 server and Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis

from ops.localstack import client_for
from producer import JobState

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def read_exports(process: subprocess.Popen, lines: list[str]) -> dict[str, str]:
    """The ``export NAME=VALUE`` lines it prints once it is ready."""
    exports: dict[str, str] = {}
    for line in process.stdout:
        lines.append(line)
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").strip().partition("=")
            exports[name] = value
        elif exports and not line.strip():
            return exports
    raise AssertionError("ops.services ended before it was ready:\n" + "".join(lines))


def test_services_start_serve_and_stop_on_ctrl_c(tiny_model, tmp_path):
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith("DEEPQUEUE_")},
        "DEEPQUEUE_MODEL": str(tiny_model),
        "DEEPQUEUE_DEVICE": "cpu",
        "PYTHONUNBUFFERED": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "ops.services", "--data-dir", str(tmp_path / "stack")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        exports = read_exports(process, lines)
        threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()  # the log it follows
        assert (tmp_path / "stack" / "env").read_text().count("export ") == len(exports)
        assert {"DEEPQUEUE_BROKER_URL", "DEEPQUEUE_RESULT_BACKEND", "DEEPQUEUE_S3_ENDPOINT_URL"} <= set(exports)
        with client_for(exports) as client:
            run = client.submit(["a local stack"], run="services", steps=2, width=64, height=64)
            assert run.wait(timeout=120).counts[JobState.DONE] == 1
        process.send_signal(signal.SIGINT)  # Ctrl-C
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(exports["DEEPQUEUE_BROKER_URL"], socket_connect_timeout=2).ping()
    assert any("stopping the worker, the S3 server and Redis" in line for line in lines), "".join(lines)
