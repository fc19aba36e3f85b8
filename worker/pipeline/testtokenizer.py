"""The CLIP tokenizer of the random-weight test pipelines (``worker.pipeline.testmodel``), written
from scratch: the 256 byte-level symbols, their end-of-word forms, a handful of merges and the
two special tokens. Prompts come out as noise, but every code path of a real tokenizer runs."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also the pad and unknown token, as in CLIP
MODEL_MAX_LENGTH = 77

# A handful of BPE merges, each exactly two symbols (transformers 5 / `tokenizers` require it).
# Every merge result is added to the vocabulary; order is merge priority.
MERGES: tuple[tuple[str, str], ...] = (
    ("a", "t</w>"),
    ("c", "at</w>"),
    ("d", "og</w>"),
    ("o", "g</w>"),
    ("p", "h"),
    ("o", "t"),
    ("ph", "ot"),
    ("phot", "o</w>"),
    ("t", "h"),
    ("th", "e</w>"),
)


def byte_symbols() -> list[str]:
    """The 256 byte-level BPE symbols (GPT-2/CLIP ``bytes_to_unicode``), in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def tokenizer_vocab(merges: tuple[tuple[str, str], ...] = MERGES) -> dict[str, int]:
    """CLIP-style vocabulary: byte symbols, their ``</w>`` forms, merge results, then specials."""
    symbols = byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges)]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    if len(set(tokens)) != len(tokens):
        raise ValueError("merges produce a token that is already in the vocabulary")
    return {token: i for i, token in enumerate(tokens)}


def write_tokenizer_files(
    directory: str | os.PathLike[str], merges: tuple[tuple[str, str], ...] = MERGES
) -> pathlib.Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` for a CLIPTokenizer."""
    vocab = tokenizer_vocab(merges)
    for pair in merges:
        if len(pair) != 2 or any(not s or " " in s for s in pair):
            raise ValueError(f"a merge must be exactly two non-empty symbols: {pair!r}")
        if any(s not in vocab for s in pair):
            raise ValueError(f"merge {pair!r} uses a symbol that is not in the vocabulary")
    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def build_tokenizer() -> CLIPTokenizer:
    """A CLIPTokenizer loaded from the files that ``write_tokenizer_files`` writes."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="deepqueue-tokenizer-") as tmp:
        write_tokenizer_files(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=MODEL_MAX_LENGTH)
    if tokenizer.model_max_length != MODEL_MAX_LENGTH:
        raise RuntimeError(f"tokenizer model_max_length is {tokenizer.model_max_length}")
    return tokenizer


def clip_text_config(tokenizer: CLIPTokenizer, **sizes: Any) -> Any:
    """A CLIPTextConfig whose vocabulary and special-token ids match ``tokenizer``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=MODEL_MAX_LENGTH,
        layer_norm_eps=1e-5,
        **sizes,
    )
