"""``model_type: deepseek_v4``: DeepSeek V4 checkpoints -> GGUF arch ``deepseek4``.

References: transformers 5.23's ``modeling_deepseek_v4.py`` / ``configuration_deepseek_v4.py`` (what a
checkpoint computes, and how config.json's legacy keys fold in) and the vendored llama.cpp's
``conversion/deepseek.py`` ``DeepseekV4Model`` / ``src/models/deepseek4.cpp`` (what the file must hold).

Names
    Three layouts are read: DeepSeek's published one (``embed.weight``, ``layers.N.attn.wq_a.weight``,
    ``layers.N.ffn.experts.E.w1.weight``, ``hc_head_fn`` ...: what llama.cpp's converter reads), what
    transformers 5's ``save_pretrained`` writes by default (the same leaves under ``model.``, with
    ``model.embed_tokens`` / ``model.norm`` / ``model.hc_head.*`` at the root and the attention's KV norm
    saved as ``attn.norm``), and transformers' own names (``save_original_format=False``: ``self_attn.q_a_proj``,
    fused ``mlp.experts.gate_up_proj`` ...).
Blocks
    Every block: hyper-connections (``hc_attn_*`` / ``hc_ffn_*``: ``hc_mult`` streams mixed by a learned
    projection and Sinkhorn), shared-KV attention (``wq_a`` -> ``q_norm`` -> ``wq_b``, one ``wkv`` head that is
    both key and value, per-head ``attn_sink``, a grouped low-rank output ``wo_a`` / ``wo_b``), a MoE of
    sqrt(softplus) scores with clamped SwiGLU experts and one shared expert.  ``layer_types`` (legacy
    ``compress_ratios``) adds a KV compressor (ratio 128: heavily compressed) or a compressor plus a lightning
    indexer (ratio 4: compressed sparse); ``mlp_layer_types`` (legacy ``num_hash_layers``) makes the leading
    blocks hash-routed (``tid2eid`` token -> expert table).
Routing (written from transformers' router, whatever config.json says)
    ``expert_gating_func`` sqrt(softplus) (llama.cpp's loader accepts nothing else), the chosen weights always
    renormalised (transformers divides by their sum whatever ``norm_topk_prob`` says), times
    ``routed_scaling_factor``; selection by score + ``e_score_correction_bias`` (``exp_probs_b``) in score-routed
    blocks, by ``tid2eid`` in the leading ``hash_layer_count`` blocks.
Hash tables
    ``tid2eid`` (I64 in transformers' saves) is written as I32 ``ffn_gate_tid2eid`` whatever the type
    (:class:`quantkit.hf.mapping.IntegerTable`: the plan gives it I32, the writer checks every id is an expert).
Parity
    With an F32 KV cache llama.cpp's deepseek4 graph gives transformers' logits within 5e-7 (relative), the indexer's
    top-k choice included; its default F16 cache rounds cached keys, which can move a near-tie of a router or of the
    indexer's top-k (a jump from that token on), and few indexer heads leave exact ties (ReLU zeros) the two top-k's
    break differently.
Importance matrices
    llama.cpp's graph multiplies ``attn_output_a`` (2-D in the file: ``n_head * head_dim / o_groups`` columns) as ``o_groups``
    matrices, so llama-imatrix (and ``quantkit imatrix``, bit-identical to it) records ``o_groups x`` its columns in one row, and
    llama-quantize refuses that entry ("imatrix size A is different from tensor size B"): ``quantkit convert --imatrix`` refuses it
    too.  Without those entries (``llama-quantize --exclude-weights attn_output_a``) both quantise bit for bit alike.
    ``output_hc_fn`` (``hc_head_fn``, outside the blocks) never gets an entry: presets whose type for it needs importance weights
    (IQ3_XXS, IQ2_*, Q2_K_S ...) need another type for it (``--tensor-type output_hc_fn=q8_0``), as with llama-quantize.
Quantised releases
    DeepSeek's published files (``quant_method: fp8``, ``scale_fmt: ue8m0``, ``expert_dtype: fp4`` beside it): FP8 e4m3
    weights with a ``.scale`` per 128x128 block are decoded block by block as the conversion streams
    (:mod:`quantkit.hf.quantized`); FP4 experts (I8 ``.weight`` two e2m1 values a byte, ``.scale`` per 32 values of a row) are
    carried into GGUF MXFP4 bit for bit, as llama.cpp's converter repacks them (``--allow-requantize`` decodes them too).
    Read in the published layout only (transformers' saves of a quantised model rename and fuse them: refused).
Not converted
    Multi-token-prediction blocks (``mtp.*``) are left out, as llama.cpp's converter leaves them out by
    default and transformers never loads them.  Other quantisations (``quantization_config`` other than ``fp8``) are
    refused: dequantise to BF16 first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from quantkit.converters import Converter, Routing, register
from quantkit.converters.llama import LLAMA_MAX_EXPERTS, LLAMA_MAX_LAYERS, T, Hparams, _context_length, _get
from quantkit.errors import CheckpointError
from quantkit.format import gguf_spec
from quantkit.format.gguf_write import MetaValue
from quantkit.hf.checkpoint import shown
from quantkit.hf.mapping import INTEGER_TABLE, OutTensor, Role, Rule, Transform, map_tensors

if TYPE_CHECKING:
    from quantkit.hf.checkpoint import Checkpoint

MODEL_TYPE = "deepseek_v4"
ARCH = "deepseek4"  # gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK4] (vendored gguf-py)
SQRT_SOFTPLUS = 4  # gguf.ExpertGatingFuncType.SQRT_SOFTPLUS (llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SQRT_SOFTPLUS)
SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
#: compress_ratios entries -> layer types, as DeepseekV4Config folds them in
RATIO_TYPES = {0: SLIDING, 4: CSA, 128: HCA}
#: the only ratios llama.cpp's deepseek4 graph computes (its CSA path is "ratio 4", its HCA path "ratio 128")
LLAMA_RATIOS = {CSA: 4, HCA: 128}
#: DeepseekV4Config's defaults (transformers 5.23) for the keys read here
DEFAULTS: dict[str, Any] = dict(
    vocab_size=129280, hidden_size=4096, moe_intermediate_size=2048, num_hidden_layers=43, num_attention_heads=64, head_dim=512,
    q_lora_rank=1024, num_experts_per_tok=6, n_routed_experts=256, n_shared_experts=1, scoring_func="sqrtsoftplus",
    routed_scaling_factor=1.5, max_position_embeddings=1048576, rope_theta=10000.0, compress_rope_theta=160000.0, hc_mult=4,
    hc_sinkhorn_iters=20, hc_eps=1e-6, swiglu_limit=10.0, sliding_window=128, o_groups=8, o_lora_rank=1024, index_n_heads=64,
    index_head_dim=128, index_topk=512, rms_norm_eps=1e-6, hidden_act="silu", mlp_bias=False,
)
ALIASES = {"n_routed_experts": ("num_local_experts",), "moe_intermediate_size": ("intermediate_size",)}
NUM_HASH_DEFAULT = 3
PARTIAL_ROTARY_DEFAULT = 64 / 512


def _refuse(key: str, value: object, why: str, fix: str) -> CheckpointError:
    return CheckpointError(f"config.json: {key} = {shown(value)}: {why}; fix: {fix}")


def _value(config: dict[str, Any], key: str) -> Any:
    for k in (key, *ALIASES.get(key, ())):
        if config.get(k) is not None:
            return config[k]
    return DEFAULTS.get(key)


def _int(config: dict[str, Any], key: str, positive: bool = True) -> int:
    return _get({key: _value(config, key)}, key, int, positive=positive)


def _float(config: dict[str, Any], key: str, positive: bool = True) -> float:
    return _get({key: _value(config, key)}, key, float, positive=positive)


@dataclass(frozen=True)
class V4Hparams(Hparams):
    q_lora_rank: int = 0
    n_rot: int = 0  # qk_rope_head_dim: the trailing rotary dimensions of each head
    o_groups: int = 1
    o_lora_rank: int = 0
    layer_types: tuple[str, ...] = ()
    ratios: tuple[int, ...] = ()  # per block: 0, 4 (CSA) or 128 (HCA)
    ratios_written: tuple[int, ...] = ()  # attention.compress_ratios (config.json's list where it agrees, MTP entries included)
    n_hash: int = 0  # leading hash-routed blocks
    n_expert_shared: int = 1
    weights_scale: float = 1.0
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_iters: int = 20
    hc_eps: float = 1e-6
    compress_theta: float = 160000.0
    index_n_head: int = 0
    index_head_dim: int = 0
    index_topk: int = 0

    @property
    def n_ff_exp(self) -> int:
        return self.n_ff


def _layer_types(config: dict[str, Any], n: int) -> tuple[tuple[str, ...], str]:
    """Per block layer type, as DeepseekV4Config derives it: ``layer_types`` > legacy ``compress_ratios`` > its default."""
    if config.get("layer_types") is not None:
        key, types = "layer_types", config["layer_types"]
        if not isinstance(types, list) or not all(t in (SLIDING, CSA, HCA) for t in types):
            raise _refuse(key, types, f"expected a list of {SLIDING!r}, {CSA!r}, {HCA!r}", "restore the original value")
    elif config.get("compress_ratios") is not None:
        key, ratios = "compress_ratios", config["compress_ratios"]
        if not isinstance(ratios, list) or not all(type(r) is int and r in RATIO_TYPES for r in ratios):
            raise _refuse(key, ratios, "expected a list of 0, 4 and 128 (transformers maps no other ratio to a layer type)", "restore the original value")
        types = [RATIO_TYPES[r] for r in ratios]
    else:
        key = "layer_types"
        types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
    if len(types) < n:
        raise _refuse(key, types, f"{len(types)} entries for num_hidden_layers = {n} blocks", "restore the original value")
    return tuple(types[:n]), key


def _compress_rates(config: dict[str, Any]) -> dict[str, int]:
    rates = {CSA: 4, HCA: 128}
    given = config.get("compress_rates")
    if given is not None:
        if not isinstance(given, dict):
            raise _refuse("compress_rates", given, "expected an object of layer type -> ratio", "restore the original value")
        rates.update(given)
    for legacy, kind in (("compress_rate_csa", CSA), ("compress_rate_hca", HCA)):
        if config.get(legacy) is not None:
            rates[kind] = config[legacy]
    return rates


def _n_hash(config: dict[str, Any], n: int) -> int:
    """Leading hash-routed blocks: ``mlp_layer_types`` > legacy ``num_hash_layers`` > 3, as DeepseekV4Config derives them."""
    types = config.get("mlp_layer_types")
    if types is None:
        k = config.get("num_hash_layers", NUM_HASH_DEFAULT)
        k = NUM_HASH_DEFAULT if k is None else _get({"num_hash_layers": k}, "num_hash_layers", int, positive=False)
        return min(k, n)
    if not isinstance(types, list) or len(types) < n or not all(t in ("hash_moe", "moe") for t in types):
        raise _refuse("mlp_layer_types", types, f"expected {n} of \"hash_moe\" / \"moe\"", "restore the original value")
    types = types[:n]
    k = types.count("hash_moe")
    if types[:k] != ["hash_moe"] * k:
        raise _refuse("mlp_layer_types", types, "llama.cpp's deepseek4 graph hash-routes the first hash_layer_count blocks only, so "
                      "hash-routed blocks must lead", "none with this llama.cpp")
    return k


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    """The compressed blocks' rope parameters (YaRN or default); the sliding blocks' must be plain rope."""
    rp = config.get("rope_parameters") or config.get("rope_scaling") or {}
    key = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    if not isinstance(rp, dict):
        raise _refuse(key, rp, "expected an object", "restore the original value")
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main = rp["main"]
        if main.get("rope_type", main.get("type", "default")) != "default":
            raise _refuse(f"{key}.main.rope_type", main.get("rope_type", main.get("type")), "llama.cpp's deepseek4 graph applies no scaling to "
                          "the sliding blocks' rope", "none with this llama.cpp")
        comp = dict(rp["compress"])
        thetas = {"main_theta": main.get("rope_theta"), "compress_theta": comp.get("rope_theta")}  # what transformers' rotary reads
    else:
        comp = {k: v for k, v in rp.items() if k not in ("main", "compress")}
        thetas = {}
    kind = comp.get("rope_type", comp.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise _refuse(f"{key}.rope_type", kind, "llama.cpp's deepseek4 graph scales the compressed blocks' rope with YaRN only", "none with this llama.cpp")
    out: dict[str, Any] = {"rope_type": kind}
    for k, v in thetas.items():
        if v is not None:
            out[k] = _get({k: v}, k, float, shown_key=f"{key}.{'main' if k == 'main_theta' else 'compress'}.rope_theta")
    if kind == "yarn":
        out["factor"] = _get(comp, "factor", float, shown_key=f"{key}.factor")
        if not out["factor"] > 1.0:
            raise _refuse(f"{key}.factor", comp["factor"], "YaRN with a factor of at most 1 does not scale", "restore the original value")
        out["original_max_position_embeddings"] = _get(comp, "original_max_position_embeddings", int, shown_key=f"{key}.original_max_position_embeddings")
        out["beta_fast"] = _get(comp, "beta_fast", float, 32.0, shown_key=f"{key}.beta_fast")
        out["beta_slow"] = _get(comp, "beta_slow", float, 1.0, shown_key=f"{key}.beta_slow")
        af = comp.get("attention_factor", comp.get("attn_factor", 1.0))
        if af != 1.0:
            raise _refuse(f"{key}.attention_factor", af, "transformers' V4 leaves cos/sin unscaled (attention_factor 1) and llama.cpp's "
                          "deepseek4 graph cancels YaRN's magnitude factor: another value cannot be written", "remove the key")
        if comp.get("truncate") is False:
            raise _refuse(f"{key}.truncate", False, "ggml always rounds YaRN's correction range", "none with this llama.cpp")
    return out


def hparams(config: dict[str, Any]) -> V4Hparams:
    if config.get("quantization_config") is not None:
        qc = config["quantization_config"]
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        if method != "fp8":
            raise _refuse("quantization_config.quant_method", method, "DeepSeek V4 checkpoints are read quantised as DeepSeek publishes them "
                          "only (\"fp8\": FP8 e4m3 weights with UE8M0 .scale tensors, FP4 experts)", "dequantise the checkpoint to BF16 first")
    act = _value(config, "hidden_act")
    if act != "silu":
        raise _refuse("hidden_act", act, "llama.cpp's deepseek4 graph gates every expert with SiLU", "only checkpoints with hidden_act \"silu\" convert")
    if _value(config, "mlp_bias"):
        raise _refuse("mlp_bias", config.get("mlp_bias"), "transformers' V4 shared expert then has biases llama.cpp's graph has no tensor for",
                      "none with this llama.cpp")
    scoring = _value(config, "scoring_func")
    if scoring != "sqrtsoftplus":
        raise _refuse("scoring_func", scoring, "llama.cpp's deepseek4 loader accepts sqrt(softplus) scores only (it refuses other files)",
                      "none with this llama.cpp")
    n_layer = _int(config, "num_hidden_layers")
    if n_layer > LLAMA_MAX_LAYERS:
        raise _refuse("num_hidden_layers", n_layer, f"more than the {LLAMA_MAX_LAYERS} llama.cpp supports (it aborts)", "none with this llama.cpp")
    n_embd, n_head, head_dim = _int(config, "hidden_size"), _int(config, "num_attention_heads"), _int(config, "head_dim")
    types, types_key = _layer_types(config, n_layer)
    rates = _compress_rates(config)
    for kind, want in LLAMA_RATIOS.items():
        if kind in types and rates.get(kind) != want:
            raise _refuse(f"compress_rates.{kind}", rates.get(kind), f"llama.cpp's deepseek4 graph compresses {kind} blocks {want}:1 only",
                          "none with this llama.cpp")
    if CSA not in types or HCA not in types:
        raise _refuse(types_key, list(types), f"llama.cpp's deepseek4 graph needs at least one {CSA} (ratio 4) and one {HCA} (ratio 128) "
                      "block (it crashes with a floating-point exception otherwise)", "none with this llama.cpp")
    ratios = tuple(LLAMA_RATIOS.get(t, 0) for t in types)
    given = config.get("compress_ratios")
    written = tuple(given) if isinstance(given, list) and tuple(given[:n_layer]) == ratios and len(given) <= LLAMA_MAX_LAYERS else ratios
    hc = _int(config, "hc_mult")
    if hc != 4:
        raise _refuse("hc_mult", hc, "llama.cpp's deepseek4 graph mixes exactly 4 hyper-connection streams (it aborts otherwise)", "none with this llama.cpp")
    o_groups = _int(config, "o_groups")
    if n_head % o_groups:
        raise _refuse("o_groups", o_groups, f"num_attention_heads = {n_head} must split into o_groups groups", "restore the original value")
    partial = config.get("partial_rotary_factor")
    if partial is None:
        rope_dim = config.get("qk_rope_head_dim")
        n_rot = _get({"qk_rope_head_dim": rope_dim}, "qk_rope_head_dim", int) if rope_dim is not None else int(head_dim * PARTIAL_ROTARY_DEFAULT)
    else:
        n_rot = int(head_dim * _get({"partial_rotary_factor": partial}, "partial_rotary_factor", float))
    if not 2 <= n_rot <= head_dim or n_rot % 2:
        raise _refuse("partial_rotary_factor / qk_rope_head_dim", n_rot, f"the rotary part must be an even number of the head_dim = {head_dim} dimensions",
                      "restore the original value")
    index_head_dim = _int(config, "index_head_dim")
    if index_head_dim < 64 or index_head_dim & (index_head_dim - 1) or index_head_dim < n_rot:
        raise _refuse("index_head_dim", index_head_dim, "llama.cpp's deepseek4 graph multiplies the indexer's queries and keys by a Hadamard "
                      "matrix it builds only for powers of two from 64, each holding the rotary part", "none with this llama.cpp")
    n_expert, n_used = _int(config, "n_routed_experts"), _int(config, "num_experts_per_tok")
    if n_expert > LLAMA_MAX_EXPERTS or not 1 <= n_used <= n_expert:
        raise _refuse("n_routed_experts / num_experts_per_tok", [n_expert, n_used], f"expected 1 <= num_experts_per_tok <= n_routed_experts <= {LLAMA_MAX_EXPERTS}",
                      "restore the original values")
    rope = _rope(config)
    theta = rope.pop("main_theta", None) or _get(config, "rope_theta", float, DEFAULTS["rope_theta"])
    compress_theta = rope.pop("compress_theta", None) or _float(config, "compress_rope_theta")
    return V4Hparams(
        n_vocab=_int(config, "vocab_size"), n_embd=n_embd, n_ff=_int(config, "moe_intermediate_size"), n_layer=n_layer, n_head=n_head,
        n_head_kv=1, head_dim=head_dim, n_ctx=_context_length({"max_position_embeddings": _value(config, "max_position_embeddings")}),
        norm_eps=_float(config, "rms_norm_eps"), rope_theta=theta, rope=rope, sliding_window=_int(config, "sliding_window"),
        tie_embeddings=bool(config.get("tie_word_embeddings")), n_expert=n_expert, n_expert_used=n_used,
        q_lora_rank=_int(config, "q_lora_rank"), n_rot=n_rot, o_groups=o_groups, o_lora_rank=_int(config, "o_lora_rank"), layer_types=types,
        ratios=ratios, ratios_written=written, n_hash=_n_hash(config, n_layer), weights_scale=_float(config, "routed_scaling_factor"),
        swiglu_limit=_float(config, "swiglu_limit"), hc_mult=hc, hc_iters=_int(config, "hc_sinkhorn_iters"), hc_eps=_float(config, "hc_eps"),
        compress_theta=compress_theta, index_n_head=_int(config, "index_n_heads"), index_head_dim=index_head_dim,
        index_topk=_int(config, "index_topk"),
    )


# --------------------------------------------------------------------------- the name table

@dataclass(frozen=True)
class Entry:
    """One tensor: its GGUF base name, published leaf (after ``layers.N.``), transformers leaf, role, shape, and which blocks hold it."""

    gguf: str
    published: str
    transformers: str
    role: Role
    shape: Callable[[V4Hparams, int], tuple[int, ...]]  # (hparams, the block's compress ratio): the shape of one source
    kind: str = "all"  # all / comp (ratio 4 or 128) / csa (ratio 4) / score (score-routed) / hash
    suffix: str = ".weight"


def _coff(ratio: int) -> int:
    """Compressed-sparse blocks (ratio 4) compress two overlapping series (Ca / Cb), heavily-compressed ones (128) one."""
    return 2 if ratio == 4 else 1


def _mix(h: V4Hparams) -> int:
    return (2 + h.hc_mult) * h.hc_mult


_E = Entry
BLOCK: tuple[Entry, ...] = (
    _E(T.ATTN_NORM, "attn_norm.weight", "input_layernorm.weight", Role.NORM, lambda h, r: (h.n_embd,)),
    _E(T.FFN_NORM, "ffn_norm.weight", "post_attention_layernorm.weight", Role.NORM, lambda h, r: (h.n_embd,)),
    _E(T.HC_ATTN_FN, "hc_attn_fn", "attn_hc.fn", Role.OTHER, lambda h, r: (_mix(h), h.hc_mult * h.n_embd)),
    _E(T.HC_ATTN_BASE, "hc_attn_base", "attn_hc.base", Role.OTHER, lambda h, r: (_mix(h),)),
    _E(T.HC_ATTN_SCALE, "hc_attn_scale", "attn_hc.scale", Role.OTHER, lambda h, r: (3,)),
    _E(T.HC_FFN_FN, "hc_ffn_fn", "ffn_hc.fn", Role.OTHER, lambda h, r: (_mix(h), h.hc_mult * h.n_embd)),
    _E(T.HC_FFN_BASE, "hc_ffn_base", "ffn_hc.base", Role.OTHER, lambda h, r: (_mix(h),)),
    _E(T.HC_FFN_SCALE, "hc_ffn_scale", "ffn_hc.scale", Role.OTHER, lambda h, r: (3,)),
    _E(T.ATTN_SINKS, "attn.attn_sink", "self_attn.sinks", Role.ATTENTION, lambda h, r: (h.n_head,)),
    _E(T.ATTN_Q_A, "attn.wq_a.weight", "self_attn.q_a_proj.weight", Role.ATTENTION, lambda h, r: (h.q_lora_rank, h.n_embd)),
    _E(T.ATTN_Q_A_NORM, "attn.q_norm.weight", "self_attn.q_a_norm.weight", Role.NORM, lambda h, r: (h.q_lora_rank,)),
    _E(T.ATTN_Q_B, "attn.wq_b.weight", "self_attn.q_b_proj.weight", Role.ATTENTION, lambda h, r: (h.n_head * h.head_dim, h.q_lora_rank)),
    _E(T.ATTN_KV, "attn.wkv.weight", "self_attn.kv_proj.weight", Role.ATTENTION, lambda h, r: (h.head_dim, h.n_embd)),
    _E(T.ATTN_KV_NORM, "attn.kv_norm.weight", "self_attn.kv_norm.weight", Role.NORM, lambda h, r: (h.head_dim,)),
    _E(T.ATTN_OUT_A, "attn.wo_a.weight", "self_attn.o_a_proj.weight", Role.ATTENTION,
       lambda h, r: (h.o_groups * h.o_lora_rank, h.n_head * h.head_dim // h.o_groups)),
    _E(T.ATTN_OUT_B, "attn.wo_b.weight", "self_attn.o_b_proj.weight", Role.ATTENTION, lambda h, r: (h.n_embd, h.o_groups * h.o_lora_rank)),
    _E(T.FFN_GATE_INP, "ffn.gate.weight", "mlp.gate.weight", Role.ROUTER, lambda h, r: (h.n_expert, h.n_embd)),
    _E(T.FFN_GATE_SHEXP, "ffn.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight", Role.FFN, lambda h, r: (h.n_ff, h.n_embd)),
    _E(T.FFN_DOWN_SHEXP, "ffn.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight", Role.FFN, lambda h, r: (h.n_embd, h.n_ff)),
    _E(T.FFN_UP_SHEXP, "ffn.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight", Role.FFN, lambda h, r: (h.n_ff, h.n_embd)),
    # per block kind
    _E(T.FFN_EXP_PROBS_B, "ffn.gate.bias", "mlp.gate.e_score_correction_bias", Role.ROUTER, lambda h, r: (h.n_expert,), "score", ".bias"),
    _E(T.FFN_GATE_TID2EID, "ffn.gate.tid2eid", "mlp.gate.tid2eid", Role.ROUTER, lambda h, r: (h.n_vocab, h.n_expert_used), "hash"),
    _E(T.ATTN_COMPRESSOR_WKV, "attn.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight", Role.ATTENTION,
       lambda h, r: (_coff(r) * h.head_dim, h.n_embd), "comp"),
    _E(T.ATTN_COMPRESSOR_WGATE, "attn.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight", Role.ATTENTION,
       lambda h, r: (_coff(r) * h.head_dim, h.n_embd), "comp"),
    _E(T.ATTN_COMPRESSOR_APE, "attn.compressor.ape", "self_attn.compressor.position_bias", Role.ATTENTION,
       lambda h, r: (r, _coff(r) * h.head_dim), "comp"),
    _E(T.ATTN_COMPRESSOR_NORM, "attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight", Role.NORM, lambda h, r: (h.head_dim,), "comp"),
    _E(T.INDEXER_COMPRESSOR_WKV, "attn.indexer.compressor.wkv.weight", "self_attn.compressor.indexer.kv_proj.weight", Role.ATTENTION,
       lambda h, r: (2 * h.index_head_dim, h.n_embd), "csa"),
    _E(T.INDEXER_COMPRESSOR_WGATE, "attn.indexer.compressor.wgate.weight", "self_attn.compressor.indexer.gate_proj.weight", Role.ATTENTION,
       lambda h, r: (2 * h.index_head_dim, h.n_embd), "csa"),
    _E(T.INDEXER_COMPRESSOR_APE, "attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias", Role.ATTENTION,
       lambda h, r: (4, 2 * h.index_head_dim), "csa"),
    _E(T.INDEXER_COMPRESSOR_NORM, "attn.indexer.compressor.norm.weight", "self_attn.compressor.indexer.kv_norm.weight", Role.NORM,
       lambda h, r: (h.index_head_dim,), "csa"),
    _E(T.INDEXER_PROJ, "attn.indexer.weights_proj.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight", Role.ATTENTION,
       lambda h, r: (h.index_n_head, h.n_embd), "csa"),
    _E(T.INDEXER_ATTN_Q_B, "attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight", Role.ATTENTION,
       lambda h, r: (h.index_n_head * h.index_head_dim, h.q_lora_rank), "csa"),
)
#: the blocks that hold a kind's tensors
KINDS: dict[str, Callable[[V4Hparams, int], bool]] = {
    "all": lambda h, b: True,
    "comp": lambda h, b: h.ratios[b] != 0,
    "csa": lambda h, b: h.ratios[b] == 4,
    "score": lambda h, b: b >= h.n_hash,
    "hash": lambda h, b: b < h.n_hash,
}


@dataclass(frozen=True)
class Layout:
    """Where a checkpoint's tensors live: the block prefix, root names, leaves, and the expert keys."""

    name: str
    block: str  # "layers.{bid}." or "model.layers.{bid}."
    root: dict[str, str]  # GGUF name -> source name
    transformers_leaves: bool
    kv_norm: str | None = None  # the attention KV norm's leaf where it differs (save_pretrained: attn.norm.weight)

    def leaf(self, e: Entry) -> str:
        if self.transformers_leaves:
            return e.transformers
        if e.gguf == T.ATTN_KV_NORM and self.kv_norm:
            return self.kv_norm
        return e.published


