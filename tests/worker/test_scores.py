"""worker.pipeline.scores on the tiny random CLIP and safety checker (built locally, loaded with
``from_pretrained``), and the executor's use of it: scores in the sidecar and the manifest row,
score time in the timing, and failures that leave the images stored with null scores."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("imagehash")
Image = pytest.importorskip("PIL.Image")

import numpy as np  # noqa: E402

from producer.layout import image_key, sidecar_key  # noqa: E402
from producer.near_dups import parse_phash  # noqa: E402
from producer.storage import LocalStorage  # noqa: E402
from tests.helpers import local_worker_settings, make_job  # noqa: E402
from worker.embedded import MemoryReporter  # noqa: E402
from worker.pipeline import scores as scores_module  # noqa: E402
from worker.pipeline.engine import Engine  # noqa: E402
from worker.pipeline.executor import BatchExecutor, Delivery  # noqa: E402
from worker.pipeline.scores import ScoreModels, Scorer, clip_score, parse_scores, wanted  # noqa: E402
from worker.settings import WorkerSettings  # noqa: E402

ALL = frozenset({"phash", "clip", "nsfw"})


def noise(seed: int, side: int = 64) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.fixture(scope="module")
def scorer(score_models: dict[str, Path]) -> Scorer:
    return Scorer(ScoreModels(str(score_models["clip"]), str(score_models["nsfw"])))


def test_every_score_for_the_images_that_asked_and_only_those(scorer: Scorer) -> None:
    images = [noise(seed) for seed in range(4)]
    result = scorer.score(images, ["a cat", "a dog " * 200, "x", "y"], [ALL, frozenset({"clip"}), frozenset(), ALL])
    first, second, third, fourth = result.images
    assert first.keys() == fourth.keys() == {"phash", "clip_score", "nsfw"}
    assert second.keys() == {"clip_score"}  # a prompt far over 77 tokens is cut, not refused
    assert third == {}
    for values in (first, fourth):
        assert parse_phash(values["phash"]) is not None
        assert isinstance(values["nsfw"], bool)
    for value in (first["clip_score"], second["clip_score"], fourth["clip_score"]):
        assert 0.0 <= value <= 100.0
    assert result.failed == {}
    assert result.seconds > 0


def test_phash_is_imagehash_phash_and_stable(scorer: Scorer) -> None:
    import imagehash

    image = noise(5)
    [values] = scorer.score([image], ["p"], [frozenset({"phash"})]).images
    assert values["phash"] == str(imagehash.phash(image))
    assert len(values["phash"]) == 16
    # the same pixels re-encoded as PNG give the same hash
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert scorer.score([Image.open(buffer)], ["p"], [frozenset({"phash"})]).images[0] == values


def test_clip_score_is_torchmetrics_definition(scorer: Scorer, score_models: dict[str, Path]) -> None:
    """100 x max(cosine, 0) of the model's own projected embeddings."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    model, processor = (
        CLIPModel.from_pretrained(score_models["clip"]),
        CLIPProcessor.from_pretrained(score_models["clip"]),
    )
    images, prompts = [noise(seed) for seed in range(6)], [f"a photo number {seed}" for seed in range(6)]
    got = [values["clip_score"] for values in scorer.score(images, prompts, [frozenset({"clip"})] * 6).images]
    with torch.inference_mode():
        image_features = model.get_image_features(**processor(images=images, return_tensors="pt"))
        text_features = model.get_text_features(**processor(text=prompts, return_tensors="pt", padding=True))
    image_features = getattr(image_features, "pooler_output", image_features)
    text_features = getattr(text_features, "pooler_output", text_features)
    cosines = torch.nn.functional.cosine_similarity(image_features, text_features).tolist()
    assert got == pytest.approx([100 * max(cosine, 0.0) for cosine in cosines], abs=1e-3)
    assert clip_score(-0.3) == 0.0 and clip_score(0.25) == 25.0


def test_nsfw_flags_and_blacks_out_only_when_asked(score_models: dict[str, Path]) -> None:
    import torch

    models = ScoreModels(str(score_models["clip"]), str(score_models["nsfw"]))
    flagging, blacking = Scorer(models), Scorer(models, blackout=True)
    for scorer in (flagging, blacking):
        checker, _ = scorer._model("nsfw")
        with torch.no_grad():
            checker.concept_embeds_weights.fill_(-2.0)  # every cosine is above -2: everything is flagged
    images = [noise(1), noise(2)]
    kept = list(images)
    assert [values["nsfw"] for values in flagging.score(images, ["a", "b"], [ALL, ALL]).images] == [True, True]
    assert images == kept  # flag only: the images are untouched
    result = blacking.score(images, ["a", "b"], [frozenset({"nsfw"}), frozenset({"phash"})])
    assert result.images == [{"nsfw": True}, {"phash": str(__import__("imagehash").phash(kept[1]))}]
    assert np.asarray(images[0]).max() == 0 and images[1] is kept[1]  # only what was scored and flagged


