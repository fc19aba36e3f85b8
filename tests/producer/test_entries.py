"""Jobs as entries (``producer.entries``): a row of per-job fields only is checked on its own, and
its job id built from a cut recipe; either way the job, its id and its problems are those of
``Job`` itself."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from producer.entries import Entry, JobIds, entries, entries_of
from producer.job import MAX_PROMPT_CHARS, Job, JobDefaults, derive_seed, format_errors, job_id, run_seed_for
from tests.producer.test_producer_properties import PROPERTIES, jobs, recipes, run_ids

#: Values a row's own fields may hold, good and bad: the checks must agree on all of them.
any_value = st.one_of(
    st.text(max_size=40),
    st.just(" \t"),
    st.just("x" * (MAX_PROMPT_CHARS + 1)),
    st.integers(-5, 2**33),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True),
    st.just("7"),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5) | st.integers(), max_size=3),
    st.lists(st.integers(), max_size=2),
)
own_rows = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.text(min_size=1, max_size=60) | any_value,
        "seed": st.integers(0, 2**32 - 1) | any_value,
        "template": st.text(max_size=20) | any_value,
        "variables": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3) | any_value,
    },
)


@PROPERTIES
@given(jobs())
def test_an_id_from_the_cut_recipe_is_the_job_id(job):
    recipe = job.recipe()
    ids = JobIds(job.run_id, {name: value for name, value in recipe.items() if name not in ("prompt", "seed")})
    assert ids(job.index, job.prompt, job.seed) == job_id(job.run_id, job.index, recipe) == job.job_id


@PROPERTIES
@given(st.lists(jobs(), min_size=1, max_size=6))
def test_jobs_made_entries_are_the_same_jobs(batch):
    made = entries_of(batch)
    assert [entry.job() for entry in made] == batch
    assert [entry.job_id for entry in made] == [job.job_id for job in batch]


@PROPERTIES
@given(own_rows, recipes(), run_ids, st.none() | st.integers(0, 2**32 - 1))
def test_a_row_of_own_fields_is_checked_as_job_checks_it(row, recipe, run_id, run_seed):
    """The second row takes the quick way (the first, whole, made the kind it joins): it gives
    the job ``Job.model_validate`` makes of the same fields, or the very same problems."""
    run_wide = {name: value for name, value in recipe.items() if name not in ("prompt", "seed")}
    defaults = JobDefaults(**run_wide)
    first, second = entries(
        [("line 1", {"prompt": "warm"}), ("line 2", row)], run_id=run_id, defaults=defaults, run_seed=run_seed
    )
    assert isinstance(first, Entry)
    base_seed = derive_seed(run_seed if run_seed is not None else run_seed_for(run_id), 1)
    fields: dict[str, Any] = {**run_wide, "seed": base_seed, **row, "run_id": run_id, "index": 1}
    try:
        job = Job.model_validate(fields)
    except ValidationError as error:
        assert second == [("job 1 (line 2)", line) for line in format_errors(error)]
    else:
        assert isinstance(second, Entry) and second.kind is first.kind
        assert second.job() == job and second.job_id == job.job_id


def test_a_kind_per_recipe_and_one_for_all_plain_rows():
    rows = [("1", {"prompt": "a"}), ("2", {"prompt": "b", "steps": 5}), ("3", {"prompt": "c", "seed": 3})]
    first, other, third = entries(rows, run_id="r", defaults=JobDefaults())
    assert first.kind is third.kind is not other.kind
    assert other.kind.shared["steps"] == 5 and third.own == {"index": 2, "prompt": "c", "seed": 3}
