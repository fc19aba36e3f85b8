"""Faults of what sits on the queue and of the broker connection, caused for real (issue 14): a
raw entry at the head of the queue while two workers start, and a connection that drops every
time the consumer polls (a reconnect loop that serves nothing), which must turn ``/livez``
unhealthy with the reason, and healthy again once it ends."""

from __future__ import annotations

import time

import pytest
import redis

from ops.localstack import client_for, free_port, start_worker
from producer import JobState
from tests.helpers import get, wait_until

from .conftest import CuttableProxy, stop_running

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]


def test_a_raw_entry_at_the_head_of_the_queue_while_two_workers_start(fault_env, tmp_path):
    broker = redis.Redis.from_url(fault_env["DEEPQUEUE_BROKER_URL"])
    broker.rpush("deepqueue", b"this is not json")  # the tail is the next entry out
    first = second = None
    try:
        first = start_worker(fault_env, tmp_path / "first.log")
        second = start_worker(fault_env, tmp_path / "second.log")
        with client_for(fault_env) as client:
            run = client.submit([f"after {i}" for i in range(4)], run="after-head", steps=2, width=64, height=64)
            assert run.wait(timeout=180).counts[JobState.DONE] == 4
            letters = client.dead_letters()
        assert first.poll() is None and second.poll() is None, "a worker stopped"
    finally:
        stop_running(first, second)
    assert [letter["body"] for letter in letters] == ["this is not json"], "dropped once, by one worker"
    assert broker.llen("deepqueue") == 0 and not broker.keys("deepqueue:taking:*")


class PollDropper(CuttableProxy):
    """A proxy in front of Redis that, while ``dropping``, closes any connection on which a client
    sends a blocking pop: the consumer connects, polls, loses the connection, again and again."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.dropping = False
        self.drops = 0

    def passes(self, data: bytes, from_client: bool, state: dict[str, bytes]) -> bool:
        if self.dropping and from_client and (b"BLMOVE" in data or b"BRPOP" in data):
            self.drops += 1
            return False
        return True


def test_a_reconnect_loop_turns_livez_unhealthy_with_the_reason(fault_env, restartable_redis, tmp_path):
    proxy = PollDropper(restartable_redis.port)
    port = free_port()
    env = {
        **fault_env,
        "DEEPQUEUE_BROKER_URL": f"redis://127.0.0.1:{proxy.port}/0",
        "DEEPQUEUE_METRICS_PORT": str(port),
        "DEEPQUEUE_METRICS_HOST": "127.0.0.1",
    }
    livez = f"http://127.0.0.1:{port}/livez"
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        assert get(livez) == (200, "ok\n")
        proxy.dropping = True
        started = time.monotonic()
        wait_until(lambda: get(livez)[0] == 503, 300, "/livez to turn unhealthy", poll_s=0.5)
        unhealthy_after = time.monotonic() - started
        status, reason = get(livez)
        assert "stuck reconnecting to the broker" in reason and "ConnectionError" in reason, reason
        assert worker.poll() is None
        proxy.dropping = False
        ended = time.monotonic()
        wait_until(lambda: get(livez)[0] == 200, 120, "/livez to turn healthy again", poll_s=0.5)
        print(
            f"\n[fault] reconnect loop: /livez 503 after {unhealthy_after:.1f} s ({proxy.drops} connections "
            f"dropped), 200 again {time.monotonic() - ended:.1f} s after the loop ended; reason: {reason.strip()}"
        )
        with client_for(env) as client:
            run = client.submit(["after the loop"], run="after-loop", steps=2, width=64, height=64)
            assert run.wait(timeout=120).counts[JobState.DONE] == 1
    finally:
        stop_running(worker)
        proxy.cut()
