"""worker.delivery.batching: which jobs may share a pipeline call, and the buffer that groups them."""

from __future__ import annotations

import random
from collections import deque
from functools import partial
from typing import Any

import pytest

from producer.job import CACHE_BREAKING_SCHEDULERS
from tests import helpers
from worker.delivery.batching import BatchBuffer, BatchKey, RecipeDefaults, batch_key

DEFAULTS = RecipeDefaults(model="models/tiny", scheduler="ddim", cache_interval=3, cache_branch=0)


make_job = partial(helpers.make_job, index=0, prompt="a cat", seed=1, height=512, width=512)


# --- batch_key -------------------------------------------------------------------------------


def test_jobs_that_may_share_a_call_get_the_same_key() -> None:
    first = make_job()
    others = [
        make_job(prompt="a completely different prompt"),
        make_job(seed=99),
        make_job(index=7),
        make_job(run_id="another-run"),
    ]
    assert all(batch_key(job, DEFAULTS) == batch_key(first, DEFAULTS) for job in others)
    # Two different negative prompts: the presence is shared, the text is per image.
    assert batch_key(make_job(negative_prompt="blurry"), DEFAULTS) == batch_key(
        make_job(negative_prompt="ugly, low quality", seed=5), DEFAULTS
    )
    assert hash(batch_key(first, DEFAULTS)) == hash(batch_key(others[0], DEFAULTS))


@pytest.mark.parametrize(
    ("field", "a", "b"),
    [
        ("height", 512, 768),
        ("width", 512, 640),
        ("steps", 20, 25),
        ("guidance", 7.5, 7.0),
        ("scheduler", "ddim", "euler"),
        ("cache_interval", 3, 5),
        ("cache_interval", 1, 3),
        ("cache_branch", 0, 1),
        ("negative_prompt", None, "blurry"),
        ("format", "png", "webp"),
        ("format", "png", "jpeg"),
    ],
)
def test_every_call_wide_field_splits_the_key(field: str, a: Any, b: Any) -> None:
    key_a, key_b = batch_key(make_job(**{field: a}), DEFAULTS), batch_key(make_job(**{field: b}), DEFAULTS)
    assert key_a != key_b


def test_key_fields() -> None:
    job = make_job(
        height=768,
        width=512,
        steps=30,
        guidance=5.0,
        scheduler="euler",
        cache_interval=4,
        cache_branch=2,
        negative_prompt="x",
        format="webp",
    )
    assert batch_key(job, DEFAULTS) == BatchKey(
        model="models/tiny",
        height=768,
        width=512,
        steps=30,
        guidance=5.0,
        scheduler="euler",
        cache_interval=4,
        cache_branch=2,
        negative_prompt=True,
        format="webp",
    )


def test_unset_recipe_fields_take_the_worker_defaults() -> None:
    defaults = RecipeDefaults(model="m", scheduler="euler_a", cache_interval=5, cache_branch=2)
    key = batch_key(make_job(), defaults)  # scheduler, cache_interval, cache_branch all None
    assert (key.model, key.scheduler, key.cache_interval, key.cache_branch) == ("m", "euler_a", 5, 2)
    assert key.deepcache
    # A job that names the default explicitly batches with one that leaves it to the worker.
    explicit = make_job(scheduler="euler_a", cache_interval=5, cache_branch=2)
    assert batch_key(explicit, defaults) == key
    # The model always comes from the worker.
    assert batch_key(make_job(), RecipeDefaults("other", "euler_a", 5, 2)).model == "other"


def test_partial_overrides_mix_job_and_defaults() -> None:
    defaults = RecipeDefaults(model="m", scheduler="ddim", cache_interval=5, cache_branch=2)
    assert batch_key(make_job(cache_interval=3), defaults).cache_branch == 2
    assert batch_key(make_job(cache_branch=1), defaults).cache_interval == 5
    assert batch_key(make_job(scheduler="unipc"), defaults).scheduler == "unipc"


