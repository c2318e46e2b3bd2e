"""What ``deepseek_v2`` and ``deepseek_v3`` (and Kimi K2's ``kimi_k2``) share: GGUF arch ``deepseek2``.

Not a converter itself (the leading ``_`` keeps it out of discovery): ``deepseek_v2.py`` and
``deepseek_v3.py`` register theirs from the pieces here.  The references are transformers 5.23's
``modeling_deepseek_v2.py`` / ``modeling_deepseek_v3.py`` (what a checkpoint computes) and the
vendored llama.cpp's ``conversion/deepseek.py`` and ``src/models/deepseek2.cpp`` (what the file
must hold and what the graph computes).

Multi-head latent attention (MLA)
    queries from ``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj`` (``attn_q_a`` / ``attn_q_a_norm`` /
    ``attn_q_b``) or, without ``q_lora_rank`` (DeepSeek-V2-Lite), one ``q_proj`` (``attn_q``);
    ``kv_a_proj_with_mqa`` (``attn_kv_a_mqa``: ``kv_lora_rank`` latent rows, then the
    ``qk_rope_head_dim`` rotary rows shared by every head) and ``kv_a_layernorm``;
    ``kv_b_proj`` [heads * (nope + v), kv_lora] is split per head into ``attn_k_b``
    [heads, kv_lora, nope] (transposed: llama.cpp absorbs it into the queries) and ``attn_v_b``
    [heads, v, kv_lora], as llama.cpp's converter does; the graph then runs MQA over the latent
    (``head_count_kv`` 1, ``key_length`` kv_lora + rope, ``value_length`` kv_lora,
    ``key_length_mla`` / ``value_length_mla`` the per-head sizes).  Rotary embeddings act on
    interleaved pairs in both (V2's complex rotation, V3's ``rope_interleave``); a V3 with
    ``rope_interleave: false`` rotates halves, and its rotary rows are reordered into pairs here.
    Without ``q_lora_rank`` the file says ``q_lora_rank = 0``: llama.cpp's loader requires the key
    unless the layer count is one of its "lite" ones (26, 27, 48 with a 128256 vocabulary), and 0
    makes its graph read ``attn_q`` at any depth (llama.cpp's converter omits the key and so only
    converts those depths).
Blocks
    ``first_k_dense_replace`` leading dense blocks (``ffn_gate/up/down``, ``intermediate_size``
    wide: ``leading_dense_block_count``), then MoE blocks: the router ``mlp.gate``, routed
    experts (per-expert keys or transformers 5's fused ``gate_up_proj`` / ``down_proj``) of
    ``moe_intermediate_size``, and ``n_shared_experts`` shared experts fused into one always-on
    MLP (``ffn_*_shexp``, ``moe_intermediate_size * n_shared_experts`` wide, no gate).
Routing (every key written, from what transformers computes, never only from config.json)
    ``expert_gating_func`` (softmax for V2, sigmoid for V3: transformers' DeepseekV3Config does
    not even serialise ``scoring_func``, and llama.cpp's graph falls back to softmax without the
    key), ``expert_weights_norm``, ``expert_weights_scale`` (``routed_scaling_factor``),
    ``expert_group_count`` / ``expert_group_used_count``, V3's selection bias
    ``e_score_correction_bias`` -> ``exp_probs_b.bias``.
Multi-token prediction
    V3's ``num_nextn_predict_layers`` blocks stored past ``num_hidden_layers`` are dropped, as
    llama.cpp's converter drops them for deepseek2 (its graph has no MTP head for this arch's
    files); transformers ignores them too.
YaRN
    llama.cpp's deepseek2 graph scales attention by ``mscale^2`` with ``mscale = 1 + 0.1 *
    yarn_log_multiplier * ln(factor)`` and cancels YaRN's own magnitude factor (``[TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]``).
    transformers scales cos/sin by ``attention_factor`` (``get_mscale(factor, mscale) /
    get_mscale(factor, mscale_all_dim)`` unless given) and the softmax by
    ``get_mscale(factor, mscale_all_dim)^2``.  Both are matched for any ``mscale`` /
    ``mscale_all_dim`` / ``attention_factor`` with two keys: ``rope.scaling.yarn_log_multiplier``
    (``0.1 * L``, which llama.cpp divides by 0.1 again) and ``rope.scaling.attn_factor`` (``R``), see
    :func:`yarn_keys`.  For the published configs (``mscale == mscale_all_dim``) that is what
    llama.cpp's converter writes (``0.1 * mscale_all_dim``, no attn_factor).
llama.cpp's limits only (:func:`~quantkit.converters.llama.llama_cpp_limit`: refused for GGUF, exported by ``--format bnb``)
    V2's ``group_limited_greedy`` routing, YaRN ramp bounds other than 32 / 1 (Kimi K2 publishes 1 / 1), ``truncate: false``,
    YaRN attention scales beyond float32.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from quantkit.converters import Converter, HfExperts, Routing, register
from quantkit.converters.llama import IGNORE, LLAMA_MAX_EXPERTS, T, Hparams, _context_length, _get, _p, _rope, head_rules, llama_cpp_limit, moe_rules
from quantkit.converters.llama import check_hparams as _check_common
from quantkit.errors import CheckpointError
from quantkit.format import gguf_spec
from quantkit.format.gguf_write import MetaValue
from quantkit.hf.checkpoint import shown
from quantkit.hf.mapping import OutTensor, Role, Rule, Transform, permute_rows

ARCH = "deepseek2"  # gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2]
#: gguf.ExpertGatingFuncType (llama.cpp's llama_expert_gating_func_type)
GATING_FUNC = {"softmax": 1, "sigmoid": 2}
#: YaRN's ramp bounds in transformers when config.json gives none; llama.cpp's deepseek2 loader never reads the keys and uses these
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0
_UNSET = object()


@dataclass(frozen=True)
class Family:
    """What tells the DeepSeek versions apart: their config class's defaults and their router."""

    model_type: str
    gating: str  # "softmax" (V2) or "sigmoid" (V3): what transformers' router computes, whatever config.json says
    #: config.json key -> the value transformers' config class uses when the key is absent (absent here: required)
    defaults: dict[str, Any]
    #: config.json key -> the other names transformers' config class accepts for it (``attribute_map``)
    aliases: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    #: Kimi K2 (``kimi_k2``, DeepSeek V3's architecture under its own model_type, unknown to transformers): its own code
    #: reads ``scoring_func``, which must then say sigmoid
    needs_scoring_func: bool = False


