"""Leases on the messages a worker holds: a dead worker's jobs come back within seconds, a live
worker's long batches never run twice.

kombu's Redis transport keeps every delivered, unacknowledged message in the ``unacked`` hash and
its delivery time in the ``unacked_index`` sorted set; its own sweep puts back those older than
the visibility timeout. One timeout cannot serve both ends: short, it hands a batch still running
to a second worker; long (an hour), it strands the jobs of a worker that died. So the time in
``unacked_index`` becomes a lease, kept by one thread in each worker's main process:

- every ``lease_renew_s`` it sets the time of every message the worker holds (buffered,
  generating or being stored) to now, and records the worker in ``deepqueue:workers``;
- it puts back on its queue every message of this deployment's queues (the plain one and each
  model's, ``producer.layout.model_queue``) whose time is older than ``lease_expiry_s``: no live
  worker holds it (its worker was SIGKILLed, or lost its connection and the requests it had, or
  could not send it back while Redis was down), so a model whose only worker died gets its jobs
  back as soon as any worker sweeps;
- messages the worker gives up itself (after a lost connection, those it had not started) are put back at once (from its
  own copy if Redis died between handing one out and recording it as unacked), and those
  it could not acknowledge or send back (their channel went with the connection, or Redis was
  down) are settled through this thread's own connection as soon as Redis answers;
- it empties the taking lists (``worker.delivery.transport``) of workers gone for ``lease_expiry_s``:
  messages they took from the queue but never recorded as held.

What is held, working, owed back or owed an acknowledgement is kept in a ``DeliveryLedger``
(``worker.delivery.ledger``): the one place that decides what goes back, so that kombu's channel closing,
the strategy and this thread never put back one message twice, nor one a batch still runs.

A Redis restart or outage stops every renewal while it lasts, so the sweep waits until Redis has
been up, and this thread connected, for ``lease_expiry_s``: by then every live worker has renewed.
kombu's visibility timeout stays as the backstop. Times are the hosts' wall clocks, as kombu's
are: keep workers' clocks in sync (NTP) to well within ``lease_expiry_s``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from kombu import Connection
from kombu.transport.redis import Mutex, MutexHeld

from producer.layout import WORKER_HELD_KEY, WORKER_KEYS, WORKER_QUEUES_KEY, WORKERS_KEY
from worker.delivery.ledger import Copy, DeliveryLedger, message_copy
from worker.delivery.transport import put_back_taken, taking_key

logger = logging.getLogger(__name__)

#: Workers silent this long are dropped from WORKERS_KEY.
FORGET_S = 86400.0


def routed_to(raw: bytes | None, queue: str) -> bool:
    """Whether a kombu ``unacked`` entry (``[message, exchange, routing_key]``) is for ``queue``."""
    if raw is None:
        return False
    try:
        _, exchange, routing_key = json.loads(raw)
    except (ValueError, TypeError):
        return False
    return queue in (exchange, routing_key)


def forget_workers(client: Any, names: list[str]) -> None:
    """Remove workers from every per-worker hash (``producer.layout.WORKER_KEYS``)."""
    pipe = client.pipeline()
    for key in WORKER_KEYS:
        pipe.hdel(key, *names)
    pipe.execute()


def routed_to_any(raw: bytes | None, queues: Iterable[str]) -> bool:
    return any(routed_to(raw, queue) for queue in queues)


def may_sweep(connected_s: float, redis_uptime_s: float, expiry_s: float) -> bool:
    """Sweep only when every live worker has had ``expiry_s`` to renew since Redis came back."""
    return min(connected_s, redis_uptime_s) >= expiry_s


class Leases:
    """The delivery tags one worker holds (a ``DeliveryLedger``), renewed, settled and put back
    by a thread with its own connection, which also sweeps other workers' expired ones."""

    def __init__(
        self,
        broker_url: str,
        transport_options: dict[str, Any],
        *,
        queue: str,
        name: str,
        renew_s: float,
        expiry_s: float,
        plain_queue: str | None = None,
    ) -> None:
        self.queue = queue
        #: The deployment's plain queue (DEEPQUEUE_QUEUE); its model queues are ``{plain}.{alias}``.
        self.plain_queue = plain_queue or queue
        self.name = name
        self.renew_s = renew_s
        self.expiry_s = expiry_s
        self.ledger = DeliveryLedger()
        self._broker_url = broker_url
        self._transport_options = transport_options
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, tag: str, jobs: int = 1) -> None:
        self.ledger.hold(tag, jobs)

    def working(self, tags: Iterable[str]) -> None:
        """A pool process took these messages: they are not put back if the connection is lost."""
        self.ledger.working(tags)

    def idle(self, tags: Iterable[str]) -> None:
        self.ledger.idle(tags)

    def settled(self, tag: str) -> None:
        """The worker acknowledged or rejected this message on its own channel."""
        self.ledger.settled_here(tag)

    def give_back(self, messages: Iterable[Any]) -> None:
        """Stop holding these (kombu) messages and put them back on the queue at the next beat
        (each once, whoever else asks)."""
        for message in messages:
            self.put_back(message.delivery_tag, message_copy(message))

    def put_back(self, tag: str, copy: Copy) -> None:
        """Put a message back on the queue at the next beat, also one this worker took but could
        not record as held (``worker.delivery.transport``): ``copy`` is (raw message, exchange, routing key)."""
        if self.ledger.give_back(tag, copy):
            self._wake.set()

    def settle(self, message: Any, *, requeue: bool) -> None:
        """Acknowledge (or, ``requeue``, send back) a message from this thread, as soon as it can."""
        if requeue:
            self.give_back([message])
        elif self.ledger.acknowledge(message.delivery_tag):
            self._wake.set()

    def settle_now(self, message: Any, *, requeue: bool | None) -> None:
        """Acknowledge (``requeue`` None) or reject a message on its own channel, now. One whose
        channel went with a lost connection, or that Redis is down for, is settled from this
        thread instead, once Redis answers: kombu fails on a closed channel with an
        AttributeError that would stop the worker."""
        tag = message.delivery_tag
        try:
            if requeue is None:
                message.ack()
            else:
                message.reject(requeue=requeue)
        except Exception as error:  # a lost channel or Redis: this thread retries it
            logger.debug("message %s not settled (%r): the lease keeper will", tag, error)
            self.settle(message, requeue=bool(requeue))
        else:
            self.settled(tag)

    def acknowledge_all(self, messages: list[Any]) -> bool:
        """Acknowledge messages of one channel in one round trip (from this thread if the channel
        or Redis fails meanwhile); False, doing nothing, on a transport without ``ack_many``
        (not the worker's)."""
        qos = messages[0].channel.qos
        if not hasattr(qos, "ack_many"):
            return False
        try:
            qos.ack_many([message.delivery_tag for message in messages])
        except Exception as error:  # a lost channel or Redis: this thread acknowledges them
            logger.debug("%d messages not acknowledged (%r): the lease keeper will", len(messages), error)
            for message in messages:
                self.settle(message, requeue=False)
        else:
            for message in messages:
                self.settled(message.delivery_tag)
        return True

    def return_delivered(self, delivered: dict[str, Any], channel: Any) -> int:
        """What kombu does when a channel closes (it puts back every message it delivered), done
        once. After a lost connection the messages no pool process is working on go back at the
        next beat; batches still running finish and are acknowledged through this thread. At
        shutdown (this thread stopped with the pool, the channel closes last) nothing will
        finish them: every message still unsettled goes back now, on ``channel``. Returns how many."""
        shutting_down = self._stopped.is_set()
        returned = list(delivered) if shutting_down else self.ledger.not_working(delivered)
        self.give_back(delivered[tag] for tag in returned)  # the ledger stops counting them as working
        if shutting_down:
            self._put_back(channel, returned)
        return len(returned)

    def held(self) -> set[str]:
        return self.ledger.held()

    def alive(self) -> bool:
        """False only when the thread, once started, stopped without being asked to (``/livez``)."""
        return self._thread is None or self._thread.is_alive() or self._stopped.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="deepqueue-leases", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        connected_since: float | None = None
        with Connection(self._broker_url, transport_options=self._transport_options) as connection:
            while not self._stopped.is_set():
                try:
                    channel = connection.default_channel
                    if connected_since is None:
                        connected_since = time.monotonic()
                        logger.info("leases: renewing every %.0f s, expiring after %.0f s", self.renew_s, self.expiry_s)
                    self.beat(channel, time.monotonic() - connected_since)
                except Exception as error:  # Redis down or restarting: say so once, keep trying
                    if connected_since is not None:
                        logger.warning("leases: cannot reach Redis (%r); retrying", error)
                    connected_since = None
                    connection.collect()  # a fresh channel next time
                self._wake.wait(self.renew_s)
                self._wake.clear()
            try:  # a worker that stops settles what it owes and says so: `deepqueue retry` need not wait
                channel = connection.default_channel
                self.beat(channel, 0.0)
                key = taking_key(self.queue, self.name)
                put_back_taken(channel.client, key, channel.unacked_key, self.queue)  # a pop at shutdown
                forget_workers(channel.client, [self.name])
            except Exception as error:  # Redis down: its entry ages, other workers' sweeps do the rest
                logger.info("leases: could not remove this worker's entry (%r)", error)

    def beat(self, channel: Any, connected_s: float) -> None:
        """One round: renew what is held, settle what is owed, sweep expired leases."""
        client = channel.client
        now = time.time()
        due = self.ledger.due()
        pipe = client.pipeline(transaction=False)
        pipe.hset(WORKERS_KEY, self.name, now).hset(WORKER_QUEUES_KEY, self.name, self.queue)
        pipe.hset(WORKER_HELD_KEY, self.name, due.jobs)
        if due.held:
            pipe.zadd(channel.unacked_index_key, dict.fromkeys(due.held, now), xx=True)
        if due.acks:  # what kombu's QoS.ack does
            pipe.zrem(channel.unacked_index_key, *due.acks).hdel(channel.unacked_key, *due.acks)
        pipe.execute()
        self.ledger.sent(acked=due.acks)
        self._put_back(channel, due.returns)
        if due.returns or due.acks:
            logger.info("leases: %d messages put back on the queue, %d acknowledged", len(due.returns), len(due.acks))
        uptime = float(client.info("server")["uptime_in_seconds"])
        if may_sweep(connected_s, uptime, self.expiry_s):
            self._sweep(channel, now, set(due.held))

    def _put_back(self, channel: Any, tags: Iterable[str]) -> None:
        """Put these owed messages back on the queue, each claimed first and marked settled as
        soon as it is back, so that neither a failure half-way nor a second caller sends one
        twice: Redis's own record where it has one, else the copy (Redis died between handing
        the message out and recording it)."""
        client, qos = channel.client, channel.qos
        for tag in tags:
            copy = self.ledger.claim(tag)
            if copy is None:
                continue
            try:
                if client.hexists(channel.unacked_key, tag):
                    qos.restore_by_tag(tag, client)
                else:
                    channel._do_restore_message(*copy, client)  # what restore_by_tag does with Redis's copy
            except BaseException:
                self.ledger.unclaim(tag)
                raise
            self.ledger.sent(returned=(tag,))

    def _sweep(self, channel: Any, now: float, held: set[str]) -> None:
        client, qos = channel.client, channel.qos
        try:
            with Mutex(client, channel.unacked_mutex_key, channel.unacked_mutex_expire):
                expired = [
                    tag.decode()
                    for tag in client.zrangebyscore(channel.unacked_index_key, "-inf", now - self.expiry_s)
                    if tag.decode() not in held
                ]
                queues = self._deployment_queues(client)
                ours = [tag for tag in expired if routed_to_any(client.hget(channel.unacked_key, tag), queues)]
                for tag in ours:
                    qos.restore_by_tag(tag, client)
                workers = {name.decode(): float(at) for name, at in client.hgetall(WORKERS_KEY).items()}
                taken = sum(self._put_back_taken_by_gone(channel, now, workers, queue) for queue in queues)
                forgotten = [name for name, at in workers.items() if now - at > FORGET_S]
                if forgotten:
                    forget_workers(client, forgotten)
        except MutexHeld:  # another worker is sweeping
            return
        if ours or taken:
            logger.warning(
                "leases: %d messages held by no live worker for %.0f s put back on the queue, and %d that "
                "gone workers had taken but not recorded",
                len(ours),
                self.expiry_s,
                taken,
                extra={"restored": len(ours) + taken},
            )

    def _deployment_queues(self, client: Any) -> set[str]:
        """This worker's queue, and every queue of its deployment a worker has said it serves."""
        served = {queue.decode() for queue in client.hvals(WORKER_QUEUES_KEY)}
        return {self.queue} | {q for q in served if q == self.plain_queue or q.startswith(f"{self.plain_queue}.")}

    def _put_back_taken_by_gone(self, channel: Any, now: float, workers: dict[str, float], queue: str) -> int:
        """Empty ``queue``'s taking lists (``worker.delivery.transport``) of workers silent for the expiry."""
        restored, prefix = 0, taking_key(queue, "")
        for key in channel.client.scan_iter(match=f"{prefix}*", count=100):
            worker = key.decode().removeprefix(prefix)
            if worker != self.name and now - workers.get(worker, 0.0) > self.expiry_s:
                restored += put_back_taken(channel.client, key, channel.unacked_key, queue)
        return restored
