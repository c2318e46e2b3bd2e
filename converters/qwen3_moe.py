"""``model_type: qwen3_moe``: Qwen3 MoE checkpoints (Qwen3-30B-A3B, Qwen3-235B-A22B, ...) -> GGUF arch ``qwen3moe``.

What differs from Mixtral (llama.cpp's ``src/models/qwen3moe.cpp`` and transformers'
``modeling_qwen3_moe.py``): per-head RMS norms on queries and keys
(``attn_q_norm`` / ``attn_k_norm``, F32 like every norm); NeoX rotary embeddings,
so q/k rows are written as they are (no permutation); ``head_dim`` independent of
``hidden_size / num_attention_heads``; experts of their own width
(``moe_intermediate_size`` -> ``expert_feed_forward_length``) stacked from
``mlp.experts.{xid}.gate_proj/up_proj/down_proj`` or from transformers 5's fused
``mlp.experts.gate_up_proj`` / ``down_proj``; the router ``mlp.gate``.

Routing: softmax over the router logits, top-k, and llama.cpp's qwen3moe graph
always renormalises the top-k weights.  transformers does so only with
``norm_topk_prob: true`` (what the published checkpoints say; the config class
defaults to false), so a checkpoint without it would run with other weights in
llama.cpp: it is refused.  llama.cpp's graph is MoE in every block, so
``mlp_only_layers`` / ``decoder_sparse_step`` that make dense blocks are refused too.
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

MODEL_TYPE = "qwen3_moe"
ARCH = "qwen3moe"  # gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3MOE]


@dataclass(frozen=True)
class QwenMoeHparams(Hparams):
    n_ff_exp: int = 0  # moe_intermediate_size: one expert's width


def hparams(config: dict[str, Any]) -> QwenMoeHparams:
    base = Hparams.from_config({k: v for k, v in config.items() if k not in ("num_local_experts", "num_experts")})
    n_expert, n_used = moe_counts(config)
    norm = config.get("norm_topk_prob", False)
    if norm is not True:
        raise CheckpointError(
            f"config.json: norm_topk_prob = {shown(norm)}: transformers then leaves the top-k expert weights unnormalised, "
            "while llama.cpp's qwen3moe graph always renormalises them (the GGUF would compute something else); "
            "fix: only checkpoints trained with norm_topk_prob = true (every published Qwen3 MoE) can be converted"
        )
    dense = config.get("mlp_only_layers") or []
    step = config.get("decoder_sparse_step", 1)
    if dense or step != 1:
        raise CheckpointError(
            f"config.json: mlp_only_layers = {shown(dense)}, decoder_sparse_step = {shown(step)} make some blocks dense; "
            "llama.cpp's qwen3moe graph has experts in every block; fix: none (such a model cannot run in this llama.cpp)"
        )
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    return QwenMoeHparams(**{**fields, "n_expert": n_expert, "n_expert_used": n_used, "n_ff_exp": _get(config, "moe_intermediate_size", int)})


def rules(names: list[str]) -> tuple[Rule, ...]:
    qk_norms = (  # RMS norm per head on queries and keys, before rope
        _p("model.layers.{bid}.self_attn.q_norm.weight", T.ATTN_Q_NORM, Role.NORM, lambda h: (h.head_dim,)),
        _p("model.layers.{bid}.self_attn.k_norm.weight", T.ATTN_K_NORM, Role.NORM, lambda h: (h.head_dim,)),
    )
    return NEOX_ATTENTION_RULES + qk_norms + moe_rules(names, lambda h: h.n_ff_exp) + head_rules(names)


def check(h: QwenMoeHparams, tensors: list[OutTensor]) -> None:
    if h.rope_type != "default":  # yarn and linear are written like llama's; llama3 rope_freqs are not read by this graph
        if h.rope_type not in ("linear", "yarn"):
            raise CheckpointError(f"config.json: rope scaling type {h.rope_type!r} is not supported for qwen3_moe (supported: default, linear, yarn); fix: use the original config.json")
    _check_common(h, tensors)


def metadata(h: QwenMoeHparams) -> dict[str, MetaValue]:
    K, V = gguf_spec.Keys, gguf_spec.GGUFValueType
    md = _common_metadata(h, ARCH)
    md[K.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=ARCH)] = MetaValue(h.n_ff_exp, V.UINT32)
    return md


CONVERTER = register(Converter(
    model_type=MODEL_TYPE, arch=ARCH, hparams=hparams, rules=rules, metadata=metadata, check=check, ignore=IGNORE,
    hf_architectures=("Qwen3MoeForCausalLM",), routing=Routing(scoring="softmax", normalize_top_k=True),
    hf_experts=MLP_EXPERTS,  # --format bnb: experts under mlp.experts.{xid}, router mlp.gate
))
