"""The warm pipeline: load once per process, then generate homogeneous batches."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producer.job import Job
from worker.batching import BatchKey
from worker.deepcache import DeepCacheGuard
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

#: Job scheduler names -> diffusers scheduler classes.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",
    "pndm": "PNDMScheduler",
    "heun": "HeunDiscreteScheduler",
    "kdpm2": "KDPM2DiscreteScheduler",
}
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


class ModelError(RuntimeError):
    """The model cannot be served by this worker (wrong pipeline type, not found)."""


@dataclass(frozen=True)
class Generated:
    images: list[Any]  # PIL images, in job order
    seconds: float  # wall time of the pipeline call, device synchronised


def resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def resolve_dtype(setting: str, device: str) -> Any:
    import torch

    if setting == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, setting)


def model_fingerprint(model: str, revision: str | None) -> dict[str, Any]:
    """Identify the weights: the Hub commit for Hub ids, a sampled content hash for folders.

    The folder hash covers every file's path and size, all JSON configs in full, and the first
    and last MiB of each weight file: quick on multi-GB models, and it changes when the weights
    are retrained or swapped.
    """
    path = Path(model)
    if not path.is_dir():
        return {"id": model, "revision": _hub_commit(model, revision) or revision}
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path)}:{size}\n".encode())
        with file.open("rb") as handle:
            if file.suffix == ".json" or size <= 2 << 20:
                digest.update(handle.read())
            else:
                digest.update(handle.read(1 << 20))
                handle.seek(-(1 << 20), os.SEEK_END)
                digest.update(handle.read())
    return {"id": model, "revision": revision, "hash": "sha256:" + digest.hexdigest()[:16]}


def _hub_commit(model: str, revision: str | None) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True)).name
    except Exception:  # not cached, or not a Hub id: the id and revision are all we know
        return None


class Engine:
    """One diffusers pipeline, its schedulers and its DeepCache guard."""

    def __init__(self, pipe: Any, *, device: str, model: dict[str, Any]) -> None:
        self.pipe = pipe
        self.device = device
        self.model = model
        self.deepcache = DeepCacheGuard(pipe)
        self._scheduler_config = dict(pipe.scheduler.config)
        self._schedulers: dict[str, Any] = {}

    @classmethod
    def load(cls, settings: WorkerSettings) -> Engine:
        """``from_pretrained`` any SD/SDXL model id or folder, on the configured device."""
        import transformers
        from diffusers import AutoPipelineForText2Image
        from diffusers.utils import logging as diffusers_logging

        # Loading bars would land in the worker log line by line (Celery redirects stderr).
        diffusers_logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        started = time.perf_counter()
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(
                settings.model, revision=settings.model_revision, dtype=dtype
            )
        except (OSError, ValueError) as error:
            raise ModelError(f"cannot load model {settings.model!r}: {error}") from error
        if type(pipe).__name__ not in SUPPORTED_PIPELINES:
            raise ModelError(
                f"{settings.model!r} loads as {type(pipe).__name__}; deepqueue serves "
                f"{' and '.join(SUPPORTED_PIPELINES)}"
            )
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        pipe.vae.enable_slicing()  # the VAE decode is the memory peak of large batches
        engine = cls(pipe, device=device, model=model_fingerprint(settings.model, settings.model_revision))
        logger.info(
            "loaded %s (%s) on %s as %s in %.1f s",
            settings.model,
            type(pipe).__name__,
            device,
            dtype,
            time.perf_counter() - started,
            extra={"model": engine.model, "device": device},
        )
        return engine

    def check(self, key: BatchKey) -> str | None:
        """Why this batch cannot run here, or None."""
        if key.scheduler not in SCHEDULERS:
            return f"unknown scheduler {key.scheduler!r}"
        return key.problem() or self.deepcache.check(key.cache_interval, key.cache_branch)

    def generate(self, key: BatchKey, jobs: Sequence[Job]) -> Generated:
        """One pipeline call for jobs that share ``key``; one generator per image."""
        import torch

        problem = self.check(key)
        if problem:
            raise ValueError(problem)
        self.pipe.scheduler = self._scheduler(key.scheduler)
        # CPU generators: the same seed gives the same noise on every machine.
        generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
        negatives = [job.negative_prompt or "" for job in jobs] if key.negative_prompt else None
        started = time.perf_counter()
        with self.deepcache.active(key.cache_interval, key.cache_branch), torch.inference_mode():
            output = self.pipe(
                prompt=[job.prompt for job in jobs],
                negative_prompt=negatives,
                height=key.height,
                width=key.width,
                num_inference_steps=key.steps,
                guidance_scale=key.guidance,
                generator=generators,
                output_type="pil",
            )
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
        if len(output.images) != len(jobs):
            raise RuntimeError(f"the pipeline returned {len(output.images)} images for {len(jobs)} prompts")
        return Generated(images=list(output.images), seconds=time.perf_counter() - started)

    def describe(self) -> dict[str, Any]:
        """Device and library versions, for the sidecar."""
        from importlib.metadata import version

        import diffusers
        import torch

        device = self.device
        if device.startswith("cuda"):
            device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
        return {
            "device": device,
            "dtype": str(self.pipe.unet.dtype).removeprefix("torch."),
            "pipeline": type(self.pipe).__name__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "deepcache": version("DeepCache"),
        }

    def _scheduler(self, name: str) -> Any:
        if name not in self._schedulers:
            import diffusers

            cls = getattr(diffusers, SCHEDULERS[name])
            config = dict(self._scheduler_config)
            if name == "pndm":
                # SD ships PNDM as PLMS. From another scheduler's config it would default to
                # Runge-Kutta warm-up steps: 3x the UNet calls, and a crash below 4 steps.
                config.setdefault("skip_prk_steps", True)
            self._schedulers[name] = cls.from_config(config)
        return self._schedulers[name]