_HEAD = {T.HC_HEAD_FN + ".weight": "hc_head_fn", T.HC_HEAD_BASE + ".weight": "hc_head_base", T.HC_HEAD_SCALE + ".weight": "hc_head_scale"}
PUBLISHED = Layout("published", "layers.{bid}.", {T.TOKEN_EMBD + ".weight": "embed.weight", T.OUTPUT_NORM + ".weight": "norm.weight",
                                                  T.OUTPUT + ".weight": "head.weight", **_HEAD}, False)
_HF_HEAD = {T.HC_HEAD_FN + ".weight": "model.hc_head.hc_fn", T.HC_HEAD_BASE + ".weight": "model.hc_head.hc_base",
            T.HC_HEAD_SCALE + ".weight": "model.hc_head.hc_scale"}
SAVED = Layout("saved", "model.layers.{bid}.", {T.TOKEN_EMBD + ".weight": "model.embed_tokens.weight", T.OUTPUT_NORM + ".weight": "model.norm.weight",
                                                T.OUTPUT + ".weight": "head.weight", **_HF_HEAD}, False, kv_norm="attn.norm.weight")
TRANSFORMERS = Layout("transformers", "model.layers.{bid}.", {T.TOKEN_EMBD + ".weight": "model.embed_tokens.weight",
                                                             T.OUTPUT_NORM + ".weight": "model.norm.weight", T.OUTPUT + ".weight": "lm_head.weight",
                                                             **_HF_HEAD}, True)


