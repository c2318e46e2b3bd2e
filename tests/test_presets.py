"""``quantkit.policy.presets`` picks, tensor for tensor, the type llama.cpp's quantiser picks.

The reference is ``llama_cpp.llama_model_quantize`` (llama-quantize in process,
llama-cpp-python 0.3.36) on GGUF files written by ``quantkit convert``: the
bundled fixture (BF16) and random Mixtral / Mistral / Llama models (F32) whose
shapes make particular branches fire (each comment in :data:`RANDOM` says
which).  Every case goes through ``llama_tensor_get_type`` in
``src/llama-quant.cpp``: ``tensor_allows_quantization``,
``llama_tensor_get_type_impl`` and ``tensor_type_fallback``; the imatrix cases
also through ``tensor_requires_imatrix``.

Two ways of reading llama.cpp's choice:

* written file (``test_written_file_matches_plan``): a real run, the output read
  back with ``gguf.GGUFReader``;
* dry run (``test_plan_matches_llama_cpp``, the full matrix of models x presets x
  imatrix): ``params.dry_run``, types read from llama.cpp's per-tensor log.  It
  is the same ``metadata[i].target_type`` the real run writes, without running
  the kernels: the i-quant kernels build lookup tables for seconds and take
  seconds per million weights on 2 cores, too slow for a full matrix of real
  runs.  ``test_written_file_matches_plan`` also checks that both readings agree.

Presets that need an importance matrix are refused by llama.cpp without one
(``llama_model_quantize_impl``'s preliminary loop; a warning in dry runs),
exactly when the plan says so; with ``imatrix=True`` llama.cpp gets a dummy
all-ones matrix through ``params.imatrix`` and the plan is computed with
``has_imatrix=True``.
"""

from __future__ import annotations

import ctypes
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import FIXTURE, convert, random_model
from quantkit.policy import presets
from quantkit.errors import QuantkitError

