"""kombu's Redis transport, with no message lost between taking it and recording it as held.

kombu hands a message over in two steps: ``BRPOP`` takes it off the queue, then one transaction
records it as unacknowledged (``unacked`` and ``unacked_index``). Redis killed, or the connection
lost, between the two (after Redis applied the pop, before its reply arrived, or while the record
was on its way) loses the message: it exists nowhere but, at best, in this worker's memory.

Here a worker takes messages with ``BLMOVE`` instead: in one step Redis moves the message from
the queue to this worker's *taking list* (``deepqueue:taking:{worker}``), where it survives any
such failure, and the record transaction also removes it from there. Whatever is left in a
taking list was never recorded: the worker puts it back on the queue when it connects again
(before it takes anything else), and the lease sweep (``worker.delivery.leases``) does so for the taking
lists of workers that are gone. A message whose record did go through (only its reply was lost)
is already in ``unacked`` and is only dropped from the list; the leases take it from there.

deepqueue's producer puts each run's messages in a list of their own and a token for each on the
queue's list (``producer.fair``). A token taken is swapped, in one script, for the message that
the runs' classes and weights choose, moved into the same taking list; the delivered message's
headers then say its class (``PRIORITY_HEADER``), which the worker's buffer serves first.

``BLMOVE`` reads one list: the queue's own. Messages a producer sent with a priority land in
kombu's priority lists; whenever the queue's own list stays empty for a poll, the worker moves
one from those (``LMOVE``, the same way). deepqueue's producer uses its own classes (above), not
kombu's priorities.

Any bytes can sit on a queue's list: another application sharing the Redis, a typo at a
``redis-cli`` prompt, a foreign producer. kombu parses each entry it takes with no guard, and its
errors stop the worker (a ``JSONDecodeError``) or, worse, count as a lost connection (a
``KeyError``: no ``properties``), so the worker reconnects, the entry goes back on the queue and is
taken again, forever, behind healthy probes. Here every entry taken, by ``BLMOVE`` or kombu's
``BRPOP``, is read first (``read_entry``): one that is no message kombu can deliver, or that
kombu then fails on, is dropped to the dead letters (``worker.delivery.deadletters``) with the reason and
its first 4 KB, in the same transaction that removes it from the taking list, so nothing puts it
back. Every entry ends delivered or dead-lettered, and the worker keeps serving.

The worker uses this transport through Celery's ``broker_transport`` setting (see
``worker_broker_settings``); producers do not consume. Only the channels of a worker's consumer
take through a taking list and put back through the leases: the consumer hands them the
worker's leases as a transport option (``LEASES_OPTION``). ``BLMOVE`` needs Redis 6.2 or later.
"""

from __future__ import annotations

import base64
import logging
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from time import monotonic, time
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import redis as redis_py
from kombu.exceptions import InconsistencyError
from kombu.transport import redis, virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from producer.fair import PRIORITY_HEADER, TOKEN, FairQueue
from producer.message import unpack
from worker.delivery.deadletters import NO_ID, dead_letter, headers_task_id, push_dead_letter
from worker.delivery.ledger import Copy, message_copy

logger = logging.getLogger(__name__)

TAKING_PREFIX = "deepqueue:taking:"

#: The transport option through which a worker's consumer hands its channels the worker's leases
#: (``worker.delivery.consumer.GuardedConsumer``); kombu sets it as the channel attribute of that name.
#: Connections without it (producers, Celery's own tools) get kombu's behaviour.
LEASES_OPTION = "deepqueue_leases"

# KEYS: a taking list, unacked hash, the queue it was filled from. Puts each message of the list
# that is not recorded in unacked back on the queue (the tail: next out), and empties the list.
# One call, so a message is put back once. Returns how many were put back.
PUT_BACK_TAKEN = """
local restored = 0
for _, item in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local ok, message = pcall(cjson.decode, item)
  local properties = ok and type(message) == 'table' and message['properties'] or nil
  local tag = type(properties) == 'table' and properties['delivery_tag'] or nil
  if not (type(tag) == 'string' and redis.call('HEXISTS', KEYS[2], tag) == 1) then
    redis.call('RPUSH', KEYS[3], item)
    restored = restored + 1
  end
end
redis.call('DEL', KEYS[1])
return restored
"""


