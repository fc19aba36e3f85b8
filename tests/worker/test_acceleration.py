"""worker.pipeline: unet_steps, cuda_graphs and acceleration on the real tiny pipelines (CPU).

The step functions are checked against DeepCache's own helper, image for image; the levels that
compile are checked with the quality gate (PSNR against the eager DeepCache path, >= 50 dB in
fp32) and by counting what dynamo compiles. Compiling takes minutes on two cores: the tiny model's
kernels come from the run's shared compile cache (``compiled_tiny``), so they compile once per run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from DeepCache import DeepCacheSDHelper  # noqa: E402

from producer.job import Job  # noqa: E402
from worker.delivery.batching import RecipeDefaults, batch_key  # noqa: E402
from worker.pipeline.acceleration import (  # noqa: E402
    CUDA_DEFAULT,
    Accelerator,
    compile_cache_dir,
    padded_size,
    resolve_level,
)
from worker.pipeline.cuda_graphs import GraphCache, replay_by_rerun  # noqa: E402
from worker.pipeline.deepcache import branch_count  # noqa: E402
from worker.pipeline.engine import Engine  # noqa: E402
from worker.pipeline.unet_steps import CachedSteps, Stepper  # noqa: E402
from worker.settings import WorkerSettings, parse_warm_shapes  # noqa: E402

#: The quality gate in fp32 on CPU (issue 15): PSNR of an accelerated image against eager DeepCache.
PSNR_GATE_DB = 50.0
PROMPTS = ["a photo of a cat", "a dog", "the cat"]
DEFAULTS = RecipeDefaults(model="tiny", scheduler="ddim", cache_interval=3, cache_branch=0)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def load_pipe(path: Path) -> Any:
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe: Any, count: int = 2, steps: int = 7) -> np.ndarray:
    """Floats in [0, 1], one seed per image."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in range(count)]
    with torch.inference_mode():
        return pipe(
            PROMPTS[:count], num_inference_steps=steps, generator=generators, output_type="np", height=64, width=64
        ).images


def helper_images(pipe: Any, interval: int, branch: int) -> np.ndarray:
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return images(pipe)
    finally:
        helper.disable()


@contextmanager
def stepped(pipe: Any, interval: int, steps: CachedSteps, graphs: GraphCache | None = None) -> Iterator[None]:
    """The UNet's forward replaced by full/shallow steps (replayed through ``graphs`` if given),
    as ``Accelerator.active`` does."""
    run = steps.run
    if graphs is not None:

        def run(step: Any, reuse: Any, *args: Any, **kwargs: Any) -> Any:
            return graphs.run(steps, step, reuse, args, kwargs)

    with steps.installed():
        pipe.unet.forward = Stepper(steps, interval, run)
        try:
            yield
        finally:
            del pipe.unet.forward


# --- the steps are DeepCache's, image for image -----------------------------------------------------


@pytest.mark.parametrize("model", ["tiny", "sdxl-tiny"])
def test_full_and_shallow_steps_give_deepcaches_images_on_every_branch(model, tiny_model, sdxl_tiny) -> None:
    pipe = load_pipe(tiny_model if model == "tiny" else sdxl_tiny)
    plain = images(pipe)
    for branch in range(branch_count(pipe.unet)):
        for interval in (2, 3):
            expected = helper_images(pipe, interval, branch)
            with stepped(pipe, interval, CachedSteps(pipe.unet, branch)):
                got = images(pipe)
            assert np.array_equal(got, expected), (model, branch, interval)
    assert not np.array_equal(expected, plain)  # the cache was used: skipping changes the images
    for module in pipe.unet.modules():  # every wrapper given back (the helper leaves bound methods)
        assert getattr(module.forward, "__func__", None) is type(module).forward, type(module).__name__


