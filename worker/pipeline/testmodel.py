"""Random-weight Stable Diffusion pipelines saved to disk, for tests and benchmarks without the hub.

``build_test_model(out_dir, arch)`` builds a pipeline from configs alone (no downloads), saves it
with ``save_pretrained`` (safetensors) and returns the folder; loading it back goes through the
same ``DiffusionPipeline`` / ``AutoPipelineForText2Image.from_pretrained`` path as a real model.

Arches:

- ``tiny``: the UNet/VAE/CLIP configs of diffusers' own fast tests (about 10 MiB, 64x64 images).
- ``sd15``: the full Stable Diffusion 1.5 architecture, random weights (4 GiB fp32; slow to build).
- ``sdxl``: the full SDXL 1.0 base architecture (UNet, both text encoders, VAE), random weights
  (about 14 GiB fp32; for the GPU benchmark at 1024x1024).
- ``sdxl-tiny``: a tiny ``StableDiffusionXLPipeline`` (two text encoders, ``text_time``
  conditioning) after diffusers' fast SDXL tests (64x64 images).

The CLIP tokenizer is written from scratch (``worker.pipeline.testtokenizer``), so the outputs are
noise but every code path of a real pipeline runs.

Command line: ``deepqueue make-test-model DIR --arch tiny|sd15|sdxl|sdxl-tiny``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from typing import Any, Literal

from worker.pipeline.testtokenizer import build_tokenizer, clip_text_config

Arch = Literal["tiny", "sd15", "sdxl", "sdxl-tiny"]
ARCHES: tuple[str, ...] = ("tiny", "sd15", "sdxl", "sdxl-tiny")

# The scheduler of Stable Diffusion 1.5 / SDXL, as DDIM (clean step counting under DeepCache).
_SCHEDULER_KWARGS: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def _scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(**_SCHEDULER_KWARGS)


#: The UNet shape of diffusers' fast tests, shared by the tiny SD and SDXL pipelines (default
#: size: sample_size 8 x the VAE's factor 8 = 64x64).
TINY_UNET: dict[str, Any] = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}

#: A small VAE that downsamples 8x like Stable Diffusion's (four blocks: 2**3), so latents are
#: as small as a real model's at any size and a README example at 512x512 takes seconds on CPU
#: (diffusers' fast-test VAE halves the size only). Likewise shared.
TINY_VAE: dict[str, Any] = {
    "block_out_channels": (8, 16, 32, 32),
    "norm_num_groups": 8,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
}
#: The VAE of Stable Diffusion 1.5 and SDXL (SDXL's differs in its sample size and scaling factor).
SD_VAE: dict[str, Any] = {
    **TINY_VAE,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "norm_num_groups": 32,
}
#: The text encoder of diffusers' fast tests (SDXL's first encoder adds to it).
TINY_CLIP: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
}


def _build_tiny() -> Any:
    """StableDiffusionPipeline with the components of diffusers' fast tests."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_tokenizer()
    unet = UNet2DConditionModel(
        **TINY_UNET,
        cross_attention_dim=32,
    )
    vae = AutoencoderKL(
        **TINY_VAE,
    )
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, **TINY_CLIP))
    return _sd_pipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet)


def _sd_pipeline(**components: Any) -> Any:
    """A StableDiffusionPipeline from these components, DDIM, no safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        **components,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sd15() -> Any:
    """StableDiffusionPipeline with Stable Diffusion 1.5's architecture and random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=(
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(**SD_VAE, sample_size=512)
    text_encoder = CLIPTextModel(
        clip_text_config(
            tokenizer,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            projection_dim=768,
            hidden_act="quick_gelu",
        )
    )
    return _sd_pipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet)


def _build_sdxl() -> Any:
    """StableDiffusionXLPipeline with SDXL 1.0 base's architecture and random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tokenizer()
    # cross_attention_dim = 768 + 1280 (both encoders' hidden states, concatenated);
    # projection_class_embeddings_input_dim = 6 * 256 (time ids) + 1280 (pooled text embeds).
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(**SD_VAE, sample_size=1024, scaling_factor=0.13025)
    text_encoder = CLIPTextModel(
        clip_text_config(
            tokenizer,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            projection_dim=768,
            hidden_act="quick_gelu",
        )
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        clip_text_config(
            tokenizer,
            hidden_size=1280,
            intermediate_size=5120,
            num_attention_heads=20,
            num_hidden_layers=32,
            projection_dim=1280,
            hidden_act="gelu",
        )
    )
    return _sdxl_pipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, unet=unet)


def _sdxl_pipeline(**components: Any) -> Any:
    """A StableDiffusionXLPipeline from these components, DDIM, one tokenizer per encoder."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        **components, tokenizer=build_tokenizer(), tokenizer_2=build_tokenizer(), scheduler=_scheduler()
    )


def _build_sdxl_tiny() -> Any:
    """StableDiffusionXLPipeline with tiny components after diffusers' fast SDXL tests."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tokenizer()
    # cross_attention_dim = 32 + 32 (both encoders' hidden states, concatenated);
    # projection_class_embeddings_input_dim = 6 * 8 (time ids) + 32 (pooled text embeds).
    unet = UNet2DConditionModel(
        **TINY_UNET,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
    )
    vae = AutoencoderKL(
        **TINY_VAE,
        sample_size=128,
    )
    text_config = clip_text_config(
        tokenizer,
        **TINY_CLIP,
        hidden_act="gelu",
        projection_dim=32,
    )
    return _sdxl_pipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        text_encoder_2=CLIPTextModelWithProjection(text_config),
        unet=unet,
    )


def _exists_message(out: pathlib.Path) -> str:
    return f"{out} already holds a model (model_index.json); refusing to overwrite it"


_BUILDERS = {"tiny": _build_tiny, "sd15": _build_sd15, "sdxl": _build_sdxl, "sdxl-tiny": _build_sdxl_tiny}


def build_pipeline(arch: Arch = "tiny", *, seed: int = 0) -> Any:
    """The random-weight pipeline of ``arch`` in memory (the same weights for the same seed),
    leaving the caller's torch RNG state untouched."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown test model arch {arch!r}; expected one of {ARCHES}")
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _BUILDERS[arch]()


def build_test_model(out_dir: str | os.PathLike[str], arch: Arch = "tiny", *, seed: int = 0) -> pathlib.Path:
    """Build a random-weight Stable Diffusion (or SDXL) pipeline and save it to ``out_dir``.

    The pipeline is saved with ``save_pretrained`` (fp32 safetensors); loading it back goes
    through the same ``DiffusionPipeline`` / ``AutoPipelineForText2Image.from_pretrained`` path
    as a real model. A given ``(arch, seed)`` gives the same weights; the caller's torch RNG
    state is left untouched. ``out_dir`` is created if missing; one that already holds a
    ``model_index.json`` raises ``FileExistsError``. The model appears all at once: files are
    written to a hidden temporary folder inside ``out_dir`` and ``model_index.json`` moved last.
    """
    if arch not in _BUILDERS:
        raise ValueError(f"unknown test model arch {arch!r}; expected one of {ARCHES}")
    out = pathlib.Path(out_dir)
    index = out / "model_index.json"
    if index.exists():
        raise FileExistsError(_exists_message(out))
    out.mkdir(parents=True, exist_ok=True)

    pipeline = build_pipeline(arch, seed=seed)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        for entry in sorted(staging.iterdir()):
            if entry.name != "model_index.json":
                os.replace(entry, out / entry.name)
        if index.exists():  # another builder finished first
            raise FileExistsError(_exists_message(out))
        os.replace(staging / "model_index.json", index)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
