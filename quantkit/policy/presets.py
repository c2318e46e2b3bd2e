"""llama.cpp's quantisation presets as data: the GGML type of every tensor, and why.

A pure re-statement of ``src/llama-quant.cpp`` as vendored in llama-cpp-python
0.3.36: ``tensor_allows_quantization`` (which tensors are ever quantised),
``tensor_get_category``, ``llama_ftype_get_default_type`` (:data:`PRESETS`),
the if/else chain of ``llama_tensor_get_type_impl`` (:data:`SECTIONS`, one
:class:`Arm` per branch, first match wins, as in C++), its post-adjustments
(the 70B and 8-expert bumps of ``attn_v``), ``tensor_type_fallback``
(:data:`FALLBACK`) and ``tensor_requires_imatrix``.  :func:`preset_types` walks
the tensors in llama.cpp's order (``weight_name_comparer``: by block number,
then by name) so the counters llama.cpp keeps (``i_attention_wv``,
``i_ffn_down``, ``i_ffn_gate``, ``i_ffn_up``) take the same values; MoE models
(``n_expert > 1``) take the layer of ``ffn_*`` tensors from the name instead,
as llama.cpp does.  ``tests/test_presets.py`` checks every preset tensor for
tensor against ``llama_cpp.llama_model_quantize``.

Routers (``ffn_gate_inp``), norms and other 1-D tensors are never quantised:
they stay F32 (quantkit writes them F32 in every output).

The MoE rules, in short: with exactly 8 experts ``attn_v`` and ``attn_k`` get
Q8_0, ``attn_output`` Q5_K in the 2-4 bit presets, IQ3_M's ``ffn_down`` Q4_K in
``use_more_bits`` layers; the IQ1/IQ2 presets give ``attn_v`` Q4_K from 4
experts on; MXFP4_MOE puts 3-D expert tensors in MXFP4 and the rest in Q8_0.
Tied embeddings (no ``output.weight``) make ``token_embd`` follow the output
rules.  A row length the chosen type's block does not divide falls back
(:data:`FALLBACK`), and the reason says so.

Usage::

    choices = preset_types(prep.tensors, prep.hparams, "Q4_K_M")
    check_imatrix(choices, "Q4_K_M", has_imatrix=False)  # QuantkitError if llama.cpp would refuse
    choices["blk.0.attn_v.weight"].qtype, choices["blk.0.attn_v.weight"].reason

Not reproduced, because quantkit only writes the ``llama`` architecture or does
not expose the option: the Falcon, GLM5-next and BailingMoE3 arms;
``--output-tensor-type``, ``--token-embedding-type``, ``--tensor-type``
overrides, ``--pure`` and ``--leave-output-tensor``; the ``Q2_0`` preset (gguf
0.19 has no ``Q2_0`` type) and ``NVFP4`` (no default type in this llama.cpp).

Not for: applying a plan or quantising bytes (``quantkit.policy.plan``, ``quantkit.format.ggml``).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

from quantkit.format import gguf_spec
from quantkit.errors import QuantkitError
from quantkit.hf.mapping import IntegerTable, OutTensor, Role

Q = gguf_spec.GGMLQuantizationType
FT = gguf_spec.LlamaFileType


class ModelShape(Protocol):
    """The hyperparameters llama.cpp's type choice reads (``converters.llama.Hparams`` has them)."""

    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """A llama-quantize preset: its ``general.file_type`` and the type of an unremarkable matrix."""

    name: str
    file_type: gguf_spec.LlamaFileType
    default: gguf_spec.GGMLQuantizationType  # llama_ftype_get_default_type


