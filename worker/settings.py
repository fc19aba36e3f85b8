"""Every worker setting in one place, read from ``DEEPQUEUE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from producer.job import MAX_CACHE_BRANCH, MAX_CACHE_INTERVAL, ModelAlias, SchedulerName, cache_problem
from producer.layout import model_queue
from producer.settings import ClientSettings
from worker.delivery.batching import RecipeDefaults
from worker.pipeline import model as model_files
from worker.pipeline.scores import parse_scores


class WorkerSettings(ClientSettings):
    """Connection settings plus the model, batching and storage of one worker."""

    model: str = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="diffusers model id on the Hub or a local folder (SD 1.x/2.x or SDXL)",
    )
    model_revision: str | None = Field(None, description="Hub revision (branch, tag or commit)")
    model_alias: ModelAlias | None = Field(
        None,
        description="The name runs use for this model (submit --model ALIAS): the worker serves the queue "
        "{DEEPQUEUE_QUEUE}.{alias} and records the alias in every sidecar; unset: the plain queue",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="auto: float16 on CUDA, float32 on CPU"
    )
    max_batch: int = Field(8, ge=1, le=64, description="Images per pipeline call at most")
    max_wait_s: float = Field(2.0, ge=0, description="Longest a partial batch waits for peers of the same shape")
    mixed_shapes: int = Field(
        10,
        ge=1,
        le=1000,
        description="Batch keys (sizes, step counts, ...) a queue may mix at random: the default prefetch "
        "reserves enough jobs to fill batches from that many",
    )
    prefetch: int | None = Field(
        None,
        ge=1,
        description="Jobs reserved from Redis at once, a message counting the jobs of its prompt batch (default: "
        "mixed_shapes x (max_batch - 1) + 1 to batch from, plus 2 batches in flight and the store backlog)",
    )
    batch_timeout_s: float = Field(
        1800.0, gt=0, description="A batch running longer is killed; its jobs are retried one by one"
    )
    load_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Time a worker may take from start to ready (storage and Redis checks, model load); "
        "one still not ready exits with code 70, saying what it was waiting for",
    )
    startup_timeout_s: float = Field(
        10.0, gt=0, description="Connect and read timeout of each call to S3 and Redis while the worker starts"
    )
    startup_retry_s: float = Field(
        60.0,
        ge=0,
        description="How long start-up retries S3 and Redis calls that fail for a reason that passes (refused, "
        "timed out, 5xx) before the worker exits with code 70; below load_timeout_s",
    )
    acceleration: Literal["auto", "off", "fuse", "compile", "graphs"] = Field(
        "auto",
        description="off: diffusers + DeepCache as documented; fuse: channels-last, fused QKV; compile: fuse + "
        "compiled UNet steps and VAE decoder; graphs: compile + CUDA graphs (CUDA only, else compile); "
        "auto: graphs on CUDA, off on CPU",
    )
    warm_shapes: str = Field(
        "",
        description="WxH:N,... compiled (and captured) before the worker says ready, e.g. 512x512:8; other shapes "
        "compile on first use",
    )
    compile_cache: Path = Field(
        Path("~/.cache/deepqueue/compile"),
        description="Folder of compiled kernels, one subfolder per model, torch version and device: mount it to "
        "keep them across restarts",
    )
    graph_shapes: int = Field(8, ge=1, le=64, description="Input shapes whose CUDA graphs stay captured at once")
    vae_slicing: Literal["auto", "on", "off"] = Field(
        "auto", description="Decode a batch one image at a time: auto = only when the batch might not fit in memory"
    )
    store_threads: int = Field(4, ge=1, le=64, description="Threads that encode and upload finished images")
    store_backlog: int | None = Field(
        None, ge=1, description="Images generated but not yet stored, at most (default 2 x max batch)"
    )
    lease_renew_s: float = Field(5.0, gt=0, description="How often a worker renews the leases on the jobs it holds")
    lease_expiry_s: float = Field(
        20.0, gt=0, description="A job whose lease is this old (its worker gone) goes back to the queue"
    )
    store_retry_s: float = Field(
        600.0,
        ge=0,
        description="How long a job's uploads are retried through a storage outage (from its first failure) "
        "before it fails; keep it below batch_timeout_s, since a batch waits for room meanwhile",
    )
    scheduler: SchedulerName = Field("ddim", description="Scheduler for jobs that name none")
    cache_interval: int = Field(3, ge=1, le=MAX_CACHE_INTERVAL, description="DeepCache interval; 1 turns caching off")
    cache_branch: int = Field(0, ge=0, le=MAX_CACHE_BRANCH, description="DeepCache branch id")
    webp_quality: int = Field(90, ge=1, le=100, description="Quality of webp images")
    jpeg_quality: int = Field(95, ge=1, le=100, description="Quality of jpeg images")
    manifest_part_rows: int = Field(
        1000, ge=1, description="Rows of a run a worker buffers before it writes them as one manifest part"
    )
    manifest_part_age_s: float = Field(
        30.0, gt=0, description="Longest a stored image's manifest row waits before its part is written"
    )
    metrics_port: int = Field(
        9808, ge=0, le=65535, description="Port of the worker's /metrics, /livez and /readyz; 0 turns the server off"
    )
    metrics_host: str = Field("0.0.0.0", description="Address the metrics and health server listens on")
    log_format: Literal["text", "json"] = Field(
        "text", description="Worker log lines: text with run_id=/job_id=/batch_id= fields, or one JSON object each"
    )
    scores: str = Field(
        "",
        description="Quality scores computed for every image, comma-separated: phash, clip, nsfw (a run can ask "
        "for more with submit --scores); sidecar scores and manifest columns phash, clip_score, nsfw",
    )
    clip_model: str = Field(
        "openai/clip-vit-large-patch14",
        description="CLIP model (Hub id or folder) of the clip score: 100 x max(cosine(image, prompt), 0)",
    )
    safety_checker: str = Field(
        "CompVis/stable-diffusion-safety-checker",
        description="StableDiffusionSafetyChecker (Hub id or folder, with its preprocessor) of the nsfw flag",
    )
    nsfw_blackout: bool = Field(False, description="Store images the nsfw score flags as black images (else flag only)")

    @field_validator("scores")
    @classmethod
    def _scores_parse(cls, value: str) -> str:
        parse_scores(value)
        return value

    @property
    def score_set(self) -> frozenset[str]:
        """The scores this worker computes for every image (``DEEPQUEUE_SCORES``)."""
        return parse_scores(self.scores)

    @field_validator("warm_shapes")
    @classmethod
    def _warm_shapes_parse(cls, value: str) -> str:
        parse_warm_shapes(value)
        return value

    @property
    def serving_queue(self) -> str:
        """The queue this worker consumes: its model alias's, or the plain one."""
        return model_queue(self.queue, self.model_alias)

    @property
    def warm_shape_list(self) -> list[tuple[int, int, int]]:
        return parse_warm_shapes(self.warm_shapes)

    def recipe_defaults(self) -> RecipeDefaults:
        """What this worker uses for the recipe fields a job leaves open (reads the model's
        ``model_index.json``, which the worker already checked at start-up)."""
        try:
            empty_negative_is_default = model_files.empty_negative_is_default(
                model_files.read_model_index(self.model, self.model_revision)
            )
        except model_files.ModelError:  # unknown: keep jobs with and without a negative prompt apart
            empty_negative_is_default = False
        return RecipeDefaults(
            model=self.model,
            scheduler=self.scheduler,
            cache_interval=self.cache_interval,
            cache_branch=self.cache_branch,
            empty_negative_is_default=empty_negative_is_default,
        )

    @property
    def prefetch_count(self) -> int:
        return self.prefetch or self.buffer_for_full_batches + self.busy_jobs

    @property
    def buffer_for_full_batches(self) -> int:
        """Jobs among which some key always has a full batch, however ``mixed_shapes`` keys are
        mixed (pigeonhole: one fewer than a batch for every key, plus one)."""
        return self.mixed_shapes * (self.max_batch - 1) + 1

    @property
    def busy_jobs(self) -> int:
        """Reserved jobs that are not in the buffer while the device is busy: a batch running,
        one handed over ahead of it, and the images still being stored."""
        return 2 * self.max_batch + self.store_backlog_count

    @property
    def store_backlog_count(self) -> int:
        return self.store_backlog or 2 * self.max_batch

    @model_validator(mode="after")
    def _warm_shapes_fit_batches(self) -> WorkerSettings:
        for width, height, images in self.warm_shape_list:
            if images > self.max_batch:
                raise ValueError(f"warm shape {width}x{height}:{images} is above max_batch ({self.max_batch})")
        return self

    @model_validator(mode="after")
    def _default_scheduler_fits_cache(self) -> WorkerSettings:
        problem = cache_problem(self.scheduler, self.cache_interval, setting="DEEPQUEUE_CACHE_INTERVAL")
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _leases_outlive_renewals(self) -> WorkerSettings:
        # A lease renewed late (a busy host, a slow Redis) must not expire between two renewals.
        if self.lease_expiry_s < 3 * self.lease_renew_s:
            raise ValueError(
                f"lease_expiry_s ({self.lease_expiry_s}) must be at least 3 x lease_renew_s ({self.lease_renew_s})"
            )
        return self

    @model_validator(mode="after")
    def _prefetch_holds_a_batch(self) -> WorkerSettings:
        # Reserved-but-unacked jobs are all the buffer can batch from: with fewer than the busy
        # ones plus a batch, the next batch cannot form while the device works.
        least = self.busy_jobs + self.max_batch
        if self.prefetch is not None and self.prefetch < least:
            raise ValueError(
                f"prefetch ({self.prefetch}) must be at least {least}: 2 batches in flight and the store backlog "
                f"({self.busy_jobs} with max_batch {self.max_batch} and store_backlog "
                f"{self.store_backlog_count}) plus one batch to fill; leave it unset for the default "
                f"({self.buffer_for_full_batches + self.busy_jobs})"
            )
        return self

    @model_validator(mode="after")
    def _startup_retries_end_before_the_load_timeout(self) -> WorkerSettings:
        # Retries the load timeout always cuts short would never report their own reason.
        if self.startup_retry_s >= self.load_timeout_s:
            raise ValueError(
                f"startup_retry_s ({self.startup_retry_s}) must be below load_timeout_s ({self.load_timeout_s})"
            )
        return self

    @model_validator(mode="after")
    def _visibility_outlives_leases(self) -> WorkerSettings:
        # kombu puts back any message older than its visibility timeout, renewed lease or not.
        if self.visibility_timeout_s < self.lease_expiry_s:
            raise ValueError(
                f"visibility_timeout_s ({self.visibility_timeout_s}) must be at least lease_expiry_s "
                f"({self.lease_expiry_s}): kombu would hand messages this worker holds to another worker"
            )
        return self


def parse_warm_shapes(text: str) -> list[tuple[int, int, int]]:
    """``"512x512:8,768x512:4"`` as ``[(512, 512, 8), (768, 512, 4)]`` (width, height, images)."""
    shapes = []
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        size, _, images = part.partition(":")
        width, _, height = size.lower().partition("x")
        try:
            shape = (int(width), int(height), int(images or 1))
        except ValueError:
            raise ValueError(f"warm shape {part!r} is not WIDTHxHEIGHT:IMAGES (e.g. 512x512:8)") from None
        if shape[0] % 8 or shape[1] % 8 or min(shape) < 1:
            raise ValueError(f"warm shape {part!r}: width and height must be positive multiples of 8, images >= 1")
        shapes.append(shape)
    return shapes
