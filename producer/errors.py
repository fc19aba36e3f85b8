"""The one exception tree of deepqueue (producer and worker alike): every error a user can meet
derives from ``DeepQueueError``, and the CLI turns each into one line and an exit code.
``export_extra`` turns a missing optional package into one of them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class DeepQueueError(Exception):
    """Base class of every error deepqueue raises on purpose."""


class RowProblem(str):
    """A row of a prompt source that is no job at all (an item of the wrong type, a template
    that cannot expand): the reason, kept in its place so that every such row is reported with
    the others (``producer.entries.entries``)."""


class InvalidJobError(DeepQueueError, ValueError):
    """One or more jobs broke the job contract; nothing was enqueued.

    ``problems`` lists one ``(where, message)`` per bad field, ``where`` naming the job
    (its position and, for files, its line) so a user can fix the input in one pass.
    """

    def __init__(self, problems: list[tuple[str, str]], *, omitted: int = 0) -> None:
        self.problems = problems
        self.omitted = omitted  #: problems beyond those kept (a huge file with many bad rows)
        if len(problems) == 1 and not omitted:  # one line, as a shell user reads it after "Error: "
            [(where, message)] = problems
            super().__init__(f"{where}: {message}; nothing was enqueued")
            return
        total = len(problems) + omitted
        shown = "\n".join(f"  {where}: {message}" for where, message in problems[:20])
        more = f"\n  ... and {total - 20} more" if total > 20 else ""
        super().__init__(f"{total} invalid field(s); nothing was enqueued:\n{shown}{more}")


class ShareError(DeepQueueError, ValueError):
    """A priority class or weight no run can have (``producer.fair``); the text says why."""


class PromptFileError(DeepQueueError, ValueError):
    """A prompt file could not be read (unknown format, bad JSON, missing column)."""


class RecipeMismatchError(DeepQueueError, ValueError):
    """A run was submitted again with other run-wide settings (steps, size, seed, ...).

    Its job ids derive from the recipe, so the submit would add a second set of jobs to the run
    instead of resuming it; nothing was enqueued. ``differences`` lists ``(field, recorded
    value, new value)``.
    """

    def __init__(self, run_id: str, differences: list[tuple[str, Any, Any]]) -> None:
        self.run_id = run_id
        self.differences = differences
        before = ", ".join(f"{field}={_shown(old)}" for field, old, _ in differences)
        after = ", ".join(f"{field}={_shown(new)}" for field, _, new in differences)
        super().__init__(
            f"run {run_id!r} was submitted with {before}; this submit has {after}: use another run name, "
            f"or pass the same settings, or allow_recipe_change=True (--allow-recipe-change) to add these "
            f"jobs to the run as well; nothing was enqueued"
        )


def _shown(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


class RunNotFoundError(DeepQueueError, LookupError):
    """No run of that name is known to the result backend."""


class RunCancelledError(DeepQueueError, ValueError):
    """The run was cancelled: it takes no new jobs."""


class RunBusyError(DeepQueueError, ValueError):
    """The run still has queued or running jobs, and the operation needs it finished or cancelled."""


class WaitTimeoutError(DeepQueueError, TimeoutError):
    """A run did not finish within the time asked for."""


class StorageError(DeepQueueError, RuntimeError):
    """The run's storage (S3 or the output folder) failed a read or a write; the message names
    the object and keeps the cause."""


class ExtraMissingError(DeepQueueError, ImportError):
    """An optional part of deepqueue needs packages that are not installed; the message names the
    extra that brings them (``pip install 'deepqueue[export]'``)."""


class ExportError(DeepQueueError, ValueError):
    """A manifest or export cannot be made as asked (a target that is not empty, a bad ``--to``)."""


#: Modules of the ``export`` extra: a missing one is named with the extra to install.
EXPORT_MODULES = frozenset({"pyarrow", "boto3", "botocore", "numpy", "PIL"})


@contextlib.contextmanager
def export_extra() -> Iterator[None]:
    """Turn the ImportError of a missing ``export`` extra module into ExtraMissingError."""
    try:
        yield
    except ImportError as error:
        if isinstance(error, ExtraMissingError) or (error.name or "").split(".")[0] not in EXPORT_MODULES:
            raise
        raise ExtraMissingError(
            f"manifests and exports need {error.name}, which is not installed: pip install 'deepqueue[export]'"
        ) from error


class NotifyError(DeepQueueError, ValueError):
    """A completion webhook URL (``--notify``) that cannot be used; the text names the URL and the rule."""