_PRESET_ROWS: tuple[tuple[str, gguf_spec.LlamaFileType, gguf_spec.GGMLQuantizationType], ...] = (
    # name         file_type              default type (llama_ftype_get_default_type)
    ("Q4_0",      FT.MOSTLY_Q4_0,      Q.Q4_0),
    ("Q4_1",      FT.MOSTLY_Q4_1,      Q.Q4_1),
    ("Q5_0",      FT.MOSTLY_Q5_0,      Q.Q5_0),
    ("Q5_1",      FT.MOSTLY_Q5_1,      Q.Q5_1),
    ("Q8_0",      FT.MOSTLY_Q8_0,      Q.Q8_0),
    ("Q1_0",      FT.MOSTLY_Q1_0,      Q.Q1_0),
    ("MXFP4_MOE", FT.MOSTLY_MXFP4_MOE, Q.MXFP4),
    ("Q2_K",      FT.MOSTLY_Q2_K,      Q.Q2_K),
    ("Q2_K_S",    FT.MOSTLY_Q2_K_S,    Q.Q2_K),
    ("Q3_K_S",    FT.MOSTLY_Q3_K_S,    Q.Q3_K),
    ("Q3_K_M",    FT.MOSTLY_Q3_K_M,    Q.Q3_K),
    ("Q3_K_L",    FT.MOSTLY_Q3_K_L,    Q.Q3_K),
    ("Q4_K_S",    FT.MOSTLY_Q4_K_S,    Q.Q4_K),
    ("Q4_K_M",    FT.MOSTLY_Q4_K_M,    Q.Q4_K),
    ("Q5_K_S",    FT.MOSTLY_Q5_K_S,    Q.Q5_K),
    ("Q5_K_M",    FT.MOSTLY_Q5_K_M,    Q.Q5_K),
    ("Q6_K",      FT.MOSTLY_Q6_K,      Q.Q6_K),
    ("TQ1_0",     FT.MOSTLY_TQ1_0,     Q.TQ1_0),
    ("TQ2_0",     FT.MOSTLY_TQ2_0,     Q.TQ2_0),
    ("IQ1_S",     FT.MOSTLY_IQ1_S,     Q.IQ1_S),
    ("IQ1_M",     FT.MOSTLY_IQ1_M,     Q.IQ1_M),
    ("IQ2_XXS",   FT.MOSTLY_IQ2_XXS,   Q.IQ2_XXS),
    ("IQ2_XS",    FT.MOSTLY_IQ2_XS,    Q.IQ2_XS),
    ("IQ2_S",     FT.MOSTLY_IQ2_S,     Q.IQ2_XS),  # sic: IQ2_S files are mostly IQ2_XS
    ("IQ2_M",     FT.MOSTLY_IQ2_M,     Q.IQ2_S),
    ("IQ3_XXS",   FT.MOSTLY_IQ3_XXS,   Q.IQ3_XXS),
    ("IQ3_XS",    FT.MOSTLY_IQ3_XS,    Q.IQ3_S),
    ("IQ3_S",     FT.MOSTLY_IQ3_S,     Q.IQ3_S),
    ("IQ3_M",     FT.MOSTLY_IQ3_M,     Q.IQ3_S),
    ("IQ4_NL",    FT.MOSTLY_IQ4_NL,    Q.IQ4_NL),
    ("IQ4_XS",    FT.MOSTLY_IQ4_XS,    Q.IQ4_XS),
    ("F16",       FT.MOSTLY_F16,       Q.F16),
    ("BF16",      FT.MOSTLY_BF16,      Q.BF16),
    ("F32",       FT.ALL_F32,          Q.F32),
)  # fmt: skip

#: Every preset name llama-quantize accepts (except COPY and the aliases), in its order.
PRESETS: dict[str, Preset] = {name: Preset(name, ft, default) for name, ft, default in _PRESET_ROWS}
PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)
#: llama-quantize's aliases.
ALIASES: dict[str, str] = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
#: preset -> general.file_type.
FILE_TYPES: dict[str, gguf_spec.LlamaFileType] = {p.name: p.file_type for p in PRESETS.values()}

_UNQUANTISED = (Q.F32, Q.F16, Q.BF16)


def file_type_of(qtype: gguf_spec.GGMLQuantizationType) -> gguf_spec.LlamaFileType:
    """``general.file_type`` for a mixed file whose bulk is ``qtype`` (the _M preset where there is one)."""
    name = {Q.Q3_K: "Q3_K_M", Q.Q4_K: "Q4_K_M", Q.Q5_K: "Q5_K_M", Q.IQ2_S: "IQ2_M", Q.IQ3_S: "IQ3_S"}.get(qtype)
    if name is None:
        name = next((p.name for p in PRESETS.values() if p.default == qtype), "F32")
    return PRESETS[name].file_type


def get_preset(name: str) -> Preset:
    """A preset by llama-quantize's name (case-insensitive, aliases accepted)."""
    key = name.upper() if isinstance(name, str) else ""
    key = ALIASES.get(key, key)
    if key not in PRESETS:
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        what = "is empty" if isinstance(name, str) and not name.strip() else "is not a llama.cpp preset"
        raise QuantkitError(f"--type {shown} {what} (known: f32, f16, bf16 and the presets {', '.join(n for n in PRESET_NAMES if n not in ('F16', 'BF16', 'F32'))}, aliases {', '.join(ALIASES)}); fix: pick one of those")
    return PRESETS[key]


# --------------------------------------------------------------------------- tensors


class Category(str, enum.Enum):
    """llama.cpp's ``tensor_category``: broad roles the type rules are written against."""

    TOKEN_EMBD = "token_embd"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_QKV = "attn_qkv"
    ATTN_KV_B = "attn_kv_b"
    ATTN_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OUTPUT = "output"
    OTHER = "other"


