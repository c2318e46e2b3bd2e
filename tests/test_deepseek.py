"""``converters/deepseek_v2.py`` / ``deepseek_v3.py`` (GGUF arch ``deepseek2``): parity, routing keys, refusals, the CLI.

* Logits of the F32 GGUF run by llama.cpp equal transformers' float32 logits (``assert_close``)
  on tiny random models: low-rank queries and the "lite" ``q_proj``, a leading dense block,
  shared experts, V3's sigmoid router with a non-zero ``e_score_correction_bias`` (random
  init leaves the buffer at zero: it is set before the checkpoint is written), group-limited
  routing, ``routed_scaling_factor`` != 1, both expert layouts, ``rope_interleave: false``,
  YaRN with every ``mscale`` / ``mscale_all_dim`` / ``attention_factor`` combination.
* Every routing key matters: the same file with one key dropped or changed (the softmax
  llama.cpp falls back to, among them) leaves the tolerance.
* What llama.cpp cannot compute like transformers is refused with one line naming the key.
* ``quantkit convert --type Q4_K_M``, requantising the F32 GGUF (the same bytes),
  ``quantkit run`` and ``quantkit eval kld`` on a deepseek2 file.

Type plans against ``llama_model_quantize`` are in ``test_presets.py`` (``deepseek3-e8-L8-mla``,
``deepseek2-lite-e4-L12-tied``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import gguf
import numpy as np
import pytest

from conftest import assert_convert_refused, convert, hf_logits, llama_logits, random_model
from test_logits_parity import assert_close

SIGMOID, SOFTMAX = int(gguf.ExpertGatingFuncType.SIGMOID), int(gguf.ExpertGatingFuncType.SOFTMAX)
IDS = [1] + np.random.default_rng(1).integers(3, 2999, size=150).tolist()


def _edit_state(path, fn) -> None:
    from safetensors.torch import load_file, save_file

    p = path / "model.safetensors"
    state = load_file(str(p))
    fn(state)
    save_file(state, str(p), metadata={"format": "pt"})


def _set_score_bias(path, seed: int = 0) -> None:
    """A non-zero e_score_correction_bias (transformers initialises the buffer at zero), large enough to change the choice."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def fn(state):
        keys = [k for k in state if k.endswith("e_score_correction_bias")]
        assert keys
        for k in keys:
            state[k] = (torch.rand(state[k].shape, generator=g) - 0.5).to(state[k].dtype)

    _edit_state(path, fn)


def _set_config(path, **kv) -> None:
    p = path / "config.json"
    cfg = json.loads(p.read_text())
    cfg.update(kv)
    for k in [k for k, v in kv.items() if v is _DROP]:
        del cfg[k]
    p.write_text(json.dumps(cfg))


_DROP = object()


def build(path, model_type: str, bias: bool = True, **overrides):
    src = random_model(path, model_type, **overrides)
    if bias and model_type == "deepseek_v3":
        _set_score_bias(src)
    return src


