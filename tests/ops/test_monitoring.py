"""Prometheus and Grafana for docker-compose.yml: the scrape config, the provisioning and the dashboard.

Every query must name only the metric families the worker exports (``worker/metrics.py``), so a
renamed metric shows up here rather than as an empty panel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.ops.metrics_contract import FAMILIES, METRICS_PORT, SERIES, check_expr, metric_names

REPO = Path(__file__).resolve().parents[2]
OPS = REPO / "ops"
PROMETHEUS_YML = OPS / "prometheus" / "prometheus.yml"
PROVISIONING = OPS / "grafana" / "provisioning"
DASHBOARD = OPS / "grafana" / "dashboards" / "deepqueue.json"
COMPOSE_FILE = REPO / "docker-compose.yml"

WORKER_ALIAS = "deepqueue-workers"


def test_metric_names_parser() -> None:
    assert metric_names('sum by (outcome) (rate(deepqueue_images_total{outcome="done"}[5m]))') == [
        "deepqueue_images_total"
    ]
    assert metric_names("histogram_quantile(0.95, sum by (le, stage) (rate(x_bucket[$__rate_interval])))") == [
        "x_bucket"
    ]
    assert metric_names("a / on (instance) group_left (max_batch) b > bool 0 and c offset 5m") == ["a", "b", "c"]
    assert metric_names("sum(a) / $max_batch") == ["a"]
    with pytest.raises(AssertionError, match="not metrics the worker exports"):
        check_expr("sum(rate(deepqueue_images_done_total[5m]))")
    with pytest.raises(AssertionError, match="gauge"):
        check_expr("rate(deepqueue_ready[5m])")
    with pytest.raises(AssertionError, match="read raw"):
        check_expr("sum(deepqueue_errors_total)")


def test_the_families_are_those_the_worker_defines() -> None:
    """A family renamed in worker/metrics.py must be renamed in the dashboard (and here) too."""
    source = (REPO / "worker" / "metrics.py").read_text()
    for family in FAMILIES:
        assert f'"{family.removesuffix("_total")}"' in source, family


# --------------------------------------------------------------------------- Prometheus


@pytest.fixture(scope="module")
def compose_raw() -> dict:
    """docker-compose.yml as YAML (anchors merged; variables left as written)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_prometheus_scrapes_every_worker_on_the_metrics_port(compose_raw: dict) -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert config["global"]["scrape_interval"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert len(jobs) == len(config["scrape_configs"])  # names are unique

    (sd,) = jobs["deepqueue-workers"]["dns_sd_configs"]
    assert sd["names"] == [WORKER_ALIAS] and sd["type"] == "A" and sd["port"] == METRICS_PORT

    # The name resolves to every worker service's containers: each carries it as an alias.
    services = compose_raw["services"]
    workers = [name for name, s in services.items() if s.get("command") == ["deepqueue", "worker"]]
    assert {"worker", "worker-cpu"} <= set(workers)
    for name in workers:
        service = services[name]
        assert service["networks"]["default"]["aliases"] == [WORKER_ALIAS], name
        assert str(service["environment"]["DEEPQUEUE_METRICS_PORT"]) == str(METRICS_PORT), name
    assert jobs["flower"]["static_configs"][0]["targets"] == ["flower:5555"]


# --------------------------------------------------------------------------- Grafana


def test_grafana_provisioning(compose_raw: dict) -> None:
    (datasources_file,) = sorted((PROVISIONING / "datasources").glob("*.yml"))
    (datasource,) = yaml.safe_load(datasources_file.read_text())["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"  # the compose service
    assert "prometheus" in compose_raw["services"]

    (providers_file,) = sorted((PROVISIONING / "dashboards").glob("*.yml"))
    (provider,) = yaml.safe_load(providers_file.read_text())["providers"]
    assert provider["type"] == "file"
    # The provider reads where docker-compose.yml mounts ops/grafana/dashboards.
    mounts = dict(volume.split(":")[:2] for volume in compose_raw["services"]["grafana"]["volumes"])
    assert mounts["./ops/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./ops/grafana/provisioning"] == "/etc/grafana/provisioning"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panel_exprs(dashboard: dict) -> dict[str, list[str]]:
    return {panel["title"] + f" #{panel['id']}": [t["expr"] for t in panel["targets"]] for panel in dashboard["panels"]}


def test_dashboard_queries_read_only_the_workers_metrics(dashboard: dict) -> None:
    uid = yaml.safe_load(next((PROVISIONING / "datasources").glob("*.yml")).read_text())["datasources"][0]["uid"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            check_expr(target["expr"])

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    used = {name for exprs in _panel_exprs(dashboard).values() for e in exprs for name in re.findall(r"\$(\w+)", e)}
    assert used - {"__rate_interval"} <= set(variables)
    for variable in variables.values():
        metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"]).groups()
        assert metric in SERIES, variable["name"]


def test_dashboard_shows_throughput_fill_latency_errors_and_queue_depth(dashboard: dict) -> None:
    exprs = [e for panel_exprs in _panel_exprs(dashboard).values() for e in panel_exprs]

    def some(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    assert some(r"rate\(deepqueue_images_total\b"), "throughput"
    # Batch fill: the mean batch size (histogram sum / count) over max_batch (deepqueue_worker_info's label).
    assert some(r"deepqueue_batch_size_sum.*/.*deepqueue_batch_size_count.*/\s*\$max_batch"), "batch fill"
    assert "deepqueue_worker_info, max_batch" in dashboard["templating"]["list"][0]["definition"]
    for quantile in ("0.5", "0.95"):
        assert some(rf"histogram_quantile\({quantile},.*by \(le, stage\).*deepqueue_stage_seconds_bucket"), quantile
    assert some(r"sum by \(kind\) \(rate\(deepqueue_errors_total"), "errors by kind"
    # Queue depth: waiting and reserved, the same on every worker, so max, never sum, across workers.
    assert some(r"max by \(queue, state\) \(deepqueue_queue_jobs\)"), "queue depth"
    assert not some(r"sum\s*(by\s*\([^)]*\))?\s*\(\s*deepqueue_queue_jobs"), "queue depth summed over workers"
