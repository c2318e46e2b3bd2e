"""``model_type: qwen3_5_moe``: Qwen3.5 MoE checkpoints (Qwen3.5-35B-A3B, -122B-A10B, -397B-A17B) -> GGUF arch ``qwen35moe``.

The hybrid blocks of ``qwen3_next`` (see there: layer types, gated attention, Gated DeltaNet,
``w + 1`` norms, ``-exp(A_log)``, experts with a sigmoid-gated shared expert, multi-token
prediction blocks kept after the trunk or left out), with what differs (llama.cpp's
``src/models/qwen35moe.cpp`` and ``conversion/qwen.py`` ``Qwen3_5MoeTextModel`` /
``_LinearAttentionVReorderBase``; transformers' ``modeling_qwen3_5_moe.py``):

* the Gated DeltaNet projections come apart: ``in_proj_qkv`` -> ``attn_qkv``,
  ``in_proj_z`` -> ``attn_gate``, ``in_proj_b`` -> ``ssm_beta``, ``in_proj_a`` -> ``ssm_alpha``;
* with fewer key heads than value heads, transformers repeats each key head for its
  group of value heads (``repeat_interleave``: value heads grouped by key head) while
  llama.cpp's graph broadcasts (``ggml_repeat``: tiled), so every value-head axis is
  reordered from grouped to tiled (:class:`TiledVHeads`): the v rows of ``attn_qkv`` and of
  the convolution kernel, ``attn_gate`` rows, ``ssm_beta`` / ``ssm_alpha`` rows, ``ssm_a`` and
  ``ssm_dt``, and the columns of ``ssm_out``;
* interleaved multi-section rotary embeddings (IMRoPE): ``rope.dimension_sections`` from
  ``rope_parameters.mrope_section`` (``[11, 11, 10]`` by default, padded to 4).  Text
  positions are equal in every section, so it computes the NeoX rotation transformers
  computes for text;
* the router always renormalises the top-k weights (transformers has no key for it);
  there is no dense-MLP block and no ``intermediate_size`` (then no ``feed_forward_length``);
* the published checkpoints are vision-language models (``model_type: qwen3_5_moe``,
  ``text_config``, tensors under ``model.language_model.``): the text model is converted,
  the vision tower (``model.visual.*``) is left out (llama.cpp's converter writes it to a
  separate ``mmproj`` file).  A text-only save (``Qwen3_5MoeForCausalLM``, ``model_type:
  qwen3_5_moe_text``) converts the same.

Refused besides ``qwen3_next``'s refusals: rope scaling (the IMRoPE path is checked for
plain rotary embeddings only).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from quantkit.converters import MLP_EXPERTS, Routing, register
from quantkit.converters.llama import IGNORE, T, _p
from quantkit.converters.llama import check_hparams as _check_common
from quantkit.converters.qwen3_next import (
    BLOCK, MTP_UNLOADED, NOTES, VISION, HybridConverter, HybridHparams, check_blocks, check_rope, hybrid_hparams, hybrid_metadata, trunk_rules,
)
from quantkit.errors import CheckpointError
from quantkit.format.gguf_write import MetaValue
from quantkit.hf.checkpoint import shown
from quantkit.hf.mapping import NEG_EXP, Chain, OutTensor, Role, Rule, Transform

MODEL_TYPE = "qwen3_5_moe"
TEXT_MODEL_TYPE = "qwen3_5_moe_text"  # what Qwen3_5MoeForCausalLM.save_pretrained writes
ARCH = "qwen35moe"  # gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN35MOE]
DEFAULT_SECTIONS = (11, 11, 10)  # Qwen3_5MoeTextRotaryEmbedding's mrope_section default


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's keys: ``text_config`` over the top level (a vision-language config.json), as llama.cpp reads them."""
    inner = config.get("text_config")
    if inner is None:
        return config
    if not isinstance(inner, dict):
        raise CheckpointError(f"config.json: key 'text_config' = {shown(inner)}, expected an object; fix: restore the original value")
    return {**config, **inner}


def _sections(rope: dict[str, Any]) -> tuple[int, ...]:
    sections = rope.get("mrope_section", list(DEFAULT_SECTIONS))
    if not isinstance(sections, list) or not 1 <= len(sections) <= 4 or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**31 for s in sections):
        raise CheckpointError(f"config.json: key 'rope_parameters.mrope_section' = {shown(sections)}, expected up to 4 section sizes; fix: restore the original value")
    return (*sections, *(0,) * (4 - len(sections)))


def hparams(config: dict[str, Any]) -> HybridHparams:
    h = hybrid_hparams(text_config(config))
    return replace(h, rope_sections=_sections(h.rope))


# --------------------------------------------------------------------------- transforms


def tiled(n_k_heads: int, v_per_k: int, head_dim: int) -> np.ndarray:
    """Source positions of value heads grouped by key head (``[k0v0, k0v1, k1v0, k1v1]``) in tiled order
    (``[k0v0, k1v0, k0v1, k1v1]``), ``head_dim`` positions each: llama.cpp's ``_reorder_v_heads``."""
    return np.arange(n_k_heads * v_per_k * head_dim).reshape(n_k_heads, v_per_k, head_dim).transpose(1, 0, 2).reshape(-1)


