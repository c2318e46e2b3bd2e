"""Running a GGUF through llama-cpp-python: backends, memory planning, loading, generation.

Before anything is loaded, :func:`plan_load` checks the options' ranges and the model path, detects
the llama.cpp backends (CPU, CUDA, Metal, …), decides how many layers to
offload (all of them when a GPU backend exists, unless told otherwise) and
estimates the memory the weights and the KV cache need on each side, refusing
with a one-line :class:`QuantkitError` when they cannot fit.  :func:`open_model`
then loads the planned model, keeping MoE expert tensors in CPU memory when
asked (llama.cpp's tensor buffer-type overrides).  :func:`generate` and
:func:`complete` stream text and count the tokens actually sampled; chat prompts are
rendered with :mod:`quantkit.engine.chat`'s sandboxed templates.  :class:`Sampling` refuses
out-of-range values (NaN included) when it is built.

Not for: the terminal loop (``quantkit.cli.main``) or chat history (``quantkit.engine.chat``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Mapping, Sequence

from quantkit.engine.chat import clipped, shown
from quantkit.errors import QuantkitError
from quantkit.format.gguf_read import ArraySummary, GGUFFile, read_gguf

if TYPE_CHECKING:
    from llama_cpp import Llama

    from quantkit.engine.chat import ChatTemplate
    from quantkit.engine.harmony import HarmonyParser

log = logging.getLogger(__name__)

#: GGUF tensors that ``--cpu-moe`` keeps in CPU memory: the stacked expert matrices.
CPU_MOE_PATTERN = r"\.ffn_(up|down|gate|gate_up)_exps"
#: ``ggml_backend_dev_type`` values, in enum order.
DEVICE_KINDS = ("cpu", "gpu", "igpu", "accel")
GIB = 2**30
#: Option limits.  llama.cpp stores n_ctx as a uint32 (ctypes would wrap larger values silently);
#: 2**24 tokens is beyond every model's trained context, and the KV-cache estimate refuses most
#: large values before that.  GGML_MAX_N_THREADS is 512.  Seed 0xFFFFFFFF means "random" to llama.cpp.
MIN_CTX, MAX_CTX = 16, 2**24
MAX_THREADS = 512
MAX_SEED = 2**32 - 2
MAX_INT32 = 2**31 - 1


def physical_cores() -> int:
    """Physical cores (hyper-threads share execution units, which slows matmuls)."""
    try:
        pairs = set()
        cpuinfo = Path("/proc/cpuinfo").read_text()
        phys = core = None
        for line in cpuinfo.splitlines():
            if line.startswith("physical id"):
                phys = line.split(":")[1].strip()
            elif line.startswith("core id"):
                core = line.split(":")[1].strip()
                pairs.add((phys, core))
        if pairs:
            return min(len(pairs), len(os.sched_getaffinity(0)))
    except (OSError, AttributeError):
        pass
    return max(1, (os.cpu_count() or 2) // 2)


# --- backends ---------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """One ggml backend device; memory in bytes as the backend reports it."""

    name: str
    description: str
    kind: str  # one of DEVICE_KINDS
    free: int
    total: int


@dataclass(frozen=True)
class Backend:
    """What the installed llama.cpp build can run on."""

    devices: tuple[Device, ...]
    gpu_offload: bool

    @property
    def gpus(self) -> tuple[Device, ...]:
        return tuple(d for d in self.devices if d.kind != "cpu")

    @property
    def gpu_free(self) -> int | None:
        """Free memory summed over the offload devices; None when unknown or none."""
        free = sum(d.free for d in self.gpus)
        return free if free > 0 else None

    def describe(self) -> str:
        if not self.gpu_offload or not self.gpus:
            return "CPU only"
        return ", ".join(f"{d.name} ({d.description}, {d.free / GIB:.1f} GiB free)" for d in self.gpus)


def _ggml() -> Any:
    """libggml with the device-registry prototypes declared: the copy libllama links (``.so.0``; llama-cpp-python's
    ``llama_cpp._ggml`` maps a second copy, whose registry lacks the devices ``--rpc`` registers)."""
    from quantkit.format.ggml import _load

    lib = _load("ggml")

    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    protos: dict[str, tuple[Any, list[Any]]] = {
        "ggml_backend_dev_count": (sz, []),
        "ggml_backend_dev_get": (vp, [sz]),
        "ggml_backend_dev_name": (ctypes.c_char_p, [vp]),
        "ggml_backend_dev_description": (ctypes.c_char_p, [vp]),
        "ggml_backend_dev_type": (ctypes.c_int, [vp]),
        "ggml_backend_dev_memory": (None, [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)]),
        "ggml_backend_cpu_buffer_type": (vp, []),
    }
    for name, (restype, argtypes) in protos.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _device(lib: Any, index: int) -> Device:
    dev = lib.ggml_backend_dev_get(index)
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    kind = lib.ggml_backend_dev_type(dev)
    return Device(
        name=(lib.ggml_backend_dev_name(dev) or b"?").decode(errors="replace"),
        description=(lib.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
        kind=DEVICE_KINDS[kind] if 0 <= kind < len(DEVICE_KINDS) else "accel",
        free=free.value,
        total=total.value,
    )


@functools.lru_cache(maxsize=1)
def detect_backend() -> Backend:
    """Enumerate llama.cpp's backend devices (memory figures are read once per process)."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    try:
        lib = _ggml()
        devices = tuple(_device(lib, i) for i in range(lib.ggml_backend_dev_count()))
    except (AttributeError, OSError) as e:  # an older or unusual build: fall back to the flag
        log.debug("ggml device registry unavailable: %s", e)
        devices = ()
    if devices and gpu:  # an RPC-enabled build says "GPU offload" with no device to offload to: only GPUs and --rpc servers count
        gpu = any(d.kind in ("gpu", "igpu") for d in devices)
    log.debug("llama.cpp devices: %s", devices)
    return Backend(devices, gpu)


