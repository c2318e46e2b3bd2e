"""Perplexity the way llama-perplexity computes it, through llama-cpp-python.

The rule (llama.cpp ``tools/perplexity``): the text is tokenised once (BOS
first when the vocabulary adds one); it is cut into chunks of ``n_ctx``
tokens; the first token of every chunk is replaced by BOS; each chunk is
evaluated from an empty KV cache; only the second half is scored (positions
``n_ctx/2 .. n_ctx-2`` predicting the next token); at least ``2*n_ctx``
tokens are required.  The standard error is llama.cpp's:
``sqrt((E[nll^2] - E[nll]^2) / (N - 1)) * ppl``.

Not for: comparing two models (``quantkit.evals.kld``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from quantkit import ggml
from quantkit.errors import QuantkitError
from quantkit.evals.session import EvalSession

log = logging.getLogger(__name__)


#: files this large have their SHA-256 remembered (keyed by path, inode, size and times): a 90 GB checkpoint is not re-read per run
HASH_CACHE_MIN = 64 << 20


def cache_root() -> Path:
    """quantkit's cache directory: $QUANTKIT_CACHE, else ~/.cache/quantkit."""
    return Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache" / "quantkit"))


def sha256_file(path: str | Path, chunk: int = 1 << 22, cache: bool = True) -> str:
    """SHA-256 of a file; for large files, remembered until the file's inode, size, mtime or ctime changes."""
    st = os.stat(path)
    entry = None
    if cache and st.st_size >= HASH_CACHE_MIN:
        ident = f"{os.path.realpath(path)}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
        entry = cache_root() / "sha256" / hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        try:
            known = entry.read_text().strip()
            if len(known) == 64:
                return known
        except OSError:
            pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    if entry is not None:
        try:  # best effort: a read-only cache only costs the next run a re-hash
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
            tmp.write_text(digest)
            os.replace(tmp, entry)
        except OSError:
            pass
    return digest


class Background:
    """``fn(*args)`` on a daemon thread (a file's SHA-256 while the model is evaluated: reads and hashlib release the GIL).

    Daemon, so that an error in the evaluation exits at once instead of waiting for a 50 GB hash.
    """

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True, name="qk-background")
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self._value = fn(*args)
        except BaseException as e:  # handed to result()
            self._error = e

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def llama_cpp_version() -> str:
    import llama_cpp

    return f"llama-cpp-python {llama_cpp.__version__}"


@dataclass(frozen=True)
class PplResult:
    ppl: float
    ppl_stderr: float
    nll_mean: float
    n_ctx: int
    n_chunks: int
    n_tokens: int  # tokens in the whole text
    n_scored: int
    text_sha256: str
    model_sha256: str
    model: str
    llama_cpp: str
    seconds: float
    tokens_per_second: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Chunk:
    """One evaluated chunk: the scored positions' log-probabilities and their targets."""

    index: int
    logprobs: np.ndarray | None  # (n_ctx/2 - 1, n_vocab) float32 log-softmax; None when only the NLL was asked for
    targets: np.ndarray  # (n_ctx/2 - 1,) next-token ids
    router: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> (positions, n_expert) router logits
    nll: np.ndarray | None = None  # (n_ctx/2 - 1,) float64 negative log-likelihood of each target


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x.astype(np.float32)


