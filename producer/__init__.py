"""deepqueue's client side: the job contract, submission and tracking. Never imports torch."""

from producer.client import Client
from producer.errors import (
    DeepQueueError,
    InvalidJobError,
    PromptFileError,
    RecipeMismatchError,
    RunNotFoundError,
    WaitTimeoutError,
)
from producer.job import Job, JobDefaults
from producer.run import Run
from producer.settings import ClientSettings
from producer.state import JobResult, JobState, RunStatus

__all__ = [
    "Client",
    "ClientSettings",
    "DeepQueueError",
    "InvalidJobError",
    "Job",
    "JobDefaults",
    "JobResult",
    "JobState",
    "PromptFileError",
    "RecipeMismatchError",
    "Run",
    "RunNotFoundError",
    "RunStatus",
    "WaitTimeoutError",
]
