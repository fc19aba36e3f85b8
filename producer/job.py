"""The job contract: what one message on the queue holds, validated on both sides.

A job is one image. Its id is derived from the run id, its position in the run and its recipe,
so submitting the same run twice names the same jobs (and the same S3 keys) instead of twins.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from functools import cached_property
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from producer.errors import InvalidJobError
from producer.loras import LoraSpec, adapter_set, check_loras, lora_entries

MAX_PROMPT_CHARS = 2000
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MAX_SEED = 2**32 - 1
MAX_CACHE_INTERVAL = 20
MAX_CACHE_BRANCH = 11
MAX_INDEX = 10**9 - 1  # job ids and S3 keys stay short (S3 allows 1,024 bytes per key)
MAX_VARIABLES, MAX_VARIABLE_NAME = 64, 200

SchedulerName = Literal["ddim", "euler", "euler_a", "dpmpp_2m", "unipc", "lcm", "pndm", "heun", "kdpm2"]
#: Schedulers that visit a timestep twice: DeepCache counts steps by timestep and breaks on them.
CACHE_BREAKING_SCHEDULERS = frozenset({"pndm", "heun", "kdpm2"})
#: The others, which DeepCache can speed up.
CACHE_SAFE_SCHEDULERS = tuple(name for name in get_args(SchedulerName) if name not in CACHE_BREAKING_SCHEDULERS)
ImageFormat = Literal["png", "webp", "jpeg"]
RunId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Side = Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8)]
#: A model as the workers that serve it name it (``DEEPQUEUE_MODEL_ALIAS``): also a queue-name
#: suffix and a Kubernetes name part, hence lowercase.
ModelAlias = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")]
_RUN_ID = TypeAdapter(RunId)
#: Quality scores a worker can compute on a job's decoded image (``worker.pipeline.scores``).
ScoreName = Literal["phash", "clip", "nsfw"]
SCORE_NAMES: tuple[str, ...] = get_args(ScoreName)


def no_booleans(value: Any) -> Any:
    """Pydantic reads true as 1; for a number of steps, pixels or a seed that is a mistake, not a value."""
    if isinstance(value, bool):
        raise ValueError("a number is needed, not true/false")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("prompt must not be blank")
    return value


#: The fields each job of a run has of its own (``producer.entries`` validates rows of only
#: these on their own, without the run-wide fields they share), with their rules, here once.
Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_not_blank)]
Seed = Annotated[int, BeforeValidator(no_booleans), Field(ge=0, le=MAX_SEED)]
Template = Annotated[str | None, Field(max_length=MAX_PROMPT_CHARS)]


class JobDefaults(BaseModel):
    """Recipe fields a whole run can set once and a row of a prompt file can override.

    ``None`` for ``scheduler``, ``cache_interval`` and ``cache_branch`` means "the worker's
    default"; the worker records what it used in the sidecar. ``cache_interval=1`` turns
    DeepCache off for that job.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    height: Side = 512
    width: Side = 512
    steps: int = Field(25, ge=1, le=MAX_STEPS)
    guidance: float = Field(7.5, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)
    scheduler: SchedulerName | None = None
    cache_interval: int | None = Field(None, ge=1, le=MAX_CACHE_INTERVAL)
    cache_branch: int | None = Field(None, ge=0, le=MAX_CACHE_BRANCH)
    format: ImageFormat = "png"
    #: The model alias whose workers run the job (its queue: ``producer.layout.model_queue``);
    #: None: the workers of the plain queue, whatever model they serve.
    model: ModelAlias | None = None
    #: LoRA adapters applied on the model, in order (``producer.loras``); None: the base model.
    loras: tuple[LoraSpec, ...] | None = None
    #: Quality scores to compute on the image (any of ``SCORE_NAMES``), on top of the worker's
    #: own ``DEEPQUEUE_SCORES``; they do not decide the pixels, so they stay out of recipes,
    #: job ids and batch keys. A comma-separated string (``"clip,phash"``) is read as a list.
    scores: list[ScoreName] | None = None

    def _unnamed_model(self) -> set[str]:
        """Left out of recipes and job ids when None: runs that name no model (or no LoRA) keep
        the ids and recorded recipes they had before models (and LoRAs) could be named."""
        return ({"model"} if not self.model else set()) | ({"loras"} if self.loras is None else set())

    @field_validator("loras", mode="before")
    @classmethod
    def _lora_entries(cls, value: Any) -> Any:
        return lora_entries(value)

    @field_validator("loras")
    @classmethod
    def _lora_rules(cls, value: tuple[LoraSpec, ...] | None) -> tuple[LoraSpec, ...] | None:
        return check_loras(value)

    @field_validator("height", "width", "steps", "guidance", "cache_interval", "cache_branch", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        return no_booleans(value)

    @field_validator("scores", mode="before")
    @classmethod
    def _scores_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("scores")
    @classmethod
    def _scores_canonical(cls, value: list[str] | None) -> list[str] | None:
        # One order and no repeats, so equal requests compare (and pack into messages) equal.
        if value is None:
            return None
        return [name for name in SCORE_NAMES if name in value] or None

    @model_validator(mode="before")
    @classmethod
    def _cache_off_for_repeating_schedulers(cls, data: Any) -> Any:
        """pndm, heun and kdpm2 without a DeepCache setting run with caching off (interval 1)
        instead of failing in a worker whose default interval is above 1."""
        if isinstance(data, dict) and data.get("scheduler") in CACHE_BREAKING_SCHEDULERS:
            if data.get("cache_interval") is None:
                return {**data, "cache_interval": 1}
        return data

    @model_validator(mode="after")
    def _scheduler_fits_cache(self) -> JobDefaults:
        problem = cache_problem(self.scheduler, self.cache_interval)
        if problem:
            raise ValueError(problem)
        return self


def cache_problem(scheduler: str | None, cache_interval: int | None, *, setting: str = "cache_interval") -> str | None:
    """Why ``scheduler`` cannot run with DeepCache every ``cache_interval`` steps, or None.

    The one rule, checked on a job, on a worker's defaults and on a batch; ``setting`` names what
    the user sets to fix it (``DEEPQUEUE_CACHE_INTERVAL`` for a worker)."""
    if scheduler in CACHE_BREAKING_SCHEDULERS and cache_interval is not None and cache_interval > 1:
        return (
            f"scheduler {scheduler!r} repeats timesteps, which breaks DeepCache's step counting "
            f"(interval {cache_interval}): use {setting}=1 with it, or one of {', '.join(CACHE_SAFE_SCHEDULERS)}"
        )
    return None


#: A template's chosen values, by part name (``producer.templates``).
Variables = Annotated[
    dict[Annotated[str, Field(max_length=MAX_VARIABLE_NAME)], Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]]
    | None,
    Field(max_length=MAX_VARIABLES),
]


