"""Per-tensor type plan: which GGML type every output tensor gets, and why.

The single place that decides precision.  Routers (``ffn_gate_inp``), norms,
other 1-D tensors and generated tensors stay F32 whatever the requested type;
a tensor whose row length the type's block does not divide falls back the way
llama.cpp's converter does (to F16), and the plan says so.  ``convert``,
``inspect``-style reports and ``plan`` all read the same :class:`Plan`.

Not for: encoding bytes (``quantkit.format.encode``).
"""

from __future__ import annotations

import logging
import functools
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from quantkit.format import gguf_spec
from quantkit.policy import presets
from quantkit.errors import QuantkitError
from quantkit.policy.presets import ModelShape
from quantkit.format.gguf_write import type_nbytes
from quantkit.hf.mapping import IntegerTable, OutTensor, Role, RowSelect
from quantkit.hf.quantized import carried_type

log = logging.getLogger(__name__)
Q = gguf_spec.GGMLQuantizationType
FT = gguf_spec.LlamaFileType

#: Unquantised --type names -> (type of weight matrices, general.file_type), as llama.cpp's
#: converter writes them.  Every other --type is a llama-quantize preset (quantkit.policy.presets).
OUTTYPES: dict[str, tuple[gguf_spec.GGMLQuantizationType, gguf_spec.LlamaFileType]] = {
    "f32": (Q.F32, FT.ALL_F32),
    "f16": (Q.F16, FT.MOSTLY_F16),
    "bf16": (Q.BF16, FT.MOSTLY_BF16),
}
KEEP_F32_ROLES = presets.KEEP_F32_ROLES
NOT_WEIGHT_TYPES = gguf_spec.NOT_WEIGHT_TYPES
ROUTER_KEY = "ffn_gate_inp"


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    role: Role
    qtype: gguf_spec.GGMLQuantizationType
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
    file_type: gguf_spec.LlamaFileType
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


def check_outtype(outtype: str) -> str:
    """The canonical name of a --type: ``f32``/``f16``/``bf16`` or a preset's llama-quantize name (aliases resolved).

    An empty or unknown name is a QuantkitError naming the valid ones (it must never fall back to a default).
    """
    key = outtype.lower() if isinstance(outtype, str) else ""
    if key in OUTTYPES:
        return key
    return presets.get_preset(outtype).name


def choose(t: OutTensor, want: gguf_spec.GGMLQuantizationType) -> tuple[gguf_spec.GGMLQuantizationType, str]:
    """The type of one tensor and the reason, for a requested weight type."""
    why = presets.kept_f32(t)
    if why is not None:
        return Q.F32, why
    qtype, fell = presets.fallback(want, t.shape[-1], t.name)  # llama.cpp's tensor_type_fallback
    return qtype, f"--type {want.name.lower()}" + (f"; {fell}" if fell else "")


def carried(t: OutTensor) -> gguf_spec.GGMLQuantizationType | None:
    """The GGML type ``t`` is written in as the checkpoint stores it (MXFP4 experts: blocks repacked, no value touched), or None.

    Every source must be so stored and the transform may only pick whole rows (:class:`~quantkit.hf.mapping.RowSelect`).
    """
    if not t.sources or t.data is not None or not (t.transform.identity or isinstance(t.transform, RowSelect)):
        return None
    names = {carried_type(getattr(s, "quant", None)) for s in t.sources}
    name = names.pop() if len(names) == 1 else None
    return None if name is None else Q[name]


CARRIED_WHY = "carried {type}: as the checkpoint stores it, no value changed (--allow-requantize converts it per the type)"


def _carried(tensors: Sequence[OutTensor], requantize: bool) -> dict[str, tuple[gguf_spec.GGMLQuantizationType, str]]:
    """Tensors written as stored whatever the type, as llama.cpp's converter keeps MXFP4 experts (none with ``requantize``)."""
    if requantize:
        return {}
    return {t.name: (q, CARRIED_WHY.format(type=q.name)) for t in tensors if (q := carried(t)) is not None}


def _n_layer(tensors: Sequence[OutTensor]) -> int:
    return 1 + max((b for t in tensors if (b := gguf_spec.block_of(t.name)) is not None), default=-1)


