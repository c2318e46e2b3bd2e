"""``model_type: glm4_moe``: GLM-4.5 / 4.6 / 4.7 (Z.ai) checkpoints -> GGUF arch ``glm4moe``.

The references: transformers 5.23's ``modeling_glm4_moe.py`` (what a checkpoint computes), the
vendored llama.cpp's ``conversion/glm.py`` ``Glm4MoeModel`` and ``src/models/glm4-moe.cpp`` (what
the file holds and the graph computes).

Attention
    grouped-query attention with ``head_dim`` of its own, biases on q/k/v (``attention_bias``,
    none on ``o_proj``), optional per-head RMS norms on queries and keys (``use_qk_norm`` ->
    ``attn_q_norm`` / ``attn_k_norm``) before the rotary embeddings, which turn the first
    ``head_dim * partial_rotary_factor`` dimensions of each head in rotate-half (NeoX) order: the
    q/k rows are written as they are, ``rope.dimension_count`` says how many turn.
    ``post_attention_layernorm`` is llama.cpp's ``post_attention_norm`` (``attn_post_norm``).
Blocks
    ``first_k_dense_replace`` leading dense blocks (``ffn_gate/up/down``, ``intermediate_size``
    wide), then MoE blocks: router ``mlp.gate``, routed experts of ``moe_intermediate_size``
    (per-expert keys or transformers 5's fused ``gate_up_proj`` / ``down_proj``) and
    ``n_shared_experts`` shared experts fused into one always-on MLP (``ffn_*_shexp``): DeepSeek
    V3's layout, whose name-table rows (``converters/_deepseek.py``) are reused here.
Routing (every key written from what transformers computes)
    sigmoid scores, experts chosen by score + ``e_score_correction_bias`` (``exp_probs_b.bias``)
    within the best ``topk_group`` of ``n_group`` groups (a group scored by the sum of its two
    best biased scores, as llama.cpp's graph does), the chosen experts' unbiased scores
    renormalised when ``norm_topk_prob``, times ``routed_scaling_factor``.
    ``expert_gating_func`` sigmoid is always written (GLM-4.7-Flash's softmax-routed files,
    llama.cpp PR #18980, were exactly a missing key), as are ``expert_weights_norm`` /
    ``expert_weights_scale`` / the group counts (llama.cpp's converter writes the groups only
    when config.json has them).
Multi-token prediction (nextn)
    GLM checkpoints store ``num_nextn_predict_layers`` blocks after the trunk
    (``model.layers.{num_hidden_layers + i}``: a MoE block plus ``eh_proj``, ``enorm``,
    ``hnorm``, ``shared_head.norm`` and, where present, ``embed_tokens`` /
    ``shared_head.head``); transformers does not load them.  They are kept, as llama.cpp's
    converter keeps them by default: ``blk.{num_hidden_layers + i}.*`` with the ``nextn.*``
    tensors, the block count grown by them, ``nextn_predict_layers``; llama.cpp's main graph
    never runs them (its MTP graph does, for speculative decoding).  A checkpoint without those
    tensors (every transformers-saved one, whose config.json still says
    ``num_nextn_predict_layers: 1``) is written without MTP blocks, as ``--no-mtp`` writes it:
    ``block_count = num_hidden_layers`` and no ``nextn_predict_layers`` (llama.cpp's converter
    would declare a block it has no weights for).

Refused, because llama.cpp would load or compute something else: ``n_shared_experts = 0``
(the graph always adds the shared expert), an activation other than SiLU, rope scaling other
than default / linear (YaRN over a partial rotary width is not verified here), an odd or empty rotary width.
The first and third are llama.cpp's limits only (:func:`~quantkit.converters.llama.llama_cpp_limit`): ``--format bnb`` exports
them (transformers' GLM builds a zero-width shared MLP at ``n_shared_experts = 0``, kept as stored).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quantkit.converters import MLP_EXPERTS, Converter, Routing, register
from quantkit.converters._deepseek import (
    DENSE_RULES, SCORE_BIAS_RULE, SHARED_RULES, Family, GroupedMoeHparams, routing_metadata, _bool, _check_routing_keys, _float, _int, _refuse, _routing_groups,
)
from quantkit.converters.dots1 import check_block_kinds, with_class_defaults
from quantkit.converters.llama import IGNORE, LLAMA_MAX_EXPERTS, T, Hparams, _get, _p, head_rules, llama_cpp_limit, moe_rules
from quantkit.converters.llama import check_hparams as _check_common
from quantkit.converters.llama import metadata as _common_metadata
from quantkit.errors import CheckpointError
from quantkit.format import gguf_spec
from quantkit.format.gguf_write import MetaValue
from quantkit.hf.checkpoint import shown
from quantkit.hf.mapping import OutTensor, Role, Rule, map_tensors

if TYPE_CHECKING:
    from quantkit.hf.checkpoint import Checkpoint

log = logging.getLogger(__name__)

MODEL_TYPE = "glm4_moe"
ARCH = "glm4moe"  # gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GLM4_MOE]
K, V = gguf_spec.Keys, gguf_spec.GGUFValueType
#: Glm4MoeConfig's defaults (transformers 5.23) for every key the converter reads
DEFAULTS = dict(
    vocab_size=151552, hidden_size=4096, intermediate_size=10944, num_hidden_layers=46, num_attention_heads=96, num_key_value_heads=8,
    max_position_embeddings=131072, rms_norm_eps=1e-5, attention_bias=False, moe_intermediate_size=1408, num_experts_per_tok=8,
    n_shared_experts=1, n_routed_experts=128, routed_scaling_factor=1.0, n_group=1, topk_group=1, first_k_dense_replace=1,
    norm_topk_prob=True, use_qk_norm=False, num_nextn_predict_layers=1, tie_word_embeddings=False,
)
FAMILY = Family(model_type=MODEL_TYPE, gating="sigmoid", defaults=DEFAULTS,
                aliases={"n_routed_experts": ("num_local_experts",), "num_nextn_predict_layers": ("num_mtp_layers",)})
#: read below (with their class defaults), or not read by llama.cpp's glm4moe graph
_NOT_READ = ("num_local_experts", "num_experts", "sliding_window", "rope_theta", "rope_parameters", "rope_scaling", "partial_rotary_factor")
SUPPORTED_ROPE = ("default", "linear")  # YaRN with partial rotary: not verified against transformers here, refused
#: what transformers' rotary embedding computes besides (``ROPE_INIT_FUNCTIONS``): refused for llama.cpp only (--format bnb exports them)
TRANSFORMERS_ROPE = ("dynamic", "yarn", "longrope", "llama3")
#: transformers' default rope base when neither rope_parameters nor config.json give one (PreTrainedConfig.default_theta)
DEFAULT_THETA = 10000.0


@dataclass(frozen=True)
class Glm4MoeHparams(GroupedMoeHparams):
    n_rot: int = 0  # rotary dimensions per head (head_dim * partial_rotary_factor)
    qk_norm: bool = False  # use_qk_norm
    attn_bias: bool = False  # attention_bias (q/k/v)
    n_trunk: int = 0  # num_hidden_layers: the blocks transformers runs (n_layer also counts kept MTP blocks)
    n_mtp: int = 0  # multi-token-prediction blocks kept after the trunk
    n_mtp_declared: int = 0  # num_nextn_predict_layers as config.json (or the class default) says


# --------------------------------------------------------------------------- config


def rope_settings(config: dict[str, Any], default_factor: float) -> tuple[dict[str, Any], float, float]:
    """(rope object, rope base, partial_rotary_factor) with transformers' priority: ``rope_parameters`` (or
    ``rope_scaling``) first, then the top-level key, then the config class's default."""
    from quantkit.converters.llama import _rope

    rope = _rope(config)
    key = next((k for k in ("rope_parameters", "rope_scaling") if config.get(k)), "rope_parameters")
    theta = rope.get("rope_theta")
    if theta is None:
        theta = _get(config, "rope_theta", float, DEFAULT_THETA)
    factor = rope.get("partial_rotary_factor")
    where = f"{key}.partial_rotary_factor"
    if factor is None:
        factor, where = config.get("partial_rotary_factor"), "partial_rotary_factor"
    if factor is None:
        factor = default_factor
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise _refuse(where, factor, "expected a number in (0, 1] (the share of each head that rotary embeddings turn)", "restore the original value")
    return rope, float(theta), float(factor)


