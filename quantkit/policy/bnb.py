"""bitsandbytes 4-bit checkpoints whose MoE experts really are 4-bit: export and load.

``export_bnb`` streams a Hugging Face checkpoint (Mixtral, Qwen2 MoE, Qwen3 MoE,
OLMoE, Granite MoE, Qwen3-Next, Qwen3.5 MoE, DeepSeek V2 / V3 / V3.2, Kimi K2,
GLM-4.5 (glm4_moe), GLM-4.7-Flash (glm4_moe_lite), GLM-5 (glm_moe_dsa), dots.llm1,
ERNIE-4.5 MoE, MiniMax-M2; per-expert or fused expert layout; also Mistral / Llama) into a directory
of sharded safetensors in the family's per-expert HF key layout (what
``save_pretrained`` writes, declared per family as
``quantkit.converters.HfExperts``) as bitsandbytes' ``Linear4bit`` serialises it:
``model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight`` (Mixtral) or
``model.layers.{i}.mlp.experts.{e}.gate_proj.weight`` (packed 4-bit) plus
``.absmax``, ``.quant_map``, ``.nested_absmax``, ``.nested_quant_map`` and
``.quant_state.bitsandbytes__nf4``.  Roles come from the converter tables
(``quantkit.converters``), never from substrings: every expert matrix is
quantised on its own (its own blocks and absmax), attention, dense FFN and
shared-expert projections are quantised, and routers (a shared expert's gate
too), norms, biases, token embeddings and lm_head are copied byte for byte in
the source dtype under their own keys (as the source stores them: the GGUF name tables'
value transforms and views, e.g. Qwen3-Next's ``w + 1`` norms, ``-exp(A_log)`` and its
conv kernel read as a matrix, do not apply; further ``nn.Linear`` weights a family
declares in ``HfExperts.linears`` are 4-bit, those in ``HfExperts.kept`` (the DSA indexer's
``weights_proj``) are not; a router's selection bias ``e_score_correction_bias``, a buffer in
transformers, is kept like the router (under the key ``save_pretrained`` writes: ``HfExperts.moved``, e.g. MiniMax-M2's
``block_sparse_moe.e_score_correction_bias``, which transformers 5 holds as ``mlp.e_score_correction_bias``); empty matrices (GLM-4.5's
zero-width shared MLP at ``n_shared_experts = 0``) are kept too; leading dense blocks are plain 4-bit MLPs; tensors
transformers does not load, multi-token-prediction blocks (``model.layers.N`` past
num_hidden_layers, Qwen3-Next's ``mtp.*``), are left out).  ``config.json`` (the source's) gets a
``quantization_config`` whose ``llm_int8_skip_modules`` lists the kept modules
by full path.  Tensors are read lazily and written one at a time, and the
directory is built beside the target and renamed into place.  The family's converter maps and checks the checkpoint
(``converters.llama.output_for_transformers``): what only llama.cpp's graph cannot compute (``llama_cpp_limit``: DeepSeek-V2's
``group_limited_greedy``, Kimi K2's YaRN ramp, dots1's grouped-query and sliding-window attention, GLM-4.5's YaRN or missing shared
expert, ERNIE-4.5 MoE's ``use_bias`` (its biases kept as stored), ``moe_norm_min`` and rope types, MiniMax-M2's rope types) is
exported; every other check refuses as for GGUF.

``load_bnb`` rebuilds a transformers 5 model from such a directory: attention
(and dense / shared-expert) linears become ``bitsandbytes.nn.Linear4bit`` and
each MoE block's fused experts module (``MixtralExperts``, ``Qwen3MoeExperts``,
``OlmoeExperts``, ``Qwen2MoeExperts``) is replaced by an ``Experts4bit``
(per-expert ``Linear4bit`` gate / up / down running ``bitsandbytes.matmul_4bit``),
so the experts stay 4-bit in memory; every other tensor, persistent buffers included, is used
with the values stored, in the dtype ``from_pretrained`` gives it (the source's, float32 where
the model's ``_keep_in_fp32_modules_strict`` says: the selection bias), and a persistent buffer
no shard holds is an error (never the zeros transformers initialises it with).  A family
transformers knows under another model_type (``HfExperts.model_type``: Kimi K2 -> DeepSeek V3)
is built as that model; a tensor stored under another module than transformers 5 holds it (``HfExperts.moved``) is set where the
model holds it.

Not for: GGUF output (``quantkit.pipeline.convert``) or argument parsing (``quantkit.cli.main``).
"""

from __future__ import annotations

import contextlib
from collections import Counter
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from quantkit.hf.checkpoint import Checkpoint, TensorRef, load_config, open_checkpoint
from quantkit.converters import CONVERTERS, Converter, HfExperts, for_model_type
from quantkit.converters.llama import output_for_transformers
from quantkit.format.encode import to_f32
from quantkit.errors import CheckpointError, OutputError, QuantkitError
from quantkit.format.gguf_spec import TensorName, block_of
from quantkit.hf.mapping import OutTensor, Role, Transform
from quantkit.format.output import check_free_space, clean_stale_partials, fsync_dir, partial_prefix

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

