"""The one harness every benchmark in ops/bench runs in: its command line, its private servers
and models, its parts, and where its results go. A benchmark's ``main`` is::

    args = harness.parser(__doc__, "scaling-latest").parse_args(argv)   # plus its own flags
    with harness.session(args, markdown, points=[]) as bench:
        with bench.part("servers"):
            redis_url, s3 = bench.servers.redis_url(), bench.servers.s3_endpoint()
            ...
    return bench.results

- **Servers and models** are private and lazy: a redis-server and a moto S3 server on free
  loopback ports (``ops/localstack.py``, shared with the tests) start when first asked for, a
  random-weight model (``worker.pipeline.testmodel``) is built into the scratch folder when first asked
  for (or ``--model`` is used), and all of it is stopped and removed when the session ends.
- **A part that fails does not end the run**: ``bench.part(label)`` records the error (one
  line in the report, the traceback in the JSON) and the run goes on; the report gets a
  "Failed" section and the command exits 1 (``exit_status``) after writing it.
- **Where results go**: a plain run writes ``NAME.json`` (every measurement, the machine, the
  command) and ``NAME.md`` into a new folder ``results/runs/DATE-TIME-PID/`` (git-ignored), beside
  the committed ``results/*-latest.*`` that the READMEs link to; only ``--record`` writes over
  those, and ``--out DIR`` anywhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ops.bench.report import command_line, failures_markdown, load_average, machine_info, one_line
from ops.localstack import moto_s3_client, start_moto, start_redis, start_worker, stop

logger = logging.getLogger("ops.bench")

#: The committed results, which the READMEs link to (written with ``--record``).
RESULTS = Path(__file__).resolve().parent / "results"
#: Seconds a server or worker may take to start: generous, since a loaded machine is slow.
START_TIMEOUT_S = 600.0
BUILT = "{arch} (built by worker.pipeline.testmodel, random weights)"


def parser(doc: str, name: str, *, tiny_model: bool = False) -> argparse.ArgumentParser:
    """A benchmark's command line: ``doc`` as its help, and the options every benchmark shares
    (where results go, how long start-up may take; with ``tiny_model``, ``--model``)."""
    parser = argparse.ArgumentParser(
        prog=_prog(),
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("results and start-up")
    group.add_argument("--name", default=name, help=f"results file name, without extension (default {name})")
    group.add_argument("--out", type=Path, help="results folder (default: a new folder under ops/bench/results/runs/)")
    group.add_argument(
        "--record",
        action="store_true",
        help="write into ops/bench/results/, over the committed results the READMEs link to",
    )
    group.add_argument(
        "--start-timeout",
        type=float,
        default=START_TIMEOUT_S,
        help=f"seconds each server and worker may take to start (default {START_TIMEOUT_S:.0f})",
    )
    if tiny_model:
        group.add_argument(
            "--model",
            dest="tiny_model",
            metavar="DIR",
            type=Path,
            help="tiny model folder (default: built into a temporary folder)",
        )
    return parser


def _prog() -> str | None:
    """``python -m ops.bench.NAME`` for the usage line, as the command was typed."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"python -m {spec.name}" if spec is not None else None


def output_dir(args: argparse.Namespace) -> Path:
    """``--out``, else ``RESULTS`` with ``--record``, else a new folder under ``RESULTS/runs``."""
    if args.out is not None:
        return args.out
    if args.record:
        return RESULTS
    return RESULTS / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


@dataclass
class Servers:
    """The private servers and models of one session, each started (or built) when first asked
    for, and stopped (or removed) when the session ends."""

    scratch: Path
    stack: ExitStack
    start_timeout: float
    tiny: Path | None = None  # ``--model``: the tiny model to use instead of building one
    started: dict[str, str] = field(default_factory=dict)
    build_s: dict[str, float] = field(default_factory=dict)  # arch -> seconds its build took

    def redis_url(self) -> str:
        """``redis://127.0.0.1:PORT`` of the session's redis-server."""
        return self._start("redis", lambda: start_redis(self.scratch, timeout=self.start_timeout))

    def s3_endpoint(self) -> str:
        """The endpoint URL of the session's moto S3 server."""
        return self._start("s3", lambda: start_moto(timeout=self.start_timeout))

    def _start(self, name: str, start: Callable[[], tuple[subprocess.Popen, str]]) -> str:
        if name not in self.started:
            process, self.started[name] = start()
            self.stack.callback(stop, process)
        return self.started[name]

    @contextmanager
    def fresh_redis(self, folder: Path) -> Iterator[str]:
        """A redis-server of its own in ``folder``, stopped on exit: for a round that must start
        from an empty server."""
        process, url = start_redis(folder, timeout=self.start_timeout)
        try:
            yield url
        finally:
            stop(process)

    def bucket(self, name: str) -> str:
        """A new bucket ``name`` on the session's moto S3 server; returns the endpoint."""
        endpoint = self.s3_endpoint()
        moto_s3_client(endpoint).create_bucket(Bucket=name)
        return endpoint

    def model(self, arch: str = "tiny") -> Path:
        """``--model`` for the tiny model when given; else ``arch`` with random weights, built
        into the scratch folder once (its build time in ``build_s``)."""
        if arch == "tiny" and self.tiny is not None:
            return self.tiny
        built = self.scratch / arch
        if arch not in self.build_s:
            from worker.pipeline.testmodel import build_test_model

            started = time.perf_counter()
            build_test_model(built, arch)  # type: ignore[arg-type]
            self.build_s[arch] = round(time.perf_counter() - started, 1)
            logger.info("built the %s model in %.0f s", arch, self.build_s[arch])
        return built

    def model_label(self, arch: str = "tiny") -> str:
        """How the results name the model ``model(arch)`` returns."""
        return str(self.tiny) if arch == "tiny" and self.tiny is not None else BUILT.format(arch=arch)


