"""``model_type: qwen3_next``: Qwen3-Next checkpoints (Qwen3-Next-80B-A3B) -> GGUF arch ``qwen3next``.

Hybrid blocks (llama.cpp's ``src/models/qwen3next.cpp`` and ``conversion/qwen.py``
``Qwen3NextModel``; transformers' ``modeling_qwen3_next.py``), shared with
``qwen3_5_moe`` (which imports the pieces from here):

* ``layer_types`` (or ``full_attention_interval``, 4 by default) makes each block either
  linear attention (Gated DeltaNet, ``linear_attn.*``) or gated full attention
  (``self_attn.*``); written as ``attention.recurrent_layers`` (and the interval);
* gated attention: ``q_proj`` gives query and gate interleaved per head
  (``[q_h, g_h]``), which is the layout llama.cpp's graph views, so ``attn_q`` is
  written as it is; per-head q/k RMS norms; NeoX rotary embeddings on the first
  ``head_dim * partial_rotary_factor`` dimensions (``rope.dimension_count``);
* Gated DeltaNet: ``in_proj_qkvz`` holds ``[q, k, v, z]`` per key head and is split
  into ``attn_qkv`` (all q, all k, all v) and ``attn_gate`` (z) (:class:`QkvzPart`);
  ``in_proj_ba`` -> ``ssm_ba`` as it is (the graph splits it per key head);
  ``conv1d.weight`` ``[C, 1, K]`` is read as the ``[C, K]`` matrix llama.cpp wants
  (:func:`conv_views`: the same bytes); ``A_log`` -> ``ssm_a = -exp(A_log)``;
  ``dt_bias`` -> ``ssm_dt.bias``; the gated ``norm`` -> ``ssm_norm`` (a plain weight);
  ``out_proj`` -> ``ssm_out``; sizes as ``ssm.*`` keys;
* every other RMS norm computes ``x * (1 + w)`` in transformers (weights stored centred
  on zero) and ``x * w`` in llama.cpp: written as ``w + 1`` (:data:`PLUS_ONE`);
* experts as Qwen2 MoE's (per-expert keys or transformers 5's fused
  ``gate_up_proj``), a shared expert with its sigmoid gate (``ffn_gate_inp_shexp``, F32);
* multi-token prediction (``mtp.*``, which transformers does not load): kept as
  llama.cpp's converter keeps them by default, as blocks after the trunk
  (``mtp.layers.i`` -> ``blk.{num_hidden_layers + i}``, ``mtp.fc`` / ``pre_fc_norm_*`` /
  ``norm`` -> ``blk.{num_hidden_layers}.nextn.{eh_proj,enorm,hnorm,shared_head_norm}``,
  ``nextn_predict_layers``, block count grown by them, ``recurrent_layers`` false there);
  llama.cpp's main graph never runs them.  A checkpoint without ``mtp.*`` tensors (every
  transformers-saved one) is written without those blocks, as ``--no-mtp`` writes it:
  ``block_count = num_hidden_layers`` and no ``nextn_predict_layers``.

Routing: softmax, top-k, renormalised (llama.cpp's graph always renormalises):
``norm_topk_prob: false`` is refused.  Refused too, because llama.cpp would load or
compute something else: dense blocks (``mlp_only_layers``, ``decoder_sparse_step``),
``attention_bias``, ``linear_key_head_dim != linear_value_head_dim`` (one
``ssm.state_size`` sizes both), value heads not a multiple of key heads, an odd rotary
width, rope scaling other than linear / yarn, an activation other than SiLU.

Known gap (see :data:`NOTES`): llama.cpp's q/k L2 norm in the linear layers uses ``rms_norm_eps``
where transformers uses 1e-6 (the same value in the published configs).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from quantkit.converters import MLP_EXPERTS, Converter, Routing, register
from quantkit.converters.llama import IGNORE, T, Hparams, _get, _p, head_rules, moe_counts, moe_rules
from quantkit.converters.llama import check_hparams as _check_common
from quantkit.converters.llama import metadata as _common_metadata
from quantkit.converters.qwen2_moe import SHARED_EXPERT_RULES
from quantkit.errors import CheckpointError
from quantkit.format import gguf_spec
from quantkit.format.gguf_write import MetaValue
from quantkit.hf.checkpoint import TensorRef, shown
from quantkit.hf.mapping import NEG_EXP, PLUS_ONE, OutTensor, Role, Rule, Transform, map_tensors

if TYPE_CHECKING:
    from quantkit.hf.checkpoint import Checkpoint

log = logging.getLogger(__name__)

MODEL_TYPE = "qwen3_next"
ARCH = "qwen3next"  # gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3NEXT]
K, V = gguf_spec.Keys, gguf_spec.GGUFValueType
#: llama-arch.cpp LLM_KV_ATTENTION_RECURRENT_LAYERS (an array of bools, one per block); gguf 0.19 has no constant for it
RECURRENT_LAYERS = "{arch}.attention.recurrent_layers"
#: --format bnb: experts and router as Qwen2 MoE's; the Gated DeltaNet projections the name table gives Role.OTHER are
#: nn.Linear in transformers (4-bit too); MTP blocks are not part of transformers' model (``_keys_to_ignore_on_load_unexpected``)
MTP_UNLOADED = (r"^(?:model\.)?mtp\.",)
HF_EXPERTS = replace(MLP_EXPERTS, linears=("model.layers.{bid}.linear_attn.in_proj_ba.weight", "model.layers.{bid}.linear_attn.out_proj.weight"),
                     unloaded=MTP_UNLOADED)
#: the vision tower of Qwen3.5's vision-language checkpoints (dropped by qwen3_5_moe: llama.cpp's converter writes it to an mmproj file)
VISION = (r"^model\.visual\.",)
#: transformers' defaults for keys a config.json may leave out (Qwen3NextConfig / Qwen3_5MoeTextConfig)
LINEAR_DEFAULTS = {"linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                   "linear_num_key_heads": 16, "linear_num_value_heads": 32}
NOTES = (
    "norm weights (x * (1 + w) in transformers) are written as w + 1 and A_log as -exp(A_log), computed in float32 and "
    "written F32 (as llama.cpp's converter does for BF16 checkpoints; it rounds them to F16 for F16 checkpoints)",
    "llama.cpp L2-normalises the linear-attention queries and keys with rms_norm_eps where transformers uses 1e-6 "
    "(identical for the published configs, rms_norm_eps = 1e-6)",
    "multi-token-prediction blocks (mtp.*) are kept after the trunk as llama.cpp's converter does (its main graph never "
    "runs them); a checkpoint without them is written without them (block_count = num_hidden_layers)",
)


@dataclass(frozen=True)
class HybridHparams(Hparams):
    """Qwen3-Next / Qwen3.5 MoE sizes.  ``n_layer`` is the GGUF block count: the trunk plus kept MTP blocks."""

    n_ff_exp: int = 0  # moe_intermediate_size
    n_ff_shexp: int = 0  # shared_expert_intermediate_size
    has_ff: bool = True  # config.json gives intermediate_size (Qwen3.5 MoE does not): feed_forward_length is written
    n_rot: int = 0  # rotary dimensions per head: head_dim * partial_rotary_factor
    recurrent: tuple[bool, ...] = ()  # per trunk block: Gated DeltaNet (True) or gated full attention
    full_attention_interval: int = 4
    conv_kernel: int = 4
    n_k_heads: int = 0
    n_v_heads: int = 0
    head_k_dim: int = 0
    head_v_dim: int = 0
    n_trunk: int = 0  # num_hidden_layers
    n_mtp: int = 0  # multi-token-prediction blocks kept after the trunk
    rope_sections: tuple[int, ...] = ()  # IMRoPE sections (qwen35moe); empty: none written

    @property
    def key_dim(self) -> int:
        return self.n_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.n_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    @property
    def v_per_k(self) -> int:
        return self.n_v_heads // self.n_k_heads


def refuse(key: str, value: object, why: str, fix: str) -> CheckpointError:
    return CheckpointError(f"config.json: {key} = {shown(value)}: {why}; fix: {fix}")


def _bool(config: dict[str, Any], key: str, default: bool) -> bool:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise CheckpointError(f"config.json: key {key!r} = {shown(value)}, expected true or false; fix: restore the original value")
    return value


def layer_kinds(config: dict[str, Any], n_layer: int) -> tuple[tuple[bool, ...], int]:
    """Per block, whether it is linear attention (as transformers builds it: ``layer_types``, else every
    ``full_attention_interval``-th block is full attention), and ``full_attention_interval`` for the GGUF.

    llama.cpp reads ``attention.recurrent_layers`` (always written) before the interval; the interval written
    is the one ``layer_types`` follows (transformers drops the key when it writes ``layer_types``), else the
    config's, else 4 (llama.cpp's converter's default).
    """
    interval = _get(config, "full_attention_interval", int, 4)
    types = config.get("layer_types")
    if types is None:
        return tuple(bool((i + 1) % interval) for i in range(n_layer)), interval
    if not isinstance(types, list) or len(types) != n_layer or not all(t in ("linear_attention", "full_attention") for t in types):
        raise CheckpointError(f"config.json: key 'layer_types' = {shown(types)}, expected {n_layer} of \"linear_attention\" / \"full_attention\" "
                              "(one per num_hidden_layers); fix: restore the original value")
    kinds = tuple(t == "linear_attention" for t in types)
    regular = next((k for k in range(1, n_layer + 1) if kinds == tuple(bool((i + 1) % k) for i in range(n_layer))), None)
    return kinds, regular or interval


def _rotary_width(config: dict[str, Any], rope: dict[str, Any], head_dim: int) -> int:
    """``int(head_dim * partial_rotary_factor)`` as transformers' rotary embedding computes it (0.25 by default)."""
    factor = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.25))
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise refuse("partial_rotary_factor", factor, "expected a number in (0, 1]", "restore the original value")
    n_rot = int(head_dim * factor)
    if n_rot < 2 or n_rot % 2:
        raise refuse("partial_rotary_factor", factor, f"head_dim * partial_rotary_factor = {n_rot} rotary dimensions, but rotary "
                     "embeddings turn pairs of dimensions (llama.cpp needs an even count of at least 2)", "restore the original values")
    return n_rot