@dataclass(frozen=True)
class Override:
    """A user rule: tensors whose GGUF name matches ``pattern`` (regex search) get ``qtype``."""

    pattern: str
    qtype: gguf_spec.GGMLQuantizationType
    source: str = "override"
    layers: tuple[int, int] | None = None  # first, last block (negative: from the end)

    @functools.cached_property
    def regex(self) -> re.Pattern[str]:
        """The pattern compiled once (re's own cache holds 512: a long recipe would recompile per tensor x rule)."""
        return re.compile(self.pattern)

    def matches(self, name: str, n_layer: int) -> bool:
        if not self.regex.search(name):
            return False
        if self.layers is None:
            return True
        block = gguf_spec.block_of(name)
        if block is None:
            return False
        first, last = (x + n_layer if x < 0 else x for x in self.layers)
        return first <= block <= last

    def applies_to(self, t: OutTensor) -> bool:
        """Whether this matching rule may change ``t``.

        1-D tensors (norms) are never quantised: llama.cpp cannot run them so.  A
        router changes only for a rule that names it -- a match covering the whole
        ``ffn_gate_inp`` -- so ``ffn_gate`` or ``attn_|ffn_`` leave it F32.
        """
        if len(t.shape) == 1 or t.data is not None:
            return False
        if t.role is Role.ROUTER:
            at = t.name.find(ROUTER_KEY)
            return at >= 0 and any(m.start() <= at and m.end() >= at + len(ROUTER_KEY) for m in self.regex.finditer(t.name))
        return True

    @classmethod
    def parse(cls, pattern: str, type_name: str, source: str = "override") -> Override:
        try:
            re.compile(pattern)
        except re.error as e:
            raise QuantkitError(f"{source}: pattern {pattern[:80]!r} is not a valid regex ({e}); fix: correct it") from None
        known = ", ".join(q.name for q in Q if q not in NOT_WEIGHT_TYPES)
        try:
            qtype = Q[type_name.upper()]
        except KeyError:
            raise QuantkitError(f"{source}: unknown type {type_name[:40]!r} (known: {known}); fix: use one of those") from None
        if qtype in NOT_WEIGHT_TYPES:
            raise QuantkitError(f"{source}: {qtype.name} is not a weight type llama.cpp can quantise to or compute with (known: {known}); fix: use one of those")
        return cls(pattern, qtype, source)


def _rule_for(t: OutTensor, overrides: Sequence[Override], n_layer: int) -> Override | None:
    """The first rule that matches ``t`` and may change it."""
    return next((o for o in overrides if o.matches(t.name, n_layer) and o.applies_to(t)), None)


def _apply_override(t: OutTensor, o: Override) -> tuple[gguf_spec.GGMLQuantizationType, str]:
    if t.role in KEEP_F32_ROLES:
        log.warning("%s: %s overrides the F32 rule for %s (%s -> %s); quality may drop", o.source, o.pattern, t.name, t.role.value, o.qtype.name)
    qtype, fell = presets.fallback(o.qtype, t.shape[-1], t.name)  # as llama.cpp does after a --tensor-type override
    return qtype, f"{o.source} {o.pattern!r}" + (f"; {fell}" if fell else "")


