"""Collecting an importance matrix: the model runs in llama.cpp over calibration text, as ``llama-imatrix`` does.

Collection (:func:`collect_imatrix`) runs the model in llama.cpp through
llama-cpp-python with an eval callback, as llama-imatrix does: the text is
tokenised once (BOS first), cut into chunks of ``n_ctx`` tokens whose first
token is replaced by BOS, each chunk decoded from an empty cache with every
output requested; for every ``MUL_MAT`` whose weight is ``blk.*`` (at least
16 tokens, F32 activations) the callback adds each token's squared input to
the tensor's sums, for every ``MUL_MAT_ID`` (experts) it adds each token's
input only to the experts the router chose for it (``src[2]`` holds the
chosen ids), counting tokens per expert; sums run token after token in
float32, in llama-imatrix's order (on the fixture the file is bit-identical to
llama-imatrix's).  Not reproduced: several chunks per decode (llama-imatrix
packs ``n_batch / n_ctx`` chunks into one batch; run it with ``-b`` equal to
``-c`` for the same batches), its perplexity printout, periodic saves,
``--process-output`` (``output.weight``) and merging of earlier files
(``--in-file``).

``all_experts=True`` sends every calibration token through every expert for
the statistics while the model's outputs stay gated by the router, so rare
experts get data: the input of ``ffn_gate_exps`` and ``ffn_up_exps`` is the
same normed hidden state for every expert, so each expert's gate/up sums are
the sums over all tokens; the input of ``ffn_down_exps`` differs per expert,
so it is computed in numpy, ``silu(W_gate_e x) * (W_up_e x)`` in float32 from
the model's own expert weights (read and dequantised from the GGUF) for every
token and expert, a batch of chunks at a time (each flush dequantises every
expert once: the price is about ``n_expert / n_expert_used`` times the FFN
work of a normal run).  Every expert's count is then the number of tokens.  The
numpy hidden activations differ from llama.cpp's at the rounding level of its
matmuls (which round activations to the weight's dot-product type); only
llama-architecture files (SiLU-gated experts, what quantkit writes) are
supported.

Not for: the matrix data and its files (``quantkit.policy.imatrix``) or quantisation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from quantkit.format import gguf_spec
from quantkit.errors import QuantkitError
from quantkit.policy.imatrix import _EXPERT_NAME, Entry, Imatrix

log = logging.getLogger(__name__)

FLUSH_BYTES = 1 << 30  # all_experts: hidden states buffered before the experts are dequantised and run on them
MIN_TOKENS_PER_MATMUL = 16  # llama-imatrix ignores MUL_MAT calls with fewer tokens


def _weight_name(name: bytes) -> str:
    """llama-imatrix's filter_tensor_name: ``CUDA0#blk.0.attn_k.weight#0`` -> ``blk.0.attn_k.weight``."""
    s = name.decode("utf-8", "replace")
    if "#" in s:
        s = s.split("#")[1]
    return s


