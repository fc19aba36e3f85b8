"""Worker log lines with their ids as fields: ``key=value`` text by default, JSON on request.

Log calls name what they are about with ``extra={"run_id": ..., "job_id": ..., "batch_id": ...}``;
these formatters put such fields on the line, so a log search for one job, batch or run finds all
of it. ``DEEPQUEUE_LOG_FORMAT=json`` writes one JSON object per line instead (for Loki, Cloud
Logging, ...). Celery sets up its handlers first; ``install`` then replaces their formatters, in
the main process before the pool forks, so pool processes log the same way.

``quiet_torchvision_fallback`` drops one known-harmless warning (see there), and only that one.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Literal

#: The fields a log call may add with ``extra=`` (in this order on a text line).
FIELDS = (
    *("run_id", "job_id", "batch_id", "batch_size", "jobs", "inference_s", "worker"),
    *("loras", "lora_load_s", "lora_switch_s"),  # LoRA adapter loads and switches (worker.pipeline.lora)
)

TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in FIELDS if getattr(record, name, None) is not None}


class TextFormatter(logging.Formatter):
    """Celery's line, then the record's fields as ``key=value``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = fields_of(record)
        if not fields:
            return line
        first, newline, rest = line.partition("\n")  # a traceback stays below the fields
        pairs = " ".join(f"{name}={_text(value)}" for name, value in fields.items())
        return f"{first} {pairs}{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, process, message, fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
            **fields_of(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def _text(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if not text or any(c.isspace() or c in '"=' for c in text) else text


#: transformers' warning, once per processor in every process that loads a pipeline, that an image
#: processor falls back to its PIL twin without torchvision: diffusers imports image processors
#: that the text-to-image pipelines here never use, so it says nothing to act on.
TORCHVISION_FALLBACK = re.compile(
    r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`"
)
#: The logger transformers warns through (``transformers.utils.import_utils``).
TORCHVISION_FALLBACK_LOGGER = "transformers.utils.import_utils"


class _DropTorchvisionFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not TORCHVISION_FALLBACK.match(record.getMessage())


_drop_torchvision_fallback = _DropTorchvisionFallback()


def quiet_torchvision_fallback() -> None:
    """Drop transformers' "requires torchvision ... falling back to ...Pil" warnings in this
    process; every other record of that logger still passes. Idempotent; needs no transformers."""
    logging.getLogger(TORCHVISION_FALLBACK_LOGGER).addFilter(_drop_torchvision_fallback)


def formatter(kind: Literal["text", "json"]) -> logging.Formatter:
    return JsonFormatter() if kind == "json" else TextFormatter()


def install(kind: Literal["text", "json"], logger: logging.Logger | None = None) -> None:
    """Give every handler of ``logger`` (the root logger) the formatter of ``kind``."""
    for handler in (logger or logging.getLogger()).handlers:
        handler.setFormatter(formatter(kind))
