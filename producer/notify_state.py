"""Completion webhooks, the Redis part: the run's notify URL, the hold while a submit sends, and
the claim that makes one process, of all the workers and clients, deliver a run's notification.

Keys (``producer.layout``; the first two share the run's hash tag):

- ``deepqueue:{run}:notify`` hash: ``url``; ``held_until`` (a submit is still sending: an end
  seen now is premature); ``event`` and ``claimed_at`` (set by the claim); ``tries`` (POSTs made);
  ``last`` (the last answer: an HTTP status or an error); ``delivered_at`` or ``failed_at`` (given
  up after ``tries``). A few hundred bytes per run, none per job.
- ``deepqueue:{run}:notify-claim`` string: the token of the process delivering, with a lease
  (``LEASE_S``) renewed before each try. Set only by ``NOTIFY_CLAIM``, which claims only when no
  claim lives and nothing was delivered or given up: two processes that see the end at once
  cannot both deliver. A process that dies mid-delivery leaves a claim that expires.
- ``deepqueue:notify-pending`` zset: runs whose notification is claimed or held, scored by when to
  look at them again (the claim's expiry, the hold's end). Workers sweep it (``due``): a run whose
  deliverer died, or whose submit died while holding it, is claimed again and delivered. It is
  kept apart from the Lua calls (another hash slot); a crash between a claim and its listing loses
  only that sweep.

Exactly once, as HTTP allows: one claim per run, and ``NOTIFY_SETTLE`` records the delivery. A
deliverer whose lease ran out mid-POST (a pause longer than ``LEASE_S``), or that died after the
receiver answered but before it recorded so, may be followed by a second POST of the same body:
receivers deduplicate on ``run_id``.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Literal

import redis

from producer.layout import NOTIFY_CLAIM_NAME, NOTIFY_NAME, NOTIFY_PENDING_KEY, state_key
from producer.settings import redis_client
from producer.state_scripts import NOTIFY_CLAIM, NOTIFY_HOLD, NOTIFY_SETTLE, NOTIFY_TRY

#: A claim's lease: longer than one try (``producer.notify.POST_TIMEOUT_S``) plus the longest
#: wait before it (``MAX_DELAY_S``), since it is renewed before each try.
LEASE_S = 90.0
#: How long a submit's hold lasts unless renewed (each chunk it sends renews it).
HOLD_S = 600.0

Mode = Literal["end", "cancel"]


@dataclass(frozen=True)
class Claim:
    """The right to deliver one run's notification, held until settled or its lease runs out."""

    run_id: str
    token: str
    url: str
    event: str


@dataclass(frozen=True)
class NotifyState:
    """Where a run's notification stands (``deepqueue status``)."""

    url: str
    event: str | None = None
    tries: int = 0
    last: str | None = None
    delivered_at: float | None = None
    failed_at: float | None = None
    sending: bool = False

    def __str__(self) -> str:
        tries = f"{self.tries} {'try' if self.tries == 1 else 'tries'}"
        if self.delivered_at is not None:
            return f"notify {self.event}: delivered ({tries})"
        if self.failed_at is not None:
            return f"notify: failed after {tries} (last: {self.last})"
        if self.sending:
            return f"notify {self.event}: sending ({tries} so far{f', last: {self.last}' if self.last else ''})"
        return "notify: when the run ends"


def _keys(run_id: str) -> list[str]:
    return [state_key(run_id, NOTIFY_NAME), state_key(run_id, NOTIFY_CLAIM_NAME)]