@dataclass(frozen=True)
class Target:
    """A bit budget: ``bpw`` bits per weight over all tensors, or a file of at most ``size`` bytes."""

    bpw: float | None = None
    size: int | None = None
    #: measured cost per tensor (quantkit.pipeline.sensitivity): name -> (probe type, mean KLD with that tensor alone at it);
    #: a ``budget.Measured`` from a grouped measurement says which tensors were probed together (``groups``)
    measured: Mapping[str, tuple[gguf_spec.GGMLQuantizationType, float]] | None = None
    #: relative errors sampled beforehand (``budget.measure_errors``, e.g. behind a progress bar): name -> Sampled or {type: rel}
    errors: Mapping[str, Any] | None = None
    #: the chosen types' quantising time at most this many times a Q4_K conversion of the same tensors
    #: (``--time-cap``; None: ``budget.TIME_CAP``, 0: no cap, the least damage whatever the time)
    time_cap: float | None = None

    def __post_init__(self) -> None:
        if (self.bpw is None) == (self.size is None):
            raise QuantkitError("give one of --target-bpw and --target-size")
        if self.bpw is not None and not 1.0 <= self.bpw <= 16.0:
            raise QuantkitError(f"--target-bpw {self.bpw}: expected a value between 1 and 16 bits per weight")
        if self.time_cap is not None and not (self.time_cap == 0 or 0.2 <= self.time_cap <= 100):
            raise QuantkitError(f"--time-cap {self.time_cap:g}: expected 0 (no cap) or a factor between 0.2 and 100; fix: e.g. --time-cap 1.15")

    @property
    def label(self) -> str:
        return f"target-bpw {self.bpw:g}" if self.bpw is not None else f"target-size {self.size}B"

    def out_of_reach(self, lo: int, hi: int, n_elements: int, overhead: int) -> QuantkitError:
        """The error for a budget no plan meets, in the units the user gave."""
        if self.bpw is not None:
            a, b, unit, want = 8 * lo / n_elements, 8 * hi / n_elements, " bits per weight", f"--target-bpw {self.bpw:g}"
            fmt = "{:.3f}"
        else:
            a, b, unit, want = lo + overhead, hi + overhead, " bytes", f"--target-size {self.size:,} B"
            fmt = "{:,}"
        rng = f"{fmt.format(a)}..{fmt.format(b)}{unit} (every matrix at its cheapest type .. every matrix at Q8_0)"
        return QuantkitError(f"{want} is out of reach: plans of this model span {rng}; fix: choose a target in that range, or --type f16/bf16 for more")

    def weight(self, t: OutTensor, rel: Mapping[gguf_spec.GGMLQuantizationType, float], n_layer: int) -> float:
        """Cost of a unit of relative error in ``t``: measured KLD per relative error, else the prior."""
        from quantkit.policy import budget

        if self.measured is not None and t.name in self.measured:
            qtype, kld = self.measured[t.name]
            if rel.get(qtype, 0.0) > 0:
                return max(kld, 0.0) / rel[qtype]
        return budget.prior_weight(t, n_layer)

    def weights(self, tensors: Sequence[OutTensor], rels: Mapping[str, Mapping[gguf_spec.GGMLQuantizationType, float]], n_layer: int) -> dict[str, float]:
        """:meth:`weight` of every tensor in ``rels``.  Tensors measured together (a grouped measurement) share their
        group's KLD in proportion to prior weight x relative error at the probe type: each gets
        ``prior(t) * KLD(group) / sum_group prior * rel`` -- the measured scale, the priors' shape within the group."""
        from quantkit.policy import budget

        measured = self.measured or {}
        groups = getattr(measured, "groups", None) or {}
        by_name = {t.name: t for t in tensors if t.name in rels}
        out = {n: self.weight(t, rels[n], n_layer) for n, t in by_name.items() if n not in groups or n not in measured}
        members: dict[str, list[str]] = {}
        for n in by_name:
            if n not in out:
                members.setdefault(groups[n], []).append(n)
        for names in members.values():
            prior = {n: budget.prior_weight(by_name[n], n_layer) for n in names}
            exposure = sum(prior[n] * rels[n].get(measured[n][0], 0.0) for n in names)
            kld = max(measured[names[0]][1], 0.0)
            for n in names:
                out[n] = prior[n] * kld / exposure if exposure > 0 else prior[n]
        return out

    def tensor_bytes(self, n_elements: int, overhead: int) -> int:
        """Bytes of tensor data the budget allows (``overhead``: header and alignment of the file)."""
        if self.bpw is not None:
            return int(self.bpw * n_elements / 8)
        assert self.size is not None
        if self.size <= overhead:
            raise QuantkitError(f"--target-size {self.size:,} B is smaller than the file's header alone ({overhead:,} B); fix: raise the target")
        return self.size - overhead


def _split_budget(
    tensors: Sequence[OutTensor], pinned: Mapping[str, tuple[gguf_spec.GGMLQuantizationType, str]],
) -> tuple[dict[str, tuple[gguf_spec.GGMLQuantizationType, str]], list[OutTensor], int]:
    """(types fixed without the budget, the tensors it chooses for, bytes of the fixed ones)."""
    from quantkit.policy import budget

    base: dict[str, tuple[gguf_spec.GGMLQuantizationType, str]] = {}
    free: list[OutTensor] = []
    fixed = 0
    for t in tensors:
        if t.name in pinned:
            base[t.name] = pinned[t.name]
        elif presets.kept_f32(t) is not None:
            base[t.name] = choose(t, Q.F32)
        elif not budget.candidates(t):
            base[t.name] = (Q.F16, f"row length {t.shape[-1]} fits no quantised block: F16 fallback")
        else:
            free.append(t)
            continue
        fixed += type_nbytes(base[t.name][0], t.shape)
    return base, free, fixed