@dataclass(frozen=True)
class DeepseekHparams(Hparams):
    q_lora_rank: int = 0  # 0: one q_proj (no low-rank queries)
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    n_ff_exp: int = 0  # moe_intermediate_size: one routed expert's width
    n_expert_shared: int = 0  # n_shared_experts: the shared MLP is n_ff_exp * n_expert_shared wide
    n_dense_lead: int = 0  # first_k_dense_replace
    gating: str = "softmax"
    score_bias: bool = False  # V3: e_score_correction_bias -> exp_probs_b
    weights_norm: bool = False
    weights_scale: float = 1.0
    n_group: int = 1  # as written: 1 when the top-k is not limited to groups
    n_group_used: int = 1
    rope_interleave: bool = True
    n_nextn: int = 0  # multi-token-prediction blocks stored past n_layer (dropped)
    yarn_log_mul: float = 0.0  # L of llama.cpp's mscale (rope.scaling.yarn_log_multiplier = 0.1 * L)
    rope_attn_factor: float = 1.0  # R (rope.scaling.attn_factor)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


def _refuse(key: str, value: object, why: str, fix: str) -> CheckpointError:
    return CheckpointError(f"config.json: {key} = {shown(value)}: {why}; fix: {fix}")


def _raw(config: dict[str, Any], family: Family, key: str) -> Any:
    """config.json's value, or the config class's default when the key is absent (a present null stays None)."""
    for k in (key, *family.aliases.get(key, ())):
        if k in config:
            return config[k]
    return family.defaults.get(key, _UNSET)


def _required(config: dict[str, Any], family: Family, key: str, kind: str) -> Any:
    value = _raw(config, family, key)
    if value is _UNSET or value is None:
        given = any(k in config for k in (key, *family.aliases.get(key, ())))
        raise CheckpointError(f"config.json: key {key!r} is {'null' if given else 'missing'}; fix: add it ({kind}, the value from the model's original config)")
    return value


def _int(config: dict[str, Any], family: Family, key: str, *, positive: bool = True) -> int:
    return _get({key: _required(config, family, key, "an integer")}, key, int, positive=positive)


def _float(config: dict[str, Any], family: Family, key: str) -> float:
    return _get({key: _required(config, family, key, "a number")}, key, float)


def _bool(config: dict[str, Any], family: Family, key: str) -> bool:
    value = _raw(config, family, key)
    if value is _UNSET:
        raise CheckpointError(f"config.json: key {key!r} is missing; fix: add it (true or false, the value from the model's original config)")
    if value is None:
        value = False
    if not isinstance(value, bool):
        raise CheckpointError(f"config.json: key {key!r} = {shown(value)}, expected true or false; fix: restore the original value")
    return value


def _routing_groups(config: dict[str, Any], family: Family, n_expert: int) -> tuple[int, int]:
    """(expert_group_count, expert_group_used_count) to write: what the router computes, and what llama.cpp can load.

    transformers' V3 router always scores groups (the sum of each group's two best biased scores) and keeps
    the best ``topk_group``: with ``topk_group == n_group`` that limits nothing, and llama.cpp aborts loading
    a file whose used count is not below its group count, so (1, 1) is written then.  V2 limits groups only
    with ``topk_method: group_limited_greedy`` (each group scored by its best score), which llama.cpp's graph
    does not compute: refused where it changes the choice.
    """
    if family.gating == "softmax":
        method = _raw(config, family, "topk_method")
        if method in (None, "greedy"):
            return 1, 1
        if method != "group_limited_greedy":
            raise _refuse("topk_method", method, "transformers' DeepseekV2 router knows 'greedy' and 'group_limited_greedy' only",
                          "restore the original value")
        n_group, topk_group = _int(config, family, "n_group"), _int(config, family, "topk_group")
        if topk_group >= n_group:
            return 1, 1
        llama_cpp_limit(_refuse("topk_method / n_group / topk_group", [method, n_group, topk_group],
                        "transformers keeps the best topk_group groups by each group's best score, while llama.cpp's deepseek2 graph scores a group "
                        "by the sum of its two best scores (DeepSeek V3's rule): the GGUF would route other tokens to other experts",
                        "none with this llama.cpp (llama.cpp's own converter writes such a file without a word)"))
        return n_group, topk_group  # for transformers (--format bnb), which computes it
    n_group, topk_group = _int(config, family, "n_group"), _int(config, family, "topk_group")
    if n_expert % n_group or n_expert // n_group < 2:
        raise _refuse("n_group", n_group, f"transformers' router splits the {n_expert} experts into n_group groups of at least 2 (it scores each "
                      "group by its two best experts)", "restore the original value")
    if topk_group > n_group:
        raise _refuse("topk_group", topk_group, f"more groups than n_group = {n_group} (transformers' router fails on it)", "restore the original value")
    if topk_group == n_group:
        return 1, 1
    return n_group, topk_group


