"""LoRA adapters on the warm pipeline: loaded once per process, switched per batch.

A batch key names the adapter set of its jobs (``producer.loras``; empty: the base model).
Before each pipeline call the engine asks ``Adapters`` for that set:

- an adapter not yet loaded is loaded once with diffusers' ``pipe.load_lora_weights`` (PEFT
  layers injected into the UNet, and the text encoder if the file has weights for it) under a
  name of its own, and kept for the life of the process, by id;
- then ``pipe.set_adapters(names, adapter_weights=scales)`` makes exactly that set active, and a
  base-model batch after an adapter batch gets ``pipe.disable_lora()``; a batch with the set
  already active changes nothing. A worker that never sees a LoRA never touches the pipeline.

What each step cost (``load_s``, ``switch_s``) goes to the log with structured fields and to
every image's sidecar timing, with each adapter's id, scale and the sha256 of its weights file.

Failures: a LoRA that cannot be found, read or applied to this model raises ``LoraError`` with
the id and the cause; the engine turns it into a refusal of that batch's jobs (``check``), never
a failure of the worker. What a failed load injected is deleted again. The failure is kept for
``RETRY_FAILED_S``: the batches that name the id meanwhile fail at once with the same reason (a
run of thousands of jobs with a mistyped Hub id asks the Hub once a minute, not once a batch);
after that the next batch tries again (the file may have appeared meanwhile).

Where the weights come from: a ``.safetensors`` file; a folder holding
``pytorch_lora_weights.safetensors`` or exactly one ``.safetensors`` file; or a Hub id
(``owner/name``), downloaded (or read from the Hub cache) as such a folder. The file hashed is the
file loaded.

Limits: adapters stay loaded until the process ends (a few MiB each for SD-class LoRAs). They
work with DeepCache (its helper swaps the UNet's and its blocks' ``forward``; the PEFT layers
are the attention projections inside the blocks, so both the full and the shallow steps apply
them; tested). They do not work at acceleration levels above ``off`` (``problem``): ``fuse``
runs attention through fused QKV projections, which bypass adapters on ``to_q``/``to_k``/``to_v``;
``compile`` and ``graphs`` specialise compiled code and captured graphs on the modules as they
were, so switching adapters would recompile or replay stale weights.

torch and diffusers are imported only inside functions, as in ``worker.pipeline.engine``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producer.errors import DeepQueueError
from producer.loras import describe

logger = logging.getLogger(__name__)

#: The file diffusers writes with ``save_lora_weights``, preferred when a folder holds several.
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: Seconds a failed load is remembered (its reason given again at once) before it is tried again.
RETRY_FAILED_S = 60.0
#: ``owner/name`` on the Hub (a local path starts with ``/``, ``.`` or ``~``, or exists).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _no_text_encoder_part(record: logging.LogRecord) -> bool:
    """False for diffusers' warning that a LoRA has nothing for the text encoder: most LoRAs
    adapt the UNet only, and the warning would land in the worker log at every load."""
    return not record.getMessage().startswith("No LoRA keys associated to")


class LoraError(DeepQueueError, ValueError):
    """A LoRA could not be loaded or applied: the jobs that name it fail with this reason."""


def refused_at(level: str) -> str | None:
    """Why adapters cannot run at acceleration ``level``, or None (see the module docstring)."""
    if level == "off":
        return None
    return (
        f"LoRA adapters need DEEPQUEUE_ACCELERATION=off; this worker runs {level!r}, whose fused "
        "attention (and compiled steps or CUDA graphs) would ignore or freeze them: send LoRA runs "
        "to workers started with acceleration off (e.g. their own model alias)"
    )


def weights_file(ident: str) -> Path:
    """The ``.safetensors`` file a LoRA id names (see the module docstring), or LoraError."""
    path = Path(ident).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        folder = path
    elif _HUB_ID.match(ident):
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(ident, allow_patterns=["*.safetensors"]))
        except Exception as error:  # no network, no such repo, no access: all say "cannot get it"
            reason = " ".join(str(error).split())  # one line in a job's failure reason
            raise LoraError(f"LoRA {ident!r}: not a file or folder here, and not on the Hub: {reason}") from error
    else:
        raise LoraError(f"LoRA {ident!r}: no such file or folder on this worker")
    files = sorted(folder.glob("*.safetensors"))
    if folder / DEFAULT_WEIGHT_NAME in files:
        return folder / DEFAULT_WEIGHT_NAME
    if len(files) == 1:
        return files[0]
    if not files:
        raise LoraError(f"LoRA {ident!r}: {folder} holds no .safetensors weights")
    names = ", ".join(file.name for file in files[:5])
    raise LoraError(f"LoRA {ident!r}: {folder} holds several .safetensors files ({names}): name the file itself")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Loaded:
    """One adapter in the pipeline."""

    id: str
    name: str  # the PEFT adapter name (ids hold '/' and '.', which module names may not)
    file: str
    sha256: str
    load_s: float


@dataclass
class Switch:
    """What preparing one batch's adapters did: the adapters (id, scale, sha256) for the
    sidecar, and the seconds spent loading and switching (``timing``; empty when the pipeline was
    never touched: no adapter loaded in this process)."""

    loras: list[dict[str, Any]] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)


class Adapters:
    """The adapters loaded into one pipeline, and which set is active."""

    def __init__(self, pipe: Any, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.pipe = pipe
        self.clock = clock  # for RETRY_FAILED_S only (tests pass their own)
        self.loaded: dict[str, Loaded] = {}
        self._failed: dict[str, tuple[float, LoraError]] = {}  # id -> (when, why)
        # None: unknown (an adapter was just loaded, and diffusers activated it on its own)
        self._active: tuple[tuple[str, float], ...] | None = ()
        self._names = 0
        self._load_s = 0.0  # loads since the last switch (``load`` may run before ``switch``)

    def load(self, ids: list[str] | tuple[str, ...]) -> None:
        """Load each id not loaded yet, or raise LoraError naming the first that fails."""
        for ident in ids:
            if ident in self.loaded:
                continue
            failed = self._failed.get(ident)
            if failed is not None and self.clock() - failed[0] < RETRY_FAILED_S:
                raise LoraError(str(failed[1])) from failed[1]
            try:
                self._load_one(ident)
            except LoraError as error:
                self._failed[ident] = (self.clock(), error)
                raise
            self._failed.pop(ident, None)

    def switch(self, loras: tuple[tuple[str, float], ...]) -> Switch:
        """Make exactly ``loras`` (``(id, scale)``) active, loading what is missing."""
        self.load([ident for ident, _ in loras])
        load_s, self._load_s = self._load_s, 0.0
        if not self.loaded:
            return Switch()
        started = time.perf_counter()
        if loras != self._active:
            if not loras:
                self.pipe.disable_lora()
            else:
                self.pipe.enable_lora()  # back on after a base-model batch's disable_lora
                names = [self.loaded[ident].name for ident, _ in loras]
                self.pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
            switch_s = time.perf_counter() - started
            logger.info(
                "adapters %s -> %s in %.4f s (loading %.3f s)",
                "(loaded)" if self._active is None else describe(self._active),
                describe(loras),
                switch_s,
                load_s,
                extra={"loras": describe(loras), "lora_switch_s": round(switch_s, 6), "lora_load_s": round(load_s, 6)},
            )
            self._active = loras
        else:
            switch_s = 0.0
        records = [{"id": ident, "scale": scale, "sha256": self.loaded[ident].sha256} for ident, scale in loras]
        return Switch(records, {"lora_load_s": load_s, "lora_switch_s": switch_s})

    def _load_one(self, ident: str) -> None:
        started = time.perf_counter()
        path = weights_file(ident)
        try:
            sha256 = file_sha256(path)
        except OSError as error:
            raise LoraError(f"LoRA {ident!r}: cannot read {path}: {error}") from error
        self._names += 1
        name = f"lora{self._names}"
        diffusers_log = logging.getLogger("diffusers.loaders.lora_base")
        diffusers_log.addFilter(_no_text_encoder_part)
        try:
            with warnings.catch_warnings():  # PEFT's "multiple adapters in the model": that is the point
                warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)
                self.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        except Exception as error:  # a bad file, another model's LoRA, no PEFT: its jobs fail, not the worker
            self._forget(name)
            self._active = None  # whatever diffusers activated before it failed: set the next batch's anew
            reason = f"{type(error).__name__}: {error}"
            raise LoraError(f"LoRA {ident!r} cannot be applied to this model: {reason}") from error
        finally:
            diffusers_log.removeFilter(_no_text_encoder_part)
        load_s = time.perf_counter() - started
        self._load_s += load_s
        self.loaded[ident] = Loaded(ident, name, str(path), sha256, load_s)
        # A freshly loaded adapter is active on its own: the next switch must set the batch's set.
        self._active = None
        logger.info(
            "loaded LoRA %s (%s, sha256 %s) as %s in %.3f s",
            ident,
            path,
            sha256[:12],
            name,
            load_s,
            extra={"loras": ident, "lora_load_s": round(load_s, 6)},
        )

    def _forget(self, name: str) -> None:
        """Remove what a failed load left in the pipeline under ``name`` (if anything)."""
        try:
            present = {adapter for names in self.pipe.get_list_adapters().values() for adapter in names}
            if name in present:
                self.pipe.delete_adapters(name)
        except Exception as error:  # nothing was injected, or PEFT is missing: nothing to remove
            logger.debug("nothing to remove of the failed LoRA %s: %r", name, error)