def gpu_offload_supported() -> bool:
    return detect_backend().gpu_offload


# --- memory -----------------------------------------------------------------


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """``MemAvailable`` in bytes, or None where the kernel does not report it."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass(frozen=True)
class KVShape:
    """Attention sizes that set the KV cache: per-layer KV heads, key and value widths."""

    n_layer: int
    n_head_kv: tuple[int, ...]  # one entry per layer
    key_length: int
    value_length: int

    def bytes_per_token(self, layers: Sequence[int] | None = None, elem_bytes: int = 2) -> int:
        """K and V bytes one token occupies in the given layers (all by default; f16 cache)."""
        idx = range(self.n_layer) if layers is None else layers
        return sum(self.n_head_kv[i] for i in idx) * (self.key_length + self.value_length) * elem_bytes


#: Largest per-layer count or width believed (a hostile file could otherwise make the estimate absurd).
MAX_SHAPE = 2**24


def _bad_metadata(g: GGUFFile, key: str, value: Any, expected: str) -> QuantkitError:
    return QuantkitError(f"{g.path}: metadata {key} = {shown(value)}, expected {expected}; fix: re-convert the model with quantkit convert")


def _md_int(g: GGUFFile, key: str, default: int | None = None) -> int:
    value = g.metadata.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_SHAPE:
        raise _bad_metadata(g, key, value, f"an integer from 1 to {MAX_SHAPE}")
    return value


def _per_layer(g: GGUFFile, key: str, value: Any, n_layer: int) -> tuple[int, ...]:
    """A count that GGUF stores either once or per layer (arrays longer than the reader's
    head are summarised: their largest known entry stands in for the rest, conservatively)."""
    items = value.head if isinstance(value, ArraySummary) else value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SHAPE for v in items):
        raise _bad_metadata(g, key, value, f"a count from 0 to {MAX_SHAPE}, once or per layer")
    if isinstance(value, (list, ArraySummary)):
        known = tuple(items[:n_layer])
        return known + (max(known, default=1),) * (n_layer - len(known))
    return (int(value),) * n_layer


def _arch(g: GGUFFile) -> str:
    arch = g.metadata.get("general.architecture", "llama")
    if not isinstance(arch, str) or not arch.replace("-", "").replace("_", "").isalnum() or len(arch) > 64:
        raise _bad_metadata(g, "general.architecture", arch, "an architecture name such as 'llama'")
    return arch


def kv_shape(g: GGUFFile) -> KVShape:
    """Read the KV-cache geometry from GGUF metadata (``{arch}.block_count``, ``attention.*``)."""
    arch = _arch(g)
    n_layer = _md_int(g, f"{arch}.block_count")
    heads = _per_layer(g, f"{arch}.attention.head_count", g.metadata.get(f"{arch}.attention.head_count", 1), n_layer)
    kv_key = f"{arch}.attention.head_count_kv"
    kv_heads = _per_layer(g, kv_key, g.metadata.get(kv_key, list(heads)), n_layer)
    width = _md_int(g, f"{arch}.embedding_length", 1)
    k_len = _md_int(g, f"{arch}.attention.key_length", max(1, width // max(1, max(heads))))
    v_len = _md_int(g, f"{arch}.attention.value_length", k_len)
    return KVShape(n_layer, kv_heads, k_len, v_len)


def _tensor_layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit() else None


def on_gpu(name: str, n_layer: int, gpu_layers: int, cpu_moe: bool) -> bool:
    """Where llama.cpp puts a tensor: the last ``gpu_layers`` blocks, the output head when
    every block is offloaded, never the token embeddings, experts on CPU with ``cpu_moe``."""
    if gpu_layers <= 0 or (cpu_moe and re.search(CPU_MOE_PATTERN, name)):
        return False
    layer = _tensor_layer(name)
    if layer is not None:
        return layer >= n_layer - gpu_layers
    return gpu_layers > n_layer and not name.startswith(("token_embd", "rope_"))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes needed in CPU memory and on the GPU(s) (weights + f16 KV cache), and what is free."""

    weights: int
    kv_cache: int
    cpu_need: int
    gpu_need: int
    cpu_available: int | None
    gpu_available: int | None
    n_ctx: int = 0

    def problem(self) -> str | None:
        """Why it cannot fit and what would help, as one line; None when it fits."""
        if self.cpu_available is not None and self.cpu_need > self.cpu_available:
            where, need, have, fix = "RAM", self.cpu_need, self.cpu_available, "lower --ctx or use a smaller quantisation"
        elif self.gpu_available is not None and self.gpu_need > self.gpu_available:
            where, need, have, fix = "GPU memory", self.gpu_need, self.gpu_available, "lower --ctx, pass --cpu-moe or offload fewer --gpu-layers"
        else:
            return None
        sizes = f"weights {self.weights / GIB:.2f} GiB + KV cache {self.kv_cache / GIB:.2f} GiB for --ctx {self.n_ctx}"
        return f"needs {need / GIB:.2f} GiB of {where}, {have / GIB:.2f} GiB available ({sizes}); fix: {fix}"

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("weights", "kv_cache", "cpu_need", "gpu_need", "cpu_available", "gpu_available")}


