"""``model_type: olmoe``: OLMoE checkpoints (OLMoE-1B-7B) -> GGUF arch ``olmoe``.

What differs from Mixtral (llama.cpp's ``src/models/olmoe.cpp`` and transformers'
``modeling_olmoe.py``): RMS norms over the whole query and key projections
(``attn_q_norm`` of ``hidden_size`` values, ``attn_k_norm`` of the KV width; not
per head as Qwen3's), applied before the heads are split; NeoX rotary embeddings
(llama.cpp's ``LLAMA_ROPE_TYPE_NEOX`` for olmoe), so q/k rows are written as they
are (no permutation); experts of width ``intermediate_size`` (llama.cpp reads it as
``feed_forward_length``) stacked from ``mlp.experts.{xid}.gate_proj/up_proj/down_proj``
or from transformers 5's fused ``mlp.experts.gate_up_proj`` / ``down_proj``; the
router ``mlp.gate``; an ``output`` matrix the graph always reads (a tied checkpoint
gets a copy of the token embeddings).

Routing: softmax over the router logits, top-k, and the top-k weights are used as
they are: llama.cpp's olmoe graph never renormalises them (``norm_w = false``), as
transformers with ``norm_topk_prob: false`` (every published OLMoE).  Refused,
because llama.cpp would load or compute something else: ``norm_topk_prob: true``,
grouped-query attention (llama.cpp sizes ``attn_k`` / ``attn_k_norm`` / ``attn_v``
for as many KV heads as query heads), a ``head_dim`` other than
``hidden_size / num_attention_heads``, ``clip_qkv`` (transformers clamps q/k/v after
the norms; the olmoe graph does not clamp), ``attention_bias`` (no ``attn_output``
bias in the graph) and an activation other than SiLU.
"""

from __future__ import annotations

from typing import Any

from quantkit.hf.checkpoint import shown
from quantkit.converters import MLP_EXPERTS, Converter, Routing, register
from quantkit.converters.llama import IGNORE, NEOX_ATTENTION_RULES, T, Hparams, _p, head_rules, moe_counts, moe_rules
from quantkit.converters.llama import check_hparams as _check_common
from quantkit.converters.llama import metadata as _common_metadata
from quantkit.errors import CheckpointError
from quantkit.format.gguf_write import MetaValue
from quantkit.hf.mapping import OutTensor, Role, Rule

MODEL_TYPE = "olmoe"
ARCH = "olmoe"  # gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.OLMOE]
_NOT_READ = ("num_local_experts", "num_experts", "sliding_window")  # read below / not read by llama.cpp's olmoe graph


def _refuse(key: str, value: object, why: str, fix: str) -> CheckpointError:
    return CheckpointError(f"config.json: {key} = {shown(value)}: {why}; fix: {fix}")


def _check_config(config: dict[str, Any], h: Hparams) -> None:
    """What transformers computes for this config and llama.cpp's olmoe graph cannot."""
    if h.n_head_kv != h.n_head:
        raise _refuse("num_key_value_heads", h.n_head_kv, f"grouped-query attention ({h.n_head} query heads); llama.cpp's olmoe graph sizes attn_k, attn_k_norm and attn_v "
                      "for as many KV heads as query heads and would not load the file", "none with this llama.cpp: only checkpoints with num_key_value_heads = num_attention_heads (every published OLMoE) convert")
    if h.head_dim * h.n_head != h.n_embd:
        raise _refuse("head_dim", h.head_dim, f"head_dim * num_attention_heads = {h.head_dim * h.n_head} differs from hidden_size = {h.n_embd}, which llama.cpp's olmoe graph "
                      "requires (q_proj, o_proj and attn_q_norm are hidden_size wide)", "remove head_dim (it is hidden_size / num_attention_heads in OLMoE)")
    norm = config.get("norm_topk_prob", False)
    if norm not in (False, None):  # transformers renormalises when it is truthy
        raise _refuse("norm_topk_prob", norm, "transformers then renormalises the top-k expert weights, while llama.cpp's olmoe graph never does (the GGUF would compute something else)",
                      "only checkpoints with norm_topk_prob = false (every published OLMoE) can be converted")
    clip = config.get("clip_qkv")
    if clip is not None:
        raise _refuse("clip_qkv", clip, "transformers clamps queries, keys and values after the q/k norms, llama.cpp's olmoe graph does not clamp",
                      "none with this llama.cpp: only checkpoints with clip_qkv = null (every published OLMoE) convert")
    bias = config.get("attention_bias", False)
    if bias not in (False, None):
        raise _refuse("attention_bias", bias, "llama.cpp's olmoe graph has no attn_output bias", "only checkpoints with attention_bias = false (every published OLMoE) can be converted")


def hparams(config: dict[str, Any]) -> Hparams:
    base = Hparams.from_config({k: v for k, v in config.items() if k not in _NOT_READ})
    n_expert, n_used = moe_counts(config)
    _check_config(config, base)
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    return Hparams(**{**fields, "n_expert": n_expert, "n_expert_used": n_used})


#: one RMS norm over the whole projection (not per head): hidden_size and the KV width values
QK_NORM_RULES: tuple[Rule, ...] = (
    _p("model.layers.{bid}.self_attn.q_norm.weight", T.ATTN_Q_NORM, Role.NORM, lambda h: (h.n_head * h.head_dim,)),
    _p("model.layers.{bid}.self_attn.k_norm.weight", T.ATTN_K_NORM, Role.NORM, lambda h: (h.n_head_kv * h.head_dim,)),
)


def rules(names: list[str]) -> tuple[Rule, ...]:
    # llama.cpp's olmoe graph always reads ``output``: a tied checkpoint gets the embeddings again
    return NEOX_ATTENTION_RULES + QK_NORM_RULES + moe_rules(names, lambda h: h.n_ff) + head_rules(names, always_output=True)


def check(h: Hparams, tensors: list[OutTensor]) -> None:
    output = next((t for t in tensors if t.name == T.OUTPUT + ".weight"), None)
    if output is not None and output.sources[0].name == "model.embed_tokens.weight" and not h.tie_embeddings:
        raise CheckpointError("checkpoint: tensor 'lm_head.weight' is missing and config.json tie_word_embeddings is false; fix: re-download the shard holding lm_head.weight")
    if h.rope_type not in ("default", "linear", "yarn"):  # llama3's rope_freqs are not read by this graph
        raise CheckpointError(f"config.json: rope scaling type {h.rope_type!r} is not supported for olmoe (supported: default, linear, yarn); fix: use the original config.json")
    _check_common(h, tensors)


def metadata(h: Hparams) -> dict[str, MetaValue]:
    return _common_metadata(h, ARCH)  # feed_forward_length is the expert width: llama.cpp's olmoe experts are n_ff wide


CONVERTER = register(Converter(
    model_type=MODEL_TYPE, arch=ARCH, hparams=hparams, rules=rules, metadata=metadata, check=check, ignore=IGNORE,
    hf_architectures=("OlmoeForCausalLM",), routing=Routing(scoring="softmax", normalize_top_k=False),
    hf_experts=MLP_EXPERTS,  # --format bnb: experts under mlp.experts.{xid}, router mlp.gate
))
