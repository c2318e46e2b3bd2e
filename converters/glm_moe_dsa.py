"""``model_type: glm_moe_dsa``: GLM-5 checkpoints -> GGUF arch ``glm-dsa``.

transformers 5.23's ``modeling_glm_moe_dsa.py`` is DeepSeek V3.2's model (``converters/deepseek_v32.py``:
MLA, sigmoid routing with ``e_score_correction_bias``, shared experts, the lightning indexer,
``mlp_layer_types``, multi-token-prediction blocks kept as llama.cpp's converter keeps them) with
GLM's sizes and two differences, both computed alike by the vendored llama.cpp's ``glm-dsa``
graph (``src/models/glm-dsa.cpp``; converter ``conversion/glm.py`` ``GlmMoeDsaModel``):

* the indexer rotates interleaved pairs (llama.cpp: ``LLAMA_ROPE_TYPE_NORM``), not halves;
* cross-layer top-k sharing: ``indexer_types`` (else ``index_topk_pattern``, else
  ``index_topk_freq`` / ``index_skip_topk_offset``, as the config class derives it) makes each
  block ``"full"`` (its own indexer) or ``"shared"`` (no indexer weights; it reuses the previous
  full block's selection).  Always written as ``attention.indexer.types`` (llama.cpp otherwise
  guesses from the context length: all full below 1M tokens, GLM-5.2's pattern above); a first
  block that is not full is refused (transformers and llama.cpp both fail on it).

``expert_gating_func`` sigmoid is written although llama.cpp's glm-dsa loader defaults to it; the
group counts, ``expert_weights_norm`` / ``scale`` as for DeepSeek V3.
"""

from __future__ import annotations

from typing import Any

from quantkit.converters import Routing
from quantkit.converters._deepseek import Family, _refuse
from quantkit.converters.deepseek_v32 import DsaSpec, register_dsa
from quantkit.converters.llama import _get
from quantkit.errors import CheckpointError
from quantkit.hf.checkpoint import shown

MODEL_TYPE = "glm_moe_dsa"
ARCH = "glm-dsa"  # gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GLM_DSA]

#: GlmMoeDsaConfig's defaults (transformers 5.23) for the keys the DeepSeek pieces read
DEFAULTS = dict(
    kv_lora_rank=512, q_lora_rank=2048, qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256, n_routed_experts=256, n_shared_experts=1,
    moe_intermediate_size=2048, routed_scaling_factor=2.5, n_group=1, topk_group=1, num_experts_per_tok=8, norm_topk_prob=True,
)
SIZE_DEFAULTS = dict(vocab_size=154880, hidden_size=6144, intermediate_size=12288, num_hidden_layers=78, num_attention_heads=64,
                     num_key_value_heads=64, max_position_embeddings=202752, rms_norm_eps=1e-5)
INDEX_DEFAULTS = dict(index_topk=2048, index_head_dim=128, index_n_heads=32)
FIRST_K_DENSE_DEFAULT = 3


def indexer_types(config: dict[str, Any], n_layer: int) -> tuple[bool, ...]:
    """Which blocks run their own indexer (True, ``"full"``), as GlmMoeDsaConfig derives ``indexer_types``."""
    key, types = "indexer_types", config.get("indexer_types")
    if types is None:
        pattern = config.get("index_topk_pattern")
        if pattern is not None:
            key = "index_topk_pattern"
            if isinstance(pattern, str):
                if not set(pattern) <= {"F", "S"}:
                    raise _refuse(key, pattern, 'expected a string of "F" (full) and "S" (shared), one a block', "restore the original value")
                types = [{"F": "full", "S": "shared"}[c] for c in pattern]
            else:
                types = pattern
        else:
            freq = config.get("index_topk_freq", 1)
            offset = config.get("index_skip_topk_offset", 2)
            freq = max(_get({"index_topk_freq": freq}, "index_topk_freq", int, positive=False), 1)
            offset = _get({"index_skip_topk_offset": offset}, "index_skip_topk_offset", int, positive=False)
            types = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n_layer)]
    if not isinstance(types, list) or len(types) != n_layer or not all(t in ("full", "shared") for t in types):
        raise CheckpointError(f"config.json: key {key!r} = {shown(types)}, expected {n_layer} of \"full\" / \"shared\"; fix: restore the original value")
    if types[0] != "full":
        raise _refuse(key, types, "block 0 would reuse the top-k of an earlier indexer block, and there is none (transformers and llama.cpp's "
                      "glm-dsa graph both fail)", "restore the original value")
    return tuple(t == "full" for t in types)


FAMILY = Family(model_type=MODEL_TYPE, gating="sigmoid", defaults={**DEFAULTS, "first_k_dense_replace": FIRST_K_DENSE_DEFAULT},
                aliases={"n_routed_experts": ("num_local_experts",)})
SPEC = DsaSpec(family=FAMILY, arch=ARCH, size_defaults=SIZE_DEFAULTS, index_defaults=INDEX_DEFAULTS, first_k_dense=FIRST_K_DENSE_DEFAULT,
               indexer_types=indexer_types)
ROUTING = Routing(scoring="sigmoid", normalize_top_k=True, score_bias=True, group_limited=False, weights_scaled=True,
                  per_checkpoint=("normalize_top_k", "group_limited"))
NOTES = (
    "routing: sigmoid, selection by score + e_score_correction_bias (exp_probs_b) within the best topk_group groups, top-k renormalised "
    "when norm_topk_prob, times routed_scaling_factor; expert_gating_func is always written",
    "indexer_types (full / shared blocks) always written as attention.indexer.types; shared blocks hold no indexer tensors",
)

CONVERTER = register_dsa(SPEC, ("GlmMoeDsaForCausalLM",), ROUTING, NOTES)
