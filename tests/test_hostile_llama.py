"""What happens while llama.cpp runs (issue #12): signals, aborts, NaN logits, and files llama.cpp misreads.

- A signal (Ctrl-C, SIGTERM, SIGHUP) that arrives while llama.cpp runs is handled in the next Python code of the
  main thread: usually a callback quantkit handed to llama.cpp (the eval callback).  ctypes used to print
  "Exception ignored on calling ctypes callback" and carry on: the command then finished, exited 0 and wrote
  its output.  Now the command stops with its one line, exit 128+N, and nothing at the output path.
- An abort inside llama.cpp (past quantkit's checks) prints one line on every path that hands it a file,
  never a gdb backtrace.
- Non-finite logits fail ``eval ppl`` / ``eval kld`` / ``imatrix`` instead of reporting NaN as a result.
- Container corner cases where llama.cpp's own GGUF library (``gguf_init_from_file``, called here through
  ctypes) is the reference: nested arrays (it refuses them; so does quantkit's reader), a tensor count lowered
  in the header (it reads the file and misses a tensor; quantkit's model check refuses it).

Every run that could abort or hang runs in a subprocess with a timeout.
"""

from __future__ import annotations

import ctypes
import os
import re
import resource
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURE
from quantkit.format import ggml, gguf_spec
from quantkit.pipeline.convert import convert
from quantkit.errors import GGUFFormatError, QuantkitError
from quantkit.engine.gguf_check import check_before_load
from quantkit.format.gguf_read import read_gguf
from quantkit.format.gguf_write import MetaValue
from test_hostile_gguf import _gguf_py_copy, rewrite, tensor_list

V = gguf_spec.GGUFValueType
TEXT = "To be, or not to be, that is the question. "
ENV = {k: v for k, v in os.environ.items() if k not in ("GGML_NO_BACKTRACE", "QUANTKIT_SLOW_EXIT")}  # quantkit sets the first itself


def _no_core() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # an abort may dump core


@pytest.fixture(scope="module")
def f32(fixture_gguf) -> Path:
    return fixture_gguf("f32")


@pytest.fixture(scope="module")
def q8(fixture_gguf) -> Path:
    return fixture_gguf("q8_0")


def _lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()]


# --------------------------------------------------------------------------- 1. signals while llama.cpp runs

#: the quantkit command, with a marker on stdout once the first chunk is handed to llama.cpp
MARKED = """
import sys
from quantkit.engine import session
decode = session.EvalSession.eval_chunks
def marked(self, *args, **kwargs):
    if not getattr(marked, "said", False):
        marked.said = True
        sys.stdout.write("decoding\\n")
        sys.stdout.flush()
    return decode(self, *args, **kwargs)
session.EvalSession.eval_chunks = marked
sys.argv = ["quantkit", *sys.argv[1:]]
from quantkit.cli.main import run
run()
"""

#: command -> (arguments, output); each would run for many seconds (thousands of chunks, one thread) if not stopped
SIGNAL_RUNS = {
    "imatrix": (["imatrix", "{q8}", "--text", "{text}", "--ctx", "16", "--chunks", "3000", "-o", "{out}.gguf"], "{out}.gguf"),
    "kld": (["eval", "kld", "{f32}", "{q8}", "--text", "{text}", "--ctx", "16", "--chunks", "800", "--json", "{out}.json",
             "--cache-dir", "{cache}"], "{out}.json"),
    "ppl": (["eval", "ppl", "{q8}", "--text", "{text}", "--ctx", "16", "--json", "{out}.json"], "{out}.json"),
}


@pytest.mark.parametrize("command,sig", [("imatrix", signal.SIGTERM), ("imatrix", signal.SIGHUP), ("kld", signal.SIGINT),
                                         ("kld", signal.SIGTERM), ("ppl", signal.SIGTERM)])
