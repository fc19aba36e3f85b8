"""Random-weight LoRA adapters for a saved test model, for tests and the README without the Hub.

``build_test_lora(model_dir, out_dir)`` adds a PEFT LoRA (rank 4, on the attention projections
``to_q``, ``to_k``, ``to_v``, ``to_out.0``) to the model's UNet with non-zero random weights, so
that it changes the outputs, and saves it with the pipeline's ``save_lora_weights``:
``out_dir/pytorch_lora_weights.safetensors``, the format ``pipe.load_lora_weights`` reads, as
any LoRA trained with diffusers' scripts. The same ``seed`` gives the same weights.

Command line: ``deepqueue make-test-lora DIR --model MODEL_DIR [--seed N]``.
"""

from __future__ import annotations

import json
import os
import pathlib

#: The modules a test LoRA adapts: the attention projections, as diffusers' LoRA scripts do.
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


def build_test_lora(
    model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, seed: int = 0, rank: int = 4
) -> pathlib.Path:
    """Write a random LoRA for the model in ``model_dir`` to ``out_dir``; returns the weights file.

    ``out_dir`` is created if missing; one that already holds LoRA weights raises FileExistsError.
    The caller's torch RNG state is left untouched."""
    import diffusers
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = pathlib.Path(model_dir)
    out = pathlib.Path(out_dir)
    weights = out / "pytorch_lora_weights.safetensors"
    if weights.exists():
        raise FileExistsError(f"{out} already holds LoRA weights ({weights.name}); refusing to overwrite them")
    pipeline_class = getattr(diffusers, json.loads((model / "model_index.json").read_text())["_class_name"])
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGET_MODULES, init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config)
    out.mkdir(parents=True, exist_ok=True)
    pipeline_class.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True)
    return weights
