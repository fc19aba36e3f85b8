"""Connection settings shared by the client and the worker, read from ``DEEPQUEUE_*``.

Nothing is read at import time: ``ClientSettings()`` reads the environment when called.

Both URLs take what redis-py and kombu take: ``redis://:PASSWORD@host:6379/0`` (or
``redis://USER:PASSWORD@...`` with Redis ACLs) and, for TLS, ``rediss://...`` with
``?ssl_cert_reqs=required`` (plus ``&ssl_ca_certs=/path/ca.pem`` for a private CA). Without
``ssl_cert_reqs`` kombu connects without checking the server's certificate. URLs are shown
only through ``redact_url``, which hides passwords.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import redis
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.message import MAX_JOBS

#: URL schemes a broker and result backend may use (redis-py's; kombu reads the same).
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class ClientSettings(BaseSettings):
    """Where the queue and the per-job state live."""

    model_config = SettingsConfigDict(env_prefix="DEEPQUEUE_", extra="ignore")

    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker (Redis)")
    result_backend: str = Field(
        "redis://127.0.0.1:6379/1", description="Redis that holds per-job state and run indexes"
    )
    queue: str = Field("deepqueue", description="Celery queue the jobs are sent to")
    prompt_batch: int = Field(
        8,
        ge=1,
        le=MAX_JOBS,
        description="Jobs per queue message at most, of one run and shape (a prompt batch: its envelope and "
        "recipe are stored once); workers still merge messages into full batches. 1: a message per job",
    )
    visibility_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="Seconds before an unacked job is handed to another worker; must exceed "
        "the longest buffer wait plus batch time",
    )
    # Where workers write images and sidecars; the client reads them there (manifest, exports, audit).
    storage: Literal["s3", "local"] = Field("s3", description="Where images and sidecars go")
    s3_bucket: str = Field("deepqueue", description="Bucket for images and sidecars")
    s3_prefix: str = Field("", description="Key prefix inside the bucket")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, a test server)")
    output_dir: Path = Field(Path("out"), description="Root folder of the local storage")
    # Completion webhooks (``producer.notify``): whoever sends a run's notification signs it.
    webhook_secret: SecretStr | None = Field(
        None,
        description="Key of the HMAC-SHA256 signature of completion webhooks (submit --notify); unset: unsigned",
    )
    duplicate_threshold: int = Field(
        6,
        ge=0,
        le=63,
        description="Near-duplicates in a run's manifest (duplicate_of, stats.json): pHashes that differ in at "
        "most this many of 64 bits",
    )

    @field_validator("broker_url", "result_backend")
    @classmethod
    def _redis_url(cls, url: str) -> str:
        """A Redis URL (the one scheme both kombu and redis-py read), refused here rather than
        as a traceback at the first connection."""
        if not url.startswith(REDIS_SCHEMES):
            raise ValueError(f"must be a Redis URL starting with {', '.join(REDIS_SCHEMES)}")
        return url


# The secret part of a URL's user info (``//user:secret@`` or ``//secret@``), and password query
# arguments that redis-py passes on to its connection.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?:(?P<user>[^:/?#@\s]*):)?[^/?#\s]*@")
_QUERY_SECRET = re.compile(r"(?P<key>[?&](?:password|ssl_password)=)[^&#\s]*", re.IGNORECASE)


def redact_url(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``, safe to print or log:
    ``redis://:s3cret@host:6379/0`` -> ``redis://:***@host:6379/0``."""

    def userinfo(match: re.Match[str]) -> str:
        user = match["user"]
        return f"{match['scheme']}{'' if user is None else user + ':'}***@"

    return _QUERY_SECRET.sub(r"\g<key>***", _USERINFO.sub(userinfo, text))


def redis_client(url: str) -> redis.Redis:
    """A producer's connection to the broker or the result backend: a Redis that is gone fails
    its call within seconds rather than hanging the submit or the command."""
    return redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10)
