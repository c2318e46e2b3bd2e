"""llama.cpp's own quantisation kernels, called through ctypes.

``libggml-base`` ships inside llama-cpp-python and exports
``ggml_quantize_chunk``: the exact kernels llama-quantize uses.  Rows are split
across a thread pool; ctypes releases the GIL for the duration of each C call,
so every core works.

:func:`install_abort_message` makes a ``GGML_ASSERT`` / ``GGML_ABORT`` inside
llama.cpp say why before the process dies (llama-cpp-python points stderr at
/dev/null while it loads a model, so llama.cpp's own message is lost).
:func:`prepare_llama` readies the process before llama.cpp runs anything: that
message, no gdb backtrace, and exceptions (signals) raised inside the Python
callbacks llama.cpp calls kept for :func:`raise_pending` instead of lost.

Not for: deciding which type a tensor gets (``quantkit.policy.plan``).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import os
import re
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from quantkit.format import gguf_spec
from quantkit.errors import QuantkitError

_SUFFIX = {"linux": ".so", "darwin": ".dylib", "win32": ".dll"}
os.environ.setdefault("GGML_NO_BACKTRACE", "1")  # an abort inside ggml must not start gdb (a 190-line backtrace); read when it aborts


def _load(stem: str) -> ctypes.CDLL:
    """The copy of ``lib<stem>`` that libllama itself links to.

    The wheel ships ``libggml-base.so``, ``.so.0`` and ``.so.0.25.3`` as three separate files (not
    links); libllama's DT_NEEDED names ``libggml-base.so.0``.  Loading another of them maps a second
    copy of ggml with its own globals: an abort callback set there is never seen by llama.cpp.
    The versioned name with the fewest parts (``.so.0``) is the one the loader picks.
    """
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise QuantkitError("llama-cpp-python is not installed; fix: pip install llama-cpp-python")
    prefix = "" if sys.platform == "win32" else "lib"
    folder = Path(spec.origin).parent / "lib"
    path = folder / f"{prefix}{stem}{_SUFFIX.get(sys.platform, '.so')}"
    versioned = sorted(folder.glob(f"{path.name}.*"), key=lambda p: (p.name.count("."), p.name)) if sys.platform == "linux" else []
    if versioned:
        path = versioned[0]
    if not path.exists():
        raise QuantkitError(f"{path}: llama.cpp's {stem} library is missing; fix: reinstall llama-cpp-python")
    return ctypes.CDLL(str(path))


@functools.lru_cache(maxsize=1)
def cpu_lib() -> ctypes.CDLL:
    """ggml-cpu: SIMD row conversions (bit-identical to the scalar ones, 10x faster than numpy)."""
    so = _load("ggml-cpu")
    for name in ("ggml_cpu_bf16_to_fp32", "ggml_cpu_fp32_to_fp16", "ggml_cpu_fp16_to_fp32"):
        fn = getattr(so, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
    so.ggml_cpu_init.argtypes = []
    so.ggml_cpu_init.restype = None
    so.ggml_cpu_init()
    return so


@functools.lru_cache(maxsize=1)
def lib() -> ctypes.CDLL:
    so = _load("ggml-base")
    so.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    so.ggml_quantize_chunk.restype = ctypes.c_size_t
    so.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    so.ggml_row_size.restype = ctypes.c_size_t
    so.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    so.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    so.ggml_quantize_init.argtypes = [ctypes.c_int]
    so.ggml_quantize_init.restype = None
    _set_abort_callback(so)  # every use of llama.cpp's kernels, quantising included, says why if it aborts
    return so


ABORT_FIX = "fix: quantkit should have refused this input with a reason first; report this line and the command as a quantkit bug"
_ABORT_PROTO = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
_abort_hook: tuple[Any, int] | None = None  # (the C callback, the stderr copy it writes to): alive for the process
_abort_lock = threading.Lock()


def abort_line(message: bytes | None) -> bytes:
    """The one line written when llama.cpp aborts: its message (``file:line: what``), capped, on one line."""
    text = " ".join((message or b"").decode("utf-8", "replace").split())
    text = re.sub(r"^\S*/(?=[^/\s]+:\d+:)", "", text)  # the build directory of the source file: noise
    if len(text) > 300:
        text = text[:300] + "…"
    return f"error: llama.cpp aborted: {text or 'no message'}; {ABORT_FIX}\n".encode("utf-8", "replace")


def install_abort_message() -> bool:
    """Make an abort inside llama.cpp (``GGML_ASSERT``, ``GGML_ABORT``) first write :func:`abort_line` to stderr.

    Registered once per process through ``ggml_set_abort_callback`` (:func:`lib` does it on
    first use).  The line goes to a copy of the process's stderr taken then, so it is seen
    even while llama-cpp-python has pointed stderr at /dev/null (it does while it loads a
    model).  The process still aborts (SIGABRT): llama.cpp's state cannot be trusted after a
    failed assert.  False when this libggml has no such hook.
    """
    lib()
    return _abort_hook is not None


def _set_abort_callback(so: ctypes.CDLL) -> None:
    global _abort_hook
    with _abort_lock:
        register = getattr(so, "ggml_set_abort_callback", None)
        if _abort_hook is not None or register is None:
            return
        register.argtypes = [_ABORT_PROTO]
        register.restype = ctypes.c_void_p  # the previous callback (llama.cpp's default: print, backtrace): replaced, not chained
        fd = os.dup(2)

        said = threading.Event()  # several threads may fail the same assert: one line is enough

        def on_abort(message: bytes | None) -> None:
            try:
                if not said.is_set():
                    said.set()
                    os.write(fd, abort_line(message))
            except BaseException:  # nothing may unwind into C; the abort follows regardless
                pass

        callback = _ABORT_PROTO(on_abort)
        register(callback)
        _abort_hook = (callback, fd)


# --- Python code that llama.cpp calls back into -------------------------------------------------------------------------
#
# A Python exception cannot unwind through C: ctypes prints "Exception ignored on calling ctypes callback"
# and returns to llama.cpp, which carries on.  Ctrl-C (KeyboardInterrupt) and SIGTERM / SIGHUP (the CLI
# raises quantkit.errors.Terminated) arrive exactly there while llama.cpp runs, since a Python signal
# handler runs in the next Python code of the main thread: a callback.  So every exception raised in a
# callback is kept here (the first one), llama.cpp is asked to stop (:data:`ABORT_CALLBACK`, which llama.cpp
# polls after every graph node, returns true) and :func:`raise_pending` raises it once the llama.cpp call
# returns.  A handler may even run before a callback's first line (a ``try`` cannot cover that), or in
# llama-cpp-python's own callbacks (its log and sampler callbacks): a ``sys.unraisablehook`` keeps
# those interrupts too.

_pending: list[BaseException] = []  # at most one: the first exception raised inside a callback
_pending_lock = threading.RLock()


def keep_pending(e: BaseException) -> None:
    """Remember ``e`` (raised inside a callback) for :func:`raise_pending`; the first one wins."""
    with _pending_lock:
        if not _pending:
            _pending.append(e)


def raise_pending() -> None:
    """Raise the exception a callback kept while llama.cpp ran (call it right after each llama.cpp call returns)."""
    with _pending_lock:
        e = _pending.pop() if _pending else None
    if e is not None:
        raise e


def guarded(fn: Callable[..., Any], on_error: Any = False) -> Callable[..., Any]:
    """``fn`` for use as a C callback: any exception (BaseException included) is kept and ``on_error`` returned."""

    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except BaseException as e:  # noqa: BLE001  (nothing may unwind into C: raised again by raise_pending)
            keep_pending(e)
            return on_error

    return call


def _abort_requested(_data: Any) -> bool:
    """llama.cpp's ``abort_callback``: true (stop the graph now) once a callback has kept an exception."""
    try:
        return bool(_pending)
    except BaseException as e:  # noqa: BLE001  (a signal handler ran here: stop)
        keep_pending(e)
        return True