@dataclass(frozen=True)
class TiledVHeads(Transform):
    """An axis over value heads reordered from transformers' grouped order to llama.cpp's tiled order.

    ``head``: positions per head (``"v"``: linear_value_head_dim; ``"one"``: one, for a per-head
    scalar); ``skip_qk``: the first 2 * key_dim rows (q and k) stay where they are;
    ``columns``: the value axis is the columns (``out_proj``).  A no-op with as many key heads as value heads.
    """

    head: str = "v"
    skip_qk: bool = False
    columns: bool = False

    def order(self, h: HybridHparams) -> np.ndarray:
        v = tiled(h.n_k_heads, h.v_per_k, h.head_v_dim if self.head == "v" else 1)
        return np.concatenate([np.arange(2 * h.key_dim), 2 * h.key_dim + v]) if self.skip_qk else v

    def apply(self, a: np.ndarray, hparams: Any) -> np.ndarray:
        idx = self.order(hparams)
        return np.ascontiguousarray(a[:, idx] if self.columns else a[idx])


QKV_ROWS = TiledVHeads("tiled_qkv", head="v", skip_qk=True)
V_ROWS = TiledVHeads("tiled_v_rows", head="v")
HEAD_ROWS = TiledVHeads("tiled_heads", head="one")
V_COLUMNS = TiledVHeads("tiled_v_columns", head="v", columns=True)

_LINEAR = BLOCK + "linear_attn."
LINEAR_RULES: tuple[Rule, ...] = (
    _p(_LINEAR + "in_proj_qkv.weight", T.ATTN_QKV, Role.ATTENTION, lambda h: (h.conv_dim, h.n_embd), QKV_ROWS, optional=True),
    _p(_LINEAR + "in_proj_z.weight", T.ATTN_GATE, Role.ATTENTION, lambda h: (h.value_dim, h.n_embd), V_ROWS, optional=True),
    _p(_LINEAR + "in_proj_b.weight", T.SSM_BETA, Role.OTHER, lambda h: (h.n_v_heads, h.n_embd), HEAD_ROWS, optional=True),
    _p(_LINEAR + "in_proj_a.weight", T.SSM_ALPHA, Role.OTHER, lambda h: (h.n_v_heads, h.n_embd), HEAD_ROWS, optional=True),
    _p(_LINEAR + "conv1d.weight", T.SSM_CONV1D, Role.OTHER, lambda h: (h.conv_dim, h.conv_kernel), QKV_ROWS, optional=True),  # seen through conv_views
    Rule(_LINEAR + "dt_bias", T.SSM_DT + ".bias", Role.OTHER, lambda h: (h.n_v_heads,), HEAD_ROWS, optional=True),
    Rule(_LINEAR + "A_log", T.SSM_A, Role.OTHER, lambda h: (h.n_v_heads,), Chain("neg_exp_tiled", (NEG_EXP, HEAD_ROWS)), optional=True),
    _p(_LINEAR + "norm.weight", T.SSM_NORM, Role.NORM, lambda h: (h.head_v_dim,), optional=True),  # one weight shared by every head: no reorder
    _p(_LINEAR + "out_proj.weight", T.SSM_OUT, Role.OTHER, lambda h: (h.n_embd, h.value_dim), V_COLUMNS, optional=True),
)
#: --format bnb: experts as Qwen2 MoE's, the Role.OTHER Gated DeltaNet projections 4-bit, no MTP blocks; from a
#: vision-language checkpoint what ``AutoModelForCausalLM`` builds of its config (``Qwen3_5MoeForCausalLM``: the
#: language model under ``model.``; the vision tower is left out as for GGUF)
HF_EXPERTS = replace(MLP_EXPERTS, linears=tuple(f"model.layers.{{bid}}.linear_attn.{w}.weight" for w in ("in_proj_a", "in_proj_b", "out_proj")),
                     unloaded=MTP_UNLOADED, renamed=(("model.language_model.", "model."),))  # a VL checkpoint: its language model only
LINEAR_TENSORS = ("attn_qkv.weight", "attn_gate.weight", "ssm_beta.weight", "ssm_alpha.weight", "ssm_conv1d.weight", "ssm_dt.bias", "ssm_a",
                  "ssm_norm.weight", "ssm_out.weight")


def rules(names: list[str]) -> tuple[Rule, ...]:
    return trunk_rules(names, LINEAR_RULES)


def check(h: HybridHparams, tensors: list[OutTensor]) -> None:
    check_blocks(h, tensors, LINEAR_TENSORS)
    check_rope(h, ARCH, ("default",))
    _check_common(h, tensors)


def metadata(h: HybridHparams) -> dict[str, MetaValue]:
    return hybrid_metadata(h, ARCH)


CONVERTER = register(HybridConverter(
    model_type=MODEL_TYPE, arch=ARCH, hparams=hparams, rules=rules, metadata=metadata, check=check, ignore=IGNORE + VISION,
    hf_architectures=("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM"),
    routing=Routing(scoring="softmax", normalize_top_k=True), hf_experts=HF_EXPERTS,
    notes=NOTES + ("the vision tower (model.visual.*) is left out: llama.cpp's converter writes it to a separate mmproj file",),
))
TEXT_CONVERTER = register(replace(CONVERTER, model_type=TEXT_MODEL_TYPE))  # the same model saved without its vision tower
