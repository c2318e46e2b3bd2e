"""``converters/ernie4_5_moe.py`` (GGUF arch ``ernie4_5-moe``): what cannot be said as parameters of the shared tests.

* Logits parity beyond ``test_logits_parity.py``'s cases: no leading dense block, YaRN, the config
  class's defaults (tied embeddings when config.json does not say).
* The selection bias matters: the file without ``exp_probs_b`` leaves the tolerance (llama.cpp's graph
  hard-codes softmax and renormalisation: the bias is the one routing input a converter can lose).
* The multi-token-prediction tensors ERNIE checkpoints carry are dropped; tensors in the wrong blocks
  are refused with one line.
* ``quantkit convert --type Q4_K_M``, ``quantkit run`` and ``quantkit eval kld`` (routing fidelity against transformers) on an ernie4_5-moe file.

Elsewhere: ``test_logits_parity.py`` (both expert layouts, dense blocks, shared expert or none),
``test_presets.py`` (``ernie4_5_moe-e8-L8-tied``), ``test_bad_inputs.py`` (config.json refusals).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import gguf
import numpy as np
import pytest

from conftest import assert_convert_refused, convert, hf_logits, llama_logits, random_model
from test_deepseek import _DROP, _edit_state, _metadata, _set_config
from test_dots1 import COMMON_KEYS, check_hostile_configs, st
from test_logits_parity import assert_close

MODEL_TYPE = "ernie4_5_moe"
IDS = [1] + np.random.default_rng(1).integers(3, 2999, size=150).tolist()


def test_interleave_key_is_gguf_pys():
    """The one key quantkit.format.gguf_spec does not restate: pinned to gguf-py."""
    from quantkit.converters.ernie4_5_moe import INTERLEAVE_MOE_LAYER_STEP

    assert INTERLEAVE_MOE_LAYER_STEP == gguf.Keys.LLM.INTERLEAVE_MOE_LAYER_STEP


def test_defaults_are_transformers_config_defaults():
    """The defaults assumed for keys config.json leaves out are those of transformers' config class."""
    from transformers import Ernie4_5_MoeConfig

    from quantkit.converters.ernie4_5_moe import FAMILY, HPARAM_DEFAULTS

    config = Ernie4_5_MoeConfig(num_hidden_layers=28)
    for key, value in FAMILY.defaults.items():
        want = -1 if key == "moe_layer_end_index" else getattr(config, key)  # __post_init__ resolves -1 to the last block
        assert want == value, key
    for key, value in HPARAM_DEFAULTS.items():
        assert (config.rope_parameters["rope_theta"] if key == "rope_theta" else getattr(config, key)) == value, key


#: each case exercises something an ernie4_5-moe file can get wrong (conftest's ARCH_DEFAULTS: 4 experts top-2 + 1 shared, block 0 dense)
CASES = {
    # every block a MoE block (moe_layer_start_index 0), YaRN, top-3 of 6
    "moe-from-0-yarn": dict(moe_layer_start_index=0, moe_num_experts=6, moe_k=3, max_position_embeddings=2048,
                            rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 500000.0}),
    # 3 shared experts, 3 blocks (1 dense), GQA 4:1
    "shexp3-L3": dict(moe_num_shared_experts=3, num_hidden_layers=3, num_key_value_heads=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    src = random_model(tmp_path / "hf", MODEL_TYPE, **CASES[case])
    out = convert(src, tmp_path / "m.gguf", "f32")
    assert_close(llama_logits(out, IDS), hf_logits(src, IDS))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The ARCH_DEFAULTS model (its [1, E] selection bias perturbed like every parameter) and transformers' logits."""
    src = random_model(tmp_path_factory.mktemp("ernie") / "hf", MODEL_TYPE)
    return src, hf_logits(src, IDS)


def test_keys_and_tensors(model, tmp_path):
    src, ref = model
    out = convert(src, tmp_path / "m.gguf", "f32")
    md = _metadata(out)
    assert md["general.architecture"] == "ernie4_5-moe"
    assert (md["ernie4_5-moe.leading_dense_block_count"], md["ernie4_5-moe.interleave_moe_layer_step"]) == (1, 1)
    assert (md["ernie4_5-moe.expert_feed_forward_length"], md["ernie4_5-moe.expert_shared_feed_forward_length"]) == (64, 64)
    assert md["ernie4_5-moe.feed_forward_length"] == 256
    t = {x.name: x for x in gguf.GGUFReader(out).tensors}
    assert list(t["blk.1.exp_probs_b.bias"].shape) == [4]  # [1, 4] in the checkpoint
    assert {"blk.0.ffn_gate.weight", "blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_shexp.weight", "output.weight"} <= set(t)
    assert "blk.0.ffn_gate_inp.weight" not in t and "blk.1.ffn_gate.weight" not in t
    assert_close(llama_logits(out, IDS), ref)


def test_without_bias_parity_breaks(model, tmp_path, monkeypatch):
    """The file without exp_probs_b (llama.cpp's loader takes it as optional) routes other tokens to other experts."""
    from quantkit import converters

    src, ref = model
    conv = converters.for_model_type(MODEL_TYPE)
    changed = dataclasses.replace(conv, rules=lambda names: [r for r in conv.rules(names) if "exp_probs_b" not in r.gguf],
                                  ignore=conv.ignore + (r"e_score_correction_bias$",), check=lambda h, t: None)
    monkeypatch.setitem(converters.CONVERTERS, MODEL_TYPE, changed)
    with pytest.raises(AssertionError):
        assert_close(llama_logits(convert(src, tmp_path / "m.gguf", "f32"), IDS), ref)


def test_class_defaults_tie_the_embeddings(tmp_path):
    """Without tie_word_embeddings in config.json, transformers ties them (the class default): so does the file (no output tensor)."""
    src = random_model(tmp_path / "hf", MODEL_TYPE, tie_word_embeddings=True)
    _set_config(src, tie_word_embeddings=_DROP)
    assert "tie_word_embeddings" not in json.loads((src / "config.json").read_text())
    out = convert(src, tmp_path / "m.gguf", "f32")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(out).tensors}
    assert_close(llama_logits(out, IDS), hf_logits(src, IDS))


