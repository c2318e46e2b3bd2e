"""Collecting an importance matrix: the model runs in llama.cpp over calibration text, as ``llama-imatrix`` does.

Collection (:func:`collect_imatrix`) runs the model in llama.cpp through
llama-cpp-python with an eval callback, as llama-imatrix does: the text is
tokenised once (BOS first), cut into chunks of ``n_ctx`` tokens whose first
token is replaced by BOS, each chunk decoded from an empty cache with every
output requested (so that the last block runs for every token); for every ``MUL_MAT`` whose weight is ``blk.*`` (at least
16 tokens, F32 activations) the callback adds each token's squared input to
the tensor's sums, for every ``MUL_MAT_ID`` (experts) it adds each token's
input only to the experts the router chose for it (``src[2]`` holds the
chosen ids), counting tokens per expert; sums run token after token in
float32 in the order ``llama-imatrix -c N -b N`` adds them (per micro-batch of
``min(N, 512)`` tokens; for experts chosen slot by chosen slot), so the file
is bit-identical to that run's on the same CPU.  Not reproduced: its
perplexity printout, periodic saves, ``--process-output`` (``output.weight``)
and merging of earlier files (``--in-file``).  An entry recorded for matrices the
graph reshapes a 2-D tensor into (deepseek4's ``attn_output_a``: ``o_groups``
matrices, their columns in one row, as llama-imatrix records them) fits no tensor
of the file, and llama-quantize refuses it: the collection says so
(:func:`llama_quantize_misfits`).

Speed (``bench/RESULTS_calibration.md``): the callback declines every graph
node but the matrix multiplications after one read of its ``op`` field, so
llama.cpp splits the graph only where llama-imatrix splits it, and less:
matrices that read the same input node from the same statistics
(``attn_k``/``attn_v`` after ``attn_q``, ``ffn_up_exps`` after
``ffn_gate_exps``) take the first one's result already when llama.cpp asks
for them, and are declined.  Activations are read in place (a numpy view of
the CPU backend's buffer); a tensor's sums are one square and one sequential
``np.add.reduce`` per micro-batch (experts: one stable sort of the routed
rows by expert, one gather, then one reduce per expert).  Chunks whose size is
a multiple of ggml's 64-token attention tile are decoded several at a time (as
many as fill llama-imatrix's 512-token micro-batch, in one KV cache so that
each micro-batch holds whole chunks one after another), which leaves every
activation as it is with one chunk per decode.  And only the first decode runs
the whole graph (its logits are checked for NaN and infinity): it shows the
graph's last matrix, and every later decode stops there -- the output norm and
projection of every token feed no statistic (llama-imatrix computes them for
its perplexity printout).  Every one of these leaves the matrix bit for bit
as it was.  llama-imatrix's own default (``-b 2048``) interleaves chunks
within a micro-batch and adds in another order: its sums differ from ``-b
N``'s by a few 1e-6 relative, its counts not at all.

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

import ctypes
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from quantkit.format import gguf_spec
from quantkit.errors import QuantkitError
from quantkit.policy.imatrix import _EXPERT_NAME, Entry, Imatrix

log = logging.getLogger(__name__)

FLUSH_BYTES = 1 << 30  # all_experts: hidden states buffered before the experts are dequantised and run on them
MIN_TOKENS_PER_MATMUL = 16  # llama-imatrix ignores MUL_MAT calls with fewer tokens
MICRO_BATCH = 512  # llama-imatrix's micro-batch (llama.cpp's default n_ubatch): the tokens of one graph evaluation
ATTENTION_TILE = 64  # ggml-cpu's flash-attention tile (GGML_FA_TILE_Q/KV): chunks batched together must fill whole tiles


def _weight_name(name: bytes) -> str:
    """llama-imatrix's filter_tensor_name: ``CUDA0#blk.0.attn_k.weight#0`` -> ``blk.0.attn_k.weight``."""
    s = name.decode("utf-8", "replace")
    if "#" in s:
        s = s.split("#")[1]
    return s


