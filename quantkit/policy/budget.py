"""Bit budgets: per-tensor types that fill ``--target-bpw`` / ``--target-size`` with the least expected damage.

Sensitivity is measured, not guessed.  For every quantisable matrix and every
candidate type, sampled rows are quantised with llama.cpp's own kernel (with
the importance matrix when one is given, as the real conversion will) and
dequantised again; the damage of that choice is the importance-weighted
relative output error of the matrix::

    rel_e(q) = sum_r sum_j w_j (W_rj - Q(W)_rj)^2  /  sum_r sum_j w_j W_rj^2

where ``w_j`` is the mean squared input activation of column ``j`` (the
imatrix; ones without one), i.e. the noise-to-signal ratio of ``W x`` for the
calibration inputs.  A stacked expert tensor averages its experts' ratios
weighted by how often the router picks each expert (imatrix token counts;
uniform without them), so a rarely used expert costs little.  Every matmul's
output noise enters the residual stream once per token, so the damage of a
plan is the sum over tensors, with one extra factor for ``output.weight``
(:data:`ROLE_WEIGHT`: its noise lands on the logits directly).

The ratios are estimated from a sample (:func:`sample_errors`): 256K values per
tensor in contiguous row blocks spread over its experts by router share, every
candidate quantising the same rows, the sample grown until each ratio's
relative standard error is under :data:`REL_SE` (or the tensor is read whole).
It reads a few MiB per tensor and drops those pages again as the converter does,
so the measurement costs a small fraction of a conversion and its resident set
does not grow with the model (bench/RESULTS_budget.md).

Choosing types is a multiple-choice knapsack, solved exactly by dynamic
programming over the budget in small byte units (:func:`solve`).  The result
never exceeds the budget and lands within :data:`TOLERANCE` of it, or the plan
is refused with the reachable range (from the shapes alone, before anything is
sampled: ``quantkit.policy.plan.check_reach``).

Not for: applying user rules or presets (``quantkit.policy.plan``), writing bytes (``quantkit.pipeline.convert``).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from gguf import quants

from quantkit.format import ggml, gguf_spec
from quantkit.format.encode import to_f32
from quantkit.errors import QuantkitError
from quantkit.format.gguf_write import type_nbytes
from quantkit.hf.checkpoint import DTYPES, TensorRef
from quantkit.hf.mapping import Half, OutTensor, PermuteHeads, Role, Transform

log = logging.getLogger(__name__)
Q = gguf_spec.GGMLQuantizationType

#: Candidate types for rows of 256 (k-quants) and for other row lengths (32-blocks), cheapest first.
CANDIDATES_256: tuple[gguf_spec.GGMLQuantizationType, ...] = (Q.Q2_K, Q.Q3_K, Q.IQ4_XS, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0)
CANDIDATES_32: tuple[gguf_spec.GGMLQuantizationType, ...] = (Q.Q4_0, Q.IQ4_NL, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)
#: Priors for the cost of relative error where it was not measured (``--calib-text`` measures it,
#: quantkit.pipeline.sensitivity).  From a probe of the bundled fixture (KLD of quantising one tensor alone to
#: Q2_K, divided by its relative error): the output projection costs ~30x a median matrix, the token
#: embeddings ~10x, ffn_down ~2x, the first block ~2x -- the places llama.cpp's presets also favour.
ROLE_WEIGHT: dict[Role, float] = {Role.OUTPUT: 30.0, Role.EMBEDDINGS: 10.0}
FIRST_BLOCK_WEIGHT = 2.0
FFN_DOWN_WEIGHT = 2.0
TOLERANCE = 0.01  # land in [budget * (1 - TOLERANCE), budget]
MAX_STATES = 200_000  # byte units of the knapsack: rounding wastes at most n_tensors / MAX_STATES of the budget
#: CPU time of quantising one weight to each candidate type, relative to Q4_K (llama.cpp's quantize_row_* without an
#: importance matrix; measured on 512x4096 float32 rows, AVX-512 and AVX2 agree within ~15%: the IQ4 types search 15
#: scales per block, Q3_K / Q6_K / the 32-blocks one pass).  A plan for the time cap, not a benchmark.
QUANT_COST: dict[gguf_spec.GGMLQuantizationType, float] = {
    Q.Q2_K: 0.87, Q.Q3_K: 0.18, Q.IQ4_XS: 2.8, Q.Q4_K: 1.0, Q.Q5_K: 0.83, Q.Q6_K: 0.44, Q.Q8_0: 0.05,
    Q.Q4_0: 0.02, Q.IQ4_NL: 2.7, Q.Q4_1: 0.02, Q.Q5_0: 0.03, Q.Q5_1: 0.03,
}
#: The chosen types' quantising time at most this many times quantising every candidate tensor to Q4_K.  llama.cpp's
#: Q4_K_M preset costs ~0.85 of that, quantising is most of a conversion's CPU time and sampling the errors adds ~5%:
#: 1.15 keeps a budget within ~1.4x a preset conversion (1.25 measured 1.42-1.57x, uncapped 2.1-2.5x; bench_budget.py)
#: instead of picking the slow IQ4 types wherever they save a few bytes.
TIME_CAP = 1.15
MAX_ROWS = 256  # rows per matrix of expert_rows (a view of the sample for tests and tools; budgets use sample_errors)

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """``12GiB``, ``7.5GB``, ``800MiB``, ``123456`` -> bytes (a bare number is bytes)."""
    m = _SIZE.match(text)
    unit = (m.group(2) or "").lower() if m else None
    if m is None or unit not in _UNITS:
        raise QuantkitError(f"--target-size {text!r}: expected a size such as 12GiB, 7.5GB or 800MiB")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise QuantkitError(f"--target-size {text!r}: the size must be positive")
    return n


class OutOfReach(QuantkitError):
    """The budget is outside [lo, hi]: every plan's tensor bytes lie in that range."""

    def __init__(self, lo: int, hi: int) -> None:
        super().__init__(f"the budget is outside the reachable {lo:,}..{hi:,} bytes of tensor data")
        self.lo, self.hi = lo, hi


