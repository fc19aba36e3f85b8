"""The compact state layout (``producer.slots``) against a real Redis: jobs with real ids live in
8-byte slots by index, a second recipe's job at the same index and ids of another form in
``others``, and a done job costs Redis a slot. ``test_state`` runs the state machine on ids of
another form; this file runs it on real ones."""

from __future__ import annotations

import itertools
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer.job import job_id
from producer.slots import BLOCK_SLOTS, SLOT_BYTES, decode, job_id_at, place, slots_of_block
from producer.state import MARK_BATCH, STATES, JobState, _placed
from tests.producer.test_state import consistent_counts, sent

RUN = "run-s"
QUEUED, RUNNING, DONE, FAILED, CANCELLED = tuple(JobState)
IMAGES = "s3://bucket/prefix/run-s/images"


def jid(index: int, recipe: str = "a") -> str:
    return job_id(RUN, index, {"recipe": recipe})


# -- pure -------------------------------------------------------------------------------------------


def test_a_real_id_has_a_place_by_its_index_and_other_forms_have_none():
    assert place("00000003-0123456789ab") == (3, bytes.fromhex("0123456789ab"))
    assert (place("00000003-0123456789ab").block, place("00000003-0123456789ab").offset) == (0, 3 * SLOT_BYTES)
    assert place(f"{BLOCK_SLOTS + 1:08d}-0123456789ab").block == 1
    assert place("999999999-0123456789ab").block == 999_999_999 // BLOCK_SLOTS
    others = ("j", "00000003-0123456789AB", "000000003-0123456789ab", "0000003-0123456789ab", "00000003-abc")
    for other in (*others, "\u0660" * 7 + "3-0123456789ab"):  # digits, but not ASCII: not job_id's form
        assert place(other) is None, other
    assert job_id_at(1, 2, bytes.fromhex("0123456789ab")) == f"{BLOCK_SLOTS + 2:08d}-0123456789ab"


def test_a_block_reads_back_as_its_filled_slots():
    tag = bytes.fromhex("00ff00ff00ff")
    data = bytearray(SLOT_BYTES * 4)
    data[0:8] = b"dp" + tag
    data[16:24] = b"\0-" + tag  # taken once, then given back (an unclaimed job): no job
    data[24:32] = b"f-" + tag
    slots = list(slots_of_block(2, bytes(data)))
    assert [(slot.job_id, slot.state, slot.extension) for slot in slots] == [
        (f"{2 * BLOCK_SLOTS:08d}-00ff00ff00ff", "done", "png"),
        (f"{2 * BLOCK_SLOTS + 3:08d}-00ff00ff00ff", "failed", None),
    ]
    assert decode("x", b"d?").whole_key and decode("x", b"") is None


# -- the state machine on real ids ------------------------------------------------------------------


def test_jobs_move_through_their_states_and_results_come_by_index(store):
    ids = [jid(index) for index in range(6)]
    store.mark_queued(RUN, sent(reversed(ids)))
    store.mark(RUN, ids[0], RUNNING, worker="gpu0")
    store.mark(RUN, ids[1], RUNNING, worker="gpu0")
    assert store.mark(RUN, ids[1], DONE, key=f"{IMAGES}/{ids[1]}.png")
    assert store.mark(RUN, ids[2], FAILED, reason="boom")
    assert store.mark(RUN, ids[3], DONE, key=f"{IMAGES}/{ids[3]}.jpg")
    assert not store.mark(RUN, ids[3], FAILED, reason="late")  # done is final
    results = list(store.results(RUN))
    assert [result.job_id for result in results] == ids
    assert [result.state for result in results] == [RUNNING, DONE, FAILED, DONE, QUEUED, QUEUED]
    assert results[0].details == {"worker": "gpu0"} and results[1].details == {}
    assert (results[1].key, results[3].key) == (f"{IMAGES}/{ids[1]}.png", f"{IMAGES}/{ids[3]}.jpg")
    assert results[2].reason == "boom" and results[2].key is None
    assert store.get(RUN, ids[3]) == results[3] and store.get(RUN, jid(7)) is None
    assert consistent_counts(store, RUN) == {QUEUED: 2, RUNNING: 1, DONE: 2, FAILED: 1, CANCELLED: 0}