def test_a_signal_while_llama_cpp_runs_stops_the_command(tmp_path, f32, q8, command, sig):
    """Sent once the first chunk is being decoded: the command stops at once with its one line, exit 128+N, no output."""
    text = tmp_path / "calib.txt"
    text.write_text(TEXT * 5000, encoding="utf-8")
    args, out = SIGNAL_RUNS[command]
    fill = dict(q8=q8, f32=f32, text=text, out=tmp_path / "out", cache=tmp_path / "kc")
    argv = [a.format(**fill) for a in args] + ["--threads", "1", "--no-progress"]
    p = subprocess.Popen([sys.executable, "-c", MARKED, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
    try:
        assert p.stdout.readline() == "decoding\n"
        try:
            p.wait(timeout=0.4)  # well into the run, which takes far longer
        except subprocess.TimeoutExpired:
            pass
        assert p.poll() is None, "the run ended before the signal"
        p.send_signal(sig)
        _, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 128 + sig, (p.returncode, stderr[-3000:])
    head = "interrupted: " if sig == signal.SIGINT else f"terminated: signal {int(sig)}; "
    far = {"imatrix": r"stopped after \d+ of 3000 chunks \([\d,]+ tokens, [\d.]+ s\); ",  # each says how far it got
           "kld": r"stopped after \d+ of 800 chunks of the base; ", "ppl": r"stopped after \d+ of \d+ chunks; "}[command]
    lines = _lines(stderr)
    assert len(lines) == 1 and re.fullmatch(re.escape(head) + far + "nothing was written at the output path", lines[0]), stderr[-3000:]
    assert not Path(out.format(**fill)).exists()
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name not in ("calib.txt", "kc")]
    assert not leftovers, leftovers  # no partial output, no half-written base cache


def test_an_interrupt_in_any_ctypes_callback_is_kept_and_raised_after_the_call():
    """Even raised before a callback's first line could catch it (or in llama-cpp-python's own callbacks),
    the interrupt is not lost: the C call returns, then :func:`ggml.raise_pending` raises it."""
    ggml.prepare_llama()
    libc = ctypes.CDLL(None)
    cmp_t = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
    calls = []

    def compare(a, b):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as the CLI's handler raises Terminated / KeyboardInterrupt
        return 0

    items = (ctypes.c_int * 8)()
    libc.qsort(items, 8, ctypes.sizeof(ctypes.c_int), cmp_t(compare))  # C calls back into Python
    assert len(calls) > 3  # C carried on: ctypes cannot unwind through it
    with pytest.raises(KeyboardInterrupt):
        ggml.raise_pending()
    ggml.raise_pending()  # raised once, then forgotten

    def boom(*_):
        raise QuantkitError("x")

    assert ggml.guarded(boom, on_error=False)(1, 2) is False
    assert ggml._abort_requested(None) is True  # llama.cpp's abort callback: stop the graph
    with pytest.raises(QuantkitError, match="x"):
        ggml.raise_pending()
    assert ggml._abort_requested(None) is False


# --------------------------------------------------------------------------- 2. an abort inside llama.cpp: one line on every path

#: the quantkit command with quantkit's model check switched off, so that llama.cpp's own assert fires
UNCHECKED = """
import sys
from quantkit.engine import gguf_check
gguf_check.check_model = lambda g: None
sys.argv = ["quantkit", *sys.argv[1:]]
from quantkit.cli.main import run
run()
"""


@pytest.mark.parametrize("command", ["ppl", "kld", "imatrix", "run"])
def test_an_abort_inside_llama_cpp_is_one_line_on_every_path(tmp_path, f32, command):
    """A negative epsilon (GGML_ASSERT(eps >= 0) in ggml's RMS norm): before, eval ppl / kld / imatrix printed
    llama.cpp's message and a gdb backtrace of ~190 lines (quantkit's abort hook sat on a second copy of libggml)."""
    bad = rewrite(f32, tmp_path / "eps.gguf", {"llama.attention.layer_norm_rms_epsilon": MetaValue(-1.0, V.FLOAT32)})
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 40, encoding="utf-8")
    args = {
        "ppl": ["eval", "ppl", str(bad), "--text", str(text), "--ctx", "16", "--chunks", "2"],
        "kld": ["eval", "kld", str(f32), str(bad), "--text", str(text), "--ctx", "16", "--chunks", "2", "--cache-dir", str(tmp_path / "kc")],
        "imatrix": ["imatrix", str(bad), "--text", str(text), "--ctx", "16", "--chunks", "2", "-o", str(tmp_path / "i.gguf")],
        "run": ["run", str(bad), "-p", "hello", "-n", "2"],
    }[command]
    r = subprocess.run([sys.executable, "-c", UNCHECKED, *args, "--threads", "1"], capture_output=True, text=True, timeout=300,
                       env=ENV, preexec_fn=_no_core)
    assert r.returncode in (-6, 134), (r.returncode, r.stderr[-3000:])
    assert r.stderr.endswith("\n") and len(_lines(r.stderr)) == 1, r.stderr[-3000:]
    line = r.stderr.strip()
    assert line.startswith("error: llama.cpp aborted: ops.cpp:") and "GGML_ASSERT(eps >= 0.0f)" in line and "; fix: " in line, line
    assert not (tmp_path / "i.gguf").exists()


# --------------------------------------------------------------------------- 3. non-finite logits are an error, not a result


