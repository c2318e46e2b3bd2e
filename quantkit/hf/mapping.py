"""HF tensor name -> GGUF tensor name, as data: one table of rules per architecture.

A rule names an HF tensor with ``{bid}`` (block) and ``{xid}`` (expert)
placeholders, the GGUF tensor it becomes, the role it plays (which decides its
precision), the expected per-source shape, and an optional transform.  Rules
with ``{xid}`` are stacked: every expert of a block becomes one 3-D tensor
``[n_expert, rows, cols]``.  A source name that matches no rule, a block or
expert outside the config's range, a missing tensor or a shape that disagrees
with config.json is a :class:`CheckpointError`; nothing is passed through
silently.

Not for: reading bytes or converting dtypes (``quantkit.hf.checkpoint``, ``quantkit.format.encode``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping, Sequence

import numpy as np

from quantkit.hf.checkpoint import FLOAT_DTYPES, TensorRef, shown
from quantkit.errors import CheckpointError
from quantkit.format.roles import Role, group_totals  # noqa: F401  (the name table's roles; group_totals re-exported)


#: a block or expert number in a tensor name: ASCII digits, no leading zero (``layers.03`` is not ``layers.3``), at most 10 of them
INDEX_RE = r"(?:0|[1-9][0-9]{0,9})"


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k row order -> llama.cpp's interleaved pairs (per head)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class Transform:
    """How one source matrix becomes the values written: the identity here; subclasses select or reorder rows.

    A transform knows its output shape before any weight is read (:meth:`out_rows`, so ``plan``
    runs on names and shapes alone) and applies itself to one matrix (:meth:`apply`); :meth:`select`
    is the part that picks rows without reordering them (what error sampling and the bitsandbytes
    export need).  ``Transform.NONE`` and the other constants below are the instances rules use.
    """

    name: str = ""

    def out_rows(self, rows: int) -> int:
        """Rows of one output matrix, from the rows of its source matrix."""
        return rows

    def out_shape(self, shape: tuple[int, ...], hparams: object) -> tuple[int, ...]:
        """The output tensor's shape (numpy order) from its stacked source shape: rows changed by :meth:`out_rows`.

        A transform that reshapes (one 2-D source split into a 3-D tensor, MLA's ``attn_k_b``) overrides this.
        """
        if len(shape) < 2:
            return shape
        return (*shape[:-2], self.out_rows(shape[-2]), shape[-1])

    def select(self, a: np.ndarray) -> np.ndarray:
        """The rows of source matrix ``a`` this tensor takes (a view)."""
        return a

    def apply(self, a: np.ndarray, hparams: object) -> np.ndarray:
        """The values written for source matrix ``a`` (rows selected, then reordered where needed)."""
        return self.select(a)

    @property
    def identity(self) -> bool:
        return type(self) is Transform

    NONE: ClassVar[Transform]
    PERMUTE_Q: ClassVar[Transform]
    PERMUTE_K: ClassVar[Transform]
    FIRST_HALF: ClassVar[Transform]
    SECOND_HALF: ClassVar[Transform]


@dataclass(frozen=True)
class Half(Transform):
    """One half of a fused matrix's rows: ``gate_up_proj`` [.., 2*ff, n] -> gate (first) or up (second)."""

    first: bool = True

    def out_rows(self, rows: int) -> int:
        return rows // 2

    def select(self, a: np.ndarray) -> np.ndarray:
        half = a.shape[0] // 2
        return a[:half] if self.first else a[half:]


@dataclass(frozen=True)
class PermuteHeads(Transform):
    """HF's rotate-half q/k rows -> llama.cpp's interleaved rotary layout, per query (or KV) head."""

    kv: bool = False

    def apply(self, a: np.ndarray, hparams: object) -> np.ndarray:
        return permute_rows(a, hparams.n_head_kv if self.kv else hparams.n_head)  # type: ignore[attr-defined]


Transform.NONE = Transform()
Transform.PERMUTE_Q = PermuteHeads("permute_q", kv=False)
Transform.PERMUTE_K = PermuteHeads("permute_k", kv=True)
Transform.FIRST_HALF = Half("first_half", first=True)
Transform.SECOND_HALF = Half("second_half", first=False)


@dataclass(frozen=True)
class RowSelect(Transform):
    """A transform that only picks whole rows of each source matrix along its first axis (no reordering inside a row, no
    value changed): :meth:`select` applies as well to a block-quantised source's stored blocks and scales (rows of whole
    blocks), so such a source can be carried into the GGUF as it is stored (MXFP4 experts).  Subclasses give :meth:`select`."""


@dataclass(frozen=True)
class Transposed(Transform):
    """One expert's ``[in, out]`` matrix (transformers' ``x @ W``) -> ``[out, in]`` rows: ``down_proj`` [ffn, hidden] -> [hidden, ffn]."""

    def out_shape(self, shape: tuple[int, ...], hparams: object) -> tuple[int, ...]:
        return (*shape[:-2], shape[-1], shape[-2])

    def out_rows(self, rows: int) -> int:
        raise NotImplementedError("a transpose's rows are the source's columns: use out_shape")

    def select(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(a).T)


@dataclass(frozen=True)
class TransposedHalf(Transform):
    """One expert's fused ``gate_up_proj`` [hidden, 2*ffn] (transformers' ``x @ W``) -> the gate (``first``) or up rows
    [ffn, hidden]; subclasses say which columns are the gate's (:meth:`select`)."""

    first: bool = True

    def out_shape(self, shape: tuple[int, ...], hparams: object) -> tuple[int, ...]:
        return (*shape[:-2], shape[-1] // 2, shape[-2])

    def out_rows(self, rows: int) -> int:
        raise NotImplementedError("a transposed half's rows are half the source's columns: use out_shape")


def stored_to_f32(a: np.ndarray) -> np.ndarray:
    """Values as ``TensorRef.array`` hands them out (F32, F16, or BF16 viewed as uint16) in float32."""
    if a.dtype == np.uint16:
        from quantkit.format.encode import bf16_to_f32

        return bf16_to_f32(np.ascontiguousarray(a))
    return np.asarray(a, dtype=np.float32)


@dataclass(frozen=True)
class ValueMap(Transform):
    """Every value mapped on its own, shape kept, computed in float32 and handed on as float32 (the writer then
    encodes it from F32, whatever the checkpoint stores): exact, as llama.cpp's converter computes it for BF16
    checkpoints (it widens them to F32 first) and as transformers applies it.  Subclasses give :meth:`fn`.
    """

    def fn(self, x: np.ndarray) -> np.ndarray:
        return x

    def apply(self, a: np.ndarray, hparams: object) -> np.ndarray:
        return np.ascontiguousarray(self.fn(stored_to_f32(self.select(a))), dtype=np.float32)


@dataclass(frozen=True)
class AddConstant(ValueMap):
    """``w + c``: a norm weight stored centred on zero (transformers' ``x * (1 + w)``: Qwen3-Next, Qwen3.5) for llama.cpp's ``x * w``."""

    c: float = 1.0

    def fn(self, x: np.ndarray) -> np.ndarray:
        return x + np.float32(self.c)


@dataclass(frozen=True)
class NegExp(ValueMap):
    """``-exp(w)``: a state decay stored as its log (``A_log``: Gated DeltaNet, Mamba 2) for llama.cpp's ``ssm_a``."""

    def fn(self, x: np.ndarray) -> np.ndarray:
        return -np.exp(x)


@dataclass(frozen=True)
class Chain(Transform):
    """Transforms applied one after the other (a value map, then a row order)."""

    parts: tuple[Transform, ...] = ()

    def out_rows(self, rows: int) -> int:
        for p in self.parts:
            rows = p.out_rows(rows)
        return rows

    def out_shape(self, shape: tuple[int, ...], hparams: object) -> tuple[int, ...]:
        for p in self.parts:
            shape = p.out_shape(shape, hparams)
        return shape

    def select(self, a: np.ndarray) -> np.ndarray:
        for p in self.parts:
            a = p.select(a)
        return a

    def apply(self, a: np.ndarray, hparams: object) -> np.ndarray:
        for p in self.parts:
            a = p.apply(a, hparams)
        return a


#: the instances rules use
PLUS_ONE = AddConstant("plus_one", c=1.0)
NEG_EXP = NegExp("neg_exp")


@dataclass(frozen=True)
class IntegerTable(Transform):
    """An integer lookup table written as I32 whatever the requested type (DeepSeek V4's hash routing ``tid2eid``: token ->
    expert ids, read by llama.cpp with ``ggml_get_rows`` as expert ids).  Every value must be in ``[0, getattr(hparams, bound))``:
    llama.cpp indexes with them unchecked.  The plan gives such a tensor I32 and the writer writes :meth:`apply`'s values as they are.
    """

    bound: str = "n_expert"
    source: str = ""  # the checkpoint tensor, for messages

    def apply(self, a: np.ndarray, hparams: object) -> np.ndarray:
        a = np.asarray(a)
        what = f"tensor {shown(self.source)}" if self.source else "an integer table"
        if a.dtype.kind not in "iu":
            raise CheckpointError(f"checkpoint: {what} is an integer table of dtype {a.dtype} (expected integers); fix: re-save the checkpoint with its original table")
        limit = int(getattr(hparams, self.bound))
        if a.size and (int(a.min()) < 0 or int(a.max()) >= limit):
            raise CheckpointError(f"checkpoint: {what}, an integer table, holds {int(a.min())}..{int(a.max())}, expected ids in 0..{limit - 1} "
                                  f"({self.bound}); fix: use the config.json that belongs to these weights")
        return np.ascontiguousarray(a, dtype="<i4")


INTEGER_TABLE = IntegerTable("integer_table")


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
            if not rule.transform.identity:
                shape = rule.transform.out_shape(tuple(shape), hparams)
            out.append(OutTensor(rule.gguf.replace("{bid}", str(bid)), tuple(shape), rule.role, refs, rule.transform))
    return out
