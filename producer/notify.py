"""Completion webhooks, the pure part: the URL check, the JSON summary, its signature, the
retry schedule. No I/O here: Redis is ``producer.notify_state``'s, HTTP ``producer.notify_send``'s.

A run submitted with ``notify=URL`` (``deepqueue submit --notify URL``) gets one POST when it
ends: ``finished`` (every job done, failed or cancelled) or ``cancelled`` (``deepqueue cancel``).
The body is ``summary()``'s JSON; its bytes are sent as they are signed.

Signing follows Stripe's scheme with GitHub's header form. With a secret
(``DEEPQUEUE_WEBHOOK_SECRET``), each attempt carries

- ``X-Deepqueue-Timestamp: <unix seconds>`` (the attempt's; receivers may reject old ones), and
- ``X-Deepqueue-Signature: sha256=<hex>``, the HMAC-SHA256 under the secret of ``t.body``: the
  timestamp's decimal digits, a dot, then the exact body bytes.

Without a secret the POST is unsigned (the sender logs a warning once per process).

Retries (``retry_delays``): a connection error, a timeout, 408, 429 and 5xx are tried again after
1, 2, 4, 8, 16 s (six tries in all); any other answer below 200 or from 300 up ends the delivery
as failed; 2xx is success.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from producer.errors import NotifyError

#: Header names of a delivery.
SIGNATURE_HEADER = "X-Deepqueue-Signature"
TIMESTAMP_HEADER = "X-Deepqueue-Timestamp"
EVENT_HEADER = "X-Deepqueue-Event"
RUN_HEADER = "X-Deepqueue-Run"
#: The events a run notifies (one of them, once).
EVENTS = ("finished", "cancelled")
#: Tries of one delivery, the first delay and the longest.
TRIES = 6
FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0
#: Seconds one POST may take (connect and read each).
POST_TIMEOUT_S = 10.0
#: Longest a notify URL may be: it is stored with the run.
MAX_URL_LENGTH = 2048
#: Reasons are grouped by their text up to the first colon, cut to this length.
KIND_LENGTH = 80


def checked_url(url: str) -> str:
    """``url`` if a webhook can be POSTed to it: http or https, with a host; else NotifyError."""
    if not isinstance(url, str) or not url:
        raise NotifyError(f"notify: an http:// or https:// URL is needed, got {url!r}")
    if len(url) > MAX_URL_LENGTH:
        raise NotifyError(f"notify: the URL is {len(url)} characters long, at most {MAX_URL_LENGTH} are allowed")
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise NotifyError(f"notify: {url!r} holds spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as error:
        raise NotifyError(f"notify: {url!r} is not a valid URL: {error}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise NotifyError(f"notify: {url!r} must use http:// or https://, not {parts.scheme or 'no scheme'!r}")
    if not parts.hostname:
        raise NotifyError(f"notify: {url!r} names no host")
    return url


def failure_kind(reason: str | None) -> str:
    """The kind of a failure reason, for counting: its text up to the first colon
    (``generation failed: RuntimeError(...)`` -> ``generation failed``)."""
    text = (reason or "").split(":", 1)[0].strip()
    return text[:KIND_LENGTH] or "unknown"


def iso_time(unix_s: float) -> str:
    """``2026-12-04T23:59:01.250Z``."""
    moment = datetime.fromtimestamp(unix_s, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def summary(
    *,
    run_id: str,
    event: str,
    counts: Mapping[str, int],
    failed_by_reason: Mapping[str, int],
    images_per_s: float | None,
    gpu_seconds: float | None,
    outputs_url: str,
    manifest_url: str,
    manifest_parts_url: str,
    finished_at: float,
) -> dict[str, Any]:
    """The body of a run's notification, as a dict (``body()`` makes its bytes).

    ``gpu_seconds``: the run's share of its pipeline calls' inference time (a batch's seconds
    split evenly over its images), summed by the workers as they generate; None when unknown
    (workers from before it was counted). ``manifest_url``: where ``deepqueue manifest RUN``
    writes the compacted manifest; the workers' rows are under ``manifest_parts_url`` meanwhile.
    """
    if event not in EVENTS:
        raise ValueError(f"event must be one of {', '.join(EVENTS)}, got {event!r}")
    return {
        "run_id": run_id,
        "event": event,
        "total": sum(counts.values()),
        "counts": dict(counts),
        "failed_by_reason": dict(sorted(failed_by_reason.items(), key=lambda item: (-item[1], item[0]))),
        "images_per_s": None if images_per_s is None else round(images_per_s, 6),
        "gpu_seconds": None if gpu_seconds is None else round(gpu_seconds, 6),
        "outputs_url": outputs_url,
        "manifest_url": manifest_url,
        "manifest_parts_url": manifest_parts_url,
        "finished_at": iso_time(finished_at),
    }


def body(document: Mapping[str, Any]) -> bytes:
    """The exact bytes sent (and signed): compact JSON, UTF-8."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def signature(secret: str, timestamp: int, payload: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 under ``secret`` of ``t.body`` (the timestamp, a dot, the body)."""
    signed = str(int(timestamp)).encode() + b"." + payload
    return "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def verify(secret: str, timestamp: str | int, payload: bytes, header: str) -> bool:
    """Whether ``header`` (``X-Deepqueue-Signature``) signs ``payload`` sent at ``timestamp``
    (compared in constant time). What a receiver runs; checking the timestamp's age is its own."""
    try:
        expected = signature(secret, int(timestamp), payload)
    except (TypeError, ValueError):
        return False
    return hmac.compare_digest(expected, header or "")


def headers(payload: bytes, *, event: str, run_id: str, timestamp: int, secret: str | None) -> dict[str, str]:
    """The headers of one attempt: JSON, the event and run, and with a secret the signature."""
    out = {
        "Content-Type": "application/json",
        "User-Agent": "deepqueue-webhook",
        EVENT_HEADER: event,
        RUN_HEADER: run_id,
        TIMESTAMP_HEADER: str(int(timestamp)),
    }
    if secret:
        out[SIGNATURE_HEADER] = signature(secret, timestamp, payload)
    return out


def retry_delays(tries: int = TRIES, first_s: float = FIRST_DELAY_S, most_s: float = MAX_DELAY_S) -> list[float]:
    """Seconds to wait before each try after the first: doubling from ``first_s``, capped at
    ``most_s`` (``tries - 1`` of them: 1, 2, 4, 8, 16 for the defaults)."""
    return [min(most_s, first_s * 2**attempt) for attempt in range(max(0, tries - 1))]


def retryable(status: int | None) -> bool:
    """Whether an answer is worth another try: no answer (None: connection error, timeout), a
    request timeout (408), too many requests (429) or a server error (5xx)."""
    return status is None or status in (408, 429) or status >= 500


def succeeded(status: int | None) -> bool:
    return status is not None and 200 <= status < 300
