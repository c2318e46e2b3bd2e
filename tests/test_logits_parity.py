"""The F32 GGUF run by llama.cpp gives transformers' float32 logits.

A wrong q/k permutation, a swapped gate/up, a mis-stacked expert, a wrong
norm epsilon or rope base all break this: it is the converter's main proof.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FIXTURE, convert, hf_logits, llama_logits, random_model, sp_ids

PROMPTS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "KING. Now, good my lord, what say you to this?\n\n  HAMLET. My lord, 1234 ducats!",
    "   Enter three Witches.\nFIRST WITCH. When shall we three meet again",
]


def assert_close(got: np.ndarray, ref: np.ndarray, rel: float = 5e-4) -> None:
    scale = float(np.abs(ref).max())
    err = float(np.abs(got - ref).max())
    assert err <= rel * max(1.0, scale), f"max |llama.cpp - transformers| = {err:.3g} at logit scale {scale:.3g}"
    same = (got.argmax(-1) == ref.argmax(-1)).mean()
    assert same == 1.0, f"argmax differs at {(1 - same) * 100:.1f}% of positions"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_fixture_f32_matches_transformers(fixture_gguf, prompt):
    ids = sp_ids(FIXTURE, prompt)
    assert_close(llama_logits(fixture_gguf("f32"), ids), hf_logits(FIXTURE, ids))


# Each case changes something a converter can get wrong.
RANDOM_CASES = {
    # GQA 4:1, odd vocabulary (tokenizer padded), sharded checkpoint
    "mixtral-gqa4-oddvocab-sharded": dict(model_type="mixtral", num_key_value_heads=1, vocab_size=3001, max_shard_size="400KB"),
    # top-1 routing over 3 experts, no GQA, head_dim != hidden/heads
    "mixtral-top1-mha-headdim": dict(model_type="mixtral", num_local_experts=3, num_experts_per_tok=1, num_key_value_heads=4, head_dim=48),
    # dense Mistral, tied embeddings, sliding window, 3 heads
    "mistral-tied-window": dict(model_type="mistral", hidden_size=96, num_attention_heads=3, num_key_value_heads=1, vocab_size=3007, tie_word_embeddings=True, sliding_window=4096),
    # dense Llama with linear rope scaling and a large rope base, f32 checkpoint
    "llama-linear-rope-f32": dict(model_type="llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}, dtype="float32"),
    # Llama 3 style rope (generated rope_freqs tensor)
    "llama-llama3-rope": dict(model_type="llama", max_position_embeddings=2048, rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}),
    # Qwen3 MoE: q/k norms, NeoX rope (no permutation), head_dim != hidden/heads, experts of their own width, per-expert keys
    "qwen3moe-qknorm-headdim": dict(model_type="qwen3_moe", head_dim=48),
    # Qwen3 MoE in transformers 5's fused layout (gate_up_proj halves), GQA 4:1, top-3 of 6, sharded, rope base 1e6
    "qwen3moe-fused-gqa-sharded": dict(model_type="qwen3_moe", fused=True, num_key_value_heads=1, num_experts=6, num_experts_per_tok=3,
                                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, max_shard_size="400KB"),
    # OLMoE: q/k norms over the whole projection, NeoX rope (no permutation), unnormalised top-k weights, per-expert keys, yarn rope
    "olmoe-qknorm-yarn": dict(model_type="olmoe", max_position_embeddings=2048,
                              rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 10000.0}),
    # OLMoE in transformers 5's fused layout, tied embeddings (the graph needs output: a copy), top-3 of 6, sharded
    "olmoe-fused-tied-sharded": dict(model_type="olmoe", fused=True, tie_word_embeddings=True, num_experts=6, num_experts_per_tok=3, max_shard_size="400KB"),
    # Qwen1.5/2 MoE: q/k/v biases, NeoX rope, unnormalised top-k weights, a sigmoid-gated shared expert, GQA 2:1, per-expert keys, rope base 1e6
    "qwen2moe-qkvbias-shexp-gqa": dict(model_type="qwen2_moe", rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # Qwen2 MoE in transformers 5's fused layout, GQA 4:1, top-3 of 6, shared expert wider than the model, tied (output: a copy), sharded
    "qwen2moe-fused-gqa4-tied-sharded": dict(model_type="qwen2_moe", fused=True, num_key_value_heads=1, num_experts=6, num_experts_per_tok=3,
                                             shared_expert_intermediate_size=192, tie_word_embeddings=True, max_shard_size="400KB"),
    # Granite MoE: the four multipliers (attention scale replaces 1/sqrt(head_dim)), fused input_linear [E, 2F, H] halves in IBM's layout,
    # llama rope (q/k rows and biases permuted), q/k/v/o biases, head_dim != hidden/heads
    "granitemoe-multipliers-bias-headdim": dict(model_type="granitemoe", attention_bias=True, head_dim=48),
    # Granite MoE shared in transformers 5's layout (experts.gate_up_proj), the shared MLP's fused [2S, H] halves, GQA 4:1, top-3 of 6, tied, sharded
    "granitemoeshared-fused-gqa4-tied-sharded": dict(model_type="granitemoeshared", fused=True, num_key_value_heads=1, num_local_experts=6, num_experts_per_tok=3,
                                                     tie_word_embeddings=True, max_shard_size="400KB"),
    # DeepSeek V3 (deepseek2): MLA with low-rank queries (kv_b_proj split into attn_k_b / attn_v_b), a leading dense block, a shared expert,
    # sigmoid routing (no scoring_func in config.json), renormalised top-2 times 2.5, 2 groups both kept, sharded (more cases in test_deepseek.py)
    "deepseek_v3-mla-dense1-sharded": dict(model_type="deepseek_v3", n_group=2, topk_group=2, max_shard_size="400KB"),
    # DeepSeek V2-Lite's shape: q_proj, softmax top-2 not renormalised times 1.5, transformers 5's fused experts, 2 shared experts
    "deepseek_v2-lite-fused": dict(model_type="deepseek_v2", fused=True, q_lora_rank=None, n_shared_experts=2),
    # Qwen3-Next (qwen3next): a Gated DeltaNet block (in_proj_qkvz de-interleaved per key head, 2 key heads for 4 value heads, -exp(A_log),
    # conv1d as a matrix) then a gated-attention block (q_proj = query + gate per head), norms w + 1, sigmoid-gated shared expert,
    # per-expert keys, GQA 2:1, a quarter of each head rotary (more cases, MTP blocks, in test_qwen3_next.py)
    "qwen3next-hybrid-perexpert": dict(model_type="qwen3_next"),
    # Qwen3-Next with yarn on half of each head's dimensions
    "qwen3next-yarn-half-rotary": dict(model_type="qwen3_next", max_position_embeddings=2048,
                                       rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 10000.0,
                                                        "partial_rotary_factor": 0.5}),
    # Qwen3.5 MoE (qwen35moe, a text-only save): value heads reordered grouped -> tiled everywhere, IMRoPE sections, transformers 5's fused
    # experts, GQA 4:1, top-3 of 6, sharded
    "qwen35moe-fused-gqa4-sharded": dict(model_type="qwen3_5_moe_text", fused=True, num_key_value_heads=1, num_experts=6, num_experts_per_tok=3, max_shard_size="400KB",
                                         rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "mrope_section": [11, 11, 10], "mrope_interleaved": True,
                                                          "partial_rotary_factor": 0.25}),
    # dots.llm1 (dots1) in transformers 5's fused layout: per-head q/k norms, NeoX rope, sigmoid routing within the best 2 of 4 groups of 2,
    # top-3 renormalised times 2.5, a leading dense block, a shared expert, head_dim != hidden/heads, tied (output: a copy), sharded
    # (a non-zero selection bias, mutations of the routing keys: test_dots1.py)
    "dots1-fused-groups-headdim-tied-sharded": dict(model_type="dots1", fused=True, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
                                                    head_dim=48, tie_word_embeddings=True, max_shard_size="400KB"),
    # MiniMax-M2 (minimax-m2) in transformers 5's fused layout: q/k norms over the whole projections, NeoX rope on half of each head,
    # sigmoid top-3 of 6 renormalised, GQA 4:1, tied (output: a copy), sharded (a non-zero selection bias: test_minimax_m2.py)
    "minimax_m2-fused-partial-rope-gqa4-tied-sharded": dict(model_type="minimax_m2", fused=True, num_key_value_heads=1, num_local_experts=6,
                                                            num_experts_per_tok=3, tie_word_embeddings=True, max_shard_size="400KB"),
    # GLM-4.5 (glm4moe) in transformers 5's fused layout: half of each head rotary (NeoX), q/k norms, q/k/v biases, a leading dense block,
    # a shared expert, sigmoid top-2 renormalised times 2.5, GQA 4:1, sharded (a non-zero selection bias, groups, nextn blocks: test_glm4_moe.py)
    "glm4moe-fused-partial-rope-qkvbias-gqa4-sharded": dict(model_type="glm4_moe", fused=True, num_key_value_heads=1, max_shard_size="400KB"),
    # GLM-4.7-Flash (glm4_moe_lite -> deepseek2): MLA, the dense block mlp_layer_types gives, sigmoid routing (no scoring_func), sharded
    "glm4_moe_lite-mla-dense1-sharded": dict(model_type="glm4_moe_lite", max_shard_size="400KB"),
    # ERNIE-4.5 MoE (ernie4_5-moe): interleaved-pair rope (rows as they are), softmax top-2 selected by score + its [1, E] bias (a parameter
    # random_model perturbs), renormalised, a leading dense block, a shared expert, GQA 2:1, per-expert keys
    "ernie4_5_moe-dense1-shexp-gqa": dict(model_type="ernie4_5_moe"),
    # ERNIE-4.5 MoE in transformers 5's fused layout (bias under mlp.gate.moe_statics), two leading dense blocks of 3, no shared expert,
    # head_dim != hidden/heads, GQA 4:1, tied (no output: the graph reads token_embd)
    "ernie4_5_moe-fused-dense2-noshexp-tied": dict(model_type="ernie4_5_moe", fused=True, num_hidden_layers=3, moe_layer_start_index=2, moe_num_shared_experts=0,
                                                   head_dim=48, num_key_value_heads=1, tie_word_embeddings=True),
}


@pytest.mark.parametrize("case", list(RANDOM_CASES))
def test_random_models_match_transformers(tmp_path, case):
    spec = dict(RANDOM_CASES[case])
    src = random_model(tmp_path / "hf", spec.pop("model_type"), **spec)
    out = convert(src, tmp_path / "m.gguf", "f32")
    rng = np.random.default_rng(1)
    ids = [1] + rng.integers(3, 2999, size=150).tolist()
    assert_close(llama_logits(out, ids), hf_logits(src, ids))


def test_fused_expert_layout_gives_identical_file(tmp_path):
    """transformers 5's in-memory fused layout (gate_up_proj) converts to the same tensors as per-expert keys."""
    import gguf
    import torch
    from safetensors.torch import save_file
    from transformers import MixtralForCausalLM

    src = random_model(tmp_path / "hf", "mixtral")
    fused = tmp_path / "fused"
    fused.mkdir()
    model = MixtralForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(fused / "model.safetensors"))
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            (fused / f.name).write_bytes(f.read_bytes())
    a = gguf.GGUFReader(convert(src, tmp_path / "a.gguf", "bf16"))
    b = gguf.GGUFReader(convert(fused, tmp_path / "b.gguf", "bf16"))
    ta = {t.name: t for t in a.tensors}
    tb = {t.name: t for t in b.tensors}
    assert ta.keys() == tb.keys()
    for name in ta:
        assert np.array_equal(ta[name].data, tb[name].data), name
