"""``model_type: glm4_moe_lite``: GLM-4.7-Flash checkpoints -> GGUF arch ``deepseek2``.

transformers 5.23's ``modeling_glm4_moe_lite.py`` is DeepSeek V3's model (multi-head latent
attention, sigmoid routing with ``e_score_correction_bias``, groups, shared experts), and the
vendored llama.cpp's converter (``conversion/glm.py`` ``Glm4MoeLiteModel``, a
``DeepseekV2Model``) writes it as ``deepseek2``: the name table, transforms, checks and metadata
are ``converters/_deepseek.py``'s.  What is GLM's own:

* dense and MoE blocks come from ``mlp_layer_types`` (``"dense"`` / ``"sparse"`` per block,
  ``["dense"] + ["sparse"] * (n - 1)`` when absent); transformers ignores
  ``first_k_dense_replace``.  llama.cpp's deepseek2 graph makes the leading blocks dense, so
  the types must be some dense blocks followed by sparse ones (refused otherwise), written as
  ``leading_dense_block_count`` (llama.cpp's converter reads ``first_k_dense_replace`` and
  writes 0 when config.json lacks it, a file llama.cpp cannot load);
* ``expert_gating_func`` sigmoid is always written: Glm4MoeLiteConfig has no ``scoring_func``,
  and llama.cpp's deepseek2 graph falls back to softmax without the key (GLM-4.7-Flash's
  perplexity 11.06 -> 9.81 once llama.cpp PR #18980 added it);
* multi-token-prediction blocks (``model.layers.{num_hidden_layers + i}``, which transformers
  does not load) are kept, as llama.cpp's converter keeps them for this model (unlike DeepSeek
  V3's): ``blk.N`` with its ``nextn.*`` tensors, the block count grown by them,
  ``nextn_predict_layers``; a checkpoint without them is written without them (as ``--no-mtp``);
* the rotary embeddings must cover all ``qk_rope_head_dim`` dimensions (``partial_rotary_factor``
  other than 1 is refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantkit.converters import MLP_EXPERTS, Routing, register
from quantkit.converters import _deepseek as ds
from quantkit.converters._deepseek import DeepseekHparams, Family, _refuse
from quantkit.converters.dots1 import with_class_defaults
from quantkit.converters.glm4_moe import NextnConverter, check_nextn, nextn_rules, rope_settings
from quantkit.converters.llama import IGNORE
from quantkit.errors import CheckpointError
from quantkit.format import gguf_spec
from quantkit.format.gguf_write import MetaValue
from quantkit.hf.checkpoint import shown
from quantkit.hf.mapping import OutTensor, Rule

MODEL_TYPE = "glm4_moe_lite"
ARCH = ds.ARCH  # deepseek2
#: Glm4MoeLiteConfig's defaults (transformers 5.23) for the keys the DeepSeek pieces read
DEFAULTS = dict(
    kv_lora_rank=512, q_lora_rank=768, qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256, n_routed_experts=64, n_shared_experts=1,
    moe_intermediate_size=1536, routed_scaling_factor=1.8, n_group=1, topk_group=1, num_experts_per_tok=4, norm_topk_prob=True,
    rope_interleave=True,
)
#: the sizes :func:`_deepseek.hparams_for` reads with defaults of its own (or none)
SIZE_DEFAULTS = dict(vocab_size=154880, hidden_size=2048, intermediate_size=10240, num_hidden_layers=47, num_attention_heads=20,
                     num_key_value_heads=20, max_position_embeddings=202752, rms_norm_eps=1e-5)
FAMILY = Family(model_type=MODEL_TYPE, gating="sigmoid", defaults={**DEFAULTS, "first_k_dense_replace": 1},
                aliases={"n_routed_experts": ("num_local_experts",)})
_deepseek_hparams = ds.hparams_for(FAMILY)
_deepseek_rules = ds.rules_for(FAMILY)


@dataclass(frozen=True)
class LiteHparams(DeepseekHparams):
    n_trunk: int = 0  # num_hidden_layers (n_layer also counts kept MTP blocks)
    n_mtp: int = 0  # multi-token-prediction blocks kept after the trunk
    n_mtp_declared: int = 0  # num_nextn_predict_layers in config.json (Glm4MoeLiteConfig has no default: 0)


def dense_lead(config: dict[str, Any], n_layer: int) -> int:
    """The leading dense blocks ``mlp_layer_types`` makes (what transformers builds), refused where llama.cpp cannot follow."""
    types = config.get("mlp_layer_types")
    if types is None:
        types = ["dense"] + ["sparse"] * (n_layer - 1)  # Glm4MoeLiteConfig's default
    if not isinstance(types, list) or len(types) != n_layer or not all(t in ("dense", "sparse") for t in types):
        raise CheckpointError(f"config.json: key 'mlp_layer_types' = {shown(types)}, expected {n_layer} of \"dense\" / \"sparse\"; fix: restore the original value")
    n_dense = types.index("sparse") if "sparse" in types else n_layer
    if "dense" in types[n_dense:]:
        raise _refuse("mlp_layer_types", types, "a dense block after a MoE block; llama.cpp's deepseek2 graph makes only the leading "
                      "leading_dense_block_count blocks dense", "none with this llama.cpp")
    if n_dense >= n_layer:
        raise _refuse("mlp_layer_types", types, f"every one of the {n_layer} blocks would be dense (no MoE block)", "restore the original value")
    return n_dense


def hparams(config: dict[str, Any]) -> LiteHparams:
    filled = with_class_defaults(config, SIZE_DEFAULTS)
    n_layer = filled["num_hidden_layers"]
    if isinstance(n_layer, bool) or not isinstance(n_layer, int) or n_layer < 1:
        raise CheckpointError(f"config.json: key 'num_hidden_layers' = {shown(n_layer)}, expected a positive integer; fix: restore the original value")
    filled["first_k_dense_replace"] = dense_lead(config, n_layer)  # transformers ignores the key itself
    _, _, factor = rope_settings(config, 1.0)
    if factor != 1.0:
        raise _refuse("partial_rotary_factor", factor, "transformers' glm4_moe_lite rotary embedding then covers fewer dimensions than "
                      "qk_rope_head_dim, while llama.cpp's deepseek2 graph turns all of them", "none with this llama.cpp")
    declared = config.get("num_nextn_predict_layers", 0)
    if isinstance(declared, bool) or not isinstance(declared, int) or declared < 0:
        raise CheckpointError(f"config.json: key 'num_nextn_predict_layers' = {shown(declared)}, expected a number of blocks; fix: restore the original value")
    h = _deepseek_hparams(filled)
    return LiteHparams(**{f: getattr(h, f) for f in h.__dataclass_fields__}, n_trunk=h.n_layer, n_mtp=0, n_mtp_declared=declared)


def rules(names: list[str]) -> tuple[Rule, ...]:
    return tuple(_deepseek_rules(names)) + nextn_rules(names)


def check(h: LiteHparams, tensors: list[OutTensor]) -> None:
    ds.check(h, tensors)
    check_nextn(h, tensors)


def metadata(h: LiteHparams) -> dict[str, MetaValue]:
    md = ds.metadata(h)
    if h.n_mtp:
        md[gguf_spec.Keys.LLM.NEXTN_PREDICT_LAYERS.format(arch=ARCH)] = MetaValue(int(h.n_mtp), gguf_spec.GGUFValueType.UINT32)
    return md


ROUTING = Routing(scoring="sigmoid", normalize_top_k=True, score_bias=True, group_limited=False, weights_scaled=True,
                  per_checkpoint=("normalize_top_k", "group_limited"))
NOTES = ds.NOTES + (
    "routing: sigmoid, selection by score + e_score_correction_bias (exp_probs_b) within the best topk_group groups, top-k renormalised "
    "when norm_topk_prob, times routed_scaling_factor; expert_gating_func is always written (llama.cpp PR #18980)",
    "dense blocks from mlp_layer_types (what transformers reads), written as leading_dense_block_count",
    "multi-token-prediction blocks (model.layers.N past num_hidden_layers) are kept as blk.N with their nextn.* tensors, as llama.cpp's "
    "converter keeps them for GLM-4.7-Flash; a checkpoint without them is written without them (as --no-mtp)",
)

CONVERTER = register(NextnConverter(
    model_type=MODEL_TYPE, arch=ARCH, hparams=hparams, rules=rules, metadata=metadata, check=check, ignore=IGNORE,
    hf_architectures=("Glm4MoeLiteForCausalLM",), routing=ROUTING, notes=NOTES,
    # --format bnb: as glm4_moe (MTP blocks left out; see converters/glm4_moe.py)
    hf_experts=MLP_EXPERTS,
))
