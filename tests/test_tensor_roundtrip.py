"""Every GGUF tensor equals its source after dequantisation.

Exact for f32 and bf16 (bf16 -> f32 widening is exact, bf16 is passed
through), within Q8_0's rounding bound for q8_0; routers and norms are F32 and
bit-identical to the source in every output type.  Dequantisation uses the
``gguf`` package's Python reference, not our code.
"""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest
from safetensors import safe_open

from conftest import FIXTURE, read_config

Q = gguf.GGMLQuantizationType


def source_tensors() -> dict[str, np.ndarray]:
    """Fixture tensors as float32, mapped to GGUF names (experts stacked, q/k permuted)."""
    cfg = read_config(FIXTURE)
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    with safe_open(str(FIXTURE / "model.safetensors"), "pt") as f:
        for k in f.keys():
            a = f.get_tensor(k).float().numpy()
            if k == "model.embed_tokens.weight":
                out["token_embd.weight"] = a
            elif k == "lm_head.weight":
                out["output.weight"] = a
            elif k == "model.norm.weight":
                out["output_norm.weight"] = a
            elif m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", k):
                b, rest = m.groups()
                if e := re.fullmatch(r"block_sparse_moe\.experts\.(\d+)\.(w[123])", rest):
                    name = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}[e.group(2)]
                    experts.setdefault(f"blk.{b}.{name}.weight", {})[int(e.group(1))] = a
                    continue
                name = {
                    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "block_sparse_moe.gate": "ffn_gate_inp",
                }[rest]
                if name in ("attn_q", "attn_k"):
                    heads = nh if name == "attn_q" else nkv
                    # llama.cpp's rotary layout: within each head, rows (i, i + d/2) become (2i, 2i + 1)
                    d = a.shape[0] // heads
                    order = np.concatenate([h * d + np.stack([np.arange(d // 2), np.arange(d // 2) + d // 2], 1).ravel() for h in range(heads)])
                    a = a[order]
                out[f"blk.{b}.{name}.weight"] = a
    for name, per in experts.items():
        out[name] = np.stack([per[i] for i in range(len(per))])
    return out


@pytest.fixture(scope="module")
def src():
    return source_tensors()


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("outtype", ["f32", "bf16", "f16", "q8_0"])
def test_every_tensor_matches_source(fixture_gguf, src, outtype):
    tensors = _tensors(fixture_gguf(outtype))
    assert tensors.keys() == src.keys()
    for name, t in tensors.items():
        ref = src[name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape)
        if "norm" in name or "ffn_gate_inp" in name:
            assert t.tensor_type == Q.F32, f"{name} must stay F32, is {t.tensor_type.name}"
            assert np.array_equal(got, ref), name
        elif outtype in ("f32", "bf16"):
            assert t.tensor_type == {"f32": Q.F32, "bf16": Q.BF16}[outtype]
            assert np.array_equal(got, ref), name
        elif outtype == "f16":
            assert t.tensor_type == Q.F16
            assert np.array_equal(got, ref.astype(np.float16).astype(np.float32)), name
        else:
            assert t.tensor_type == Q.Q8_0
            blocks = ref.reshape(-1, 32)
            d = np.abs(blocks).max(1, keepdims=True) / 127
            err = np.abs(got.reshape(-1, 32) - blocks)
            # |x - q*fp16(d)| <= d/2 (rounding q) + 127 * |d - fp16(d)| (scale stored as fp16)
            assert (err <= (0.5 + 127 / 2048) * d * (1 + 1e-6) + 1e-9).all(), f"{name}: Q8_0 error {float((err / np.maximum(d, 1e-12)).max()):.3f} x scale"


def test_bf16_file_is_byte_identical_to_source(fixture_gguf):
    """bf16 -> bf16 is a pure pass-through: no rounding anywhere."""
    from quantkit.hf.checkpoint import open_checkpoint

    tensors = _tensors(fixture_gguf("bf16"))
    with open_checkpoint(FIXTURE) as ck:
        emb = ck.tensors["model.embed_tokens.weight"].array()
        assert np.array_equal(tensors["token_embd.weight"].data.view(np.uint16).reshape(emb.shape), emb)
        w2 = ck.tensors["model.layers.3.block_sparse_moe.experts.5.w2.weight"].array()
        assert np.array_equal(tensors["blk.3.ffn_down_exps.weight"].data.view(np.uint16)[5], w2)


def test_metadata_is_complete(fixture_gguf):
    r = gguf.GGUFReader(fixture_gguf("q8_0"))
    f = r.fields
    val = lambda k: f[k].contents()  # noqa: E731
    cfg = read_config(FIXTURE)
    assert val("general.architecture") == "llama"
    assert val("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert val("general.quantization_version") == gguf.GGML_QUANT_VERSION
    assert val("general.quantized_by").startswith("quantkit")
    assert val("general.size_label").startswith("8x")
    assert val("llama.expert_count") == 8 and val("llama.expert_used_count") == 2
    assert val("llama.block_count") == cfg["num_hidden_layers"]
    assert val("llama.context_length") == cfg["max_position_embeddings"]
    assert val("llama.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert val("llama.rope.freq_base") == pytest.approx(10000.0)
    assert val("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg["rms_norm_eps"])
    assert val("tokenizer.ggml.model") == "llama"
    assert len(val("tokenizer.ggml.tokens")) == cfg["vocab_size"]
    types = val("tokenizer.ggml.token_type")
    assert types.count(gguf.TokenType.BYTE) == 256 and types[0] == gguf.TokenType.UNKNOWN
    assert val("tokenizer.ggml.bos_token_id") == 1 and val("tokenizer.ggml.eos_token_id") == 2
    assert val("tokenizer.ggml.add_bos_token") is True and val("tokenizer.ggml.add_eos_token") is False
    assert "[INST]" in val("tokenizer.chat_template")
