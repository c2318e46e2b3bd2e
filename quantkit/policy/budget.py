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

Choosing types is a multiple-choice knapsack, solved exactly by dynamic
programming over the budget in small byte units (:func:`solve`).  The result
never exceeds the budget and lands within :data:`TOLERANCE` of it, or the plan
is refused with the reachable range.

Not for: applying user rules or presets (``quantkit.policy.plan``), writing bytes (``quantkit.pipeline.convert``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
from gguf import quants

from quantkit.format import ggml, gguf_spec
from quantkit.format.encode import to_f32
from quantkit.errors import QuantkitError
from quantkit.format.gguf_write import type_nbytes
from quantkit.hf.mapping import OutTensor, Role

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
MAX_ROWS = 256  # rows sampled per matrix (per expert): enough for a stable ratio, cheap on big models

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
    if len(t.shape) == 2:
        mats: Iterator[tuple[np.ndarray, str]] = ((s.array(), s.dtype) for s in t.sources)
    elif len(t.sources) == t.shape[0]:  # one source per expert
        mats = ((s.array(), s.dtype) for s in t.sources)
    else:  # one fused [E, rows, cols] source
        fused = t.sources[0].array()
        mats = ((fused[e], t.sources[0].dtype) for e in range(fused.shape[0]))
    for m, dtype in mats:
        m = t.transform.select(m)
        rows = m.shape[0]
        idx = np.unique(np.linspace(0, rows - 1, num=min(rows, max_rows)).astype(np.int64))
        yield to_f32(np.ascontiguousarray(m[idx]), dtype).reshape(len(idx), -1)


def relative_error(x: np.ndarray, qtype: gguf_spec.GGMLQuantizationType, w: np.ndarray | None) -> float:
    """Importance-weighted relative squared error of quantising rows ``x`` as ``qtype``."""
    qw = None if w is None else np.ascontiguousarray(w, dtype=np.float32)
    raw = ggml.quantize(x, qtype, qw)
    y = quants.dequantize(raw.reshape(x.shape[0], -1), qtype).reshape(x.shape)
    weight = np.ones(x.shape[-1], dtype=np.float64) if w is None else w.astype(np.float64)
    err = float(((y - x).astype(np.float64) ** 2).sum(axis=0) @ weight)
    sig = float((x.astype(np.float64) ** 2).sum(axis=0) @ weight)
    return err / sig if sig > 0 else 0.0


#: per tensor name -> (per-expert importance weights (E, cols) or None, per-expert share (E,) summing to 1 or None)
Importance = Callable[[str], tuple[np.ndarray | None, np.ndarray | None]]


def rel_errors(t: OutTensor, importance: Importance | None = None, max_rows: int = MAX_ROWS) -> dict[gguf_spec.GGMLQuantizationType, float]:
    """``rel(q)`` of every candidate type of ``t``, expert ratios averaged by router share."""
    types = candidates(t)
    if not types:
        return {}
    w, share = importance(t.name) if importance is not None else (None, None)
    n_exp = t.shape[0] if len(t.shape) == 3 else 1
    if share is None:
        share = np.full(n_exp, 1.0 / n_exp)
    rel = dict.fromkeys(types, 0.0)
    for e, x in enumerate(expert_rows(t, max_rows)):
        if share[e] <= 0:
            continue
        we = None if w is None else w[e]
        for q in types:
            rel[q] += float(share[e]) * relative_error(x, q, we)
    return rel


def prior_weight(t: OutTensor, n_layer: int) -> float:
    """How much a unit of relative error in ``t`` costs, when it was not measured (:data:`PRIORS`)."""
    w = ROLE_WEIGHT.get(t.role, 1.0)
    if gguf_spec.block_of(t.name) == 0:
        w *= FIRST_BLOCK_WEIGHT
    if "ffn_down" in t.name.split(".")[-2]:
        w *= FFN_DOWN_WEIGHT
    return w


def options(t: OutTensor, rel: Mapping[gguf_spec.GGMLQuantizationType, float], weight: float) -> list[Option]:
    return [Option(q, type_nbytes(q, t.shape), weight * r) for q, r in rel.items()]


def solve(options: Mapping[str, Sequence[Option]], budget: int, fixed: int = 0) -> dict[str, Option]:
    """Choose one option per tensor: total bytes (plus ``fixed``) at most ``budget``, least total damage.

    Exact dynamic programme over bytes counted in units of ``(budget - fixed) / STATES``
    (sizes rounded up, so the result never exceeds the budget; rounding wastes at
    most one unit per tensor), then leftover bytes buy any upgrade that still fits.
    """
    names = list(options)
    lo = fixed + sum(min(o.nbytes for o in options[n]) for n in names)
    hi = fixed + sum(max(o.nbytes for o in options[n]) for n in names)
    if lo > budget or hi < budget * (1 - TOLERANCE):
        raise OutOfReach(lo, hi)
    states = min(MAX_STATES, max(10_000, 1000 * len(names)))
    unit = (budget - fixed) / states
    dp = np.full(states + 1, np.inf)
    dp[0] = 0.0
    arg = np.zeros((len(names), states + 1), dtype=np.int8)
    weights = [[int(np.ceil(o.nbytes / unit)) for o in options[n]] for n in names]
    for i, n in enumerate(names):
        new = np.full(states + 1, np.inf)
        for j, (o, w) in enumerate(zip(options[n], weights[i])):
            if w > states:
                continue
            cand = np.full(states + 1, np.inf)
            cand[w:] = dp[: states + 1 - w] + o.damage
            better = cand < new
            new[better] = cand[better]
            arg[i, better] = j
        dp = new
    b = int(np.argmin(dp))
    if not np.isfinite(dp[b]):
        raise OutOfReach(lo, hi)
    chosen: dict[str, Option] = {}
    for i in range(len(names) - 1, -1, -1):
        j = int(arg[i, b])
        chosen[names[i]] = options[names[i]][j]
        b -= weights[i][j]
    used = fixed + sum(o.nbytes for o in chosen.values())
    while True:  # leftover from rounding: best damage saved per byte first
        best = None
        for n, opts in options.items():
            cur = chosen[n]
            for o in opts:
                extra = o.nbytes - cur.nbytes
                if 0 < extra <= budget - used and o.damage < cur.damage:
                    gain = (cur.damage - o.damage) / extra
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
