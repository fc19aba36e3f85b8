"""The quality gate on SD1.5's full architecture (random weights, CPU) at every acceleration level.

Its own file, because compiling SD1.5's UNet is the suite's longest test: pytest-xdist runs it
beside test_acceleration.py's other tests instead of after them."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from tests.worker.test_acceleration import PSNR_GATE_DB, engine_images, psnr  # noqa: E402
from worker.pipeline.acceleration import Accelerator  # noqa: E402
from worker.pipeline.cuda_graphs import replay_by_rerun  # noqa: E402
from worker.pipeline.engine import Engine  # noqa: E402
from worker.pipeline.testmodel import build_pipeline  # noqa: E402


# Compiling (SD1.5's UNet, the benches' models) takes 4-10 min on 2 cores, more beside other work:
# the timeout only bounds a hang.
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_sd15_architecture_passes_the_quality_gate_at_every_level(compile_cache) -> None:
    """A guided batch of two through SD1.5's full UNet (random weights) at 64x64, DeepCache 3/0,
    at each level against eager, each on its own copy of one random-weight pipeline (building one
    takes longer than copying it). ``graphs`` (static buffers, replayed without CUDA) reuses the
    code ``compile`` compiled, so the UNet compiles once."""
    built = build_pipeline("sd15")
    built.set_progress_bar_config(disable=True)
    images = {}
    for level in ("off", "fuse", "compile", "graphs"):
        pipe = copy.deepcopy(built)
        cache_dir = compile_cache / "sd15"
        accelerator = Accelerator.prepare(pipe, level, "cpu", cache_dir=cache_dir, capture=replay_by_rerun)
        engine = Engine(pipe, device="cpu", model={"id": "sd15"}, accelerator=accelerator)
        images[level] = engine_images(engine, 2, steps=4)
        del engine, accelerator, pipe
    for level in ("fuse", "compile", "graphs"):
        assert psnr(images[level], images["off"]) >= PSNR_GATE_DB, level
