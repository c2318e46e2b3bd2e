"""``model_type: deepseek_v3``: DeepSeek-V3 / R1 (and Kimi K2's ``kimi_k2``) checkpoints -> GGUF arch ``deepseek2``.

Multi-head latent attention, leading dense blocks, shared experts, multi-token-prediction
blocks (dropped) and the name table are ``converters/_deepseek.py``'s (shared with
``deepseek_v2``).  What is V3's own (transformers' ``modeling_deepseek_v3.py``):

* routing: sigmoid scores; experts chosen by score + ``e_score_correction_bias``
  (``exp_probs_b.bias``) within the best ``topk_group`` of ``n_group`` groups (a group
  scored by the sum of its two best biased scores, as llama.cpp's graph does); the chosen
  experts' unbiased scores renormalised when ``norm_topk_prob``, times
  ``routed_scaling_factor``.  ``expert_gating_func`` sigmoid is always written: transformers'
  DeepseekV3Config does not serialise ``scoring_func``, and llama.cpp's deepseek2 graph
  silently falls back to softmax without the key.  ``n_group`` / ``topk_group`` that limit
  nothing (``topk_group == n_group``) are written as 1 / 1 (llama.cpp aborts on a used count
  equal to the group count);
* ``rope_interleave`` (the default): rotary pairs interleaved, llama.cpp's deepseek2 rope;
  ``false`` rotates halves, and the rotary rows are reordered into pairs.

``kimi_k2`` (``converters/kimi_k2.py``) is this architecture under Kimi K2's model_type.
"""

from __future__ import annotations

from quantkit.converters import MLP_EXPERTS, Routing
from quantkit.converters._deepseek import MTP_NOTE, Family, register_family

MODEL_TYPE = "deepseek_v3"

#: DeepseekV3Config's defaults for the keys the converter reads without requiring them (transformers 5.23)
DEFAULTS = dict(
    kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
    n_shared_experts=1, moe_intermediate_size=2048, first_k_dense_replace=3, routed_scaling_factor=2.5, n_group=8, topk_group=4,
    num_experts_per_tok=8, norm_topk_prob=True, rope_interleave=True, num_nextn_predict_layers=1,
)
FAMILY = Family(model_type=MODEL_TYPE, gating="sigmoid", defaults=DEFAULTS,
                aliases={"n_routed_experts": ("num_local_experts",), "num_nextn_predict_layers": ("num_mtp_layers",)})
ROUTING = Routing(scoring="sigmoid", normalize_top_k=True, score_bias=True, group_limited=True, weights_scaled=True,
                  per_checkpoint=("normalize_top_k", "group_limited"))
NOTES = ("routing: sigmoid, selection by score + e_score_correction_bias (exp_probs_b) within the best topk_group groups, "
          "top-k renormalised (norm_topk_prob), times routed_scaling_factor (expert_weights_scale)", MTP_NOTE)

CONVERTER = register_family(FAMILY, ("DeepseekV3ForCausalLM",), ROUTING, notes=NOTES,
                            # --format bnb: router mlp.gate (its e_score_correction_bias buffer under its own key), experts mlp.experts.{xid}
                            hf_experts=MLP_EXPERTS)
