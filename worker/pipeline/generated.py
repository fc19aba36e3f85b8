"""What a batch's pipeline call hands the executor, whichever engine made it: the real one
(``worker.pipeline.engine``) or a simulated device (``worker.pipeline.simulated``). Its own module, so that the two
engines share it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Generated:
    images: list[Any]  # PIL images, in job order
    seconds: float  # wall time of the pipeline call, device synchronised
    compiles: dict[str, int] = field(default_factory=dict)  # compile counts the call caused
    #: The LoRA adapters applied (id, scale, sha256) and what loading and switching them cost
    #: (``worker.pipeline.lora.Switch``); both empty for a pipeline no adapter was ever loaded into.
    loras: list[dict[str, Any]] = field(default_factory=list)
    lora_timing: dict[str, float] = field(default_factory=dict)
