"""Running a GGUF through llama-cpp-python: backends, memory planning, loading, generation.

Before anything is loaded, :func:`plan_load` checks the model path, detects
the llama.cpp backends (CPU, CUDA, Metal, …), decides how many layers to
offload (all of them when a GPU backend exists, unless told otherwise) and
estimates the memory the weights and the KV cache need on each side, refusing
with a one-line :class:`QuantkitError` when they cannot fit.  :func:`open_model`
then loads the planned model, keeping MoE expert tensors in CPU memory when
asked (llama.cpp's tensor buffer-type overrides).  :func:`generate` and
:func:`complete` stream text; chat prompts are rendered with
:mod:`quantkit.chat`'s sandboxed templates.

Not for: the terminal loop (``quantkit.cli``) or chat history (``quantkit.chat``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from quantkit.errors import QuantkitError
from quantkit.gguf_read import ArraySummary, GGUFFile, read_gguf

if TYPE_CHECKING:
    from llama_cpp import Llama

    from quantkit.chat import ChatTemplate

log = logging.getLogger(__name__)

#: GGUF tensors that ``--cpu-moe`` keeps in CPU memory: the stacked expert matrices.
CPU_MOE_PATTERN = r"\.ffn_(up|down|gate|gate_up)_exps"
#: ``ggml_backend_dev_type`` values, in enum order.
DEVICE_KINDS = ("cpu", "gpu", "igpu", "accel")
GIB = 2**30


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
    """libggml with the device-registry prototypes declared."""
    from llama_cpp._ggml import libggml as lib

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


def _md_int(g: GGUFFile, key: str, default: int | None = None) -> int:
    value = g.metadata.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise QuantkitError(f"{g.path}: metadata {key} = {value!r}, expected a positive integer; fix: re-convert the model with quantkit convert")
    return value


def _per_layer(value: Any, n_layer: int) -> tuple[int, ...]:
    """A count that GGUF stores either once or per layer (arrays longer than the reader's
    head are summarised: their largest known entry stands in for the rest, conservatively)."""
    if isinstance(value, ArraySummary):
        value = value.head
    if isinstance(value, list):
        known = tuple(int(v) for v in value[:n_layer])
        return known + (max(known, default=1),) * (n_layer - len(known))
    return (int(value),) * n_layer


def kv_shape(g: GGUFFile) -> KVShape:
    """Read the KV-cache geometry from GGUF metadata (``{arch}.block_count``, ``attention.*``)."""
    arch = g.metadata.get("general.architecture", "llama")
    n_layer = _md_int(g, f"{arch}.block_count")
    heads = _per_layer(g.metadata.get(f"{arch}.attention.head_count", 1), n_layer)
    kv_heads = _per_layer(g.metadata.get(f"{arch}.attention.head_count_kv", list(heads)), n_layer)
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


def check_model_path(model: str | Path) -> Path:
    """A GGUF file, or a bitsandbytes export directory (run through transformers)."""
    path = Path(model)
    if path.is_dir():
        from quantkit.hf_runtime import check_dir

        check_dir(path)
    return path


def plan_load_dir(path: Path, n_ctx: int, threads: int | None, seed: int | None) -> LoadPlan:
    """A bitsandbytes export runs through transformers on the CPU: weights + KV cache against RAM."""
    from quantkit.hf_runtime import dir_weights_bytes

    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    n_layer = int(cfg.get("num_hidden_layers", 1))
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    kv = 2 * n_layer * n_ctx * int(cfg.get("num_key_value_heads", cfg["num_attention_heads"])) * head_dim * 4  # float32 cache
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
    path = check_model_path(model)
    if n_ctx < 16:
        raise QuantkitError(f"--ctx {n_ctx}: the context window must hold at least 16 tokens; fix: pass --ctx 2048")
    if threads is not None and threads < 1:
        raise QuantkitError(f"--threads {threads}: must be at least 1; fix: leave it out to use the physical cores")
    if path.is_dir():
        return plan_load_dir(path, n_ctx, threads, seed)
    g = read_gguf(path)  # a readable one-line error for bad files before llama.cpp sees them
    n_layer = kv_shape(g).n_layer
    backend = detect_backend()
    offload = backend.gpu_offload
    resolved = (n_layer + 1 if offload else 0) if gpu_layers is None or gpu_layers < 0 else min(gpu_layers, n_layer + 1)
    notes: list[str] = []
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


_params_lock = threading.Lock()


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


def construct(path: Path, kwargs: dict[str, Any], cpu_patterns: Sequence[str] = ()) -> Llama:
    """``Llama(path, **kwargs)`` with tensors matching ``cpu_patterns`` kept in CPU memory."""
    from llama_cpp import Llama

    overrides = cpu_buft_overrides(cpu_patterns) if cpu_patterns else None
    try:
        with _model_params_with(overrides):
            llm = Llama(str(path), **kwargs)
    except ValueError as e:
        raise QuantkitError(f"{path}: llama.cpp could not load the model ({e}); fix: re-convert it with quantkit convert") from None
    llm._quantkit_overrides = overrides  # type: ignore[attr-defined]  # keep the C strings alive with the model
    return llm


def open_model(plan: LoadPlan) -> Llama:
    """Load a planned model with llama-cpp-python (a bitsandbytes directory with transformers)."""
    if plan.path.is_dir():
        from quantkit.hf_runtime import TransformersLlama

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
        }


def chat_template_for(llm: Llama) -> ChatTemplate:
    """The model's chat template (or the named fallback, with a warning)."""
    from quantkit.chat import chat_template

    def text(token: int) -> str:
        return llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    return chat_template(llm.metadata, bos_token=text(llm.token_bos()), eos_token=text(llm.token_eos()), source=llm.model_path)