C = Category
#: tensor_get_category: exact names first, then substrings, first hit wins.
CATEGORY_EXACT: dict[str, Category] = {
    "output.weight": C.OUTPUT,
    "token_embd.weight": C.TOKEN_EMBD,
    "per_layer_token_embd.weight": C.TOKEN_EMBD,
}
CATEGORY_SUBSTRINGS: tuple[tuple[str, Category], ...] = (
    ("attn_qkv.weight", C.ATTN_QKV),
    ("attn_kv_b.weight", C.ATTN_KV_B),
    ("attn_v.weight", C.ATTN_V),
    ("attn_k.weight", C.ATTN_K),
    ("attn_q.weight", C.ATTN_Q),
    ("attn_output.weight", C.ATTN_OUTPUT),
    ("ffn_up", C.FFN_UP),
    ("ffn_gate", C.FFN_GATE),
    ("ffn_down", C.FFN_DOWN),
)
#: category_is_attn_v: the tensors llama.cpp counts in i_attention_wv.
ATTN_V_LIKE = frozenset({C.ATTN_V, C.ATTN_QKV, C.ATTN_KV_B})

#: tensor_allows_quantization: substrings whose tensors are never quantised (architecture-independent ones).
NEVER_QUANTISED: tuple[str, ...] = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos",
    ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)  # fmt: skip
NEVER_QUANTISED_EXACT = frozenset({"position_embd.weight", "token_types.weight"})
#: quantkit's own contract on top of llama.cpp's names: these roles are F32 in every output.
KEEP_F32_ROLES = frozenset({Role.ROUTER, Role.NORM})
#: matrices llama.cpp's converter writes F32 whatever the output type, because the op reading them takes F32 only
#: (ggml_ssm_conv asserts an F32 kernel: an F16 ``ssm_conv1d`` aborts the process)
KEEP_F32_NAMES: tuple[str, ...] = ("ssm_conv1d", "_exps.bias")  # _exps.bias: ggml's add_id reads F32 expert biases only (gpt-oss)


def kept_f32(t: OutTensor) -> str | None:
    """Why ``t`` stays F32 whatever type is asked for, or None: the one statement of the rule.

    Routers (``ffn_gate_inp``) and norms by role, as llama.cpp's converter and quantiser
    keep them; 1-D and generated tensors (``rope_freqs``) because llama.cpp applies them in F32 only.
    """
    if t.role in KEEP_F32_ROLES:
        return f"{t.role.value} stay F32"
    if len(t.shape) == 1 or t.data is not None:
        return "1-D tensors stay F32"
    if any(s in t.name for s in KEEP_F32_NAMES):
        return "convolution kernels stay F32 (llama.cpp's ssm_conv reads F32 only)"
    return None


def category(name: str) -> Category:
    if name in CATEGORY_EXACT:
        return CATEGORY_EXACT[name]
    for sub, cat in CATEGORY_SUBSTRINGS:
        if sub in name:
            return cat
    return C.OTHER


def ggml_n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims for a numpy-order shape: outer dimensions of size 1 do not count."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return len(dims)


def allows_quantization(t: OutTensor) -> bool:
    """tensor_allows_quantization (default params): 2-D/3-D ``*weight`` tensors outside the exclusion table."""
    if t.role in KEEP_F32_ROLES or ggml_n_dims(t.shape) < 2 or not t.name.endswith("weight"):
        return False
    return t.name not in NEVER_QUANTISED_EXACT and not any(s in t.name for s in NEVER_QUANTISED)


def block_number(name: str) -> int:
    """The ``%d`` of ``sscanf(name, "blk.%d.")``, or -1."""
    m = re.match(r"blk\.([+-]?\d+)\.", name)
    return int(m.group(1)) if m else -1


def llama_order(tensors: Sequence[OutTensor]) -> list[OutTensor]:
    """llama_model_loader's ``weights_map`` order (``weight_name_comparer``): by block, then by name."""
    return sorted(tensors, key=lambda t: (block_number(t.name), t.name))


# --------------------------------------------------------------------------- rules


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last 1/8 of layers, and every third one between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass(frozen=True)
class Site:
    """One tensor as llama_tensor_get_type_impl sees it: shape, category, counters, model facts."""

    name: str
    category: Category
    ne0: int  # row length
    ne2: int  # experts (1 for a matrix)
    preset: str
    default: gguf_spec.GGMLQuantizationType
    i_layer: int  # layer_info(): block number for MoE ffn tensors, else the category's counter
    n_layer: int  # n_ffn_down = n_layer_all
    i_ffn_down: int  # raw counter (the IQ1/IQ2 branch reads it even for MoE)
    i_attn_v: int
    n_attn_v: int
    n_gqa: int
    n_expert: int
    is_70b: bool
    has_imatrix: bool
    tied: bool


Cond = Callable[[Site, gguf_spec.GGMLQuantizationType], bool]


