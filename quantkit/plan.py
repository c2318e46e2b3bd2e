"""Per-tensor type plan: which GGML type every output tensor gets, and why.

The single place that decides precision.  Routers (``ffn_gate_inp``), norms,
other 1-D tensors and generated tensors stay F32 whatever the requested type;
a tensor whose row length the type's block does not divide falls back the way
llama.cpp's converter does (to F16), and the plan says so.  ``convert``,
``inspect``-style reports and ``plan`` all read the same :class:`Plan`.

Not for: encoding bytes (``quantkit.encode``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Sequence

import gguf

from quantkit import presets
from quantkit.errors import QuantkitError
from quantkit.presets import ModelShape
from quantkit.gguf_write import type_nbytes
from quantkit.mapping import OutTensor, Role

log = logging.getLogger(__name__)
Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType

#: Unquantised --type names -> (type of weight matrices, general.file_type), as llama.cpp's
#: converter writes them.  Every other --type is a llama-quantize preset (quantkit.presets).
OUTTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, FT.ALL_F32),
    "f16": (Q.F16, FT.MOSTLY_F16),
    "bf16": (Q.BF16, FT.MOSTLY_BF16),
}
KEEP_F32_ROLES = (Role.ROUTER, Role.NORM)


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    role: Role
    qtype: gguf.GGMLQuantizationType
    nbytes: int
    reason: str

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def bpw(self) -> float:
        return 8 * self.nbytes / max(1, self.n_elements)


@dataclass(frozen=True)
class Plan:
    outtype: str
    file_type: gguf.LlamaFileType
    tensors: tuple[TensorPlan, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def is_quantized(self) -> bool:
        return any(t.qtype not in (Q.F32, Q.F16, Q.BF16) for t in self.tensors)


def choose(t: OutTensor, want: gguf.GGMLQuantizationType) -> tuple[gguf.GGMLQuantizationType, str]:
    """The type of one tensor and the reason, for a requested weight type."""
    if t.role in KEEP_F32_ROLES:
        return Q.F32, f"{t.role.value} stay F32"
    if len(t.shape) == 1 or t.data is not None:
        return Q.F32, "1-D tensors stay F32"
    block = gguf.GGML_QUANT_SIZES[want][0]
    if t.shape[-1] % block:
        return Q.F16, f"row length {t.shape[-1]} not a multiple of {want.name} block {block}: F16 fallback"
    return want, f"--type {want.name.lower()}"


@dataclass(frozen=True)
class Override:
    """A user rule: tensors whose GGUF name matches ``pattern`` (regex search) get ``qtype``."""

    pattern: str
    qtype: gguf.GGMLQuantizationType
    source: str = "override"
    layers: tuple[int, int] | None = None  # first, last block (negative: from the end)

    def matches(self, name: str, n_layer: int) -> bool:
        if not re.search(self.pattern, name):
            return False
        if self.layers is None:
            return True
        m = re.match(r"blk\.(\d+)\.", name)
        if m is None:
            return False
        first, last = (x + n_layer if x < 0 else x for x in self.layers)
        return first <= int(m.group(1)) <= last

    @classmethod
    def parse(cls, pattern: str, type_name: str, source: str = "override") -> Override:
        try:
            re.compile(pattern)
        except re.error as e:
            raise QuantkitError(f"{source}: pattern {pattern!r} is not a valid regex ({e}); fix: correct it") from None
        try:
            qtype = Q[type_name.upper()]
        except KeyError:
            raise QuantkitError(f"{source}: unknown type {type_name!r} (known: {', '.join(q.name for q in Q)}); fix: use one of those") from None
        return cls(pattern, qtype, source)


def _apply_override(t: OutTensor, o: Override) -> tuple[gguf.GGMLQuantizationType, str]:
    if t.role in KEEP_F32_ROLES or len(t.shape) == 1:
        log.warning("%s: %s overrides the F32 rule for %s (%s -> %s); quality may drop", o.source, o.pattern, t.name, t.role.value, o.qtype.name)
    block = gguf.GGML_QUANT_SIZES[o.qtype][0]
    if t.shape[-1] % block:
        return Q.F16, f"{o.source} {o.pattern!r} asked {o.qtype.name}, row length {t.shape[-1]} not a multiple of {block}: F16 fallback"
    return o.qtype, f"{o.source} {o.pattern!r}"


def make_plan(
    tensors: list[OutTensor], outtype: str, overrides: Sequence[Override] = (), hparams: ModelShape | None = None, has_imatrix: bool = False
) -> Plan:
    """Types for every tensor: the first matching override, else the --type rule.

    ``f32`` / ``f16`` / ``bf16`` keep every matrix in that type; any other name
    is a llama-quantize preset and picks, tensor for tensor, what llama.cpp picks.
    """
    key = outtype.lower()
    if key in OUTTYPES:
        want, ftype = OUTTYPES[key]
        base = {t.name: choose(t, want) for t in tensors}
        name = key
    else:
        if hparams is None:
            raise ValueError("preset plans need the model's hparams")
        preset = presets.get_preset(outtype)
        choices = presets.preset_types(tensors, hparams, preset.name, has_imatrix)
        presets.check_imatrix(choices, preset.name, has_imatrix)
        base = {n: (c.qtype, c.reason) for n, c in choices.items()}
        ftype, name = preset.file_type, preset.name
    n_layer = hparams.n_layer if hparams is not None else 1 + max((int(m.group(1)) for t in tensors if (m := re.match(r"blk\.(\d+)\.", t.name))), default=-1)
    plans = []
    used = set()
    for t in tensors:
        hit = next((o for o in overrides if o.matches(t.name, n_layer)), None)
        if hit is not None:
            used.add(hit)
            qtype, reason = _apply_override(t, hit)
        else:
            qtype, reason = base[t.name]
        plans.append(TensorPlan(t.name, t.shape, t.role, qtype, type_nbytes(qtype, t.shape), reason))
    for o in overrides:
        if o not in used:
            log.warning("%s: pattern %r%s matched no tensor", o.source, o.pattern, f" in layers {list(o.layers)}" if o.layers else "")
    return Plan(name, ftype, tuple(plans))