def test_a_key_outside_the_runs_image_folder_is_kept_whole(store, backend):
    ids = [jid(0), jid(1), jid(2)]
    store.mark_queued(RUN, sent(ids))
    store.mark(RUN, ids[0], DONE, key=f"{IMAGES}/{ids[0]}.webp")
    store.mark(RUN, ids[1], DONE, key=f"file:///elsewhere/{ids[1]}.webp")
    store.mark(RUN, ids[2], DONE, key=f"{IMAGES}/renamed.png")
    keys = [result.key for result in store.results(RUN)]
    assert keys == [f"{IMAGES}/{ids[0]}.webp", f"file:///elsewhere/{ids[1]}.webp", f"{IMAGES}/renamed.png"]
    assert backend.hlen(f"deepqueue:{{{RUN}}}:keys") == 2


def test_a_second_recipes_job_at_the_same_index_is_kept_apart(store):
    first, second = jid(5, "a"), jid(5, "b")
    assert first.split("-")[0] == second.split("-")[0] and first != second
    store.mark_queued(RUN, sent([first, second]))
    store.mark(RUN, second, DONE, key=f"{IMAGES}/{second}.png")
    assert store.states(RUN, [first, second]) == [QUEUED, DONE]
    assert {result.job_id: result.state for result in store.results(RUN)} == {first: QUEUED, second: DONE}
    assert store.get(RUN, second).key == f"{IMAGES}/{second}.png"
    assert consistent_counts(store, RUN)[DONE] == 1


def test_an_unclaimed_job_gives_its_slot_back_but_keeps_it_from_another_recipe(store):
    """A slot keeps its tag once taken: a job of another recipe at that index that went to
    ``others`` is still found there after the first one's claim is taken back."""
    first, second = jid(9, "a"), jid(9, "b")
    claimed = store.claim_queued(RUN, sent([first]))
    store.claim_queued(RUN, sent([second]))
    store.unclaim(RUN, claimed)
    assert store.states(RUN, [first, second]) == [None, QUEUED]
    assert [result.job_id for result in store.results(RUN)] == [second]
    assert store.claim_queued(RUN, sent([first])) == {first: ""}  # it takes its slot again
    assert consistent_counts(store, RUN)[QUEUED] == 2


def test_jobs_in_many_blocks_and_a_sparse_index(store, backend):
    ids = [jid(index) for index in (0, BLOCK_SLOTS - 1, BLOCK_SLOTS, 3 * BLOCK_SLOTS + 7, 999_999_999)]
    store.mark_queued(RUN, sent(ids))
    assert [result.job_id for result in store.results(RUN)] == ids
    assert sorted(int(block) for block in backend.smembers(f"deepqueue:{{{RUN}}}:blocks")) == [
        0,
        1,
        3,
        999_999_999 // BLOCK_SLOTS,
    ]
    assert store.cancel(RUN) == 5
    assert list(store.job_ids(RUN, CANCELLED)) == ids
    store.delete(RUN)
    assert [key.decode() for key in backend.keys(f"deepqueue:{{{RUN}}}:*")] == [f"deepqueue:{{{RUN}}}:meta"]


def test_cancel_ends_the_queued_jobs_of_every_block_and_of_others(store):
    ids = [jid(index) for index in range(0, 2 * BLOCK_SLOTS + 10, 997)]
    store.mark_queued(RUN, sent([*ids, "by-hand"]))
    store.mark(RUN, ids[0], RUNNING)
    store.mark(RUN, ids[1], FAILED, reason="bad")
    assert store.cancel(RUN) == len(ids) - 2 + 1
    counts = consistent_counts(store, RUN)
    assert counts == {QUEUED: 0, RUNNING: 1, DONE: 0, FAILED: 1, CANCELLED: len(ids) - 1}
    assert store.get(RUN, ids[5]).reason == "run cancelled"
    assert store.resume(RUN)
    assert Counter(store.job_ids(RUN, CANCELLED)) == Counter([*ids[2:], "by-hand"])


