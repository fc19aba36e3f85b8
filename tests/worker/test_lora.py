"""LoRA adapters on the real tiny random-weight SD pipeline (CPU), issue 18 item 3: the batch key
keeps adapter sets apart; adapters change the pixels with DeepCache on and off and the base model
comes back bit-identical; each adapter loads once; a LoRA that cannot load fails its batch with
the reason and the engine keeps serving; acceleration above off refuses adapters.

Calls are 64x64 with 4 steps: a fraction of a second each on two CPU cores. Nothing here reads a
clock: the load and switch seconds are only checked to be there (and exactly 0 where nothing ran).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest

from producer.job import Job
from worker.delivery.batching import BatchBuffer, RecipeDefaults, batch_key

DEFAULTS = RecipeDefaults(model="tiny", scheduler="ddim", cache_interval=3, cache_branch=0)


def job(index: int = 0, **fields: Any) -> Job:
    base: dict[str, Any] = {"run_id": "lora-test", "height": 64, "width": 64, "steps": 4}
    return Job(**{**base, **fields, "index": index, "prompt": ["a cat", "a dog"][index % 2], "seed": 40 + index})


# --- the batch key (pure) -----------------------------------------------------------------------


def test_the_batch_key_separates_adapter_sets():
    sets = [None, ["a/x"], ["a/x:0.5"], ["a/x", "b/y"], ["b/y", "a/x"]]
    keys = [batch_key(job(loras=loras), DEFAULTS) for loras in sets]
    assert len(set(keys)) == len(sets)
    assert keys[0].loras == () and keys[1].loras == (("a/x", 1.0),) and keys[3].loras == (("a/x", 1.0), ("b/y", 1.0))
    assert batch_key(job(1, loras="a/x:1"), DEFAULTS) == keys[1]  # the same set: one call


def test_the_buffer_never_mixes_adapter_sets():
    buffer: BatchBuffer[Job] = BatchBuffer(max_batch=8, max_wait_s=0.0)
    for index in range(6):
        item = job(index, loras=[None, ["a/x"], ["b/y"]][index % 3])
        buffer.add(batch_key(item, DEFAULTS), item, 0.0)
    batches = [[item.index for item in items] for _, items in buffer.drain()]
    assert batches == [[0, 3], [1, 4], [2, 5]]


# --- on the pipeline ----------------------------------------------------------------------------

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")
np = pytest.importorskip("numpy")

from worker.pipeline.engine import Engine  # noqa: E402
from worker.settings import WorkerSettings  # noqa: E402


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Engine:
    return Engine.load(WorkerSettings(model=str(tiny_model), device="cpu"))


def generate(engine: Engine, loras: Any = None, *, cache_interval: int = 3) -> tuple[list[Any], Any]:
    """A batch of two (same prompts and seeds whatever the adapters), as int arrays."""
    jobs = [job(index, loras=loras, cache_interval=cache_interval) for index in range(2)]
    generated = engine.generate(batch_key(jobs[0], DEFAULTS), jobs)
    return [np.asarray(image, dtype=np.int16) for image in generated.images], generated


def same(a: list[Any], b: list[Any]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def differ(a: list[Any], b: list[Any]) -> bool:
    return all(np.abs(x - y).mean() > 1.0 for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("cache_interval", [3, 1], ids=["deepcache", "no-cache"])
def test_adapters_change_the_pixels_and_the_base_model_comes_back(engine, tiny_loras, cache_interval):
    la, lb = (str(path) for path in tiny_loras)
    base, _ = generate(engine, cache_interval=cache_interval)
    with_a, _ = generate(engine, [la], cache_interval=cache_interval)
    with_ab, _ = generate(engine, [f"{la}:0.5", lb], cache_interval=cache_interval)
    base_again, _ = generate(engine, cache_interval=cache_interval)
    with_a_again, _ = generate(engine, [la], cache_interval=cache_interval)
    off, _ = generate(engine, [f"{la}:0"], cache_interval=cache_interval)
    assert differ(with_a, base) and differ(with_ab, with_a) and differ(with_ab, base)
    assert same(base_again, base), "the base model after an adapter batch is not the base model"
    assert same(with_a_again, with_a), "an adapter batch after a switch differs from its first"
    assert same(off, base), "an adapter at scale 0 changed the pixels"


def test_deepcache_applies_the_adapters_in_its_shallow_steps_too(engine, tiny_loras):
    """With DeepCache the adapter's effect differs from caching alone: both kinds of step ran it."""
    la = str(tiny_loras[0])
    cached_base, _ = generate(engine, cache_interval=3)
    cached_a, _ = generate(engine, [la], cache_interval=3)
    plain_a, _ = generate(engine, [la], cache_interval=1)
    assert differ(cached_a, cached_base) and not same(cached_a, plain_a)


