"""Privacy and credentials (issue 6, security): prompts stay out of message headers (task events,
Flower), Redis passwords and TLS work end to end, and no password is ever printed."""

from __future__ import annotations

import datetime
import json
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner, Result

from ops.localstack import free_port, stop, wait_for
from producer import Client, ClientSettings, Job, JobState
from producer.cli import cli
from producer.enqueue import producer_app
from producer.fair import FairQueue
from producer.settings import redact_url
from producer.state import RunStore
from tests.helpers import queued_jobs, queued_messages

PASSWORD = "s3cr3t-Pa55word"
PROMPT = "PRIVATE-PROMPT a portrait of my neighbour's kid"
NEGATIVE = "PRIVATE-NEGATIVE blurry"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), prog_name="deepqueue")


def prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "p.txt"
    path.write_text(f"{PROMPT}\nanother prompt\n", encoding="utf-8")
    return path


def start_redis_server(data_dir: Path, *args: str, ping: redis.Redis | None = None) -> subprocess.Popen:
    """A private redis-server with extra arguments (``--requirepass``, TLS); returns when it answers."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(data_dir), *args],
        stdout=subprocess.DEVNULL,
    )
    if ping is not None:
        try:
            wait_for(ping.ping, 10, "redis-server")
        except TimeoutError:
            stop(process)
            raise
    return process


# -- (a) no prompt in the message headers -----------------------------------------------------------


def test_published_headers_and_properties_hold_no_prompt(redis_urls):
    """Celery copies ``argsrepr``/``kwargsrepr`` from the headers into the worker's task-received
    event (what Flower shows and keeps): messages carry none, and nothing outside the body holds
    the prompt."""
    with Client(*redis_urls) as client:
        run = client.submit([{"prompt": PROMPT, "negative_prompt": NEGATIVE}, "a fox"], run="private", steps=4)
        jobs = client.prepare([{"prompt": PROMPT, "negative_prompt": NEGATIVE}, "a fox"], run="private", steps=4)
    assert run.submitted == 2
    [message] = queued_messages(redis_urls[0])  # a prompt batch of both
    outside_body = json.dumps({key: value for key, value in message.items() if key != "body"})
    assert "PRIVATE" not in outside_body and "a fox" not in outside_body
    assert message["headers"] == {"task": "deepqueue.generate", "id": f"{jobs[0].job_id}+1"}
    # The body still carries the whole jobs, once.
    _, kwargs, _ = json.loads(message["body"])
    assert [Job.model_validate(fields) for fields in queued_jobs(redis_urls[0])] == jobs
    assert set(kwargs) == {"enqueued_at"} and message["body"].count(PROMPT) == 1


def test_a_message_carries_the_job_once(redis_urls):
    """Before, the header repeated the job (up to 1 KiB of it): a message of a long prompt is now
    hardly more than its body."""
    long_prompt = "a very detailed prompt " * 80
    with Client(*redis_urls) as client:
        client.submit([long_prompt], run="size")
    [raw] = FairQueue(redis.Redis.from_url(redis_urls[0]), "deepqueue").messages("size")
    message = json.loads(raw)
    assert len(raw) - len(json.dumps(message["body"], ensure_ascii=False)) < 250  # envelope only
    assert raw.decode().count(long_prompt) == 1


# -- (b) a password and TLS reach Redis -------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_redis(tmp_path_factory) -> Iterator[str]:
    """``redis://127.0.0.1:PORT`` of a redis-server that requires PASSWORD."""
    port = free_port()
    ping = redis.Redis(host="127.0.0.1", port=port, password=PASSWORD)
    process = start_redis_server(
        tmp_path_factory.mktemp("auth-redis"), "--port", str(port), "--requirepass", PASSWORD, ping=ping
    )
    yield f"127.0.0.1:{port}"
    stop(process)


@pytest.fixture
def auth_env(auth_redis, monkeypatch) -> tuple[str, str]:
    urls = (f"redis://:{PASSWORD}@{auth_redis}/0", f"redis://:{PASSWORD}@{auth_redis}/1")
    for url in urls:
        redis.Redis.from_url(url).flushdb()
    monkeypatch.setenv("DEEPQUEUE_BROKER_URL", urls[0])
    monkeypatch.setenv("DEEPQUEUE_RESULT_BACKEND", urls[1])
    return urls


def test_a_password_in_the_urls_reaches_an_auth_protected_redis(auth_env, tmp_path):
    with Client(*auth_env) as client:
        run = client.submit(["a fox", "a heron"], run="authed", steps=4)
        assert client.run("authed").status().total == 2 == run.submitted
    assert len(queued_jobs(auth_env[0])) == 2

    submitted = invoke("submit", str(prompt_file(tmp_path)), "--run", "authed-cli")
    assert submitted.exit_code == 0, submitted.output
    status = invoke("status", "authed-cli")
    assert status.exit_code == 0 and status.output.strip().startswith(
        "authed-cli: 2 jobs (queued 2, running 0, done 0, failed 0, cancelled 0)"
    )
    assert len(queued_jobs(auth_env[0])) == 4
    assert PASSWORD not in submitted.output + status.output