def layout_of(names: list[str]) -> Layout:
    if any(n.startswith("layers.") or n == "embed.weight" for n in names):
        return PUBLISHED
    if any(".self_attn." in n or n == "lm_head.weight" for n in names):
        return TRANSFORMERS
    return SAVED


_ROOT_SHAPES: dict[str, Callable[[V4Hparams], tuple[int, ...]]] = {
    T.TOKEN_EMBD + ".weight": lambda h: (h.n_vocab, h.n_embd),
    T.OUTPUT_NORM + ".weight": lambda h: (h.n_embd,),
    T.OUTPUT + ".weight": lambda h: (h.n_vocab, h.n_embd),
    T.HC_HEAD_FN + ".weight": lambda h: (h.hc_mult, h.hc_mult * h.n_embd),
    T.HC_HEAD_BASE + ".weight": lambda h: (h.hc_mult,),
    T.HC_HEAD_SCALE + ".weight": lambda h: (1,),
}
_ROOT_ROLES = {T.TOKEN_EMBD + ".weight": Role.EMBEDDINGS, T.OUTPUT_NORM + ".weight": Role.NORM, T.OUTPUT + ".weight": Role.OUTPUT}


def _table(names: list[str], ratio: int = 4, kinds: tuple[str, ...] = ("all", "comp", "csa", "score")) -> tuple[Rule, ...]:
    """The name table of this checkpoint's layout, compressor shapes those of ``ratio`` blocks.  Layer-kind tensors are optional
    here (:func:`_check_kinds` says which blocks hold them); the hash-routing table is not in it (an integer tensor, see V4Converter)."""
    lay = layout_of(names)
    out: list[Rule] = []
    if "all" in kinds:
        for gguf_name, src in lay.root.items():
            optional = gguf_name == T.OUTPUT + ".weight"
            out.append(Rule(src, gguf_name, _ROOT_ROLES.get(gguf_name, Role.OTHER), _ROOT_SHAPES[gguf_name], Transform.NONE, optional))
        if lay.root[T.OUTPUT + ".weight"] not in names:  # tied: llama.cpp's graph always reads output
            out.append(Rule(lay.root[T.TOKEN_EMBD + ".weight"], T.OUTPUT + ".weight", Role.OUTPUT, _ROOT_SHAPES[T.OUTPUT + ".weight"]))
    for e in BLOCK:
        if e.kind in kinds:
            out.append(Rule(lay.block + lay.leaf(e), e.gguf + e.suffix, e.role, lambda h, e=e: e.shape(h, ratio), Transform.NONE, e.kind != "all"))
    if "all" not in kinds:
        return tuple(out)
    ex = lay.block + ("mlp.experts." if lay.transformers_leaves else "ffn.experts.")
    if any(n.endswith(".mlp.experts.gate_up_proj") for n in names):
        out += [
            Rule(ex + "gate_up_proj", T.FFN_GATE_EXP + ".weight", Role.EXPERTS, lambda h: (h.n_expert, 2 * h.n_ff, h.n_embd), Transform.FIRST_HALF),
            Rule(ex + "gate_up_proj", T.FFN_UP_EXP + ".weight", Role.EXPERTS, lambda h: (h.n_expert, 2 * h.n_ff, h.n_embd), Transform.SECOND_HALF),
            Rule(ex + "down_proj", T.FFN_DOWN_EXP + ".weight", Role.EXPERTS, lambda h: (h.n_expert, h.n_embd, h.n_ff)),
        ]
    else:
        leaves = ("gate_proj", "up_proj", "down_proj") if lay.transformers_leaves else ("w1", "w3", "w2")
        out += [
            Rule(ex + "{xid}." + leaves[0] + ".weight", T.FFN_GATE_EXP + ".weight", Role.EXPERTS, lambda h: (h.n_ff, h.n_embd)),
            Rule(ex + "{xid}." + leaves[1] + ".weight", T.FFN_UP_EXP + ".weight", Role.EXPERTS, lambda h: (h.n_ff, h.n_embd)),
            Rule(ex + "{xid}." + leaves[2] + ".weight", T.FFN_DOWN_EXP + ".weight", Role.EXPERTS, lambda h: (h.n_embd, h.n_ff)),
        ]
    return tuple(out)


