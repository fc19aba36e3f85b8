"""Quality audit of the acceleration: how far DeepCache moved a run's images.

``audit`` takes a sample of a run's done jobs, sends each again with DeepCache off (``cache_interval
1``) and everything else as its sidecar recorded it (prompt, seed, size, steps, guidance, the
scheduler the worker used, format), to the twin run ``{run}.audit`` on the same workers. When the
twins are done it compares each pair, cached against uncached, by PSNR and SSIM, and writes:

- ``{prefix}/{run}/audit.jsonl``: one line per audited job (``job_id``, ``psnr``,
  ``ssim``, ``uncached_key``), which the manifest joins as ``audit_*`` columns;
- ``{prefix}/{run}/audit.json``: the summary (mean and worst of each, the DeepCache settings).

``audit_run`` is the workflow (``Client.audit`` calls it); the rest is pure.

The sample is the ``k`` done jobs with the smallest SHA-256 of their id: the same jobs every time,
spread evenly over the run, chosen in O(k) memory however large the run. Twins keep their
original's position in the sorted sample, so auditing again resends nothing that is done.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from producer.errors import RunBusyError
from producer.layout import audit_rows_key, audit_summary_key, image_key, sidecar_key, url_extension
from producer.run import Run
from producer.spill import job_index
from producer.state import JobResult, JobState
from producer.storage import Storage, put_replacing

#: Gaussian window of SSIM (Wang et al. 2004): 11 taps, sigma 1.5, with K1 = 0.01, K2 = 0.03.
SSIM_TAPS, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
#: Fields of a sidecar that make the uncached twin (all but cache settings, which turn caching off).
TWIN_FIELDS = ("prompt", "negative_prompt", "seed", "height", "width", "steps", "guidance", "scheduler", "format")


def audit_run_id(run_id: str) -> str:
    """The twin run's name: ``{run}.audit``, or a hashed short form when that passes 64 characters."""
    name = f"{run_id}.audit"
    if len(name) <= 64:
        return name
    return f"{run_id[:45]}.{hashlib.sha256(run_id.encode()).hexdigest()[:12]}.audit"


def sample(results: Iterable[JobResult], k: int) -> list[JobResult]:
    """The ``k`` jobs with the smallest SHA-256 of their id, by id: a stable, even sample in O(k)
    memory."""
    chosen = heapq.nsmallest(k, results, key=lambda result: hashlib.sha256(result.job_id.encode()).digest())
    return sorted(chosen, key=lambda result: result.job_id)


def twin_row(sidecar: Mapping[str, Any]) -> dict[str, Any]:
    """The job fields of an image's uncached twin: its recipe as the worker ran it, caching off,
    on the workers of the same model (its alias, when its run named one), with the same LoRA
    adapters (id and scale) if it had any."""
    row = {field: sidecar[field] for field in TWIN_FIELDS if sidecar.get(field) is not None}
    alias = (sidecar.get("model") or {}).get("alias")
    loras = [{"id": lora["id"], "scale": lora["scale"]} for lora in sidecar.get("loras") or []]
    return {**row, **({"model": alias} if alias else {}), **({"loras": loras} if loras else {}), "cache_interval": 1}


