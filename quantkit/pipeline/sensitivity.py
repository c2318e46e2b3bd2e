"""Measured sensitivity: how far the model's output moves when one tensor alone is quantised.

For ``--target-bpw/--target-size`` with ``--calib-text``.  The model is
written once as an unquantised GGUF in a temporary directory (its own dtype:
BF16 sources stay exact) and loaded once by llama.cpp on the CPU, which maps
the file.  Then, tensor by tensor, the stored bytes are overwritten in place
with that tensor quantised to the probe type and dequantised again (the exact
values the quantised file would hold), the calibration chunks are evaluated,
the mean KL-divergence from the unmodified model's distribution is recorded,
and the original bytes are put back.  llama.cpp reads weights through its
shared mapping of the file, so no reload is needed; a probe whose first
change does not move the logits (a runtime that copied the weights) is an
error, not a silent zero.

``quantkit.policy.plan.Target.weight`` turns each measurement into the cost of a unit
of relative error (KLD / rel(probe type)), which scales that tensor's
measured errors for every candidate type (``quantkit.policy.budget``).

Not for: choosing types (``quantkit.policy.budget``), evaluating finished files (``quantkit.evals``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from gguf import quants

from quantkit.policy import budget
from quantkit.format import ggml, gguf_spec
from quantkit.format.encode import f32_to_bf16, to_f32
from quantkit.errors import QuantkitError
from quantkit.hf.mapping import OutTensor

log = logging.getLogger(__name__)
Q = gguf_spec.GGMLQuantizationType
PROBE_256 = Q.Q3_K  # probe type for rows of 256: the middle of the range budgets choose from
PROBE_32 = Q.Q4_0
_STORED = {Q.F32: "F32", Q.F16: "F16", Q.BF16: "BF16"}


def probe_type(t: OutTensor) -> gguf_spec.GGMLQuantizationType | None:
    c = budget.candidates(t)
    if not c:
        return None
    return PROBE_256 if c is budget.CANDIDATES_256 else PROBE_32


def simulate(raw: bytes, stored: gguf_spec.GGMLQuantizationType, shape: tuple[int, ...], qtype: gguf_spec.GGMLQuantizationType, weights: np.ndarray | None) -> bytes:
    """Stored bytes of a tensor -> the same tensor quantised to ``qtype`` and back, in the stored type."""
    dtype = _STORED[stored]
    npdt = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[dtype]
    a = np.frombuffer(raw, dtype=npdt).reshape(shape)
    mats = a.reshape(-1, shape[-2], shape[-1]) if len(shape) == 3 else a[None]
    out = []
    for e, m in enumerate(mats):
        x = to_f32(np.ascontiguousarray(m), dtype)
        w = None if weights is None else weights[e]
        y = quants.dequantize(ggml.quantize(x, qtype, w).reshape(x.shape[0], -1), qtype).reshape(x.shape)
        out.append(y)
    y = np.stack(out).reshape(shape).astype(np.float32)
    if stored == Q.F32:
        return y.tobytes()
    if stored == Q.F16:
        return ggml.convert(y, "f32", "f16").tobytes()
    return f32_to_bf16(y).tobytes()


#: the smallest --calib-ctx: each chunk's second half (n_ctx/2 positions) is compared, at least 4 of them
MIN_CALIB_CTX = 8


def check_calib_args(n_ctx: object, n_chunks: object, threads: object, text: object) -> None:
    """``--calib-ctx`` >= 8, ``--calib-chunks`` >= 1, threads 1..512 and a non-empty text, before anything is converted or loaded."""
    from quantkit.engine.limits import check_chunks, check_ctx_value, check_text, check_threads

    check_ctx_value(n_ctx, MIN_CALIB_CTX, even=False, flag="--calib-ctx")
    if n_chunks is None:
        raise QuantkitError("--calib-chunks None: expected a whole number >= 1; fix: use e.g. --calib-chunks 8")
    check_chunks(n_chunks, flag="--calib-chunks")
    check_threads(threads)
    check_text(text, "--calib-text")


def measure(
    model: Path,
    tensors: list[OutTensor],
    text: str,
    n_ctx: int = 256,
    n_chunks: int = 8,
    importance: budget.Importance | None = None,
    threads: int | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> dict[str, tuple[gguf_spec.GGMLQuantizationType, float]]:
    """Mean KLD per quantisable tensor of ``model`` (an unquantised GGUF that may be modified and restored)."""
    from quantkit.engine.limits import check_ctx, model_limits
    from quantkit.engine.session import check_logits, log_softmax
    from quantkit.engine.session import EvalSession
    from quantkit.format.gguf_read import read_gguf

    check_calib_args(n_ctx, n_chunks, threads, text)
    check_ctx(n_ctx, model_limits(model), outputs=0.5, minimum=MIN_CALIB_CTX, even=False, flag="--calib-ctx")  # logits of the second halves
    g = read_gguf(model)
    info = {t.name: t for t in g.tensors}
    session = EvalSession(model, n_ctx, threads=threads, gpu_layers=0)
    try:
        tokens = session.tokenize(text)
        bos = session.bos
        step = n_ctx - (1 if bos is not None else 0)
        chunks = [([bos] if bos is not None else []) + tokens[i : i + step] for i in range(0, len(tokens) - step + 1, step)][:n_chunks]
        if not chunks:
            raise QuantkitError(f"--calib-text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}; fix: give a longer text or a smaller --calib-ctx")
        half = n_ctx // 2

        def logp() -> list[np.ndarray]:
            out = []
            for i, c in enumerate(chunks):
                lp = log_softmax(session.eval_chunk(c, half)).astype(np.float64)
                check_logits(lp, i, model)  # a broken file (or probe) must not turn into a measured sensitivity
                out.append(lp)
            return out

        base = logp()
        out: dict[str, tuple[gguf_spec.GGMLQuantizationType, float]] = {}
        fd = os.open(model, os.O_RDWR)
        try:
            for t in tensors:
                q = probe_type(t)
                ti = info.get(t.name)
                if q is None or ti is None or ti.qtype not in _STORED:
                    continue
                if on_tensor is not None:
                    on_tensor(t.name)
                at = g.data_offset + ti.offset
                raw = os.pread(fd, ti.nbytes, at)
                weights = importance(t.name)[0] if importance is not None else None
                os.pwrite(fd, simulate(raw, ti.qtype, t.shape, q, weights), at)
                try:
                    now = logp()
                finally:
                    os.pwrite(fd, raw, at)
                kld = float(np.mean([(np.exp(b) * (b - n)).sum(axis=-1).mean() for b, n in zip(base, now)]))
                if not out and kld <= 0.0:
                    raise QuantkitError(f"{model}: changing {t.name} did not change llama.cpp's output (the runtime copied the weights); fix: run the probe on a CPU build")
                out[t.name] = (q, kld)
        finally:
            os.close(fd)
    finally:
        session.close()
    return out


def measure_checkpoint(
    src: Path,
    text: str,
    n_ctx: int = 256,
    n_chunks: int = 8,
    importance: budget.Importance | None = None,
    threads: int | None = None,
    on_tensor: Callable[[str], None] | None = None,
    work_dir: Path | None = None,
) -> Mapping[str, tuple[gguf_spec.GGMLQuantizationType, float]]:
    """:func:`measure` for an HF checkpoint: written as an unquantised GGUF in a temporary directory first."""
    from quantkit.pipeline.convert import convert, prepare
    from quantkit.engine.limits import check_ctx, model_limits

    check_calib_args(n_ctx, n_chunks, threads, text)
    check_ctx(n_ctx, model_limits(src), minimum=MIN_CALIB_CTX, even=False, flag="--calib-ctx")  # before the conversion
    ckpt, prep = prepare(src, "f32")
    dtypes = {ref.dtype for t in prep.tensors for ref in t.sources}
    ckpt.close()
    outtype = "bf16" if dtypes == {"BF16"} else "f16" if dtypes == {"F16"} else "f32"  # exact for the source
    with tempfile.TemporaryDirectory(prefix="quantkit-probe-", dir=work_dir) as tmp:
        path = Path(tmp) / "probe.gguf"
        convert(src, path, outtype)
        return measure(path, prep.tensors, text, n_ctx, n_chunks, importance, threads, on_tensor)
