"""``model_type: deepseek_v2``: DeepSeek-V2 / V2.5 / V2-Lite checkpoints -> GGUF arch ``deepseek2``.

Multi-head latent attention, leading dense blocks, shared experts and the name table are
``converters/_deepseek.py``'s (shared with ``deepseek_v3``).  What is V2's own
(transformers' ``modeling_deepseek_v2.py``):

* routing: softmax over all experts, top-k, never renormalised (transformers' router
  ignores ``norm_topk_prob``; a config that sets it is refused, since DeepSeek's own code
  would renormalise), times ``routed_scaling_factor``: ``expert_gating_func`` softmax,
  ``expert_weights_norm`` false and ``expert_weights_scale`` are always written;
* rotary embeddings as complex rotations of interleaved pairs: llama.cpp's deepseek2 rope.

Refused: ``topk_method: group_limited_greedy`` with ``topk_group < n_group`` (DeepSeek-V2 and
V2.5 themselves): transformers scores a group by its best expert, llama.cpp's graph by the
sum of its two best (V3's rule), so tokens would go to other experts (llama.cpp's own
converter writes that file without a word).  V2-Lite (``greedy``) converts.
"""

from __future__ import annotations

from quantkit.converters import MLP_EXPERTS, Routing
from quantkit.converters._deepseek import Family, register_family

MODEL_TYPE = "deepseek_v2"

#: DeepseekV2Config's defaults for the keys the converter reads without requiring them (transformers 5.23)
FAMILY = Family(
    model_type=MODEL_TYPE, gating="softmax",
    defaults=dict(
        kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
        n_shared_experts=2, moe_intermediate_size=1407, first_k_dense_replace=0, routed_scaling_factor=1.0, topk_method="greedy",
        n_group=None, topk_group=None, norm_topk_prob=False,
    ),
    aliases={"n_routed_experts": ("num_experts",)},
)

CONVERTER = register_family(
    FAMILY, ("DeepseekV2ForCausalLM",),
    Routing(scoring="softmax", normalize_top_k=False, weights_scaled=True),
    notes=("routing: softmax, top-k not renormalised, times routed_scaling_factor (expert_weights_scale)",),
    hf_experts=MLP_EXPERTS,  # --format bnb: experts under mlp.experts.{xid}, router mlp.gate
)