def rules(names: list[str]) -> tuple[Rule, ...]:
    """The name table (compressors as compressed-sparse blocks hold them; V4Converter.map maps heavily-compressed blocks' own)."""
    return _table(names)


def _src(lay: Layout, e: Entry, b: int) -> str:
    return (lay.block + lay.leaf(e)).replace("{bid}", str(b))


def _check_kinds(h: V4Hparams, names: list[str]) -> None:
    """Each layer-kind tensor in exactly the blocks config.json gives that kind (before shapes are compared)."""
    lay = layout_of(names)
    have = set(names)
    for e in BLOCK:
        if e.kind == "all":
            continue
        for b in range(h.n_layer):
            src, wanted = _src(lay, e, b), KINDS[e.kind](h, b)
            kind = f"a {h.layer_types[b]}, {'hash' if b < h.n_hash else 'score'}-routed block"
            if wanted and src not in have:
                raise CheckpointError(f"checkpoint: tensor {src!r} is missing (config.json makes block {b} {kind}); fix: re-download the "
                                      "checkpoint, or use the config.json that belongs to these weights")
            if not wanted and src in have:
                raise CheckpointError(f"checkpoint: tensor {src!r} is in block {b}, which config.json makes {kind} without it; fix: use the "
                                      "config.json that belongs to these weights")


