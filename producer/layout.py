"""Where everything of a run lives: every object key in storage and every Redis key deepqueue
writes, named here once, so producer, worker and tools read and write the same places. Pure.

Storage (``prefix`` is ``DEEPQUEUE_S3_PREFIX``, possibly empty; ``{run}`` the run id):

- ``{prefix}/{run}/images/{job_id}.{ext}``: an image (``ext`` from ``EXTENSIONS``), and
  ``{prefix}/{run}/images/{job_id}.json``: its sidecar, both written once by the worker;
- ``{prefix}/{run}/jobs/{first}-{last}-{token}.jsonl.gz``: the jobs as a submit sent them
  (``producer.sent``);
- ``{prefix}/{run}/manifest-parts/{worker}-{time_ns}-{token}.jsonl.gz``: the workers' manifest
  rows (``producer.manifest_parts``);
- ``{prefix}/{run}/manifest/manifest-00000.parquet`` ...: the compacted manifest, alone in its
  folder so that it reads as one Parquet dataset, and ``{prefix}/{run}/stats.json``;
- ``{prefix}/{run}/audit.jsonl`` and ``audit.json``: the quality audit (``producer.audit``);
- ``{prefix}/{run}/exports/{format}/``: an export's default target;
- ``{prefix}/.deepqueue/write-check``: what a worker writes at start-up to prove it can.

Redis, result backend (``{run}`` is a Redis Cluster hash tag, so one run's keys live together;
what each holds: ``producer.state``): ``deepqueue:{run}:slots:<n>`` (the jobs' states, packed:
``producer.slots``), ``:blocks``, ``:others``, ``:counts``, ``:reasons``, ``:running``,
``:images``, ``:keys``, ``:pending``, ``:losses``, ``:recipes``, ``:meta``, ``:minutes``;
``deepqueue:runs`` and ``deepqueue:deleted``. Completion webhooks (``producer.notify_state``):
``deepqueue:{run}:notify`` (``NOTIFY_NAME``), ``deepqueue:{run}:notify-claim``
(``NOTIFY_CLAIM_NAME``) and ``deepqueue:notify-pending`` (``NOTIFY_PENDING_KEY``).

Redis, broker: ``deepqueue:workers`` (``WORKERS_KEY``), ``deepqueue:dead-letters``
(``DEAD_LETTERS_KEY``), the queue itself and kombu's keys, named by kombu, and per queue its
fair share (``producer.fair``): ``deepqueue:queued:{queue}:{run}`` (a run's messages),
``deepqueue:fair:{queue}`` (virtual times, counters) and ``deepqueue:fair:{queue}:{class}`` (the
runs with work, by pass); ``deepqueue:shares`` (``SHARES_KEY``: each run's class and weight) and
``deepqueue:fair-queues`` (``FAIR_QUEUES_KEY``: the queues that have had runs' lists).
"""

from __future__ import annotations

import re

# --- storage ---------------------------------------------------------------------------------

#: Job format -> file extension and MIME type of its image.
EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}
CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
_TYPE_OF_EXTENSION = {EXTENSIONS[fmt]: CONTENT_TYPES[fmt] for fmt in EXTENSIONS} | CONTENT_TYPES
#: What a manifest part's name ends with.
PART_SUFFIX = ".jsonl.gz"


def image_content_type(extension: str) -> str:
    """An image's MIME type from its file extension (``jpeg`` as well as ``jpg``)."""
    return _TYPE_OF_EXTENSION.get(extension, "application/octet-stream")


def run_key(prefix: str, run_id: str, *parts: str) -> str:
    """``{prefix}/{run}/{parts...}``: where a run's objects live (no leading slash when prefix is empty)."""
    return "/".join(part for part in (prefix.strip("/"), run_id, *parts) if part)


def run_prefix(prefix: str, run_id: str) -> str:
    """``{prefix}/{run}/``: every object of the run."""
    return run_key(prefix, run_id) + "/"


def images_prefix(prefix: str, run_id: str) -> str:
    """``{prefix}/{run}/images/``: the run's images and sidecars."""
    return run_key(prefix, run_id, "images") + "/"


def image_key(prefix: str, run_id: str, job_id: str, ext: str) -> str:
    """``{prefix}/{run}/images/{job_id}.{ext}``."""
    return run_key(prefix, run_id, "images", f"{job_id}.{ext}")


def url_extension(url: str | None) -> str:
    """An image's extension from its key or URL, as a job record holds it (png when it has none)."""
    name = (url or "").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[1] if "." in name else "png"


def sidecar_key(image: str) -> str:
    """The sidecar beside the image at ``image``: the same key ending in ``.json``."""
    return image.rsplit(".", 1)[0] + ".json"


def write_check_key(prefix: str) -> str:
    """Where a worker proves at start-up that it can write: one object, overwritten each time."""
    return "/".join(part for part in (prefix.strip("/"), ".deepqueue", "write-check") if part)


def sent_prefix(prefix: str, run_id: str) -> str:
    """``{prefix}/{run}/jobs/``: the jobs as sent (``producer.sent``)."""
    return run_key(prefix, run_id, "jobs") + "/"


