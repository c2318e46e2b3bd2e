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
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from quantkit.format import ggml
from quantkit.errors import QuantkitError
from quantkit.engine.limits import check_chunks, check_ctx, check_ctx_value, check_text, check_threads, model_limits
from quantkit.engine.session import EvalSession, check_logits, log_softmax

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


_FIRST_PART = re.compile(r"-00001-of-(\d{5})\.gguf\Z")


def model_sha256(path: str | Path) -> str:
    """SHA-256 of a GGUF model: of its file, or for a split set (named by its first part, ``NAME-00001-of-0000K.gguf``)
    of its parts' digests in order, so that a change in any part is a different model."""
    path = Path(path)
    m = _FIRST_PART.search(path.name)
    if m is None or int(m.group(1)) < 2:
        return sha256_file(path)
    n, stem = int(m.group(1)), path.name[: m.start()]
    h = hashlib.sha256()
    for i in range(1, n + 1):
        h.update(bytes.fromhex(sha256_file(path.with_name(f"{stem}-{i:05d}-of-{n:05d}.gguf"))))
    return h.hexdigest()


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

def iter_chunks(session: Any, tokens: list[int], n_chunks: int, nll_only: bool = False) -> Iterator[Chunk]:
    """Evaluate chunk after chunk from an empty cache (``session.n_seq`` at a time); yield the scored half.

    ``nll_only``: yield only each target's NLL (perplexity), not the whole log-softmax (KL-divergence).
    """
    n_ctx = session.n_ctx
    first = n_ctx // 2
    bos = session.bos
    step = getattr(session, "n_seq", 1)
    model = getattr(session, "path", "the model")
    engine = "llama.cpp" if isinstance(session, EvalSession) else "transformers"
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
        # keyed by MoE block in order (0, 1, ...), as transformers' router_logits count them: leading dense blocks have no router
        router = {i: v[first : n_ctx - 1] for i, (_, v) in enumerate(sorted(session.router.items()))} if len(group) == 1 else {}
        if nll_only:  # numpy releases the GIL in exp and sums: the chunks of a batch in parallel
            nlls = list(ggml.pool().map(target_nll, scored, targets)) if len(group) > 1 else [target_nll(scored[0], targets[0])]
            for i, t, nll in zip(idx, targets, nlls):
                check_logits(nll, i, model, engine)  # a NaN or +inf logit makes its row's NLL NaN
                yield Chunk(i, None, t, router, nll)
        else:
            for i, t, sc in zip(idx, targets, scored):
                lp = log_softmax(sc)
                check_logits(lp, i, model, engine)
                yield Chunk(i, lp, t, router)


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
        model_sha = Background(model_sha256, model)  # started once the file is known to be a loadable GGUF
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
