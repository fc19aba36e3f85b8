"""Completion webhooks, the pure part (``producer.notify``): URL check, summary, signature,
retry schedule."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from pathlib import Path

import pytest

from producer.errors import DeepQueueError, NotifyError
from producer.notify import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    body,
    checked_url,
    failure_kind,
    headers,
    retry_delays,
    retryable,
    signature,
    succeeded,
    summary,
    verify,
)

SECRET = "whsec_test"


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body():
    payload = b'{"run_id":"r","event":"finished"}'
    expected = hmac.new(SECRET.encode(), b"1700000000." + payload, hashlib.sha256).hexdigest()
    assert signature(SECRET, 1700000000, payload) == f"sha256={expected}"


def test_a_signature_verifies_and_any_change_breaks_it():
    payload = body({"run_id": "r", "event": "finished"})
    sent = headers(payload, event="finished", run_id="r", timestamp=1700000000, secret=SECRET)
    assert verify(SECRET, sent[TIMESTAMP_HEADER], payload, sent[SIGNATURE_HEADER])
    assert not verify(SECRET, sent[TIMESTAMP_HEADER], payload + b" ", sent[SIGNATURE_HEADER])  # body changed
    assert not verify(SECRET, "1700000001", payload, sent[SIGNATURE_HEADER])  # timestamp changed
    assert not verify("another", sent[TIMESTAMP_HEADER], payload, sent[SIGNATURE_HEADER])
    assert not verify(SECRET, "not a number", payload, sent[SIGNATURE_HEADER])
    assert not verify(SECRET, sent[TIMESTAMP_HEADER], payload, "")


def test_without_a_secret_the_headers_carry_no_signature():
    sent = headers(b"{}", event="cancelled", run_id="r", timestamp=5, secret=None)
    assert SIGNATURE_HEADER not in sent
    assert sent["X-Deepqueue-Event"] == "cancelled" and sent["Content-Type"] == "application/json"


def test_the_backoff_doubles_from_one_second_and_is_capped():
    assert retry_delays() == [1, 2, 4, 8, 16]  # six tries
    assert retry_delays(9) == [1, 2, 4, 8, 16, 30, 30, 30]
    assert retry_delays(1) == [] and retry_delays(3, first_s=0.5, most_s=1) == [0.5, 1]


@pytest.mark.parametrize("status", [None, 408, 429, 500, 502, 503, 504])
def test_no_answer_timeouts_throttling_and_server_errors_are_retried(status):
    assert retryable(status) and not succeeded(status)


@pytest.mark.parametrize("status", [301, 400, 401, 403, 404, 410, 422])
def test_other_answers_are_final(status):
    assert not retryable(status) and not succeeded(status)


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_2xx_is_success(status):
    assert succeeded(status) and not retryable(status)


@pytest.mark.parametrize(
    "url", ["http://example.com/hook", "https://hooks.example.com:8443/x?token=a%20b", "http://127.0.0.1:9/"]
)
def test_http_and_https_urls_are_accepted(url):
    assert checked_url(url) == url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://example.com/x", "must use http:// or https://"),
        ("example.com/hook", "must use http:// or https://"),
        ("file:///etc/passwd", "must use http:// or https://"),
        ("http:///path", "names no host"),
        ("http://exa mple.com/", "spaces or control characters"),
        ("http://example.com:99999/", "is not a valid URL"),
        ("", "an http:// or https:// URL is needed"),
        ("https://example.com/" + "a" * 3000, "at most 2048"),
    ],
)
def test_other_urls_are_refused_with_the_rule(url, says):
    with pytest.raises(NotifyError, match=says) as raised:
        checked_url(url)
    assert isinstance(raised.value, DeepQueueError) and isinstance(raised.value, ValueError)


def test_failures_are_counted_by_the_text_before_their_first_colon():
    assert failure_kind("generation failed: RuntimeError('boom')") == "generation failed"
    assert failure_kind("invalid job: steps: Input should be greater than or equal to 1") == "invalid job"
    assert failure_kind("run cancelled") == "run cancelled"
    assert failure_kind("") == failure_kind(None) == "unknown"
    assert len(failure_kind("x" * 500)) == 80


def test_the_summary_has_every_figure_and_its_body_is_compact_json():
    document = summary(
        run_id="r1",
        event="finished",
        counts={"queued": 0, "running": 0, "done": 7, "failed": 3, "cancelled": 0},
        failed_by_reason={"storing failed": 1, "generation failed": 2},
        images_per_s=2.123456789,
        gpu_seconds=1.5,
        outputs_url="s3://b/r1/images/",
        manifest_url="s3://b/r1/manifest/",
        manifest_parts_url="s3://b/r1/manifest-parts/",
        finished_at=1700000000.25,
    )
    assert document == {
        "run_id": "r1",
        "event": "finished",
        "total": 10,
        "counts": {"queued": 0, "running": 0, "done": 7, "failed": 3, "cancelled": 0},
        "failed_by_reason": {"generation failed": 2, "storing failed": 1},
        "images_per_s": 2.123457,
        "gpu_seconds": 1.5,
        "outputs_url": "s3://b/r1/images/",
        "manifest_url": "s3://b/r1/manifest/",
        "manifest_parts_url": "s3://b/r1/manifest-parts/",
        "finished_at": "2023-11-14T22:13:20.250Z",
    }
    assert list(document["failed_by_reason"]) == ["generation failed", "storing failed"]  # most first
    assert json.loads(body(document)) == document and b", " not in body(document) and b": " not in body(document)
    with pytest.raises(ValueError, match="event must be one of finished, cancelled"):
        summary(**_arguments(document, event="started"))


def _arguments(document: dict, **changes: object) -> dict:
    """``summary``'s arguments back from a document it made."""
    arguments = {key: value for key, value in document.items() if key != "total"}
    return arguments | {"finished_at": 0.0} | changes


def test_the_readmes_verification_snippet_accepts_a_signed_body_and_nothing_else():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("\n## Completion webhooks\n", 1)[1].split("\n## ", 1)[0]
    [snippet] = re.findall(r"^```python\n(.*?)^```$", section, flags=re.M | re.S)
    namespace: dict = {}
    exec(snippet, namespace)
    verified = namespace["verified"]
    payload = body({"run_id": "r", "event": "finished"})
    sent = headers(payload, event="finished", run_id="r", timestamp=int(time.time()), secret=SECRET)
    assert verified(SECRET, sent, payload)
    assert not verified(SECRET, sent, payload.replace(b"finished", b"cancelled"))
    assert not verified("another", sent, payload)
    stale = headers(payload, event="finished", run_id="r", timestamp=int(time.time()) - 3600, secret=SECRET)
    assert not verified(SECRET, stale, payload)
    assert not verified(SECRET, headers(payload, event="finished", run_id="r", timestamp=1, secret=None), payload)
