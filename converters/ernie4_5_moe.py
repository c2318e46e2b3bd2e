"""``model_type: ernie4_5_moe``: Baidu ERNIE-4.5 MoE checkpoints (ERNIE-4.5-21B-A3B-PT, -300B-A47B-PT) -> GGUF arch ``ernie4_5-moe``.

The references: transformers 5.23's ``modeling_ernie4_5_moe.py`` (what a checkpoint computes), the
vendored llama.cpp's ``conversion/ernie.py`` (``Ernie4_5MoeModel``) and ``src/models/ernie4-5-moe.cpp``
(loader in ``src/models/ernie4-5.cpp``).

Attention
    rotary embeddings on interleaved pairs (transformers' Ernie ``rotate_half`` takes even / odd
    dimensions), which is llama.cpp's normal rope for this arch: q/k rows are written as they are;
    grouped-query attention; no q/k norms.
Blocks
    ``moe_layer_start_index`` leading dense blocks (``ffn_gate/up/down``, ``intermediate_size`` wide:
    ``leading_dense_block_count``), then MoE blocks to the last one (``interleave_moe_layer_step`` 1):
    the router ``mlp.gate``, routed experts of ``moe_intermediate_size`` (per-expert keys or
    transformers 5's fused ``gate_up_proj`` / ``down_proj``), ``moe_num_shared_experts`` shared experts
    fused into one always-on MLP (``ffn_*_shexp``, ``moe_intermediate_size * moe_num_shared_experts``
    wide: ``expert_shared_feed_forward_length``, written as transformers sizes it; llama.cpp's converter
    derives it from ``intermediate_size / num_key_value_heads``, which is only right for the published
    sizes).  Tied embeddings (the config class's default) leave ``output`` out: the graph reads
    ``token_embd`` then.
Routing
    softmax scores; experts chosen by score + ``moe_statics.e_score_correction_bias`` ([1, experts],
    written 1-D as ``exp_probs_b.bias``); the chosen experts' unbiased scores renormalised.  llama.cpp's
    graph hard-codes softmax and the renormalisation: no routing key to write but the bias tensor.
Dropped
    the multi-token-prediction tensors (``model.mtp_*``): transformers ignores them, llama.cpp's converter
    drops them.
Refused (llama.cpp would compute something else)
    MoE blocks that are not all the blocks from ``moe_layer_start_index`` on (``moe_layer_interval``
    other than 1, ``moe_layer_end_index`` before the last block: llama.cpp loads every block from the
    dense count on as a MoE block); ``use_bias`` (the graph has no projection or MLP biases); a
    ``moe_norm_min`` above the smallest possible top-k weight sum (transformers would then divide by it,
    llama.cpp by the sum); rope scaling other than default / linear / yarn; an activation other than SiLU.
    ``use_bias``, ``moe_norm_min`` and a rope type transformers computes (llama3, dynamic, longrope, ...) are llama.cpp's
    limits only (:func:`~quantkit.converters.llama.llama_cpp_limit`): ``--format bnb`` exports them.  For it the name table maps
    the biases ``use_bias`` adds (``BIAS_RULES``: q/k/v/o, the dense and shared MLPs, ``lm_head``; never the routed experts),
    and :func:`check_biases` requires every one of them with ``use_bias`` and none without.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from quantkit.converters import MLP_EXPERTS, Converter, Routing, register
from quantkit.converters._deepseek import DENSE_RULES, SHARED_RULES, Family, _bool, _int, _raw, _refuse
from quantkit.converters.dots1 import check_block_kinds, with_class_defaults
from quantkit.converters.llama import (IGNORE, LLAMA_MAX_EXPERTS, NEOX_ATTENTION_RULES, TRANSFORMERS_ROPE_TYPES, T, Hparams, _get, head_rules,
                                       llama_cpp_limit, moe_rules)
from quantkit.converters.llama import check_hparams as _check_common
from quantkit.converters.llama import metadata as _common_metadata
from quantkit.errors import CheckpointError
from quantkit.format import gguf_spec
from quantkit.format.gguf_write import MetaValue
from quantkit.hf.checkpoint import shown
from quantkit.hf.mapping import OutTensor, Role, Rule, Transform

MODEL_TYPE = "ernie4_5_moe"
ARCH = "ernie4_5-moe"  # gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.ERNIE4_5_MOE]
#: gguf.Keys.LLM.INTERLEAVE_MOE_LAYER_STEP (not in quantkit.format.gguf_spec yet; pinned to gguf-py by tests/test_ernie4_5_moe.py)
INTERLEAVE_MOE_LAYER_STEP = "{arch}.interleave_moe_layer_step"
#: Ernie4_5_MoeConfig's defaults for the keys :class:`Hparams` reads with defaults of its own (rope_theta: its default_theta)
HPARAM_DEFAULTS = dict(max_position_embeddings=131072, rms_norm_eps=1e-5, num_key_value_heads=4, rope_theta=500000.0)
SUPPORTED_ROPE = ("default", "linear", "yarn")  # llama3's rope_freqs are not read by this graph
#: Ernie4_5_MoeConfig's defaults for the keys read without requiring them (transformers 5.23)
DEFAULTS = dict(moe_num_experts=64, moe_k=6, moe_intermediate_size=1536, moe_num_shared_experts=2, moe_layer_start_index=1,
                moe_layer_end_index=-1, moe_layer_interval=1, moe_norm_min=1e-12, use_bias=False, tie_word_embeddings=True)
FAMILY = Family(model_type=MODEL_TYPE, gating="softmax", defaults=DEFAULTS,
                aliases={"moe_num_experts": ("num_experts",), "moe_k": ("num_experts_per_tok",)})
#: read below, or not in transformers' Ernie4_5_Moe (no sliding window)
_NOT_READ = ("num_local_experts", "num_experts", "num_experts_per_tok", "sliding_window", "tie_word_embeddings")


@dataclass(frozen=True)
class ErnieMoeHparams(Hparams):
    n_ff_exp: int = 0  # moe_intermediate_size: one routed expert's width
    n_expert_shared: int = 0  # moe_num_shared_experts: the shared MLP is n_ff_exp * n_expert_shared wide (none at 0)
    n_dense_lead: int = 0  # moe_layer_start_index
    use_bias: bool = False  # biases on the attention projections, dense and shared MLPs and lm_head (a bnb export only)


def _moe_blocks(config: dict[str, Any], n_layer: int) -> int:
    """The leading dense block count, when transformers' MoE blocks are exactly the blocks from it to the last (llama.cpp's layout)."""
    start = _int(config, FAMILY, "moe_layer_start_index", positive=False)
    end = _raw(config, FAMILY, "moe_layer_end_index")
    if end is None or end == -1:
        end = n_layer - 1
    elif not isinstance(end, int) or isinstance(end, bool):
        raise CheckpointError(f"config.json: key 'moe_layer_end_index' = {shown(end)}, expected an integer; fix: restore the original value")
    interval = _int(config, FAMILY, "moe_layer_interval")
    moe = [i for i in range(n_layer) if (i + 1) % interval == 0 and start <= i <= end]
    if not moe:
        raise _refuse("moe_layer_start_index / moe_layer_end_index / moe_layer_interval", [start, end, interval],
                      f"every one of the {n_layer} blocks would be dense (no MoE block)", "restore the original values")
    if moe != list(range(start, n_layer)):
        raise _refuse("moe_layer_start_index / moe_layer_end_index / moe_layer_interval", [start, end, interval],
                      f"transformers makes blocks {moe[:8]} MoE blocks, while llama.cpp's ernie4_5-moe graph makes every block from "
                      f"moe_layer_start_index = {start} on a MoE block", "none with this llama.cpp: only checkpoints whose MoE blocks run to the "
                      "last block (moe_layer_interval = 1, moe_layer_end_index = -1 or the last block: every published ERNIE-4.5 MoE) convert")
    return start


def hparams(config: dict[str, Any]) -> ErnieMoeHparams:
    base = Hparams.from_config(with_class_defaults({k: v for k, v in config.items() if k not in _NOT_READ}, HPARAM_DEFAULTS))
    use_bias = _bool(config, FAMILY, "use_bias")
    if use_bias:
        llama_cpp_limit(_refuse("use_bias", True, "transformers then adds biases to every projection and MLP, which llama.cpp's ernie4_5-moe graph does not",
                                "none: such a model cannot run in this llama.cpp"))
    if base.rope_type not in SUPPORTED_ROPE:
        error = _refuse("rope_parameters.rope_type", base.rope_type, f"llama.cpp's ernie4_5-moe graph computes {', '.join(SUPPORTED_ROPE)} rotary "
                        "embeddings only", "use the original config.json")
        if base.rope_type not in TRANSFORMERS_ROPE_TYPES:  # transformers cannot build it either
            raise error
        llama_cpp_limit(error)
    n_expert, n_used = _int(config, FAMILY, "moe_num_experts"), _int(config, FAMILY, "moe_k")
    if not 1 <= n_used <= n_expert:
        raise _refuse("moe_k", n_used, f"expected 1..moe_num_experts = {n_expert}", "restore the original config.json")
    if n_expert > LLAMA_MAX_EXPERTS:
        raise _refuse("moe_num_experts", n_expert, f"more than the {LLAMA_MAX_EXPERTS} experts llama.cpp supports (it aborts loading such a file)", "none with this llama.cpp")
    norm_min = _get({"moe_norm_min": _raw(config, FAMILY, "moe_norm_min")}, "moe_norm_min", float, 0.0, positive=False)
    if norm_min > n_used / n_expert:  # the top-k of a softmax sum to at least k / E: below that, the floor never applies
        llama_cpp_limit(_refuse("moe_norm_min", norm_min, f"transformers divides the top-k weights by at least moe_norm_min, more than the smallest sum they "
                                f"can have ({n_used}/{n_expert}), while llama.cpp's graph divides by their sum", "restore the original value (1e-12)"))
    tie = _bool(config, FAMILY, "tie_word_embeddings")
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    return ErnieMoeHparams(**{
        **fields, "tie_embeddings": tie, "n_expert": n_expert, "n_expert_used": n_used,
        "n_ff_exp": _int(config, FAMILY, "moe_intermediate_size"), "n_expert_shared": _int(config, FAMILY, "moe_num_shared_experts", positive=False),
        "n_dense_lead": _moe_blocks(config, base.n_layer), "use_bias": use_bias,
    })


@dataclass(frozen=True)
class Flatten(Transform):
    """``moe_statics.e_score_correction_bias`` [1, experts] -> the 1-D ``exp_probs_b`` [experts] llama.cpp declares."""

    def out_shape(self, shape: tuple[int, ...], hparams: object) -> tuple[int, ...]:
        return (int(np.prod(shape)),)

    def apply(self, a: np.ndarray, hparams: object) -> np.ndarray:
        return np.ascontiguousarray(a).reshape(-1)


FLATTEN = Flatten("flatten")
#: the selection bias ([1, experts], kept in float32 by transformers): beside the router in ERNIE's own layout, inside it in transformers 5's
SCORE_BIAS_RULES = {
    False: Rule("model.layers.{bid}.mlp.moe_statics.e_score_correction_bias", T.FFN_EXP_PROBS_B + ".bias", Role.ROUTER, lambda h: (1, h.n_expert),
                FLATTEN, optional=True),
    True: Rule("model.layers.{bid}.mlp.gate.moe_statics.e_score_correction_bias", T.FFN_EXP_PROBS_B + ".bias", Role.ROUTER, lambda h: (1, h.n_expert),
               FLATTEN, optional=True),
}
#: multi-token-prediction tensors (model.mtp_block.N..., mtp_emb_norm, mtp_hidden_norm, mtp_linear_proj): transformers ignores them
IGNORE_MTP = IGNORE + (r"^model\.mtp_",)


def _bias_rule(weight: Rule) -> Rule:
    """``weight``'s ``nn.Linear`` bias (``use_bias``): 1-D, one value per output row; check() says whether it must be there."""
    return Rule(weight.hf.removesuffix(".weight") + ".bias", weight.gguf.removesuffix(".weight") + ".bias", weight.role,
                lambda h: weight.shape(h)[:1], optional=True)


