"""``model_type: qwen2_moe``: Qwen1.5 / Qwen2 MoE checkpoints (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B) -> GGUF arch ``qwen2moe``.

What differs from Mixtral (llama.cpp's ``src/models/qwen2moe.cpp`` and
``conversion/qwen.py`` ``Qwen2MoeModel``, transformers' ``modeling_qwen2_moe.py``):

* biases on the query, key and value projections (``qkv_bias``, true in every
  published checkpoint) -> ``attn_q.bias`` / ``attn_k.bias`` / ``attn_v.bias``,
  1-D and F32 (llama.cpp's graph adds them when present);
* NeoX rotary embeddings (llama.cpp's ``LLAMA_ROPE_TYPE_NEOX`` for qwen2moe), so
  q/k rows are written as they are (no permutation);
* routed experts of their own width (``moe_intermediate_size`` ->
  ``expert_feed_forward_length``), stacked from ``mlp.experts.{xid}.gate_proj /
  up_proj / down_proj`` or from transformers 5's fused ``mlp.experts.gate_up_proj`` /
  ``down_proj``; the router ``mlp.gate``;
* a shared expert every token goes through (``mlp.shared_expert.gate_proj / up_proj /
  down_proj`` -> ``ffn_{gate,up,down}_shexp``, width ``shared_expert_intermediate_size``
  -> ``expert_shared_feed_forward_length``), scaled by ``sigmoid(shared_expert_gate x)``:
  ``mlp.shared_expert_gate`` [1, hidden] -> ``ffn_gate_inp_shexp``, kept F32 with the
  routers (llama.cpp's converter forces it to F32, and llama-quantize never quantises
  it: one row, ``ggml_n_dims`` 1);
* an ``output`` matrix the graph always reads: a tied checkpoint gets a copy of the
  token embeddings.

Routing: softmax over the router logits, top-k, and the top-k weights are used as
they are: llama.cpp's qwen2moe graph never renormalises them (``norm_w = false``
and no key turns it on), as transformers with ``norm_topk_prob: false`` (the
default, and every published checkpoint).  Refused, because llama.cpp would load
or compute something else: ``norm_topk_prob: true``; dense blocks
(``mlp_only_layers``, ``decoder_sparse_step`` other than 1: the graph has experts in
every block); sliding-window layers (the graph attends to the whole context); a
``head_dim`` other than ``hidden_size / num_attention_heads`` (the graph sizes
``attn_q`` / ``attn_output`` ``hidden_size`` wide); an activation other than SiLU;
``qkv_bias`` that disagrees with the bias tensors present; llama3 rope scaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantkit.format import gguf_spec
from quantkit.hf.checkpoint import shown
from quantkit.converters import MLP_EXPERTS, Converter, Routing, register
from quantkit.converters.llama import IGNORE, NEOX_ATTENTION_RULES, T, Hparams, _get, _p, head_rules, moe_counts, moe_rules
from quantkit.converters.llama import check_hparams as _check_common
from quantkit.converters.llama import metadata as _common_metadata
from quantkit.errors import CheckpointError
from quantkit.format.gguf_write import MetaValue
from quantkit.hf.mapping import OutTensor, Role, Rule

MODEL_TYPE = "qwen2_moe"
ARCH = "qwen2moe"  # gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2MOE]
#: read below, or not read by llama.cpp's qwen2moe graph (sliding_window: transformers uses it only with use_sliding_window)
_NOT_READ = ("num_local_experts", "num_experts", "sliding_window")


@dataclass(frozen=True)
class Qwen2MoeHparams(Hparams):
    n_ff_exp: int = 0  # moe_intermediate_size: one routed expert's width
    n_ff_shexp: int = 0  # shared_expert_intermediate_size: the shared expert's width
    qkv_bias: bool = True


def _refuse(key: str, value: object, why: str, fix: str) -> CheckpointError:
    return CheckpointError(f"config.json: {key} = {shown(value)}: {why}; fix: {fix}")


def _bool(config: dict[str, Any], key: str, default: bool) -> bool:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise CheckpointError(f"config.json: key {key!r} = {shown(value)}, expected true or false; fix: restore the original value")
    return value


def _dense_blocks(config: dict[str, Any], n_layer: int) -> list[int]:
    """The blocks transformers builds with a dense MLP instead of experts (Qwen2MoeDecoderLayer)."""
    only = config.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise CheckpointError(f"config.json: key 'mlp_only_layers' = {shown(only)}, expected a list of block numbers; fix: restore the original value")
    step = _get(config, "decoder_sparse_step", int, 1)
    return [i for i in range(n_layer) if i in only or (i + 1) % step != 0]


def _sliding_blocks(config: dict[str, Any], n_layer: int) -> list[int]:
    """The blocks transformers runs with sliding-window attention (``layer_types``, or Qwen2MoeConfig's rule without it)."""
    types = config.get("layer_types")
    if types is None:
        if not _bool(config, "use_sliding_window", False):
            return []
        max_window = _get(config, "max_window_layers", int, 28, positive=False)
        return [i for i in range(n_layer) if (i + 1) % 2 and i < max_window]
    if not isinstance(types, list) or len(types) != n_layer or not all(t in ("full_attention", "sliding_attention") for t in types):
        raise CheckpointError(f"config.json: key 'layer_types' = {shown(types)}, expected {n_layer} of \"full_attention\" / \"sliding_attention\"; fix: restore the original value")
    return [i for i, t in enumerate(types) if t == "sliding_attention"]


def _check_config(config: dict[str, Any], h: Hparams) -> None:
    """What transformers computes for this config and llama.cpp's qwen2moe graph cannot."""
    norm = config.get("norm_topk_prob", False)
    if norm is not False:
        raise _refuse("norm_topk_prob", norm, "transformers then renormalises the top-k expert weights, while llama.cpp's qwen2moe graph never does (the GGUF would compute something else)",
                      "only checkpoints with norm_topk_prob = false (every published Qwen1.5 / Qwen2 MoE) can be converted")
    dense = _dense_blocks(config, h.n_layer)
    if dense:
        raise _refuse("mlp_only_layers / decoder_sparse_step", [config.get("mlp_only_layers"), config.get("decoder_sparse_step")],
                      f"blocks {dense[:8]} would be dense, but llama.cpp's qwen2moe graph has experts in every block",
                      "none with this llama.cpp: only checkpoints with experts in every block (mlp_only_layers = [], decoder_sparse_step = 1) convert")
    sliding = _sliding_blocks(config, h.n_layer)
    if sliding:
        raise _refuse("use_sliding_window / layer_types", [config.get("use_sliding_window"), config.get("layer_types")],
                      f"blocks {sliding[:8]} attend through a sliding window, but llama.cpp's qwen2moe graph attends to the whole context",
                      "none with this llama.cpp: only checkpoints with use_sliding_window = false (every published Qwen1.5 / Qwen2 MoE) convert")
    if h.head_dim * h.n_head != h.n_embd:
        raise _refuse("head_dim", h.head_dim, f"head_dim * num_attention_heads = {h.head_dim * h.n_head} differs from hidden_size = {h.n_embd}, which llama.cpp's qwen2moe graph "
                      "requires (attn_q and attn_output are hidden_size wide)", "remove head_dim (it is hidden_size / num_attention_heads in Qwen MoE models)")


def hparams(config: dict[str, Any]) -> Qwen2MoeHparams:
    base = Hparams.from_config({k: v for k, v in config.items() if k not in _NOT_READ})
    n_expert, n_used = moe_counts(config)
    _check_config(config, base)
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    return Qwen2MoeHparams(**{
        **fields, "n_expert": n_expert, "n_expert_used": n_used,
        "n_ff_exp": _get(config, "moe_intermediate_size", int),
        "n_ff_shexp": _get(config, "shared_expert_intermediate_size", int),
        "qkv_bias": _bool(config, "qkv_bias", True),
    })


def _bias(hf: str, tensor: str, shape) -> Rule:
    """A 1-D bias: ``<name>.bias`` on both sides (``_p`` writes ``.weight`` names); never quantised."""
    return Rule(hf, tensor + ".bias", Role.ATTENTION, shape)


BIAS_RULES: tuple[Rule, ...] = (
    _bias("model.layers.{bid}.self_attn.q_proj.bias", T.ATTN_Q, lambda h: (h.n_head * h.head_dim,)),
    _bias("model.layers.{bid}.self_attn.k_proj.bias", T.ATTN_K, lambda h: (h.n_head_kv * h.head_dim,)),
    _bias("model.layers.{bid}.self_attn.v_proj.bias", T.ATTN_V, lambda h: (h.n_head_kv * h.head_dim,)),
)
SHARED_EXPERT_RULES: tuple[Rule, ...] = (
    # a one-row "router" for the shared expert: F32 like the routers (Role.ROUTER), as llama.cpp writes and keeps it
    _p("model.layers.{bid}.mlp.shared_expert_gate.weight", T.FFN_GATE_INP_SHEXP, Role.ROUTER, lambda h: (1, h.n_embd)),
    # an always-on dense FFN: not an expert in general.size_label, as llama.cpp's converter counts it
    _p("model.layers.{bid}.mlp.shared_expert.gate_proj.weight", T.FFN_GATE_SHEXP, Role.FFN, lambda h: (h.n_ff_shexp, h.n_embd)),
    _p("model.layers.{bid}.mlp.shared_expert.up_proj.weight", T.FFN_UP_SHEXP, Role.FFN, lambda h: (h.n_ff_shexp, h.n_embd)),
    _p("model.layers.{bid}.mlp.shared_expert.down_proj.weight", T.FFN_DOWN_SHEXP, Role.FFN, lambda h: (h.n_embd, h.n_ff_shexp)),
)
def rules(names: list[str]) -> tuple[Rule, ...]:
    biased = any(n.endswith(".self_attn.q_proj.bias") for n in names)  # then every block needs all three (qkv_bias is checked in check())
    # llama.cpp's qwen2moe graph always reads ``output``: a tied checkpoint gets the embeddings again
    return (NEOX_ATTENTION_RULES + (BIAS_RULES if biased else ()) + SHARED_EXPERT_RULES + moe_rules(names, lambda h: h.n_ff_exp)
            + head_rules(names, always_output=True))


def check(h: Qwen2MoeHparams, tensors: list[OutTensor]) -> None:
    output = next((t for t in tensors if t.name == T.OUTPUT + ".weight"), None)
    if output is not None and output.sources[0].name == "model.embed_tokens.weight" and not h.tie_embeddings:
        raise CheckpointError("checkpoint: tensor 'lm_head.weight' is missing and config.json tie_word_embeddings is false; fix: re-download the shard holding lm_head.weight")
    has_bias = any(t.name.endswith(".attn_q.bias") for t in tensors)
    if has_bias != h.qkv_bias:
        what = "has q/k/v_proj biases" if has_bias else "has no q/k/v_proj biases (model.layers.N.self_attn.q_proj.bias)"
        raise CheckpointError(f"checkpoint: config.json qkv_bias = {shown(h.qkv_bias)} but the checkpoint {what} (transformers would ignore or invent them); "
                              "fix: use the config.json that belongs to these weights")
    if h.rope_type not in ("default", "linear", "yarn"):  # llama3's rope_freqs are not read by this graph
        raise CheckpointError(f"config.json: rope scaling type {h.rope_type!r} is not supported for qwen2_moe (supported: default, linear, yarn); fix: use the original config.json")
    _check_common(h, tensors)


def metadata(h: Qwen2MoeHparams) -> dict[str, MetaValue]:
    K, V = gguf_spec.Keys, gguf_spec.GGUFValueType
    md = _common_metadata(h, ARCH)
    md[K.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=ARCH)] = MetaValue(h.n_ff_exp, V.UINT32)
    md[gguf_spec.Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH.format(arch=ARCH)] = MetaValue(h.n_ff_shexp, V.UINT32)
    return md


CONVERTER = register(Converter(
    model_type=MODEL_TYPE, arch=ARCH, hparams=hparams, rules=rules, metadata=metadata, check=check, ignore=IGNORE,
    hf_architectures=("Qwen2MoeForCausalLM",), routing=Routing(scoring="softmax", normalize_top_k=False),
    # --format bnb: routed experts under mlp.experts.{xid}, router mlp.gate; the shared expert (an MLP, 4-bit) and
    # its one-row sigmoid gate (kept with the routers) are stored under their own module paths
    hf_experts=MLP_EXPERTS,
))