def test_captured_steps_replay_deepcaches_images(tiny_model) -> None:
    """Static inputs and outputs, the shallow step reading the full step's outputs in place:
    what a CUDA graph does, replayed here by running the step again into the same tensors."""
    pipe = load_pipe(tiny_model)
    expected = helper_images(pipe, 3, 1)
    graphs = GraphCache(limit=2, capture=replay_by_rerun)
    steps = CachedSteps(pipe.unet, 1)
    for _ in range(2):  # captured on the first batch, replayed on the second
        with stepped(pipe, 3, steps, graphs):
            got = images(pipe)
        assert np.array_equal(got, expected)
    assert len(graphs) == 2  # full and shallow, at one shape


def test_captured_shapes_beyond_the_limit_drop_the_least_recently_used(tiny_model) -> None:
    pipe = load_pipe(tiny_model)
    graphs = GraphCache(limit=1, capture=replay_by_rerun)
    steps = CachedSteps(pipe.unet, 0)
    for count in (1, 2, 1):
        with stepped(pipe, 2, steps, graphs):
            images(pipe, count=count, steps=3)
        assert len(graphs) == 2  # one shape's full and shallow steps


def test_a_shape_whose_capture_fails_runs_uncaptured_and_says_so_once(tiny_model, caplog) -> None:
    """The full step captured, the shallow step's capture failing (as a CUDA capture can, on an
    op that synchronises): the images are still DeepCache's, and the shape is not tried again."""
    pipe = load_pipe(tiny_model)
    expected = helper_images(pipe, 3, 1)
    captures: list[int] = []

    def fails_second(fn: Any, pool: Any) -> Any:
        captures.append(1)
        if len(captures) > 1:
            raise RuntimeError("operation not permitted when stream is capturing")
        return replay_by_rerun(fn, pool)

    graphs = GraphCache(limit=2, capture=fails_second)
    steps = CachedSteps(pipe.unet, 1)
    with caplog.at_level(logging.WARNING, logger="worker.pipeline.cuda_graphs"):
        for _ in range(2):
            with stepped(pipe, 3, steps, graphs):
                got = images(pipe)
            assert np.array_equal(got, expected)
    assert len(captures) == 2 and len(graphs) == 0 and len(graphs.uncaptured) == 1
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "could not capture the shallow step" in caplog.records[0].message


# --- settings and choices ---------------------------------------------------------------------------


def test_levels_by_device(caplog) -> None:
    assert resolve_level("auto", "cpu") == "off"
    assert resolve_level("auto", "cuda:0") == CUDA_DEFAULT
    assert resolve_level("fuse", "cpu") == "fuse"
    with caplog.at_level(logging.WARNING, logger="worker.pipeline.acceleration"):
        assert resolve_level("graphs", "cpu") == "compile"
    assert [record.getMessage() for record in caplog.records] == [
        "acceleration graphs needs CUDA; cpu runs it as compile"
    ]
    assert resolve_level("graphs", "cuda") == "graphs"


def test_a_partial_batch_runs_at_the_smallest_compiled_size_that_holds_it() -> None:
    assert padded_size(5, {8, 4}) == 8
    assert padded_size(3, {8, 4}) == 4
    assert padded_size(4, {8, 4}) == 4
    assert padded_size(3, set()) == 3  # nothing ready: its own size, compiled on first use
    assert padded_size(9, {8}) == 9


def test_the_compile_cache_is_kept_apart_by_model_torch_and_device(tmp_path) -> None:
    model = {"id": "m", "revision": None, "hash": "sha256:1"}
    base = compile_cache_dir(tmp_path, model, "2.13.0", "NVIDIA H200")
    assert base.parent == tmp_path
    assert base == compile_cache_dir(tmp_path, dict(model), "2.13.0", "NVIDIA H200")
    others = {
        compile_cache_dir(tmp_path, {**model, "hash": "sha256:2"}, "2.13.0", "NVIDIA H200"),
        compile_cache_dir(tmp_path, model, "2.14.0", "NVIDIA H200"),
        compile_cache_dir(tmp_path, model, "2.13.0", "NVIDIA H100"),
    }
    assert base not in others and len(others) == 3