_LINEAR_GGUF = (T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.FFN_GATE, T.FFN_UP, T.FFN_DOWN, T.FFN_GATE_SHEXP, T.FFN_UP_SHEXP, T.FFN_DOWN_SHEXP)
#: the biases transformers' Ernie4_5_Moe adds with use_bias (attention, dense and shared MLPs, lm_head: never the routed experts or the
#: router); llama.cpp's graph has none, so only a bnb export gets past hparams() with them
BIAS_RULES: tuple[Rule, ...] = (
    *(_bias_rule(r) for r in NEOX_ATTENTION_RULES + DENSE_RULES + SHARED_RULES if r.gguf.removesuffix(".weight") in _LINEAR_GGUF),
    Rule("lm_head.bias", T.OUTPUT + ".bias", Role.OUTPUT, lambda h: (h.n_vocab,), optional=True),
)


def rules(names: list[str]) -> tuple[Rule, ...]:
    fused = any(n.endswith(".mlp.experts.gate_up_proj") for n in names)
    moe = tuple(dataclasses.replace(r, optional=True) for r in moe_rules(names, lambda h: h.n_ff_exp))  # MoE blocks only: check() says which
    return NEOX_ATTENTION_RULES + DENSE_RULES + moe + (SCORE_BIAS_RULES[fused],) + SHARED_RULES + head_rules(names) + BIAS_RULES


