"""Completion webhooks on a real Redis and a real HTTP server (``producer.notify_state``,
``producer.notify_send``, ``worker.notifier``): one claim per run however many ask, the hold of a
submit, retries, the lease, and the client's own deliveries (cancel, a submit that ends a run)."""

from __future__ import annotations

import json
import socket
import threading

import pytest
from click.testing import CliRunner

from producer import Client, JobState
from producer.cli import cli
from producer.errors import NotifyError
from producer.notify import EVENT_HEADER
from producer.notify_send import deliver, notify_if_due
from producer.notify_state import NotifyStore
from producer.settings import ClientSettings
from producer.state import RunStore
from tests.helpers import wait_until
from tests.webhook import Receiver
from worker.notifier import Notifier

SECRET = "whsec_unit"
FAST = [0.01] * 5  # the schedule's length, without its seconds


@pytest.fixture
def settings(redis_urls, monkeypatch) -> ClientSettings:
    monkeypatch.setenv("DEEPQUEUE_WEBHOOK_SECRET", SECRET)
    broker, backend = redis_urls
    return ClientSettings(broker_url=broker, result_backend=backend)


@pytest.fixture
def free_port() -> int:
    """A loopback port nothing listens on: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def notify_store(backend) -> NotifyStore:
    return NotifyStore(backend)


def ended_run(store: RunStore, run_id: str, *, done: int = 3, failed: dict[str, str] | None = None) -> None:
    """A run whose jobs all ended, recorded as workers record them."""
    ids = [f"{run_id}#{i}" for i in range(done)] + list(failed or {})
    store.mark_queued(run_id, ids)
    for job_id in ids:
        store.mark(run_id, job_id, JobState.RUNNING, worker="w")
    for job_id in ids[:done]:
        store.add_gpu_seconds(run_id, 0.25)
        store.mark(run_id, job_id, JobState.DONE, key=f"s3://b/{run_id}/images/{job_id}.png")
    for job_id, reason in (failed or {}).items():
        store.mark(run_id, job_id, JobState.FAILED, reason=reason)


def test_of_many_processes_that_see_the_end_one_claims_it(store, notify_store, backend):
    ended_run(store, "r")
    notify_store.hold("r", "http://127.0.0.1:9/hook")
    assert notify_store.claim("r", "end") == (None, "held")  # a submit is still sending
    notify_store.unhold("r")
    answers: list[str] = []
    start = threading.Barrier(16)

    def claim() -> None:
        start.wait()
        answers.append(NotifyStore(backend).claim("r", "end")[1])

    threads = [threading.Thread(target=claim) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == ["claimed"] * 15 + ["mine"]
    assert notify_store.due(now=0) == [] and notify_store.due(now=1e12) == ["r"]  # listed for a sweep


def test_a_run_not_ended_or_without_a_url_is_not_claimed(store, notify_store):
    store.mark_queued("busy", ["busy#0", "busy#1"])
    store.mark("busy", "busy#0", JobState.DONE, key="s3://b/busy/images/busy#0.png")
    assert notify_store.claim("busy", "end")[1] == "none"
    notify_store.hold("busy", "http://127.0.0.1:9/hook")
    notify_store.unhold("busy")
    assert notify_store.claim("busy", "end")[1] == "running"
    claim, why = notify_store.claim("busy", "cancel")  # a cancel needs no end
    assert why == "mine" and claim.event == "cancelled"


def test_a_delivery_is_retried_after_a_500_and_recorded_once(store, notify_store, settings):
    ended_run(store, "r", done=5, failed={"r#f1": "generation failed: RuntimeError('x')", "r#f2": "invalid job: a"})
    with Receiver([500]) as receiver:
        notify_store.hold("r", receiver.url)
        notify_store.unhold("r")
        assert notify_if_due(notify_store, store, settings, "r", "end", wait=lambda s: False) == "delivered"
        assert notify_if_due(notify_store, store, settings, "r", "end") == "settled"  # never twice
    first, second = receiver.of("r")
    assert (first.answered, second.answered) == (500, 200) and first.body == second.body
    assert first.verifies(SECRET) and second.verifies(SECRET) and second.headers[EVENT_HEADER] == "finished"
    document = second.document
    assert document["counts"] == {"queued": 0, "running": 0, "done": 5, "failed": 2, "cancelled": 0}
    assert document["failed_by_reason"] == {"generation failed": 1, "invalid job": 1}
    assert document["gpu_seconds"] == 1.25 and document["event"] == "finished" and document["total"] == 7
    assert document["outputs_url"].endswith("/r/images/") and document["manifest_url"].endswith("/r/manifest/")
    state = notify_store.state("r")
    assert state.delivered_at and state.tries == 2 and state.last == "HTTP 200" and not state.sending
    assert str(state) == "notify finished: delivered (2 tries)"
    assert notify_store.due(now=1e12) == []


@pytest.mark.parametrize("status", [400, 404, 410])
def test_a_4xx_is_not_retried(store, notify_store, settings, status):
    ended_run(store, "r")
    with Receiver([status]) as receiver:
        notify_store.hold("r", receiver.url)
        notify_store.unhold("r")
        assert notify_if_due(notify_store, store, settings, "r", "end") == "failed"
    assert len(receiver.of("r")) == 1
    assert str(notify_store.state("r")) == f"notify: failed after 1 try (last: HTTP {status})"


def test_no_answer_is_retried_the_whole_schedule_then_given_up(store, notify_store, free_port):
    ended_run(store, "r")
    notify_store.hold("r", f"http://127.0.0.1:{free_port}/nobody")
    notify_store.unhold("r")
    claim, _ = notify_store.claim("r", "end")
    assert deliver(notify_store, claim, b"{}", secret=None, delays=FAST) == "failed"
    state = notify_store.state("r")
    assert state.failed_at and state.tries == 6 and "Connection" in state.last


def test_a_claim_whose_lease_ran_out_is_not_settled_by_its_late_owner(store, notify_store):
    ended_run(store, "r")
    notify_store.hold("r", "http://127.0.0.1:9/hook")
    notify_store.unhold("r")
    late, _ = notify_store.claim("r", "end", lease_s=0.05)
    wait_until(lambda: notify_store.claim("r", "end")[1] == "mine", 10, "the lease to run out")
    assert not notify_store.begin_try(late) and not notify_store.settle(late, "delivered", "HTTP 200")
    assert notify_store.state("r").delivered_at is None


def test_a_delivery_stopped_between_tries_gives_its_claim_back(store, notify_store):
    ended_run(store, "r")
    with Receiver([503]) as receiver:
        notify_store.hold("r", receiver.url)
        notify_store.unhold("r")
        claim, _ = notify_store.claim("r", "end")
        assert deliver(notify_store, claim, b"{}", secret=None, wait=lambda s: True) == "stopped"
    state = notify_store.state("r")
    assert not state.sending and state.delivered_at is None and state.failed_at is None
    assert notify_store.due() == ["r"]  # a sweep delivers it now


def test_a_worker_notifier_delivers_the_end_it_observes_and_sweeps_what_a_dead_one_left(store, notify_store, settings):
    ended_run(store, "seen")
    ended_run(store, "orphan")
    with Receiver() as receiver:
        for run_id in ("seen", "orphan"):
            notify_store.hold(run_id, receiver.url)
            notify_store.unhold(run_id)
        notify_store.claim("orphan", "end", lease_s=0.2)  # claimed by a process that then died
        notifier = Notifier(settings, sweep_s=0.2)
        try:
            notifier.observe("seen")
            wait_until(lambda: receiver.delivered("seen") and receiver.delivered("orphan"), 60, "both deliveries")
        finally:
            notifier.stop()
    assert len(receiver.of("seen")) == len(receiver.of("orphan")) == 1
    assert notify_store.due(now=1e12) == []


def test_cancel_notifies_once_with_event_cancelled(redis_urls, settings):
    with Receiver() as receiver, Client(settings=settings) as client:
        client.submit([f"p {i}" for i in range(5)], run="halt", notify=receiver.url, steps=2, width=64, height=64)
        assert receiver.of("halt") == []  # jobs queued: not ended
        assert client.cancel("halt") == 5
        assert client.cancel("halt") == 0
        (only,) = receiver.of("halt")
        assert only.verifies(SECRET) and only.headers[EVENT_HEADER] == "cancelled"
        assert only.document["counts"]["cancelled"] == 5 and only.document["event"] == "cancelled"
        assert str(client.notify_state("halt")) == "notify cancelled: delivered (1 try)"


def test_a_submit_that_finds_its_run_ended_delivers_itself(redis_urls, settings, store):
    """Every job of the run was done before (a submit again): the end is this submit's to notify."""
    with Receiver() as receiver, Client(settings=settings) as client:
        run = client.submit(["a", "b"], run="again", steps=2, width=64, height=64)
        for result in run.results():
            store.mark("again", result.job_id, JobState.DONE, key=f"s3://b/again/images/{result.job_id}.png")
        assert receiver.of("again") == []  # no URL yet
        again = client.submit(["a", "b"], run="again", notify=receiver.url, steps=2, width=64, height=64)
        assert again.submitted == 0
        (only,) = receiver.of("again")
        assert only.document["counts"]["done"] == 2 and only.document["event"] == "finished"


