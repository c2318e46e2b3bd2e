"""``model_type: minimax_m2``: MiniMax-M2 / M2.1 checkpoints -> GGUF arch ``minimax-m2``.

The references: transformers 5.23's ``modeling_minimax_m2.py`` (what a checkpoint computes), the
vendored llama.cpp's ``conversion/minimax.py`` (``MiniMaxM2Model``) and ``src/models/minimax-m2.cpp``.

Attention
    RMS norms over the whole query and key projections (``attn_q_norm`` of ``heads * head_dim``
    values, ``attn_k_norm`` of the KV width, OLMoE's rows), before the heads are split; NeoX rotary
    embeddings on the first ``rotary_dim`` dimensions of each head only (``partial_rotary_factor``
    in transformers 5's ``rope_parameters``, else ``rotary_dim / head_dim``: ``rope.dimension_count``),
    so q/k rows are written as they are; grouped-query attention.
Experts
    every block is a MoE block: the router ``block_sparse_moe.gate`` and experts
    ``block_sparse_moe.experts.{xid}.w1 / w3 / w2`` (gate / up / down) as MiniMax publishes them, or
    transformers 5's fused ``mlp.gate`` / ``mlp.experts.gate_up_proj`` / ``down_proj``; the experts are
    ``intermediate_size`` wide (llama.cpp reads ``feed_forward_length`` for them).
Routing (every key written from what transformers computes)
    sigmoid scores; experts chosen by score + ``e_score_correction_bias`` (``exp_probs_b.bias``, which
    llama.cpp requires); the chosen experts' unbiased scores always renormalised, never scaled
    (llama.cpp's graph hard-codes both).  ``expert_gating_func`` sigmoid is always written: llama.cpp
    aborts the process on a minimax-m2 file without it (its converter writes it only when config.json
    has ``scoring_func``).
Refused
    a ``scoring_func`` other than sigmoid or ``use_routing_bias: false`` (transformers ignores both
    and computes sigmoid with the bias; MiniMax's own code would not), a partial rotary size that is
    not an even number of dimensions within the head, rope scaling other than default / linear / yarn,
    an activation other than SiLU.  A rope type transformers computes (llama3, dynamic, longrope, ...) is llama.cpp's limit
    only (:func:`~quantkit.converters.llama.llama_cpp_limit`): ``--format bnb`` exports it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from quantkit.converters import Converter, HfExperts, Routing, register
from quantkit.converters._deepseek import GATING_FUNC
from quantkit.converters.dots1 import with_class_defaults
from quantkit.converters.llama import IGNORE, NEOX_ATTENTION_RULES, TRANSFORMERS_ROPE_TYPES, T, Hparams, _get, head_rules, llama_cpp_limit, moe_counts
from quantkit.converters.llama import check_hparams as _check_common
from quantkit.converters.llama import metadata as _common_metadata
from quantkit.converters.mixtral import FUSED_RULES, PER_EXPERT_RULES
from quantkit.converters.olmoe import QK_NORM_RULES
from quantkit.errors import CheckpointError
from quantkit.format import gguf_spec
from quantkit.format.gguf_write import MetaValue
from quantkit.hf.checkpoint import shown
from quantkit.hf.mapping import OutTensor, Role, Rule

MODEL_TYPE = "minimax_m2"
ARCH = "minimax-m2"  # gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MINIMAXM2]
#: MiniMaxM2Config's defaults for the keys :class:`Hparams` reads with defaults of its own (rope_theta: its default_theta)
HPARAM_DEFAULTS = dict(max_position_embeddings=196608, num_key_value_heads=8, head_dim=128, rope_theta=5000000.0)
SUPPORTED_ROPE = ("default", "linear", "yarn")  # llama3's rope_freqs are not read by this graph
_NOT_READ = ("num_local_experts", "num_experts", "sliding_window")  # read below / not read by transformers' MiniMaxM2 (no sliding layers)


@dataclass(frozen=True)
class MiniMaxM2Hparams(Hparams):
    n_rot: int = 0  # rotary dimensions of each head (rope.dimension_count)


def _refuse(key: str, value: object, why: str, fix: str) -> CheckpointError:
    return CheckpointError(f"config.json: {key} = {shown(value)}: {why}; fix: {fix}")


def _rotary_dims(config: dict[str, Any], h: Hparams) -> int:
    """The rotated dimensions per head, as transformers' MiniMaxM2Config resolves them: ``rope_parameters.partial_rotary_factor``,
    else a top-level ``partial_rotary_factor``, else ``rotary_dim / head_dim``; ``int(head_dim * factor)``."""
    key = next((k for k in ("rope_parameters", "rope_scaling") if isinstance(config.get(k), dict) and config[k].get("partial_rotary_factor") is not None), None)
    if key is not None:
        shown_key, factor = f"{key}.partial_rotary_factor", config[key]["partial_rotary_factor"]
    elif config.get("partial_rotary_factor") is not None:
        shown_key, factor = "partial_rotary_factor", config["partial_rotary_factor"]
    elif config.get("rotary_dim") is not None:
        n_rot = _get(config, "rotary_dim", int)
        return _check_rot(n_rot, h, "rotary_dim", n_rot)
    else:
        return h.head_dim
    factor = _get({shown_key: factor}, shown_key, float)
    return _check_rot(int(h.head_dim * factor), h, shown_key, factor)


def _check_rot(n_rot: int, h: Hparams, key: str, value: object) -> int:
    if not 2 <= n_rot <= h.head_dim or n_rot % 2:
        raise _refuse(key, value, f"rotates {n_rot} of the head_dim = {h.head_dim} dimensions of each head; rotary embeddings need an even number "
                      "of at least 2 and at most head_dim", "restore the original value")
    return n_rot


def _check_routing_keys(config: dict[str, Any]) -> None:
    """Keys transformers ignores but MiniMax's own (remote) code reads: refused where they say otherwise."""
    func = config.get("scoring_func")
    if func is not None and func != "sigmoid":
        raise _refuse("scoring_func", func, "transformers' MiniMaxM2 router always scores experts with sigmoid (it ignores this key), while MiniMax's "
                      "own code would use the config's function", "none: the checkpoint's two references disagree")
    bias = config.get("use_routing_bias")
    if bias is not None and bias is not True:
        raise _refuse("use_routing_bias", bias, "transformers' MiniMaxM2 router always adds e_score_correction_bias to the scores it selects by "
                      "(it ignores this key), while MiniMax's own code would not", "none: the checkpoint's two references disagree")