def budget_tensors(
    tensors: Sequence[OutTensor], overrides: Sequence[Override] = (), hparams: ModelShape | None = None, requantize: bool = False,
) -> list[OutTensor]:
    """The tensors a bit budget chooses types for, the only ones whose errors it needs (``budget.measure_errors``): as
    :func:`make_plan` leaves them to it, i.e. not carried (MXFP4 experts, unless ``requantize``), not named by a user
    rule, not kept F32, with candidate types."""
    n_layer = hparams.n_layer if hparams is not None else _n_layer(tensors)
    carry = _carried(tensors, requantize)
    pinned = {t.name: carry.get(t.name, (Q.F32, "")) for t in tensors if t.name in carry or _rule_for(t, overrides, n_layer) is not None}
    return _split_budget(tensors, pinned)[1]  # only which tensors are pinned matters here, not their types


def header_bytes(arch: str, metadata: Mapping[str, Any], tensors: Sequence[OutTensor]) -> int:
    """Bytes of a GGUF file that are not tensor data, at most (header, tensor table, alignment padding): the types do not change it."""
    from quantkit.format.gguf_write import alignment_of, file_nbytes

    return file_nbytes(arch, metadata, ((t.name, t.shape, 0) for t in tensors)) + (alignment_of(metadata) - 1) * len(tensors)


def check_reach(
    tensors: Sequence[OutTensor], target: Target, overhead: int | None = None, pinned: Mapping[str, tuple[gguf_spec.GGMLQuantizationType, str]] | None = None,
) -> None:
    """The budget's error when no plan of these tensors meets it, from their shapes alone (before any weight is read).

    ``overhead`` None (the header's size not known yet): a --target-size is only refused when even the cheapest
    plan is too big; the plan itself checks the rest.
    """
    from quantkit.policy import budget

    _, free, fixed = _split_budget(tensors, pinned or {})
    sizes = [[type_nbytes(q, t.shape) for q in budget.candidates(t)] for t in free]
    lo, hi = fixed + sum(min(s) for s in sizes), fixed + sum(max(s) for s in sizes)
    n_elements = sum(t.n_elements for t in tensors)
    allowed = target.tensor_bytes(n_elements, overhead or 0)
    too_small = hi < allowed * (1 - budget.TOLERANCE) and (overhead is not None or target.size is None)
    if lo > allowed or too_small:
        raise target.out_of_reach(lo, hi, n_elements, overhead or 0)


def _budget_types(
    tensors: list[OutTensor], target: Target, pinned: dict[str, tuple[gguf_spec.GGMLQuantizationType, str]],
    importance: "budget.Importance | None", overhead: int, n_layer: int, hparams: Any = None,
) -> tuple[dict[str, tuple[gguf_spec.GGMLQuantizationType, str]], gguf_spec.LlamaFileType, str]:
    """Types chosen by the bit budget for every tensor not pinned (kept F32 or named by a user rule)."""
    from quantkit.policy import budget

    check_reach(tensors, target, overhead, pinned)  # before the errors are sampled
    base, free, fixed = _split_budget(tensors, pinned)
    given = target.errors or {}
    missing = [t for t in free if t.name not in given]
    sampled = budget.measure_errors(missing, importance, hparams) if missing else {}
    rels = {t.name: budget.rel_of(given[t.name] if t.name in given else sampled[t.name]) for t in free}
    weights = target.weights(free, rels, n_layer)
    options = {t.name: budget.options(t, rels[t.name], weights[t.name]) for t in free}
    n_elements = sum(t.n_elements for t in tensors)
    allowed = target.tensor_bytes(n_elements, overhead)
    try:
        cap = budget.TIME_CAP if target.time_cap is None else (target.time_cap or None)
        chosen = budget.solve(options, allowed, fixed, time_cap=cap)
    except budget.OutOfReach as e:
        raise target.out_of_reach(e.lo, e.hi, n_elements, overhead) from None
    for name, o in chosen.items():
        base[name] = (o.qtype, budget.explain(o, options[name], target.label))
    by_type: dict[gguf_spec.GGMLQuantizationType, int] = {}
    for o in chosen.values():
        by_type[o.qtype] = by_type.get(o.qtype, 0) + o.nbytes
    main = max(by_type, key=by_type.__getitem__) if by_type else Q.F32
    return base, presets.file_type_of(main), "budget-" + (f"{target.bpw:g}bpw" if target.bpw is not None else f"{target.size}B")