def _check_routing_keys(config: dict[str, Any], family: Family) -> None:
    """Keys transformers ignores but the checkpoint's own (remote) code reads: refused where they say otherwise."""
    func = config.get("scoring_func")
    if family.needs_scoring_func and func is None:
        raise CheckpointError(f"config.json: key 'scoring_func' is missing: model_type {family.model_type!r} runs its own code, which reads it; "
                              "fix: add it (\"sigmoid\" in every published Kimi K2)")
    if func is not None and func != family.gating:
        raise _refuse("scoring_func", func, f"transformers' {family.model_type} router always scores experts with {family.gating} (it ignores "
                      "this key), while the checkpoint's own code would use the config's function", "use the model_type of the architecture these weights belong to")
    if family.gating == "sigmoid":
        method = config.get("topk_method")
        if method is not None and method != "noaux_tc":
            raise _refuse("topk_method", method, "transformers' DeepseekV3 router always selects with the bias-corrected scores ('noaux_tc')",
                          "restore the original value (noaux_tc)")
    elif _raw(config, family, "norm_topk_prob") not in (None, False):
        raise _refuse("norm_topk_prob", config.get("norm_topk_prob"), "transformers' DeepseekV2 router never renormalises the top-k weights "
                      "(it ignores this key) while DeepSeek's own code would", "none: the checkpoint's two references disagree")
    freq = config.get("moe_layer_freq", 1)
    if freq != 1:
        raise _refuse("moe_layer_freq", freq, "transformers makes every block past first_k_dense_replace a MoE block (it ignores this key), and so "
                      "does llama.cpp's deepseek2 graph", "none: such a model cannot run in this llama.cpp")


def yarn_keys(rope: dict[str, Any]) -> tuple[float, float]:
    """(L, R): llama.cpp's ``yarn_log_multiplier / 0.1`` and ``rope.scaling.attn_factor`` that reproduce transformers' YaRN.

    With factor ``s`` and ``g(s, m) = 1 + 0.1 m ln s``, transformers scales cos/sin by ``af``
    (``attention_factor``, else ``g(s, mscale) / g(s, mscale_all_dim)`` when both are given, else
    ``g(s, 1)``) and the attention logits by ``G^2`` (``G = g(s, mscale_all_dim)``, 1 without it).
    llama.cpp's deepseek2 graph (llama-context.cpp and src/models/deepseek2.cpp, ``s > 1``): with
    ``L != 0`` cos/sin get ``R`` and the logits ``(R (1 + 0.1 L ln s))^2``; with ``L == 0`` cos/sin
    get ``R g(s, 1)`` and the logits ``(R g(s, 1))^2``.  Equal for ``R = af`` and ``1 + 0.1 L ln s =
    G / af``, or, when ``G == af``, ``L = 0`` and ``R = af / g(s, 1)``.
    """
    s = float(rope["factor"])
    ln = math.log(s)
    g = lambda m: 1.0 + 0.1 * m * ln  # noqa: E731  (s > 1 is checked)
    mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
    af = rope.get("attention_factor")
    if af is None:
        af = g(mscale) / g(mscale_all) if mscale and mscale_all else g(1.0)
    big_g = g(mscale_all) if mscale_all else 1.0
    if not (af > 0 and big_g > 0 and math.isfinite(af) and math.isfinite(big_g)):
        raise _refuse("rope_parameters", {k: rope.get(k) for k in ("factor", "mscale", "mscale_all_dim", "attention_factor")},
                      f"YaRN's cos/sin scale ({af:.4g}) and attention scale ({big_g:.4g}) must be positive", "restore the original values")
    if math.isclose(big_g, af, rel_tol=1e-9):
        return 0.0, af / g(1.0)
    return (big_g / af - 1.0) / (0.1 * ln), af