def test_branch_is_normalised_when_caching_is_off() -> None:
    off = [
        make_job(cache_interval=1, cache_branch=3),
        make_job(cache_interval=1, cache_branch=0),
        make_job(cache_interval=1),
    ]
    keys = {batch_key(job, DEFAULTS) for job in off}
    assert len(keys) == 1
    (key,) = keys
    assert key.cache_branch == 0 and not key.deepcache
    # Also when caching is off by the worker's default.
    defaults = RecipeDefaults(model="m", scheduler="ddim", cache_interval=1, cache_branch=4)
    assert batch_key(make_job(), defaults).cache_branch == 0
    assert batch_key(make_job(cache_branch=2), defaults).cache_branch == 0
    # With caching on, the branch is kept.
    assert batch_key(make_job(cache_interval=2, cache_branch=3), DEFAULTS).cache_branch == 3


@pytest.mark.parametrize("scheduler", sorted(CACHE_BREAKING_SCHEDULERS))
def test_problem_for_schedulers_that_repeat_timesteps(scheduler: str) -> None:
    assert {"heun", "pndm", "kdpm2"} == CACHE_BREAKING_SCHEDULERS
    # The job contract refuses an interval > 1 with these and turns caching off when a job names
    # one without an interval; a worker whose own default scheduler is one of them can still
    # ask for caching, so the key must catch it.
    worker_defaults = RecipeDefaults(model="m", scheduler=scheduler, cache_interval=3, cache_branch=0)
    key = batch_key(make_job(), worker_defaults)
    assert key.deepcache and key.scheduler == scheduler
    problem = key.problem()
    assert problem is not None
    assert scheduler in problem and "DeepCache" in problem and "cache_interval=1" in problem
    # Caching off: fine.
    assert batch_key(make_job(scheduler=scheduler, cache_interval=1), DEFAULTS).problem() is None


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler_a", "dpmpp_2m", "unipc", "lcm"])
def test_no_problem_for_clean_schedulers(scheduler: str) -> None:
    assert batch_key(make_job(scheduler=scheduler, cache_interval=3), DEFAULTS).problem() is None


# --- BatchBuffer ------------------------------------------------------------------------------


@pytest.mark.parametrize("max_batch", [0, -1])
def test_max_batch_below_one_is_refused(max_batch: int) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        BatchBuffer(max_batch, 1.0)


def test_empty_buffer() -> None:
    buffer: BatchBuffer[str] = BatchBuffer(4, 1.0)
    assert len(buffer) == 0
    assert buffer.take(1e9) is None
    assert list(buffer.drain()) == []


def test_full_batch_is_returned_at_once() -> None:
    buffer: BatchBuffer[int] = BatchBuffer(3, 10.0)
    for i in range(3):
        buffer.add("a", i, now=0.0)
    assert buffer.take(0.0, allow_partial=False) == ("a", [0, 1, 2])
    assert len(buffer) == 0


def test_partial_batch_only_after_max_wait() -> None:
    buffer: BatchBuffer[int] = BatchBuffer(4, 2.0)
    buffer.add("a", 1, now=10.0)
    buffer.add("a", 2, now=11.0)
    assert buffer.take(11.9) is None
    assert buffer.take(11.999) is None
    assert buffer.take(100.0, allow_partial=False) is None  # never partial when not allowed
    assert len(buffer) == 2
    assert buffer.take(12.0) == ("a", [1, 2])  # the oldest item has waited max_wait_s
    assert buffer.take(100.0) is None


def test_zero_wait_hands_out_partials_at_once() -> None:
    buffer: BatchBuffer[int] = BatchBuffer(4, 0.0)
    buffer.add("a", 1, now=5.0)
    assert buffer.take(5.0) == ("a", [1])


def test_an_overdue_partial_is_not_starved_by_younger_full_batches() -> None:
    buffer: BatchBuffer[str] = BatchBuffer(2, 1.0)
    buffer.add("old", "o1", now=0.0)
    buffer.add("new", "n1", now=5.0)
    buffer.add("new", "n2", now=5.5)
    # Both are ready; "old" holds the oldest job, so it goes first.
    assert buffer.take(6.0) == ("old", ["o1"])
    assert buffer.take(6.0) == ("new", ["n1", "n2"])


