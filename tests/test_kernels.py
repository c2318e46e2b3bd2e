"""quantkit.format.ggml.quantize: blocked, multi-threaded, widening in the threads -- same bytes as one plain kernel call.

The reference is llama.cpp's ``ggml_quantize_chunk`` called once on the whole
float32 matrix (one thread, no blocks); BF16 is widened for it with numpy's exact
bit shift, F16 with numpy's own conversion.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import gguf

from quantkit.format import ggml

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


def test_quantisations_in_flight_keep_their_bytes():
    """Two jobs started on one Scratch (as convert keeps one piece in flight): each result equals a plain call."""
    rng = np.random.default_rng(5)
    a, b = (rng.standard_normal((64, 512)).astype(np.float32) for _ in range(2))
    want_a, want_b = reference(a, Q.Q4_K, None), reference(b, Q.Q4_K, None)
    scratch = ggml.Scratch()
    done: list[str] = []
    ja = ggml.start_quantize(a.copy(), Q.Q4_K, None, scratch).then(lambda: done.append("a"))
    jb = ggml.start_quantize(b.copy(), Q.Q4_K, None, scratch)  # the source copies are only referenced by the jobs
    assert done == []
    assert jb.result().tobytes() == want_b
    assert ja.result().tobytes() == want_a  # b went to the other buffer
    assert ja.result().tobytes() == want_a and done == ["a"]  # result() again: same bytes, callbacks ran once
    jc = ggml.start_quantize(a, Q.Q4_K, None, scratch)  # reuses a's buffer; b's stays valid
    assert jc.result().tobytes() == want_a and jb.result().tobytes() == want_b


class _FakeJob(ggml.Pending):
    def __init__(self, name: str, log: list[str]) -> None:  # noqa: D107 - a Pending that only records
        self.name, self.log = name, log

    def result(self) -> np.ndarray:
        self.log.append(f"wait {self.name}")
        return np.frombuffer(self.name.encode(), dtype=np.uint8)


def _pieces(log: list[str], kinds: str):
    for i, kind in enumerate(kinds):
        log.append(f"make {i}")
        yield 0, (_FakeJob(str(i), log) if kind == "q" else np.frombuffer(str(i).encode(), dtype=np.uint8))


def test_in_flight_order():
    """convert's writer loop: a quantised piece's successor starts before it is waited for; a plain piece is written before the next is made."""
    from quantkit.pipeline.convert import _in_flight

    log: list[str] = []
    for _, data in _in_flight(_pieces(log, "qqpq")):
        log.append(f"write {data.tobytes().decode()}")
    assert log == ["make 0", "make 1", "wait 0", "write 0", "make 2", "wait 1", "write 1", "write 2", "make 3", "wait 3", "write 3"]
    log.clear()
    stream = _in_flight(_pieces(log, "qqq"))
    next(stream)
    stream.close()  # a failed write: the piece still running is waited for before the sources close
    assert log == ["make 0", "make 1", "wait 0", "wait 1"]


@pytest.mark.parametrize("n", [1, 1000, (1 << 20) + 12345])
def test_bf16_to_f16_in_one_pass_equals_two_passes(n):
    """BF16 -> F16 through per-thread float32 blocks (no full-size float32 copy) gives the two-pass bytes,
    specials included: values beyond F16's range become inf, tiny ones F16 subnormals or zero, NaN stays NaN."""
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n, dtype=np.float32) * rng.choice([1e-8, 1e-3, 1.0, 1e3, 1e6], n).astype(np.float32)).view(np.uint32)
    x = (x >> 16).astype(np.uint16)
    x[: min(n, 4)] = [0x7F80, 0xFF80, 0x7FC1, 0x0001][: min(n, 4)]  # +inf, -inf, NaN, the smallest BF16 subnormal
    want = ggml.convert(ggml.convert(x, "bf16", "f32"), "f32", "f16")
    got = ggml.convert_via_f32(x, "bf16", "f16")
    assert got.dtype == np.float16 and got.shape == x.shape
    assert got.view(np.uint16).tobytes() == want.view(np.uint16).tobytes()


def test_prepare_llama_imports_the_bindings_only_and_the_package_stays_whole():
    """prepare_llama leaves llama-cpp-python's high-level half (Llama, chat formats, jinja2) unimported until a name
    outside the bindings is asked for; then the package is the whole package, with the bindings' own objects."""
    code = """if True:
        import sys
        from quantkit.format import ggml
        ggml.prepare_llama()
        import llama_cpp
        from llama_cpp import _internals, _logger  # submodules import without the rest
        low = sys.modules["llama_cpp.llama_cpp"]
        assert llama_cpp.llama_backend_init is low.llama_backend_init
        assert llama_cpp.llama_log_callback is low.llama_log_callback
        lazy = [m for m in ("llama_cpp.llama", "llama_cpp.llama_chat_format", "jinja2") if m in sys.modules]
        assert not lazy, lazy
        from llama_cpp import Llama  # the rest, on first use
        assert "llama_cpp.llama" in sys.modules and Llama is sys.modules["llama_cpp.llama"].Llama
        assert llama_cpp.__version__ and llama_cpp.llama_backend_init is low.llama_backend_init
        import llama_cpp.llama_chat_format as lcf
        assert lcf.Jinja2ChatFormatter
        try:
            llama_cpp.no_such_name
        except AttributeError as e:
            assert "no_such_name" in str(e)
        else:
            raise AssertionError("no AttributeError")
        print("ok")
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