def _check_yarn(rope: dict[str, Any], key: str) -> None:
    """YaRN parameters llama.cpp's deepseek2 graph computes as transformers does (see :func:`yarn_keys`)."""
    factor = float(rope["factor"])
    if not factor > 1.0:
        raise _refuse(f"{key}.factor", rope["factor"], "YaRN with a factor of at most 1 does not scale; llama.cpp's deepseek2 graph still applies its "
                      "attention-scale correction", 'use rope_type "default"')
    for k, default in (("beta_fast", YARN_BETA_FAST), ("beta_slow", YARN_BETA_SLOW)):
        value = rope.get(k) or default  # transformers: `or 32` / `or 1`
        if not isinstance(value, (int, float)) or isinstance(value, bool) or float(value) != default:
            error = _refuse(f"{key}.{k}", rope.get(k), f"llama.cpp's deepseek2 loader never reads the YaRN ramp bounds and always computes with "
                            f"beta_fast = {YARN_BETA_FAST:g}, beta_slow = {YARN_BETA_SLOW:g} (other rotary frequencies than transformers')",
                            "none with this llama.cpp")
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise error  # transformers cannot compute with it either
            llama_cpp_limit(error)
    if rope.get("truncate", True) is not True:
        llama_cpp_limit(_refuse(f"{key}.truncate", rope.get("truncate"), "llama.cpp rounds YaRN's correction range to whole dimensions (truncate = true)",
                        "none with this llama.cpp"))
    for k in ("mscale", "mscale_all_dim", "attention_factor"):
        v = rope.get(k)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
            raise _refuse(f"{key}.{k}", v, "expected a number", "restore the original value")
    if rope.get("attention_factor") is not None and not rope["attention_factor"] > 0:
        raise _refuse(f"{key}.attention_factor", rope["attention_factor"], "expected a positive number", "restore the original value")


def hparams_for(family: Family) -> Callable[[dict[str, Any]], DeepseekHparams]:
    def hparams(config: dict[str, Any]) -> DeepseekHparams:
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise _refuse("hidden_act", act, "llama.cpp's deepseek2 graph gates every feed-forward layer with SiLU", 'only hidden_act = "silu" converts')
        for key in ("attention_bias", "mlp_bias"):
            if config.get(key) not in (None, False):
                raise _refuse(key, config.get(key), "llama.cpp's deepseek2 graph has no projection biases", "none: such a model cannot run in this llama.cpp")
        _check_routing_keys(config, family)
        n_embd, n_head, n_layer = _get(config, "hidden_size", int), _get(config, "num_attention_heads", int), _get(config, "num_hidden_layers", int)
        n_head_kv = _get(config, "num_key_value_heads", int, n_head)
        if n_head_kv != n_head:  # kv_b_proj makes one key and value per query head; transformers would repeat them again
            raise _refuse("num_key_value_heads", n_head_kv, f"multi-head latent attention expands the latent into num_attention_heads = {n_head} "
                          "keys and values (transformers fails on any other value)", "set it to num_attention_heads")
        q_lora = _raw(config, family, "q_lora_rank")
        q_lora = 0 if q_lora is None else _get({"q_lora_rank": q_lora}, "q_lora_rank", int)
        n_expert = _int(config, family, "n_routed_experts")
        n_used = _int(config, family, "num_experts_per_tok")
        if not 1 <= n_used <= n_expert:
            raise _refuse("num_experts_per_tok", n_used, f"expected 1..n_routed_experts = {n_expert}", "restore the original config.json")
        if n_expert > LLAMA_MAX_EXPERTS:
            raise _refuse("n_routed_experts", n_expert, f"more than the {LLAMA_MAX_EXPERTS} experts llama.cpp supports (it aborts loading such a file)", "none with this llama.cpp")
        n_dense = _int(config, family, "first_k_dense_replace", positive=False)
        if n_dense >= n_layer:
            raise _refuse("first_k_dense_replace", n_dense, f"every one of the {n_layer} blocks would be dense (no MoE block)", "restore the original value")
        groups = _routing_groups(config, family, n_expert)
        rope_interleave = _bool(config, family, "rope_interleave") if "rope_interleave" in family.defaults else True
        n_nextn = _int(config, family, "num_nextn_predict_layers", positive=False) if "num_nextn_predict_layers" in family.defaults else 0
        rope = _rope(config)
        kind = str(rope.get("rope_type", rope.get("type", "default")))
        rope_key = next((k for k in ("rope_parameters", "rope_scaling") if config.get(k)), "rope_parameters")
        qk_nope, qk_rope = _int(config, family, "qk_nope_head_dim"), _int(config, family, "qk_rope_head_dim")
        if qk_rope % 2:
            raise _refuse("qk_rope_head_dim", qk_rope, "rotary embeddings pair the dimensions", "restore the original value")
        yarn_log_mul, rope_attn_factor = 0.0, 1.0
        if kind == "yarn":
            _check_yarn(rope, rope_key)
            yarn_log_mul, rope_attn_factor = yarn_keys(rope)
            if not all(np.isfinite(np.float32(v)) and np.float32(v) != 0 or v == 0 for v in (0.1 * yarn_log_mul, rope_attn_factor)):
                llama_cpp_limit(_refuse(rope_key, rope, "its YaRN attention scales do not fit the float32 keys llama.cpp reads", "restore the original values"))
        elif kind != "default":
            raise _refuse(f"{rope_key}.rope_type", kind, "llama.cpp's deepseek2 graph computes default and YaRN rotary embeddings only "
                          "(its attention scale follows YaRN's)", "use the original config.json")
        theta = _get(config, "rope_theta", float, None)
        if theta is None:
            theta = rope.get("rope_theta", 10000.0)
            if theta is None:  # transformers would compute with no base at all
                raise _refuse(f"{rope_key}.rope_theta", None, "expected a positive number", "restore the original value")
        tie = config.get("tie_word_embeddings")
        if tie is not None and not isinstance(tie, bool):
            raise CheckpointError(f"config.json: key 'tie_word_embeddings' = {shown(tie)}, expected true or false; fix: restore the original value")
        return DeepseekHparams(
            n_vocab=_get(config, "vocab_size", int), n_embd=n_embd, n_ff=_get(config, "intermediate_size", int), n_layer=n_layer,
            n_head=n_head, n_head_kv=1, head_dim=qk_nope + qk_rope, n_ctx=_context_length(config),
            norm_eps=_get(config, "rms_norm_eps", float, 1e-6), rope_theta=theta,
            rope=rope, tie_embeddings=bool(tie), n_expert=n_expert, n_expert_used=n_used,
            q_lora_rank=q_lora, kv_lora_rank=_int(config, family, "kv_lora_rank"), qk_nope_head_dim=qk_nope, qk_rope_head_dim=qk_rope,
            v_head_dim=_int(config, family, "v_head_dim"), n_ff_exp=_int(config, family, "moe_intermediate_size"),
            n_expert_shared=_int(config, family, "n_shared_experts"), n_dense_lead=n_dense, gating=family.gating,
            score_bias=family.gating == "sigmoid", weights_norm=family.gating == "sigmoid" and _bool(config, family, "norm_topk_prob"),
            weights_scale=_float(config, family, "routed_scaling_factor"), n_group=groups[0], n_group_used=groups[1],
            rope_interleave=rope_interleave, n_nextn=n_nextn, yarn_log_mul=yarn_log_mul, rope_attn_factor=rope_attn_factor,
        )

    return hparams