def hybrid_hparams(config: dict[str, Any], cls: type[HybridHparams] = HybridHparams, **extra: Any) -> HybridHparams:
    """The sizes both families share, checked against what llama.cpp's hybrid graphs can load and compute."""
    filled = {"head_dim": 256, "max_position_embeddings": 32768, **LINEAR_DEFAULTS, **config}  # transformers' defaults
    has_ff = filled.get("intermediate_size") is not None
    if not has_ff:  # Qwen3.5 MoE has none: llama.cpp's converter writes no feed_forward_length
        filled["intermediate_size"] = _get(filled, "shared_expert_intermediate_size", int)
    base = Hparams.from_config({k: v for k, v in filled.items() if k not in ("num_local_experts", "num_experts", "sliding_window")})
    n_expert, n_used = moe_counts(filled)
    if _bool(filled, "attention_bias", False):
        raise refuse("attention_bias", True, "transformers then adds biases to q/k/v/o_proj, which llama.cpp's hybrid Qwen graphs do not read",
                     "only checkpoints with attention_bias = false (every published Qwen3-Next / Qwen3.5) can be converted")
    sizes = {k: _get(filled, k, int) for k in LINEAR_DEFAULTS}
    n_k, n_v = sizes["linear_num_key_heads"], sizes["linear_num_value_heads"]
    if n_v % n_k:
        raise refuse("linear_num_value_heads", n_v, f"not a multiple of linear_num_key_heads = {n_k} (each key head serves a whole "
                     "number of value heads)", "restore the original values")
    if sizes["linear_key_head_dim"] != sizes["linear_value_head_dim"]:
        raise refuse("linear_value_head_dim", sizes["linear_value_head_dim"], f"differs from linear_key_head_dim = {sizes['linear_key_head_dim']}; "
                     "llama.cpp sizes both with one ssm.state_size and would not load the file", "none with this llama.cpp")
    recurrent, interval = layer_kinds(filled, base.n_layer)
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    return cls(**{
        **fields, "n_expert": n_expert, "n_expert_used": n_used, "has_ff": has_ff,
        "n_ff_exp": _get(filled, "moe_intermediate_size", int),
        "n_ff_shexp": _get(filled, "shared_expert_intermediate_size", int),
        "n_rot": _rotary_width(filled, base.rope, base.head_dim), "recurrent": recurrent, "full_attention_interval": interval,
        "conv_kernel": sizes["linear_conv_kernel_dim"], "n_k_heads": n_k, "n_v_heads": n_v,
        "head_k_dim": sizes["linear_key_head_dim"], "head_v_dim": sizes["linear_value_head_dim"], "n_trunk": base.n_layer,
        **extra,
    })