_HASH = next(e for e in BLOCK if e.kind == "hash")
_BIAS = next(e for e in BLOCK if e.kind == "score")


def _hash_tables(h: V4Hparams, ckpt: Checkpoint, lay: Layout) -> list[OutTensor]:
    """The hash-routed blocks' token -> expert tables, ``tid2eid`` [vocab, experts per token] of integers, as I32 ``ffn_gate_tid2eid``."""
    out = []
    for b in range(h.n_hash):
        ref = ckpt.tensors[_src(lay, _HASH, b)]
        want = (h.n_vocab, h.n_expert_used)
        if ref.dtype not in ("I64", "I32", "I16", "I8", "U8") or ref.shape != want:
            raise CheckpointError(f"{ckpt.root}: tensor {ref.name!r} is {ref.dtype} {list(ref.shape)}, expected integers {list(want)} (one expert id "
                                  "per token and chosen expert: vocab_size x num_experts_per_tok); fix: use the config.json that belongs to these weights")
        out.append(OutTensor(_HASH.gguf.replace("{bid}", str(b)) + _HASH.suffix, want, Role.ROUTER, (ref,),
                             dataclasses.replace(INTEGER_TABLE, source=ref.name)))
    return out


class V4Converter(Converter):
    """A :class:`Converter` that checks per-block kinds before the name table compares shapes, maps heavily-compressed blocks'
    compressors with their own shapes, and writes the hash-routing tables as I32."""

    def map(self, ckpt: Checkpoint) -> tuple[Any, list[OutTensor]]:
        h = self.hparams(ckpt.config)
        lay = layout_of(list(ckpt.tensors))
        if ckpt.quantization is not None and lay is not PUBLISHED:
            raise CheckpointError(f"{ckpt.root}: a quantised DeepSeek V4 checkpoint in {lay.name} layout (transformers' names); quantised ones are "
                                  "read in DeepSeek's published layout only (layers.N.attn.wq_a.weight / .scale, ffn.experts.E.w1.weight / .scale); "
                                  "fix: convert the published release, or a BF16 save")
        # a hash-routed block's selection bias: published checkpoints hold it, transformers' hash router has none and
        # llama.cpp's graph selects by tid2eid there (its converter drops it too)
        unused = {_src(lay, _BIAS, b) for b in range(h.n_hash)}
        source = {n: ref for n, ref in ckpt.tensors.items() if n not in unused}
        names = list(source)
        _check_kinds(h, names)
        tables = {_src(lay, _HASH, b) for b in range(h.n_hash)}
        hca = {_src(lay, e, b) for e in BLOCK if e.kind == "comp" for b in range(h.n_layer) if h.ratios[b] == 128}
        where = str(ckpt.root)
        main = {n: ref for n, ref in source.items() if n not in hca and n not in tables}
        tensors = map_tensors(main, _table(names, 4), h, h.n_layer, h.n_expert, self.ignore, where=where)
        tensors += map_tensors({n: source[n] for n in hca if n in source}, _table(names, 128, ("comp",)), h, h.n_layer, 0, where=where)
        tensors += _hash_tables(h, ckpt, lay)
        order = {t.name: i for i, t in enumerate(tensors)}
        tensors.sort(key=lambda t: (gguf_spec.block_of(t.name) if gguf_spec.block_of(t.name) is not None else -1, order[t.name]))
        self.check(h, tensors)
        return h, tensors


