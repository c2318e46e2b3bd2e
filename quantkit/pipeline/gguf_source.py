"""An existing GGUF file as a conversion source: requantise it (F32/F16/BF16, or quantised with consent).

The file is validated by the bounded reader (``quantkit.format.gguf_read``) and the
model checks llama.cpp's loader implies (``quantkit.engine.gguf_check``): a source that
llama.cpp would refuse or abort on is refused here, with the reason, rather than
turned into a new file it refuses just the same.  Its tensors become the same :class:`OutTensor`
objects the Hugging Face path builds (names are already GGUF names, roles come
from the names), backed by the memory-mapped file, so plans, presets,
recipes, budgets, importance matrices and the streaming writer work unchanged.

Requantising an already-quantised tensor loses twice; like llama-quantize we
refuse unless ``allow_requantize`` is given, and warn when it is.  A tensor
whose planned type equals its stored type is copied byte for byte.  Every
metadata key is carried over, in the source's order, except the source's
``quantize.imatrix.*`` and ``quantkit.*`` keys (how the source was made); the keys the new file redefines
(``general.file_type``, ``general.quantized_by``, the quantisation version) keep
their place with the source's values, for the writer to overwrite: a BF16 file
quantkit wrote, requantised, gives the very bytes of the Hugging Face path.  The
source's ``general.alignment``, if any, is kept and the new file follows it.

The first part of a split set is read with all its parts as one source (its ``split.*`` keys are
dropped, as llama-quantize drops them): requantising it gives the file its single-file form gives.

Not for: Hugging Face checkpoints (``quantkit.hf.checkpoint``), reading hostile files for display (``quantkit.format.gguf_read``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantkit.format import gguf_spec
from quantkit.hf.checkpoint import Shard, TensorRef
from quantkit.errors import CheckpointError
from quantkit.engine.gguf_check import check_model
from quantkit.format.gguf_read import GGUFFile, read_gguf, role_of
from quantkit.format.gguf_write import SPLIT_KEYS, MetaValue
from quantkit.hf.mapping import INTEGER_TABLE, OutTensor

log = logging.getLogger(__name__)
Q = gguf_spec.GGMLQuantizationType
V = gguf_spec.GGUFValueType
FLOAT = {Q.F32: "F32", Q.F16: "F16", Q.BF16: "BF16"}
#: keys the new file writes itself (copied as placeholders that keep the source's key order)
REDEFINED = (gguf_spec.Keys.General.FILE_TYPE, gguf_spec.Keys.General.QUANTIZED_BY, gguf_spec.Keys.General.QUANTIZATION_VERSION, gguf_spec.Keys.General.ARCHITECTURE)


@dataclass(frozen=True)
class GGUFTensorRef(TensorRef):
    """A tensor of a GGUF file: stored bytes on demand, dequantised to float32 when stored quantised."""

    qtype: Q = Q.F32

    def array(self) -> np.ndarray:
        if self.qtype in FLOAT or self.qtype == Q.I32:  # I32: an integer table (hash routing), read as stored
            return super().array()
        from gguf import quants  # gguf-py's dequantisers: only for quantised sources (--allow-requantize)

        raw = np.frombuffer(self.raw(), dtype=np.uint8)
        rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        return quants.dequantize(raw.reshape(rows, -1), self.qtype).reshape(self.shape).astype(np.float32, copy=False)


@dataclass(frozen=True)
class GGUFShape:
    """The hyperparameters plans read, from a GGUF's metadata."""

    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int
    n_expert_used: int = 0


