"""Celery's extension point for how a worker handles a task's messages, used to batch them.

The default strategy hands every message to the pool at once. This one keeps messages in a
``BatchBuffer`` keyed by everything a pipeline call must share and hands the pool a whole batch
when one is full or its oldest job has waited ``max_wait_s``. Messages are acknowledged after
their batch returns (``acks_late``); if a pool process dies, its batch goes back to the queue.

Why not celery-batches: it keeps one buffer per task (flushes mix resolutions), swallows
exceptions of the batch function, sends no task events and pins celery<5.7.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

from celery import signals
from celery.utils.imports import symbol_by_name
from celery.worker.request import create_request_cls
from celery.worker.state import task_ready, task_reserved
from celery.worker.strategy import hybrid_to_proto2, proto1_to_proto2

from worker import runtime
from worker.batching import BatchBuffer, RecipeDefaults, batch_key
from worker.executor import parse_job

logger = logging.getLogger(__name__)


class BatchingStrategy:
    def __init__(self, task: Any, app: Any, consumer: Any) -> None:
        settings = runtime.settings()
        self.app = app
        self.task = task
        self.consumer = consumer
        self.pool = consumer.pool
        self.slots = max(1, getattr(consumer.pool, "limit", 1) or 1)
        self.in_flight = 0
        self.buffer: BatchBuffer[Any] = BatchBuffer(settings.max_batch, settings.max_wait_s)
        self.defaults = RecipeDefaults(
            model=settings.model,
            scheduler=settings.scheduler,
            cache_interval=settings.cache_interval,
            cache_branch=settings.cache_branch,
        )
        self.Request = create_request_cls(
            symbol_by_name(task.Request),
            task,
            consumer.pool,
            consumer.hostname,
            consumer.event_dispatcher,
            app=app,
        )
        tick = min(0.25, max(settings.max_wait_s / 2, 0.05))
        consumer.timer.call_repeatedly(tick, self.pump)

    def handle(self, message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **_: Any) -> None:
        """Called by the consumer for every message of the task (see celery.worker.strategy)."""
        req = self._request(message, body, ack, reject)
        if (req.expires or req.id in self.consumer.controller.state.revoked) and req.revoked():
            return
        signals.task_received.send(sender=self.consumer, request=req)
        req.send_event("task-received", name=req.name, args=req.argsrepr, kwargs=req.kwargsrepr)
        task_reserved(req)
        req.received_at = time.time()
        job, _ = parse_job(req.args[0] if req.args else None)
        if job is None:
            self._dispatch([req])  # the pool records why it failed; it has no peers to wait for
            return
        self.buffer.add(batch_key(job, self.defaults), req, time.monotonic())
        self.pump()

    def pump(self) -> None:
        """Hand the pool what is ready: partial batches only while a pool slot is idle,
        full ones also one ahead, so the next batch starts the moment a slot frees."""
        now = time.monotonic()
        while self.in_flight <= self.slots:
            taken = self.buffer.take(now, allow_partial=self.in_flight < self.slots)
            if taken is None:
                return
            self._dispatch(taken[1])

    def _dispatch(self, requests: list[Any]) -> None:
        deliveries = [
            {
                "task_id": req.id,
                "payload": req.args[0] if req.args else None,
                "enqueued_at": req.kwargs.get("enqueued_at"),
                "received_at": req.received_at,
            }
            for req in requests
        ]
        self.in_flight += 1
        self.pool.apply_async(
            runtime.execute_batch,
            args=(deliveries,),
            accept_callback=partial(self._on_accepted, requests),
            callback=partial(self._on_done, requests),
            error_callback=partial(self._on_error, requests),
        )

    def _on_accepted(self, requests: list[Any], pid: int, time_accepted: float) -> None:
        for req in requests:
            req.send_event("task-started", pid=pid)

    def _on_done(self, requests: list[Any], outcomes: list[dict[str, Any]]) -> None:
        self.in_flight -= 1
        for req, outcome in zip(requests, outcomes, strict=True):
            if outcome["ok"]:
                req.send_event("task-succeeded", result=outcome["key"], runtime=time.time() - req.received_at)
            else:
                req.send_event("task-failed", exception=outcome["reason"], traceback="")
            req.acknowledge()
            task_ready(req, successful=outcome["ok"])
        self.pump()

    def _on_error(self, requests: list[Any], exc_info: Any) -> None:
        """The pool process died or the batch raised (Redis down, a bug): requeue the batch."""
        self.in_flight -= 1
        error = getattr(exc_info, "exception", exc_info)
        error = getattr(error, "exc", error)  # billiard wraps it in ExceptionWithTraceback
        logger.error("batch of %d lost (%r): sending its jobs back to the queue", len(requests), error)
        for req in requests:
            req.send_event("task-retried", exception=repr(error), traceback="")
            req.reject(requeue=True)
            task_ready(req)
        self.pump()

    def _request(self, message: Any, body: Any, ack: Any, reject: Any) -> Any:
        if body is None and "args" not in message.payload:
            body, headers, decoded, utc = message.body, message.headers, False, self.app.uses_utc_timezone()
        elif "args" in message.payload:
            body, headers, decoded, utc = hybrid_to_proto2(message, message.payload)
        else:
            body, headers, decoded, utc = proto1_to_proto2(message, body)
        return self.Request(
            message,
            on_ack=ack,
            on_reject=reject,
            app=self.app,
            hostname=self.consumer.hostname,
            eventer=self.consumer.event_dispatcher,
            task=self.task,
            body=body,
            headers=headers,
            decoded=decoded,
            utc=utc,
            connection_errors=self.consumer.connection_errors,
        )


def batching_strategy(task: Any, app: Any, consumer: Any, **_: Any) -> Any:
    """``Task.Strategy`` factory: returns the per-message handler."""
    return BatchingStrategy(task, app, consumer).handle