# --------------------------------------------------------------------------- transforms


@dataclass(frozen=True)
class KvBSplit(Transform):
    """``kv_b_proj`` [heads * (nope + v), kv_lora] -> ``attn_k_b`` [heads, kv_lora, nope] (each head's key rows
    transposed: llama.cpp multiplies the queries by them) or ``attn_v_b`` [heads, v, kv_lora]."""

    value: bool = False

    def out_shape(self, shape: tuple[int, ...], hparams: Any) -> tuple[int, ...]:
        h = hparams
        return (h.n_head, h.v_head_dim, h.kv_lora_rank) if self.value else (h.n_head, h.kv_lora_rank, h.qk_nope_head_dim)

    def apply(self, a: np.ndarray, hparams: Any) -> np.ndarray:
        h = hparams
        kv = a.reshape(h.n_head, h.qk_nope_head_dim + h.v_head_dim, a.shape[-1])
        if self.value:
            return np.ascontiguousarray(kv[:, h.qk_nope_head_dim :])
        return np.ascontiguousarray(kv[:, : h.qk_nope_head_dim].transpose(0, 2, 1))


@dataclass(frozen=True)
class RopeRowsToPairs(Transform):
    """The rotary rows of a query (per head, after the ``nope`` rows) or of ``kv_a_proj_with_mqa`` (after the
    ``kv_lora`` rows) from transformers' rotate-half order to llama.cpp's interleaved pairs; the identity when
    the checkpoint already rotates pairs (``rope_interleave``, always in V2)."""

    kv: bool = False

    def apply(self, a: np.ndarray, hparams: Any) -> np.ndarray:
        h = hparams
        if h.rope_interleave:
            return a
        heads, start = (1, h.kv_lora_rank) if self.kv else (h.n_head, h.qk_nope_head_dim)
        w = np.array(a).reshape(heads, -1, a.shape[-1])
        for i in range(heads):
            w[i, start:] = permute_rows(w[i, start:], 1)
        return w.reshape(a.shape)


K_B = KvBSplit("kv_b_to_k_b", value=False)
V_B = KvBSplit("kv_b_to_v_b", value=True)
Q_ROPE = RopeRowsToPairs("q_rope_pairs", kv=False)
KV_ROPE = RopeRowsToPairs("kv_rope_pairs", kv=True)


# --------------------------------------------------------------------------- the name table