def hparams(config: dict[str, Any]) -> HybridHparams:
    norm = config.get("norm_topk_prob", True)  # Qwen3NextConfig's default
    if norm is not True:
        raise refuse("norm_topk_prob", norm, "transformers then leaves the top-k expert weights unnormalised, while llama.cpp's qwen3next "
                     "graph always renormalises them (the GGUF would compute something else)",
                     "only checkpoints with norm_topk_prob = true (every published Qwen3-Next) can be converted")
    only = config.get("mlp_only_layers") or []
    step = config.get("decoder_sparse_step", 1)
    if only or step not in (1, None):
        raise refuse("mlp_only_layers / decoder_sparse_step", [only, step], "some blocks would have a dense MLP, but llama.cpp's qwen3next "
                     "loader needs a router and experts in every block", "none with this llama.cpp: only checkpoints with experts in every block convert")
    return hybrid_hparams(config)


# --------------------------------------------------------------------------- transforms


@dataclass(frozen=True)
class QkvzPart(Transform):
    """Qwen3-Next's ``in_proj_qkvz`` rows, ``[q, k, v, z]`` per key head, regrouped as llama.cpp reads them:
    all q, all k, all v (``attn_qkv``, what the convolution sees) or all z (``attn_gate``)."""

    gate: bool = False

    def index(self, h: HybridHparams) -> np.ndarray:
        """Source rows of the output, in output order."""
        r_v = h.v_per_k * h.head_v_dim
        per = 2 * h.head_k_dim + 2 * r_v
        rows = np.arange(h.n_k_heads * per).reshape(h.n_k_heads, per)
        if self.gate:
            return rows[:, per - r_v:].reshape(-1)
        cuts = (rows[:, :h.head_k_dim], rows[:, h.head_k_dim:2 * h.head_k_dim], rows[:, 2 * h.head_k_dim:2 * h.head_k_dim + r_v])
        return np.concatenate([c.reshape(-1) for c in cuts])

    def out_shape(self, shape: tuple[int, ...], hparams: Any) -> tuple[int, ...]:
        return (hparams.value_dim if self.gate else hparams.conv_dim, shape[-1])

    def apply(self, a: np.ndarray, hparams: Any) -> np.ndarray:
        return np.ascontiguousarray(a[self.index(hparams)])


