"""Celery's extension point for how a worker handles a task's messages, used to batch them.

The default strategy hands every message to the pool at once. This one keeps messages in a
``BatchBuffer`` keyed by everything a pipeline call must share and hands the pool a whole batch
when one is full or its oldest job has waited ``max_wait_s``. The pool process returns as soon as
the device is done, storing the images in the background while it generates the next batch; a
message is acknowledged (``acks_late``) only when the pool process reports its job final: image,
sidecar and state stored, or failed with a reason. Outcomes of stored images come back with the
next batch's call, or with a ``collect_stored`` call when there is no next batch.

When a pool process dies or a batch outlives ``batch_timeout_s``, its jobs run again one by one
in this worker, so a job that kills the process takes no peers with it; a job lost
``MAX_LOSSES`` times (counted in Redis, across workers and restarts) fails with the reason.
Every message held here is leased (``worker.delivery.leases``): if this worker dies, its messages go back
to the queue within seconds. When the consumer loses its connection, Celery builds a new
strategy: the old one is retired, sending back what it had not started, and its acks go through
the lease keeper's own connection. Jobs whose images that process was still storing
run again as ordinary jobs. When the pipeline cannot be built at all, the batch
goes back to the queue for other workers and this one stops with a non-zero exit code.

Messages of cancelled and deleted runs skip all of that: they are settled in chunks, one Lua
call per run, and acknowledged from here (``worker.delivery.stopped``).

Where each request is, and which go where next, is the pure ``Book``'s (``worker.delivery.book``):
this module translates Celery's callbacks into calls on it, and its answers into Celery and Redis.

Why not celery-batches: it keeps one buffer per task (flushes mix resolutions), swallows
exceptions of the batch function, sends no task events and pins celery<5.7.
"""

from __future__ import annotations

import logging
import math
import os
import time
from functools import partial
from typing import Any

from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery import signals
from celery.utils.imports import symbol_by_name
from celery.worker import state as worker_state
from celery.worker.request import create_request_cls
from celery.worker.strategy import hybrid_to_proto2, proto1_to_proto2

from producer.state import JobState, RunStore
from worker.delivery.batching import BatchBuffer, batch_key
from worker.delivery.book import MAX_LOSSES, Book, Held, PoolCall, loss_failure
from worker.delivery.consumer import drop_message, message_fields
from worker.delivery.stopped import StoppedRuns
from worker.metrics import call_error_kind
from worker.pipeline import pool
from worker.pipeline.executor import parse_job
from worker.runtime import WorkerRuntime

logger = logging.getLogger(__name__)

#: Messages of stopped runs settled per round of Lua calls: well under the prefetch count, so
#: that messages waiting to be settled never stop the consumer from taking more.
DROP_CHUNK = 32


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still exists (pool processes are reaped as soon as they exit)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process took the number: ours is gone
        return False
    return True


