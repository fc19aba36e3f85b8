"""Any bytes on the queue's list: the worker's transport delivers each entry or drops it to the
dead letters, and nothing escapes its read path (issue 14, part 1).

The channel here is the worker's own (``worker.delivery.transport``) on a real Redis, consuming through a
plain kombu ``Consumer``; the worker's name and settings are set as a worker's main process sets
them, so its reads take the ``BLMOVE`` path (or kombu's ``BRPOP`` path, for a process with none).
Deterministic (``derandomize``): the same examples every run; ``DEEPQUEUE_PROPERTY_EXAMPLES``
raises the count of the main property.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from kombu import Connection, Exchange, Queue

from producer.enqueue import publish
from producer.entries import entries_of
from producer.fair import PRIORITY_HEADER, TOKEN, FairQueue, set_share
from producer.layout import DEAD_LETTERS_KEY
from producer.message import unpack
from tests.helpers import make_job
from worker.delivery.leases import Leases
from worker.delivery.transport import LEASES_OPTION, MalformedEntry, read_entry, taking_key, worker_broker_settings

QUEUE = "deepqueue"
EXAMPLES = max(500, int(os.environ.get("DEEPQUEUE_PROPERTY_EXAMPLES", "500")))


def properties(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


# -- strategies -------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


FIELDS = ("body", "encoding", "exchange", "routing_key", "info", "tag", "headers", "id", "content-type", "properties")


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """kombu envelopes: well-formed but for none, one or a few fields, each broken by any JSON
    value in its place or by its absence."""
    broken = draw(st.sets(st.sampled_from(FIELDS), max_size=3))

    def field(name: str, good: Any) -> Any:
        return draw(json_values | st.just(MISSING)) if name in broken else good

    text = draw(st.text(max_size=40))
    encoding = field("encoding", draw(st.sampled_from(["base64", None])))
    body = field("body", base64.b64encode(text.encode()).decode() if encoding == "base64" else text)
    info = field("info", {"exchange": field("exchange", QUEUE), "routing_key": field("routing_key", QUEUE)})
    properties = {"delivery_tag": field("tag", draw(st.uuids()).hex), "delivery_info": info, "body_encoding": encoding}
    envelope = {
        "body": body,
        "content-type": field("content-type", "application/json"),
        "headers": field("headers", {"id": field("id", draw(st.uuids()).hex), "task": "deepqueue.generate"}),
        "properties": field("properties", properties),
    }
    return without_missing(envelope)


MISSING = object()


def without_missing(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: without_missing(item) for key, item in value.items() if item is not MISSING}
    return value


entries = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda value: json.dumps(value).encode()),
    envelopes().map(lambda envelope: json.dumps(envelope).encode()),
    st.text(max_size=60).map(str.encode),
)


# -- the worker's channel on a real Redis --------------------------------------------------------


class Reader:
    """The worker's transport consuming QUEUE: ``take(entry)`` pushes one entry at the head of the
    queue and runs one read; the consumer acknowledges whatever it is handed. With ``leases``,
    its channel takes through their taking list, as a worker's consumer's does."""

    def __init__(self, url: str, on_message: Any = None, leases: Leases | None = None) -> None:
        self.db = redis.Redis.from_url(url)
        config = worker_broker_settings(url)
        options = {} if leases is None else {LEASES_OPTION: leases}
        self.connection = Connection(url, transport=config["broker_transport"], transport_options=options)
        self.delivered: list[Any] = []
        queue = Queue(QUEUE, Exchange(QUEUE, "direct"), QUEUE)
        self.consumer = self.connection.Consumer(queue, on_message=on_message or self._keep, accept=["json"])
        self.consumer.consume()

    def _keep(self, message: Any) -> None:
        self.delivered.append(message)
        message.ack()

    def take(self, entry: bytes) -> str:
        """``delivered`` or ``dead-lettered``; fails if the entry ended both ways, neither, or
        anywhere else (left on the queue, in a taking list, held unacknowledged)."""
        self.db.delete(DEAD_LETTERS_KEY)  # capped at 1,000: counted from empty each time
        delivered = len(self.delivered)
        self.db.rpush(QUEUE, entry)
        try:
            self.connection.drain_events(timeout=10)
        except TimeoutError:
            pytest.fail(f"the entry was neither delivered nor dropped: {entry[:200]!r}")
        outcome = (len(self.delivered) - delivered, self.db.llen(DEAD_LETTERS_KEY))
        assert outcome in ((1, 0), (0, 1)), f"delivered {outcome[0]}, dead-lettered {outcome[1]}: {entry[:200]!r}"
        assert self.db.llen(QUEUE) == 0 and self.db.llen(taking_key(QUEUE, "reader")) == 0, "an entry was kept"
        assert self.db.hlen("unacked") == 0, "an entry stayed held"
        return "delivered" if outcome[0] else "dead-lettered"

    def close(self) -> None:
        self.consumer.cancel()
        self.connection.close()


@pytest.fixture
def worker_leases(redis_urls) -> Leases:
    """The leases a worker's consumer hands its channels (their thread not started)."""
    return Leases(redis_urls[0], {}, queue=QUEUE, name="reader", renew_s=5, expiry_s=20)


