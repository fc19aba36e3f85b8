"""Where images and sidecars go: S3 (any S3-protocol server) or a local folder.

Writes are create-only, so a job delivered twice is written once: S3 with ``If-None-Match: *``,
local files with an atomic hard link. ``put`` returns False when the object already existed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Protocol


class StorageError(RuntimeError):
    """An upload failed; the message names the object and keeps the cause."""


class Storage(Protocol):
    def put(self, key: str, data: bytes, *, content_type: str, metadata: dict[str, str]) -> bool:
        """Create ``key`` unless it exists; True if this call wrote it."""

    def exists(self, key: str) -> bool: ...

    def url(self, key: str) -> str: ...

    def check_writable(self, key: str) -> None:
        """Write a small object at ``key`` (overwriting it), or raise StorageError saying why not."""


def image_key(prefix: str, run_id: str, job_id: str, ext: str) -> str:
    """``{prefix}/{run}/images/{job_id}.{ext}`` (no leading slash when prefix is empty)."""
    return "/".join(part for part in (prefix.strip("/"), run_id, "images", f"{job_id}.{ext}") if part)


def sidecar_key(image: str) -> str:
    return image.rsplit(".", 1)[0] + ".json"


def write_check_key(prefix: str) -> str:
    """Where a worker proves at start-up that it can write: one object, overwritten each time."""
    return "/".join(part for part in (prefix.strip("/"), ".deepqueue", "write-check") if part)


class S3Storage:
    """A thin layer over a boto3 S3 client it is given."""

    def __init__(self, client: Any, bucket: str) -> None:
        self._client = client
        self.bucket = bucket

    @classmethod
    def connect(cls, bucket: str, endpoint_url: str | None = None) -> S3Storage:
        """A client from boto3's standard credential chain (env, profile, instance role)."""
        import boto3
        from botocore.config import Config

        config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=60)
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

    def check_writable(self, key: str) -> None:
        path = self.root / key
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"ok\n")
        except OSError as error:
            raise StorageError(f"cannot write to {path} (DEEPQUEUE_OUTPUT_DIR): {error}") from error
