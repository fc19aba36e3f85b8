"""The jobs as sent, kept in the run's storage (``producer.sent``): written per chunk, found by id
across chunks that overlap (a resubmit, racing producers), read once each in index order."""

from __future__ import annotations

import gzip
import json

import pytest

from producer import Client
from producer.enqueue import messages
from producer.entries import entries_of
from producer.job import Job
from producer.layout import sent_key, sent_prefix
from producer.message import unpack
from producer.sent import SentJobs, prompts, write_sent
from producer.state import JobState
from producer.storage import LocalStorage
from tests.helpers import lose_queue, queued_jobs

RUN = "kept"


def jobs(indexes, steps: int = 20) -> list[Job]:
    return [Job(run_id=RUN, index=index, prompt=f"prompt {index}", seed=index, steps=steps) for index in indexes]


def keep(storage, prefix: str, kept: list[Job]) -> None:
    """Write ``kept`` as a submit does: the payloads of its messages of up to 8 jobs."""
    payloads = [message.payload for message in messages(entries_of(kept), "q", per_message=8)]
    indexes = [job.index for job in kept] or [0]
    write_sent(storage, prefix, RUN, payloads, min(indexes), max(indexes))


@pytest.fixture
def storage(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path)


def test_a_chunk_is_one_gzipped_object_named_by_its_first_and_last_index(storage):
    keep(storage, "pre", jobs([7, 3, 12]))
    keep(storage, "pre", [])  # nothing claimed: nothing written
    [(key, _)] = list(storage.list(sent_prefix("pre", RUN)))
    assert key.startswith("pre/kept/jobs/000000003-000000012-") and key.endswith(".jsonl.gz")
    [line] = gzip.decompress(storage.get(key)).decode().splitlines()  # one prompt batch
    assert [Job.model_validate(fields) for fields in unpack(json.loads(line))] == jobs([7, 3, 12])


def test_objects_of_a_job_per_line_are_read_too(storage):
    """As submits wrote them before the jobs were kept in prompt batches."""
    lines = "".join(job.model_dump_json(exclude_none=True) + "\n" for job in jobs([0, 1]))
    storage.put(sent_key("", RUN, 0, 1, "old"), gzip.compress(lines.encode()), content_type="", metadata={})
    assert SentJobs(storage, "", RUN).find([job.job_id for job in jobs([1])]) == {jobs([1])[0].job_id: jobs([1])[0]}


def test_jobs_are_found_by_id_in_overlapping_chunks_and_others_are_not(storage, monkeypatch):
    first, second = jobs(range(0, 10)), jobs(range(5, 15), steps=30)  # a second recipe over 5..14
    keep(storage, "", first)
    keep(storage, "", second)
    keep(storage, "", jobs([400]))
    kept = SentJobs(storage, "", RUN)
    reads: list[str] = []
    get = storage.get
    monkeypatch.setattr(storage, "get", lambda key: reads.append(key) or get(key))
    wanted = [first[0].job_id, first[7].job_id, second[0].job_id, second[9].job_id, jobs([400])[0].job_id]
    found = kept.find([*wanted, jobs([401])[0].job_id, jobs([3], steps=99)[0].job_id])
    assert set(found) == set(wanted)
    assert found[second[0].job_id] == second[0]
    assert len(reads) == len(set(reads)) == 3  # each object read once
    assert prompts(found, [first[7].job_id, "00000401-000000000000"]) == ["prompt 7", None]


def test_a_run_with_nothing_kept_finds_nothing(storage):
    assert SentJobs(storage, "", "never-sent").find(jobs([0])[0].job_id for _ in range(2)) == {}


def test_retry_sends_again_what_the_submit_kept_once_the_queue_is_gone(redis_urls, tmp_path):
    """The queue lost (a purged list, a Redis restarted without its data): retry rebuilds every
    unfinished job's message from the run's storage; Redis never held the jobs themselves."""
    import redis

    with Client(*redis_urls) as client:
        run = client.submit(["a fox", "a heron", "an owl"], run=RUN, steps=4)
        broker = redis.Redis.from_url(redis_urls[0])
        queued = queued_jobs(broker)
        lose_queue(broker)
        [done] = [result.job_id for result in run.results()][:1]
        client._store.mark(RUN, done, JobState.RUNNING)
        client._store.mark(RUN, done, JobState.DONE)
        again = client.retry(RUN)
        assert (again.submitted, again.skipped) == (2, 0)
        assert len(queued_jobs(broker)) == 2 and len(queued) == 3
        assert client.prompts(RUN, [result.job_id for result in run.results()]) == ["a fox", "a heron", "an owl"]
        assert not any(key.endswith(b":pending") for key in redis.Redis.from_url(redis_urls[1]).keys())
