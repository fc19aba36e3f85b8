"""What quality scores cost (``worker.pipeline.scores``): their share of a batch's time, and the
run-level near-duplicate index at a million images.

1. ``tiny``: the tiny pipeline (``Engine.generate``, batch 8, DDIM, DeepCache 3/0 as a worker's
   defaults) and the tiny random CLIP and safety checker (``worker.pipeline.testscores``): each
   round times one pipeline call, then each score alone and all three together on its 8 images.
2. ``sd15`` (``--sd15``; slow, 4 GB model, ~3 GB score models): the SD1.5 architecture with random
   weights and score models of the real ones' architectures (CLIP ViT-L/14, which
   ``openai/clip-vit-large-patch14`` and the safety checker both use), random weights.
3. ``index``: ``producer.near_dups.RunDuplicates`` over 100k and 1M random pHashes with 1% planted
   near-copies (1-6 bits away), as compaction feeds it: seconds, µs per row, and that every
   planted copy was found.

The share is score seconds / (pipeline seconds + score seconds) of the same batch: scoring runs
on the device thread right after the pipeline call, so it is on the critical path.

    .venv/bin/python -m ops.bench.scores [--sd15] [--rounds 3] [--index-sizes 100000,1000000]
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from pathlib import Path
from typing import Any

from ops.bench import harness
from ops.bench.report import run_line

logger = logging.getLogger(__name__)

BATCH = 8
SCORES = ("phash", "clip", "nsfw")
#: Pipeline shape per arch: (side, steps).
SHAPES = {"tiny": (128, 25), "sd15": (256, 10)}


def score_models(folder: Path, arch: str) -> tuple[Path, Path]:
    from worker.pipeline.testscores import build_test_clip, build_test_safety_checker

    clip, nsfw = folder / f"clip-{arch}", folder / f"nsfw-{arch}"
    if not clip.exists():
        build_test_clip(clip, arch)  # type: ignore[arg-type]
    if not nsfw.exists():
        build_test_safety_checker(nsfw, arch)  # type: ignore[arg-type]
    return clip, nsfw


def batch_share(model: Path, clip: Path, nsfw: Path, *, side: int, steps: int, rounds: int) -> dict[str, Any]:
    """Median seconds of a pipeline call of ``BATCH`` images and of scoring them (each score and all)."""
    from producer.job import Job
    from worker.delivery.batching import batch_key
    from worker.pipeline.engine import Engine
    from worker.pipeline.scores import ScoreModels, Scorer
    from worker.settings import WorkerSettings

    settings = WorkerSettings(model=str(model), device="cpu", storage="local", scheduler="ddim", cache_interval=3)
    engine = Engine.load(settings)
    scorer = Scorer(ScoreModels(str(clip), str(nsfw), device="cpu"))
    scorer.preload(SCORES)
    jobs = [
        Job(run_id="bench-scores", index=i, prompt=f"a harbour at dusk, oil painting {i}", seed=i, height=side,
            width=side, steps=steps)
        for i in range(BATCH)
    ]  # fmt: skip
    key = batch_key(jobs[0], settings.recipe_defaults())
    prompts = [job.prompt for job in jobs]
    warm = engine.generate(key, jobs)  # first call: allocations, lazy imports
    scorer.score(warm.images, prompts, [frozenset(SCORES)] * BATCH)
    seconds: dict[str, list[float]] = {"pipeline": [], **{name: [] for name in SCORES}, "all": []}
    for round_ in range(rounds):
        generated = engine.generate(key, jobs)
        seconds["pipeline"].append(generated.seconds)
        for name in SCORES:
            seconds[name].append(scorer.score(generated.images, prompts, [frozenset({name})] * BATCH).seconds)
        result = scorer.score(generated.images, prompts, [frozenset(SCORES)] * BATCH)
        assert not result.failed, result.failed
        seconds["all"].append(result.seconds)
        logger.info("round %d: %s", round_ + 1, {name: round(values[-1], 3) for name, values in seconds.items()})
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "batch": BATCH,
        "size": f"{side}x{side}",
        "steps": steps,
        "deepcache": "3/0",
        "rounds": rounds,
        "seconds": seconds,
        "median_s": median,
        "share_all": median["all"] / (median["pipeline"] + median["all"]),
        "share": {name: median[name] / (median["pipeline"] + median[name]) for name in SCORES},
    }


def index_cost(count: int, *, threshold: int = 6, planted_share: float = 0.01) -> dict[str, Any]:
    """``RunDuplicates`` over ``count`` rows of random pHashes, ``planted_share`` of them near-copies
    of an earlier row: seconds, peak traced memory, planted copies found."""
    from producer.near_dups import RunDuplicates

    rng = random.Random(count)
    hashes = [rng.getrandbits(64) for _ in range(count)]
    planted = {}
    # In position order, so that an original that is itself a planted copy is final when copied.
    for position in sorted(rng.sample(range(1, count), int(count * planted_share))):
        original = rng.randrange(position)
        hashes[position] = hashes[original]
        for bit in rng.sample(range(64), rng.randint(1, threshold)):
            hashes[position] ^= 1 << bit
        planted[position] = original
    texts = [f"{value:016x}" for value in hashes]
    job_ids = [f"{position:08d}-{position:012x}" for position in range(count)]
    duplicates = RunDuplicates(threshold)
    started = time.perf_counter()
    found = [duplicates.duplicate_of(job_id, text) for job_id, text in zip(job_ids, texts, strict=True)]
    seconds = time.perf_counter() - started
    # A planted copy may point at an even earlier near-copy of its original: found is enough.
    missed = [position for position in planted if found[position] is None]
    return {
        "rows": count,
        "threshold": threshold,
        "planted": len(planted),
        "planted_missed": len(missed),
        "duplicates": duplicates.duplicates,
        "seconds": seconds,
        "us_per_row": 1e6 * seconds / count,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Quality scores: cost per batch, and the near-duplicate index", "", run_line(results), ""]
    batches = {arch: results[arch] for arch in ("tiny", "sd15") if arch in results}
    if batches:
        lines += [
            f"Batch of {BATCH} on CPU, medians of the rounds; share = score ÷ (pipeline + score) of one batch. "
            "Score models: tiny random ones for the tiny pipeline, ViT-L/14-sized random ones (the real "
            "CLIP-L and safety checker's architecture) for SD1.5.",
            "",
            "| pipeline | size, steps | pipeline s | phash s | clip s | nsfw s | all three s | share of batch time |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for arch, m in batches.items():
            s = m["median_s"]
            lines.append(
                f"| {arch} | {m['size']}, {m['steps']} DDIM, DeepCache {m['deepcache']} | {s['pipeline']:.2f} | "
                f"{s['phash']:.3f} | {s['clip']:.3f} | {s['nsfw']:.3f} | {s['all']:.3f} | "
                f"{100 * m['share_all']:.1f} % |"
            )
        lines.append("")
    if results.get("index"):
        lines += [
            "Near-duplicate index (`producer.near_dups.RunDuplicates`, threshold 6 of 64 bits: 7 bands), random "
            "pHashes with 1 % planted near-copies 1–6 bits away:",
            "",
            "| rows | seconds | µs per row | planted found |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for m in results["index"]:
            found = m["planted"] - m["planted_missed"]
            lines.append(
                f"| {m['rows']:,} | {m['seconds']:.1f} | {m['us_per_row']:.1f} | {found:,} of {m['planted']:,} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = harness.parser(__doc__, "scores-latest", tiny_model=True)
    parser.add_argument("--rounds", type=int, default=3, help="measured batches per pipeline (default 3)")
    parser.add_argument("--sd15", action="store_true", help="also the SD1.5 architecture (slow, ~8 GB of models)")
    parser.add_argument("--sd15-rounds", type=int, default=1, help="measured batches of SD1.5 (default 1)")
    parser.add_argument("--index-sizes", default="100000,1000000", help="rows of the index runs, comma-separated")
    parser.add_argument("--skip-batches", action="store_true", help="only the index part")
    args = parser.parse_args(argv)
    with harness.session(args, markdown, index=[]) as bench:
        archs = [] if args.skip_batches else ["tiny", *(["sd15"] if args.sd15 else [])]
        for arch in archs:
            with bench.part(arch):
                side, steps = SHAPES[arch]
                model = bench.servers.model(arch)
                clip, nsfw = score_models(bench.scratch, "tiny" if arch == "tiny" else "full")
                rounds = args.rounds if arch == "tiny" else args.sd15_rounds
                bench.results[arch] = batch_share(model, clip, nsfw, side=side, steps=steps, rounds=rounds)
                bench.results[arch]["model"] = bench.servers.model_label(arch)
        for size in [int(text) for text in args.index_sizes.split(",") if text]:
            with bench.part(f"index {size:,}"):
                bench.results["index"].append(index_cost(size))
                logger.info("index %d: %s", size, bench.results["index"][-1])
    return bench.results


if __name__ == "__main__":
    raise SystemExit(harness.exit_status(main()))