@dataclass(frozen=True)
class Option:
    qtype: gguf_spec.GGMLQuantizationType
    nbytes: int
    damage: float
    cost: float = 0.0  # quantising time, in weights x QUANT_COST (0: not counted)


@dataclass(frozen=True)
class Choice:
    option: Option
    reason: str


def candidates(t: OutTensor) -> tuple[gguf_spec.GGMLQuantizationType, ...]:
    """Candidate types for a matrix: k-quants when rows are multiples of 256, else 32-block types.

    None for what always stays F32: routers, norms, 1-D and generated tensors.
    """
    from quantkit.policy.presets import kept_f32

    if kept_f32(t) is not None:
        return ()
    cols = t.shape[-1]
    if cols % 256 == 0:
        return CANDIDATES_256
    if cols % 32 == 0:
        return CANDIDATES_32
    return ()


def expert_rows(t: OutTensor, max_rows: int = MAX_ROWS) -> Iterator[np.ndarray]:
    """Float32 sample rows of each expert of ``t`` (one matrix for a 2-D tensor), evenly spaced.

    Row permutations (q/k) do not change per-row quantisation error, so they are
    not applied; fused gate/up halves are.
    """
    for u in _units(t):
        idx = np.unique(np.linspace(0, u.rows - 1, num=min(u.rows, max_rows)).astype(np.int64))
        yield _f32(u.get()[u.offset + idx]).reshape(len(idx), -1)


def relative_error(x: np.ndarray, qtype: gguf_spec.GGMLQuantizationType, w: np.ndarray | None) -> float:
    """Importance-weighted relative squared error of quantising rows ``x`` as ``qtype``."""
    err, sig = _row_errors(x, (qtype,), w)
    s = float(sig.sum())
    return float(err[qtype].sum()) / s if s > 0 else 0.0


#: per tensor name -> (per-expert importance weights (E, cols) or None, per-expert share (E,) summing to 1 or None)
Importance = Callable[[str], tuple[np.ndarray | None, np.ndarray | None]]


# --------------------------------------------------------------------------- sampled errors
#
# rel(q) of a tensor is estimated from a sample of its rows, read in contiguous blocks (a few pages each,
# released again at once, so sampling a model of any size keeps a few MiB resident).  Blocks are laid out
# systematically along the tensor's experts, each expert given a stretch proportional to its router share
# (its token count in the imatrix; equal shares without one) and the blocks spread over its rows, so the
# estimate is   rel(q) = sum_e s_e * (sum_{b in e} err_b(q) / sum_{b in e} sig_b)   with s_e the fraction of
# blocks that fell in expert e (the expert's share, up to rounding).  Every candidate type quantises the
# same float32 rows, widened once.  The relative standard error of each rel(q) is estimated from the spread
# of the per-block ratios (sd / sqrt(blocks) / mean); while it is above REL_SE the sample grows GROW times
# (at most MAX_GROW times), and a tensor no bigger than the sample is read whole (exact).

