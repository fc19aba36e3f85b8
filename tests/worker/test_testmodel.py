"""worker.pipeline.testmodel: random-weight pipelines, saved and loaded through the real from_pretrained."""

from __future__ import annotations

import json
import os
import pathlib
import time

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from worker.pipeline.testmodel import ARCHES, build_test_model  # noqa: E402
from worker.pipeline.testtokenizer import MERGES, tokenizer_vocab, write_tokenizer_files  # noqa: E402

PROMPTS = ["a photo of a cat", "a dog"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_test_model(tmp_path_factory.mktemp("tiny") / "model", "tiny")


def _load(path: pathlib.Path):
    pipe = diffusers.AutoPipelineForText2Image.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, steps: int, size: int = 64) -> list:
    generators = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    out = pipe(
        PROMPTS,
        num_inference_steps=steps,
        height=size,
        width=size,
        generator=generators,
        output_type="pil",
    )
    return out.images


def _check_pipeline(pipe) -> None:
    """2-step batch of 2, then DeepCache 3/0 over 6 steps; caching off gives the plain output."""
    images = _generate(pipe, steps=2)
    assert [im.size for im in images] == [(64, 64), (64, 64)]

    from DeepCache import DeepCacheSDHelper

    plain = [torch.tensor(list(im.getdata())) for im in _generate(pipe, steps=6)]
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    try:
        cached = _generate(pipe, steps=6)
    finally:
        helper.disable()
    assert [im.size for im in cached] == [(64, 64), (64, 64)]
    again = [torch.tensor(list(im.getdata())) for im in _generate(pipe, steps=6)]
    assert all(torch.equal(a, b) for a, b in zip(plain, again, strict=True))


def test_tiny_loads_and_generates(tiny_path: pathlib.Path) -> None:
    assert (tiny_path / "model_index.json").is_file()
    assert list(tiny_path.glob(".build-*")) == []
    assert list(tiny_path.rglob("*.safetensors"))
    assert not list(tiny_path.rglob("*.bin"))
    size = sum(f.stat().st_size for f in tiny_path.rglob("*") if f.is_file())
    assert size < 16 * 2**20

    pipe = _load(tiny_path)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.safety_checker is None
    assert pipe.unet.config.block_out_channels == [32, 64]
    _check_pipeline(pipe)
    # The VAE downsamples 8x as Stable Diffusion's does; the default resolution is 64x64 (sample_size 8 x 8).
    assert pipe.vae_scale_factor == 8
    out = pipe("a cat", num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (64, 64)


def test_sdxl_tiny_loads_and_generates(sdxl_tiny: pathlib.Path) -> None:
    pipe = _load(sdxl_tiny)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.unet.config.addition_embed_type == "text_time"
    _check_pipeline(pipe)


def test_tokenizer_encodes_within_vocab(tiny_path: pathlib.Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_path / "tokenizer")
    config = json.loads((tiny_path / "text_encoder" / "config.json").read_text())
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert config["vocab_size"] == len(tokenizer)
    assert config["eos_token_id"] == tokenizer.eos_token_id

    ids = tokenizer("a photo of a cat").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert all(0 <= i < config["vocab_size"] for i in ids)
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "photo</w>", "o", "f</w>"] + [
        "a</w>",
        "cat</w>",
    ]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    padded = tokenizer("a photo of a cat", padding="max_length", truncation=True).input_ids
    assert len(padded) == 77


def test_tokenizer_files(tmp_path: pathlib.Path) -> None:
    write_tokenizer_files(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == tokenizer_vocab()
    assert len(vocab) == 256 * 2 + len(MERGES) + 2
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert {"<|startoftext|>", "<|endoftext|>", "a</w>", "Ā"} <= set(vocab)
    lines = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version")
    assert all(len(line.split(" ")) == 2 for line in lines[1:])
    assert len(lines) - 1 == len(MERGES)


def test_refuses_existing_model(tiny_path: pathlib.Path) -> None:
    before = (tiny_path / "model_index.json").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="model_index.json"):
        build_test_model(tiny_path, "tiny")
    assert (tiny_path / "model_index.json").stat().st_mtime_ns == before
    assert list(tiny_path.glob(".build-*")) == []


def test_same_seed_same_weights(tmp_path: pathlib.Path) -> None:
    from safetensors.torch import load_file

    state = torch.random.get_rng_state()
    a = build_test_model(tmp_path / "a", seed=7)
    b = build_test_model(tmp_path / "b", seed=7)
    c = build_test_model(tmp_path / "c", seed=8)
    assert torch.equal(state, torch.random.get_rng_state())  # caller's RNG untouched

    weights = "unet/diffusion_pytorch_model.safetensors"
    wa, wb, wc = (load_file(p / weights) for p in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_unknown_arch(tmp_path: pathlib.Path) -> None:
    assert ARCHES == ("tiny", "sd15", "sdxl", "sdxl-tiny")
    with pytest.raises(ValueError, match="unknown test model arch"):
        build_test_model(tmp_path / "x", "sd21")  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("DEEPQUEUE_TEST_SD15") != "1",
    reason="builds a 4 GiB SD1.5-architecture model; set DEEPQUEUE_TEST_SD15=1",
)
def test_sd15_builds_and_loads(tmp_path: pathlib.Path) -> None:
    start = time.perf_counter()
    path = build_test_model(tmp_path / "sd15", "sd15")
    built = time.perf_counter() - start
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"sd15: built and saved in {built:.1f} s, {size / 2**30:.2f} GiB on disk")
    assert 3.5 * 2**30 < size < 4.5 * 2**30

    pipe = _load(path)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.unet.config.block_out_channels == [320, 640, 1280, 1280]
    assert pipe.unet.config.cross_attention_dim == 768
    assert pipe.text_encoder.config.hidden_size == 768
    assert 8.5e8 < sum(p.numel() for p in pipe.unet.parameters()) < 8.7e8
    assert pipe.unet.dtype == torch.float32
    out = pipe(
        "a photo of a cat",
        num_inference_steps=1,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images[0].size == (64, 64)


def test_the_sdxl_arch_is_sdxl_base_shaped() -> None:
    """Built on the meta device (no memory, seconds): SDXL 1.0 base's UNet parameter count, and a
    1024x1024 latent through it keeps its shape."""
    from worker.pipeline.testmodel import build_pipeline

    with torch.device("meta"):
        pipe = build_pipeline("sdxl")
        unet = pipe.unet
        assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
        added = {"text_embeds": torch.empty(2, 1280), "time_ids": torch.empty(2, 6)}
        out = unet(torch.empty(2, 4, 128, 128), 10, torch.empty(2, 77, 2048), added_cond_kwargs=added).sample
    assert out.shape == (2, 4, 128, 128)
