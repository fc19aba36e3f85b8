"""The Kubernetes manifests in ops/k8s, validated offline against the real schemas.

Built-in kinds: `kubernetes-validate` (the Kubernetes OpenAPI schemas, strict: unknown fields are
errors). KEDA's ScaledObject: the JSON schema of `cloudcoil-models-keda`'s ScaledObject (pydantic
models generated from KEDA's CRDs), made strict the same way. Then what no schema can see: the
references between the manifests, and their agreement with docker-compose.yml, the worker's
settings and its metrics.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject

from producer.settings import ClientSettings
from tests.ops.metrics_contract import METRICS_PORT, check_expr
from worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "ops" / "k8s"
OLDEST_K8S = "1.29"

Manifest = dict[str, Any]


def _load(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def kustomization() -> Manifest:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def applied(kustomization: Manifest) -> dict[tuple[str, str], Manifest]:
    """(kind, name) -> manifest, for everything `kubectl apply -k ops/k8s` applies."""
    out: dict[tuple[str, str], Manifest] = {}
    for resource in kustomization["resources"]:
        for doc in _load(K8S / resource):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in out, f"{key} twice"
            out[key] = doc
    return out


@pytest.fixture(scope="module")
def secret_example() -> Manifest:
    (secret,) = _load(K8S / "secret.example.yaml")
    return secret


def _container(applied: dict, kind: str, name: str) -> Manifest:
    (container,) = applied[(kind, name)]["spec"]["template"]["spec"]["containers"]
    return container


def _strict(schema: Any) -> Any:
    """Reject unknown fields, as `kubectl apply --validate=strict` does."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


@pytest.fixture(scope="module")
def scaledobject_validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(_strict(ScaledObject.model_json_schema(by_alias=True)))


# --------------------------------------------------------------------------- schemas


def test_kustomization_applies_every_manifest_but_the_secret_example(kustomization: Manifest) -> None:
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == {f for f in files if not f.endswith(".example.yaml")}
    assert "secret.example.yaml" in files
    assert kustomization["namespace"]


@pytest.mark.parametrize("version", [OLDEST_K8S, kubernetes_validate.utils.latest_version()])
def test_builtin_kinds_are_valid(applied: dict, secret_example: Manifest, version: str) -> None:
    built_in = [doc for doc in applied.values() if doc["apiVersion"] != "keda.sh/v1alpha1"]
    kinds = {doc["kind"] for doc in built_in}
    assert kinds == {"ConfigMap", "PersistentVolumeClaim", "Service", "StatefulSet", "Deployment"}
    for doc in [*built_in, secret_example]:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validators_reject_mistakes(applied: dict, scaledobject_validator: jsonschema.Draft202012Validator) -> None:
    deployment = copy.deepcopy(applied[("Deployment", "deepqueue-worker")])
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 120
    with pytest.raises(kubernetes_validate.ValidationError, match="terminationGracePeriod"):
        kubernetes_validate.validate(deployment, OLDEST_K8S, strict=True)

    scaled = copy.deepcopy(applied[("ScaledObject", "deepqueue-worker")])
    scaled["spec"]["minReplicas"] = 0
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 128
    errors = sorted(error.message for error in scaledobject_validator.iter_errors(scaled))
    assert any("minReplicas" in e for e in errors) and any("not of type 'string'" in e for e in errors), errors