SAMPLE_ELEMENTS = 1 << 18  # values of a first sample per tensor (all 7 candidates: ~0.1 s of llama.cpp kernels on 2 cores)
SAMPLE_BLOCKS = 32  # blocks of a first sample: rows per block follow from the row length (1..BLOCK_ROWS)
BLOCK_ROWS = 16
REL_SE = 0.03  # relative standard error every sampled rel(q) is brought under (or the tensor read whole)
GROW = 4
MAX_GROW = 2


@dataclass(frozen=True)
class Sampled:
    """The sampled relative errors of one tensor, and how good they are."""

    rel: dict[gguf_spec.GGMLQuantizationType, float]
    rse: float  # the largest relative standard error over the candidates (0: every row was read)
    rows: int  # rows quantised per candidate
    values: int  # values quantised per candidate


@dataclass
class _Unit:
    """One matrix of a tensor (an expert, or a 2-D tensor's source): its output rows, read on demand."""

    expert: int
    rows: int
    get: Callable[[], Any]  # the matrix holding the output rows (a lazy view of the mapped source where possible)
    offset: int = 0  # output row r is row offset + r of get()
    ref: Any = None  # a plain stored source: rows are read with pread, never mapped
    first_row: int = 0  # row of ``ref`` (its rows counted across a stacked source) where get()'s rows start

    def block(self, first: int, rows: int) -> np.ndarray:
        """Output rows ``first .. first + rows`` in float32: only those bytes are read."""
        if self.ref is not None:
            return _f32(_pread_rows(self.ref, self.first_row + self.offset + first, rows))
        return _f32(self.get()[self.offset + first : self.offset + first + rows])


def _plain(ref: Any) -> bool:
    """Whether ``ref``'s values are its stored bytes, rows back to back (F32 / F16 / BF16): then rows can be read
    with pread (a mapped page brings its whole folio into the resident set, up to MiBs per touched row)."""
    if type(ref).array is not TensorRef.array and getattr(ref, "qtype", None) not in (Q.F32, Q.F16, Q.BF16):
        return False
    return ref.dtype in ("F32", "F16", "BF16") and ref.nbytes == int(np.prod(ref.shape)) * DTYPES[ref.dtype][1] and hasattr(ref.shard, "fileno")


def _pread_rows(ref: Any, row: int, rows: int) -> np.ndarray:
    dtype, size = DTYPES[ref.dtype]
    cols = ref.shape[-1]
    raw = os.pread(ref.shard.fileno(), rows * cols * size, ref.shard.data_start + ref.start + row * cols * size)
    return np.frombuffer(raw, dtype=dtype).reshape(rows, cols)


def _row_offset(tr: Transform, src_rows: int) -> int | None:
    """Where ``tr``'s output rows start in its source matrix when it only picks a stretch of rows (a half) or reorders
    rows within heads (q/k: per-row errors are the same in any row order); None for any other transform."""
    parts = getattr(tr, "parts", None)  # a chain of transforms
    if isinstance(parts, tuple):
        if all(type(p) in (Transform, PermuteHeads) for p in parts):
            return 0
        return None
    if type(tr) in (Transform, PermuteHeads):
        return 0
    if type(tr) is Half:
        return 0 if tr.first else src_rows // 2
    return None


