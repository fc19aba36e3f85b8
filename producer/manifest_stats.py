"""A run's ``stats.json``, built one manifest row and one job state at a time (constant memory):
counts per state, failures by reason, images/s, GPU-seconds, time span, sizes, models, DeepCache
settings. Pure.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

from producer.state import JobResult, JobState

#: Distinct values kept per stats counter; the rest count as "(other)".
TOP_KEPT = 1000
#: Failure reasons listed in stats.json, the most frequent first.
TOP_REASONS = 20
STATS_VERSION = 1
OTHER = "(other)"

_VOLATILE = (
    (re.compile(r"\b\d{8,}-[0-9a-f]{12}\b"), "<job>"),
    (re.compile(r"s3://\S+"), "<s3 object>"),
    (re.compile(r"(?<![\w.])/[^\s:'\"]+"), "<path>"),
    (re.compile(r"\b0x[0-9a-f]+\b|\b[0-9a-f]{12,}\b"), "<id>"),
)


def reason_kind(reason: str | None) -> str:
    """A failure reason with what differs from job to job (ids, object keys, paths) taken out,
    so the same failure counts once: ``storing failed: upload of s3://b/r/images/0001-ab.png
    failed`` -> ``storing failed: upload of <s3 object> failed``."""
    text = " ".join((reason or "unknown").split())
    for pattern, replacement in _VOLATILE:
        text = pattern.sub(replacement, text)
    return text[:300]


class TopCounter(Counter):
    """A Counter that keeps at most ``TOP_KEPT`` distinct values; later ones count as OTHER."""

    def add(self, value: Any, count: int = 1) -> None:
        key = "none" if value is None else str(value)
        if key not in self and len(self) >= TOP_KEPT:
            key = OTHER
        self[key] += count

    def top(self, n: int | None = None) -> dict[str, int]:
        return dict(self.most_common(n))


class StatsBuilder:
    """stats.json, one row and one job state at a time (constant memory)."""

    def __init__(self) -> None:
        self.rows = 0
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.gpu_seconds = 0.0
        self.bytes_total = 0
        self.bytes_known = 0
        self.bytes_min: int | None = None
        self.bytes_max: int | None = None
        self.sizes, self.models, self.schedulers = TopCounter(), TopCounter(), TopCounter()
        self.deepcache, self.formats, self.steps, self.workers = TopCounter(), TopCounter(), TopCounter(), TopCounter()
        self.failed_by_reason = TopCounter()
        self.audited = 0
        self.phashes = self.clip_scored = self.nsfw_checked = self.nsfw_flagged = 0
        self.clip_total = 0.0

    def add_row(self, flat: Mapping[str, Any]) -> None:
        self.rows += 1
        started, finished = flat.get("started_at"), flat.get("finished_at")
        if started is not None:
            self.started_at = started if self.started_at is None else min(self.started_at, started)
        if finished is not None:
            self.finished_at = finished if self.finished_at is None else max(self.finished_at, finished)
        # Each image carries its share of its batch's time: the sum is the batches' total.
        self.gpu_seconds += flat.get("inference_s") or 0.0
        size = flat.get("bytes")
        if size is not None:
            self.bytes_total += size
            self.bytes_known += 1
            self.bytes_min = size if self.bytes_min is None else min(self.bytes_min, size)
            self.bytes_max = size if self.bytes_max is None else max(self.bytes_max, size)
        self.sizes.add(f"{flat.get('width')}x{flat.get('height')}")
        self.models.add(flat.get("model_id"))
        self.schedulers.add(flat.get("scheduler"))
        self.formats.add(flat.get("format"))
        self.steps.add(flat.get("steps"))
        self.workers.add(flat.get("worker_name") or flat.get("worker_hostname"))
        if flat.get("deepcache"):
            self.deepcache.add(f"{flat.get('cache_interval')}/{flat.get('cache_branch')}")
        else:
            self.deepcache.add("off")
        if flat.get("audit_psnr") is not None or flat.get("audit_ssim") is not None:
            self.audited += 1
        self.phashes += flat.get("phash") is not None
        if flat.get("clip_score") is not None:
            self.clip_scored += 1
            self.clip_total += flat["clip_score"]
        if flat.get("nsfw") is not None:
            self.nsfw_checked += 1
            self.nsfw_flagged += bool(flat["nsfw"])

    def add_result(self, result: JobResult) -> None:
        if result.state is JobState.FAILED:
            self.failed_by_reason.add(reason_kind(result.reason))

    def build(self, run_id: str, counts: Mapping[str, int], **extra: Any) -> dict[str, Any]:
        span = None
        if self.started_at is not None and self.finished_at is not None:
            span = max(self.finished_at - self.started_at, 0.0)
        return {
            "stats_version": STATS_VERSION,
            "run_id": run_id,
            "count": sum(counts.values()),
            **{state: counts.get(state, 0) for state in counts},
            "manifest_rows": self.rows,
            "failed_by_reason": self.failed_by_reason.top(TOP_REASONS),
            "failed_reasons_distinct": len(self.failed_by_reason),
            "images_per_s": self.rows / span if span else None,
            "gpu_seconds": round(self.gpu_seconds, 6),
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration_s": span,
            "bytes": {
                "total": self.bytes_total,
                "mean": self.bytes_total / self.bytes_known if self.bytes_known else None,
                "min": self.bytes_min,
                "max": self.bytes_max,
            },
            "sizes": self.sizes.top(),
            "models": self.models.top(),
            "schedulers": self.schedulers.top(),
            "steps": self.steps.top(),
            "deepcache": self.deepcache.top(),
            "formats": self.formats.top(),
            "workers": self.workers.top(),
            "audited": self.audited,
            "scores": {
                "phash": self.phashes,
                "clip_score": {
                    "count": self.clip_scored,
                    "mean": self.clip_total / self.clip_scored if self.clip_scored else None,
                },
                "nsfw": {"count": self.nsfw_checked, "flagged": self.nsfw_flagged},
            },
            **extra,
        }