Q = gguf.GGMLQuantizationType
ALL = presets.PRESET_NAMES
#: Presets whose plan changes when an importance matrix is given (IQ3_XXS attn_v / ffn_down,
#: IQ4_NL / IQ4_XS ffn_down, Q4_0 / Q5_0 ffn_down in llama_tensor_get_type_impl).
IMATRIX_SENSITIVE = ("Q4_0", "Q5_0", "IQ3_XXS", "IQ4_NL", "IQ4_XS")
#: Presets llama.cpp cannot run without an importance matrix on some model below.
IMATRIX_NEEDED = ("Q2_K_S", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XS")
#: (preset, imatrix) pairs run on every model.
CASES = [(p, False) for p in ALL] + [(p, True) for p in ALL if p in IMATRIX_SENSITIVE + IMATRIX_NEEDED]
#: IQ1_* / IQ2_* kernels build lookup tables for seconds before quantising anything: dry runs only.
SLOW_KERNELS = frozenset(p for p in ALL if p.startswith(("IQ1_", "IQ2_")))
#: Real runs with the dummy imatrix: the presets that write an imatrix-only type (Q2_K in Q2_K_S, IQ3_XXS).
REAL_WITH_IMATRIX = ("Q2_K_S", "IQ3_XXS", "IQ3_XS")
#: Real runs (the quantised file read back): every other preset on the 8-expert random model, and the
#: fixture (8.6M weights) for three presets.
REAL_CASES = [("moe8-L8-ffn256-rows32", p, im) for p, im in CASES if p not in SLOW_KERNELS and (not im or p in REAL_WITH_IMATRIX)]
REAL_CASES += [("fixture", p, False) for p in ("Q8_0", "Q4_K_M", "Q3_K_M")]
REAL_CASES += [("qwen3moe-e8-L8", p, False) for p in ("Q4_K_M", "Q3_K_M")]
REAL_CASES += [("olmoe-e8-L16", p, False) for p in ("Q4_K_M", "Q3_K_M")]
REAL_CASES += [("qwen2moe-e8-L8-shexp", p, False) for p in ("Q4_K_M", "Q3_K_M")]
REAL_CASES += [("granitemoeshared-e8-L8-tied", p, False) for p in ("Q4_K_M", "Q3_K_M")]
REAL_CASES += [("deepseek3-e8-L8-mla", p, False) for p in ("Q4_K_M", "Q3_K_M", "MXFP4_MOE")]
REAL_CASES += [("qwen3next-e8-L8-hybrid", p, False) for p in ("Q4_K_M", "Q3_K_M")]
REAL_CASES += [(name, p, False) for name in ("dots1-e8-L8-dense1", "minimax_m2-e8-L8-gqa", "ernie4_5_moe-e4-L6-tied") for p in ("Q4_K_M", "Q3_K_M")]
REAL_CASES += [("glm4moe-e8-L8-dense1", p, False) for p in ("Q4_K_M", "Q3_K_M")]
REAL_CASES += [(name, "Q4_K_M", False) for name in ("deepseek32-e8-L4-dsa", "glm-dsa-e8-L4-shared")]


# --------------------------------------------------------------------------- llama.cpp as the oracle


@dataclass(frozen=True)
class Reference:
    ok: bool  # llama_model_quantize returned 0
    types: dict[str, Q]  # tensor -> type llama.cpp chose
    wants_imatrix: bool  # llama.cpp refused (or, dry run, warned) for lack of an importance matrix
    log: str


_LOG_TENSOR = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size =\s*[\d.]+ MiB(?: ->\s*[\d.]+ MiB \((\w+)\))?")


@functools.lru_cache(maxsize=8)
def _dummy_imatrix(path: Path) -> tuple[object, list]:
    """A ``llama_model_imatrix_data`` array of all-ones, one entry per matrix (per expert for 3-D), and what keeps it alive."""
    import llama_cpp

    keep: list = []
    entries = []
    for t in gguf.GGUFReader(path).tensors:
        ne = [int(d) for d in t.shape]  # ggml order: ne0 first
        if len(ne) >= 2:
            a = np.ones(ne[0] * (ne[2] if len(ne) > 2 else 1), dtype=np.float32)
            keep.append(a)
            entries.append((t.name.encode(), a))
    arr = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()  # zeroed sentinel at the end
    for i, (name, a) in enumerate(entries):
        arr[i].name, arr[i].data, arr[i].size = name, a.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), a.size
    keep.append(arr)
    return ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data)), keep