class BatchingStrategy:
    def __init__(self, task: Any, app: Any, consumer: Any) -> None:
        runtime: WorkerRuntime = consumer.controller.deepqueue
        settings = runtime.settings
        self.app = app
        self.task = task
        self.consumer = consumer
        self.pool = consumer.pool
        self.batch_timeout_s = settings.batch_timeout_s
        self.leases = runtime.leases
        # Shared with the strategy this one replaces after a lost connection (see Held).
        held: Held[Any] = consumer.__dict__.setdefault("deepqueue_held", Held())
        self.book: Book[Any] = Book(
            held,
            BatchBuffer(settings.max_batch, settings.max_wait_s),
            slots=max(1, getattr(consumer.pool, "limit", 1) or 1),
            drop_chunk=max(1, min(DROP_CHUNK, settings.prefetch_count // 2)),
        )
        self.store = RunStore.from_url(settings.result_backend)
        self.stopped = StoppedRuns(self._fetch_stopped)
        self.defaults = settings.recipe_defaults()
        self.metrics = runtime.metrics
        self.metrics.watch(lambda: len(held), lambda: len(self.book.buffer))
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
        previous = consumer.__dict__.get("deepqueue_strategy")
        if previous is not None:
            previous.retire()
        consumer.deepqueue_strategy = self

    def handle(self, message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **_: Any) -> None:
        """Called by the consumer for every message of the task (see celery.worker.strategy).

        Nothing a message holds may stop the worker: a body that cannot even be read as a
        task is logged and dropped, anything else reaches the pool, which records why it failed.
        """
        try:
            req = self._request(message, body)
            req.payload, req.enqueued_at = message_fields(req)
        except Exception as error:  # a malformed message must cost itself, not the worker
            drop_message(message, error, self.consumer.connection_errors)
            return
        if (req.expires or req.id in self.consumer.controller.state.revoked) and req.revoked():
            self._record_failure(req, "revoked or expired before it ran", kind="revoked")
            return
        if req.eta is not None:  # a countdown/eta: holding it unacked for hours would block its batch
            reason = "eta/countdown is not supported: deepqueue workers run jobs as they arrive; send it without one"
            self._record_failure(req, reason, kind="unsupported")
            self._finish(req, False, reason)
            return
        job, _ = parse_job(req.payload)
        if job is not None and self.stopped.maybe_stopped(job.run_id, time.monotonic()):
            if self.book.defer(req, job):
                self._drop_stopped()
            return
        self._accept(req, job)

    def _accept(self, req: Any, job: Any) -> None:
        """Hold the message and buffer its job (a job that is not one goes to the pool alone)."""
        self.leases.hold(req.message.delivery_tag)
        signals.task_received.send(sender=self.consumer, request=req)
        # Prompts stay out of task events (and Flower), whatever a producer put in argsrepr.
        req.send_event("task-received", name=req.name, args=f"job={req.id}", kwargs="")
        worker_state.task_reserved(req)
        req.received_at = time.time()
        if job is None:
            self._send(self.book.hand_over([req]))  # the pool records why it failed; no peers to wait for
            return
        if self.book.buffered(batch_key(job, self.defaults), req, time.monotonic()):
            # Pumped when due, not at the next tick: a lone job waits max_wait_s, not a tick more.
            self.consumer.timer.call_after(self.book.buffer.max_wait_s, self.pump)
        self.pump()

    def pump(self) -> None:
        """Hand the pool what is ready (``Book.next_batch``); with nothing to generate, fetch the
        outcomes of images still being stored."""
        if self.book.retired:
            return
        if self.book.dropping:
            self._drop_stopped()
        now = time.monotonic()
        while (call := self.book.next_batch(now)) is not None:
            self._send(call)
        if (call := self.book.collect()) is not None:
            self._send(call)

    def _fetch_stopped(self, run_id: str) -> bool:
        try:
            return self.store.stopped(run_id)
        except Exception as error:  # Redis trouble: the ordinary path decides (and retries)
            logger.debug("could not read whether run %s is stopped: %r", run_id, error)
            return False

    def _drop_stopped(self) -> None:
        """Settle the messages of runs believed stopped: acknowledged once their run's Lua call
        confirms it (a cancelled run's jobs end cancelled), else (resumed since, or Redis in
        trouble) handled as any other message."""
        for run_id, items in self.book.deferred().items():
            try:
                stopped = self.store.drop_if_stopped(run_id, [job.job_id for _, job in items])
            except Exception as error:  # Redis trouble: the pool process's path records them, or retries
                logger.debug("could not drop the jobs of run %s: %r", run_id, error)
                stopped = False
            self.stopped.learn(run_id, stopped, time.monotonic())
            if stopped:
                self._acknowledge_all([req for req, _ in items])
                self.metrics.ended("cancelled", len(items))
            else:
                for req, job in items:
                    self._accept(req, job)

    def _acknowledge_all(self, requests: list[Any]) -> None:
        """Acknowledge requests of one channel together where the transport can, else one by one."""
        together = self.leases.acknowledge_all([req.message for req in requests])
        for req in requests:
            if together:
                req.acknowledged = True
            else:
                req.acknowledge()

    def _send(self, call: PoolCall[Any]) -> None:
        """Send a call the book opened: a batch to generate, or (no requests) a collect call."""
        deliveries = [
            {"task_id": req.id, "payload": req.payload, "enqueued_at": req.enqueued_at, "received_at": req.received_at}
            for req in call.requests
        ]
        self.pool.apply_async(
            pool.execute_batch if deliveries else pool.collect_stored,
            args=(deliveries,) if deliveries else (),
            accept_callback=partial(self._on_accepted, call),
            callback=partial(self._on_result, call),
            error_callback=partial(self._on_error, call),
            timeout=self.batch_timeout_s,
            correlation_id=call.requests[0].id if call.requests else "collect-stored",
        )

    def _on_accepted(self, call: PoolCall[Any], pid: int, time_accepted: float) -> None:
        self.book.taken(call, pid)
        self.leases.working(req.message.delivery_tag for req in call.requests)
        for req in call.requests:
            req.on_accepted(pid, time_accepted)  # active in `celery inspect`, task-started event

    def _on_result(self, call: PoolCall[Any], progress: dict[str, Any]) -> None:
        self.book.returned(call)
        self.metrics.record(progress)
        for outcome in progress["finished"]:
            req = self.book.held.final(outcome["task_id"])
            if req is None:
                logger.warning("pool reported task %s, which this worker no longer holds", outcome["task_id"])
                continue
            if outcome["retry"]:
                self._send_back([req])
            else:
                self._finish(req, outcome["ok"], outcome["key"] if outcome["ok"] else outcome["reason"])
        self._rerun_lost_stores()  # a process that died between two calls left no error behind
        self.pump()

    def _on_error(self, call: PoolCall[Any], exc_info: Any) -> None:
        requests = self.book.failed(call)
        self.leases.idle(req.message.delivery_tag for req in requests)
        error = getattr(exc_info, "exception", exc_info)
        error = getattr(error, "exc", error)  # billiard wraps it in ExceptionWithTraceback
        self.metrics.error(call_error_kind(error), len(requests))
        if isinstance(error, (WorkerLostError, TimeLimitExceeded)):
            # The process died (or was killed for a timeout): the batch it ran is suspect; the
            # images it was still storing are simply lost.
            self._rerun_lost_stores()
            self._retry_alone(requests, error)
        else:
            # The pool could not run the batch at all (no pipeline, Redis down): other workers
            # may. A worker without a pipeline stops instead of spinning on the queue.
            logger.error("batch of %d not run (%r): sending its jobs back to the queue", len(requests), error)
            self._send_back(requests)
            if isinstance(error, pool.PipelineUnavailable):
                logger.critical("stopping this worker: %s", error)
                worker_state.should_stop = os.EX_SOFTWARE  # 70
        self.pump()

    def _rerun_lost_stores(self) -> None:
        """Buffer again the jobs whose images a pool process that has died was still storing."""
        lost = self.book.lost_stores(process_alive)
        if not lost:
            return
        logger.error("%d jobs were being stored by a pool process that died: running them again", len(lost))
        self.metrics.error("process_lost", len(lost))
        self.leases.idle(req.message.delivery_tag for req in lost)
        for req in lost:
            job, _ = parse_job(req.payload)
            self._buffer_again(req, batch_key(job, self.defaults) if job else ("alone", req.id), time.monotonic())

    def _buffer_again(self, req: Any, key: Any, since: float) -> None:
        """Run ``req`` again here, or, once this strategy is retired, anywhere (back to the queue)."""
        if not self.book.again(key, req, since):
            self.leases.give_back([req.message])
            worker_state.task_ready(req)

    def retire(self) -> None:
        """The consumer lost its connection and made a new strategy. The messages this one
        buffers, or handed to the pool but no process took (Celery dropped those calls), go back
        to the queue now; batches already running finish and report here."""
        returned = self.book.retire()
        self.leases.idle(req.message.delivery_tag for req in returned)
        self.leases.give_back(req.message for req in returned)
        for req in returned:
            worker_state.task_ready(req)
        logger.warning("connection lost: %d jobs this worker had not started go back to the queue", len(returned))

    def _send_back(self, requests: list[Any]) -> None:
        for req in requests:
            req.reject(requeue=True)
            worker_state.task_ready(req)

    def _retry_alone(self, requests: list[Any], error: BaseException) -> None:
        """Run each job of a lost batch on its own; fail the ones lost MAX_LOSSES times."""
        logger.error("batch of %d lost (%r): retrying its jobs one by one", len(requests), error)
        for req in requests:
            message = loss_failure(self._count_loss(req), died=isinstance(error, WorkerLostError))
            if message is not None:
                self._record_failure(req, message)
                self._finish(req, False, message)
            else:
                self._buffer_again(req, ("alone", req.id), -math.inf)

    def _count_loss(self, req: Any) -> int:
        """Times this job's batch was lost, counted in Redis: across workers and restarts."""
        job, _ = parse_job(req.payload)
        if job is None:
            return MAX_LOSSES  # a job that is not one has nothing worth running again
        try:
            return self.store.count_loss(job.run_id, job.job_id)
        except Exception as error:  # Redis down: count it as the first loss, the job runs once more
            logger.warning("could not count the loss of job %s: %r", job.job_id, error)
            return 1

    def _finish(self, req: Any, ok: bool, detail: str | None) -> None:
        req.acknowledge()
        worker_state.task_ready(req, successful=ok)
        if ok:
            req.send_event("task-succeeded", result=detail, runtime=time.time() - req.received_at)
        else:
            req.send_event("task-failed", exception=detail, traceback="")

    def _record_failure(self, req: Any, reason: str, *, kind: str | None = None) -> None:
        """Failures decided here, outside the pool: recorded like the executor's (``kind``: the
        error's, unless it was counted when it happened)."""
        if kind:
            self.metrics.error(kind)
        self.metrics.ended("failed")
        job, _ = parse_job(req.payload)
        if job is not None:
            self.store.mark(job.run_id, job.job_id, JobState.FAILED, reason=reason)

    def _request(self, message: Any, body: Any) -> Any:
        if body is None and "args" not in message.payload:
            body, headers, decoded, utc = message.body, message.headers, False, self.app.uses_utc_timezone()
        elif "args" in message.payload:
            body, headers, decoded, utc = hybrid_to_proto2(message, message.payload)
        else:
            body, headers, decoded, utc = proto1_to_proto2(message, body)
        return self.Request(
            message,
            on_ack=lambda *_: self.leases.settle_now(message, requeue=None),
            on_reject=lambda _logger, _errors, requeue: self.leases.settle_now(message, requeue=requeue),
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