#: Errors of Redis itself, of the network or of kombu's routing state, which a delivery passes on
#: (Celery reconnects). kombu counts every KeyError as a connection error too, so anything else a
#: delivery raises is the entry's fault: it is dropped, not retried.
BROKER_ERRORS = (redis_py.RedisError, OSError, InconsistencyError)

JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


class MalformedEntry(ValueError):
    """An entry of a queue's list that is no message kombu can deliver; the text says why."""


def read_entry(raw: bytes) -> dict[str, Any]:
    """The kombu envelope ``raw`` holds, checked for what kombu itself reads before any consumer
    sees it: UTF-8 JSON, an object whose ``properties`` hold a delivery tag and a delivery info
    with exchange and routing key (kombu's record of it as held needs them). What the envelope
    carries (body, headers, task) is the consumer's to judge (``worker.delivery.consumer``)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise MalformedEntry(f"not UTF-8 text ({error})") from None
    try:
        payload = loads(text)
    except Exception as error:  # JSONDecodeError, kombu's type hooks, RecursionError on deep nesting
        raise MalformedEntry(f"not JSON ({type(error).__name__}: {str(error)[:200]})") from None
    if not isinstance(payload, dict):
        kind = "null" if payload is None else JSON_TYPES.get(type(payload), type(payload).__name__)
        raise MalformedEntry(f"a JSON {kind}, not a kombu message (an object with body, headers and properties)")
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        raise MalformedEntry("no properties object: not a kombu message")
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        raise MalformedEntry(f"properties.delivery_tag must be a non-empty string, got {tag!r:.100}")
    info = properties.get("delivery_info")
    if not (isinstance(info, dict) and all(isinstance(info.get(name), str) for name in ("exchange", "routing_key"))):
        raise MalformedEntry(f"properties.delivery_info must hold exchange and routing_key strings, got {info!r:.200}")
    return payload


def entry_task_id(raw: bytes) -> str:
    """The task id an entry's headers hold, if it is JSON enough to read one (for its dead letter)."""
    try:
        payload = loads(raw.decode("utf-8"))
    except Exception:  # not readable: no id to name
        return NO_ID
    return headers_task_id(payload.get("headers")) if isinstance(payload, dict) else NO_ID


def jobs_in(body: Any) -> int:
    """Jobs a message's body carries: a prompt batch's (``producer.message``), else 1 (also for
    a body this cannot read: the strategy judges it, as one message)."""
    try:
        args = loads(body)[0]
        return len(unpack(args[0]) or [None])
    except Exception:  # not JSON, not Celery's protocol 2, not a batch that can be one
        return 1


