"""Statistics, machine description and result files of a benchmark run. No servers here.

Where results go: a plain run writes into a new folder ``results/runs/DATE-TIME-PID/`` (git
ignores it), beside the committed ``results/*-latest.*`` files that the READMEs link to; only
``--record`` writes over those. A run survives one part failing: ``part`` records the error (one
line in the report, the traceback in the JSON) and the run goes on; the report has a "Failed"
section, and the command exits 1 after writing it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ops.bench.service_report import markdown as service_markdown

logger = logging.getLogger("ops.bench")

REPO = Path(__file__).resolve().parents[2]
#: The committed results, which the READMEs link to (written with ``--record``).
RESULTS = Path(__file__).resolve().parent / "results"
#: Seconds a server or worker may take to start: generous, since a loaded machine is slow.
START_TIMEOUT_S = 600.0
PACKAGES = ("torch", "diffusers", "transformers", "DeepCache", "celery", "kombu", "redis", "moto", "boto3")


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and spread ((max - min) / median, in %) of repeated measurements."""
    median = statistics.median(values)
    return {
        "median": median,
        "min": min(values),
        "max": max(values),
        "spread_pct": 100 * (max(values) - min(values)) / median if median else 0.0,
        "values": list(values),
    }


def ratio(numerator: dict[str, Any], denominator: dict[str, Any]) -> float:
    """Ratio of two summaries' medians."""
    return numerator["median"] / denominator["median"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _run_text(*argv: str) -> str | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=REPO).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on, and with which code."""
    redis_server = _run_text("redis-server", "--version")
    commit = _run_text("git", "rev-parse", "--short", "HEAD")
    dirty = bool(_run_text("git", "status", "--porcelain", "--untracked-files=no"))
    mem_gib = None
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command_line(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": mem_gib,
        "gpu": _gpu(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": _versions(),
        "redis_server": redis_server.split()[2].removeprefix("v=") if redis_server else None,
        "git": f"{commit}{' (dirty)' if dirty else ''}" if commit else None,
        "loadavg_start": load_average(),
    }


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def command_line() -> str:
    """The command as typed from the repository root."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    entry = ["python", "-m", spec.name] if spec is not None else ["python", *sys.argv[:1]]
    return shlex.join([*entry, *sys.argv[1:]])


def add_run_args(parser: argparse.ArgumentParser, name: str) -> None:
    """The options every benchmark shares: where its results go and how long start-up may take."""
    group = parser.add_argument_group("results and start-up")
    group.add_argument("--name", default=name, help=f"results file name, without extension (default {name})")
    group.add_argument("--out", type=Path, help="results folder (default: a new folder under ops/bench/results/runs/)")
    group.add_argument(
        "--record",
        action="store_true",
        help="write into ops/bench/results/, over the committed results the READMEs link to",
    )
    group.add_argument(
        "--start-timeout",
        type=float,
        default=START_TIMEOUT_S,
        help=f"seconds each server and worker may take to start (default {START_TIMEOUT_S:.0f})",
    )


def output_dir(args: argparse.Namespace) -> Path:
    """``--out``, else ``RESULTS`` with ``--record``, else a new folder under ``RESULTS/runs``."""
    if args.out is not None:
        return args.out
    if args.record:
        return RESULTS
    return RESULTS / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


@contextmanager
def part(results: dict[str, Any], label: str) -> Iterator[None]:
    """Run one part of a benchmark: an exception ends this part only. It is recorded in
    ``results["failed"][label]`` (one line, and the traceback for the JSON) and logged in one line."""
    try:
        yield
    except Exception as error:
        line = one_line(error)
        results.setdefault("failed", {})[label] = {"error": line, "traceback": traceback.format_exc()}
        logger.error("%s failed: %s", label, line)


def one_line(error: BaseException, limit: int = 400) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters."""
    message = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {message[0]}" if message else type(error).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def failures_markdown(results: dict[str, Any]) -> str:
    """The report's "Failed" section: one line per failed part ("" when none failed)."""
    failed = results.get("failed", {})
    if not failed:
        return ""
    lines = ["", f"## Failed: {len(failed)} part(s), traceback in the .json", ""]
    lines += [f"- {label}: {failure['error']}" for label, failure in failed.items()]
    return "\n".join(lines) + "\n"


def exit_status(results: dict[str, Any]) -> int:
    """The command's exit status: 1 when a part failed."""
    return 1 if results.get("failed") else 0


def write_results(results: dict[str, Any], out_dir: Path, name: str) -> tuple[Path, Path]:
    """``name.json`` (everything) and ``name.md`` (a short table) in ``out_dir``."""
    return write_json_and_markdown(results, name, markdown(results), out_dir)


def write_json_and_markdown(results: dict[str, Any], name: str, text: str, out_dir: Path) -> tuple[Path, Path]:
    """``name.json`` (every measurement) and ``name.md`` (``text``) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path.write_text(text)
    return json_path, md_path


def new_results(**extra: Any) -> dict[str, Any]:
    """The start of a benchmark's results: its command, the machine and its load now."""
    return {"command": command_line(), "machine": machine_info(), "load_before": load_average(), **extra}


def run_line(results: dict[str, Any]) -> str:
    """ "Command: ...; machine: ..., load before -> after." for a results file's header."""
    return (
        f"Command: `{results['command']}`; machine: {results['machine'].get('cpu')}, "
        f"{results['machine'].get('usable_cores')} cores, load {results['load_before']} -> {results['load_after']}."
    )


