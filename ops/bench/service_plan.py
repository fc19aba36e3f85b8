"""What the service benchmark runs (``ops.bench.service``): the plan (model, size, steps, rounds,
batch sizes, levels) and the jobs every path makes, so that the paths and the benchmark read
the same settings from one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ops.bench.harness import START_TIMEOUT_S
from ops.bench.service_report import E2E_MODE
from producer.job import Job

#: DeepCache settings by label: (interval, branch); interval 1 is no caching.
MODES = {"off": (1, 0), "3/0": (3, 0), "5/0": (5, 0), "5/1": (5, 1)}
#: The comparison table's modes: caching off, DeepCache's default recipe and a longer interval.
TABLE_MODES = ("off", "3/0", "5/0")
#: Levels that compile (their first calls and worker start-ups include compiling).
COMPILED = ("compile", "graphs")
PROMPT = "a photo of an astronaut riding a horse on the moon, detailed, {i}"
GUIDANCE = 7.5
SEED = 1234


@dataclass(frozen=True)
class Plan:
    model: Path
    device: str = "auto"
    size: int = 512
    steps: int = 50
    rounds: int = 3
    batches: tuple[int, ...] = (1, 4, 8)  # the matrix
    table_batches: tuple[int, ...] = (1, 8)  # recipe / engine / embedded / worker
    jobs: dict[int, int] = field(default_factory=lambda: {1: 8, 8: 48})  # end-to-end jobs per batch size
    e2e_rounds: int = 2  # rounds that also run embedded and worker (the slow paths)
    sliced_check: bool = True  # one more matrix cell: batch max, 3/0, VAE slicing forced on
    start_timeout: float = START_TIMEOUT_S  # seconds a worker may take to start
    levels: tuple[str, ...] = ("off",)  # acceleration levels (graphs only where CUDA is)
    compile_cache: Path | None = None  # DEEPQUEUE_COMPILE_CACHE of Engines and workers (default: in scratch)
    sd15_shaped: bool = False  # the model has SD1.5's UNet: report the share of dense peak
    table_modes: tuple[str, ...] = TABLE_MODES  # DeepCache modes of the comparison table
    matrix_modes: tuple[str, ...] = tuple(MODES)  # and of the matrix ("off" first: the speed-ups' base)
    restarts: int = 2  # warm restarts of a compiled worker, each timed from start to ready


def tiny_plan(
    model: Path, *, device: str, size: int, steps: int, rounds: int, levels: tuple[str, ...], start_timeout: float
) -> Plan:
    """The CPU plan (tiny model): batches 1 and 8, 8 and 32 end-to-end jobs, no slicing check."""
    return Plan(
        model=model,
        device=device,
        size=size,
        steps=steps,
        rounds=rounds,
        jobs={1: 8, 8: 32},
        sliced_check=False,
        start_timeout=start_timeout,
        levels=levels,
    )


def jobs_for(plan: Plan, count: int, mode: str, *, run_id: str = "bench") -> list[Job]:
    interval, branch = MODES[mode]
    return [
        Job(
            run_id=run_id,
            index=i,
            prompt=PROMPT.format(i=i),
            seed=SEED + i,
            height=plan.size,
            width=plan.size,
            steps=plan.steps,
            guidance=GUIDANCE,
            scheduler="ddim",
            cache_interval=interval,
            cache_branch=branch,
        )
        for i in range(count)
    ]


def first_call_modes(plan: Plan, level: str) -> tuple[str, ...]:
    """The DeepCache modes a level's Engine meets in the run: the table's and the end-to-end
    one, and the matrix's for ``off`` (the matrix runs on it). A compiled level compiles
    only what it will run: the plain step only if the table has DeepCache off."""
    modes = (*plan.table_modes, E2E_MODE, *(plan.matrix_modes if level == "off" else ()))
    return tuple(dict.fromkeys(modes))


def levels_for(plan: Plan, device: str) -> tuple[str, ...]:
    """The plan's levels this device runs: ``graphs`` needs CUDA (elsewhere it is ``compile``)."""
    return tuple(level for level in plan.levels if level != "graphs" or device.startswith("cuda"))
