"""The warm pipeline: load once per process, then generate homogeneous batches.

torch is imported only inside functions, so the worker's main process can import this module.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from producer.job import Job, SchedulerName
from worker import logs
from worker.delivery.batching import BatchKey
from worker.pipeline.acceleration import Accelerator, Shape, compile_cache_dir, resolve_level
from worker.pipeline.generated import Generated
from worker.pipeline.lora import Adapters, LoraError, refused_at
from worker.pipeline.model import SUPPORTED_PIPELINES, ModelError, model_fingerprint, parse_simulated
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

#: Job scheduler names (all of ``producer.job.SchedulerName``) -> diffusers scheduler classes.
SCHEDULERS: dict[SchedulerName, str] = {
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

#: Estimated live tensor elements per output pixel at the peak of an SD/SDXL VAE decode (a few
#: 256- and 128-channel activations at full resolution). Times the dtype's size, the image
#: count and the pixel count, it decides whether a batch decodes at once or one image at a time.
DECODE_ELEMENTS_PER_PIXEL = 1280
#: Share of the free device memory a whole-batch decode may take before slicing is used.
DECODE_MEMORY_SHARE = 0.5


def decode_needs_slicing(images: int, height: int, width: int, itemsize: int, free_bytes: int | None) -> bool:
    """Whether to decode one image at a time: only when the whole batch might not fit.

    Slicing costs time on a GPU (eight small decodes instead of one), so it is kept for when
    memory needs it. Unknown free memory: slice, to be safe.
    """
    if images <= 1:
        return False
    if free_bytes is None:
        return True
    return images * height * width * DECODE_ELEMENTS_PER_PIXEL * itemsize > DECODE_MEMORY_SHARE * free_bytes


#: What an error says when memory ran out: CUDA and MPS ("... out of memory"), torch's CPU
#: allocator ("DefaultCPUAllocator: can't allocate memory").
OUT_OF_MEMORY_MESSAGES = ("out of memory", "can't allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says the device (or host) ran out of memory: torch's OutOfMemoryError,
    a RuntimeError saying so (older torch, other backends) or Python's MemoryError."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")  # not imported here: a torch error means torch is loaded
    kinds = (getattr(torch, "OutOfMemoryError", None), getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None))
    if any(isinstance(kind, type) and isinstance(error, kind) for kind in kinds):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error).lower() for text in OUT_OF_MEMORY_MESSAGES)


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


@dataclass(frozen=True)
class WarmRecipe:
    """The recipe fields a warm-up uses (the worker's defaults; the shape comes with each call)."""

    scheduler: str
    cache_interval: int
    cache_branch: int
    guidance: float


def _torch_version() -> str:
    import torch

    return torch.__version__


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return device


def _installed(package: str) -> str | None:
    """``package``'s version, or None where it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def load_engine(settings: WorkerSettings) -> Any:
    """The configured model's engine: ``Engine``, or a ``SimulatedEngine`` for ``simulated:...``."""
    simulated = parse_simulated(settings.model)
    if simulated is not None:
        from worker.pipeline.simulated import SimulatedEngine

        return SimulatedEngine(settings.model, simulated)
    return Engine.load(settings)


class Engine:
    """One diffusers pipeline, its schedulers, its DeepCache guard and its acceleration."""

    def __init__(
        self,
        pipe: Any,
        *,
        device: str,
        model: dict[str, Any],
        vae_slicing: str = "auto",
        accelerator: Accelerator | None = None,
    ) -> None:
        self.pipe = pipe
        self.device = device
        self.model = model
        self.vae_slicing = vae_slicing
        self.accelerator = accelerator or Accelerator(pipe, "off", device)
        self.deepcache = self.accelerator.deepcache
        self._scheduler_config = dict(pipe.scheduler.config)
        self._schedulers: dict[str, Any] = {}
        self._scheduler_name: str | None = None
        self.adapters = Adapters(pipe)

    @classmethod
    def load(cls, settings: WorkerSettings) -> Engine:
        """``from_pretrained`` any SD/SDXL model id or folder, on the configured device."""
        logs.quiet_torchvision_fallback()  # before transformers can warn
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
        model = model_fingerprint(settings.model, settings.model_revision)
        level = resolve_level(settings.acceleration, device)
        cache_root = settings.compile_cache.expanduser()
        cache_dir = compile_cache_dir(cache_root, model, _torch_version(), _device_name(device))
        accelerator = Accelerator.prepare(pipe, level, device, cache_dir=cache_dir, graph_limit=settings.graph_shapes)
        engine = cls(pipe, device=device, model=model, vae_slicing=settings.vae_slicing, accelerator=accelerator)
        logger.info(
            "loaded %s (%s) on %s as %s, acceleration %s, in %.1f s",
            settings.model,
            type(pipe).__name__,
            device,
            dtype,
            level,
            time.perf_counter() - started,
            extra={"model": engine.model, "device": device},
        )
        return engine

    def warm_up(self, shapes: Sequence[tuple[int, int, int]], defaults: WarmRecipe) -> dict[str, Any]:
        """Compile (and capture) ``shapes`` (width, height, images) with the worker's default
        recipe before the first batch: the seconds it took (``warm_s``) and its ``compiles``.
        Nothing to do at levels that do not compile."""
        if not self.accelerator.compiled or not shapes:
            return {}
        started = time.perf_counter()
        for width, height, images in shapes:
            logger.info("warming up %dx%d x %d", width, height, images)
            self._call(
                ["warm-up"] * images,
                None,
                [0] * images,
                width=width,
                height=height,
                steps=max(2, defaults.cache_interval + 1),  # a full step and a shallow one
                guidance=defaults.guidance,
                scheduler=defaults.scheduler,
                cache=(defaults.cache_interval, defaults.cache_branch),
            )
        seconds = time.perf_counter() - started
        compiles = self.accelerator.take_compile_counts()
        logger.info("warmed up %d shapes in %.1f s (%s)", len(shapes), seconds, compiles or "nothing compiled")
        return {"warm_s": seconds, "compiles": compiles}

    def check(self, key: BatchKey) -> str | None:
        """Why this batch cannot run here, or None."""
        if key.scheduler not in SCHEDULERS:
            return f"unknown scheduler {key.scheduler!r}"
        return key.problem() or self.deepcache.check(key.cache_interval, key.cache_branch) or self._lora_problem(key)

    def _lora_problem(self, key: BatchKey) -> str | None:
        """Why the batch's LoRA adapters cannot run here (loading them if they can), or None."""
        if not key.loras:
            return None
        refused = refused_at(self.accelerator.level)
        if refused:
            return refused
        try:
            self.adapters.load([ident for ident, _ in key.loras])
        except LoraError as error:
            return str(error)
        return None

    def generate(self, key: BatchKey, jobs: Sequence[Job]) -> Generated:
        """One pipeline call for jobs that share ``key``; one generator per image."""
        problem = self.check(key)
        if problem:
            raise ValueError(problem)
        adapters = self.adapters.switch(key.loras)
        started = time.perf_counter()
        images = self._call(
            [job.prompt for job in jobs],
            [job.negative_prompt or "" for job in jobs] if key.negative_prompt else None,
            [job.seed for job in jobs],
            width=key.width,
            height=key.height,
            steps=key.steps,
            guidance=key.guidance,
            scheduler=key.scheduler,
            cache=(key.cache_interval, key.cache_branch),
        )
        seconds = time.perf_counter() - started
        return Generated(
            images=images,
            seconds=seconds,
            compiles=self.accelerator.take_compile_counts(),
            loras=adapters.loras,
            lora_timing=adapters.timing,
        )

    def _call(
        self,
        prompts: list[str],
        negatives: list[str] | None,
        seeds: list[int],
        *,
        width: int,
        height: int,
        steps: int,
        guidance: float,
        scheduler: str,
        cache: tuple[int, int],
    ) -> list[Any]:
        """One pipeline call, padded to a compiled batch size where one holds it (the extra
        images, copies of the last, are dropped)."""
        import torch

        wanted = len(prompts)
        size = self.accelerator.batch_size(Shape(width, height, wanted, guided=guidance > 1))
        extra = size - wanted
        prompts, seeds = prompts + prompts[-1:] * extra, seeds + seeds[-1:] * extra
        negatives = negatives + negatives[-1:] * extra if negatives is not None else None
        self._use_scheduler(scheduler)
        self._set_vae_slicing(size, height, width)
        # CPU generators: the same seed gives the same noise on every machine.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        shape = Shape(width, height, size, guided=guidance > 1)
        with self.accelerator.active(*cache, shape), torch.inference_mode():
            output = self.pipe(
                prompt=prompts,
                negative_prompt=negatives,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generators,
                output_type="pil",
            )
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
        if len(output.images) != size:
            raise RuntimeError(f"the pipeline returned {len(output.images)} images for {size} prompts")
        return list(output.images[:wanted])

    def free_memory(self) -> None:
        """Give back what a failed call left behind before the next try: unreachable Python
        objects (and the tensors they hold), then the blocks CUDA's allocator keeps cached."""
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

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
            "peft": _installed("peft"),  # applies LoRA adapters (worker.pipeline.lora)
            **self.accelerator.describe(),
        }

    def _use_scheduler(self, name: str) -> None:
        """Swap the pipeline's scheduler only when the batch asks for another one."""
        if name == self._scheduler_name:
            return
        if name not in self._schedulers:
            import diffusers

            cls = getattr(diffusers, SCHEDULERS[name])
            config = dict(self._scheduler_config)
            if name == "pndm":
                # SD ships PNDM as PLMS. From another scheduler's config it would default to
                # Runge-Kutta warm-up steps: 3x the UNet calls, and a crash below 4 steps.
                config.setdefault("skip_prk_steps", True)
            self._schedulers[name] = cls.from_config(config)
        self.pipe.scheduler = self._schedulers[name]
        self._scheduler_name = name

    def _set_vae_slicing(self, images: int, height: int, width: int) -> None:
        if self.vae_slicing == "auto":
            itemsize = self.pipe.vae.dtype.itemsize
            slicing = decode_needs_slicing(images, height, width, itemsize, self._free_memory())
        else:
            slicing = self.vae_slicing == "on"
        self.pipe.vae.use_slicing = slicing

    def _free_memory(self) -> int | None:
        """Free bytes on the pipeline's device: CUDA's own count, or the host's available RAM."""
        import torch

        if self.device.startswith("cuda"):
            return torch.cuda.mem_get_info(torch.device(self.device))[0]
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