_ATTN = "model.layers.{bid}.self_attn."
ATTENTION_RULES: tuple[Rule, ...] = (
    _p("model.embed_tokens.weight", T.TOKEN_EMBD, Role.EMBEDDINGS, lambda h: (h.n_vocab, h.n_embd)),
    _p("model.layers.{bid}.input_layernorm.weight", T.ATTN_NORM, Role.NORM, lambda h: (h.n_embd,)),
    _p(_ATTN + "kv_a_proj_with_mqa.weight", T.ATTN_KV_A_MQA, Role.ATTENTION, lambda h: (h.kv_lora_rank + h.qk_rope_head_dim, h.n_embd), KV_ROPE),
    _p(_ATTN + "kv_a_layernorm.weight", T.ATTN_KV_A_NORM, Role.NORM, lambda h: (h.kv_lora_rank,)),
    _p(_ATTN + "kv_b_proj.weight", T.ATTN_K_B, Role.ATTENTION, lambda h: (h.n_head * (h.qk_nope_head_dim + h.v_head_dim), h.kv_lora_rank), K_B),
    _p(_ATTN + "kv_b_proj.weight", T.ATTN_V_B, Role.ATTENTION, lambda h: (h.n_head * (h.qk_nope_head_dim + h.v_head_dim), h.kv_lora_rank), V_B),
    _p(_ATTN + "o_proj.weight", T.ATTN_OUT, Role.ATTENTION, lambda h: (h.n_embd, h.n_head * h.v_head_dim)),
    _p("model.layers.{bid}.post_attention_layernorm.weight", T.FFN_NORM, Role.NORM, lambda h: (h.n_embd,)),
)
def _q_lora(h: DeepseekHparams) -> int:
    """q_lora_rank for the shape of a low-rank query tensor: the checkpoint has them, config.json must say so."""
    if not h.q_lora_rank:
        raise CheckpointError("checkpoint: config.json q_lora_rank = None but the checkpoint has q_a_proj / q_b_proj (low-rank queries); "
                              "fix: use the config.json that belongs to these weights")
    return h.q_lora_rank


Q_LORA_RULES: tuple[Rule, ...] = (
    _p(_ATTN + "q_a_proj.weight", T.ATTN_Q_A, Role.ATTENTION, lambda h: (_q_lora(h), h.n_embd)),
    _p(_ATTN + "q_a_layernorm.weight", T.ATTN_Q_A_NORM, Role.NORM, lambda h: (_q_lora(h),)),
    _p(_ATTN + "q_b_proj.weight", T.ATTN_Q_B, Role.ATTENTION, lambda h: (h.n_head * h.qk_head_dim, _q_lora(h)), Q_ROPE),
)
Q_RULES: tuple[Rule, ...] = (
    _p(_ATTN + "q_proj.weight", T.ATTN_Q, Role.ATTENTION, lambda h: (h.n_head * h.qk_head_dim, h.n_embd), Q_ROPE),
)
#: leading dense blocks only (optional rows: :func:`check` says which blocks must have them)
DENSE_RULES: tuple[Rule, ...] = (
    _p("model.layers.{bid}.mlp.gate_proj.weight", T.FFN_GATE, Role.FFN, lambda h: (h.n_ff, h.n_embd), optional=True),
    _p("model.layers.{bid}.mlp.up_proj.weight", T.FFN_UP, Role.FFN, lambda h: (h.n_ff, h.n_embd), optional=True),
    _p("model.layers.{bid}.mlp.down_proj.weight", T.FFN_DOWN, Role.FFN, lambda h: (h.n_embd, h.n_ff), optional=True),
)
_SHEXP = "model.layers.{bid}.mlp.shared_experts."
SHARED_RULES: tuple[Rule, ...] = (  # an always-on MLP: not an expert in general.size_label, as llama.cpp's converter counts it
    _p(_SHEXP + "gate_proj.weight", T.FFN_GATE_SHEXP, Role.FFN, lambda h: (h.n_ff_exp * h.n_expert_shared, h.n_embd), optional=True),
    _p(_SHEXP + "up_proj.weight", T.FFN_UP_SHEXP, Role.FFN, lambda h: (h.n_ff_exp * h.n_expert_shared, h.n_embd), optional=True),
    _p(_SHEXP + "down_proj.weight", T.FFN_DOWN_SHEXP, Role.FFN, lambda h: (h.n_embd, h.n_ff_exp * h.n_expert_shared), optional=True),
)
#: V3's selection bias: 1-D, F32 like every vector (transformers keeps it in float32 too)
SCORE_BIAS_RULE = Rule("model.layers.{bid}.mlp.gate.e_score_correction_bias", T.FFN_EXP_PROBS_B + ".bias", Role.ROUTER, lambda h: (h.n_expert,), optional=True)


def rules_for(family: Family) -> Callable[[list[str]], tuple[Rule, ...]]:
    def rules(names: list[str]) -> tuple[Rule, ...]:
        lora = any(n.endswith(".self_attn.q_a_proj.weight") for n in names)  # q_lora_rank must agree: checked in check()
        moe = tuple(dataclasses.replace(r, optional=True) for r in moe_rules(names, lambda h: h.n_ff_exp))
        bias = (SCORE_BIAS_RULE,) if family.gating == "sigmoid" else ()
        return ATTENTION_RULES + (Q_LORA_RULES if lora else Q_RULES) + DENSE_RULES + moe + bias + SHARED_RULES + head_rules(names)

    return rules


def dropped(h: DeepseekHparams) -> tuple[str, ...]:
    """The multi-token-prediction blocks V3 checkpoints store after the last block: dropped, as llama.cpp's converter does."""
    if not h.n_nextn:
        return ()
    return (r"^model\.layers\.(?:" + "|".join(str(b) for b in range(h.n_layer, h.n_layer + h.n_nextn)) + r")\.",)


# --------------------------------------------------------------------------- checks and metadata