QKV = QkvzPart("qkvz_qkv", gate=False)
Z = QkvzPart("qkvz_z", gate=True)


def conv_views(tensors: Mapping[str, TensorRef], h: HybridHparams, where: str) -> dict[str, TensorRef]:
    """The checkpoint's tensors with each ``linear_attn.conv1d.weight`` ``[C, 1, K]`` described as ``[C, K]``.

    The depthwise kernel's middle axis (one input channel per group) has size 1: dropping it
    changes no byte, so it is done on the description of the source (a view), before any
    weight is read, and every later stage (plans, transforms, the writer) sees the matrix
    ``ssm_conv1d`` llama.cpp reads.
    """
    out = dict(tensors)
    want = (h.conv_dim, 1, h.conv_kernel)
    for name, ref in tensors.items():
        if not name.endswith(".linear_attn.conv1d.weight"):
            continue
        if ref.shape != want:
            raise CheckpointError(f"{where}: tensor {shown(name)} has shape {shown(list(ref.shape))}, config.json implies {list(want)}; "
                                  "fix: use the config.json that belongs to these weights")
        if type(ref) is not TensorRef:  # a quantised or GGUF-backed source decodes its own shape
            raise CheckpointError(f"{where}: tensor {shown(name)} is stored quantised ({ref.dtype}); the convolution kernel must be stored "
                                  "as F32/F16/BF16; fix: use a checkpoint that keeps linear_attn.conv1d in bf16 (as published ones do)")
        out[name] = replace(ref, shape=(h.conv_dim, h.conv_kernel))
    return out


