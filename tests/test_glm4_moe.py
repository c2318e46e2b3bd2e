"""``converters/glm4_moe.py`` (GGUF arch ``glm4moe``) and ``converters/glm4_moe_lite.py`` (GLM-4.7-Flash, arch ``deepseek2``).

* Logits of the F32 GGUF run by llama.cpp equal transformers' float32 logits (``assert_close``) on
  tiny random models: leading dense blocks and MoE blocks, shared experts, sigmoid routing with a
  non-zero ``e_score_correction_bias`` (random init leaves it at zero: set before the checkpoint is
  written), group-limited routing, ``routed_scaling_factor`` != 1, both expert layouts, partial
  rotary, q/k norms and q/k/v biases, linear rope scaling, tied embeddings; for the lite: MLA with
  ``mlp_layer_types``, rotate-half rope.
* Every routing key matters: the file with one key dropped or changed (the softmax llama.cpp falls
  back to, among them) leaves the tolerance; llama.cpp's own converter's GLM-4.7-Flash file (no
  ``expert_gating_func``) does too on these models.
* The tensors equal the vendored llama.cpp converter's on the same checkpoints (its tokenizer step
  swapped for the fixture's SentencePiece vocabulary), multi-token-prediction blocks included.
* nextn blocks: kept after the trunk with ``nextn_predict_layers`` when the checkpoint holds them
  (llama.cpp still runs the file, ``plan`` lists them, presets match ``llama_model_quantize``), left
  out cleanly when it does not; miscounted ones refused.
* An FP8 checkpoint converts to the tensors of its dequantised twin.
* What llama.cpp cannot compute like transformers is refused with one line naming the key.

Type plans of a glm4moe model without MTP blocks are in ``test_presets.py`` (``glm4moe-e8-L8-dense1``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import assert_convert_refused, convert, hf_logits, llama_logits, random_model, vendored_llama_cpp
from test_deepseek import _edit_state, _metadata, _set_config, _set_score_bias
from test_logits_parity import assert_close

SIGMOID, SOFTMAX = int(gguf.ExpertGatingFuncType.SIGMOID), int(gguf.ExpertGatingFuncType.SOFTMAX)
IDS = [1] + np.random.default_rng(1).integers(3, 2999, size=150).tolist()


def build(path: Path, model_type: str, **overrides) -> Path:
    src = random_model(path, model_type, **overrides)
    _set_score_bias(src)
    return src


def _tensors(path: Path) -> dict[str, tuple[int, tuple[int, ...], bytes]]:
    return {t.name: (int(t.tensor_type), tuple(int(x) for x in t.shape), bytes(t.data)) for t in gguf.GGUFReader(path).tensors}


def add_nextn(src: Path, embed: bool = False, declare: int | None = None) -> Path:
    """One multi-token-prediction block as GLM checkpoints hold it (transformers neither saves nor loads it):
    ``model.layers.{num_hidden_layers}`` = the last block's weights perturbed, plus ``eh_proj``, ``enorm``,
    ``hnorm``, ``shared_head.norm`` (and, with ``embed``, DeepSeek-style ``embed_tokens`` / ``shared_head.head``)."""
    import torch

    cfg = json.loads((src / "config.json").read_text())
    n, h = cfg["num_hidden_layers"], cfg["hidden_size"]
    g = torch.Generator().manual_seed(5)

    def fn(state):
        dtype = state["model.norm.weight"].dtype
        for k, v in list(state.items()):
            if k.startswith(f"model.layers.{n - 1}."):
                state[f"model.layers.{n}." + k.split(".", 3)[3]] = v + 0.01 * torch.randn(v.shape, generator=g).to(v.dtype)
        p = f"model.layers.{n}."
        state[p + "eh_proj.weight"] = (torch.randn(h, 2 * h, generator=g) / h**0.5).to(dtype)
        for name in ("enorm", "hnorm", "shared_head.norm"):
            state[f"{p}{name}.weight"] = (1.0 + 0.3 * torch.randn(h, generator=g)).to(dtype)
        if embed:
            state[p + "embed_tokens.weight"] = torch.randn(cfg["vocab_size"], h, generator=g).to(dtype)
            state[p + "shared_head.head.weight"] = (torch.randn(cfg["vocab_size"], h, generator=g) / h**0.5).to(dtype)

    _edit_state(src, fn)
    _set_config(src, num_nextn_predict_layers=1 if declare is None else declare)
    return src


# --------------------------------------------------------------------------- logits parity

#: conftest's ARCH_DEFAULTS: glm4_moe head_dim 32 (half rotary), q/k norms, q/k/v biases, 1 dense block, 4 experts top-2 + 1 shared,
#: weights x 2.5; glm4_moe_lite: deepseek_v3's small MLA sizes, one dense block (mlp_layer_types' default)
CASES = {
    # per-expert keys, q/k norms, biases, renormalised top-2 x 2.5, one dense block then one MoE block
    "glm-qknorm-bias": dict(model_type="glm4_moe"),
    # fused experts, 8 experts in 4 groups (best 2 kept), top-3, unnormalised, two dense blocks of 3, a quarter of each head rotary,
    # no q/k norms, no biases
    "glm-fused-groups-quarter-rotary": dict(model_type="glm4_moe", fused=True, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
                                            num_hidden_layers=3, first_k_dense_replace=2, norm_topk_prob=False, use_qk_norm=False, attention_bias=False,
                                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
    # linear rope scaling, tied embeddings (the graph reads token_embd as output), 2 shared experts, no dense block
    "glm-linear-tied-2shared": dict(model_type="glm4_moe", tie_word_embeddings=True, n_shared_experts=2, first_k_dense_replace=0,
                                    rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    # GLM-4.7-Flash: low-rank queries, sigmoid + bias, renormalised top-2 x 1.8 (the class default), per-expert keys
    "lite-lora": dict(model_type="glm4_moe_lite"),
    # fused, groups, rotate-half rope, mlp_layer_types with two dense blocks, unnormalised x 0.7
    "lite-fused-groups-rotatehalf": dict(model_type="glm4_moe_lite", fused=True, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
                                         num_hidden_layers=3, mlp_layer_types=["dense", "dense", "sparse"], rope_interleave=False,
                                         routed_scaling_factor=0.7, norm_topk_prob=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    spec = dict(CASES[case])
    src = build(tmp_path / "hf", spec.pop("model_type"), **spec)
    out = convert(src, tmp_path / "m.gguf", "f32")
    assert_close(llama_logits(out, IDS), hf_logits(src, IDS))


# --------------------------------------------------------------------------- routing keys


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """A glm4_moe model whose every routing key matters: bias, 4 groups of 2 with 2 kept, renormalised top-3 x 2.5; transformers' logits."""
    src = build(tmp_path_factory.mktemp("glm-grouped") / "hf", "glm4_moe", n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    return src, hf_logits(src, IDS)


def test_routing_keys_written_from_the_architecture(grouped, tmp_path):
    """Glm4MoeConfig has no scoring_func: the file still says sigmoid, and every other routing key."""
    src, ref = grouped
    assert "scoring_func" not in json.loads((src / "config.json").read_text())
    out = convert(src, tmp_path / "m.gguf", "f32")
    md = _metadata(out)
    assert md["glm4moe.expert_gating_func"] == SIGMOID
    assert md["glm4moe.expert_weights_norm"] is True
    assert md["glm4moe.expert_weights_scale"] == pytest.approx(2.5)
    assert (md["glm4moe.expert_group_count"], md["glm4moe.expert_group_used_count"]) == (4, 2)
    assert md["glm4moe.leading_dense_block_count"] == 1 and md["glm4moe.expert_shared_count"] == 1
    assert md["glm4moe.rope.dimension_count"] == 16 and md["glm4moe.block_count"] == 2
    assert "glm4moe.nextn_predict_layers" not in md  # transformers saved no MTP weights
    assert "blk.1.exp_probs_b.bias" in {t.name for t in gguf.GGUFReader(out).tensors}
    assert_close(llama_logits(out, IDS), ref)


def _drop_key(key):
    return lambda md: {k: v for k, v in md.items() if k != f"glm4moe.{key}"}


def _set_key(key, value):
    from quantkit.format.gguf_write import MetaValue

    return lambda md: {**md, f"glm4moe.{key}": MetaValue(value, md[f"glm4moe.{key}"].vtype)}


#: each mutation of the written file: what llama.cpp then computes instead
MUTATIONS = {
    "gating softmax": _set_key("expert_gating_func", SOFTMAX),
    "weights_norm dropped": _drop_key("expert_weights_norm"),
    "weights_scale dropped": _drop_key("expert_weights_scale"),
    "group counts dropped": lambda md: _drop_key("expert_group_used_count")(_drop_key("expert_group_count")(md)),
    "rotary width = head_dim": _set_key("rope.dimension_count", 32),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_every_routing_key_matters(grouped, tmp_path, monkeypatch, mutation):
    """The converted file with one routing key dropped or changed no longer matches transformers."""
    from quantkit import converters

    src, ref = grouped
    conv = converters.for_model_type("glm4_moe")
    fn = MUTATIONS[mutation]
    monkeypatch.setitem(converters.CONVERTERS, "glm4_moe", dataclasses.replace(conv, metadata=lambda h: fn(conv.metadata(h))))
    out = convert(src, tmp_path / "m.gguf", "f32")
    with pytest.raises(AssertionError):
        assert_close(llama_logits(out, IDS), ref)


def test_lite_gating_key_matters(tmp_path, monkeypatch):
    """GLM-4.7-Flash (llama.cpp PR #18980): without expert_gating_func llama.cpp's deepseek2 graph routes with softmax
    (its layer-count heuristic covers only the published 47/48-block model): parity is lost; with it, kept."""
    from quantkit import converters

    src = build(tmp_path / "hf", "glm4_moe_lite", n_routed_experts=8, num_experts_per_tok=3)
    ref = hf_logits(src, IDS)
    out = convert(src, tmp_path / "m.gguf", "f32")
    assert _metadata(out)["deepseek2.expert_gating_func"] == SIGMOID
    assert_close(llama_logits(out, IDS), ref)
    conv = converters.for_model_type("glm4_moe_lite")
    dropped = lambda h: {k: v for k, v in conv.metadata(h).items() if k != "deepseek2.expert_gating_func"}  # noqa: E731
    monkeypatch.setitem(converters.CONVERTERS, "glm4_moe_lite", dataclasses.replace(conv, metadata=dropped))
    out = convert(src, tmp_path / "bad.gguf", "f32")
    with pytest.raises(AssertionError):
        assert_close(llama_logits(out, IDS), ref)


# --------------------------------------------------------------------------- the vendored converter

#: llama.cpp's convert_hf_to_gguf.py with GLM's tokenizer step swapped for the fixture's SentencePiece vocabulary
_DRIVER = """
import runpy, sys
root = sys.argv[1]
sys.argv = [root + "/convert_hf_to_gguf.py"] + sys.argv[2:]
sys.path[:0] = [root, root + "/gguf-py"]
import conversion.glm as glm
for cls in (glm.Glm4MoeModel, glm.Glm4MoeLiteModel):
    cls.set_vocab = lambda self: self._set_vocab_sentencepiece()
runpy.run_path(root + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def reference_convert(src: Path, out: Path) -> Path:
    LLAMA_CPP = vendored_llama_cpp("conversion")
    r = subprocess.run([sys.executable, "-c", _DRIVER, LLAMA_CPP, str(src), "--outtype", "f32", "--outfile", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def glm_nextn(tmp_path_factory):
    """glm4_moe (per-expert keys, as published) with one MTP block, transformers' logits taken before it was added."""
    base = tmp_path_factory.mktemp("glm-nextn")
    src = build(base / "hf", "glm4_moe", n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    ref = hf_logits(src, IDS)
    return add_nextn(src), ref


@pytest.fixture(scope="module")
def lite_nextn(tmp_path_factory):
    """GLM-4.7-Flash-shaped (per-expert keys) with one MTP block carrying its own embed_tokens / shared_head.head."""
    base = tmp_path_factory.mktemp("lite-nextn")
    src = build(base / "hf", "glm4_moe_lite")
    ref = hf_logits(src, IDS)
    return add_nextn(src, embed=True), ref


def test_tensors_equal_vendored_converter_without_mtp(tmp_path):
    """A transformers-saved checkpoint (per-expert keys): the same tensors, bit for bit; the same checkpoint in transformers 5's
    fused layout (which llama.cpp's converter cannot read) too.  The one difference on purpose: llama.cpp's converter
    declares the MTP block config.json names (block_count + 1, nextn_predict_layers 1) without any weights for it."""
    src = build(tmp_path / "hf", "glm4_moe")
    fused = build(tmp_path / "hf-fused", "glm4_moe", fused=True)
    ref = reference_convert(src, tmp_path / "ref.gguf")
    ours = convert(src, tmp_path / "ours.gguf", "f32")
    assert _tensors(ours) == _tensors(ref)
    assert _tensors(convert(fused, tmp_path / "fused.gguf", "f32")) == _tensors(ref)
    md, md_ref = _metadata(ours), _metadata(ref)
    assert (md["glm4moe.block_count"], md_ref["glm4moe.block_count"], md_ref["glm4moe.nextn_predict_layers"]) == (2, 3, 1)
    assert "glm4moe.nextn_predict_layers" not in md
    same = ("expert_gating_func", "expert_weights_norm", "expert_weights_scale", "leading_dense_block_count", "expert_shared_count",
            "rope.dimension_count", "expert_feed_forward_length", "expert_count", "expert_used_count", "attention.head_count_kv",
            "attention.key_length", "rope.freq_base", "expert_group_count", "expert_group_used_count")
    assert {k: md[f"glm4moe.{k}"] for k in same} == {k: md_ref[f"glm4moe.{k}"] for k in same}


@pytest.mark.parametrize("which,arch", [("glm_nextn", "glm4moe"), ("lite_nextn", "deepseek2")])
def test_nextn_blocks_kept_as_the_vendored_converter_keeps_them(request, tmp_path, which, arch):
    """model.layers.{N} (N = num_hidden_layers) -> blk.N with its nextn.* tensors, block count grown by one,
    nextn_predict_layers = 1: the vendored converter's tensors bit for bit, and llama.cpp still runs the trunk
    with transformers' logits."""
    src, hf = request.getfixturevalue(which)
    ours = convert(src, tmp_path / "ours.gguf", "f32")
    got = _tensors(ours)
    ref = reference_convert(src, tmp_path / "ref.gguf")
    assert got == _tensors(ref)
    md, md_ref = _metadata(ours), _metadata(ref)
    differ = {k for k in md.keys() | md_ref.keys() if k.startswith(arch + ".") and md.get(k) != md_ref.get(k)}
    # llama.cpp's converter on a transformers-saved GLM-4.7-Flash config: no gating key (softmax to llama.cpp's graph at these
    # depths) and first_k_dense_replace read as 0 (mlp_layer_types ignored: block 0's dense FFN would not load); we add vocab_size
    assert differ <= ({f"{arch}.vocab_size"} | ({f"{arch}.expert_gating_func", f"{arch}.leading_dense_block_count"} if arch == "deepseek2" else set())), differ
    assert md[f"{arch}.block_count"] == 3 and md[f"{arch}.nextn_predict_layers"] == 1
    nextn = {n.split(".", 2)[2] for n in got if n.startswith("blk.2.")}
    assert {"nextn.eh_proj.weight", "nextn.enorm.weight", "nextn.hnorm.weight", "nextn.shared_head_norm.weight", "attn_norm.weight",
            "ffn_gate_inp.weight", "exp_probs_b.bias", "ffn_up_exps.weight", "ffn_down_shexp.weight"} <= nextn
    assert ("nextn.embed_tokens.weight" in nextn) == (which == "lite_nextn") == ("nextn.shared_head_head.weight" in nextn)
    assert not any(".nextn." in n for n in got if not n.startswith("blk.2."))
    assert md[f"{arch}.expert_gating_func"] == SIGMOID
    assert_close(llama_logits(ours, IDS), hf)


def test_plan_lists_nextn_blocks(glm_nextn):
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    src, _ = glm_nextn
    result = CliRunner().invoke(app, ["plan", str(src), "--type", "Q4_K_M", "--json"])
    assert result.exit_code == 0, result.output
    names = {r["name"] for r in json.loads(result.output)["tensors"]}
    assert {"blk.2.nextn.eh_proj.weight", "blk.2.nextn.enorm.weight", "blk.2.nextn.hnorm.weight", "blk.2.nextn.shared_head_norm.weight",
            "blk.2.ffn_gate_exps.weight", "blk.2.attn_q.weight"} <= names


def test_converter_notes_say_what_happens_to_nextn_blocks():
    from quantkit.converters import for_model_type

    for mt in ("glm4_moe", "glm4_moe_lite"):
        assert any("multi-token-prediction" in n and "kept" in n for n in for_model_type(mt).notes)


@pytest.mark.parametrize("model_type", ["glm4_moe", "glm4_moe_lite"])
def test_declared_but_absent_nextn_blocks_are_left_out(tmp_path, model_type):
    """config.json says num_nextn_predict_layers: 1 but the checkpoint has no such weights (every transformers save):
    written as llama.cpp's converter writes it with --no-mtp, block_count = num_hidden_layers, no nextn_predict_layers."""
    src = build(tmp_path / "hf", model_type)
    _set_config(src, num_nextn_predict_layers=1)
    md = _metadata(convert(src, tmp_path / "m.gguf", "f32"))
    arch = "glm4moe" if model_type == "glm4_moe" else "deepseek2"
    assert md[f"{arch}.block_count"] == 2 and f"{arch}.nextn_predict_layers" not in md


NEXTN_REFUSED = {
    "miscounted": (lambda src: add_nextn(src, declare=2), ["num_nextn_predict_layers = 2", "holds 1"]),
    "undeclared": (lambda src: add_nextn(src, declare=0), ["num_nextn_predict_layers = 0", "holds 1"]),
    "no eh_proj": (lambda src: (add_nextn(src), _edit_state(src, lambda s: s.pop("model.layers.2.eh_proj.weight"))), ["model.layers.2.eh_proj.weight", "missing"]),
    "gap": (lambda src: (add_nextn(src), _edit_state(src, lambda s: [s.__setitem__(k.replace("layers.2.", "layers.3."), s.pop(k)) for k in list(s) if ".layers.2." in k])),
            ["model.layers.2.", "missing"]),
}


@pytest.mark.parametrize("case", list(NEXTN_REFUSED))
def test_bad_nextn_blocks_refused(tmp_path, case):
    src = random_model(tmp_path / "hf", "glm4_moe")
    breaker, needles = NEXTN_REFUSED[case]
    breaker(src)
    assert_convert_refused(src, tmp_path, needles)


# --------------------------------------------------------------------------- presets with nextn blocks


@pytest.fixture(scope="module")
def nextn_presets_models(tmp_path_factory):
    """8 experts of width 256, 6 blocks + an MTP block (llama.cpp counts layers over all 7), rows of 256 where k-quants apply."""
    from quantkit.pipeline.convert import prepare

    base = tmp_path_factory.mktemp("glm-presets")
    out = {}
    for mt, kw in (("glm4_moe", dict(head_dim=64)), ("glm4_moe_lite", dict(q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                                                                          v_head_dim=64))):
        src = add_nextn(random_model(base / mt, mt, n_routed_experts=8, num_hidden_layers=6, hidden_size=256, moe_intermediate_size=256,
                                     intermediate_size=256, **kw))
        ckpt, prep = prepare(src, "f32")
        ckpt.close()
        out[mt] = convert(src, base / f"{mt}.gguf", "f32"), prep
    return out


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q3_K_M", "Q2_K", "IQ3_M", "Q4_0", "MXFP4_MOE"])
@pytest.mark.parametrize("model_type", ["glm4_moe", "glm4_moe_lite"])
def test_presets_with_nextn_blocks_match_llama_cpp(nextn_presets_models, tmp_path, model_type, preset):
    from test_presets import assert_same_types, llama_quantize

    from quantkit.policy import presets

    path, prep = nextn_presets_models[model_type]
    assert prep.hparams.n_layer == 7
    ref = llama_quantize(path, tmp_path / "out.gguf", preset, False, dry_run=True)
    assert ref.ok, ref.log[-2000:]
    assert_same_types(presets.preset_types(prep.tensors, prep.hparams, preset), ref.types, preset)


# --------------------------------------------------------------------------- FP8 source


def test_fp8_glm4_moe_converts_like_its_dequantised_twin(tmp_path):
    """GLM-4.5's FP8 release shape: every linear projection e4m3 with 128x128 block scales (partial blocks at the edges),
    an MTP block included; the same tensors as its dequantised float32 twin (F32 and Q8_0), and transformers' logits."""
    from test_fp8_source import fp8_checkpoint

    src = build(tmp_path / "hf", "glm4_moe", hidden_size=192, intermediate_size=320, moe_intermediate_size=160)
    add_nextn(src)
    fp8_checkpoint(src, tmp_path / "fp8")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "fp8" / "model.safetensors"), "pt") as f:
        assert "model.layers.2.eh_proj.weight_scale_inv" in set(f.keys())  # the MTP block is FP8 too
    for outtype in ("f32", "q8_0"):
        a = convert(tmp_path / "fp8", tmp_path / f"a-{outtype}.gguf", outtype)
        b = convert(tmp_path / "fp8-deq", tmp_path / f"b-{outtype}.gguf", outtype)
        assert _tensors(a) == _tensors(b)
    assert_close(llama_logits(tmp_path / "a-f32.gguf", IDS), hf_logits(tmp_path / "fp8-deq", IDS))


# --------------------------------------------------------------------------- refusals


def _config(**kv):
    return lambda src: _set_config(src, **kv)


REFUSED = {
    "no shared expert": ("glm4_moe", _config(n_shared_experts=0), ["n_shared_experts = 0", "always adds a shared expert"]),
    "odd rotary width": ("glm4_moe", _config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.3}),
                         ["partial_rotary_factor", "9 rotary dimensions"]),
    "yarn": ("glm4_moe", _config(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 0.5}), ["rope_type", "yarn"]),
    "softmax scoring_func": ("glm4_moe", _config(scoring_func="softmax"), ["scoring_func", "sigmoid"]),
    "groups of one": ("glm4_moe", _config(n_group=4, topk_group=2), ["n_group = 4", "groups of at least 2"]),
    "lite dense after sparse": ("glm4_moe_lite", _config(mlp_layer_types=["sparse", "dense"]), ["mlp_layer_types", "dense block after a MoE block"]),
    "lite partial rotary": ("glm4_moe_lite", _config(partial_rotary_factor=0.5), ["partial_rotary_factor", "qk_rope_head_dim"]),
    "lite bad mlp_layer_types": ("glm4_moe_lite", _config(mlp_layer_types=["dense"]), ["mlp_layer_types", "expected 2"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_in_one_line(tmp_path, case):
    model_type, breaker, needles = REFUSED[case]
    src = random_model(tmp_path / "hf", model_type)
    breaker(src)
    assert_convert_refused(src, tmp_path, needles)


def test_qk_norm_flag_must_match_the_weights(tmp_path):
    src = random_model(tmp_path / "hf", "glm4_moe")
    _set_config(src, use_qk_norm=False)
    assert_convert_refused(src, tmp_path, ["self_attn.q_norm.weight", "use_qk_norm is false"])


def test_keys_unknown_to_llama_cpp_are_not_written(grouped, tmp_path):
    """Every glm4moe.* key written is one llama.cpp's loader knows (gguf-py's names for this arch)."""
    src, _ = grouped
    md = _metadata(convert(src, tmp_path / "m.gguf", "f32"))
    known = {v.replace("{arch}", "glm4moe") for c in (gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope) for k, v in vars(c).items() if k.isupper()}
    assert {k for k in md if k.startswith("glm4moe.")} <= known


@pytest.mark.parametrize("model_type", ["glm4_moe", "glm4_moe_lite"])
def test_nextn_names_are_in_the_vendored_llama_cpp_tables(model_type):
    """The nextn rows (written only for checkpoints holding MTP blocks) are in the vendored llama.cpp's tensor table of the arch
    (the pinned gguf-py 0.19 that ``test_converters.py`` reads predates deepseek2's)."""
    from quantkit.converters import for_model_type
    from quantkit.converters.glm4_moe import NEXTN_RULES

    LLAMA_CPP = vendored_llama_cpp("gguf-py")
    conv = for_model_type(model_type)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import gguf; a = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == sys.argv[2]); "
            "print('\\n'.join(gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[a]))")
    r = subprocess.run([sys.executable, "-c", code, LLAMA_CPP + "/gguf-py", conv.arch], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    allowed = set(r.stdout.split())
    names = ["lm_head.weight", "model.layers.2.eh_proj.weight"]
    written = {x.gguf.removesuffix(".weight").removesuffix(".bias") for x in conv.rules(names)}
    assert {x.gguf.removesuffix(".weight") for x in NEXTN_RULES} <= written <= allowed, sorted(written - allowed)


# --------------------------------------------------------------------------- the CLI on a glm4moe file with a nextn block


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """glm4_moe with rows k-quants take (256), 3 blocks (one dense) and an MTP block; its F32 GGUF and `quantkit convert` Q4_K_M."""
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    base = tmp_path_factory.mktemp("glm-cli")
    src = add_nextn(build(base / "hf", "glm4_moe", hidden_size=256, moe_intermediate_size=256, intermediate_size=256, num_hidden_layers=3, head_dim=64))
    r = CliRunner().invoke(app, ["convert", str(src), "-o", str(base / "q4.gguf"), "--type", "Q4_K_M"])
    assert r.exit_code == 0, r.output
    return src, convert(src, base / "f32.gguf", "f32"), base / "q4.gguf"


def test_requantised_f32_is_the_hf_q4_k_m(cli_model, tmp_path):
    """F32 GGUF -> Q4_K_M gives the very bytes of HF -> Q4_K_M, nextn block included."""
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    _, f32, q4 = cli_model
    r = CliRunner().invoke(app, ["convert", str(f32), "-o", str(tmp_path / "q4.gguf"), "--type", "Q4_K_M"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "q4.gguf").read_bytes() == q4.read_bytes()
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type) for t in gguf.GGUFReader(q4).tensors}
    assert types["blk.1.ffn_gate_exps.weight"] == types["blk.3.ffn_gate_exps.weight"] == gguf.GGMLQuantizationType.Q4_K
    assert types["blk.3.nextn.enorm.weight"] == types["blk.1.exp_probs_b.bias"] == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize("base", ["gguf", "hf"])
