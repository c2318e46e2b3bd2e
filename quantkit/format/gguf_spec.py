"""The GGUF format's numbers and names that quantkit's hot paths need, without importing gguf-py.

``import gguf`` costs ~80 ms on top of numpy (its reader, writer, vocab and
metadata modules, yaml); a `quantkit convert` of a small model or a short
`quantkit eval ppl` is a second or two, so that is a measurable share of a
command.  The format is stable and small: the GGML tensor types and their
block sizes, the metadata value types, llama.cpp's file types, the metadata
keys and tensor names quantkit writes.  Every value here equals gguf-py's
(``tests/test_gguf_codec.py::test_spec_matches_gguf_py`` checks all of them
against the pinned gguf package), and the enums are ``IntEnum``: a member
compares and hashes as its number, so gguf-py functions (``gguf.quants``) take
them as they are.

Not for: reading or writing files (``quantkit.format.gguf_read``, ``quantkit.format.gguf_write``).
"""

from __future__ import annotations

import re

from enum import IntEnum

GGUF_MAGIC = 0x46554747  # b"GGUF", little endian
GGUF_VERSION = 3
GGUF_DEFAULT_ALIGNMENT = 32
GGML_QUANT_VERSION = 2  # general.quantization_version, as llama.cpp writes it


class GGMLQuantizationType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


_Q = GGMLQuantizationType
#: storage types llama.cpp loads but cannot compute with as weights: integer and F64 tensors crash it (SIGSEGV),
#: Q8_1 / Q8_K are the kernels' activation formats (a Q8_1 router crashes it too); llama-quantize has no such target
NOT_WEIGHT_TYPES = frozenset({_Q.I8, _Q.I16, _Q.I32, _Q.I64, _Q.F64, _Q.Q8_1, _Q.Q8_K})
#: type -> (elements per block, bytes per block)
GGML_QUANT_SIZES: dict[GGMLQuantizationType, tuple[int, int]] = {
    _Q.F32: (1, 4), _Q.F16: (1, 2), _Q.Q4_0: (32, 18), _Q.Q4_1: (32, 20), _Q.Q5_0: (32, 22), _Q.Q5_1: (32, 24),
    _Q.Q8_0: (32, 34), _Q.Q8_1: (32, 40), _Q.Q2_K: (256, 84), _Q.Q3_K: (256, 110), _Q.Q4_K: (256, 144),
    _Q.Q5_K: (256, 176), _Q.Q6_K: (256, 210), _Q.Q8_K: (256, 292), _Q.IQ2_XXS: (256, 66), _Q.IQ2_XS: (256, 74),
    _Q.IQ3_XXS: (256, 98), _Q.IQ1_S: (256, 50), _Q.IQ4_NL: (32, 18), _Q.IQ3_S: (256, 110), _Q.IQ2_S: (256, 82),
    _Q.IQ4_XS: (256, 136), _Q.I8: (1, 1), _Q.I16: (1, 2), _Q.I32: (1, 4), _Q.I64: (1, 8), _Q.F64: (1, 8),
    _Q.IQ1_M: (256, 56), _Q.BF16: (1, 2), _Q.TQ1_0: (256, 54), _Q.TQ2_0: (256, 66), _Q.MXFP4: (32, 17),
    _Q.NVFP4: (64, 36), _Q.Q1_0: (128, 18),
}  # fmt: skip


