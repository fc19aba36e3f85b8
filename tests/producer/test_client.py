"""The Python client against a real Redis: what lands on the queue, resubmission, runs, waiting."""

from __future__ import annotations

import io
import json
import re
import threading
import time

import pytest
import redis
from kombu import Connection

from producer import (
    Client,
    ClientSettings,
    DeepQueueError,
    InvalidJobError,
    Job,
    JobState,
    PromptFileError,
    RecipeMismatchError,
    Run,
    RunNotFoundError,
    WaitTimeoutError,
)
from producer.client import SUBMIT_CHUNK
from producer.contract import TASK_NAME
from producer.errors import ShareError
from producer.fair import FairQueue
from producer.job import derive_seed
from producer.message import unpack
from producer.state import RunStore
from tests.helpers import lose_queue, queued_entries, queued_jobs

QUEUED, RUNNING, DONE, FAILED, CANCELLED = tuple(JobState)


@pytest.fixture
def client(redis_urls):
    with Client(*redis_urls) as client:
        yield client


@pytest.fixture
def store(redis_urls) -> RunStore:
    return RunStore.from_url(redis_urls[1])


def messages(broker_url: str, queue: str = "deepqueue") -> list[dict]:
    """The Celery messages waiting in ``queue``, oldest first, as kombu's Redis transport reads
    them (a real channel's Message, left in the queue), with the body decoded."""
    decoded = []
    with Connection(broker_url) as connection:
        channel = connection.default_channel
        for item in queued_entries(broker_url, queue):
            message = channel.Message(json.loads(item), channel=channel)
            args, kwargs, _embed = message.decode()
            decoded.append({"headers": message.headers, "args": args, "kwargs": kwargs, "raw": item})
    return decoded


def queued(broker_url: str, queue: str = "deepqueue") -> list[Job]:
    """The jobs waiting in ``queue``, oldest first, unpacked as a worker does."""
    return [Job.model_validate(fields) for fields in queued_jobs(broker_url, queue)]


def ids_of(run: Run, store: RunStore) -> list[str]:
    return sorted(result.job_id for result in store.results(run.run_id))


def redis_is_empty(url: str) -> bool:
    return redis.Redis.from_url(url).dbsize() == 0