#: GGUF kind ("attn_q") -> the HF key of its bias
_BIAS_HF = {r.gguf.split(".")[2]: r.hf for r in BIAS_RULES if r.gguf.startswith("blk.")}


def check_biases(h: ErnieMoeHparams, tensors: list[OutTensor]) -> None:
    """With use_bias every attention projection, dense or shared MLP projection and lm_head has its bias; without, none."""
    biases = {t.name: t.sources[0].name for t in tensors if t.sources and t.sources[0].name.endswith(".bias")}
    if not h.use_bias:
        if biases:
            raise CheckpointError(f"checkpoint: tensor {min(biases.values())!r} is a bias, but config.json use_bias is false (transformers would not "
                                  "load it); fix: use the config.json that belongs to these weights")
        return
    missing = ["lm_head.bias"] if T.OUTPUT + ".bias" not in biases else []
    for t in tensors:
        part = t.name.split(".")
        if part[0] == "blk" and part[-1] == "weight" and part[2] in _BIAS_HF and t.name.removesuffix(".weight") + ".bias" not in biases:
            missing.append(_BIAS_HF[part[2]].replace("{bid}", part[1]))
    if missing:
        raise CheckpointError(f"checkpoint: tensor {min(missing)!r} is missing (config.json use_bias = true); fix: re-download the checkpoint, "
                              "or use the config.json that belongs to these weights")