def test_a_claim_returns_what_each_job_was_and_unclaim_restores_it(store):
    new, failed, queued = jid(0), jid(1), jid(2)
    store.mark_queued(RUN, sent([failed, queued]))
    store.mark(RUN, failed, FAILED, reason="oom at batch 8")
    claimed = store.claim_queued(RUN, sent([new, failed, queued]), resend_queued=True)
    assert claimed == {new: "", failed: "foom at batch 8", queued: "q"}
    store.unclaim(RUN, claimed)
    assert store.states(RUN, [new, failed, queued]) == [None, FAILED, QUEUED]
    assert store.get(RUN, failed).reason == "oom at batch 8"
    assert consistent_counts(store, RUN) == {QUEUED: 1, RUNNING: 0, DONE: 0, FAILED: 1, CANCELLED: 0}


# -- what it costs ----------------------------------------------------------------------------------


def test_a_done_job_costs_redis_at_most_16_bytes(store, backend):
    """Redis' own count (``MEMORY USAGE`` of every key the run has: other tests share the
    server) over 5 blocks of done jobs, each queued, run and done through the script a worker
    calls."""
    ids = [jid(index) for index in range(5 * BLOCK_SLOTS)]
    for start in range(0, len(ids), 2000):
        chunk = ids[start : start + 2000]
        store.mark_queued(RUN, sent(chunk))
        assert store.mark_many(RUN, RUNNING, dict.fromkeys(chunk, "gpu0")) == len(chunk)
        assert store.mark_many(RUN, DONE, {job: f"{IMAGES}/{job}.png" for job in chunk}) == len(chunk)
    per_job = sum(backend.memory_usage(key, samples=0) for key in backend.keys(f"deepqueue:{{{RUN}}}:*")) / len(ids)
    assert store.counts(RUN)[DONE] == len(ids)
    assert per_job <= 16, per_job
    assert set(STATES) == set(store.counts(RUN))


def test_a_job_named_twice_in_one_call_is_moved_once(store):
    """A call reads each block once: a slot it wrote is read back as written, not as found."""
    ids = [jid(index) for index in range(8)]
    store.mark_queued(RUN, sent(ids))
    assert store.mark_many(RUN, RUNNING, dict.fromkeys(ids, "gpu0")) == 8
    store.cancel(RUN)
    assert store.drop_if_stopped(RUN, [ids[0], ids[0], *ids])
    assert consistent_counts(store, RUN) == {QUEUED: 0, RUNNING: 0, DONE: 0, FAILED: 0, CANCELLED: 8}


# -- claims: a chunk's jobs go as runs of consecutive slots -----------------------------------------

UNIVERSE = [
    *(jid(index, recipe) for index in (0, 1, 2, BLOCK_SLOTS - 1, BLOCK_SLOTS, 10**8 - 1, 10**8) for recipe in "ab"),
    "by-hand",
    "000000003-0123456789ab",  # 9 digits from a 0: another form
]
_runs = itertools.count()