class LlamaFileType(IntEnum):
    """``general.file_type``: llama.cpp's ``llama_ftype``."""

    ALL_F32 = 0
    MOSTLY_F16 = 1
    MOSTLY_Q4_0 = 2
    MOSTLY_Q4_1 = 3
    MOSTLY_Q8_0 = 7
    MOSTLY_Q5_0 = 8
    MOSTLY_Q5_1 = 9
    MOSTLY_Q2_K = 10
    MOSTLY_Q3_K_S = 11
    MOSTLY_Q3_K_M = 12
    MOSTLY_Q3_K_L = 13
    MOSTLY_Q4_K_S = 14
    MOSTLY_Q4_K_M = 15
    MOSTLY_Q5_K_S = 16
    MOSTLY_Q5_K_M = 17
    MOSTLY_Q6_K = 18
    MOSTLY_IQ2_XXS = 19
    MOSTLY_IQ2_XS = 20
    MOSTLY_Q2_K_S = 21
    MOSTLY_IQ3_XS = 22
    MOSTLY_IQ3_XXS = 23
    MOSTLY_IQ1_S = 24
    MOSTLY_IQ4_NL = 25
    MOSTLY_IQ3_S = 26
    MOSTLY_IQ3_M = 27
    MOSTLY_IQ2_S = 28
    MOSTLY_IQ2_M = 29
    MOSTLY_IQ4_XS = 30
    MOSTLY_IQ1_M = 31
    MOSTLY_BF16 = 32
    MOSTLY_TQ1_0 = 36
    MOSTLY_TQ2_0 = 37
    MOSTLY_MXFP4_MOE = 38
    MOSTLY_NVFP4 = 39
    MOSTLY_Q1_0 = 40
    GUESSED = 1024


class GGUFValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