def test_a_bad_notify_url_is_refused_before_anything_is_sent(redis_urls, settings, store, tmp_path, monkeypatch):
    with Client(settings=settings) as client:
        with pytest.raises(NotifyError, match="must use http:// or https://"):
            client.submit(["a"], run="refused", notify="ftp://example.com/x", steps=2, width=64, height=64)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n")
    monkeypatch.setenv("DEEPQUEUE_BROKER_URL", redis_urls[0])
    monkeypatch.setenv("DEEPQUEUE_RESULT_BACKEND", redis_urls[1])
    result = CliRunner().invoke(cli, ["submit", str(prompts), "--run", "refused", "--notify", "mailto:me@example.com"])
    assert result.exit_code == 2 and "Invalid value for '--notify'" in result.output, result.output
    assert "must use http:// or https://" in result.output
    assert not store.exists("refused")


def test_the_cli_submits_with_notify_cancels_and_shows_the_notification(redis_urls, settings, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\nan owl\n")
    monkeypatch.setenv("DEEPQUEUE_BROKER_URL", redis_urls[0])
    monkeypatch.setenv("DEEPQUEUE_RESULT_BACKEND", redis_urls[1])
    runner = CliRunner()
    with Receiver([502]) as receiver:
        submit = ["submit", str(prompts), "--run", "cli", "--notify", receiver.url, "--steps", "2"]
        submitted = runner.invoke(cli, submit)
        assert submitted.exit_code == 0, submitted.output
        status = runner.invoke(cli, ["status", "cli"])
        assert "notify: when the run ends" in status.output, status.output
        cancelled = runner.invoke(cli, ["cancel", "cli"])
        assert cancelled.exit_code == 0, cancelled.output
        assert "run cli: 2 queued jobs cancelled" in cancelled.output
        assert "notify cancelled: delivered (2 tries)" in cancelled.output  # after the 502
        as_json = json.loads(runner.invoke(cli, ["status", "cli", "--json"]).output)
    assert as_json["notify"] == {"state": "delivered", "event": "cancelled", "tries": 2, "last": "HTTP 200"}
    assert [item.answered for item in receiver.of("cli")] == [502, 200]
    assert all(item.verifies(SECRET) for item in receiver.of("cli"))
