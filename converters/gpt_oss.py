"""``model_type: gpt_oss``: OpenAI gpt-oss checkpoints (gpt-oss-20b / -120b and their BF16 fine-tunes) -> GGUF arch ``gpt-oss``.

What differs from Mixtral (llama.cpp's ``src/models/openai-moe.cpp`` and ``conversion/gpt_oss.py``,
transformers' ``modeling_gpt_oss.py``):

* experts stored fused and transposed, as transformers 5 holds them: ``mlp.experts.gate_up_proj``
  [E, hidden, 2*ffn] whose *columns* interleave gate (even) and up (odd) -- transformers takes
  ``gate_up[..., ::2]`` / ``[..., 1::2]`` -- and ``mlp.experts.down_proj`` [E, ffn, hidden]; each
  expert's matrix is split and transposed to llama.cpp's [ffn, hidden] / [hidden, ffn] rows
  (:class:`InterleavedT`, :class:`Transposed`).  Their biases ``gate_up_proj_bias`` [E, 2*ffn]
  (interleaved the same way) and ``down_proj_bias`` [E, hidden] -> ``ffn_{gate,up,down}_exps.bias``,
  kept F32 (ggml's ``add_id`` reads F32 biases only);
* the router ``mlp.router.weight`` + ``bias`` -> ``ffn_gate_inp.weight`` / ``.bias``;
* biases on every attention projection (``attn_{q,k,v,output}.bias``; llama.cpp requires the
  output bias) and one attention sink logit per head (``self_attn.sinks`` -> ``attn_sinks.weight``);
* ``post_attention_layernorm`` -> ``post_attention_norm`` (the gpt-oss graph's name), NeoX rotary
  (q/k rows as they are);
* sliding-window attention on even blocks, full attention on odd ones (transformers' default
  ``layer_types``; llama.cpp's gpt-oss graph hard-codes that pattern), ``sliding_window`` written;
* the experts' clamped SwiGLU ``(clamp(up, -7, 7) + 1) * g * sigmoid(1.702 g)``, ``g = min(gate, 7)``,
  which llama.cpp's graph computes with the same constants (``LLM_FFN_SWIGLU_OAI_MOE``);
* YaRN rope scaling (factor, original context); the attention factor llama.cpp derives equals
  transformers' ``0.1 ln(factor) + 1``.

MXFP4 checkpoints (the published gpt-oss-20b / -120b, ``quantization_config.quant_method: mxfp4``) store the
experts as ``mlp.experts.{gate_up,down}_proj_blocks`` + ``_scales`` in llama.cpp's row order: ``gate_up``
[E, 2*ffn, hidden] with gate in the even *rows* and up in the odd ones, ``down`` [E, hidden, ffn].
``quantkit.hf.quantized`` reads each pair as the float32 weight ``mlp.experts.gate_up_proj`` /
``down_proj`` (decoded exactly, a few rows at a time); the converter then takes the row rules
(:class:`InterleavedRows`, no transpose) for every expert weight that is stored MXFP4 -- chosen by what the
checkpoint says (``QuantRef.quant``), never by shape, as ``hidden`` may equal ``2*ffn``.  A checkpoint
whose blocks hold some layers' experts and plain tensors others' is refused.  By default those experts are
not decoded at all: whatever ``--type``, the plan keeps them MXFP4 ("carried", ``quantkit.policy.plan.carried``)
and the pipeline repacks their blocks into GGML's MXFP4 (the vendored converter's bytes); the row rules are
:class:`~quantkit.hf.mapping.RowSelect` transforms, so the gate/up split picks whole rows of blocks.
``--allow-requantize`` decodes them and writes them per the type instead (warned when that loses values).

Routing: transformers softmaxes the top-k router logits (with the router bias); llama.cpp's
``SOFTMAX_WEIGHT`` gating does the same.  Refused, because llama.cpp would compute something else:
``swiglu_alpha`` / ``swiglu_limit`` other than 1.702 / 7.0, ``layer_types`` other than the alternating
pattern, ``attention_bias: false``, other rope scalings, YaRN ``beta_fast`` / ``beta_slow`` other than
32 / 1 or an explicit ``attention_factor`` / ``mscale``.

Known gap (not refused, as the published checkpoints carry it): YaRN ``truncate: false`` (every
published gpt-oss config) keeps the correction range unrounded, while ggml always floors / ceils it;
the rotary frequencies of a few dimensions in that range differ slightly (measured in
``tests/test_gpt_oss.py``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from quantkit.converters import Converter, Routing, register
from quantkit.converters.llama import IGNORE, T, Hparams, _get, _p, head_rules
from quantkit.converters.llama import check_hparams as _check_common
from quantkit.converters.llama import metadata as _common_metadata
from quantkit.errors import CheckpointError
from quantkit.format import gguf_spec
from quantkit.format.gguf_write import MetaValue
from quantkit.hf.checkpoint import Checkpoint, shown
from quantkit.hf.mapping import OutTensor, Role, RowSelect, Rule, Transform, Transposed, TransposedHalf

MODEL_TYPE = "gpt_oss"
ARCH = "gpt-oss"  # gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT_OSS]
ATTN_SINKS = T.ATTN_SINKS
#: the clamped SwiGLU constants llama.cpp's graph hard-codes (build_moe_ffn, LLM_FFN_SWIGLU_OAI_MOE)
SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0
#: YaRN ramp bounds llama.cpp uses when the file has no yarn_beta_* keys (llama_hparams defaults)
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0
#: read below, or computed by the experts' own activation (transformers ignores hidden_act)
_NOT_READ = ("hidden_act", "sliding_window")


# -- transforms: transformers 5's [in, out] expert matrices -> llama.cpp's [out, in] rows ---------------


@dataclass(frozen=True)
class InterleavedT(TransposedHalf):
    """One expert's ``gate_up_proj`` [hidden, 2*ffn] with gate in the even columns and up in the odd ones ->
    the gate (``first``) or up rows [ffn, hidden]: transformers' ``gate_up[..., ::2]`` / ``[..., 1::2]``, transposed."""

    def select(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        return np.ascontiguousarray(a[:, 0 if self.first else 1 :: 2].T)


@dataclass(frozen=True)
class InterleavedColumns(Transform):
    """Biases ``gate_up_proj_bias`` [E, 2*ffn] -> the gate (even columns, ``first``) or up (odd columns) biases [E, ffn]."""

    first: bool = True

    def out_shape(self, shape: tuple[int, ...], hparams: object) -> tuple[int, ...]:
        return (*shape[:-1], shape[-1] // 2)

    def select(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        return np.ascontiguousarray(a[..., 0 if self.first else 1 :: 2])


@dataclass(frozen=True)
class InterleavedRows(RowSelect):
    """One expert's ``gate_up_proj`` stored [2*ffn, hidden] (the MXFP4 checkpoints' row layout) with gate in the even
    rows and up in the odd ones -> the gate (``first``) or up rows [ffn, hidden], as llama.cpp's converter splits ``_blocks``."""

    first: bool = True

    def out_rows(self, rows: int) -> int:
        return rows // 2

    def select(self, a: np.ndarray) -> np.ndarray:
        return a[0 if self.first else 1 :: 2]  # a decoded (MXFP4) source decodes just these rows; carried, these rows' blocks


TRANSPOSED = Transposed("transposed")
GATE_T = InterleavedT("gate_even_columns_t", first=True)
UP_T = InterleavedT("up_odd_columns_t", first=False)
GATE_BIAS = InterleavedColumns("gate_even_columns", first=True)
UP_BIAS = InterleavedColumns("up_odd_columns", first=False)
GATE_ROWS = InterleavedRows("gate_even_rows", first=True)
UP_ROWS = InterleavedRows("up_odd_rows", first=False)


# -- hyperparameters ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GptOssHparams(Hparams):
    swa_layers: tuple[bool, ...] = ()


def _refuse(key: str, value: object, why: str, fix: str) -> CheckpointError:
    return CheckpointError(f"config.json: {key} = {shown(value)}: {why}; fix: {fix}")


def _default_types(n_layer: int) -> list[str]:
    """transformers' (and llama.cpp's ``set_swa_pattern(2)``) layout: sliding on even blocks, full on odd ones."""
    return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layer)]


def _check_config(config: dict[str, Any], h: Hparams) -> tuple[bool, ...]:
    for key, want in (("swiglu_alpha", SWIGLU_ALPHA), ("swiglu_limit", SWIGLU_LIMIT)):
        value = _get(config, key, float, want)
        if np.float32(value) != np.float32(want):
            raise _refuse(key, value, f"llama.cpp's gpt-oss graph clamps and gates its experts with {key} = {want} (a constant, no GGUF key)",
                          f"only checkpoints with {key} = {want} (every published gpt-oss) can be converted")
    bias = config.get("attention_bias", True)
    if bias is not True:
        raise _refuse("attention_bias", bias, "llama.cpp's gpt-oss graph requires attention biases (attn_output.bias)",
                      "only checkpoints with attention_bias = true (every published gpt-oss) can be converted")
    types = config.get("layer_types") or _default_types(h.n_layer)
    if types != _default_types(h.n_layer):
        raise _refuse("layer_types", types, "llama.cpp's gpt-oss graph attends through the sliding window on even blocks and to the whole context on odd ones",
                      "only checkpoints with the alternating layer_types (sliding first, the transformers default) can be converted")
    rope = h.rope
    if h.rope_type not in ("default", "yarn"):
        raise _refuse("rope_parameters.rope_type", h.rope_type, "llama.cpp's gpt-oss graph reads no rope_freqs and this scaling is not yarn",
                      "use the original config.json (gpt-oss uses yarn)")
    if h.rope_type == "yarn":
        for key, want in (("beta_fast", YARN_BETA_FAST), ("beta_slow", YARN_BETA_SLOW)):
            value = rope.get(key)
            if value is not None and value != want:
                raise _refuse(f"rope_parameters.{key}", value, f"llama.cpp's yarn ramp uses {key} = {want} (the file has no key for it)", "use the original config.json")
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            value = rope.get(key)
            expected = 0.1 * math.log(rope["factor"]) + 1.0 if rope["factor"] > 1 else 1.0
            if value is not None and not (key == "attention_factor" and math.isclose(value, expected, rel_tol=1e-6)):
                raise _refuse(f"rope_parameters.{key}", value, f"llama.cpp's gpt-oss yarn scales attention by 0.1 ln(factor) + 1 = {expected:.6g} only",
                              f"remove {key} (the published gpt-oss configs have none)")
    return tuple(t == "sliding_attention" for t in types)


def hparams(config: dict[str, Any]) -> GptOssHparams:
    base = Hparams.from_config({k: v for k, v in config.items() if k not in _NOT_READ})
    n_expert = _get(config, "num_local_experts", int)
    n_used = _get(config, "num_experts_per_tok", int)
    if not 1 <= n_used <= n_expert:
        raise CheckpointError(f"config.json: num_experts_per_tok = {n_used}, expected 1..num_local_experts = {n_expert}; fix: restore the original config.json")
    swa = _check_config(config, base)
    window = _get(config, "sliding_window", int, None)
    if window is None and any(swa):
        raise _refuse("sliding_window", config.get("sliding_window"), "llama.cpp's gpt-oss graph needs a window for its sliding blocks", "restore the original value (128 in gpt-oss)")
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    return GptOssHparams(**{**fields, "n_expert": n_expert, "n_expert_used": n_used, "sliding_window": window}, swa_layers=swa)


# -- the name table -------------------------------------------------------------------------------------


def _bias(hf: str, tensor: str, role: Role, shape, transform: Transform = Transform.NONE) -> Rule:
    return Rule(hf, tensor + ".bias", role, shape, transform)


L = "model.layers.{bid}."
ATTENTION_RULES: tuple[Rule, ...] = (
    _p("model.embed_tokens.weight", T.TOKEN_EMBD, Role.EMBEDDINGS, lambda h: (h.n_vocab, h.n_embd)),
    _p(L + "input_layernorm.weight", T.ATTN_NORM, Role.NORM, lambda h: (h.n_embd,)),
    _p(L + "self_attn.q_proj.weight", T.ATTN_Q, Role.ATTENTION, lambda h: (h.n_head * h.head_dim, h.n_embd)),
    _p(L + "self_attn.k_proj.weight", T.ATTN_K, Role.ATTENTION, lambda h: (h.n_head_kv * h.head_dim, h.n_embd)),
    _p(L + "self_attn.v_proj.weight", T.ATTN_V, Role.ATTENTION, lambda h: (h.n_head_kv * h.head_dim, h.n_embd)),
    _p(L + "self_attn.o_proj.weight", T.ATTN_OUT, Role.ATTENTION, lambda h: (h.n_embd, h.n_head * h.head_dim)),
    _bias(L + "self_attn.q_proj.bias", T.ATTN_Q, Role.ATTENTION, lambda h: (h.n_head * h.head_dim,)),
    _bias(L + "self_attn.k_proj.bias", T.ATTN_K, Role.ATTENTION, lambda h: (h.n_head_kv * h.head_dim,)),
    _bias(L + "self_attn.v_proj.bias", T.ATTN_V, Role.ATTENTION, lambda h: (h.n_head_kv * h.head_dim,)),
    _bias(L + "self_attn.o_proj.bias", T.ATTN_OUT, Role.ATTENTION, lambda h: (h.n_embd,)),
    _p(L + "self_attn.sinks", ATTN_SINKS, Role.ATTENTION, lambda h: (h.n_head,)),
    _p(L + "post_attention_layernorm.weight", T.ATTN_POST_NORM, Role.NORM, lambda h: (h.n_embd,)),
)
M = L + "mlp."
ROUTER_RULES: tuple[Rule, ...] = (
    _p(M + "router.weight", T.FFN_GATE_INP, Role.ROUTER, lambda h: (h.n_expert, h.n_embd)),
    _bias(M + "router.bias", T.FFN_GATE_INP, Role.ROUTER, lambda h: (h.n_expert,)),
    _bias(M + "experts.gate_up_proj_bias", T.FFN_GATE_EXP, Role.EXPERTS, lambda h: (h.n_expert, 2 * h.n_ff), GATE_BIAS),
    _bias(M + "experts.gate_up_proj_bias", T.FFN_UP_EXP, Role.EXPERTS, lambda h: (h.n_expert, 2 * h.n_ff), UP_BIAS),
    _bias(M + "experts.down_proj_bias", T.FFN_DOWN_EXP, Role.EXPERTS, lambda h: (h.n_expert, h.n_embd)),
)
#: BF16 / F32 experts as transformers 5 stores them: [E, in, out]
EXPERT_RULES: tuple[Rule, ...] = (
    _p(M + "experts.gate_up_proj", T.FFN_GATE_EXP, Role.EXPERTS, lambda h: (h.n_expert, h.n_embd, 2 * h.n_ff), GATE_T),
    _p(M + "experts.gate_up_proj", T.FFN_UP_EXP, Role.EXPERTS, lambda h: (h.n_expert, h.n_embd, 2 * h.n_ff), UP_T),
    _p(M + "experts.down_proj", T.FFN_DOWN_EXP, Role.EXPERTS, lambda h: (h.n_expert, h.n_ff, h.n_embd), TRANSPOSED),
)

#: MXFP4 experts (``_blocks`` / ``_scales``, read as one float32 weight each) in llama.cpp's row order: gate_up [E, 2*ffn, hidden]
#: with gate in the even rows, down [E, hidden, ffn] as written
MXFP4_GATE_UP_RULES: tuple[Rule, ...] = (
    _p(M + "experts.gate_up_proj", T.FFN_GATE_EXP, Role.EXPERTS, lambda h: (h.n_expert, 2 * h.n_ff, h.n_embd), GATE_ROWS),
    _p(M + "experts.gate_up_proj", T.FFN_UP_EXP, Role.EXPERTS, lambda h: (h.n_expert, 2 * h.n_ff, h.n_embd), UP_ROWS),
)
MXFP4_DOWN_RULES: tuple[Rule, ...] = (
    _p(M + "experts.down_proj", T.FFN_DOWN_EXP, Role.EXPERTS, lambda h: (h.n_expert, h.n_embd, h.n_ff)),
)
MXFP4_STORAGE = "mxfp4"


def rules(names: list[str], mxfp4: frozenset[str] = frozenset()) -> tuple[Rule, ...]:
    """The name table; ``mxfp4``: which expert weights (``gate_up_proj``, ``down_proj``) the checkpoint stores as MXFP4 blocks (row order)."""
    gate_up = MXFP4_GATE_UP_RULES if "gate_up_proj" in mxfp4 else EXPERT_RULES[:2]
    down = MXFP4_DOWN_RULES if "down_proj" in mxfp4 else EXPERT_RULES[2:]
    # llama.cpp's gpt-oss graph always reads ``output``: a tied checkpoint gets the embeddings again
    return ATTENTION_RULES + ROUTER_RULES + gate_up + down + head_rules(names, always_output=True)


def mxfp4_experts(ckpt: Checkpoint) -> frozenset[str]:
    """The expert weights (``gate_up_proj`` / ``down_proj``) that ``ckpt`` stores as MXFP4 blocks; a mix across layers is refused."""
    seen: dict[str, dict[bool, str]] = {}
    for name, ref in ckpt.tensors.items():
        for kind in ("gate_up_proj", "down_proj"):
            if name.endswith(".mlp.experts." + kind):
                quant = getattr(ref, "quant", None)
                seen.setdefault(kind, {}).setdefault(quant is not None and quant.storage == MXFP4_STORAGE, name)
    for kind, by in seen.items():
        if len(by) == 2:
            raise CheckpointError(
                f"{ckpt.root}: tensor {shown(by[True] + '_blocks')} is MXFP4 (row order) but {shown(by[False])} is stored plain ([E, in, out]); "
                "quantkit reads one layout of experts per checkpoint; fix: re-download the checkpoint, or dequantise every layer's experts"
            )
    return frozenset(kind for kind, by in seen.items() if True in by)


def check(h: GptOssHparams, tensors: list[OutTensor]) -> None:
    output = next((t for t in tensors if t.name == T.OUTPUT + ".weight"), None)
    if output is not None and output.sources[0].name == "model.embed_tokens.weight" and not h.tie_embeddings:
        raise CheckpointError("checkpoint: tensor 'lm_head.weight' is missing and config.json tie_word_embeddings is false; fix: re-download the shard holding lm_head.weight")
    _check_common(h, tensors)


def metadata(h: GptOssHparams) -> dict[str, MetaValue]:
    K, V = gguf_spec.Keys, gguf_spec.GGUFValueType
    md = _common_metadata(h, ARCH)
    md[K.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=ARCH)] = MetaValue(h.n_ff, V.UINT32)
    return md


