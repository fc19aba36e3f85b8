"""Fair share and priorities between runs (``producer.fair``): the scripts on a real Redis."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer.fair import TOKEN, FairQueue, ShareError, checked_share, set_share, share
from producer.layout import class_key, run_list_key
from tests.helpers import lose_queue

QUEUE = "fairq"
TAKING = "taking-list"


def message(run: str, index: int, jobs: int = 8) -> str:
    """A message as the producer writes it, as far as the scripts read it: its task id's ``+n``."""
    extra = f"+{jobs - 1}" if jobs > 1 else ""
    return json.dumps({"headers": {"task": "t", "id": f"{run}-{index:06d}{extra}"}}, separators=(",", ":"))


@pytest.fixture
def broker(redis_urls) -> redis.Redis:
    client = redis.Redis.from_url(redis_urls[0])
    lose_queue(client, QUEUE)
    return client


def queue_runs(fair: FairQueue, runs: dict[str, int], messages: int = 200) -> None:
    """``messages`` messages for each run, of ``runs[run]`` jobs each."""
    for run, jobs in runs.items():
        fair.enqueue(run, [message(run, i, jobs) for i in range(messages)], jobs * messages)


def take(broker: redis.Redis, fair: FairQueue) -> tuple[str, str, int]:
    """What a worker does: move the next entry into its taking list, swap a token; (run, class, jobs)."""
    assert broker.lmove(QUEUE, TAKING, "RIGHT", "LEFT") == TOKEN
    priority, item = fair.take(TAKING)
    assert broker.lpop(TAKING) == item  # the message took the token's place
    task_id = json.loads(item)["headers"]["id"]
    return task_id.rsplit("-", 1)[0], priority, int(task_id.partition("+")[2] or 0) + 1


def test_runs_get_jobs_in_proportion_to_their_weights_at_every_point(broker):
    fair = FairQueue(broker, QUEUE)
    queue_runs(fair, {"a": 8, "b": 8, "c": 8})
    set_share(broker, "c", weight=2)
    served = Counter()
    for _ in range(200):
        run, priority, jobs = take(broker, fair)
        served[run] += jobs
        assert priority == "normal"
        ideal = sum(served.values()) / 4
        assert all(abs(served[r] / w - ideal) <= 8 for r, w in {"a": 1, "b": 1, "c": 2}.items()), served
    assert served == {"a": 400, "b": 400, "c": 800}


def test_a_run_is_charged_its_jobs_not_its_messages(broker):
    fair = FairQueue(broker, QUEUE)
    queue_runs(fair, {"big": 8, "single": 1})
    served = Counter()
    for _ in range(90):
        run, _, jobs = take(broker, fair)
        served[run] += jobs
    assert abs(served["big"] - served["single"]) <= 8


def test_priority_classes_go_strictly_first_and_can_change_while_live(broker):
    fair = FairQueue(broker, QUEUE)
    set_share(broker, "urgent", priority="high")
    set_share(broker, "later", priority="low")
    queue_runs(fair, {"bulk": 8, "later": 8}, messages=3)
    queue_runs(fair, {"urgent": 8}, messages=2)  # sent last, served first
    order = [take(broker, fair)[:2] for _ in range(4)]
    assert order == [("urgent", "high"), ("urgent", "high"), ("bulk", "normal"), ("bulk", "normal")]
    assert set_share(broker, "later", priority="high").priority == "high"  # moved, with its messages
    assert [take(broker, fair)[:2] for _ in range(4)] == [("later", "high")] * 3 + [("bulk", "normal")]
    assert broker.llen(QUEUE) == 0 and fair.waiting() == (0, 0)


def test_a_run_that_had_no_work_gains_no_credit_for_it(broker):
    """A run joining (or coming back) starts at the class's virtual time: served next, then in turn."""
    fair = FairQueue(broker, QUEUE)
    queue_runs(fair, {"early": 8})
    assert {take(broker, fair)[0] for _ in range(100)} == {"early"}
    queue_runs(fair, {"late": 8})
    assert [take(broker, fair)[0] for _ in range(20)] == ["late", "early"] * 10


def test_the_queue_list_counts_the_messages_and_the_counters_the_jobs(broker):
    fair = FairQueue(broker, QUEUE)
    queue_runs(fair, {"a": 8, "b": 3}, messages=5)
    assert broker.llen(QUEUE) == 10 and fair.waiting() == (10, 55)
    take(broker, fair)
    assert broker.llen(QUEUE) == 9 and sum(fair.waiting()) in (9 + 47, 9 + 52)
    assert len(fair.messages("a")) + len(fair.messages("b")) == 9


def test_a_token_whose_run_is_gone_swaps_for_nothing(broker):
    fair = FairQueue(broker, QUEUE)
    queue_runs(fair, {"deleted": 8}, messages=1)
    broker.delete(run_list_key(QUEUE, "deleted"))
    broker.lmove(QUEUE, TAKING, "RIGHT", "LEFT")
    assert fair.take(TAKING) is None and broker.llen(TAKING) == 0
    assert fair.take(TAKING) is None  # no token in the taking list: nothing is taken