@pytest.mark.parametrize("credentials", [":wrong-password@", ""], ids=["wrong-password", "no-password"])
@pytest.mark.parametrize("command", ["submit", "status"])
def test_a_wrong_or_missing_password_is_exit_3_and_never_printed(
    auth_redis, monkeypatch, tmp_path, credentials, command
):
    queued = len(queued_jobs(f"redis://:{PASSWORD}@{auth_redis}/0"))
    for name, db in (("DEEPQUEUE_BROKER_URL", 0), ("DEEPQUEUE_RESULT_BACKEND", 1)):
        monkeypatch.setenv(name, f"redis://{credentials}{auth_redis}/{db}")
    args = ["submit", str(prompt_file(tmp_path)), "--run", "denied"] if command == "submit" else ["status", "denied"]
    result = invoke(*args)
    assert result.exit_code == 3, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "cannot reach Redis" in line and "DEEPQUEUE_RESULT_BACKEND" in line
    assert "wrong-password" not in result.output and PASSWORD not in result.output
    if credentials:
        assert f"redis://:***@{auth_redis}/1" in line
    assert len(queued_jobs(f"redis://:{PASSWORD}@{auth_redis}/0")) == queued


def test_a_wrong_broker_password_alone_is_exit_3_and_never_printed(auth_env, monkeypatch, tmp_path):
    """The result backend answers, the broker refuses: the publish fails, nothing is marked queued."""
    monkeypatch.setenv("DEEPQUEUE_BROKER_URL", auth_env[0].replace(PASSWORD, "wrong-password"))
    result = invoke("submit", str(prompt_file(tmp_path)), "--run", "half-denied")
    assert result.exit_code == 3, result.output
    assert "cannot reach Redis" in result.output and "redis://:***@" in result.output
    assert "wrong-password" not in result.output and PASSWORD not in result.output
    assert len(queued_jobs(auth_env[0])) == 0
    assert RunStore.from_url(auth_env[1]).counts("half-denied")[JobState.QUEUED] == 0


