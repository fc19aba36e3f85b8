"""producer.storage read side (get, size, list, upload, download, delete, copy) on a moto S3 server
and a local folder, and make_storage from client settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.errors import StorageError
from producer.settings import ClientSettings
from producer.storage import LocalStorage, S3Storage, make_storage

boto3 = pytest.importorskip("boto3")


@pytest.fixture(params=["s3", "local"])
def storage(request, tmp_path: Path):
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = request.getfixturevalue("s3_bucket")
        return S3Storage(boto3.client("s3", endpoint_url=endpoint), bucket)
    return LocalStorage(tmp_path / "root")


def put(storage, key: str, data: bytes) -> None:
    assert storage.put(key, data, content_type="application/octet-stream", metadata={}) is True


def test_get_and_size(storage) -> None:
    put(storage, "run-1/images/a.png", b"12345")
    assert storage.get("run-1/images/a.png") == b"12345"
    assert storage.size("run-1/images/a.png") == 5
    assert storage.size("run-1/images/missing.png") is None
    with pytest.raises(StorageError, match="missing.png"):
        storage.get("run-1/images/missing.png")


def test_list_is_a_key_prefix_in_key_order(storage) -> None:
    for key in ["run-1/manifest/parts/b.jsonl.gz", "run-1/manifest/parts/a.jsonl.gz", "run-1/images/x.png"]:
        put(storage, key, key.encode())
    put(storage, "run-10/manifest/parts/c.jsonl.gz", b"other run")
    assert list(storage.list("run-1/manifest/parts/")) == [
        ("run-1/manifest/parts/a.jsonl.gz", len("run-1/manifest/parts/a.jsonl.gz")),
        ("run-1/manifest/parts/b.jsonl.gz", len("run-1/manifest/parts/b.jsonl.gz")),
    ]
    assert [key for key, _ in storage.list("run-1/manifest/parts/a")] == ["run-1/manifest/parts/a.jsonl.gz"]
    assert [key for key, _ in storage.list("run-1")] == [  # a string prefix, as S3 has it
        "run-1/images/x.png",
        "run-1/manifest/parts/a.jsonl.gz",
        "run-1/manifest/parts/b.jsonl.gz",
        "run-10/manifest/parts/c.jsonl.gz",
    ]
    assert list(storage.list("nothing/here/")) == []


def test_upload_replaces_download_copies_delete_removes(storage, tmp_path: Path) -> None:
    source = tmp_path / "shard.parquet"
    source.write_bytes(b"first")
    storage.upload("run-1/manifest/manifest-00000.parquet", source, content_type="application/vnd.apache.parquet")
    source.write_bytes(b"second, longer")
    storage.upload("run-1/manifest/manifest-00000.parquet", source, content_type="application/vnd.apache.parquet")
    assert storage.get("run-1/manifest/manifest-00000.parquet") == b"second, longer"
    target = tmp_path / "copy.parquet"
    storage.download("run-1/manifest/manifest-00000.parquet", target)
    assert target.read_bytes() == b"second, longer"
    storage.delete("run-1/manifest/manifest-00000.parquet")
    storage.delete("run-1/manifest/manifest-00000.parquet")  # gone already: no error
    assert storage.size("run-1/manifest/manifest-00000.parquet") is None
    with pytest.raises(StorageError):
        storage.download("run-1/manifest/manifest-00000.parquet", target)


def test_local_list_skips_files_being_written(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    put(storage, "run-1/a.json", b"{}")
    (tmp_path / "run-1" / ".part-abc").write_bytes(b"half")
    assert [key for key, _ in storage.list("run-1/")] == ["run-1/a.json"]


def test_s3_server_side_copy(s3_endpoint: str, s3_bucket: str) -> None:
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=s3_bucket + "-target")
    source, target = S3Storage(client, s3_bucket), S3Storage(client, s3_bucket + "-target")
    put(source, "run-1/images/a.png", b"pixels")
    target.copy_from(source, "run-1/images/a.png", "export/00000/a.png")
    assert target.get("export/00000/a.png") == b"pixels"
    with pytest.raises(StorageError, match="copy of"):
        target.copy_from(source, "run-1/images/missing.png", "export/00000/b.png")


def test_make_storage_from_client_settings(tmp_path: Path, s3_endpoint: str, s3_bucket: str) -> None:
    local = make_storage(ClientSettings(storage="local", output_dir=tmp_path), check=False)
    assert isinstance(local, LocalStorage) and local.root == tmp_path
    s3 = make_storage(ClientSettings(storage="s3", s3_bucket=s3_bucket, s3_endpoint_url=s3_endpoint))
    assert isinstance(s3, S3Storage) and s3.bucket == s3_bucket  # check: the write-check object went in
    assert s3.size(".deepqueue/write-check") == 3