# --------------------------------------------------------------------------- name tables

#: ``model.layers.{bid}.`` rows of a block; another prefix (Qwen3.5's ``model.language_model.``, MTP) is put in place by :func:`moved`
BLOCK = "model.layers.{bid}."
NORM_RULES: tuple[Rule, ...] = (  # x * (1 + w) in transformers
    _p(BLOCK + "input_layernorm.weight", T.ATTN_NORM, Role.NORM, lambda h: (h.n_embd,), PLUS_ONE),
    _p(BLOCK + "post_attention_layernorm.weight", T.ATTN_POST_NORM, Role.NORM, lambda h: (h.n_embd,), PLUS_ONE),
)
#: gated full attention: q_proj rows are [query, gate] per head, the layout the graph views (no transform)
ATTENTION_RULES: tuple[Rule, ...] = (
    _p(BLOCK + "self_attn.q_proj.weight", T.ATTN_Q, Role.ATTENTION, lambda h: (2 * h.n_head * h.head_dim, h.n_embd), optional=True),
    _p(BLOCK + "self_attn.k_proj.weight", T.ATTN_K, Role.ATTENTION, lambda h: (h.n_head_kv * h.head_dim, h.n_embd), optional=True),
    _p(BLOCK + "self_attn.v_proj.weight", T.ATTN_V, Role.ATTENTION, lambda h: (h.n_head_kv * h.head_dim, h.n_embd), optional=True),
    _p(BLOCK + "self_attn.o_proj.weight", T.ATTN_OUT, Role.ATTENTION, lambda h: (h.n_embd, h.n_head * h.head_dim), optional=True),
    _p(BLOCK + "self_attn.q_norm.weight", T.ATTN_Q_NORM, Role.NORM, lambda h: (h.head_dim,), PLUS_ONE, optional=True),
    _p(BLOCK + "self_attn.k_norm.weight", T.ATTN_K_NORM, Role.NORM, lambda h: (h.head_dim,), PLUS_ONE, optional=True),
)
#: the Gated DeltaNet rows both families share (the projections differ)
_LINEAR = BLOCK + "linear_attn."
LINEAR_COMMON_RULES: tuple[Rule, ...] = (
    _p(_LINEAR + "norm.weight", T.SSM_NORM, Role.NORM, lambda h: (h.head_v_dim,), optional=True),  # a plain weight: no + 1
    _p(_LINEAR + "out_proj.weight", T.SSM_OUT, Role.OTHER, lambda h: (h.n_embd, h.value_dim), optional=True),
)
LINEAR_RULES: tuple[Rule, ...] = (
    _p(_LINEAR + "in_proj_qkvz.weight", T.ATTN_QKV, Role.ATTENTION, lambda h: (2 * h.key_dim + 2 * h.value_dim, h.n_embd), QKV, optional=True),
    _p(_LINEAR + "in_proj_qkvz.weight", T.ATTN_GATE, Role.ATTENTION, lambda h: (2 * h.key_dim + 2 * h.value_dim, h.n_embd), Z, optional=True),
    _p(_LINEAR + "in_proj_ba.weight", T.SSM_BETA_ALPHA, Role.OTHER, lambda h: (2 * h.n_v_heads, h.n_embd), optional=True),
    _p(_LINEAR + "conv1d.weight", T.SSM_CONV1D, Role.OTHER, lambda h: (h.conv_dim, h.conv_kernel), optional=True),  # seen through conv_views
    Rule(_LINEAR + "dt_bias", T.SSM_DT + ".bias", Role.OTHER, lambda h: (h.n_v_heads,), optional=True),
    Rule(_LINEAR + "A_log", T.SSM_A, Role.OTHER, lambda h: (h.n_v_heads,), NEG_EXP, optional=True),
) + LINEAR_COMMON_RULES
#: GGUF tensors (after ``blk.N.``) of each kind of block, checked per block against layer_types
ATTENTION_TENSORS = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "attn_q_norm.weight", "attn_k_norm.weight")
LINEAR_TENSORS = ("attn_qkv.weight", "attn_gate.weight", "ssm_ba.weight", "ssm_conv1d.weight", "ssm_dt.bias", "ssm_a", "ssm_norm.weight", "ssm_out.weight")


