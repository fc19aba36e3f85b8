"""Which runs are stopped (cancelled or deleted), as a worker's consumer guesses it.

Draining a cancelled run of a million jobs must be cheap. Each of its messages used to travel to
the pool process and back, with two Redis calls of its own, only to be dropped there. Now the
consumer asks ``StoppedRuns`` whether a message's run is stopped; if it is, the message waits in
a short list instead of the batch buffer, and every few dozen messages (or at the next tick) one
Lua call per run settles them (``producer.state.RunStore.drop_if_stopped``): a cancelled run's
jobs end ``cancelled``, a deleted run's write nothing, and the messages are acknowledged in one
round trip without reaching the pool. On the 2-core development machine: 2,100–3,700 messages/s
against 880–950 before (``ops/bench/results/drain-2026-12-03.md``).

The guess may be stale for up to ``TTL_S`` either way. A run cancelled since is still caught by
the pool process, as before; a run resumed since is found live by that same Lua call, whose
answer is the truth, and its messages then take the ordinary path. Pure logic over a passed-in
clock and a fetch function (one Redis call per run per ``TTL_S`` at most).
"""

from __future__ import annotations

from collections.abc import Callable

#: How long a run's answer is reused before Redis is asked again.
TTL_S = 1.0
#: Answers kept at most: older ones are forgotten first when a queue mixes very many runs.
MAX_RUNS = 4096


class StoppedRuns:
    def __init__(self, fetch: Callable[[str], bool], ttl_s: float = TTL_S) -> None:
        self._fetch = fetch
        self.ttl_s = ttl_s
        self._known: dict[str, tuple[bool, float]] = {}  # run -> (stopped, when learnt)

    def maybe_stopped(self, run_id: str, now: float) -> bool:
        """The run's last known answer, or a fresh one once it is ``ttl_s`` old."""
        known = self._known.get(run_id)
        if known is None or now - known[1] >= self.ttl_s:
            return self.learn(run_id, self._fetch(run_id), now)
        return known[0]

    def learn(self, run_id: str, stopped: bool, now: float) -> bool:
        """Keep an answer (the Lua call's, which is the truth); returns it."""
        if len(self._known) >= MAX_RUNS and run_id not in self._known:
            self._known.pop(next(iter(self._known)))  # the oldest learnt
        self._known.pop(run_id, None)
        self._known[run_id] = (stopped, now)
        return stopped
