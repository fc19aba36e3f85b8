"""The compiled UNet steps captured as CUDA graphs: one per step kind and input shape.

A captured step reads its inputs from static buffers and writes its outputs to static tensors,
so a call copies the inputs in and replays. A full step's kept outputs are static too: the
shallow step is captured reading them, and each replay of the full step refreshes them in place,
which is DeepCache's cache without a copy.

Replays cost one launch instead of hundreds, which is what the shallow steps (a few small
modules at batch 8) are bound by. The capture itself needs CUDA; ``replay_by_rerun`` gives the
same static-buffer behaviour on any device, so the tests cover everything else. A shape whose
capture fails (other than for memory) runs compiled, uncaptured, from then on, said once.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from worker.pipeline.unet_steps import CachedSteps, Step

logger = logging.getLogger(__name__)

#: Input shapes whose graphs stay captured at once; the least recently used go first.
DEFAULT_LIMIT = 8
#: Warm-up calls before a capture (compile, autotune, allocator), as PyTorch's docs do.
WARMUP_CALLS = 3

Capture = Callable[[Callable[[], Any], Any], tuple[Callable[[], None], Any]]


def capture_cuda(fn: Callable[[], Any], pool: Any) -> tuple[Callable[[], None], Any]:
    """Warm ``fn`` up on a side stream, capture it into ``pool``; returns (replay, outputs)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_CALLS):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = fn()
    return graph.replay, output


def replay_by_rerun(fn: Callable[[], Any], pool: Any) -> tuple[Callable[[], None], Any]:
    """A capture's behaviour without CUDA: a replay runs ``fn`` again on the static inputs and
    copies its results into the first call's outputs."""
    import torch.utils._pytree as pytree

    output = fn()

    def replay() -> None:
        for static, fresh in zip(pytree.tree_leaves(output), pytree.tree_leaves(fn()), strict=True):
            static.copy_(fresh)

    return replay, output


def signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """What a graph is specialised on: the call's structure, tensor shapes and dtypes, other values."""
    import torch
    import torch.utils._pytree as pytree

    leaves, spec = pytree.tree_flatten((args, kwargs))
    described = tuple(
        (tuple(leaf.shape), leaf.dtype) if isinstance(leaf, torch.Tensor) else ("value", leaf) for leaf in leaves
    )
    return (str(spec), described)


def _copied(tree: Any) -> Any:
    import torch
    import torch.utils._pytree as pytree

    return pytree.tree_map(lambda leaf: leaf.clone() if isinstance(leaf, torch.Tensor) else leaf, tree)


class Captured:
    """One step at one input shape: static inputs on ``device``, replayed per call."""

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        device: Any,
        capture: Capture,
        pool: Any,
    ) -> None:
        import torch
        import torch.utils._pytree as pytree

        leaves, self._spec = pytree.tree_flatten((args, kwargs))
        self._inputs = [leaf.to(device).clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        static_args, static_kwargs = pytree.tree_unflatten(self._inputs, self._spec)
        self._replay, self.output = capture(lambda: fn(*static_args, **static_kwargs), pool)

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        import torch
        import torch.utils._pytree as pytree

        for static, leaf in zip(self._inputs, pytree.tree_leaves((args, kwargs)), strict=True):
            if isinstance(static, torch.Tensor):
                static.copy_(leaf)
        self._replay()
        return self.output


class GraphCache:
    """Captured steps by (steps, input shape), the ``limit`` most recently used kept."""

    def __init__(self, limit: int = DEFAULT_LIMIT, capture: Capture | None = None) -> None:
        self.limit = limit
        self._capture = capture or capture_cuda
        self._entries: OrderedDict[tuple[Any, ...], dict[Step, Captured]] = OrderedDict()
        self._pools: dict[tuple[Any, ...], Any] = {}
        self.uncaptured: set[tuple[Any, ...]] = set()  # shapes whose capture failed: run as they are

    def __len__(self) -> int:
        return sum(len(entry) for entry in self._entries.values())

    def run(
        self, steps: CachedSteps, step: Step, reuse: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, tuple[Any, ...]]:
        key = (steps, *signature(args, kwargs))  # the steps themselves: their wrappers are captured
        if key in self.uncaptured:
            return steps.run(step, reuse, *args, **kwargs)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = {}
            self._pools[key] = self._new_pool()
            self._evict(keep=key)
        self._entries.move_to_end(key)
        if step not in entry:
            # A shallow step is captured reading the full step's static outputs (``reuse``).
            try:
                entry[step] = self._captured(key, lambda *a, **k: steps.run(step, reuse, *a, **k), args, kwargs)
            except Exception as error:
                if "out of memory" in str(error).lower():
                    raise
                logger.warning(
                    "could not capture the %s step as a CUDA graph (%s); this shape runs uncaptured",
                    step.value,
                    str(error).splitlines()[0][:300] if str(error) else type(error).__name__,
                )
                self.uncaptured.add(key)
                self._entries.pop(key, None)
                self._pools.pop(key, None)
                return steps.run(step, reuse, *args, **kwargs)
        output, kept = entry[step](args, kwargs)
        # The next replay overwrites the static output; a scheduler may keep the one it got
        # (PNDM's history does, unguided). The kept features stay static: that is the cache.
        return _copied(output), kept

    def _captured(
        self, key: tuple[Any, ...], fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Captured:
        device = args[0].device  # the UNet's sample
        while True:
            try:
                return Captured(fn, args, kwargs, device=device, capture=self._capture, pool=self._pools[key])
            except Exception as error:  # out of memory: give back the oldest graphs, then try again
                if "out of memory" not in str(error).lower() or len(self._entries) <= 1:
                    raise
                evicted, _ = self._entries.popitem(last=False)
                self._pools.pop(evicted, None)
                logger.warning("out of memory capturing a CUDA graph: dropped the least recently used shape")

    def _evict(self, keep: tuple[Any, ...]) -> None:
        while len(self._entries) > self.limit:
            oldest = next(iter(self._entries))
            if oldest == keep:
                break
            del self._entries[oldest]
            self._pools.pop(oldest, None)

    def _new_pool(self) -> Any:
        if self._capture is not capture_cuda:
            return None
        import torch

        return torch.cuda.graph_pool_handle()
