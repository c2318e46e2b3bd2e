"""HF tensor name -> GGUF tensor name, as data: one table of rules per architecture.

A rule names an HF tensor with ``{bid}`` (block) and ``{xid}`` (expert)
placeholders, the GGUF tensor it becomes, the role it plays (which decides its
precision), the expected per-source shape, and an optional transform.  Rules
with ``{xid}`` are stacked: every expert of a block becomes one 3-D tensor
``[n_expert, rows, cols]``.  A source name that matches no rule, a block or
expert outside the config's range, a missing tensor or a shape that disagrees
with config.json is a :class:`CheckpointError`; nothing is passed through
silently.

Not for: reading bytes or converting dtypes (``quantkit.checkpoint``, ``quantkit.encode``).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from quantkit.checkpoint import FLOAT_DTYPES, TensorRef, shown
from quantkit.errors import CheckpointError


#: a block or expert number in a tensor name: ASCII digits, no leading zero (``layers.03`` is not ``layers.3``), at most 10 of them
INDEX_RE = r"(?:0|[1-9][0-9]{0,9})"


class Role(str, enum.Enum):
    """What a tensor does; groups in reports and decides precision rules."""

    EMBEDDINGS = "embeddings"
    ATTENTION = "attention"
    FFN = "ffn"
    EXPERTS = "experts"
    ROUTER = "router"
    NORM = "norms"
    OUTPUT = "output"
    OTHER = "other"


class Transform(str, enum.Enum):
    NONE = ""
    PERMUTE_Q = "permute_q"  # HF rotary layout -> llama.cpp's, for q_proj
    PERMUTE_K = "permute_k"  # the same for k_proj, with the KV head count
    FIRST_HALF = "first_half"  # fused [E, 2*ff, n] gate_up -> gate
    SECOND_HALF = "second_half"  # fused [E, 2*ff, n] gate_up -> up


@dataclass(frozen=True)
class Rule:
    hf: str
    gguf: str
    role: Role
    shape: Callable[[object], tuple[int, ...]]
    transform: Transform = Transform.NONE
    optional: bool = False

    @property
    def stacked(self) -> bool:
        return "{xid}" in self.hf

    @property
    def per_block(self) -> bool:
        return "{bid}" in self.hf

    def regex(self) -> re.Pattern[str]:
        pat = re.escape(self.hf).replace(r"\{bid\}", f"(?P<bid>{INDEX_RE})").replace(r"\{xid\}", f"(?P<xid>{INDEX_RE})")
        return re.compile(pat + r"\Z")


@dataclass(frozen=True)
class OutTensor:
    """One GGUF tensor to write: its sources (several when experts are stacked) and how."""

    name: str
    shape: tuple[int, ...]  # numpy order, row length last
    role: Role
    sources: tuple[TensorRef, ...]
    transform: Transform = Transform.NONE
    data: Callable[[], object] | None = None  # generated tensors (e.g. rope_freqs)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def group_totals(tensors: Iterable[Any]) -> dict[str, dict[str, float]]:
    """Tensors, parameters, bytes and bits per weight per role; items need ``role``, ``n_elements``, ``nbytes``."""
    out: dict[str, dict[str, float]] = {}
    for t in tensors:
        g = out.setdefault(t.role.value, {"tensors": 0, "params": 0, "bytes": 0})
        g["tensors"] += 1
        g["params"] += t.n_elements
        g["bytes"] += t.nbytes
    for g in out.values():
        g["bits_per_weight"] = round(8 * g["bytes"] / max(1, g["params"]), 4)
    return out


def _check_source(name: str, ref: TensorRef, rule: Rule, bid: int, xid: int, hparams: object, n_blocks: int, n_experts: int, where: str) -> None:
    if rule.per_block and bid >= n_blocks:
        raise CheckpointError(f"{where}: tensor {shown(name)} is in block {bid}, but config.json num_hidden_layers = {n_blocks}; fix: correct num_hidden_layers or remove the extra tensors")
    if rule.stacked and xid >= n_experts:
        raise CheckpointError(f"{where}: tensor {shown(name)} is expert {xid}, but config.json declares {n_experts} experts; fix: correct num_local_experts or remove the extra tensors")
    if ref.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{where}: tensor {shown(name)} has dtype {ref.dtype}, expected one of {', '.join(FLOAT_DTYPES)}; fix: re-save the checkpoint in bf16/f16/f32")
    want = tuple(rule.shape(hparams))
    if ref.shape != want:
        raise CheckpointError(f"{where}: tensor {shown(name)} has shape {shown(list(ref.shape))}, config.json implies {list(want)}; fix: use the config.json that belongs to these weights")


def map_tensors(
    tensors: Mapping[str, TensorRef],
    rules: Sequence[Rule],
    hparams: object,
    n_blocks: int,
    n_experts: int,
    ignore: Sequence[str] = (),
    where: str = "checkpoint",
) -> list[OutTensor]:
    """Apply a rule table to a checkpoint's tensors; every tensor must be accounted for."""
    compiled = [(rule, rule.regex()) for rule in rules]
    ignored = [re.compile(p) for p in ignore]
    found: dict[tuple[int, int], dict[int, TensorRef]] = {}  # (rule index, bid) -> xid -> ref
    leftover: list[str] = []
    for name, ref in tensors.items():
        hits = [(i, rule, m) for i, (rule, rx) in enumerate(compiled) if (m := rx.match(name))]
        if not hits:
            if not any(p.search(name) for p in ignored):
                leftover.append(name)
            continue
        for i, rule, m in hits:  # a fused tensor (gate_up) feeds two rules
            bid = int(m.group("bid")) if rule.per_block else -1
            xid = int(m.group("xid")) if rule.stacked else -1
            _check_source(name, ref, rule, bid, xid, hparams, n_blocks, n_experts, where)
            slot = found.setdefault((i, bid), {})
            if xid in slot:
                raise CheckpointError(f"{where}: tensors {shown(slot[xid].name)} and {shown(name)} are the same weight; fix: remove one of them")
            slot[xid] = ref
    if leftover:
        more = f" (and {len(leftover) - 1} more)" if len(leftover) > 1 else ""
        raise CheckpointError(f"{where}: tensor {shown(leftover[0])}{more} matches no known tensor of this architecture; fix: check model_type in config.json or remove the stray tensors")

    out: list[OutTensor] = []
    block_ids = range(n_blocks)
    for i, rule in enumerate(rules):
        for bid in block_ids if rule.per_block else (-1,):
            got = found.get((i, bid))
            hf_name = rule.hf.replace("{bid}", str(bid))
            if got is None:
                if rule.optional:
                    continue
                raise CheckpointError(f"{where}: tensor {hf_name.replace('{xid}', '0')!r} is missing; fix: re-download the checkpoint (every block needs it)")
            if rule.stacked:
                if len(got) != n_experts:  # every xid is < n_experts: the first gap is within len(got) + 1 tries
                    first = next(x for x in range(n_experts) if x not in got)
                    raise CheckpointError(f"{where}: tensor {hf_name.replace('{xid}', str(first))!r} is missing ({len(got)} of {n_experts} experts present); fix: re-download the shard that holds it")
                refs = tuple(got[x] for x in range(n_experts))
                shape = (n_experts, *rule.shape(hparams))
            else:
                refs = (got[-1],)
                shape = refs[0].shape
            if rule.transform in (Transform.FIRST_HALF, Transform.SECOND_HALF):
                shape = (shape[0], shape[1] // 2, *shape[2:])
            out.append(OutTensor(rule.gguf.replace("{bid}", str(bid)), tuple(shape), rule.role, refs, rule.transform))
    return out