def _accumulate(acc: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``acc[j] += x[i, j] * x[i, j]`` token after token in float32, as llama-imatrix's loop adds them."""
    if x.shape[0] == 0:
        return acc
    sq = np.square(x, dtype=np.float32)
    sq[0] += acc
    return np.cumsum(sq, axis=0, dtype=np.float32)[-1]


class _ExpertWeights:
    """Expert matrices of a GGUF, dequantised to float32 on demand (for ``all_experts``)."""

    def __init__(self, path: Path) -> None:
        from quantkit.format.gguf_read import read_gguf

        self.file = read_gguf(path)
        self.infos = {t.name: t for t in self.file.tensors}
        self.mm = {f.path: np.memmap(f.path, dtype=np.uint8, mode="r") for f in self.file.files}  # a split set: one per part
        arch = self.file.metadata.get("general.architecture")
        from quantkit.converters import for_gguf_arch

        if not isinstance(arch, str) or not any(c.routing is not None and c.routing.silu_gated_experts for c in for_gguf_arch(arch)):
            raise QuantkitError(f"{path}: all_experts recomputes SiLU-gated experts of the architectures quantkit writes, this one is {repr(arch)[:60]}; fix: collect without --all-experts")

    def matrix(self, name: str, expert: int) -> np.ndarray:
        """Expert ``expert`` of a stacked tensor as float32 (rows, cols)."""
        from quantkit.format.encode import to_f32

        t = self.infos[name]
        n_cols, n_rows = t.ne[0], t.ne[1]
        per = t.nbytes // t.ne[2]
        path, at = self.file.locate(t)
        raw = self.mm[path][at + expert * per : at + (expert + 1) * per]
        Q = gguf_spec.GGMLQuantizationType
        if t.qtype == Q.F32:
            return np.array(raw.view(np.float32)).reshape(n_rows, n_cols)
        if t.qtype in (Q.F16, Q.BF16):
            u = np.array(raw.view(np.uint16 if t.qtype == Q.BF16 else np.float16))
            return to_f32(u, t.qtype.name).reshape(n_rows, n_cols)
        return gguf.quants.dequantize(np.array(raw), t.qtype).astype(np.float32).reshape(n_rows, n_cols)


@dataclass
class _Collector:
    """llama-imatrix's ``collect_imatrix`` eval callback, in Python."""

    all_experts: bool = False
    experts: _ExpertWeights | None = None
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n_mat, n_cols) float32
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n_mat,) int64
    pending: dict[int, list[np.ndarray]] = field(default_factory=dict)  # layer -> inputs of ffn_gate_exps (all_experts)
    pending_bytes: int = 0
    checked: bool = False

    def __call__(self, t: int, ask: bool) -> bool:
        """The eval callback; an exception stops the decode and is raised when it returns (``EvalSession``'s guard)."""
        return self._on_tensor(t, ask)

    def _on_tensor(self, t: int, ask: bool) -> bool:
        from quantkit.engine.session import GGMLTensor, _ggml_fns, check_tensor_layout

        so = _ggml_fns()
        op = so.ggml_op_desc(t)
        if op not in (b"MUL_MAT", b"MUL_MAT_ID"):
            return False
        if not self.checked:
            check_tensor_layout(t)
            self.checked = True
        node = GGMLTensor.from_address(t)
        src0, src1 = GGMLTensor.from_address(node.src[0]), GGMLTensor.from_address(node.src[1])
        wname = _weight_name(src0.name)
        if ask:
            if op == b"MUL_MAT_ID":
                return not (self.all_experts and wname.endswith("ffn_down_exps.weight"))
            return src1.ne[1] >= MIN_TOKENS_PER_MATMUL and src1.type == 0 and wname.startswith("blk.")
        if op == b"MUL_MAT_ID":
            self._mul_mat_id(wname, node, src0)
        else:
            self._mul_mat(wname, node, src0)
        return True

    def _entry(self, name: str, n_mat: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.sums:
            self.sums[name] = np.zeros((n_mat, n_cols), dtype=np.float32)
            self.counts[name] = np.zeros(n_mat, dtype=np.int64)
        sums, counts = self.sums[name], self.counts[name]
        if sums.shape != (n_mat, n_cols):
            raise QuantkitError(f"{name}: inconsistent activation size ({n_mat} x {n_cols}, earlier {sums.shape[0]} x {sums.shape[1]})")
        return sums, counts

    def _mul_mat(self, name: str, node: Any, src0: Any) -> None:
        from quantkit.engine.session import tensor_array

        x = tensor_array(node.src[1])  # (ne3, ne2, ne1 tokens, ne0 cols)
        n2, n3 = max(1, src0.ne[2]), max(1, src0.ne[3])
        sums, counts = self._entry(name, n2 * n3, x.shape[-1])
        for i3 in range(x.shape[0]):
            for i2 in range(x.shape[1]):
                mat = (i3 % n3) * n2 + (i2 % n2)
                sums[mat] = _accumulate(sums[mat], x[i3, i2])
        self._check_finite(name, sums)
        counts += x.shape[0] * x.shape[1] * x.shape[2] // (n2 * n3)

    def _mul_mat_id(self, name: str, node: Any, src0: Any) -> None:
        from quantkit.engine.session import GGMLTensor, tensor_array

        x = tensor_array(node.src[1])  # (1, n_tokens, ne11, n_cols): ne11 = 1 when every chosen expert gets the same input
        ids = tensor_array(node.src[2])  # (1, 1, n_tokens, n_used) int32
        if x.dtype != np.float32 or x.shape[0] != 1 or ids.shape[2] != x.shape[1]:
            raise QuantkitError(f"{name}: unexpected MUL_MAT_ID operands {x.shape} {x.dtype} / ids {ids.shape}")
        n_as = GGMLTensor.from_address(node.src[0]).ne[2]
        x, ids = x[0], ids[0, 0]
        n_tokens, ne11, n_cols = x.shape
        sums, counts = self._entry(name, n_as, n_cols)
        if self.all_experts and _EXPERT_NAME.match(name):
            xs = x[:, 0, :]
            total = _accumulate(np.zeros(n_cols, dtype=np.float32), xs)
            sums += total
            counts += n_tokens
            m = _EXPERT_NAME.match(name)
            if m.group(2) == "gate":
                self._queue(int(m.group(1)), np.array(xs))
            return
        # llama-imatrix's loop: for idx in chosen slots, for row in tokens: acc[ids[row, idx]] += x[row, idx % ne11]^2
        order_ex = ids.T.reshape(-1)  # idx-major, as the C loop visits them
        order_row = np.tile(np.arange(n_tokens), ids.shape[1])
        order_col = np.repeat(np.arange(ids.shape[1]) % ne11, n_tokens)
        if order_ex.size and (order_ex.min() < 0 or order_ex.max() >= n_as):
            raise QuantkitError(f"{name}: expert id out of range 0..{n_as - 1}")
        for e in np.unique(order_ex):
            sel = order_ex == e
            sums[e] = _accumulate(sums[e], x[order_row[sel], order_col[sel]])
            counts[e] += int(sel.sum())
        self._check_finite(name, sums)

    @staticmethod
    def _check_finite(name: str, sums: np.ndarray) -> None:
        if not np.isfinite(sums).all():
            raise QuantkitError(f"{name}: non-finite activations (llama-imatrix stops here too); fix: check the model with quantkit eval ppl")

    # all_experts: every token through every expert's gate/up, in numpy, to get ffn_down's inputs

    def _queue(self, layer: int, x: np.ndarray) -> None:
        self.pending.setdefault(layer, []).append(x)
        self.pending_bytes += x.nbytes
        if self.pending_bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        assert self.experts is not None
        for layer, xs in sorted(self.pending.items()):
            x = np.concatenate(xs)
            gate, up, down = (f"blk.{layer}.ffn_{k}_exps.weight" for k in ("gate", "up", "down"))
            n_expert = self.experts.infos[gate].ne[2]
            n_ff = self.experts.infos[down].ne[0]
            sums, counts = self._entry(down, n_expert, n_ff)
            for e in range(n_expert):
                g = x @ self.experts.matrix(gate, e).T
                u = x @ self.experts.matrix(up, e).T
                h = (g / (1.0 + np.exp(-g))) * u  # silu(gate) * up
                sums[e] = _accumulate(sums[e], h)
            counts += x.shape[0]
            self._check_finite(down, sums)
        self.pending.clear()
        self.pending_bytes = 0

    def result(self, chunk_size: int, datasets: tuple[str, ...], source: str) -> Imatrix:
        entries = {n: Entry(self.sums[n].copy(), self.counts[n].astype(np.float32)) for n in sorted(self.sums)}
        top = max((int(c.max()) for c in self.counts.values() if c.size), default=0)
        return Imatrix(entries, datasets, top // max(1, chunk_size), chunk_size, source)


@dataclass(frozen=True)
class Progress:
    """Reported after every chunk."""

    chunk: int  # chunks done
    n_chunks: int
    tokens: int  # tokens evaluated so far
    seconds: float


def check_args(n_ctx: Any, n_chunks: Any, threads: Any, text: Any, dataset: str = "") -> None:
    """Collection arguments on their own, before anything is converted or loaded: ``--ctx`` >= 16 (llama-imatrix
    ignores smaller batches), ``--chunks`` >= 1, ``--threads`` 1..512, a non-empty text."""
    from quantkit.engine.limits import check_chunks, check_ctx_value, check_text, check_threads

    if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and n_ctx < MIN_TOKENS_PER_MATMUL:
        raise QuantkitError(f"--ctx {n_ctx}: llama-imatrix ignores batches under {MIN_TOKENS_PER_MATMUL} tokens; fix: use --ctx 512 or at least {MIN_TOKENS_PER_MATMUL}")
    check_ctx_value(n_ctx, MIN_TOKENS_PER_MATMUL, even=False)
    check_chunks(n_chunks)
    check_threads(threads)
    check_text(text, dataset or "text")


def collect_imatrix(
    gguf_path: str | Path,
    text: str,
    n_ctx: int = 512,
    n_chunks: int | None = None,
    all_experts: bool = False,
    threads: int | None = None,
    on_chunk: Callable[[Progress], None] | None = None,
    dataset: str = "",
    gpu_layers: int | None = None,
) -> Imatrix:
    """Collect an importance matrix for ``gguf_path`` on ``text``, as llama-imatrix does (see the module docstring).

    ``dataset`` is recorded in ``imatrix.datasets`` (llama-imatrix records the
    ``-f`` path).  Needs at least ``2 * n_ctx`` tokens; ``n_chunks`` limits the
    chunks evaluated (default: all whole chunks of the text).
    """
    from quantkit.engine.limits import check_ctx, model_limits
    from quantkit.engine.session import EvalSession, check_logits

    gguf_path = Path(gguf_path)
    check_args(n_ctx, n_chunks, threads, text, dataset)
    check_ctx(n_ctx, model_limits(gguf_path), minimum=MIN_TOKENS_PER_MATMUL, even=False)  # every position's logits
    experts = _ExpertWeights(gguf_path) if all_experts else None
    collector = _Collector(all_experts=all_experts, experts=experts)
    session = EvalSession(gguf_path, n_ctx, threads=threads, gpu_layers=gpu_layers, on_tensor=collector)
    try:
        tokens = session.tokenize(text)
        if len(tokens) < 2 * n_ctx:
            raise QuantkitError(
                f"{dataset or 'text'}: {len(tokens)} tokens, llama-imatrix needs at least {2 * n_ctx} (2 x --ctx {n_ctx}); fix: give more text or a smaller --ctx"
            )
        total = len(tokens) // n_ctx if n_chunks is None else min(n_chunks, len(tokens) // n_ctx)
        bos = session.bos
        t0 = time.perf_counter()
        for i in range(total):
            chunk = tokens[i * n_ctx : (i + 1) * n_ctx]
            if bos is not None:
                chunk[0] = bos
            logits = session.eval_chunks([chunk], copy=False)[0]  # an exception of the callback is raised here
            check_logits(logits, i, gguf_path)
            if on_chunk is not None:
                on_chunk(Progress(i + 1, total, (i + 1) * n_ctx, time.perf_counter() - t0))
        if experts is not None:
            collector.flush()
        if not collector.sums:
            raise QuantkitError(f"{gguf_path}: llama.cpp ran no matrix multiplication with a blk.* weight; fix: pass a transformer model GGUF")
    finally:
        session.close()
    return collector.result(n_ctx, (dataset,) if dataset else (), str(gguf_path))


def collect_from_source(
    src: str | Path,
    text: str,
    workdir: str | Path | None = None,
    on_convert: Callable[[], None] | None = None,
    **kwargs: Any,
) -> Imatrix:
    """:func:`collect_imatrix` on a GGUF file, or on a Hugging Face directory converted to a temporary BF16 GGUF first.

    The temporary file lives in ``workdir`` (default: the system temp dir) and is removed afterwards.
    """
    import tempfile

    from quantkit.engine.limits import check_ctx, model_limits

    src = Path(src)
    if not src.is_dir():
        return collect_imatrix(src, text, **kwargs)
    n_ctx = kwargs.get("n_ctx", 512)
    check_args(n_ctx, kwargs.get("n_chunks"), kwargs.get("threads"), text, kwargs.get("dataset", ""))
    check_ctx(n_ctx, model_limits(src), minimum=MIN_TOKENS_PER_MATMUL, even=False)  # before the conversion, not after it
    from quantkit.pipeline.convert import convert

    with tempfile.TemporaryDirectory(prefix="quantkit-imatrix-", dir=workdir) as tmp:
        if on_convert is not None:
            on_convert()
        gguf_path = Path(tmp) / "model-bf16.gguf"
        convert(src, gguf_path, "bf16")
        im = collect_imatrix(gguf_path, text, **kwargs)
    import dataclasses

    return dataclasses.replace(im, source=str(src))  # not the temporary file, which is gone