# -- what goes on the queue -------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_batch", [1, 2, 8])
def test_submit_puts_every_job_on_the_queue_in_prompt_batches(redis_urls, prompt_batch, monkeypatch):
    """Jobs of one shape go in messages of ``DEEPQUEUE_PROMPT_BATCH`` (1: a Celery message per
    job, as ``send_task`` sends), in order; each message's task id names its first job."""
    monkeypatch.setenv("DEEPQUEUE_PROMPT_BATCH", str(prompt_batch))
    prompts = ["a red fox", "a blue heron", "a green frog"]
    with Client(*redis_urls) as client:
        expected = client.prepare(prompts, run="fauna", height=64, width=128, steps=4)
        run = client.submit(prompts, run="fauna", height=64, width=128, steps=4)
    assert (run.run_id, run.submitted, run.skipped) == ("fauna", 3, 0)

    sent = messages(redis_urls[0])
    assert len(sent) == -(-3 // prompt_batch)
    firsts = expected[::prompt_batch]
    for message, first in zip(sent, firsts, strict=True):
        assert message["headers"]["task"] == TASK_NAME == "deepqueue.generate"
        assert message["headers"]["id"].partition("+")[0] == first.job_id
        assert len(message["args"]) == 1
        assert set(message["kwargs"]) == {"enqueued_at"}
        assert isinstance(message["kwargs"]["enqueued_at"], float)
    jobs = queued(redis_urls[0])  # FIFO: workers get them in submission order
    assert jobs == expected and [job.job_id for job in jobs] == [job.job_id for job in expected]
    assert {(job.run_id, job.height, job.width, job.steps) for job in jobs} == {("fauna", 64, 128, 4)}


def test_jobs_naming_a_model_go_to_its_queue_and_the_others_to_the_plain_one(client, redis_urls):
    rows = [{"prompt": "a fox"}, {"prompt": "an owl", "model": "sdxl"}, {"prompt": "a koi", "model": "sd"}]
    client.submit(rows, run="zoo", steps=4)
    for queue, prompts in {"deepqueue": ["a fox"], "deepqueue.sdxl": ["an owl"], "deepqueue.sd": ["a koi"]}.items():
        sent = messages(redis_urls[0], queue)
        assert [job.prompt for job in queued(redis_urls[0], queue)] == prompts
        assert {json.loads(m["raw"])["properties"]["delivery_info"]["routing_key"] for m in sent} == {queue}
    assert client.model_queue("sdxl") == "deepqueue.sdxl" and client.model_queue(None) == "deepqueue"


def test_workers_by_the_queue_they_serve(client, redis_urls):
    from producer.layout import WORKER_QUEUES_KEY, WORKERS_KEY

    broker = redis.Redis.from_url(redis_urls[0])
    now = time.time()
    broker.hset(WORKERS_KEY, mapping={"a": now, "b": now, "gone": now - 3600})
    broker.hset(WORKER_QUEUES_KEY, mapping={"a": "deepqueue.sdxl", "b": "deepqueue", "gone": "deepqueue.sdxl"})
    assert client.workers() == {"a", "b"}
    assert client.workers(queue="deepqueue.sdxl") == {"a"}
    assert client.workers(queue=client.model_queue(None)) == {"b"}


def test_messages_are_lean_and_read_by_celery_as_its_own(client, redis_urls):
    """The hand-built message: the job once, as JSON text (no base64), no prompt outside the
    body, and Celery's own request machinery reads task, id and arguments from it."""
    from celery import Celery
    from celery.worker.request import Request

    prompt = "a photograph of a red fox in fresh snow at dawn, soft light"
    client.submit([prompt], run="lean", height=64, width=64, steps=4)
    [message] = messages(redis_urls[0])
    raw = message["raw"].decode()
    assert raw.count(prompt) == 1 and "base64" not in raw and "argsrepr" not in raw
    assert len(raw) < 450 + len(prompt)
    with Connection(redis_urls[0]) as connection:
        channel = connection.default_channel
        kombu_message = channel.Message(json.loads(raw), channel=channel)
    assert kombu_message.delivery_info == {"exchange": "", "routing_key": "deepqueue"}
    assert kombu_message.delivery_tag and kombu_message.content_type == "application/json"
    app = Celery(set_as_current=False)

    @app.task(name=TASK_NAME, shared=False)
    def task(job, enqueued_at=None):
        return None

    request = Request(kombu_message, app=app, task=task)
    assert (request.id, request.name) == (message["headers"]["id"], TASK_NAME)
    assert request.args[0]["prompt"] == prompt and set(request.kwargs) == {"enqueued_at"}


def test_submit_marks_every_job_queued(client, store):
    run = client.submit(["a", "b"], run="marked")
    assert run.status().counts == {QUEUED: 2, RUNNING: 0, DONE: 0, FAILED: 0, CANCELLED: 0}
    assert ids_of(run, store) == [job.job_id for job in client.prepare(["a", "b"], run="marked")]


def test_submit_from_a_file(client, redis_urls, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# fauna\na fox\n\na heron\n", encoding="utf-8")
    run = client.submit(path, run="from-file")
    assert run.submitted == 2
    assert [job.prompt for job in queued(redis_urls[0])] == ["a fox", "a heron"]


def test_queue_name_from_argument(redis_urls):
    with Client(*redis_urls, queue="gpu-a100") as client:
        client.submit(["a"], run="q")
    assert len(queued(redis_urls[0], "gpu-a100")) == 1
    assert messages(redis_urls[0]) == []


def test_settings_from_environment_when_called(redis_urls, monkeypatch):
    monkeypatch.setenv("DEEPQUEUE_BROKER_URL", redis_urls[0])
    monkeypatch.setenv("DEEPQUEUE_RESULT_BACKEND", redis_urls[1])
    monkeypatch.setenv("DEEPQUEUE_QUEUE", "from-env")
    with Client() as client:
        assert client.settings == ClientSettings()
        run = client.submit(["a"], run="env")
    assert len(queued(redis_urls[0], "from-env")) == 1
    assert RunStore.from_url(redis_urls[1]).exists(run.run_id)


def test_explicit_arguments_override_settings(redis_urls):
    settings = ClientSettings(broker_url="redis://127.0.0.1:1/0", result_backend="redis://127.0.0.1:1/1", queue="x")
    with Client(*redis_urls, settings=settings) as client:
        assert (client.settings.broker_url, client.settings.result_backend) == redis_urls
        assert client.settings.queue == "x"


def test_generated_run_name(client, store):
    run = client.submit(["a"])
    assert re.fullmatch(r"run-\d{8}-\d{6}-[0-9a-f]{4}", run.run_id)
    assert store.exists(run.run_id) and client.runs() == [run.run_id]


def test_run_seed_gives_job_seeds_and_changes_ids(client, redis_urls):
    run = client.submit(["a", "b"], run="seeded", seed=7)
    seeds = [job.seed for job in queued(redis_urls[0])]
    assert seeds == [derive_seed(7, 0), derive_seed(7, 1)]
    assert run.submitted == 2
    other = client.submit(["a", "b"], run="seeded", seed=8, allow_recipe_change=True)
    assert other.submitted == 2  # new seeds, new recipes: new jobs in the same run
    assert other.status().total == 4


def test_prepare_sends_and_writes_nothing(client, redis_urls):
    jobs = client.prepare(["a", {"prompt": "b", "steps": 3}], run="dry", height=64, width=64)
    assert [(job.index, job.steps, job.height) for job in jobs] == [(0, 25, 64), (1, 3, 64)]
    assert redis_is_empty(redis_urls[0]) and redis_is_empty(redis_urls[1])


def test_submit_empty_source_is_refused_and_sends_nothing(client, redis_urls):
    with pytest.raises(InvalidJobError, match="no prompts found"):
        client.submit([], run="empty")
    assert messages(redis_urls[0]) == []
    assert not client._store.exists("empty")


# -- resubmission -----------------------------------------------------------------------------------


def test_resubmit_sends_nothing_once_every_job_is_running_or_done(client, redis_urls, store):
    prompts = ["a", "b", "c"]
    first = client.submit(prompts, run="again", steps=4)
    job_ids = ids_of(first, store)
    store.mark(first.run_id, job_ids[0], RUNNING)
    store.mark(first.run_id, job_ids[1], DONE, key="k1")
    store.mark(first.run_id, job_ids[2], DONE, key="k2")

    second = client.submit(prompts, run="again", steps=4)
    assert (second.submitted, second.skipped) == (0, 3)
    assert len(queued(redis_urls[0])) == 3  # only the first submission's
    assert second.status().counts == {QUEUED: 0, RUNNING: 1, DONE: 2, FAILED: 0, CANCELLED: 0}


def test_resubmit_sends_failed_jobs_and_only_with_resend_queued_the_queued_ones(client, redis_urls, store):
    """Queued jobs already have a message: sending them again would run them twice. Only a
    user who lost the queue itself (a Redis without persistence restarted) asks for them."""
    prompts = ["queued", "running", "done", "failed"]
    first = client.submit(prompts, run="partial")
    by_prompt = {job.prompt: job.job_id for job in queued(redis_urls[0])}
    store.mark("partial", by_prompt["running"], RUNNING)
    store.mark("partial", by_prompt["done"], DONE, key="k")
    store.mark("partial", by_prompt["failed"], FAILED, reason="cuda oom")

    second = client.submit(prompts, run="partial")
    assert (second.submitted, second.skipped) == (1, 3)
    resent = queued(redis_urls[0])[len(prompts) :]
    assert [job.job_id for job in resent] == [by_prompt["failed"]]
    assert second.status().counts == {QUEUED: 2, RUNNING: 1, DONE: 1, FAILED: 0, CANCELLED: 0}
    assert first.run_id == second.run_id

    third = client.submit(prompts, run="partial", resend_queued=True)
    assert (third.submitted, third.skipped) == (2, 2)
    resent = queued(redis_urls[0])[len(prompts) + 1 :]
    assert [job.job_id for job in resent] == [by_prompt["queued"], by_prompt["failed"]]


def test_retry_resends_queued_failed_and_gone_workers_jobs_from_what_was_kept(client, redis_urls, store):
    """``retry`` needs no prompt file: the jobs as sent are kept until done. A job running on a
    worker that renewed its leases lately is left to it; one whose worker is gone is resent."""
    from producer.layout import WORKERS_KEY

    prompts = ["queued", "failed", "on a live worker", "on a gone worker", "done"]
    client.submit(prompts, run="lost", steps=7, width=64, height=64)
    sent = {job.prompt: job for job in queued(redis_urls[0])}
    ids = {prompt: job.job_id for prompt, job in sent.items()}
    broker = redis.Redis.from_url(redis_urls[0])
    broker.hset(WORKERS_KEY, mapping={"celery@live:1": time.time(), "celery@gone:2": time.time() - 3600})
    store.mark("lost", ids["failed"], FAILED, reason="cuda oom")
    store.mark("lost", ids["on a live worker"], RUNNING, worker="celery@live:1")
    store.mark("lost", ids["on a gone worker"], RUNNING, worker="celery@gone:2")
    store.mark("lost", ids["done"], RUNNING, worker="celery@live:1")
    store.mark("lost", ids["done"], DONE, key="k")
    lose_queue(broker)  # the queue is lost

    run = client.retry("lost")
    assert (run.submitted, run.skipped) == (3, 0)
    resent = {job.job_id: job for job in queued(redis_urls[0])}
    assert set(resent) == {ids["queued"], ids["failed"], ids["on a gone worker"]}
    by_id = {job.job_id: job for job in sent.values()}
    assert all(job == by_id[job_id] for job_id, job in resent.items())  # the very jobs that were sent first
    assert run.status().counts == {QUEUED: 2, RUNNING: 2, DONE: 1, FAILED: 0, CANCELLED: 0}


def test_retry_of_an_unknown_run_raises(client):
    with pytest.raises(RunNotFoundError):
        client.retry("never-submitted")


def test_submit_spanning_chunks_skips_the_right_jobs(client, redis_urls, store):
    prompts = [f"prompt {n}" for n in range(SUBMIT_CHUNK + 3)]
    jobs = client.prepare(prompts, run="big", steps=2)
    skipped = {jobs[0].job_id, jobs[SUBMIT_CHUNK + 1].job_id}  # one in each chunk
    for job_id in skipped:
        store.mark("big", job_id, RUNNING)

    run = client.submit(prompts, run="big", steps=2)
    assert (run.submitted, run.skipped) == (SUBMIT_CHUNK + 1, 2)
    sent_ids = {job.job_id for job in queued(redis_urls[0])}
    assert sent_ids == {job.job_id for job in jobs} - skipped
    assert run.status().counts == {QUEUED: SUBMIT_CHUNK + 1, RUNNING: 2, DONE: 0, FAILED: 0, CANCELLED: 0}


# -- a run keeps its recipe (issue 6: `--steps 6` after `--steps 5` added 24 + 24 jobs) ---------------


def test_resubmit_with_a_changed_recipe_is_refused_naming_what_differs(client, redis_urls, store):
    client.submit(["a", "b"], run="koi", steps=5)
    before = len(queued_jobs(redis_urls[0]))
    with pytest.raises(RecipeMismatchError) as info:
        client.submit(["a", "b"], run="koi", steps=6)
    assert str(info.value).startswith("run 'koi' was submitted with steps=5; this submit has steps=6: ")
    assert "use another run name, or pass the same settings" in str(info.value)
    assert info.value.differences == [("steps", 5, 6)] and info.value.run_id == "koi"
    assert isinstance(info.value, DeepQueueError) and isinstance(info.value, ValueError)
    assert len(queued_jobs(redis_urls[0])) == before == 2
    assert client.run("koi").status().total == 2
    assert store.recipes("koi") == [client_recipe(client, "koi", steps=5)]


def client_recipe(client: Client, run_id: str, seed: int | None = None, **defaults) -> dict:
    from producer.job import run_defaults, run_recipe

    return run_recipe(run_defaults(defaults), run_id=run_id, run_seed=seed)


def test_every_difference_is_named_with_both_values(client):
    client.submit(["a"], run="many", steps=5, height=64, width=64, negative_prompt="blurry", scheduler="euler")
    with pytest.raises(RecipeMismatchError) as info:
        client.submit(["a"], run="many", steps=5, height=128, width=64, guidance=4, seed=3)
    differences = {field: (old, new) for field, old, new in info.value.differences}
    assert set(differences) == {"height", "guidance", "negative_prompt", "scheduler", "seed"}
    assert differences["height"] == (64, 128) and differences["guidance"] == (7.5, 4.0)
    assert differences["negative_prompt"] == ("blurry", None) and differences["scheduler"] == ("euler", None)
    assert differences["seed"][1] == 3
    text = str(info.value)
    assert "height=64, " in text and "height=128, " in text and "negative_prompt='blurry'" in text


@pytest.mark.parametrize(
    ("first", "again"),
    [
        ({}, {}),
        ({"steps": 25}, {}),  # the default, given or not: the same jobs
        ({}, {"seed": None}),
        ({"guidance": 7}, {"guidance": 7.0}),
        ({"height": 64, "width": 64}, {"width": 64, "height": 64}),
        ({"scheduler": "heun"}, {"scheduler": "heun", "cache_interval": 1}),  # heun alone means interval 1
    ],
)
def test_the_same_recipe_resumes_as_before(client, redis_urls, store, first, again):
    run = client.submit(["a", "b"], run="same", **first)
    job_ids = ids_of(run, store)
    store.mark("same", job_ids[0], DONE, key="k")
    store.mark("same", job_ids[1], FAILED, reason="oom")
    resumed = client.submit(["a", "b"], run="same", **again)
    assert (resumed.submitted, resumed.skipped) == (1, 1)  # the failed one, sent again
    assert ids_of(resumed, store) == job_ids
    assert len(store.recipes("same")) == 1


def test_the_run_seed_derived_from_the_name_equals_the_same_seed_given(client, store):
    from producer.job import run_seed_for

    client.submit(["a"], run="derived")
    assert client.submit(["a"], run="derived", seed=run_seed_for("derived")).skipped == 1
    with pytest.raises(RecipeMismatchError, match=r"seed=\d+; this submit has seed=1:"):
        client.submit(["a"], run="derived", seed=1)


def test_new_prompts_with_the_same_recipe_join_the_run(client, redis_urls):
    client.submit(["a", "b"], run="grow", steps=5)
    more = client.submit(["a", "b", "c", "d"], run="grow", steps=5)
    assert (more.submitted, more.skipped) == (2, 2)
    assert more.status().total == 4


def test_rows_may_still_set_their_own_fields(client):
    """The recipe is the run-wide settings; rows of the source override them as before."""
    client.submit([{"prompt": "a", "steps": 3}], run="rows", steps=5)
    again = client.submit([{"prompt": "a", "steps": 3}, {"prompt": "b", "steps": 9}], run="rows", steps=5)
    assert (again.submitted, again.skipped) == (1, 1)


def test_allow_recipe_change_adds_a_second_set_and_both_resume(client, store):
    client.submit(["a", "b"], run="sweep", steps=4)
    with pytest.raises(RecipeMismatchError):
        client.submit(["a", "b"], run="sweep", steps=5)
    second = client.submit(["a", "b"], run="sweep", steps=5, allow_recipe_change=True)
    assert second.submitted == 2 and second.status().total == 4
    assert [recipe["steps"] for recipe in store.recipes("sweep")] == [4, 5]
    # both recorded recipes now resume without the option; a third is refused again
    assert client.submit(["a", "b"], run="sweep", steps=4).skipped == 2
    assert client.submit(["a", "b"], run="sweep", steps=5).skipped == 2
    with pytest.raises(RecipeMismatchError, match=r"steps=4; this submit has steps=6"):
        client.submit(["a", "b"], run="sweep", steps=6)  # named against the closest recipe, the first on a tie
    with pytest.raises(RecipeMismatchError, match=r"with guidance=7.5; this submit has guidance=2.0:"):
        client.submit(["a", "b"], run="sweep", steps=5, guidance=2)  # closer to steps=5 than to steps=4


def test_a_run_from_before_recipes_were_recorded_works_as_before(client, redis_urls, store):
    """Runs submitted by an older client have jobs but no recipe: nothing is checked or recorded."""
    client.submit(["a"], run="old", steps=4)
    redis.Redis.from_url(redis_urls[1]).delete("deepqueue:{old}:recipes")
    assert client.submit(["a"], run="old", steps=5).submitted == 1
    assert client.submit(["a"], run="old", steps=4).skipped == 1
    assert store.recipes("old") == []


def test_concurrent_first_submits_of_one_run_record_one_recipe(redis_urls, store):
    """Two clients starting the same run at once: one recipe wins, the other submit is refused."""
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def submit(steps: int) -> None:
        with Client(*redis_urls) as client:
            barrier.wait()
            try:
                client.submit(["a"], run="race", steps=steps)
                outcomes.append(f"ok {steps}")
            except RecipeMismatchError:
                outcomes.append(f"refused {steps}")

    threads = [threading.Thread(target=submit, args=(4 + n % 2,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [recipe] = store.recipes("race")
    winner = recipe["steps"]
    assert sorted(outcomes) == sorted(f"{'ok' if 4 + n % 2 == winner else 'refused'} {4 + n % 2}" for n in range(8))
    assert store.counts("race")[QUEUED] == 1


def _submit_in_a_process(broker: str, backend: str, prompts: list[str], start: object, sent: object) -> None:
    """One producer; all four pass the recipe check, then send at the same moment (the widest
    race there is: with check-then-send, each of them saw every job new and sent it)."""
    claim_recipe = RunStore.claim_recipe

    def then_wait(self: RunStore, *args: object, **kwargs: object) -> object:
        recorded = claim_recipe(self, *args, **kwargs)
        start.wait()  # type: ignore[attr-defined]
        return recorded

    RunStore.claim_recipe = then_wait  # type: ignore[method-assign]
    with Client(broker, backend) as client:
        sent.put(client.submit(prompts, run="raced", steps=4).submitted)  # type: ignore[attr-defined]


def test_four_producers_racing_one_new_run_send_each_job_once(redis_urls, store):
    """Four processes submit the same new 500-job run at the same moment: 500 jobs sent in all
    (each job is claimed before it is sent), every job queued, the submitted counts adding up."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    start, sent = context.Barrier(4), context.Queue()
    prompts = [f"prompt {i}" for i in range(500)]
    producers = [
        context.Process(target=_submit_in_a_process, args=(*redis_urls, prompts, start, sent)) for _ in range(4)
    ]
    for process in producers:
        process.start()
    for process in producers:
        process.join(timeout=120)
        assert process.exitcode == 0
    assert sum(sent.get(timeout=5) for _ in producers) == 500
    jobs = queued(redis_urls[0])
    assert len(jobs) == len({job.job_id for job in jobs}) == 500
    assert store.counts("raced")[QUEUED] == 500


def test_a_publish_that_fails_gives_its_claims_back(client, redis_urls, store, monkeypatch):
    """The broker refusing the publish (mocked: a Redis that fails between two commands of one
    submit cannot be caused on purpose) leaves no job marked queued, so submitting again sends them."""
    import producer.client

    def refused(*args: object, **kwargs: object) -> None:
        raise redis.ConnectionError("broker went away")

    client.submit(["done already"], run="refused", steps=4)
    [done] = [result.job_id for result in store.results("refused")]
    store.mark("refused", done, RUNNING)
    store.mark("refused", done, DONE)
    monkeypatch.setattr(producer.client, "push", refused)
    with pytest.raises(redis.ConnectionError):
        client.submit(["done already", "a", "b"], run="refused", steps=4)
    assert store.counts("refused") == {QUEUED: 0, RUNNING: 0, DONE: 1, FAILED: 0, CANCELLED: 0}
    monkeypatch.undo()
    again = client.submit(["done already", "a", "b"], run="refused", steps=4)
    assert (again.submitted, again.skipped) == (2, 1)
    assert len(queued(redis_urls[0])) == 3  # the first submit's one, then two


def test_claims_that_cannot_be_given_back_say_how_to_send_them(client, redis_urls, store, monkeypatch):
    """Redis gone for the publish and for the give-back too (mocked, as above): the error says
    what to do, and doing it sends every job."""
    import producer.client

    def gone(*args: object, **kwargs: object) -> None:
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(producer.client, "push", gone)
    monkeypatch.setattr(RunStore, "unclaim", gone)
    with pytest.raises(redis.ConnectionError, match="2 jobs of run 'gone' are marked queued.*--resend-queued"):
        client.submit(["a", "b"], run="gone", steps=4)
    monkeypatch.undo()
    assert client.submit(["a", "b"], run="gone", steps=4).submitted == 0  # claimed: a plain submit skips them
    assert client.submit(["a", "b"], run="gone", steps=4, resend_queued=True).submitted == 2
    assert len(queued(redis_urls[0])) == 2


def test_the_recipe_key_lives_with_the_run(client, redis_urls):
    client.submit(["a"], run="tagged")
    keys = sorted(key.decode() for key in redis.Redis.from_url(redis_urls[1]).keys("deepqueue:{tagged}:*"))
    assert keys == [
        "deepqueue:{tagged}:blocks",
        "deepqueue:{tagged}:counts",
        "deepqueue:{tagged}:recipes",
        "deepqueue:{tagged}:slots:0",
    ]


# -- nothing is sent when anything is wrong ---------------------------------------------------------


def test_invalid_row_enqueues_nothing_and_writes_no_state(client, redis_urls):
    with pytest.raises(InvalidJobError) as info:
        client.submit(["fine", {"prompt": "bad", "height": 500}, " "], run="bad-rows")
    wheres = [where for where, _ in info.value.problems]
    assert wheres == ["job 1 (item 1)", "job 2 (item 2)"]
    assert redis_is_empty(redis_urls[0]) and redis_is_empty(redis_urls[1])
    with pytest.raises(RunNotFoundError):
        client.run("bad-rows")


def test_bad_prompt_file_enqueues_nothing(client, redis_urls, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('"fine"\n{not json\n', encoding="utf-8")
    with pytest.raises(PromptFileError, match="line 2 of p.jsonl"):
        client.submit(path, run="bad-file")
    assert redis_is_empty(redis_urls[0]) and redis_is_empty(redis_urls[1])


@pytest.mark.parametrize(
    ("defaults", "field"),
    [
        ({"height": 500}, "height"),
        ({"steps": 0}, "steps"),
        ({"guidance": float("nan")}, "guidance"),
        ({"scheduler": "lms"}, "scheduler"),
        ({"hieght": 512}, "hieght"),
        ({"prompt": "not a default"}, "prompt"),
    ],
)
def test_invalid_run_defaults_refused_naming_run_defaults(client, redis_urls, defaults, field):
    with pytest.raises(InvalidJobError) as info:
        client.submit(["a"], run="bad-defaults", **defaults)
    [(where, message)] = info.value.problems
    assert where == "run defaults" and message.startswith(f"{field}: ")
    assert "run defaults" in str(info.value)
    assert redis_is_empty(redis_urls[0]) and redis_is_empty(redis_urls[1])


def test_cache_breaking_scheduler_in_run_defaults_refused(client):
    with pytest.raises(InvalidJobError) as info:
        client.submit(["a"], run="heun", scheduler="heun", cache_interval=3)
    [(where, message)] = info.value.problems
    assert where == "run defaults" and "'heun'" in message


def test_invalid_run_name_refused(client, redis_urls):
    with pytest.raises(InvalidJobError) as info:
        client.submit(["a"], run="not a valid name")
    assert info.value.problems[0][1].startswith("run_id: ")
    assert redis_is_empty(redis_urls[1])


def test_empty_run_name_is_refused_not_replaced_by_a_new_run(client, redis_urls):
    """An unset shell variable (``--run "$RUN"``) must not silently start a whole new run."""
    with pytest.raises(InvalidJobError) as info:
        client.submit(["a"], run="")
    assert info.value.problems[0][1].endswith("got ''")
    assert redis_is_empty(redis_urls[1])


# -- following a run --------------------------------------------------------------------------------


def test_run_status_counts(client, store):
    run = client.submit(["a", "b", "c", "d", "e"], run="counted")
    job_ids = ids_of(run, store)
    store.mark("counted", job_ids[0], RUNNING)
    store.mark("counted", job_ids[1], DONE, key="k")
    store.mark("counted", job_ids[2], FAILED, reason="r")
    status = client.run("counted").status()
    assert status.counts == {QUEUED: 2, RUNNING: 1, DONE: 1, FAILED: 1, CANCELLED: 0}
    assert (status.total, status.finished, status.is_finished) == (5, 2, False)
    assert str(status).startswith("counted: 5 jobs (queued 2, running 1, done 1, failed 1, cancelled 0), ")
    assert status.images_per_s > 0 and " img/s, ETA " in str(status)


def test_run_handle_for_unknown_run_raises(client):
    with pytest.raises(RunNotFoundError, match="'never-submitted'"):
        client.run("never-submitted")


def test_run_handle_for_known_run(client):
    client.submit(["a"], run="known")
    run = client.run("known")
    assert run.run_id == "known" and repr(run) == "Run('known')"
    assert run.status().total == 1


def test_runs_lists_runs_in_submission_order(client):
    for name in ["r1", "r2", "r3"]:
        client.submit(["a"], run=name)
    client.submit(["b"], run="r1")
    assert client.runs() == ["r1", "r2", "r3"]


def finish_later(
    store: RunStore, run_id: str, job_ids: list[str], *, fail: str | None = None, after: float = 0.0
) -> threading.Thread:
    """Mark the jobs running then done (or failed) from another thread, as a worker would."""

    def work() -> None:
        time.sleep(after)  # let the waiter see the run unfinished first
        for job in job_ids:
            store.mark(run_id, job, RUNNING)
        for job in job_ids:
            if job == fail:
                store.mark(run_id, job, FAILED, reason="nsfw filter")
            else:
                store.mark(run_id, job, DONE, key=f"{run_id}/{job}.png")

    thread = threading.Thread(target=work)
    thread.start()
    return thread


def test_wait_returns_when_every_job_is_done_or_failed(client, store):
    run = client.submit(["a", "b", "c"], run="waited")
    job_ids = ids_of(run, store)
    worker = finish_later(
        RunStore.from_url(client.settings.result_backend), "waited", job_ids, fail=job_ids[1], after=0.1
    )
    final = run.wait(timeout=30, poll_s=0.01)
    worker.join()
    assert final.is_finished
    assert final.counts == {QUEUED: 0, RUNNING: 0, DONE: 2, FAILED: 1, CANCELLED: 0}


def test_wait_with_progress_bar(client, store, capsys):
    run = client.submit(["a"], run="bar")
    finish_later(store, "bar", ids_of(run, store)).join()
    assert run.wait(progress=True, timeout=5).finished == 1
    assert "bar" in capsys.readouterr().err


def test_wait_times_out(client):
    run = client.submit(["a", "b"], run="stuck")
    with pytest.raises(WaitTimeoutError) as info:
        run.wait(timeout=0.05, poll_s=0.01)
    assert "stuck" in str(info.value) and "queued 2" in str(info.value)
    assert isinstance(info.value, TimeoutError)


def test_results_all_and_by_state(client, store):
    run = client.submit(["a", "b", "c"], run="res")
    job_ids = ids_of(run, store)
    store.mark("res", job_ids[0], DONE, key="res/a.png")
    store.mark("res", job_ids[1], FAILED, reason="bad luck")
    everything = {result.job_id: result for result in run.results()}
    assert set(everything) == set(job_ids)
    [done] = run.results(DONE)
    assert (done.job_id, done.key) == (job_ids[0], "res/a.png")
    [failed] = run.results(state=FAILED)
    assert (failed.job_id, failed.reason) == (job_ids[1], "bad luck")
    assert [r.job_id for r in run.results(QUEUED)] == [job_ids[2]]
    assert list(run.results(RUNNING)) == []


# -- sent grouped by shape, streamed (issue 7) ------------------------------------------------------


def test_submit_sends_each_shapes_jobs_together_in_their_order(client, redis_urls):
    """Shuffled shapes in, one block per shape out (in order of first appearance), so that a
    worker's reservation holds full batches; job ids and indexes are those of the rows."""
    rows = [
        {"prompt": f"p{i}", "width": 64 if i % 3 else 128, "negative_prompt": "" if i % 2 else None} for i in range(12)
    ]
    rows = [{key: value for key, value in row.items() if value is not None} for row in rows]
    client.submit(rows, run="grouped", height=64)
    sent = queued(redis_urls[0])
    assert [job.width for job in sent] == [128] * 4 + [64] * 8
    assert [job.index for job in sent] == [0, 3, 6, 9, 1, 2, 4, 5, 7, 8, 10, 11]
    assert sorted(job.job_id for job in sent) == sorted(
        job.job_id for job in client.prepare(rows, run="grouped", height=64)
    )


def test_a_bad_row_late_in_a_big_file_sends_nothing(client, redis_urls, tmp_path):
    """Every row is checked before any is sent, whatever the file's size: the 12,001st row is
    bad, three chunks' worth of good rows before it, and the queue and state stay empty."""
    path = tmp_path / "big.jsonl"
    with path.open("w") as out:
        out.writelines(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(3 * SUBMIT_CHUNK))
        out.write(json.dumps({"prompt": "bad", "steps": 0}) + "\n")
    with pytest.raises(InvalidJobError, match=rf"job {3 * SUBMIT_CHUNK} \(line {3 * SUBMIT_CHUNK + 1} of big.jsonl\)"):
        client.submit(path, run="late-bad")
    assert redis_is_empty(redis_urls[0]) and redis_is_empty(redis_urls[1])
    path.write_text(path.read_text().replace('"steps": 0', '"steps": 5'))
    assert client.submit(path, run="late-bad").submitted == 3 * SUBMIT_CHUNK + 1


def test_many_bad_rows_are_counted_not_all_kept(client, tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("".join(f"{'x' * 3000}\n" for _ in range(1500)))
    with pytest.raises(InvalidJobError) as info:
        client.submit(path, run="all-bad")
    assert len(info.value.problems) == 1000 and info.value.omitted == 500
    assert "1500 invalid field(s)" in str(info.value)


def test_a_generator_is_read_once_checked_then_sent(client, redis_urls):
    consumed = []

    def rows():
        for i in range(7):
            consumed.append(i)
            yield f"generated {i}"

    run = client.submit(rows(), run="generated")
    assert consumed == list(range(7)) and run.submitted == 7
    assert [job.prompt for job in queued(redis_urls[0])] == [f"generated {i}" for i in range(7)]
    with pytest.raises(InvalidJobError, match="item 2"):
        client.submit((p for p in ["fine", "also fine", ""]), run="generated-bad")
    assert client.run("generated").status().total == 7 and not client._store.exists("generated-bad")


def test_the_input_is_read_once(client, tmp_path, monkeypatch):
    """Every job is checked before any is sent, and the send reads the checked jobs back
    (``producer.checked``), not the file: a file rewritten meanwhile changes nothing."""
    from producer import sources

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    reads = []
    real = sources.read_file

    def read_then_change(p):
        reads.append(p)
        rows = list(real(p))
        path.write_text('{"prompt": "a"}\n{"prompt": ""}\n')
        return iter(rows)

    monkeypatch.setattr(sources, "read_file", read_then_change)
    run = client.submit(path, run="read-once")
    assert len(reads) == 1 and run.submitted == 2
    assert sorted(client.prompts("read-once", [result.job_id for result in run.results()])) == ["a", "b"]


def test_submit_memory_does_not_grow_with_the_file(client, redis_urls, tmp_path, monkeypatch):
    """Peak Python memory (tracemalloc) while submitting 2,000 and 20,000 rows in chunks (and checked blocks) of 500:
    ten times the rows, about the same peak (under 2.5x). A submit that held every job would need ~10x."""
    import tracemalloc

    from producer import checked
    from producer import client as client_module

    monkeypatch.setattr(client_module, "SUBMIT_CHUNK", 500)
    monkeypatch.setattr(checked, "BLOCK", 500)  # the checked jobs kept on disk, read back a block at a time

    def peak(rows: int) -> int:
        path = tmp_path / f"p{rows}.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"row {i} " + "x" * 90}) + "\n" for i in range(rows)))
        for url in redis_urls:
            redis.Redis.from_url(url).flushdb()
        tracemalloc.start()
        try:
            assert client.submit(path, run=f"mem-{rows}").submitted == rows
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(2000), peak(20000)
    assert large < 2.5 * small, (small, large)  # holding every job: ~10x; a chance GC or buffer: < 2x


class Terminal(io.StringIO):
    """Output that says it is a terminal, as a shell's stderr does."""

    def isatty(self) -> bool:
        return True


def test_waiting_on_a_finished_run_shows_no_rate(client, store):
    """tqdm's rate counts only what finishes during the wait: a finished run shows none, not
    hundreds of thousands of images per second."""
    run = client.submit(["a", "b"], run="finished")
    for job in client.prepare(["a", "b"], run="finished"):
        store.mark("finished", job.job_id, DONE, key="s3://b/k")
    terminal = Terminal()
    run.wait(progress=True, timeout=5, stream=terminal)
    bar = terminal.getvalue()
    assert "2/2" in bar and not re.search(r"\d img/s|\dimg/s", bar), bar


def test_progress_off_a_terminal_is_a_line_now_and_then(client, store):
    """Not a terminal (CI logs, nohup): whole lines, at most one per line_every_s and the final
    one, with counts and the run's own rate; no carriage returns."""
    run = client.submit(["a", "b", "c"], run="lines")
    jobs = client.prepare(["a", "b", "c"], run="lines")
    out = io.StringIO()

    def finish_them() -> None:
        time.sleep(0.3)  # after the wait's first poll
        for job in jobs:
            store.mark("lines", job.job_id, RUNNING)
            store.mark("lines", job.job_id, DONE, key="s3://b/k")
            time.sleep(0.05)

    worker = threading.Thread(target=finish_them)
    worker.start()
    run.wait(progress=True, timeout=10, poll_s=0.01, stream=out, line_every_s=3600)
    worker.join()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 2, lines  # the first poll, then the end: none in between within the hour
    assert "lines: 3 jobs (queued 3, running 0, done 0" in lines[0]
    assert "done 3, failed 0, cancelled 0)" in lines[1] and " img/s" in lines[1]


def test_cancel_drops_the_runs_waiting_messages_and_leaves_the_others(client, redis_urls):
    client.submit([f"gone {i}" for i in range(20)], run="gone", steps=4)
    client.submit(["kept"], run="kept", steps=4)
    assert client.cancel("gone") == 20
    assert [job["run_id"] for job in queued_jobs(redis_urls[0])] == ["kept"]
    broker = redis.Redis.from_url(redis_urls[0])
    assert broker.llen("deepqueue") == 1 and FairQueue(broker, "deepqueue").waiting() == (1, 1)
    assert client.run("gone").status().counts[CANCELLED] == 20


def test_a_capped_submit_sends_more_as_workers_take_them(client, redis_urls):
    """``max_queued``: the run never has more jobs waiting; the submit ends once workers (here
    a loop taking messages as a worker does) made room for the last ones."""
    broker = redis.Redis.from_url(redis_urls[0])
    fair = FairQueue(broker, "deepqueue")
    submit = threading.Thread(
        target=client.submit,
        args=([f"p {i}" for i in range(50)],),
        kwargs={"run": "capped", "max_queued": 10, "steps": 4},
    )
    submit.start()
    taken, most, deadline = 0, 0, time.monotonic() + 300
    while taken < 50 and time.monotonic() < deadline:
        most = max(most, fair.waiting_of("capped"))
        if broker.lmove("deepqueue", "taking", "RIGHT", "LEFT"):
            _, item = fair.take("taking")
            broker.delete("taking")
            taken += len(unpack(json.loads(json.loads(item)["body"])[0][0]) or [None])
        else:
            time.sleep(0.01)
    submit.join(timeout=30)
    assert not submit.is_alive() and taken == 50 and 0 < most <= 10
    with pytest.raises(ShareError, match="max_queued must be at least 1"):
        client.submit(["x"], run="capped-badly", max_queued=0)
