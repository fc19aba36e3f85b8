"""The main job end to end on one machine, with real servers and the offline tiny model.

Starts a private Redis, an S3 server (moto) with a bucket and one `deepqueue worker`; submits
a prompt file with `deepqueue submit --wait` as a user would; then copies what landed in S3
to a local folder and prints it. Set DEEPQUEUE_MODEL to use a real model instead.

    python ops/demo.py [PROMPTS] [--out demo-out] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

from ops.localstack import (
    deepqueue_command,
    default_model,
    moto_s3_client,
    start_moto,
    start_redis,
    start_worker,
    stop,
    worker_env,
)

RUN = "demo"

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="?", type=Path, default=ROOT / "examples" / "prompts.jsonl")
    parser.add_argument("--out", type=Path, default=ROOT / "demo-out", help="where S3's contents are copied")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    model = default_model(ROOT)

    with tempfile.TemporaryDirectory(prefix="deepqueue-demo-") as scratch:
        redis_process, redis_url = start_redis(Path(scratch))
        moto_process, s3_url = start_moto()
        env = worker_env(
            broker_url=f"{redis_url}/0",
            result_backend=f"{redis_url}/1",
            s3_endpoint=s3_url,
            bucket="deepqueue-demo",
            model=model,
            keep_user_settings=True,  # DEEPQUEUE_DEVICE=cuda make demo, etc.
            max_wait_s=1.0,
        )
        worker = None
        try:
            s3 = moto_s3_client(s3_url)
            s3.create_bucket(Bucket="deepqueue-demo")
            print(f"redis {redis_url}, s3 {s3_url}, model {model}; starting the worker ...", flush=True)
            worker = start_worker(env, Path(scratch) / "worker.log")
            submitted = subprocess.run(
                [
                    *deepqueue_command(),
                    "submit",
                    str(args.prompts),
                    "--run",
                    RUN,
                    "--steps",
                    str(args.steps),
                    "--wait",
                    "--timeout",
                    "1800",
                ],
                env=env,
            )
            copied = copy_bucket(s3, "deepqueue-demo", f"{RUN}/", args.out)
        finally:
            if worker is not None:
                stop(worker)
                (args.out / "worker.log").parent.mkdir(parents=True, exist_ok=True)
                (args.out / "worker.log").write_text((Path(scratch) / "worker.log").read_text())
            stop(moto_process)
            stop(redis_process)
    summarise(copied, args.out)
    return submitted.returncode


def copy_bucket(s3, bucket: str, prefix: str, out: Path) -> list[Path]:
    """The run's objects (not the workers' start-up write check) into ``out``."""
    copied = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            path = out / item["Key"]
            path.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, item["Key"], str(path))
            copied.append(path)
    return copied


def summarise(paths: list[Path], out: Path) -> None:
    sidecars = [json.loads(p.read_text()) for p in paths if p.suffix == ".json" and p.parent.name == "images"]
    sizes = Counter(f"{s['width']}x{s['height']}" for s in sidecars)
    batches = Counter(s["batch"]["size"] for s in {s["batch"]["id"]: s for s in sidecars}.values())
    print(f"\n{len(sidecars)} images + sidecars copied from S3 to {out}/")
    print("  by size:  " + ", ".join(f"{size}: {n}" for size, n in sorted(sizes.items())))
    print("  batches:  " + ", ".join(f"{n} of {size}" for size, n in sorted(batches.items(), reverse=True)))
    if sidecars:
        example = sorted(paths)[0]
        print(f"  e.g.      {example.relative_to(out)} (sidecar next to each image)")
    print(f"  worker log: {out / 'worker.log'}")


if __name__ == "__main__":
    raise SystemExit(main())