def _block_kinds(h: DeepseekHparams) -> dict[str, Callable[[int], bool]]:
    """GGUF tensor base name -> which blocks must hold it."""
    dense = lambda b: b < h.n_dense_lead  # noqa: E731
    moe = lambda b: b >= h.n_dense_lead  # noqa: E731
    out: dict[str, Callable[[int], bool]] = {T.FFN_GATE: dense, T.FFN_UP: dense, T.FFN_DOWN: dense}
    for name in (T.FFN_GATE_INP, T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP, T.FFN_GATE_SHEXP, T.FFN_UP_SHEXP, T.FFN_DOWN_SHEXP):
        out[name] = moe
    return out


_HF_NAME = {
    T.FFN_GATE: "mlp.gate_proj.weight", T.FFN_UP: "mlp.up_proj.weight", T.FFN_DOWN: "mlp.down_proj.weight", T.FFN_GATE_INP: "mlp.gate.weight",
    T.FFN_GATE_EXP: "mlp.experts.0.gate_proj.weight (or mlp.experts.gate_up_proj)", T.FFN_UP_EXP: "mlp.experts.0.up_proj.weight (or mlp.experts.gate_up_proj)",
    T.FFN_DOWN_EXP: "mlp.experts.0.down_proj.weight (or mlp.experts.down_proj)", T.FFN_GATE_SHEXP: "mlp.shared_experts.gate_proj.weight",
    T.FFN_UP_SHEXP: "mlp.shared_experts.up_proj.weight", T.FFN_DOWN_SHEXP: "mlp.shared_experts.down_proj.weight",
    T.FFN_EXP_PROBS_B: "mlp.gate.e_score_correction_bias",
}


def check(h: DeepseekHparams, tensors: list[OutTensor]) -> None:
    """Dense blocks before ``first_k_dense_replace``, MoE blocks after it; the queries as ``q_lora_rank`` says."""
    have = {t.name for t in tensors}
    kinds = _block_kinds(h)
    if h.score_bias:
        kinds[T.FFN_EXP_PROBS_B] = lambda b: b >= h.n_dense_lead
    for bid in range(h.n_layer):
        for base, wanted in kinds.items():
            name = base.replace("{bid}", str(bid)) + (".bias" if base == T.FFN_EXP_PROBS_B else ".weight")
            hf = f"model.layers.{bid}.{_HF_NAME[base]}"
            if wanted(bid) and name not in have:
                raise CheckpointError(f"checkpoint: tensor {hf!r} is missing (config.json first_k_dense_replace = {h.n_dense_lead} makes block {bid} "
                                      f"{'dense' if bid < h.n_dense_lead else 'a MoE block'}); fix: re-download the checkpoint, or use the config.json that belongs to these weights")
            if not wanted(bid) and name in have:
                raise CheckpointError(f"checkpoint: tensor {hf!r} is in block {bid}, which config.json first_k_dense_replace = {h.n_dense_lead} makes "
                                      f"{'dense' if bid < h.n_dense_lead else 'a MoE block'}; fix: use the config.json that belongs to these weights")
    if h.q_lora_rank and not any(t.name.endswith(".attn_q_a.weight") for t in tensors):  # the other way round: _q_lora
        raise CheckpointError(f"checkpoint: config.json q_lora_rank = {h.q_lora_rank} but the checkpoint has q_proj (no q_a_proj / q_b_proj); "
                              "fix: use the config.json that belongs to these weights")
    _check_common(h, tensors)




@dataclass(frozen=True)
class GroupedMoeHparams(Hparams):
    """The MoE hyperparameters of a DeepSeek-style router without MLA (dots1, glm4moe): what :func:`routing_metadata` writes."""

    n_ff_exp: int = 0  # moe_intermediate_size: one routed expert's width
    n_expert_shared: int = 0  # n_shared_experts: the shared MLP is n_ff_exp * n_expert_shared wide
    n_dense_lead: int = 0  # first_k_dense_replace
    weights_norm: bool = False  # norm_topk_prob
    weights_scale: float = 1.0  # routed_scaling_factor
    n_group: int = 1  # as written: 1 when the top-k is not limited to groups
    n_group_used: int = 1

def routing_metadata(h: Any, arch: str, gating: str) -> dict[str, MetaValue]:
    """The routing keys of a DeepSeek-style router, every one always, from what the architecture computes (not from
    what config.json happens to hold: a missing gating function is softmax to llama.cpp, and dots1 aborts without it):
    the gating function, top-k renormalisation and scale, expert groups.  ``h`` has weights_norm / weights_scale /
    n_group / n_group_used."""
    K, V = gguf_spec.Keys, gguf_spec.GGUFValueType
    return {
        K.LLM.EXPERT_GATING_FUNC.format(arch=arch): MetaValue(GATING_FUNC[gating], V.UINT32),
        K.LLM.EXPERT_WEIGHTS_NORM.format(arch=arch): MetaValue(bool(h.weights_norm), V.BOOL),
        K.LLM.EXPERT_WEIGHTS_SCALE.format(arch=arch): MetaValue(float(h.weights_scale), V.FLOAT32),
        K.LLM.EXPERT_GROUP_COUNT.format(arch=arch): MetaValue(int(h.n_group), V.UINT32),
        K.LLM.EXPERT_GROUP_USED_COUNT.format(arch=arch): MetaValue(int(h.n_group_used), V.UINT32),
    }

