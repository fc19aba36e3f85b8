"""The check pass of a submit: every row is validated before any job is sent, so a bad row
sends nothing. The jobs it makes are kept in a temporary file meanwhile (pickled: our own file,
about the size of the input), and the send pass reads them back rather than reading and
validating the input again: memory stays flat whatever the run's size, and a source that can be
read only once (a generator) needs no copy of its own.
"""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

from producer.entries import Entry, Kind, refuse_bad_input

#: Jobs per pickled block of the file.
BLOCK = 5000


class CheckedJobs:
    """The jobs of ``items`` (``producer.entries.entries``), all checked: raises InvalidJobError
    naming the first ``keep`` problems (and counting the rest) if any row is bad, or if there
    is no job at all. Iterate to read the jobs back, in order; ``close`` (or ``with``) removes
    the file."""

    def __init__(self, items: Iterable[Entry | list[tuple[str, str]]], *, keep: int = 1000) -> None:
        self._file: IO[bytes] = tempfile.TemporaryFile(prefix="deepqueue-checked-")
        try:
            self.count = self._check(items, keep)
        except BaseException:
            self.close()
            raise

    def _check(self, items: Iterable[Entry | list[tuple[str, str]]], keep: int) -> int:
        count, problems, omitted = 0, [], 0
        # A block is runs of jobs of one kind: (kind, [own fields, ...]), each kind pickled once.
        block: list[tuple[Kind, list[dict[str, Any]]]] = []
        for item in items:
            if isinstance(item, Entry):
                count += 1
                if problems:  # once a row is bad nothing is sent: only the problems matter
                    continue
                if block and block[-1][0] is item.kind:
                    block[-1][1].append(item.own)
                else:
                    block.append((item.kind, [item.own]))
                if count % BLOCK == 0:
                    pickle.dump(block, self._file, pickle.HIGHEST_PROTOCOL)
                    block = []
            else:
                room = max(0, keep - len(problems))
                problems.extend(item[:room])
                omitted += len(item) - min(room, len(item))
        refuse_bad_input(problems, omitted, count)
        pickle.dump(block, self._file, pickle.HIGHEST_PROTOCOL)
        return count

    def __iter__(self) -> Iterator[Entry]:
        self._file.seek(0)
        while True:
            try:
                block = pickle.load(self._file)
            except EOFError:
                return
            for kind, owns in block:
                for own in owns:
                    yield Entry(kind, own)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CheckedJobs:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