def test_scaledobject_is_valid(applied: dict, scaledobject_validator: jsonschema.Draft202012Validator) -> None:
    (scaled,) = [doc for doc in applied.values() if doc["kind"] == "ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    scaledobject_validator.validate(scaled)


def test_no_manifest_names_a_namespace(applied: dict, secret_example: Manifest) -> None:
    for doc in [*applied.values(), secret_example]:
        assert "namespace" not in doc["metadata"], doc["metadata"]["name"]


# --------------------------------------------------------------------------- references


def test_worker_deployment(applied: dict, secret_example: Manifest) -> None:
    deployment = applied[("Deployment", "deepqueue-worker")]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    spec = pod["spec"]
    worker = _container(applied, "Deployment", "deepqueue-worker")
    assert worker["command"] == ["deepqueue", "worker"]

    # One GPU per pod, the model cache on a shared volume.
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    (mount,) = worker["volumeMounts"]
    assert mount["mountPath"] == "/models"
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    claim = applied[("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]  # pods on several nodes share it
    (config_ref,) = worker["envFrom"]
    config = applied[("ConfigMap", config_ref["configMapRef"]["name"])]["data"]
    assert config["HF_HOME"].startswith("/models/")

    # Credentials only from the Secret, under keys its example has.
    env = {e["name"]: e for e in worker["env"]}
    secret_keys = set(secret_example["stringData"])
    example_text = (K8S / "secret.example.yaml").read_text()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret_example["metadata"]["name"] and ref["key"] in secret_keys
        assert secret_example["stringData"][ref["key"]] == "REPLACE-ME"
    for e in env.values():
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref and ref.get("optional"):
            assert ref["key"] in example_text, ref  # documented there, commented out
    assert not any(re.search(r"KEY|SECRET|PASSWORD|TOKEN", key) for key in config), "a credential in the ConfigMap"

    # Node name POD@NODE: unique per pod, says where it runs (worker/cli.py node_name).
    assert env["DEEPQUEUE_WORKER_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["DEEPQUEUE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"

    # Metrics for Prometheus.
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)


def _port(container: Manifest, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return found


def test_worker_probes_follow_the_health_contract(applied: dict) -> None:
    worker = _container(applied, "Deployment", "deepqueue-worker")
    config = applied[("ConfigMap", "deepqueue-config")]["data"]
    assert int(config["DEEPQUEUE_METRICS_PORT"]) == METRICS_PORT
    probes = {kind: worker[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    paths = {kind: probe["httpGet"]["path"] for kind, probe in probes.items()}
    assert paths == {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
    for probe in probes.values():
        assert _port(worker, probe["httpGet"]["port"]) == METRICS_PORT
    # Liveness waits until the pipeline is built, for as long as the worker may take to build it.
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= float(config["DEEPQUEUE_LOAD_TIMEOUT_S"])


def _duration_s(text: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", text))


def test_worker_shuts_down_as_in_compose(applied: dict) -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    grace = _duration_s(compose["services"]["worker"]["stop_grace_period"])
    spec = applied[("Deployment", "deepqueue-worker")]["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == grace


def test_configmap_is_valid_worker_settings(applied: dict) -> None:
    config = applied[("ConfigMap", "deepqueue-config")]["data"]
    ours = {key[len("DEEPQUEUE_") :].lower(): value for key, value in config.items() if key.startswith("DEEPQUEUE_")}
    per_pod = {"worker_name", "host"}  # set per pod in worker.yaml, read by worker/cli.py
    unknown = set(ours) - set(WorkerSettings.model_fields) - per_pod
    assert not unknown, f"not worker settings: {unknown}"
    settings = WorkerSettings(**{k: v for k, v in ours.items() if k in WorkerSettings.model_fields})
    assert settings.storage == "s3" and settings.device == "cuda"
    assert settings.broker_url.startswith("redis://redis:6379/")
    assert settings.result_backend.startswith("redis://redis:6379/")


def test_redis_persists_its_queue(applied: dict) -> None:
    statefulset = applied[("StatefulSet", "redis")]
    redis = _container(applied, "StatefulSet", "redis")
    args = redis.get("command", []) + redis.get("args", [])
    assert args[args.index("--appendonly") + 1] == "yes"
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in redis["volumeMounts"]
    service = applied[("Service", statefulset["spec"]["serviceName"])]
    assert service["metadata"]["name"] == "redis"  # what the ConfigMap's URLs name
    assert service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    assert [p["port"] for p in service["spec"]["ports"]] == [6379]


def test_images_are_pinned(applied: dict, kustomization: Manifest) -> None:
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]
    for (kind, name), doc in applied.items():
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            repo, _, tag = container["image"].rpartition(":")
            assert repo and re.fullmatch(r"\d+\.\d+\.\d+(-\w+)?", tag), (kind, name, container["image"])
            if repo == "deepqueue":  # the image built from ops/Dockerfile, renamed to its registry here
                (entry,) = [i for i in kustomization["images"] if i["name"] == "deepqueue"]
                assert entry["newTag"] == tag == version
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert _container(applied, "StatefulSet", "redis")["image"] == compose["services"]["redis"]["image"]


# --------------------------------------------------------------------------- KEDA


def test_keda_scales_the_worker_deployment_on_waiting_plus_reserved(applied: dict, kustomization: Manifest) -> None:
    scaled = applied[("ScaledObject", "deepqueue-worker")]["spec"]
    target = scaled["scaleTargetRef"]
    deployment = applied[(target["kind"], target["name"])]
    assert (target["apiVersion"], deployment["apiVersion"]) == ("apps/v1", "apps/v1")
    assert scaled["minReplicaCount"] == 0 < scaled["maxReplicaCount"]

    config = applied[("ConfigMap", "deepqueue-config")]["data"]
    queue = config["DEEPQUEUE_QUEUE"]
    triggers = {t["type"]: t["metadata"] for t in scaled["triggers"]}
    assert set(triggers) == {"redis", "prometheus"}

    # Waiting: the queue's list in the broker's database, reached from KEDA's namespace.
    redis = triggers["redis"]
    assert redis["listName"] == queue
    assert redis["databaseIndex"] == config["DEEPQUEUE_BROKER_URL"].rsplit("/", 1)[1]
    assert redis["address"] == f"redis.{kustomization['namespace']}.svc:6379"
    assert int(redis["activationListLength"]) == 0  # one waiting job wakes a worker from zero

    # Waiting + reserved, as every worker exports it: max across workers, then summed over the states.
    prometheus = triggers["prometheus"]
    query = prometheus["query"]
    assert check_expr(query) == ["deepqueue_queue_jobs"]
    assert f'queue="{queue}"' in query
    assert re.fullmatch(r"sum\(max by \(state\) \(deepqueue_queue_jobs\{[^}]*\}\)\)", query), query
    assert "state=" not in query  # both states
    assert prometheus["ignoreNullValues"] == "true"  # no worker, no series: the redis trigger decides

    # One target per replica for both (the list's in messages of a prompt batch each), at least
    # what one worker reserves: new pods only for jobs no worker holds yet.
    assert int(redis["listLength"]) * ClientSettings().prompt_batch == int(prometheus["threshold"])
    settings = WorkerSettings(max_batch=int(config["DEEPQUEUE_MAX_BATCH"]))
    assert int(prometheus["threshold"]) >= settings.prefetch_count


# --------------------------------------------------------------------------- one more model


def _model_manifests(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(K8S / "model.py"), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_another_models_workers_scale_on_its_own_queue(
    applied: dict, scaledobject_validator: jsonschema.Draft202012Validator
) -> None:
    """`ops/k8s/model.py sdxl MODEL`: valid manifests, the base worker's but for the name, the
    model, its alias (so its queue) and KEDA's triggers; neither Deployment selects the other's pods."""
    done = _model_manifests("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "--warm-shapes", "1024x1024:4")
    assert done.returncode == 0, done.stderr
    deployment, scaled = yaml.safe_load_all(done.stdout)
    kubernetes_validate.validate(deployment, OLDEST_K8S, strict=True)
    scaledobject_validator.validate(scaled)
    base = applied[("Deployment", "deepqueue-worker")]
    assert deployment["metadata"]["name"] == scaled["metadata"]["name"] == "deepqueue-worker-sdxl"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "deepqueue-worker-sdxl"
    ours, theirs = deployment["spec"]["selector"]["matchLabels"], base["spec"]["selector"]["matchLabels"]
    assert not ours.items() <= base["spec"]["template"]["metadata"]["labels"].items()
    assert not theirs.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["DEEPQUEUE_MODEL"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert env["DEEPQUEUE_WARM_SHAPES"] == "1024x1024:4"  # its own, not the ConfigMap's 512x512 ones
    settings = WorkerSettings(
        queue=applied[("ConfigMap", "deepqueue-config")]["data"]["DEEPQUEUE_QUEUE"],
        model_alias=env["DEEPQUEUE_MODEL_ALIAS"],
    )
    triggers = {t["type"]: t["metadata"] for t in scaled["spec"]["triggers"]}
    assert triggers["redis"]["listName"] == settings.serving_queue == "deepqueue.sdxl"
    assert f'queue="{settings.serving_queue}"' in triggers["prometheus"]["query"]
    # Everything else is the base worker's.
    base_container = _container(applied, "Deployment", "deepqueue-worker")
    assert {k: v for k, v in container.items() if k != "env"} == {k: v for k, v in base_container.items() if k != "env"}
    assert container["env"][3:] == base_container["env"]


def test_a_bad_alias_is_refused() -> None:
    done = _model_manifests("SDXL", "some/model")
    assert done.returncode == 2 and "alias 'SDXL'" in done.stderr and not done.stdout
