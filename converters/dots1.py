"""``model_type: dots1``: rednote-hilab dots.llm1 checkpoints -> GGUF arch ``dots1``.

The references: transformers 5.23's ``modeling_dots1.py`` (what a checkpoint computes), the
vendored llama.cpp's ``conversion/dots1.py`` and ``src/models/dots1.cpp`` (what the file holds and
the graph computes).

Attention
    Qwen3's: per-head RMS norms on queries and keys (``attn_q_norm`` / ``attn_k_norm``, ``head_dim``
    values) before NeoX rotary embeddings, so q/k rows are written as they are.  llama.cpp's dots1
    graph sizes ``attn_k`` / ``attn_v`` for as many KV heads as query heads: grouped-query attention
    is refused, as are projection biases (no ``attn_output`` bias in the graph) and sliding-window
    layers (the graph attends to the whole context).  Grouped-query and sliding-window attention are llama.cpp's
    limits only (:func:`~quantkit.converters.llama.llama_cpp_limit`): ``--format bnb`` exports them.
Blocks
    ``first_k_dense_replace`` leading dense blocks (``ffn_gate/up/down``, ``intermediate_size`` wide:
    ``leading_dense_block_count``), then MoE blocks: the router ``mlp.gate``, routed experts of
    ``moe_intermediate_size`` (per-expert keys or transformers 5's fused ``gate_up_proj`` /
    ``down_proj``), and ``n_shared_experts`` shared experts fused into one always-on MLP
    (``ffn_*_shexp``, ``moe_intermediate_size * n_shared_experts`` wide, no gate): DeepSeek V3's
    layout, whose name-table rows (``converters/_deepseek.py``) are reused here.
Routing (every key written from what transformers computes)
    sigmoid scores, experts chosen by score + ``e_score_correction_bias`` (``exp_probs_b.bias``)
    within the best ``topk_group`` of ``n_group`` groups (a group scored by the sum of its two best
    biased scores, as llama.cpp's graph does); the unbiased scores of the chosen experts are
    renormalised when ``norm_topk_prob``, then multiplied by ``routed_scaling_factor``.
    ``expert_gating_func`` sigmoid is always written: transformers' Dots1Config has no such key,
    and llama.cpp aborts the process on a dots1 file without it (its converter writes it only when
    config.json has ``scoring_func``).  ``n_group`` / ``topk_group`` that limit nothing are written
    as 1 / 1 (llama.cpp aborts on a used count equal to the group count).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from quantkit.converters import MLP_EXPERTS, Converter, Routing, register
from quantkit.converters._deepseek import (
    _HF_NAME, DENSE_RULES, SCORE_BIAS_RULE, SHARED_RULES, Family, GroupedMoeHparams, routing_metadata, _block_kinds, _bool, _float, _int, _raw, _refuse, _routing_groups,
)
from quantkit.converters.llama import IGNORE, LLAMA_MAX_EXPERTS, NEOX_ATTENTION_RULES, ROPE_KEYS, T, Hparams, _p, head_rules, llama_cpp_limit, moe_rules
from quantkit.converters.llama import check_hparams as _check_common
from quantkit.converters.llama import metadata as _common_metadata
from quantkit.errors import CheckpointError
from quantkit.format import gguf_spec
from quantkit.format.gguf_write import MetaValue
from quantkit.hf.checkpoint import shown
from quantkit.hf.mapping import OutTensor, Role, Rule

MODEL_TYPE = "dots1"
ARCH = "dots1"  # gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DOTS1]
#: Dots1Config's defaults for the keys read without requiring them (transformers 5.23); n_routed_experts,
#: n_shared_experts and num_experts_per_tok default to None there (the model cannot be built without them)
DEFAULTS = dict(first_k_dense_replace=0, norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1, topk_group=1,
                sliding_window=4096, max_window_layers=62, attention_bias=False)
FAMILY = Family(model_type=MODEL_TYPE, gating="sigmoid", defaults=DEFAULTS, aliases={"n_routed_experts": ("num_local_experts",)})
#: read below, or not read by llama.cpp's dots1 graph (sliding_window: refused where a layer uses it)
_NOT_READ = ("num_local_experts", "num_experts", "sliding_window")
SUPPORTED_ROPE = ("default", "linear", "yarn")  # llama3's rope_freqs are not read by this graph
#: Dots1Config's defaults for the keys :class:`Hparams` reads with defaults of its own
HPARAM_DEFAULTS = dict(max_position_embeddings=2048)


def with_class_defaults(config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """config.json with a transformers config class's ``defaults`` where a key is absent or null (``rope_theta`` only
    where ``rope_parameters`` has none either): what :meth:`Hparams.from_config` must read instead of its own defaults."""
    out = dict(config)
    rope = next((config[k] for k in ROPE_KEYS if config.get(k)), None)
    for key, value in defaults.items():
        if key == "rope_theta":
            if config.get(key) is None and not (isinstance(rope, dict) and rope.get(key) is not None):
                out[key] = value
        elif config.get(key) is None:
            out[key] = value
    return out


@dataclass(frozen=True)
class Dots1Hparams(GroupedMoeHparams):
    pass


def _sliding_blocks(config: dict[str, Any], n_layer: int) -> list[int]:
    """The blocks transformers runs with sliding-window attention (``layer_types``, or Dots1Config's rule without it)."""
    types = config.get("layer_types")
    if types is None:
        window = _raw(config, FAMILY, "sliding_window")
        if window is None:
            return []
        start = _int(config, FAMILY, "max_window_layers", positive=False)
        return list(range(start, n_layer))
    if not isinstance(types, list) or len(types) != n_layer or not all(t in ("full_attention", "sliding_attention") for t in types):
        raise CheckpointError(f"config.json: key 'layer_types' = {shown(types)}, expected {n_layer} of \"full_attention\" / \"sliding_attention\"; fix: restore the original value")
    return [i for i, t in enumerate(types) if t == "sliding_attention"]


def _check_config(config: dict[str, Any], h: Hparams) -> None:
    """What transformers computes for this config and llama.cpp's dots1 graph cannot."""
    if h.n_head_kv != h.n_head:
        llama_cpp_limit(_refuse("num_key_value_heads", h.n_head_kv, f"grouped-query attention ({h.n_head} query heads); llama.cpp's dots1 graph sizes attn_k and attn_v "
                        "for as many KV heads as query heads and would not load the file",
                        "none with this llama.cpp: only checkpoints with num_key_value_heads = num_attention_heads (every published dots.llm1) convert"))
    if _bool(config, FAMILY, "attention_bias"):
        raise _refuse("attention_bias", True, "llama.cpp's dots1 graph has no attn_output bias", "none: such a model cannot run in this llama.cpp")
    sliding = _sliding_blocks(config, h.n_layer)
    if sliding:
        llama_cpp_limit(_refuse("layer_types / sliding_window / max_window_layers", [config.get("layer_types"), config.get("sliding_window"), config.get("max_window_layers")],
                        f"blocks {sliding[:8]} attend through a sliding window, but llama.cpp's dots1 graph attends to the whole context",
                        "none with this llama.cpp: only checkpoints without sliding-window layers (every published dots.llm1) convert"))
    if h.rope_type not in SUPPORTED_ROPE:
        raise _refuse("rope_parameters.rope_type", h.rope_type, f"llama.cpp's dots1 graph computes {', '.join(SUPPORTED_ROPE)} rotary embeddings only",
                      "use the original config.json")


def hparams(config: dict[str, Any]) -> Dots1Hparams:
    base = Hparams.from_config(with_class_defaults({k: v for k, v in config.items() if k not in _NOT_READ}, HPARAM_DEFAULTS))
    _check_config(config, base)
    n_expert, n_used = _int(config, FAMILY, "n_routed_experts"), _int(config, FAMILY, "num_experts_per_tok")
    if not 1 <= n_used <= n_expert:
        raise _refuse("num_experts_per_tok", n_used, f"expected 1..n_routed_experts = {n_expert}", "restore the original config.json")
    if n_expert > LLAMA_MAX_EXPERTS:
        raise _refuse("n_routed_experts", n_expert, f"more than the {LLAMA_MAX_EXPERTS} experts llama.cpp supports (it aborts loading such a file)", "none with this llama.cpp")
    n_dense = _int(config, FAMILY, "first_k_dense_replace", positive=False)
    if n_dense >= base.n_layer:
        raise _refuse("first_k_dense_replace", n_dense, f"every one of the {base.n_layer} blocks would be dense (no MoE block)", "restore the original value")
    groups = _routing_groups(config, FAMILY, n_expert)
    return Dots1Hparams(**{
        **{f: getattr(base, f) for f in base.__dataclass_fields__}, "n_expert": n_expert, "n_expert_used": n_used,
        "n_ff_exp": _int(config, FAMILY, "moe_intermediate_size"), "n_expert_shared": _int(config, FAMILY, "n_shared_experts"),
        "n_dense_lead": n_dense, "weights_norm": _bool(config, FAMILY, "norm_topk_prob"),
        "weights_scale": _float(config, FAMILY, "routed_scaling_factor"), "n_group": groups[0], "n_group_used": groups[1],
    })


QK_NORM_RULES: tuple[Rule, ...] = (  # RMS norm per head on queries and keys, before rope
    _p("model.layers.{bid}.self_attn.q_norm.weight", T.ATTN_Q_NORM, Role.NORM, lambda h: (h.head_dim,)),
    _p("model.layers.{bid}.self_attn.k_norm.weight", T.ATTN_K_NORM, Role.NORM, lambda h: (h.head_dim,)),
)


def rules(names: list[str]) -> tuple[Rule, ...]:
    moe = tuple(dataclasses.replace(r, optional=True) for r in moe_rules(names, lambda h: h.n_ff_exp))  # MoE blocks only: check() says which
    # llama.cpp's dots1 graph always reads ``output``: a tied checkpoint gets the embeddings again
    return (NEOX_ATTENTION_RULES + QK_NORM_RULES + DENSE_RULES + moe + (SCORE_BIAS_RULE,) + SHARED_RULES
            + head_rules(names, always_output=True))


_SHEXP = (T.FFN_GATE_SHEXP, T.FFN_UP_SHEXP, T.FFN_DOWN_SHEXP)


def check_block_kinds(h: Any, tensors: list[OutTensor], key: str, shared_key: str = "n_shared_experts",
                      bias_hf: str = _HF_NAME[T.FFN_EXP_PROBS_B], empty_shared: bool = False) -> None:
    """Dense blocks before ``h.n_dense_lead`` (config.json ``key``), MoE blocks (with their selection bias, and shared
    experts unless config.json ``shared_key`` is 0) from it on: each tensor where it belongs, none missing.  ``empty_shared``:
    transformers builds a zero-width shared MLP when ``shared_key`` is 0 (GLM-4.5), whose empty tensors are no shared expert."""
    have = {t.name for t in tensors}
    sizes = {t.name: math.prod(t.shape) for t in tensors}
    kinds = _block_kinds(h)
    kinds[T.FFN_EXP_PROBS_B] = kinds[T.FFN_GATE_INP]
    for bid in range(h.n_layer):
        for base, wanted in kinds.items():
            name = base.replace("{bid}", str(bid)) + (".bias" if base == T.FFN_EXP_PROBS_B else ".weight")
            hf = f"model.layers.{bid}.{bias_hf if base == T.FFN_EXP_PROBS_B else _HF_NAME[base]}"
            kind = "dense" if bid < h.n_dense_lead else "a MoE block"
            if base in _SHEXP and not h.n_expert_shared:
                if name in have and not (empty_shared and not sizes[name]):
                    raise CheckpointError(f"checkpoint: tensor {hf!r} is in block {bid}, but config.json {shared_key} = 0 (no shared experts); "
                                          "fix: use the config.json that belongs to these weights")
            elif wanted(bid) and name not in have:
                raise CheckpointError(f"checkpoint: tensor {hf!r} is missing (config.json {key} = {h.n_dense_lead} makes block {bid} {kind}); "
                                      "fix: re-download the checkpoint, or use the config.json that belongs to these weights")
            elif not wanted(bid) and name in have:
                raise CheckpointError(f"checkpoint: tensor {hf!r} is in block {bid}, which config.json {key} = {h.n_dense_lead} makes {kind}; "
                                      "fix: use the config.json that belongs to these weights")


def check(h: Dots1Hparams, tensors: list[OutTensor]) -> None:
    output = next((t for t in tensors if t.name == T.OUTPUT + ".weight"), None)
    if output is not None and output.sources[0].name == "model.embed_tokens.weight" and not h.tie_embeddings:
        raise CheckpointError("checkpoint: tensor 'lm_head.weight' is missing and config.json tie_word_embeddings is false; fix: re-download the shard holding lm_head.weight")
    check_block_kinds(h, tensors, "first_k_dense_replace")
    _check_common(h, tensors)


def metadata(h: Dots1Hparams) -> dict[str, MetaValue]:
    K, V = gguf_spec.Keys, gguf_spec.GGUFValueType
    u32 = lambda v: MetaValue(int(v), V.UINT32)  # noqa: E731
    md = _common_metadata(h, ARCH)
    md.update({
        K.LLM.LEADING_DENSE_BLOCK_COUNT.format(arch=ARCH): u32(h.n_dense_lead),
        K.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=ARCH): u32(h.n_ff_exp),
        K.LLM.EXPERT_SHARED_COUNT.format(arch=ARCH): u32(h.n_expert_shared),
        # routing: every key, always (llama.cpp aborts on a dots1 file without expert_gating_func)
        **routing_metadata(h, ARCH, "sigmoid"),
    })
    return md


ROUTING = Routing(scoring="sigmoid", normalize_top_k=True, score_bias=True, group_limited=False, weights_scaled=True,
                  per_checkpoint=("normalize_top_k", "group_limited"))
NOTES = (
    "routing: sigmoid, selection by score + e_score_correction_bias (exp_probs_b) within the best topk_group groups, top-k renormalised "
    "when norm_topk_prob, times routed_scaling_factor; expert_gating_func is always written (llama.cpp aborts without it)",
)

CONVERTER = register(Converter(
    model_type=MODEL_TYPE, arch=ARCH, hparams=hparams, rules=rules, metadata=metadata, check=check, ignore=IGNORE,
    hf_architectures=("Dots1ForCausalLM",), routing=ROUTING, notes=NOTES,
    # --format bnb: experts under mlp.experts.{xid}, router mlp.gate (its e_score_correction_bias buffer kept under its own key)
    hf_experts=MLP_EXPERTS,
))
