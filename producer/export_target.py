"""Where an export goes: a folder, ``s3://bucket/prefix`` on the run's S3 endpoint, or by
default ``{prefix}/{run}/exports/{format}/`` beside the run. Apart from the writers
(``producer.export``) so that choosing and checking a target needs no pyarrow."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from producer.errors import ExportError
from producer.layout import export_key
from producer.storage import LocalStorage, S3Storage, Storage


@dataclass
class Target:
    """Where an export goes: a storage (a folder, an S3 bucket) and a key prefix in it."""

    storage: Storage
    prefix: str
    url: str

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def is_empty(self) -> bool:
        return next(iter(self.storage.list(self.key(""))), None) is None

    def clear(self) -> int:
        removed = 0
        for key, _ in self.storage.list(self.key("")):  # streamed: S3 lists on past deleted keys
            self.storage.delete(key)
            removed += 1
        return removed

    def put_file(self, name: str, path: Path, content_type: str) -> None:
        self.storage.upload(self.key(name), path, content_type=content_type)

    def put_bytes(self, name: str, data: bytes, content_type: str) -> None:
        self.storage.put(self.key(name), data, content_type=content_type, metadata={})

    def copy_image(self, source: Storage, key: str, name: str, content_type: str) -> None:
        """Server-side when both are S3 (one endpoint); else through this process."""
        if isinstance(source, S3Storage) and isinstance(self.storage, S3Storage):
            self.storage.copy_from(source, key, self.key(name))
        else:
            self.put_bytes(name, source.get(key), content_type)


def resolve_target(
    to: str | Path | None, fmt: str, *, run_id: str, storage: Storage, prefix: str, endpoint_url: str | None
) -> Target:
    """``s3://bucket/prefix``, a folder, or (None) ``{prefix}/{run}/exports/{format}`` beside the run."""
    if to is None:
        at = export_key(prefix, run_id, fmt)
        return Target(storage, at, storage.url(at))
    text = str(to)
    if text.startswith("s3://"):
        bucket, _, key_prefix = text[5:].partition("/")
        if not bucket:
            raise ExportError(f"--to {text!r}: an S3 target is s3://BUCKET[/PREFIX]")
        key_prefix = key_prefix.strip("/")
        target = S3Storage.connect(bucket, endpoint_url)
        return Target(target, key_prefix, f"s3://{bucket}/{key_prefix}".rstrip("/"))
    if "://" in text:
        raise ExportError(f"--to {text!r}: give s3://BUCKET[/PREFIX] or a local folder")
    folder = Path(text).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"--to {text!r} is a file, not a folder")
    return Target(LocalStorage(folder), "", str(folder))