class TokenType(IntEnum):
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class Keys:
    """The metadata keys quantkit writes or reads (``{arch}`` is filled with the architecture)."""

    class General:
        ARCHITECTURE = "general.architecture"
        QUANTIZATION_VERSION = "general.quantization_version"
        ALIGNMENT = "general.alignment"
        FILE_TYPE = "general.file_type"
        NAME = "general.name"
        TYPE = "general.type"
        QUANTIZED_BY = "general.quantized_by"
        SIZE_LABEL = "general.size_label"
        LICENSE = "general.license"
        SOURCE_REPO_URL = "general.source.repo_url"  # where the model came from (a Hugging Face repo, for a cache source)

    class Split:  # a split set (llama-gguf-split): split.no and split.count UINT16, split.tensors.count INT32
        LLM_KV_SPLIT_NO = "split.no"
        LLM_KV_SPLIT_COUNT = "split.count"
        LLM_KV_SPLIT_TENSORS_COUNT = "split.tensors.count"

    class LLM:
        CONTEXT_LENGTH = "{arch}.context_length"
        EMBEDDING_LENGTH = "{arch}.embedding_length"
        BLOCK_COUNT = "{arch}.block_count"
        FEED_FORWARD_LENGTH = "{arch}.feed_forward_length"
        VOCAB_SIZE = "{arch}.vocab_size"
        EXPERT_COUNT = "{arch}.expert_count"
        EXPERT_USED_COUNT = "{arch}.expert_used_count"
        EXPERT_FEED_FORWARD_LENGTH = "{arch}.expert_feed_forward_length"
        EXPERT_SHARED_FEED_FORWARD_LENGTH = "{arch}.expert_shared_feed_forward_length"
        EMBEDDING_SCALE = "{arch}.embedding_scale"
        RESIDUAL_SCALE = "{arch}.residual_scale"
        LOGIT_SCALE = "{arch}.logit_scale"
        # MoE routing and layout keys (deepseek2, glm4moe, ...)
        LEADING_DENSE_BLOCK_COUNT = "{arch}.leading_dense_block_count"
        EXPERT_SHARED_COUNT = "{arch}.expert_shared_count"
        EXPERT_GROUP_COUNT = "{arch}.expert_group_count"
        EXPERT_GROUP_USED_COUNT = "{arch}.expert_group_used_count"
        EXPERT_WEIGHTS_SCALE = "{arch}.expert_weights_scale"
        EXPERT_WEIGHTS_NORM = "{arch}.expert_weights_norm"
        EXPERT_GATING_FUNC = "{arch}.expert_gating_func"
        NEXTN_PREDICT_LAYERS = "{arch}.nextn_predict_layers"
        # hybrid linear / full attention (qwen3next, qwen35moe)
        FULL_ATTENTION_INTERVAL = "{arch}.full_attention_interval"
        # interleaved dense / MoE blocks (llama4: every step-th block has experts)
        INTERLEAVE_MOE_LAYER_STEP = "{arch}.interleave_moe_layer_step"
        # DeepSeek V4 (deepseek4): hyper-connections, hash-routed blocks, clamped SwiGLU, the hyper-connection stream width
        EMBEDDING_LENGTH_OUT = "{arch}.embedding_length_out"
        HASH_LAYER_COUNT = "{arch}.hash_layer_count"
        SWIGLU_CLAMP_EXP = "{arch}.swiglu_clamp_exp"
        SWIGLU_CLAMP_SHEXP = "{arch}.swiglu_clamp_shexp"

    class Attention:
        HEAD_COUNT = "{arch}.attention.head_count"
        HEAD_COUNT_KV = "{arch}.attention.head_count_kv"
        KEY_LENGTH = "{arch}.attention.key_length"
        VALUE_LENGTH = "{arch}.attention.value_length"
        LAYERNORM_RMS_EPS = "{arch}.attention.layer_norm_rms_epsilon"
        SLIDING_WINDOW = "{arch}.attention.sliding_window"
        SCALE = "{arch}.attention.scale"
        # multi-head latent attention (deepseek2)
        Q_LORA_RANK = "{arch}.attention.q_lora_rank"
        KV_LORA_RANK = "{arch}.attention.kv_lora_rank"
        KEY_LENGTH_MLA = "{arch}.attention.key_length_mla"
        VALUE_LENGTH_MLA = "{arch}.attention.value_length_mla"
        # DeepSeek Sparse Attention's lightning indexer (deepseek32, glm-dsa)
        INDEXER_HEAD_COUNT = "{arch}.attention.indexer.head_count"
        INDEXER_KEY_LENGTH = "{arch}.attention.indexer.key_length"
        INDEXER_TOP_K = "{arch}.attention.indexer.top_k"
        INDEXER_TYPES = "{arch}.attention.indexer.types"  # per block: true = runs its own indexer, false = reuses the previous one's top-k
        # DeepSeek V4 (deepseek4): grouped low-rank output projection, compressed attention
        OUTPUT_GROUP_COUNT = "{arch}.attention.output_group_count"
        OUTPUT_LORA_RANK = "{arch}.attention.output_lora_rank"
        COMPRESS_RATIOS = "{arch}.attention.compress_ratios"
        COMPRESS_ROPE_FREQ_BASE = "{arch}.attention.compress_rope_freq_base"

    class Rope:
        DIMENSION_COUNT = "{arch}.rope.dimension_count"
        FREQ_BASE = "{arch}.rope.freq_base"
        SCALING_TYPE = "{arch}.rope.scaling.type"
        SCALING_FACTOR = "{arch}.rope.scaling.factor"
        SCALING_ORIG_CTX_LEN = "{arch}.rope.scaling.original_context_length"
        SCALING_ATTN_FACTOR = "{arch}.rope.scaling.attn_factor"
        SCALING_YARN_LOG_MUL = "{arch}.rope.scaling.yarn_log_multiplier"
        SCALING_YARN_BETA_FAST = "{arch}.rope.scaling.yarn_beta_fast"
        SCALING_YARN_BETA_SLOW = "{arch}.rope.scaling.yarn_beta_slow"
        # multi-section rotary embeddings (qwen35moe: IMRoPE)
        DIMENSION_SECTIONS = "{arch}.rope.dimension_sections"

    class SSM:
        """State-space / linear-attention sizes (gguf-py ``Keys.SSM``; Gated DeltaNet in qwen3next, qwen35moe)."""

        CONV_KERNEL = "{arch}.ssm.conv_kernel"
        INNER_SIZE = "{arch}.ssm.inner_size"
        STATE_SIZE = "{arch}.ssm.state_size"
        TIME_STEP_RANK = "{arch}.ssm.time_step_rank"
        GROUP_COUNT = "{arch}.ssm.group_count"

    class HyperConnection:
        """Manifold-constrained hyper-connections (gguf-py ``Keys.HyperConnection``; deepseek4)."""

        COUNT = "{arch}.hyper_connection.count"
        SINKHORN_ITERATIONS = "{arch}.hyper_connection.sinkhorn_iterations"
        EPSILON = "{arch}.hyper_connection.epsilon"

    class Tokenizer:
        MODEL = "tokenizer.ggml.model"
        PRE = "tokenizer.ggml.pre"
        LIST = "tokenizer.ggml.tokens"
        TOKEN_TYPE = "tokenizer.ggml.token_type"
        SCORES = "tokenizer.ggml.scores"
        MERGES = "tokenizer.ggml.merges"
        BOS_ID = "tokenizer.ggml.bos_token_id"
        EOS_ID = "tokenizer.ggml.eos_token_id"
        UNK_ID = "tokenizer.ggml.unknown_token_id"
        PAD_ID = "tokenizer.ggml.padding_token_id"
        ADD_BOS = "tokenizer.ggml.add_bos_token"
        ADD_EOS = "tokenizer.ggml.add_eos_token"
        ADD_PREFIX = "tokenizer.ggml.add_space_prefix"
        CHAT_TEMPLATE = "tokenizer.chat_template"


