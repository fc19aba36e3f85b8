"""How a waiting client shows a run's progress: a tqdm bar on a terminal, a line now and then
elsewhere (CI logs, ``nohup``, ``| tee``), never thousands of carriage returns."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

from producer.state import JobState, RunStatus

#: Seconds between two progress lines when the output is not a terminal.
LINE_EVERY_S = 30.0


class Progress:
    """``show(status)`` as often as the run is polled; it draws or prints only when due."""

    def __init__(
        self,
        first: RunStatus,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        line_every_s: float = LINE_EVERY_S,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.line_every_s = line_every_s
        self.enabled = enabled
        self._last_line: float | None = None
        self._last_text = ""
        self.bar: tqdm | None = None
        if enabled and self.stream.isatty():
            # initial: the rate counts what finishes while waiting, not what had finished before.
            self.bar = tqdm(total=first.total, initial=first.finished, unit="img", desc=first.run_id, file=self.stream)

    def show(self, status: RunStatus) -> None:
        if self.bar is not None:
            self.bar.total = status.total
            self.bar.set_postfix(failed=status.counts[JobState.FAILED], refresh=False)
            self.bar.update(status.finished - self.bar.n)
        elif self.enabled:
            now = time.monotonic()
            due = self._last_line is None or now - self._last_line >= self.line_every_s or status.is_finished
            text = str(status)
            if due and text != self._last_text:
                print(f"{time.strftime('%H:%M:%S')} {text}", file=self.stream, flush=True)
                self._last_line, self._last_text = now, text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