def rotary_width(head_dim: int, factor: float) -> int:
    n_rot = int(head_dim * factor)  # transformers: int(head_dim * partial_rotary_factor)
    if n_rot < 2 or n_rot % 2:
        raise _refuse("partial_rotary_factor", factor, f"head_dim {head_dim} * partial_rotary_factor = {n_rot} rotary dimensions, but rotary "
                      "embeddings turn pairs of dimensions (llama.cpp needs an even count of at least 2)", "restore the original values")
    return n_rot


def hparams(config: dict[str, Any]) -> Glm4MoeHparams:
    filled = with_class_defaults({k: v for k, v in config.items() if k not in _NOT_READ}, DEFAULTS)
    base = Hparams.from_config(filled)
    rope, theta, factor = rope_settings(config, 0.5)  # Glm4MoeConfig sets partial_rotary_factor 0.5 unless given
    base = dataclasses.replace(base, rope=rope, rope_theta=theta)
    _check_routing_keys(config, FAMILY)
    if base.rope_type not in SUPPORTED_ROPE:
        error = _refuse("rope_parameters.rope_type", base.rope_type, f"llama.cpp's glm4moe graph computes {', '.join(SUPPORTED_ROPE)} rotary embeddings only",
                        "use the original config.json")
        if base.rope_type not in TRANSFORMERS_ROPE:
            raise error
        llama_cpp_limit(error)
    n_expert, n_used = _int(config, FAMILY, "n_routed_experts"), _int(config, FAMILY, "num_experts_per_tok")
    if not 1 <= n_used <= n_expert:
        raise _refuse("num_experts_per_tok", n_used, f"expected 1..n_routed_experts = {n_expert}", "restore the original config.json")
    if n_expert > LLAMA_MAX_EXPERTS:
        raise _refuse("n_routed_experts", n_expert, f"more than the {LLAMA_MAX_EXPERTS} experts llama.cpp supports (it aborts loading such a file)", "none with this llama.cpp")
    n_dense = _int(config, FAMILY, "first_k_dense_replace", positive=False)
    if n_dense >= base.n_layer:
        raise _refuse("first_k_dense_replace", n_dense, f"every one of the {base.n_layer} blocks would be dense (no MoE block)", "restore the original value")
    n_shared = _int(config, FAMILY, "n_shared_experts", positive=False)
    if not n_shared:  # transformers builds a zero-width shared MLP (adds nothing)
        llama_cpp_limit(_refuse("n_shared_experts", n_shared, "llama.cpp's glm4moe graph always adds a shared expert to every MoE block and would not load the file",
                        "none with this llama.cpp (every published GLM-4.5 / 4.6 / 4.7 has one)"))
    groups = _routing_groups(config, FAMILY, n_expert)
    n_mtp = _int(config, FAMILY, "num_nextn_predict_layers", positive=False)
    return Glm4MoeHparams(**{
        **{f: getattr(base, f) for f in base.__dataclass_fields__}, "n_expert": n_expert, "n_expert_used": n_used,
        "n_ff_exp": _int(config, FAMILY, "moe_intermediate_size"), "n_expert_shared": n_shared, "n_dense_lead": n_dense,
        "weights_norm": _bool(config, FAMILY, "norm_topk_prob"), "weights_scale": _float(config, FAMILY, "routed_scaling_factor"),
        "n_group": groups[0], "n_group_used": groups[1], "n_rot": rotary_width(base.head_dim, factor),
        "qk_norm": _bool(config, FAMILY, "use_qk_norm"), "attn_bias": _bool(config, FAMILY, "attention_bias"),
        "n_trunk": base.n_layer, "n_mtp": 0, "n_mtp_declared": n_mtp,
    })


