"""``model_type: llama4`` / ``llama4_text``: Llama 4 text models (Scout 17B-16E, Maverick 17B-128E) -> GGUF arch ``llama4``.

What differs from Llama (llama.cpp's ``src/models/llama4.cpp``, ``conversion/llama.py``
``Llama4Model``; transformers' ``modeling_llama4.py``):

* interleaved blocks: every ``interleave_moe_layer_step``-th block (``(i + 1) % step == 0``)
  has experts, the others a dense MLP ``intermediate_size_mlp`` wide (``feed_forward_length``);
  the step is written as ``interleave_moe_layer_step``;
* a MoE block: a router ``feed_forward.router`` -> ``ffn_gate_inp``, routed experts and a
  shared expert (``feed_forward.shared_expert`` -> ``ffn_{gate,up,down}_shexp``) both
  ``intermediate_size`` wide (``expert_feed_forward_length``), added together;
* experts stored fused and transposed, the only layout transformers has: ``experts.gate_up_proj``
  [E, hidden, 2*ffn] (gate in the first ffn columns) and ``experts.down_proj`` [E, ffn, hidden]
  -> llama.cpp's [E, ffn, hidden] / [E, hidden, ffn] rows (:class:`HalfColumnsT`, :class:`Transposed`);
* rotary embeddings on adjacent pairs (transformers' complex rotation), llama.cpp's own layout:
  q/k rows written as they are; llama3 rope scaling (Scout's, with ``low_freq_factor ==
  high_freq_factor``) as a generated ``rope_freqs``;
* every 4th block has no rotary embeddings (NoPE) and attends to the whole context, the others
  attend within chunks of ``attention_chunk_size`` tokens; rotary blocks L2-normalise q and k
  (``use_qk_norm``); NoPE blocks scale the queries by ``log(floor((pos + 1) / floor_scale) + 1) *
  attn_scale + 1`` (``attn_temperature_tuning``).  llama.cpp hard-codes all of it (chunk 8192,
  floor 8192, scale 0.1, NoPE every 4th block, q/k norm unless the model has 128 experts): a
  config.json that says otherwise is refused, naming its key;
* the published checkpoints are vision-language models (``Llama4ForConditionalGeneration``,
  ``text_config``, the language model under ``language_model.``): the text model is converted,
  the vision tower and projector (``vision_model.*``, ``multi_modal_projector.*``) are left out
  (llama.cpp's converter writes them to a separate mmproj file).

Routing: the top-k experts by router logit, each weighted by the sigmoid of its logit, and that
weight multiplies the expert's input (not its output) in both programs; no renormalisation.
Refused besides the hard-coded values above: fewer than 4 blocks (no NoPE block: llama.cpp aborts
running it), ``attention_bias``, rope scaling other than llama3,
an explicit ``moe_layers`` that is not every step-th block, an activation other than SiLU.
``--format bnb`` is not offered: transformers' ``Llama4TextExperts`` takes its inputs pre-weighted
and sorted by expert, a module quantkit's per-expert 4-bit loader does not stand in for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from quantkit.converters import Converter, Routing, register
from quantkit.converters.llama import IGNORE, ROPE_KEYS, T, Hparams, _get, _p, generated_tensors
from quantkit.converters.llama import check_hparams as _check_common
from quantkit.converters.llama import metadata as _common_metadata
from quantkit.errors import CheckpointError
from quantkit.format import gguf_spec
from quantkit.format.gguf_write import MetaValue
from quantkit.hf.checkpoint import shown
from quantkit.hf.mapping import OutTensor, Role, Rule, Transposed, TransposedHalf

log = logging.getLogger(__name__)

MODEL_TYPE = "llama4"
TEXT_MODEL_TYPE = "llama4_text"  # what Llama4ForCausalLM.save_pretrained writes
ARCH = "llama4"  # gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA4]

#: what llama.cpp's llama4 graph hard-codes (src/models/llama4.cpp, llama-hparams.h), with the config key it stands for
CHUNK = 8192  # attention_chunk_size: n_swa of LLAMA_SWA_TYPE_CHUNKED
FLOOR_SCALE = 8192  # floor_scale: n_attn_temp_floor_scale
ATTN_SCALE = 0.1  # attn_scale: f_attn_temp_scale
NOPE_STEP = 4  # no_rope_layers: n_no_rope_layer_step (blocks (i + 1) % 4 == 0 have no rope and full attention)
NO_QK_NORM_EXPERTS = 128  # use_qk_norm: llama.cpp L2-normalises q/k unless the model has 128 experts (Maverick)
#: transformers' Llama4TextConfig defaults for the keys read here (a config.json may leave them out)
DEFAULTS: dict[str, Any] = {
    "head_dim": 128, "intermediate_size": 8192, "intermediate_size_mlp": 16384, "num_local_experts": 16, "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 1, "use_qk_norm": True, "no_rope_layer_interval": 4, "attention_chunk_size": 8192,
    "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1, "attention_bias": False, "rms_norm_eps": 1e-5,
}
DEFAULT_THETA = 500000.0  # Llama4TextConfig.default_theta
#: the vision tower and its projector: llama.cpp's converter writes them to a separate mmproj file
VISION = (r"^vision_model\.", r"^multi_modal_projector\.")


@dataclass(frozen=True)
class Llama4Hparams(Hparams):
    n_ff_exp: int = 0  # intermediate_size: one routed expert's width, and the shared expert's
    moe_step: int = 1  # interleave_moe_layer_step

    def is_moe(self, bid: int) -> bool:
        return (bid + 1) % self.moe_step == 0


def _refuse(key: str, value: object, why: str, fix: str) -> CheckpointError:
    said = ("true" if value else "false") if isinstance(value, bool) else "null" if value is None else shown(value)  # as config.json says it
    return CheckpointError(f"config.json: {key} = {said}: {why}; fix: {fix}")


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's keys: ``text_config`` over the top level (a vision-language config.json), as llama.cpp reads them."""
    inner = config.get("text_config")
    if inner is None:
        return config
    if not isinstance(inner, dict):
        raise CheckpointError(f"config.json: key 'text_config' = {shown(inner)}, expected an object; fix: restore the original value")
    return {**config, **inner}