def estimate_memory(
    g: GGUFFile, n_ctx: int, gpu_layers: int, cpu_moe: bool, cpu_available: int | None, gpu_available: int | None
) -> MemoryEstimate:
    """Split weights and KV cache (``n_ctx`` tokens, f16) between CPU memory and the GPU(s)."""
    shape = kv_shape(g)
    gpu_w = sum(t.nbytes for t in g.tensors if on_gpu(t.name, shape.n_layer, gpu_layers, cpu_moe))
    weights = sum(t.nbytes for t in g.tensors)
    gpu_blocks = range(max(0, shape.n_layer - gpu_layers), shape.n_layer) if gpu_layers > 0 else range(0)
    kv_total = n_ctx * shape.bytes_per_token()
    kv_gpu = n_ctx * shape.bytes_per_token(gpu_blocks)
    cpu_need, gpu_need = weights - gpu_w + kv_total - kv_gpu, gpu_w + kv_gpu
    return MemoryEstimate(weights, kv_total, cpu_need, gpu_need, cpu_available, gpu_available, n_ctx)


# --- loading ----------------------------------------------------------------


@dataclass(frozen=True)
class LoadPlan:
    """Everything decided before llama.cpp opens the model."""

    path: Path
    n_ctx: int
    gpu_layers: int  # resolved: 0 = CPU only; n_layer + 1 = everything
    n_layer: int
    threads: int
    seed: int | None
    cpu_moe: bool  # as requested
    cpu_moe_applied: bool  # requested and meaningful on this build
    backend: Backend
    memory: MemoryEstimate
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        offload = "CPU only" if self.gpu_layers == 0 else f"{min(self.gpu_layers, self.n_layer + 1)}/{self.n_layer + 1} layers on {self.backend.describe()}"
        moe = ", experts in CPU memory" if self.cpu_moe_applied else ""
        m = self.memory
        return f"{offload}{moe}, {self.threads} threads, ctx {self.n_ctx}: weights {m.weights / GIB:.2f} GiB + KV cache {m.kv_cache / GIB:.2f} GiB"

    def to_json(self) -> dict[str, Any]:
        return {
            "gpu_layers": self.gpu_layers, "threads": self.threads, "n_ctx": self.n_ctx, "cpu_moe": self.cpu_moe,
            "cpu_moe_applied": self.cpu_moe_applied, "backend": self.backend.describe(), "memory": self.memory.to_json(),
        }