def _with_nan(f32: Path, dst: Path, name: str, count: int) -> Path:
    """``f32`` with the first ``count`` values of tensor ``name`` NaN."""
    nan = np.full(count, np.nan, dtype=np.float32).tobytes()
    return rewrite(f32, dst, tensors=[(n, s, q, nan + b[len(nan) :] if n == name else b) for n, s, q, b in tensor_list(f32)])


@pytest.fixture(scope="module")
def nan_model(f32, tmp_path_factory) -> Path:
    """The fixture with NaN in the first row of output.weight: every check passes (they read no matrix data),
    and every position's logit of token 0 is NaN."""
    return _with_nan(f32, tmp_path_factory.mktemp("nan") / "nan.gguf", "output.weight", 128)


def test_non_finite_norms_are_refused(tmp_path, f32):
    """NaN in a norm of a quantised model: ggml rounds the NaN activations to integers when it quantises them for
    the matmul, and llama.cpp computes finite garbage (the audit's nan_in_norm: PPL 97 and exit 0)."""
    bad = _with_nan(f32, tmp_path / "norm.gguf", "blk.0.attn_norm.weight", 4)
    with pytest.raises(GGUFFormatError, match=r"tensor 'blk.0.attn_norm.weight' holds non-finite values \(first at index 0: nan\)") as e:
        check_before_load(bad)
    assert "\n" not in str(e.value) and "fix:" in str(e.value)
    out = tmp_path / "o.gguf"
    with pytest.raises(QuantkitError, match="non-finite values"):
        convert(bad, out, "q8_0")
    assert not out.exists()


def _non_finite(e: pytest.ExceptionInfo, model: Path) -> None:
    msg = str(e.value)
    assert "\n" not in msg and f"llama.cpp computed non-finite logits for chunk 1 of {model}" in msg and "fix: re-convert it" in msg, msg


def test_non_finite_logits_fail_perplexity_kld_and_imatrix(tmp_path, f32, nan_model):
    from quantkit.evals.kld import base_logprobs, compare
    from quantkit.evals.perplexity import perplexity
    from quantkit.pipeline.imatrix_collect import collect_imatrix

    text = TEXT * 40
    check_before_load(nan_model)  # nothing in the header is wrong
    with pytest.raises(QuantkitError) as e:
        perplexity(nan_model, text, n_ctx=16, threads=1)  # before: ppl = nan, "success"
    _non_finite(e, nan_model)
    with pytest.raises(QuantkitError) as e:
        base_logprobs(nan_model, text, 16, 2, threads=1, cache_dir=tmp_path / "a")
    _non_finite(e, nan_model)
    assert not list((tmp_path / "a").iterdir())  # no cache entry of NaNs
    base = base_logprobs(f32, text, 16, 2, threads=1, cache_dir=tmp_path / "b")
    with pytest.raises(QuantkitError) as e:
        compare(base, nan_model, text, threads=1)
    _non_finite(e, nan_model)
    with pytest.raises(QuantkitError) as e:
        collect_imatrix(nan_model, text, n_ctx=16, n_chunks=2, threads=1)  # the activations it collects are finite
    _non_finite(e, nan_model)


def test_cli_eval_ppl_on_nan_logits_is_one_line(tmp_path, nan_model):
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 40, encoding="utf-8")
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "quantkit.cli", "eval", "ppl", str(nan_model), "--text", str(text), "--ctx", "16",
                        "--json", str(out), "--threads", "1"], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 1 and _lines(r.stderr) == [r.stderr.strip()] and "non-finite logits for chunk 1" in r.stderr, r.stderr[-3000:]
    assert not out.exists()


# --------------------------------------------------------------------------- 4./5. the container as llama.cpp's GGUF library reads it


class _GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def llama_cpp_reads(path: Path) -> int | None:
    """llama.cpp's ``gguf_init_from_file``: the tensor count it reads, or None when it refuses the file."""
    so = ggml.lib()
    so.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GGUFInitParams]
    so.gguf_init_from_file.restype = ctypes.c_void_p
    so.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    so.gguf_get_n_tensors.restype = ctypes.c_int64
    so.gguf_free.argtypes = [ctypes.c_void_p]
    ctx = so.gguf_init_from_file(str(path).encode(), _GGUFInitParams(True, None))
    if not ctx:
        return None
    try:
        return int(so.gguf_get_n_tensors(ctx))
    finally:
        so.gguf_free(ctx)


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + payload