class NotifyStore:
    """Thin layer over a Redis client it is given (the result backend's)."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._hold = client.register_script(NOTIFY_HOLD)
        self._claim = client.register_script(NOTIFY_CLAIM)
        self._try = client.register_script(NOTIFY_TRY)
        self._settle = client.register_script(NOTIFY_SETTLE)

    @classmethod
    def from_url(cls, url: str) -> NotifyStore:
        return cls(redis_client(url))

    def close(self) -> None:
        self._redis.close()

    def hold(self, run_id: str, url: str | None = None, hold_s: float = HOLD_S) -> bool:
        """Before (and while) a submit sends: store ``url`` if given (a new URL starts the run's
        notification afresh), and hold the run's notification ``hold_s``. False: the run has no URL."""
        return bool(self._hold(keys=_keys(run_id), args=[url or "", hold_s]))

    def unhold(self, run_id: str) -> None:
        """A submit is done sending: the run's end may be notified."""
        self._redis.hdel(state_key(run_id, NOTIFY_NAME), "held_until")

    def claim(self, run_id: str, mode: Mode, *, lease_s: float = LEASE_S) -> tuple[Claim | None, str]:
        """Claim the run's delivery if it is due (``mode`` 'end': every job final; 'cancel': just
        cancelled). Returns the claim, or None and why not (see ``NOTIFY_CLAIM``). A run claimed
        or held is listed pending, to be looked at again when the claim or the hold runs out."""
        token = secrets.token_hex(8)
        keys = [*_keys(run_id), state_key(run_id, "counts"), state_key(run_id, "meta")]
        why, *rest = (value.decode() for value in self._claim(keys=keys, args=[mode, token, int(lease_s * 1000)]))
        now = time.time()
        if why == "mine":
            self._redis.zadd(NOTIFY_PENDING_KEY, {run_id: now + lease_s})
            return Claim(run_id, token, rest[0], rest[1]), why
        if why == "held":
            self._redis.zadd(NOTIFY_PENDING_KEY, {run_id: float(rest[0])})
        elif why == "claimed":
            self._redis.zadd(NOTIFY_PENDING_KEY, {run_id: now + max(0, int(rest[0])) / 1000})
        return None, why

    def forget_pending(self, run_id: str) -> None:
        self._redis.zrem(NOTIFY_PENDING_KEY, run_id)

    def begin_try(self, claim: Claim, *, lease_s: float = LEASE_S) -> bool:
        """Renew the claim and count a try; False if the claim is no longer this one's."""
        if not self._try(keys=_keys(claim.run_id), args=[claim.token, int(lease_s * 1000)]):
            return False
        self._redis.zadd(NOTIFY_PENDING_KEY, {claim.run_id: time.time() + lease_s}, xx=True)
        return True

    def settle(self, claim: Claim, outcome: Literal["delivered", "failed", ""], last: str) -> bool:
        """End the claim: ``delivered``, ``failed`` (given up), or '' (given back undelivered,
        for the sweep to deliver at once). False if it was not this one's any more."""
        settled = bool(self._settle(keys=_keys(claim.run_id), args=[claim.token, outcome, last[:200]]))
        if outcome:
            self._redis.zrem(NOTIFY_PENDING_KEY, claim.run_id)
        else:
            self._redis.zadd(NOTIFY_PENDING_KEY, {claim.run_id: time.time()})
        return settled

    def due(self, now: float | None = None, limit: int = 20) -> list[str]:
        """Runs listed pending whose time to look again has come (oldest first)."""
        now = time.time() if now is None else now
        return [name.decode() for name in self._redis.zrangebyscore(NOTIFY_PENDING_KEY, "-inf", now, 0, limit)]

    def state(self, run_id: str) -> NotifyState | None:
        """The run's notification (None: it asked for none)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(state_key(run_id, NOTIFY_NAME))
        pipe.exists(state_key(run_id, NOTIFY_CLAIM_NAME))
        fields, claimed = pipe.execute()
        values = {name.decode(): value.decode() for name, value in fields.items()}
        if "url" not in values:
            return None

        def number(name: str) -> float | None:
            return float(values[name]) if name in values else None

        return NotifyState(
            url=values["url"],
            event=values.get("event"),
            tries=int(values.get("tries", 0)),
            last=values.get("last"),
            delivered_at=number("delivered_at"),
            failed_at=number("failed_at"),
            sending=bool(claimed),
        )