@contextmanager
def running_worker(env: Mapping[str, str], log_path: Path, *args: str, timeout: float) -> Iterator[subprocess.Popen]:
    """A ``deepqueue worker`` (``ops.localstack.start_worker``), stopped on exit; when the body
    fails, the end of its log is logged first, since the cause is usually there."""
    process = start_worker(env, log_path, *args, timeout=timeout)
    try:
        yield process
    except BaseException:
        logger.error("worker log (last 3000 characters):\n%s", log_path.read_text()[-3000:])
        raise
    finally:
        stop(process)


@dataclass
class Bench:
    """One benchmark run: its results so far, its servers and where its results will go."""

    results: dict[str, Any]
    servers: Servers
    out_dir: Path

    @property
    def scratch(self) -> Path:
        return self.servers.scratch

    def part(self, label: str) -> Any:
        return part(self.results, label)


@contextmanager
def session(args: argparse.Namespace, markdown_of: Callable[[dict[str, Any]], str], **extra: Any) -> Iterator[Bench]:
    """Run a benchmark: logging, the results (``extra`` added), a scratch folder and lazy
    servers; at the end the servers stop and the results are written (see ``write``). An error
    outside every part is raised, and nothing is written; an interrupt (Ctrl-C, or ``timeout -s
    INT`` at the end of a GPU lease) ends the run like a failed part: what was measured is written."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    results = {"command": command_line(), "machine": machine_info(), "load_before": load_average(), **extra}
    busy, cores = results["load_before"], results["machine"]["usable_cores"] or 1
    if busy and busy[0] > 0.5 * cores:
        logger.warning("load average %s at start: other work shares this machine, expect noisy numbers", busy)
    started = time.perf_counter()
    with ExitStack() as stack:
        # A worker still stopping may write into the scratch folder while it is removed.
        scratch = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="deepqueue-bench-", ignore_cleanup_errors=True))
        )
        servers = Servers(scratch, stack, args.start_timeout, getattr(args, "tiny_model", None))
        bench = Bench(results, servers, output_dir(args))
        try:
            yield bench
        except KeyboardInterrupt:
            line = "interrupted (Ctrl-C or a time limit) before the end: the results so far"
            results.setdefault("failed", {})["run"] = {"error": line, "traceback": ""}
            logger.error("%s", line)
    results["seconds"] = round(time.perf_counter() - started, 1)
    write(results, markdown_of, out_dir=bench.out_dir, name=args.name)


@contextmanager
def part(results: dict[str, Any], label: str) -> Iterator[None]:
    """Run one part of a benchmark: an exception ends this part only. It is recorded in
    ``results["failed"][label]`` (one line, and the traceback for the JSON) and logged in one line."""
    try:
        yield
    except Exception as error:
        line = one_line(error)
        results.setdefault("failed", {})[label] = {"error": line, "traceback": traceback.format_exc()}
        logger.error("%s failed: %s", label, line)


def exit_status(results: dict[str, Any]) -> int:
    """The command's exit status: 1 when a part failed."""
    return 1 if results.get("failed") else 0


def write(results: dict[str, Any], markdown_of: Callable[[dict[str, Any]], str], *, out_dir: Path, name: str) -> None:
    """Record the load at the end, write ``name``.json (everything) and ``name``.md (the markdown
    and its "Failed" section) in ``out_dir``, print the markdown and log where it went."""
    results["load_after"] = load_average()
    text = markdown_of(results) + failures_markdown(results)
    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path.write_text(text)
    failed = len(results.get("failed", {}))
    logger.info("wrote %s and %s%s", json_path, md_path, f"; {failed} part(s) failed" if failed else "")


def run_child(code: str, *args: str) -> dict[str, Any]:
    """``python -c code args`` in a fresh process: its last line of output, parsed as JSON. If it
    fails, the RuntimeError's first line is the last line of its stderr (the exception)."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"the child process exited with {done.returncode}: {last}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def s3_sidecars(endpoint: str, bucket: str, prefix: str = "") -> list[dict[str, Any]]:
    """Every JSON sidecar under ``prefix`` in a (moto) S3 bucket."""
    client = moto_s3_client(endpoint)
    found = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            if item["Key"].endswith(".json") and not item["Key"].startswith(".deepqueue/"):
                found.append(json.loads(client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()))
    return found
