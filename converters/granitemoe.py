"""``model_type: granitemoe``: IBM Granite 3.x MoE checkpoints (granite-3.1-3b-a800m, ...) -> GGUF arch ``granitemoe``.

What differs from Mixtral (llama.cpp's ``src/models/granite.cpp``, whose graph
``granite-moe.cpp`` reuses, and transformers' ``modeling_granitemoe.py``):

* four scalar multipliers, written as the keys llama.cpp's granite loader reads:
  ``embedding_multiplier`` -> ``embedding_scale`` (token embeddings scaled),
  ``residual_multiplier`` -> ``residual_scale`` (attention and MoE outputs scaled
  before each residual add), ``attention_multiplier`` -> ``attention.scale`` (the
  attention scale itself, instead of 1/sqrt(head_dim)) and ``logits_scaling`` ->
  ``logit_scale`` (logits divided by it).  Each is written even when config.json
  leaves it out: transformers then uses 1.0, while llama.cpp reads a missing
  ``attention.scale`` as 1/sqrt(head_dim) and requires ``logit_scale``.  A value
  of 0 is refused: llama.cpp reads 0 as "no scaling" (and 1/sqrt(head_dim) for the
  attention scale), transformers multiplies by it.
* experts stored fused, as the JetMoE-style parallel experts:
  ``block_sparse_moe.input_linear.weight [E, 2*F, H]`` (first half gate, second
  half up: transformers ``chunk(2)``s it and gates with the first) and
  ``block_sparse_moe.output_linear.weight [E, H, F]``, the router
  ``block_sparse_moe.router.layer.weight``.  transformers 5 loads these under
  ``block_sparse_moe.experts.gate_up_proj`` / ``experts.down_proj`` /
  ``router.weight`` and writes those names with ``save_original_format=False``;
  both layouts are read (same shapes).
* Llama's rotary layout (llama.cpp's normal rope for granite): q/k rows permuted
  as for llama; ``head_dim`` may differ from hidden_size / heads (transformers
  honours it, and so does the file: key/value/rope lengths are written).
* optional attention biases (``attention_bias: true``), which llama.cpp's granite
  graph adds (``attn_{q,k,v,output}.bias``; q/k biases permuted like their rows).
  A config that says ``attention_bias`` and weights that disagree are refused.

Routing: transformers takes the top-k router logits and softmaxes over them;
llama.cpp's granite graph softmaxes over all experts, takes the top k and
renormalises them: the same weights.  No config key changes this.

Refused: an activation other than SiLU (the graph gates experts with SiLU) and a
multiplier of 0.  ``sliding_window``, should config.json hold one, is not written:
transformers' GraniteMoe has no sliding window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from quantkit.format import gguf_spec
from quantkit.hf.checkpoint import shown
from quantkit.converters import Converter, HfExperts, Routing, register
from quantkit.converters.llama import BASE_RULES, HEAD_RULES, IGNORE, T, Hparams, _get, _p, generated_tensors
from quantkit.converters.llama import check_hparams as _check_common
from quantkit.converters.llama import metadata as _common_metadata
from quantkit.errors import CheckpointError
from quantkit.format.gguf_write import MetaValue
from quantkit.hf.mapping import OutTensor, Role, Rule, Transform

MODEL_TYPE = "granitemoe"
ARCH = "granitemoe"  # gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GRANITE_MOE]; granitemoeshared writes it too

#: GGUF keys llama.cpp's granite loader reads
KEY_EMBEDDING_SCALE = gguf_spec.Keys.LLM.EMBEDDING_SCALE
KEY_RESIDUAL_SCALE = gguf_spec.Keys.LLM.RESIDUAL_SCALE
KEY_LOGIT_SCALE = gguf_spec.Keys.LLM.LOGIT_SCALE
KEY_ATTENTION_SCALE = gguf_spec.Keys.Attention.SCALE

#: config.json key -> the GGUF key it becomes (every one defaults to 1.0 in transformers)
MULTIPLIERS: dict[str, str] = {
    "embedding_multiplier": KEY_EMBEDDING_SCALE,
    "residual_multiplier": KEY_RESIDUAL_SCALE,
    "attention_multiplier": KEY_ATTENTION_SCALE,
    "logits_scaling": KEY_LOGIT_SCALE,
}
_WHAT_ZERO_MEANS = {
    "embedding_multiplier": "no embedding scaling",
    "residual_multiplier": "no residual scaling",
    "attention_multiplier": "the default 1/sqrt(head_dim)",
    "logits_scaling": "a division by zero",
}
_NOT_READ = ("sliding_window",)  # transformers' GraniteMoe has no sliding window


@dataclass(frozen=True)
class GraniteHparams(Hparams):
    embedding_scale: float = 1.0
    residual_scale: float = 1.0
    attention_scale: float = 1.0
    logit_scale: float = 1.0
    attention_bias: bool = False  # q/k/v/o projections with biases
    n_ff_shexp: int = 0  # shared_intermediate_size (granitemoeshared): the shared MLP's width, 0 for none


def _refuse(key: str, value: object, why: str, fix: str) -> CheckpointError:
    return CheckpointError(f"config.json: {key} = {shown(value)}: {why}; fix: {fix}")


def _multiplier(config: dict[str, Any], key: str) -> float:
    value = _get(config, key, float, 1.0, positive=False)
    if np.float32(value) == 0:  # 0, or so small that the GGUF's float32 holds 0
        raise _refuse(key, value, f"transformers multiplies by it, llama.cpp reads 0 as {_WHAT_ZERO_MEANS[key]} (the GGUF would compute something else)",
                      f"restore the original {key} (1.0 when the model does not scale)")
    return value


def hparams(config: dict[str, Any]) -> GraniteHparams:
    base = Hparams.from_config({k: v for k, v in config.items() if k not in _NOT_READ})
    n_expert = _get(config, "num_local_experts", int)
    n_used = _get(config, "num_experts_per_tok", int)
    if not 1 <= n_used <= n_expert:
        raise CheckpointError(f"config.json: num_experts_per_tok = {n_used}, expected 1..num_local_experts = {n_expert}; fix: restore the original config.json")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise _refuse("hidden_act", act, "llama.cpp's granite graph gates its experts with SiLU", 'only checkpoints with hidden_act = "silu" (every published Granite MoE) can be converted')
    bias = config.get("attention_bias", False)
    if not isinstance(bias, bool):
        raise _refuse("attention_bias", bias, "expected true or false", "restore the original value")
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    return GraniteHparams(
        **{**fields, "n_expert": n_expert, "n_expert_used": n_used},
        embedding_scale=_multiplier(config, "embedding_multiplier"),
        residual_scale=_multiplier(config, "residual_multiplier"),
        attention_scale=_multiplier(config, "attention_multiplier"),
        logit_scale=_multiplier(config, "logits_scaling"),
        attention_bias=bias,
    )


def _bias(hf: str, gguf: str, shape, transform: Transform = Transform.NONE) -> Rule:
    return Rule(hf, gguf + ".bias", Role.ATTENTION, shape, transform, optional=True)


#: llama's attention rows (q/k permuted to llama.cpp's rotary layout) with optional biases, q/k biases permuted like their rows
ATTENTION_RULES: tuple[Rule, ...] = (
    *BASE_RULES[:6],
    _bias("model.layers.{bid}.self_attn.q_proj.bias", T.ATTN_Q, lambda h: (h.n_head * h.head_dim,), Transform.PERMUTE_Q),
    _bias("model.layers.{bid}.self_attn.k_proj.bias", T.ATTN_K, lambda h: (h.n_head_kv * h.head_dim,), Transform.PERMUTE_K),
    _bias("model.layers.{bid}.self_attn.v_proj.bias", T.ATTN_V, lambda h: (h.n_head_kv * h.head_dim,)),
    _bias("model.layers.{bid}.self_attn.o_proj.bias", T.ATTN_OUT, lambda h: (h.n_embd,)),
    BASE_RULES[6],  # post_attention_layernorm
)


def _experts(gate_up: str, down: str, router: str) -> tuple[Rule, ...]:
    """Fused experts [E, 2F, H] (gate rows first) and [E, H, F]: the same shapes in both layouts."""
    p = "model.layers.{bid}.block_sparse_moe."
    return (
        _p(p + router, T.FFN_GATE_INP, Role.ROUTER, lambda h: (h.n_expert, h.n_embd)),
        _p(p + gate_up, T.FFN_GATE_EXP, Role.EXPERTS, lambda h: (h.n_expert, 2 * h.n_ff, h.n_embd), Transform.FIRST_HALF),
        _p(p + gate_up, T.FFN_UP_EXP, Role.EXPERTS, lambda h: (h.n_expert, 2 * h.n_ff, h.n_embd), Transform.SECOND_HALF),
        _p(p + down, T.FFN_DOWN_EXP, Role.EXPERTS, lambda h: (h.n_expert, h.n_embd, h.n_ff)),
    )


#: what IBM's checkpoints hold and ``save_pretrained`` writes by default
ORIGINAL_RULES = _experts("input_linear.weight", "output_linear.weight", "router.layer.weight")
#: transformers 5's own names (``save_pretrained(..., save_original_format=False)``)
TRANSFORMERS5_RULES = _experts("experts.gate_up_proj", "experts.down_proj", "router.weight")


def expert_rules(names: list[str]) -> tuple[Rule, ...]:
    t5 = any(n.endswith(".block_sparse_moe.experts.gate_up_proj") for n in names)
    return TRANSFORMERS5_RULES if t5 else ORIGINAL_RULES


def rules(names: list[str]) -> tuple[Rule, ...]:
    return ATTENTION_RULES + expert_rules(names) + HEAD_RULES


#: the bias rows ``attention_bias: true`` gives every block
BIAS_RULES = tuple(r for r in ATTENTION_RULES if r.gguf.endswith(".bias"))


def check(h: GraniteHparams, tensors: list[OutTensor]) -> None:
    have = {t.name for t in tensors if t.name.endswith(".bias")}
    if h.attention_bias:
        missing = [r.hf.format(bid=i) for i in range(h.n_layer) for r in BIAS_RULES if r.gguf.format(bid=i) not in have]
        if missing:
            raise CheckpointError(f"checkpoint: config.json attention_bias = true, but tensor {missing[0]!r} is missing; fix: re-download the checkpoint, or set attention_bias to what the weights hold")
    elif have:
        raise CheckpointError(
            f"checkpoint: attention biases are present ({sorted(have)[0]}, ...) but config.json attention_bias = false, so transformers does not use them; "
            "fix: set attention_bias to true if the model was trained with them, or remove the bias tensors"
        )
    _check_common(h, tensors)


def metadata(h: GraniteHparams) -> dict[str, MetaValue]:
    K, V = gguf_spec.Keys, gguf_spec.GGUFValueType
    md = _common_metadata(h, ARCH)
    md[KEY_ATTENTION_SCALE.format(arch=ARCH)] = MetaValue(float(h.attention_scale), V.FLOAT32)
    md[KEY_EMBEDDING_SCALE.format(arch=ARCH)] = MetaValue(float(h.embedding_scale), V.FLOAT32)
    md[KEY_RESIDUAL_SCALE.format(arch=ARCH)] = MetaValue(float(h.residual_scale), V.FLOAT32)
    md[KEY_LOGIT_SCALE.format(arch=ARCH)] = MetaValue(float(h.logit_scale), V.FLOAT32)
    if h.n_ff_shexp:
        md[K.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH.format(arch=ARCH)] = MetaValue(int(h.n_ff_shexp), V.UINT32)
    return md


#: softmax over the top-k logits (transformers) = softmax, top-k, renormalised (llama.cpp's granite graph)
ROUTING = Routing(scoring="softmax", normalize_top_k=True)

#: --format bnb: Granite checkpoints only exist fused, so each expert's 4-bit projections are named under
#: transformers 5's module path (``block_sparse_moe.experts`` beside ``block_sparse_moe.router``); the gate and
#: up halves of ``input_linear`` become ``gate_proj`` / ``up_proj`` (transformers ``chunk(2)``s gate first)
HF_EXPERTS = HfExperts(
    router="model.layers.{bid}.block_sparse_moe.router.weight",
    gate="model.layers.{bid}.block_sparse_moe.experts.{xid}.gate_proj.weight",
    up="model.layers.{bid}.block_sparse_moe.experts.{xid}.up_proj.weight",
    down="model.layers.{bid}.block_sparse_moe.experts.{xid}.down_proj.weight",
    block="model.layers.{bid}.block_sparse_moe",
    router_param="router.weight",
)

CONVERTER = register(Converter(
    model_type=MODEL_TYPE, arch=ARCH, hparams=hparams, rules=rules, metadata=metadata, check=check,
    generated=generated_tensors, ignore=IGNORE, hf_architectures=("GraniteMoeForCausalLM",), routing=ROUTING,
    hf_experts=HF_EXPERTS,
))