@pytest.fixture
def reader(redis_urls, worker_leases) -> Iterator[Reader]:
    reader = Reader(redis_urls[0], leases=worker_leases)
    yield reader
    reader.close()


# -- properties -------------------------------------------------------------------------------------


@properties(EXAMPLES)
@given(entry=entries)
def test_any_entry_is_delivered_or_dead_lettered(reader, entry):
    outcome = reader.take(entry)
    event(outcome)
    try:
        read_entry(entry)
    except MalformedEntry:
        assert outcome == "dead-lettered"


@properties(150)
@given(entry=entries)
def test_any_entry_is_delivered_or_dead_lettered_through_brpop(redis_urls, entry):
    """A connection without a worker's leases reads with kombu's BRPOP: the same guard holds."""
    reader = Reader(redis_urls[0])
    try:
        reader.take(entry)
    finally:
        reader.close()


# -- the cases of the issue, named --------------------------------------------------------------


def kombu_entry(tag: str = "t-1", body: str = "[[], {}, {}]") -> bytes:
    properties = {"delivery_tag": tag, "delivery_info": {"exchange": QUEUE, "routing_key": QUEUE}}
    return json.dumps({"body": body, "headers": {"id": "task-1"}, "properties": properties}).encode()


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (b"this is not json", "not JSON"),
        (b'{"body": "x", "headers": {}}', "no properties object"),
        (b"[1, 2, 3]", "a JSON array, not a kombu message"),
        (b"null", "a JSON null, not a kombu message"),
        (os.urandom(1 << 20), "not UTF-8 text"),
        (b'{"task": "deepqueue.generate", "args": [{"prompt": "a cat"}]}', "no properties object"),
        (json.dumps({"properties": {"delivery_tag": 7}}).encode(), "delivery_tag must be a non-empty string"),
        (json.dumps({"properties": {"delivery_tag": "x"}}).encode(), "delivery_info must hold exchange"),
        (b"[" * 100_000, "not JSON (RecursionError"),
    ],
    ids=["not-json", "no-properties", "array", "null", "1mb-random", "json-not-envelope", "tag", "info", "deep"],
)
def test_each_raw_entry_is_dead_lettered_with_its_reason(reader, entry, reason):
    assert reader.take(entry) == "dead-lettered"
    [record] = [json.loads(raw) for raw in reader.db.lrange(DEAD_LETTERS_KEY, 0, 0)]
    assert reason in record["reason"] and record["reason"].startswith("unreadable queue entry: ")
    assert record["body"] == entry[:4096].decode("utf-8", errors="replace")
    assert record["task_id"] == "(no id)"


def test_an_entry_kombu_cannot_decode_is_dead_lettered_with_its_task_id(reader):
    entry = json.loads(kombu_entry(body="%%% not base64"))
    entry["properties"]["body_encoding"] = "base64"
    entry["headers"] = {"id": "bad-body", "compression": "application/x-gzip"}
    assert reader.take(json.dumps(entry).encode()) == "dead-lettered"
    record = json.loads(reader.db.lindex(DEAD_LETTERS_KEY, 0))
    assert record["task_id"] == "bad-body" and "unreadable queue entry: " in record["reason"]


def test_a_well_formed_entry_is_delivered_as_kombu_would(reader):
    assert reader.take(kombu_entry()) == "delivered"
    [message] = reader.delivered
    assert (message.delivery_tag, message.headers["id"], message.body) == ("t-1", "task-1", b"[[], {}, {}]")


def test_an_entry_whose_consumer_fails_after_it_was_recorded_is_dead_lettered(redis_urls, worker_leases):
    """A consumer that raises (not a broker error) after kombu recorded the message as held: the
    record goes, the dead letter names the error, and the next entry is read as usual. (The
    worker's own consumer guards its handler; this is the transport's last line.)"""

    def fails(message: Any) -> None:
        raise ValueError("a consumer bug")

    reader = Reader(redis_urls[0], on_message=fails, leases=worker_leases)
    try:
        assert reader.take(kombu_entry("t-2")) == "dead-lettered"
        assert "ValueError: a consumer bug" in json.loads(reader.db.lindex(DEAD_LETTERS_KEY, 0))["reason"]
        assert reader.db.zcard("unacked_index") == 0
    finally:
        reader.close()


