"""A bare llama.cpp evaluation context: one chunk in, all logits (and router logits) out.

Built from llama-cpp-python's low-level API rather than ``Llama`` so that the
context parameters are ours: the chunk is one batch, the KV cache is cleared
per chunk, and an eval callback (``cb_eval``) can capture the router logits
llama.cpp computes in each MoE layer (tensors ``ffn_moe_logits-<il>``).

Not for: generation (``quantkit.runtime``).
"""

from __future__ import annotations

import ctypes
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)
_ROUTER = re.compile(rb"ffn_moe_logits-(\d+)$")
GGML_TYPE_F32 = 0


def _ggml_fns() -> Any:
    from quantkit import ggml

    so = ggml.lib()
    if not hasattr(so, "_qk_eval_ready"):
        so.ggml_get_name.argtypes = [ctypes.c_void_p]
        so.ggml_get_name.restype = ctypes.c_char_p
        so.ggml_nelements.argtypes = [ctypes.c_void_p]
        so.ggml_nelements.restype = ctypes.c_int64
        so.ggml_nrows.argtypes = [ctypes.c_void_p]
        so.ggml_nrows.restype = ctypes.c_int64
        so.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
        so.ggml_is_contiguous.restype = ctypes.c_bool
        so.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        so.ggml_backend_tensor_get.restype = None
        so._qk_eval_ready = True
    return so


class EvalSession:
    """llama.cpp model + context sized for chunks of ``n_ctx`` tokens."""

    def __init__(
        self, path: str | Path, n_ctx: int, threads: int | None = None, capture_router: bool = False,
        gpu_layers: int | None = None, n_seq: int = 1,
    ) -> None:
        import llama_cpp
        from llama_cpp import _internals as internals

        from quantkit.gguf_read import read_gguf
        from quantkit.runtime import gpu_offload_supported, physical_cores

        self.path = Path(path)
        read_gguf(self.path)  # one-line errors for files that are not valid GGUF
        llama_cpp.llama_backend_init()
        from llama_cpp import _logger

        _logger.set_verbose(log.isEnabledFor(logging.DEBUG))  # llama.cpp's own chatter only with --debug
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = gpu_layers if gpu_layers is not None else (-1 if gpu_offload_supported() else 0)
        try:
            self.model = internals.LlamaModel(path_model=str(self.path), params=mparams, verbose=False)
        except ValueError as e:
            raise QuantkitError(f"{self.path}: llama.cpp could not load the model ({e}); fix: re-convert it") from None
        if capture_router and n_seq != 1:
            raise ValueError("router capture needs one sequence per decode")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx * n_seq  # like llama-perplexity: n_seq chunks side by side in one batch
        cparams.n_batch = n_ctx * n_seq
        cparams.n_ubatch = n_ctx if n_seq == 1 else min(n_ctx * n_seq, 512)
        cparams.n_seq_max = n_seq
        cparams.n_threads = cparams.n_threads_batch = threads or physical_cores()
        self.router: dict[int, np.ndarray] = {}
        self._cb = None
        if capture_router:
            self._ggml = _ggml_fns()
            self._cb = llama_cpp.ggml_backend_sched_eval_callback(self._on_tensor)
            cparams.cb_eval = self._cb
            cparams.cb_eval_user_data = None
        self.ctx = internals.LlamaContext(model=self.model, params=cparams, verbose=False)
        self.batch = internals.LlamaBatch(n_tokens=n_ctx * n_seq, embd=0, n_seq_max=n_seq, verbose=False)
        self.n_ctx = n_ctx
        self.n_seq = n_seq
        self.n_vocab = self.model.n_vocab()

    def _on_tensor(self, t: int, ask: bool, _user: Any) -> bool:
        name = self._ggml.ggml_get_name(t) or b""
        m = _ROUTER.match(name)
        if ask:
            return m is not None
        if m is not None:
            if ctypes.c_int32.from_address(t).value != GGML_TYPE_F32 or not self._ggml.ggml_is_contiguous(t):
                return True
            n, rows = self._ggml.ggml_nelements(t), self._ggml.ggml_nrows(t)
            out = np.empty((rows, n // rows), dtype=np.float32)
            self._ggml.ggml_backend_tensor_get(t, out.ctypes.data, 0, out.nbytes)
            self.router[int(m.group(1))] = out
        return True

    @property
    def experts_used(self) -> int:
        md = self.model.metadata()
        arch = md.get("general.architecture", "llama")
        return int(md.get(f"{arch}.expert_used_count", 0))

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    @property
    def bos(self) -> int | None:
        return self.model.token_bos() if self.model.add_bos_token() else None

    def eval_chunk(self, tokens: list[int]) -> np.ndarray:
        """Logits of every position of ``tokens`` from an empty cache: (len, n_vocab) float32."""
        import llama_cpp

        if len(tokens) > self.n_ctx:
            raise ValueError(f"chunk of {len(tokens)} tokens exceeds n_ctx {self.n_ctx}")
        llama_cpp.llama_memory_clear(self.ctx.memory, True)
        self.router = {}
        self.batch.set_batch(tokens, n_past=0, logits_all=True)
        self.ctx.decode(self.batch)
        ptr = llama_cpp.llama_get_logits(self.ctx.ctx)
        return np.ctypeslib.as_array(ptr, shape=(len(tokens), self.n_vocab)).copy()

    def eval_chunks(self, chunks: list[list[int]]) -> list[np.ndarray]:
        """Logits of up to ``n_seq`` chunks decoded together, each its own sequence from an empty cache."""
        import llama_cpp

        if not 1 <= len(chunks) <= self.n_seq or any(len(c) > self.n_ctx for c in chunks):
            raise ValueError(f"{len(chunks)} chunks for a session of {self.n_seq} x {self.n_ctx}")
        if len(chunks) == 1:
            return [self.eval_chunk(chunks[0])]
        llama_cpp.llama_memory_clear(self.ctx.memory, True)
        self.batch.reset()
        for seq, tokens in enumerate(chunks):
            self.batch.add_sequence(tokens, seq, logits_all=True)
        self.ctx.decode(self.batch)
        total = sum(len(c) for c in chunks)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx.ctx), shape=(total, self.n_vocab))
        out, at = [], 0
        for c in chunks:
            out.append(logits[at : at + len(c)].copy())
            at += len(c)
        return out

    def vocab_fingerprint(self) -> str:
        """Hash of every token's text: equal fingerprints mean the same vocabulary."""
        import hashlib

        h = hashlib.sha256()
        for i in range(self.n_vocab):
            h.update(self.model.token_get_text(i).encode("utf-8", "surrogatepass") + b"\0")
        return h.hexdigest()

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()
        self.model.close()
