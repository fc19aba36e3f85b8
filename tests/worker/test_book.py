"""The strategy's book (``worker.delivery.book``): where each request is and which go where next.
No Redis, kombu or Celery: milliseconds. The property test runs the same examples every run
(``derandomize``); ``DEEPQUEUE_PROPERTY_EXAMPLES`` searches further."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from producer.job import Job
from worker.delivery.batching import BatchBuffer
from worker.delivery.book import MAX_LOSSES, Book, Held, PoolCall, loss_failure


@dataclass(eq=False)
class Req:
    id: str


def book(held: Held[Req] | None = None, *, max_batch: int = 2, slots: int = 1, drop_chunk: int = 3) -> Book[Req]:
    return Book(held if held is not None else Held(), BatchBuffer(max_batch, 1.0), slots=slots, drop_chunk=drop_chunk)


def job(run_id: str, index: int) -> Job:
    return Job(run_id=run_id, index=index, prompt="a cat", seed=1)


def test_partial_batches_wait_for_an_idle_slot_and_full_ones_go_one_ahead() -> None:
    b = book(max_batch=2, slots=1)
    a, c, d, e = Req("a"), Req("c"), Req("d"), Req("e")
    assert b.buffered("k", a, 0.0)  # opened a batch: the strategy pumps again when it is due
    assert b.next_batch(0.5) is None  # partial, not due
    first = b.next_batch(1.0)
    assert first is not None and first.requests == [a]
    b.buffered("k", c, 1.0)
    assert b.next_batch(2.0) is None  # due, but partial while the only slot is busy
    b.buffered("k", d, 1.0)
    second = b.next_batch(2.0)  # full: sent one ahead
    assert second is not None and second.requests == [c, d]
    b.buffered("k", e, 1.0)
    b.buffered("k", Req("f"), 1.0)
    assert b.next_batch(2.0) is None  # two calls out already on one slot
    assert b.calls == [first, second] and len(b.held) == 3


def test_a_collect_call_only_when_nothing_is_in_flight_and_something_is_held() -> None:
    b = book()
    assert b.collect() is None
    call = b.hand_over([Req("a")])
    assert b.collect() is None  # the batch's own call brings its outcomes
    b.taken(call, pid=7)
    b.returned(call)  # came back; "a" is still being stored
    collect = b.collect()
    assert collect is not None and collect.requests == [] and b.calls == [collect]
    assert b.collect() is None  # one at a time


def test_final_hands_back_the_oldest_request_of_a_task_id_once() -> None:
    held: Held[Req] = Held()
    first, again = Req("a"), Req("a")  # redelivered meanwhile: same task id, another request
    held.add(first)
    held.add(again)
    assert held.final("a") is first and held.final("a") is again
    assert held.final("a") is None and not held and len(held) == 0


def test_a_failed_call_releases_its_requests() -> None:
    b = book()
    a, c = Req("a"), Req("c")
    call = b.hand_over([a, c])
    assert b.failed(call) == [a, c]
    assert not b.held and b.calls == []


def test_lost_stores_are_the_held_requests_of_dead_processes_outside_calls() -> None:
    b = book()
    stored, running, untaken, elsewhere = Req("stored"), Req("running"), Req("untaken"), Req("elsewhere")
    done = b.hand_over([stored])
    b.taken(done, pid=1)
    b.returned(done)  # pid 1 is storing "stored"
    again = b.hand_over([running])
    b.taken(again, pid=1)  # pid 1's next call: its own error reports it
    b.hand_over([untaken])  # no process took it yet
    other = b.hand_over([elsewhere])
    b.taken(other, pid=2)
    b.returned(other)
    assert b.lost_stores(lambda pid: pid != 1) == [stored]
    assert b.held.final("stored") is None and len(b.held) == 3
    assert b.lost_stores(lambda pid: pid != 1) == []


def test_retire_returns_what_no_process_took_and_keeps_running_batches() -> None:
    held: Held[Req] = Held()
    old = book(held, max_batch=4)
    running, untaken, buffered, stopped = Req("running"), Req("untaken"), Req("buffered"), Req("stopped")
    taken = old.hand_over([running])
    old.taken(taken, pid=1)
    old.hand_over([untaken])
    old.buffered("k", buffered, 0.0)
    old.defer(stopped, job("r1", 0))
    assert set(old.retire()) == {untaken, buffered, stopped}
    assert old.calls == [taken] and len(old.buffer) == 0 and not old.dropping
    assert len(held) == 1  # the running batch still reports to the shared Held
    # retired: it hands out nothing, and leaves lost stores to its successor
    assert old.next_batch(10.0) is None and old.collect() is None
    assert not old.again("k", Req("x"), 0.0) and old.lost_stores(lambda pid: False) == []
    new = book(held)
    # Its process dies mid-call: the old call's error runs it again, the successor keeps off it.
    assert new.lost_stores(lambda pid: pid != 1) == [] and len(held) == 1
    old.returned(taken)
    collect = new.collect()  # the successor fetches what the old one's batch is storing
    assert collect is not None and new.held.final("running") is running


def test_messages_of_stopped_runs_are_settled_in_chunks_by_run() -> None:
    b = book(drop_chunk=3)
    jobs = [job(run, n) for n, run in enumerate(["r1", "r2", "r1"])]
    requests = [Req(f"t{n}") for n in range(3)]
    assert not b.defer(requests[0], jobs[0]) and not b.defer(requests[1], jobs[1])
    assert b.defer(requests[2], jobs[2])  # a full chunk: settle now
    deferred = b.deferred()
    assert [req for req, _ in deferred["r1"]] == [requests[0], requests[2]]
    assert [req for req, _ in deferred["r2"]] == [requests[1]]
    assert b.deferred() == {} and not b.dropping


def test_a_job_fails_on_its_max_lossth_lost_batch_naming_why() -> None:
    assert loss_failure(MAX_LOSSES - 1, died=True) is None
    assert (
        loss_failure(MAX_LOSSES, died=True)
        == f"generation failed: its pool process died {MAX_LOSSES} times while running this job"
    )
    assert (
        loss_failure(MAX_LOSSES + 1, died=False)
        == f"generation failed: it timed out {MAX_LOSSES} times while running this job"
    )


EXAMPLES = max(300, int(os.environ.get("DEEPQUEUE_PROPERTY_EXAMPLES", "300")))
OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["accept", "pump", "take", "return", "error", "die", "retire"]),
        st.integers(0, 7),
        st.booleans(),
    ),
    max_size=80,
)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
@given(OPERATIONS)
def test_every_request_handed_to_the_pool_leaves_the_book_exactly_once(operations) -> None:
    """Any sequence of messages, pool calls taken and returned, failed calls, dying processes and
    lost connections (a new book on the same ``Held``): a request leaves the book (final, failed
    with its call, lost with its process, or given back) once per time it entered, and once every
    process has finished, every request has left."""
    held: Held[Req] = Held()
    books = [book(held, max_batch=3, slots=2)]
    inside: set[int] = set()  # ids of requests in the book (buffered or held)
    taken_by: dict[int, int] = {}  # id of a call -> the pid that took it
    storing: dict[int, list[Req]] = {}  # pid -> requests whose image it stores
    dead: set[int] = set()
    pids = itertools.count(1)
    live = [next(pids), next(pids)]
    names = itertools.count()
    now = 0.0

    def leave(requests: list[Req]) -> None:
        for req in requests:
            assert id(req) in inside, f"{req.id} left twice"
            inside.discard(id(req))

    def enter_again(b: Book[Req], requests: list[Req]) -> None:
        for req in requests:
            if b.again(("alone", req.id), req, now):  # else retired: given back, gone
                inside.add(id(req))

    def calls() -> list[tuple[Book[Req], PoolCall[Req]]]:
        return [(b, call) for b in books for call in b.calls]

    def take(b: Book[Req], call: PoolCall[Req], pid: int) -> None:
        b.taken(call, pid)
        taken_by[id(call)] = pid

    def report(b: Book[Req], call: PoolCall[Req], count: int | None) -> None:
        """The pool process returns ``call``: ``count`` of what it stores are final (None: all)."""
        b.returned(call)
        pid = taken_by[id(call)]
        storing.setdefault(pid, []).extend(call.requests)
        finals = storing[pid][: len(storing[pid]) if count is None else count]
        storing[pid] = storing[pid][len(finals) :]
        for req in finals:
            assert held.final(req.id) is req
            leave([req])

    for operation, pick, flag in operations:
        now += 0.4
        current = books[-1]
        if operation == "accept":
            req = Req(f"t{next(names)}")
            inside.add(id(req))
            current.buffered(pick % 3, req, now)
        elif operation == "pump":
            while current.next_batch(now) is not None:
                pass
            current.collect()
        elif operation in ("take", "return", "error") and calls():
            b, call = calls()[pick % len(calls())]
            if operation == "take" and not call.accepted:
                take(b, call, live[pick % len(live)])
            elif operation == "return" and call.accepted:
                report(b, call, pick % 3)
            elif operation == "error":  # not run (sent back), or lost (flag: each runs again alone)
                failed = b.failed(call)
                leave(failed)
                enter_again(b, failed if flag else [])
        elif operation == "die":
            pid = live.pop(pick % len(live))
            dead.add(pid)
            live.append(next(pids))
            for b, call in calls():  # its calls in flight fail (WorkerLostError), their jobs run alone
                if call.accepted and taken_by[id(call)] == pid:
                    failed = b.failed(call)
                    leave(failed)
                    enter_again(b, failed)
            lost = current.lost_stores(lambda p: p not in dead)
            assert {id(req) for req in lost} == {id(req) for req in storing.pop(pid, [])}
            leave(lost)
            enter_again(current, lost)
        elif operation == "retire":
            leave(current.retire())
            books.append(book(held, max_batch=3, slots=2))
        assert sum(len(b.buffer) for b in books) + len(held) == len(inside)

    # Every process finishes: the last book runs what it has, and every call reports everything.
    for turn in range(200):
        now += 2.0
        books[-1].next_batch(now) or books[-1].collect()
        for b, call in calls():
            if not call.accepted:
                take(b, call, live[turn % len(live)])
            report(b, call, None)
        if not inside:
            break
    assert not inside and not held and all(not b.calls for b in books)