def finish(
    results: dict[str, Any], markdown_of: Callable[[dict[str, Any]], str], *, out_dir: Path, name: str
) -> dict[str, Any]:
    """Record the load at the end, write ``name``.json/.md in ``out_dir`` (the markdown with its
    "Failed" section), print the markdown and log where it went."""
    results["load_after"] = load_average()
    text = markdown_of(results) + failures_markdown(results)
    print(text)
    log_written(write_json_and_markdown(results, name, text, out_dir), results)
    return results


def log_written(paths: tuple[Path, Path], results: dict[str, Any]) -> None:
    """Log where the results went, and how many parts failed."""
    failed = len(results.get("failed", {}))
    logger.info("wrote %s and %s%s", *paths, f"; {failed} part(s) failed" if failed else "")


def run_child(code: str, *args: str) -> dict[str, Any]:
    """``python -c code args`` in a fresh process: its last line of output, parsed as JSON. If it
    fails, the RuntimeError's first line is the last line of its stderr (the exception)."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"the child process exited with {done.returncode}: {last}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def s3_sidecars(endpoint: str, bucket: str, prefix: str = "") -> list[dict[str, Any]]:
    """Every JSON sidecar under ``prefix`` in a (moto) S3 bucket."""
    from ops.localstack import moto_s3_client

    client = moto_s3_client(endpoint)
    found = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            if item["Key"].endswith(".json") and not item["Key"].startswith(".deepqueue/"):
                found.append(json.loads(client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()))
    return found


def _fmt(summary: dict[str, Any], digits: int = 1) -> str:
    return (
        f"{summary['median']:,.{digits}f} ({summary['min']:,.{digits}f}–{summary['max']:,.{digits}f}, "
        f"spread {summary['spread_pct']:.0f}%)"
    )


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    v = m["versions"]
    lines = [
        f"# deepqueue benchmarks — {m['date']}",
        "",
        f"- command: `{m['command']}` (git {m['git']})",
        f"- machine: {m['cpu']}, {m['usable_cores']} cores, {m['memory_gib']} GiB, {m['gpu'] or 'no GPU'}; "
        f"load average {m['loadavg_start']} at start, {m.get('loadavg_end')} at end",
        f"- torch {v['torch']}, diffusers {v['diffusers']}, DeepCache {v['DeepCache']}, "
        f"celery {v['celery']}, kombu {v['kombu']}, redis-server {m['redis_server']}, moto {v['moto']}, "
        f"Python {m['python']}",
        "- cells: median (min–max over rounds; spread = (max − min) / median)",
        "",
    ]
    if "enqueue" in results:
        e = results["enqueue"]
        lines += [
            f"## Enqueue rate: {e['jobs']:,} jobs x {e['rounds']} interleaved rounds, private redis-server",
            "",
            "| variant | jobs/s | vs send_task loop |",
            "|---|---:|---:|",
        ]
        for row in e["variants"].values():
            lines.append(f"| {row['label']} | {_fmt(row['jobs_per_s'], 0)} | {row['vs_baseline']:.2f}x |")
        lines.append("")
    if "worker" in results:
        w = results["worker"]
        lines += [
            f"## Worker throughput: {w['jobs']} jobs of {w['width']}x{w['height']}, {w['steps']} steps, "
            f"one `deepqueue worker` on {w.get('device', 'cpu')} (tiny model), rounds {' '.join(w['order'])}",
            "",
            "| DeepCache | images/s, submit to all done | images/s, pipeline only (Σ batch_inference_s) "
            "| overhead s/round (wall − compute) |",
            "|---|---:|---:|---:|",
        ]
        for row in w["modes"].values():
            lines.append(
                f"| {row['label']} | {_fmt(row['wall_images_per_s'], 2)} | {_fmt(row['compute_images_per_s'], 2)} "
                f"| {_fmt(row['overhead_s'], 1)} |"
            )
        r = w["on_over_off"]
        lines += [
            "",
            f"On/off speed-up, median of the {len(r['wall_pairs'])} back-to-back pairs: **{r['wall']:.2f}x** "
            f"end to end, **{r['compute']:.2f}x** pipeline only (pairs end to end: "
            f"{', '.join(f'{x:.2f}' for x in r['wall_pairs'])}; pipeline only: "
            f"{', '.join(f'{x:.2f}' for x in r['compute_pairs'])}).",
            f"Batch sizes over all measured rounds: {_histogram(w['batch_sizes'])}.",
            "",
        ]
    if "fork_check" in results:
        f = results["fork_check"]
        lines += ["## Fork check: can a forked child use CUDA after each import in its parent?", ""]
        lines += [f"- {row['label']}: {row['verdict']}" for row in f["steps"]] or [f"- {f['skipped']}"]
        lines.append("")
    for key, title in (("service", "Service vs DeepCache's documented recipe"), ("sdxl", "SDXL architecture")):
        if key in results:
            lines += service_markdown(results[key], title)
    if "sd15" in results:
        s = results["sd15"]
        lines += [
            f"## SD1.5 architecture (random weights), embedded engine: {s['width']}x{s['height']}, "
            f"{s['steps']} DDIM steps, batch 1, {s.get('device', 'cpu')} {s.get('dtype', 'float32')}",
            "",
            "| DeepCache | seconds per image | speed-up |",
            "|---|---:|---:|",
        ]
        for row in s["modes"].values():
            lines.append(f"| {row['label']} | {_fmt(row['seconds'], 1)} | {row['speedup']:.2f}x |")
        lines.append("")
    return "\n".join(lines) + failures_markdown(results)


def _histogram(sizes: dict[str, int]) -> str:
    return ", ".join(f"{count} batches of {size}" for size, count in sorted(sizes.items(), key=lambda i: -int(i[0])))
