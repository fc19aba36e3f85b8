"""producer.storage: create-only writes to S3 (a real moto server) and to a local folder."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from producer.errors import StorageError
from producer.layout import image_key, sidecar_key, write_check_key
from producer.storage import LocalStorage, S3Storage

boto3 = pytest.importorskip("boto3")

METADATA = {"job-id": "00000003-0123456789ab", "run-id": "run-1", "seed": "42", "size": "64x64"}


# --- keys ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("", "run-1/images/00000003-0123456789ab.png"),
        ("datasets", "datasets/run-1/images/00000003-0123456789ab.png"),
        ("/datasets/", "datasets/run-1/images/00000003-0123456789ab.png"),
        ("a/b", "a/b/run-1/images/00000003-0123456789ab.png"),
        ("//a/b//", "a/b/run-1/images/00000003-0123456789ab.png"),
        ("/", "run-1/images/00000003-0123456789ab.png"),
    ],
)
def test_image_key_layout(prefix: str, expected: str) -> None:
    key = image_key(prefix, "run-1", "00000003-0123456789ab", "png")
    assert key == expected
    assert not key.startswith("/") and "//" not in key


def test_sidecar_key_sits_next_to_the_image() -> None:
    assert sidecar_key("p/run-1/images/00000003-0123456789ab.png") == "p/run-1/images/00000003-0123456789ab.json"
    assert sidecar_key(image_key("", "run.v2", "00000000-ffffffffffff", "jpg")) == (
        "run.v2/images/00000000-ffffffffffff.json"  # dots in the run id are left alone
    )


# --- S3 (moto server) ----------------------------------------------------------------------------


@pytest.fixture
def s3_client(s3_endpoint: str, aws_env):
    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def s3(s3_client, s3_bucket: str) -> S3Storage:
    return S3Storage(s3_client, s3_bucket)


def test_s3_put_creates_the_object_with_metadata(s3: S3Storage, s3_client, s3_bucket: str) -> None:
    assert s3.put("run-1/images/a.png", b"first", content_type="image/png", metadata=METADATA) is True
    head = s3_client.head_object(Bucket=s3_bucket, Key="run-1/images/a.png")
    assert head["Metadata"] == METADATA
    assert head["ContentType"] == "image/png"
    assert head["ContentLength"] == 5
    body = s3_client.get_object(Bucket=s3_bucket, Key="run-1/images/a.png")["Body"].read()
    assert body == b"first"


def test_s3_put_is_write_once(s3: S3Storage, s3_client, s3_bucket: str) -> None:
    """If-None-Match: * — a redelivered job must not overwrite the first upload."""
    key = "run-1/images/a.png"
    assert s3.put(key, b"first", content_type="image/png", metadata=METADATA) is True
    again = {**METADATA, "seed": "7"}
    assert s3.put(key, b"second, longer body", content_type="image/webp", metadata=again) is False
    obj = s3_client.get_object(Bucket=s3_bucket, Key=key)
    assert obj["Body"].read() == b"first"
    assert obj["Metadata"] == METADATA
    assert obj["ContentType"] == "image/png"
    # Other keys are still writable.
    assert s3.put("run-1/images/b.png", b"x", content_type="image/png", metadata={}) is True


def test_s3_exists_and_url(s3: S3Storage, s3_bucket: str) -> None:
    assert s3.exists("run-1/images/a.json") is False
    s3.put("run-1/images/a.json", b"{}", content_type="application/json", metadata={})
    assert s3.exists("run-1/images/a.json") is True
    assert s3.exists("run-1/images/a") is False  # no prefix matching
    assert s3.url("run-1/images/a.json") == f"s3://{s3_bucket}/run-1/images/a.json"


def test_s3_missing_bucket_names_the_key(s3_client) -> None:
    storage = S3Storage(s3_client, "no-such-bucket-deepqueue")
    with pytest.raises(StorageError) as caught:
        storage.put("run-1/images/a.png", b"x", content_type="image/png", metadata={})
    message = str(caught.value)
    assert "s3://no-such-bucket-deepqueue/run-1/images/a.png" in message
    assert "NoSuchBucket" in message
    assert caught.value.__cause__ is not None  # the cause is kept


def test_s3_unreachable_endpoint_is_a_storage_error(aws_env) -> None:
    import socket

    from botocore.config import Config

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=2)
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", config=config)
    with pytest.raises(StorageError, match="s3://bucket-x/k/a.png"):
        S3Storage(client, "bucket-x").put("k/a.png", b"x", content_type="image/png", metadata={})


def test_s3_connect_builds_a_client(s3_endpoint: str, s3_bucket: str) -> None:
    storage = S3Storage.connect(s3_bucket, s3_endpoint)
    assert storage.bucket == s3_bucket
    assert storage.put("k/a.png", b"x", content_type="image/png", metadata={}) is True
    assert storage.exists("k/a.png")


# --- local folder ----------------------------------------------------------------------------------


def leftovers(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.name.startswith(".part-")]


def test_local_put_is_write_once(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "out")
    key = "run-1/images/a.png"
    assert storage.exists(key) is False
    assert storage.put(key, b"first", content_type="image/png", metadata=METADATA) is True
    assert (tmp_path / "out" / key).read_bytes() == b"first"
    before = os.stat(tmp_path / "out" / key)
    assert storage.put(key, b"second", content_type="image/png", metadata=METADATA) is False
    after = os.stat(tmp_path / "out" / key)
    assert (tmp_path / "out" / key).read_bytes() == b"first"
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert storage.exists(key) is True
    assert leftovers(tmp_path) == []


def test_local_exists_and_url(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put("p/run-1/images/a.json", b"{}", content_type="application/json", metadata={})
    assert storage.exists("p/run-1/images/a.json")
    assert not storage.exists("p/run-1/images")  # a folder is not an object
    assert not storage.exists("p/run-1/images/b.json")
    assert storage.url("p/run-1/images/a.json") == str(tmp_path / "p/run-1/images/a.json")
    assert LocalStorage(str(tmp_path)).root == tmp_path


def test_local_concurrent_puts_write_once(tmp_path: Path) -> None:
    """Two deliveries of one job racing: exactly one wins, the file is whole, no temp files."""
    storage = LocalStorage(tmp_path)
    bodies = [bytes([n]) * 200_000 for n in range(8)]
    results: list[bool] = []
    barrier = threading.Barrier(len(bodies))

    def put(body: bytes) -> None:
        barrier.wait()
        results.append(storage.put("r/images/a.png", body, content_type="image/png", metadata={}))

    threads = [threading.Thread(target=put, args=(body,)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]
    assert (tmp_path / "r/images/a.png").read_bytes() in bodies
    assert leftovers(tmp_path) == []


def test_local_failure_is_a_storage_error_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a folder should be")
    storage = LocalStorage(tmp_path)
    with pytest.raises(StorageError, match="blocker") as caught:
        storage.put("blocker/images/a.png", b"x", content_type="image/png", metadata={})
    assert isinstance(caught.value.__cause__, OSError)
    assert leftovers(tmp_path) == []


# -- the start-up write check ------------------------------------------------------------------------


def test_s3_write_check_names_a_missing_bucket(s3_endpoint: str, aws_env) -> None:
    storage = S3Storage(boto3.client("s3", endpoint_url=s3_endpoint), "no-such-bucket-here")
    with pytest.raises(StorageError, match=r"bucket s3://no-such-bucket-here does not exist \(DEEPQUEUE_S3_BUCKET\)"):
        storage.check_writable(write_check_key("datasets"))


def test_s3_write_check_writes_one_object_again_and_again(s3_endpoint: str, s3_bucket: str) -> None:
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    storage = S3Storage(client, s3_bucket)
    key = write_check_key("/datasets/")
    assert key == "datasets/.deepqueue/write-check" and write_check_key("") == ".deepqueue/write-check"
    storage.check_writable(key)
    storage.check_writable(key)  # every worker start overwrites it: not write-once
    assert client.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == b"ok\n"


def test_s3_write_check_names_an_unreachable_endpoint(aws_env) -> None:
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url="http://127.0.0.1:9", config=Config(retries={"max_attempts": 1}))
    with pytest.raises(StorageError, match="cannot reach s3://b"):
        S3Storage(client, "b").check_writable(".deepqueue/write-check")


def test_local_write_check(tmp_path: Path) -> None:
    LocalStorage(tmp_path / "out").check_writable(write_check_key(""))
    assert (tmp_path / "out" / ".deepqueue" / "write-check").read_bytes() == b"ok\n"
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(StorageError, match="DEEPQUEUE_OUTPUT_DIR"):
        LocalStorage(tmp_path / "file").check_writable(write_check_key(""))