def sent_key(prefix: str, run_id: str, first: int, last: int, token: str) -> str:
    """One chunk of jobs as sent: ``{prefix}/{run}/jobs/{first:09d}-{last:09d}-{token}.jsonl.gz``."""
    return run_key(prefix, run_id, "jobs", f"{first:09d}-{last:09d}-{token}.jsonl.gz")


def manifest_prefix(prefix: str, run_id: str) -> str:
    """``{prefix}/{run}/manifest/``: the compacted shards and nothing else, so that the folder
    reads as one Parquet dataset (``pq.ParquetDataset``, s3fs, ``datasets``)."""
    return run_key(prefix, run_id, "manifest") + "/"


def parts_prefix(prefix: str, run_id: str) -> str:
    """``{prefix}/{run}/manifest-parts/``: the rows as workers store images."""
    return run_key(prefix, run_id, "manifest-parts") + "/"


def safe_name(name: str) -> str:
    """A worker name (``gpu0@host:1234``) as a key segment: ``[A-Za-z0-9._-]``, 64 characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:64] or "worker"


def part_key(prefix: str, run_id: str, worker: str, time_ns: int, token: str) -> str:
    """One manifest part: unique per worker, time and token, so parts are never replaced."""
    return run_key(prefix, run_id, "manifest-parts", f"{safe_name(worker)}-{time_ns}-{token}{PART_SUFFIX}")


def shard_key(prefix: str, run_id: str, index: int) -> str:
    """The compacted manifest: ``{prefix}/{run}/manifest/manifest-00000.parquet``, ..."""
    return run_key(prefix, run_id, "manifest", f"manifest-{index:05d}.parquet")


def stats_key(prefix: str, run_id: str) -> str:
    return run_key(prefix, run_id, "stats.json")


def audit_rows_key(prefix: str, run_id: str) -> str:
    """One JSON line per audited job (``job_id``, ``psnr``, ``ssim``, ``uncached_key``)."""
    return run_key(prefix, run_id, "audit.jsonl")


def audit_summary_key(prefix: str, run_id: str) -> str:
    return run_key(prefix, run_id, "audit.json")


def export_key(prefix: str, run_id: str, fmt: str) -> str:
    """An export's default target: ``{prefix}/{run}/exports/{format}``."""
    return run_key(prefix, run_id, "exports", fmt)


# --- Redis -----------------------------------------------------------------------------------

#: Result backend zsets: run ids by first submission time; deleted run ids while their tombstones last.
RUNS_KEY = "deepqueue:runs"
DELETED_KEY = "deepqueue:deleted"
#: Run state names of a run's completion webhook: its hash (URL, hold, outcome) and its delivery
#: claim (a string with a lease); see ``producer.notify_state``.
NOTIFY_NAME = "notify"
NOTIFY_CLAIM_NAME = "notify-claim"
#: Result backend zset: runs whose notification is claimed or held, by when to look at it again.
NOTIFY_PENDING_KEY = "deepqueue:notify-pending"

#: Broker hash: worker name -> time of its last lease renewal (see worker.delivery.leases).
WORKERS_KEY = "deepqueue:workers"
#: Broker hash: worker name -> the queue it serves (its model's, see ``model_queue``).
WORKER_QUEUES_KEY = "deepqueue:worker-queues"
#: Broker hash: worker name -> how many jobs its messages hold (reserved), as of its last renewal.
WORKER_HELD_KEY = "deepqueue:worker-held"
#: The per-worker hashes above, which a worker leaving (or forgotten) is removed from.
WORKER_KEYS = (WORKERS_KEY, WORKER_QUEUES_KEY, WORKER_HELD_KEY)
#: Broker hash of every run's priority class and weight (``c:{run}``, ``w:{run}``: ``producer.fair``).
SHARES_KEY = "deepqueue:shares"
#: Broker set of the queues that have had runs' lists (``producer.fair``).
FAIR_QUEUES_KEY = "deepqueue:fair-queues"
#: Broker list of the messages workers dropped as unreadable (newest first), for ``deepqueue dead-letters``.
DEAD_LETTERS_KEY = "deepqueue:dead-letters"


def state_key(run_id: str, name: str) -> str:
    """``deepqueue:{run}:{name}``: one of the run's keys in the result backend (see the module
    docstring)."""
    return f"deepqueue:{{{run_id}}}:{name}"


def run_list_key(queue: str, run_id: str) -> str:
    """Broker list of one run's messages waiting in ``queue`` (``producer.fair``)."""
    return f"deepqueue:queued:{queue}:{run_id}"


def fair_key(queue: str) -> str:
    """Broker hash of ``queue``'s fair share: its classes' virtual times, what waits in its runs' lists."""
    return f"deepqueue:fair:{queue}"


def class_key(queue: str, priority: str) -> str:
    """Broker zset of the runs of one priority class with messages in ``queue``, by pass."""
    return f"deepqueue:fair:{queue}:{priority}"


def model_queue(queue: str, alias: str | None) -> str:
    """The queue of the workers that serve model ``alias`` (``DEEPQUEUE_MODEL_ALIAS``):
    ``{queue}.{alias}``; jobs that name no model, and workers that declare none, use ``queue``."""
    return f"{queue}.{alias}" if alias else queue
