"""A simulated device, so queue-level figures (batch fill, critical-path overhead, scaling to
many workers) need no GPU: a worker started with ``DEEPQUEUE_MODEL=simulated:a=0.05,b=0.01``
runs everything for real — queue, batching, encoding, storage, state — except the pipeline call,
which takes a + b x batch size seconds (sleeping, so many simulated workers share a few cores)
and returns noise images of the right size, seeded per job like real ones.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from producer.job import Job
from worker.delivery.batching import BatchKey
from worker.pipeline.generated import Generated
from worker.pipeline.model import SimulatedDevice, model_fingerprint


def synthetic_image(seed: int, width: int, height: int) -> Any:
    """Seeded RGB noise: encodes like a detailed image (the PNG cost a real one has, or more)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


class SimulatedEngine:
    """What the executor needs of ``worker.pipeline.engine.Engine``, on a simulated device."""

    device = "simulated"

    def __init__(self, model: str, simulated: SimulatedDevice) -> None:
        self.simulated = simulated
        self.model = model_fingerprint(model, None)

    def check(self, key: BatchKey) -> str | None:
        return key.problem()

    def generate(self, key: BatchKey, jobs: Sequence[Job]) -> Generated:
        started = time.perf_counter()
        images = [synthetic_image(job.seed, key.width, key.height) for job in jobs]
        time.sleep(max(0.0, self.simulated.call_seconds(len(jobs)) - (time.perf_counter() - started)))
        # No weights here: the adapters are named as asked, without a file hash.
        loras = [{"id": ident, "scale": scale, "sha256": None} for ident, scale in key.loras]
        return Generated(images=images, seconds=time.perf_counter() - started, loras=loras)

    def free_memory(self) -> None:
        """Nothing to free."""

    def warm_up(self, shapes: Sequence[tuple[int, int, int]], defaults: Any) -> dict[str, Any]:
        """Nothing compiles."""
        return {}

    def describe(self) -> dict[str, Any]:
        call = f"{self.simulated.a} + {self.simulated.b} x n"
        return {"device": "simulated", "pipeline": "simulated", "call_s": call}
