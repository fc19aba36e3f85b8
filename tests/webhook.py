"""A webhook receiver for the tests: a real HTTP server on loopback, in a thread, that records
every POST and answers each run's first POSTs from a script (then 200)."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from producer.notify import RUN_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, verify


@dataclass(frozen=True)
class Received:
    run_id: str
    headers: dict[str, str]
    body: bytes
    answered: int

    @property
    def document(self) -> dict[str, Any]:
        return json.loads(self.body)

    def verifies(self, secret: str) -> bool:
        return verify(secret, self.headers[TIMESTAMP_HEADER], self.body, self.headers.get(SIGNATURE_HEADER, ""))


class Receiver:
    """``with Receiver([500]) as receiver``: ``receiver.url`` answers each run's first POST 500."""

    def __init__(self, answers: Sequence[int] = ()) -> None:
        self.answers = list(answers)
        self.received: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                run_id = self.headers.get(RUN_HEADER, "")
                with receiver._lock:
                    before = sum(1 for item in receiver.received if item.run_id == run_id)
                    status = receiver.answers[before] if before < len(receiver.answers) else 200
                    receiver.received.append(Received(run_id, dict(self.headers.items()), body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/deepqueue?token=abc"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def of(self, run_id: str) -> list[Received]:
        with self._lock:
            return [item for item in self.received if item.run_id == run_id]

    def delivered(self, run_id: str) -> list[Received]:
        return [item for item in self.of(run_id) if 200 <= item.answered < 300]

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
