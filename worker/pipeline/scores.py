"""Quality scores of a batch's decoded images, computed on the worker right after the pipeline
call and before encoding: what each image's job asked for (``Job.scores``) plus what the worker
computes for every job (``DEEPQUEUE_SCORES``).

- ``phash``: the 64-bit perceptual hash of ``imagehash.phash`` (DCT of a 32x32 greyscale
  thumbnail), as 16 hex digits. Near-duplicates within a run are found from it where the run's
  rows meet (``producer.near_dups``, at manifest compaction).
- ``clip`` (column ``clip_score``): prompt-image agreement as torchmetrics' ``CLIPScore``
  defines it: 100 x max(cosine(image embedding, text embedding), 0), with a ``transformers``
  CLIPModel (``DEEPQUEUE_CLIP_MODEL``: a Hub id or a folder), prompts cut at the model's text
  length (77 tokens for real CLIP).
- ``nsfw``: diffusers' ``StableDiffusionSafetyChecker`` flag (``DEEPQUEUE_SAFETY_CHECKER``).
  Only recorded: an image is never blacked out, unless ``DEEPQUEUE_NSFW_BLACKOUT`` says so.

Each model loads once per worker, on first use (at start-up when the worker's own settings ask
for it), on the pipeline's device, and runs once per batch over the images that asked for it.
Scoring never fails an image: a model that cannot load, or a batch whose scoring raises,
gives ``None`` for those images, and the reason is logged (a model that failed to load is not
tried again in that process).

``torch``, ``transformers``, ``diffusers`` and ``imagehash`` are imported only inside functions:
the worker's main process imports this module without them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from producer.job import SCORE_NAMES

logger = logging.getLogger(__name__)

#: Score name (``Job.scores``, ``DEEPQUEUE_SCORES``) -> its key in the sidecar's ``scores`` and its
#: manifest column.
SCORE_KEYS: dict[str, str] = {"phash": "phash", "clip": "clip_score", "nsfw": "nsfw"}


def parse_scores(text: str) -> frozenset[str]:
    """``"clip, phash"`` -> {"clip", "phash"}; ValueError naming an unknown score."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(names - set(SCORE_NAMES))
    if unknown:
        raise ValueError(f"unknown score {', '.join(map(repr, unknown))}: choose from {', '.join(SCORE_NAMES)}")
    return frozenset(names)


def wanted(job_scores: Iterable[str] | None, worker_scores: Iterable[str]) -> frozenset[str]:
    """The scores of one image: what its job asked for and what its worker computes for all."""
    return frozenset(job_scores or ()) | frozenset(worker_scores)


def phash_hex(image: Any) -> str:
    """The 64-bit pHash of a PIL image, as 16 hex digits."""
    import imagehash

    return str(imagehash.phash(image))


def clip_score(cosine: float) -> float:
    """torchmetrics' CLIPScore of one image-text pair from its cosine similarity: 100 x max(cos, 0)."""
    return 100.0 * max(float(cosine), 0.0)


@dataclass(frozen=True)
class ScoreModels:
    """Where each model comes from, and what the device should run them as."""

    clip_model: str
    safety_checker: str
    device: str = "cpu"
    dtype: Any = None  # a torch dtype; None: float32


@dataclass
class BatchScores:
    """One batch's scores: per image, the sidecar's ``scores`` (only the keys its job asked for;
    None where scoring failed), and the seconds scoring took (0 when nothing was asked)."""

    images: list[dict[str, Any]]
    seconds: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)  # score name -> why it is None in this batch