def target_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, as llama-perplexity computes it (exp in float, sums in double)."""
    m = logits.max(axis=-1)
    e = np.subtract(logits, m[:, None])
    np.exp(e, out=e)  # in place: one temporary per chunk instead of two
    return np.log(e.sum(axis=-1, dtype=np.float64)) + m - logits[np.arange(targets.size), targets]


def plan_chunks(n_tokens: int, n_ctx: int, n_chunks: int | None) -> int:
    """How many whole chunks of ``n_ctx`` tokens to evaluate: all of them, or the first ``n_chunks``."""
    check_ctx_value(n_ctx)
    check_chunks(n_chunks)
    if n_tokens < 2 * n_ctx:
        raise QuantkitError(
            f"text: {n_tokens} tokens, perplexity at --ctx {n_ctx} needs at least {2 * n_ctx} (2 x --ctx, as llama-perplexity); "
            "fix: use a longer text or a smaller --ctx"
        )
    most = n_tokens // n_ctx
    return most if n_chunks is None else min(n_chunks, most)


# --------------------------------------------------------------------------- arguments, checked before any model is loaded

#: the smallest --ctx: a chunk scores positions n_ctx/2 .. n_ctx-2, so 8 scores 3 tokens per chunk
#: (enough for a standard error from one chunk); llama-perplexity accepts any n_ctx > 0 and scores no token below 3
MIN_CTX = 8
#: ggml's GGML_MAX_N_THREADS (ggml.h): ggml sizes its per-thread tables (CPU masks, thread states) for at most this many
MAX_THREADS = 512
GIB = 1 << 30


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
        from quantkit.checkpoint import load_config

        config = load_config(path)
        sub = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        train = None
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            train = _positive(config.get(key)) or _positive(sub.get(key))
            if train:
                break
        return ModelLimits(path, train, None, _positive(config.get("vocab_size")), str(path / "config.json"), gguf=False)
    from quantkit import runtime
    from quantkit.gguf_read import ArraySummary, read_gguf

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
    from quantkit import runtime

    cells = n * n_seq
    need = cells * (limits.kv_bytes_per_token or 0) + int(cells * outputs) * limits.n_vocab * 4
    avail = runtime.mem_available()
    if avail is not None and need > avail and not (limits.gguf and runtime.gpu_offload_supported()):
        what = "llama.cpp's KV cache and logits" if limits.gguf else "the float32 logits"
        raise QuantkitError(
            f"{flag} {n}: {what} for {cells} tokens need at least {need / GIB:.2f} GiB of RAM, "
            f"{avail / GIB:.2f} GiB available ({limits.source}); fix: use a smaller {flag}"
        )
    return n


def iter_chunks(session: Any, tokens: list[int], n_chunks: int, nll_only: bool = False) -> Iterator[Chunk]:
    """Evaluate chunk after chunk from an empty cache (``session.n_seq`` at a time); yield the scored half.

    ``nll_only``: yield only each target's NLL (perplexity), not the whole log-softmax (KL-divergence).
    """
    n_ctx = session.n_ctx
    first = n_ctx // 2
    bos = session.bos
    step = getattr(session, "n_seq", 1)
    for start in range(0, n_chunks, step):
        group = []
        for i in range(start, min(n_chunks, start + step)):
            chunk = list(tokens[i * n_ctx : (i + 1) * n_ctx])
            if bos is not None:
                chunk[0] = bos
            group.append(chunk)
        # only the scored half is output (as llama-perplexity asks), unless routers are captured: llama.cpp then
        # computes the last block's router for the output rows only, and routing compares every position
        skip = 0 if getattr(session, "capture_router", False) else first
        all_logits = session.eval_chunks(group, skip, copy=False)  # used up before the next decode
        idx = range(start, start + len(group))
        targets = [np.asarray(tokens[i * n_ctx + first + 1 : (i + 1) * n_ctx], dtype=np.int64) for i in idx]
        scored = [logits[first - skip : n_ctx - 1 - skip] for logits in all_logits]
        router = {k: v[first : n_ctx - 1] for k, v in session.router.items()} if len(group) == 1 else {}
        if nll_only:  # numpy releases the GIL in exp and sums: the chunks of a batch in parallel
            nlls = list(ggml.pool().map(target_nll, scored, targets)) if len(group) > 1 else [target_nll(scored[0], targets[0])]
            for i, t, nll in zip(idx, targets, nlls):
                yield Chunk(i, None, t, router, nll)
        else:
            for i, t, sc in zip(idx, targets, scored):
                yield Chunk(i, log_softmax(sc), t, router)


#: llama-perplexity's default batch: n_seq = 2048 / n_ctx chunks are decoded together.
BATCH_TOKENS = 2048


class NllAccumulator:
    """Running sums for llama.cpp's perplexity and its standard error."""

    def __init__(self) -> None:
        self.sum = 0.0
        self.sum2 = 0.0
        self.count = 0

    def add(self, nll: np.ndarray) -> None:
        nll = nll.astype(np.float64)
        self.sum += float(nll.sum())
        self.sum2 += float((nll * nll).sum())
        self.count += nll.size

    def result(self) -> tuple[float, float, float]:
        mean = self.sum / self.count
        var = self.sum2 / self.count - mean * mean
        ppl = math.exp(mean)
        err = math.sqrt(var / (self.count - 1)) * ppl if var > 0 and self.count > 1 else 0.0
        return ppl, err, mean


def perplexity(
    model: str | Path,
    text: str,
    n_ctx: int = 512,
    n_chunks: int | None = None,
    threads: int | None = None,
    on_chunk: Callable[[int, int, float], None] | None = None,
) -> PplResult:
    """llama-perplexity's number for ``model`` on ``text``; ``on_chunk(i, n, running_ppl)`` reports progress.

    Arguments are checked before the model is loaded (:func:`check_ctx`, :func:`check_chunks`,
    :func:`check_threads`, :func:`check_text`); the text must hold at least ``2 * n_ctx`` tokens.
    """
    t0 = time.perf_counter()
    if Path(model).is_dir():
        raise QuantkitError(f"{model}: a directory; eval ppl runs a GGUF file in llama.cpp; fix: convert it first (quantkit convert {model} -o model.gguf)")
    check_ctx_value(n_ctx)
    check_chunks(n_chunks)
    check_threads(threads)
    check_text(text)
    n_seq = max(1, BATCH_TOKENS // n_ctx)
    check_ctx(n_ctx, model_limits(model), n_seq=n_seq, outputs=0.5)
    session = EvalSession(model, n_ctx, threads, n_seq=n_seq)
    try:
        model_sha = Background(sha256_file, model)  # started once the file is known to be a loadable GGUF
        tokens = session.tokenize(text)
        n = plan_chunks(len(tokens), n_ctx, n_chunks)
        acc = NllAccumulator()
        for chunk in iter_chunks(session, tokens, n, nll_only=True):
            assert chunk.nll is not None
            acc.add(chunk.nll)
            if on_chunk is not None:
                on_chunk(chunk.index + 1, n, math.exp(acc.sum / acc.count))
    finally:
        session.close()
    ppl, err, mean = acc.result()
    seconds = time.perf_counter() - t0
    return PplResult(
        ppl=ppl, ppl_stderr=err, nll_mean=mean, n_ctx=n_ctx, n_chunks=n, n_tokens=len(tokens), n_scored=acc.count,
        text_sha256=sha256_text(text), model_sha256=model_sha.result(), model=str(model), llama_cpp=llama_cpp_version(),
        seconds=seconds, tokens_per_second=n * n_ctx / seconds,
    )
