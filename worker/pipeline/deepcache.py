"""A guard around DeepCache's helper, which breaks when used in any other order.

DeepCache 0.1.1 raises on a second ``enable()`` (RecursionError) or ``disable()`` (KeyError),
and keeps cached tensors between calls unless re-enabled. So: one helper per pipeline, enabled
right before each batch and disabled right after, whatever happens in between.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def branch_count(unet: Any) -> int:
    """How many DeepCache branch ids this UNet has (branch = 3 x block + layer)."""
    count = 0
    for block_index, block in enumerate(unet.down_blocks):
        layers = len(getattr(block, "resnets", [])) + (1 if getattr(block, "downsamplers", None) else 0)
        count = 3 * block_index + min(layers, 3)
    return count


class DeepCacheGuard:
    """Enable DeepCache for the duration of one pipeline call, or not at all (interval 1)."""

    def __init__(self, pipe: Any) -> None:
        from DeepCache import DeepCacheSDHelper

        self._helper = DeepCacheSDHelper(pipe=pipe)
        self.branches = branch_count(pipe.unet)

    def check(self, interval: int, branch: int) -> str | None:
        """Why these parameters cannot run on this model, or None."""
        if interval > 1 and branch >= self.branches:
            return f"cache_branch {branch} does not exist in this UNet (0..{self.branches - 1})"
        return None

    @contextmanager
    def active(self, interval: int, branch: int) -> Iterator[None]:
        if interval <= 1:
            yield
            return
        problem = self.check(interval, branch)
        if problem:
            raise ValueError(problem)
        self._helper.set_params(cache_interval=interval, cache_branch_id=branch)
        self._helper.enable()
        try:
            yield
        finally:
            self._helper.disable()
