"""A local stack for the README's examples: Redis, an S3 server with its bucket and one worker, in
the foreground, until Ctrl-C.

``make services`` (= ``python -m ops.services``) starts a private redis-server and moto's S3
server on free loopback ports (or the ports given), creates the bucket, starts one
``deepqueue worker`` on ``DEEPQUEUE_MODEL`` (default: the offline tiny model in models/tiny, built
on first use; ``--scores clip,nsfw`` use ``DEEPQUEUE_CLIP_MODEL`` and ``DEEPQUEUE_SAFETY_CHECKER``,
by default offline random ones in models/, whose scores are noise), prints the ``export`` lines
that point the client and CLI at them (also written to ``DATA_DIR/env`` for ``source``), then
follows the worker's log. Ctrl-C (or SIGTERM) stops the
worker (a warm shutdown), the S3 server and Redis; their data goes with them. Where Docker
runs, ``docker compose up`` is the same with MinIO and a GPU worker.

    python -m ops.services [--data-dir .local-stack] [--redis-port N] [--s3-port N] [--bucket NAME]
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from ops.localstack import (
    AWS_ENV,
    default_model,
    default_score_models,
    moto_s3_client,
    start_moto,
    start_redis,
    start_worker,
    stop,
    worker_env,
)

ROOT = Path(__file__).resolve().parents[1]


def client_env(redis_url: str, s3_url: str, bucket: str) -> dict[str, str]:
    """What a shell needs to reach the stack: the client's settings and the S3 server's credentials."""
    return {
        "DEEPQUEUE_BROKER_URL": f"{redis_url}/0",
        "DEEPQUEUE_RESULT_BACKEND": f"{redis_url}/1",
        "DEEPQUEUE_S3_ENDPOINT_URL": s3_url,
        "DEEPQUEUE_S3_BUCKET": bucket,
        **AWS_ENV,
    }


def export_lines(env: Mapping[str, str]) -> str:
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())


def follow(log: Path, worker: subprocess.Popen, offset: int = 0) -> None:
    """Print the worker's log as it grows, until the worker exits."""
    with log.open() as lines:
        lines.seek(offset)
        while True:
            line = lines.readline()
            if line:
                sys.stdout.write(line)
                sys.stdout.flush()
            elif worker.poll() is not None:
                return
            else:
                time.sleep(0.2)


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".local-stack", help="logs, Redis' folder, env file")
    parser.add_argument("--redis-port", type=int, help="default: a free port")
    parser.add_argument("--s3-port", type=int, help="default: a free port")
    parser.add_argument("--bucket", default="deepqueue-local")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    model = default_model(ROOT)
    redis_process, redis_url = start_redis(args.data_dir, port=args.redis_port)
    moto_process, s3_url = start_moto(port=args.s3_port)
    worker = None
    try:
        moto_s3_client(s3_url).create_bucket(Bucket=args.bucket)
        env = client_env(redis_url, s3_url, args.bucket)
        log = args.data_dir / "worker.log"
        print(
            f"redis {redis_url}, s3 {s3_url} (bucket {args.bucket}), model {model}; starting the worker ...", flush=True
        )
        settings = worker_env(
            broker_url=env["DEEPQUEUE_BROKER_URL"],
            result_backend=env["DEEPQUEUE_RESULT_BACKEND"],
            s3_endpoint=s3_url,
            bucket=args.bucket,
            model=model,
            **default_score_models(ROOT),
            keep_user_settings=True,  # DEEPQUEUE_DEVICE=cuda make services, etc.
        )
        worker = start_worker(settings, log, timeout=1800)
        (args.data_dir / "env").write_text(export_lines(env))
        print(
            f"\nready. In another shell:\n\n{export_lines(env)}\n(or: source {args.data_dir / 'env'})\n"
            f"Ctrl-C stops the worker, the S3 server and Redis. The worker's log follows:\n",
            flush=True,
        )
        follow(log, worker)
        return worker.returncode or 0
    except KeyboardInterrupt:
        print("\nstopping the worker, the S3 server and Redis ...", flush=True)
        return 0
    finally:
        for process in (worker, moto_process, redis_process):
            if process is not None and process.poll() is None:
                stop(process)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
