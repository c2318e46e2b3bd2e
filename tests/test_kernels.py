"""quantkit.ggml.quantize: blocked, multi-threaded, widening in the threads -- same bytes as one plain kernel call.

The reference is llama.cpp's ``ggml_quantize_chunk`` called once on the whole
float32 matrix (one thread, no blocks); BF16 is widened for it with numpy's exact
bit shift, F16 with numpy's own conversion.
"""

from __future__ import annotations

import numpy as np
import pytest

import gguf

from quantkit import ggml

Q = gguf.GGMLQuantizationType


def reference(x32: np.ndarray, qtype: Q, imatrix: np.ndarray | None) -> bytes:
    rows, cols = x32.shape
    out = np.empty(rows * ggml.row_size(qtype, cols), dtype=np.uint8)
    so = ggml.lib()
    so.ggml_quantize_init(int(qtype))
    qm = None if imatrix is None else imatrix.ctypes.data
    n = so.ggml_quantize_chunk(int(qtype), x32.ctypes.data, out.ctypes.data, 0, rows, cols, qm)
    assert n == out.nbytes
    return out.tobytes()


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.IQ4_XS, Q.Q8_0, Q.Q5_0])
@pytest.mark.parametrize("rows,cols", [(1, 256), (7, 512), (301, 256), (3, ggml.BLOCK_ELEMS + 256), (130, 2048)])
@pytest.mark.parametrize("source", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("weighted", [False, True])
def test_quantize_equals_one_kernel_call(qtype, rows, cols, source, weighted):
    rng = np.random.default_rng(rows * 7919 + cols)
    x32 = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    x32[0, :8] = [0, -0.0, 1e-8, -3, 3, 1e-30, 65000, -1e-5]  # zeros, subnormal-ish and large values
    if source == "BF16":
        x = (x32.view(np.uint32) >> 16).astype(np.uint16)
        x32 = (x.astype(np.uint32) << 16).view(np.float32)
    elif source == "F16":
        x = x32.astype(np.float16)
        x32 = x.astype(np.float32)
    else:
        x = x32
    imatrix = rng.uniform(0.1, 5.0, cols).astype(np.float32) if weighted else None
    want = reference(np.ascontiguousarray(x32), qtype, imatrix)
    assert ggml.quantize(x, qtype, imatrix).tobytes() == want
    scratch = ggml.Scratch()
    assert ggml.quantize(x, qtype, imatrix, scratch).tobytes() == want
    assert ggml.quantize(x, qtype, imatrix, scratch).tobytes() == want  # reused buffers give the same bytes


def test_quantize_rejects_a_wrong_imatrix_length():
    with pytest.raises(ValueError, match="imatrix has 3 values, rows have 256"):
        ggml.quantize(np.zeros((2, 256), np.float32), Q.Q4_K, np.ones(3, np.float32))