def _units(t: OutTensor, hparams: Any = None) -> list[_Unit]:
    """The matrices of ``t`` with their expert index, in order; nothing is read yet."""
    tr = t.transform
    cols = t.shape[-1]
    n_exp = t.shape[0] if len(t.shape) == 3 else 1
    out_rows = t.shape[-2]
    srcs = t.sources
    src_rows = srcs[0].shape[-2] if srcs and len(srcs[0].shape) >= 2 else 1
    offset = _row_offset(tr, src_rows)
    if offset is None and hparams is not None:  # rows computed by the transform: applied to one source at a time
        if len(srcs) == 1:
            cache: dict[int, np.ndarray] = {}

            def whole() -> np.ndarray:
                if not cache:
                    cache[0] = np.asarray(tr.apply(srcs[0].array(), hparams)).reshape(n_exp, out_rows, cols)
                return cache[0]

            return [_Unit(e, out_rows, lambda e=e: whole()[e]) for e in range(n_exp)]
        if n_exp > 1 and len(srcs) == n_exp:
            return [_Unit(e, out_rows, lambda s=s: tr.apply(s.array(), hparams)) for e, s in enumerate(srcs)]
        return [_Unit(0, tr.out_rows(s.shape[-2]), lambda s=s: tr.apply(s.array(), hparams)) for s in srcs]
    if n_exp == 1 or len(srcs) == n_exp:  # one matrix per source
        units = []
        for e, s in enumerate(srcs):
            rows = tr.out_rows(s.shape[-2]) if len(s.shape) >= 2 else 1
            at = _row_offset(tr, s.shape[-2] if len(s.shape) >= 2 else 1)
            if at is None:  # an unknown transform and no hparams to apply it: the rows it selects
                units.append(_Unit(e if n_exp > 1 else 0, rows, lambda s=s: tr.select(s.array())))
            else:
                units.append(_Unit(e if n_exp > 1 else 0, rows, s.array, at, s if len(s.shape) == 2 and _plain(s) else None))
        return units
    src = srcs[0]
    if len(src.shape) == 3:  # one fused [E, rows, cols] source
        if offset is None:
            return [_Unit(e, out_rows, lambda e=e: tr.select(src.array()[e])) for e in range(n_exp)]
        plain = src if _plain(src) else None
        return [_Unit(e, out_rows, lambda e=e: src.array()[e], offset, plain, e * src.shape[-2]) for e in range(n_exp)]
    flat = lambda: np.asarray(src.array()).reshape(n_exp, -1, cols)  # noqa: E731  (no hparams to apply the transform: its values, row by row)
    return [_Unit(e, out_rows, lambda e=e: flat()[e]) for e in range(n_exp)]


def _f32(a: Any) -> np.ndarray:
    """Rows as TensorRef.array hands them out (BF16 bits, F16 or F32; or a transform's float32) -> float32."""
    a = np.ascontiguousarray(np.asarray(a))
    dtype = "BF16" if a.dtype == np.uint16 else "F16" if a.dtype == np.float16 else "F32"
    return to_f32(a, dtype)


