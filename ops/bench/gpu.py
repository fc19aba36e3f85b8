"""Every GPU figure in one command: the service against DeepCache's documented recipe at every
acceleration level (quality gate, compile and warm-restart times, peak memory, share of the
card's dense peak), the DeepCache matrix with peak memory, and the fork check, written as JSON +
markdown with the card.

    python -m ops.bench.gpu                      # builds the SD1.5 architecture (random weights)
    python -m ops.bench.gpu --sdxl               # and then the SDXL architecture at 1024x1024
    python -m ops.bench.gpu --model DIR          # any local SD/SDXL folder (--sdxl-model DIR for the SDXL part)
    bash ops/bench/gpu.sh                        # on a CUDA machine without network, from the .gpu bundle

Needs no network. Defaults are sized for a 15-minute GPU lease: 512x512, 50 DDIM steps, fp16 on
CUDA, batches 1 and 8, every level, DeepCache 3/0 in the comparison table (``--table-modes
off,3/0,5/0`` adds the other columns: a plain step to compile per shape and compiled level), 3
rounds, one of them end to end (32 jobs at batch 8, 8 at batch 1), one timed warm restart.
``--sdxl`` adds the SDXL architecture at 1024x1024, batch 4, DeepCache 3/0 (2 rounds, one end to
end with 8 jobs). Partial results are written as it goes. The test suite dry-runs it on CPU with
the tiny models (``--model DIR --sdxl-model DIR --size 64 --sdxl-size 64 --steps 3``) so it cannot
rot. See ops/bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ops.bench import harness
from ops.bench.harness import Bench
from ops.bench.report import markdown
from ops.bench.service import run_service_bench
from ops.bench.service_plan import MODES, Plan
from ops.bench.service_report import E2E_MODE

logger = logging.getLogger("ops.bench.gpu")

#: Forks after the given statements and uses CUDA in the child; exits with the child's code.
FORK_PROBE = """
import os, sys
for statement in sys.argv[1:]:
    exec(statement)