def _metadata(path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


# --------------------------------------------------------------------------- logits parity

#: each case exercises something a deepseek2 file can get wrong (the ARCH_DEFAULTS of conftest: q_lora 48, latent 32,
#: rope 16 / nope 32 / v 32, 4 experts top-2 + 1 shared, one leading dense block of 2)
CASES = {
    # V3: low-rank queries, sigmoid + non-zero selection bias, renormalised top-2 times 2.5, per-expert keys
    "v3-lora-bias": dict(model_type="deepseek_v3"),
    # V3 in transformers 5's fused layout, "lite" q_proj at a depth llama.cpp's own converter cannot write (no q_lora_rank key),
    # rotate-half rope (rotary rows reordered into pairs), 2 shared experts, no dense block
    "v3-fused-lite-rotatehalf": dict(model_type="deepseek_v3", fused=True, q_lora_rank=None, rope_interleave=False, n_shared_experts=2,
                                     first_k_dense_replace=0),
    # V3 group-limited routing: 8 experts in 4 groups, the best 2 groups kept, top-3; 3 layers
    "v3-groups": dict(model_type="deepseek_v3", n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, num_hidden_layers=3),
    # V3 unnormalised top-k, weights scaled 0.7, tied embeddings (the graph reads token_embd as output)
    "v3-nonorm-tied": dict(model_type="deepseek_v3", norm_topk_prob=False, routed_scaling_factor=0.7, tie_word_embeddings=True),
    # V3 YaRN as DeepSeek-V3 publishes it (mscale = mscale_all_dim = 1): llama.cpp's converter writes the same keys
    "v3-yarn": dict(model_type="deepseek_v3", rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                                                                "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}),
    # V3 YaRN with mscale_all_dim only: transformers scales cos/sin by g(s, 1) and the logits by g(s, 0.8)^2 (llama.cpp's converter
    # writes yarn_log_multiplier 0.08 and computes neither)
    "v3-yarn-mscale-all-only": dict(model_type="deepseek_v3", rope_parameters={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128,
                                                                                "mscale_all_dim": 0.8, "rope_theta": 10000.0}),
    # V3 YaRN with mscale only: transformers' cos/sin get g(s, 1) (mscale is used only beside mscale_all_dim), the logits no extra scale
    "v3-yarn-mscale-only": dict(model_type="deepseek_v3", rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                                                                            "mscale": 0.9, "rope_theta": 10000.0}),
    # V3 YaRN with an explicit attention_factor (cos/sin scale) besides mscale_all_dim
    "v3-yarn-attention-factor": dict(model_type="deepseek_v3", rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                                                                                 "mscale": 1.0, "mscale_all_dim": 1.0, "attention_factor": 0.9,
                                                                                 "rope_theta": 10000.0}),
    # V2: softmax, top-2 never renormalised, times 1.5, low-rank queries, per-expert keys
    "v2-lora": dict(model_type="deepseek_v2"),
    # V2-Lite's shape: q_proj, fused experts, greedy routing with n_group / topk_group given, YaRN mscale = mscale_all_dim = 0.707
    "v2-lite-fused-yarn": dict(model_type="deepseek_v2", fused=True, q_lora_rank=None, n_group=1, topk_group=1, topk_method="greedy",
                               rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "mscale": 0.707,
                                                "mscale_all_dim": 0.707, "rope_theta": 10000.0}),
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
    """A V3 model whose every routing key matters: bias, 4 groups of 2 with 2 kept, renormalised top-3 times 2.5; transformers' logits."""
    src = build(tmp_path_factory.mktemp("ds-grouped") / "hf", "deepseek_v3", n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    return src, hf_logits(src, IDS)


def test_v3_without_scoring_func_is_sigmoid(grouped, tmp_path):
    """The trap: transformers' DeepseekV3Config writes no scoring_func; the file still says sigmoid (and every other routing key)."""
    src, ref = grouped
    assert "scoring_func" not in json.loads((src / "config.json").read_text())
    out = convert(src, tmp_path / "m.gguf", "f32")
    md = _metadata(out)
    assert md["deepseek2.expert_gating_func"] == SIGMOID
    assert md["deepseek2.expert_weights_norm"] is True
    assert md["deepseek2.expert_weights_scale"] == pytest.approx(2.5)
    assert (md["deepseek2.expert_group_count"], md["deepseek2.expert_group_used_count"]) == (4, 2)
    assert md["deepseek2.leading_dense_block_count"] == 1 and md["deepseek2.expert_shared_count"] == 1
    assert "blk.1.exp_probs_b.bias" in {t.name for t in gguf.GGUFReader(out).tensors}
    assert_close(llama_logits(out, IDS), ref)


def _drop_key(key):
    return lambda md: {k: v for k, v in md.items() if k != f"deepseek2.{key}"}


def _set_key(key, value):
    from quantkit.format.gguf_write import MetaValue

    return lambda md: {**md, f"deepseek2.{key}": MetaValue(value, md[f"deepseek2.{key}"].vtype)}


#: each mutation of the written file: what llama.cpp then computes instead
MUTATIONS = {
    "gating softmax": _set_key("expert_gating_func", SOFTMAX),
    "gating dropped (llama.cpp's converter: softmax)": _drop_key("expert_gating_func"),
    "weights_norm dropped": _drop_key("expert_weights_norm"),
    "weights_scale dropped": _drop_key("expert_weights_scale"),
    "group counts dropped": lambda md: _drop_key("expert_group_used_count")(_drop_key("expert_group_count")(md)),
    "exp_probs_b dropped": None,
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_every_routing_key_matters(grouped, tmp_path, monkeypatch, mutation):
    """The converted file with one routing key (or the bias tensor) dropped or changed no longer matches transformers."""
    from quantkit import converters

    src, ref = grouped
    conv = converters.for_model_type("deepseek_v3")
    fn = MUTATIONS[mutation]
    if fn is not None:
        changed = dataclasses.replace(conv, metadata=lambda h: fn(conv.metadata(h)))
    else:  # the file llama.cpp's converter would write without the bias
        changed = dataclasses.replace(conv, rules=lambda names: [r for r in conv.rules(names) if "exp_probs_b" not in r.gguf],
                                      ignore=conv.ignore + (r"e_score_correction_bias$",), check=lambda h, t: None)
    monkeypatch.setitem(converters.CONVERTERS, "deepseek_v3", changed)
    out = convert(src, tmp_path / "m.gguf", "f32")
    with pytest.raises(AssertionError):
        assert_close(llama_logits(out, IDS), ref)


def test_v2_weights_scale_matters(tmp_path, monkeypatch):
    """V2: softmax is llama.cpp's fallback, but routed_scaling_factor is not: dropping expert_weights_scale breaks parity."""
    from quantkit import converters

    src = build(tmp_path / "hf", "deepseek_v2")
    ref = hf_logits(src, IDS)
    md = _metadata(convert(src, tmp_path / "a.gguf", "f32"))
    assert (md["deepseek2.expert_gating_func"], md["deepseek2.expert_weights_norm"]) == (SOFTMAX, False)
    assert md["deepseek2.expert_weights_scale"] == pytest.approx(1.5)
    conv = converters.for_model_type("deepseek_v2")
    monkeypatch.setitem(converters.CONVERTERS, "deepseek_v2", dataclasses.replace(conv, metadata=lambda h: _drop_key("expert_weights_scale")(conv.metadata(h))))
    with pytest.raises(AssertionError):
        assert_close(llama_logits(convert(src, tmp_path / "b.gguf", "f32"), IDS), ref)


# --------------------------------------------------------------------------- layout and metadata


def test_mla_tensors_and_keys(tmp_path):
    """kv_b_proj split per head into attn_k_b (transposed) and attn_v_b exactly as llama.cpp's converter does; MQA keys."""
    import torch
    from safetensors.torch import load_file

    src = build(tmp_path / "hf", "deepseek_v3", dtype="float32")
    out = convert(src, tmp_path / "m.gguf", "f32")
    r = gguf.GGUFReader(out)
    t = {x.name: x for x in r.tensors}
    kv_b = load_file(str(src / "model.safetensors"))["model.layers.1.self_attn.kv_b_proj.weight"]
    ref = kv_b.view(4, 32 + 32, 32)  # heads, nope + v, kv_lora (conversion/deepseek.py)
    k_b, v_b = torch.split(ref, [32, 32], dim=1)
    assert np.array_equal(np.asarray(t["blk.1.attn_k_b.weight"].data), k_b.transpose(1, 2).numpy())
    assert np.array_equal(np.asarray(t["blk.1.attn_v_b.weight"].data), v_b.numpy())
    assert list(t["blk.1.attn_k_b.weight"].shape) == [32, 32, 4]  # ggml order: nope, kv_lora, heads
    md = _metadata(out)
    assert md["general.architecture"] == "deepseek2"
    assert md["deepseek2.attention.head_count_kv"] == 1
    assert (md["deepseek2.attention.key_length"], md["deepseek2.attention.value_length"]) == (32 + 16, 32)
    assert (md["deepseek2.attention.key_length_mla"], md["deepseek2.attention.value_length_mla"]) == (48, 32)
    assert (md["deepseek2.attention.q_lora_rank"], md["deepseek2.attention.kv_lora_rank"]) == (48, 32)
    assert md["deepseek2.rope.dimension_count"] == 16
    assert {"blk.0.ffn_gate.weight", "blk.1.ffn_gate_exps.weight", "blk.1.ffn_gate_shexp.weight"} <= set(t)
    assert "blk.0.ffn_gate_inp.weight" not in t and "blk.1.ffn_gate.weight" not in t


def test_lite_writes_q_lora_rank_zero(tmp_path):
    """Without q_lora_rank: attn_q, and q_lora_rank = 0 (llama.cpp requires the key outside its 'lite' depths; 0 selects attn_q)."""
    src = build(tmp_path / "hf", "deepseek_v2", q_lora_rank=None)
    out = convert(src, tmp_path / "m.gguf", "f32")
    assert _metadata(out)["deepseek2.attention.q_lora_rank"] == 0
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert "blk.0.attn_q.weight" in names and not any("attn_q_a" in n for n in names)


def test_mtp_block_is_dropped(tmp_path):
    """V3's multi-token-prediction block (stored as block num_hidden_layers) is dropped: the same file as without it."""
    src = build(tmp_path / "hf", "deepseek_v3")
    a = convert(src, tmp_path / "a.gguf", "bf16")

    def add_mtp(state):
        for k in [k for k in state if k.startswith("model.layers.1.")]:
            state[k.replace("model.layers.1.", "model.layers.2.")] = state[k].clone()
        for k, shape in (("eh_proj.weight", (128, 256)), ("enorm.weight", (128,)), ("hnorm.weight", (128,)), ("shared_head.norm.weight", (128,))):
            state[f"model.layers.2.{k}"] = state["model.norm.weight"].new_ones(shape)

    _edit_state(src, add_mtp)
    assert json.loads((src / "config.json").read_text())["num_nextn_predict_layers"] == 1
    b = convert(src, tmp_path / "b.gguf", "bf16")
    assert a.read_bytes() == b.read_bytes()
    _set_config(src, num_nextn_predict_layers=0)
    (tmp_path / "r").mkdir()
    assert_convert_refused(src, tmp_path / "r", ["model.layers.2.", "num_hidden_layers = 2"])


def test_kimi_k2_is_deepseek_v3(tmp_path):
    """model_type kimi_k2 (Kimi K2's DeepSeek V3 under its own name): the same tensors and routing keys; scoring_func required."""
    src = build(tmp_path / "hf", "deepseek_v3")
    a = convert(src, tmp_path / "a.gguf", "bf16")
    _set_config(src, model_type="kimi_k2", scoring_func="sigmoid", topk_method="noaux_tc")
    b = convert(src, tmp_path / "b.gguf", "bf16")
    ta = {t.name: bytes(t.data) for t in gguf.GGUFReader(a).tensors}
    assert ta == {t.name: bytes(t.data) for t in gguf.GGUFReader(b).tensors}
    ma, mb = _metadata(a), _metadata(b)
    assert {k: v for k, v in ma.items() if k.startswith("deepseek2.")} == {k: v for k, v in mb.items() if k.startswith("deepseek2.")}
    _set_config(src, scoring_func=_DROP)
    (tmp_path / "r").mkdir()
    assert_convert_refused(src, tmp_path / "r", ["scoring_func", "is missing", "kimi_k2"])


def test_defaults_are_transformers_config_defaults():
    """The defaults assumed for keys config.json leaves out are those of transformers' config classes."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    from quantkit.converters import deepseek_v2, deepseek_v3

    for family, cls in ((deepseek_v2.FAMILY, DeepseekV2Config), (deepseek_v3.FAMILY, DeepseekV3Config)):
        config = cls()
        for key, value in family.defaults.items():
            assert getattr(config, key) == value, (cls.__name__, key)


def test_yarn_keys_for_published_configs():
    """DeepSeek-V3 (mscale = mscale_all_dim = 1, factor 40) and V2-Lite (0.707): what llama.cpp's converter writes (0.1 * mscale_all_dim)."""
    from quantkit.converters._deepseek import yarn_keys

    for m in (1.0, 0.707):
        log_mul, attn = yarn_keys({"factor": 40.0, "mscale": m, "mscale_all_dim": m})
        assert math.isclose(log_mul, m, rel_tol=1e-9) and attn == 1.0
    # mscale left out: transformers' cos/sin get g(s, 1) and the logits g(s, 1)^2 (L = 0, R = 1)
    assert yarn_keys({"factor": 40.0, "mscale_all_dim": 1.0}) == (0.0, 1.0)


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    return build(tmp_path_factory.mktemp("ds-v3") / "hf", "deepseek_v3")


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    return build(tmp_path_factory.mktemp("ds-v2") / "hf", "deepseek_v2")


@pytest.fixture(scope="module")
def v3_lite(tmp_path_factory):
    return build(tmp_path_factory.mktemp("ds-v3-lite") / "hf", "deepseek_v3", q_lora_rank=None)


def _yarn(**extra):
    return {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "mscale": 1.0, "mscale_all_dim": 1.0,
                                "rope_theta": 10000.0, **extra}}


def _drop_bias(d):
    _edit_state(d, lambda s: s.pop("model.layers.1.mlp.gate.e_score_correction_bias"))


# Each case: (model fixture, what is done to it, needles of the one-line error).  What transformers computes and llama.cpp does not.
REFUSED = {
    # V2's group-limited routing scores a group by its best expert; llama.cpp's graph by its two best (DeepSeek-V2 / V2.5 themselves)
    "v2 group_limited_greedy": ("v2", dict(topk_method="group_limited_greedy", n_group=2, topk_group=1), ["topk_method", "group_limited_greedy", "two best"]),
    "v2 norm_topk_prob": ("v2", dict(norm_topk_prob=True), ["norm_topk_prob = True", "never renormalises"]),
    "v2 topk_method unknown": ("v2", dict(topk_method="noaux_tc"), ["topk_method = 'noaux_tc'", "greedy"]),
    "v3 scoring_func softmax": ("v3", dict(scoring_func="softmax"), ["scoring_func = 'softmax'", "sigmoid"]),
    "v3 topk_method greedy": ("v3", dict(topk_method="greedy"), ["topk_method = 'greedy'", "noaux_tc"]),
    "v3 n_group not dividing": ("v3", dict(n_group=3, topk_group=1), ["n_group = 3", "groups of at least 2"]),
    "v3 topk_group > n_group": ("v3", dict(n_group=2, topk_group=3), ["topk_group = 3", "more groups"]),
    "v3 n_group null": ("v3", dict(n_group=None), ["'n_group' is null"]),
    # llama.cpp's deepseek2 loader ignores the YaRN ramp keys (Kimi K2 publishes beta_fast = beta_slow = 1)
    "yarn beta_fast": ("v3", _yarn(beta_fast=1.0, beta_slow=1.0), ["beta_fast = 1.0", "never reads"]),
    "yarn truncate": ("v3", _yarn(truncate=False), ["truncate = False"]),
    "yarn factor 1": ("v3", _yarn(factor=1.0), ["factor = 1.0", "does not scale"]),
    "rope linear": ("v3", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, ["rope_type = 'linear'", "YaRN"]),
    "kv heads": ("v3", dict(num_key_value_heads=2), ["num_key_value_heads = 2", "num_attention_heads = 4"]),
    "attention_bias": ("v3", dict(attention_bias=True), ["attention_bias = True", "no projection biases"]),
    "hidden_act": ("v2", dict(hidden_act="gelu"), ["hidden_act = 'gelu'", "SiLU"]),
    "moe_layer_freq": ("v3", dict(moe_layer_freq=2), ["moe_layer_freq = 2"]),
    "all blocks dense": ("v3", dict(first_k_dense_replace=2), ["first_k_dense_replace = 2", "every one"]),
    "dense block count wrong": ("v3", dict(first_k_dense_replace=0), ["model.layers.0.mlp.gate_proj.weight", "first_k_dense_replace = 0", "MoE block"]),
    "experts too many": ("v3", dict(n_routed_experts=2000), ["n_routed_experts = 2000", "1024"]),
    "q_lora_rank without q_a_proj": ("v3_lite", dict(q_lora_rank=48), ["q_lora_rank = 48", "has q_proj"]),
    "q_lora_rank null with q_a_proj": ("v3", dict(q_lora_rank=None), ["q_lora_rank = None", "has q_a_proj"]),
    "score bias missing": ("v3", _drop_bias, ["model.layers.1.mlp.gate.e_score_correction_bias", "missing"]),
    "kimi_k2 without scoring_func": ("v3", dict(model_type="kimi_k2"), ["scoring_func", "kimi_k2"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_one_line(request, tmp_path, case):
    which, change, needles = REFUSED[case]
    model = tmp_path / "model"
    shutil.copytree(request.getfixturevalue(which), model)
    if callable(change):
        change(model)
    else:
        _set_config(model, **change)
    assert_convert_refused(model, tmp_path, needles)


# --------------------------------------------------------------------------- the CLI on a deepseek2 file


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """A V3 model with rows k-quants take (256), its F32 GGUF and its Q4_K_M through `quantkit convert`."""
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    base = tmp_path_factory.mktemp("ds-cli")
    src = build(base / "hf", "deepseek_v3", hidden_size=256, moe_intermediate_size=256, intermediate_size=256, num_hidden_layers=3)
    r = CliRunner().invoke(app, ["convert", str(src), "-o", str(base / "q4.gguf"), "--type", "Q4_K_M"])
    assert r.exit_code == 0, r.output
    return src, convert(src, base / "f32.gguf", "f32"), base / "q4.gguf"


def test_requantised_f32_is_the_hf_q4_k_m(cli_model, tmp_path):
    """F32 GGUF -> Q4_K_M gives the very bytes of HF -> Q4_K_M (the checkpoint is BF16: F32 holds it exactly)."""
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    _, f32, q4 = cli_model
    r = CliRunner().invoke(app, ["convert", str(f32), "-o", str(tmp_path / "q4.gguf"), "--type", "Q4_K_M"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "q4.gguf").read_bytes() == q4.read_bytes()
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type) for t in gguf.GGUFReader(q4).tensors}
    assert types["blk.1.ffn_gate_exps.weight"] == gguf.GGMLQuantizationType.Q4_K
    assert types["blk.1.exp_probs_b.bias"] == types["blk.1.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32


def test_run_generates(cli_model):
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    r = CliRunner().invoke(app, ["run", str(cli_model[2]), "-p", "hi", "-n", "5", "--temperature", "0", "--ignore-eos", "--json"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout[r.stdout.index("{"):])
    assert (j["completion_tokens"], j["finish_reason"]) == (5, "length")


@pytest.mark.parametrize("base", ["gguf", "hf"])
def test_eval_kld_with_routing(cli_model, tmp_path, base):
    """KLD and routing fidelity of Q4_K_M against the F32 file and against transformers: one routing layer per MoE block (block 0 is dense)."""
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


# --------------------------------------------------------------------------- hostile config.json

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    st = None

_BASE = {
    "deepseek_v2": dict(vocab_size=3000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1, kv_lora_rank=32, q_lora_rank=48,
                        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, first_k_dense_replace=1, routed_scaling_factor=1.5,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
_BASE["deepseek_v3"] = {**_BASE["deepseek_v2"], "n_group": 2, "topk_group": 1}
_BASE["kimi_k2"] = {**_BASE["deepseek_v3"], "scoring_func": "sigmoid", "norm_topk_prob": True, "rope_interleave": True}
_KEYS = sorted({*_BASE["kimi_k2"], "topk_method", "scoring_func", "moe_layer_freq", "attention_bias", "mlp_bias", "hidden_act", "rope_interleave",
                "num_nextn_predict_layers", "norm_topk_prob", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_scaling"})

if st is not None:
    _VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10), st.sampled_from([0, 2**32, 2**40, -(2**63)]),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4), st.sampled_from(["greedy", "group_limited_greedy", "noaux_tc", "sigmoid", "softmax"]),
                        st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
    _ROPE = st.fixed_dictionaries({"rope_type": st.sampled_from(["default", "yarn", "linear", "dynamic"])},
                                  optional={k: st.one_of(_VALUES, st.floats(-3, 50)) for k in ("factor", "mscale", "mscale_all_dim", "attention_factor", "beta_fast",
                                                                                              "beta_slow", "truncate", "original_max_position_embeddings", "rope_theta")})

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(model_type=st.sampled_from(sorted(_BASE)), edits=st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=4), rope=st.one_of(st.none(), _ROPE))
    def test_hostile_config_is_refused_with_a_checkpoint_error(model_type, edits, rope):
        """Whatever config.json holds, reading it gives hyperparameters and their metadata, or a CheckpointError: nothing else escapes."""
        from quantkit.converters import for_model_type
        from quantkit.errors import CheckpointError

        conv = for_model_type(model_type)
        config = {**_BASE[model_type], **edits}
        if rope is not None:
            config["rope_parameters"] = rope
        try:
            h = conv.hparams(config)
        except CheckpointError as e:
            assert "fix:" in str(e) and "\n" not in str(e)
            return
        md = conv.metadata(h)
        assert all(math.isfinite(v.value) for v in md.values() if isinstance(v.value, float))
