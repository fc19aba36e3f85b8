"""Connection settings shared by the client and the worker, read from ``DEEPQUEUE_*``.

Nothing is read at import time: ``ClientSettings()`` reads the environment when called.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ClientSettings(BaseSettings):
    """Where the queue and the per-job state live."""

    model_config = SettingsConfigDict(env_prefix="DEEPQUEUE_", extra="ignore")

    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker (Redis)")
    result_backend: str = Field(
        "redis://127.0.0.1:6379/1", description="Redis that holds per-job state and run indexes"
    )
    queue: str = Field("deepqueue", description="Celery queue the jobs are sent to")
    visibility_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="Seconds before an unacked job is handed to another worker; must exceed "
        "the longest buffer wait plus batch time",
    )
