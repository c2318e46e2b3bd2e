"""``converters/qwen2_moe.py``: what it refuses, and the precision of what it adds.

Logits parity is in ``test_logits_parity.py`` (``qwen2moe-*``), type plans against
``llama_model_quantize`` in ``test_presets.py`` (``qwen2moe-e8-L8-shexp``).  Here:
every configuration llama.cpp's qwen2moe graph would compute differently from
transformers is refused with one line naming the key (exit 1, no file); the
shared-expert gate and the q/k/v biases stay F32 whatever the type; the names this
module restates equal gguf-py's.
"""

from __future__ import annotations

import json
import shutil

import gguf
import pytest

from conftest import assert_convert_refused, random_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("qwen2moe") / "hf", "qwen2_moe")


@pytest.fixture
def model(good, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(good, dst)
    return dst


def _set_config(d, **kv):
    p = d / "config.json"
    cfg = json.loads(p.read_text())
    cfg.update(kv)
    p.write_text(json.dumps(cfg))


def _drop_tensors(d, suffix):
    from safetensors.torch import load_file, save_file

    p = d / "model.safetensors"
    state = {k: v for k, v in load_file(str(p)).items() if not k.endswith(suffix)}
    save_file(state, str(p), metadata={"format": "pt"})


# Each case: what transformers would compute that llama.cpp's qwen2moe graph does not (or cannot load).
REFUSED = {
    # llama.cpp's qwen2moe graph never renormalises the top-k weights (norm_w = false, no key turns it on)
    "norm_topk_prob true": (lambda d: _set_config(d, norm_topk_prob=True), ["norm_topk_prob = True", "never"]),
    # dense blocks: the graph has experts in every block
    "mlp_only_layers": (lambda d: _set_config(d, mlp_only_layers=[1]), ["mlp_only_layers", "blocks [1] would be dense"]),
    "decoder_sparse_step 2": (lambda d: _set_config(d, decoder_sparse_step=2), ["decoder_sparse_step", "blocks [0] would be dense"]),
    # sliding-window attention: the graph attends to the whole context
    "sliding layers": (lambda d: _set_config(d, use_sliding_window=True, sliding_window=64, layer_types=["sliding_attention", "full_attention"]),
                       ["use_sliding_window", "blocks [0]", "sliding window"]),
    "use_sliding_window without layer_types": (lambda d: _set_config(d, use_sliding_window=True, sliding_window=64, layer_types=None, max_window_layers=28),
                                               ["use_sliding_window", "sliding window"]),
    # attn_q / attn_output are hidden_size wide in the graph
    "head_dim not hidden/heads": (lambda d: _set_config(d, head_dim=48), ["head_dim = 48", "hidden_size = 128"]),
    "hidden_act gelu": (lambda d: _set_config(d, hidden_act="gelu"), ["hidden_act = 'gelu'", "SiLU"]),
    "qkv_bias false with biases": (lambda d: _set_config(d, qkv_bias=False), ["qkv_bias = False", "has q/k/v_proj biases"]),
    "biases missing": (lambda d: _drop_tensors(d, "_proj.bias"), ["qkv_bias = True", "has no q/k/v_proj biases"]),
    "one bias missing": (lambda d: _drop_tensors(d, "layers.1.self_attn.v_proj.bias"), ["layers.1.self_attn.v_proj.bias", "missing"]),
    "shared expert gate missing": (lambda d: _drop_tensors(d, "layers.0.mlp.shared_expert_gate.weight"), ["shared_expert_gate", "missing"]),
    "shared expert width wrong": (lambda d: _set_config(d, shared_expert_intermediate_size=128), ["shared_expert.", "config.json implies"]),
    "lm_head missing, not tied": (lambda d: _drop_tensors(d, "lm_head.weight"), ["lm_head.weight", "tie_word_embeddings"]),
    "llama3 rope": (lambda d: _set_config(d, rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                               "original_max_position_embeddings": 64, "rope_theta": 10000.0}), ["llama3", "qwen2_moe"]),
    "num_experts_per_tok above num_experts": (lambda d: _set_config(d, num_experts_per_tok=5), ["num_experts_per_tok = 5", "num_experts = 4"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_one_line(model, tmp_path, case):
    breaker, needles = REFUSED[case]
    breaker(model)
    assert_convert_refused(model, tmp_path, needles)


def test_shared_expert_gate_and_biases_stay_f32(good):
    """ffn_gate_inp_shexp (one row) and attn_{q,k,v}.bias are F32 under --type f16 / q8_0 and any preset, as llama.cpp keeps them."""
    from quantkit.pipeline.convert import prepare

    for outtype in ("f16", "q8_0", "Q4_K_M", "Q2_K"):
        ckpt, prep = prepare(good, outtype)
        ckpt.close()
        types = {t.name: t.qtype for t in prep.plan.tensors}
        kept = [n for n in types if "ffn_gate_inp" in n or n.endswith(".bias")]
        assert len(kept) == 2 * 5, kept  # per block: router, shared-expert gate, three biases
        assert all(types[n] == gguf.GGMLQuantizationType.F32 for n in kept), {n: types[n].name for n in kept}
        assert types["blk.0.ffn_gate_shexp.weight"] != gguf.GGMLQuantizationType.F32