class Job(JobDefaults):
    """One image to generate: the message body of the ``deepqueue.generate`` task."""

    run_id: RunId
    index: Annotated[int, BeforeValidator(no_booleans), Field(ge=0, le=MAX_INDEX)]
    prompt: Prompt
    seed: Seed
    #: The template the prompt was expanded from and the value chosen for each of its parts:
    #: where the prompt came from, recorded with the image; not part of the recipe.
    template: Template = None
    variables: Variables = None

    def recipe(self) -> dict[str, Any]:
        """Everything that decides the pixels (all fields but the run id, position and origin;
        the model only when named)."""
        return self.model_dump(exclude={"run_id", "index", *ORIGIN, *NOT_PIXELS, *self._unnamed_model()})

    @cached_property
    def job_id(self) -> str:
        return job_id(self.run_id, self.index, self.recipe())


def is_run_id(value: object) -> bool:
    try:
        _RUN_ID.validate_python(value)
    except ValidationError:
        return False
    return True


def canonical_json(value: Any) -> str:
    """``value`` as job ids hash it and runs record recipes: sorted keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def job_id(run_id: str, index: int, recipe: Mapping[str, Any]) -> str:
    """``{index:08d}-{12 hex}``: sorts by position; the hash tells recipes apart."""
    return hashed_id(index, canonical_json([run_id, index, recipe]))


def hashed_id(index: int, canonical: str) -> str:
    """The job id of ``canonical``, the JSON of ``[run_id, index, recipe]`` (``job_id``)."""
    return f"{index:08d}-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


def run_seed_for(run_id: str) -> int:
    """The run seed used when the user gives none: stable for a run name."""
    return int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:4], "big")


def derive_seed(run_seed: int, index: int) -> int:
    """A per-image seed from the run seed and the job's position (independent streams)."""
    digest = hashlib.sha256(b"%d:%d" % (run_seed, index)).digest()
    return int.from_bytes(digest[:4], "big")


