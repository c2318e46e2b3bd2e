"""What a llama.cpp run can be asked, checked before anything is loaded: context, chunks, threads, text.

``--ctx`` against the model's trained context and llama.cpp's KV cache and logits
against MemAvailable (read from the GGUF header or config.json, no model loaded),
``--chunks`` and ``--threads`` ranges, a text that is a non-empty string.  Used by
perplexity, KL-divergence, importance matrices and sensitivity measurement alike.

Not for: running anything (``quantkit.engine.session``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.errors import QuantkitError


#: the smallest --ctx: a chunk scores positions n_ctx/2 .. n_ctx-2, so 8 scores 3 tokens per chunk
#: (enough for a standard error from one chunk); llama-perplexity accepts any n_ctx > 0 and scores no token below 3
MIN_CTX = 8
#: ggml's GGML_MAX_N_THREADS (ggml.h): ggml sizes its per-thread tables (CPU masks, thread states) for at most this many
MAX_THREADS = 512
GIB = 1 << 30
KV_PAD = 256  # llama.cpp rounds each sequence's KV cells up to this (GGML_PAD(n_ctx_seq, 256) in llama-context.cpp)


def _whole(value: Any, flag: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise QuantkitError(f"{flag} {_show(value)}: expected a whole number; fix: {fix}")
    return int(value)


def _show(value: Any, cap: int = 80) -> str:
    r = repr(value)
    return r if len(r) <= cap else r[: cap - 1] + "…"


def check_ctx_value(n_ctx: Any, minimum: int = MIN_CTX, even: bool = True, flag: str = "--ctx") -> int:
    """``--ctx`` on its own: a whole number >= ``minimum`` (even when ``even``: the KL-divergence scores n_ctx/2 - 1 positions per chunk)."""
    fix = f"use e.g. {flag} 512"
    n = _whole(n_ctx, flag, fix)
    if n < minimum or (even and n % 2):
        what = f"an even number >= {minimum}" if even else f"a number >= {minimum}"
        raise QuantkitError(f"{flag} {n}: expected {what}; fix: {fix}")
    return n


def check_chunks(n_chunks: Any, flag: str = "--chunks") -> int | None:
    """``--chunks``: None (every whole chunk of the text) or a whole number >= 1."""
    if n_chunks is None:
        return None
    n = _whole(n_chunks, flag, "omit it to use the whole text")
    if n < 1:
        raise QuantkitError(f"{flag} {n}: expected at least 1; fix: omit it to use the whole text, or give a positive number")
    return n


def check_threads(threads: Any) -> int | None:
    """``--threads``: None (the physical cores) or 1 .. :data:`MAX_THREADS`."""
    if threads is None:
        return None
    n = _whole(threads, "--threads", "omit it to use the physical cores")
    if not 1 <= n <= MAX_THREADS:
        raise QuantkitError(f"--threads {n}: expected 1 to {MAX_THREADS}; fix: omit it to use the physical cores")
    return n


def check_text(text: Any, what: str = "text") -> str:
    """The text to evaluate: a non-empty string (whether it holds enough tokens is known once the model tokenises it)."""
    if not isinstance(text, str):
        raise QuantkitError(f"{what}: expected a string ({type(text).__name__}); fix: pass the text, not a path or bytes")
    if not text:
        raise QuantkitError(f"{what}: empty (0 characters); fix: give a text of at least 2 x --ctx tokens")
    return text


@dataclass(frozen=True)
class ModelLimits:
    """What a model says about the contexts it can take, read from its GGUF header or config.json without loading it."""

    path: Path
    n_ctx_train: int | None  # the trained context ({arch}.context_length / max_position_embeddings)
    kv_bytes_per_token: int | None  # llama.cpp's F16 K and V cache of every layer; None when not plain attention (or not a GGUF)
    n_vocab: int | None
    source: str  # the file the numbers came from, for messages
    gguf: bool  # run by llama.cpp (an HF directory runs in transformers)


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


#: metadata key fragments of caches that are not one F16 K and V row per token and layer (MLA, recurrent, sliding window):
#: the estimate would overstate them, so only the logits count for those
_NOT_PLAIN_KV = (".attention.kv_lora_rank", ".ssm.", ".wkv.", ".rwkv.", ".shortconv.", ".attention.sliding_window", "full_attention_interval")


def model_limits(path: str | Path) -> ModelLimits:
    """:class:`ModelLimits` of a GGUF file (its header only) or an HF directory (its config.json)."""
    path = Path(path)
    if path.is_dir():
        from quantkit.hf.checkpoint import load_config

        config = load_config(path)
        sub = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        train = None
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            train = _positive(config.get(key)) or _positive(sub.get(key))
            if train:
                break
        return ModelLimits(path, train, None, _positive(config.get("vocab_size")), str(path / "config.json"), gguf=False)
    from quantkit.engine import runtime
    from quantkit.format.gguf_read import ArraySummary, read_gguf

    g = read_gguf(path)
    md = g.metadata
    arch = md.get("general.architecture")
    train = _positive(md.get(f"{arch}.context_length")) if isinstance(arch, str) else None
    tokens = md.get("tokenizer.ggml.tokens")
    n_vocab = tokens.count if isinstance(tokens, ArraySummary) else len(tokens) if isinstance(tokens, list) else None
    kv = None
    if isinstance(arch, str) and not any(k.startswith(arch + ".") and any(f in k for f in _NOT_PLAIN_KV) for k in md):
        try:
            kv = runtime.kv_shape(g).bytes_per_token()
        except (QuantkitError, TypeError, ValueError):
            kv = None  # llama.cpp refuses such a header itself, with its own message
    return ModelLimits(path, train, kv, n_vocab, str(path), gguf=True)


def check_ctx(
    n_ctx: Any, limits: ModelLimits, n_seq: int = 1, outputs: float = 1.0, minimum: int = MIN_CTX, even: bool = True, flag: str = "--ctx",
) -> int:
    """``--ctx`` for this model: :func:`check_ctx_value`, at most the trained context, and llama.cpp's buffers within RAM.

    ``n_seq`` chunks are decoded side by side (llama.cpp's context holds ``n_ctx * n_seq`` cells);
    ``outputs`` is the share of positions whose logits are asked for.  The memory estimate counts only
    the F16 KV cache and the logits (a lower bound: no weights, no compute buffers) against
    MemAvailable, for llama.cpp on CPU-only builds (a GPU build keeps the KV cache in GPU memory); for an HF
    directory (transformers on the CPU) the float32 logits alone.
    """
    n = check_ctx_value(n_ctx, minimum, even, flag)
    if limits.n_ctx_train is not None and n > limits.n_ctx_train:
        raise QuantkitError(
            f"{flag} {n}: more than the model's trained context of {limits.n_ctx_train} tokens ({limits.source}); "
            f"fix: use {flag} {limits.n_ctx_train} or less"
        )
    if limits.n_vocab is None:
        return n
    from quantkit.engine import runtime

    cells = n * n_seq
    # llama.cpp pads each sequence's share of the KV cache to a multiple of KV_PAD cells (n_ctx_seq, llama-context.cpp):
    # --ctx 16 over 128 sequences allocates 32768 cells, not 2048
    kv_cells = -(-n // KV_PAD) * KV_PAD * n_seq if limits.gguf else cells
    need = kv_cells * (limits.kv_bytes_per_token or 0) + int(cells * outputs) * limits.n_vocab * 4
    avail = runtime.mem_available()
    if avail is not None and need > avail and not (limits.gguf and runtime.gpu_offload_supported()):
        what = "llama.cpp's KV cache and logits" if limits.gguf else "the float32 logits"
        raise QuantkitError(
            f"{flag} {n}: {what} for {cells} tokens need at least {need / GIB:.2f} GiB of RAM, "
            f"{avail / GIB:.2f} GiB available ({limits.source}); fix: use a smaller {flag}"
        )
    return n