_ABORT_PROTO_BOOL = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p)  # ggml_abort_callback: bool (*)(void *)
ABORT_CALLBACK = _ABORT_PROTO_BOOL(_abort_requested)  # module-level: alive as long as any context that holds it


def _on_unraisable(u: Any) -> None:
    """``sys.unraisablehook``: an interrupt raised inside any ctypes callback is kept, not printed and lost."""
    exc = getattr(u, "exc_value", None)
    if isinstance(exc, BaseException) and not isinstance(exc, Exception) and "ctypes callback" in (getattr(u, "err_msg", None) or ""):
        keep_pending(exc)
        return
    _previous_hook(u)


_previous_hook: Callable[[Any], None] = sys.unraisablehook
_prepared = False


def prepare_llama() -> None:
    """Call before llama-cpp-python loads llama.cpp: ggml prints no gdb backtrace on an abort
    (``GGML_NO_BACKTRACE``), libggml-base is the copy libllama uses (:func:`_load`), an abort says why
    in one line (:func:`install_abort_message`), and interrupts inside callbacks are kept (see above)."""
    global _prepared, _previous_hook
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    install_abort_message()
    if sys.unraisablehook is not _on_unraisable:  # again if someone replaced it since (pytest does, per test)
        _previous_hook = sys.unraisablehook
        sys.unraisablehook = _on_unraisable
    if not _prepared:
        _prepared = True
        _bindings_first()
        _filter_llama_log()