def as_array(image_bytes: bytes) -> np.ndarray:
    """An image file as an RGB array of float64 in 0..255."""
    from PIL import Image

    with Image.open(io.BytesIO(image_bytes)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for 8-bit images; ``inf`` when they are identical."""
    _same_shape(a, b)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity (Wang et al. 2004; Gaussian window, per channel, averaged), in
    -1..1, 1 for identical images. Same definition as scikit-image's ``structural_similarity``
    with ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255``."""
    _same_shape(a, b)
    if min(a.shape[:2]) < SSIM_TAPS:
        raise ValueError(f"SSIM needs images of at least {SSIM_TAPS}x{SSIM_TAPS}, got {a.shape[1]}x{a.shape[0]}")
    taps = np.exp(-0.5 * ((np.arange(SSIM_TAPS) - SSIM_TAPS // 2) / SSIM_SIGMA) ** 2)
    taps /= taps.sum()

    def blur(x: np.ndarray) -> np.ndarray:  # separable, 'valid': no padding effects at the borders
        x = np.lib.stride_tricks.sliding_window_view(x, SSIM_TAPS, axis=0) @ taps
        return np.lib.stride_tricks.sliding_window_view(x, SSIM_TAPS, axis=1) @ taps

    c1, c2 = (SSIM_K1 * 255) ** 2, (SSIM_K2 * 255) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(index.mean())


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {a.shape} and {b.shape}")


def audit_record(job_id: str, cached: bytes, uncached: bytes, uncached_key: str) -> dict[str, Any]:
    """One line of audit.jsonl (PSNR None for identical images: JSON has no infinity)."""
    a, b = as_array(cached), as_array(uncached)
    value = psnr(a, b)
    return {
        "job_id": job_id,
        "psnr": None if math.isinf(value) else round(value, 4),
        "ssim": round(ssim(a, b), 6),
        "uncached_key": uncached_key,
    }


def summarize(
    records: Sequence[Mapping[str, Any]], *, run_id: str, requested: int, deepcache: Mapping[str, Any]
) -> dict[str, Any]:
    """audit.json: what was compared, and the mean and worst PSNR and SSIM."""

    def stats(name: str) -> dict[str, Any]:
        values = [(record[name], record["job_id"]) for record in records if record[name] is not None]
        if not values:
            return {"mean": None, "worst": None, "worst_job": None}
        worst = min(values)
        return {"mean": round(sum(v for v, _ in values) / len(values), 6), "worst": worst[0], "worst_job": worst[1]}

    return {
        "run": run_id,
        "twin_run": audit_run_id(run_id),
        "requested": requested,
        "audited": len(records),
        "identical": sum(record["psnr"] is None for record in records),
        "psnr_db": stats("psnr"),
        "ssim": stats("ssim"),
        "deepcache": dict(deepcache),
        "how": "each sampled image against the same job run again with DeepCache off (cache_interval 1)",
    }


def to_jsonl(records: Iterable[Mapping[str, Any]]) -> bytes:
    return "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records).encode()


def audit_run(
    run: Run,
    storage: Storage,
    prefix: str,
    submit: Callable[[list[dict[str, Any]], str], Run],
    *,
    size: int,
    timeout: float | None,
    progress: bool,
) -> dict[str, Any]:
    """Audit ``size`` of ``run``'s done images: send their twins with ``submit(rows, run_name)``,
    wait for them, compare each pair, write audit.jsonl and audit.json; returns the summary.

    RunBusyError if the run has no done image yet; WaitTimeoutError after ``timeout`` s."""
    run_id = run.run_id
    chosen = sample(run.results(JobState.DONE), size)
    if not chosen:
        raise RunBusyError(f"run {run_id!r} has no done image to audit yet")
    images = [image_key(prefix, run_id, result.job_id, url_extension(result.key)) for result in chosen]
    sidecars = [json.loads(storage.get(sidecar_key(key))) for key in images]
    twins = submit([twin_row(sidecar) for sidecar in sidecars], audit_run_id(run_id))
    twins.wait(progress=progress, timeout=timeout)
    made = {job_index(twin.job_id): twin for twin in twins.results(JobState.DONE)}
    records = []
    for position, (result, image) in enumerate(zip(chosen, images, strict=True)):
        if position in made:
            twin = made[position]
            uncached = image_key(prefix, twins.run_id, twin.job_id, url_extension(twin.key))
            records.append(audit_record(result.job_id, storage.get(image), storage.get(uncached), uncached))
    summary = summarize(records, run_id=run_id, requested=len(chosen), deepcache=sidecars[0]["deepcache"])
    put_replacing(storage, audit_rows_key(prefix, run_id), to_jsonl(records), "application/x-ndjson")
    put_replacing(storage, audit_summary_key(prefix, run_id), json.dumps(summary, indent=1).encode())
    return summary