def _always(s: Site, t: gguf_spec.GGMLQuantizationType) -> bool:
    return True


def _gqa4(s: Site, t: gguf_spec.GGMLQuantizationType) -> bool:
    return s.n_gqa >= 4


def _gqa4_or_experts4(s: Site, t: gguf_spec.GGMLQuantizationType) -> bool:
    return s.n_gqa >= 4 or s.n_expert >= 4


def _experts8(s: Site, t: gguf_spec.GGMLQuantizationType) -> bool:
    return s.n_expert == 8


def _imatrix(s: Site, t: gguf_spec.GGMLQuantizationType) -> bool:
    return s.has_imatrix


def _no_imatrix(s: Site, t: gguf_spec.GGMLQuantizationType) -> bool:
    return not s.has_imatrix


def _first_8th(s: Site, t: gguf_spec.GGMLQuantizationType) -> bool:
    return s.i_layer < s.n_layer // 8


def _first_16th(s: Site, t: gguf_spec.GGMLQuantizationType) -> bool:
    return s.i_layer < s.n_layer // 16


def _more_bits(s: Site, t: gguf_spec.GGMLQuantizationType) -> bool:
    return use_more_bits(s.i_layer, s.n_layer)


def _middle(s: Site, t: gguf_spec.GGMLQuantizationType) -> bool:
    return s.n_layer // 8 <= s.i_layer < 7 * s.n_layer // 8


def _attn_v_more_bits(s: Site, t: gguf_spec.GGMLQuantizationType) -> bool:
    return use_more_bits(s.i_attn_v, s.n_attn_v)


def _attn_v_first(n: int) -> Cond:
    def cond(s: Site, t: gguf_spec.GGMLQuantizationType) -> bool:
        return s.i_attn_v < n

    return cond


def _ffn_down_counter_first_8th(s: Site, t: gguf_spec.GGMLQuantizationType) -> bool:
    return s.i_ffn_down < s.n_layer // 8


def _rows_misfit(s: Site, t: gguf_spec.GGMLQuantizationType) -> bool:
    return s.ne0 % gguf_spec.GGML_QUANT_SIZES[t][0] != 0


def _not_q8_0(s: Site, t: gguf_spec.GGMLQuantizationType) -> bool:
    return t != Q.Q8_0


def _stacked(s: Site, t: gguf_spec.GGMLQuantizationType) -> bool:
    return s.ne2 > 1


def _bump_70b(s: Site, t: gguf_spec.GGMLQuantizationType) -> bool:
    return s.is_70b and t in (Q.Q3_K, Q.Q4_K)


def _all(*conds: Cond) -> Cond:
    def cond(s: Site, t: gguf_spec.GGMLQuantizationType) -> bool:
        return all(c(s, t) for c in conds)

    return cond


def _any(*conds: Cond) -> Cond:
    def cond(s: Site, t: gguf_spec.GGMLQuantizationType) -> bool:
        return any(c(s, t) for c in conds)

    return cond


ANY: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Arm:
    """One branch of the C++ if/else chain: for these presets, when ``when`` holds, pick ``to``.

    ``to=None`` keeps the current type: the branch matches (so later branches are
    not tried) but changes nothing, as an ``else if (ftype == X) { if (...) }`` does.
    """

    presets: frozenset[str]
    why: str
    to: gguf_spec.GGMLQuantizationType | None = None
    when: Cond = _always

    def matches(self, s: Site, t: gguf_spec.GGMLQuantizationType) -> bool:
        return (not self.presets or s.preset in self.presets) and self.when(s, t)


def _p(*names: str) -> frozenset[str]:
    return frozenset(names)


IQ1_IQ2 = _p("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")


@dataclass(frozen=True)
class Section:
    """A top-level branch of llama_tensor_get_type_impl: its guard, its arms (first match) and post-adjustments (all)."""

    name: str
    guard: Callable[[Site], bool]
    arms: tuple[Arm, ...]
    post: tuple[Arm, ...] = ()
    counts: Mapping[Category, str] | None = None  # categories whose counter this branch increments


#: layer_info(): for dense models the layer of an ffn tensor is its category's counter.
_LAYER_COUNTER = {C.FFN_DOWN: "ffn_down", C.FFN_GATE: "ffn_gate", C.FFN_UP: "ffn_up"}