def _bindings_first() -> None:
    """Import llama-cpp-python's ctypes bindings without the rest of the package until something needs it.

    ``import llama_cpp`` runs its ``__init__``: the bindings (``llama_cpp.llama_cpp``, ~10 ms) and the high-level
    ``Llama`` with its chat formats (jinja2: ~40 ms more), a fifth of a short ``quantkit imatrix`` or ``eval``
    process, which call only the bindings.  The package is put in ``sys.modules`` with the bindings imported and its
    ``__init__`` not yet run; a name the bindings define resolves to them (the same objects ``__init__``'s
    ``from .llama_cpp import *`` would bind), any other name (``Llama``, ``__version__``, ...) runs ``__init__``
    first, in that module, so ``import llama_cpp`` anywhere later still sees the whole package.
    """
    import importlib
    import importlib.util

    if "llama_cpp" in sys.modules:
        return
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not installed (the caller's import says so) or not a plain package: import it the usual way
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["llama_cpp"] = pkg
    try:
        low = importlib.import_module("llama_cpp.llama_cpp")
    except BaseException:
        sys.modules.pop("llama_cpp", None)
        sys.modules.pop("llama_cpp.llama_cpp", None)
        raise
    lock = threading.RLock()
    done: list[bool] = []

    where = [Path(p) for p in spec.submodule_search_locations]

    def __getattr__(name: str) -> Any:
        if not done and not name.startswith("_") and name in low.__dict__:
            return low.__dict__[name]
        if not done and any((p / f"{name}.py").is_file() or (p / name / "__init__.py").is_file() for p in where):
            raise AttributeError(name)  # a submodule (``from llama_cpp import _logger``): the import system imports it
        with lock:
            if not done:
                done.append(True)
                spec.loader.exec_module(pkg)  # type: ignore[union-attr]
        try:
            return pkg.__dict__[name]
        except KeyError:
            raise AttributeError(f"module 'llama_cpp' has no attribute {name!r}") from None

    pkg.__getattr__ = __getattr__  # type: ignore[method-assign]


_log_hook: Any = None  # the C callback: alive for the process


def _filter_llama_log() -> None:
    """llama-cpp-python's log callback, guarded, and only when its logger is verbose (quantkit's ``--debug``).

    Its level table is off by one for this llama.cpp (``GGML_LOG_LEVEL_WARN`` = 3 counts as an error), so
    warnings reached stderr beside quantkit's one line ("n_ctx is not divisible by n_seq_max", and after an
    interrupt "decode: removing memory module entries ...").  Nothing is logged while an exception is pending.
    """
    global _log_hook
    try:
        import logging

        import llama_cpp
        from llama_cpp import _logger
    except ImportError:  # ggml's kernels without llama-cpp-python's bindings: nothing to filter
        return
    inner = _logger.llama_log_callback

    def log(level: int, text: bytes, user_data: Any) -> None:
        if not _pending and _logger.logger.isEnabledFor(logging.DEBUG):
            inner(level, text, user_data)

    _log_hook = llama_cpp.llama_log_callback(guarded(log, None))
    llama_cpp.llama_log_set(_log_hook, ctypes.c_void_p(0))


def row_size(qtype: gguf_spec.GGMLQuantizationType, n_per_row: int) -> int:
    return int(lib().ggml_row_size(int(qtype), n_per_row))


def requires_imatrix(qtype: gguf_spec.GGMLQuantizationType) -> bool:
    return bool(lib().ggml_quantize_requires_imatrix(int(qtype)))


_CPUS = os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def pool() -> ThreadPoolExecutor:
    """One thread per core for quantkit's parallel work (llama.cpp kernels, numpy ufuncs: both release the GIL)."""
    return ThreadPoolExecutor(max_workers=_CPUS, thread_name_prefix="qk-pool")


_CONVERT = {
    ("bf16", "f32"): ("ggml_cpu_bf16_to_fp32", np.uint16, np.float32),
    ("f16", "f32"): ("ggml_cpu_fp16_to_fp32", np.float16, np.float32),
    ("f32", "f16"): ("ggml_cpu_fp32_to_fp16", np.float32, np.float16),
}
_SPLIT = 1 << 20  # elements per thread task


class Scratch:
    """Grow-only buffers reused from call to call.

    A fresh 30 MB numpy array per piece is a fresh mmap from the allocator and
    thousands of page faults; reusing one buffer per role keeps a long
    conversion's working set warm.  A result that lives in a scratch buffer is
    only valid until the next call that uses the same buffer.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}
        self._turn = 1  # next_out's last buffer

    def get(self, role: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        dt = np.dtype(dtype)
        n = math.prod(shape) * dt.itemsize
        buf = self._bufs.get(role)
        if buf is None or buf.nbytes < n:
            buf = self._bufs[role] = np.empty(max(n, 1), dtype=np.uint8)
        return buf[:n].view(dt).reshape(shape)

    def next_out(self, nbytes: int) -> np.ndarray:
        """The next of two alternating byte buffers: a result lives until the second call after it."""
        self._turn = 1 - self._turn
        return self.get(f"out{self._turn}", (nbytes,), np.uint8)


def convert(x: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Element-wise float conversion with ggml's SIMD kernels, split across threads."""
    name, in_dtype, out_dtype = _CONVERT[(src, dst)]
    x = np.ascontiguousarray(x)
    if x.dtype != in_dtype:
        raise TypeError(f"{name} expects {np.dtype(in_dtype)}, got {x.dtype}")
    out = np.empty(x.shape, dtype=out_dtype)
    fn = getattr(cpu_lib(), name)
    n = x.size
    src_p, dst_p = x.ctypes.data, out.ctypes.data
    isz, osz = x.itemsize, out.itemsize

    def run(first: int) -> None:
        fn(src_p + first * isz, dst_p + first * osz, min(_SPLIT, n - first))

    if n <= _SPLIT:
        run(0)
    else:
        list(pool().map(run, range(0, n, _SPLIT)))
    return out


_CHAIN_BLOCK = 1 << 15  # elements per step of a two-step conversion: 128 KiB of float32 between the steps, in L2


def convert_via_f32(x: np.ndarray, src: str, dst: str) -> np.ndarray:
    """``src`` -> float32 -> ``dst`` (e.g. BF16 -> F16) in one pass: each thread widens a small block into its own
    float32 buffer and narrows it at once, so no full-size float32 copy is written and read back.

    Equal to ``convert(convert(x, src, "f32"), "f32", dst)`` element for element (the same kernels).
    """
    wname, in_dtype, _ = _CONVERT[(src, "f32")]
    nname, _, out_dtype = _CONVERT[("f32", dst)]
    x = np.ascontiguousarray(x)
    if x.dtype != in_dtype:
        raise TypeError(f"{wname} expects {np.dtype(in_dtype)}, got {x.dtype}")
    out = np.empty(x.shape, dtype=out_dtype)
    widen, narrow = getattr(cpu_lib(), wname), getattr(cpu_lib(), nname)
    n = x.size
    src_p, dst_p = x.ctypes.data, out.ctypes.data
    isz, osz = x.itemsize, out.itemsize

    def run(first: int) -> None:
        last = min(first + _SPLIT, n)
        buf = _block_buffer(_CHAIN_BLOCK)
        tmp = buf.ctypes.data
        for a in range(first, last, _CHAIN_BLOCK):
            k = min(_CHAIN_BLOCK, last - a)
            widen(src_p + a * isz, tmp, k)
            narrow(tmp, dst_p + a * osz, k)

    if n <= _SPLIT:
        run(0)
    else:
        list(pool().map(run, range(0, n, _SPLIT)))
    return out


_WIDEN = {np.dtype(np.uint16): "ggml_cpu_bf16_to_fp32", np.dtype(np.float16): "ggml_cpu_fp16_to_fp32"}
BLOCK_ELEMS = 1 << 16  # elements per quantising step: 256 KiB of float32, stays in a core's L2
MIN_BLOCK_ELEMS = 16384  # smaller matrices still use every core, in blocks no smaller than llama-quantize's chunks
_LOCAL_F32 = threading.local()  # per pool thread: the float32 block a BF16/F16 block is widened into


def _block_buffer(n: int) -> np.ndarray:
    buf = getattr(_LOCAL_F32, "buf", None)
    if buf is None or buf.size < n:
        buf = _LOCAL_F32.buf = np.empty(n, dtype=np.float32)
    return buf


class Pending:
    """A quantisation under way on the pool; :meth:`result` joins in on the blocks left, waits, and returns the bytes."""

    def __init__(self, work: Callable[[], int], helpers: list[Future[int]], out: np.ndarray, keep: tuple[Any, ...]) -> None:
        self._work: Callable[[], int] | None = work
        self._helpers = helpers
        self._out = out
        self._keep: tuple[Any, ...] | None = keep  # the source rows and importance weights the threads read from
        self._then: list[Callable[[], None]] = []

    @property
    def nbytes(self) -> int:
        """The size of the bytes :meth:`result` returns (known before they are made)."""
        return int(self._out.nbytes)

    def then(self, fn: Callable[[], None]) -> Pending:
        """Call ``fn`` once the bytes are done (e.g. drop the source pages they were made from)."""
        self._then.append(fn)
        return self

    def result(self) -> np.ndarray:
        if self._work is not None:
            work, self._work = self._work, None
            done = work() + sum(h.result() for h in self._helpers)
            self._helpers, self._keep = [], None
            if done != self._out.nbytes:
                raise RuntimeError(f"ggml_quantize_chunk wrote {done} bytes, expected {self._out.nbytes}")
            then, self._then = self._then, []
            for fn in then:
                fn()
        return self._out


def quantize(x: np.ndarray, qtype: gguf_spec.GGMLQuantizationType, imatrix: np.ndarray | None = None, scratch: Scratch | None = None) -> np.ndarray:
    """Quantise a matrix (rows x n_per_row) with llama.cpp's kernel; returns raw bytes (uint8, in ``scratch`` when given).

    ``x`` is float32, BF16 bits (uint16) or float16.  The calling thread works beside the pool's.
    """
    return start_quantize(x, qtype, imatrix, scratch, wait=True).result()


def start_quantize(
    x: np.ndarray, qtype: gguf_spec.GGMLQuantizationType, imatrix: np.ndarray | None = None, scratch: Scratch | None = None, wait: bool = False,
) -> Pending:
    """Start quantising ``x`` on the pool and return at once; ``result()`` gives the bytes (the caller helps then).

    Rows go out in blocks of about BLOCK_ELEMS elements (fewer for a small matrix, so that
    every core gets some), handed to the pool's threads as they come free (as llama-quantize
    hands out its chunks, so a slow core does not hold the rest up); a BF16/F16 block is
    widened into the thread's own cache-sized float32 buffer just before it is quantised,
    so no float32 copy of the matrix is ever made.  With ``scratch`` the bytes go to one of
    its two output buffers in turn: a result stays valid until the second call after it,
    so one piece can be written while the next is quantised.  ``wait``: the caller will
    call ``result()`` at once (one pool thread fewer is asked for).
    """
    x = np.asarray(x)
    widen = _WIDEN.get(x.dtype)
    x = np.ascontiguousarray(x) if widen is not None else np.ascontiguousarray(x, dtype=np.float32)
    n_per_row = x.shape[-1]
    block = gguf_spec.GGML_QUANT_SIZES[qtype][0]
    if n_per_row % block:  # the C kernel would write past the row (no check of its own)
        raise ValueError(f"{qtype.name} quantises rows in blocks of {block}; a row of {n_per_row} values does not divide")
    nrows = x.size // n_per_row
    so = lib()
    rs = row_size(qtype, n_per_row)
    out = np.empty(nrows * rs, dtype=np.uint8) if scratch is None else scratch.next_out(nrows * rs)
    qm = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n_per_row,):
            raise ValueError(f"imatrix has {imatrix.size} values, rows have {n_per_row}")
        qm = imatrix.ctypes.data
    so.ggml_quantize_init(int(qtype))
    block = min(BLOCK_ELEMS, max(MIN_BLOCK_ELEMS, x.size // (2 * _CPUS)))
    step = max(1, block // n_per_row)  # rows per block
    src, dst, isz, q = x.ctypes.data, out.ctypes.data, x.itemsize, int(qtype)
    fn = getattr(cpu_lib(), widen) if widen is not None else None
    blocks = itertools.count(0, step)  # next() on a count is atomic under the GIL

    def work() -> int:
        done = 0
        buf = _block_buffer(step * n_per_row).ctypes.data if fn is not None else 0
        while (first := next(blocks)) < nrows:
            n = min(step, nrows - first)
            if fn is None:
                done += so.ggml_quantize_chunk(q, src, dst, first * n_per_row, n, n_per_row, qm)
            else:
                fn(src + first * n_per_row * isz, buf, n * n_per_row)
                done += so.ggml_quantize_chunk(q, buf, dst + first * rs, 0, n, n_per_row, qm)
        return done

    n_blocks = -(-nrows // step)
    helpers = [pool().submit(work) for _ in range(min(_CPUS - 1 if wait else _CPUS, n_blocks))]
    return Pending(work, helpers, out, (x, imatrix))