def test_a_due_partial_holds_the_line_while_partials_may_not_go() -> None:
    buffer: BatchBuffer[str] = BatchBuffer(2, 1.0)
    buffer.add("old", "o1", now=0.0)
    buffer.add("new", "n1", now=5.0)
    buffer.add("new", "n2", now=5.5)
    assert buffer.take(0.5, allow_partial=False) == ("new", ["n1", "n2"])  # "old" not due yet: full ones go
    buffer.add("new", "n3", now=6.0)
    buffer.add("new", "n4", now=6.0)
    assert buffer.take(6.0, allow_partial=False) is None  # "old" is due: no younger batch jumps it
    assert buffer.take(6.0) == ("old", ["o1"])
    assert buffer.take(6.0, allow_partial=False) == ("new", ["n3", "n4"])


def test_no_key_starves_behind_a_stream_of_full_batches() -> None:
    """A busy pool (partials not allowed but when a slot is idle, every other take) and a full
    batch of another key arriving before every take: the lone job still goes by its due time."""
    buffer: BatchBuffer[str] = BatchBuffer(2, 1.0)
    buffer.add("lone", "l", now=0.0)
    taken_at = None
    for step in range(40):
        now = step * 0.25
        buffer.add("busy", f"b{step}a", now=now)
        buffer.add("busy", f"b{step}b", now=now)
        got = buffer.take(now, allow_partial=step % 2 == 0)
        if got is not None and got[0] == "lone":
            taken_at = now
            break
    assert taken_at is not None and taken_at <= 1.0 + 0.25


def test_a_retry_added_with_an_early_time_goes_first() -> None:
    buffer: BatchBuffer[str] = BatchBuffer(4, 1.0)
    buffer.add("a", "a1", now=5.0)
    buffer.add(("alone", "x"), "x", now=float("-inf"))
    assert buffer.take(5.0) == (("alone", "x"), ["x"])


def test_oldest_full_key_first() -> None:
    buffer: BatchBuffer[str] = BatchBuffer(2, 100.0)
    buffer.add("b", "b1", now=1.0)
    buffer.add("a", "a1", now=2.0)
    buffer.add("a", "a2", now=3.0)
    buffer.add("b", "b2", now=4.0)  # both full now; b's oldest item is older
    assert buffer.take(4.0, allow_partial=False) == ("b", ["b1", "b2"])
    assert buffer.take(4.0, allow_partial=False) == ("a", ["a1", "a2"])


def test_a_higher_class_goes_first_in_its_key_and_among_keys() -> None:
    """Rank 0 (a high run's message) before rank 1 (normal), however old the normal ones."""
    buffer: BatchBuffer[str] = BatchBuffer(2, 100.0)
    for n in range(3):
        buffer.add("shared", f"normal{n}", now=float(n), rank=1)
        buffer.add("normal-only", f"other{n}", now=float(n), rank=1)
    buffer.add("shared", "high0", now=10.0, rank=0)
    assert buffer.take(10.0, allow_partial=False) == ("shared", ["high0", "normal0"])
    buffer.add("high-only", "high1", now=11.0, rank=0)
    buffer.add("high-only", "high2", now=12.0, rank=0)
    assert buffer.take(12.0, allow_partial=False) == ("high-only", ["high1", "high2"])
    assert buffer.take(12.0, allow_partial=False) == ("normal-only", ["other0", "other1"])


def test_a_partial_is_due_by_its_oldest_item_whatever_its_class() -> None:
    buffer: BatchBuffer[str] = BatchBuffer(4, 1.0)
    buffer.add("k", "normal", now=0.0, rank=1)
    buffer.add("k", "high", now=0.9, rank=0)
    assert buffer.take(1.0) == ("k", ["high", "normal"])


def test_longest_waiting_partial_first() -> None:
    buffer: BatchBuffer[str] = BatchBuffer(4, 1.0)
    for key, now in (("x", 1.0), ("y", 2.0), ("z", 3.0)):
        buffer.add(key, key + "1", now=now)
    buffer.add("x", "x2", now=3.5)
    assert buffer.take(3.6) == ("x", ["x1", "x2"])
    assert buffer.take(3.6) == ("y", ["y1"])
    assert buffer.take(3.6) is None  # z has waited 0.6 s of 1.0
    assert buffer.take(4.0) == ("z", ["z1"])


