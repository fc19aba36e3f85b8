"""Acceleration levels on top of DeepCache: ``off``, ``fuse``, ``compile``, ``graphs``.

- ``off``: the pipeline as diffusers builds it, DeepCache through its own helper (the recipe in
  DeepCache's docs).
- ``fuse``: channels-last UNet and VAE and fused QKV projections (SDPA is diffusers' default).
- ``compile``: ``fuse``, then the UNet's full, shallow and plain steps (``worker.pipeline.unet_steps``) and
  the VAE decoder compiled with inductor, one static graph per step kind and input shape.
- ``graphs``: ``compile``, then each step kind captured as a CUDA graph per input shape, with
  static input buffers (``worker.pipeline.cuda_graphs``); without CUDA it runs as ``compile``.

Compiled code goes to an inductor cache folder keyed by model, torch version and device, so a
restarted worker reads its kernels back instead of compiling them again.

torch is imported only inside functions, as in ``worker.pipeline.engine``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from worker.pipeline.deepcache import DeepCacheGuard
from worker.pipeline.unet_steps import CachedSteps, Step, Stepper, unet_forward

logger = logging.getLogger(__name__)

Level = Literal["off", "fuse", "compile", "graphs"]
LEVELS: tuple[Level, ...] = ("off", "fuse", "compile", "graphs")
#: ``auto`` on CUDA: the fastest level that passed the quality gate on the GPU benchmark (H200,
#: SD1.5 architecture: the worker at 1.48x DeepCache's recipe at batch 8, 4.75x at batch 1, PSNR
#: 56 dB; ops/bench/results/gpu-2026-12-04-h200.md). On CPU ``auto`` is ``off``.
CUDA_DEFAULT: Level = "graphs"
#: Compiled graphs dynamo keeps per step function before it falls back to eager: three step
#: kinds for every (size, batch size, guidance on/off, DeepCache branch) a worker serves.
RECOMPILE_LIMIT = 256

#: torch._dynamo / inductor counters reported as deepqueue_compile_* metrics.
COMPILE_COUNTERS = {
    "graphs": ("stats", "unique_graphs"),
    "cache_hits": ("inductor", "fxgraph_cache_hit"),
    "cache_misses": ("inductor", "fxgraph_cache_miss"),
}


def resolve_level(setting: str, device: str) -> Level:
    """The level a worker runs: ``auto`` by device, ``graphs`` as ``compile`` without CUDA."""
    cuda = device.startswith("cuda")
    if setting == "auto":
        return CUDA_DEFAULT if cuda else "off"
    if setting == "graphs" and not cuda:
        logger.warning("acceleration graphs needs CUDA; %s runs it as compile", device)
        return "compile"
    if setting not in LEVELS:
        raise ValueError(f"unknown acceleration {setting!r} (one of auto, {', '.join(LEVELS)})")
    return setting  # type: ignore[return-value]


def compile_cache_dir(root: Path, model: dict[str, Any], torch_version: str, device_name: str) -> Path:
    """The inductor cache folder for one model on one torch build and device: kernels compiled
    for another of them are never read back."""
    identity = f"{model.get('id')}|{model.get('revision') or model.get('hash') or ''}|{torch_version}|{device_name}"
    return root / hashlib.sha256(identity.encode()).hexdigest()[:16]


def padded_size(images: int, ready: set[int]) -> int:
    """How many images to run a batch of ``images`` as: the smallest size already compiled for its
    shape that holds it (the extra rows are thrown away), or its own size, compiled on first use.

    A run's last batches are partial; padding them to a ready size costs a few images' compute
    instead of a compile (minutes on a GPU, for each new size) in the middle of a run.
    """
    bigger = [size for size in ready if size >= images]
    return min(bigger) if bigger else images


def compile_counts() -> dict[str, int]:
    """This process's compile counters so far (dynamo graphs, inductor cache hits and misses)."""
    from torch._dynamo.utils import counters

    return {name: int(counters[group][key]) for name, (group, key) in COMPILE_COUNTERS.items()}


@dataclass(frozen=True)
class Shape:
    """What a compiled step is specialised on, besides the DeepCache branch."""

    width: int
    height: int
    images: int
    guided: bool  # classifier-free guidance doubles the UNet's batch

    def same_size(self, other: Shape) -> bool:
        """Whether ``other`` differs at most in its image count."""
        return (self.width, self.height, self.guided) == (other.width, other.height, other.guided)