def _layout(units: Sequence[_Unit], share: np.ndarray, n_blocks: int, block: int) -> list[tuple[int, int, int]]:
    """(unit, first row, rows) of each sample block: n_blocks positions at equal steps along the experts' shares,
    each unit's stretch split between its rows; a unit with no share gets none."""
    weight = np.array([share[u.expert] * u.rows for u in units], dtype=np.float64)
    by_expert = np.zeros(len(share))
    np.add.at(by_expert, [u.expert for u in units], [u.rows for u in units])
    weight /= np.maximum(by_expert[[u.expert for u in units]], 1)
    cum = np.concatenate([[0.0], np.cumsum(weight)])
    cum /= cum[-1]
    out = []
    for i in range(n_blocks):
        pos = (i + 0.5) / n_blocks
        k = min(int(np.searchsorted(cum, pos, side="right")) - 1, len(units) - 1)
        u = units[k]
        frac = (pos - cum[k]) / max(cum[k + 1] - cum[k], 1e-300)
        rows = min(block, u.rows)
        first = min(max(0, int(frac * u.rows) - rows // 2), u.rows - rows)
        out.append((k, first, rows))
    return out


@functools.lru_cache(maxsize=None)
def _dequantizer(qtype: gguf_spec.GGMLQuantizationType) -> Any:
    """llama.cpp's own ``dequantize_row_<type>`` (libggml-base exports them): ~10x gguf-py's numpy version, and it
    leaves the GIL to the pool; None for a type it does not export under that name."""
    import ctypes

    fn = getattr(ggml.lib(), f"dequantize_row_{qtype.name.lower().replace('_k', '_K')}", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
    return fn


def dequantize(raw: np.ndarray, qtype: gguf_spec.GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Bytes of a quantised matrix (rows of ``shape[-1]`` values) -> float32 values, by llama.cpp's kernel where it exports one."""
    fn = _dequantizer(qtype)
    if fn is None:
        return quants.dequantize(raw.reshape(-1, ggml.row_size(qtype, shape[-1])), qtype).reshape(shape)
    raw = np.ascontiguousarray(raw)
    out = np.empty(shape, dtype=np.float32)
    fn(raw.ctypes.data, out.ctypes.data, out.size)
    return out


def _row_errors(
    x: np.ndarray, types: Sequence[gguf_spec.GGMLQuantizationType], w: np.ndarray | None,
) -> tuple[dict[gguf_spec.GGMLQuantizationType, np.ndarray], np.ndarray]:
    """Per row of ``x``: the weighted squared error of each type, and the weighted squared signal (float64)."""
    qw = None if w is None else np.ascontiguousarray(w, dtype=np.float32)
    xw = x if qw is None else x * qw
    sig = np.einsum("ij,ij->i", xw, x, dtype=np.float64)
    pending = [(q, ggml.start_quantize(x, q, qw)) for q in types]  # the pool quantises the next types while this one is compared
    err = {}
    for q, p in pending:
        d = dequantize(p.result(), q, x.shape)
        d -= x
        err[q] = np.einsum("ij,ij->i", d if qw is None else d * qw, d, dtype=np.float64)
    return err, sig


def sample_errors(
    t: OutTensor, importance: Importance | None = None, hparams: Any = None, elements: int = SAMPLE_ELEMENTS,
    types: Sequence[gguf_spec.GGMLQuantizationType] | None = None,
) -> Sampled:
    """``rel(q)`` of ``t`` for its candidate types (or ``types``), from a sample of its rows (see above)."""
    types = tuple(candidates(t) if types is None else types)
    if not types:
        return Sampled({}, 0.0, 0, 0)
    w, share = importance(t.name) if importance is not None else (None, None)
    units = _units(t, hparams)
    n_exp = max(u.expert for u in units) + 1
    if share is None or len(share) != n_exp or not np.sum(share) > 0:
        share = np.full(n_exp, 1.0 / n_exp)
    share = np.asarray(share, dtype=np.float64) / np.sum(share)
    cols = t.shape[-1]
    total = sum(u.rows for u in units if share[u.expert] > 0)
    block = max(1, min(BLOCK_ROWS, elements // (SAMPLE_BLOCKS * cols)))
    n_blocks = max(SAMPLE_BLOCKS, elements // (block * cols))
    try:
        for step in range(MAX_GROW + 1):
            whole = n_blocks * block >= total
            if whole:  # every row, each expert at its share
                lay = [(k, r, min(BLOCK_ROWS, u.rows - r)) for k, u in enumerate(units) if share[u.expert] > 0 for r in range(0, u.rows, BLOCK_ROWS)]
            else:
                lay = _layout(units, share, n_blocks, block)
            s = _measure_layout(units, lay, types, w, share, whole, cols)
            if whole or s.rse <= REL_SE or step == MAX_GROW:
                return s
            n_blocks *= GROW
    finally:
        for ref in t.sources:
            ref.release()
    raise AssertionError("unreachable")


def _measure_layout(
    units: Sequence[_Unit], lay: Sequence[tuple[int, int, int]], types: Sequence[gguf_spec.GGMLQuantizationType],
    w: np.ndarray | None, share: np.ndarray, whole: bool, cols: int,
) -> Sampled:
    """Read the blocks of ``lay``, quantise them as every type, and combine them into :class:`Sampled`."""
    blocks: list[np.ndarray] = []
    expert: list[int] = []
    for k, first, rows in lay:
        blocks.append(units[k].block(first, rows))
        expert.append(units[k].expert)
    sizes = np.array([b.shape[0] for b in blocks])
    expert_arr = np.array(expert)
    err_b = {q: np.zeros(len(blocks)) for q in types}
    sig_b = np.zeros(len(blocks))
    groups = [np.arange(len(blocks))] if w is None else [np.flatnonzero(expert_arr == e) for e in np.unique(expert_arr)]
    for g in groups:  # one weight vector per group (per expert with an imatrix)
        x = np.concatenate([blocks[i] for i in g]) if len(g) > 1 else blocks[g[0]]
        err, sig = _row_errors(x, types, None if w is None else w[expert_arr[g[0]]])
        at = np.concatenate([[0], np.cumsum(sizes[g])[:-1]])
        sig_b[g] = np.add.reduceat(sig, at)
        for q in types:
            err_b[q][g] = np.add.reduceat(err[q], at)
    del blocks
    experts = np.unique(expert_arr)
    if whole:
        weight = share[experts] / share[experts].sum()
    else:
        weight = np.array([np.sum(expert_arr == e) for e in experts], dtype=np.float64) / len(expert_arr)
    rel: dict[gguf_spec.GGMLQuantizationType, float] = {}
    rse = 0.0
    for q in types:
        per = np.array([err_b[q][expert_arr == e].sum() / max(sig_b[expert_arr == e].sum(), 1e-300) for e in experts])
        rel[q] = float(weight @ per)
        if not whole and len(lay) > 1 and rel[q] > 0:
            ratio = err_b[q] / np.maximum(sig_b, 1e-300)
            rse = max(rse, float(ratio.std(ddof=1) / np.sqrt(len(ratio)) / max(ratio.mean(), 1e-300)))
    return Sampled(rel, rse, int(sizes.sum()), int(sizes.sum()) * cols)


def rel_errors(
    t: OutTensor, importance: Importance | None = None, max_rows: int = MAX_ROWS, hparams: Any = None,
) -> dict[gguf_spec.GGMLQuantizationType, float]:
    """``rel(q)`` of every candidate type of ``t``, expert ratios averaged by router share (sampled: :func:`sample_errors`)."""
    return sample_errors(t, importance, hparams).rel


def rel_of(errors: Sampled | Mapping[gguf_spec.GGMLQuantizationType, float]) -> dict[gguf_spec.GGMLQuantizationType, float]:
    """The relative errors of a :class:`Sampled` or of a plain {type: rel} mapping."""
    return dict(errors.rel if isinstance(errors, Sampled) else errors)


def sample_cost(t: OutTensor) -> int:
    """Values a first sample of ``t`` quantises per candidate type (what progress is counted in)."""
    if not candidates(t):
        return 0
    cols = t.shape[-1]
    block = max(1, min(BLOCK_ROWS, SAMPLE_ELEMENTS // (SAMPLE_BLOCKS * cols)))
    n_blocks = max(SAMPLE_BLOCKS, SAMPLE_ELEMENTS // (block * cols))
    return min(t.n_elements, n_blocks * block * cols)


def measure_errors(
    tensors: Sequence[OutTensor], importance: Importance | None = None, hparams: Any = None,
    on_progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Sampled]:
    """:func:`sample_errors` of every tensor that has candidate types; ``on_progress(done, total, name)`` in sampled values.

    Ctrl-C stops it with a warning saying how far it got (nothing is kept).
    """
    import time

    todo = [t for t in tensors if candidates(t)]
    total = sum(sample_cost(t) for t in todo)
    done, out, t0 = 0, {}, time.perf_counter()
    try:
        for t in todo:
            if on_progress is not None:
                on_progress(done, total, t.name)
            out[t.name] = sample_errors(t, importance, hparams)
            done += sample_cost(t)
        if on_progress is not None:
            on_progress(done, total, "")
    except KeyboardInterrupt:
        log.warning("bit budget: error sampling interrupted after %d of %d tensors (%.1f s); nothing was kept", len(out), len(todo), time.perf_counter() - t0)
        raise
    if out:
        worst = max(out.items(), key=lambda kv: kv[1].rse)
        log.info("bit budget: %d tensors sampled in %.1f s; largest relative standard error %.3f (%s)", len(out), time.perf_counter() - t0, worst[1].rse, worst[0])
    return out


def prior_weight(t: OutTensor, n_layer: int) -> float:
    """How much a unit of relative error in ``t`` costs, when it was not measured (:data:`PRIORS`)."""
    w = ROLE_WEIGHT.get(t.role, 1.0)
    if gguf_spec.block_of(t.name) == 0:
        w *= FIRST_BLOCK_WEIGHT
    if "ffn_down" in t.name.split(".")[-2]:
        w *= FFN_DOWN_WEIGHT
    return w


def options(t: OutTensor, rel: Mapping[gguf_spec.GGMLQuantizationType, float], weight: float) -> list[Option]:
    return [Option(q, type_nbytes(q, t.shape), weight * r, t.n_elements * QUANT_COST.get(q, 1.0)) for q, r in rel.items()]


def reference_cost(options: Mapping[str, Sequence[Option]]) -> float:
    """Quantising time of every tensor at Q4_K (the unit of :data:`TIME_CAP`), in weights x QUANT_COST."""
    total = 0.0
    for opts in options.values():
        known = [o for o in opts if o.cost > 0]
        if known:  # the tensor's weights, from any option
            o = known[0]
            total += o.cost / QUANT_COST.get(o.qtype, 1.0) * QUANT_COST[Q.Q4_K]
    return total


def solve(options: Mapping[str, Sequence[Option]], budget: int, fixed: int = 0, time_cap: float | None = TIME_CAP) -> dict[str, Option]:
    """Choose one option per tensor: total bytes (plus ``fixed``) at most ``budget``, least total damage, and
    quantising time (:attr:`Option.cost`) at most ``time_cap`` x :func:`reference_cost` (None: no cap).

    The time cap is met by a Lagrangian price on time: the least ``lam`` for which the plan minimising
    ``damage + lam x cost`` within the bytes fits the cap (doubling, then bisection).  With no price the
    plan is the least-damage one; a cap no plan of these bytes meets gives the fastest plan found.
    """
    names = list(options)
    lo = fixed + sum(min(o.nbytes for o in options[n]) for n in names)
    hi = fixed + sum(max(o.nbytes for o in options[n]) for n in names)
    if lo > budget or hi < budget * (1 - TOLERANCE):
        raise OutOfReach(lo, hi)
    best = _solve_priced(options, budget, fixed, 0.0)
    cap = None if time_cap is None else time_cap * reference_cost(options)
    if not cap or _time(best) <= cap:
        return best
    damage = sum(o.damage for o in best.values())
    lam_lo, lam = 0.0, max(damage, 1e-30) / _time(best) * 1e-3
    fastest = best
    for _ in range(40):  # a price at which the plan fits
        plan = _solve_priced(options, budget, fixed, lam)
        if _time(plan) < _time(fastest):
            fastest = plan
        if _time(plan) <= cap:
            break
        lam_lo, lam = lam, lam * 4
    else:
        log.warning("no plan of %d bytes quantises within %.2fx of Q4_K's time; the fastest found: %.2fx", budget, time_cap, _time(fastest) / cap * time_cap)
        return fastest
    for _ in range(12):  # the least such price: the least damage within the cap
        mid = (lam_lo + lam) / 2
        trial = _solve_priced(options, budget, fixed, mid)
        if _time(trial) <= cap:
            lam, plan = mid, trial
        else:
            lam_lo = mid
    return plan


def _time(chosen: Mapping[str, Option]) -> float:
    return sum(o.cost for o in chosen.values())


def _solve_priced(options: Mapping[str, Sequence[Option]], budget: int, fixed: int, lam: float) -> dict[str, Option]:
    """The plan of least ``damage + lam x cost`` within ``budget`` bytes (plus ``fixed``).

    Exact dynamic programme over bytes counted in units of ``(budget - fixed) / STATES``
    (sizes rounded up, so the result never exceeds the budget; rounding wastes at
    most one unit per tensor), then leftover bytes buy any upgrade that still fits.
    """
    names = list(options)
    lo = fixed + sum(min(o.nbytes for o in options[n]) for n in names)
    hi = fixed + sum(max(o.nbytes for o in options[n]) for n in names)

    def price(o: Option) -> float:
        return o.damage + lam * o.cost

    states = min(MAX_STATES, max(10_000, 1000 * len(names)))
    unit = (budget - fixed) / states
    dp = np.full(states + 1, np.inf)
    dp[0] = 0.0
    arg = np.zeros((len(names), states + 1), dtype=np.int8)
    weights = [[int(np.ceil(o.nbytes / unit)) for o in options[n]] for n in names]
    new, cand, better = np.empty(states + 1), np.empty(states + 1), np.empty(states + 1, dtype=bool)
    for i, n in enumerate(names):
        new.fill(np.inf)
        for j, (o, w) in enumerate(zip(options[n], weights[i])):
            if w > states:
                continue
            cand[:w] = np.inf
            np.add(dp[: states + 1 - w], price(o), out=cand[w:])
            np.less(cand, new, out=better)  # strictly: the first of equal options stays
            np.copyto(new, cand, where=better)
            np.copyto(arg[i], j, where=better)
        dp, new = new, dp
    b = int(np.argmin(dp))
    if not np.isfinite(dp[b]):
        raise OutOfReach(lo, hi)
    chosen: dict[str, Option] = {}
    for i in range(len(names) - 1, -1, -1):
        j = int(arg[i, b])
        chosen[names[i]] = options[names[i]][j]
        b -= weights[i][j]
    used = fixed + sum(o.nbytes for o in chosen.values())
    while True:  # leftover from rounding: best price saved per byte first
        best = None
        for n, opts in options.items():
            cur = chosen[n]
            for o in opts:
                extra = o.nbytes - cur.nbytes
                if 0 < extra <= budget - used and price(o) < price(cur):
                    gain = (price(cur) - price(o)) / extra
                    if best is None or gain > best[0]:
                        best = (gain, n, o)
        if best is None:
            break
        _, n, o = best
        used += o.nbytes - chosen[n].nbytes
        chosen[n] = o
    return {n: chosen[n] for n in names}


def explain(o: Option, opts: Sequence[Option], what: str) -> str:
    """Why an option was chosen: its damage next to the neighbouring candidates."""
    order = sorted(opts, key=lambda x: x.nbytes)
    i = order.index(o)
    near = [f"{x.qtype.name} {x.damage:.2e}" for x in order[max(0, i - 1) : i + 2] if x is not o]
    return f"{what}: damage {o.damage:.2e} (" + ", ".join(near) + ")"


# --------------------------------------------------------------------------- measured sensitivity (results)


@dataclass(frozen=True)
class Cost:
    """What a ``--calib-text`` measurement costs: stated before the probes start, completed after.

    ``probes x passes`` forward passes of the model at ``seconds_per_pass`` (timed on the base passes), plus
    quantising and restoring the probed weights (``quantise_seconds``, from a timing of one sample).
    """

    mode: str
    tensors: int  # tensors measured
    probes: int  # probes run (one per tensor, or one per group)
    passes: int  # forward passes (calibration chunks) per probe
    seconds_per_pass: float
    quantise_seconds: float
    setup_seconds: float = 0.0  # writing the unquantised copy, loading it, the base passes
    seconds: float | None = None  # the probes, as they took (None: not run yet)
    done: int = 0  # probes finished
    pass_seconds: float = 0.0  # of ``seconds``: the forward passes
    quantise_taken: float = 0.0  # of ``seconds``: quantising, writing and restoring the probes
    grouped_probes: int | None = None  # probes of --calib-mode grouped on the same model (a full measurement says what it would save)
    auto: bool = False  # the mode was chosen by --calib-mode auto

    @property
    def estimated_seconds(self) -> float:
        return self.probes * self.passes * self.seconds_per_pass + self.quantise_seconds

    @property
    def grouped_estimated_seconds(self) -> float | None:
        if self.grouped_probes is None:
            return None
        return self.grouped_probes * self.passes * self.seconds_per_pass + self.quantise_seconds

    def describe(self) -> str:
        what = f"{self.tensors} tensors" + (f" in {self.probes} groups" if self.probes != self.tensors else "")
        line = (f"sensitivity ({'auto: ' if self.auto else ''}{self.mode}): {what} x {self.passes} passes x {self.seconds_per_pass:.3f} s/pass"
                f" + {self.quantise_seconds:.1f} s quantising = ~{self.estimated_seconds:.1f} s")
        if self.seconds is not None:
            return line + f" (took {self.seconds:.1f} s)"
        grouped = self.grouped_estimated_seconds
        if self.mode == "full" and grouped is not None and self.grouped_probes < self.probes:  # type: ignore[operator]
            line += f" (--calib-mode grouped: {self.grouped_probes} probes, ~{grouped:.1f} s)"
        return line

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "auto": self.auto, "tensors": self.tensors, "probes": self.probes, "passes_per_probe": self.passes,
            "seconds_per_pass": round(self.seconds_per_pass, 4), "quantise_seconds": round(self.quantise_seconds, 3),
            "estimated_seconds": round(self.estimated_seconds, 2), "setup_seconds": round(self.setup_seconds, 2),
            "seconds": None if self.seconds is None else round(self.seconds, 2), "probes_done": self.done,
            "pass_seconds": round(self.pass_seconds, 2), "quantise_taken": round(self.quantise_taken, 2),
            "grouped_probes": self.grouped_probes,
            "grouped_estimated_seconds": None if self.grouped_probes is None else round(self.grouped_estimated_seconds or 0.0, 2),
        }


class Measured(Mapping[str, tuple[gguf_spec.GGMLQuantizationType, float]]):
    """Measured sensitivity: tensor name -> (probe type, mean KLD of its probe).  With a grouped measurement,
    ``groups`` maps each tensor to its probe's label and the KLD is the group's (``plan.Target.weights``
    shares it); ``cost`` says what the measurement cost."""

    def __init__(self, kld: Mapping[str, tuple[gguf_spec.GGMLQuantizationType, float]], groups: Mapping[str, str] | None = None,
                 cost: Cost | None = None) -> None:
        self._kld = dict(kld)
        self.groups = dict(groups or {})
        self.cost = cost

    def __getitem__(self, name: str) -> tuple[gguf_spec.GGMLQuantizationType, float]:
        return self._kld[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._kld)

    def __len__(self) -> int:
        return len(self._kld)

    def __repr__(self) -> str:
        return f"Measured({len(self._kld)} tensors, {len(set(self.groups.values()))} groups)"