#: softmax over the top-k (biased) router logits = softmax, top-k, renormalised; experts have biases and a clamped SwiGLU
ROUTING = Routing(scoring="softmax", normalize_top_k=True, silu_gated_experts=False)

@dataclass(frozen=True)
class _GptOssConverter(Converter):
    """gpt-oss's name table depends on how the experts are stored (MXFP4 rows or transformers' [E, in, out]), which names alone do not say."""

    def map(self, ckpt: Checkpoint) -> tuple[Any, list[OutTensor]]:
        mx = mxfp4_experts(ckpt)
        if not mx:
            return super().map(ckpt)
        table = self.rules
        return Converter.map(dataclasses.replace(self, rules=lambda names: table(names, mx)), ckpt)  # type: ignore[call-arg]


CONVERTER = register(_GptOssConverter(
    model_type=MODEL_TYPE, arch=ARCH, hparams=hparams, rules=rules, metadata=metadata, check=check, ignore=IGNORE,
    hf_architectures=("GptOssForCausalLM",), routing=ROUTING,
    # --format bnb: not offered; transformers' GptOssExperts adds per-expert biases and computes a clamped SwiGLU
    # ((clamp(up) + 1) * gate * sigmoid(1.702 gate)) over interleaved gate / up columns, which quantkit.load_bnb's per-expert
    # 4-bit module (down(silu(gate x) * up x), no biases) does not compute
    hf_experts=None,
    notes=("YaRN truncate: false (published gpt-oss configs): ggml rounds the correction range, transformers does not; "
           "a few rotary frequencies differ slightly",),
))