ARCH_LLAMA = "llama"  # gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]


class TensorName:
    """GGUF tensor base names (``gguf.TENSOR_NAMES`` of the ``MODEL_TENSOR`` of the same name); append ``.weight``."""

    TOKEN_EMBD = "token_embd"
    OUTPUT_NORM = "output_norm"
    OUTPUT = "output"
    ROPE_FREQS = "rope_freqs"
    ATTN_NORM = "blk.{bid}.attn_norm"
    ATTN_Q = "blk.{bid}.attn_q"
    ATTN_K = "blk.{bid}.attn_k"
    ATTN_V = "blk.{bid}.attn_v"
    ATTN_OUT = "blk.{bid}.attn_output"
    ATTN_Q_NORM = "blk.{bid}.attn_q_norm"
    ATTN_K_NORM = "blk.{bid}.attn_k_norm"
    FFN_NORM = "blk.{bid}.ffn_norm"
    FFN_GATE = "blk.{bid}.ffn_gate"
    FFN_UP = "blk.{bid}.ffn_up"
    FFN_DOWN = "blk.{bid}.ffn_down"
    FFN_GATE_INP = "blk.{bid}.ffn_gate_inp"
    FFN_GATE_EXP = "blk.{bid}.ffn_gate_exps"
    FFN_UP_EXP = "blk.{bid}.ffn_up_exps"
    FFN_DOWN_EXP = "blk.{bid}.ffn_down_exps"
    FFN_GATE_INP_SHEXP = "blk.{bid}.ffn_gate_inp_shexp"
    FFN_GATE_SHEXP = "blk.{bid}.ffn_gate_shexp"
    FFN_UP_SHEXP = "blk.{bid}.ffn_up_shexp"
    FFN_DOWN_SHEXP = "blk.{bid}.ffn_down_shexp"
    # multi-head latent attention and selection bias (deepseek2)
    ATTN_Q_A = "blk.{bid}.attn_q_a"
    ATTN_Q_B = "blk.{bid}.attn_q_b"
    ATTN_Q_A_NORM = "blk.{bid}.attn_q_a_norm"
    ATTN_KV_A_MQA = "blk.{bid}.attn_kv_a_mqa"
    ATTN_KV_A_NORM = "blk.{bid}.attn_kv_a_norm"
    ATTN_K_B = "blk.{bid}.attn_k_b"
    ATTN_V_B = "blk.{bid}.attn_v_b"
    FFN_EXP_PROBS_B = "blk.{bid}.exp_probs_b"
    # hybrid Gated DeltaNet / gated attention blocks and multi-token prediction (qwen3next, qwen35moe)
    ATTN_POST_NORM = "blk.{bid}.post_attention_norm"
    ATTN_QKV = "blk.{bid}.attn_qkv"
    ATTN_GATE = "blk.{bid}.attn_gate"
    SSM_A = "blk.{bid}.ssm_a"  # written without a .weight suffix (llama.cpp's LLM_TENSOR_SSM_A_NOSCAN)
    SSM_CONV1D = "blk.{bid}.ssm_conv1d"
    SSM_DT = "blk.{bid}.ssm_dt"
    SSM_NORM = "blk.{bid}.ssm_norm"
    SSM_OUT = "blk.{bid}.ssm_out"
    SSM_BETA_ALPHA = "blk.{bid}.ssm_ba"
    SSM_BETA = "blk.{bid}.ssm_beta"
    SSM_ALPHA = "blk.{bid}.ssm_alpha"
    NEXTN_EH_PROJ = "blk.{bid}.nextn.eh_proj"
    NEXTN_ENORM = "blk.{bid}.nextn.enorm"
    NEXTN_HNORM = "blk.{bid}.nextn.hnorm"
    NEXTN_SHARED_HEAD_NORM = "blk.{bid}.nextn.shared_head_norm"
    NEXTN_EMBED_TOKENS = "blk.{bid}.nextn.embed_tokens"  # optional per-MTP-block embeddings (DeepSeek-style MTP layers)
    NEXTN_SHARED_HEAD_HEAD = "blk.{bid}.nextn.shared_head_head"  # optional per-MTP-block LM head
    ATTN_SINKS = "blk.{bid}.attn_sinks"  # one attention sink logit per head (gpt-oss)
    # DeepSeek Sparse Attention's lightning indexer (deepseek32, glm-dsa)
    INDEXER_K_NORM = "blk.{bid}.indexer.k_norm"
    INDEXER_PROJ = "blk.{bid}.indexer.proj"
    INDEXER_ATTN_K = "blk.{bid}.indexer.attn_k"
    INDEXER_ATTN_Q_B = "blk.{bid}.indexer.attn_q_b"
    # DeepSeek V4 (deepseek4): hyper-connections, shared-KV attention with a grouped output projection, KV compressors, hash routing
    HC_HEAD_FN = "output_hc_fn"
    HC_HEAD_BASE = "output_hc_base"
    HC_HEAD_SCALE = "output_hc_scale"
    HC_ATTN_FN = "blk.{bid}.hc_attn_fn"
    HC_ATTN_BASE = "blk.{bid}.hc_attn_base"
    HC_ATTN_SCALE = "blk.{bid}.hc_attn_scale"
    HC_FFN_FN = "blk.{bid}.hc_ffn_fn"
    HC_FFN_BASE = "blk.{bid}.hc_ffn_base"
    HC_FFN_SCALE = "blk.{bid}.hc_ffn_scale"
    ATTN_KV = "blk.{bid}.attn_kv"
    ATTN_KV_NORM = "blk.{bid}.attn_kv_a_norm"
    ATTN_OUT_A = "blk.{bid}.attn_output_a"
    ATTN_OUT_B = "blk.{bid}.attn_output_b"
    ATTN_COMPRESSOR_WKV = "blk.{bid}.attn_compressor_kv"
    ATTN_COMPRESSOR_WGATE = "blk.{bid}.attn_compressor_gate"
    ATTN_COMPRESSOR_APE = "blk.{bid}.attn_compressor_ape"
    ATTN_COMPRESSOR_NORM = "blk.{bid}.attn_compressor_norm"
    INDEXER_COMPRESSOR_WKV = "blk.{bid}.indexer_compressor_kv"
    INDEXER_COMPRESSOR_WGATE = "blk.{bid}.indexer_compressor_gate"
    INDEXER_COMPRESSOR_APE = "blk.{bid}.indexer_compressor_ape"
    INDEXER_COMPRESSOR_NORM = "blk.{bid}.indexer_compressor_norm"
    FFN_GATE_TID2EID = "blk.{bid}.ffn_gate_tid2eid"