def test_never_more_than_max_batch() -> None:
    buffer: BatchBuffer[int] = BatchBuffer(4, 1.0)
    for i in range(10):
        buffer.add("a", i, now=0.0)
    assert buffer.take(0.0) == ("a", [0, 1, 2, 3])
    assert buffer.take(0.0) == ("a", [4, 5, 6, 7])
    assert buffer.take(0.5) is None  # 2 left, not waited yet
    assert buffer.take(1.0) == ("a", [8, 9])


def test_leftovers_keep_their_arrival_time() -> None:
    buffer: BatchBuffer[int] = BatchBuffer(2, 5.0)
    buffer.add("a", 1, now=0.0)
    buffer.add("a", 2, now=1.0)
    buffer.add("a", 3, now=2.0)
    assert buffer.take(3.0) == ("a", [1, 2])
    # Item 3 arrived at 2.0: due at 7.0, not 5 s after the take.
    assert buffer.take(6.9) is None
    assert buffer.take(7.0) == ("a", [3])


def test_leftover_younger_than_another_key_goes_behind_it() -> None:
    buffer: BatchBuffer[str] = BatchBuffer(2, 1.0)
    buffer.add("a", "a1", now=0.0)
    buffer.add("b", "b1", now=1.0)
    buffer.add("a", "a2", now=2.0)
    buffer.add("a", "a3", now=3.0)
    assert buffer.take(3.0, allow_partial=False) == ("a", ["a1", "a2"])
    # a3 (3.0) is younger than b1 (1.0): b goes first once both waited.
    assert buffer.take(10.0) == ("b", ["b1"])
    assert buffer.take(10.0) == ("a", ["a3"])


def test_leftover_older_than_another_key_stays_in_front() -> None:
    buffer: BatchBuffer[str] = BatchBuffer(2, 1.0)
    buffer.add("a", "a1", now=0.0)
    buffer.add("a", "a2", now=0.5)
    buffer.add("a", "a3", now=1.0)
    buffer.add("b", "b1", now=2.0)
    assert buffer.take(2.0) == ("a", ["a1", "a2"])
    assert buffer.take(10.0) == ("a", ["a3"])
    assert buffer.take(10.0) == ("b", ["b1"])


def test_items_keep_their_order_within_a_key() -> None:
    buffer: BatchBuffer[int] = BatchBuffer(3, 0.0)
    for i in range(7):
        buffer.add("k", i, now=float(i))
    taken = []
    while (batch := buffer.take(100.0)) is not None:
        taken.extend(batch[1])
    assert taken == list(range(7))


def test_drain_returns_everything_in_bounded_batches() -> None:
    buffer: BatchBuffer[tuple[str, int]] = BatchBuffer(3, 1e9)
    items = [("a", i) for i in range(7)] + [("b", i) for i in range(2)] + [("c", 0)]
    for n, item in enumerate(items):
        buffer.add(item[0], item, now=float(n))
    batches = list(buffer.drain())
    # a's leftover (arrived 6.0) goes before b (7.0, 8.0), then c.
    assert [(key, len(batch)) for key, batch in batches] == [("a", 3), ("a", 3), ("a", 1), ("b", 2), ("c", 1)]
    assert all(key == item[0] for key, batch in batches for item in batch)
    assert sorted(item for _, batch in batches for item in batch) == sorted(items)
    assert len(buffer) == 0 and buffer.take(1e12) is None


def test_len_counts_items() -> None:
    buffer: BatchBuffer[int] = BatchBuffer(2, 0.0)
    for i in range(5):
        buffer.add(i % 2, i, now=0.0)
    assert len(buffer) == 5
    buffer.take(0.0)
    assert len(buffer) == 3


class ReferenceBuffer:
    """The documented policy, written the slow and obvious way, to check BatchBuffer against."""

    def __init__(self, max_batch: int, max_wait_s: float) -> None:
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.groups: dict[Any, deque[tuple[float, Any]]] = {}

    def add(self, key: Any, item: Any, now: float) -> None:
        self.groups.setdefault(key, deque()).append((now, item))

    def _pop(self, key: Any) -> tuple[Any, list[Any]]:
        group = self.groups[key]
        taken = [group.popleft()[1] for _ in range(min(self.max_batch, len(group)))]
        if not group:
            del self.groups[key]
        return key, taken

    def _oldest(self, keys: list[Any]) -> Any:
        return min(keys, key=lambda k: self.groups[k][0][0])

    def take(self, now: float, allow_partial: bool) -> tuple[Any, list[Any]] | None:
        ready = [k for k, g in self.groups.items() if len(g) >= self.max_batch or now - g[0][0] >= self.max_wait_s]
        if not ready:
            return None
        first = self._oldest(ready)
        return self._pop(first) if allow_partial or len(self.groups[first]) >= self.max_batch else None

    def drain(self) -> list[tuple[Any, list[Any]]]:
        out = []
        while self.groups:
            out.append(self._pop(self._oldest(list(self.groups))))
        return out


