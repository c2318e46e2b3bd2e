"""``converters/minimax_m2.py`` (GGUF arch ``minimax-m2``): what cannot be said as parameters of the shared tests.

* Logits parity with a non-zero ``e_score_correction_bias`` (random init leaves the buffer at zero: it
  is set in the state dict before conversion), in MiniMax's per-expert layout and transformers 5's fused
  one, with partial and full rotary embeddings and YaRN.
* The routing keys matter: softmax instead of sigmoid leaves the tolerance, llama.cpp refuses the file
  without the bias tensor, and without ``expert_gating_func`` it aborts the whole process (run in a
  child process here).
* ``quantkit convert --type Q4_K_M``, ``quantkit run`` and ``quantkit eval kld`` (routing fidelity against transformers) on a minimax-m2 file.

Elsewhere: ``test_logits_parity.py`` (fused, GQA 4:1, tied), ``test_presets.py`` (``minimax_m2-e8-L8-gqa``),
``test_bad_inputs.py`` (config.json refusals).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import gguf
import numpy as np
import pytest

from conftest import assert_convert_refused, convert, hf_logits, llama_logits, random_model
from test_deepseek import _edit_state, _metadata, _set_score_bias
from test_dots1 import COMMON_KEYS, check_hostile_configs, llama_cpp_in_child, st
from test_logits_parity import assert_close

MODEL_TYPE = "minimax_m2"
SIGMOID, SOFTMAX = int(gguf.ExpertGatingFuncType.SIGMOID), int(gguf.ExpertGatingFuncType.SOFTMAX)
IDS = [1] + np.random.default_rng(1).integers(3, 2999, size=150).tolist()


def build(path, **overrides):
    """A random MiniMax-M2 model (conftest's ARCH_DEFAULTS: 4 experts top-2, head_dim 32 with 16 rotary) with a non-zero selection bias."""
    src = random_model(path, MODEL_TYPE, **overrides)
    _set_score_bias(src)
    return src


def test_defaults_are_transformers_config_defaults():
    """The defaults assumed for keys config.json leaves out are those of transformers' config class."""
    from transformers import MiniMaxM2Config

    from quantkit.converters.minimax_m2 import HPARAM_DEFAULTS

    config = MiniMaxM2Config()
    for key, value in HPARAM_DEFAULTS.items():
        assert (config.rope_parameters["rope_theta"] if key == "rope_theta" else getattr(config, key)) == value, key


#: each case exercises something a minimax-m2 file can get wrong
CASES = {
    # MiniMax's own layout (block_sparse_moe.experts.N.w1/w3/w2, block_sparse_moe.e_score_correction_bias), half of each head rotary
    "bias-per-expert-partial": dict(),
    # transformers 5's fused experts (the bias under mlp.), every dimension rotary, top-3 of 6
    "bias-fused-full-rotary": dict(fused=True, rotary_dim=32, num_local_experts=6, num_experts_per_tok=3),
    # YaRN on half of each head (partial_rotary_factor in rope_parameters)
    "bias-yarn-partial": dict(max_position_embeddings=2048, rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                                                                             "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    src = build(tmp_path / "hf", **CASES[case])
    out = convert(src, tmp_path / "m.gguf", "f32")
    assert_close(llama_logits(out, IDS), hf_logits(src, IDS))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The per-expert model with its bias, and transformers' logits."""
    src = build(tmp_path_factory.mktemp("minimax") / "hf")
    return src, hf_logits(src, IDS)


def test_keys_and_tensors(model, tmp_path):
    src, ref = model
    out = convert(src, tmp_path / "m.gguf", "f32")
    md = _metadata(out)
    assert md["general.architecture"] == "minimax-m2"
    assert md["minimax-m2.expert_gating_func"] == SIGMOID
    assert md["minimax-m2.rope.dimension_count"] == 16 and md["minimax-m2.attention.key_length"] == 32
    assert md["minimax-m2.feed_forward_length"] == md["minimax-m2.expert_feed_forward_length"] == 256
    t = {x.name: x for x in gguf.GGUFReader(out).tensors}
    assert list(t["blk.1.attn_q_norm.weight"].shape) == [4 * 32] and list(t["blk.1.attn_k_norm.weight"].shape) == [2 * 32]
    assert list(t["blk.1.exp_probs_b.bias"].shape) == [4]
    assert_close(llama_logits(out, IDS), ref)


def _mutated(conv, fn=None, drop_bias=False):
    if drop_bias:
        return dataclasses.replace(conv, rules=lambda names: [r for r in conv.rules(names) if "exp_probs_b" not in r.gguf],
                                   ignore=conv.ignore + (r"e_score_correction_bias$",))
    return dataclasses.replace(conv, metadata=lambda h: fn(conv.metadata(h)))


def test_softmax_routing_leaves_the_tolerance(model, tmp_path, monkeypatch):
    from quantkit import converters
    from quantkit.format.gguf_write import MetaValue

    src, ref = model
    conv = converters.for_model_type(MODEL_TYPE)
    key = "minimax-m2.expert_gating_func"
    monkeypatch.setitem(converters.CONVERTERS, MODEL_TYPE, _mutated(conv, lambda md: {**md, key: MetaValue(SOFTMAX, md[key].vtype)}))
    with pytest.raises(AssertionError):
        assert_close(llama_logits(convert(src, tmp_path / "m.gguf", "f32"), IDS), ref)


def test_without_bias_llama_cpp_refuses_the_file(model, tmp_path, monkeypatch):
    from quantkit import converters

    src, _ = model
    conv = converters.for_model_type(MODEL_TYPE)
    monkeypatch.setitem(converters.CONVERTERS, MODEL_TYPE, _mutated(conv, drop_bias=True))
    out = convert(src, tmp_path / "m.gguf", "f32")
    with pytest.raises(ValueError, match="Failed to load model"):  # blk.N.exp_probs_b.bias is a required tensor of its loader
        llama_logits(out, IDS)


def test_without_gating_func_llama_cpp_aborts(model, tmp_path, monkeypatch):
    """The trap: without expert_gating_func (llama.cpp's converter writes it only from config.json's scoring_func, which
    transformers' MiniMaxM2Config does not keep) llama.cpp kills the process at its first graph; with the key it runs."""
    from quantkit import converters

    src, _ = model
    ok = llama_cpp_in_child(convert(src, tmp_path / "ok.gguf", "f32"))
    assert ok.returncode == 0 and "ran" in ok.stdout, ok.stderr[-2000:]
    conv = converters.for_model_type(MODEL_TYPE)
    monkeypatch.setitem(converters.CONVERTERS, MODEL_TYPE, _mutated(conv, lambda md: {k: v for k, v in md.items() if k != "minimax-m2.expert_gating_func"}))
    bad = llama_cpp_in_child(convert(src, tmp_path / "bad.gguf", "f32"))
    assert bad.returncode != 0 and "ran" not in bad.stdout
    assert "fatal error" in bad.stderr, bad.stderr[-2000:]


def test_bias_missing_is_refused(model, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(model[0], d)
    _edit_state(d, lambda s: s.pop("model.layers.1.block_sparse_moe.e_score_correction_bias"))
    assert_convert_refused(d, tmp_path, ["model.layers.1.block_sparse_moe.e_score_correction_bias", "is missing"])


MOE_BLOCKS = 2  # in the CLI test's model


def test_convert_q4_k_m_and_run(tmp_path):
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    src = build(tmp_path / "hf", hidden_size=256, intermediate_size=256, head_dim=64, rotary_dim=32)
    r = CliRunner().invoke(app, ["convert", str(src), "-o", str(tmp_path / "q4.gguf"), "--type", "Q4_K_M"])
    assert r.exit_code == 0, r.output
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type) for t in gguf.GGUFReader(tmp_path / "q4.gguf").tensors}
    assert types["blk.1.ffn_gate_exps.weight"] == gguf.GGMLQuantizationType.Q4_K
    assert types["blk.1.exp_probs_b.bias"] == types["blk.1.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32
    r = CliRunner().invoke(app, ["run", str(tmp_path / "q4.gguf"), "-p", "hi", "-n", "5", "--temperature", "0", "--ignore-eos", "--json"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout[r.stdout.index("{"):])
    assert (j["completion_tokens"], j["finish_reason"]) == (5, "length")
    # KLD and routing fidelity against transformers: one routing layer per MoE block
    r = CliRunner().invoke(app, ["eval", "kld", str(src), str(tmp_path / "q4.gguf"), "--corpus", "heldout", "--ctx", "128", "--chunks", "4",
                                 "--threads", "2", "--cache-dir", str(tmp_path / "cache"), "--json", "-", "--no-progress"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout[r.stdout.index("{"):])
    assert 0 <= rep["kld_mean"] < 0.05, rep["kld_mean"]
    assert rep["routing"]["k"] == 2 and len(rep["routing"]["layers"]) == MOE_BLOCKS
    assert rep["routing"]["topk_jaccard"] > 0.8


#: a valid MiniMax-M2 config.json (the ARCH_DEFAULTS model's)
BASE = dict(vocab_size=3000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
            num_experts_per_tok=2, head_dim=32, rotary_dim=16, scoring_func="sigmoid", use_routing_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "partial_rotary_factor": 0.5})


@pytest.mark.skipif(st is None, reason="hypothesis is not installed")
def test_hostile_config_is_refused_with_a_checkpoint_error():
    check_hostile_configs(MODEL_TYPE, BASE, COMMON_KEYS + ("partial_rotary_factor",))