def _bool(config: dict[str, Any], key: str) -> bool:
    value = config.get(key, DEFAULTS[key])
    if not isinstance(value, bool):
        raise CheckpointError(f"config.json: key {key!r} = {shown(value)}, expected true or false; fix: restore the original value")
    return value


def _int_list(config: dict[str, Any], key: str, n: int, allowed: tuple[int, ...] | None = None) -> list[int] | None:
    value = config.get(key)
    if value is None:
        return None
    ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if ok and allowed is not None:
        ok = len(value) >= n and all(v in allowed for v in value)
    if not ok:
        want = f"a list of at least {n} of {' / '.join(map(str, allowed))}" if allowed else "a list of block numbers"
        raise CheckpointError(f"config.json: key {key!r} = {shown(value)}, expected {want}; fix: restore the original value")
    return value


def _rope_config(cfg: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    """``cfg`` as :meth:`Hparams.from_config` checks it, and Scout's ``high_freq_factor`` when it equals ``low_freq_factor``.

    Llama 4's llama3 rope scaling has no band between the low and high frequencies (both factors 1.0): the
    smoothing formula that divides by their difference is never reached, in transformers as in llama.cpp's
    converter.  The shared check refuses equal factors, so it sees a stand-in; the real value is put back after.
    """
    key = next((k for k in ROPE_KEYS if cfg.get(k)), None)
    rope = cfg.get(key) if key else None
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type")) != "llama3":
        return cfg, None
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    if low != high or isinstance(low, bool) or not isinstance(low, (int, float)):
        return cfg, None
    return {**cfg, key: {**rope, "high_freq_factor": float(low) + 1.0}}, float(high)


def _check_attention(cfg: dict[str, Any], n_layer: int) -> None:
    """NoPE blocks, chunked attention, temperature tuning: what llama.cpp's llama4 graph hard-codes."""
    pattern = [int((i + 1) % NOPE_STEP != 0) for i in range(n_layer)]  # 1: rope and chunked attention
    no_rope = _int_list(cfg, "no_rope_layers", n_layer, (0, 1)) or None
    if no_rope is None:
        interval = _get(cfg, "no_rope_layer_interval", int, DEFAULTS["no_rope_layer_interval"])
        no_rope = [int((i + 1) % interval != 0) for i in range(n_layer)]
        key, value = "no_rope_layer_interval", interval
    else:
        key, value = "no_rope_layers", no_rope
    if no_rope[:n_layer] != pattern:
        raise _refuse(key, value, f"llama.cpp's llama4 graph drops rotary embeddings in every {NOPE_STEP}th block exactly (blocks {NOPE_STEP - 1}, {2 * NOPE_STEP - 1}, ...; hard-coded)",
                      "none with this llama.cpp: only the published layout (no_rope_layer_interval = 4) converts")
    types = cfg.get("layer_types")
    want = ["chunked_attention" if r else "full_attention" for r in pattern]
    if types is not None and types != want:
        raise _refuse("layer_types", types, "llama.cpp's llama4 graph attends within chunks in the blocks with rotary embeddings and to the whole context in the "
                      f"others (every {NOPE_STEP}th block; hard-coded)", "none with this llama.cpp: only the published layout converts")
    chunk = cfg.get("attention_chunk_size", DEFAULTS["attention_chunk_size"])
    if chunk != CHUNK or isinstance(chunk, bool):
        raise _refuse("attention_chunk_size", chunk, f"llama.cpp's llama4 graph attends within chunks of {CHUNK} tokens (hard-coded)",
                      f"none with this llama.cpp: only attention_chunk_size = {CHUNK} (the published models') converts")
    if not _bool(cfg, "attn_temperature_tuning"):
        raise _refuse("attn_temperature_tuning", False, "llama.cpp's llama4 graph always scales the queries of its NoPE blocks beyond position 8191",
                      "none with this llama.cpp: only attn_temperature_tuning = true (the published models') converts")
    floor = cfg.get("floor_scale", DEFAULTS["floor_scale"])
    if floor != FLOOR_SCALE or isinstance(floor, bool):
        raise _refuse("floor_scale", floor, f"llama.cpp's llama4 graph tunes the attention temperature with floor_scale {FLOOR_SCALE} (hard-coded)",
                      f"none with this llama.cpp: only floor_scale = {FLOOR_SCALE} converts")
    scale = _get(cfg, "attn_scale", float, DEFAULTS["attn_scale"], positive=False)
    if np.float32(scale) != np.float32(ATTN_SCALE):
        raise _refuse("attn_scale", scale, f"llama.cpp's llama4 graph tunes the attention temperature with attn_scale {ATTN_SCALE} (hard-coded)",
                      f"none with this llama.cpp: only attn_scale = {ATTN_SCALE} converts")


def hparams(config: dict[str, Any]) -> Llama4Hparams:
    cfg = text_config(config)
    cfg = {**{k: v for k, v in DEFAULTS.items() if k not in cfg}, **cfg}  # null stays null (head_dim: hidden / heads, attention_chunk_size: none)
    rope = next((cfg[k] for k in ROPE_KEYS if cfg.get(k)), None)
    if cfg.get("rope_theta") is None and not (isinstance(rope, dict) and rope.get("rope_theta") is not None):
        cfg["rope_theta"] = DEFAULT_THETA
    checked, high = _rope_config(cfg)
    # the dense blocks' MLP is intermediate_size_mlp wide (feed_forward_length), the experts intermediate_size;
    # sliding_window is no Llama 4 key (llama.cpp would read it as "no chunked attention")
    base = Hparams.from_config({**{k: v for k, v in checked.items() if k != "sliding_window"}, "intermediate_size": cfg["intermediate_size_mlp"]})
    if high is not None:
        base = replace(base, rope={**base.rope, "high_freq_factor": high})
    n_expert = base.n_expert
    if not 1 <= base.n_expert_used <= n_expert:
        raise CheckpointError(f"config.json: num_experts_per_tok = {base.n_expert_used}, expected 1..num_local_experts = {n_expert}; fix: restore the original config.json")
    if base.n_layer < NOPE_STEP:
        raise _refuse("num_hidden_layers", base.n_layer, f"llama.cpp's llama4 graph aborts the process (GGML_ASSERT) running a model without a NoPE block "
                      f"(one every {NOPE_STEP}th block)", f"none with this llama.cpp: only models of at least {NOPE_STEP} blocks convert")
    step = _get(cfg, "interleave_moe_layer_step", int)
    moe = _int_list(cfg, "moe_layers", base.n_layer)
    if moe is not None and moe != list(range(step - 1, base.n_layer, step)):
        raise _refuse("moe_layers", moe, f"llama.cpp's llama4 graph has experts in every interleave_moe_layer_step-th block ({step}: blocks "
                      f"{list(range(step - 1, base.n_layer, step))[:8]}) and no other", "none with this llama.cpp: only evenly interleaved MoE blocks convert")
    if _bool(cfg, "attention_bias"):
        raise _refuse("attention_bias", True, "llama.cpp's llama4 converter and graph have no attention biases", "none: only checkpoints without them (every published Llama 4) convert")
    qk_norm = _bool(cfg, "use_qk_norm")
    if qk_norm != (n_expert != NO_QK_NORM_EXPERTS):
        does = "normalises q/k in rotary blocks unless the model has 128 experts" if qk_norm is False else "never normalises q/k in a model with 128 experts"
        raise _refuse("use_qk_norm", qk_norm, f"llama.cpp's llama4 graph {does} (hard-coded; num_local_experts = {n_expert})",
                      "none with this llama.cpp: Scout (16 experts) has use_qk_norm = true, Maverick (128) false")
    _check_attention(cfg, base.n_layer)
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    return Llama4Hparams(**{**fields, "n_ff_exp": _get(cfg, "intermediate_size", int), "moe_step": step})


# --------------------------------------------------------------------------- transforms


@dataclass(frozen=True)
class HalfColumnsT(TransposedHalf):
    """One expert's ``gate_up_proj`` [hidden, 2*ffn] (transformers' ``x @ W``, gate in the first ffn columns) -> the gate
    (``first``) or up rows [ffn, hidden]: llama.cpp's converter's ``transpose(-1, -2).split(ffn, dim=-2)``."""

    def select(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        half = a.shape[-1] // 2
        return np.ascontiguousarray((a[:, :half] if self.first else a[:, half:]).T)


GATE_T = HalfColumnsT("gate_first_columns_t", first=True)
UP_T = HalfColumnsT("up_second_columns_t", first=False)
DOWN_T = Transposed("transposed")


# --------------------------------------------------------------------------- name table

_BLOCK = "model.layers.{bid}."
_FF = _BLOCK + "feed_forward."
TRUNK_RULES: tuple[Rule, ...] = (
    _p("model.embed_tokens.weight", T.TOKEN_EMBD, Role.EMBEDDINGS, lambda h: (h.n_vocab, h.n_embd)),
    _p(_BLOCK + "input_layernorm.weight", T.ATTN_NORM, Role.NORM, lambda h: (h.n_embd,)),
    # adjacent-pair rotary embeddings in both programs: q/k rows as they are (llama.cpp's converter: undo_permute = False)
    _p(_BLOCK + "self_attn.q_proj.weight", T.ATTN_Q, Role.ATTENTION, lambda h: (h.n_head * h.head_dim, h.n_embd)),
    _p(_BLOCK + "self_attn.k_proj.weight", T.ATTN_K, Role.ATTENTION, lambda h: (h.n_head_kv * h.head_dim, h.n_embd)),
    _p(_BLOCK + "self_attn.v_proj.weight", T.ATTN_V, Role.ATTENTION, lambda h: (h.n_head_kv * h.head_dim, h.n_embd)),
    _p(_BLOCK + "self_attn.o_proj.weight", T.ATTN_OUT, Role.ATTENTION, lambda h: (h.n_embd, h.n_head * h.head_dim)),
    _p(_BLOCK + "post_attention_layernorm.weight", T.FFN_NORM, Role.NORM, lambda h: (h.n_embd,)),
    # a dense block (optional here: check() says which blocks have which)
    _p(_FF + "gate_proj.weight", T.FFN_GATE, Role.FFN, lambda h: (h.n_ff, h.n_embd), optional=True),
    _p(_FF + "up_proj.weight", T.FFN_UP, Role.FFN, lambda h: (h.n_ff, h.n_embd), optional=True),
    _p(_FF + "down_proj.weight", T.FFN_DOWN, Role.FFN, lambda h: (h.n_embd, h.n_ff), optional=True),
    # a MoE block: router, fused transposed experts, the shared expert (an always-on FFN, as qwen2moe's)
    _p(_FF + "router.weight", T.FFN_GATE_INP, Role.ROUTER, lambda h: (h.n_expert, h.n_embd), optional=True),
    _p(_FF + "experts.gate_up_proj", T.FFN_GATE_EXP, Role.EXPERTS, lambda h: (h.n_expert, h.n_embd, 2 * h.n_ff_exp), GATE_T, optional=True),
    _p(_FF + "experts.gate_up_proj", T.FFN_UP_EXP, Role.EXPERTS, lambda h: (h.n_expert, h.n_embd, 2 * h.n_ff_exp), UP_T, optional=True),
    _p(_FF + "experts.down_proj", T.FFN_DOWN_EXP, Role.EXPERTS, lambda h: (h.n_expert, h.n_ff_exp, h.n_embd), DOWN_T, optional=True),
    _p(_FF + "shared_expert.gate_proj.weight", T.FFN_GATE_SHEXP, Role.FFN, lambda h: (h.n_ff_exp, h.n_embd), optional=True),
    _p(_FF + "shared_expert.up_proj.weight", T.FFN_UP_SHEXP, Role.FFN, lambda h: (h.n_ff_exp, h.n_embd), optional=True),
    _p(_FF + "shared_expert.down_proj.weight", T.FFN_DOWN_SHEXP, Role.FFN, lambda h: (h.n_embd, h.n_ff_exp), optional=True),
    _p("model.norm.weight", T.OUTPUT_NORM, Role.NORM, lambda h: (h.n_embd,)),
    _p("lm_head.weight", T.OUTPUT, Role.OUTPUT, lambda h: (h.n_vocab, h.n_embd), optional=True),
)
DENSE_TENSORS = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
MOE_TENSORS = ("ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight",
               "ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight")
_HF_NAME = {"ffn_gate.weight": "feed_forward.gate_proj.weight", "ffn_gate_inp.weight": "feed_forward.router.weight"}


def rules(names: list[str]) -> tuple[Rule, ...]:
    """The trunk under ``model.`` (``Llama4ForCausalLM``) or ``language_model.model.`` (``Llama4ForConditionalGeneration``)."""
    prefix = "language_model." if any(n.startswith("language_model.") for n in names) else ""
    return tuple(replace(r, hf=prefix + r.hf) for r in TRUNK_RULES)


def check(h: Llama4Hparams, tensors: list[OutTensor]) -> None:
    """Each block holds the feed-forward kind ``interleave_moe_layer_step`` gives it, whole, and no other."""
    have = {t.name for t in tensors}
    for bid in range(h.n_layer):
        want, other = (MOE_TENSORS, DENSE_TENSORS) if h.is_moe(bid) else (DENSE_TENSORS, MOE_TENSORS)
        kind = "a MoE block" if h.is_moe(bid) else "a dense block"
        missing = next((n for n in want if f"blk.{bid}.{n}" not in have), None)
        if missing is not None:
            stray = next((n for n in other if f"blk.{bid}.{n}" in have), None)
            hint = f" (it holds {_HF_NAME.get(stray, stray)} instead: check interleave_moe_layer_step)" if stray else ""
            raise CheckpointError(f"checkpoint: block {bid} is {kind} (config.json interleave_moe_layer_step = {h.moe_step}) but its "
                                  f"{_HF_NAME.get(missing, missing)} (GGUF {missing}) is missing{hint}; fix: use the config.json that belongs to these weights")
        stray = next((n for n in other if f"blk.{bid}.{n}" in have), None)
        if stray is not None:
            raise CheckpointError(f"checkpoint: block {bid} is {kind} (config.json interleave_moe_layer_step = {h.moe_step}) but holds "
                                  f"{_HF_NAME.get(stray, stray)} (GGUF {stray}); fix: use the config.json that belongs to these weights")
    if h.rope_type not in ("default", "llama3"):
        raise CheckpointError(f"config.json: rope scaling type {h.rope_type!r} is not supported for llama4 (supported: default, llama3); fix: use the original config.json")
    _check_common(h, tensors)


def metadata(h: Llama4Hparams) -> dict[str, MetaValue]:
    K, V = gguf_spec.Keys, gguf_spec.GGUFValueType
    md = _common_metadata(h, ARCH)
    md[K.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=ARCH)] = MetaValue(h.n_ff_exp, V.UINT32)
    md[K.LLM.INTERLEAVE_MOE_LAYER_STEP.format(arch=ARCH)] = MetaValue(h.moe_step, V.UINT32)
    return md


NOTES = (
    "the vision tower (vision_model.*, multi_modal_projector.*) is left out: llama.cpp's converter writes it to a separate mmproj file",
)

CONVERTER = register(Converter(
    model_type=MODEL_TYPE, arch=ARCH, hparams=hparams, rules=rules, metadata=metadata, check=check, generated=generated_tensors,
    ignore=IGNORE + VISION, hf_architectures=("Llama4ForConditionalGeneration", "Llama4ForCausalLM"),
    # top-k by logit, sigmoid weights on the experts' inputs (llama.cpp: weight_before_ffn for LLM_ARCH_LLAMA4), never renormalised;
    # not silu_gated_experts: an expert's input is weighted, which --all-experts' recomputation of unchosen experts does not model
    routing=Routing(scoring="sigmoid", normalize_top_k=False, silu_gated_experts=False),
    notes=NOTES,
    # --format bnb: not offered; transformers' Llama4TextExperts weights each expert's input (not its output) and runs on tokens
    # sorted by expert, which quantkit.load_bnb's per-expert 4-bit module does not compute
    hf_experts=None,
))
TEXT_CONVERTER = register(replace(CONVERTER, model_type=TEXT_MODEL_TYPE))  # the language model saved on its own (Llama4ForCausalLM)
