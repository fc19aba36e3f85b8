"""The delivery ledger (``worker.delivery.ledger``): each message settled once, whoever asks, and a
message a pool process works on never put back. No Redis, kombu or Celery: milliseconds."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.delivery.ledger import DeliveryLedger

COPY = (b"{}", "deepqueue", "deepqueue")


def test_a_message_given_back_by_two_parties_goes_back_once() -> None:
    """kombu's channel close and the strategy's retire both ask after a lost connection."""
    ledger = DeliveryLedger()
    ledger.hold("a")
    assert ledger.give_back("a", COPY)
    assert not ledger.give_back("a", COPY)
    assert list(ledger.due().returns) == ["a"]
    ledger.sent(returned=["a"])
    assert not ledger.give_back("a", COPY)  # after the beat, too
    assert ledger.due().returns == {} and ledger.held() == set()


def test_working_messages_are_not_returned_when_the_channel_closes() -> None:
    ledger = DeliveryLedger()
    for tag in "abcd":
        ledger.hold(tag)
    ledger.working(["a", "b"])
    assert ledger.not_working(["a", "b", "c", "d"]) == ["c", "d"]
    ledger.idle(["b"])  # its process died: the worker runs it again, or gives it back
    assert ledger.not_working(["a", "b"]) == ["b"]


def test_an_acknowledged_message_is_never_put_back() -> None:
    ledger = DeliveryLedger()
    ledger.hold("a")
    ledger.working(["a"])
    assert ledger.acknowledge("a")
    assert not ledger.give_back("a", COPY)
    assert ledger.due().acks == {"a"} and ledger.due().held == frozenset()
    ledger.sent(acked=["a"])
    assert not ledger.acknowledge("a") and ledger.due().acks == frozenset()


def test_settled_on_the_channel_is_forgotten_and_not_settled_again() -> None:
    ledger = DeliveryLedger()
    ledger.hold("a")
    ledger.settled_here("a")
    assert ledger.held() == set()
    assert not ledger.give_back("a", COPY) and not ledger.acknowledge("a")
    # kombu puts a message back with its tag: held again, it was delivered again, and is leased
    # anew (not left to expire while it runs here, its acknowledgement ignored).
    ledger.hold("a")
    assert ledger.held() == {"a"}
    ledger.working(["a"])
    assert ledger.is_working("a") and ledger.acknowledge("a") and ledger.due().acks == {"a"}
    ledger.hold("a")  # on its way to be acknowledged: not a new delivery
    assert ledger.held() == set()


def test_a_claimed_message_is_put_back_by_one_caller_and_again_only_if_that_failed() -> None:
    ledger = DeliveryLedger()
    ledger.give_back("a", COPY)
    assert ledger.claim("a") == COPY
    assert ledger.claim("a") is None  # the other caller skips it
    ledger.unclaim("a")  # Redis failed half-way: still owed
    assert ledger.claim("a") == COPY
    ledger.sent(returned=["a"])
    assert ledger.claim("a") is None and ledger.due().returns == {}


def test_settled_memory_is_bounded() -> None:
    ledger = DeliveryLedger(settled_memory=3)
    for tag in "abcde":
        ledger.settled_here(tag)
    assert ledger.give_back("a", COPY)  # forgotten: the oldest
    assert not ledger.give_back("e", COPY)


def test_concurrent_give_backs_return_each_message_once() -> None:
    ledger = DeliveryLedger()
    tags = [str(i) for i in range(500)]
    for tag in tags:
        ledger.hold(tag)
    wins: list[str] = []
    lock = threading.Lock()

    def ask() -> None:
        for tag in tags:
            if ledger.give_back(tag, COPY):
                with lock:
                    wins.append(tag)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == sorted(tags)


OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["hold", "working", "idle", "settled_here", "give_back", "acknowledge", "beat", "claim_fail"]),
        st.sampled_from("abcdef"),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(OPERATIONS)
def test_every_message_is_settled_at_most_once_and_working_ones_never_go_back(operations) -> None:
    """Any sequence of what the strategy, kombu's channel and the lease thread do: a tag is
    put back or acknowledged at most once per delivery (a settled tag held again is the message
    delivered again), and never put back while a pool process works on it."""
    ledger = DeliveryLedger()
    settled: list[tuple[str, int]] = []
    delivery: dict[str, int] = dict.fromkeys("abcdef", 0)
    for operation, tag in operations:
        if operation == "hold":
            if (tag, delivery[tag]) in settled:
                delivery[tag] += 1  # put back, then delivered again
            ledger.hold(tag)
        elif operation == "working":
            ledger.working([tag])
        elif operation == "idle":
            ledger.idle([tag])
        elif operation == "settled_here":
            if tag in ledger.held():  # the worker settles on its channel only what it holds
                ledger.settled_here(tag)
                settled.append((tag, delivery[tag]))
        elif operation == "give_back":
            if ledger.is_working(tag):
                continue  # the worker gives back only what it does not run (retire, return_delivered)
            ledger.give_back(tag, COPY)
        elif operation == "acknowledge":
            ledger.acknowledge(tag)
        elif operation == "claim_fail":
            if ledger.claim(tag) is not None:
                ledger.unclaim(tag)
        else:  # a beat: sends what is due
            due = ledger.due()
            assert not (set(due.returns) & set(due.acks))
            for returned in due.returns:
                if ledger.claim(returned) is not None:
                    ledger.sent(returned=[returned])
                    settled.append((returned, delivery[returned]))
            ledger.sent(acked=due.acks)
            settled.extend((acked, delivery[acked]) for acked in due.acks)
        due = ledger.due()
        assert not (due.held & set(due.returns)) and not (due.held & due.acks)
        assert not set(ledger.not_working(due.held)) & {t for t in due.held if ledger.is_working(t)}
    assert len(settled) == len(set(settled)), settled


def test_the_lease_keeper_reports_itself_alive_until_its_thread_dies_unasked() -> None:
    """``/livez`` asks ``Leases.alive``: true before the thread starts and while it runs."""
    from worker.delivery.leases import Leases

    leases = Leases("redis://127.0.0.1:1/0", {}, queue="deepqueue", name="w", renew_s=5, expiry_s=20)
    assert leases.alive() and leases.held() == set()