class Scorer:
    """The score models of one worker, loaded once, and the batch scoring that uses them."""

    def __init__(self, models: ScoreModels, *, blackout: bool = False) -> None:
        self.models = models
        self.blackout = blackout
        self._loaded: dict[str, Any] = {}
        self._load_errors: dict[str, str] = {}

    def preload(self, names: Iterable[str]) -> None:
        """Load the models ``names`` need now (a worker's own scores, at start-up); a model that
        fails to load is logged and its score stays None."""
        for name in names:
            if name in ("clip", "nsfw"):
                self._model(name)

    def score(self, images: list[Any], prompts: Sequence[str], requests: Sequence[frozenset[str]]) -> BatchScores:
        """Score ``images`` (PIL, in job order, with their ``prompts``) for what each one's
        ``requests`` entry asks. Never raises for a scoring failure: that score is None for the
        batch, and the reason is logged and returned in ``failed``."""
        result = BatchScores([{} for _ in images])
        asked = set().union(*requests) if requests else set()
        if not asked:
            return result
        started = time.perf_counter()
        for name in (name for name in SCORE_NAMES if name in asked):
            chosen = [position for position, request in enumerate(requests) if name in request]
            try:
                values = self._compute(name, [images[position] for position in chosen], [prompts[p] for p in chosen])
            except Exception as error:  # scoring must not fail the image: record None, keep the cause in the log
                values = [None] * len(chosen)
                result.failed[name] = f"{type(error).__name__}: {error}"
                logger.warning("score %s failed for a batch of %d: %r", name, len(chosen), error, exc_info=True)
            for position, value in zip(chosen, values, strict=True):
                result.images[position][SCORE_KEYS[name]] = value
        if self.blackout and "nsfw" in asked:
            self._black_out(images, result)
        result.seconds = time.perf_counter() - started
        return result

    def _compute(self, name: str, images: list[Any], prompts: list[str]) -> list[Any]:
        if name == "phash":
            return [phash_hex(image) for image in images]
        model = self._model(name)
        if model is None:
            raise RuntimeError(f"the {name} model could not be loaded: {self._load_errors[name]}")
        return self._clip(model, images, prompts) if name == "clip" else self._nsfw(model, images)

    def _clip(self, loaded: tuple[Any, Any], images: list[Any], prompts: list[str]) -> list[float]:
        import torch

        model, processor = loaded
        tokenizer = processor.tokenizer
        inputs = processor(
            text=prompts,
            images=[image.convert("RGB") for image in images],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings),
        )
        inputs = {name: value.to(self.models.device) for name, value in inputs.items()}
        if self.models.dtype is not None:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.models.dtype)
        with torch.inference_mode():
            output = model(**inputs)
        # CLIPModel returns both embeddings L2-normalised: their dot product is the cosine.
        cosines = (output.image_embeds.float() * output.text_embeds.float()).sum(dim=-1)
        return [clip_score(value) for value in cosines.cpu().tolist()]

    def _nsfw(self, loaded: tuple[Any, Any], images: list[Any]) -> list[bool]:
        import numpy as np
        import torch

        checker, processor = loaded
        pixels = processor([image.convert("RGB") for image in images], return_tensors="pt").pixel_values
        pixels = pixels.to(self.models.device, dtype=self.models.dtype or torch.float32)
        # The checker blacks out what it flags in the array it is given: give it a stand-in, so
        # it returns the flags and the images are left alone.
        stand_in = np.zeros((len(images), 1, 1, 3), dtype=np.float32)
        with torch.inference_mode():
            _, flags = checker(clip_input=pixels, images=stand_in)
        return [bool(flag) for flag in flags]

    def _black_out(self, images: list[Any], scores: BatchScores) -> None:
        """Replace flagged images with black ones, in place (``DEEPQUEUE_NSFW_BLACKOUT``)."""
        from PIL import Image

        for position, values in enumerate(scores.images):
            if values.get("nsfw"):
                images[position] = Image.new(images[position].mode, images[position].size)

    def _model(self, name: str) -> Any:
        """The loaded ``(model, processor)`` of ``clip`` or ``nsfw``, or None if it cannot load."""
        if name in self._loaded:
            return self._loaded[name]
        if name in self._load_errors:
            return None
        started = time.perf_counter()
        source = self.models.clip_model if name == "clip" else self.models.safety_checker
        try:
            loaded = _load_clip(source, self.models) if name == "clip" else _load_safety_checker(source, self.models)
        except Exception as error:  # a missing or broken model: that score is None, the images are kept
            self._load_errors[name] = f"{type(error).__name__}: {error}"
            logger.error("cannot load the %s model %r: %r; its score will be null", name, source, error)
            return None
        self._loaded[name] = loaded
        logger.info("loaded the %s model %s in %.1f s", name, source, time.perf_counter() - started)
        return loaded


def _load_clip(source: str, models: ScoreModels) -> tuple[Any, Any]:
    from worker import logs

    logs.quiet_torchvision_fallback()  # before transformers can warn
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(source, dtype=models.dtype) if models.dtype else CLIPModel.from_pretrained(source)
    return model.to(models.device).eval(), CLIPProcessor.from_pretrained(source)


def _load_safety_checker(source: str, models: ScoreModels) -> tuple[Any, Any]:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    if models.dtype:
        checker = StableDiffusionSafetyChecker.from_pretrained(source, torch_dtype=models.dtype)
    else:
        checker = StableDiffusionSafetyChecker.from_pretrained(source)
    return checker.to(models.device).eval(), CLIPImageProcessor.from_pretrained(source)
