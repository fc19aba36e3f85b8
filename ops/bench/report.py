"""What goes into a benchmark's report: statistics of repeated measurements, the machine and
code they were measured on, one-line errors, and the combined report of ``ops.bench.run`` and
``ops.bench.gpu``. No servers and no files here: running and writing are ``ops.bench.harness``'s."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ops.bench.service_report import markdown as service_markdown

REPO = Path(__file__).resolve().parents[2]
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


def run_line(results: dict[str, Any]) -> str:
    """ "Command: ...; machine: ..., load before -> after." for a results file's header."""
    return (
        f"Command: `{results['command']}`; machine: {results['machine'].get('cpu')}, "
        f"{results['machine'].get('usable_cores')} cores, load {results['load_before']} -> {results['load_after']}."
    )


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
        f"load average {m['loadavg_start']} at start, {results.get('load_after')} at end",
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
    return "\n".join(lines)


def _histogram(sizes: dict[str, int]) -> str:
    return ", ".join(f"{count} batches of {size}" for size, count in sorted(sizes.items(), key=lambda i: -int(i[0])))