def _range_text(lo: float | None, hi: float | None, integer: bool, lo_open: bool = False) -> str:
    def num(x: float) -> str:
        return str(int(x)) if integer or float(x).is_integer() else f"{x:g}"

    kind = "an integer" if integer else "a number"
    if lo is not None and hi is not None:
        return f"{kind} from {num(lo)} to {num(hi)}"
    return f"{kind} {'>' if lo_open else '>='} {num(lo)}" if lo is not None else f"{kind} <= {num(hi)}"  # type: ignore[arg-type]


def check_option(
    option: str, value: Any, lo: float | None, hi: float | None, fix: str, integer: bool = False, lo_open: bool = False
) -> None:
    """Refuse an option value outside ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``), NaN, infinity and
    non-numbers, as one line naming the option, the valid range and the value."""
    number = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = (
        number and not isinstance(value, bool) and math.isfinite(value)
        and (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi)
    )
    if not ok:
        raise QuantkitError(f"{option}: expected {_range_text(lo, hi, integer, lo_open)} (found {shown(value, 40)}); fix: {fix}")


def check_load_options(n_ctx: int, gpu_layers: int | None, threads: int | None, seed: int | None) -> None:
    """The loading options, before any file is read (``--ctx`` is checked against memory later)."""
    check_option("--ctx", n_ctx, MIN_CTX, MAX_CTX, "pass --ctx 2048 (the default) or the context the model was trained for", integer=True)
    if gpu_layers is not None:
        check_option("--gpu-layers", gpu_layers, -1, MAX_INT32, "pass -1 (or leave it out) for every layer, 0 for none", integer=True)
    if threads is not None:
        check_option("--threads", threads, 1, MAX_THREADS, "leave it out to use the physical cores", integer=True)
    if seed is not None:
        check_option("--seed", seed, 0, MAX_SEED, "leave it out for a random seed", integer=True)


def check_model_path(model: str | Path) -> Path:
    """A GGUF file, or a bitsandbytes export directory (run through transformers)."""
    path = Path(model)
    if path.is_dir():
        from quantkit.engine.hf_runtime import check_dir

        check_dir(path)
    return path