# --------------------------------------------------------------------------- name table

_ATTN = "model.layers.{bid}.self_attn."
ATTENTION_RULES: tuple[Rule, ...] = (  # NeoX rotary on the first n_rot dimensions: q/k rows as they are
    _p("model.embed_tokens.weight", T.TOKEN_EMBD, Role.EMBEDDINGS, lambda h: (h.n_vocab, h.n_embd)),
    _p("model.layers.{bid}.input_layernorm.weight", T.ATTN_NORM, Role.NORM, lambda h: (h.n_embd,)),
    _p(_ATTN + "q_proj.weight", T.ATTN_Q, Role.ATTENTION, lambda h: (h.n_head * h.head_dim, h.n_embd)),
    _p(_ATTN + "k_proj.weight", T.ATTN_K, Role.ATTENTION, lambda h: (h.n_head_kv * h.head_dim, h.n_embd)),
    _p(_ATTN + "v_proj.weight", T.ATTN_V, Role.ATTENTION, lambda h: (h.n_head_kv * h.head_dim, h.n_embd)),
    _p(_ATTN + "o_proj.weight", T.ATTN_OUT, Role.ATTENTION, lambda h: (h.n_embd, h.n_head * h.head_dim)),
    _p("model.layers.{bid}.post_attention_layernorm.weight", T.ATTN_POST_NORM, Role.NORM, lambda h: (h.n_embd,)),
)
#: attention_bias: q/k/v biases (1-D, F32); use_qk_norm: per-head RMS norms (optional rows: check() compares with config.json)
BIAS_RULES: tuple[Rule, ...] = (
    Rule(_ATTN + "q_proj.bias", T.ATTN_Q + ".bias", Role.ATTENTION, lambda h: (h.n_head * h.head_dim,), optional=True),
    Rule(_ATTN + "k_proj.bias", T.ATTN_K + ".bias", Role.ATTENTION, lambda h: (h.n_head_kv * h.head_dim,), optional=True),
    Rule(_ATTN + "v_proj.bias", T.ATTN_V + ".bias", Role.ATTENTION, lambda h: (h.n_head_kv * h.head_dim,), optional=True),
)
QK_NORM_RULES: tuple[Rule, ...] = (
    _p(_ATTN + "q_norm.weight", T.ATTN_Q_NORM, Role.NORM, lambda h: (h.head_dim,), optional=True),
    _p(_ATTN + "k_norm.weight", T.ATTN_K_NORM, Role.NORM, lambda h: (h.head_dim,), optional=True),
)
#: the nextn tensors of a multi-token-prediction block (``model.layers.{N}``, N >= num_hidden_layers), as llama.cpp's
#: tensor map names them; embed_tokens / shared_head.head only where the checkpoint has them (llama.cpp falls back to the trunk's)
NEXTN_RULES: tuple[Rule, ...] = (
    _p("model.layers.{bid}.eh_proj.weight", T.NEXTN_EH_PROJ, Role.OTHER, lambda h: (h.n_embd, 2 * h.n_embd), optional=True),
    _p("model.layers.{bid}.enorm.weight", T.NEXTN_ENORM, Role.NORM, lambda h: (h.n_embd,), optional=True),
    _p("model.layers.{bid}.hnorm.weight", T.NEXTN_HNORM, Role.NORM, lambda h: (h.n_embd,), optional=True),
    _p("model.layers.{bid}.shared_head.norm.weight", T.NEXTN_SHARED_HEAD_NORM, Role.NORM, lambda h: (h.n_embd,), optional=True),
    _p("model.layers.{bid}.embed_tokens.weight", T.NEXTN_EMBED_TOKENS, Role.OTHER, lambda h: (h.n_vocab, h.n_embd), optional=True),
    _p("model.layers.{bid}.shared_head.head.weight", T.NEXTN_SHARED_HEAD_HEAD, Role.OTHER, lambda h: (h.n_vocab, h.n_embd), optional=True),
)