class Accelerator:
    """One pipeline's acceleration: applied once at load, then entered around every batch."""

    def __init__(self, pipe: Any, level: Level, device: str) -> None:
        self.pipe = pipe
        self.level = level
        self.device = device
        self.deepcache = DeepCacheGuard(pipe)
        self._steps: dict[int, CachedSteps] = {}  # DeepCache branch (-1: off) -> its steps
        self._compiled: Callable[..., Any] | None = None
        self._graphs: Any = None  # worker.pipeline.cuda_graphs.GraphCache at level graphs
        self._shapes: set[Shape] = set()  # compiled (or captured) so far
        self._counted = {name: 0 for name in COMPILE_COUNTERS}

    @classmethod
    def prepare(
        cls,
        pipe: Any,
        level: Level,
        device: str,
        *,
        cache_dir: Path | None = None,
        graph_limit: int | None = None,
        capture: Any = None,
    ) -> Accelerator:
        """Apply ``level`` to ``pipe``; ``capture`` replaces the CUDA capture (tests: replay_by_rerun)."""
        accelerator = cls(pipe, level, device)
        if level != "off":
            accelerator._fuse()
        if level in ("compile", "graphs"):
            accelerator._compile(cache_dir)
        if level == "graphs":
            from worker.pipeline.cuda_graphs import DEFAULT_LIMIT, GraphCache

            accelerator._graphs = GraphCache(graph_limit or DEFAULT_LIMIT, capture)
        return accelerator

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def batch_size(self, shape: Shape) -> int:
        """The images to run for ``shape``: padded to a compiled size where one holds it."""
        if not self.compiled:
            return shape.images
        ready = {done.images for done in self._shapes if done.same_size(shape)}
        return padded_size(shape.images, ready)

    @contextmanager
    def active(self, interval: int, branch: int, shape: Shape) -> Iterator[None]:
        """DeepCache (and the compiled steps, at levels that compile) for one pipeline call."""
        if not self.compiled:
            with self.deepcache.active(interval, branch):
                yield
            return
        problem = self.deepcache.check(interval, branch)
        if problem:
            raise ValueError(problem)
        if shape not in self._shapes:
            logger.info(
                "first batch of %dx%d x %d (guidance %s): compiling its steps",
                shape.width,
                shape.height,
                shape.images,
                "on" if shape.guided else "off",
            )
        steps = self._steps_for(branch if interval > 1 else -1)
        stepper = Stepper(steps, interval, self._run_step(steps))
        with steps.installed():
            self.pipe.unet.forward = stepper
            try:
                yield
            finally:
                del self.pipe.unet.forward
        self._shapes.add(shape)

    def take_compile_counts(self) -> dict[str, int]:
        """Compiles since the last call (empty where nothing compiles)."""
        if not self.compiled:
            return {}
        now = compile_counts()
        taken = {name: now[name] - self._counted[name] for name in now}
        self._counted = now
        return {name: count for name, count in taken.items() if count}

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"acceleration": self.level}
        if self._graphs is not None:
            described["cuda_graphs"] = len(self._graphs)
            if self._graphs.uncaptured:
                described["cuda_graphs_uncaptured"] = len(self._graphs.uncaptured)
        return described

    def _fuse(self) -> None:
        import torch

        self.pipe.unet.to(memory_format=torch.channels_last)
        self.pipe.vae.to(memory_format=torch.channels_last)
        self.pipe.fuse_qkv_projections()

    def _compile(self, cache_dir: Path | None) -> None:
        import torch

        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT
        )
        # One compiled callable for every branch: it calls the UNet's class forward, and the
        # cache points each branch wraps are guarded like any other attribute.
        self._compiled = torch.compile(unet_forward, dynamic=False, fullgraph=True)
        self.pipe.vae.decoder.compile(dynamic=False)
        self._counted = compile_counts()

    def _steps_for(self, branch: int) -> CachedSteps:
        if branch not in self._steps:
            steps = CachedSteps(self.pipe.unet, max(branch, 0), cache=branch >= 0)
            assert self._compiled is not None
            steps.call = functools.partial(self._compiled, self.pipe.unet)
            self._steps[branch] = steps
        return self._steps[branch]

    def _run_step(self, steps: CachedSteps) -> Callable[..., tuple[Any, tuple[Any, ...]]]:
        if self._graphs is None:
            return steps.run
        graphs = self._graphs

        def replay(step: Step, reuse: tuple[Any, ...], *args: Any, **kwargs: Any) -> tuple[Any, tuple[Any, ...]]:
            return graphs.run(steps, step, reuse, args, kwargs)

        return replay
