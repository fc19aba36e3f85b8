"""worker.pipeline.engine and worker.pipeline.deepcache on the real tiny random-weight SD pipeline (CPU).

Every call is 64x64 with 2-6 steps: a fraction of a second each on two CPU cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, get_args

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("DeepCache")
np = pytest.importorskip("numpy")

from producer.job import Job, SchedulerName  # noqa: E402
from worker.delivery.batching import BatchKey, RecipeDefaults, batch_key  # noqa: E402
from worker.pipeline.deepcache import branch_count  # noqa: E402
from worker.pipeline.engine import SCHEDULERS, Engine, decode_needs_slicing  # noqa: E402
from worker.pipeline.model import ModelError, model_fingerprint  # noqa: E402
from worker.settings import WorkerSettings  # noqa: E402

DEFAULTS = RecipeDefaults(model="tiny", scheduler="ddim", cache_interval=3, cache_branch=0)
PROMPTS = ["a photo of a cat", "a dog", "the cat", "a photo", "dog", "cat cat"]


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Engine:
    return Engine.load(WorkerSettings(model=str(tiny_model), device="cpu"))


def jobs(seeds: list[int], **fields: Any) -> list[Job]:
    base: dict[str, Any] = {"run_id": "engine-test", "height": 64, "width": 64, "steps": 4}
    return [
        Job(**{**base, **fields, "index": i, "prompt": PROMPTS[i % len(PROMPTS)], "seed": seed})
        for i, seed in enumerate(seeds)
    ]


def run(engine: Engine, batch: list[Job]) -> list[Any]:
    """Generate a batch (all jobs share a key) and return the images as int arrays."""
    keys = {batch_key(job, DEFAULTS) for job in batch}
    assert len(keys) == 1
    images = engine.generate(keys.pop(), batch).images
    assert len(images) == len(batch)
    return [np.asarray(image, dtype=np.int16) for image in images]


def assert_unwrapped(engine: Engine, unet_forward: Any) -> None:
    """No DeepCache wrapper is left on the UNet or any of its blocks."""
    unet = engine.pipe.unet
    assert unet.forward == unet_forward  # the original bound method
    for module in unet.modules():
        forward = module.forward
        assert getattr(forward, "__self__", None) is module, f"{type(module).__name__} still wrapped"
        assert forward.__func__ is type(module).forward


# --- load ---------------------------------------------------------------------------------------


def test_load(engine: Engine, tiny_model: Path) -> None:
    assert type(engine.pipe).__name__ == "StableDiffusionPipeline"
    assert engine.device == "cpu"
    assert engine.pipe.unet.dtype == torch.float32
    assert engine.model["id"] == str(tiny_model)
    assert engine.model["revision"] is None
    assert engine.model["hash"].startswith("sha256:") and len(engine.model["hash"]) == 7 + 16
    assert engine.deepcache.branches == 5  # block 0: 2 resnets + downsampler, block 1: 2 resnets
    described = engine.describe()
    assert described["device"] == "cpu"
    assert described["dtype"] == "float32"
    assert described["pipeline"] == "StableDiffusionPipeline"
    assert described["torch"] == torch.__version__
    assert described["deepcache"] == "0.1.1"
    assert described["diffusers"]


def test_load_refuses_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelError, match="cannot load model") as caught:
        Engine.load(WorkerSettings(model=str(tmp_path), device="cpu"))
    assert str(tmp_path) in str(caught.value)
    assert caught.value.__cause__ is not None


def test_load_refuses_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot load model"):
        Engine.load(WorkerSettings(model=str(tmp_path / "missing"), device="cpu"))


# --- generate -----------------------------------------------------------------------------------


def test_generate_a_batch_of_two(engine: Engine) -> None:
    batch = jobs([1, 2])
    generated = engine.generate(batch_key(batch[0], DEFAULTS), batch)
    assert len(generated.images) == 2
    assert all(image.size == (64, 64) and image.mode == "RGB" for image in generated.images)
    assert generated.seconds > 0
    first, second = (np.asarray(image, dtype=np.int16) for image in generated.images)
    assert np.abs(first - second).mean() > 5  # different seeds, different images
    assert type(engine.pipe.scheduler).__name__ == "DDIMScheduler"


def test_height_and_width_are_not_swapped(engine: Engine) -> None:
    batch = jobs([1], height=64, width=96, steps=2)
    (image,) = engine.generate(batch_key(batch[0], DEFAULTS), batch).images
    assert image.size == (96, 64)  # PIL: (width, height)


def test_negative_prompts_per_image(engine: Engine) -> None:
    with_negatives = jobs([5, 6], negative_prompt="blurry")
    with_negatives[1] = with_negatives[1].model_copy(update={"negative_prompt": "a dog"})
    images = run(engine, with_negatives)
    without = run(engine, jobs([5, 6]))
    assert not np.array_equal(images[0], without[0])  # the negative prompt is used


def test_a_missing_negative_prompt_is_the_empty_one_so_both_share_a_call(engine: Engine, tiny_model: Path) -> None:
    """SD 1.x/2.x encode no negative prompt as "": the same pixels either way, which is why
    such jobs share a batch key (and SDXL's zeroed embeddings keep them apart)."""
    from worker.pipeline.model import empty_negative_is_default, read_model_index

    defaults = RecipeDefaults("tiny", "ddim", 3, 0, empty_negative_is_default(read_model_index(str(tiny_model))))
    assert defaults.empty_negative_is_default
    none, empty = jobs([7]), jobs([7], negative_prompt="")
    assert batch_key(none[0], defaults) == batch_key(empty[0], defaults)
    apart = engine.generate(batch_key(none[0], DEFAULTS), none).images[0]  # None passed to diffusers
    shared = engine.generate(batch_key(none[0], defaults), none).images[0]  # [""]: what a shared call passes
    assert np.array_equal(np.asarray(apart), np.asarray(shared))


def test_seeds_are_per_image(engine: Engine) -> None:
    """Image i of a batch is (nearly) the image of seed i alone; the same batch is exact."""
    pair = jobs([11, 22])
    batched = run(engine, pair)
    assert all(np.array_equal(a, b) for a, b in zip(batched, run(engine, pair), strict=True))
    alone = [run(engine, [job])[0] for job in pair]
    # "The same seed can give slightly different pixels at another batch size": batched
    # matmuls may round differently. Seen here: at most 1/255 on a few pixels.
    for a, b in zip(batched, alone, strict=True):
        assert np.abs(a - b).max() <= 8
        assert np.abs(a - b).mean() < 0.5
    # Swapping the order swaps the images (near-equality for the same reason).
    swapped = run(engine, [pair[1].model_copy(update={"index": 0}), pair[0].model_copy(update={"index": 1})])
    assert np.abs(swapped[0] - batched[1]).max() <= 8
    assert np.abs(swapped[1] - batched[0]).max() <= 8
    assert np.abs(batched[0] - batched[1]).mean() > 5


def test_deepcache_off_is_the_plain_pipeline(engine: Engine) -> None:
    batch = jobs([3, 4], steps=6, cache_interval=1)
    key = batch_key(batch[0], DEFAULTS)
    assert not key.deepcache
    ours = run(engine, batch)
    plain = engine.pipe(
        prompt=[job.prompt for job in batch],
        height=64,
        width=64,
        num_inference_steps=6,
        guidance_scale=batch[0].guidance,
        output_type="pil",
        generator=[torch.Generator("cpu").manual_seed(job.seed) for job in batch],
    ).images
    assert all(np.array_equal(a, np.asarray(b, dtype=np.int16)) for a, b in zip(ours, plain, strict=True))


def test_deepcache_on_changes_pixels_and_is_deterministic(engine: Engine) -> None:
    off = run(engine, jobs([3, 4], steps=6, cache_interval=1))
    on = run(engine, jobs([3, 4], steps=6, cache_interval=3))
    assert any(not np.array_equal(a, b) for a, b in zip(on, off, strict=True))  # it really cached
    again = run(engine, jobs([3, 4], steps=6, cache_interval=3))
    assert all(np.array_equal(a, b) for a, b in zip(on, again, strict=True))


def test_guard_survives_many_batches(engine: Engine) -> None:
    """Back-to-back batches of other sizes, intervals, branches and CFG on/off: no RecursionError
    or KeyError from DeepCache, no stale cache, the UNet unwrapped after each."""
    unet_forward = engine.pipe.unet.forward
    probe = jobs([77], steps=5, cache_interval=3, cache_branch=1)
    reference = run(engine, probe)
    plans = [
        dict(n=3, cache_interval=3, cache_branch=0),
        dict(n=1, cache_interval=2, cache_branch=4),
        dict(n=2, cache_interval=1),
        dict(n=4, cache_interval=5, cache_branch=2, steps=6),
        dict(n=2, cache_interval=3, cache_branch=1, guidance=1.0),  # no CFG: half the UNet batch
        dict(n=1, cache_interval=3, cache_branch=0, height=96),
        dict(n=3, cache_interval=2, cache_branch=3, scheduler="euler"),
        dict(n=2, cache_interval=1, scheduler="heun", steps=2),
    ]
    for plan in plans:
        n = plan.pop("n")
        fields = {"steps": 3, **plan}
        images = run(engine, jobs(list(range(100, 100 + n)), **fields))
        assert all(image.shape == (fields.get("height", 64), 64, 3) for image in images)
        assert_unwrapped(engine, unet_forward)
    # The same job after all that: same pixels as before (nothing cached across calls).
    assert np.array_equal(run(engine, probe)[0], reference[0])
    assert_unwrapped(engine, unet_forward)


def test_guard_is_disabled_after_an_error_in_the_pipeline(engine: Engine, monkeypatch) -> None:
    unet_forward = engine.pipe.unet.forward
    calls = {"n": 0}
    original_step = type(engine.pipe.scheduler).step

    def failing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure mid-denoising")
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(type(engine.pipe.scheduler), "step", failing_step)
    batch = jobs([1, 2], steps=4, cache_interval=2)
    with pytest.raises(RuntimeError, match="injected failure"):
        engine.generate(batch_key(batch[0], DEFAULTS), batch)
    monkeypatch.undo()
    assert calls["n"] == 2
    assert_unwrapped(engine, unet_forward)
    # The helper can be enabled again (a second enable() would be a RecursionError).
    assert len(run(engine, batch)) == 2
    assert_unwrapped(engine, unet_forward)


def test_guard_is_disabled_after_an_error_in_its_block(engine: Engine) -> None:
    unet_forward = engine.pipe.unet.forward
    with pytest.raises(KeyboardInterrupt):
        with engine.deepcache.active(3, 0):
            assert engine.pipe.unet.forward != unet_forward  # wrapped while active
            raise KeyboardInterrupt  # not even an Exception
    assert_unwrapped(engine, unet_forward)
    with engine.deepcache.active(1, 0):  # interval 1: nothing is wrapped
        assert engine.pipe.unet.forward == unet_forward


def test_guard_refuses_a_missing_branch_before_wrapping(engine: Engine) -> None:
    unet_forward = engine.pipe.unet.forward
    with pytest.raises(ValueError, match="cache_branch 5 does not exist"):
        with engine.deepcache.active(3, 5):
            pytest.fail("must not get here")
    assert_unwrapped(engine, unet_forward)
    assert len(run(engine, jobs([1], steps=2, cache_interval=3))) == 1


def key_for(**fields: Any) -> BatchKey:
    base: dict[str, Any] = dict(
        model="tiny",
        height=64,
        width=64,
        steps=4,
        guidance=7.5,
        scheduler="ddim",
        cache_interval=3,
        cache_branch=0,
        negative_prompt=False,
        format="png",
    )
    return BatchKey(**{**base, **fields})


def test_check(engine: Engine) -> None:
    assert engine.check(key_for()) is None
    assert engine.check(key_for(cache_branch=4)) is None  # the last branch of the tiny UNet
    assert "cache_branch 5 does not exist" in engine.check(key_for(cache_branch=5))
    assert "0..4" in engine.check(key_for(cache_branch=11))
    assert engine.check(key_for(cache_interval=1, cache_branch=7)) is None  # caching off
    problem = engine.check(key_for(scheduler="heun"))
    assert problem and "heun" in problem and "DeepCache" in problem
    assert engine.check(key_for(scheduler="heun", cache_interval=1)) is None
    assert "unknown scheduler 'sde'" == engine.check(key_for(scheduler="sde"))


@pytest.mark.parametrize("bad", [dict(cache_branch=5), dict(scheduler="kdpm2"), dict(scheduler="sde")])
def test_generate_refuses_what_check_refuses(engine: Engine, bad: dict[str, Any]) -> None:
    unet_forward = engine.pipe.unet.forward
    batch = jobs([1], steps=2)
    with pytest.raises(ValueError, match=r"."):
        engine.generate(key_for(steps=2, **bad), batch)
    assert_unwrapped(engine, unet_forward)


def test_every_job_scheduler_has_a_diffusers_class() -> None:
    assert set(SCHEDULERS) == set(get_args(SchedulerName))


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_scheduler_runs(engine: Engine, scheduler: str) -> None:
    interval = 1 if engine.check(key_for(scheduler=scheduler)) else 2
    batch = jobs([9, 10], steps=3, scheduler=scheduler, cache_interval=interval)
    images = run(engine, batch)
    assert type(engine.pipe.scheduler).__name__ == SCHEDULERS[scheduler]
    assert all(image.shape == (64, 64, 3) and np.isfinite(image).all() for image in images)
    assert images[0].std() > 0  # not a blank image


def test_pndm_is_plms_even_from_a_ddim_config(engine: Engine) -> None:
    """The tiny model ships DDIM; PNDM built from that config must skip the Runge-Kutta warm-up
    (SD's own setting): otherwise 1-3 steps crash and 4 steps cost 13 UNet calls."""
    calls = []
    handle = engine.pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        for steps in (1, 2, 4):
            calls.clear()
            run(engine, jobs([1], steps=steps, scheduler="pndm", cache_interval=1))
            assert engine.pipe.scheduler.config.skip_prk_steps is True
            assert len(calls) <= steps + 1  # PLMS repeats one timestep
    finally:
        handle.remove()


def test_branch_count_of_an_sd15_shaped_unet() -> None:
    def block(resnets: int, down: bool) -> SimpleNamespace:
        return SimpleNamespace(resnets=[object()] * resnets, downsamplers=[object()] if down else None)

    sd15 = SimpleNamespace(down_blocks=[block(2, True), block(2, True), block(2, True), block(2, False)])
    assert branch_count(sd15) == 11  # branch ids 0..10 (3 x block + layer)
    tiny = SimpleNamespace(down_blocks=[block(2, True), block(2, False)])
    assert branch_count(tiny) == 5


# --- model fingerprint --------------------------------------------------------------------------


def test_model_fingerprint(tiny_model: Path, tmp_path: Path) -> None:
    first = model_fingerprint(str(tiny_model), None)
    assert first == model_fingerprint(str(tiny_model), None)
    assert first["id"] == str(tiny_model) and first["revision"] is None
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    copied = model_fingerprint(str(copy), "v1")
    assert copied["hash"] == first["hash"]  # same files, same hash wherever they are
    assert (copied["id"], copied["revision"]) == (str(copy), "v1")

    config_path = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["beta_end"] = 0.02
    config_path.write_text(json.dumps(config))
    changed = model_fingerprint(str(copy), None)["hash"]
    assert changed != first["hash"]

    (copy / "unet" / "extra.txt").write_text("x")  # a new file changes it too
    assert model_fingerprint(str(copy), None)["hash"] not in (first["hash"], changed)


def test_model_fingerprint_of_a_hub_id_not_in_the_cache() -> None:
    # Looked up with local_files_only: no network, the id and revision are all it knows.
    assert model_fingerprint("some-org/some-model-not-cached", "main") == {
        "id": "some-org/some-model-not-cached",
        "revision": "main",
    }


def test_decode_needs_slicing_only_when_the_batch_might_not_fit() -> None:
    gib = 2**30
    # SD at 512x512 in fp16, 8 images: about 5 GiB estimated; plenty free on a big card.
    assert not decode_needs_slicing(8, 512, 512, 2, 100 * gib)
    assert decode_needs_slicing(8, 512, 512, 2, 6 * gib)
    assert decode_needs_slicing(8, 1024, 1024, 2, 24 * gib)
    assert not decode_needs_slicing(1, 2048, 2048, 4, 1)  # one image: nothing to slice
    assert decode_needs_slicing(2, 64, 64, 4, None)  # unknown free memory: slice


@pytest.mark.parametrize(("setting", "expected"), [("on", True), ("off", False), ("auto", False)])
def test_vae_slicing_follows_the_setting(tiny_model: Path, setting: str, expected: bool) -> None:
    engine = Engine.load(WorkerSettings(model=str(tiny_model), device="cpu", vae_slicing=setting))
    batch = jobs([1, 2])
    engine.generate(batch_key(batch[0], DEFAULTS), batch)
    assert engine.pipe.vae.use_slicing is expected  # auto: two 64x64 images fit in this machine's RAM


def test_the_scheduler_is_swapped_only_when_a_batch_asks_for_another(engine: Engine) -> None:
    first = jobs([1], scheduler="euler")
    engine.generate(batch_key(first[0], DEFAULTS), first)
    euler = engine.pipe.scheduler
    engine.generate(batch_key(first[0], DEFAULTS), first)
    assert engine.pipe.scheduler is euler
    other = jobs([1], scheduler="ddim")
    engine.generate(batch_key(other[0], DEFAULTS), other)
    assert type(engine.pipe.scheduler).__name__ == "DDIMScheduler"
