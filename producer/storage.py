"""Where a run's objects go: S3 (any S3-protocol server) or a local folder; the worker writes
images, sidecars and manifest parts, the client reads them back for manifests and exports.

Writes are create-only, so a job delivered twice is written once: S3 with ``If-None-Match: *``,
local files with an atomic hard link. ``put`` returns False when the object already existed.
Which key holds what: ``producer.layout``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from producer.errors import StorageError
from producer.layout import write_check_key

if TYPE_CHECKING:
    from producer.settings import ClientSettings


class Storage(Protocol):
    def put(self, key: str, data: bytes, *, content_type: str, metadata: dict[str, str]) -> bool:
        """Create ``key`` unless it exists; True if this call wrote it."""

    def exists(self, key: str) -> bool: ...

    def url(self, key: str) -> str: ...

    def check_writable(self, key: str) -> None:
        """Write a small object at ``key`` (overwriting it), or raise StorageError saying why not."""

    # Reading back, for manifests and exports (the worker itself only writes).
    def get(self, key: str) -> bytes:
        """The object's bytes; StorageError if it is missing or cannot be read."""

    def size(self, key: str) -> int | None:
        """The object's size in bytes, or None if it is not there."""

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """``(key, size)`` of every object under ``prefix``, streamed, in key order."""

    def upload(self, key: str, path: str | os.PathLike, *, content_type: str) -> None:
        """Write the file at ``path`` to ``key``, replacing what is there (manifests, stats)."""

    def download(self, key: str, path: str | os.PathLike) -> None:
        """Copy the object to the local file ``path``."""

    def delete(self, key: str) -> None:
        """Remove ``key`` (no error if it is not there)."""

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix``; returns how many there were."""


def put_replacing(storage: Storage, key: str, data: bytes, content_type: str = "application/json") -> None:
    """Write ``key`` whole, replacing what is there (storage's ``put`` never replaces)."""
    with tempfile.NamedTemporaryFile() as file:
        file.write(data)
        file.flush()
        storage.upload(key, file.name, content_type=content_type)


class S3Storage:
    """A thin layer over a boto3 S3 client it is given."""

    def __init__(self, client: Any, bucket: str) -> None:
        self._client = client
        self.bucket = bucket

    @classmethod
    def connect(cls, bucket: str, endpoint_url: str | None = None, *, timeout_s: float | None = None) -> S3Storage:
        """A client from boto3's standard credential chain (env, profile, instance role).

        ``timeout_s``: each call's connect and read timeout, one attempt per call (start-up checks,
        whose caller retries and says so); otherwise 10 s to connect, 60 s to read, botocore's retries.
        """
        import boto3
        from botocore.config import Config

        if timeout_s is None:
            config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=60)
        else:
            config = Config(
                retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=timeout_s, read_timeout=timeout_s
            )
        return cls(boto3.client("s3", endpoint_url=endpoint_url, config=config), bucket)

    def put(self, key: str, data: bytes, *, content_type: str, metadata: dict[str, str]) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType=content_type,
                Metadata=metadata,
                IfNoneMatch="*",
            )
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code")
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "PreconditionFailed" or status == 412:
                return False
            # 409 ConditionalRequestConflict: another write of this key is under way; it is not
            # there yet, and that write may still fail. An error: the job is not done.
            raise StorageError(f"upload of s3://{self.bucket}/{key} failed: {code}: {error}") from error
        except BotoCoreError as error:
            raise StorageError(f"upload of s3://{self.bucket}/{key} failed: {error}") from error
        return True

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as error:
            if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise StorageError(f"checking s3://{self.bucket}/{key} failed: {error}") from error
        return True

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except (ClientError, BotoCoreError) as error:
            raise StorageError(f"reading s3://{self.bucket}/{key} failed: {error}") from error

    def size(self, key: str) -> int | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return int(self._client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except ClientError as error:
            if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise StorageError(f"checking s3://{self.bucket}/{key} failed: {error}") from error
        except BotoCoreError as error:
            raise StorageError(f"checking s3://{self.bucket}/{key} failed: {error}") from error

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield item["Key"], item["Size"]
        except (ClientError, BotoCoreError) as error:
            raise StorageError(f"listing s3://{self.bucket}/{prefix} failed: {error}") from error

    def upload(self, key: str, path: str | os.PathLike, *, content_type: str) -> None:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:  # multipart above 8 MB: a manifest shard or an export's tar of any size
            self._client.upload_file(str(path), self.bucket, key, ExtraArgs={"ContentType": content_type})
        except (ClientError, BotoCoreError, S3UploadFailedError) as error:
            raise StorageError(f"upload of {path} to s3://{self.bucket}/{key} failed: {error}") from error

    def copy_from(self, source: S3Storage, key: str, target_key: str) -> None:
        """Server-side copy of ``source``'s ``key`` (a bucket on the same endpoint) to ``target_key``."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.copy_object(
                CopySource={"Bucket": source.bucket, "Key": key}, Bucket=self.bucket, Key=target_key
            )
        except (ClientError, BotoCoreError) as error:
            raise StorageError(
                f"copy of s3://{source.bucket}/{key} to s3://{self.bucket}/{target_key} failed: {error}"
            ) from error

    def download(self, key: str, path: str | os.PathLike) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.download_file(self.bucket, key, str(path))
        except (ClientError, BotoCoreError) as error:
            raise StorageError(f"download of s3://{self.bucket}/{key} failed: {error}") from error

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as error:
            raise StorageError(f"deleting s3://{self.bucket}/{key} failed: {error}") from error

    def delete_prefix(self, prefix: str) -> int:
        """1,000 objects per DeleteObjects call, as they are listed: a 10M-image run takes 10k calls."""
        from botocore.exceptions import BotoCoreError, ClientError

        deleted, batch = 0, []
        try:
            for key, _ in self.list(prefix):
                batch.append({"Key": key})
                if len(batch) == 1000:
                    deleted += self._delete_objects(batch)
                    batch = []
            return deleted + (self._delete_objects(batch) if batch else 0)
        except (ClientError, BotoCoreError) as error:
            raise StorageError(f"deleting s3://{self.bucket}/{prefix}* failed: {error}") from error

    def _delete_objects(self, batch: list[dict[str, str]]) -> int:
        reply = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        if reply.get("Errors"):
            first = reply["Errors"][0]
            raise StorageError(f"deleting s3://{self.bucket}/{first['Key']} failed: {first.get('Message')}")
        return len(batch)

    def check_writable(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        where = f"s3://{self.bucket}"
        try:
            self._client.head_bucket(Bucket=self.bucket)
            self._client.put_object(Bucket=self.bucket, Key=key, Body=b"ok\n", ContentType="text/plain")
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code"))
            if code in ("404", "NoSuchBucket"):
                raise StorageError(f"bucket {where} does not exist (DEEPQUEUE_S3_BUCKET): create it first") from error
            raise StorageError(f"cannot write to {where}/{key}: {code}: {error}") from error
        except BotoCoreError as error:
            raise StorageError(f"cannot reach {where}: {error}") from error


class LocalStorage:
    """Files under a root folder; metadata is not kept (the sidecar holds everything)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def put(self, key: str, data: bytes, *, content_type: str, metadata: dict[str, str]) -> bool:
        path = self.root / key
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".part-", delete=False) as tmp:
                tmp.write(data)
            try:
                os.link(tmp.name, path)  # atomic and create-only: readers never see half a file
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp.name)
        except OSError as error:
            raise StorageError(f"writing {path} failed: {error}") from error
        return True

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def url(self, key: str) -> str:
        return str(self.root / key)

    def get(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except OSError as error:
            raise StorageError(f"reading {self.root / key} failed: {error}") from error

    def size(self, key: str) -> int | None:
        try:
            return (self.root / key).stat().st_size
        except FileNotFoundError:
            return None
        except OSError as error:
            raise StorageError(f"checking {self.root / key} failed: {error}") from error

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """Like S3, ``prefix`` is a string prefix of keys, not only a folder; files being
        written (``.part-*``) are left out."""
        folder = prefix.rpartition("/")[0]

        def walk(directory: Path) -> Iterator[tuple[str, int]]:
            try:
                entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
            except (FileNotFoundError, NotADirectoryError):
                return
            except OSError as error:
                raise StorageError(f"listing {directory} failed: {error}") from error
            for entry in entries:
                key = Path(entry.path).relative_to(self.root).as_posix()
                if entry.is_dir():
                    if key.startswith(prefix) or prefix.startswith(key + "/"):
                        yield from walk(Path(entry.path))
                elif key.startswith(prefix) and not entry.name.startswith(".part-"):
                    try:
                        yield key, entry.stat().st_size
                    except FileNotFoundError:  # deleted since: S3 would not list it either
                        continue

        yield from walk(self.root / folder)

    def upload(self, key: str, path: str | os.PathLike, *, content_type: str) -> None:
        target = self.root / key
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".part-", delete=False) as tmp:
                with open(path, "rb") as source:
                    shutil.copyfileobj(source, tmp, 1 << 20)
            os.replace(tmp.name, target)  # readers see the old file or the new one, never half
        except OSError as error:
            raise StorageError(f"writing {target} failed: {error}") from error

    def download(self, key: str, path: str | os.PathLike) -> None:
        try:
            shutil.copyfile(self.root / key, path)
        except OSError as error:
            raise StorageError(f"reading {self.root / key} failed: {error}") from error

    def delete(self, key: str) -> None:
        try:
            (self.root / key).unlink(missing_ok=True)
        except OSError as error:
            raise StorageError(f"deleting {self.root / key} failed: {error}") from error

    def delete_prefix(self, prefix: str) -> int:
        deleted = 0
        for key, _ in self.list(prefix):
            self.delete(key)
            deleted += 1
        return deleted

    def check_writable(self, key: str) -> None:
        path = self.root / key
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"ok\n")
        except OSError as error:
            raise StorageError(f"cannot write to {path} (DEEPQUEUE_OUTPUT_DIR): {error}") from error


def make_storage(settings: ClientSettings, *, check: bool = True, timeout_s: float | None = None) -> Storage:
    """The configured storage (worker and client settings both name it); with ``check``, once
    it has shown that it takes writes (StorageError if not). ``timeout_s``: see ``S3Storage.connect``."""
    storage: Storage
    if settings.storage == "s3":
        storage = S3Storage.connect(settings.s3_bucket, settings.s3_endpoint_url, timeout_s=timeout_s)
    else:
        storage = LocalStorage(settings.output_dir)
    if check:
        storage.check_writable(write_check_key(settings.s3_prefix))
    return storage