def test_a_popped_token_pops_its_message(broker):
    """kombu's BRPOP (a channel reading several queues) pops the token: the message is popped too."""
    fair = FairQueue(broker, QUEUE)
    queue_runs(fair, {"a": 8}, messages=1)
    assert broker.rpop(QUEUE) == TOKEN
    priority, item = fair.take(None)
    assert priority == "normal" and json.loads(item)["headers"]["id"] == "a-000000+7"
    assert not broker.exists(run_list_key(QUEUE, "a")) and fair.waiting() == (0, 0)


def test_shares_are_checked_and_kept_per_run(broker):
    with pytest.raises(ShareError, match="priority must be one of high, normal, low"):
        checked_share("urgent", None)
    with pytest.raises(ShareError, match="weight must be between"):
        checked_share(None, 0)
    assert share(broker, "never-set") == share(broker, "never-set-either")
    assert set_share(broker, "r", weight=3).weight == 3.0
    assert set_share(broker, "r", priority="low") == share(broker, "r")
    assert (share(broker, "r").priority, share(broker, "r").weight) == ("low", 3.0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    runs=st.dictionaries(
        st.sampled_from("abcdef"),
        st.tuples(st.integers(1, 8), st.sampled_from([0.5, 1, 2, 3])),
        min_size=1,
        max_size=5,
    ),
    takes=st.integers(1, 60),
)
def test_backlogged_runs_stay_within_one_message_of_their_share(broker, runs, takes):
    """Stride scheduling's bound: any two runs that kept work have had jobs per unit of weight
    within one message's jobs over the smaller weight of each other."""
    lose_queue(broker, QUEUE)
    broker.delete("deepqueue:shares")
    fair = FairQueue(broker, QUEUE)
    for run, (_, weight) in runs.items():
        set_share(broker, run, weight=weight)
    queue_runs(fair, {run: jobs for run, (jobs, _) in runs.items()}, messages=100)
    served = Counter({run: 0 for run in runs})
    for _ in range(takes):
        run, _, jobs = take(broker, fair)
        served[run] += jobs
    for a, (jobs_a, weight_a) in runs.items():
        for b, (jobs_b, weight_b) in runs.items():
            bound = max(jobs_a, jobs_b) / min(weight_a, weight_b)
            assert abs(served[a] / weight_a - served[b] / weight_b) <= bound + 1e-9, (served, runs)


def test_a_dropped_run_takes_its_messages_and_as_many_tokens(broker):
    fair = FairQueue(broker, QUEUE)
    queue_runs(fair, {"gone": 8, "kept": 8}, messages=5)
    assert fair.waiting_of("gone") == 40 and fair.drop("gone") == 5
    assert broker.llen(QUEUE) == 5 and fair.waiting() == (5, 40) and fair.waiting_of("gone") == 0
    assert {take(broker, fair)[0] for _ in range(5)} == {"kept"} and fair.waiting() == (0, 0)
    assert fair.drop("gone") == 0 and broker.llen(QUEUE) == 0


@pytest.mark.parametrize("weights", [(1, 1), (3, 1)])
def test_a_run_whose_list_keeps_emptying_gets_its_share_not_more(broker, weights):
    """Run "a" queues a message whenever its list ran empty (a submit with ``max_queued``, slow
    workers); it comes back at the pass it had reached, not at the head of the line."""
    fair = FairQueue(broker, QUEUE)
    set_share(broker, "a", weight=weights[0])
    set_share(broker, "b", weight=weights[1])
    queue_runs(fair, {"b": 8}, messages=400)
    served, sent = Counter(), 0
    for _ in range(200):
        if not fair.waiting_of("a"):
            fair.enqueue("a", [message("a", sent)], 8)
            sent += 1
        served[take(broker, fair)[0]] += 1
    share_a = weights[0] / sum(weights)
    assert abs(served["a"] - 200 * share_a) <= 2, served


def test_a_class_change_reaches_a_queue_the_run_has_just_started_using(broker):
    """The queues are read inside the script: a run queued in a second queue moves there too."""
    fair, other = FairQueue(broker, QUEUE), FairQueue(broker, "fairq.sdxl")
    lose_queue(broker, "fairq.sdxl")
    queue_runs(fair, {"bulk": 8, "r": 8}, messages=2)
    queue_runs(other, {"bulk": 8, "r": 8}, messages=2)
    set_share(broker, "r", priority="high")
    for queue in (fair, other):
        assert broker.zrange(class_key(queue.queue, "high"), 0, -1) == [b"r"]
        assert broker.zrange(class_key(queue.queue, "normal"), 0, -1) == [b"bulk"]