_BLOCK = re.compile(r"blk\.(\d+)\.")


def block_of(name: str) -> int | None:
    """The block number of a GGUF tensor name (``blk.N.…``), or None for a tensor outside the blocks.

    The one parser of GGUF tensor names: plans, budgets, checks and importance matrices ask it.
    """
    m = _BLOCK.match(name)
    return int(m.group(1)) if m else None


def _rounded(n: float, min_digits: int = 2) -> str:
    if n > 1e12:
        scaled, suffix = n * 1e-12, "T"
    elif n > 1e9:
        scaled, suffix = n * 1e-9, "B"
    elif n > 1e6:
        scaled, suffix = n * 1e-6, "M"
    else:
        scaled, suffix = n * 1e-3, "K"
    decimals = max(min_digits - len(str(round(scaled)).lstrip("0")), 0)
    return f"{scaled:.{decimals}f}{suffix}"


def size_label(total_params: int, shared_params: int, expert_params: int, expert_count: int) -> str:
    """``general.size_label`` as llama.cpp's converter writes it: ``8x7.2B`` for a MoE, ``8.6M`` for a dense model."""
    if expert_count > 0:
        return f"{expert_count}x{_rounded(abs(shared_params) + abs(expert_params))}"
    return _rounded(abs(total_params))