def plan_load_dir(path: Path, n_ctx: int, threads: int | None, seed: int | None) -> LoadPlan:
    """A bitsandbytes export runs through transformers on the CPU: weights + KV cache against RAM."""
    from quantkit.engine.hf_runtime import dir_weights_bytes

    cfg_path = path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # is_bnb_dir read it a moment ago: a race or an odd file
        raise QuantkitError(f"{cfg_path}: cannot read it as JSON ({type(e).__name__}); fix: re-export the directory with quantkit convert --format bnb") from None

    def count(key: str, default: Any = None) -> int:
        value = cfg.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_SHAPE:
            raise QuantkitError(f"{cfg_path}: {key} = {shown(value)}, expected an integer from 1 to {MAX_SHAPE}; fix: re-export the directory with quantkit convert --format bnb")
        return value

    n_layer = count("num_hidden_layers", 1)
    n_head = count("num_attention_heads")
    head_dim = count("head_dim") if cfg.get("head_dim") else max(1, count("hidden_size") // n_head)
    kv = 2 * n_layer * n_ctx * count("num_key_value_heads", n_head) * head_dim * 4  # float32 cache
    weights = dir_weights_bytes(path)
    memory = MemoryEstimate(weights, kv, weights + kv, 0, mem_available(), None, n_ctx)
    problem = memory.problem()
    if problem:
        raise QuantkitError(f"{path}: {problem}")
    return LoadPlan(path, n_ctx, 0, n_layer, threads or physical_cores(), seed, False, False, Backend((), False), memory,
                    ("bitsandbytes directory: running through transformers on the CPU (experts stay 4-bit)",))


def plan_load(
    model: str | Path,
    n_ctx: int = 2048,
    gpu_layers: int | None = None,
    threads: int | None = None,
    seed: int | None = None,
    cpu_moe: bool = False,
) -> LoadPlan:
    """Validate the file and options, place layers, and refuse when memory cannot fit."""
    check_load_options(n_ctx, gpu_layers, threads, seed)
    path = check_model_path(model)
    if path.is_dir():
        return plan_load_dir(path, n_ctx, threads, seed)
    from quantkit.engine.gguf_check import check_before_load

    check_before_load(path)  # hyperparameters llama.cpp would abort on, one line each; arms the abort message
    g = read_gguf(path)  # a readable one-line error for bad files before llama.cpp sees them
    n_layer = kv_shape(g).n_layer
    backend = detect_backend()
    offload = backend.gpu_offload
    resolved = (n_layer + 1 if offload else 0) if gpu_layers is None or gpu_layers < 0 else min(gpu_layers, n_layer + 1)
    notes: list[str] = []
    trained = g.metadata.get(f"{_arch(g)}.context_length")
    if isinstance(trained, int) and not isinstance(trained, bool) and 0 < trained < n_ctx:
        notes.append(f"--ctx {n_ctx} is beyond the {trained} tokens the model was trained on: text past that point may degrade")
    if resolved and not offload:
        notes.append(f"--gpu-layers {gpu_layers} has no effect: this llama.cpp build has no GPU backend")
        resolved = 0
    applied = cpu_moe and resolved > 0
    if cpu_moe and not applied:
        notes.append("--cpu-moe has no effect: nothing is offloaded to a GPU (CPU-only build or --gpu-layers 0), experts are in CPU memory already")
    memory = estimate_memory(g, n_ctx, resolved, applied, mem_available(), backend.gpu_free if resolved else None)
    problem = memory.problem()
    if problem:
        raise QuantkitError(f"{path}: {problem}")
    return LoadPlan(path, n_ctx, resolved, n_layer, threads or physical_cores(), seed, cpu_moe, applied, backend, memory, tuple(notes))


class _BuftOverride(ctypes.Structure):
    """``struct llama_model_tensor_buft_override { const char *pattern; ggml_backend_buffer_type_t buft; }``."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def cpu_buft_overrides(patterns: Sequence[str]) -> ctypes.Array[_BuftOverride]:
    """A NULL-terminated override array that puts tensors matching ``patterns`` in CPU memory."""
    cpu = _ggml().ggml_backend_cpu_buffer_type()
    array = (_BuftOverride * (len(patterns) + 1))()
    for slot, pattern in zip(array, patterns):
        slot.pattern, slot.buft = pattern.encode(), cpu
    return array  # the last slot stays zeroed: the terminator


_params_lock = threading.RLock()  # also held while chat templates are deferred (one load at a time)


@contextlib.contextmanager
def _model_params_with(overrides: ctypes.Array[_BuftOverride] | None) -> Iterator[None]:
    """llama-cpp-python 0.3.36's ``Llama()`` takes no buffer-type overrides: hand them to the
    ``llama_model_params`` it builds by wrapping ``llama_model_default_params`` for one load."""
    if overrides is None:
        yield
        return
    import llama_cpp.llama_cpp as lc

    with _params_lock:
        original = lc.llama_model_default_params

        def with_overrides() -> Any:
            params = original()
            params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p).value
            return params

        lc.llama_model_default_params = with_overrides
        try:
            yield
        finally:
            lc.llama_model_default_params = original


class _DeferredChatFormatter:
    """Stands in for llama-cpp-python's ``Jinja2ChatFormatter`` while ``Llama()`` runs.

    ``Llama.__init__`` compiles every ``tokenizer.chat_template*`` string of the GGUF into a chat
    handler (for ``create_chat_completion``, which quantkit never calls): one Jinja syntax error
    in untrusted metadata would abort loading, even for a plain ``run``.  This defers the
    compilation to the handler's first use; quantkit renders with :mod:`quantkit.engine.chat`, which
    reports a broken template as one line naming the file, the key and the line.
    """

    real: Any = None  # the genuine class, set while the stand-in is installed

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs

    def to_chat_handler(self) -> Callable[..., Any]:
        real, kwargs = self.real, self._kwargs

        def handler(*args: Any, **kw: Any) -> Any:
            return real(**kwargs).to_chat_handler()(*args, **kw)

        return handler


@contextlib.contextmanager
def _chat_templates_deferred() -> Iterator[None]:
    import llama_cpp.llama_chat_format as lcf

    with _params_lock:
        original = lcf.Jinja2ChatFormatter
        _DeferredChatFormatter.real = original
        lcf.Jinja2ChatFormatter = _DeferredChatFormatter  # type: ignore[misc,assignment]
        try:
            yield
        finally:
            lcf.Jinja2ChatFormatter = original


def construct(path: Path, kwargs: dict[str, Any], cpu_patterns: Sequence[str] = ()) -> Llama:
    """``Llama(path, **kwargs)`` with tensors matching ``cpu_patterns`` kept in CPU memory."""
    from quantkit.format import ggml

    ggml.prepare_llama()  # one line (not gdb) if llama.cpp aborts; Ctrl-C / SIGTERM inside its callbacks kept
    from llama_cpp import Llama

    overrides = cpu_buft_overrides(cpu_patterns) if cpu_patterns else None
    try:
        with _chat_templates_deferred(), _model_params_with(overrides):
            llm = Llama(str(path), **kwargs)
    except ValueError as e:
        ggml.raise_pending()  # an interrupt caught in llama.cpp's log callback while it loaded
        raise QuantkitError(f"{path}: llama.cpp could not load the model ({clipped(e)}); fix: re-convert it with quantkit convert") from None
    try:
        ggml.raise_pending()
    except BaseException:
        llm.close()
        raise
    llm._quantkit_overrides = overrides  # type: ignore[attr-defined]  # keep the C strings alive with the model
    return llm


def open_model(plan: LoadPlan) -> Llama:
    """Load a planned model with llama-cpp-python (a bitsandbytes directory with transformers)."""
    if plan.path.is_dir():
        from quantkit.engine.hf_runtime import TransformersLlama

        return TransformersLlama(plan.path, plan.n_ctx, plan.threads, plan.seed)  # type: ignore[return-value]
    kwargs: dict[str, Any] = dict(
        n_ctx=plan.n_ctx, n_gpu_layers=plan.gpu_layers, n_threads=plan.threads, n_threads_batch=plan.threads, verbose=False
    )
    if plan.seed is not None:
        kwargs["seed"] = plan.seed
    log.info("loading %s: %s", plan.path, plan.describe())
    return construct(plan.path, kwargs, (CPU_MOE_PATTERN,) if plan.cpu_moe_applied else ())


def load(
    model: str | Path,
    n_ctx: int = 2048,
    gpu_layers: int | None = None,
    threads: int | None = None,
    seed: int | None = None,
    cpu_moe: bool = False,
) -> Llama:
    """Plan (memory check included) and open a GGUF in one call."""
    return open_model(plan_load(model, n_ctx, gpu_layers, threads, seed, cpu_moe))


# --- generation -------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """Sampling options shared by ``run`` and ``chat``; temperature 0 is greedy."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    seed: int | None = None
    max_tokens: int = 256
    ignore_eos: bool = False

    #: field -> (option, low, high, integer, low excluded): the valid ranges, checked on construction.
    RANGES: ClassVar[dict[str, tuple[str, float | None, float | None, bool, bool]]] = {
        "temperature": ("--temperature", 0.0, None, False, False),  # 0 is greedy
        "top_p": ("--top-p", 0.0, 1.0, False, False),
        "top_k": ("--top-k", 0, MAX_INT32, True, False),  # 0 keeps every token
        "min_p": ("--min-p", 0.0, 1.0, False, False),
        "repeat_penalty": ("--repeat-penalty", 0.0, None, False, True),  # 1 is no penalty; 0 would divide by zero
        "seed": ("--seed", 0, MAX_SEED, True, False),
        "max_tokens": ("--max-tokens", 1, MAX_INT32, True, False),  # llama-cpp-python reads <= 0 as "until the window is full"
    }

    def __post_init__(self) -> None:
        for name, (option, lo, hi, integer, lo_open) in self.RANGES.items():
            value = getattr(self, name)
            if value is None and name == "seed":
                continue
            default = next(f.default for f in fields(self) if f.name == name)
            fix = "leave it out for a random seed" if default is None else f"leave it out for the default {default}"
            check_option(option, value, lo, hi, fix, integer=integer, lo_open=lo_open)

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repeat_penalty=self.repeat_penalty, max_tokens=self.max_tokens,
        )
        if self.seed is not None:
            kw["seed"] = self.seed
        if self.temperature <= 0:  # greedy: the sampler picks the top token
            kw.update(temperature=0.0, top_k=1)
        return kw


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: str | None  # "stop", "length" or "interrupted"
    prompt: str = ""
    template: str | None = None  # the chat template's name when one was applied
    timings: dict[str, float] = field(default_factory=dict)
    reasoning: str | None = None  # a harmony model's analysis channel (``text`` is then its final channel)
    tool_calls: tuple[dict[str, str], ...] = ()  # a harmony model's messages to a recipient: {"recipient", "channel", "text"}

    @property
    def tokens_per_second(self) -> float | None:
        return round(self.completion_tokens / self.seconds, 2) if self.seconds > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "prompt": self.prompt,
            "chat_template": self.template,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": self.tokens_per_second,
            "finish_reason": self.finish_reason,
        } | ({"reasoning": self.reasoning, "tool_calls": list(self.tool_calls)} if self.reasoning is not None else {})


