"""Worker log lines carry run, job and batch ids as fields, as text or as JSON."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import subprocess
import sys

import pytest

from worker import logs


@pytest.fixture
def capture():
    def make(kind):
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        logger = logging.getLogger(f"test-logs-{kind}")
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logs.install(kind, logger)
        return logger, stream

    return make


def test_text_lines_end_with_the_fields(capture):
    logger, stream = capture("text")
    logger.info("batch %s: %d images", "b1", 8, extra={"batch_id": "b1", "batch_size": 8, "run_id": "foxes v1"})
    logger.info("no fields here")
    first, second = stream.getvalue().splitlines()
    assert first.endswith('batch b1: 8 images run_id="foxes v1" batch_id=b1 batch_size=8')
    assert first.startswith("[") and "INFO/MainProcess]" in first
    assert second.endswith("] no fields here")


def test_text_keeps_a_traceback_below_the_fields(capture):
    logger, stream = capture("text")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("job failed", extra={"job_id": "00000001-abc"})
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("job failed job_id=00000001-abc")
    assert lines[-1] == "RuntimeError: boom"


def test_json_lines_parse_with_every_field(capture):
    logger, stream = capture("json")
    try:
        raise ValueError("bad")
    except ValueError:
        logger.error("storing job %s failed", "j1", extra={"job_id": "j1", "run_id": "r"}, exc_info=True)
    [line] = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["message"] == "storing job j1 failed" and entry["level"] == "ERROR"
    assert (entry["job_id"], entry["run_id"]) == ("j1", "r")
    assert "ValueError: bad" in entry["exception"] and "T" in entry["time"]


#: transformers itself, in a fresh process: it warns that an image processor falls back to its
#: PIL twin (torchvision is not installed), then one other warning on the same logger.
FALLBACK_SCRIPT = """
import logging, sys
from worker import logs
if sys.argv[1] == "quiet":
    logs.quiet_torchvision_fallback()
import transformers
transformers.CLIPImageProcessor
logging.getLogger(logs.TORCHVISION_FALLBACK_LOGGER).warning("another warning still shows")
"""


@pytest.mark.parametrize("mode", ["quiet", "loud"])
def test_only_the_torchvision_fallback_warnings_are_dropped(mode):
    pytest.importorskip("transformers")
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: transformers does not warn")
    result = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT, mode], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    warned = "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`"
    assert (warned in result.stderr) == (mode == "loud"), result.stderr
    assert "another warning still shows" in result.stderr