@pytest.mark.parametrize("seed", range(60))
def test_random_sequences_match_the_policy(seed: int) -> None:
    """Seeded random add/take sequences (hypothesis is not in the venv): same batches as the
    reference, every batch 1..max_batch of one key, every item handed out exactly once."""
    rng = random.Random(seed)
    max_batch = rng.randint(1, 5)
    max_wait = rng.choice([0.0, 0.5, 2.0, 5.0])
    buffer: BatchBuffer[int] = BatchBuffer(max_batch, max_wait)
    reference = ReferenceBuffer(max_batch, max_wait)
    keys = [f"k{i}" for i in range(rng.randint(1, 4))]
    key_of: dict[int, str] = {}
    now, next_item = 0.0, 0
    handed_out: list[int] = []

    def check(got: tuple[Any, list[int]] | None, want: tuple[Any, list[int]] | None) -> None:
        assert got == want
        if got is not None:
            key, batch = got
            assert 1 <= len(batch) <= max_batch
            assert all(key_of[item] == key for item in batch)
            handed_out.extend(batch)

    for _ in range(rng.randint(20, 200)):
        now += rng.choice([0.0, 0.01, 0.3, 1.0, 3.0]) + 1e-6  # strictly increasing arrivals
        if rng.random() < 0.6:
            key = rng.choice(keys)
            key_of[next_item] = key
            buffer.add(key, next_item, now)
            reference.add(key, next_item, now)
            next_item += 1
        else:
            allow = rng.random() < 0.7
            check(buffer.take(now, allow_partial=allow), reference.take(now, allow))
        assert len(buffer) == next_item - len(handed_out)
    for got, want in zip(list(buffer.drain()), reference.drain(), strict=True):
        check(got, want)
    assert len(buffer) == 0
    assert sorted(handed_out) == list(range(next_item))  # each exactly once


# -- enqueue times from hand-made messages --------------------------------------------------------


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), -float("inf"), 1e308, 10**400, -5.0, 0, True, "yesterday", None]
)
def test_implausible_enqueue_times_are_dropped(value):
    from worker.delivery.consumer import plausible_time

    assert plausible_time(value, now=1_800_000_000.0) is None


def test_plausible_enqueue_times_are_kept():
    from worker.delivery.consumer import plausible_time

    assert plausible_time(1_799_999_000, now=1_800_000_000.0) == 1_799_999_000.0
    assert plausible_time(1_800_000_100.5, now=1_800_000_000.0) == 1_800_000_100.5  # small clock skew


def test_a_missing_and_an_empty_negative_prompt_share_a_key_where_the_model_encodes_them_alike() -> None:
    sd = RecipeDefaults(model="m", scheduler="ddim", cache_interval=3, cache_branch=0, empty_negative_is_default=True)
    keys = {batch_key(make_job(negative_prompt=text), sd) for text in (None, "", "blurry")}
    assert len(keys) == 1 and next(iter(keys)).negative_prompt  # one call, negatives passed as a list
    # Unknown or SDXL (zeroed embeddings for a missing one): kept apart.
    assert batch_key(make_job(negative_prompt=None), DEFAULTS) != batch_key(make_job(negative_prompt=""), DEFAULTS)


@pytest.mark.parametrize(
    ("index", "alike"),
    [
        ({"_class_name": "StableDiffusionPipeline"}, True),
        ({"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True}, False),
        ({"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": False}, True),
        ({"_class_name": "FluxPipeline"}, False),
    ],
)
def test_which_models_encode_a_missing_negative_prompt_as_the_empty_one(index: dict, alike: bool) -> None:
    from worker.pipeline.model import empty_negative_is_default

    assert empty_negative_is_default(index) is alike
