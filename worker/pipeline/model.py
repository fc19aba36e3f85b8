"""What a worker knows about its model without loading it: torch-free, safe in the main process.

The worker's main process forks its pool, and CUDA does not survive a fork once diffusers has
been imported: everything here reads files (``model_index.json``, weight-file samples) and uses
huggingface_hub only, never torch or diffusers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producer.errors import DeepQueueError

#: Pipeline classes the engine serves, and the model_index names diffusers' AutoPipelineForText2Image
#: turns into them.
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
TEXT2IMAGE_OF = {
    **{name: name for name in SUPPORTED_PIPELINES},
    "StableDiffusionImg2ImgPipeline": "StableDiffusionPipeline",
    "StableDiffusionXLImg2ImgPipeline": "StableDiffusionXLPipeline",
}


class ModelError(DeepQueueError, RuntimeError):
    """The model cannot be served by this worker (not found, wrong pipeline type)."""


#: ``simulated:a=0.05,b=0.01``: no model, a device that takes a + b x batch size seconds per call
#: (see worker.pipeline.simulated). It batches like an SD 1.x model.
SIMULATED_PREFIX = "simulated:"
SIMULATED_MAX_S = 600.0


@dataclass(frozen=True)
class SimulatedDevice:
    a: float = 0.05  # seconds per pipeline call
    b: float = 0.01  # seconds per image in it

    def call_seconds(self, images: int) -> float:
        return self.a + self.b * images


def parse_simulated(model: str) -> SimulatedDevice | None:
    """The simulated device a model name asks for, None for a real model, ModelError if malformed."""
    if not model.startswith(SIMULATED_PREFIX):
        return None
    params: dict[str, float] = {}
    for part in filter(None, model.removeprefix(SIMULATED_PREFIX).split(",")):
        name, _, text = part.partition("=")
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if name.strip() not in ("a", "b") or not 0 <= value <= SIMULATED_MAX_S:
            raise ModelError(
                f"bad simulated device {model!r} at {part!r}: expected simulated:a=SECONDS,b=SECONDS "
                f"(per call, per image; 0 to {SIMULATED_MAX_S:.0f})"
            )
        params[name.strip()] = value
    return SimulatedDevice(**params)


def read_model_index(model: str, revision: str | None = None) -> dict[str, Any]:
    """The model's ``model_index.json``: from a local folder, or from the Hub (or its cache)."""
    if parse_simulated(model) is not None:
        return {"_class_name": "StableDiffusionPipeline", "simulated": True}
    path = Path(model)
    try:
        if path.is_dir():
            index_file = path / "model_index.json"
        else:
            from huggingface_hub import hf_hub_download

            index_file = Path(hf_hub_download(model, "model_index.json", revision=revision))
        index = json.loads(index_file.read_text())
    except Exception as error:  # missing file, no network, bad repo id, bad JSON: all say "unreadable"
        raise ModelError(f"cannot read model {model!r}: {type(error).__name__}: {error}") from error
    if not isinstance(index, dict):
        raise ModelError(f"cannot read model {model!r}: model_index.json is not a JSON object")
    return index


def empty_negative_is_default(index: dict[str, Any]) -> bool:
    """Whether the pipeline encodes a missing negative prompt as the empty one, so jobs with and
    without one can share a call. SD 1.x/2.x do; SDXL uses zero embeddings instead unless its
    ``force_zeros_for_empty_prompt`` is off."""
    return index.get("_class_name") in TEXT2IMAGE_OF and not index.get("force_zeros_for_empty_prompt", False)


def check_pipeline_class(model: str, index: dict[str, Any]) -> str:
    """The pipeline class this model loads as, or a ModelError naming what is served."""
    name = index.get("_class_name")
    if name not in TEXT2IMAGE_OF:
        raise ModelError(
            f"{model!r} is a {name or 'model without _class_name'}; deepqueue serves "
            f"{' and '.join(SUPPORTED_PIPELINES)} models"
        )
    return TEXT2IMAGE_OF[name]


def model_fingerprint(model: str, revision: str | None) -> dict[str, Any]:
    """Identify the weights: the Hub commit for Hub ids, a sampled content hash for folders.

    The folder hash covers every file's path and size, all JSON configs in full, and the first
    and last MiB of each weight file: quick on multi-GB models, and it changes when the weights
    are retrained or swapped.
    """
    path = Path(model)
    if parse_simulated(model) is not None:
        return {"id": model, "revision": None}
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