def jobs_in_entry(raw: bytes) -> int:
    """``jobs_in`` for an entry of a queue's list (a kombu envelope, its body maybe base64)."""
    try:
        envelope = loads(raw)
        body = envelope["body"]
        if envelope["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
    except Exception:  # no envelope: one entry, which the worker will drop
        return 1
    return jobs_in(body)


def taking_key(queue: str, worker: str) -> str:
    """The list a worker moves messages of ``queue`` into while it records them."""
    return f"{TAKING_PREFIX}{queue}:{worker}"


def put_back_taken(client: Any, key: str, unacked_key: str, queue: str) -> int:
    """Put what a taking list holds but ``unacked`` does not back on ``queue``; how many."""
    return int(client.eval(PUT_BACK_TAKEN, 3, key, unacked_key, queue))


#: An entry taken: (queue, the entry, the taking list holding it or None, its class or None).
Taken = tuple[str, bytes, str | None, str | None]


class Leases(Protocol):
    """What a worker's channels need of its leases (``worker.delivery.leases.Leases``)."""

    queue: str  #: deepqueue's queue, taken through this worker's taking list
    name: str  #: this worker in taking lists

    def put_back(self, tag: str, copy: Copy) -> None: ...

    def return_delivered(self, delivered: dict[str, Any], channel: Any) -> int: ...


class QoS(redis.QoS):
    """kombu's Redis QoS, taking through the taking lists, and with a prefetch count of jobs: a
    message counts as the jobs it carries, so a worker reserves as many jobs whatever the size
    of its producers' prompt batches (kombu counts messages)."""

    _client: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._jobs: dict[str, int] = {}  # delivery tag -> jobs in its message (absent: 1)

    def can_consume(self) -> bool:
        return not self.prefetch_count or self.reserved_jobs() < self.prefetch_count

    def can_consume_max_estimate(self) -> int | None:
        return max(self.prefetch_count - self.reserved_jobs(), 0) if self.prefetch_count else None

    def reserved_jobs(self) -> int:
        """Jobs of the messages delivered and not acknowledged or rejected."""
        jobs, dirty = self._jobs, self._dirty
        return sum(jobs.get(tag, 1) for tag in self._delivered if tag not in dirty)

    @contextmanager
    def pipe_or_acquire(self, pipe: Any = None, client: Any = None) -> Iterator[Any]:
        """kombu's, keeping one client of the channel's pool instead of building one per call
        (a tenth of the consumer's time when it drains a stopped run)."""
        if pipe is not None:
            yield pipe
            return
        if client is None:
            client = self._client = self._client or self.channel._create_client()
        yield client.pipeline()

    def append(self, message: Any, delivery_tag: str) -> None:
        if len(self._jobs) > 2 * len(self._delivered) + 64:  # forget settled messages now and then
            self._jobs = {tag: jobs for tag, jobs in self._jobs.items() if tag in self._delivered}
        if (jobs := jobs_in(message.body)) > 1:
            self._jobs[delivery_tag] = jobs
        taken = self.channel.taking
        if taken is None or taken[0] is None:  # kombu's BRPOP: nothing else holds the message if this fails
            self._append_or_keep(message, delivery_tag)
        else:
            self._record_taken(message, delivery_tag, *taken)
        self.channel.taking = None  # recorded: kombu's unacked hash holds it now

    def _record_taken(self, message: Any, delivery_tag: str, key: str, raw: bytes) -> None:
        info = message.delivery_info
        try:
            with self.pipe_or_acquire() as pipe:  # one transaction: recorded and out of the taking list
                pipe.zadd(self.unacked_index_key, {delivery_tag: time()}).hset(
                    self.unacked_key, delivery_tag, dumps([message._raw, info["exchange"], info["routing_key"]])
                ).lrem(key, 1, raw).execute()
        except self.channel.connection_errors:
            self.channel.taking_checked.discard(key)  # it waits in the taking list: put it back first thing
            raise
        virtual.QoS.append(self, message, delivery_tag)  # kombu's own bookkeeping, as redis.QoS.append ends

    def ack_many(self, tags: list[str]) -> None:
        """Acknowledge these delivered messages in one round trip (kombu's ``ack`` makes one each):
        for draining the messages of stopped runs (``worker.delivery.stopped``)."""
        with self.pipe_or_acquire() as pipe:
            for tag in tags:
                self._remove_from_indices(tag, pipe)
            pipe.execute()
        for tag in tags:
            virtual.QoS.ack(self, tag)  # kombu's own bookkeeping, as redis.QoS.ack ends

    def _append_or_keep(self, message: Any, delivery_tag: str) -> None:
        try:
            super().append(message, delivery_tag)
        except self.channel.connection_errors as error:
            leases = self.channel.deepqueue_leases
            if leases is None:  # not a worker's consumer: nothing keeps the copy
                logger.error("Redis went away while taking message %s, which may be lost (%r)", delivery_tag, error)
                raise
            logger.warning(
                "Redis went away while taking message %s; it goes back on the queue when Redis answers (%r)",
                delivery_tag,
                error,
            )
            leases.put_back(delivery_tag, message_copy(message))
            raise

    def restore_unacked(self, client: Any = None) -> None:
        """kombu's, when a channel closes (a lost connection, a shutdown), puts back every message
        it delivered, batches still running included, while the worker puts back what it had not
        started: each message twice, and a batch generated again. In a worker the leases decide
        (``Leases.return_delivered``), once; elsewhere kombu's own."""
        leases = self.channel.deepqueue_leases
        if leases is None:
            super().restore_unacked(client)
            return
        delivered = dict(self._delivered)
        self._delivered.clear()
        returned = leases.return_delivered(delivered, self.channel)
        logger.info(
            "channel closed: %d messages not started go back to the queue, %d running finish here",
            returned,
            len(delivered) - returned,
        )


class Channel(redis.Channel):
    QoS = QoS
    from_transport_options = (*redis.Channel.from_transport_options, LEASES_OPTION)

    #: the worker's leases, on its consumer's connection (``LEASES_OPTION``); else None
    deepqueue_leases: Leases | None = None

    #: (taking list, or None where BRPOP took it; the entry as Redis held it) while an entry is
    #: being delivered, until kombu has recorded it as held
    taking: tuple[str | None, bytes] | None = None
    _moving_from: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._fair: dict[str, FairQueue] = {}
        #: taking lists known to hold nothing unrecorded (none on a new channel, nor after a failed delivery)
        self.taking_checked: set[str] = set()
        super().__init__(*args, **kwargs)

    def _taking_key(self) -> str | None:
        """This worker's taking list, when the channel consumes deepqueue's queue alone (else
        kombu's BRPOP: Celery's own reply queues, say, which share the channel at start-up)."""
        leases = self.deepqueue_leases
        if leases is None or self.global_keyprefix or self.active_queues != [leases.queue]:
            return None
        return taking_key(leases.queue, leases.name)

    def _brpop_start(self, timeout: float | None = None) -> None:
        key = self._taking_key()
        if key is None:
            super()._brpop_start(timeout)
            return
        [queue] = self.active_queues
        if key not in self.taking_checked:  # first put back what a failed delivery left
            restored = put_back_taken(self.client, key, self.unacked_key, queue)
            if restored:
                logger.warning("%d messages taken but never recorded (a lost connection): back on the queue", restored)
            self.taking_checked.add(key)
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self._moving_from = queue
        timeout = self.brpop_timeout if timeout is None else timeout
        self.client.connection.send_command("BLMOVE", queue, key, "RIGHT", "LEFT", timeout or 0)

    def _brpop_read(self, **options: Any) -> bool:
        queue, self._moving_from = self._moving_from, None
        try:
            taken = self._read_popped(options) if queue is None else self._read_moved(queue, options)
            if taken is None:
                raise Empty()
            self._deliver_entry(*taken)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _read_popped(self, options: dict[str, Any]) -> Taken | None:
        """kombu's BRPOP reply: (queue, entry, no taking list, class), or None."""
        try:
            reply = self.client.parse_response(self.client.connection, "BRPOP", **options)
        except self.connection_errors:
            self.client.connection.disconnect()  # the next poll reconnects
            raise
        if not reply:
            return None
        list_name, item = reply
        queue = bytes_to_str(list_name).rsplit(self.sep, 1)[0]
        self._queue_cycle.rotate(queue)
        return self._swap_token(queue, item, None)

    def _read_moved(self, queue: str, options: dict[str, Any]) -> Taken | None:
        """The BLMOVE reply (or a prioritised message): (queue, entry, the taking list holding
        it, class), or None."""
        try:
            item = self.client.parse_response(self.client.connection, "BLMOVE", **options)
        except self.connection_errors:
            self.client.connection.disconnect()
            self.taking_checked.discard(self._taking_key() or "")  # Redis may have moved one we never saw
            raise
        key = self._taking_key() or ""
        if item is None:  # the queue's own list stayed empty: any in kombu's priority lists?
            item = self._take_prioritised(queue, key)
        return None if item is None else self._swap_token(queue, item, key)

    def _swap_token(self, queue: str, item: bytes, key: str | None) -> Taken | None:
        """A token stands for the message its runs' shares choose (``producer.fair``): that one,
        with its class. None if no run has one (a deleted run's token, now gone)."""
        if item != TOKEN:
            return queue, item, key, None
        fair = self._fair.get(queue)
        if fair is None:
            fair = self._fair[queue] = FairQueue(self.client, queue)
        try:
            taken = fair.take(key)
        except Exception:
            if key:  # the token, or its message, waits in the taking list: put back first thing
                self.taking_checked.discard(key)
            else:  # BRPOP popped the token: stand another in its place (a spare one is dropped when taken)
                self._put_token_back(queue)
            raise
        if taken is None:
            return None
        priority, item = taken
        return queue, item, key, priority

    def _put_token_back(self, queue: str) -> None:
        try:
            self.client.rpush(queue, TOKEN)
        except Exception as error:  # Redis is gone: its message waits for a token (deepqueue retry sends it again)
            logger.error("a token of queue %s was lost with Redis (%r): one message waits untaken", queue, error)

    def _deliver_entry(self, queue: str, item: bytes, key: str | None, priority: str | None) -> None:
        """Deliver one entry taken off ``queue`` (``key``: the taking list holding it; ``priority``:
        the class it was taken in), or drop it to the dead letters: one that is no message kombu
        can read, or that kombu fails on."""
        try:
            payload = read_entry(item)
        except MalformedEntry as error:
            self._drop_entry(queue, item, key, error)
            return
        if priority is not None and isinstance(payload.get("headers"), dict):
            payload["headers"][PRIORITY_HEADER] = priority
        self.taking = (key, item)
        try:
            self.connection._deliver(payload, queue)
        except BROKER_ERRORS:
            raise  # Redis or the network: Celery reconnects, a taking list keeps the entry
        except Exception as error:  # what kombu (its reading of the body and headers) or a consumer failed on
            if self.taking is None:  # recorded as held: take it out of kombu's unacked records
                self._forget_delivered(payload["properties"]["delivery_tag"])
                key = None
            self._drop_entry(queue, item, key, error)
        finally:
            self.taking = None

    def _forget_delivered(self, tag: str) -> None:
        try:
            self.qos.reject(tag, requeue=False)
        except BROKER_ERRORS:
            raise
        except Exception as error:  # settled already (kombu forgets a tag once): nothing to take out
            logger.debug("message %s was settled already (%r)", tag, error)

    def _drop_entry(self, queue: str, item: bytes, key: str | None, error: BaseException) -> None:
        """Dead-letter an entry and, in the same transaction, take it out of its taking list (so no
        put-back resurrects it). Raises what Redis raises: the entry then stays in the taking
        list, to be put back on the queue and dropped again."""
        detail = str(error) if isinstance(error, MalformedEntry) else f"{type(error).__name__}: {str(error)[:500]}"
        reason = f"unreadable queue entry: {detail}"
        logger.error("dropping an entry of queue %s (%d bytes): %s", queue, len(item), reason)
        record = dead_letter(task_id=entry_task_id(item), reason=reason, body=item, content_type=None, now=time())
        pipe = self.client.pipeline()
        if key:
            pipe.lrem(key, 1, item)
        try:
            push_dead_letter(pipe, record).execute()
        except self.connection_errors:
            if key:
                self.taking_checked.discard(key)
            raise

    def _take_prioritised(self, queue: str, key: str) -> bytes | None:
        """A message from kombu's lists of prioritised messages (no wait), moved like BLMOVE does."""
        for priority in self.priority_steps:
            if priority:
                item = self.client.lmove(self._q_for_pri(queue, priority), key, "RIGHT", "LEFT")
                if item is not None:
                    return item
        return None


class Transport(redis.Transport):
    Channel = Channel


def worker_broker_settings(broker_url: str) -> dict[str, Any]:
    """Celery settings that make a worker use this transport for ``broker_url``.

    Naming a transport class replaces the URL's scheme, so a ``rediss://`` URL without
    ``ssl_cert_reqs`` gets here what kombu gives it by default (TLS without a certificate check);
    ssl options in the URL's query still take precedence.
    """
    config: dict[str, Any] = {"broker_transport": f"{__name__}:Transport"}
    url = urlsplit(broker_url)
    if url.scheme == "rediss" and "ssl_cert_reqs" not in parse_qs(url.query):
        config["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_NONE}
    return config