def test_eval_kld_with_routing(cli_model, tmp_path, base):
    """KLD and routing fidelity of Q4_K_M against the F32 file and against transformers: one routing layer per trunk MoE block
    (block 0 is dense, the nextn block is not run)."""
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    src, f32, q4 = cli_model
    r = CliRunner().invoke(app, ["eval", "kld", str(f32 if base == "gguf" else src), str(q4), "--corpus", "heldout", "--ctx", "128", "--chunks", "4",
                                 "--threads", "2", "--cache-dir", str(tmp_path / "cache"), "--json", "-", "--no-progress"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout[r.stdout.index("{"):])
    assert 0 <= rep["kld_mean"] < 0.05, rep["kld_mean"]
    assert rep["routing"]["k"] == 2 and len(rep["routing"]["layers"]) == 2
    assert rep["routing"]["topk_jaccard"] > 0.8


def test_routing_of_the_test_models_depends_on_the_bias(grouped, tmp_path):
    """The non-zero e_score_correction_bias of these fixtures changes transformers' output: a file without it could not pass."""
    import shutil

    src, ref = grouped
    flat = tmp_path / "flat"
    shutil.copytree(src, flat)
    _edit_state(flat, lambda s: [s.__setitem__(k, 0 * s[k]) for k in list(s) if k.endswith("e_score_correction_bias")])
    with pytest.raises(AssertionError):
        assert_close(hf_logits(flat, IDS), ref)


# --------------------------------------------------------------------------- hostile config.json

_HBASE = {
    "glm4_moe": dict(vocab_size=3000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=32, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1, first_k_dense_replace=1,
                     n_group=2, topk_group=1, use_qk_norm=True, attention_bias=True, num_nextn_predict_layers=1,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    "glm4_moe_lite": dict(vocab_size=3000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                          n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1, kv_lora_rank=32, q_lora_rank=48,
                          qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, mlp_layer_types=["dense", "sparse"], num_nextn_predict_layers=1,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
_HKEYS = sorted({*_HBASE["glm4_moe"], *_HBASE["glm4_moe_lite"], "scoring_func", "topk_method", "partial_rotary_factor", "rope_theta", "norm_topk_prob",
                 "routed_scaling_factor", "rope_interleave", "hidden_act", "tie_word_embeddings", "max_position_embeddings", "rms_norm_eps", "rope_scaling"})

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    st = None

if st is not None:
    _VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10), st.sampled_from([0, 2**32, 2**40, -(2**63)]),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4), st.sampled_from(["noaux_tc", "sigmoid", "softmax", "dense", "sparse"]),
                        st.lists(st.sampled_from(["dense", "sparse", 1]), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
    _ROPE = st.fixed_dictionaries({"rope_type": st.sampled_from(["default", "yarn", "linear", "dynamic"])},
                                  optional={k: st.one_of(_VALUES, st.floats(-3, 50)) for k in ("factor", "partial_rotary_factor", "mscale_all_dim", "rope_theta",
                                                                                              "original_max_position_embeddings")})

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(model_type=st.sampled_from(sorted(_HBASE)), edits=st.dictionaries(st.sampled_from(_HKEYS), _VALUES, max_size=4), rope=st.one_of(st.none(), _ROPE))
    def test_hostile_config_is_refused_with_a_checkpoint_error(model_type, edits, rope):
        """Whatever config.json holds, reading it gives hyperparameters and their metadata, or a one-line CheckpointError: nothing else escapes."""
        import math

        from quantkit.converters import for_model_type
        from quantkit.errors import CheckpointError

        conv = for_model_type(model_type)
        config = {**_HBASE[model_type], **edits}
        if rope is not None:
            config["rope_parameters"] = rope
        try:
            h = conv.hparams(config)
        except CheckpointError as e:
            assert "fix:" in str(e) and "\n" not in str(e)
            return
        md = conv.metadata(h)
        assert all(math.isfinite(v.value) for v in md.values() if isinstance(v.value, float))


@pytest.mark.parametrize("which,arch", [("glm_nextn", "glm4moe"), ("lite_nextn", "deepseek2")])
def test_no_mtp_leaves_the_nextn_blocks_out(request, tmp_path, which, arch):
    """--no-mtp: the file of the same checkpoint without its MTP weights (block_count = num_hidden_layers, no nextn key,
    no blk.N.nextn.*), transformers' logits; plan --no-mtp lists no block past the trunk."""
    from typer.testing import CliRunner

    from quantkit.cli.main import app
    from quantkit.pipeline.convert import convert as qk_convert

    src, hf = request.getfixturevalue(which)
    out = tmp_path / "nomtp.gguf"
    qk_convert(src, out, "f32", no_mtp=True)
    md = _metadata(out)
    assert md[f"{arch}.block_count"] == 2 and f"{arch}.nextn_predict_layers" not in md
    names = _tensors(out)
    assert not any(n.startswith("blk.2.") or ".nextn." in n for n in names)
    with_mtp = _tensors(convert(src, tmp_path / "mtp.gguf", "f32"))
    assert {n: v for n, v in with_mtp.items() if not n.startswith("blk.2.")} == names  # the trunk: the same bytes
    assert_close(llama_logits(out, IDS), hf)
    result = CliRunner().invoke(app, ["plan", str(src), "--type", "Q4_K_M", "--no-mtp", "--json"])
    assert result.exit_code == 0, result.output
    assert not any(r["name"].startswith("blk.2.") for r in json.loads(result.output)["tensors"])


def test_imatrix_low_bit_needs_no_mtp(glm_nextn, tmp_path):
    """An importance matrix has no data for an MTP block (llama.cpp never runs it): a type that needs one is refused with the
    fix (--no-mtp), and --no-mtp converts."""
    from typer.testing import CliRunner

    from quantkit.cli.main import app
    from quantkit.evals.corpora import heldout_text

    src, _ = glm_nextn
    f16, text, im = tmp_path / "f16.gguf", tmp_path / "t.txt", tmp_path / "im.gguf"
    text.write_text(heldout_text()[:12000], encoding="utf-8")
    run = CliRunner().invoke
    assert run(app, ["convert", str(src), "-o", str(f16), "--type", "f16", "--no-progress"]).exit_code == 0
    r = run(app, ["imatrix", str(f16), "--text", str(text), "-o", str(im), "--ctx", "64", "--chunks", "4", "--no-progress"])
    assert r.exit_code == 0, r.output
    bad = run(app, ["convert", str(src), "-o", str(tmp_path / "q.gguf"), "--type", "IQ2_XS", "--imatrix", str(im), "--no-progress"])
    assert bad.exit_code == 1 and "multi-token-prediction block" in " ".join(bad.output.split()) and "--no-mtp" in bad.output
    assert not (tmp_path / "q.gguf").exists()
    ok = run(app, ["convert", str(src), "-o", str(tmp_path / "q.gguf"), "--type", "IQ2_XS", "--imatrix", str(im), "--no-mtp", "--no-progress"])
    assert ok.exit_code == 0, ok.output