def nextn_rules(names: list[str]) -> tuple[Rule, ...]:
    """:data:`NEXTN_RULES` for a checkpoint that holds nextn tensors (which blocks may hold them: :func:`check_nextn`); none otherwise.
    (The vendored llama.cpp's deepseek2 table has them; gguf-py 0.19's, pinned here, predates them.)"""
    return NEXTN_RULES if any(n.endswith((".eh_proj.weight", ".enorm.weight", ".hnorm.weight")) for n in names) else ()


#: GGUF names (after ``blk.N.``) of the nextn tensors every MTP block needs (llama.cpp's loader requires them)
NEXTN_REQUIRED = ("nextn.eh_proj.weight", "nextn.enorm.weight", "nextn.hnorm.weight")


def rules(names: list[str]) -> tuple[Rule, ...]:
    moe = tuple(dataclasses.replace(r, optional=True) for r in moe_rules(names, lambda h: h.n_ff_exp))  # MoE blocks only: check() says which
    return (ATTENTION_RULES + BIAS_RULES + QK_NORM_RULES + DENSE_RULES + moe + (SCORE_BIAS_RULE,) + SHARED_RULES + nextn_rules(names)
            + head_rules(names))


# --------------------------------------------------------------------------- multi-token prediction

_LAYER = re.compile(r"^model\.layers\.(0|[1-9][0-9]{0,5})\.")


