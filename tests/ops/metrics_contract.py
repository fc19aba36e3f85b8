"""The worker's metrics contract as the ops files use it, and a PromQL reader to check them against it.

Shared by test_monitoring.py (the Grafana dashboard) and test_k8s.py (KEDA's Prometheus trigger).
"""

from __future__ import annotations

import re

METRICS_PORT = 9808

#: The worker's metric families (the contract of worker/metrics.py) and their types.
FAMILIES = {
    "deepqueue_images_total": "counter",
    "deepqueue_batches_total": "counter",
    "deepqueue_batch_size": "histogram",
    "deepqueue_stage_seconds": "histogram",
    "deepqueue_errors_total": "counter",
    "deepqueue_model_load_seconds": "gauge",
    "deepqueue_warmup_seconds": "gauge",
    "deepqueue_compiles_total": "counter",
    "deepqueue_worker_info": "gauge",
    "deepqueue_jobs_in_flight": "gauge",
    "deepqueue_jobs_buffered": "gauge",
    "deepqueue_ready": "gauge",
    "deepqueue_queue_jobs": "gauge",
}


def _series_types() -> dict[str, str]:
    """Sample name -> the type of its family (a histogram has _bucket, _sum and _count series)."""
    out: dict[str, str] = {}
    for family, kind in FAMILIES.items():
        if kind == "histogram":
            out.update({f"{family}_{suffix}": f"histogram_{suffix}" for suffix in ("bucket", "sum", "count")})
        else:
            out[family] = kind
    return out


SERIES = _series_types()

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def metric_names(expr: str) -> list[str]:
    """The metric names a PromQL expression reads (functions, labels, strings, ranges and $vars left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery selectors
    text = _LABEL_LISTS.sub(" ", text)  # by (...), on (...), ...
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # dashboard variables
    names = []
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):  # not the unit of 5m or 1e3
        word = match.group()
        if word.lower() in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue  # an operator, or a function / aggregation
        names.append(word)
    return names


def check_expr(expr: str) -> list[str]:
    """Assert that ``expr`` reads only the worker's series, and counters only through rate/increase."""
    names = metric_names(expr)
    assert names, f"no metric in {expr!r}"
    unknown = sorted(set(names) - set(SERIES))
    assert not unknown, f"{expr!r} reads {unknown}, not metrics the worker exports ({sorted(FAMILIES)})"
    for func, name in re.findall(r"\b(rate|irate|increase)\s*\(\s*([A-Za-z_:][A-Za-z0-9_:]*)", expr):
        assert SERIES[name] != "gauge", f"{func}() of the gauge {name} in {expr!r}"
    for name in names:
        if SERIES[name] in ("counter", "histogram_bucket", "histogram_sum", "histogram_count"):
            assert re.search(rf"\b(?:rate|irate|increase)\s*\(\s*{name}\b", expr), f"{name} read raw in {expr!r}"
    if "histogram_quantile" in expr:
        assert re.search(r"by\s*\([^)]*\ble\b", expr), f"histogram_quantile without `le` in {expr!r}"
    return names
