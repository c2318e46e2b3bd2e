"""``converters/llama4.py``: Llama 4 text models (interleaved dense / MoE blocks, a shared expert beside sigmoid-weighted
routed experts stored fused and transposed, NoPE blocks, chunked attention, attention temperature tuning).

Here: logits against transformers' float32 logits on a prompt longer than the 8192-token attention chunk (so the
chunked blocks, the NoPE blocks' full attention and the temperature tuning past position 8191 all count), on
transformers' vision-language checkpoint (``Llama4ForConditionalGeneration``: ``language_model.`` prefix, vision tower
left out) with top-2 routing; tensors and hyperparameter keys equal to the vendored llama.cpp converter's on both; the
refusals of what llama.cpp's graph hard-codes; ``--format bnb`` refused.  The presets are in ``test_presets.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import assert_convert_refused, convert, hf_logits, random_model, read_config, vendored_llama_cpp
from test_logits_parity import assert_close

IDS = [1] + np.random.default_rng(1).integers(3, 2999, size=150).tolist()
#: past the 8192-token chunk of the rotary blocks and the 8192 floor_scale of the NoPE blocks' temperature tuning
LONG = [1] + np.random.default_rng(2).integers(3, 2999, size=8299).tolist()
#: Llama-4-Scout's rope scaling: llama3 with equal low / high frequency factors (no smoothed band)
SCOUT_ROPE = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
              "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    """conftest's llama_logits with room for ``ids`` and an F32 KV cache without flash attention (the most exact path:
    measured 2e-5 from transformers at 8300 tokens; flash attention's F16 accumulation alone adds 3.5e-4)."""
    import llama_cpp

    n_ctx = max(512, -(-len(ids) // 256) * 256)
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, n_batch=n_ctx,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


@pytest.fixture(scope="module")
def scout(tmp_path_factory):
    """Llama4ForCausalLM (``llama4_text``), conftest's sizes with small attention (2 heads of 16, one KV head: 8300 tokens stay
    cheap), Scout's rope scaling: blocks 0-2 rotary + chunked, block 3 NoPE + full attention; blocks 1 and 3 MoE."""
    base = tmp_path_factory.mktemp("llama4")
    return random_model(base / "hf", "llama4_text", dtype="float32", num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                        rope_parameters=SCOUT_ROPE, max_position_embeddings=16384)


def _perturb(model) -> None:
    """conftest.random_model's weights: every one perturbed, norms around 1."""
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.6 / p.shape[-1] ** 0.5 if "embed" not in name else 1.0))


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    """Llama4ForConditionalGeneration as transformers saves it (``text_config``, ``language_model.model.*`` /
    ``language_model.lm_head``, a tiny vision tower and projector), top-2 routing; its logits on a text prompt."""
    import torch
    import transformers

    from conftest import ARCH_DEFAULTS, FIXTURE, TOKENIZER_FILES

    path = tmp_path_factory.mktemp("llama4vl") / "hf"
    text = dict(vocab_size=3000, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, **{**ARCH_DEFAULTS["llama4_text"], "num_experts_per_tok": 2})
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14,
                  vision_output_dim=64, projector_input_dim=64, projector_output_dim=128)
    model = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(text_config=text, vision_config=vision))
    _perturb(model)
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([IDS])).logits[0].float().numpy()
    model.save_pretrained(path)
    for f in TOKENIZER_FILES:
        if (FIXTURE / f).exists():
            shutil.copy(FIXTURE / f, path / f)
    return path, ref


def test_long_context_logits_match_transformers(scout, tmp_path):
    """8300 tokens: chunked attention restarts at 8192 in blocks 0-2, block 3 (NoPE) sees everything with its queries scaled
    by 1 + 0.1 * log(2) from position 8191 on; dense blocks 0 and 2, MoE blocks 1 and 3 (sigmoid top-1 + shared expert)."""
    got = llama_logits(convert(scout, tmp_path / "m.gguf", "f32"), LONG)
    assert_close(got, hf_logits(scout, LONG))


def test_vision_language_checkpoint_matches_transformers(vl, tmp_path):
    src, ref = vl
    out = convert(src, tmp_path / "m.gguf", "f32")
    names = [t.name for t in gguf.GGUFReader(out).tensors]
    assert not any("vision" in n or "mm" in n.split(".")[0] for n in names)
    assert {"blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_shexp.weight", "blk.0.ffn_gate.weight", "output.weight"} <= set(names)
    assert "blk.0.ffn_gate_inp.weight" not in names and "blk.1.ffn_gate.weight" not in names
    assert_close(llama_logits(out, IDS), ref)


# --------------------------------------------------------------------------- the vendored converter's file

