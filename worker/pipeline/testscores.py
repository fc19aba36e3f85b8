"""Random-weight score models saved to disk, for tests and benchmarks without the hub: a tiny
CLIPModel with its processor (``DEEPQUEUE_CLIP_MODEL``) and a tiny
``StableDiffusionSafetyChecker`` with its image processor (``DEEPQUEUE_SAFETY_CHECKER``).

They load through the same ``from_pretrained`` calls as the real ones
(``openai/clip-vit-large-patch14``, ``CompVis/stable-diffusion-safety-checker``); the tokenizer
is the suite's own (``worker.pipeline.testtokenizer``). Their scores are noise, but every code
path runs. ``arch="full"`` gives the real models' architectures (ViT-L/14 at 224 px), random
weights, for measuring cost.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Literal

from worker.pipeline.testtokenizer import build_tokenizer, clip_text_config

ScoreArch = Literal["tiny", "full"]

#: The tiny CLIP of transformers' own fast tests, at 32x32 pixels.
TINY_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "image_size": 32,
    "patch_size": 8,
}
TINY_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
}
#: ViT-L/14 (openai/clip-vit-large-patch14, the safety checker's vision tower too).
FULL_VISION: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "image_size": 224,
    "patch_size": 14,
}
FULL_TEXT: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
}
PROJECTION = {"tiny": 16, "full": 768}


def _config(arch: ScoreArch) -> Any:
    from transformers import CLIPConfig, CLIPVisionConfig

    text = clip_text_config(build_tokenizer(), **(TINY_TEXT if arch == "tiny" else FULL_TEXT))
    vision = CLIPVisionConfig(**(TINY_VISION if arch == "tiny" else FULL_VISION))
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=PROJECTION[arch])


def _image_processor(arch: ScoreArch) -> Any:
    from transformers import CLIPImageProcessor

    side = (TINY_VISION if arch == "tiny" else FULL_VISION)["image_size"]
    return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def build_test_clip(out_dir: str | os.PathLike[str], arch: ScoreArch = "tiny", *, seed: int = 0) -> pathlib.Path:
    """A random CLIPModel and its CLIPProcessor saved to ``out_dir``."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    out = pathlib.Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(_config(arch))
    model.save_pretrained(out)
    CLIPProcessor(image_processor=_image_processor(arch), tokenizer=build_tokenizer()).save_pretrained(out)
    return out


def build_test_safety_checker(
    out_dir: str | os.PathLike[str], arch: ScoreArch = "tiny", *, seed: int = 0
) -> pathlib.Path:
    """A random StableDiffusionSafetyChecker and its CLIPImageProcessor saved to ``out_dir``.
    Its concept embeddings and thresholds are the constructor's (all ones): it flags nothing
    until a test lowers a threshold."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    out = pathlib.Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        checker = StableDiffusionSafetyChecker(_config(arch))
    checker.save_pretrained(out)
    _image_processor(arch).save_pretrained(out)
    return out