def llama_quantize(
    src: Path, out: Path, preset: str, imatrix: bool, dry_run: bool = False, overrides: tuple[tuple[str, Q], ...] = (),
) -> Reference:
    """Run llama.cpp's in-process quantiser; types from the written file (or, dry run, its log).

    ``overrides``: llama-quantize's ``--tensor-type PATTERN=TYPE`` list (``tt_overrides``), first match wins.
    """
    import llama_cpp

    from conftest import llama_quantize_run

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{'ALL' if preset == 'F32' else 'MOSTLY'}_{preset}")
    params.nthread = 2
    params.dry_run = dry_run
    if imatrix:
        params.imatrix = _dummy_imatrix(src)[0]
    if overrides:
        tt = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()  # zeroed sentinel at the end
        for i, (pattern, qtype) in enumerate(overrides):
            tt[i].pattern, tt[i].type = pattern.encode(), int(qtype)
        params.tt_overrides = ctypes.cast(tt, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    rc, log = llama_quantize_run(src, out, params)
    wants = "requires an imatrix" in log or "will require an imatrix" in log
    if rc != 0:
        return Reference(False, {}, wants, log)
    if dry_run:
        types = {m[1]: Q[(m[3] or m[2]).upper()] for m in _LOG_TENSOR.finditer(log)}
    else:
        types = {t.name: Q(t.tensor_type) for t in gguf.GGUFReader(out).tensors}
    return Reference(True, types, wants, log)


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Model:
    gguf: Path
    tensors: list
    hparams: object


def _load(src: Path, path: Path) -> Model:
    from quantkit.pipeline.convert import prepare

    ckpt, prep = prepare(src, "f32")
    ckpt.close()
    return Model(path, prep.tensors, prep.hparams)


# Each random model makes a different part of llama_tensor_get_type_impl fire.  Row
# lengths (ne0) are hidden_size for q/k/v/gate/up/embeddings, heads*head_dim for
# attn_output and intermediate_size for ffn_down.
RANDOM = {
    # 8 experts (n_expert == 8 bumps: attn_v/attn_k Q8_0, attn_output Q5_K, IQ3_M ffn_down), 8 layers
    # so n_layer/8 = 1 and use_more_bits varies per layer; ffn_down rows 256 take k/i-quants, every
    # other row is 32 long: tensor_type_fallback to Q4_0 / Q5_0 / Q5_1 / Q8_0 / IQ4_NL
    "moe8-L8-ffn256-rows32": dict(
        model_type="mixtral", num_local_experts=8, num_hidden_layers=8, hidden_size=32, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8,
    ),
    # 4 experts (IQ1/IQ2 attn_v n_expert >= 4 rule), no GQA, tied embeddings (token_embd takes the
    # output rules), hidden 320 (multiple of 64, not 256), attn_output rows 80 (not a multiple of 32:
    # F16 fallback), ffn_down rows 64
    "moe4-tied-h320": dict(
        model_type="mixtral", num_local_experts=4, num_hidden_layers=2, hidden_size=320, intermediate_size=64,
        num_attention_heads=5, num_key_value_heads=5, head_dim=16, tie_word_embeddings=True,
    ),
    # dense, 12 layers (blk.10 / blk.11 sort after blk.9: llama.cpp's counters follow block numbers),
    # GQA 4, tied embeddings, rows 256 except ffn_down (64; attn_output 256: the non-8-expert
    # attn_output arms), llama3 rope (a generated 1-D rope_freqs tensor that must stay F32)
    "llama-L12-gqa4-tied-rope3": dict(
        model_type="llama", num_hidden_layers=12, hidden_size=256, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=1, head_dim=64, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    ),
    # dense, 16 layers (n_layer/16 = 1: Q3_K_M ffn_down Q5_K; Q4_K_S attn_v first 4), no GQA
    # (IQ3_XXS attn_v IQ3_S without an imatrix), rows 256 except attn_output (64)
    "mistral-L16-mha": dict(
        model_type="mistral", num_hidden_layers=16, hidden_size=256, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16,
    ),
    # 80 layers with GQA: llama.cpp types it LLM_TYPE_70B and bumps attn_v Q3_K/Q4_K to Q5_K
    # (visible through the fallback: Q5_K -> Q5_1 instead of Q4_K -> Q5_0)
    "llama-L80-70b-shape": dict(
        model_type="llama", num_hidden_layers=80, hidden_size=64, intermediate_size=32,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16,
    ),
    # qwen3moe (another GGUF architecture): 8 experts of width 256 (k-quants on every expert), GQA 2,
    # q/k norms (1-D, F32), attention rows 256, 8 layers
    "qwen3moe-e8-L8": dict(
        model_type="qwen3_moe", num_experts=8, num_hidden_layers=8, hidden_size=256, moe_intermediate_size=256,
        intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    ),
    # olmoe (GGUF arch olmoe): 8 experts, 16 layers (OLMoE-1B-7B's depth), no GQA (8 experts: attn_v bumps),
    # q/k norms over the whole projection (1-D, F32), rows 256 except ffn_down_exps (128: falls back)
    "olmoe-e8-L16": dict(
        model_type="olmoe", num_experts=8, num_hidden_layers=16, hidden_size=256, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=4,
    ),
    # qwen2moe (GGUF arch qwen2moe): 8 experts of width 256 (k-quants on every expert), GQA 2, q/k/v biases
    # (1-D, F32), a shared expert: ffn_gate_inp_shexp one row (never quantised), ffn_{gate,up}_shexp rows 256,
    # ffn_down_shexp rows 64 (falls back); two ffn_down tensors per block for llama.cpp's i_ffn_down counter
    "qwen2moe-e8-L8-shexp": dict(
        model_type="qwen2_moe", num_experts=8, num_hidden_layers=8, hidden_size=256, moe_intermediate_size=256,
        shared_expert_intermediate_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
    ),
    # granitemoe (GGUF arch granitemoe, from granitemoeshared): 8 experts of width 256, a shared MLP of width 256
    # (ffn_{gate,up,down}_shexp: two ffn_down tensors per block for llama.cpp's i_ffn_down counter), GQA 2,
    # q/k/v/o biases (1-D, F32), tied embeddings (token_embd takes the output rules), as granite-3.1 is
    "granitemoeshared-e8-L8-tied": dict(
        model_type="granitemoeshared", num_local_experts=8, num_hidden_layers=8, hidden_size=256, intermediate_size=256,
        shared_intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True,
    ),
    # deepseek2 (from deepseek_v3): MLA tensors llama.cpp has no category for (attn_q_a / attn_q_b / attn_kv_a_mqa; attn_k_b and
    # attn_v_b 3-D [heads, ...]: MXFP4_MOE's "ne[2] > 1" arm takes them too), rows 256 except attn_k_b (nope 64: falls back) and
    # attn_q_a rows 256; one leading dense block (ffn_down 2-D among the MoE ffn_down_exps / ffn_down_shexp for the i_ffn_down
    # counter), 8 experts of width 256 (attn_output Q5_K bump), head_count_kv 1 (n_gqa = heads), exp_probs_b (1-D, F32), 8 layers
    "deepseek3-e8-L8-mla": dict(
        model_type="deepseek_v3", n_routed_experts=8, num_hidden_layers=8, hidden_size=256, moe_intermediate_size=256, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, first_k_dense_replace=1, n_shared_experts=1,
    ),
    # deepseek2 (from deepseek_v2) without low-rank queries (attn_q: llama.cpp's attn_q arms), 4 experts of width 128 (fall back),
    # two shared experts (ffn_*_shexp 256 wide), three leading dense blocks of 12, tied embeddings
    "deepseek2-lite-e4-L12-tied": dict(
        model_type="deepseek_v2", q_lora_rank=None, n_routed_experts=4, num_hidden_layers=12, hidden_size=256, moe_intermediate_size=128,
        intermediate_size=512, num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=256, qk_nope_head_dim=32, qk_rope_head_dim=32,
        v_head_dim=32, first_k_dense_replace=3, n_shared_experts=2, tie_word_embeddings=True,
    ),
    # qwen3next: 4 Gated DeltaNet + 4 gated-attention blocks (attn_qkv counts as an attn_v for i_attention_wv and takes the 8-expert
    # Q8_0 bump too; attn_gate, ssm_ba, ssm_out: category "other"; ssm_conv1d never quantised; ssm_a / ssm_dt / norms 1-D), 8 experts
    # of width 256, a shared expert of width 64 (ffn_down_shexp falls back), rows 256 elsewhere
    "qwen3next-e8-L8-hybrid": dict(
        model_type="qwen3_next", num_experts=8, num_hidden_layers=8, hidden_size=256, moe_intermediate_size=256, shared_expert_intermediate_size=64,
        intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_key_head_dim=64, linear_value_head_dim=64,
    ),
    # qwen35moe (text-only save): ssm_beta / ssm_alpha (rows 256) instead of ssm_ba, tiled value heads, 4 experts of width 128 (fall back),
    # GQA 4:1, shared expert of width 256, 6 blocks: full attention every 3rd
    "qwen35moe-e4-L6-hybrid": dict(
        model_type="qwen3_5_moe_text", num_experts=4, num_hidden_layers=6, hidden_size=256, moe_intermediate_size=128, shared_expert_intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=1, head_dim=64, linear_key_head_dim=64, linear_value_head_dim=64, full_attention_interval=3,
    ),
    # dots1: one leading dense block (ffn_down 2-D among the MoE blocks' ffn_down_exps / ffn_down_shexp for the i_ffn_down counter),
    # 8 experts of width 256 (the 8-expert bumps), a shared expert of width 256, no GQA (the graph needs it), per-head q/k norms and
    # exp_probs_b (1-D, F32), rows 256 everywhere, 8 layers
    "dots1-e8-L8-dense1": dict(
        model_type="dots1", n_routed_experts=8, num_hidden_layers=8, hidden_size=256, moe_intermediate_size=256, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, first_k_dense_replace=1,
    ),
    # minimax-m2: 8 experts of width 256 (feed_forward_length), GQA 2, q/k norms over whole projections (1-D of 256 / 128), exp_probs_b,
    # half of each head rotary (no tensor of its own), 8 layers
    "minimax_m2-e8-L8-gqa": dict(
        model_type="minimax_m2", num_local_experts=8, num_hidden_layers=8, hidden_size=256, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, rotary_dim=32,
    ),
    # ernie4_5-moe: 4 experts of width 128 (fall back; IQ1/IQ2 attn_v n_expert >= 4 rule), 2 shared experts (ffn_*_shexp 256 wide), a leading
    # dense block of width 512, GQA 4:1, tied embeddings (no output: token_embd takes the output rules), exp_probs_b [1, E] written 1-D, 6 layers
    "ernie4_5_moe-e4-L6-tied": dict(
        model_type="ernie4_5_moe", moe_num_experts=4, num_hidden_layers=6, hidden_size=256, moe_intermediate_size=128, intermediate_size=512,
        num_attention_heads=4, num_key_value_heads=1, moe_num_shared_experts=2, tie_word_embeddings=True,
    ),
    # glm4moe: one leading dense block (ffn_down 2-D among ffn_down_exps / ffn_down_shexp for the i_ffn_down counter), 8 experts of
    # width 256 (the 8-expert bumps), a shared expert of width 256, GQA 2:1 with head_dim 64, q/k/v biases and q/k norms (1-D, F32),
    # post_attention_norm, exp_probs_b, a quarter of each head rotary (no tensor of its own), 8 layers
    "glm4moe-e8-L8-dense1": dict(
        model_type="glm4_moe", n_routed_experts=8, num_hidden_layers=8, hidden_size=256, moe_intermediate_size=256, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, n_shared_experts=1, first_k_dense_replace=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    ),
    # deepseek32 (from deepseek_v32): deepseek2's MLA tensors plus the lightning indexer: indexer.attn_k (llama.cpp's "attn_k.weight"
    # substring: ATTENTION_K, with the 8-expert bump), indexer.attn_q_b / indexer.proj (category "other"), indexer.k_norm weight and
    # bias (1-D, F32); one leading dense block, 8 experts of width 256, rows 256, 4 layers
    "deepseek32-e8-L4-dsa": dict(
        model_type="deepseek_v32", n_routed_experts=8, num_hidden_layers=4, hidden_size=256, moe_intermediate_size=256, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, first_k_dense_replace=1, n_shared_experts=1, n_group=1, topk_group=1, index_n_heads=4, index_head_dim=128, index_topk=256,
    ),
    # glm-dsa (from glm_moe_dsa): as deepseek32, with shared-indexer blocks 1 and 3 (no indexer tensors there), indexer heads of 64,
    # 8 experts in 4 groups
    "glm-dsa-e8-L4-shared": dict(
        model_type="glm_moe_dsa", n_routed_experts=8, num_hidden_layers=4, hidden_size=256, moe_intermediate_size=256, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, first_k_dense_replace=1, n_shared_experts=1, n_group=4, topk_group=2, index_n_heads=4, index_head_dim=64, index_topk=256,
        indexer_types=["full", "shared", "full", "shared"],
    ),
    # gpt-oss: 4 experts of width 256 (k-quants), stored transposed and interleaved; 2-D expert biases and router / attention
    # biases, attn_sinks (1-D), post_attention_norm; GQA 2:1, head_dim 64 (attn_q 256 rows), 4 layers alternating sliding / full
    "gpt-oss-e4-L4": dict(
        model_type="gpt_oss", num_local_experts=4, num_hidden_layers=4, hidden_size=256, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    ),
    # llama4 (text): dense and MoE blocks interleaved (step 2: ffn_down 2-D in blocks 0, 2, ... among ffn_down_exps / ffn_down_shexp
    # for the i_ffn_down counter), 8 experts of width 256 (the 8-expert bumps) stored fused and transposed, a shared expert of width 256,
    # dense MLPs of width 64 (ffn_down falls back), GQA 2:1, Scout's llama3 rope scaling (rope_freqs 1-D, F32), 8 layers
    "llama4-e8-L8-interleaved": dict(
        model_type="llama4_text", num_local_experts=8, num_hidden_layers=8, hidden_size=256, intermediate_size=256, intermediate_size_mlp=64,
        interleave_moe_layer_step=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        rope_parameters={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
    ),
    # deepseek4 (from deepseek_v4): hyper-connection matrices (hc_*_fn rows 1024, quantised as "other"; base / scale 1-D), sliding /
    # compressed-sparse / heavily-compressed / compressed-sparse blocks (compressor kv / gate / ape, indexer q_b / proj / compressor
    # tensors), attn_kv (one head), grouped attn_output_a / _b, attn_sinks (1-D); two hash-routed blocks (ffn_gate_tid2eid: I32, never
    # quantised), exp_probs_b in the other two; 8 experts of width 256, a shared expert of width 256, rows 256 elsewhere
    "deepseek4-e8-L4-hash": dict(
        model_type="deepseek_v4", n_routed_experts=8, num_experts_per_tok=2, num_hidden_layers=4, hidden_size=256, moe_intermediate_size=256,
        intermediate_size=256, num_attention_heads=4, num_key_value_heads=1, head_dim=64, q_lora_rank=256, o_groups=2, o_lora_rank=128,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention", "compressed_sparse_attention"],
        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"], sliding_window=8, index_n_heads=4, index_head_dim=64, index_topk=64, hc_mult=4,
        num_nextn_predict_layers=0, partial_rotary_factor=0.25,
    ),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory, fixture_gguf):
    """Models built and converted once per module: the fixture (BF16) and the random ones (F32)."""
    cache: dict[str, Model] = {}
    base = tmp_path_factory.mktemp("presets")

    def get(name: str) -> Model:
        if name not in cache:
            if name == "fixture":
                cache[name] = _load(FIXTURE, fixture_gguf("bf16"))
            else:
                spec = dict(RANDOM[name])
                src = random_model(base / name, spec.pop("model_type"), **spec)
                cache[name] = _load(src, convert(src, base / f"{name}.gguf", "f32"))
        return cache[name]

    return get


def plan_or_refusal(m: Model, preset: str, imatrix: bool, ref: Reference) -> dict | None:
    """The plan, or None when it is refused for a row length llama.cpp cannot handle either."""
    try:
        return presets.preset_types(m.tensors, m.hparams, preset, has_imatrix=imatrix)
    except QuantkitError as e:
        # tensor_type_fallback defines no fallback for a >32-block type (Q1_0): llama.cpp throws too
        assert not ref.ok and "no tensor type fallback is defined" in ref.log, f"plan refused ({e}) but llama.cpp did not"
        return None


def assert_same_types(plan: dict, got: dict[str, Q], what: str) -> None:
    assert set(got) == set(plan), f"{what}: tensor sets differ: {sorted(set(got) ^ set(plan))}"
    wrong = [f"  {n}: llama.cpp {got[n].name}, plan {c.qtype.name} ({c.reason})" for n, c in plan.items() if got[n] != c.qtype]
    assert not wrong, f"{what}: {len(wrong)} of {len(plan)} tensors differ\n" + "\n".join(wrong)


# --------------------------------------------------------------------------- the comparisons


@pytest.mark.parametrize("preset,imatrix", CASES)
@pytest.mark.parametrize("name", ["fixture", *RANDOM])
def test_plan_matches_llama_cpp(model, tmp_path, name, preset, imatrix):
    """Dry run of llama_model_quantize: every model x every preset (x imatrix where it matters)."""
    m = model(name)
    ref = llama_quantize(m.gguf, tmp_path / "out.gguf", preset, imatrix, dry_run=True)
    plan = plan_or_refusal(m, preset, imatrix, ref)
    if plan is None:
        return
    assert ref.ok, f"llama_model_quantize failed for {preset}:\n{ref.log[-2000:]}"
    if not imatrix:  # tensor_requires_imatrix: llama.cpp warns exactly when the plan needs one
        assert ref.wants_imatrix == bool(presets.imatrix_required(plan)), f"{preset}: llama.cpp wants an imatrix: {ref.wants_imatrix}, plan: {presets.imatrix_required(plan) or 'no'}"
    assert_same_types(plan, ref.types, f"{name} {preset} imatrix={imatrix}")


#: llama-quantize --tensor-type rules, several asking for a 256-block type on rows it does not divide
#: (moe4-tied-h320: ffn_down rows 64, attn_output rows 80, everything else 320 = 64 x 5)
TENSOR_TYPE_RULES = (
    ("blk\\.0\\.ffn_down", Q.Q6_K), ("ffn_down", Q.Q5_K), ("attn_output", Q.Q4_K), ("attn_q", Q.Q3_K),
    ("ffn_up", Q.IQ4_XS), ("attn_k", Q.Q8_0), ("token_embd", Q.Q2_K),
)


@pytest.mark.parametrize("name", ["moe4-tied-h320", "moe8-L8-ffn256-rows32"])
@pytest.mark.parametrize("preset", ["Q4_K_M", "Q3_K_S"])
def test_rules_fall_back_like_llama_cpp(model, tmp_path, name, preset):
    """A rule's type goes through tensor_type_fallback exactly as llama-quantize's --tensor-type does."""
    from quantkit.policy.plan import Override, make_plan

    m = model(name)
    ref = llama_quantize(m.gguf, tmp_path / "out.gguf", preset, False, dry_run=True, overrides=TENSOR_TYPE_RULES)
    assert ref.ok, ref.log[-2000:]
    rules = [Override.parse(p, q.name, source=f"--tensor-type {i}") for i, (p, q) in enumerate(TENSOR_TYPE_RULES)]
    plan = {t.name: t for t in make_plan(m.tensors, preset, rules, m.hparams).tensors}
    assert_same_types(plan, ref.types, f"{name} {preset} with --tensor-type rules")
    fell = [t for t in plan.values() if "falls back" in t.reason]
    assert fell or name != "moe4-tied-h320", "the rules were meant to hit rows a 256 block does not divide"


@pytest.mark.parametrize("name,preset,imatrix", REAL_CASES)
def test_written_file_matches_plan(model, tmp_path, name, preset, imatrix):
    """Real run of llama_model_quantize, the output read with GGUFReader; the dry run's log agrees."""
    m = model(name)
    ref = llama_quantize(m.gguf, tmp_path / "out.gguf", preset, imatrix)
    plan = plan_or_refusal(m, preset, imatrix, ref)
    if plan is None:
        return
    if presets.imatrix_required(plan) and not imatrix:  # llama.cpp refuses before writing anything
        assert not ref.ok and ref.wants_imatrix, f"{preset}: the plan needs an imatrix, llama.cpp did not refuse"
        return
    assert ref.ok, f"llama_model_quantize failed for {preset}:\n{ref.log[-2000:]}"
    assert_same_types(plan, ref.types, f"{name} {preset} imatrix={imatrix} (written file)")
    dry = llama_quantize(m.gguf, tmp_path / "dry.gguf", preset, imatrix, dry_run=True)
    assert dry.types == ref.types


@pytest.mark.parametrize("preset", IMATRIX_NEEDED)
def test_llama_cpp_refuses_without_imatrix_as_planned(model, tmp_path, preset):
    """llama_model_quantize_impl throws before writing when a tensor needs an imatrix; so does check_imatrix."""
    m = model("llama-L12-gqa4-tied-rope3")
    plan = presets.preset_types(m.tensors, m.hparams, preset)
    assert presets.imatrix_required(plan)
    ref = llama_quantize(m.gguf, tmp_path / "out.gguf", preset, imatrix=False)
    assert not ref.ok and "requires an imatrix" in ref.log
    with pytest.raises(QuantkitError, match="needs an importance matrix"):
        presets.check_imatrix(plan, preset, has_imatrix=False)
    presets.check_imatrix(plan, preset, has_imatrix=True)


def test_row_length_without_fallback_fails_like_llama_cpp(model, tmp_path):
    """Q1_0 (block 128) has no entry in tensor_type_fallback: a 320-long row is an error on both sides."""
    m = model("moe4-tied-h320")
    with pytest.raises(QuantkitError, match="no fallback for Q1_0"):
        presets.preset_types(m.tensors, m.hparams, "Q1_0")
    ref = llama_quantize(m.gguf, tmp_path / "out.gguf", "Q1_0", imatrix=False)
    assert not ref.ok and "no tensor type fallback is defined for type q1_0" in ref.log


# --------------------------------------------------------------------------- tables and API


def test_default_types_and_file_types_match_llama_cpp():
    """PRESETS restates llama_ftype_get_default_type and the LLAMA_FTYPE constants."""
    import llama_cpp

    from quantkit.format.ggml import _load

    default_type = _load("llama")._Z28llama_ftype_get_default_type11llama_ftype  # C++ linkage (llama-ext.h)
    default_type.argtypes, default_type.restype = [ctypes.c_int], ctypes.c_int
    for name, p in presets.PRESETS.items():
        const = getattr(llama_cpp, f"LLAMA_FTYPE_{'ALL' if name == 'F32' else 'MOSTLY'}_{name}")
        assert int(p.file_type) == const == int(presets.FILE_TYPES[name]), name
        assert Q(default_type(const)) == p.default, name


def test_reasons_name_the_rule(model):
    m = model("fixture")
    plan = presets.preset_types(m.tensors, m.hparams, "Q4_K_M")
    # 8 experts: llama.cpp bumps attn_v to Q8_0 after the use_more_bits choice
    assert plan["blk.0.attn_v.weight"].qtype == Q.Q8_0 and "8 experts" in plan["blk.0.attn_v.weight"].reason
    assert plan["blk.3.ffn_down_exps.weight"].qtype == Q.Q6_K and "use_more_bits" in plan["blk.3.ffn_down_exps.weight"].reason
    assert plan["blk.0.ffn_gate_inp.weight"].qtype == Q.F32 and "router" in plan["blk.0.ffn_gate_inp.weight"].reason
    assert plan["output.weight"].reason == "Q4_K_M: output gets Q6_K"
    r = model("moe4-tied-h320")
    fell = presets.preset_types(r.tensors, r.hparams, "Q4_K_M")["blk.0.attn_q.weight"]
    assert fell.fallback and fell.qtype == Q.Q5_0 and "row length 320 not a multiple of 256: Q4_K falls back to Q5_0" in fell.reason


def test_preset_names_and_aliases():
    assert presets.get_preset("q4_k").name == "Q4_K_M"
    assert set(presets.PRESET_NAMES) >= {"Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "IQ1_S", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4_MOE", "F16", "BF16"}
    with pytest.raises(QuantkitError, match=r"'Q4_K_X' is not a llama.cpp preset"):
        presets.get_preset("Q4_K_X")