def _metadata(llm: Llama) -> Mapping[str, Any]:
    """llama-cpp-python's metadata, or, where it has none (it drops all of it when one value is not
    UTF-8, e.g. ``general.name``), the chat template read from the GGUF with quantkit's reader."""
    from quantkit.engine.chat import TEMPLATE_KEY

    meta = llm.metadata
    path = getattr(llm, "model_path", None)
    if TEMPLATE_KEY in meta or not isinstance(path, str) or not os.path.isfile(path):
        return meta
    from quantkit.format.gguf_read import read_gguf

    value = read_gguf(path).metadata.get(TEMPLATE_KEY)
    return {**meta, TEMPLATE_KEY: value} if value is not None else meta


def chat_template_for(llm: Llama, override: str | None = None) -> ChatTemplate:
    """The model's chat template (or the named fallback, with a warning), compiled: a template
    with a Jinja syntax error is refused here, as one line, before the first message."""
    from quantkit.engine.chat import chat_template

    def text(token: int) -> str:
        return llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    template = chat_template(_metadata(llm), bos_token=text(llm.token_bos()), eos_token=text(llm.token_eos()), source=llm.model_path, override=override)
    return template.check()


def utf8(text: str, what: str = "the prompt") -> bytes:
    """``text`` as UTF-8; a lone surrogate (an undecodable byte passed through the command line
    or the terminal) is refused as one line instead of a UnicodeEncodeError."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise QuantkitError(
            f"{what}: character {e.start} ({shown(text[e.start])}) is not Unicode text (an undecodable byte?); fix: pass UTF-8 text"
        ) from None


def chat_tokens(llm: Llama, rendered: str) -> list[int]:
    """Tokenise a rendered chat prompt: template special tokens are parsed; BOS is added
    only when the vocabulary wants one and the template did not write it."""
    tokens = llm.tokenize(utf8(rendered, "the chat prompt"), add_bos=False, special=True)
    bos = llm.tokenize(b"", add_bos=True, special=False)  # [bos] or [] per the vocabulary
    return bos + tokens if bos and tokens[:1] != bos else tokens


@contextlib.contextmanager
def sampled_tokens(llm: Llama, limit: int | None = None) -> Iterator[list[int]]:
    """The tokens the model samples while the block runs, in order; at most ``limit`` of them.

    llama-cpp-python's ``create_completion`` draws its tokens from ``self.generate`` (and so does
    :class:`~quantkit.engine.hf_runtime.TransformersLlama`): a wrapper on the instance sees each one.
    Its stream's chunks do not map one to one onto tokens (text is held back around multi-byte
    characters and possible stop strings), and re-tokenising the text miscounts.

    ``limit``: the stream ends after that many tokens.  ``create_completion`` skips its own
    ``max_tokens`` check while the text ends in an incomplete UTF-8 character (a byte-fallback
    lead byte), so without it ``-n 5`` could sample 6, 8, or tokens until the window is full."""
    sampled: list[int] = []
    own = vars(llm).get("generate")
    inner = llm.generate

    def generate(*args: Any, **kwargs: Any) -> Iterator[int]:
        tokens = inner(*args, **kwargs)
        try:
            for token in tokens:  # create_completion never sends into the generator
                sampled.append(int(token))
                yield token
                if limit is not None and len(sampled) >= limit:
                    return  # create_completion ends as at max_tokens: finish_reason "length", held-back text flushed
        finally:
            tokens.close()

    llm.generate = generate  # type: ignore[method-assign]
    try:
        yield sampled
    finally:
        if own is None:
            del llm.generate
        else:
            llm.generate = own  # type: ignore[method-assign]


def is_end_of_generation(llm: Llama, token: int) -> bool:
    """llama.cpp's end-of-generation test (EOS, EOT, <|im_end|>, …) for ``token``."""
    own = getattr(llm, "token_is_eog", None)
    if own is not None:
        return bool(own(token))
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token))