def claim_one_by_one(store, run_id: str, job_ids: list[str], *, resend_queued: bool) -> dict[str, str]:
    """``claim_queued`` as it was: every job as its own 4 arguments (no runs), in one call."""
    args = [0, *(arg for job_id in job_ids for arg in (*_placed(job_id), ""))]
    raw = store._call(run_id, "claim+queued" if resend_queued else "claim", args)
    if not raw:
        return {}
    flags, *before = raw
    claimed = {job_id: "" for job_id, flag in zip(job_ids, flags.decode(), strict=True) if flag == "1"}
    claimed.update(zip((v.decode() for v in before[0::2]), (v.decode() for v in before[1::2]), strict=True))
    return claimed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    history=st.lists(st.tuples(st.sampled_from(UNIVERSE), st.sampled_from(STATES)), max_size=12),
    cancelled=st.booleans(),
    chunk=st.lists(st.sampled_from(UNIVERSE), min_size=1, max_size=20),
    resend_queued=st.booleans(),
)
def test_a_claim_in_runs_does_what_a_claim_job_by_job_does(store, history, cancelled, chunk, resend_queued):
    """Any mix of new, queued, running, done, failed and cancelled jobs, of other recipes at one
    index, of ids of another form and ids named twice, in a cancelled run or not: the same claims,
    the same state after."""
    runs = [f"twin-{next(_runs)}" for _ in range(2)]
    for run_id in runs:
        for job, state in history:
            store.mark(run_id, job, state, reason="boom" if state is FAILED else None)
        if cancelled:
            store.cancel(run_id)
    in_runs = store.claim_queued(runs[0], chunk, resend_queued=resend_queued)
    assert in_runs == claim_one_by_one(store, runs[1], chunk, resend_queued=resend_queued)
    found = [sorted((r.job_id, r.state, r.reason or "") for r in store.results(run_id)) for run_id in runs]
    assert found[0] == found[1]  # (sorted: those in others come in the order they were written)
    assert consistent_counts(store, runs[0]) == consistent_counts(store, runs[1])


def test_a_claim_of_new_jobs_across_blocks_and_digits_takes_each(store, backend):
    ids = [jid(index) for index in [*range(BLOCK_SLOTS - 3, BLOCK_SLOTS + 3), *range(10**8 - 2, 10**8 + 2)]]
    assert store.claim_queued(RUN, sent(ids)) == dict.fromkeys(ids, "")
    assert [(result.job_id, result.state) for result in store.results(RUN)] == [(job, QUEUED) for job in ids]
    blocks = {0, 1, (10**8 - 2) // BLOCK_SLOTS, (10**8 + 1) // BLOCK_SLOTS}
    assert {int(block) for block in backend.smembers(f"deepqueue:{{{RUN}}}:blocks")} == blocks
    assert store.claim_queued(RUN, sent(ids)) == {}  # a second producer: nothing
    assert RUN in store.runs()


def test_a_claim_keeps_other_recipes_and_other_forms_aside_and_a_job_named_twice_once(store, backend):
    first = jid(5, "a")
    store.claim_queued(RUN, sent([first]))
    chunk = [jid(4, "b"), jid(5, "b"), jid(6, "b"), "by-hand", "000000003-0123456789ab", jid(4, "b")]
    assert store.claim_queued(RUN, sent(chunk)) == dict.fromkeys(chunk, "")
    others = {key.decode() for key in backend.hkeys(f"deepqueue:{{{RUN}}}:others")}
    assert others == {jid(5, "b"), "by-hand", "000000003-0123456789ab"}
    assert store.states(RUN, [first, *chunk]) == [QUEUED] * 7
    assert consistent_counts(store, RUN)[QUEUED] == 6


def test_a_claim_in_a_cancelled_run_cancels_its_new_jobs_and_in_a_deleted_one_writes_nothing(store, backend):
    ids = [jid(index) for index in range(6)]
    store.mark_queued(RUN, sent(ids[:1]))
    store.cancel(RUN)
    assert store.claim_queued(RUN, sent(ids)) == {}
    assert store.states(RUN, ids) == [CANCELLED] * 6
    store.delete(RUN)
    assert store.claim_queued(RUN, sent(ids)) == {}
    assert [key.decode() for key in backend.keys(f"deepqueue:{{{RUN}}}:*")] == [f"deepqueue:{{{RUN}}}:meta"]


def test_a_resend_of_a_whole_call_of_failed_jobs_returns_each_with_its_reason(store):
    """Jobs that each need work (their reasons read back), in calls of ``MARK_BATCH``."""
    ids = [jid(index) for index in range(2 * MARK_BATCH)]
    store.mark_queued(RUN, sent(ids))
    store.mark_many(RUN, FAILED, dict.fromkeys(ids, "oom"))
    assert store.claim_queued(RUN, sent(ids), resend_queued=True) == dict.fromkeys(ids, "foom")
    assert consistent_counts(store, RUN)[QUEUED] == len(ids)