def nextn_blocks(names: list[str], n_trunk: int, declared: int, where: str, key: str = "num_nextn_predict_layers") -> int:
    """How many multi-token-prediction blocks the checkpoint holds after the trunk (``model.layers.N``, N >= n_trunk),
    checked against config.json's ``key``; 0 when it holds none (they are then left out)."""
    found = {int(m.group(1)) for n in names if (m := _LAYER.match(n))}
    extra = {b for b in found if b >= n_trunk}
    if not extra:
        if declared:
            log.info("%s: no multi-token-prediction tensors (model.layers.%d.*): the %d nextn block(s) config.json declares are left out, "
                     "as llama.cpp's converter writes a model without them (--no-mtp)", where, n_trunk, declared)
        return 0
    n = max(extra) - n_trunk + 1
    if extra != set(range(n_trunk, n_trunk + n)):
        first = min(set(range(n_trunk, n_trunk + n)) - extra)
        raise CheckpointError(f"{where}: the multi-token-prediction block model.layers.{first}.* is missing (blocks up to {n_trunk + n - 1} are present); "
                              "fix: re-download the shard that holds it")
    if n != declared:
        raise CheckpointError(f"config.json: {key} = {declared}, but the checkpoint holds {n} block(s) after num_hidden_layers = {n_trunk} "
                              f"(model.layers.{n_trunk}..{n_trunk + n - 1}); fix: use the config.json that belongs to these weights")
    return n


def check_nextn(h: Any, tensors: list[OutTensor]) -> None:
    """nextn tensors only in the MTP blocks, and each MTP block with the ones llama.cpp's loader requires."""
    have: dict[int, set[str]] = {}
    for t in tensors:
        b = gguf_spec.block_of(t.name)
        if b is not None:
            have.setdefault(b, set()).add(t.name.split(".", 2)[2])
    for b, names in have.items():
        nextn = sorted(n for n in names if n.startswith("nextn."))
        if b < h.n_trunk and nextn:
            src = next(t.sources[0].name for t in tensors if t.name == f"blk.{b}.{nextn[0]}")
            raise CheckpointError(f"checkpoint: tensor {shown(src)} belongs to a multi-token-prediction block, but block {b} is one of the "
                                  f"num_hidden_layers = {h.n_trunk} trunk blocks; fix: use the config.json that belongs to these weights")
    for b in range(h.n_trunk, h.n_layer):
        missing = [n for n in NEXTN_REQUIRED if n not in have.get(b, set())]
        if missing:
            hf = {"nextn.eh_proj.weight": "eh_proj.weight", "nextn.enorm.weight": "enorm.weight", "nextn.hnorm.weight": "hnorm.weight"}[missing[0]]
            raise CheckpointError(f"checkpoint: tensor 'model.layers.{b}.{hf}' is missing (block {b} is a multi-token-prediction block); "
                                  "fix: re-download the shard that holds it")


@dataclass(frozen=True)
class NextnConverter(Converter):
    """A Converter whose checkpoints may hold multi-token-prediction blocks after the trunk (``model.layers.N``,
    N >= num_hidden_layers), kept as llama.cpp's converter keeps them: the hyperparameters then count them."""

    def mtp_sources(self, config: dict[str, Any], names: list[str]) -> list[str]:
        n_trunk = self.hparams(config).n_trunk
        return [n for n in names if (m := _LAYER.match(n)) and int(m.group(1)) >= n_trunk]

    def map(self, ckpt: Checkpoint) -> tuple[Any, list[OutTensor]]:
        where = str(ckpt.root)
        names = list(ckpt.tensors)
        hp = self.hparams(ckpt.config)
        n_mtp = nextn_blocks(names, hp.n_trunk, hp.n_mtp_declared, where)
        if n_mtp:
            hp = dataclasses.replace(hp, n_layer=hp.n_trunk + n_mtp, n_mtp=n_mtp)
            log.info("%s: %d multi-token-prediction block(s) kept as blk.%d.. (nextn_predict_layers = %d), as llama.cpp's converter keeps them",
                     where, n_mtp, hp.n_trunk, n_mtp)
        tensors = map_tensors(ckpt.tensors, self.rules(names), hp, hp.n_layer, hp.n_expert, self.ignore, where=where)
        tensors += self.generated(hp)
        self.check(hp, tensors)
        return hp, tensors


