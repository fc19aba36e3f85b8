"""kombu's Redis transport, with no message lost between taking it and recording it as held.

kombu hands a message over in two steps: ``BRPOP`` takes it off the queue, then one transaction
records it as unacknowledged (``unacked`` and ``unacked_index``). Redis killed, or the connection
lost, between the two (after Redis applied the pop, before its reply arrived, or while the record
was on its way) loses the message: it exists nowhere but, at best, in this worker's memory.

Here a worker takes messages with ``BLMOVE`` instead: in one step Redis moves the message from
the queue to this worker's *taking list* (``deepqueue:taking:{worker}``), where it survives any
such failure, and the record transaction also removes it from there. Whatever is left in a
taking list was never recorded: the worker puts it back on the queue when it connects again
(before it takes anything else), and the lease sweep (``worker.leases``) does so for the taking
lists of workers that are gone. A message whose record did go through (only its reply was lost)
is already in ``unacked`` and is only dropped from the list; the leases take it from there.

``BLMOVE`` reads one list: the queue's own. Messages a producer sent with a priority land in
kombu's priority lists; whenever the queue's own list stays empty for a poll, the worker moves
one from those (``LMOVE``, the same way). deepqueue's producer sends no priorities.

The worker uses this transport through Celery's ``broker_transport`` setting (see
``worker_broker_settings``); producers do not consume. ``BLMOVE`` needs Redis 6.2 or later.
"""

from __future__ import annotations

import logging
import ssl
from queue import Empty
from time import monotonic, time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kombu.transport import redis, virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from worker import runtime

logger = logging.getLogger(__name__)

TAKING_PREFIX = "deepqueue:taking:"

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


def taking_key(queue: str, worker: str) -> str:
    """The list a worker moves messages of ``queue`` into while it records them."""
    return f"{TAKING_PREFIX}{queue}:{worker}"


def put_back_taken(client: Any, key: str, unacked_key: str, queue: str) -> int:
    """Put what a taking list holds but ``unacked`` does not back on ``queue``; how many."""
    return int(client.eval(PUT_BACK_TAKEN, 3, key, unacked_key, queue))


class QoS(redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        taken = self.channel.taking
        if taken is None:  # kombu's BRPOP: nothing else holds the message if this fails
            self._append_or_keep(message, delivery_tag)
            return
        key, raw = taken
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

    def _append_or_keep(self, message: Any, delivery_tag: str) -> None:
        try:
            super().append(message, delivery_tag)
        except self.channel.connection_errors as error:
            leases = runtime.leases()
            if leases is None:  # not a worker's main process: nothing keeps the copy
                logger.error("Redis went away while taking message %s, which may be lost (%r)", delivery_tag, error)
                raise
            logger.warning(
                "Redis went away while taking message %s; it goes back on the queue when Redis answers (%r)",
                delivery_tag,
                error,
            )
            info = message.delivery_info
            leases.put_back(delivery_tag, (message._raw, info["exchange"], info["routing_key"]))
            raise


class Channel(redis.Channel):
    QoS = QoS

    #: (taking list, the message as Redis holds it) while a message taken by BLMOVE is delivered
    taking: tuple[str, bytes] | None = None
    _moving_from: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        #: taking lists known to hold nothing unrecorded (none on a new channel, nor after a failed delivery)
        self.taking_checked: set[str] = set()
        super().__init__(*args, **kwargs)

    def _taking_key(self) -> str | None:
        """This worker's taking list, when the channel consumes deepqueue's queue alone (else
        kombu's BRPOP: Celery's own reply queues, say, which share the channel at start-up)."""
        worker = runtime.worker_name()
        if worker is None or self.global_keyprefix or self.active_queues != [runtime.settings().queue]:
            return None
        return taking_key(self.active_queues[0], worker)

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
        if queue is None:
            return super()._brpop_read(**options)
        try:
            try:
                item = self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                self.taking_checked.discard(self._taking_key() or "")  # Redis may have moved one we never saw
                raise
            key = self._taking_key() or ""
            if item is None:  # the queue's own list stayed empty: any in kombu's priority lists?
                item = self._take_prioritised(queue, key)
            if item is None:
                raise Empty()
            self.taking = (key, item)
            try:
                self.connection._deliver(loads(bytes_to_str(item)), queue)
            finally:
                self.taking = None
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

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