#: llama_tensor_get_type_impl, top to bottom.  The first section whose guard holds
#: is entered; in it the first matching arm decides; then every matching post arm applies.
SECTIONS: tuple[Section, ...] = (
    Section(
        "output",  # output.weight, and token_embd.weight when the embeddings are tied
        lambda s: s.category is C.OUTPUT or (s.tied and s.category is C.TOKEN_EMBD),
        (
            Arm(_p("MXFP4_MOE"), "output gets Q8_0", Q.Q8_0),
            Arm(ANY, "output gets Q8_0 (row length not a multiple of the preset's block)", Q.Q8_0, _rows_misfit),
            Arm(_p("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"), "output gets Q5_K", Q.Q5_K),
            Arm(ANY, "output gets Q6_K", Q.Q6_K, _not_q8_0),
            Arm(ANY, "output keeps Q8_0"),
        ),
    ),
    Section(
        "mxfp4_moe",
        lambda s: s.preset == "MXFP4_MOE",
        (
            Arm(ANY, "expert tensors (3-D) get MXFP4", Q.MXFP4, _stacked),
            Arm(ANY, "non-expert tensors get Q8_0", Q.Q8_0),
        ),
    ),
    Section(
        "token_embd",  # untied embeddings
        lambda s: s.category is C.TOKEN_EMBD,
        (
            Arm(_p("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"), "token_embd gets Q2_K", Q.Q2_K),
            Arm(_p("IQ2_S", "IQ2_M", "IQ3_XXS"), "token_embd gets IQ3_S", Q.IQ3_S),
            Arm(_p("TQ1_0", "TQ2_0"), "token_embd gets Q4_K", Q.Q4_K),
            Arm(ANY, "token_embd keeps the preset's type"),
        ),
    ),
    Section(
        "iq1_iq2",  # the 1.5-2.7 bpw i-quant presets have their own chain
        lambda s: s.preset in IQ1_IQ2,
        (
            Arm(ANY, "attn_v gets Q4_K (n_gqa >= 4 or n_expert >= 4)", Q.Q4_K, lambda s, t: s.category in ATTN_V_LIKE and _gqa4_or_experts4(s, t)),
            Arm(_p("IQ2_S", "IQ2_M"), "attn_v gets IQ3_S", Q.IQ3_S, lambda s, t: s.category in ATTN_V_LIKE),
            Arm(ANY, "attn_v gets Q2_K", Q.Q2_K, lambda s, t: s.category in ATTN_V_LIKE),
            Arm(ANY, "attn_k gets Q4_K (8 experts)", Q.Q4_K, lambda s, t: s.category is C.ATTN_K and _experts8(s, t)),
            Arm(_p("IQ2_S", "IQ2_M"), "ffn_down gets IQ3_S in the first 1/8 of ffn_down tensors", Q.IQ3_S, lambda s, t: s.category is C.FFN_DOWN and _ffn_down_counter_first_8th(s, t)),
            Arm(ANY, "ffn_down gets Q2_K in the first 1/8 of ffn_down tensors", Q.Q2_K, lambda s, t: s.category is C.FFN_DOWN and _ffn_down_counter_first_8th(s, t)),
            Arm(ANY, "ffn_down keeps the preset's type after the first 1/8", None, lambda s, t: s.category is C.FFN_DOWN),
            Arm(ANY, "attn_output gets Q5_K (8 experts)", Q.Q5_K, lambda s, t: s.category is C.ATTN_OUTPUT and _experts8(s, t)),
            Arm(_p("IQ1_S", "IQ1_M"), "attn_output gets IQ2_XXS", Q.IQ2_XXS, lambda s, t: s.category is C.ATTN_OUTPUT),
            Arm(_p("IQ2_S", "IQ2_M"), "attn_output gets IQ3_S", Q.IQ3_S, lambda s, t: s.category is C.ATTN_OUTPUT),
        ),
        counts={C.ATTN_V: "attn_v", C.ATTN_QKV: "attn_v", C.ATTN_KV_B: "attn_v", C.FFN_DOWN: "ffn_down"},
    ),
    Section(
        "attn_v",
        lambda s: s.category in ATTN_V_LIKE,
        (
            Arm(_p("Q2_K"), "attn_v gets Q4_K (n_gqa >= 4)", Q.Q4_K, _gqa4),
            Arm(_p("Q2_K"), "attn_v gets Q3_K", Q.Q3_K),
            Arm(_p("Q2_K_S"), "attn_v gets Q4_K (n_gqa >= 4)", Q.Q4_K, _gqa4),
            Arm(_p("IQ3_XXS"), "attn_v gets Q4_K (n_gqa >= 4)", Q.Q4_K, _gqa4),
            Arm(_p("IQ3_XXS"), "attn_v gets IQ3_S (no imatrix)", Q.IQ3_S, _no_imatrix),
            Arm(_p("IQ3_XXS"), "attn_v gets IQ3_XXS (imatrix)", Q.IQ3_XXS),
            Arm(_p("IQ3_XS", "IQ3_S"), "attn_v gets Q4_K (n_gqa >= 4)", Q.Q4_K, _gqa4),
            Arm(_p("IQ3_M"), "attn_v gets Q4_K", Q.Q4_K),
            Arm(_p("Q3_K_M"), "attn_v gets Q5_K in the first 2 layers", Q.Q5_K, _attn_v_first(2)),
            Arm(_p("Q3_K_M"), "attn_v gets Q4_K", Q.Q4_K),
            Arm(_p("Q3_K_L"), "attn_v gets Q5_K", Q.Q5_K),
            Arm(_p("IQ4_NL", "IQ4_XS"), "attn_v gets Q5_K (n_gqa >= 4)", Q.Q5_K, _gqa4),
            Arm(_p("Q4_K_M", "Q5_K_M"), "attn_v gets Q6_K in use_more_bits layers (first/last 1/8, every third between)", Q.Q6_K, _attn_v_more_bits),
            Arm(_p("Q4_K_S"), "attn_v gets Q5_K in the first 4 layers", Q.Q5_K, _attn_v_first(4)),
        ),
        post=(
            Arm(ANY, "70B-shaped model: attn_v bumped to Q5_K", Q.Q5_K, _bump_70b),
            Arm(ANY, "8 experts: attn_v bumped to Q8_0", Q.Q8_0, _experts8),
        ),
        counts={C.ATTN_V: "attn_v", C.ATTN_QKV: "attn_v", C.ATTN_KV_B: "attn_v"},
    ),
    Section(
        "attn_k",
        lambda s: s.category is C.ATTN_K,
        (
            Arm(ANY, "8 experts: attn_k gets Q8_0", Q.Q8_0, _experts8),
            Arm(_p("IQ3_XS"), "attn_k gets IQ3_XXS", Q.IQ3_XXS),
            Arm(_p("IQ3_XXS"), "attn_k gets IQ2_S", Q.IQ2_S),
        ),
    ),
    Section(
        "attn_q",
        lambda s: s.category is C.ATTN_Q,
        (
            Arm(_p("IQ3_XS"), "attn_q gets IQ3_XXS", Q.IQ3_XXS),
            Arm(_p("IQ3_XXS"), "attn_q gets IQ2_S", Q.IQ2_S),
        ),
    ),
    Section(
        "ffn_down",
        lambda s: s.category is C.FFN_DOWN,
        (
            Arm(_p("Q2_K"), "ffn_down gets Q3_K", Q.Q3_K),
            Arm(_p("Q2_K_S"), "ffn_down gets Q4_K in the first 1/8 of layers", Q.Q4_K, _first_8th),
            Arm(_p("Q2_K_S"), "ffn_down keeps Q2_K after the first 1/8 of layers"),
            Arm(_p("IQ3_XXS"), "ffn_down gets Q4_K in the first 1/8 of layers (no imatrix)", Q.Q4_K, _all(_no_imatrix, _first_8th)),
            Arm(_p("IQ3_XXS"), "ffn_down gets Q3_K (no imatrix)", Q.Q3_K, _no_imatrix),
            Arm(_p("Q3_K_M"), "ffn_down gets Q5_K in the first 1/16 of layers", Q.Q5_K, _first_16th),
            Arm(_p("Q3_K_M"), "ffn_down gets Q4_K", Q.Q4_K),
            Arm(_p("IQ3_M"), "ffn_down gets Q4_K in the first 1/8 of layers, or use_more_bits layers with 8 experts", Q.Q4_K, _any(_first_8th, _all(_experts8, _more_bits))),
            Arm(_p("Q3_K_L"), "ffn_down gets Q5_K", Q.Q5_K),
            Arm(_p("Q4_K_M"), "ffn_down gets Q6_K in use_more_bits layers (first/last 1/8, every third between)", Q.Q6_K, _more_bits),
            Arm(_p("Q4_K_M"), "ffn_down keeps Q4_K outside use_more_bits layers"),
            Arm(_p("IQ4_NL", "IQ4_XS"), "ffn_down gets Q5_K in the first 1/8 of layers (no imatrix)", Q.Q5_K, _all(_first_8th, _no_imatrix)),
            Arm(_p("Q5_K_M"), "ffn_down gets Q6_K in use_more_bits layers (first/last 1/8, every third between)", Q.Q6_K, _more_bits),
            Arm(_p("Q4_K_S"), "ffn_down gets Q5_K in the first 1/8 of layers", Q.Q5_K, _first_8th),
            Arm(_p("Q4_0"), "ffn_down gets Q4_1 in the first 1/8 of layers (imatrix)", Q.Q4_1, _all(_imatrix, _first_8th)),
            Arm(_p("Q5_0"), "ffn_down gets Q5_1 in the first 1/8 of layers (imatrix)", Q.Q5_1, _all(_imatrix, _first_8th)),
        ),
        counts={C.FFN_DOWN: "ffn_down"},
    ),
    Section(
        "attn_output",
        lambda s: s.category is C.ATTN_OUTPUT,
        (
            Arm(
                _p("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S", "IQ3_M", "IQ4_XS"),
                "attn_output gets Q5_K (8 experts)", Q.Q5_K, _experts8,
            ),
            Arm(ANY, "attn_output keeps the preset's type (8 experts)", None, _experts8),
            Arm(_p("Q2_K"), "attn_output gets Q3_K", Q.Q3_K),
            Arm(_p("IQ3_XXS"), "attn_output gets IQ3_S", Q.IQ3_S),
            Arm(_p("Q3_K_M", "IQ3_M"), "attn_output gets Q4_K", Q.Q4_K),
            Arm(_p("Q3_K_L"), "attn_output gets Q5_K", Q.Q5_K),
        ),
    ),
    Section(
        "attn_qkv",
        lambda s: s.category is C.ATTN_QKV,
        (
            Arm(_p("Q3_K_M", "Q3_K_L", "IQ3_M"), "attn_qkv gets Q4_K", Q.Q4_K),
            Arm(_p("Q4_K_M"), "attn_qkv gets Q5_K", Q.Q5_K),
            Arm(_p("Q5_K_M"), "attn_qkv gets Q6_K", Q.Q6_K),
        ),
    ),
    Section(
        "ffn_gate",
        lambda s: s.category is C.FFN_GATE,
        (Arm(_p("IQ3_XS"), "ffn_gate gets IQ3_XXS between the first and last 1/8 of layers", Q.IQ3_XXS, _middle),),
        counts={C.FFN_GATE: "ffn_gate"},
    ),
    Section(
        "ffn_up",
        lambda s: s.category is C.FFN_UP,
        (Arm(_p("IQ3_XS"), "ffn_up gets IQ3_XXS between the first and last 1/8 of layers", Q.IQ3_XXS, _middle),),
        counts={C.FFN_UP: "ffn_up"},
    ),
)

