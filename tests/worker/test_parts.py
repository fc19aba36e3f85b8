"""A message's parts (``worker.delivery.parts``): its jobs run apart, the message settles once."""

from __future__ import annotations

import pytest

from producer.entries import entries_of
from producer.message import PromptBatchError
from producer.packing import pack
from tests.helpers import make_job
from worker.delivery.parts import Settle, settled_together, split


def parts_of(payload, task_id="task-1"):
    return split(object(), task_id, payload, tag="tag-1", enqueued_at=1.0, now=2.0)


def test_a_one_job_message_is_one_part_named_by_its_task_id():
    job = make_job(3)
    [part] = parts_of(job.model_dump(mode="json"), task_id="sent-by-send-task")
    assert (part.id, part.job, part.enqueued_at, part.received_at) == ("sent-by-send-task", job, 1.0, 2.0)
    assert part.message.open == 1 and part.message.tag == "tag-1"


def test_a_prompt_batch_is_a_part_per_job_named_by_the_jobs_ids():
    batch = [make_job(i) for i in range(3)]
    parts = parts_of(pack(entries_of(batch)))
    assert [part.id for part in parts] == [job.job_id for job in batch]
    assert [part.job for part in parts] == batch
    assert {id(part.message) for part in parts} == {id(parts[0].message)} and parts[0].message.open == 3


def test_an_entry_that_is_no_job_is_a_part_of_its_own_without_one():
    payload = pack(entries_of([make_job(0), make_job(1)]))
    payload["jobs"][1] = {"index": 1, "prompt": "", "seed": 1}
    payload["jobs"].append("junk")
    parts = parts_of(payload)
    assert [part.job is None for part in parts] == [False, True, True]
    assert [part.id for part in parts[1:]] == ["task-1#1", "task-1#2"]
    assert parts[2].payload == "junk"


def test_a_batch_that_cannot_be_one_raises_for_the_dead_letters():
    with pytest.raises(PromptBatchError):
        parts_of({"run_id": "r", "jobs": []})


def test_the_message_settles_with_its_last_part_acknowledged_when_all_are_final():
    first, second, third = parts_of(pack(entries_of([make_job(i) for i in range(3)])))
    assert first.end() is None and second.end(failure="bad seed") is None
    assert second.end() is None  # a part ends once
    assert third.end() is Settle.ACK
    assert first.message.failures == ["bad seed"]


def test_one_part_sent_back_sends_the_message_back_once_the_others_end():
    first, second = parts_of(pack(entries_of([make_job(0), make_job(1)])))
    assert first.end(back=True) is None
    assert second.end() is Settle.BACK


def test_the_lease_works_while_any_part_is_in_a_pool_process():
    first, second, third = parts_of(pack(entries_of([make_job(i) for i in range(3)])))
    assert first.take() is True  # the message turns working
    assert second.take() is False and second.take() is False  # already working; taken once
    assert first.release() is False  # the second part still runs
    assert second.release() is True  # none runs now: the lease turns idle
    assert third.release() is False  # never taken
    assert third.take() is True and third.end() is None and third.message.working == 0
    assert third.take() is False  # an ended part is not taken again


def test_parts_ended_together_report_each_message_that_settles():
    one = parts_of(pack(entries_of([make_job(0), make_job(1)])), task_id="one")
    two = parts_of(make_job(2).model_dump(mode="json"), task_id="two")
    settled = settled_together([one[0], *two], back=True)
    assert [(message.request, how) for message, how in settled] == [(two[0].message.request, Settle.BACK)]
    assert settled_together([one[1]]) == [(one[1].message, Settle.BACK)]


def test_a_job_twice_in_one_message_gets_a_second_id_so_each_outcome_ends_its_own_part():
    job = make_job(0)
    first, second = parts_of(pack(entries_of([job, job])))
    assert (first.id, second.id) == (job.job_id, "task-1#1") and first.job == second.job == job
