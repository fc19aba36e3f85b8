"""The simulated device: a + b x batch size seconds per call, images of the right size."""

from __future__ import annotations

import time

import numpy as np
import pytest

from producer.job import Job
from worker.delivery.batching import RecipeDefaults, batch_key
from worker.pipeline.engine import load_engine
from worker.pipeline.model import ModelError, SimulatedDevice, check_pipeline_class, parse_simulated, read_model_index
from worker.pipeline.simulated import SimulatedEngine
from worker.settings import WorkerSettings


@pytest.mark.parametrize(
    ("name", "device"),
    [
        ("simulated:a=0.05,b=0.01", SimulatedDevice(0.05, 0.01)),
        ("simulated:b=0.2", SimulatedDevice(0.05, 0.2)),
        ("simulated:", SimulatedDevice()),
        ("simulated:a=0,b=0", SimulatedDevice(0.0, 0.0)),
        ("models/tiny", None),
    ],
)
def test_parse_simulated(name: str, device: SimulatedDevice | None) -> None:
    assert parse_simulated(name) == device


@pytest.mark.parametrize("name", ["simulated:a", "simulated:a=x", "simulated:c=1", "simulated:a=-1", "simulated:b=nan"])
def test_a_malformed_simulated_device_is_refused_with_the_format(name: str) -> None:
    with pytest.raises(ModelError, match="expected simulated:a=SECONDS,b=SECONDS"):
        parse_simulated(name)


def test_a_simulated_model_passes_the_workers_model_check_and_batches_like_sd() -> None:
    index = read_model_index("simulated:a=0.01")
    assert check_pipeline_class("simulated:a=0.01", index) == "StableDiffusionPipeline"
    assert WorkerSettings(model="simulated:a=0.01").recipe_defaults().empty_negative_is_default


def test_a_call_takes_a_plus_b_per_image_and_returns_seeded_images_of_the_right_size() -> None:
    engine = load_engine(WorkerSettings(model="simulated:a=0.05,b=0.02", storage="local"))
    assert isinstance(engine, SimulatedEngine)
    jobs = [Job(run_id="r", index=i, prompt="p", seed=i, width=96, height=64) for i in range(4)]
    key = batch_key(jobs[0], RecipeDefaults("simulated:a=0.05,b=0.02", "ddim", 3, 0))
    started = time.perf_counter()
    generated = engine.generate(key, jobs)
    assert time.perf_counter() - started >= 0.05 + 4 * 0.02 <= generated.seconds
    assert [image.size for image in generated.images] == [(96, 64)] * 4
    again = engine.generate(key, jobs[:1]).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(generated.images[0]))  # seeded per job
    assert not np.array_equal(np.asarray(generated.images[0]), np.asarray(generated.images[1]))
    assert engine.describe()["device"] == "simulated" and engine.model["id"] == "simulated:a=0.05,b=0.02"