@dataclass
class GGUFSource:
    path: Path
    shard: Shard
    metadata: dict[str, MetaValue]
    tensors: list[OutTensor]
    hparams: GGUFShape
    quantized: list[str] = field(default_factory=list)  # names of tensors stored quantised
    model_type: str = "gguf"
    shards: list[Shard] = field(default_factory=list)  # a split set: one per part (``shard`` is the first)

    def close(self) -> None:
        for s in self.shards or [self.shard]:
            s.close()

    def __enter__(self) -> GGUFSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def source_metadata(g: GGUFFile) -> dict[str, MetaValue]:
    """The metadata to copy into the new file, with its value types, in the source's order (``g`` read with ``full=True``).

    The keys of REDEFINED are included with the source's values, as placeholders: the caller
    overwrites them (a dict update keeps a key's place), so the new file orders its keys as
    the source does.
    """
    md: dict[str, MetaValue] = {}
    for key, value in g.metadata.items():
        if key.startswith(("quantize.imatrix.", "quantkit.")) or key in SPLIT_KEYS:  # how the source was made; as llama-quantize: one file
            continue
        vtype, sub = g.types[key]  # nested arrays never get here: the reader refuses them, as llama.cpp does
        md[key] = MetaValue(value, V(vtype), None if sub is None else V(sub))
    return md


def open_gguf(path: str | Path, allow_requantize: bool = False) -> GGUFSource:
    """Validate a GGUF and describe its tensors as conversion sources (reads no tensor data)."""
    path = Path(path)
    g = read_gguf(path, full=True)
    arch = g.metadata.get("general.architecture")
    from quantkit.converters import CONVERTERS, for_gguf_arch  # the architectures quantkit writes are the ones it requantises

    if not isinstance(arch, str) or not for_gguf_arch(arch):
        shown = repr(arch)[:80] if isinstance(arch, str) else "missing" if arch is None else "not a string"
        known = ", ".join(sorted({c.arch for c in CONVERTERS.values()}))
        raise CheckpointError(f"{path}: general.architecture is {shown}; quantkit requantises {known} files; fix: use llama-quantize for other architectures")
    check_model(g)  # hyperparameters, vocabulary and tensor shapes as llama.cpp will read them
    md = source_metadata(g)

    def num(key: str, default: int | None = None) -> int:
        v = g.metadata.get(f"{arch}.{key}", default)
        if v is None:
            raise CheckpointError(f"{path}: metadata key {arch}.{key} is missing; fix: re-convert the model with quantkit convert")
        return int(v[0] if isinstance(v, (list, np.ndarray)) else v)

    hp = GGUFShape(num("block_count"), num("attention.head_count"), num("attention.head_count_kv", num("attention.head_count")),
                   num("expert_count", 0), num("expert_used_count", 0))
    shards = [Shard(path=f.path, data_start=f.data_offset, size=f.path.stat().st_size) for f in g.files]  # a split set: one per part
    tensors, quantized = [], []
    for ti in g.tensors:
        shape = tuple(reversed(ti.ne))
        if ti.qtype == Q.I32 and ti.name.endswith(".ffn_gate_tid2eid.weight"):  # hash routing's token -> expert ids: I32 as stored
            ref = GGUFTensorRef(ti.name, "I32", shape, shards[ti.part], ti.offset, ti.offset + ti.nbytes, qtype=ti.qtype)
            tensors.append(OutTensor(ti.name, shape, role_of(ti.name), (ref,), INTEGER_TABLE))
            continue
        stored = FLOAT.get(ti.qtype)
        if stored is None:
            quantized.append(ti.name)
        ref = GGUFTensorRef(ti.name, stored or "F32", shape, shards[ti.part], ti.offset, ti.offset + ti.nbytes, qtype=ti.qtype)
        tensors.append(OutTensor(ti.name, shape, role_of(ti.name), (ref,)))
    return GGUFSource(path, shards[0], md, tensors, hp, quantized, shards=shards if g.parts else [])


def check_requantize(src: GGUFSource, plan_types: dict[str, Q], allow: bool) -> list[str]:
    """Names of quantised tensors the plan quantises again: an error without ``allow``, a warning with it."""
    stored = {t.name: t.sources[0].qtype for t in src.tensors}
    changed = [n for n in src.quantized if plan_types.get(n) not in (None, stored[n], *FLOAT)]  # dequantising is not requantising
    if changed and not allow:
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        raise CheckpointError(
            f"{src.path}: tensor {changed[0]!r}{more} is already quantised; requantising loses quality twice; "
            "fix: start from an F32/F16/BF16 file, or pass --allow-requantize"
        )
    if changed:
        log.warning("%s: requantising %d already-quantised tensors (quality drops twice)", src.path, len(changed))
    return changed
