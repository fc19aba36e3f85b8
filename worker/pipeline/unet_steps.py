"""DeepCache's full and shallow UNet steps, written so ``torch.compile`` and CUDA graphs can hold them.

DeepCache's helper decides at every module call, in Python, whether to run it or hand back what
it returned on the last full step; that state (a step counter, a dict of outputs) changes every
step, so a compiled UNet would recompile or fall back to eager. Here the same decision is made
once per step, outside the UNet: a full step runs every module and keeps the outputs a shallow
step will reuse; a shallow step returns those at the same places. Inside one step, every module
does the same thing every time, so each kind of step is one static graph.

The places are the helper's own (``DeepCacheSDHelper.wrap_modules`` and ``is_skip_step``, DeepCache
0.1.1): of the modules a shallow step skips, only the outermost ones are ever asked for their
cached output, so only those are kept.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Step(Enum):
    PLAIN = "plain"  # DeepCache off: nothing kept, nothing reused
    FULL = "full"  # every module runs; the cache points' outputs are kept
    SHALLOW = "shallow"  # the cache points hand back what the last full step kept


@dataclass(frozen=True)
class Site:
    """One module the helper wraps, with the helper's coordinates."""

    module: Any
    kind: str  # down | mid | up
    block: int  # up blocks are counted from the output end, as the helper does
    layer: int
    parent: Site | None  # the block this module belongs to; None for a whole block


def sites(unet: Any) -> list[Site]:
    """Every module DeepCache's helper wraps, in its order."""
    found: list[Site] = []
    for block_i, block in enumerate(unet.down_blocks):
        parent = Site(block, "down", block_i, 0, None)
        for layer_i, module in enumerate(getattr(block, "attentions", None) or []):
            found.append(Site(module, "down", block_i, layer_i, parent))
        resnets = getattr(block, "resnets", None) or []
        for layer_i, module in enumerate(resnets):
            found.append(Site(module, "down", block_i, layer_i, parent))
        for module in getattr(block, "downsamplers", None) or []:
            found.append(Site(module, "down", block_i, len(resnets), parent))
        found.append(parent)
    found.append(Site(unet.mid_block, "mid", 0, 0, None))
    count = len(unet.up_blocks)
    for block_i, block in enumerate(unet.up_blocks):
        position = count - block_i - 1
        parent = Site(block, "up", position, 0, None)
        resnets = getattr(block, "resnets", None) or []
        for layer_i, module in enumerate(getattr(block, "attentions", None) or []):
            found.append(Site(module, "up", position, len(resnets) - layer_i - 1, parent))
        for layer_i, module in enumerate(resnets):
            found.append(Site(module, "up", position, len(resnets) - layer_i - 1, parent))
        for module in getattr(block, "upsamplers", None) or []:
            found.append(Site(module, "up", position, 0, parent))
        found.append(parent)
    return found


def skipped(site: Site, branch: int) -> bool:
    """Whether a shallow step skips this module (the helper's ``is_skip_step`` off the full steps)."""
    cache_block, cache_layer = divmod(branch, 3)
    if site.kind == "mid" or site.block > cache_block:
        return True
    if site.block < cache_block:
        return False
    return site.layer >= cache_layer if site.kind == "down" else site.layer > cache_layer


def cache_points(unet: Any, branch: int) -> list[Any]:
    """The modules whose outputs a shallow step reuses: skipped ones whose block is not skipped."""
    return [
        site.module
        for site in sites(unet)
        if skipped(site, branch) and (site.parent is None or not skipped(site.parent, branch))
    ]


def is_full_step(call: int, interval: int) -> bool:
    """DeepCache's uniform schedule: a full step every ``interval`` steps, from the first.

    The helper counts steps by the timestep's index in the scheduler's list; the schedulers
    allowed with DeepCache never repeat a timestep, so that index is the call's number.
    """
    return call % interval == 0


@dataclass
class _Cache:
    """What the wrapped cache points read and write during one UNet call."""

    step: Step = Step.PLAIN
    kept: list[Any] = field(default_factory=list)  # filled by a full step, one slot per cache point
    reuse: tuple[Any, ...] = ()  # read by a shallow step


def unet_forward(unet: Any, *args: Any, **kwargs: Any) -> Any:
    """The UNet's class forward: what to compile (the instance's is replaced while a batch runs)."""
    return type(unet).forward(unet, *args, **kwargs)


class CachedSteps:
    """One UNet's full, shallow and plain steps for one DeepCache branch (``cache=False``: plain
    steps only, no module wrapped).

    ``run(step, reuse, *args, **kwargs)`` calls the UNet's class forward through ``call`` (which a
    caller may set to a compiled ``unet_forward``) and returns the UNet's output and, for a full
    step, the outputs a later shallow step needs as ``reuse``.
    """

    def __init__(self, unet: Any, branch: int, *, cache: bool = True) -> None:
        self.unet = unet
        self.branch = branch
        self.points = cache_points(unet, branch) if cache else []
        self._cache = _Cache()
        self.call: Callable[..., Any] = functools.partial(unet_forward, unet)

    def run(self, step: Step, reuse: tuple[Any, ...], *args: Any, **kwargs: Any) -> tuple[Any, tuple[Any, ...]]:
        cache = self._cache
        cache.step, cache.kept, cache.reuse = step, [None] * len(self.points), reuse
        try:
            output = self.call(*args, **kwargs)
            return output, tuple(cache.kept) if step is Step.FULL else ()
        finally:
            cache.kept, cache.reuse = [], ()

    @contextmanager
    def installed(self) -> Iterator[None]:
        """The cache points wrapped for the duration of a batch, then given back their forward."""
        originals = [point.__dict__.get("forward") for point in self.points]
        for index, point in enumerate(self.points):
            point.forward = self._wrap(index, point.forward)
        try:
            yield
        finally:
            for point, original in zip(self.points, originals, strict=True):
                if original is None:
                    del point.forward
                else:
                    point.forward = original

    def _wrap(self, index: int, forward: Callable[..., Any]) -> Callable[..., Any]:
        cache = self._cache

        def cached_forward(*args: Any, **kwargs: Any) -> Any:
            if cache.step is Step.SHALLOW:
                return cache.reuse[index]
            output = forward(*args, **kwargs)
            if cache.step is Step.FULL:
                cache.kept[index] = output
            return output

        return cached_forward


class Stepper:
    """The UNet's forward for one batch: a full or shallow step by DeepCache's schedule.

    ``run`` is ``CachedSteps.run`` or what replays it (``worker.pipeline.cuda_graphs``).
    """

    def __init__(self, steps: CachedSteps, interval: int, run: Callable[..., tuple[Any, tuple[Any, ...]]]) -> None:
        self.steps = steps
        self.interval = interval
        self.run = run
        self.calls = 0
        self.reuse: tuple[Any, ...] = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.interval <= 1:
            step = Step.PLAIN
        else:
            step = Step.FULL if is_full_step(self.calls, self.interval) else Step.SHALLOW
        self.calls += 1
        output, kept = self.run(step, self.reuse, *args, **kwargs)
        if step is Step.FULL:
            self.reuse = kept
        return output