def tls_files(directory: Path) -> dict[str, Path]:
    """A private CA and a server certificate for localhost and 127.0.0.1, as PEM files."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            import ipaddress

            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    files = {name: directory / f"{name}.pem" for name in ("ca", "cert", "key")}
    pem = serialization.Encoding.PEM
    files["ca"].write_bytes(
        certificate("deepqueue test CA", ca_key, "deepqueue test CA", ca_key, ca=True).public_bytes(pem)
    )
    files["cert"].write_bytes(
        certificate("localhost", server_key, "deepqueue test CA", ca_key, ca=False).public_bytes(pem)
    )
    files["key"].write_bytes(
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return files


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """(``localhost:PORT``, CA file) of a redis-server that speaks only TLS and requires PASSWORD."""
    directory = tmp_path_factory.mktemp("tls-redis")
    files = tls_files(directory)
    port = free_port()
    ping = redis.Redis(host="localhost", port=port, password=PASSWORD, ssl=True, ssl_ca_certs=str(files["ca"]))
    tls = ["--tls-cert-file", str(files["cert"]), "--tls-key-file", str(files["key"])]
    tls += ["--tls-ca-cert-file", str(files["ca"]), "--tls-auth-clients", "no"]
    try:
        process = start_redis_server(
            directory, "--port", "0", "--tls-port", str(port), *tls, "--requirepass", PASSWORD, ping=ping
        )
    except TimeoutError:
        pytest.skip("this redis-server was built without TLS")
    yield f"localhost:{port}", files["ca"]
    stop(process)


def rediss(address: str, db: int, ca: Path | None) -> str:
    query = "ssl_cert_reqs=required" + (f"&ssl_ca_certs={ca}" if ca else "")
    return f"rediss://:{PASSWORD}@{address}/{db}?{query}"


def test_rediss_urls_configure_certificate_checks_in_celery_and_the_run_store(tmp_path):
    url = f"rediss://:{PASSWORD}@redis.example:6380/0?ssl_cert_reqs=required&ssl_ca_certs={tmp_path / 'ca.pem'}"
    app = producer_app(ClientSettings(broker_url=url))
    try:
        connection = app.connection_for_write()
        assert connection.transport_cls == "rediss"
        assert connection.ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(tmp_path / "ca.pem")}
    finally:
        app.close()
    pool = RunStore.from_url(url)._redis.connection_pool
    assert pool.connection_class is redis.SSLConnection
    assert pool.connection_kwargs["ssl_cert_reqs"] == "required" and pool.connection_kwargs["password"] == PASSWORD


def test_submit_and_status_over_tls_with_a_password(tls_redis, tmp_path, monkeypatch):
    address, ca = tls_redis
    for db in (0, 1):
        redis.Redis.from_url(rediss(address, db, ca)).flushdb()
    monkeypatch.setenv("DEEPQUEUE_BROKER_URL", rediss(address, 0, ca))
    monkeypatch.setenv("DEEPQUEUE_RESULT_BACKEND", rediss(address, 1, ca))
    submitted = invoke("submit", str(prompt_file(tmp_path)), "--run", "over-tls")
    assert submitted.exit_code == 0, submitted.output
    status = invoke("status", "over-tls")
    assert status.exit_code == 0 and status.output.startswith(
        "over-tls: 2 jobs (queued 2, running 0, done 0, failed 0, cancelled 0)"
    )
    assert len(queued_jobs(rediss(address, 0, ca))) == 2
    assert PASSWORD not in submitted.output + status.output


@pytest.mark.parametrize(("untrusted", "broker_db"), [("broker", 2), ("result backend", 4)])
def test_a_server_certificate_from_an_unknown_ca_is_refused(tls_redis, tmp_path, monkeypatch, untrusted, broker_db):
    """``ssl_cert_reqs=required`` is honoured on both connections: without the private CA the
    handshake fails (exit 3) instead of sending jobs and state over an unverified channel.

    Databases of their own: kombu pools broker connections per process by host, port, database
    and password, not by TLS settings, so a verified connection of another test would be reused.
    """
    address, ca = tls_redis
    monkeypatch.setenv("DEEPQUEUE_BROKER_URL", rediss(address, broker_db, None if untrusted == "broker" else ca))
    monkeypatch.setenv(
        "DEEPQUEUE_RESULT_BACKEND", rediss(address, broker_db + 1, None if untrusted == "result backend" else ca)
    )
    result = invoke("submit", str(prompt_file(tmp_path)), "--run", "untrusted")
    assert result.exit_code == 3, result.output
    assert "certificate verify failed" in result.output
    assert PASSWORD not in result.output and "rediss://:***@" in result.output
    assert len(queued_jobs(rediss(address, broker_db, ca))) == 0


# -- (c) no credential in what the CLI and the client print -----------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://default:s3cret@host:6379/0", "redis://default:***@host:6379/0"),
        ("rediss://:s3cret@host:6380/1?ssl_cert_reqs=required", "rediss://:***@host:6380/1?ssl_cert_reqs=required"),
        ("redis://:p@ss:w0rd@host/0", "redis://:***@host/0"),
        ("redis://s3cret@host/0", "redis://***@host/0"),
        ("redis://host:6379/0?password=s3cret&db=2", "redis://host:6379/0?password=***&db=2"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("unix:///run/redis.sock?db=1", "unix:///run/redis.sock?db=1"),
        (
            "broker redis://:a1@h1/0, backend redis://:b2@h2/1.",
            "broker redis://:***@h1/0, backend redis://:***@h2/1.",
        ),
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_unknown_run_names_the_backend_without_its_password(auth_env):
    with Client(*auth_env) as client, pytest.raises(Exception) as info:
        client.run("nope")
    assert PASSWORD not in str(info.value) and "redis://:***@" in str(info.value)
    result = invoke("status", "nope")
    assert result.exit_code == 2 and "no run named 'nope'" in result.output
    assert PASSWORD not in result.output and "redis://:***@" in result.output


@pytest.mark.parametrize("command", ["submit", "status"])
def test_unreachable_redis_message_masks_the_password(monkeypatch, tmp_path, command):
    closed = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("DEEPQUEUE_BROKER_URL", f"redis://:{PASSWORD}@{closed}/0")
    monkeypatch.setenv("DEEPQUEUE_RESULT_BACKEND", f"redis://admin:{PASSWORD}@{closed}/1")
    args = ["submit", str(prompt_file(tmp_path))] if command == "submit" else ["status", "r"]
    result = invoke(*args)
    assert result.exit_code == 3, result.output
    assert PASSWORD not in result.output
    assert f"broker redis://:***@{closed}/0, result backend redis://admin:***@{closed}/1" in result.output


def test_a_bad_setting_is_one_line_and_exit_2(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPQUEUE_VISIBILITY_TIMEOUT_S", "0")
    monkeypatch.setenv("DEEPQUEUE_BROKER_URL", f"redis://:{PASSWORD}@127.0.0.1:1/0")
    result = invoke("submit", str(prompt_file(tmp_path)))
    assert result.exit_code == 2, result.output
    assert (
        result.output.strip()
        == "Error: invalid setting: DEEPQUEUE_VISIBILITY_TIMEOUT_S: Input should be greater than 0, got '0'"
    )
