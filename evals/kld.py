"""KL-divergence, token statistics and routing fidelity of a candidate against a base model.

The base is evaluated once per (model file, text, ctx, chunks) and its
log-probabilities and router logits are cached on disk; every candidate is then
compared on exactly the same tokens and positions (llama-perplexity's chunking:
BOS-led chunks, second half scored).  Statistics follow
``llama-perplexity --kl-divergence``: mean KLD with its standard error,
percentiles, same-top-token rate, Δp = p_cand(target) - p_base(target), and
PPL(cand)/PPL(base) with the error of its logarithm.

Not for: the pass/fail decision (``quantkit.evals.gate``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from quantkit.errors import QuantkitError
from quantkit.evals.perplexity import Background, cache_root, iter_chunks, llama_cpp_version, model_sha256, plan_chunks, sha256_file, sha256_text
from quantkit.engine.limits import check_chunks, check_ctx, check_ctx_value, check_text, check_threads, model_limits
from quantkit.evals.routing import Gate, RoutingStats
from quantkit.engine.session import EvalSession

log = logging.getLogger(__name__)
PERCENTILES = {"max": 100.0, "p99_9": 99.9, "p99": 99.0, "p95": 95.0, "p90": 90.0, "median": 50.0, "p10": 10.0, "p5": 5.0, "p1": 1.0, "min": 0.0}
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return cache_root() / "base-logprobs"


@dataclass(frozen=True)
class BaseLogprobs:
    """A cached base evaluation: log-probs (N, vocab), targets (N,), router logits (layers, N, experts)."""

    dir: Path
    meta: dict[str, Any]

    @property
    def logprobs(self) -> np.ndarray:
        return np.load(self.dir / "logprobs.npy", mmap_mode="r")

    @property
    def targets(self) -> np.ndarray:
        return np.load(self.dir / "targets.npy")

    @property
    def router(self) -> np.ndarray | None:
        p = self.dir / "router.npy"
        return np.load(p, mmap_mode="r") if p.exists() else None


def _key(model_sha: str, text_sha: str, n_ctx: int, n_chunks: int | None) -> str:
    return hashlib.sha256(f"v{CACHE_VERSION}:{model_sha}:{text_sha}:{n_ctx}:{n_chunks}".encode()).hexdigest()[:24]


#: meta.json of a cached base evaluation: key -> type (a cache entry that does not match is evaluated again)
META_TYPES = {
    "model": str, "model_sha256": str, "text_sha256": str, "n_ctx": int, "n_chunks": int, "n_tokens": int, "n_vocab": int,
    "vocab": str, "tokens_sha256": str, "llama_cpp": str,
}


def _cached(root: Path) -> BaseLogprobs | None:
    """The cache entry at ``root`` when it is whole and consistent, else None (logged)."""
    if not (root / "meta.json").exists():
        return None
    try:
        meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or any(type(meta.get(k)) is not t for k, t in META_TYPES.items()):
            raise ValueError("meta.json lacks keys or has wrong types")
        per = meta["n_ctx"] // 2 - 1
        b = BaseLogprobs(root, meta)
        if b.logprobs.shape != (meta["n_chunks"] * per, meta["n_vocab"]) or b.targets.shape != (meta["n_chunks"] * per,):
            raise ValueError("array shapes differ from meta.json")
        return b
    except (OSError, ValueError, EOFError) as e:
        log.warning("base log-probs cache %s unusable (%s): evaluating the base again", root, e)
        return None


def base_logprobs(
    base: str | Path, text: str, n_ctx: int, n_chunks: int | None, threads: int | None = None,
    cache_dir: Path | None = None, on_chunk: Callable[[int, int], None] | None = None,
) -> BaseLogprobs:
    """Evaluate the base (GGUF or HF directory) once and cache the result; later calls read the cache.

    ``n_ctx``, ``n_chunks``, ``threads`` and the text are checked before the base is hashed or loaded.
    """
    base = Path(base)
    check_ctx_value(n_ctx)
    check_chunks(n_chunks)
    check_threads(threads)
    check_text(text)
    check_ctx(n_ctx, model_limits(base))  # every position's logits: the routers are compared at every position
    model_sha, text_sha = model_identity(base), sha256_text(text)
    root = (cache_dir or default_cache_dir()) / _key(model_sha, text_sha, n_ctx, n_chunks)
    hit = _cached(root)
    if hit is not None:
        log.info("base log-probs from cache %s", root)
        return hit
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QuantkitError(f"{tmp.parent}: cannot create the base log-probs cache here ({e.strerror or e}); fix: pass a writable --cache-dir") from None
    try:
        session = open_session(base, n_ctx, threads, capture_router=True)
        try:
            tokens = session.tokenize(text)
            n = plan_chunks(len(tokens), n_ctx, n_chunks)
            meta = _evaluate_base(session, tokens, n, n_ctx, tmp, on_chunk)
        finally:
            session.close()
        meta = {"model": str(base), "model_sha256": model_sha, "text_sha256": text_sha, **meta}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    except OSError as e:
        raise QuantkitError(f"{tmp}: writing the base log-probs cache failed ({e.strerror or e}); fix: free disk space or pass another --cache-dir") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename: a failed run leaves nothing behind
    return BaseLogprobs(root, meta)


def _evaluate_base(session: Any, tokens: list[int], n: int, n_ctx: int, tmp: Path, on_chunk: Callable[[int, int], None] | None) -> dict[str, Any]:
    """Write the base's log-probs, targets and router logits of ``n`` chunks under ``tmp``; return the rest of meta.json."""
    per = n_ctx // 2 - 1
    lp = np.lib.format.open_memmap(tmp / "logprobs.npy", mode="w+", dtype=np.float32, shape=(n * per, session.n_vocab))
    targets = np.empty(n * per, dtype=np.int32)
    router = None
    for chunk in iter_chunks(session, tokens, n):
        sl = slice(chunk.index * per, (chunk.index + 1) * per)
        lp[sl] = chunk.logprobs
        targets[sl] = chunk.targets
        if chunk.router:
            if router is None:
                n_exp = next(iter(chunk.router.values())).shape[1]
                router = np.lib.format.open_memmap(tmp / "router.npy", mode="w+", dtype=np.float32, shape=(len(chunk.router), n * per, n_exp))
            for layer, r in chunk.router.items():
                router[layer, sl] = r
        if on_chunk:
            on_chunk(chunk.index + 1, n)
    lp.flush()
    del lp
    if router is not None:
        router.flush()
        del router
    np.save(tmp / "targets.npy", targets)
    return {
        "n_ctx": n_ctx, "n_chunks": n, "n_tokens": len(tokens), "n_vocab": session.n_vocab, "vocab": session.vocab_fingerprint(),
        "tokens_sha256": hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest(), "llama_cpp": llama_cpp_version(),
    }