pid = os.fork()
if pid == 0:
    import torch
    try:
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
        os._exit(0)
    except Exception as error:
        sys.stderr.write(repr(error)[:300])
        os._exit(3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def fork_check(model: Path) -> dict[str, Any]:
    """Which parent-side imports leave a forked child able to use CUDA (each in a fresh process)."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device: the fork trap exists only on CUDA", "steps": []}
    worker_main = [
        "from worker.cli import _settings, check_model",
        "from worker.app import create_app",
        f"settings = _settings(model={str(model)!r})",
        "check_model(settings)",
        "create_app(settings)",
    ]
    steps = [
        ("parent ran `import torch`", ["import torch"], {}),
        ("parent ran `import diffusers` (the old worker main process)", ["import diffusers"], {}),
        (
            "parent ran `import diffusers` with PYTORCH_NVML_BASED_CUDA_CHECK=1",
            ["import diffusers"],
            {"PYTORCH_NVML_BASED_CUDA_CHECK": "1"},
        ),
        ("parent ran what `deepqueue worker`'s main process runs (check_model, create_app)", worker_main, {}),
    ]
    env = {key: value for key, value in os.environ.items() if key != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    rows = []
    for label, statements, extra in steps:
        done = subprocess.run(
            [sys.executable, "-c", FORK_PROBE, *statements], env={**env, **extra}, capture_output=True, text=True
        )
        ok = done.returncode == 0
        verdict = "the child used CUDA" if ok else f"the child failed: {done.stderr.strip()[-300:]}"
        rows.append({"label": label, "ok": ok, "verdict": verdict})
        logger.info("fork check: %s: %s", label, verdict)
    return {"steps": rows}


def job_counts(text: str) -> dict[int, int]:
    """``1:16,8:64`` -> {1: 16, 8: 64}."""
    try:
        return {int(b): int(n) for b, n in (pair.split(":") for pair in text.split(","))}
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected BATCH:JOBS,... such as 1:16,8:64, got {text!r}") from error


def sdxl_plan(args: argparse.Namespace, model: Path) -> Plan:
    """SDXL at one batch size, DeepCache off (the matrix's base) and 3/0 (the table)."""
    return Plan(
        model=model,
        device=args.device,
        size=args.sdxl_size,
        steps=args.steps,
        rounds=args.sdxl_rounds,
        batches=(args.sdxl_batch,),
        table_batches=(args.sdxl_batch,),
        jobs={args.sdxl_batch: args.sdxl_jobs},
        e2e_rounds=1,
        sliced_check=False,
        levels=args.sdxl_levels or args.levels,
        compile_cache=args.compile_cache,
        table_modes=(E2E_MODE,),
        matrix_modes=("off", E2E_MODE),
        restarts=min(args.restarts, 1),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = harness.parser(__doc__, "gpu-latest")
    parser.add_argument("--model", type=Path, help="model folder (default: build --arch into a temporary folder)")
    parser.add_argument("--arch", default="sd15", choices=("tiny", "sd15", "sdxl-tiny"), help="model to build")
    group = parser.add_argument_group("SDXL architecture (after the first model)")
    group.add_argument("--sdxl", action="store_true", help="run the SDXL part (about 5 more minutes on an H200)")
    group.add_argument("--sdxl-model", type=Path, help="SDXL folder, implies --sdxl (default: build the architecture)")
    group.add_argument("--sdxl-size", type=int, default=1024, help="image side (default 1024)")
    group.add_argument("--sdxl-batch", type=int, default=4, help="batch size (default 4)")
    group.add_argument("--sdxl-jobs", type=int, default=8, help="end-to-end jobs (default 8)")
    group.add_argument("--sdxl-rounds", type=int, default=2, help="rounds, one of them end to end (default 2)")
    group.add_argument(
        "--sdxl-levels", type=lambda t: tuple(t.split(",")), help="acceleration levels (default: --levels)"
    )
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default auto)")
    parser.add_argument("--size", type=int, default=512, help="image side (default 512)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved in-process rounds (default 3)")
    parser.add_argument(
        "--batches", type=lambda t: tuple(int(b) for b in t.split(",")), default=(1, 8), help="matrix batch sizes"
    )
    parser.add_argument(
        "--jobs", type=job_counts, default={1: 8, 8: 32}, help="end-to-end jobs per batch size (default 1:8,8:32)"
    )
    parser.add_argument("--e2e-rounds", type=int, default=1, help="rounds that run embedded and worker (default 1)")
    parser.add_argument("--no-worker", action="store_true", help="skip the real worker (no redis-server here)")
    parser.add_argument(
        "--levels",
        type=lambda t: tuple(t.split(",")),
        default=("off", "fuse", "compile", "graphs"),
        help="acceleration levels, each with its own Engine and workers (default off,fuse,compile,graphs; "
        "graphs only on CUDA)",
    )
    parser.add_argument(
        "--table-modes",
        type=modes,
        default=(E2E_MODE,),
        help=f"DeepCache modes of the comparison table (default {E2E_MODE}; each compiled level compiles "
        "the plain step for each shape only if 'off' is among them)",
    )
    parser.add_argument(
        "--matrix-modes", type=modes, default=tuple(MODES), help="DeepCache modes of the matrix ('off' is always in)"
    )
    parser.add_argument("--restarts", type=int, default=1, help="timed warm restarts of a compiled worker (default 1)")
    parser.add_argument("--no-fork-check", action="store_true", help="skip the fork check (four fresh processes)")
    parser.add_argument("--compile-cache", type=Path, help="compile cache folder (default: a temporary one)")
    return parser.parse_args(argv)


def modes(text: str) -> tuple[str, ...]:
    """``3/0,5/0`` -> ("3/0", "5/0"), each one of ``MODES``."""
    chosen = tuple(text.split(","))
    unknown = [mode for mode in chosen if mode not in MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown DeepCache modes {unknown} (one of {', '.join(MODES)})")
    return chosen


def checkpoint(bench: Bench, name: str, key: str) -> Callable[[dict[str, Any]], None]:
    """Writes ``name.partial.json`` with ``key``'s results so far: a lease can end at any time."""

    def write(partial: dict[str, Any]) -> None:
        bench.results[key] = partial
        bench.out_dir.mkdir(parents=True, exist_ok=True)
        (bench.out_dir / f"{name}.partial.json").write_text(json.dumps(bench.results, indent=1) + "\n")

    return write


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with harness.session(args, markdown) as bench:
        servers = bench.servers
        model = args.model or servers.model(args.arch)
        redis_url = "" if args.no_worker else servers.redis_url()
        if not args.no_fork_check:
            with bench.part("fork check"):
                checkpoint(bench, args.name, "fork_check")(fork_check(model))
        plan = Plan(
            model=model,
            device=args.device,
            size=args.size,
            steps=args.steps,
            rounds=args.rounds,
            batches=args.batches,
            table_batches=tuple(sorted(args.jobs)),
            jobs=args.jobs,
            e2e_rounds=args.e2e_rounds,
            levels=args.levels,
            compile_cache=args.compile_cache,
            sd15_shaped=args.model is None and args.arch == "sd15",
            table_modes=args.table_modes,
            matrix_modes=tuple(dict.fromkeys(("off", *args.matrix_modes))),
            restarts=args.restarts,
        )
        with bench.part("service"):
            bench.results["service"] = run_service_bench(
                plan,
                redis_url,
                bench.scratch,
                worker=not args.no_worker,
                checkpoint=checkpoint(bench, args.name, "service"),
            )
            if args.model is None:
                bench.results["service"]["plan"]["model"] = servers.model_label(args.arch)
        if args.sdxl or args.sdxl_model:
            with bench.part("sdxl"):
                sdxl = args.sdxl_model or servers.model("sdxl")
                bench.results["sdxl"] = run_service_bench(
                    sdxl_plan(args, sdxl),
                    redis_url,
                    bench.scratch / "sdxl",
                    worker=not args.no_worker,
                    checkpoint=checkpoint(bench, args.name, "sdxl"),
                )
                if args.sdxl_model is None:
                    bench.results["sdxl"]["plan"]["model"] = servers.model_label("sdxl")
        bench.results["model_build_s"] = servers.build_s
    (bench.out_dir / f"{args.name}.partial.json").unlink(missing_ok=True)
    return harness.exit_status(bench.results)


if __name__ == "__main__":
    raise SystemExit(main())
