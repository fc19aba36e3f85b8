"""LoRA adapters a job asks for: the ``loras`` field of ``producer.job.JobDefaults``. Pure.

A job names up to ``MAX_LORAS`` adapters, each a Hub id or a path the worker can read, and the
weight it is applied with::

    loras=["owner/style-lora", {"id": "/models/ink.safetensors", "scale": 0.6}]
    deepqueue submit prompts.txt --lora owner/style-lora --lora /models/ink.safetensors:0.6
    {"prompt": "a cat", "loras": "owner/style-lora:0.8,/models/ink"}      (a row of a prompt file)

Each entry may be a ``{"id", "scale"}`` mapping or an ``ID[:SCALE]`` string; a string may hold
several, separated by commas. The adapter set decides the pixels, so it is part of the job's
recipe (when set) and of the batch key: jobs with different sets never share a pipeline call.
An empty list is no adapters at all (the base model), the same job as leaving it unset.

The id is not resolved here (the producer may not see the workers' files): the worker loads it,
and a LoRA it cannot load fails those jobs with the reason (``worker.pipeline.lora``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

#: Adapters one job may stack.
MAX_LORAS = 4
#: The weight an adapter is applied with: negative values subtract the style, 0 turns it off.
MIN_SCALE, MAX_SCALE = -4.0, 4.0
DEFAULT_SCALE = 1.0
MAX_ID_CHARS = 256
#: A Hub id (``owner/name``) or a local path (a folder, or a ``.safetensors`` file): letters,
#: digits, ``.``, ``_``, ``-``, ``~`` and ``/``. No ``:`` (it starts the scale), no ``,`` (it
#: separates entries), no spaces.
ID_PATTERN = r"^[A-Za-z0-9._~/-]+$"
_ID = re.compile(ID_PATTERN)

LoraId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN)]


class LoraSpec(BaseModel):
    """One adapter and its weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: LoraId
    scale: float = Field(DEFAULT_SCALE, ge=MIN_SCALE, le=MAX_SCALE, allow_inf_nan=False)

    def __str__(self) -> str:
        return f"{self.id}:{self.scale:g}"


def parse_lora(text: str) -> dict[str, Any]:
    """``ID[:SCALE]`` as ``{"id": ..., "scale": ...}`` fields (checked by ``LoraSpec``), or
    ValueError naming the text and the rule."""
    ident, colon, scale_text = text.strip().rpartition(":")
    if not colon:
        ident = scale_text
    if not ident or not _ID.match(ident) or len(ident) > MAX_ID_CHARS:
        raise ValueError(
            f"LoRA {text.strip()!r}: ID[:SCALE] with ID a Hub id or path of 1 to {MAX_ID_CHARS} letters, "
            "digits, '.', '_', '-', '~' or '/' (no spaces, ':' or ',')"
        )
    if not colon:
        return {"id": ident}
    try:
        scale = float(scale_text)
    except ValueError:
        raise ValueError(f"LoRA {text.strip()!r}: the scale after ':' must be a number") from None
    return {"id": ident, "scale": scale}


def lora_entries(value: Any) -> Any:
    """Whatever a job's ``loras`` was given as -> a list of ``LoraSpec`` fields, or None.

    Strings are split on commas and parsed (``parse_lora``); mappings and specs pass through;
    an empty list or string is None (the base model). Anything else is returned as it is, for
    the field's own type check to refuse with its message."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        entries = [parse_lora(item) if isinstance(item, str) else item for item in value]
        return entries or None
    return value


def check_loras(specs: tuple[LoraSpec, ...] | None) -> tuple[LoraSpec, ...] | None:
    """The count and uniqueness rules of a job's adapter set (each entry was checked already)."""
    if specs is None:
        return None
    if len(specs) > MAX_LORAS:
        raise ValueError(f"at most {MAX_LORAS} LoRAs per job, {len(specs)} given")
    ids = [spec.id for spec in specs]
    twice = sorted({ident for ident in ids if ids.count(ident) > 1})
    if twice:
        raise ValueError(f"each LoRA at most once, with one scale: {', '.join(twice)} given twice")
    return specs


def adapter_set(specs: tuple[LoraSpec, ...] | None) -> tuple[tuple[str, float], ...]:
    """``(id, scale)`` pairs in the job's order: what a batch key holds (empty: the base model)."""
    return tuple((spec.id, spec.scale) for spec in specs or ())


def describe(pairs: tuple[tuple[str, float], ...] | Mapping[str, float]) -> str:
    """``id:scale,id:scale`` for log lines (``base`` for none)."""
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    return ",".join(f"{ident}:{scale:g}" for ident, scale in items) or "base"
