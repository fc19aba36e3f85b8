"""The exit codes of the ``deepqueue`` command and the one-line error that carries one: shared by
its client half (``producer.cli``) and its worker half (``worker.cli``), which imports them from
here rather than from the client half that imports it."""

from __future__ import annotations

import click

#: Exit codes, one meaning each (also in the README).
EXIT_JOB_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 3
EXIT_TIMEOUT = 4
EXIT_STORAGE = 5
EXIT_CANNOT_SERVE = 70  # a worker that cannot serve: os.EX_SOFTWARE, as worker.readiness exits
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


class CommandError(click.ClickException):
    """A one-line error with its own exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