def test_a_model_that_cannot_load_gives_null_scores_and_keeps_the_others(tmp_path: Path, caplog) -> None:
    scorer = Scorer(ScoreModels(str(tmp_path / "no-clip"), str(tmp_path / "no-checker")))
    with caplog.at_level(logging.WARNING):
        first = scorer.score([noise(1)], ["a"], [ALL])
        second = scorer.score([noise(2)], ["b"], [ALL])
    for result in (first, second):
        [values] = result.images
        assert values["clip_score"] is None and values["nsfw"] is None
        assert parse_phash(values["phash"]) is not None
        assert set(result.failed) == {"clip", "nsfw"}
    # the load is tried once per process and logged once
    assert sum("cannot load the clip model" in record.getMessage() for record in caplog.records) == 1


def test_a_score_that_raises_gives_null_for_its_batch(scorer: Scorer, monkeypatch) -> None:
    def broken(image):
        raise ValueError("no hash today")

    monkeypatch.setattr(scores_module, "phash_hex", broken)
    result = scorer.score([noise(1), noise(2)], ["a", "b"], [ALL, frozenset({"phash"})])
    assert [values["phash"] for values in result.images] == [None, None]
    assert isinstance(result.images[0]["clip_score"], float)
    assert "no hash today" in result.failed["phash"]


def test_settings_parse_and_refuse_unknown_scores() -> None:
    assert parse_scores(" clip,phash ,") == {"clip", "phash"}
    assert wanted(["nsfw"], {"phash"}) == {"nsfw", "phash"}
    assert wanted(None, frozenset()) == frozenset()
    assert WorkerSettings(scores="phash,nsfw").score_set == {"phash", "nsfw"}
    with pytest.raises(ValueError, match="unknown score 'aesthetic'"):
        WorkerSettings(scores="phash,aesthetic")


@pytest.fixture(scope="module")
def engine(tiny_model: Path, tmp_path_factory) -> Engine:
    return Engine.load(local_worker_settings(tiny_model, tmp_path_factory.mktemp("unused")))


def run_batch(engine: Engine, settings: WorkerSettings, jobs) -> tuple[BatchExecutor, list]:
    executor = BatchExecutor(engine, LocalStorage(settings.output_dir), MemoryReporter(), settings)
    outcomes = executor.execute([Delivery(job.job_id, job.model_dump(mode="json")) for job in jobs])
    executor.close()
    return executor, outcomes


def read_sidecar(settings: WorkerSettings, job) -> dict:
    key = sidecar_key(image_key(settings.s3_prefix, job.run_id, job.job_id, "png"))
    return json.loads((settings.output_dir / key).read_text(encoding="utf-8"))


def test_executor_records_what_each_job_and_the_worker_ask_for(
    engine: Engine, tiny_model: Path, score_models: dict[str, Path], tmp_path: Path
) -> None:
    settings = local_worker_settings(
        tiny_model,
        tmp_path / "out",
        scores="phash",
        clip_model=str(score_models["clip"]),
        safety_checker=str(score_models["nsfw"]),
    )
    jobs = [make_job(0, steps=2, scores=["clip", "nsfw"]), make_job(1, steps=2), make_job(2, steps=2, scores="clip")]
    _, outcomes = run_batch(engine, settings, jobs)
    assert all(outcome.ok for outcome in outcomes) and {outcome.batch_size for outcome in outcomes} == {3}
    sidecars = [read_sidecar(settings, job) for job in jobs]
    assert sidecars[0]["scores"].keys() == {"phash", "clip_score", "nsfw"}
    assert sidecars[1]["scores"].keys() == {"phash"}
    assert sidecars[2]["scores"].keys() == {"phash", "clip_score"}
    for sidecar in sidecars:
        assert parse_phash(sidecar["scores"]["phash"]) is not None
        timing = sidecar["timing"]
        assert timing["batch_scores_s"] > 0
        assert math.isclose(timing["scores_s"], timing["batch_scores_s"] / 3)
    # the phash is of the stored pixels (PNG is lossless)
    import imagehash

    stored = settings.output_dir / image_key(settings.s3_prefix, jobs[1].run_id, jobs[1].job_id, "png")
    assert sidecars[1]["scores"]["phash"] == str(imagehash.phash(Image.open(stored)))


def test_executor_without_scores_writes_an_empty_scores_object(
    engine: Engine, tiny_model: Path, tmp_path: Path
) -> None:
    settings = local_worker_settings(tiny_model, tmp_path / "out")
    job = make_job(0, steps=2)
    _, [outcome] = run_batch(engine, settings, [job])
    sidecar = read_sidecar(settings, job)
    assert outcome.ok and sidecar["scores"] == {} and sidecar["timing"]["batch_scores_s"] == 0.0


def test_executor_stores_the_image_when_scoring_blows_up(
    engine: Engine, tiny_model: Path, tmp_path: Path, monkeypatch
) -> None:
    settings = local_worker_settings(tiny_model, tmp_path / "out", scores="phash,clip")

    def explode(self, *args, **kwargs):
        raise RuntimeError("scorer on fire")

    monkeypatch.setattr(Scorer, "score", explode)
    job = make_job(0, steps=2)
    _, [outcome] = run_batch(engine, settings, [job])
    assert outcome.ok
    assert read_sidecar(settings, job)["scores"] == {"phash": None, "clip_score": None}
