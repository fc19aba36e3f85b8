"""Celery's extension point for how a worker handles a task's messages, used to batch them.

The default strategy hands every message to the pool at once. This one splits each message into
its jobs (one, or a prompt batch: ``worker.delivery.parts``), keeps them in a ``BatchBuffer``
keyed by everything a pipeline call must share and hands the pool a whole batch when one is full
or its oldest job has waited ``max_wait_s``. The pool process returns as soon as the device is
done, storing the images in the background while it generates the next batch; a message is
acknowledged (``acks_late``) only when the pool process reports every job of it final: image,
sidecar and state stored, or failed with a reason. Outcomes of stored images come back with the
next batch's call, or with a ``collect_stored`` call when there is no next batch. A message sent
back to the queue (a job of it could not be decided here) and delivered again runs only its jobs
that are not final.

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

from producer.fair import PRIORITY_HEADER
from producer.state import JobState, RunStore
from worker.delivery.batching import BatchBuffer, batch_key
from worker.delivery.book import MAX_LOSSES, Book, Held, PoolCall, loss_failure
from worker.delivery.consumer import drop_message, message_fields
from worker.delivery.parts import Message, Part, Settle, settled_together, split
from worker.delivery.stopped import StoppedRuns
from worker.metrics import call_error_kind
from worker.pipeline import pool
from worker.runtime import WorkerRuntime

logger = logging.getLogger(__name__)

#: States a job of a redelivered prompt batch has ended in, if it has: it does not run again
#: (a failed job runs again only when ``deepqueue retry`` sends it again, in a new message).
ENDED = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})

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
        held: Held[Part[Any]] = consumer.__dict__.setdefault("deepqueue_held", Held())
        self.book: Book[Part[Any]] = Book(
            held,
            BatchBuffer(settings.max_batch, settings.max_wait_s),
            slots=max(1, getattr(consumer.pool, "limit", 1) or 1),
            drop_chunk=max(1, min(DROP_CHUNK, settings.prefetch_count // 2)),
        )
        self.store = RunStore.from_url(settings.result_backend)
        self.notifier = runtime.notifier
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
        task is logged and dropped, anything else reaches the pool, which records why each job
        that is none failed.
        """
        try:
            req = self._request(message, body)
            payload, enqueued_at = message_fields(req)
            parts = split(
                req,
                req.id,
                payload,
                tag=message.delivery_tag,
                enqueued_at=enqueued_at,
                now=time.time(),
                priority=(message.headers or {}).get(PRIORITY_HEADER),
            )
        except Exception as error:  # a malformed message must cost itself, not the worker
            drop_message(message, error, self.consumer.connection_errors)
            return
        if (req.expires or req.id in self.consumer.controller.state.revoked) and req.revoked():
            for part in parts:
                self._record_failure(part, "revoked or expired before it ran", kind="revoked")
            return
        self._reserve(req)
        if req.eta is not None:  # a countdown/eta: holding it unacked for hours would block its batch
            reason = "eta/countdown is not supported: deepqueue workers run jobs as they arrive; send it without one"
            for part in parts:
                self._record_failure(part, reason, kind="unsupported")
                self._final(part, False, reason)
            return
        if (message.headers or {}).get("redelivered") and len(parts) > 1:
            parts = self._not_final(parts)
        for part in parts:
            if part.job is not None and self.stopped.maybe_stopped(part.job.run_id, time.monotonic()):
                if self.book.defer(part, part.job):
                    self._drop_stopped()
            else:
                self._accept(part)

    def _reserve(self, req: Any) -> None:
        """The message is the worker's now: reserved (``celery inspect``), announced once."""
        signals.task_received.send(sender=self.consumer, request=req)
        # Prompts stay out of task events (and Flower), whatever a producer put in argsrepr.
        req.send_event("task-received", name=req.name, args=f"job={req.id}", kwargs="")
        worker_state.task_reserved(req)

    def _not_final(self, parts: list[Part[Any]]) -> list[Part[Any]]:
        """Of a prompt batch delivered again, the jobs to run: those that ended final before it
        went back end here at once, as they ended (Redis down: all run; the pool skips a done
        job anyway)."""
        by_run: dict[str, list[Part[Any]]] = {}
        for part in parts:
            if part.job is not None:
                by_run.setdefault(part.job.run_id, []).append(part)
        ended: dict[int, JobState] = {}
        for run_id, of_run in by_run.items():
            try:
                states = self.store.states(run_id, [part.id for part in of_run])
            except Exception as error:  # Redis trouble: run them all
                logger.debug("could not read the states of a redelivered batch of run %s: %r", run_id, error)
                continue
            ended.update((id(part), state) for part, state in zip(of_run, states, strict=True) if state in ENDED)
        for part in parts:
            if (state := ended.get(id(part))) is not None:
                ok = state is JobState.DONE
                self._final(part, ok, None if ok else f"{state.value} before its message was delivered again")
        return [part for part in parts if id(part) not in ended]

    def _accept(self, part: Part[Any]) -> None:
        """Hold the message and buffer the job (one that is not a job goes to the pool alone)."""
        self.leases.hold(part.message.tag, jobs=part.message.open)
        if part.job is None:
            self._send(self.book.hand_over([part]))  # the pool records why it failed; no peers to wait for
            return
        if self.book.buffered(batch_key(part.job, self.defaults), part, time.monotonic(), part.message.rank):
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
        """Settle the jobs of runs believed stopped: final once their run's Lua call confirms it
        (a cancelled run's jobs end cancelled), else (resumed since, or Redis in trouble) handled
        as any other job."""
        for run_id, items in self.book.deferred().items():
            try:
                stopped = self.store.drop_if_stopped(run_id, [job.job_id for _, job in items])
            except Exception as error:  # Redis trouble: the pool process's path records them, or retries
                logger.debug("could not drop the jobs of run %s: %r", run_id, error)
                stopped = False
            self.stopped.learn(run_id, stopped, time.monotonic())
            if stopped:
                self._settle_all(settled_together(part for part, _ in items))
                self.metrics.ended("cancelled", len(items))
            else:
                for part, _ in items:
                    self._accept(part)

    def _settle_all(self, settled: list[tuple[Message[Any], Settle]]) -> None:
        """Settle messages: those acknowledged together where the transport can (one channel),
        the rest one by one."""
        acks = [message for message, how in settled if how is Settle.ACK]
        if acks and self.leases.acknowledge_all([message.request.message for message in acks]):
            for message in acks:
                message.request.acknowledged = True
                worker_state.task_ready(message.request, successful=True)
            settled = [(message, how) for message, how in settled if how is not Settle.ACK]
        for message, how in settled:
            self._settle(message, how)

    def _send(self, call: PoolCall[Part[Any]]) -> None:
        """Send a call the book opened: a batch to generate, or (no parts) a collect call."""
        deliveries = [
            {
                "task_id": part.id,
                "payload": part.payload,
                "enqueued_at": part.enqueued_at,
                "received_at": part.received_at,
            }
            for part in call.requests
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

    def _on_accepted(self, call: PoolCall[Part[Any]], pid: int, time_accepted: float) -> None:
        self.book.taken(call, pid)
        self.leases.working(part.message.tag for part in call.requests if part.take())
        for part in call.requests:
            if not part.message.started and part.message.open:  # active in `celery inspect`, task-started event
                part.message.started = True
                part.message.request.on_accepted(pid, time_accepted)

    def _on_result(self, call: PoolCall[Part[Any]], progress: dict[str, Any]) -> None:
        self.book.returned(call)
        self.metrics.record(progress)
        for outcome in progress["finished"]:
            part = self.book.held.final(outcome["task_id"])
            if part is None:
                logger.warning("pool reported task %s, which this worker no longer holds", outcome["task_id"])
                continue
            if outcome["retry"]:
                self._send_back([part])
            else:
                self._final(part, outcome["ok"], outcome["key"] if outcome["ok"] else outcome["reason"])
        self._rerun_lost_stores()  # a process that died between two calls left no error behind
        self.pump()

    def _on_error(self, call: PoolCall[Part[Any]], exc_info: Any) -> None:
        requests = self.book.failed(call)
        self._idle(requests)
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
        self._idle(lost)
        for part in lost:
            key = batch_key(part.job, self.defaults) if part.job else ("alone", part.id)
            self._buffer_again(part, key, time.monotonic())

    def _buffer_again(self, part: Part[Any], key: Any, since: float) -> None:
        """Run ``part`` again here, or, once this strategy is retired, anywhere (back to the queue)."""
        if not self.book.again(key, part, since, part.message.rank):
            self._send_back([part])

    def retire(self) -> None:
        """The consumer lost its connection and made a new strategy. The jobs this one buffers,
        or handed to the pool but no process took (Celery dropped those calls), go back to the
        queue now (their messages, once no other job of them runs here); batches already running
        finish and report here."""
        returned = self.book.retire()
        self._idle(returned)
        self._send_back(returned)
        logger.warning("connection lost: %d jobs this worker had not started go back to the queue", len(returned))

    def _idle(self, parts: list[Part[Any]]) -> None:
        """No pool process has these parts: their messages' leases turn idle once none has any."""
        self.leases.idle(part.message.tag for part in parts if part.release())

    def _send_back(self, parts: list[Part[Any]]) -> None:
        for message, how in settled_together(parts, back=True):
            self._settle(message, how)

    def _retry_alone(self, parts: list[Part[Any]], error: BaseException) -> None:
        """Run each job of a lost batch on its own; fail the ones lost MAX_LOSSES times."""
        logger.error("batch of %d lost (%r): retrying its jobs one by one", len(parts), error)
        for part in parts:
            message = loss_failure(self._count_loss(part), died=isinstance(error, WorkerLostError))
            if message is not None:
                self._record_failure(part, message)
                self._final(part, False, message)
            else:
                self._buffer_again(part, ("alone", part.id), -math.inf)

    def _count_loss(self, part: Part[Any]) -> int:
        """Times this job's batch was lost, counted in Redis: across workers and restarts."""
        job = part.job
        if job is None:
            return MAX_LOSSES  # a job that is not one has nothing worth running again
        try:
            return self.store.count_loss(job.run_id, job.job_id)
        except Exception as error:  # Redis down: count it as the first loss, the job runs once more
            logger.warning("could not count the loss of job %s: %r", job.job_id, error)
            return 1

    def _final(self, part: Part[Any], ok: bool, detail: str | None) -> None:
        """The job is final (``detail``: its image's key, or why it failed); its message settles
        with its last job."""
        how = part.end(failure=None if ok else detail or "failed")
        if how is not None:
            self._settle(part.message, how, detail)

    def _settle(self, message: Message[Any], how: Settle, detail: str | None = None) -> None:
        """Acknowledge a message whose jobs are all final, or send it back to the queue (on its
        channel; once this strategy is retired, through the leases)."""
        req = message.request
        if how is Settle.BACK:
            if self.book.retired:
                self.leases.give_back([req.message])
            else:
                req.reject(requeue=True)
            worker_state.task_ready(req)
            return
        req.acknowledge()
        worker_state.task_ready(req, successful=not message.failures)
        failures = message.failures
        if not failures:
            req.send_event("task-succeeded", result=detail, runtime=time.time() - message.received_at)
        else:
            why = failures[0] if len(failures) == 1 else f"{len(failures)} of its jobs failed, the first: {failures[0]}"
            req.send_event("task-failed", exception=why, traceback="")

    def _record_failure(self, part: Part[Any], reason: str, *, kind: str | None = None) -> None:
        """Failures decided here, outside the pool: recorded like the executor's (``kind``: the
        error's, unless it was counted when it happened)."""
        if kind:
            self.metrics.error(kind)
        self.metrics.ended("failed")
        if part.job is not None:
            if self.store.mark(part.job.run_id, part.job.job_id, JobState.FAILED, reason=reason) and self.notifier:
                self.notifier.observe(part.job.run_id)  # perhaps the run's last job: its webhook is due

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