def metadata(h: DeepseekHparams, arch: str = ARCH) -> dict[str, MetaValue]:
    """The deepseek2 keys; ``arch``: the GGUF arch whose loader reads the same keys (deepseek32, glm-dsa)."""
    K, V = gguf_spec.Keys, gguf_spec.GGUFValueType
    a = arch
    u32 = lambda v: MetaValue(int(v), V.UINT32)  # noqa: E731
    f32 = lambda v: MetaValue(float(v), V.FLOAT32)  # noqa: E731
    md = {
        K.LLM.CONTEXT_LENGTH.format(arch=a): u32(h.n_ctx),
        K.LLM.EMBEDDING_LENGTH.format(arch=a): u32(h.n_embd),
        K.LLM.BLOCK_COUNT.format(arch=a): u32(h.n_layer),
        K.LLM.FEED_FORWARD_LENGTH.format(arch=a): u32(h.n_ff),
        K.LLM.VOCAB_SIZE.format(arch=a): u32(h.n_vocab),
        K.LLM.LEADING_DENSE_BLOCK_COUNT.format(arch=a): u32(h.n_dense_lead),
        K.Attention.HEAD_COUNT.format(arch=a): u32(h.n_head),
        K.Attention.HEAD_COUNT_KV.format(arch=a): u32(1),  # MLA runs as MQA over the latent
        K.Attention.KEY_LENGTH.format(arch=a): u32(h.kv_lora_rank + h.qk_rope_head_dim),
        K.Attention.VALUE_LENGTH.format(arch=a): u32(h.kv_lora_rank),
        K.Attention.KEY_LENGTH_MLA.format(arch=a): u32(h.qk_head_dim),
        K.Attention.VALUE_LENGTH_MLA.format(arch=a): u32(h.v_head_dim),
        K.Attention.Q_LORA_RANK.format(arch=a): u32(h.q_lora_rank),  # 0: attn_q (see the module docstring)
        K.Attention.KV_LORA_RANK.format(arch=a): u32(h.kv_lora_rank),
        K.Attention.LAYERNORM_RMS_EPS.format(arch=a): f32(h.norm_eps),
        K.Rope.DIMENSION_COUNT.format(arch=a): u32(h.qk_rope_head_dim),
        K.Rope.FREQ_BASE.format(arch=a): f32(h.rope_theta),
        K.LLM.EXPERT_COUNT.format(arch=a): u32(h.n_expert),
        K.LLM.EXPERT_USED_COUNT.format(arch=a): u32(h.n_expert_used),
        K.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=a): u32(h.n_ff_exp),
        K.LLM.EXPERT_SHARED_COUNT.format(arch=a): u32(h.n_expert_shared),
        # routing: every key, always (a missing gating function is softmax to llama.cpp)
        **routing_metadata(h, a, h.gating),
    }
    if h.rope_type == "yarn":
        md[K.Rope.SCALING_TYPE.format(arch=a)] = MetaValue("yarn", V.STRING)
        md[K.Rope.SCALING_FACTOR.format(arch=a)] = f32(h.rope["factor"])
        md[K.Rope.SCALING_ORIG_CTX_LEN.format(arch=a)] = u32(h.rope.get("original_max_position_embeddings") or h.n_ctx)
        if h.yarn_log_mul:
            md[K.Rope.SCALING_YARN_LOG_MUL.format(arch=a)] = f32(0.1 * h.yarn_log_mul)  # llama.cpp divides by 0.1 ([TAG_DEEPSEEK2_YARN_LOG_MUL_FIX])
        if h.rope_attn_factor != 1.0:
            md[K.Rope.SCALING_ATTN_FACTOR.format(arch=a)] = f32(h.rope_attn_factor)
    return md


NOTES = (
    "kv_b_proj is split per head into attn_k_b (transposed) and attn_v_b, as llama.cpp's converter and graph expect",
    "expert_gating_func, expert_weights_norm/scale and expert_group_count/used_count are always written from what transformers computes",
)
#: V3 (and Kimi K2) only: V2 has no MTP block
MTP_NOTE = "multi-token-prediction blocks past num_hidden_layers (num_nextn_predict_layers) are dropped, as llama.cpp's converter drops them for deepseek2"


def register_family(family: Family, hf_architectures: tuple[str, ...], routing: Routing, notes: tuple[str, ...] = (),
                    hf_experts: HfExperts | None = None) -> Converter:
    return register(Converter(
        model_type=family.model_type, arch=ARCH, hparams=hparams_for(family), rules=rules_for(family), metadata=metadata, check=check,
        ignore=IGNORE, hf_architectures=hf_architectures, routing=routing, notes=NOTES + notes, dropped=dropped,
        # --format bnb: declared by each family (MLP_EXPERTS: experts under mlp.experts.{xid}, router mlp.gate with V3's
        # e_score_correction_bias buffer under its own key; leading dense blocks and shared experts are plain 4-bit MLPs; V3's MTP
        # blocks are dropped by the name table)
        hf_experts=hf_experts,
    ))