def metadata(h: V4Hparams) -> dict[str, MetaValue]:
    K, V = gguf_spec.Keys, gguf_spec.GGUFValueType
    a = ARCH

    def u32(x: int) -> MetaValue:
        return MetaValue(int(x), V.UINT32)

    def f32(x: float) -> MetaValue:
        return MetaValue(float(x), V.FLOAT32)

    md: dict[str, MetaValue] = {
        K.LLM.BLOCK_COUNT.format(arch=a): u32(h.n_layer),
        K.LLM.CONTEXT_LENGTH.format(arch=a): u32(h.n_ctx),
        K.LLM.EMBEDDING_LENGTH.format(arch=a): u32(h.n_embd),
        K.Attention.HEAD_COUNT.format(arch=a): u32(h.n_head),
        K.Attention.HEAD_COUNT_KV.format(arch=a): u32(1),
        K.Rope.FREQ_BASE.format(arch=a): f32(h.rope_theta),
        K.Attention.LAYERNORM_RMS_EPS.format(arch=a): f32(h.norm_eps),
        K.LLM.EXPERT_COUNT.format(arch=a): u32(h.n_expert),
        K.LLM.EXPERT_USED_COUNT.format(arch=a): u32(h.n_expert_used),
        K.LLM.EXPERT_GATING_FUNC.format(arch=a): u32(SQRT_SOFTPLUS),
        K.Attention.KEY_LENGTH.format(arch=a): u32(h.head_dim),
        K.Attention.VALUE_LENGTH.format(arch=a): u32(h.head_dim),
        K.Rope.DIMENSION_COUNT.format(arch=a): u32(h.n_rot),
        K.Attention.Q_LORA_RANK.format(arch=a): u32(h.q_lora_rank),
        K.Attention.SLIDING_WINDOW.format(arch=a): u32(h.sliding_window or 0),
        K.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=a): u32(h.n_ff),
        K.LLM.EXPERT_SHARED_COUNT.format(arch=a): u32(1),  # transformers' V4 has one shared MLP of moe_intermediate_size
        K.LLM.EXPERT_WEIGHTS_SCALE.format(arch=a): f32(h.weights_scale),
        K.LLM.EXPERT_WEIGHTS_NORM.format(arch=a): MetaValue(True, V.BOOL),  # transformers' routers always renormalise
        K.LLM.SWIGLU_CLAMP_EXP.format(arch=a): MetaValue([float(h.swiglu_limit)] * h.n_layer, V.ARRAY, V.FLOAT32),
        K.LLM.SWIGLU_CLAMP_SHEXP.format(arch=a): MetaValue([float(h.swiglu_limit)] * h.n_layer, V.ARRAY, V.FLOAT32),
        K.Attention.INDEXER_HEAD_COUNT.format(arch=a): u32(h.index_n_head),
        K.Attention.INDEXER_KEY_LENGTH.format(arch=a): u32(h.index_head_dim),
        K.Attention.INDEXER_TOP_K.format(arch=a): u32(h.index_topk),
        K.Attention.OUTPUT_GROUP_COUNT.format(arch=a): u32(h.o_groups),
        K.Attention.OUTPUT_LORA_RANK.format(arch=a): u32(h.o_lora_rank),
        K.Attention.COMPRESS_RATIOS.format(arch=a): MetaValue([int(r) for r in h.ratios_written], V.ARRAY, V.INT32),
        K.Attention.COMPRESS_ROPE_FREQ_BASE.format(arch=a): f32(h.compress_theta),
        K.HyperConnection.COUNT.format(arch=a): u32(h.hc_mult),
        K.HyperConnection.SINKHORN_ITERATIONS.format(arch=a): u32(h.hc_iters),
        K.HyperConnection.EPSILON.format(arch=a): f32(h.hc_eps),
        K.LLM.HASH_LAYER_COUNT.format(arch=a): u32(h.n_hash),
        K.LLM.EMBEDDING_LENGTH_OUT.format(arch=a): u32(h.n_embd * h.hc_mult),
    }
    if h.rope.get("rope_type") == "yarn":
        md[K.Rope.SCALING_TYPE.format(arch=a)] = MetaValue("yarn", V.STRING)
        md[K.Rope.SCALING_FACTOR.format(arch=a)] = f32(h.rope["factor"])
        md[K.Rope.SCALING_ORIG_CTX_LEN.format(arch=a)] = u32(h.rope["original_max_position_embeddings"])
        md[K.Rope.SCALING_YARN_BETA_FAST.format(arch=a)] = f32(h.rope["beta_fast"])
        md[K.Rope.SCALING_YARN_BETA_SLOW.format(arch=a)] = f32(h.rope["beta_slow"])
    return md


