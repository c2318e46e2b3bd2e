"""``converters/gpt_oss.py``: logits parity with transformers, its transforms, its refusals, the CLI path.

A tiny random gpt-oss (4 experts top-2, window 8, YaRN) converted to F32 gives transformers' float32
logits on prompts longer than the window; each transform is checked against transformers' own
indexing and fails when its interleave or transpose is changed; every configuration llama.cpp's
gpt-oss graph would compute differently is refused in one line.  Type plans against
``llama_model_quantize``: ``test_presets.py`` (``gpt-oss-e4``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from conftest import assert_convert_refused, convert, hf_logits, llama_logits, random_model
from test_logits_parity import assert_close

#: 40 tokens: five times the window of 8
IDS = [1] + [(7 * i + 3) % 2990 + 5 for i in range(39)]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("gpt_oss") / "hf", "gpt_oss")


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


def test_f32_logits_match_transformers(good, tmp_path):
    ref = hf_logits(good, IDS)
    assert_close(llama_logits(convert(good, tmp_path / "m.gguf"), IDS), ref)


def test_window_matters(good, tmp_path):
    """The prompts are long enough that the sliding blocks compute something else than full attention would."""
    wide = tmp_path / "wide"
    shutil.copytree(good, wide)
    _set_config(wide, sliding_window=4096)
    a, b = hf_logits(good, IDS), hf_logits(wide, IDS)
    assert np.abs(a - b).max() > 5e-3 * np.abs(a).max()


def test_yarn_truncate_false_gap(good, tmp_path):
    """Published configs say truncate: false; ggml always rounds the correction range.  Measured, not refused."""
    src = tmp_path / "notrunc"
    shutil.copytree(good, src)
    cfg = json.loads((src / "config.json").read_text())
    _set_config(src, rope_parameters={**cfg["rope_parameters"], "truncate": False})
    got, ref = llama_logits(convert(src, tmp_path / "m.gguf"), IDS), hf_logits(src, IDS)
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    print(f"yarn truncate=false: max |llama.cpp - transformers| / logit scale = {rel:.3g}")
    assert rel < 2e-2 and (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


# -- transforms: against transformers' own indexing, and mutations that must fail --------------------


def test_transforms_match_transformers_indexing():
    import torch

    from quantkit.converters import gpt_oss as g

    rng = np.random.default_rng(0)
    E, H, F = 3, 8, 6
    gate_up = rng.standard_normal((E, H, 2 * F)).astype(np.float32)
    down = rng.standard_normal((E, F, H)).astype(np.float32)
    bias = rng.standard_normal((E, 2 * F)).astype(np.float32)
    x = rng.standard_normal((5, H)).astype(np.float32)
    for e in range(E):
        gu = torch.from_numpy(x) @ torch.from_numpy(gate_up[e])  # transformers: x @ gate_up_proj[e], then [..., ::2] / [..., 1::2]
        gate_w, up_w = g.GATE_T.apply(gate_up[e], None), g.UP_T.apply(gate_up[e], None)
        np.testing.assert_allclose(x @ gate_w.T, gu[:, ::2].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(x @ up_w.T, gu[:, 1::2].numpy(), rtol=1e-5, atol=1e-5)
        y = rng.standard_normal((5, F)).astype(np.float32)
        np.testing.assert_allclose(y @ g.TRANSPOSED.apply(down[e], None).T, y @ down[e], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(g.GATE_BIAS.apply(bias, None), bias[:, ::2])
    np.testing.assert_array_equal(g.UP_BIAS.apply(bias, None), bias[:, 1::2])
    rows = rng.standard_normal((2 * F, H)).astype(np.float32)
    np.testing.assert_array_equal(g.GATE_ROWS.apply(rows, None), rows[::2])
    np.testing.assert_array_equal(g.UP_ROWS.apply(rows, None), rows[1::2])
    # shapes known before any weight is read
    assert g.GATE_T.out_shape((E, H, 2 * F), None) == (E, F, H)
    assert g.TRANSPOSED.out_shape((E, F, H), None) == (E, H, F)
    assert g.UP_BIAS.out_shape((E, 2 * F), None) == (E, F)
    assert g.GATE_ROWS.out_shape((E, 2 * F, H), None) == (E, F, H)


# Each mutation: a plausible mistake in a transform; the tiny model's logits must then differ.
MUTATIONS = {
    "gate/up swapped": lambda g: [("GATE_T", dataclasses.replace(g.GATE_T, first=False)), ("UP_T", dataclasses.replace(g.UP_T, first=True))],
    "halves instead of interleave": lambda g: [("GATE_T", _Halves(True)), ("UP_T", _Halves(False))],
    "down not transposed": lambda g: [("TRANSPOSED", _Reshaped())],
    "bias halves swapped": lambda g: [("GATE_BIAS", dataclasses.replace(g.GATE_BIAS, first=False)), ("UP_BIAS", dataclasses.replace(g.UP_BIAS, first=True))],
}


def _halves_cls():
    from quantkit.converters.gpt_oss import InterleavedT

    @dataclasses.dataclass(frozen=True)
    class Halves(InterleavedT):
        def select(self, a):
            a = np.asarray(a)
            half = a.shape[1] // 2
            return np.ascontiguousarray((a[:, :half] if self.first else a[:, half:]).T)

    @dataclasses.dataclass(frozen=True)
    class Reshaped(InterleavedT):  # [F, H] -> [H, F] by reshape instead of transpose
        def out_shape(self, shape, hparams):
            return (*shape[:-2], shape[-1], shape[-2])

        def select(self, a):
            a = np.asarray(a)
            return np.ascontiguousarray(a.reshape(a.shape[1], a.shape[0]))

    return Halves, Reshaped


def _Halves(first):
    return _halves_cls()[0]("mut_halves", first=first)


def _Reshaped():
    return _halves_cls()[1]("mut_reshape")


@pytest.mark.parametrize("case", list(MUTATIONS))
def test_mutated_transform_breaks_parity(good, tmp_path, monkeypatch, case):
    from quantkit.converters import gpt_oss as g

    for attr, value in MUTATIONS[case](g):
        old = getattr(g, attr)
        for rules_attr in ("EXPERT_RULES", "ROUTER_RULES"):
            rules = tuple(dataclasses.replace(r, transform=value) if r.transform is old else r for r in getattr(g, rules_attr))
            monkeypatch.setattr(g, rules_attr, rules)
    got = llama_logits(convert(good, tmp_path / "m.gguf"), IDS)
    ref = hf_logits(good, IDS)
    assert np.abs(got - ref).max() > 5e-3 * np.abs(ref).max(), f"{case}: parity survived the mutation"


# -- refusals ----------------------------------------------------------------------------------------

REFUSED = {
    # llama.cpp's graph hard-codes the clamped SwiGLU constants
    "swiglu_limit": (lambda d: _set_config(d, swiglu_limit=5.0), ["swiglu_limit = 5.0", "7.0"]),
    "swiglu_alpha": (lambda d: _set_config(d, swiglu_alpha=1.5), ["swiglu_alpha = 1.5", "1.702"]),
    # the graph hard-codes sliding on even blocks, full on odd ones
    "layer_types full first": (lambda d: _set_config(d, layer_types=["full_attention", "sliding_attention"]), ["layer_types", "even blocks"]),
    "attention_bias false": (lambda d: _set_config(d, attention_bias=False), ["attention_bias = False", "attn_output.bias"]),
    "llama3 rope": (lambda d: _set_config(d, rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                               "original_max_position_embeddings": 64, "rope_theta": 10000.0}), ["rope_type = 'llama3'", "yarn"]),
    "yarn beta_fast": (lambda d: _set_config(d, rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 16.0, "beta_slow": 1.0,
                                                                  "original_max_position_embeddings": 4096, "rope_theta": 150000.0}), ["beta_fast = 16.0"]),
    "yarn attention_factor": (lambda d: _set_config(d, rope_parameters={"rope_type": "yarn", "factor": 32.0, "attention_factor": 2.0,
                                                                         "original_max_position_embeddings": 4096, "rope_theta": 150000.0}), ["attention_factor = 2.0"]),
    "num_experts_per_tok above experts": (lambda d: _set_config(d, num_experts_per_tok=5), ["num_experts_per_tok = 5", "num_local_experts = 4"]),
    "expert width wrong": (lambda d: _set_config(d, intermediate_size=96), ["mlp.experts.", "config.json implies"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_one_line(model, tmp_path, case):
    breaker, needles = REFUSED[case]
    breaker(model)
    assert_convert_refused(model, tmp_path, needles)


def test_expert_biases_stay_f32(good, tmp_path):
    import gguf

    path = convert(good, tmp_path / "m.gguf", "f16")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    for name in ("blk.0.ffn_gate_exps.bias", "blk.0.ffn_up_exps.bias", "blk.1.ffn_down_exps.bias", "blk.0.attn_sinks.weight", "blk.0.ffn_gate_inp.bias"):
        assert types[name] == gguf.GGMLQuantizationType.F32, name
    assert types["blk.0.ffn_gate_exps.weight"] == gguf.GGMLQuantizationType.F16


def test_cli_convert_q4_k_m_and_run(good, tmp_path):
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    out = tmp_path / "x.gguf"
    r = CliRunner().invoke(app, ["convert", str(good), "-o", str(out), "--type", "Q4_K_M"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["run", str(out), "-p", "hi", "-n", "5"])
    assert r.exit_code == 0, r.output
