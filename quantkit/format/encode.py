"""Source dtype -> GGUF tensor bytes: exact widenings, llama.cpp's rounding, quantisation.

Sources arrive as stored (F32, F16, or BF16 viewed as uint16).  Same dtype in
and out is passed through untouched (bit-exact, zero-copy); widening BF16/F16
to F32 is exact; F32 -> BF16 rounds to nearest even like ``ggml_fp32_to_bf16``;
quantised types go through llama.cpp's own kernels (``quantkit.format.ggml``).

Not for: choosing the type (``quantkit.policy.plan``).
"""

from __future__ import annotations

import numpy as np

from quantkit.format import ggml, gguf_spec

Q = gguf_spec.GGMLQuantizationType
SAME = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16}


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return ggml.convert(u16, "bf16", "f32")


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bits (uint16), nearest-even, NaN kept quiet."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 64).astype(np.uint16)
    return rounded


#: stored dtype -> (unsigned view, signed view, first non-finite bit pattern of a positive value):
#: the exponent all ones.  A value is NaN or infinite iff its magnitude bits are at least that pattern.
_FLOAT_BITS = {
    "F32": (np.uint32, np.int32, 0x7F800000),
    "F16": (np.uint16, np.int16, 0x7C00),
    "BF16": (np.uint16, np.int16, 0x7F80),
}


def nonfinite(a: np.ndarray, dtype: str) -> int:
    """How many values of ``a`` (stored as ``dtype``; BF16 viewed as uint16) are NaN or infinite.

    Two max reductions over the bits and no copy when there are none (the common case):
    as signed integers the positive non-finite patterns are the largest, as unsigned the
    negative ones are.  Only a tensor that has some is counted exactly.
    """
    if dtype not in _FLOAT_BITS or a.size == 0:
        return 0
    unsigned, signed, first = _FLOAT_BITS[dtype]
    u = np.asarray(a).view(unsigned)
    sign = unsigned(1 << (8 * u.itemsize - 1))
    if u.max() < sign + first and u.view(signed).max() < first:
        return 0
    return int(np.count_nonzero((u & unsigned(int(sign) - 1)) >= first))


def to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return bf16_to_f32(a)
    if dtype == "F16":
        return ggml.convert(a, "f16", "f32")
    return np.asarray(a, dtype=np.float32)


def encode(
    a: np.ndarray, dtype: str, qtype: gguf_spec.GGMLQuantizationType, imatrix: np.ndarray | None = None, scratch: ggml.Scratch | None = None,
    wait: bool = True,
):
    """Bytes of ``a`` (stored as ``dtype``) encoded as ``qtype``; may return a view of ``a``.

    With ``scratch``, a quantised result lives in one of its two reused buffers
    (``Scratch.next_out``).  ``wait=False``: a quantised type comes back as a
    ``ggml.Pending`` still running on the pool (the rest are done at once).
    """
    if SAME.get(dtype) == qtype:
        return np.ascontiguousarray(a)
    if qtype == Q.F32:
        return to_f32(a, dtype)
    if qtype == Q.F16:
        return ggml.convert_via_f32(a, "bf16", "f16") if dtype == "BF16" else ggml.convert(to_f32(a, dtype), "f32", "f16")
    if qtype == Q.BF16:
        return f32_to_bf16(to_f32(a, dtype))
    x = np.ascontiguousarray(a)  # BF16/F16 rows are widened block by block inside the quantising threads
    x = x.view(np.uint16) if dtype == "BF16" else x.view(np.float16) if dtype == "F16" else to_f32(x, dtype)
    job = ggml.start_quantize(x.reshape(-1, a.shape[-1]), qtype, imatrix, scratch, wait=wait)
    return job.result() if wait else job