#: not silu_gated_experts: the experts clamp their gate / up activations at swiglu_limit, which --all-experts' recomputation does not model
ROUTING = Routing(scoring="sqrtsoftplus", normalize_top_k=True, silu_gated_experts=False, score_bias=True, weights_scaled=True)
NOTES = (
    "routing: sqrt(softplus) scores (expert_gating_func 4), top-k by score + e_score_correction_bias (exp_probs_b), always renormalised, "
    "times routed_scaling_factor; written from transformers' router whatever norm_topk_prob says",
    "hash-routed blocks (mlp_layer_types / num_hash_layers, leading only): tid2eid -> I32 ffn_gate_tid2eid (whatever the type), no exp_probs_b "
    "(a published checkpoint's unused gate.bias there is dropped, as llama.cpp's converter drops it)",
    "multi-token-prediction blocks (mtp.*) are left out, as llama.cpp's converter leaves them out by default",
    "quantised releases (fp8, ue8m0 .scale, expert_dtype fp4; published layout only): FP8 weights decoded, FP4 experts carried as MXFP4 "
    "(--allow-requantize decodes them too)",
    "expert_shared_count is always 1 and head_count_kv 1 (transformers' V4 builds one shared MLP of moe_intermediate_size and one KV "
    "head whatever n_shared_experts / num_key_value_heads say)",
    "at least one compressed-sparse (ratio 4) and one heavily-compressed (ratio 128) block are required (llama.cpp crashes otherwise); hc_mult must be 4",
    "imatrix: attn_output_a's entries (o_groups matrices in one row, as llama-imatrix records them) are refused by llama-quantize and "
    "quantkit convert alike (quantise without them: llama-quantize --exclude-weights attn_output_a); output_hc_fn never has an entry, so "
    "IQ3_XXS / IQ2_* / Q2_K_S need another type for it (--tensor-type output_hc_fn=q8_0)",
)

CONVERTER = register(V4Converter(
    model_type=MODEL_TYPE, arch=ARCH, hparams=hparams, rules=rules, metadata=metadata,
    ignore=(r"^mtp\.", r"^model\.mtp\.", r"\.rotary_emb\.inv_freq$"), hf_architectures=("DeepseekV4ForCausalLM",), routing=ROUTING, notes=NOTES,
))