def test_mtp_tensors_are_dropped(model, tmp_path):
    """ERNIE's multi-token-prediction tensors (transformers ignores them): the same file as without them."""
    src = tmp_path / "hf"
    shutil.copytree(model[0], src)
    a = convert(src, tmp_path / "a.gguf", "bf16")

    def add_mtp(state):
        for k in [k for k in state if k.startswith("model.layers.1.")]:
            state[k.replace("model.layers.1.", "model.mtp_block.0.")] = state[k].clone()
        for k in ("mtp_emb_norm.0.weight", "mtp_hidden_norm.0.weight"):
            state[f"model.{k}"] = state["model.norm.weight"].clone()
        state["model.mtp_linear_proj.0.weight"] = state["model.norm.weight"].new_ones((128, 256))

    _edit_state(src, add_mtp)
    b = convert(src, tmp_path / "b.gguf", "bf16")
    assert a.read_bytes() == b.read_bytes()


def _drop_bias(d):
    _edit_state(d, lambda s: s.pop("model.layers.1.mlp.moe_statics.e_score_correction_bias"))


#: what is done to a copy of the model -> needles of the one-line error (config.json-only refusals: test_bad_inputs.py)
REFUSED = {
    "bias missing": (_drop_bias, ["model.layers.1.mlp.moe_statics.e_score_correction_bias", "is missing"]),
    "dense block count too small": (lambda d: _set_config(d, moe_layer_start_index=0), ["model.layers.0.mlp.gate_proj.weight", "moe_layer_start_index = 0", "MoE block"]),
    "shared experts where config says none": (lambda d: _set_config(d, moe_num_shared_experts=0), ["mlp.shared_experts.", "config.json implies [128, 0]"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_one_line(model, tmp_path, case):
    change, needles = REFUSED[case]
    d = tmp_path / "model"
    shutil.copytree(model[0], d)
    change(d)
    assert_convert_refused(d, tmp_path, needles)


MOE_BLOCKS = 2  # in the CLI test's model


def test_convert_q4_k_m_and_run(tmp_path):
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    src = random_model(tmp_path / "hf", MODEL_TYPE, hidden_size=256, moe_intermediate_size=256, intermediate_size=256, num_hidden_layers=3)
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


#: a valid ERNIE-4.5 MoE config.json (the ARCH_DEFAULTS model's)
BASE = dict(vocab_size=3000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, moe_num_experts=4,
            moe_k=2, moe_intermediate_size=64, moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=1, moe_layer_interval=1,
            moe_norm_min=1e-12, use_bias=False, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})


@pytest.mark.skipif(st is None, reason="hypothesis is not installed")
def test_hostile_config_is_refused_with_a_checkpoint_error():
    check_hostile_configs(MODEL_TYPE, BASE, COMMON_KEYS)