def check(h: ErnieMoeHparams, tensors: list[OutTensor]) -> None:
    fused = any(s.name.endswith(".mlp.experts.gate_up_proj") for t in tensors for s in t.sources)
    bias = f"mlp.{'gate.' if fused else ''}moe_statics.e_score_correction_bias"
    check_block_kinds(h, tensors, "moe_layer_start_index", shared_key="moe_num_shared_experts", bias_hf=bias)
    check_biases(h, tensors)
    # a rope type beyond llama.cpp's got here only passed over by hparams() (llama_cpp_limit, a bnb export): not judged again
    _check_common(h if h.rope_type in SUPPORTED_ROPE else dataclasses.replace(h, rope={}), tensors)


def metadata(h: ErnieMoeHparams) -> dict[str, MetaValue]:
    K, V = gguf_spec.Keys, gguf_spec.GGUFValueType
    u32 = lambda v: MetaValue(int(v), V.UINT32)  # noqa: E731
    md = _common_metadata(h, ARCH)  # feed_forward_length: the dense blocks' width
    md.update({
        K.LLM.LEADING_DENSE_BLOCK_COUNT.format(arch=ARCH): u32(h.n_dense_lead),
        INTERLEAVE_MOE_LAYER_STEP.format(arch=ARCH): u32(1),  # required by llama.cpp's loader; every block from the dense count on is MoE
        K.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=ARCH): u32(h.n_ff_exp),
        K.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH.format(arch=ARCH): u32(h.n_ff_exp * h.n_expert_shared),  # 0: no shared expert
    })
    return md


ROUTING = Routing(scoring="softmax", normalize_top_k=True, score_bias=True)
NOTES = (
    "routing: softmax, selection by score + moe_statics.e_score_correction_bias (exp_probs_b), top-k renormalised (hard-coded in llama.cpp's graph)",
    "multi-token-prediction tensors (model.mtp_*) are dropped, as transformers and llama.cpp's converter drop them",
)

CONVERTER = register(Converter(
    model_type=MODEL_TYPE, arch=ARCH, hparams=hparams, rules=rules, metadata=metadata, check=check, ignore=IGNORE_MTP,
    hf_architectures=("Ernie4_5_MoeForCausalLM",), routing=ROUTING, notes=NOTES,
    # --format bnb: experts under mlp.experts.{xid}, router mlp.gate (float32 in transformers); the selection bias is stored as ERNIE
    # publishes it (mlp.moe_statics.*) and held by transformers 5 inside the router (mlp.gate.moe_statics.*, a float32 parameter)
    hf_experts=dataclasses.replace(MLP_EXPERTS, moved=(("model.layers.{bid}.mlp.moe_statics.e_score_correction_bias",
                                                       "model.layers.{bid}.mlp.gate.moe_statics.e_score_correction_bias"),)),
))