def _accumulate(acc: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``acc[j] += x[i, j] * x[i, j]`` token after token in float32, as llama-imatrix's loop adds them
    (``np.add.reduce`` along the rows of a C-ordered array adds row after row, never pairwise)."""
    if x.shape[0] == 0:
        return acc
    sq = np.square(x, dtype=np.float32)
    sq[0] += acc
    return np.add.reduce(sq, axis=0)


def chunks_per_decode(n_ctx: int) -> int:
    """Chunks of ``n_ctx`` tokens decoded together: as many as fill llama-imatrix's 512-token micro-batch, when each
    is a whole number of ggml's attention tiles (then every activation is what one chunk per decode gives), else 1."""
    if n_ctx >= MICRO_BATCH or n_ctx % ATTENTION_TILE:
        return 1
    return MICRO_BATCH // n_ctx


def _visit_order(n_tokens: int, n_used: int, segment: int) -> tuple[np.ndarray, np.ndarray]:
    """(token, slot) pairs of a ``MUL_MAT_ID`` in the order llama-imatrix adds them: per micro-batch of ``segment``
    tokens (one ``-b n_ctx`` decode), chosen slot after chosen slot, token after token."""
    tok, slot = [], []
    for first in range(0, n_tokens, segment):
        rows = np.arange(first, min(n_tokens, first + segment))
        tok.append(np.tile(rows, n_used))
        slot.append(np.repeat(np.arange(n_used), rows.size))
    if not tok:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    return np.concatenate(tok), np.concatenate(slot)


def _add_routed(sums: np.ndarray, x: np.ndarray, rows: np.ndarray, experts: np.ndarray, per: np.ndarray, out: np.ndarray | None = None) -> None:
    """``sums[experts[i]] += x[rows[i]] ** 2`` for i in order, in float32, in place: llama-imatrix's loop vectorised.

    ``per`` is ``np.bincount(experts)`` (rows per expert).  One stable sort by expert, one gather of the rows (into
    ``out``, scratch of at least ``rows.size`` rows), one square, then one sequential reduce per expert that got
    rows, its old sums added to its first row: the same additions in the same order as the loop, every bit.
    """
    if experts.size == 0:
        return
    perm = np.argsort(experts, kind="stable")
    g = np.take(x, rows[perm], axis=0, out=None if out is None else out[: rows.size], mode="clip")
    np.square(g, out=g)
    present = np.flatnonzero(per)
    ends = np.cumsum(per)[present]
    starts = ends - per[present]
    g[starts] += sums[present]
    for e, a, b in zip(present.tolist(), starts.tolist(), ends.tolist()):
        np.add.reduce(g[a:b], axis=0, out=sums[e])


@dataclass(frozen=True)
class _Memo:
    """The last computed update: what it read (input node, ids node, shape of the statistics), which tensor it
    updated, and that tensor's state before and after (ids of :attr:`_Collector.state`)."""

    key: tuple[int, int, tuple[int, ...]]
    name: str
    before: int
    after: int


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
        import gguf  # gguf-py's reference dequantisers: only for a quantised source

        return gguf.quants.dequantize(np.array(raw), t.qtype).astype(np.float32).reshape(n_rows, n_cols)


@dataclass
class _Collector:
    """llama-imatrix's ``collect_imatrix`` eval callback, in Python, vectorised per micro-batch."""

    all_experts: bool = False
    experts: _ExpertWeights | None = None
    segment: int = 0  # tokens of one ``llama-imatrix -b n_ctx`` micro-batch: expert sums are added in its order; 0: the whole micro-batch
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n_mat, n_cols) float32
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n_mat,) int64
    dense: set[str] = field(default_factory=set)  # names multiplied by MUL_MAT (not MUL_MAT_ID)
    pending: dict[int, list[np.ndarray]] = field(default_factory=dict)  # layer -> inputs of ffn_gate_exps (all_experts)
    pending_bytes: int = 0
    checked: bool = False
    memo: _Memo | None = None  # the last update, for a sibling matrix that reads the same input node (see :meth:`_update`)
    state: dict[str, int] = field(default_factory=dict)  # name -> id of its statistics: equal ids, equal bits; 0 (absent): all zero
    states: int = 0  # ids handed out
    reused: int = 0  # updates taken from the memo (for the benchmark's profile)
    learn: bool = False  # record the matrices of this decode's graph in order (see :meth:`new_batch`)
    order: list[str] = field(default_factory=list)  # the matrices handled in the graph being learnt, in order
    stop_after: str | None = None  # the graph's last matrix: once its statistics are in, the rest of the graph is skipped
    scratch: Any = None  # quantkit.format.ggml.Scratch: the gathered expert rows, reused from micro-batch to micro-batch

    def __post_init__(self) -> None:
        from quantkit.engine.session import OP_OFFSET, GGMLTensor, op_codes, tensor_view
        from quantkit.format.ggml import Scratch

        codes = op_codes()
        self._tensor, self._view = GGMLTensor.from_address, tensor_view  # bound once: the callback runs per graph node
        self._op_at = OP_OFFSET
        self._mul_mat_op, self._mul_mat_id_op = codes[b"MUL_MAT"], codes[b"MUL_MAT_ID"]
        self._orders: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.scratch = Scratch()

    def __call__(self, t: int, ask: bool) -> bool:
        """The eval callback; an exception stops the decode and is raised when it returns (``EvalSession``'s guard).

        Called for every node of every micro-batch's graph: a node that is no matrix multiplication costs one
        read of its ``op`` field (the answer false keeps llama.cpp computing the graph in one piece there)."""
        op = ctypes.c_int.from_address(t + self._op_at).value
        if op != self._mul_mat_op and op != self._mul_mat_id_op:
            return False
        return self._on_tensor(t, ask)

    def new_batch(self) -> None:
        """Before each decode: nothing from the last one's graph is reused (its nodes' addresses are reused).

        After a decode with :attr:`learn` set (one graph, every node computed), the last matrix it handled becomes
        :attr:`stop_after`: from then on the collect callback of that matrix answers false, which makes llama.cpp
        skip the rest of the graph (the output norm and projection for every token, the logits: nothing that
        feeds a statistic), as its scheduler does when a callback declines to go on.  Not when a matrix came twice
        in that graph (a weight used twice: the order says nothing then).
        """
        self.memo = None
        if self.learn and self.order:
            self.learn = False
            self.stop_after = self.order[-1] if len(set(self.order)) == len(self.order) else None

    def _on_tensor(self, t: int, ask: bool) -> bool:
        if not self.checked:
            from quantkit.engine.session import check_tensor_layout

            check_tensor_layout(t)
            self.checked = True
        node = self._tensor(t)
        op_id = node.op == self._mul_mat_id_op
        src0 = self._tensor(node.src[0])
        wname = _weight_name(src0.name)
        if ask:
            src1 = self._tensor(node.src[1])
            if op_id:
                want = not (self.all_experts and wname.endswith("ffn_down_exps.weight"))
                n_mat = src0.ne[2]
            else:
                want = src1.ne[1] >= MIN_TOKENS_PER_MATMUL and src1.type == 0 and wname.startswith("blk.")
                n_mat = max(1, src0.ne[2]) * max(1, src0.ne[3])
            if want and self.memo is not None and self.memo.key[:2] == (node.src[1], node.src[2] if op_id else 0):
                # a sibling of the last update (attn_k/v after attn_q, ffn_up_exps after ffn_gate_exps): take its result
                # now and decline the tensor, so llama.cpp does not split the graph there for a callback that adds nothing
                sums, _ = self._entry(wname, n_mat, src1.ne[0])
                if not (self.all_experts and op_id and _EXPERT_NAME.match(wname)) and self._reuse(wname, (node.src[1], node.src[2] if op_id else 0, sums.shape)):
                    if self.learn:
                        self.order.append(wname)
                    return False
            return want
        if op_id:
            self._mul_mat_id(wname, node, src0)
        else:
            self._mul_mat(wname, node, src0)
        if self.learn:
            self.order.append(wname)
        return wname != self.stop_after  # false: nothing after this matrix feeds a statistic, llama.cpp stops the graph here

    def _entry(self, name: str, n_mat: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.sums:
            self.sums[name] = np.zeros((n_mat, n_cols), dtype=np.float32)
            self.counts[name] = np.zeros(n_mat, dtype=np.int64)
        sums, counts = self.sums[name], self.counts[name]
        if sums.shape != (n_mat, n_cols):
            raise QuantkitError(f"{name}: inconsistent activation size ({n_mat} x {n_cols}, earlier {sums.shape[0]} x {sums.shape[1]})")
        return sums, counts

    def _update(self, name: str, key: tuple[int, int, tuple[int, ...]], add: Callable[[], None]) -> None:
        """Run ``add`` (which updates ``name``'s statistics in place from the input named by ``key``), or reuse the last update.

        Reused when the last update read the same input node of this graph (``key``: node addresses, shape of the
        statistics) and turned the very statistics ``name`` holds now (the same state id: the same bits, as
        :attr:`state` tracks them) into those its tensor still holds: then ``add`` would compute exactly those
        (``attn_k`` and ``attn_v`` after ``attn_q``, ``ffn_up_exps`` after ``ffn_gate_exps``).  A state id changes
        with every update, so a state left from another micro-batch never matches one updated since.
        """
        if self._reuse(name, key):
            return
        before = self.state.get(name, 0)
        add()
        self.memo = _Memo(key, name, before, self._touched(name))

    def _touched(self, name: str) -> int:
        """``name``'s statistics changed: a new state id for them."""
        self.states += 1
        self.state[name] = self.states
        return self.states

    def _reuse(self, name: str, key: tuple[int, int, tuple[int, ...]]) -> bool:
        m = self.memo
        if m is None or m.key != key or m.name == name or self.state.get(name, 0) != m.before or self.state.get(m.name) != m.after:
            return False
        self.sums[name][...] = self.sums[m.name]
        self.counts[name][...] = self.counts[m.name]
        self.state[name] = m.after
        self.reused += 1
        return True

    def _mul_mat(self, name: str, node: Any, src0: Any) -> None:
        self.dense.add(name)
        x = self._view(node.src[1])  # (ne3, ne2, ne1 tokens, ne0 cols), in place
        n2, n3 = max(1, src0.ne[2]), max(1, src0.ne[3])
        sums, counts = self._entry(name, n2 * n3, x.shape[-1])

        def add() -> None:
            if x.shape[:2] == (n3, n2):  # one slice per matrix (a 2-D weight: one slice)
                sq = np.square(x, out=self.scratch.get("sq", x.shape, np.float32)).reshape(n3 * n2, x.shape[2], x.shape[3])
                if sq.shape[1]:
                    sq[:, 0] += sums
                    np.add.reduce(sq, axis=1, out=sums)
            else:  # activations broadcast over the weight's matrices: llama-imatrix's loop, slice after slice
                for i3 in range(x.shape[0]):
                    for i2 in range(x.shape[1]):
                        mat = (i3 % n3) * n2 + (i2 % n2)
                        sums[mat] = _accumulate(sums[mat], x[i3, i2])
            counts[...] += x.shape[0] * x.shape[1] * x.shape[2] // (n2 * n3)

        self._update(name, (node.src[1], 0, sums.shape), add)
        self._check_finite(name, sums)

    def _mul_mat_id(self, name: str, node: Any, src0: Any) -> None:
        x = self._view(node.src[1])  # (1, n_tokens, ne11, n_cols): ne11 = 1 when every chosen expert gets the same input
        ids = self._view(node.src[2])  # (1, 1, n_tokens, n_used) int32
        if x.dtype != np.float32 or x.shape[0] != 1 or ids.shape[:2] != (1, 1) or ids.shape[2] != x.shape[1]:
            raise QuantkitError(f"{name}: unexpected MUL_MAT_ID operands {x.shape} {x.dtype} / ids {ids.shape}")
        n_as = src0.ne[2]
        x, ids = x[0], ids[0, 0]
        n_tokens, ne11, n_cols = x.shape
        sums, counts = self._entry(name, n_as, n_cols)
        m = _EXPERT_NAME.match(name) if self.all_experts else None
        if m is not None:
            xs = x[:, 0, :]
            sums += _accumulate(np.zeros(n_cols, dtype=np.float32), xs)
            counts += n_tokens
            self._touched(name)
            if m.group(2) == "gate":
                self._queue(int(m.group(1)), np.array(xs))
            self._check_finite(name, sums)
            return

        def add() -> None:
            n_used = ids.shape[1]
            order = self._orders.get((n_tokens, n_used))
            if order is None:
                order = self._orders[(n_tokens, n_used)] = _visit_order(n_tokens, n_used, self.segment or n_tokens)
            tok, slot = order
            chosen = ids[tok, slot]  # the expert of each addition, in llama-imatrix's order
            per = np.bincount(chosen, minlength=n_as) if chosen.size and chosen.min() >= 0 else None
            if per is None and chosen.size or per is not None and per.size > n_as:
                raise QuantkitError(f"{name}: expert id out of range 0..{n_as - 1}")
            if per is None:
                return
            flat = x.reshape(n_tokens * ne11, n_cols)  # a view for the CPU backend's contiguous activations
            rows = tok * ne11 + slot % ne11 if ne11 > 1 else tok
            _add_routed(sums, flat, rows, chosen, per, self.scratch.get("rows", (rows.size, n_cols), np.float32))
            counts[...] += per

        self._update(name, (node.src[1], node.src[2], sums.shape), add)
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
            self._touched(down)
            self._check_finite(down, sums)
        self.pending.clear()
        self.pending_bytes = 0

    def _entry_of(self, name: str) -> Entry:
        """One tensor's statistics as llama-imatrix keeps them: a dense weight of several matrices (MLA's 3-D attn_k_b /
        attn_v_b, one per head, multiplied by MUL_MAT) has one count for all of them and its sums in one row; experts
        (MUL_MAT_ID) a count and a row each."""
        sums, counts = self.sums[name], self.counts[name]
        if name in self.dense and counts.size > 1 and (counts == counts[0]).all():
            return Entry(sums.reshape(1, -1).copy(), counts[:1].astype(np.float32))
        return Entry(sums.copy(), counts.astype(np.float32))

    def result(self, chunk_size: int, datasets: tuple[str, ...], source: str) -> Imatrix:
        entries = {n: self._entry_of(n) for n in sorted(self.sums)}
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


def llama_quantize_misfits(im: Imatrix, gguf_path: str | Path) -> dict[str, tuple[int, int]]:
    """Entries llama-quantize refuses as they are: name -> (values held, values llama-quantize wants).

    llama-quantize wants an entry of ``ne0 x ne2`` values (columns x experts) of the tensor as the file stores
    it; an entry of another size makes it stop ("imatrix size A is different from tensor size B"; ``token_embd``
    only warns).  llama-imatrix (and :func:`collect_imatrix`, equal to it) records what the graph multiplies: a 2-D
    tensor the graph reshapes into several matrices -- deepseek4's ``attn_output_a``, ``o_groups`` matrices of
    ``n_head * head_dim / o_groups`` columns -- gets all their columns in one row, which no file tensor fits.
    """
    from quantkit.format.gguf_read import read_gguf

    infos = {t.name: t.ne for t in read_gguf(gguf_path).tensors}
    out = {}
    for name, e in im.entries.items():
        ne = infos.get(name)
        if ne is None or name == "token_embd.weight":
            continue
        want = ne[0] * (ne[2] if len(ne) > 2 else 1)
        if e.in_sum2.size != want:
            out[name] = (int(e.in_sum2.size), int(want))
    return out


def _warn_misfits(im: Imatrix, gguf_path: Path) -> None:
    """Say, when the matrix is made, which entries llama-quantize (and ``quantkit convert``, which does as it does) will refuse."""
    misfits = llama_quantize_misfits(im, gguf_path)
    if not misfits:
        return
    name, (have, want) = next(iter(misfits.items()))
    kinds = sorted({n.split(".", 2)[2] if gguf_spec.block_of(n) is not None else n for n in misfits})
    log.warning(
        "%s: %d entries (%s) hold the statistics of the matrices llama.cpp's graph reshapes the tensor into, as llama-imatrix records "
        "them (e.g. %s: %d values where llama-quantize wants %d, the tensor's columns as the file stores it); llama-quantize refuses such an entry (\"imatrix size %d is different from "
        "tensor size %d\"), and so does quantkit convert; fix: quantise without those entries (llama-quantize %s)",
        gguf_path, len(misfits), ", ".join(kinds), name, have, want, have, want,
        " ".join(f"--exclude-weights {k.removesuffix('.weight')}" for k in kinds),
    )


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
    chunks_per_batch: int | None = None,
) -> Imatrix:
    """Collect an importance matrix for ``gguf_path`` on ``text``, as llama-imatrix does (see the module docstring).

    ``dataset`` is recorded in ``imatrix.datasets`` (llama-imatrix records the
    ``-f`` path).  Needs at least ``2 * n_ctx`` tokens; ``n_chunks`` limits the
    chunks evaluated (default: all whole chunks of the text).  ``chunks_per_batch``
    (default :func:`chunks_per_decode`) chunks are decoded together; the matrix is
    the same whatever it is.  ``on_chunk`` hears of the start (chunk 0) and of every
    decode.  Ctrl-C (or SIGTERM) stops the collection within a graph node: the
    warning logged says how far it got, and the interrupt is raised again.
    """
    from quantkit.engine.limits import check_ctx, model_limits
    from quantkit.engine.session import EvalSession, check_logits

    gguf_path = Path(gguf_path)
    check_args(n_ctx, n_chunks, threads, text, dataset)
    check_ctx(n_ctx, model_limits(gguf_path), minimum=MIN_TOKENS_PER_MATMUL, even=False)  # every position's logits
    per = chunks_per_decode(n_ctx) if chunks_per_batch is None else chunks_per_batch
    if not isinstance(per, int) or isinstance(per, bool) or per < 1:
        raise ValueError(f"chunks_per_batch {per!r}: expected a whole number >= 1")
    experts = _ExpertWeights(gguf_path) if all_experts else None
    # one graph per decode (chunks of up to 512 tokens): the first decode runs whole (its logits are checked), and
    # teaches the collector the graph's last matrix, after which the later decodes stop (see _Collector.new_batch)
    one_graph = per * n_ctx <= MICRO_BATCH
    collector = _Collector(all_experts=all_experts, experts=experts, segment=min(n_ctx, MICRO_BATCH), learn=one_graph)
    session = EvalSession(gguf_path, n_ctx, threads=threads, gpu_layers=gpu_layers, on_tensor=collector,
                          n_seq=per, n_ubatch=min(per * n_ctx, MICRO_BATCH), kv_unified=per > 1)
    done, total, t0 = 0, 0, time.perf_counter()
    try:
        tokens = session.tokenize(text)
        if len(tokens) < 2 * n_ctx:
            raise QuantkitError(
                f"{dataset or 'text'}: {len(tokens)} tokens, llama-imatrix needs at least {2 * n_ctx} (2 x --ctx {n_ctx}); fix: give more text or a smaller --ctx"
            )
        total = len(tokens) // n_ctx if n_chunks is None else min(n_chunks, len(tokens) // n_ctx)
        bos = session.bos
        t0 = time.perf_counter()
        if on_chunk is not None:
            on_chunk(Progress(0, total, 0, 0.0))
        while done < total:
            group = [tokens[i * n_ctx : (i + 1) * n_ctx] for i in range(done, min(total, done + per))]
            if bos is not None:
                for chunk in group:
                    chunk[0] = bos
            collector.new_batch()
            whole = collector.stop_after is None  # the graph runs to its end: logits computed (and checked)
            for j, logits in enumerate(session.eval_chunks(group, copy=False)):  # an exception of the callback is raised here
                if whole:
                    check_logits(logits, done + j, gguf_path)
            done += len(group)
            if on_chunk is not None:
                on_chunk(Progress(done, total, done * n_ctx, time.perf_counter() - t0))
        if experts is not None:
            collector.flush()
        if not collector.sums:
            raise QuantkitError(f"{gguf_path}: llama.cpp ran no matrix multiplication with a blk.* weight; fix: pass a transformer model GGUF")
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM / SIGHUP (quantkit.errors.Terminated); the CLI's progress bar shows the same
        if total:  # info, not warning: the CLI's contract on an interrupt is one line (tests/test_hostile_llama.py)
            log.info("imatrix interrupted after %d of %d chunks (%d tokens, %.1f s); nothing was kept", done, total, done * n_ctx, time.perf_counter() - t0)
        else:
            log.info("imatrix interrupted before its first chunk (while tokenising the text); nothing was kept")
        raise
    finally:
        session.close()
    log.debug("imatrix: %d chunks in %.2f s, %d of the matrix updates reused from a sibling", done, time.perf_counter() - t0, collector.reused)
    im = collector.result(n_ctx, (dataset,) if dataset else (), str(gguf_path))
    _warn_misfits(im, gguf_path)
    return im


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