#: tensor_type_fallback: a 256-block type whose block does not divide the row length -> this type.
#: 32-block types stay; if the fallback's block does not divide the row either, F16.
FALLBACK: dict[gguf_spec.GGMLQuantizationType, gguf_spec.GGMLQuantizationType] = {
    Q.IQ1_S: Q.IQ4_NL, Q.IQ1_M: Q.IQ4_NL, Q.IQ2_XXS: Q.IQ4_NL, Q.IQ2_XS: Q.IQ4_NL, Q.IQ2_S: Q.IQ4_NL,
    Q.IQ3_XXS: Q.IQ4_NL, Q.IQ3_S: Q.IQ4_NL, Q.IQ4_XS: Q.IQ4_NL,
    Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.TQ1_0: Q.Q4_0, Q.TQ2_0: Q.Q4_0,
    Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0,
}  # fmt: skip

#: tensor_requires_imatrix: llama.cpp refuses to write these types without an importance matrix
#: (a superset of ggml_quantize_requires_imatrix's IQ2_XXS / IQ2_XS / IQ1_S, whose kernels abort
#: without one); Q2_K as well, but only inside a Q2_K_S file.
IMATRIX_TYPES = frozenset({Q.IQ3_XXS, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ1_M, Q.IQ1_S})
IMATRIX_TYPES_BY_PRESET: dict[str, frozenset[gguf_spec.GGMLQuantizationType]] = {"Q2_K_S": frozenset({Q.Q2_K})}


