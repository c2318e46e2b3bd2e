"""Quantised weights of Hugging Face checkpoints, decoded to float32 a few rows at a time (pure numpy).

Read here:

- ``quant_method: fp8`` (DeepSeek V3 / R1, Kimi K2, GLM, Qwen3-FP8, MiniMax; transformers' ``FineGrainedFP8Config``):
  e4m3 weights, each with ``<name>_scale_inv`` holding one scale per ``weight_block_size`` block
  (``[128, 128]``: shape ``[ceil(rows/128), ceil(cols/128)]``; the last block of a row or column may be
  partial and its scale covers what is left, as DeepSeek's ``weight_dequant`` and transformers do).
  ``weight_block_size: null`` means one scale per matrix; a config without the key is read as
  transformers reads it (128 x 128 blocks), or as one scale per matrix when that is the scales' shape.
  Scales are float32 (BF16 / F16 widened exactly), or powers of two in one byte with ``scale_fmt: ue8m0``.
  DeepSeek V4's release names a weight's scales ``X.scale`` (beside ``X.weight``) and, with ``expert_dtype: "fp4"``
  (in quantization_config or beside it, as transformers' DeepseekV4Config folds it in; V4 only), stores its routed
  experts FP4: ``X.weight`` I8 [rows, cols/2] (value ``2j`` in the low nibble of byte ``j``) with a UE8M0 ``X.scale``
  [rows, cols/32] -- MXFP4 blocks under other names, read (and carried) as such (:func:`_pair_fp4`).
- ``quant_method: compressed-tensors`` (llm-compressor, vLLM): ``float-quantized`` FP8 weights with
  ``weight_scale`` per tensor, channel, group or block, and ``pack-quantized`` integers (``weight_packed``
  int32 words, ``weight_shape``, ``weight_scale``, ``weight_zero_point`` when asymmetric) in groups or
  channels, as Kimi K2 Thinking ships its INT4 experts.
- ``quant_method: mxfp4`` (gpt-oss): ``<name>_blocks`` uint8 [..., rows, cols/32, 16] (two e2m1 values a
  byte: value ``2j`` of a 32-value block in the low nibble of byte ``j``, ``2j+1`` in the high one) and
  ``<name>_scales`` uint8 [..., rows, cols/32] (one e8m0 exponent per block), read as the weight ``<name>``
  of shape [..., rows, cols]: value ``= ldexp(e2m1[nibble], scale - 127)``, as transformers'
  ``convert_moe_packed_tensors`` and llama.cpp's MXFP4 compute it.

MXFP4 weights need not be decoded: :func:`mxfp4_to_ggml` repacks their blocks into GGML's ``block_mxfp4``
bytes as llama.cpp's converter does (:data:`CARRIED_TYPES`: what the plan keeps as stored unless told otherwise).

A value is its stored value times its block's scale in float32 (``(q - zero_point) * scale`` for integers),
what DeepSeek's reference code, transformers and llama.cpp's converter compute before any cast.  e4m3 has no
numpy dtype: a 256-entry table maps each byte to its exact float32 value (0x7f / 0xff are NaN).
Weights the config leaves unquantised (``modules_to_not_convert`` / ``ignored_layers`` / ``ignore``) are
plain BF16 tensors and stay so; one of them stored quantised is refused, as is every other scheme.

Not for: which tensors exist or where their bytes lie (``quantkit.hf.checkpoint`` builds
:class:`~quantkit.hf.checkpoint.QuantRef` from :func:`find_quantised`'s answer).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from quantkit.errors import CheckpointError

log = logging.getLogger(__name__)

FP8_METHOD = "fp8"
CT_METHOD = "compressed-tensors"
MXFP4_METHOD = "mxfp4"
MXFP4_BLOCK = 32  # values per e8m0 scale (16 bytes of nibbles)
#: quant_method values that are not a quantised *source*: quantkit's own 4-bit export, read by quantkit.policy.bnb
PASSTHROUGH_METHODS = ("bitsandbytes",)
#: fmt values naming e4m3 (DeepSeek writes "e4m3", MiniMax "float8_e4m3fn")
E4M3_NAMES = ("e4m3", "e4m3fn", "float8_e4m3fn")
CT_FORMATS = ("float-quantized", "pack-quantized")
#: tensors that quantise activations or the KV cache at run time: llama.cpp computes those in float, so they are dropped
RUNTIME_SCALES = (".input_scale", ".input_zero_point", ".activation_scale", "_activation_scale", ".output_scale", ".output_zero_point", ".k_scale", ".v_scale")
#: target types that hold a quantised source without a second loss (quantkit.format.gguf_spec type names)
NO_SECOND_LOSS = ("F32", "F16", "BF16", "Q8_0")
MAX_SHOWN = 80


def _shown(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= MAX_SHOWN else r[: MAX_SHOWN - 3] + "..."


def _e4m3_table() -> np.ndarray:
    """float32 value of every e4m3fn byte: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, S.1111.111 is NaN."""
    b = np.arange(256, dtype=np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 0x7
    mag = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * np.exp2(exp - 7.0))
    table = (sign * mag).astype(np.float32)  # every value has at most 4 significant bits: exact
    table[(b & 0x7F) == 0x7F] = np.nan
    return table


E4M3 = _e4m3_table()
E4M3.flags.writeable = False


def e4m3_to_f32(u8: np.ndarray) -> np.ndarray:
    """The float32 values of e4m3 bytes (a new array)."""
    return E4M3.take(np.asarray(u8, dtype=np.uint8))


#: float32 value of each e2m1 nibble (1 sign, 2 exponent, 1 mantissa bit; the MXFP4 element type)
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)
E2M1.flags.writeable = False


def e8m0_to_f32(u8: np.ndarray) -> np.ndarray:
    """UE8M0 scales (a power of two per byte, ``2 ** (b - 127)``; 0xff is NaN) as float32."""
    b = np.asarray(u8, dtype=np.uint8)
    with np.errstate(over="ignore"):  # 0xff: 2**128 overflows, and is NaN below
        out = np.ldexp(np.float32(1.0), b.astype(np.int32) - 127).astype(np.float32)
    out[b == 0xFF] = np.nan
    return out


def scales_to_f32(a: np.ndarray, dtype: str, scale_fmt: str = "float") -> np.ndarray:
    """Stored scales (``dtype`` as safetensors names it; BF16 viewed as uint16) as float32, exactly."""
    if dtype == "F32":
        return np.asarray(a, dtype=np.float32)
    if dtype == "BF16":
        return (np.asarray(a).astype(np.uint32) << 16).view(np.float32)
    if dtype in ("F16", "F64"):
        return np.asarray(a).astype(np.float32)
    if dtype in ("F8_E8M0", "U8") and scale_fmt == "ue8m0":
        return e8m0_to_f32(a)
    raise ValueError(dtype)  # checked by find_quantised before any value is read


def unpack_ints(words: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Unsigned ``bits``-bit values packed in int32 words along the last axis (value ``i`` of a word at bit ``bits * i``) -> float32."""
    per = 32 // bits
    w = np.ascontiguousarray(words).view(np.uint32)
    shifts = (np.arange(per, dtype=np.uint32) * bits).astype(np.uint32)
    vals = (w[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return vals.reshape(*w.shape[:-1], w.shape[-1] * per)[..., :cols].astype(np.float32)


# -- what a quantised weight is --------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantWeight:
    """One quantised weight of a checkpoint: its tensors, and how each stored value becomes a float.

    ``block`` is (rows, cols) of the values one scale covers in each matrix (the last block of a row
    or column may be smaller); ``grid`` is the scales' shape per matrix.  ``storage`` "fp8" holds
    one e4m3 byte per value, "int" ``bits``-bit unsigned integers packed in int32 words
    (``q = stored - 2**(bits-1)``, or ``stored - zero_point`` when asymmetric), "mxfp4" two e2m1
    nibbles a byte in ``_blocks`` [..., rows, cols/32, 16] with e8m0 ``_scales`` per 32 values.
    """

    name: str  # the weight as the model names it (``...weight``, or a fused ``...gate_up_proj``)
    shape: tuple[int, ...]  # its values' shape: (rows, cols) or (experts, rows, cols)
    stored: str
    scale: str
    scale_dtype: str
    block: tuple[int, int]
    storage: str = "fp8"
    bits: int = 8
    zero: str | None = None  # an asymmetric integer weight's packed zero points
    scale_fmt: str = "float"
    what: str = ""  # how the checkpoint stores it, for plans and warnings ("FP8 e4m3, 128x128 blocks")

    @property
    def matrices(self) -> int:
        return math.prod(self.shape[:-2])

    @property
    def grid(self) -> tuple[int, int]:
        rows, cols = self.shape[-2:]
        return -(-rows // self.block[0]), -(-cols // self.block[1])


def decode_rows(w: QuantWeight, stored: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, m: int, rows: slice | np.ndarray) -> np.ndarray:
    """float32 values of rows ``rows`` of matrix ``m`` of ``w`` (a new C-contiguous array), from its stored arrays.

    ``stored`` / ``scale`` / ``zero`` are the tensors as stored (views of the shard); only the rows
    asked for, and their scales, are read.
    """
    n_rows, cols = w.shape[-2:]
    gr, gc = w.grid
    bn, bk = w.block
    if w.storage == "mxfp4":
        return _decode_mxfp4(w, stored, scale, m, rows)
    raw = stored.reshape(w.matrices, n_rows, stored.shape[-1])[m][rows]
    ids = np.arange(n_rows)[rows] // bn  # the scale row of each row
    if w.storage == "fp8":
        q = E4M3[raw]  # fancy indexing: twice as fast as take here
    else:
        q = unpack_ints(raw, w.bits, cols)
        if zero is None:
            q -= np.float32(1 << (w.bits - 1))
        else:  # zero points packed along the rows (dim 0), one per scale
            per = 32 // w.bits
            zw = np.ascontiguousarray(zero).view(np.uint32).reshape(w.matrices, -(-gr // per), gc)[m][ids // per]
            zp = ((zw >> (np.uint32(w.bits) * (ids % per).astype(np.uint32))[:, None]) & np.uint32((1 << w.bits) - 1)).astype(np.float32)
            _by_block(q, zp, bk, np.subtract)
    s = scales_to_f32(scale.reshape(w.matrices, gr, gc)[m][ids], w.scale_dtype, w.scale_fmt)
    _by_block(q, s, bk, np.multiply)
    return q


def _decode_mxfp4(w: QuantWeight, blocks: np.ndarray, scale: np.ndarray, m: int, rows: slice | np.ndarray) -> np.ndarray:
    """Rows of matrix ``m`` of an MXFP4 weight: nibble ``2j`` / ``2j+1`` of a block = low / high half of byte ``j``, times ``2**(e - 127)``."""
    n_rows, cols = w.shape[-2:]
    raw = blocks.reshape(w.matrices, n_rows, cols // 2)[m][rows]
    q = np.empty((raw.shape[0], cols), dtype=np.float32)
    q[:, 0::2] = E2M1[raw & 0x0F]
    q[:, 1::2] = E2M1[raw >> 4]
    ids = np.arange(n_rows)[rows]
    s = scales_to_f32(scale.reshape(w.matrices, n_rows, cols // MXFP4_BLOCK)[m][ids], w.scale_dtype, w.scale_fmt)
    _by_block(q, s, MXFP4_BLOCK, np.multiply)  # a power of two times a 2-bit significand: exact in float32
    return q


_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)
_MXFP4_BLOCKS = 16384  # blocks repacked per step: 256 KiB in, its temporaries stay in cache through the steps below


def mxfp4_to_ggml(blocks: np.ndarray, scales: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """HF MXFP4 rows (``_blocks`` uint8 [..., n, 16], ``_scales`` uint8 [..., n]) -> GGML ``block_mxfp4`` bytes [..., n * 17], no value touched.

    A GGML block is its e8m0 byte, then 16 bytes whose low nibbles hold values 0..15 and high nibbles 16..31;
    HF's byte ``j`` holds values ``2j`` (low) and ``2j+1`` (high).  So GGML byte ``2k`` (``k`` < 8) is values ``2k`` and
    ``16 + 2k``: the low nibbles of HF bytes ``k`` and ``8 + k``; byte ``2k + 1`` their high nibbles.  The same bytes as
    llama.cpp's converter (``repack_mxfp4``): the way to carry a checkpoint's MXFP4 experts into GGUF MXFP4 without re-encoding.

    Per cache-sized run of blocks, each block's two halves as uint64 words give the even and the odd output bytes
    (8 bit operations on 8-byte words), which are interleaved by widening to 16-bit pairs (``even | odd << 8``, so the
    little-endian pairs are the output bytes in order) and land in the 17-byte blocks as 16-byte items, one strided copy.
    About 0.4 ns a byte on a 2-core EPYC where the row-at-a-time byte copies it replaces took 1.0 (bench/RESULTS_mxfp4.md).
    ``out``: a C-contiguous uint8 array of the result's size to write into (a caller's run of experts), returned reshaped.
    """
    b = np.asarray(blocks, dtype=np.uint8)
    lead, nb = b.shape[:-2], b.shape[-2]
    rows = b.reshape(-1, nb, 16)  # a view for one leading axis, strided or not (the odd rows of gate_up are up)
    n = rows.shape[0] * nb
    if out is None:
        out = np.empty(n * 17, dtype=np.uint8)
    elif out.dtype != np.uint8 or out.size != n * 17 or not out.flags.c_contiguous:
        raise ValueError(f"mxfp4_to_ggml: out must be C-contiguous uint8 of {n * 17} bytes, got {out.dtype} {out.shape}")
    out = out.reshape(-1)
    if n == 0:
        return out.reshape(*lead, nb * 17)
    np.ndarray((n,), np.uint8, out, 0, (17,))[...] = np.asarray(scales, dtype=np.uint8).reshape(n)
    dst = np.ndarray((n,), "V16", out, 1, (17,))  # each block's 16 data bytes, as one item
    per = max(1, _MXFP4_BLOCKS // max(nb, 1))  # whole rows a step: a strided source is gathered a step at a time, in cache
    k = per * nb
    even, odd, tmp = np.empty(k, np.uint64), np.empty(k, np.uint64), np.empty(k, np.uint64)
    lo16, hi16 = np.empty(k * 8, np.uint16), np.empty(k * 8, np.uint16)
    four, eight = np.uint64(4), np.uint16(8)
    for r in range(0, rows.shape[0], per):
        w = np.ascontiguousarray(rows[r : r + per]).view(np.uint64).reshape(-1, 2)  # [m, 2]: HF bytes 0..7, 8..15
        m, s = w.shape[0], r * nb
        a, c = w[:, 0], w[:, 1]
        e, o, t = even[:m], odd[:m], tmp[:m]
        np.bitwise_and(a, _NIBBLES, out=e)  # GGML bytes 1, 3, .., 15: low nibbles of HF k and 8 + k
        np.left_shift(c, four, out=t)
        np.bitwise_and(t, ~_NIBBLES, out=t)
        np.bitwise_or(e, t, out=e)
        np.right_shift(a, four, out=o)  # GGML bytes 2, 4, .., 16: their high nibbles
        np.bitwise_and(o, _NIBBLES, out=o)
        np.bitwise_and(c, ~_NIBBLES, out=t)
        np.bitwise_or(o, t, out=o)
        p, q = lo16[: m * 8], hi16[: m * 8]
        np.copyto(p, e.view(np.uint8), casting="unsafe")
        np.copyto(q, o.view(np.uint8), casting="unsafe")
        np.left_shift(q, eight, out=q)
        np.bitwise_or(p, q, out=p)
        dst[s : s + m] = p.view("V16")
    return out.reshape(*lead, nb * 17)


#: storage -> the GGML type that holds a weight so stored bit for bit (written as the checkpoint stores it, "carried")
CARRIED_TYPES = {"mxfp4": "MXFP4"}
#: storage -> target types that hold such a weight without a second loss (MXFP4 values are not Q8_0 values: e2m1 x 2**e
#: on a grid of amax / 127 rounds; F16 holds them within its exponent range, 2**-24 .. 2**15, where published scales lie);
#: others: :data:`NO_SECOND_LOSS`
LOSSLESS_TYPES = {"mxfp4": ("F32", "F16", "BF16", "MXFP4")}


def carried_type(quant: QuantWeight | None) -> str | None:
    """The GGML type name (:data:`CARRIED_TYPES`) a quantised weight is written in as it is stored, or None (it is decoded)."""
    return None if quant is None else CARRIED_TYPES.get(quant.storage)


def _by_block(q: np.ndarray, per_block: np.ndarray, bk: int, op: Callable[..., Any]) -> None:
    """``q[:, j] = op(q[:, j], per_block[:, j // bk])`` in place, for q (n, cols) and per_block (n, ceil(cols / bk))."""
    n, cols = q.shape
    full = cols // bk
    if full:
        view = np.lib.stride_tricks.as_strided(q, shape=(n, full, bk), strides=(q.strides[0], bk * q.itemsize, q.itemsize))
        op(view, per_block[:, :full, None], out=view)
    if cols > full * bk:
        tail = q[:, full * bk :]
        op(tail, per_block[:, full : full + 1], out=tail)


class Dequantised:
    """The float32 values of a quantised weight, decoded when indexed: a stand-in for its numpy array.

    ``a[e]`` is matrix ``e`` of a stack (decoded lazily too); ``a[r0:r1]``, ``a[i]`` and ``a[index_array]``
    on a matrix decode just those rows; anything else (``np.asarray(a)``, ``a.reshape``) decodes it
    all.  The last row block is kept, so a piece checked and then encoded is decoded once.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, shape: tuple[int, ...], rows: Callable[[int, slice | np.ndarray], np.ndarray], matrix: int | None = None):
        self.shape = tuple(shape)
        self._rows = rows
        self._matrix = 0 if matrix is None and len(shape) == 2 else matrix
        self._last: tuple[int, int, np.ndarray] | None = None

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: math.prod(self.shape))
    nbytes = property(lambda self: 4 * self.size)
    itemsize = 4

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"Dequantised(shape={self.shape})"

    def __getitem__(self, key: Any) -> Any:
        if self._matrix is None:  # a stack of matrices
            if isinstance(key, (int, np.integer)):
                return Dequantised(self.shape[1:], self._rows, _index(key, self.shape[0]))
            return np.asarray(self)[key]
        n = self.shape[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self._span(start, max(start, stop))
            return self._rows(self._matrix, np.arange(start, stop, step))
        if isinstance(key, (int, np.integer)):
            i = _index(key, n)
            return self._span(i, i + 1)[0]
        if isinstance(key, (list, np.ndarray)):
            idx = np.asarray(key)
            if idx.ndim == 1 and idx.dtype.kind in "iu":
                if idx.size and (idx.max() >= n or idx.min() < -n):
                    raise IndexError(f"row index out of range for {n} rows")
                return self._rows(self._matrix, np.where(idx < 0, idx + n, idx))
        return np.asarray(self)[key]

    def _span(self, r0: int, r1: int) -> np.ndarray:
        last = self._last
        if last is not None and last[0] == r0 and last[1] == r1:
            return last[2]
        a = self._rows(self._matrix, slice(r0, r1))  # type: ignore[arg-type]
        self._last = (r0, r1, a)
        return a

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if self._matrix is not None:
            a = self._rows(self._matrix, slice(0, self.shape[0]))
        else:
            a = np.empty(self.shape, dtype=np.float32)
            for e in range(self.shape[0]):
                a[e] = self[e][:]
        return a if dtype is None else a.astype(dtype, copy=False)

    def reshape(self, *shape: Any) -> np.ndarray:
        return np.asarray(self).reshape(*shape)

    def astype(self, dtype: Any, copy: bool = True) -> np.ndarray:
        return np.asarray(self).astype(dtype)


def _index(key: Any, n: int) -> int:
    i = int(key)
    if not -n <= i < n:
        raise IndexError(f"index {i} out of range for {n}")
    return i + n if i < 0 else i


# -- reading quantization_config --------------------------------------------------------------------------


@dataclass(frozen=True)
class Scheme:
    """One way weights of a checkpoint are stored, from its quantization_config."""

    storage: str  # "fp8" or "int"
    strategy: str  # "block", "tensor", "channel" or "group"
    block: tuple[int, int] = (0, 0)  # block: rows x cols; group: (1, group_size)
    bits: int = 8
    symmetric: bool = True
    scale_fmt: str = "float"
    block_or_tensor: bool = False  # fp8 without weight_block_size: 128x128 blocks, or one scale per matrix, as the scales' shape says
    expert_fp4: bool = False  # fp8 with expert_dtype "fp4" (DeepSeek V4): experts FP4-packed, see :func:`_pair_fp4`

    def block_for(self, rows: int, cols: int) -> tuple[int, int]:
        if self.strategy == "tensor":
            return max(1, rows), max(1, cols)
        if self.strategy == "channel":
            return 1, max(1, cols)
        return self.block


@dataclass(frozen=True)
class SourceQuant:
    """What a quantised checkpoint holds, for plans and warnings."""

    method: str  # config.json quantization_config.quant_method
    kinds: tuple[str, ...]  # how its weights are stored, one line each ("FP8 e4m3, 128x128 blocks (weight_scale_inv)")
    n_weights: int  # quantised weights read
    n_params: int  # their values

    def describe(self) -> str:
        return f"{self.method}: {'; '.join(self.kinds)} ({self.n_weights} weights)"

    def to_json(self) -> dict[str, Any]:
        return {"quant_method": self.method, "kinds": list(self.kinds), "weights": self.n_weights, "params": self.n_params}


@dataclass
class Found:
    """:func:`find_quantised`'s answer: the quantised weights (by the stored tensor's name) and what they consume."""

    weights: dict[str, QuantWeight] = field(default_factory=dict)
    consumed: set[str] = field(default_factory=set)  # scales, shapes, zero points, activation scales: not model tensors
    source: SourceQuant | None = None


def _key_error(cfg_path: str, key: str, value: Any, why: str, fix: str) -> CheckpointError:
    return CheckpointError(f"{cfg_path}: quantization_config.{key} = {_shown(value)} {why}; fix: {fix}")


UNSUPPORTED_FIX = "convert the unquantised (BF16) release of this model, or dequantise it to BF16 first"


def read_schemes(config: Mapping[str, Any], cfg_path: str) -> tuple[str, dict[str, Scheme], list[str]] | None:
    """(quant_method, storage kind -> scheme, patterns of modules left unquantised) of a checkpoint, or None when it is not quantised.

    A quantisation method or format quantkit cannot read exactly is refused here, in one line naming the key.
    """
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{cfg_path}: quantization_config is {_shown(qc)}, expected an object; fix: restore the model's config.json")
    method = qc.get("quant_method")
    if method in PASSTHROUGH_METHODS:
        return None
    if method == FP8_METHOD:
        fp4_ok = config.get("model_type") in FP4_EXPERT_MODEL_TYPES
        if fp4_ok and "expert_dtype" not in qc and config.get("expert_dtype") is not None:
            qc = {**qc, "expert_dtype": config["expert_dtype"]}  # V4 ships it beside the config; transformers' DeepseekV4Config folds it in
        return method, {"fp8": _fp8_scheme(qc, cfg_path, fp4_ok)}, _strings(qc.get("modules_to_not_convert", qc.get("ignored_layers")), cfg_path, "modules_to_not_convert")
    if method == CT_METHOD:
        schemes, ignore = _ct_schemes(qc, cfg_path)
        return method, schemes, ignore
    if method == MXFP4_METHOD:
        return method, {"mxfp4": Scheme("mxfp4", "group", (1, MXFP4_BLOCK), bits=4, scale_fmt="ue8m0")}, _strings(qc.get("modules_to_not_convert"), cfg_path, "modules_to_not_convert")
    raise _key_error(cfg_path, "quant_method", method, f"is not a quantisation quantkit reads (it reads {FP8_METHOD!r}, {MXFP4_METHOD!r} and {CT_METHOD!r} {'/'.join(CT_FORMATS)})", UNSUPPORTED_FIX)


def _strings(value: Any, cfg_path: str, key: str) -> list[str]:
    if value is None:
        return []
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise _key_error(cfg_path, key, value, "is not a list of module names", "restore the model's config.json")
    return list(value)


def _block(value: Any, cfg_path: str, key: str) -> tuple[int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise _key_error(cfg_path, key, value, "is not two positive integers [rows, cols]", "restore the model's config.json")
    return int(value[0]), int(value[1])


def _fp8_scheme(qc: dict[str, Any], cfg_path: str, fp4_ok: bool = False) -> Scheme:
    fmt = qc.get("fmt", "e4m3")
    if not (isinstance(fmt, str) and fmt.lower() in E4M3_NAMES):
        raise _key_error(cfg_path, "fmt", fmt, "is not e4m3, the only FP8 format quantkit reads", UNSUPPORTED_FIX)
    scale_fmt = qc.get("scale_fmt", "float")
    if scale_fmt not in ("float", "ue8m0"):
        raise _key_error(cfg_path, "scale_fmt", scale_fmt, "is not 'float' or 'ue8m0'", UNSUPPORTED_FIX)
    expert_dtype = qc.get("expert_dtype", "fp8")
    if expert_dtype != "fp8" and not (fp4_ok and expert_dtype == "fp4"):
        raise _key_error(cfg_path, "expert_dtype", expert_dtype, "(FP4-packed experts) is not read by quantkit" + (
            "" if fp4_ok else f" but in {'/'.join(FP4_EXPERT_MODEL_TYPES)} checkpoints"), UNSUPPORTED_FIX)
    if qc.get("modules_to_convert"):
        raise _key_error(cfg_path, "modules_to_convert", qc["modules_to_convert"], "(FP8 embedding tables) is not read by quantkit", UNSUPPORTED_FIX)
    fp4 = expert_dtype == "fp4"
    if "weight_block_size" not in qc:  # transformers defaults to 128x128; llama.cpp's converter to one scale per matrix
        return Scheme("fp8", "block", (128, 128), scale_fmt=scale_fmt, block_or_tensor=True, expert_fp4=fp4)
    if qc["weight_block_size"] is None:
        return Scheme("fp8", "tensor", scale_fmt=scale_fmt, expert_fp4=fp4)
    return Scheme("fp8", "block", _block(qc["weight_block_size"], cfg_path, "weight_block_size"), scale_fmt=scale_fmt, expert_fp4=fp4)


def _ct_schemes(qc: dict[str, Any], cfg_path: str) -> tuple[dict[str, Scheme], list[str]]:
    fmt = qc.get("format")
    for key in ("sparsity_config", "transform_config"):
        v = qc.get(key)
        if v and not (key == "sparsity_config" and isinstance(v, dict) and v.get("format") in (None, "dense")):
            raise _key_error(cfg_path, key, v, "is set: the stored weights are not the model's weights", UNSUPPORTED_FIX)
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise _key_error(cfg_path, "config_groups", groups, "is not an object", "restore the model's config.json")
    schemes: dict[str, Scheme] = {}
    for gname, g in groups.items():
        gkey = f"config_groups[{_shown(gname)}]"
        if not isinstance(g, dict):
            raise _key_error(cfg_path, gkey, g, "is not an object", "restore the model's config.json")
        gfmt = g.get("format") or fmt
        wa = g.get("weights")
        if wa is None:  # activations only: the weights stay float
            continue
        if gfmt not in CT_FORMATS:
            key = f"{gkey}.format" if g.get("format") else "format"
            raise _key_error(cfg_path, key, gfmt, f"is a compressed-tensors format quantkit does not read (it reads {', '.join(CT_FORMATS)})", UNSUPPORTED_FIX)
        scheme = _ct_scheme(wa, gfmt, cfg_path, f"{gkey}.weights")
        kind = scheme.storage
        if kind in schemes and schemes[kind] != scheme:
            raise _key_error(cfg_path, "config_groups", list(groups), f"holds two different {gfmt} schemes; which tensor uses which is not stored with the weights", UNSUPPORTED_FIX)
        schemes[kind] = scheme
    if not schemes and fmt not in (*CT_FORMATS, "dense", None):
        raise _key_error(cfg_path, "format", fmt, f"is a compressed-tensors format quantkit does not read (it reads {', '.join(CT_FORMATS)})", UNSUPPORTED_FIX)
    return schemes, _strings(qc.get("ignore"), cfg_path, "ignore")


def _ct_scheme(wa: Any, fmt: str, cfg_path: str, key: str) -> Scheme:
    if not isinstance(wa, dict):
        raise _key_error(cfg_path, key, wa, "is not an object", "restore the model's config.json")
    typ, bits, strategy = wa.get("type", "int"), wa.get("num_bits"), wa.get("strategy")
    symmetric = wa.get("symmetric", True)
    if fmt == "float-quantized":
        if typ != "float" or bits != 8:
            raise _key_error(cfg_path, f"{key}.num_bits", bits, f"with type {_shown(typ)} is not FP8 e4m3, the float format quantkit reads", UNSUPPORTED_FIX)
        if symmetric is not True:
            raise _key_error(cfg_path, f"{key}.symmetric", symmetric, "(FP8 with zero points) is not read by quantkit", UNSUPPORTED_FIX)
        storage = "fp8"
    else:
        if typ != "int" or not isinstance(bits, int) or bits not in (2, 4, 8):
            raise _key_error(cfg_path, f"{key}.num_bits", bits, f"with type {_shown(typ)} is not packed INT2/INT4/INT8, what quantkit reads", UNSUPPORTED_FIX)
        if wa.get("actorder") == "group":
            raise _key_error(cfg_path, f"{key}.actorder", "group", "(columns reordered by g_idx) is not read by quantkit", UNSUPPORTED_FIX)
        storage = "int"
    if strategy in ("tensor", "channel"):
        return Scheme(storage, strategy, bits=bits, symmetric=bool(symmetric))
    if strategy == "group":
        gs = wa.get("group_size")
        if not (isinstance(gs, int) and not isinstance(gs, bool) and gs > 0):
            raise _key_error(cfg_path, f"{key}.group_size", gs, "is not a positive integer", "restore the model's config.json")
        return Scheme(storage, "group", (1, gs), bits=bits, symmetric=bool(symmetric))
    if strategy == "block" and storage == "fp8":
        return Scheme(storage, "block", _block(wa.get("block_structure"), cfg_path, f"{key}.block_structure"), bits=bits)
    raise _key_error(cfg_path, f"{key}.strategy", strategy, f"is not a {fmt} strategy quantkit reads (tensor, channel, group{', block' if storage == 'fp8' else ''})", UNSUPPORTED_FIX)


def _not_converted(module: str, patterns: Iterable[str], method: str) -> str | None:
    """The pattern of the skip list that names ``module``, matched as transformers (fp8) or compressed-tensors (``re:`` regexes, else exact names) match."""
    for p in patterns:
        if method == CT_METHOD:
            hit = _re_match(p[3:], module) if p.startswith("re:") else p == module
        else:
            hit = _re_match(rf"(?:{p})(?:(?<=\.)|(?=\.|$))", module) or module.endswith(p)
        if hit:
            return p
    return None


def _re_match(pattern: str, text: str) -> bool:
    try:
        return re.match(pattern, text) is not None
    except re.error:
        return False


# -- pairing weights with their scales --------------------------------------------------------------------

Header = Mapping[str, tuple[str, tuple[int, ...]]]  # tensor name -> (safetensors dtype, shape)


def find_quantised(
    config: Mapping[str, Any], headers: Header, cfg_path: str, where: Callable[[str], str], read_ints: Callable[[str], np.ndarray],
) -> Found:
    """The quantised weights of a checkpoint, each paired with its scales (reads only ``weight_shape`` tensors).

    ``headers``: every tensor's dtype and shape; ``where(name)``: the file that holds a tensor (for
    errors); ``read_ints(name)``: a small integer tensor's values.  A quantised weight whose scale is
    missing or of the wrong shape, a scale with no quantised weight, or quantised bytes in a checkpoint
    that does not say how they are quantised are refused in one line.
    """
    read = read_schemes(config, cfg_path)
    found = Found()
    if read is None:
        for name, (dtype, _) in headers.items():
            if dtype.startswith("F8_"):
                raise CheckpointError(
                    f"{where(name)}: tensor {_shown(name)} is {dtype}, but {cfg_path} has no quantization_config saying how it is scaled; "
                    "fix: restore the config.json that came with these weights"
                )
            if name.endswith("_blocks") and dtype == "U8" and name.removesuffix("_blocks") + "_scales" in headers:
                raise CheckpointError(
                    f"{where(name)}: tensor {_shown(name)} and its _scales look like MXFP4 blocks, but {cfg_path} has no quantization_config "
                    "(quant_method 'mxfp4') saying so; fix: restore the config.json that came with these weights"
                )
        return found
    method, schemes, skip = read
    if method == FP8_METHOD:
        pairs = _pair_fp8(headers, schemes["fp8"], cfg_path, where) + _pair_fp4(headers, schemes["fp8"], cfg_path, where)
    elif method == MXFP4_METHOD:
        pairs = _pair_mxfp4(headers, cfg_path, where)
    else:
        pairs = _pair_ct(headers, schemes, cfg_path, where, read_ints)
    for w in pairs:
        module = w.name.removesuffix(".weight") if w.name.endswith(".weight") else w.name.rpartition(".")[0]
        hit = _not_converted(module, skip, method)
        if hit is not None:
            key = "ignore" if method == CT_METHOD else "modules_to_not_convert"
            raise CheckpointError(
                f"{where(w.stored)}: tensor {_shown(w.stored)} is stored quantised, but quantization_config.{key} entry {_shown(hit)} "
                f"says module {_shown(module)} is not; fix: restore the config.json that came with these weights"
            )
        found.weights[w.stored] = w
        found.consumed.update(n for n in (w.scale, w.zero) if n is not None)
        if w.storage == "int":
            found.consumed.add(w.stored.removesuffix("_packed") + "_shape")
    runtime = {n for n, (dt, sh) in headers.items() if n.endswith(RUNTIME_SCALES) and len(sh) <= 1 and n not in found.weights}
    if runtime:
        log.debug("%s: dropping %d activation / KV-cache scales (llama.cpp computes activations in float)", cfg_path, len(runtime))
    found.consumed |= runtime
    if found.weights:
        kinds = tuple(dict.fromkeys(w.what for w in found.weights.values()))
        found.source = SourceQuant(method, kinds, len(found.weights), sum(math.prod(w.shape) for w in found.weights.values()))
    return found


def _check_shape(name: str, shape: tuple[int, ...], dtype: str, where: Callable[[str], str]) -> None:
    if len(shape) not in (2, 3):
        raise CheckpointError(f"{where(name)}: tensor {_shown(name)} is {dtype} of shape {list(shape)}; quantkit reads quantised matrices (2-D) and expert stacks (3-D); fix: re-download the checkpoint")


def _scale_shapes(w_shape: tuple[int, ...], block: tuple[int, int], strategy: str) -> list[tuple[int, ...]]:
    """Every scale shape that means ``strategy`` for a weight of shape ``w_shape`` (one per matrix may be written several ways)."""
    lead, (rows, cols) = w_shape[:-2], w_shape[-2:]
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    shapes = [(*lead, *grid)]
    if strategy == "tensor":
        shapes += [(*lead,), (*lead, 1)] + ([(), (1,)] if not lead or math.prod(lead) == 1 else [])
    elif strategy == "channel":
        shapes += [(*lead, rows)]
    return shapes


def _describe(storage: str, bits: int, strategy: str, block: tuple[int, int], scale_key: str, symmetric: bool = True) -> str:
    head = "FP8 e4m3" if storage == "fp8" else f"INT{bits} ({'symmetric' if symmetric else 'with zero points'})"
    how = {"tensor": "one scale per matrix", "channel": "one scale per row", "group": f"groups of {block[1]}"}.get(strategy, f"{block[0]}x{block[1]} blocks")
    return f"{head}, {how} ({scale_key})"


def _pair_fp8(headers: Header, scheme: Scheme, cfg_path: str, where: Callable[[str], str]) -> list[QuantWeight]:
    out = []
    dot_style = any(n.endswith(".scale") and headers.get(n.removesuffix(".scale") + ".weight", ("",))[0] == "F8_E4M3" for n in headers)
    for name, (dtype, shape) in headers.items():
        if name.endswith("_scale_inv"):
            base = name.removesuffix("_scale_inv")
            if headers.get(base, ("",))[0] != "F8_E4M3":
                stored = f"is {headers[base][0]}" if base in headers else "is missing"
                raise CheckpointError(f"{where(name)}: tensor {_shown(name)} scales {_shown(base)}, which {stored}, not F8_E4M3; fix: re-download the checkpoint (the shard that holds {_shown(base)})")
            continue
        if dtype == "F8_E5M2":
            raise CheckpointError(f"{where(name)}: tensor {_shown(name)} is F8_E5M2; quantkit reads e4m3 FP8 checkpoints; fix: {UNSUPPORTED_FIX}")
        if dtype != "F8_E4M3":
            continue
        _check_shape(name, shape, dtype, where)
        scale = name + "_scale_inv"
        if scale not in headers and (_dot_scale(name) in headers or dot_style):  # DeepSeek V4: wq_a.weight + wq_a.scale
            scale = _dot_scale(name)
        if scale not in headers:
            raise CheckpointError(f"{where(name)}: tensor {_shown(name)} is F8_E4M3 but its scale {_shown(scale)} is missing; fix: re-download the checkpoint (every FP8 weight comes with one)")
        sdtype, sshape = headers[scale]
        ok_dtypes = ("F32", "BF16", "F16") + (("F8_E8M0", "U8") if scheme.scale_fmt == "ue8m0" else ())
        if sdtype not in ok_dtypes:
            raise CheckpointError(f"{where(scale)}: tensor {_shown(scale)} is {sdtype}; FP8 scales are {' or '.join(ok_dtypes)} (quantization_config.scale_fmt = {scheme.scale_fmt!r}); fix: restore the config.json that came with these weights")
        strategy, block = scheme.strategy, scheme.block_for(*shape[-2:])
        if scheme.block_or_tensor and tuple(sshape) not in _scale_shapes(shape, block, "block") and tuple(sshape) in _scale_shapes(shape, block, "tensor"):
            strategy, block = "tensor", Scheme("fp8", "tensor").block_for(*shape[-2:])
        _check_scale(name, shape, scale, tuple(sshape), block, strategy, "weight_block_size", cfg_path, where)
        key = "weight_scale_inv" if scale.endswith("_scale_inv") else ".scale"
        out.append(QuantWeight(name, tuple(shape), name, scale, sdtype, block, "fp8", 8, None, scheme.scale_fmt, _describe("fp8", 8, strategy, block, key)))
    return out


def _dot_scale(weight: str) -> str:
    """DeepSeek V4's name for the scales of ``X.weight``: ``X.scale``."""
    return weight.removesuffix(".weight") + ".scale" if weight.endswith(".weight") else weight + ".scale"


FP4_EXPERT_MODEL_TYPES = ("deepseek_v4",)  # quantization_config.expert_dtype "fp4": transformers reads it for DeepSeek V4 only
FP4_WHAT = "FP4 e2m1 experts, groups of 32 with a ue8m0 scale (I8 .weight [rows, cols/2] / .scale [rows, cols/32])"
FP4_FIX = "re-download the checkpoint (an FP4 expert is an I8 .weight [rows, cols/2], two e2m1 values a byte, with an F8_E8M0 .scale [rows, cols/32])"


def _pair_fp4(headers: Header, scheme: Scheme, cfg_path: str, where: Callable[[str], str]) -> list[QuantWeight]:
    """DeepSeek V4's FP4 experts (``expert_dtype: "fp4"``): ``X.weight`` I8 [rows, cols/2] -- value ``2j`` of a row in the low
    nibble of byte ``j``, ``2j+1`` in the high one -- with ``X.scale`` (UE8M0) [rows, cols/32]: MXFP4 blocks of 32 values, read
    as transformers' ``Fp8Dequantize`` and llama.cpp's converter (``repack_mxfp4_blocks``) read them.  An I8 weight with a
    ``.scale`` in a checkpoint that does not say ``fp4`` is refused."""
    out = []
    for name, (dtype, shape) in headers.items():
        if dtype != "I8" or not name.endswith(".weight") or _dot_scale(name) not in headers:
            continue
        scale = _dot_scale(name)
        if not scheme.expert_fp4:
            raise CheckpointError(f"{where(name)}: tensor {_shown(name)} is I8 with a scale {_shown(scale)} (FP4-packed), but {cfg_path} "
                                  "quantization_config.expert_dtype is not 'fp4'; fix: restore the config.json that came with these weights")
        sdtype, sshape = headers[scale]
        if len(shape) != 2 or shape[-1] % (MXFP4_BLOCK // 2) or sdtype not in ("F8_E8M0", "U8") or tuple(sshape) != (shape[0], shape[1] * 2 // MXFP4_BLOCK):
            want = [shape[0], shape[1] * 2 // MXFP4_BLOCK] if len(shape) == 2 else "[rows, cols/32]"
            raise CheckpointError(f"{where(name)}: tensor {_shown(name)} is I8 {list(shape)} with {_shown(scale)} {sdtype} {list(sshape)}; FP4 experts "
                                  f"need 16 bytes per 32 values and F8_E8M0 {want}; fix: {FP4_FIX}")
        out.append(QuantWeight(name, (shape[0], shape[1] * 2), name, scale, sdtype, (1, MXFP4_BLOCK), "mxfp4", 4, None, "ue8m0", FP4_WHAT))
    return out


def _check_scale(name: str, shape: tuple[int, ...], scale: str, sshape: tuple[int, ...], block: tuple[int, int], strategy: str, key: str, cfg_path: str, where: Callable[[str], str]) -> None:
    shapes = _scale_shapes(shape, block, strategy)
    if sshape not in shapes:
        how = {"tensor": "one scale per matrix", "channel": "one scale per row", "group": f"groups of {block[1]} columns"}.get(strategy, f"{block[0]}x{block[1]} blocks ({cfg_path} quantization_config.{key})")
        raise CheckpointError(
            f"{where(scale)}: tensor {_shown(scale)} has shape {list(sshape)}; weight {_shown(name)} {list(shape)} in {how} needs {list(shapes[0])}; "
            "fix: use the config.json that belongs to these weights, or re-download the shard"
        )


def _pair_ct(headers: Header, schemes: dict[str, Scheme], cfg_path: str, where: Callable[[str], str], read_ints: Callable[[str], np.ndarray]) -> list[QuantWeight]:
    out = []
    for name, (dtype, shape) in headers.items():
        if name.endswith(".weight_g_idx"):
            raise CheckpointError(f"{where(name)}: tensor {_shown(name)} reorders columns (activation order); quantkit does not read such weights; fix: {UNSUPPORTED_FIX}")
        if name.endswith(".weight_packed"):
            scheme = schemes.get("int")
            if scheme is None:
                raise CheckpointError(f"{where(name)}: tensor {_shown(name)} is packed, but {cfg_path} quantization_config has no pack-quantized group; fix: restore the config.json that came with these weights")
            out.append(_packed_weight(name, dtype, shape, scheme, headers, cfg_path, where, read_ints))
        elif dtype.startswith("F8_") and not name.endswith(RUNTIME_SCALES):
            scheme = schemes.get("fp8")
            if scheme is None or dtype != "F8_E4M3":
                why = "quantization_config has no float-quantized group" if scheme is None else "quantkit reads e4m3 FP8 only"
                raise CheckpointError(f"{where(name)}: tensor {_shown(name)} is {dtype}, but {why}; fix: restore the config.json that came with these weights")
            _check_shape(name, shape, dtype, where)
            scale = name + "_scale"
            if scale not in headers:
                raise CheckpointError(f"{where(name)}: tensor {_shown(name)} is F8_E4M3 but its scale {_shown(scale)} is missing; fix: re-download the checkpoint (every FP8 weight comes with one)")
            sdtype, sshape = headers[scale]
            _scale_dtype(scale, sdtype, where)
            block = scheme.block_for(*shape[-2:])
            _check_scale(name, shape, scale, tuple(sshape), block, scheme.strategy, "config_groups", cfg_path, where)
            out.append(QuantWeight(name, tuple(shape), name, scale, sdtype, block, "fp8", 8, None, "float", _describe("fp8", 8, scheme.strategy, block, "weight_scale")))
    taken = {w.scale for w in out}
    for name in headers:
        if name.endswith(".weight_scale") and name not in taken:
            base = name.removesuffix("_scale")
            raise CheckpointError(f"{where(name)}: tensor {_shown(name)} scales {_shown(base)}, which is not stored quantised (no F8_E4M3 weight, no weight_packed); fix: re-download the checkpoint")
    return out


MXFP4_FIX = "re-download the checkpoint (every MXFP4 weight is a uint8 _blocks [..., rows, cols/32, 16] with a uint8 _scales [..., rows, cols/32])"
MXFP4_WHAT = "MXFP4 (e2m1, blocks of 32 with an e8m0 scale; _blocks / _scales)"


def _pair_mxfp4(headers: Header, cfg_path: str, where: Callable[[str], str]) -> list[QuantWeight]:
    """``X_blocks`` + ``X_scales`` -> the weight ``X`` [..., rows, 32 * blocks]; a half pair or a wrong shape or dtype is refused in one line."""
    out = []
    for name, (dtype, shape) in headers.items():
        if name.endswith("_scales"):
            blocks = name.removesuffix("_scales") + "_blocks"
            if blocks not in headers:
                raise CheckpointError(f"{where(name)}: tensor {_shown(name)} scales {_shown(blocks)}, which is missing; fix: {MXFP4_FIX}")
            continue
        if not name.endswith("_blocks"):
            continue
        base = name.removesuffix("_blocks")
        if dtype != "U8" or len(shape) not in (3, 4) or shape[-1] != MXFP4_BLOCK // 2:
            raise CheckpointError(f"{where(name)}: tensor {_shown(name)} is {dtype} {list(shape)}; {cfg_path} says MXFP4 (quant_method 'mxfp4'), "
                                  f"stored as U8 [(experts,) rows, cols/32, 16]; fix: {MXFP4_FIX}")
        scale = base + "_scales"
        if scale not in headers:
            raise CheckpointError(f"{where(name)}: tensor {_shown(name)} is MXFP4 but its scales {_shown(scale)} are missing; fix: {MXFP4_FIX}")
        sdtype, sshape = headers[scale]
        if sdtype not in ("U8", "F8_E8M0") or tuple(sshape) != tuple(shape[:-1]):
            raise CheckpointError(f"{where(scale)}: tensor {_shown(scale)} is {sdtype} {list(sshape)}; the blocks {_shown(name)} {list(shape)} need "
                                  f"U8 {list(shape[:-1])} (one e8m0 exponent per 32 values); fix: {MXFP4_FIX}")
        logical = (*shape[:-2], shape[-2] * MXFP4_BLOCK)
        out.append(QuantWeight(base, tuple(logical), name, scale, sdtype, (1, MXFP4_BLOCK), "mxfp4", 4, None, "ue8m0", MXFP4_WHAT))
    return out


def _scale_dtype(scale: str, sdtype: str, where: Callable[[str], str]) -> None:
    if sdtype not in ("F32", "BF16", "F16"):
        raise CheckpointError(f"{where(scale)}: tensor {_shown(scale)} is {sdtype}; compressed-tensors scales are F32, BF16 or F16; fix: re-download the checkpoint")


def _packed_weight(
    name: str, dtype: str, shape: tuple[int, ...], scheme: Scheme, headers: Header, cfg_path: str, where: Callable[[str], str],
    read_ints: Callable[[str], np.ndarray],
) -> QuantWeight:
    base = name.removesuffix("_packed")  # ...weight
    fix = "re-download the checkpoint (a packed weight comes with weight_shape and weight_scale)"
    if dtype != "I32":
        raise CheckpointError(f"{where(name)}: tensor {_shown(name)} is {dtype}; packed weights are I32 words; fix: {fix}")
    _check_shape(name, shape, dtype, where)
    for part in ("_shape", "_scale"):
        if base + part not in headers:
            raise CheckpointError(f"{where(name)}: tensor {_shown(name)} has no {_shown(base + part)}; fix: {fix}")
    sdtype, sshape = headers[base + "_shape"]
    values = read_ints(base + "_shape") if sdtype in ("I32", "I64") and len(sshape) == 1 and sshape[0] <= 8 else None
    logical = tuple(int(v) for v in values) if values is not None else ()
    per = 32 // scheme.bits
    if len(logical) != len(shape) or any(v < 0 for v in logical) or logical[:-1] != tuple(shape[:-1]) or -(-logical[-1] // per) != shape[-1]:
        raise CheckpointError(
            f"{where(base + '_shape')}: tensor {_shown(base + '_shape')} = {_shown(list(logical) if values is not None else sdtype)} does not describe "
            f"{_shown(name)} {list(shape)} ({per} values per word); fix: {fix}"
        )
    scale, zero = base + "_scale", base + "_zero_point"
    sdtype, sshape = headers[scale]
    _scale_dtype(scale, sdtype, where)
    block = scheme.block_for(*logical[-2:])
    _check_scale(name, logical, scale, tuple(sshape), block, scheme.strategy, "config_groups", cfg_path, where)
    if scheme.symmetric:
        zero_name = None
    else:
        if zero not in headers:
            raise CheckpointError(f"{where(name)}: tensor {_shown(name)} is asymmetric but {_shown(zero)} is missing; fix: {fix}")
        zdtype, zshape = headers[zero]
        gr, gc = -(-logical[-2] // block[0]), -(-logical[-1] // block[1])
        want = (*logical[:-2], -(-gr // per), gc)
        if zdtype != "I32" or tuple(zshape) != want:
            raise CheckpointError(f"{where(zero)}: tensor {_shown(zero)} is {zdtype} {list(zshape)}; zero points packed along the rows need I32 {list(want)}; fix: {fix}")
        zero_name = zero
    return QuantWeight(base, logical, name, scale, sdtype, block, "int", scheme.bits, zero_name, "float",
                       _describe("int", scheme.bits, scheme.strategy, block, "weight_packed", scheme.symmetric))


# -- quantising a quantised source again --------------------------------------------------------------------


def requantised(tensors: Iterable[Any], plan: Iterable[Any]) -> dict[str, list[str]]:
    """Target type name -> the output tensors made from quantised source weights that the plan quantises again.

    Again: to a type that does not hold the stored values exactly -- other than F32/F16/BF16/Q8_0 for FP8 and integer
    weights, other than F32/F16/BF16/MXFP4 for MXFP4 ones (:data:`LOSSLESS_TYPES`; MXFP4 is written as stored).
    ``tensors``: the conversion's output tensors (``name``, ``sources``); ``plan``: their planned types (``name``, ``qtype``).
    """
    lossless: dict[str, set[str]] = {}
    for t in tensors:
        quants = [q for s in t.sources if (q := getattr(s, "quant", None)) is not None]
        if quants:
            lossless[t.name] = set.intersection(*(set(LOSSLESS_TYPES.get(q.storage, NO_SECOND_LOSS)) for q in quants))
    out: dict[str, list[str]] = {}
    for tp in plan:
        qname = getattr(tp.qtype, "name", str(tp.qtype))
        if tp.name in lossless and qname not in lossless[tp.name]:
            out.setdefault(qname, []).append(tp.name)
    return out


def warn_requantised(where: str, source: SourceQuant | None, tensors: Iterable[Any], plan: Iterable[Any]) -> dict[str, list[str]]:
    """Warn once when quantised source weights are quantised again to a lower type (quality is lost twice); returns :func:`requantised`."""
    if source is None:
        return {}
    again = requantised(tensors, plan)
    if again:
        n = sum(len(v) for v in again.values())
        types = ", ".join(f"{k} x{len(v)}" for k, v in again.items())
        log.warning(
            "%s: %d tensors made from the checkpoint's %s weights (%s) are quantised again (%s): quality is lost twice; "
            "%s", where, n, source.method, "; ".join(source.kinds), types,
            "without --allow-requantize they are written as the checkpoint stores them" if source.method == MXFP4_METHOD
            else "--type q8_0 or bf16 keeps what the checkpoint holds",
        )
    return again