def moved(rules: Sequence[Rule], prefix: str, block: str | None = None, optional: bool | None = None) -> tuple[Rule, ...]:
    """``rules`` with their ``model.`` prefix replaced by ``prefix`` (and ``{bid}`` by a fixed ``block``, required or not)."""
    out = []
    for r in rules:
        hf = prefix + r.hf.removeprefix("model.") if r.hf.startswith("model.") else r.hf
        gguf = r.gguf
        if block is not None:
            hf, gguf = hf.replace("{bid}", block), gguf.replace("{bid}", block)
        out.append(replace(r, hf=hf, gguf=gguf, optional=r.optional if optional is None else optional))
    return tuple(out)


def trunk_prefix(names: list[str]) -> str:
    """``model.`` or, in a Qwen3.5 vision-language checkpoint, ``model.language_model.``."""
    return "model.language_model." if any(n.startswith("model.language_model.") for n in names) else "model."


def block_rules(names: list[str], h_width: Callable[[Any], int], linear: Sequence[Rule]) -> tuple[Rule, ...]:
    """Every row of one block (``model.layers.{bid}.``): norms, both kinds of mixer (optional: the check sees which
    a block has), the router, experts in the layout ``names`` use, the shared expert and its gate."""
    return NORM_RULES + ATTENTION_RULES + tuple(linear) + moe_rules(names, h_width) + SHARED_EXPERT_RULES


def trunk_rules(names: list[str], linear: Sequence[Rule]) -> tuple[Rule, ...]:
    """The name table of the trunk (the blocks transformers runs), for a checkpoint with these tensor names."""
    prefix = trunk_prefix(names)
    trunk = [n.replace(prefix, "model.", 1) for n in names if n.startswith(prefix) and not n.startswith("model.mtp.")]  # the experts' layout
    head = (
        _p("model.embed_tokens.weight", T.TOKEN_EMBD, Role.EMBEDDINGS, lambda h: (h.n_vocab, h.n_embd)),
        _p("model.norm.weight", T.OUTPUT_NORM, Role.NORM, lambda h: (h.n_embd,), PLUS_ONE),
    )
    rules = moved(head + block_rules(trunk, lambda h: h.n_ff_exp, linear), prefix)
    return rules + tuple(r for r in head_rules(names) if r.hf == "lm_head.weight")


# --------------------------------------------------------------------------- multi-token prediction

_MTP_LAYER = re.compile(r"^(?:model\.)?mtp\.layers\.(0|[1-9][0-9]{0,5})\.")


def mtp_prefix(names: list[str]) -> str:
    return "model.mtp." if any(n.startswith("model.mtp.") for n in names) else "mtp."


def mtp_blocks(names: list[str], config: dict[str, Any], where: str) -> int:
    """How many multi-token-prediction blocks the checkpoint holds (``mtp.layers.N``), checked against ``mtp_num_hidden_layers``."""
    found = {int(m.group(1)) for n in names if (m := _MTP_LAYER.match(n))}
    n = max(found, default=-1) + 1
    declared = config.get("mtp_num_hidden_layers")
    if declared is not None and (isinstance(declared, bool) or not isinstance(declared, int) or declared < 0):
        raise CheckpointError(f"config.json: key 'mtp_num_hidden_layers' = {shown(declared)}, expected a number of blocks; fix: restore the original value")
    if n and found != set(range(n)):
        first = min(set(range(n)) - found)
        raise CheckpointError(f"{where}: the multi-token-prediction block {mtp_prefix(names)}layers.{first}.* is missing (blocks up to {n - 1} are present); "
                              "fix: re-download the shard that holds it")
    if n and declared and declared != n:
        raise CheckpointError(f"config.json: mtp_num_hidden_layers = {declared}, but the checkpoint holds {n} multi-token-prediction blocks "
                              f"({mtp_prefix(names)}layers.N); fix: use the config.json that belongs to these weights")
    if not n and declared:
        log.info("%s: no multi-token-prediction tensors (mtp.*): the %d MTP block(s) config.json declares are left out, "
                 "as llama.cpp's converter writes a model without them (--no-mtp)", where, declared)
    return n


