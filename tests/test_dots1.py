"""``converters/dots1.py`` (GGUF arch ``dots1``): what cannot be said as parameters of the shared tests.

* Logits parity with a non-zero ``e_score_correction_bias`` (random init leaves the buffer at zero: it
  is set in the state dict before conversion), in both expert layouts, with group-limited routing,
  ``norm_topk_prob`` on and off, ``routed_scaling_factor`` != 1, leading dense blocks, shared experts.
* Every routing key matters: the file with one key dropped or changed leaves the tolerance, and
  without ``expert_gating_func`` llama.cpp aborts the whole process (run in a child process here).
* Checkpoints whose tensors disagree with config.json are refused with one line.
* ``quantkit convert --type Q4_K_M``, ``quantkit run`` and ``quantkit eval kld`` (routing fidelity against transformers) on a dots1 file.

Elsewhere: ``test_logits_parity.py`` (fused, groups, tied), ``test_presets.py`` (``dots1-e8-L8-dense1``),
``test_bad_inputs.py`` (config.json refusals).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest

from conftest import ROOT, assert_convert_refused, convert, hf_logits, llama_logits, random_model
from test_deepseek import _edit_state, _metadata, _set_config, _set_score_bias
from test_logits_parity import assert_close

MODEL_TYPE = "dots1"
SIGMOID, SOFTMAX = int(gguf.ExpertGatingFuncType.SIGMOID), int(gguf.ExpertGatingFuncType.SOFTMAX)
IDS = [1] + np.random.default_rng(1).integers(3, 2999, size=150).tolist()


def build(path, **overrides):
    """A random dots1 model (conftest's ARCH_DEFAULTS: a dense block, 4 experts top-2 + 1 shared, renormalised, times 2.5)
    with a non-zero selection bias."""
    src = random_model(path, MODEL_TYPE, **overrides)
    _set_score_bias(src)
    return src


def test_defaults_are_transformers_config_defaults():
    """The defaults assumed for keys config.json leaves out are those of transformers' config class."""
    from transformers import Dots1Config

    from quantkit.converters.dots1 import FAMILY, HPARAM_DEFAULTS

    config = Dots1Config()
    for key, value in {**FAMILY.defaults, **HPARAM_DEFAULTS}.items():
        assert getattr(config, key) == value, key


#: each case exercises something a dots1 file can get wrong
CASES = {
    # per-expert keys, the selection bias, a leading dense block, renormalised top-2 times 2.5
    "bias-dense1": dict(),
    # transformers 5's fused experts, the best 2 of 4 groups, top-3 not renormalised times 0.7, 2 shared experts, no dense block
    "bias-fused-groups-nonorm": dict(fused=True, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, norm_topk_prob=False,
                                     routed_scaling_factor=0.7, n_shared_experts=2, first_k_dense_replace=0),
    # YaRN, 3 blocks (2 dense), tied embeddings
    "bias-yarn-dense2-tied": dict(num_hidden_layers=3, first_k_dense_replace=2, tie_word_embeddings=True, max_position_embeddings=2048,
                                  rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 10000.0}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    src = build(tmp_path / "hf", **CASES[case])
    out = convert(src, tmp_path / "m.gguf", "f32")
    assert_close(llama_logits(out, IDS), hf_logits(src, IDS))


# --------------------------------------------------------------------------- routing keys


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """A model whose every routing key matters: bias, 4 groups of 2 with 2 kept, renormalised top-3 times 2.5; transformers' logits."""
    src = build(tmp_path_factory.mktemp("dots1-grouped") / "hf", n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    return src, hf_logits(src, IDS)


def test_routing_keys_are_written_from_what_transformers_computes(grouped, tmp_path):
    """Dots1Config has no scoring_func: the file still says sigmoid, and every other routing key."""
    src, ref = grouped
    assert "scoring_func" not in json.loads((src / "config.json").read_text())
    out = convert(src, tmp_path / "m.gguf", "f32")
    md = _metadata(out)
    assert md["dots1.expert_gating_func"] == SIGMOID
    assert md["dots1.expert_weights_norm"] is True
    assert md["dots1.expert_weights_scale"] == pytest.approx(2.5)
    assert (md["dots1.expert_group_count"], md["dots1.expert_group_used_count"]) == (4, 2)
    assert (md["dots1.leading_dense_block_count"], md["dots1.expert_shared_count"], md["dots1.expert_feed_forward_length"]) == (1, 1, 64)
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert {"blk.1.exp_probs_b.bias", "blk.1.ffn_gate_shexp.weight", "blk.0.ffn_gate.weight"} <= names
    assert "blk.0.exp_probs_b.bias" not in names and "blk.0.ffn_gate_inp.weight" not in names
    assert_close(llama_logits(out, IDS), ref)


def _drop_key(*keys):
    return lambda md: {k: v for k, v in md.items() if k not in {f"dots1.{key}" for key in keys}}


def _set_key(key, value):
    from quantkit.format.gguf_write import MetaValue

    return lambda md: {**md, f"dots1.{key}": MetaValue(value, md[f"dots1.{key}"].vtype)}


def _mutated(conv, fn):
    if fn is not None:
        return dataclasses.replace(conv, metadata=lambda h: fn(conv.metadata(h)))
    # the file without the selection bias (what a converter that forgets it writes; llama.cpp's loader takes it as optional)
    return dataclasses.replace(conv, rules=lambda names: [r for r in conv.rules(names) if "exp_probs_b" not in r.gguf],
                               ignore=conv.ignore + (r"e_score_correction_bias$",), check=lambda h, t: None)


#: each mutation of the written file: what llama.cpp then computes instead
MUTATIONS = {
    "gating softmax": _set_key("expert_gating_func", SOFTMAX),
    "weights_norm dropped": _drop_key("expert_weights_norm"),
    "weights_scale dropped": _drop_key("expert_weights_scale"),
    "group counts dropped": _drop_key("expert_group_count", "expert_group_used_count"),
    "exp_probs_b dropped": None,
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_every_routing_key_matters(grouped, tmp_path, monkeypatch, mutation):
    from quantkit import converters

    src, ref = grouped
    conv = converters.for_model_type(MODEL_TYPE)
    monkeypatch.setitem(converters.CONVERTERS, MODEL_TYPE, _mutated(conv, MUTATIONS[mutation]))
    out = convert(src, tmp_path / "m.gguf", "f32")
    with pytest.raises(AssertionError):
        assert_close(llama_logits(out, IDS), ref)


def llama_cpp_in_child(path) -> subprocess.CompletedProcess:
    """Run ``path`` through llama.cpp in a child process (an abort inside llama.cpp kills the process that loaded it)."""
    code = "import sys; from pathlib import Path; from conftest import llama_logits; llama_logits(Path(sys.argv[1]), [1, 5, 7]); print('ran')"
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT / "tests", timeout=300)


def test_without_gating_func_llama_cpp_aborts(grouped, tmp_path, monkeypatch):
    """The trap: a dots1 file without expert_gating_func (llama.cpp's converter writes it only from config.json's scoring_func,
    which Dots1Config does not have) kills the process at llama.cpp's first graph; with the key it runs."""
    from quantkit import converters

    src, _ = grouped
    ok = llama_cpp_in_child(convert(src, tmp_path / "ok.gguf", "f32"))
    assert ok.returncode == 0 and "ran" in ok.stdout, ok.stderr[-2000:]
    conv = converters.for_model_type(MODEL_TYPE)
    monkeypatch.setitem(converters.CONVERTERS, MODEL_TYPE, _mutated(conv, _drop_key("expert_gating_func")))
    bad = llama_cpp_in_child(convert(src, tmp_path / "bad.gguf", "f32"))
    assert bad.returncode != 0 and "ran" not in bad.stdout
    assert "fatal error" in bad.stderr, bad.stderr[-2000:]


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def dense1(tmp_path_factory):
    return build(tmp_path_factory.mktemp("dots1-dense1") / "hf")


def _drop_bias(d):
    _edit_state(d, lambda s: s.pop("model.layers.1.mlp.gate.e_score_correction_bias"))


#: what is done to a copy of the dense-1 model -> needles of the one-line error (config.json-only refusals: test_bad_inputs.py)
REFUSED = {
    "score bias missing": (_drop_bias, ["model.layers.1.mlp.gate.e_score_correction_bias", "is missing"]),
    "dense block count too small": (lambda d: _set_config(d, first_k_dense_replace=0), ["model.layers.0.mlp.gate_proj.weight", "first_k_dense_replace = 0", "MoE block"]),
    "n_shared_experts wrong": (lambda d: _set_config(d, n_shared_experts=2), ["shared_experts", "shape", "config.json implies"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_one_line(dense1, tmp_path, case):
    change, needles = REFUSED[case]
    model = tmp_path / "model"
    shutil.copytree(dense1, model)
    change(model)
    assert_convert_refused(model, tmp_path, needles)


# --------------------------------------------------------------------------- the CLI


MOE_BLOCKS = 2  # in the CLI test's model


def test_convert_q4_k_m_and_run(tmp_path):
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    src = build(tmp_path / "hf", hidden_size=256, moe_intermediate_size=256, intermediate_size=256, num_hidden_layers=3)
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


# --------------------------------------------------------------------------- hostile config.json

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    st = None

#: a valid dots1 config.json (the ARCH_DEFAULTS model's)
BASE = dict(vocab_size=3000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
            n_group=1, topk_group=1, layer_types=["full_attention"] * 2, sliding_window=4096, max_window_layers=62,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
#: keys every family's hparams read besides its own
COMMON_KEYS = ("hidden_act", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "rope_theta", "rope_scaling", "head_dim", "num_experts",
               "num_local_experts", "num_experts_per_tok")


def check_hostile_configs(model_type: str, base: dict, keys: tuple[str, ...], n: int = 300) -> None:
    """Whatever config.json holds, reading it gives hyperparameters and their metadata, or a one-line CheckpointError with a fix."""
    import math

    from quantkit.converters import for_model_type
    from quantkit.errors import CheckpointError

    values = st.one_of(st.none(), st.booleans(), st.integers(-3, 10), st.sampled_from([0, 2**32, 2**40, -(2**63)]), st.floats(allow_nan=True, allow_infinity=True),
                       st.text(max_size=4), st.lists(st.sampled_from(["full_attention", "sliding_attention", 1]), max_size=3),
                       st.dictionaries(st.sampled_from(["rope_type", "rope_theta", "partial_rotary_factor", "factor"]),
                                       st.one_of(st.floats(-2, 1e40), st.text(max_size=3), st.none()), max_size=3))

    @settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(edits=st.dictionaries(st.sampled_from(sorted({*base, *keys})), values, max_size=4))
    def run(edits):
        conv = for_model_type(model_type)
        try:
            h = conv.hparams({**base, **edits})
        except CheckpointError as e:
            assert "fix:" in str(e) and "\n" not in str(e), str(e)
            return
        md = conv.metadata(h)
        assert all(math.isfinite(v.value) for v in md.values() if isinstance(v.value, float))

    run()


@pytest.mark.skipif(st is None, reason="hypothesis is not installed")
def test_hostile_config_is_refused_with_a_checkpoint_error():
    check_hostile_configs(MODEL_TYPE, BASE, COMMON_KEYS + ("attention_bias",))