# --------------------------------------------------------------------------- checks and metadata


def _check_optional(h: Glm4MoeHparams, tensors: list[OutTensor]) -> None:
    """q/k norms and q/k/v biases in every block exactly when config.json says so."""
    have = {t.name for t in tensors}
    wanted = ((h.qk_norm, "use_qk_norm", ((T.ATTN_Q_NORM + ".weight", "self_attn.q_norm.weight"), (T.ATTN_K_NORM + ".weight", "self_attn.k_norm.weight"))),
              (h.attn_bias, "attention_bias", ((T.ATTN_Q + ".bias", "self_attn.q_proj.bias"), (T.ATTN_K + ".bias", "self_attn.k_proj.bias"),
                                               (T.ATTN_V + ".bias", "self_attn.v_proj.bias"))))
    for on, key, pairs in wanted:
        for bid in range(h.n_layer):
            for gguf_name, hf in pairs:
                present = gguf_name.replace("{bid}", str(bid)) in have
                if on and not present:
                    raise CheckpointError(f"checkpoint: tensor 'model.layers.{bid}.{hf}' is missing (config.json {key} = true); "
                                          "fix: re-download the checkpoint, or use the config.json that belongs to these weights")
                if present and not on:
                    raise CheckpointError(f"checkpoint: tensor 'model.layers.{bid}.{hf}' is present but config.json {key} is false (transformers would "
                                          "not load it); fix: use the config.json that belongs to these weights")


def check(h: Glm4MoeHparams, tensors: list[OutTensor]) -> None:
    check_block_kinds(h, tensors, "first_k_dense_replace", empty_shared=True)
    _check_optional(h, tensors)
    check_nextn(h, tensors)
    _check_common(h, tensors)


def metadata(h: Glm4MoeHparams) -> dict[str, MetaValue]:
    u32 = lambda v: MetaValue(int(v), V.UINT32)  # noqa: E731
    md = _common_metadata(h, ARCH)
    md.update({
        K.Rope.DIMENSION_COUNT.format(arch=ARCH): u32(h.n_rot),
        K.LLM.LEADING_DENSE_BLOCK_COUNT.format(arch=ARCH): u32(h.n_dense_lead),
        K.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=ARCH): u32(h.n_ff_exp),
        K.LLM.EXPERT_SHARED_COUNT.format(arch=ARCH): u32(h.n_expert_shared),
        # routing: every key, always, from what transformers computes
        **routing_metadata(h, ARCH, "sigmoid"),
    })
    if h.n_mtp:
        md[K.LLM.NEXTN_PREDICT_LAYERS.format(arch=ARCH)] = u32(h.n_mtp)
    return md


ROUTING = Routing(scoring="sigmoid", normalize_top_k=True, score_bias=True, group_limited=False, weights_scaled=True,
                  per_checkpoint=("normalize_top_k", "group_limited"))
MTP_NOTE = ("multi-token-prediction blocks (model.layers.N past num_hidden_layers) are kept as blk.N with their nextn.* tensors, as llama.cpp's "
            "converter keeps them (its main graph never runs them); a checkpoint without them is written without them (as --no-mtp)")
NOTES = (
    "routing: sigmoid, selection by score + e_score_correction_bias (exp_probs_b) within the best topk_group groups, top-k renormalised "
    "when norm_topk_prob, times routed_scaling_factor; expert_gating_func is always written",
    MTP_NOTE,
)

CONVERTER = register(NextnConverter(
    model_type=MODEL_TYPE, arch=ARCH, hparams=hparams, rules=rules, metadata=metadata, check=check, ignore=IGNORE,
    hf_architectures=("Glm4MoeForCausalLM",), routing=ROUTING, notes=NOTES,
    # --format bnb: experts under mlp.experts.{xid}, router mlp.gate (its e_score_correction_bias buffer kept under its own key);
    # MTP blocks (model.layers.N past num_hidden_layers, which transformers does not load) are left out (NextnConverter.mtp_sources)
    hf_experts=MLP_EXPERTS,
))