def complete(
    llm: Llama,
    tokens: list[int],
    sampling: Sampling,
    stop: Sequence[str] = (),
    on_text: Callable[[str], None] | None = None,
    interruptible: bool = False,
    parser: HarmonyParser | None = None,
) -> Generation:
    """Stream a completion of ``tokens`` to ``on_text``.

    With ``interruptible``, Ctrl-C (KeyboardInterrupt) ends the answer instead of the
    caller: the text so far comes back with finish_reason "interrupted" and the model
    state is reset so the next call starts clean.

    With a harmony ``parser`` (its callbacks replace ``on_text``), the stream is read as harmony
    messages: generation ends where the format says, the text is the final channel and the
    reasoning the analysis channel.
    """
    if not tokens:
        raise QuantkitError("the prompt is empty; fix: pass some text with -p")
    if len(tokens) >= llm.n_ctx():
        raise QuantkitError(f"the prompt is {len(tokens)} tokens, the context window {llm.n_ctx()}; fix: raise --ctx or shorten the prompt")
    kw = sampling.kwargs()
    if sampling.ignore_eos and llm.token_eos() >= 0:
        kw["logit_bias"] = {llm.token_eos(): float("-inf")}
    from quantkit.format import ggml

    pieces: list[str] = []
    finish = None
    t0 = time.perf_counter()
    with sampled_tokens(llm, sampling.max_tokens) as sampled:
        stream = llm.create_completion(tokens, stream=True, stop=list(stop), **kw)
        try:
            for chunk in stream:
                ggml.raise_pending()  # Ctrl-C / SIGTERM that llama-cpp-python's callbacks (log, sampler) swallowed
                choice = chunk["choices"][0]
                finish = choice.get("finish_reason") or finish
                if choice["text"]:
                    pieces.append(choice["text"])
                    if parser is not None:
                        parser.feed(choice["text"])
                        if parser.done:  # <|end|> after the final channel: llama.cpp does not stop there
                            finish = "stop"
                            break
                    elif on_text:
                        on_text(choice["text"])
            ggml.raise_pending()
        except KeyboardInterrupt:
            if not interruptible:
                raise
            finish = "interrupted"
            llm.reset()  # the interrupted decode may have left the cache half-updated
        finally:
            stream.close()
    seconds = time.perf_counter() - t0
    # The tokens the model produced; an end-of-generation token that closed the answer is not part of it.
    n_out = len(sampled) - (1 if sampled and is_end_of_generation(llm, sampled[-1]) else 0)
    if parser is None:
        return Generation("".join(pieces), len(tokens), n_out, seconds, finish)
    from quantkit.engine.harmony import END

    n_out -= 1 if parser.stopped_by == END and n_out > 0 else 0  # the <|end|> that closed the final message
    parser.close()
    calls = tuple({"recipient": m.recipient or "", "channel": m.channel or "", "text": m.text} for m in parser.tool_calls)
    return Generation(parser.answer, len(tokens), n_out, seconds, finish, reasoning=parser.reasoning, tool_calls=calls)