def chat_tokens(llm: Llama, rendered: str) -> list[int]:
    """Tokenise a rendered chat prompt: template special tokens are parsed; BOS is added
    only when the vocabulary wants one and the template did not write it."""
    tokens = llm.tokenize(rendered.encode("utf-8"), add_bos=False, special=True)
    bos = llm.tokenize(b"", add_bos=True, special=False)  # [bos] or [] per the vocabulary
    return bos + tokens if bos and tokens[:1] != bos else tokens


def complete(
    llm: Llama,
    tokens: list[int],
    sampling: Sampling,
    stop: Sequence[str] = (),
    on_text: Callable[[str], None] | None = None,
    interruptible: bool = False,
) -> Generation:
    """Stream a completion of ``tokens`` to ``on_text``.

    With ``interruptible``, Ctrl-C (KeyboardInterrupt) ends the answer instead of the
    caller: the text so far comes back with finish_reason "interrupted" and the model
    state is reset so the next call starts clean.
    """
    if not tokens:
        raise QuantkitError("the prompt is empty; fix: pass some text with -p")
    if len(tokens) >= llm.n_ctx():
        raise QuantkitError(f"the prompt is {len(tokens)} tokens, the context window {llm.n_ctx()}; fix: raise --ctx or shorten the prompt")
    kw = sampling.kwargs()
    if sampling.ignore_eos and llm.token_eos() >= 0:
        kw["logit_bias"] = {llm.token_eos(): float("-inf")}
    pieces: list[str] = []
    finish = None
    t0 = time.perf_counter()
    stream = llm.create_completion(tokens, stream=True, stop=list(stop), **kw)
    try:
        for chunk in stream:
            choice = chunk["choices"][0]
            finish = choice.get("finish_reason") or finish
            if choice["text"]:
                pieces.append(choice["text"])
                if on_text:
                    on_text(choice["text"])
    except KeyboardInterrupt:
        if not interruptible:
            raise
        finish = "interrupted"
        llm.reset()  # the interrupted decode may have left the cache half-updated
    finally:
        stream.close()
    seconds = time.perf_counter() - t0
    text = "".join(pieces)
    n_out = len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)) if text else 0
    return Generation(text, len(tokens), n_out, seconds, finish)


def generate(
    llm: Llama,
    prompt: str,
    sampling: Sampling,
    chat: bool = False,
    system: str | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """Generate from a prompt, or from a one-turn chat rendered with the model's template."""
    if not chat:
        tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        result = complete(llm, tokens, sampling, on_text=on_text)
        return _with_prompt(result, prompt, None)
    from quantkit.chat import History

    template = chat_template_for(llm)
    rendered = template.render(History(system=system).messages(prompt))
    result = complete(llm, chat_tokens(llm, rendered), sampling, stop=template.stop, on_text=on_text)
    return _with_prompt(result, rendered, template.name)


def _with_prompt(g: Generation, prompt: str, template: str | None) -> Generation:
    return replace(g, prompt=prompt, template=template)
