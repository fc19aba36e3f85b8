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

Why not celery-batches: it keeps one buffer per task (flushes mix resolutions), swallows
exceptions of the batch function, sends no task events and pins celery<5.7.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from functools import partial
from numbers import Real
from typing import Any

from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery import signals
from celery.utils.imports import symbol_by_name
from celery.worker import state as worker_state
from celery.worker.request import create_request_cls
from celery.worker.strategy import hybrid_to_proto2, proto1_to_proto2

from producer.state import JobState, RunStore
from worker.delivery.batching import BatchBuffer, batch_key
from worker.delivery.consumer import drop_message
from worker.delivery.stopped import StoppedRuns
from worker.metrics import call_error_kind
from worker.pipeline import pool
from worker.pipeline.executor import parse_job
from worker.runtime import WorkerRuntime

logger = logging.getLogger(__name__)

#: Times a job may be in a batch whose process died or timed out before it fails for good.
MAX_LOSSES = 2

#: Messages of stopped runs settled per round of Lua calls: well under the prefetch count, so
#: that messages waiting to be settled never stop the consumer from taking more.
DROP_CHUNK = 32


#: Enqueue times further in the future than this are not believed (clock skew allowance).
FUTURE_SLACK_S = 86400.0


def plausible_time(value: Any, now: float) -> float | None:
    """A Unix time a producer could have stamped, or None (NaN, infinities, 1e308, booleans)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    try:
        value = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return value if math.isfinite(value) and 0 < value <= now + FUTURE_SLACK_S else None


def message_fields(req: Any) -> tuple[Any, float | None]:
    """``(job payload, enqueued_at)`` from a request, whatever shape a hand-made message has."""
    args = req.args if isinstance(req.args, (list, tuple)) else ()
    kwargs = req.kwargs if isinstance(req.kwargs, dict) else {}
    return (args[0] if args else None), plausible_time(kwargs.get("enqueued_at"), time.time())


@dataclass(eq=False)
class PoolCall:
    """One call handed to the pool and the requests it carries (none: a collect call)."""

    requests: list[Any]
    accepted: bool = False  # a pool process took it (Celery drops the others on a lost connection)


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
        self.slots = max(1, getattr(consumer.pool, "limit", 1) or 1)
        self.batch_timeout_s = settings.batch_timeout_s
        self.calls: list[PoolCall] = []  # handed to the pool, not returned
        self.leases = runtime.leases
        self.retired = False
        # task id -> requests not final. Shared with the strategy this one replaces after a lost
        # connection: a pool process reports stored images in whichever call comes next.
        self.held: defaultdict[str, deque[Any]] = consumer.__dict__.setdefault("deepqueue_held", defaultdict(deque))
        self.buffer: BatchBuffer[Any] = BatchBuffer(settings.max_batch, settings.max_wait_s)
        self.store = RunStore.from_url(settings.result_backend)
        self.stopped = StoppedRuns(self._fetch_stopped)
        self.dropping: list[tuple[Any, Any]] = []  # (request, job) of runs believed stopped
        self.drop_chunk = max(1, min(DROP_CHUNK, settings.prefetch_count // 2))
        self.defaults = settings.recipe_defaults()
        self.metrics = runtime.metrics
        self.metrics.watch(lambda: sum(map(len, list(self.held.values()))), lambda: len(self.buffer))
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
            self.dropping.append((req, job))
            if len(self.dropping) >= self.drop_chunk:
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
            self._dispatch([req])  # the pool records why it failed; it has no peers to wait for
            return
        if self.buffer.add(batch_key(job, self.defaults), req, time.monotonic()):
            # Pumped when due, not at the next tick: a lone job waits max_wait_s, not a tick more.
            self.consumer.timer.call_after(self.buffer.max_wait_s, self.pump)
        self.pump()

    def pump(self) -> None:
        """Hand the pool what is ready: partial batches only while a pool slot is idle, full
        ones also one ahead, so the next batch starts the moment a slot frees. With nothing to
        generate, fetch the outcomes of images still being stored."""
        if self.retired:
            return
        if self.dropping:
            self._drop_stopped()
        now = time.monotonic()
        while len(self.calls) <= self.slots:
            taken = self.buffer.take(now, allow_partial=len(self.calls) < self.slots)
            if taken is None:
                break
            self._dispatch(taken[1])
        if not self.calls and self.held:  # held, in no call: the pool process is storing them
            self._call(pool.collect_stored, (), [])

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
        waiting, self.dropping = self.dropping, []
        by_run: defaultdict[str, list[tuple[Any, Any]]] = defaultdict(list)
        for req, job in waiting:
            by_run[job.run_id].append((req, job))
        for run_id, items in by_run.items():
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
        """Acknowledge requests of one channel together where the transport can (one round trip),
        else one by one; through the lease keeper when Redis or the channel fails meanwhile."""
        qos = requests[0].message.channel.qos
        if not hasattr(qos, "ack_many"):  # another transport than the worker's
            for req in requests:
                req.acknowledge()
            return
        try:
            qos.ack_many([req.message.delivery_tag for req in requests])
        except Exception as error:  # a lost channel or Redis: the lease keeper acknowledges them
            logger.debug("%d messages not acknowledged (%r): the lease keeper will", len(requests), error)
            for req in requests:
                self.leases.settle(req.message, requeue=False)
        for req in requests:
            req.acknowledged = True

    def _dispatch(self, requests: list[Any]) -> None:
        deliveries = [
            {"task_id": req.id, "payload": req.payload, "enqueued_at": req.enqueued_at, "received_at": req.received_at}
            for req in requests
        ]
        for req in requests:
            req.pool_pid = None
            self.held[req.id].append(req)
        self._call(pool.execute_batch, (deliveries,), requests)

    def _call(self, function: Any, args: tuple[Any, ...], requests: list[Any]) -> None:
        call = PoolCall(requests)
        self.calls.append(call)
        self.pool.apply_async(
            function,
            args=args,
            accept_callback=partial(self._on_accepted, call),
            callback=partial(self._on_result, call),
            error_callback=partial(self._on_error, call),
            timeout=self.batch_timeout_s,
            correlation_id=requests[0].id if requests else "collect-stored",
        )

    def _on_accepted(self, call: PoolCall, pid: int, time_accepted: float) -> None:
        call.accepted = True
        self.leases.working(req.message.delivery_tag for req in call.requests)
        for req in call.requests:
            req.pool_pid = pid
            req.on_accepted(pid, time_accepted)  # active in `celery inspect`, task-started event

    def _on_result(self, call: PoolCall, progress: dict[str, Any]) -> None:
        self.calls.remove(call)
        self.metrics.record(progress)
        for outcome in progress["finished"]:
            queue = self.held.get(outcome["task_id"])
            if not queue:
                logger.warning("pool reported task %s, which this worker no longer holds", outcome["task_id"])
                continue
            req = queue.popleft()
            if not queue:
                del self.held[outcome["task_id"]]
            if outcome["retry"]:
                self._send_back([req])
            else:
                self._finish(req, outcome["ok"], outcome["key"] if outcome["ok"] else outcome["reason"])
        self._rerun_lost_stores()  # a process that died between two calls left no error behind
        self.pump()

    def _on_error(self, call: PoolCall, exc_info: Any) -> None:
        self.calls.remove(call)
        requests = call.requests
        error = getattr(exc_info, "exception", exc_info)
        error = getattr(error, "exc", error)  # billiard wraps it in ExceptionWithTraceback
        self.metrics.error(call_error_kind(error), len(requests))
        if isinstance(error, (WorkerLostError, TimeLimitExceeded)):
            # The process died (or was killed for a timeout): the batch it ran is suspect; the
            # images it was still storing are simply lost.
            self._release(requests)
            self._rerun_lost_stores()
            self._retry_alone(requests, error)
        else:
            # The pool could not run the batch at all (no pipeline, Redis down): other workers
            # may. A worker without a pipeline stops instead of spinning on the queue.
            logger.error("batch of %d not run (%r): sending its jobs back to the queue", len(requests), error)
            self._release(requests)
            self._send_back(requests)
            if isinstance(error, pool.PipelineUnavailable):
                logger.critical("stopping this worker: %s", error)
                worker_state.should_stop = os.EX_SOFTWARE  # 70
        self.pump()

    def _rerun_lost_stores(self) -> None:
        """Buffer again the jobs whose images a pool process that has died was still storing."""
        if self.retired:  # its successor sees every call in flight; this one does not
            return
        in_calls = {id(req) for call in self.calls for req in call.requests}
        lost = [
            req
            for queue in self.held.values()
            for req in queue
            if req.pool_pid is not None and id(req) not in in_calls and not process_alive(req.pool_pid)
        ]
        if not lost:
            return
        logger.error("%d jobs were being stored by a pool process that died: running them again", len(lost))
        self.metrics.error("process_lost", len(lost))
        self._release(lost)
        for req in lost:
            job, _ = parse_job(req.payload)
            self._buffer_again(req, batch_key(job, self.defaults) if job else ("alone", req.id), time.monotonic())

    def _buffer_again(self, req: Any, key: Any, since: float) -> None:
        """Run ``req`` again here, or, once this strategy is retired, anywhere (back to the queue)."""
        if self.retired:
            self.leases.give_back([req.message])
            worker_state.task_ready(req)
        else:
            self.buffer.add(key, req, since)

    def retire(self) -> None:
        """The consumer lost its connection and made a new strategy. The messages this one
        buffers, or handed to the pool but no process took (Celery dropped those calls), go back
        to the queue now; batches already running finish and report here."""
        self.retired = True
        dropped = [call for call in self.calls if not call.accepted]
        self.calls = [call for call in self.calls if call.accepted]
        returned = [req for _, requests in self.buffer.drain() for req in requests]
        returned += [req for call in dropped for req in call.requests]
        returned += [req for req, _ in self.dropping]  # dropped by whichever worker takes them next
        self.dropping = []
        self._release(returned)
        self.leases.give_back(req.message for req in returned)
        for req in returned:
            worker_state.task_ready(req)
        logger.warning("connection lost: %d jobs this worker had not started go back to the queue", len(returned))

    def _release(self, requests: list[Any]) -> None:
        """Forget that the pool holds these requests."""
        self.leases.idle(req.message.delivery_tag for req in requests)
        for req in requests:
            queue = self.held.get(req.id)
            if queue and req in queue:
                queue.remove(req)
                if not queue:
                    del self.held[req.id]

    def _send_back(self, requests: list[Any]) -> None:
        for req in requests:
            req.reject(requeue=True)
            worker_state.task_ready(req)

    def _retry_alone(self, requests: list[Any], error: BaseException) -> None:
        """Run each job of a lost batch on its own; fail the ones lost MAX_LOSSES times."""
        reason = "its pool process died" if isinstance(error, WorkerLostError) else "it timed out"
        logger.error("batch of %d lost (%r): retrying its jobs one by one", len(requests), error)
        for req in requests:
            if self._count_loss(req) >= MAX_LOSSES:
                message = f"generation failed: {reason} {MAX_LOSSES} times while running this job"
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

    def _settle(self, message: Any, requeue: bool | None) -> None:
        """Acknowledge (``requeue`` None) or reject a message, now. One whose channel went with
        a lost connection, or that Redis is down for, is settled by the lease keeper's own
        connection instead, once Redis answers: kombu fails on a closed channel with an
        AttributeError that would stop the worker."""
        tag = message.delivery_tag
        try:
            if requeue is None:
                message.ack()
            else:
                message.reject(requeue=requeue)
        except Exception as error:  # a lost channel or Redis: the lease keeper retries it
            logger.debug("message %s not settled (%r): the lease keeper will", tag, error)
            self.leases.settle(message, requeue=bool(requeue))
        else:
            self.leases.settled(tag)

    def _request(self, message: Any, body: Any) -> Any:
        if body is None and "args" not in message.payload:
            body, headers, decoded, utc = message.body, message.headers, False, self.app.uses_utc_timezone()
        elif "args" in message.payload:
            body, headers, decoded, utc = hybrid_to_proto2(message, message.payload)
        else:
            body, headers, decoded, utc = proto1_to_proto2(message, body)
        return self.Request(
            message,
            on_ack=lambda *_: self._settle(message, requeue=None),
            on_reject=lambda _logger, _errors, requeue: self._settle(message, requeue=requeue),
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
