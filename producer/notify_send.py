"""Completion webhooks, the I/O part: gather a run's summary, POST it, retry, record the outcome.

``notify_if_due`` is what whoever observes a run's end calls (a worker's notifier thread after
it records a final job, ``Client.cancel``, the end of ``Client.submit``, a worker's sweep of
pending notifications): it claims the run's one delivery (``producer.notify_state``) and, if it
got it, delivers. The pure parts (body, signature, schedule) are ``producer.notify``'s.

HTTP is the standard library's ``urllib``: one POST with a timeout, no redirects followed (a 3xx
is an answer that ends the delivery as failed, as a 4xx does). Nothing here raises for the
receiver's sake: every outcome is recorded in the run's notify hash and logged.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any

from producer import notify
from producer.layout import images_prefix, manifest_prefix, parts_prefix
from producer.notify_state import LEASE_S, Claim, Mode, NotifyStore
from producer.settings import ClientSettings
from producer.state import JobState, RunStore

logger = logging.getLogger(__name__)

#: (url, body, headers, timeout) -> (HTTP status or None for no answer, a short description)
Post = Callable[[str, bytes, dict[str, str], float], tuple["int | None", str]]
#: Waits the given seconds; True if asked to stop meanwhile (``threading.Event.wait``).
Wait = Callable[[float], bool]

_unsigned_warned = threading.Event()


def storage_url(settings: ClientSettings, folder: str) -> str:
    """Where ``folder`` (a storage key prefix ending in /) is: ``s3://bucket/folder`` or a local path."""
    if settings.storage == "s3":
        return f"s3://{settings.s3_bucket}/{folder}"
    return f"{settings.output_dir / folder}{os.sep}".rstrip(os.sep) + os.sep


def gather(store: RunStore, settings: ClientSettings, run_id: str, event: str) -> dict[str, Any]:
    """The run's summary as it stands (``producer.notify.summary``)."""
    status = store.status(run_id)
    meta = store.meta(run_id)
    reasons = Counter(notify.failure_kind(reason) for reason in store.failure_reasons(run_id))
    if event == "cancelled":
        finished_at = meta.get("cancelled_at", time.time())
    else:
        ends = [meta[name] for name in ("last_done_at", "last_failed_at") if name in meta]
        finished_at = max(ends) if ends else time.time()
    prefix = settings.s3_prefix
    return notify.summary(
        run_id=run_id,
        event=event,
        counts={state.value: n for state, n in status.counts.items()},
        failed_by_reason=reasons,
        images_per_s=status.images_per_s,
        gpu_seconds=meta.get("gpu_s", 0.0 if status.counts[JobState.DONE] == 0 else None),
        outputs_url=storage_url(settings, images_prefix(prefix, run_id)),
        manifest_url=storage_url(settings, manifest_prefix(prefix, run_id)),
        manifest_parts_url=storage_url(settings, parts_prefix(prefix, run_id)),
        finished_at=finished_at,
    )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx comes back as an HTTPError: an answer, not followed


_opener = urllib.request.build_opener(_NoRedirect)


def post(url: str, payload: bytes, headers: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """One POST: (status, description); (None, error) when no answer came (refused, timed out)."""
    request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
    try:
        with _opener.open(request, timeout=timeout) as answer:
            return answer.status, f"HTTP {answer.status}"
    except urllib.error.HTTPError as error:
        return error.code, f"HTTP {error.code}"
    except (urllib.error.URLError, OSError, ValueError) as error:  # refused, reset, timeout, DNS, TLS
        cause = getattr(error, "reason", error)
        return None, f"{type(cause).__name__}: {cause}"[:200]


def deliver(
    store: NotifyStore,
    claim: Claim,
    payload: bytes,
    *,
    secret: str | None,
    send: Post = post,
    wait: Wait = lambda seconds: bool(time.sleep(seconds)),
    delays: list[float] | None = None,
    lease_s: float = LEASE_S,
) -> str:
    """POST ``payload`` to the claim's URL until it succeeds, fails for good or runs out of tries
    (``producer.notify.retry_delays``); record the outcome. Returns 'delivered', 'failed',
    'lost' (the claim ran out: another delivers) or 'stopped' (``wait`` was interrupted: the claim
    is given back for a sweep to finish)."""
    if not secret and not _unsigned_warned.is_set():
        _unsigned_warned.set()
        logger.warning("DEEPQUEUE_WEBHOOK_SECRET is not set: completion webhooks are sent unsigned")
    delays = notify.retry_delays() if delays is None else delays
    last = ""
    for attempt, delay in enumerate([0.0, *delays], 1):
        if delay and wait(delay):
            store.settle(claim, "", last)
            return "stopped"
        if not store.begin_try(claim, lease_s=lease_s):
            logger.warning("run %s: lost the claim on its notification before try %d", claim.run_id, attempt)
            return "lost"
        timestamp = int(time.time())
        headers = notify.headers(payload, event=claim.event, run_id=claim.run_id, timestamp=timestamp, secret=secret)
        status, last = send(claim.url, payload, headers, notify.POST_TIMEOUT_S)
        if notify.succeeded(status):
            store.settle(claim, "delivered", last)
            logger.info("run %s: %s notification delivered (try %d): %s", claim.run_id, claim.event, attempt, last)
            return "delivered"
        if not notify.retryable(status):
            break
        logger.warning("run %s: notification try %d failed (%s); retrying", claim.run_id, attempt, last)
    store.settle(claim, "failed", last)
    logger.error("run %s: %s notification failed after %d tries: %s", claim.run_id, claim.event, attempt, last)
    return "failed"


def notify_if_due(
    notify_store: NotifyStore,
    run_store: RunStore,
    settings: ClientSettings,
    run_id: str,
    mode: Mode,
    *,
    wait: Wait = lambda seconds: bool(time.sleep(seconds)),
) -> str:
    """Claim ``run_id``'s notification if due and deliver it; returns what happened: an outcome
    of ``deliver``, or why nothing was claimed (``NotifyStore.claim``)."""
    claim, why = notify_store.claim(run_id, mode)
    if claim is None:
        return why
    try:
        payload = notify.body(gather(run_store, settings, run_id, claim.event))
    except Exception:
        notify_store.settle(claim, "", "summary failed")  # a sweep tries again
        raise
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    return deliver(notify_store, claim, payload, secret=secret, wait=wait)
