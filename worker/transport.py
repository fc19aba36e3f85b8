"""kombu's Redis transport, with no message lost between its two delivery commands.

kombu hands a message over in two steps: ``BRPOP`` takes it off the queue, then one transaction
records it as unacknowledged (``unacked`` and ``unacked_index``). If Redis dies or the connection
drops between the two, the pop is kept (Redis persisted it) but the record is not: the message
exists nowhere but in this worker's memory, and kombu drops it with the failed delivery. Here the
worker keeps that copy and its leases (``worker.leases``) put it back on the queue as soon as Redis
answers: from Redis's own record if the transaction did go through (its reply was lost), else from
the copy. The delivery still fails, so kombu reconnects as before.

The worker uses this transport through Celery's ``broker_transport`` setting (see
``worker_broker_settings``); producers keep kombu's own.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kombu.transport import redis

from worker import runtime

logger = logging.getLogger(__name__)


class QoS(redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
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