def model_identity(path: Path) -> str:
    """SHA-256 of a GGUF model (all parts of a split set), or of an HF directory's config and weight files."""
    if not path.is_dir():
        return model_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors", ".model")):
        h.update(f.name.encode() + bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


def open_session(path: Path, n_ctx: int, threads: int | None, capture_router: bool):
    """llama.cpp for GGUF files, transformers for HF and bitsandbytes directories."""
    if path.is_dir():
        from quantkit.evals.hf import HFSession

        return HFSession(path, n_ctx, threads)
    return EvalSession(path, n_ctx, threads, capture_router=capture_router)


def _dist(x: np.ndarray) -> dict[str, float]:
    return {k: float(np.percentile(x, q)) for k, q in PERCENTILES.items()}


def compare(
    base: BaseLogprobs, model: str | Path, text: str, threads: int | None = None, label: str | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on the base's exact tokens and compare distributions and routing."""
    return compare_values(base, model, text, threads, label, on_chunk)[0]


def compare_values(
    base: BaseLogprobs, model: str | Path, text: str, threads: int | None = None, label: str | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """:func:`compare`, also returning the per-position KL-divergences (for plots)."""
    t0 = time.perf_counter()
    meta = base.meta
    model = Path(model)
    check_threads(threads)
    check_text(text)
    if sha256_text(text) != meta["text_sha256"]:
        raise QuantkitError(
            f"text: not the text the base was evaluated on (SHA-256 {sha256_text(text)[:12]}… vs {meta['text_sha256'][:12]}…); "
            "fix: give compare the text given to base_logprobs"
        )
    check_ctx(meta["n_ctx"], model_limits(model))
    session = open_session(model, meta["n_ctx"], threads, capture_router=base.router is not None)
    model_sha = Background(model_identity, model)
    try:
        if session.n_vocab != meta["n_vocab"] or session.vocab_fingerprint() != meta["vocab"]:
            raise QuantkitError(f"{model}: its vocabulary differs from the base's ({session.n_vocab} vs {meta['n_vocab']} tokens or different token texts); fix: compare models that share one tokenizer")
        tokens = session.tokenize(text)
        if hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest() != meta["tokens_sha256"]:
            raise QuantkitError(f"{model}: tokenises the text differently from the base; fix: compare models that share one tokenizer")
        lp_base, targets, router_base = base.logprobs, base.targets, base.router
        per = meta["n_ctx"] // 2 - 1
        kld, same, dp, nll_b, nll_q = [], [], [], [], []
        gate = Gate.from_gguf(model) if router_base is not None and model.is_file() else Gate()  # the choice as the architecture makes it
        routing = RoutingStats.empty(router_base.shape[0], router_base.shape[2], session.experts_used, gate) if router_base is not None else None
        for chunk in iter_chunks(session, tokens, meta["n_chunks"]):
            sl = slice(chunk.index * per, (chunk.index + 1) * per)
            lb = np.asarray(lp_base[sl], dtype=np.float64)
            lq = chunk.logprobs.astype(np.float64)
            pb = np.exp(lb)
            kld.append((pb * (lb - lq)).sum(-1))
            same.append(lb.argmax(-1) == lq.argmax(-1))
            idx = np.arange(per)
            t = targets[sl]
            dp.append(np.exp(lq[idx, t]) - pb[idx, t])
            nll_b.append(-lb[idx, t])
            nll_q.append(-lq[idx, t])
            if routing is not None:
                routing.add(np.asarray(router_base[:, sl]), chunk.router)
            if on_chunk:
                on_chunk(chunk.index + 1, meta["n_chunks"])
    finally:
        session.close()
    kld_a, same_a, dp_a = np.concatenate(kld), np.concatenate(same), np.concatenate(dp)
    nb, nq = np.concatenate(nll_b), np.concatenate(nll_q)
    n = kld_a.size
    diff = nq - nb
    st = same_a.mean()
    report: dict[str, Any] = {
        "kind": "quantkit.kld",
        "setup": {
            "base": meta["model"], "base_sha256": meta["model_sha256"], "model": str(model), "model_sha256": model_sha.result(),
            "label": label or Path(model).stem, "text_sha256": meta["text_sha256"], "n_ctx": meta["n_ctx"], "n_chunks": meta["n_chunks"],
            "n_positions": int(n), "vocab": meta["vocab"], "llama_cpp": llama_cpp_version(),
        },
        "kld_mean": float(kld_a.mean()),
        "kld_mean_stderr": float(kld_a.std(ddof=1) / math.sqrt(n)),
        **{f"kld_{k}": v for k, v in _dist(kld_a).items()},
        "same_top": float(st),
        "same_top_stderr": float(math.sqrt(st * (1 - st) / (n - 1))),
        "dp_mean": float(dp_a.mean()),
        "dp_mean_stderr": float(dp_a.std(ddof=1) / math.sqrt(n)),
        "dp_rms": float(np.sqrt((dp_a**2).mean())),
        **{f"dp_{k}": v for k, v in _dist(dp_a).items()},
        "ppl_base": float(math.exp(nb.mean())),
        "ppl": float(math.exp(nq.mean())),
        "ln_ppl_ratio": float(diff.mean()),
        "ln_ppl_ratio_stderr": float(diff.std(ddof=1) / math.sqrt(n)),
        "ppl_ratio": float(math.exp(diff.mean())),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if routing is not None:
        report["routing"] = routing.summary()
    return report, kld_a