def is_harmony_model(llm: Llama, template: ChatTemplate) -> bool:
    """True when ``template`` writes OpenAI's harmony format (GPT-OSS) and the vocabulary holds
    its markers as single special tokens: read from the template and the vocabulary, not the name."""
    from quantkit.engine.harmony import is_harmony

    def single(text: str) -> bool:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        return len(ids) == 1 and llm.detokenize(ids, special=True) == text.encode()

    return is_harmony(template.source, single)


def complete_chat(
    llm: Llama,
    template: ChatTemplate,
    tokens: list[int],
    sampling: Sampling,
    on_text: Callable[[str], None] | None = None,
    on_reasoning: Callable[[str], None] | None = None,
    interruptible: bool = False,
) -> Generation:
    """Complete a rendered chat prompt: stopped by the template's stop strings, or, for a harmony
    model, read as harmony (the answer is the final channel; ``on_reasoning`` sees the analysis)."""
    if not is_harmony_model(llm, template):
        return complete(llm, tokens, sampling, stop=template.stop, on_text=on_text, interruptible=interruptible)
    from quantkit.engine.harmony import HarmonyParser

    parser = HarmonyParser(on_final=on_text, on_reasoning=on_reasoning)
    return complete(llm, tokens, sampling, stop=template.stop, interruptible=interruptible, parser=parser)


def generate(
    llm: Llama,
    prompt: str,
    sampling: Sampling,
    chat: bool = False,
    system: str | None = None,
    on_text: Callable[[str], None] | None = None,
    chat_template: str | None = None,
    on_reasoning: Callable[[str], None] | None = None,
) -> Generation:
    """Generate from a prompt, or from a one-turn chat rendered with the model's template
    (``chat_template`` names a built-in one to use instead, e.g. "chatml").  A harmony model's
    (GPT-OSS) answer is its final channel; its analysis channel goes to ``on_reasoning``."""
    if not chat:
        tokens = llm.tokenize(utf8(prompt), add_bos=True, special=True)
        result = complete(llm, tokens, sampling, on_text=on_text)
        return _with_prompt(result, prompt, None)
    from quantkit.engine.chat import History

    template = chat_template_for(llm, override=chat_template)
    rendered = template.render(History(system=system).messages(prompt))
    result = complete_chat(llm, template, chat_tokens(llm, rendered), sampling, on_text=on_text, on_reasoning=on_reasoning)
    return _with_prompt(result, rendered, template.name)


def _with_prompt(g: Generation, prompt: str, template: str | None) -> Generation:
    return replace(g, prompt=prompt, template=template)
