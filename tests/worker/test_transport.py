"""The worker's broker transport: kombu's Redis transport, keeping what a failed delivery took."""

from __future__ import annotations

import json
import ssl
import time
from types import SimpleNamespace

import pytest
import redis
from kombu import Connection

from producer.enqueue import publish
from producer.entries import entries_of
from producer.layout import WORKERS_KEY
from tests.helpers import lose_queue, make_job, queued_entries
from worker.app import create_app
from worker.delivery.consumer import GuardedConsumer
from worker.delivery.leases import Leases
from worker.delivery.transport import Transport, jobs_in_entry, put_back_taken, taking_key, worker_broker_settings
from worker.runtime import WorkerRuntime
from worker.settings import WorkerSettings


def connection_for(url: str) -> Connection:
    config = worker_broker_settings(url)
    return Connection(url, transport=config["broker_transport"], ssl=config.get("broker_use_ssl"))


def test_the_worker_app_consumes_through_this_transport():
    app = create_app(WorkerSettings(broker_url="redis://127.0.0.1:6379/3"))
    with app.connection_for_read() as connection:
        assert connection.get_transport_cls() is Transport
        assert (connection.hostname, connection.port, connection.virtual_host) == ("127.0.0.1", 6379, "3")


def test_only_the_consumers_channels_put_back_through_the_workers_leases(redis_urls):
    """The consumer hands its channels the worker's leases; Celery's other connections get kombu's way."""
    app = create_app(WorkerSettings(broker_url=redis_urls[0]))
    runtime = WorkerRuntime.create(app.settings, "gpu0@host")
    consumer = SimpleNamespace(app=app, controller=SimpleNamespace(deepqueue=runtime), ensure_connected=lambda c: c)
    with GuardedConsumer.connection_for_read(consumer) as connection:
        assert connection.default_channel.deepqueue_leases is runtime.leases
    with app.connection_for_read() as connection:
        assert connection.default_channel.deepqueue_leases is None


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


# -- taking lists: what a worker took but never recorded goes back, once ----------------------------


def kombu_message(tag: str, queue: str = "deepqueue") -> bytes:
    properties = {"delivery_tag": tag, "delivery_info": {"routing_key": queue}}
    return json.dumps({"body": "[]", "headers": {}, "properties": properties}).encode()


def test_put_back_taken_restores_only_what_was_not_recorded(redis_urls):
    client = redis.Redis.from_url(redis_urls[0])
    key = taking_key("deepqueue", "w1")
    client.rpush(key, kombu_message("a"), kombu_message("b"), b"not json at all")
    client.hset("unacked", "b", "recorded")  # its record went through; only the reply was lost
    assert put_back_taken(client, key, "unacked", "deepqueue") == 2
    assert client.lrange("deepqueue", 0, -1) == [kombu_message("a"), b"not json at all"]
    assert not client.exists(key)
    assert put_back_taken(client, key, "unacked", "deepqueue") == 0  # nothing twice


def test_a_gone_workers_taking_list_is_swept_by_a_live_worker(redis_urls):
    """The lease sweep with a real channel: the list of a worker silent past the expiry (or never
    seen) goes back, a live worker's stays (its message may be on its way to being recorded)."""
    client = redis.Redis.from_url(redis_urls[0])
    now = time.time()
    client.hset(WORKERS_KEY, mapping={"gone": now - 100, "alive": now})
    client.rpush(taking_key("deepqueue", "gone"), kombu_message("g"))
    client.rpush(taking_key("deepqueue", "alive"), kombu_message("l"))
    client.rpush(taking_key("deepqueue", "never-renewed"), kombu_message("n"))
    client.rpush(taking_key("other-queue", "gone"), kombu_message("o"))  # another deployment's queue
    leases = Leases(redis_urls[0], {}, queue="deepqueue", name="sweeper", renew_s=5, expiry_s=20)
    with Connection(redis_urls[0]) as connection:
        leases._sweep(connection.default_channel, time.time(), held=set())
    assert sorted(client.lrange("deepqueue", 0, -1)) == sorted([kombu_message("g"), kombu_message("n")])
    assert client.lrange(taking_key("deepqueue", "alive"), 0, -1) == [kombu_message("l")]
    assert client.llen(taking_key("other-queue", "gone")) == 1 and not client.exists("other-queue")


def test_a_model_whose_only_worker_died_gets_its_messages_back_from_any_worker(redis_urls):
    """A plain-queue worker's sweep also covers the deployment's model queues (those a worker said
    it serves): the dead sdxl worker's taking list and its expired, unacknowledged message go back
    on `deepqueue.sdxl`; another deployment's queue stays untouched."""
    from producer.layout import WORKER_QUEUES_KEY

    client = redis.Redis.from_url(redis_urls[0])
    now = time.time()
    client.hset(WORKERS_KEY, mapping={"sdxl-gone": now - 100})
    client.hset(WORKER_QUEUES_KEY, mapping={"sdxl-gone": "deepqueue.sdxl", "elsewhere": "other-queue.sdxl"})
    client.rpush(taking_key("deepqueue.sdxl", "sdxl-gone"), kombu_message("t", "deepqueue.sdxl"))
    client.rpush(taking_key("other-queue.sdxl", "elsewhere"), kombu_message("o", "other-queue.sdxl"))
    with Connection(redis_urls[0]) as connection:
        channel = connection.default_channel
        unacked = [json.loads(kombu_message("u", "deepqueue.sdxl")), "", "deepqueue.sdxl"]
        client.hset(channel.unacked_key, "u", json.dumps(unacked))
        client.zadd(channel.unacked_index_key, {"u": now - 100})
        leases = Leases(redis_urls[0], {}, queue="deepqueue", name="plain", renew_s=5, expiry_s=20)
        leases._sweep(channel, time.time(), held=set())
    restored = [json.loads(raw)["properties"]["delivery_tag"] for raw in client.lrange("deepqueue.sdxl", 0, -1)]
    assert sorted(restored) == ["t", "u"]
    assert not client.exists(taking_key("deepqueue.sdxl", "sdxl-gone")) and not client.hexists("unacked", "u")
    assert client.llen(taking_key("other-queue.sdxl", "elsewhere")) == 1 and not client.exists("other-queue.sdxl")


# -- the prefetch count counts jobs: a prompt batch fills as many places as it has jobs ----------


def test_a_prompt_batch_fills_as_much_of_the_prefetch_count_as_it_has_jobs(redis_urls):
    client = redis.Redis.from_url(redis_urls[0])
    jobs = [make_job(index) for index in range(17)]
    publish(client, "prefetch", entries_of(jobs), per_message=8)  # 8 + 8 + 1
    with connection_for(redis_urls[0]) as connection:
        channel = connection.default_channel
        qos = channel.qos
        qos.prefetch_count = 10
        raws = queued_entries(client, "prefetch")  # oldest first
        messages = [channel.Message(json.loads(raw), channel=channel) for raw in raws]
        assert [jobs_in_entry(raw) for raw in raws] == [8, 8, 1]
        qos.append(messages[0], messages[0].delivery_tag)
        assert qos.reserved_jobs() == 8 and qos.can_consume() and qos.can_consume_max_estimate() == 2
        qos.append(messages[1], messages[1].delivery_tag)
        assert qos.reserved_jobs() == 16 and not qos.can_consume() and qos.can_consume_max_estimate() == 0
        qos.ack(messages[0].delivery_tag)
        qos.append(messages[2], messages[2].delivery_tag)
        assert qos.reserved_jobs() == 9 and qos.can_consume()
    lose_queue(client, "prefetch")
    client.delete("unacked", "unacked_index")
