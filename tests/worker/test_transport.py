"""The worker's broker transport: kombu's Redis transport, keeping what a failed delivery took."""

from __future__ import annotations

import ssl

import pytest
from kombu import Connection

from worker.app import create_app
from worker.settings import WorkerSettings
from worker.transport import Transport, worker_broker_settings


def connection_for(url: str) -> Connection:
    config = worker_broker_settings(url)
    return Connection(url, transport=config["broker_transport"], ssl=config.get("broker_use_ssl"))


def test_the_worker_app_consumes_through_this_transport():
    app = create_app(WorkerSettings(broker_url="redis://127.0.0.1:6379/3"))
    with app.connection_for_read() as connection:
        assert connection.get_transport_cls() is Transport
        assert (connection.hostname, connection.port, connection.virtual_host) == ("127.0.0.1", 6379, "3")


@pytest.mark.parametrize(
    ("url", "wanted"),
    [
        ("redis://:pw@h:6379/0", None),  # plain stays plain
        ("rediss://:pw@h:6380/0", {"ssl_cert_reqs": ssl.CERT_NONE}),  # kombu's default for rediss
        ("rediss://:pw@h:6380/0?ssl_cert_reqs=required", {"ssl_cert_reqs": ssl.CERT_REQUIRED}),  # the URL's wins
    ],
)
def test_tls_is_what_kombu_gives_the_same_url(url, wanted):
    ours = connection_for(url)
    assert ours.ssl == wanted
    assert bool(ours.ssl) == bool(Connection(url).ssl) and (not wanted or ours.ssl == Connection(url).ssl)
    assert (ours.hostname, ours.password) == ("h", "pw")