def run_recipe(defaults: JobDefaults, *, run_id: str, run_seed: int | None) -> dict[str, Any]:
    """What one submit sets for a whole run, in canonical form: every run-wide field (given or
    left to its default) and the run seed it derives job seeds from.

    Two submits with equal recipes name the same jobs for the same rows; the run records the
    first one so that a later submit with other settings is refused instead of adding a second
    set of jobs (see ``Client.submit``).
    """
    seed = run_seed_for(run_id) if run_seed is None else run_seed
    fields = defaults.model_dump(mode="json", exclude={*NOT_PIXELS, *defaults._unnamed_model()})
    return {**fields, "seed": seed}


def recipe_differences(recorded: Mapping[str, Any], recipe: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(field, recorded value, new value)`` for each field where two run recipes differ."""
    fields = sorted(set(recorded) | set(recipe))
    return [
        (field, recorded.get(field), recipe.get(field)) for field in fields if recorded.get(field) != recipe.get(field)
    ]


def format_errors(error: ValidationError) -> list[str]:
    """Pydantic errors as ``field: rule, got value`` lines."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "job"
        message = item["msg"].removeprefix("Value error, ")
        if item["loc"] and item["type"] != "missing":
            shown = repr(item["input"])
            message += f", got {shown if len(shown) <= 80 else shown[:77] + '...'}"
        lines.append(f"{field}: {message}")
    return lines


def run_defaults(fields: Mapping[str, Any]) -> JobDefaults:
    """Run-wide defaults, or InvalidJobError naming the bad fields."""
    try:
        return JobDefaults(**fields)
    except ValidationError as error:
        raise InvalidJobError([("run defaults", line) for line in format_errors(error)]) from error


def check_run(run_id: str, run_seed: int | None) -> int:
    """The run seed job seeds derive from, or InvalidJobError for a bad run name or seed."""
    if not is_run_id(run_id):
        raise InvalidJobError(
            [("run", f"run_id: 1-64 letters, digits, '.', '_' or '-', not starting with a symbol, got {run_id!r}")]
        )
    if run_seed is not None and (type(run_seed) is not int or not 0 <= run_seed <= MAX_SEED):
        raise InvalidJobError([("run", f"seed: a whole number from 0 to {MAX_SEED}, got {run_seed!r}")])
    return run_seed_for(run_id) if run_seed is None else run_seed


#: Job fields the run decides (its name, each row's position): a row may not set them.
RUN_OWNED = frozenset({"run_id", "index"})
#: Job fields that say where a prompt came from, not how its pixels are made.
ORIGIN = frozenset({"template", "variables"})
#: Job fields that ask for work on the image but do not change it: out of recipes and job ids.
NOT_PIXELS = frozenset({"scores"})


def shape(job: Job) -> tuple[Any, ...]:
    """What a worker batches on, as far as the job says (the worker fills in its defaults):
    jobs of one shape are sent next to each other, so that a worker's buffer sees full batches.
    With and without a negative prompt stay together: SD 1.x/2.x batch them as one, and a
    worker that keeps them apart (SDXL) finds both halves side by side."""
    return (
        job.height,
        job.width,
        job.steps,
        job.guidance,
        job.scheduler,
        job.cache_interval,
        job.cache_branch,
        job.format,
        adapter_set(job.loras),
    )
