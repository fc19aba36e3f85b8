"""worker.output.encode and worker.output.sidecar: pure functions from image and job to bytes and metadata.

The complete sidecar, with the worker and timing parts the executor fills in, is checked on a
real executor run in test_executor.py.
"""

from __future__ import annotations

import io
import json
from functools import partial
from typing import Any, get_args

import pytest

from producer.job import MAX_PROMPT_CHARS, ImageFormat, Job
from producer.layout import CONTENT_TYPES, EXTENSIONS
from tests import helpers
from worker.delivery.batching import BatchKey, RecipeDefaults, batch_key
from worker.output.encode import encode_image
from worker.output.sidecar import SIDECAR_VERSION, BatchInfo, build_sidecar, s3_metadata

Image = pytest.importorskip("PIL.Image")

DEFAULTS = RecipeDefaults(model="models/tiny", scheduler="ddim", cache_interval=3, cache_branch=0)
MODEL = {"id": "models/tiny", "revision": None, "hash": "sha256:0123456789abcdef"}
WORKER = {"hostname": "gpu-1", "device": "cpu", "torch": "2", "diffusers": "0.42", "deepcache": "0.1.1"}


def gradient(width: int, height: int, mode: str = "RGB") -> Any:
    image = Image.new(mode, (width, height))
    image.putdata(
        [((x * 255) // width, (y * 255) // height, 128, 200)[: len(mode)] for y in range(height) for x in range(width)]
    )
    return image


make_job = partial(helpers.make_job, index=3, prompt="a cat", seed=42, width=96, steps=4)


# --- encode ------------------------------------------------------------------------------------


def test_formats_agree_with_the_job_contract() -> None:
    assert set(CONTENT_TYPES) == set(EXTENSIONS) == set(get_args(ImageFormat))
    assert EXTENSIONS == {"png": "png", "webp": "webp", "jpeg": "jpg"}


@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("webp", "WEBP"), ("jpeg", "JPEG")])
def test_round_trip(fmt: str, pil_format: str) -> None:
    image = gradient(96, 64)
    data = encode_image(image, fmt)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == pil_format
    assert Image.MIME[pil_format] == CONTENT_TYPES[fmt]
    assert decoded.size == (96, 64)  # width x height, not swapped
    assert decoded.mode == "RGB"
    pixels = list(decoded.convert("RGB").getdata())
    original = list(image.getdata())
    if fmt == "png":
        assert pixels == original  # lossless
    else:
        error = sum(abs(a - b) for p, q in zip(pixels, original, strict=True) for a, b in zip(p, q, strict=True))
        assert error / (len(pixels) * 3) < 8  # lossy but close


def test_quality_settings_are_used() -> None:
    image = gradient(64, 64)
    assert len(encode_image(image, "jpeg", jpeg_quality=10)) < len(encode_image(image, "jpeg", jpeg_quality=95))
    assert len(encode_image(image, "webp", webp_quality=10)) < len(encode_image(image, "webp", webp_quality=95))


def test_jpeg_of_an_rgba_image() -> None:
    data = encode_image(gradient(64, 64, "RGBA"), "jpeg")
    assert Image.open(io.BytesIO(data)).mode == "RGB"


@pytest.mark.parametrize("fmt", ["gif", "jpg", "PNG", ""])
def test_unknown_format(fmt: str) -> None:
    with pytest.raises(ValueError, match="format must be one of") as caught:
        encode_image(gradient(8, 8), fmt)
    assert repr(fmt) in str(caught.value)


# --- sidecar -----------------------------------------------------------------------------------


def sidecar_for(job: Job, key: BatchKey | None = None, job_ids: tuple[str, ...] | None = None) -> dict:
    key = key or batch_key(job, DEFAULTS)
    batch = BatchInfo(
        id="b1", job_ids=job_ids or ("other-0", job.job_id, "other-2"), inference_s=1.5, started_at=1000.0
    )
    timing = {"enqueued_at": 990.0, "started_at": 1000.0, "finished_at": 1002.0}
    return build_sidecar(
        job=job, key=key, image_url="s3://b/run-1/images/x.png", batch=batch, model=MODEL, worker=WORKER, timing=timing
    )


def test_sidecar_holds_the_recipe() -> None:
    job = make_job(negative_prompt="blurry", guidance=6.0, cache_branch=1, format="webp")
    sidecar = sidecar_for(job)
    assert sidecar["sidecar_version"] == SIDECAR_VERSION
    expected = {
        "job_id": job.job_id,
        "run_id": "run-1",
        "index": 3,
        "prompt": "a cat",
        "negative_prompt": "blurry",
        "seed": 42,
        "height": 64,
        "width": 96,
        "steps": 4,
        "guidance": 6.0,
        "format": "webp",
        "image": "s3://b/run-1/images/x.png",
    }
    assert {name: sidecar[name] for name in expected} == expected
    assert sidecar["scheduler"] == "ddim"  # the worker default, resolved
    assert sidecar["model"] == MODEL
    assert sidecar["deepcache"] == {"enabled": True, "interval": 3, "branch": 1}
    assert sidecar["batch"] == {"id": "b1", "size": 3, "index": 1, "job_ids": ["other-0", job.job_id, "other-2"]}
    assert sidecar["worker"] == WORKER
    assert sidecar["timing"]["enqueued_at"] == 990.0
    json.dumps(sidecar)  # serialisable as is


def test_sidecar_without_deepcache() -> None:
    job = make_job(cache_interval=1, cache_branch=2)
    sidecar = sidecar_for(job, job_ids=(job.job_id,))
    assert sidecar["deepcache"] == {"enabled": False, "interval": 1, "branch": None}
    assert sidecar["batch"]["size"] == 1 and sidecar["batch"]["index"] == 0
    assert sidecar["negative_prompt"] is None


def test_batch_info_size() -> None:
    assert BatchInfo("b", ("a", "b"), 1.0, 0.0).size == 2


PROMPTS = [
    "a cat",
    "日本の猫、桜の下で — 写真",  # non-ASCII: botocore refuses it in metadata
    "émoji 🐱 " * 200,
    "x" * MAX_PROMPT_CHARS,
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_s3_metadata_is_small_ascii_and_prompt_free(prompt: str) -> None:
    job = make_job(
        prompt=prompt[:MAX_PROMPT_CHARS],
        negative_prompt="ß" * MAX_PROMPT_CHARS,
        run_id="r" * 64,
        seed=2**32 - 1,
        height=2048,
        width=2048,
    )
    long_model = {"id": "x" * 500, "revision": "r" * 200, "hash": None}
    for model in (MODEL, long_model, {"id": "org/name"}):
        metadata = s3_metadata(job, model)
        assert set(metadata) == {"job-id", "run-id", "seed", "size", "model"}
        assert all(isinstance(v, str) for v in metadata.values())
        text = "".join(f"{k}{v}" for k, v in metadata.items())
        assert text.isascii()
        assert job.prompt not in text and "ß" not in text
        assert "cat" not in text
        # S3's limit: 2 KB of user metadata, keys (with x-amz-meta-) and values, UTF-8.
        assert sum(len(f"x-amz-meta-{k}".encode()) + len(v.encode()) for k, v in metadata.items()) < 2048
    metadata = s3_metadata(job, MODEL)
    assert metadata == {
        "job-id": job.job_id,
        "run-id": "r" * 64,
        "seed": "4294967295",
        "size": "2048x2048",
        "model": "sha256:0123456789abcdef",
    }
    assert s3_metadata(job, {"id": "org/name", "revision": "abc123"})["model"] == "abc123"
