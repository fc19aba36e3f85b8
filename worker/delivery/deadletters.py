"""Dead letters: what a worker keeps of a message it drops as unreadable, for ``deepqueue dead-letters``.

Two places drop messages. The broker transport (``worker.delivery.transport``) drops an entry of a
queue's list that is no kombu message at all (not UTF-8, not JSON, not an envelope kombu can
read); the consumer (``worker.delivery.consumer``) drops an envelope whose task cannot be read. Both keep
the same record on the broker's capped list ``DEAD_LETTERS_KEY``: the task id where one can be
read, why, when, the content type and the first 4 KB as text. Nothing is deserialised for it.
"""

from __future__ import annotations

import json
from typing import Any

from producer.contract import DEAD_LETTERS_KEPT
from producer.layout import DEAD_LETTERS_KEY

#: What a record keeps of the body (bytes) and of the reason (characters).
BODY_KEPT = 4096
REASON_KEPT = 2000
NO_ID = "(no id)"


def dead_letter(*, task_id: str, reason: str, body: bytes, content_type: Any, now: float) -> dict[str, Any]:
    """The record of one dropped message (``content_type`` kept only when it is a string)."""
    return {
        "task_id": task_id,
        "reason": reason[:REASON_KEPT],
        "at": now,
        "content_type": content_type if isinstance(content_type, str) else None,
        "body": body[:BODY_KEPT].decode("utf-8", errors="replace"),
    }


def push_dead_letter(pipe: Any, record: dict[str, Any]) -> Any:
    """Add ``record`` to a redis-py pipeline: newest first, the last ``DEAD_LETTERS_KEPT`` kept."""
    return pipe.lpush(DEAD_LETTERS_KEY, json.dumps(record)).ltrim(DEAD_LETTERS_KEY, 0, DEAD_LETTERS_KEPT - 1)


def headers_task_id(headers: Any) -> str:
    """The task id a message's headers hold, if a readable one (else ``NO_ID``)."""
    task_id = headers.get("id") if isinstance(headers, dict) else None
    return task_id if isinstance(task_id, str) else NO_ID
