"""Granite MoE specifics the logits tests do not show: both saved layouts, the split shared MLP, the keys, the refusals.

Logits parity (``test_logits_parity.py``, cases ``granitemoe-*``) proves the
converted file computes what transformers does; here: transformers 5's two
``save_pretrained`` layouts give the very same GGUF, the shared MLP's fused
``input_linear`` halves land in ``ffn_gate_shexp`` / ``ffn_up_shexp`` byte for
byte, every multiplier is written (llama.cpp's defaults differ from
transformers'), and configurations llama.cpp would compute differently are
refused with one line naming the key.
"""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest

from conftest import convert, random_model
from quantkit.errors import CheckpointError

SMALL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=32, shared_intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A small granitemoeshared checkpoint in IBM's layout and in transformers 5's (same seed, same weights)."""
    base = tmp_path_factory.mktemp("granite")
    return {
        "original": random_model(base / "original", "granitemoeshared", **SMALL),
        "fused": random_model(base / "fused", "granitemoeshared", fused=True, **SMALL),
    }


def _tensors(path):
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}


def _with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_both_layouts_give_the_same_file(shared, tmp_path):
    """block_sparse_moe.input_linear / output_linear / router.layer and experts.gate_up_proj / down_proj / router: one GGUF."""
    a = _tensors(convert(shared["original"], tmp_path / "a.gguf", "bf16"))
    b = _tensors(convert(shared["fused"], tmp_path / "b.gguf", "bf16"))
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_shared_mlp_halves_and_metadata(shared, tmp_path):
    """ffn_gate_shexp is input_linear's first half (transformers gates with it), ffn_up_shexp the second; the keys llama.cpp reads."""
    import torch
    from safetensors.torch import load_file

    out = convert(shared["original"], tmp_path / "m.gguf", "f32")
    got = _tensors(out)
    state = load_file(str(shared["original"] / "model.safetensors"))
    fused = state["model.layers.1.shared_mlp.input_linear.weight"].to(torch.float32).numpy()
    assert np.array_equal(got["blk.1.ffn_gate_shexp.weight"], fused[:48])
    assert np.array_equal(got["blk.1.ffn_up_shexp.weight"], fused[48:])
    experts = state["model.layers.1.block_sparse_moe.input_linear.weight"].to(torch.float32).numpy()
    assert np.array_equal(got["blk.1.ffn_gate_exps.weight"], experts[:, :32])
    assert np.array_equal(got["blk.1.ffn_up_exps.weight"], experts[:, 32:])
    md = {f.name: f for f in gguf.GGUFReader(out).fields.values()}
    value = lambda k: md[k].parts[md[k].data[0]][0]  # noqa: E731
    assert str(bytes(md["general.architecture"].parts[-1]), "utf-8") == "granitemoe"
    assert value("granitemoe.expert_shared_feed_forward_length") == 48
    assert value("granitemoe.feed_forward_length") == 32
    for key, want in (("embedding_scale", 2.0), ("residual_scale", 0.7), ("attention.scale", 0.25), ("logit_scale", 0.5)):
        assert value(f"granitemoe.{key}") == np.float32(want), key


def test_multipliers_left_out_are_written_as_transformers_reads_them(shared, tmp_path):
    """transformers defaults every multiplier to 1.0; llama.cpp would use 1/sqrt(head_dim) for a missing attention scale and requires logit_scale."""
    src = _with_config(shared["original"], tmp_path / "hf", embedding_multiplier=None, residual_multiplier=None, attention_multiplier=None, logits_scaling=None)
    md = {f.name: f for f in gguf.GGUFReader(convert(src, tmp_path / "m.gguf", "f32")).fields.values()}
    for key in ("embedding_scale", "residual_scale", "attention.scale", "logit_scale"):
        f = md[f"granitemoe.{key}"]
        assert f.parts[f.data[0]][0] == 1.0, key


def test_without_shared_size_granitemoeshared_is_a_plain_granite_moe(tmp_path):
    """shared_intermediate_size 0 (the config class default): no shared MLP in transformers, no _shexp tensors or key in the file."""
    src = random_model(tmp_path / "hf", "granitemoeshared", **{**SMALL, "shared_intermediate_size": 0})
    out = convert(src, tmp_path / "m.gguf", "f32")
    names = {f.name for f in gguf.GGUFReader(out).fields.values()} | set(_tensors(out))
    assert not any("shexp" in n or "shared" in n for n in names)


REFUSED = {
    # llama.cpp's granite graph gates experts with SiLU
    "hidden_act gelu": (dict(hidden_act="gelu"), ["hidden_act", "'gelu'", "SiLU"]),
    # llama.cpp reads 0 as "no scaling" / "1/sqrt(head_dim)"; transformers multiplies by 0
    "embedding_multiplier 0": (dict(embedding_multiplier=0), ["embedding_multiplier = 0", "no embedding scaling"]),
    "residual_multiplier 0": (dict(residual_multiplier=0.0), ["residual_multiplier = 0.0", "no residual scaling"]),
    "attention_multiplier 0": (dict(attention_multiplier=0), ["attention_multiplier = 0", "1/sqrt(head_dim)"]),
    "attention_multiplier below float32": (dict(attention_multiplier=1e-50), ["attention_multiplier", "1/sqrt(head_dim)"]),
    "logits_scaling 0": (dict(logits_scaling=0), ["logits_scaling = 0", "division by zero"]),
    "multiplier a string": (dict(residual_multiplier="0.22"), ["residual_multiplier", "expected a number"]),
    "top-k above the experts": (dict(num_experts_per_tok=5), ["num_experts_per_tok = 5", "num_local_experts = 4"]),
    # the config promises biases the weights do not have (transformers would start them at random)
    "attention_bias without bias tensors": (dict(attention_bias=True), ["attention_bias = true", "model.layers.0.self_attn.q_proj.bias' is missing"]),
    "attention_bias a string": (dict(attention_bias="true"), ["attention_bias", "true or false"]),
    "shared size without shared weights": (dict(model_type="granitemoe"), ["shared_mlp", "matches no known tensor"]),
    "shared size disagrees": (dict(shared_intermediate_size=64), ["shared_mlp.input_linear", "config.json implies [128, 64]"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_one_line(shared, tmp_path, case):
    changes, needles = REFUSED[case]
    src = _with_config(shared["original"], tmp_path / "hf", **changes)
    with pytest.raises(CheckpointError) as e:
        convert(src, tmp_path / "m.gguf", "f32")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "fix:" in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert not (tmp_path / "m.gguf").exists()


def test_shared_size_set_but_weights_missing(tmp_path):
    """A granitemoeshared config with shared_intermediate_size but checkpoint without shared_mlp: llama.cpp would refuse to load."""
    src = random_model(tmp_path / "hf", "granitemoeshared", **{**SMALL, "shared_intermediate_size": 0})
    cfg = json.loads((src / "config.json").read_text())
    cfg["shared_intermediate_size"] = 48
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shared_intermediate_size = 48, but tensor 'model\.layers\.0\.shared_mlp\.input_linear\.weight' is missing"):
        convert(src, tmp_path / "m.gguf", "f32")


def test_bias_tensors_without_attention_bias(tmp_path):
    """Weights with biases but attention_bias false: transformers ignores the biases, llama.cpp would add them."""
    src = random_model(tmp_path / "hf", "granitemoe", **{**SMALL, "attention_bias": True})
    cfg = json.loads((src / "config.json").read_text())
    cfg["attention_bias"] = False
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="attention_bias = false"):
        convert(src, tmp_path / "m.gguf", "f32")