def make_plan(
    tensors: list[OutTensor], outtype: str, overrides: Sequence[Override] = (), hparams: ModelShape | None = None, has_imatrix: bool = False,
    target: Target | None = None, importance: "budget.Importance | None" = None, overhead: int = 0, requantize: bool = False,
) -> Plan:
    """Types for every tensor: the first matching override, else the --type rule (or the bit budget).

    ``f32`` / ``f16`` / ``bf16`` keep every matrix in that type; any other name
    is a llama-quantize preset and picks, tensor for tensor, what llama.cpp picks.
    With a ``target``, user rules are pinned first and :mod:`quantkit.policy.budget`
    chooses the rest from measured sensitivity (``importance``: imatrix weights).
    Tensors a checkpoint stores in a GGML type (MXFP4 experts, :func:`carried`) keep it before any rule, as fixed
    bytes of a budget, unless ``requantize`` (``--allow-requantize``) lets the type and the rules decide.
    """
    key = check_outtype(outtype).lower() if target is None else outtype.lower()
    _check_layer_ranges(overrides, hparams.n_layer if hparams is not None else _n_layer(tensors))
    carry = _carried(tensors, requantize)
    kept: dict[str, list[str]] = {}  # rules that matched carried tensors (kept as stored)
    hit_any: set[Override] = set()
    if target is not None:
        n_layer = hparams.n_layer if hparams is not None else _n_layer(tensors)
        pinned = dict(carry)
        for t in tensors:
            hit = _rule_for(t, overrides, n_layer)
            if hit is not None and t.name in carry:
                hit_any.add(hit)
                kept.setdefault(f"{hit.source} {hit.pattern!r}", []).append(t.name)
                continue
            if hit is not None:
                pinned[t.name] = _apply_override(t, hit)
                hit_any.add(hit)
        _warn_unused(overrides, hit_any)
        base, ftype, name = _budget_types(tensors, target, pinned, importance, overhead, n_layer, hparams)
        overrides = ()  # applied: they are the pinned entries of base
    elif key in OUTTYPES:
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
    n_layer = hparams.n_layer if hparams is not None else _n_layer(tensors)
    plans = []
    used = set()
    for t in tensors:
        hit = _rule_for(t, overrides, n_layer)
        if isinstance(t.transform, IntegerTable):  # an integer lookup table (hash routing): I32 whatever the type or rule
            plans.append(TensorPlan(t.name, t.shape, t.role, Q.I32, type_nbytes(Q.I32, t.shape), "integer table: I32 as llama.cpp reads it"))
            continue
        if t.name in carry:
            if hit is not None:
                used.add(hit)
                kept.setdefault(f"{hit.source} {hit.pattern!r}", []).append(t.name)
            qtype, reason = carry[t.name]
        elif hit is not None:
            used.add(hit)
            qtype, reason = _apply_override(t, hit)
        else:
            qtype, reason = base[t.name]
        plans.append(TensorPlan(t.name, t.shape, t.role, qtype, type_nbytes(qtype, t.shape), reason))
    _warn_unused(overrides, used)
    if kept:
        log.warning("%s matched %d tensors the checkpoint stores as %s (e.g. %s): they are written as stored; "
                    "--allow-requantize lets rules and the type convert them", "; ".join(kept), sum(map(len, kept.values())),
                    ", ".join(sorted({carry[n][0].name for v in kept.values() for n in v})), next(iter(kept.values()))[0])
    return Plan(name, ftype, tuple(plans))


def _check_layer_ranges(overrides: Sequence[Override], n_layer: int) -> None:
    """A ``layers = [first, last]`` range, negatives counted from the end, must not be empty for this model."""
    for o in overrides:
        if o.layers is not None:
            first, last = (x + n_layer if x < 0 else x for x in o.layers)
            if first > last:
                raise QuantkitError(
                    f"{o.source}: pattern {o.pattern[:80]!r} layers {list(o.layers)} is block {first} to block {last} of this "
                    f"{n_layer}-block model, an empty range; fix: give layers = [first, last] with first <= last"
                )


def _warn_unused(overrides: Sequence[Override], used: set[Override]) -> None:
    for o in overrides:
        if o not in used:
            log.warning("%s: pattern %r%s matched no tensor", o.source, o.pattern, f" in layers {list(o.layers)}" if o.layers else "")