_REFERENCE = """
import runpy, sys
llama_cpp, src, out = sys.argv[1:4]
sys.path[:0] = [llama_cpp, llama_cpp + "/gguf-py"]
from conversion.llama import Llama4Model
Llama4Model.set_vocab = lambda self: None  # its vocabulary is Llama 4's BPE one; tensors and hyperparameters are what is compared
sys.argv = ["convert_hf_to_gguf.py", src, "--outtype", "f32", "--outfile", out]
runpy.run_path(llama_cpp + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def _tensors(path: Path) -> dict[str, tuple[int, tuple[int, ...], np.ndarray]]:
    return {t.name: (int(t.tensor_type), tuple(int(d) for d in t.shape), np.asarray(t.data)) for t in gguf.GGUFReader(path).tensors}


def _arch_keys(path: Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k.startswith("llama4.")}


@pytest.mark.parametrize("which", ["scout", "vl"])
def test_tensors_equal_the_vendored_converter(request, tmp_path, which):
    """Every tensor (names, types, shapes, values: the transposed gate_up split, down transposed, rope_freqs of Scout's
    equal-factor llama3 scaling) and every ``llama4.*`` key equal to what the vendored convert_hf_to_gguf.py writes."""
    LLAMA_CPP = vendored_llama_cpp("conversion")
    fixture = request.getfixturevalue(which)
    src = fixture if which == "scout" else fixture[0]
    ref = tmp_path / "ref.gguf"
    run = subprocess.run([sys.executable, "-c", _REFERENCE, LLAMA_CPP, str(src), str(ref)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    ours = convert(src, tmp_path / "m.gguf", "f32")
    a, b = _tensors(ours), _tensors(ref)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name][:2] == b[name][:2], name
        np.testing.assert_array_equal(a[name][2], b[name][2], err_msg=name)
    assert _arch_keys(ours) == _arch_keys(ref)


def test_published_config_spelling_converts_the_same(scout, tmp_path):
    """The published config.json's spelling (transformers 4: ``rope_theta`` + ``rope_scaling`` with Scout's equal factors, no
    ``layer_types`` / ``moe_layers`` / ``no_rope_layers``: the class derives them) gives the same file."""
    dst = tmp_path / "model"
    shutil.copytree(scout, dst)
    rope = dict(SCOUT_ROPE)
    _edit(dst, rope_parameters=None, rope_theta=rope.pop("rope_theta"), rope_scaling=rope, layer_types=None, moe_layers=None, no_rope_layers=None)
    a, b = _tensors(convert(scout, tmp_path / "a.gguf", "f32")), _tensors(convert(dst, tmp_path / "b.gguf", "f32"))
    assert sorted(a) == sorted(b) and "rope_freqs.weight" in a
    for name in a:
        np.testing.assert_array_equal(a[name][2], b[name][2], err_msg=name)
    assert _arch_keys(tmp_path / "a.gguf") == _arch_keys(tmp_path / "b.gguf")


# --------------------------------------------------------------------------- refusals


def _edit(d: Path, **kv) -> None:
    config = read_config(d)
    for k, v in kv.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    (d / "config.json").write_text(json.dumps(config))


#: config.json edit -> what the one-line error must say (the key, and what llama.cpp hard-codes)
REFUSED = {
    "chunk size": (dict(attention_chunk_size=4096), ["attention_chunk_size = 4096", "8192"]),
    "no chunking": (dict(attention_chunk_size=None, layer_types=["full_attention"] * 4), ["layer_types", "chunks"]),
    "NoPE interval": (dict(no_rope_layers=None, no_rope_layer_interval=2, layer_types=None), ["no_rope_layer_interval = 2", "every 4th block"]),
    "NoPE list": (dict(no_rope_layers=[1, 0, 1, 1]), ["no_rope_layers", "every 4th block"]),
    "layer types": (dict(layer_types=["chunked_attention", "full_attention", "chunked_attention", "full_attention"]), ["layer_types", "chunks"]),
    "temperature tuning off": (dict(attn_temperature_tuning=False), ["attn_temperature_tuning = false", "NoPE"]),
    "floor scale": (dict(floor_scale=4096), ["floor_scale = 4096", "8192"]),
    "attn scale": (dict(attn_scale=0.2), ["attn_scale = 0.2", "0.1"]),
    "qk norm off with 4 experts": (dict(use_qk_norm=False), ["use_qk_norm = false", "128 experts"]),
    "moe layers uneven": (dict(moe_layers=[1, 2]), ["moe_layers", "interleave_moe_layer_step"]),
    "attention bias": (dict(attention_bias=True), ["attention_bias = true"]),
    "yarn": (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 500000.0}), ["yarn", "llama3"]),
    "too shallow": (dict(num_hidden_layers=3), ["num_hidden_layers = 3", "NoPE"]),
    "moe step disagrees with the weights": (dict(interleave_moe_layer_step=1, moe_layers=None), ["block 0", "interleave_moe_layer_step = 1"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_one_line(scout, tmp_path, case):
    dst = tmp_path / "model"
    shutil.copytree(scout, dst)
    edit, needles = REFUSED[case]
    _edit(dst, **edit)
    assert_convert_refused(dst, tmp_path, needles)


def test_bnb_export_is_refused(scout, tmp_path):
    """No transformers expert layout is declared: Llama4TextExperts takes pre-weighted, expert-sorted inputs that the
    per-expert 4-bit loader does not reproduce."""
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    out = tmp_path / "bnb"
    result = CliRunner().invoke(app, ["convert", str(scout), "-o", str(out), "--format", "bnb"])
    assert result.exit_code == 1, result.output
    flat = " ".join(result.output.split())
    assert "--format bnb does not export model_type 'llama4_text'" in flat and "fix:" in flat
    assert not out.exists() or list(out.iterdir()) == []