def test_a_dropped_entry_is_not_put_back_from_the_taking_list(reader):
    """The drop and the removal from the taking list are one transaction: a reconnect's put-back
    (which restores what the list holds unrecorded) finds nothing of it."""
    assert reader.take(b"garbage") == "dead-lettered"
    reader.consumer.channel.taking_checked.clear()  # as after a lost connection
    assert reader.take(kombu_entry("t-3")) == "delivered"  # the put-back ran before this read
    assert reader.db.llen(taking_key(QUEUE, "reader")) == 0 and reader.db.llen(QUEUE) == 0
    assert [message.delivery_tag for message in reader.delivered] == ["t-3"]


# -- runs' lists (producer.fair): a token is swapped for the message the shares choose -----------


@pytest.mark.parametrize("through", ["taking list", "brpop"])
def test_a_token_is_delivered_as_the_message_its_runs_classes_choose(redis_urls, worker_leases, through):
    reader = Reader(redis_urls[0], leases=worker_leases if through == "taking list" else None)
    try:
        publish(reader.db, QUEUE, entries_of([make_job(i, run_id="bulk") for i in range(16)]), per_message=8)
        set_share(reader.db, "urgent", priority="high")
        publish(reader.db, QUEUE, entries_of([make_job(i, run_id="urgent") for i in range(3)]), per_message=8)
        for _ in range(3):
            reader.connection.drain_events(timeout=10)
        batches = [(m.headers[PRIORITY_HEADER], json.loads(m.body)[0][0]) for m in reader.delivered]
        assert [(priority, batch["run_id"], len(unpack(batch))) for priority, batch in batches] == [
            ("high", "urgent", 3),
            ("normal", "bulk", 8),
            ("normal", "bulk", 8),
        ]
        assert reader.db.llen(QUEUE) == 0 and reader.db.llen(taking_key(QUEUE, "reader")) == 0
        assert reader.db.hlen("unacked") == 0 and FairQueue(reader.db, QUEUE).waiting() == (0, 0)
    finally:
        reader.close()


def test_a_token_with_no_message_behind_it_is_dropped_quietly(reader):
    reader.db.rpush(QUEUE, TOKEN)  # its run's list was deleted
    with pytest.raises(TimeoutError):
        reader.connection.drain_events(timeout=1)
    assert reader.db.llen(QUEUE) == 0 and reader.db.llen(taking_key(QUEUE, "reader")) == 0
    assert reader.db.llen(DEAD_LETTERS_KEY) == 0 and reader.take(kombu_entry("t-4")) == "delivered"


def test_a_message_swapped_in_but_never_recorded_goes_back_and_is_delivered(reader):
    """Redis lost between the swap and kombu's record: the message waits in the taking list, and
    the first poll after the reconnect puts it back on the queue's list, from where it is
    delivered (with the class it was sent in lost: normal)."""
    publish(reader.db, QUEUE, entries_of([make_job(i, run_id="swapped") for i in range(3)]), per_message=8)
    taking = taking_key(QUEUE, "reader")
    assert reader.db.lmove(QUEUE, taking, "RIGHT", "LEFT") == TOKEN
    _, item = FairQueue(reader.db, QUEUE).take(taking)  # what the failed poll did
    assert reader.db.lrange(taking, 0, -1) == [item] and reader.db.llen(QUEUE) == 0
    reader.consumer.channel.taking_checked.clear()  # as after a lost connection
    reader.connection.drain_events(timeout=10)
    [message] = reader.delivered
    assert message.headers["id"].endswith("+2") and PRIORITY_HEADER not in message.headers
    assert reader.db.llen(taking) == 0 and reader.db.llen(QUEUE) == 0 and reader.db.hlen("unacked") == 0


def test_a_popped_token_whose_swap_fails_is_stood_back_for_its_message(redis_urls, monkeypatch):
    """kombu's BRPOP takes the token off the list itself; if the swap then fails (a Redis error:
    injected, since a script's OOM cannot be caused on demand here), a token goes back in its
    place, and the message is delivered on the next read."""
    reader = Reader(redis_urls[0])  # no leases: BRPOP
    try:
        publish(reader.db, QUEUE, entries_of([make_job(0, run_id="kept")]), per_message=8)
        take = FairQueue.take

        def fails_once(self: FairQueue, taking: str | None) -> Any:
            monkeypatch.setattr(FairQueue, "take", take)
            raise redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'")

        monkeypatch.setattr(FairQueue, "take", fails_once)
        with pytest.raises(redis.ResponseError):
            reader.connection.drain_events(timeout=10)
        assert reader.db.lrange(QUEUE, 0, -1) == [TOKEN] and not reader.delivered
        reader.connection.drain_events(timeout=10)
        assert [message.headers["id"] for message in reader.delivered] == [make_job(0, run_id="kept").job_id]
    finally:
        reader.close()