def test_warm_shapes() -> None:
    assert parse_warm_shapes("512x512:8, 768X512:4,64x64") == [(512, 512, 8), (768, 512, 4), (64, 64, 1)]
    assert parse_warm_shapes("") == []
    for bad, says in [
        ("512x512:x", "not WIDTHxHEIGHT:IMAGES"),
        ("500x512:8", "multiples of 8"),
        ("512:8", "not WIDTHxHEIGHT:IMAGES"),
    ]:
        with pytest.raises(ValueError, match=says):
            parse_warm_shapes(bad)
    with pytest.raises(ValueError, match="above max_batch"):
        WorkerSettings(warm_shapes="512x512:16", max_batch=8)


# --- levels on the engine ---------------------------------------------------------------------------


def engine_call(engine: Engine, count: int, **fields: Any) -> tuple[np.ndarray, dict[str, int]]:
    """The images as floats in [0, 1], and what the call compiled."""
    base: dict[str, Any] = {"run_id": "accel", "height": 64, "width": 64, "steps": 7, **fields}
    jobs = [Job(**base, index=i, prompt=PROMPTS[i], seed=i) for i in range(count)]
    generated = engine.generate(batch_key(jobs[0], DEFAULTS), jobs)
    return np.stack([np.asarray(image, dtype=np.float64) / 255 for image in generated.images]), generated.compiles


def engine_images(engine: Engine, count: int, **fields: Any) -> np.ndarray:
    return engine_call(engine, count, **fields)[0]


@pytest.fixture(scope="module")
def eager(tiny_model) -> Engine:
    return Engine.load(WorkerSettings(model=str(tiny_model), device="cpu", acceleration="off"))


def test_fuse_passes_the_quality_gate_and_says_so(tiny_model, eager) -> None:
    fused = Engine.load(WorkerSettings(model=str(tiny_model), device="cpu", acceleration="fuse"))
    assert fused.describe()["acceleration"] == "fuse"
    assert eager.describe()["acceleration"] == "off"
    assert fused.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert psnr(engine_images(fused, 2), engine_images(eager, 2)) >= PSNR_GATE_DB


# Compiling (SD1.5's UNet, the benches' models) takes 4-10 min on 2 cores, more beside other work:
# the timeout only bounds a hang.
@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("level", ["compile", "graphs"])
def test_compiled_levels_pass_the_quality_gate_and_compile_each_shape_once(
    level, tiny_model, eager, compiled_tiny
) -> None:
    """A mixed-shape queue: each shape compiles on its first batch only; a partial batch runs
    padded to a compiled size; DeepCache on and off (plain steps) both pass the gate."""
    torch._dynamo.reset()  # dynamo keeps compiled code per function: the other level's would serve this one
    loaded = Engine.load(WorkerSettings(model=str(tiny_model), device="cpu", acceleration="off"))
    # At graphs, CUDA graphs' static buffers, replayed without CUDA.
    # The worker's own cache folder for this model: the integration tests' workers read it back.
    cache_dir = compile_cache_dir(compiled_tiny, loaded.model, torch.__version__, "cpu")
    accelerator = Accelerator.prepare(loaded.pipe, level, "cpu", cache_dir=cache_dir, capture=replay_by_rerun)
    engine = Engine(loaded.pipe, device="cpu", model=loaded.model, accelerator=accelerator)
    assert engine.describe()["acceleration"] == level
    queue = [(2, {}), (2, {"cache_interval": 1}), (2, {}), (1, {}), (2, {"cache_interval": 1}), (2, {})]
    compiled = []
    for count, fields in queue:
        got, compiles = engine_call(engine, count, **fields)
        compiled.append(compiles.get("graphs", 0))
        assert psnr(got, engine_images(eager, count, **fields)) >= PSNR_GATE_DB, (level, count, fields)
    # First batches trace their graphs (full + shallow steps, then plain steps, and the VAE decoder
    # with the first; the kernels are read back); the rest, the batch of 1 padded to 2 among them,
    # trace nothing.
    assert compiled[0] > 0 and compiled[1] > 0, compiled
    assert compiled[2:] == [0, 0, 0, 0], compiled
