"""llama.cpp's own quantisation kernels, called through ctypes.

``libggml-base`` ships inside llama-cpp-python and exports
``ggml_quantize_chunk``: the exact kernels llama-quantize uses.  Rows are split
across a thread pool; ctypes releases the GIL for the duration of each C call,
so every core works.

Not for: deciding which type a tensor gets (``quantkit.plan``).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np

from quantkit.errors import QuantkitError

_LIBNAMES = {"linux": "libggml-base.so", "darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}


@functools.lru_cache(maxsize=1)
def lib() -> ctypes.CDLL:
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise QuantkitError("llama-cpp-python is not installed; fix: pip install llama-cpp-python")
    libdir = Path(spec.origin).parent / "lib"
    path = libdir / _LIBNAMES.get(sys.platform, "libggml-base.so")
    if not path.exists():
        raise QuantkitError(f"{path}: llama.cpp's ggml-base library is missing; fix: reinstall llama-cpp-python")
    so = ctypes.CDLL(str(path))
    so.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    so.ggml_quantize_chunk.restype = ctypes.c_size_t
    so.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    so.ggml_row_size.restype = ctypes.c_size_t
    so.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    so.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    so.ggml_quantize_init.argtypes = [ctypes.c_int]
    so.ggml_quantize_init.restype = None
    return so


def row_size(qtype: gguf.GGMLQuantizationType, n_per_row: int) -> int:
    return int(lib().ggml_row_size(int(qtype), n_per_row))


def requires_imatrix(qtype: gguf.GGMLQuantizationType) -> bool:
    return bool(lib().ggml_quantize_requires_imatrix(int(qtype)))


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="qk-quant")


def quantize(x: np.ndarray, qtype: gguf.GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantise a float32 matrix (rows x n_per_row) with llama.cpp's kernel; returns raw bytes (uint8)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_per_row = x.shape[-1]
    nrows = x.size // n_per_row
    so = lib()
    rs = row_size(qtype, n_per_row)
    out = np.empty(nrows * rs, dtype=np.uint8)
    qm = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n_per_row,):
            raise ValueError(f"imatrix has {imatrix.size} values, rows have {n_per_row}")
        qm = imatrix.ctypes.data
    so.ggml_quantize_init(int(qtype))
    workers = os.cpu_count() or 1
    rows_per = max(1, -(-nrows // (workers * 4)))
    src, dst = x.ctypes.data, out.ctypes.data

    def run(first: int) -> int:
        n = min(rows_per, nrows - first)
        return int(so.ggml_quantize_chunk(int(qtype), src, dst, first * n_per_row, n, n_per_row, qm))

    done = sum(_pool().map(run, range(0, nrows, rows_per))) if nrows > rows_per else run(0)
    if done != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {done} bytes, expected {out.nbytes}")
    return out