def mtp_rules(names: list[str], h: HybridHparams) -> tuple[Rule, ...]:
    """MTP block ``i`` (a full-attention MoE block) -> ``blk.{n_trunk + i}``; the first one also carries the
    ``nextn`` projection and norms (llama.cpp's ``_QwenMtpMixin`` remapping)."""
    mp = mtp_prefix(names)
    out: list[Rule] = []
    for i in range(h.n_mtp):
        src = f"{mp}layers.{i}."
        layer = [BLOCK.replace("{bid}", "0") + n[len(src):] for n in names if n.startswith(src)]  # the experts' layout of this block
        rules = NORM_RULES + ATTENTION_RULES + moe_rules(layer, lambda h: h.n_ff_exp) + SHARED_EXPERT_RULES
        out += [replace(r, hf=src + r.hf[len(BLOCK):], gguf=r.gguf.replace("{bid}", str(h.n_trunk + i)), optional=False) for r in rules]
    if h.n_mtp:
        b = f"blk.{h.n_trunk}.nextn."
        out += [
            Rule(mp + "fc.weight", b + "eh_proj.weight", Role.OTHER, lambda h: (h.n_embd, 2 * h.n_embd)),
            Rule(mp + "pre_fc_norm_embedding.weight", b + "enorm.weight", Role.NORM, lambda h: (h.n_embd,), PLUS_ONE),
            Rule(mp + "pre_fc_norm_hidden.weight", b + "hnorm.weight", Role.NORM, lambda h: (h.n_embd,), PLUS_ONE),
            Rule(mp + "norm.weight", b + "shared_head_norm.weight", Role.NORM, lambda h: (h.n_embd,), PLUS_ONE),
        ]
    return tuple(out)


@dataclass(frozen=True)
class HybridConverter(Converter):
    """A Converter whose checkpoints may hold multi-token-prediction blocks (numbered after the trunk) and
    depthwise convolution kernels (read as matrices): its name table depends on the hyperparameters."""

    def mtp_sources(self, config: dict[str, Any], names: list[str]) -> list[str]:
        return [n for n in names if re.match(MTP_UNLOADED[0], n)]

    def map(self, ckpt: Checkpoint) -> tuple[Any, list[OutTensor]]:
        where = str(ckpt.root)
        names = list(ckpt.tensors)
        hp = self.hparams(ckpt.config)
        n_mtp = mtp_blocks(names, {**ckpt.config, **(ckpt.config.get("text_config") or {})}, where)
        if n_mtp:
            hp = replace(hp, n_layer=hp.n_trunk + n_mtp, n_mtp=n_mtp)
            log.info("%s: %d multi-token-prediction block(s) kept as blk.%d.. (nextn_predict_layers = %d), as llama.cpp's converter keeps them",
                     where, n_mtp, hp.n_trunk, n_mtp)
        vision = sum(n.startswith("model.visual.") for n in names)
        if vision and VISION[0] in self.ignore:
            log.info("%s: the vision tower (%d model.visual.* tensors) is left out: llama.cpp's converter writes it to a separate mmproj file", where, vision)
        rules = tuple(self.rules(names)) + mtp_rules(names, hp)
        tensors = map_tensors(conv_views(ckpt.tensors, hp, where), rules, hp, hp.n_trunk, hp.n_expert, self.ignore, where=where)
        self.check(hp, tensors)
        return hp, tensors