def tensor_requires_imatrix(name: str, qtype: gguf_spec.GGMLQuantizationType, preset: str) -> bool:
    """Whether llama.cpp refuses to write this tensor in this type without an importance matrix."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    return qtype in IMATRIX_TYPES or qtype in IMATRIX_TYPES_BY_PRESET.get(preset, frozenset())


# --------------------------------------------------------------------------- the walk


@dataclass(frozen=True)
class Choice:
    """The type llama.cpp gives one tensor under a preset, and the rule that chose it."""

    qtype: gguf_spec.GGMLQuantizationType
    reason: str
    fallback: bool = False  # tensor_type_fallback changed the type (row length)
    requires_imatrix: bool = False


def fallback(qtype: gguf_spec.GGMLQuantizationType, ne0: int, name: str) -> tuple[gguf_spec.GGMLQuantizationType, str]:
    """tensor_type_fallback: a type whose block divides the row length, and why ('' when unchanged)."""
    block = gguf_spec.GGML_QUANT_SIZES[qtype][0]
    if ne0 % block == 0:
        return qtype, ""
    if qtype in FALLBACK:
        out = FALLBACK[qtype]
    elif block <= 32:
        out = qtype
    else:
        raise QuantkitError(f"tensor {name!r}: row length {ne0} is not a multiple of {qtype.name}'s block {block} and llama.cpp defines no fallback for {qtype.name}; fix: pick another preset")
    if ne0 % gguf_spec.GGML_QUANT_SIZES[out][0] != 0:
        out = Q.F16
    return out, f"row length {ne0} not a multiple of {block}: {qtype.name} falls back to {out.name}"


def _impl(s: Site) -> tuple[gguf_spec.GGMLQuantizationType, str, Section | None]:
    """llama_tensor_get_type_impl: (type, reason, the section entered)."""
    t = s.default
    for sec in SECTIONS:
        if not sec.guard(s):
            continue
        why = f"preset default {t.name}"
        for arm in sec.arms:
            if arm.matches(s, t):
                t, why = (t if arm.to is None else arm.to), arm.why
                break
        for arm in sec.post:
            if arm.matches(s, t):
                t, why = (t if arm.to is None else arm.to), f"{why}; {arm.why}"
        return t, why, sec
    return t, f"preset default {t.name}", None


def _n_gqa(h: ModelShape) -> int:
    return h.n_head // h.n_head_kv if h.n_head_kv else 0


def _is_70b(h: ModelShape) -> bool:
    """llama_model_llama::load_arch_hparams: 80 layers with grouped-query attention and not 8 experts."""
    return h.n_expert != 8 and h.n_layer == 80 and h.n_head != h.n_head_kv


def preset_types(tensors: Sequence[OutTensor], hparams: ModelShape, preset: str, has_imatrix: bool = False) -> dict[str, Choice]:
    """The type llama-quantize gives every tensor under ``preset``, keyed by GGUF tensor name.

    ``has_imatrix`` matters: some presets choose differently with an importance
    matrix (IQ3_XXS, IQ4_NL, IQ4_XS, Q4_0, Q5_0).  A Choice with
    ``requires_imatrix`` means llama.cpp refuses the preset without one.
    """
    p = get_preset(preset)
    ordered = llama_order(tensors)
    n_attn_v = sum(category(t.name) in ATTN_V_LIKE for t in ordered)
    tied = not any(category(t.name) is C.OUTPUT for t in ordered)
    moe = max(1, hparams.n_expert) > 1
    counters = {"attn_v": 0, "ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}
    out: dict[str, Choice] = {}
    for t in ordered:
        if not allows_quantization(t):
            what = "the router" if "ffn_gate_inp" in t.name else "a norm" if "_norm" in t.name else "a 1-D tensor" if ggml_n_dims(t.shape) < 2 else "this tensor"
            kept = Q.I32 if isinstance(t.transform, IntegerTable) else Q.F32  # an integer table (hash routing) stays I32
            out[t.name] = Choice(kept, f"{p.name}: {what} is never quantised ({kept.name})")
            continue
        if p.default in _UNQUANTISED:
            out[t.name] = Choice(p.default, f"{p.name}: every matrix {p.default.name}")
            continue
        cat = category(t.name)
        counter = _LAYER_COUNTER.get(cat)
        site = Site(
            name=t.name, category=cat, ne0=t.shape[-1], ne2=t.shape[0] if len(t.shape) > 2 else 1,
            preset=p.name, default=p.default,
            i_layer=-1 if counter is None else block_number(t.name) if moe else counters[counter],
            n_layer=hparams.n_layer, i_ffn_down=counters["ffn_down"], i_attn_v=counters["attn_v"], n_attn_v=n_attn_v,
            n_gqa=_n_gqa(hparams), n_expert=hparams.n_expert, is_70b=_is_70b(hparams), has_imatrix=has_imatrix, tied=tied,
        )  # fmt: skip
        qtype, why, sec = _impl(site)
        if sec is not None and sec.counts and cat in sec.counts:
            counters[sec.counts[cat]] += 1
        final, fell = fallback(qtype, site.ne0, t.name)
        reason = f"{p.name}: {why}" + (f"; {fell}" if fell else "")
        out[t.name] = Choice(final, reason, bool(fell), tensor_requires_imatrix(t.name, final, p.name))
    return {t.name: out[t.name] for t in tensors}


def imatrix_required(choices: Mapping[str, Choice]) -> tuple[str, ...]:
    """Names of the tensors llama.cpp will not write without an importance matrix."""
    return tuple(name for name, c in choices.items() if c.requires_imatrix)


def check_imatrix(choices: Mapping[str, Choice], preset: str, has_imatrix: bool) -> None:
    """Refuse, as llama-quantize does, a plan that needs an importance matrix when none is given."""
    need = imatrix_required(choices)
    if need and not has_imatrix:
        t = choices[need[0]].qtype.name
        raise QuantkitError(f"preset {preset}: tensor {need[0]!r} gets {t}, which needs an importance matrix ({len(need)} tensors do); fix: pass --imatrix FILE or pick a preset such as Q4_K_M")