def hparams(config: dict[str, Any]) -> MiniMaxM2Hparams:
    base = Hparams.from_config(with_class_defaults({k: v for k, v in config.items() if k not in _NOT_READ}, HPARAM_DEFAULTS))
    _check_routing_keys(config)
    n_expert, n_used = moe_counts(config)
    if base.rope_type not in SUPPORTED_ROPE:
        error = _refuse("rope_parameters.rope_type", base.rope_type, f"llama.cpp's minimax-m2 graph computes {', '.join(SUPPORTED_ROPE)} rotary embeddings only",
                        "use the original config.json")
        if base.rope_type not in TRANSFORMERS_ROPE_TYPES:  # transformers cannot build it either
            raise error
        llama_cpp_limit(error)
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    return MiniMaxM2Hparams(**{**fields, "n_expert": n_expert, "n_expert_used": n_used, "n_rot": _rotary_dims(config, base)})


#: the selection bias: 1-D, F32 like every vector (transformers keeps it beside the router, not in it)
SCORE_BIAS_RULES = {
    False: Rule("model.layers.{bid}.block_sparse_moe.e_score_correction_bias", T.FFN_EXP_PROBS_B + ".bias", Role.ROUTER, lambda h: (h.n_expert,)),
    True: Rule("model.layers.{bid}.mlp.e_score_correction_bias", T.FFN_EXP_PROBS_B + ".bias", Role.ROUTER, lambda h: (h.n_expert,)),
}


def rules(names: list[str]) -> tuple[Rule, ...]:
    fused = any(n.endswith(".mlp.experts.gate_up_proj") for n in names)
    # llama.cpp's minimax-m2 graph always reads ``output``: a tied checkpoint gets the embeddings again
    return (NEOX_ATTENTION_RULES + QK_NORM_RULES + (FUSED_RULES if fused else PER_EXPERT_RULES) + (SCORE_BIAS_RULES[fused],)
            + head_rules(names, always_output=True))


def check(h: MiniMaxM2Hparams, tensors: list[OutTensor]) -> None:
    output = next((t for t in tensors if t.name == T.OUTPUT + ".weight"), None)
    if output is not None and output.sources[0].name == "model.embed_tokens.weight" and not h.tie_embeddings:
        raise CheckpointError("checkpoint: tensor 'lm_head.weight' is missing and config.json tie_word_embeddings is false; fix: re-download the shard holding lm_head.weight")
    # a rope type beyond llama.cpp's got here only passed over by hparams() (llama_cpp_limit, a bnb export): not judged again
    _check_common(h if h.rope_type in SUPPORTED_ROPE else dataclasses.replace(h, rope={}), tensors)


def metadata(h: MiniMaxM2Hparams) -> dict[str, MetaValue]:
    K, V = gguf_spec.Keys, gguf_spec.GGUFValueType
    md = _common_metadata(h, ARCH)  # feed_forward_length: the experts' width (llama.cpp sizes ffn_*_exps by it)
    md[K.Rope.DIMENSION_COUNT.format(arch=ARCH)] = MetaValue(h.n_rot, V.UINT32)
    md[K.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=ARCH)] = MetaValue(h.n_ff, V.UINT32)
    # routing: llama.cpp aborts on a minimax-m2 file without expert_gating_func; renormalisation is hard-coded in its graph
    md[K.LLM.EXPERT_GATING_FUNC.format(arch=ARCH)] = MetaValue(GATING_FUNC["sigmoid"], V.UINT32)
    return md


ROUTING = Routing(scoring="sigmoid", normalize_top_k=True, score_bias=True)
NOTES = ("routing: sigmoid, selection by score + e_score_correction_bias (exp_probs_b), top-k renormalised; expert_gating_func is always "
         "written (llama.cpp aborts without it)",)

CONVERTER = register(Converter(
    model_type=MODEL_TYPE, arch=ARCH, hparams=hparams, rules=rules, metadata=metadata, check=check, ignore=IGNORE,
    hf_architectures=("MiniMaxM2ForCausalLM",), routing=ROUTING, notes=NOTES,
    # --format bnb: MiniMax's per-expert keys (w1 gate, w3 up, w2 down) under block_sparse_moe, held by transformers 5 under mlp; the
    # selection bias (a buffer) beside the router
    hf_experts=HfExperts(
        router="model.layers.{bid}.block_sparse_moe.gate.weight",
        gate="model.layers.{bid}.block_sparse_moe.experts.{xid}.w1.weight",
        up="model.layers.{bid}.block_sparse_moe.experts.{xid}.w3.weight",
        down="model.layers.{bid}.block_sparse_moe.experts.{xid}.w2.weight",
        block="model.layers.{bid}.mlp",
        moved=(("model.layers.{bid}.block_sparse_moe.e_score_correction_bias", "model.layers.{bid}.mlp.e_score_correction_bias"),),
    ),
))