def test_each_adapter_loads_once_and_is_recorded_with_its_hash(engine, tiny_loras):
    la, lb = (str(path) for path in tiny_loras)
    sha = {
        path: hashlib.sha256((Path(path) / "pytorch_lora_weights.safetensors").read_bytes()).hexdigest()
        for path in (la, lb)
    }
    generate(engine, [la])  # loaded here or by an earlier test
    _, again = generate(engine, [la])
    assert again.loras == [{"id": la, "scale": 1.0, "sha256": sha[la]}]
    assert again.lora_timing == {"lora_load_s": 0.0, "lora_switch_s": 0.0}  # nothing to load or switch
    _, both = generate(engine, [f"{lb}:-0.5", la])
    assert both.loras == [{"id": lb, "scale": -0.5, "sha256": sha[lb]}, {"id": la, "scale": 1.0, "sha256": sha[la]}]
    assert set(both.lora_timing) == {"lora_load_s", "lora_switch_s"} and both.lora_timing["lora_switch_s"] > 0
    _, base = generate(engine)
    assert base.loras == [] and base.lora_timing["lora_load_s"] == 0.0 and base.lora_timing["lora_switch_s"] > 0
    assert [loaded.id for loaded in engine.adapters.loaded.values()].count(la) == 1


def test_a_lora_that_cannot_load_fails_its_batch_with_the_reason_and_the_engine_keeps_serving(
    engine, tiny_loras, tmp_path
):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file" * 8)
    empty = tmp_path / "empty"
    empty.mkdir()
    several = tmp_path / "several"
    several.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        shutil.copy(tiny_loras[0] / "pytorch_lora_weights.safetensors", several / name)
    expected = {
        str(tmp_path / "missing"): "no such file or folder on this worker",
        str(corrupt): "cannot be applied to this model: ",
        str(empty): "holds no .safetensors weights",
        str(several): "holds several .safetensors files (a.safetensors, b.safetensors): name the file itself",
    }
    adapters_before = engine.pipe.get_list_adapters()
    base, _ = generate(engine)
    for ident, reason in expected.items():
        key = batch_key(job(loras=[ident]), DEFAULTS)
        problem = engine.check(key)
        assert problem is not None and problem.startswith(f"LoRA {ident!r}") and reason in problem, problem
        with pytest.raises(ValueError, match="LoRA"):
            engine.generate(key, [job(loras=[ident])])
    assert engine.pipe.get_list_adapters() == adapters_before  # nothing left of the failed loads
    assert same(generate(engine)[0], base)
    one_file = str(several / "a.safetensors")  # the file itself loads
    assert engine.check(batch_key(job(loras=[one_file]), DEFAULTS)) is None
    assert differ(generate(engine, [one_file])[0], base)


def test_acceleration_above_off_refuses_adapters(engine, tiny_loras, monkeypatch):
    monkeypatch.setattr(engine.accelerator, "level", "fuse")
    problem = engine.check(batch_key(job(loras=[str(tiny_loras[0])]), DEFAULTS))
    assert problem is not None and problem.startswith("LoRA adapters need DEEPQUEUE_ACCELERATION=off")
    assert engine.check(batch_key(job(), DEFAULTS)) is None  # base-model batches run as before


def test_a_failed_load_is_remembered_for_a_while_then_tried_again(engine, tiny_loras, tmp_path, monkeypatch):
    """Batches naming a LoRA that just failed fail at once with its reason (no new Hub lookup per
    batch); after RETRY_FAILED_S the next one tries again and finds the file that appeared."""
    from worker.pipeline.lora import RETRY_FAILED_S

    now = [1000.0]
    monkeypatch.setattr(engine.adapters, "clock", lambda: now[0])
    late = tmp_path / "late"
    key = batch_key(job(loras=[str(late)]), DEFAULTS)
    assert "no such file or folder" in (engine.check(key) or "")
    shutil.copytree(tiny_loras[1], late)
    now[0] += RETRY_FAILED_S - 1
    assert "no such file or folder" in (engine.check(key) or "")  # remembered
    now[0] += 2
    assert engine.check(key) is None and str(late) in engine.adapters.loaded


def test_a_hub_id_is_read_as_a_downloaded_folder(tiny_loras, monkeypatch):
    """``owner/name`` goes to the Hub (here: a stand-in for snapshot_download, no network), and
    the folder it gives is read like a local one; a failure says the id is neither here nor there."""
    import huggingface_hub

    from worker.pipeline.lora import LoraError, weights_file

    asked = []

    def snapshot(repo_id: str, allow_patterns: list[str]) -> str:
        asked.append((repo_id, allow_patterns))
        return str(tiny_loras[0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    assert weights_file("someone/ink-lora") == tiny_loras[0] / "pytorch_lora_weights.safetensors"
    assert asked == [("someone/ink-lora", ["*.safetensors"])]

    def offline(repo_id: str, allow_patterns: list[str]) -> str:
        raise OSError("cannot reach the Hub:\nno network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(LoraError) as info:
        weights_file("someone/ink-lora")
    assert (
        str(info.value)
        == "LoRA 'someone/ink-lora': not a file or folder here, and not on the Hub: cannot reach the Hub: no network"
    )
