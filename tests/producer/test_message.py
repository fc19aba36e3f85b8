"""Prompt batches (``producer.message``): what a message's job argument holds, packed by the
producer and unpacked by the worker."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from producer.contract import TASK_NAME
from producer.enqueue import queue_message
from producer.entries import entries, entries_of
from producer.job import Job, JobDefaults
from producer.message import MAX_JOBS, PromptBatchError, unpack
from producer.packing import batch_task_id, pack, payload_json, prompt_batches
from tests.helpers import make_job
from tests.producer.test_producer_properties import PROPERTIES, jobs, prompts


@PROPERTIES
@given(st.lists(jobs(), min_size=1, max_size=12))
def test_any_jobs_pack_and_unpack_to_themselves(batch):
    """Whatever the jobs share or not (runs, recipes, missing fields), unpacking gives each job's
    own fields back: the worker validates the very jobs the producer sent."""
    payload = json.loads(json.dumps(pack(entries_of(batch))))  # as it travels
    entries = unpack(payload)
    fields = [payload] if entries is None else entries
    assert [Job.model_validate(entry) for entry in fields] == batch
    assert [Job.model_validate(entry).job_id for entry in fields] == [job.job_id for job in batch]
    assert (entries is None) == (len(batch) == 1)


def test_a_batch_holds_what_its_jobs_share_once():
    batch = [make_job(i, run_id="r", steps=4) for i in range(8)]
    payload = pack(entries_of(batch))
    assert set(payload) == {"run_id", "height", "width", "steps", "guidance", "format", "jobs"}
    assert payload["jobs"][3] == {"index": 3, "prompt": "a cat 3", "seed": 1003}
    negative = [make_job(0), make_job(1, negative_prompt="blurry")]
    assert pack(entries_of(negative))["jobs"] == [
        {"index": 0, "prompt": "a cat 0", "seed": 1000},
        {"index": 1, "prompt": "a cat 1", "seed": 1001, "negative_prompt": "blurry"},
    ]


def test_a_message_of_eight_jobs_costs_a_fraction_of_eight_messages():
    """The envelope and the recipe once per message: with 100-character prompts, a job costs
    well under the 300 bytes of Redis the issue allows (the bench measures Redis itself)."""
    prompt = "p" * 100
    batch = [make_job(i, run_id="a-run-name", prompt=f"{i:03d}{prompt[3:]}", steps=25) for i in range(8)]
    one = sum(len(queue_message(entries_of([job]), queue="deepqueue", enqueued_at=1.8e9).encode()) for job in batch)
    eight = len(queue_message(entries_of(batch), queue="deepqueue", enqueued_at=1.8e9).encode())
    assert eight / 8 < 200 < one / 8


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"run_id": "r", "jobs": []}, "list of 1 to 64 jobs, this one 0 jobs"),
        ({"run_id": "r", "jobs": [{}] * (MAX_JOBS + 1)}, f"this one {MAX_JOBS + 1} jobs"),
        ({"run_id": "r", "jobs": {"index": 0}}, "this one a dict"),
        ({"run_id": "r", "jobs": None}, "this one a NoneType"),
    ],
)
def test_a_batch_that_cannot_be_one_is_refused_whole(payload, message):
    with pytest.raises(PromptBatchError, match=message):
        unpack(payload)


def test_entries_are_passed_on_unchecked_for_the_worker_to_fail_alone():
    entries = unpack({"run_id": "r", "steps": 4, "jobs": [{"index": 0, "prompt": "a", "seed": 1}, "junk", 7]})
    assert entries == [{"run_id": "r", "steps": 4, "index": 0, "prompt": "a", "seed": 1}, "junk", 7]
    assert unpack({"prompt": "one job"}) is None and unpack(["not", "a", "dict"]) is None and unpack(None) is None


def test_prompt_batches_keep_order_and_cut_by_run_model_shape_and_size():
    small = [make_job(i, run_id="r") for i in range(5)]
    wide = [make_job(i, run_id="r", width=128) for i in range(5, 7)]
    sdxl = [make_job(7, run_id="r", model="sdxl")]
    other_run = [make_job(i, run_id="s") for i in range(2)]
    jobs_in = [*small, *wide, *sdxl, *other_run, make_job(9, run_id="r")]
    batches = [[entry.job() for entry in batch] for batch in prompt_batches(entries_of(jobs_in), 3)]
    assert batches == [small[:3], small[3:], wide, sdxl, other_run, [jobs_in[-1]]]
    assert [entry.job() for batch in prompt_batches(entries_of(jobs_in), 1) for entry in batch] == jobs_in


def test_a_batch_task_id_names_its_first_job_and_how_many_follow():
    batch = [make_job(i) for i in range(3)]
    assert batch_task_id(entries_of(batch[:1])) == batch[0].job_id
    assert batch_task_id(entries_of(batch)) == f"{batch[0].job_id}+2"


@PROPERTIES
@given(st.lists(jobs(), min_size=1, max_size=12))
def test_a_payload_as_text_is_the_packed_batch(batch):
    made = entries_of(batch)
    assert json.loads(payload_json(made)) == json.loads(json.dumps(pack(made)))


@PROPERTIES
@given(st.lists(prompts, min_size=1, max_size=8), st.floats(1e9, 2e9))
def test_a_prompt_batch_of_plain_rows_is_the_message_celery_would_carry(texts, enqueued_at):
    """Rows of a prompt each (one kind: the text is joined, not dumped), any Unicode, quotes
    and backslashes in them: the envelope is the JSON kombu and Celery read."""
    made = list(
        entries([(str(i), {"prompt": text}) for i, text in enumerate(texts)], run_id="r", defaults=JobDefaults())
    )
    assert json.loads(payload_json(made)) == pack(made)
    message = json.loads(queue_message(made, queue="deepqueue", enqueued_at=enqueued_at))
    assert json.loads(message["body"]) == [[pack(made)], {"enqueued_at": enqueued_at}, {}]
    assert message["headers"] == {"task": TASK_NAME, "id": batch_task_id(made)}
    assert message["properties"]["delivery_info"] == {"exchange": "", "routing_key": "deepqueue"}
    assert (message["content-type"], message["content-encoding"]) == ("application/json", "utf-8")