def check_blocks(h: HybridHparams, tensors: list[OutTensor], linear: Sequence[str], where: str = "checkpoint") -> None:
    """Each trunk block holds the mixer layer_types gives it, whole, and not the other one."""
    by_block: dict[int, dict[str, OutTensor]] = {}
    for t in tensors:
        b = gguf_spec.block_of(t.name)
        if b is not None and b < h.n_trunk:
            by_block.setdefault(b, {})[t.name.split(".", 2)[2]] = t
    for b in range(h.n_trunk):
        have = by_block.get(b, {})
        want, other = (linear, ATTENTION_TENSORS) if h.recurrent[b] else (ATTENTION_TENSORS, linear)
        kind = "linear_attention" if h.recurrent[b] else "full_attention"
        stray = [have[n] for n in other if n in have]
        if stray:
            raise CheckpointError(f"{where}: block {b} is {kind} (config.json layer_types), but the checkpoint has {shown(stray[0].sources[0].name)} there; "
                                  "fix: use the config.json that belongs to these weights")
        missing = [n for n in want if n not in have]
        if missing:
            part = "linear_attn" if h.recurrent[b] else "self_attn"
            raise CheckpointError(f"{where}: block {b} is {kind} (config.json layer_types), but its {part} tensors are incomplete "
                                  f"(no source for {missing[0]!r}); fix: re-download the checkpoint, or use the config.json that belongs to it")


def check(h: HybridHparams, tensors: list[OutTensor]) -> None:
    check_blocks(h, tensors, LINEAR_TENSORS)
    check_rope(h, ARCH, ("default", "linear", "yarn"))
    _check_common(h, tensors)


def check_rope(h: HybridHparams, arch: str, kinds: tuple[str, ...]) -> None:
    if h.rope_type not in kinds:
        raise CheckpointError(f"config.json: rope scaling type {h.rope_type!r} is not supported for {arch} (supported: {', '.join(kinds)}); "
                              "fix: use the original config.json")


def hybrid_metadata(h: HybridHparams, arch: str) -> dict[str, MetaValue]:
    """The ``{arch}.*`` block of both hybrid families (what llama.cpp's ``Qwen3NextModel`` writes)."""
    u32 = lambda v: MetaValue(int(v), V.UINT32)  # noqa: E731
    md = _common_metadata(h, arch)
    if not h.has_ff:
        del md[K.LLM.FEED_FORWARD_LENGTH.format(arch=arch)]
    md[K.Rope.DIMENSION_COUNT.format(arch=arch)] = u32(h.n_rot)
    md[K.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=arch)] = u32(h.n_ff_exp)
    md[K.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH.format(arch=arch)] = u32(h.n_ff_shexp)
    md[K.SSM.CONV_KERNEL.format(arch=arch)] = u32(h.conv_kernel)
    md[K.SSM.STATE_SIZE.format(arch=arch)] = u32(h.head_k_dim)
    md[K.SSM.GROUP_COUNT.format(arch=arch)] = u32(h.n_k_heads)
    md[K.SSM.TIME_STEP_RANK.format(arch=arch)] = u32(h.n_v_heads)
    md[K.SSM.INNER_SIZE.format(arch=arch)] = u32(h.value_dim)
    md[RECURRENT_LAYERS.format(arch=arch)] = MetaValue([*h.recurrent, *(False,) * h.n_mtp], V.ARRAY, V.BOOL)
    md[K.LLM.FULL_ATTENTION_INTERVAL.format(arch=arch)] = u32(h.full_attention_interval)
    if h.n_mtp:
        md[K.LLM.NEXTN_PREDICT_LAYERS.format(arch=arch)] = u32(h.n_mtp)
    if h.rope_sections:
        md[K.Rope.DIMENSION_SECTIONS.format(arch=arch)] = MetaValue(list(h.rope_sections), V.ARRAY, V.INT32)
    return md


def metadata(h: HybridHparams) -> dict[str, MetaValue]:
    return hybrid_metadata(h, ARCH)


def rules(names: list[str]) -> tuple[Rule, ...]:
    return trunk_rules(names, LINEAR_RULES)


CONVERTER = register(HybridConverter(
    model_type=MODEL_TYPE, arch=ARCH, hparams=hparams, rules=rules, metadata=metadata, check=check, ignore=IGNORE,
    hf_architectures=("Qwen3NextForCausalLM",), routing=Routing(scoring="softmax", normalize_top_k=True), notes=NOTES,
    hf_experts=HF_EXPERTS,
))