@pytest.mark.parametrize("payload", [
    struct.pack("<IIQ", V.ARRAY, V.ARRAY, 0),  # an empty array of arrays
    struct.pack("<IIQ", V.ARRAY, V.ARRAY, 1) + struct.pack("<IQ", V.UINT32, 2) + struct.pack("<II", 1, 2),  # holding one int array
], ids=["empty", "one int array"])
def test_nested_arrays_are_refused_as_llama_cpp_refuses_them(tmp_path, payload):
    """gguf-py writes and reads arrays of arrays; llama.cpp's GGUF library refuses the file ("invalid GGUF type"), and
    so does quantkit's reader (inspect included): a file it shows is one llama.cpp opens."""
    path = tmp_path / "n.gguf"
    kvs = _kv("general.architecture", V.STRING, struct.pack("<Q", 5) + b"llama") + struct.pack("<Q", 8) + b"x.nested" + payload
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + kvs)
    assert llama_cpp_reads(path) is None
    with pytest.raises(GGUFFormatError, match=r"'x.nested': an array of arrays, which llama.cpp's GGUF reader refuses") as e:
        read_gguf(path)
    assert "\n" not in str(e.value) and "fix:" in str(e.value)
    ok = tmp_path / "ok.gguf"  # the same file with a plain array: both read it
    ok.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + kvs[: -len(payload)] + struct.pack("<IIQ", V.ARRAY, V.UINT32, 1) + struct.pack("<I", 7))
    assert llama_cpp_reads(ok) == 0 and read_gguf(ok).metadata["x.nested"] == [7]


def _lower_tensor_count(data: bytes) -> bytes:
    n = struct.unpack_from("<Q", data, 8)[0]
    return data[:8] + struct.pack("<Q", n - 1) + data[16:]


def test_a_lowered_tensor_count_is_refused(tmp_path, f32):
    """The header says one tensor fewer than the table holds: llama.cpp's library reads the file (the last entry then
    lies where the data should start), and the llama loader runs it without output.weight (tied embeddings: garbage)."""
    bad = tmp_path / "minus1.gguf"
    bad.write_bytes(_lower_tensor_count(f32.read_bytes()))
    n = len(read_gguf(f32).tensors)
    assert llama_cpp_reads(bad) == n - 1
    assert len(read_gguf(bad).tensors) == n - 1  # inspect still shows it, as llama.cpp's library reads it
    with pytest.raises(GGUFFormatError, match=rf"bytes follow the data of the last tensor .*tensor count \({n - 1}\) may be lower") as e:
        check_before_load(bad)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)
    out = tmp_path / "o.gguf"
    with pytest.raises(QuantkitError, match="may be lower than the tensors"):
        convert(bad, out, "q8_0")  # requantise refuses it too
    assert not out.exists()


def test_padding_and_trailing_bytes_are_checked(tmp_path, f32):
    data = f32.read_bytes()
    g = read_gguf(f32)
    assert g.table_end < g.data_offset  # the fixture has header padding to spoil
    spoiled = tmp_path / "pad.gguf"
    spoiled.write_bytes(data[: g.table_end] + b"\x01" + data[g.table_end + 1 :])
    with pytest.raises(GGUFFormatError, match=rf"padding between the tensor table and the tensor data .* is not zeros \(byte {g.table_end}\)"):
        check_before_load(spoiled)
    appended = tmp_path / "app.gguf"
    appended.write_bytes(data + b"\x01" * 100)
    with pytest.raises(GGUFFormatError, match="100 bytes follow the data of the last tensor"):
        check_before_load(appended)
    zeros = tmp_path / "zeros.gguf"  # zeros past the padding are still bytes no writer puts there
    zeros.write_bytes(data + bytes(g.alignment))
    with pytest.raises(GGUFFormatError, match=f"{g.alignment} bytes follow the data of the last tensor"):
        check_before_load(zeros)
    cut = tmp_path / "cut.gguf"  # a writer that leaves the last tensor unpadded: accepted (llama.cpp reads it)
    last = g.tensors[-1]
    cut.write_bytes(data[: g.data_offset + last.offset + last.nbytes])
    check_before_load(cut)


def test_files_from_every_writer_pass(tmp_path, fixture_gguf):
    """quantkit's own conversions, gguf-py's GGUFWriter (alignment 32 and 64) and llama.cpp's writer
    (llama_model_quantize) all lay out header padding and tensor data as the check expects."""
    for t in ("f32", "bf16", "q8_0"):
        check_before_load(fixture_gguf(t))
    for align in (32, 64):
        check_before_load(_gguf_py_copy(fixture_gguf("bf16"), tmp_path / f"py{align}.gguf", align))
    out = tmp_path / "lq.gguf"
    code = (
        "import sys, llama_cpp\n"
        "p = llama_cpp.llama_model_quantize_default_params(); p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0\n"
        "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(fixture_gguf("f32")), str(out)], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    check_before_load(out)


def test_convert_keeps_the_fixture_valid(tmp_path):
    """A fresh conversion (the writer under test) passes the layout check at once."""
    check_before_load(convert(FIXTURE, tmp_path / "m.gguf", "q8_0").output)