QUANT_TYPES = ("nf4", "fp4")
#: --compute-dtype name -> torch dtype name (also what quantization_config records).
COMPUTE_DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
BLOCKSIZE = 64  # elements per absmax block (bitsandbytes' default for 4-bit)
NESTED_BLOCKSIZE = 256  # absmax values per nested block (fixed by bitsandbytes' double quantisation)
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
CPU_PACK_ROWS = 32  # rows per group of bitsandbytes' AVX512-BF16 CPU weight packing (``_convert_weight_packed_for_cpu``)
QUANTISED_ROLES = frozenset({Role.ATTENTION, Role.EXPERTS, Role.FFN})
DEFAULT_SHARD_BYTES = 2 * 2**30
WRITE_CHUNK = 16 * 2**20  # bytes of a kept tensor copied per write (then its source pages are dropped)
#: Files copied verbatim next to the weights when the source has them.
COPIED_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
INDEX = "model.safetensors.index.json"
ST_DTYPES = {"uint8": "U8", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # torch dtype name -> safetensors
ITEMSIZE = {"U8": 1, "F16": 2, "BF16": 2, "F32": 4}

#: the converter tables' routed-expert kinds (GGUF names) -> the HfExperts field naming their per-expert key
EXPERT_KINDS = {TensorName.FFN_GATE_EXP + ".weight": "gate", TensorName.FFN_UP_EXP + ".weight": "up", TensorName.FFN_DOWN_EXP + ".weight": "down"}
ROUTER_KIND = TensorName.FFN_GATE_INP + ".weight"
QUANT_AUX_KEY = re.compile(r"(?P<base>.+\.weight)\.(?P<part>absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.bitsandbytes__\w+)\Z")


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Item:
    """One output weight: where its values come from and whether it is quantised."""

    key: str  # output key of the weight, e.g. "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    role: Role
    shape: tuple[int, ...]
    ref: TensorRef
    expert: int | None = None  # index into a fused [E, 2F, H] / [E, H, F] source
    half: Transform = Transform.NONE  # FIRST_HALF / SECOND_HALF of a fused gate_up_proj
    linear: bool = False  # an nn.Linear the family declares 4-bit whatever its role (``HfExperts.linears``)
    kept: bool = False  # a weight the family keeps in source precision whatever its role (``HfExperts.kept``)

    @property
    def quantised(self) -> bool:
        """Weight matrices of the quantised roles (and declared linears, less declared kept ones); biases (1-D) and empty
        matrices (GLM-4.5's zero-width shared MLP at n_shared_experts = 0) stay in source precision."""
        return (self.role in QUANTISED_ROLES or self.linear) and not self.kept and len(self.shape) == 2 and self.key.endswith(".weight") and self.n_elements > 0

    @property
    def module(self) -> str:
        return self.key.removesuffix(".weight")

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    def source(self) -> np.ndarray:
        """The source values as stored (a view of the memory map; BF16 as uint16)."""
        a = self.ref.array()
        if self.expert is not None:
            a = a[self.expert]
        return self.half.select(a)


@dataclass(frozen=True)
class Entry:
    """One safetensors entry of the output; ``shape`` None = 1-D, length known once written."""

    key: str
    dtype: str
    shape: tuple[int, ...] | None

    @property
    def nbytes(self) -> int:
        return ITEMSIZE[self.dtype] * math.prod(self.shape) if self.shape is not None else 512  # a packed quant_state is ~200 bytes


def quant_state_key(key: str, quant_type: str) -> str:
    return f"{key}.quant_state.bitsandbytes__{quant_type}"


def quant_entries(key: str, n: int, quant_type: str, double_quant: bool, blocksize: int = BLOCKSIZE) -> list[Entry]:
    """The entries bitsandbytes serialises for an ``n``-element weight (``QuantState.as_dict(packed=True)``)."""
    blocks = -(-n // blocksize)
    out = [Entry(key, "U8", ((n + 1) // 2, 1)), Entry(f"{key}.absmax", "U8" if double_quant else "F32", (blocks,)), Entry(f"{key}.quant_map", "F32", (16,))]
    if double_quant:
        out += [Entry(f"{key}.nested_absmax", "F32", (-(-blocks // NESTED_BLOCKSIZE),)), Entry(f"{key}.nested_quant_map", "F32", (256,))]
    return out + [Entry(quant_state_key(key, quant_type), "U8", None)]


def expert_layout(conv: Converter, where: str) -> HfExperts | None:
    """A family's transformers expert layout (None for a dense family); a MoE family without one is refused."""
    layout = conv.hf_experts
    if layout is None and conv.routing is not None:
        exported = sorted(c.model_type for c in CONVERTERS.values() if c.routing is None or c.hf_experts)
        raise QuantkitError(f"{where}: --format bnb does not export model_type {conv.model_type!r} (its converter declares no transformers expert layout; "
                            f"bnb exports {', '.join(exported)}); fix: convert it to GGUF")
    return layout


def _kind(name: str) -> tuple[str, int | None]:
    """GGUF tensor name -> (its template with ``{bid}``, block)."""
    bid = block_of(name)
    return (name if bid is None else "blk.{bid}." + name[len(f"blk.{bid}.") :]), bid


def _renamed(key: str, layout: HfExperts | None) -> str:
    """A source key as transformers' causal LM names it (``HfExperts.renamed``)."""
    for old, new in layout.renamed if layout is not None else ():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _moved(key: str, layout: HfExperts | None, to_memory: bool) -> str:
    """A key as ``save_pretrained`` stores it (``to_memory`` False) or as transformers 5 holds it (True): ``HfExperts.moved``."""
    for stored, memory in layout.moved if layout is not None else ():
        src, dst = (stored, memory) if to_memory else (memory, stored)
        m = re.fullmatch(re.escape(src).replace(r"\{bid\}", r"(\d+)"), key)
        if m is not None:
            return dst.format(bid=m.group(1))
    return key


def plan_items(tensors: Sequence[OutTensor], layout: HfExperts | None) -> list[Item]:
    """Converter-table tensors -> output weights in the family's per-expert HF layout (experts split one by one).

    Routed experts and the router go under ``layout``'s keys; every other tensor keeps its checkpoint key
    (the same in both expert layouts; renamed as ``layout.renamed`` says), once: an ``output`` a graph reads from the tied embeddings is not
    written again (config.json's ``tie_word_embeddings`` says so).
    """
    items: list[Item] = []
    keys: set[str] = set()
    linears = [_key_pattern(k) for k in layout.linears] if layout is not None else []
    kept = [_key_pattern(k) for k in layout.kept] if layout is not None else []
    for t in tensors:
        if t.data is not None:  # generated for GGUF only (rope_freqs); not an HF weight
            continue
        kind, bid = _kind(t.name)
        if t.role is not Role.EXPERTS:
            key = layout.router.format(bid=bid) if layout is not None and kind == ROUTER_KIND else _moved(_renamed(t.sources[0].name, layout), layout, False)
            if key not in keys:  # one source split into several GGUF tensors (in_proj_qkvz) is one weight here
                keys.add(key)
                items.append(Item(key, t.role, t.sources[0].shape, t.sources[0], linear=any(p.match(key) for p in linears),
                                  kept=any(p.match(key) for p in kept)))
            continue
        if layout is None or kind not in EXPERT_KINDS:
            raise CheckpointError(f"checkpoint: tensor {t.sources[0].name!r} ({t.name}) has no place in a bitsandbytes checkpoint; fix: convert this model to GGUF instead")
        template = getattr(layout, EXPERT_KINDS[kind])
        fused = len(t.sources[0].shape) == 3  # one [E, rows, cols] source (mlp.experts.*) instead of one per expert
        for e in range(t.shape[0]):
            ref = t.sources[0] if fused else t.sources[e]
            items.append(Item(template.format(bid=bid, xid=e), t.role, tuple(t.shape[1:]), ref, e if fused else None, t.transform if fused else Transform.NONE))
    return items


def item_entries(item: Item, quant_type: str, double_quant: bool) -> list[Entry]:
    if item.quantised:
        return quant_entries(item.key, item.n_elements, quant_type, double_quant)
    return [Entry(item.key, item.ref.dtype, item.shape)]


def skip_modules(items: Sequence[Item]) -> list[str]:
    """Full module paths of the weights kept in source precision (``llm_int8_skip_modules``).

    transformers matches these as a prefix up to a module boundary, as a regex
    or as a suffix, older versions as a substring: none may select a
    quantised module, which is checked here.
    """
    kept = [i.module for i in items if not i.quantised and i.key.endswith(".weight")]  # modules, not their biases
    quantised = [i.module for i in items if i.quantised]
    for k in kept:
        boundary = re.compile(rf"(?:{k})(?:(?<=\.)|(?=\.|$))")
        clash = next((q for q in quantised if k in q or boundary.match(q) or q.endswith(k)), None)
        if clash is not None:  # cannot happen with the declared HF names; guards new tables
            raise QuantkitError(f"skip module {k!r} would also select the quantised module {clash!r}; fix: report this as a quantkit bug")
    return kept


def shard_items(items: Sequence[Item], quant_type: str, double_quant: bool, max_bytes: int) -> list[list[Item]]:
    """Group weights into shards of at most ``max_bytes`` (a weight and its statistics share a shard)."""
    shards: list[list[Item]] = [[]]
    size = 0
    for item in items:
        n = sum(e.nbytes for e in item_entries(item, quant_type, double_quant))
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    return shards


# ----------------------------------------------------------------------------- writing


class ShardWriter:
    """A safetensors file written front to back, tensor by tensor, with a reserved header.

    The header is sized for the declared entries before any data is written
    (offsets and unknown lengths at their widest), filled in by :meth:`finish`
    and padded with spaces, so no tensor has to be held in memory or copied twice.
    """

    def __init__(self, path: Path, entries: Sequence[Entry]) -> None:
        self.path = path
        self.entries = list(entries)
        widest = {e.key: {"dtype": e.dtype, "shape": list(e.shape or (10**9,)), "data_offsets": [10**15, 10**15]} for e in self.entries}
        self.header_len = -(-len(json.dumps({"__metadata__": {"format": "pt"}, **widest}).encode()) // 8) * 8
        self.done: dict[str, dict[str, Any]] = {}
        self.pos = 0
        self.f = open(path, "wb")
        self.f.seek(8 + self.header_len)

    def write(self, key: str, dtype: str, shape: tuple[int, ...], chunks: Iterator[memoryview | bytes]) -> None:
        want = self.entries[len(self.done)]
        if (key, dtype) != (want.key, want.dtype) or (want.shape is not None and tuple(shape) != want.shape):
            raise AssertionError(f"{self.path.name}: wrote {key} {dtype}{list(shape)}, declared {want}")  # an exporter bug
        start = self.pos
        for chunk in chunks:
            self.pos += self.f.write(chunk)
        if self.pos - start != math.prod(shape) * ITEMSIZE[dtype]:
            raise AssertionError(f"{self.path.name}: {key} has {self.pos - start} bytes, shape {list(shape)} x {dtype} needs {math.prod(shape) * ITEMSIZE[dtype]}")
        self.done[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, self.pos]}

    def finish(self) -> None:
        if len(self.done) != len(self.entries):
            raise AssertionError(f"{self.path.name}: {len(self.done)} of {len(self.entries)} declared tensors written")
        raw = json.dumps({"__metadata__": {"format": "pt"}, **self.done}, separators=(",", ":")).encode()
        if len(raw) > self.header_len:
            raise AssertionError(f"{self.path.name}: header needs {len(raw)} bytes, {self.header_len} reserved")
        self.f.seek(0)
        self.f.write(struct.pack("<Q", self.header_len) + raw + b" " * (self.header_len - len(raw)))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()

    def close(self) -> None:
        self.f.close()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    import torch

    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: same bits as int16
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def quantize_item(item: Item, quant_type: str, double_quant: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One weight -> {output key: tensor}: packed 4-bit data and its own QuantState (as_dict(packed=True)).

    Quantised from the exact float32 widening of the source (no rounding to
    the compute dtype first); the state records ``dtype``, the dtype the
    weight dequantises to at run time.
    """
    import torch
    from bitsandbytes.functional import quantize_4bit

    w = torch.from_numpy(np.require(to_f32(item.source(), item.ref.dtype), requirements=["C", "W"]).reshape(item.shape))
    q, state = quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type=quant_type)
    state.dtype = dtype
    return {item.key: q, **{f"{item.key}.{k}": v for k, v in state.as_dict(packed=True).items()}}


def _kept_chunks(ref: TensorRef) -> Iterator[memoryview]:
    """The stored bytes of a kept tensor, piece by piece, dropping each piece's source pages."""
    raw = ref.raw()
    for lo in range(0, len(raw), WRITE_CHUNK):
        yield raw[lo : lo + WRITE_CHUNK]
        ref.release(lo, min(len(raw), lo + WRITE_CHUNK))
    del raw


def write_shard(path: Path, items: Sequence[Item], quant_type: str, double_quant: bool, dtype: torch.dtype, on_tensor: Callable[[str], None] | None) -> dict[str, int]:
    """Write one shard; returns {key: bytes} of what it holds."""
    entries = [e for item in items for e in item_entries(item, quant_type, double_quant)]
    writer = ShardWriter(path, entries)
    try:
        for item in items:
            if on_tensor is not None:
                on_tensor(item.key)
            if not item.quantised:
                writer.write(item.key, item.ref.dtype, item.shape, _kept_chunks(item.ref))
                continue
            tensors = quantize_item(item, quant_type, double_quant, dtype)
            item.ref.release()
            for e in item_entries(item, quant_type, double_quant):
                t = tensors[e.key]
                writer.write(e.key, ST_DTYPES[str(t.dtype).removeprefix("torch.")], tuple(t.shape), iter((_tensor_bytes(t),)))
        writer.finish()
    except BaseException:
        writer.close()
        raise
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in writer.done.items()}


# ----------------------------------------------------------------------------- the output directory


def check_target_dir(path: Path, src: Path, force: bool) -> None:
    """Refuse a file, a link, a missing parent, the source itself, or an existing directory without force."""
    if path.is_symlink():
        raise OutputError(f"{path}: is a symbolic link; fix: give the path of a new or existing directory itself")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: exists and is not a directory; fix: give a directory name for --format bnb output")
    if not path.parent.is_dir():
        raise OutputError(f"{path.parent}: directory does not exist; fix: create it first (mkdir -p {path.parent})")
    resolved, source = path.resolve(), src.resolve()
    if resolved == source or resolved in source.parents:
        raise OutputError(f"{path}: is (or contains) the source checkpoint {src}; fix: write to another directory")
    if path.is_dir():
        if not force:
            raise OutputError(f"{path}: already exists; fix: pass --force to replace it or choose another directory")
        if any(path.iterdir()) and not (path / "config.json").is_file():
            raise OutputError(f"{path}: is a non-empty directory without config.json, not a model directory; fix: choose another output directory (refusing to replace it even with --force)")


@contextlib.contextmanager
def atomic_dir(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; on success fsync it and rename it onto ``path``.

    On any exception (KeyboardInterrupt included) the temp directory is removed
    and ``path`` is left as it was.  With ``force`` an existing ``path`` is
    moved aside, replaced, then deleted.
    """
    clean_stale_partials(path)
    tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(path), suffix=".partial", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if path.exists():
            if not force:
                raise OutputError(f"{path}: appeared during the export; fix: pass --force to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "dir")
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / "dir", path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def quantization_config(quant_type: str, double_quant: bool, compute_dtype: str, skip: Sequence[str]) -> dict[str, Any]:
    """What ``BitsAndBytesConfig(load_in_4bit=True, ...).to_dict()`` writes, with the kept modules named."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": list(skip),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": COMPUTE_DTYPES[compute_dtype],
        "bnb_4bit_quant_storage": "uint8",
    }


@dataclass(frozen=True)
class BnbExportResult:
    output: str
    model_type: str
    quant_type: str
    double_quant: bool
    compute_dtype: str
    n_weights: int  # weight tensors (an expert matrix counts once)
    n_params: int
    n_params_4bit: int
    n_shards: int
    nbytes: int  # bytes of all safetensors shards
    seconds: float
    skip_modules: tuple[str, ...]

    @property
    def share_4bit(self) -> float:
        return self.n_params_4bit / max(1, self.n_params)

    def to_json(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "format": "bnb",
            "model_type": self.model_type,
            "quant_type": self.quant_type,
            "double_quant": self.double_quant,
            "compute_dtype": self.compute_dtype,
            "weights": self.n_weights,
            "params": self.n_params,
            "params_4bit": self.n_params_4bit,
            "share_4bit": round(self.share_4bit, 6),
            "shards": self.n_shards,
            "bytes": self.nbytes,
            "bits_per_weight": round(8 * self.nbytes / max(1, self.n_params), 4),
            "seconds": round(self.seconds, 3),
            "skip_modules": list(self.skip_modules),
        }


def _check_options(quant_type: str, compute_dtype: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise QuantkitError(f"--bnb-type {quant_type!r} is not a bitsandbytes 4-bit type; fix: use one of {', '.join(QUANT_TYPES)}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise QuantkitError(f"--compute-dtype {compute_dtype!r} is not supported; fix: use one of {', '.join(COMPUTE_DTYPES)}")


def prepare_bnb(ckpt: Checkpoint) -> tuple[str, list[Item]]:
    """Map a checkpoint with its converter table; returns (model_type, output weights).

    Kept tensors are the source's as stored: a weight the name table reads through a view of another
    shape (Qwen3-Next's conv1d kernel [C, 1, K] as [C, K]) is written under its source shape, and
    the table's value transforms (``w + 1`` norms, ``-exp(A_log)``) are GGUF-only.  Source tensors
    transformers does not load are left out: the multi-token-prediction blocks a family's converter would
    keep as nextn blocks (``Converter.mtp_sources``, before mapping, as ``convert --no-mtp`` does: GLM's
    and DeepSeek V3.2's ``model.layers.N`` past num_hidden_layers; DeepSeek V3's the name table drops
    itself) and ``HfExperts.unloaded`` (Qwen3-Next's ``mtp.*``).  Keys are
    renamed as ``AutoModelForCausalLM`` names them (``HfExperts.renamed``: a vision-language
    checkpoint's ``model.language_model.`` -> ``model.``; its vision tower the name table drops).
    """
    conv = for_model_type(ckpt.model_type, where=str(ckpt.root / "config.json"))
    layout = expert_layout(conv, str(ckpt.root))
    with output_for_transformers():  # the family's checks, less those of what only llama.cpp cannot compute
        mtp = set(conv.mtp_sources(ckpt.config, list(ckpt.tensors)))
        if mtp:  # transformers' model has num_hidden_layers blocks: it never loads these
            log.info("%s: %d multi-token-prediction tensor(s) (e.g. %s), which transformers does not load, are left out of the bitsandbytes export",
                     ckpt.root, len(mtp), min(mtp))
            ckpt.tensors = {n: r for n, r in ckpt.tensors.items() if n not in mtp}
        _, tensors = conv.map(ckpt)  # the name table accounts for every tensor
    tensors = [t for t in tensors if t.data is None]  # generated tensors (rope_freqs) are not checkpoint weights
    unloaded = [re.compile(p) for p in layout.unloaded] if layout is not None else []
    if unloaded:
        dropped = sorted({r.name for t in tensors for r in t.sources if any(p.search(r.name) for p in unloaded)})
        if dropped:
            log.info("%s: %d tensor(s) transformers does not load (e.g. %s) are left out of the bitsandbytes export", ckpt.root, len(dropped), dropped[0])
        tensors = [t for t in tensors if not any(p.search(t.sources[0].name) for p in unloaded)]
    items = []
    for item in plan_items(tensors, layout):
        stored = ckpt.tensors.get(item.ref.name)
        if item.expert is None and stored is not None and stored is not item.ref and stored.shape != item.ref.shape:
            if item.quantised:  # cannot happen with the declared tables; guards new ones
                raise QuantkitError(f"{ckpt.root}: tensor {item.ref.name!r} is read as {list(item.ref.shape)} by the name table; fix: report this as a quantkit bug")
            item = replace(item, ref=stored, shape=stored.shape)  # as stored, under the source shape
        items.append(item)
    dup = next((k for k, n in Counter(i.key for i in items).items() if n > 1), None)
    if dup is not None:
        raise CheckpointError(f"{ckpt.root}: two source tensors give the weight {dup!r}; fix: use a checkpoint with one copy of the model")

    return ckpt.model_type, items


def export_bnb(
    src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "bf16",
    force: bool = False,
    on_tensor: Callable[[str], None] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    allow_pickle: bool = False,
) -> BnbExportResult:
    """Export an HF checkpoint as a bitsandbytes 4-bit directory with per-expert 4-bit experts (atomically)."""
    try:
        import torch
    except ImportError:
        raise QuantkitError("--format bnb needs torch and bitsandbytes; fix: pip install 'quantkit[dev]' (torch, bitsandbytes==0.50.2)") from None
    _check_options(quant_type, compute_dtype)
    t0 = time.perf_counter()
    src, out_dir = Path(src), Path(out_dir)
    check_target_dir(out_dir, src, force)
    with open_checkpoint(src, allow_pickle=allow_pickle) as ckpt:
        model_type, items = prepare_bnb(ckpt)
        skip = skip_modules(items)
        shards = shard_items(items, quant_type, double_quant, max_shard_bytes)
        need = sum(e.nbytes for item in items for e in item_entries(item, quant_type, double_quant))
        check_free_space(out_dir, need + (1 << 20))
        dtype = getattr(torch, COMPUTE_DTYPES[compute_dtype])
        log.info("exporting %s (%s) -> %s as bitsandbytes %s: %d weights in %d shard(s), %.2f GiB", src, model_type, out_dir, quant_type, len(items), len(shards), need / 2**30)
        sizes: dict[str, int] = {}
        weight_map: dict[str, str] = {}
        try:
            with atomic_dir(out_dir, force=force) as tmp:
                for k, shard in enumerate(shards):
                    name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                    written = write_shard(tmp / name, shard, quant_type, double_quant, dtype, on_tensor)
                    sizes.update(written)
                    weight_map.update(dict.fromkeys(written, name))
                index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
                (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
                config = {**ckpt.config, "quantization_config": quantization_config(quant_type, double_quant, compute_dtype, skip)}
                (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
                for f in COPIED_FILES:
                    if (src / f).is_file():
                        shutil.copyfile(src / f, tmp / f)
        except OSError as e:
            raise OutputError(f"{out_dir}: writing failed ({e.strerror or e}); nothing was left at the path; fix: free disk space or write elsewhere") from e
    n_params = sum(i.n_elements for i in items)
    n_4bit = sum(i.n_elements for i in items if i.quantised)
    log.info("wrote %s: %.1f%% of %d parameters 4-bit", out_dir, 100 * n_4bit / max(1, n_params), n_params)
    return BnbExportResult(
        output=str(out_dir), model_type=model_type, quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype,
        n_weights=len(items), n_params=n_params, n_params_4bit=n_4bit, n_shards=len(shards),
        nbytes=sum(p.stat().st_size for p in out_dir.glob("*.safetensors")), seconds=time.perf_counter() - t0, skip_modules=tuple(skip),
    )


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class BnbSettings:
    quant_type: str
    double_quant: bool
    compute_dtype: str  # torch dtype name


def read_settings(path: Path, config: dict[str, Any]) -> BnbSettings:
    where = path / "config.json"
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit", qc.get("_load_in_4bit")):
        raise CheckpointError(f"{where}: no bitsandbytes 4-bit quantization_config; fix: export the model with quantkit convert --format bnb")
    quant_type, double, compute = qc.get("bnb_4bit_quant_type"), qc.get("bnb_4bit_use_double_quant"), qc.get("bnb_4bit_compute_dtype")
    if quant_type not in QUANT_TYPES:
        raise CheckpointError(f"{where}: quantization_config.bnb_4bit_quant_type = {quant_type!r}, expected one of {', '.join(QUANT_TYPES)}; fix: restore config.json")
    if not isinstance(double, bool):
        raise CheckpointError(f"{where}: quantization_config.bnb_4bit_use_double_quant = {double!r}, expected true or false; fix: restore config.json")
    if compute not in COMPUTE_DTYPES.values():
        raise CheckpointError(f"{where}: quantization_config.bnb_4bit_compute_dtype = {compute!r}, expected one of {', '.join(COMPUTE_DTYPES.values())}; fix: restore config.json")
    return BnbSettings(quant_type, double, compute)


def _parse_state(path: Path, key: str, raw: np.ndarray, quant_type: str, shape: tuple[int, ...], double: bool) -> dict[str, Any]:
    """Decode and check the packed quant_state JSON of one weight."""
    try:
        state = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: tensor {key!r} is not a JSON quant_state ({e}); fix: re-export the model") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: tensor {key!r}: quant_state is not a JSON object; fix: re-export the model")
    need = ["quant_type", "blocksize", "dtype", "shape"] + (["nested_blocksize", "nested_dtype", "nested_offset"] if double else [])
    missing = [k for k in need if k not in state]
    if missing:
        raise CheckpointError(f"{path}: tensor {key!r}: quant_state lacks {', '.join(missing)}; fix: re-export the model")
    if state["quant_type"] != quant_type:
        raise CheckpointError(f"{path}: tensor {key!r}: quant_state quant_type {state['quant_type']!r}, config.json says {quant_type!r}; fix: re-export the model")
    if state["blocksize"] not in VALID_BLOCKSIZES:
        raise CheckpointError(f"{path}: tensor {key!r}: quant_state blocksize {state['blocksize']!r}, expected one of {VALID_BLOCKSIZES}; fix: re-export the model")
    if state["shape"] != list(shape):
        raise CheckpointError(f"{path}: tensor {key!r}: quant_state shape {state['shape']!r}, the model needs {list(shape)}; fix: use the config.json that belongs to these weights or re-export")
    if state["dtype"] not in COMPUTE_DTYPES.values():
        raise CheckpointError(f"{path}: tensor {key!r}: quant_state dtype {state['dtype']!r}, expected one of {', '.join(COMPUTE_DTYPES.values())}; fix: re-export the model")
    if double and (state["nested_blocksize"] != NESTED_BLOCKSIZE or not isinstance(state["nested_offset"], (int, float)) or state["nested_dtype"] != "float32"):
        raise CheckpointError(f"{path}: tensor {key!r}: bad nested statistics {state['nested_blocksize']!r}/{state['nested_dtype']!r}/{state['nested_offset']!r}; fix: re-export the model")
    return state


class StoredWeights:
    """The tensors of an exported directory, checked against the model before use."""

    def __init__(self, ckpt: Checkpoint, settings: BnbSettings, device: str) -> None:
        self.ckpt = ckpt
        self.settings = settings
        self.device = device
        self.used: set[str] = set()
        self.quantised = {m.group("base") for k in ckpt.tensors if (m := QUANT_AUX_KEY.match(k))}
        for base in sorted(self.quantised):
            if base not in ckpt.tensors:
                raise CheckpointError(f"{ckpt.root}: tensor {base!r} is missing but its 4-bit statistics are stored; fix: re-export the model")

    def where(self, key: str) -> Path:
        ref = self.ckpt.tensors.get(key)
        return ref.shard.path if ref is not None else self.ckpt.root

    def tensor(self, key: str) -> torch.Tensor:
        """A stored tensor, exactly as stored, on the target device."""
        import torch

        ref = self.ckpt.tensors.get(key)
        if ref is None:
            raise CheckpointError(f"{self.ckpt.root}: tensor {key!r} is missing; fix: re-export the model (the checkpoint is incomplete)")
        a = np.array(ref.array())  # a private copy; the mapped pages are dropped next
        ref.release()
        self.used.add(key)
        t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if ref.dtype == "BF16" else torch.from_numpy(a)
        return t.to(self.device)

    def params4bit(self, key: str, shape: tuple[int, ...], module: nn.Module | None = None) -> Any:
        """The packed weight ``key`` of logical ``shape`` as a ``Params4bit`` with its checked QuantState."""
        from bitsandbytes.nn import Params4bit

        s = self.settings
        if key not in self.quantised:
            raise CheckpointError(f"{self.where(key)}: tensor {key!r} is not stored 4-bit (no quant_state); fix: re-export the model with quantkit convert --format bnb")
        qs_key = quant_state_key(key, s.quant_type)
        if qs_key not in self.ckpt.tensors:
            found = sorted(k for k in self.ckpt.tensors if k.startswith(f"{key}.quant_state."))
            raise CheckpointError(f"{self.where(key)}: tensor {qs_key!r} is missing (found {found or 'none'}); fix: re-export the model or restore config.json's bnb_4bit_quant_type")
        qs_ref = self.ckpt.tensors[qs_key]
        state = _parse_state(qs_ref.shard.path, qs_key, qs_ref.array(), s.quant_type, shape, s.double_quant)
        stats: dict[str, Any] = {}
        for e in quant_entries(key, math.prod(shape), s.quant_type, s.double_quant, state["blocksize"]):
            ref = self.ckpt.tensors.get(e.key)
            if ref is None:
                raise CheckpointError(f"{self.where(key)}: tensor {e.key!r} is missing; fix: re-export the model (the checkpoint is incomplete)")
            if ref.dtype != e.dtype or (e.shape is not None and ref.shape != e.shape):
                raise CheckpointError(f"{ref.shard.path}: tensor {e.key!r} is {ref.dtype}{list(ref.shape)}, a {list(shape)} weight needs {e.dtype}{list(e.shape or ())}; fix: re-export the model")
            if e.key != key:
                stats[e.key[len(key) + 1 :]] = self.tensor(e.key)
        try:
            return Params4bit.from_prequantized(data=self.tensor(key), quantized_stats=stats, requires_grad=False, device=self.device, module=module)
        except (ValueError, KeyError, TypeError, AssertionError, AttributeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{qs_ref.shard.path}: tensor {qs_key!r}: bitsandbytes rejects the quant_state ({e}); fix: re-export the model") from None


def _linear4bit(stored: StoredWeights, key: str, out_features: int, in_features: int, bias: bool = False) -> nn.Module:
    """A ``Linear4bit`` holding the stored 4-bit ``key``; a bias stays a meta parameter until its tensor is set."""
    import torch
    from bitsandbytes.nn import Linear4bit

    s = stored.settings
    layer = Linear4bit(in_features, out_features, bias=bias, compute_dtype=getattr(torch, s.compute_dtype),
                       compress_statistics=s.double_quant, quant_type=s.quant_type, device="meta")
    layer.weight = stored.params4bit(key, (out_features, in_features), module=layer)
    if in_features % layer.weight.quant_state.blocksize or out_features % CPU_PACK_ROWS or s.compute_dtype != "bfloat16":
        # bitsandbytes' AVX512-BF16 CPU path repacks the weight on the first forward assuming whole blocks per row
        # and rows in groups of 32 (it fails otherwise, e.g. on a 96-wide shared expert), and then multiplies in
        # bf16 with bf16 absmax whatever the compute dtype: the generic path (dequantise, then matmul) is used instead
        layer.support_avx512bf16_for_cpu = False
    return layer


def _experts_class() -> type:
    from torch import nn

    class Experts4bit(nn.Module):
        """Drop-in for transformers 5's fused experts (``MixtralExperts``, ``Qwen3MoeExperts``, ``OlmoeExperts``,
        ``Qwen2MoeExperts``): per-expert 4-bit gate, up and down projections.

        Each expert is a ``ModuleDict`` of three ``bitsandbytes.nn.Linear4bit`` layers with their own
        QuantStates, named as the family's checkpoint names them (Mixtral's ``w1`` / ``w3`` / ``w2``,
        ``gate_proj`` / ``up_proj`` / ``down_proj``); the forward pass routes tokens exactly as the fused
        module does (``down(act(gate x) * up x)`` times the token's routing weight, a token's top-k terms summed in
        the dtype of that product and cast once, as transformers 5's default ``grouped_mm`` experts do: with a
        float32 sigmoid router's weights (DeepSeek V3, GLM, dots1) that is not the eager loop's bf16 ``index_add_``)
        and multiplies with ``bitsandbytes.matmul_4bit`` (CPU and CUDA).
        """

        def __init__(self, experts: list[dict[str, nn.Module]], act_fn: Callable[[Any], Any], names: tuple[str, str, str]) -> None:
            super().__init__()
            self.num_experts = len(experts)
            self.experts = nn.ModuleList(nn.ModuleDict(e) for e in experts)
            self.act_fn = act_fn
            self.names = names  # gate, up, down

        def forward(self, hidden_states, top_k_index, top_k_weights):
            import torch

            gate, up, down = self.names
            dtype = torch.promote_types(hidden_states.dtype, top_k_weights.dtype)
            terms = hidden_states.new_zeros((*top_k_index.shape, hidden_states.shape[-1]), dtype=dtype)  # (tokens, k, hidden)
            with torch.no_grad():
                mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)  # (E, k, tokens)
                hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
            for (e,) in hit.tolist():
                pos, token = torch.where(mask[e])
                x = hidden_states[token]
                ex = self.experts[e]
                y = ex[down](self.act_fn(ex[gate](x)) * ex[up](x)).to(hidden_states.dtype) * top_k_weights[token, pos, None]
                terms[token, pos] = y.to(dtype)
            return terms.sum(dim=1).to(hidden_states.dtype)

    return Experts4bit


def _key_pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{bid\}", r"\d+").replace(r"\{xid\}", r"\d+") + r"\Z")


def _load_experts(model: nn.Module, stored: StoredWeights, layout: HfExperts, fp32: re.Pattern[str] | None = None) -> None:
    """Swap every MoE block's fused experts for per-expert ``Linear4bit`` layers and set its router as stored."""
    experts_cls = _experts_class()
    names = layout.projections
    for bid in range(len(model.get_submodule("model.layers"))):
        block = layout.block.format(bid=bid)
        try:
            moe = model.get_submodule(block)
        except AttributeError:
            continue
        fused = getattr(moe, "experts", None)
        if fused is None or getattr(fused, "down_proj", None) is None or getattr(fused.down_proj, "ndim", 0) != 3:
            continue  # a dense block
        n_expert, hidden, ff = fused.down_proj.shape  # [E, H, F]
        shapes = {layout.gate: (ff, hidden), layout.up: (ff, hidden), layout.down: (hidden, ff)}
        experts = [
            {name: _linear4bit(stored, template.format(bid=bid, xid=e), *shape) for name, (template, shape) in zip(names, shapes.items())}
            for e in range(n_expert)
        ]
        moe.experts = experts_cls(experts, fused.act_fn, names)
        router = layout.router.format(bid=bid)
        _set_parameter(model, f"{block}.{layout.router_param}", stored.tensor(router), stored.where(router), fp32)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with parameters on the meta device (no memory) while buffers (rotary tables) stay real."""
    from torch import nn

    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: Any) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _fp32_keys(model: nn.Module, dtype: torch.dtype) -> re.Pattern[str] | None:
    """The keys ``from_pretrained`` loads in float32 whatever ``dtype`` (``_keep_in_fp32_modules_strict``, e.g. DeepSeek V3's
    ``e_score_correction_bias``), as transformers 5 matches them (a pattern searched in the key); None when there are none."""
    import torch

    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    globs = sorted(k for k, v in plan.items() if v == torch.float32)
    return re.compile("|".join(f"(?:{g.replace('*', '.*')})" for g in globs)) if globs else None


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor, where: Path, fp32: re.Pattern[str] | None = None) -> bool:
    """Set parameter ``name``, or a persistent buffer (a router's ``e_score_correction_bias``), to a stored tensor; returns
    True for a buffer.  The values are the stored ones, in the dtype ``from_pretrained`` gives them: float32 where the model
    keeps the key in float32 (``fp32``), a buffer otherwise in the dtype the model built it in, a parameter as stored."""
    import torch
    from torch import nn

    module_name, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    old = getattr(module, "_parameters", {}).get(leaf) if module is not None else None
    buffer = old is None and module is not None and module._buffers.get(leaf) is not None and leaf not in module._non_persistent_buffers_set
    if buffer:
        old = module._buffers[leaf]
    if old is None:
        raise CheckpointError(f"{where}: tensor {name!r} has no place in a {type(model).__name__} built from config.json; fix: use the config.json that belongs to these weights")
    if tuple(old.shape) != tuple(value.shape):
        raise CheckpointError(f"{where}: tensor {name!r} has shape {list(value.shape)}, the model built from config.json needs {list(old.shape)}; fix: use the config.json that belongs to these weights")
    if fp32 is not None and fp32.search(name):
        value = value.to(torch.float32)
    elif buffer:
        value = value.to(old.dtype)
    if buffer:
        module._buffers[leaf] = value
    else:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    return buffer


def _persistent_buffers(model: nn.Module) -> list[str]:
    """The buffers ``state_dict`` holds (and ``from_pretrained`` loads from the checkpoint)."""
    return [f"{m}.{b}" if m else b for m, module in model.named_modules() for b, t in module._buffers.items()
            if t is not None and b not in module._non_persistent_buffers_set]


def load_bnb(path: str | os.PathLike[str], device: str = "cpu") -> nn.Module:
    """Load a ``quantkit convert --format bnb`` directory as a transformers 5 model whose experts stay 4-bit."""
    try:
        import bitsandbytes  # noqa: F401
        import torch
        from torch import nn
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise QuantkitError("loading a bitsandbytes checkpoint needs torch, transformers and bitsandbytes; fix: pip install 'quantkit[dev]'") from None
    path = Path(path)
    config = load_config(path)
    settings = read_settings(path, config)
    with open_checkpoint(path) as ckpt:
        layout = expert_layout(for_model_type(config.get("model_type"), where=str(path / "config.json")), str(path))
        stored = StoredWeights(ckpt, settings, device)
        embed = ckpt.tensors.get("model.embed_tokens.weight")
        if embed is None:
            raise CheckpointError(f"{path}: tensor 'model.embed_tokens.weight' is missing; fix: re-export the model")
        dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[embed.dtype]
        hf_fields = {k: v for k, v in config.items() if k not in ("quantization_config", "transformers_version")}
        if layout is not None and layout.model_type:  # a family transformers knows under another model_type (Kimi K2: DeepSeek V3)
            hf_fields["model_type"] = layout.model_type
        hf_config = AutoConfig.for_model(**hf_fields)
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        fp32 = _fp32_keys(model, dtype)
        if layout is not None:
            _load_experts(model, stored, layout, fp32)
            moe_keys = [_key_pattern(t) for t in (layout.router, layout.gate, layout.up, layout.down)]
            stray = next((k for k in sorted(ckpt.tensors) if k not in stored.used and any(p.match(k) for p in moe_keys)), None)
            if stray is not None:
                raise CheckpointError(f"{stored.where(stray)}: tensor {stray!r} belongs to no MoE block of the model built from config.json; fix: use the config.json that belongs to these weights")
        rest = [k for k in sorted(ckpt.tensors) if k not in stored.used and not QUANT_AUX_KEY.match(k)]
        for key in [k for k in rest if k in stored.quantised]:  # linears first: a kept bias then lands on its Linear4bit
            module_name = key.removesuffix(".weight")
            try:
                old = model.get_submodule(module_name)
            except AttributeError:
                old = None
            if type(old) is not nn.Linear:
                raise CheckpointError(f"{stored.where(key)}: tensor {key!r} is stored 4-bit but {module_name!r} is not a linear layer of the model; fix: use the config.json that belongs to these weights")
            model.set_submodule(module_name, _linear4bit(stored, key, old.out_features, old.in_features, bias=old.bias is not None))
        buffers = set()
        for key in [k for k in rest if k not in stored.quantised]:
            name = _moved(key, layout, True)  # where transformers 5 holds it (HfExperts.moved)
            if _set_parameter(model, name, stored.tensor(key), stored.where(key), fp32):
                buffers.add(name)
        if getattr(hf_config, "tie_word_embeddings", False) and "lm_head.weight" not in ckpt.tensors:
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        unused = sorted(set(ckpt.tensors) - stored.used)
        if unused:
            raise CheckpointError(f"{stored.where(unused[0])}: tensor {unused[0]!r} (and {len(unused) - 1} more) is not used by the model built from config.json; fix: use the config.json that belongs to these weights")
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"] + [n for n in _persistent_buffers(model) if n not in buffers]
    if missing:
        raise CheckpointError(f"{path}: the model needs {missing[0]!r} (and {len(missing) - 1} more), which no shard holds; fix: re-export the model")
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != torch.device(device):
                module._buffers[name] = buf.to(device)
    model.eval()
    log.info("loaded %s on %s: %d linear layers 4-bit", path, device, sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit"))
    return model
