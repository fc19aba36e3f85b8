"""The one exception tree of deepqueue (producer and worker alike)."""

from __future__ import annotations


class DeepQueueError(Exception):
    """Base class of every error deepqueue raises on purpose."""


class InvalidJobError(DeepQueueError, ValueError):
    """One or more jobs broke the job contract; nothing was enqueued.

    ``problems`` lists one ``(where, message)`` per bad field, ``where`` naming the job
    (its position and, for files, its line) so a user can fix the input in one pass.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        shown = "\n".join(f"  {where}: {message}" for where, message in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} invalid field(s); nothing was enqueued:\n{shown}{more}")


class PromptFileError(DeepQueueError, ValueError):
    """A prompt file could not be read (unknown format, bad JSON, missing column)."""


class RunNotFoundError(DeepQueueError, LookupError):
    """No run of that name is known to the result backend."""


class WaitTimeoutError(DeepQueueError, TimeoutError):
    """A run did not finish within the time asked for."""
