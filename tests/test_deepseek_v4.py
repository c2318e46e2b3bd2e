"""DeepSeek V4 (``deepseek_v4`` -> GGUF ``deepseek4``): logits parity with transformers over a prompt long enough for both
KV compressors (ratio 4 with its lightning indexer, ratio 128), the three checkpoint layouts, tensor / key equality with the
vendored llama.cpp converter, routing keys that matter, and one-line refusals of what llama.cpp cannot compute or load.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import assert_convert_refused, convert, hf_logits, llama_logits, random_model, vendored_llama_cpp
from test_logits_parity import assert_close

#: 300 tokens: 75 ratio-4 windows and two ratio-128 windows
IDS = [1] + np.random.default_rng(1).integers(3, 2999, size=299).tolist()
#: 4 blocks: sliding / compressed-sparse / heavily-compressed / compressed-sparse; 4 experts top-2 + the shared one, hc_mult 4
#: (llama.cpp's only), heads of 64 with 16 rotary dimensions, a window of 8 (far shorter than the prompt), 2 output groups,
#: an indexer of 2 heads of 64 (llama.cpp's Hadamard product: powers of two from 64) keeping 128 entries (all 75 here:
#: test_indexer_selection_matches_transformers makes it choose), two hash-routed blocks then two score-routed ones
BASE = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=64, q_lora_rank=32,
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=32, n_shared_experts=1,
            layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention", "compressed_sparse_attention"],
            mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"], sliding_window=8, o_groups=2, o_lora_rank=16, index_n_heads=2,
            index_head_dim=64, index_topk=128, hc_mult=4, num_nextn_predict_layers=0, partial_rotary_factor=0.25, routed_scaling_factor=1.5)
RATIO = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 128}


#: a seed whose routers have no near-tie that llama.cpp's F16 KV cache moves across (such a flip of one expert choice shows as
#: a jump of ~0.1 in the logits from that token on; with an F32 cache the same files give transformers' logits within 5e-7)
SEED = 1


def build(path: Path, seed: int = SEED, **overrides) -> Path:
    return set_buffers(random_model(path, "deepseek_v4", seed=seed, **{**BASE, **overrides}), seed)


def set_buffers(src: Path, seed: int) -> Path:
    """The buffers random_model leaves at their initial zeros: selection biases (``gate.bias`` / ``e_score_correction_bias``) of
    the size of the score differences, and hash tables (``tid2eid``) of distinct random experts per token."""
    import torch
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    state = load_file(str(src / "model.safetensors"))
    for k, v in state.items():
        if k.endswith(("gate.bias", "e_score_correction_bias")):
            state[k] = (0.3 * torch.randn(v.shape, generator=g)).to(v.dtype)
        elif k.endswith("tid2eid"):
            n_expert = json.loads((src / "config.json").read_text())["n_routed_experts"]
            state[k] = torch.stack([torch.randperm(n_expert, generator=g)[: v.shape[1]] for _ in range(v.shape[0])]).to(v.dtype)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


def published(src: Path, dst: Path) -> Path:
    """A save_pretrained checkpoint in DeepSeek's published layout: ``embed.weight``, ``layers.N.attn.kv_norm.weight``, ``hc_head_fn`` ...,
    and config.json's legacy keys (``compress_ratios`` with the MTP placeholder, ``num_hash_layers``) as the published configs hold them."""
    from safetensors.torch import load_file, save_file

    root = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight", "model.hc_head.hc_fn": "hc_head_fn",
            "model.hc_head.hc_base": "hc_head_base", "model.hc_head.hc_scale": "hc_head_scale"}
    import torch

    state = load_file(str(src / "model.safetensors"))
    out = {root.get(k, k.removeprefix("model.").replace(".attn.norm.", ".attn.kv_norm.")): v for k, v in state.items()}
    for k in [k for k in out if k.endswith(".ffn.gate.tid2eid")]:  # published hash-routed blocks also hold a selection bias nothing reads
        out[k.replace(".tid2eid", ".bias")] = torch.randn(out[k.replace(".tid2eid", ".weight")].shape[0]).to(out[k.replace(".tid2eid", ".weight")].dtype)
    n_embd = out["embed.weight"].shape[1]  # and a multi-token-prediction block (left out, as llama.cpp's converter leaves it out)
    out["mtp.0.e_proj.weight"] = torch.zeros(n_embd, n_embd, dtype=out["embed.weight"].dtype)
    out["mtp.0.hc_head_fn"] = torch.zeros_like(out["hc_head_fn"])
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["compress_ratios"] = [RATIO[t] for t in cfg.pop("layer_types")] + [0]
    cfg["num_hash_layers"] = cfg.pop("mlp_layer_types").count("hash_moe")
    del cfg["compress_rates"], cfg["rope_parameters"]
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, dst / f.name)
    return dst


def _tensors(path: Path) -> dict[str, tuple[int, tuple[int, ...], bytes]]:
    return {t.name: (int(t.tensor_type), tuple(int(x) for x in t.shape), bytes(t.data)) for t in gguf.GGUFReader(path).tensors}


def _metadata(path: Path) -> dict[str, object]:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k.startswith("deepseek4.")}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """The BASE model in transformers' save_pretrained layout and its float32 logits, built once for the tests that only read it."""
    src = build(tmp_path_factory.mktemp("v4") / "hf")
    return src, hf_logits(src, IDS)


# --------------------------------------------------------------------------- logits parity

def test_saved_layout_matches_transformers(tmp_path, base):
    """transformers' save_pretrained layout (model.layers.N.attn.wq_a ..., per-expert w1/w2/w3)."""
    src, ref = base
    assert_close(llama_logits(convert(src, tmp_path / "m.gguf", "f32"), IDS), ref)


CASES = {
    # transformers' own names, fused experts; another window, top-3 of 4, unscaled weights, 8 Sinkhorn iterations; norm_topk_prob false
    # and n_shared_experts 2, which transformers' V4 ignores (it always renormalises and builds one shared MLP): written as it computes
    "fused": dict(fused=True, sliding_window=16, num_experts_per_tok=3, routed_scaling_factor=1.0, hc_sinkhorn_iters=8, norm_topk_prob=False,
                  n_shared_experts=2),
    # rope bases of their own: sliding blocks rope_theta, compressed blocks (and their compressors and indexer) compress_rope_theta
    "thetas": dict(rope_theta=5000.0, compress_rope_theta=40000.0),
    # compressed blocks with YaRN (as published: factor 16, betas 32 / 1; transformers leaves cos/sin unscaled), tied embeddings
    "yarn-tied": dict(tie_word_embeddings=True, rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 64,
                                                                  "beta_fast": 32.0, "beta_slow": 1.0}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    src = build(tmp_path / "hf", **CASES[case])
    out = convert(src, tmp_path / "m.gguf", "f32")
    assert_close(llama_logits(out, IDS), hf_logits(src, IDS))


def test_published_layout_gives_the_same_file(tmp_path, base):
    """DeepSeek's published names and legacy config keys: the same tensors and keys as transformers' save_pretrained layout
    (which transformers loads to the same model: test_tensors_and_keys_equal_vendored_converter reads this layout)."""
    src, _ = base
    pub = published(src, tmp_path / "pub")
    a, b = convert(src, tmp_path / "a.gguf", "f32"), convert(pub, tmp_path / "b.gguf", "f32")
    assert _tensors(a) == _tensors(b)
    md_a, md_b = _metadata(a), _metadata(b)
    assert md_b.pop("deepseek4.attention.compress_ratios") == [0, 4, 128, 4, 0]  # config.json's list, MTP placeholder included
    assert md_a.pop("deepseek4.attention.compress_ratios") == [0, 4, 128, 4]
    assert md_a == md_b


# --------------------------------------------------------------------------- the vendored converter

_DRIVER = """
import runpy, sys
root = sys.argv[1]
sys.argv = [root + "/convert_hf_to_gguf.py"] + sys.argv[2:]
sys.path[:0] = [root, root + "/gguf-py"]
import torch
import conversion.deepseek as dsk
from conversion.base import LazyTorchTensor
M = dsk.DeepseekV4Model
M.set_vocab = lambda self: self._set_vocab_sentencepiece()
def stacked(self, bid, proj, key):  # its converter repacks FP4 experts to MXFP4 only: stack float ones as they are
    names = [f"layers.{bid}.ffn.experts.{e}.{proj}.weight" for e in range(self.hparams["n_routed_experts"])]
    data = torch.stack([LazyTorchTensor.to_eager(self.model_tensors[n]()) for n in names]).float().numpy()
    self.gguf_writer.add_tensor(self.format_tensor_name(key, bid), data)
    return names
M._write_mxfp4_expert_tensor = stacked
runpy.run_path(root + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def test_tensors_and_keys_equal_vendored_converter(tmp_path):
    """An F32 checkpoint in the published layout (what llama.cpp's converter reads; it keeps F32 sources F32): the same tensors
    bit for bit and the same deepseek4.* keys (compress_ratios with config.json's MTP placeholder included)."""
    pub = published(build(tmp_path / "hf", dtype="float32"), tmp_path / "pub")
    ours = convert(pub, tmp_path / "ours.gguf", "f32")
    root = vendored_llama_cpp("conversion")
    r = subprocess.run([sys.executable, "-c", _DRIVER, root, str(pub), "--outtype", "f32", "--outfile", str(tmp_path / "ref.gguf")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _tensors(ours) == _tensors(tmp_path / "ref.gguf")
    md, ref = _metadata(ours), _metadata(tmp_path / "ref.gguf")
    assert md == ref, {k for k in md.keys() | ref.keys() if md.get(k) != ref.get(k)}
    assert md["deepseek4.expert_gating_func"] == 4 and md["deepseek4.attention.compress_ratios"] == [0, 4, 128, 4, 0]


# --------------------------------------------------------------------------- routing keys

def _with_metadata(monkeypatch, edit):
    from quantkit import converters

    conv = converters.for_model_type("deepseek_v4")

    def md(h):
        out = dict(conv.metadata(h))
        edit(out)
        return out

    monkeypatch.setitem(converters.CONVERTERS, "deepseek_v4", dataclasses.replace(conv, metadata=md))


def _set(key, value, vtype):
    from quantkit.format.gguf_write import MetaValue

    def edit(md):
        md[key] = MetaValue(value, vtype)

    return edit


def _drop(key):
    return lambda md: md.pop(key)


V = gguf.GGUFValueType
MUTATIONS = {
    # what config.json says (norm_topk_prob false) instead of what transformers' router computes (always renormalised)
    "weights-norm-false": _set("deepseek4.expert_weights_norm", False, V.BOOL),
    "weights-scale-dropped": _drop("deepseek4.expert_weights_scale"),
    "sigmoid-scoring": _set("deepseek4.expert_gating_func", 2, V.UINT32),  # llama.cpp refuses anything but sqrt(softplus)
    "scoring-dropped": _drop("deepseek4.expert_gating_func"),
    "hash-layers-dropped": _drop("deepseek4.hash_layer_count"),
    "hash-layers-zero": _set("deepseek4.hash_layer_count", 0, V.UINT32),  # blocks 0-1 then select by score (and have no exp_probs_b)
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_every_routing_key_matters(tmp_path, monkeypatch, base, mutation):
    """The file without a routing key (or with config.json's norm_topk_prob) computes another model, or does not load."""
    src, ref = base
    _with_metadata(monkeypatch, MUTATIONS[mutation])
    out = convert(src, tmp_path / "m.gguf", "f32")
    try:
        got = llama_logits(out, IDS)
    except ValueError:  # llama.cpp refused to load it
        return
    with pytest.raises(AssertionError):
        assert_close(got, ref)


def test_hash_tables_written_as_i32(tmp_path, base):
    """The hash-routed blocks' tid2eid tables, I64 in the checkpoint: I32 ffn_gate_tid2eid [experts per token, vocab] with the same
    ids, whatever the type (q8_0 here); the score-routed blocks' selection biases as exp_probs_b; none in hash-routed blocks."""
    from safetensors import safe_open

    src, _ = base
    out = convert(src, tmp_path / "m.gguf", "q8_0")
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    with safe_open(str(src / "model.safetensors"), "np") as f:
        for b in (0, 1):
            t = tensors[f"blk.{b}.ffn_gate_tid2eid.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.I32 and [int(x) for x in t.shape] == [2, 3000]
            assert np.array_equal(np.asarray(t.data).reshape(3000, 2), f.get_tensor(f"model.layers.{b}.ffn.gate.tid2eid"))
    assert sorted(n for n in tensors if "exp_probs_b" in n) == ["blk.2.exp_probs_b.bias", "blk.3.exp_probs_b.bias"]
    assert _metadata(out)["deepseek4.hash_layer_count"] == 2


def test_requantised_f32_gguf_equals_direct_conversion(tmp_path, base):
    """The F32 file (its I32 hash tables included) requantised to Q4_K_M: byte for byte the direct conversion (the file passes the
    checks run / chat / eval make before llama.cpp loads it)."""
    src, _ = base
    f32 = convert(src, tmp_path / "f32.gguf", "f32")
    assert convert(f32, tmp_path / "a.gguf", "Q4_K_M").read_bytes() == convert(src, tmp_path / "b.gguf", "Q4_K_M").read_bytes()


def test_hash_table_out_of_range_refused(tmp_path):
    """An expert id past n_routed_experts (llama.cpp indexes with it unchecked): one error line at write time, nothing left behind."""
    from safetensors.torch import load_file, save_file

    src = build(tmp_path / "hf")
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.1.ffn.gate.tid2eid"][7, 1] = 4
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert_convert_refused(src, tmp_path, ["model.layers.1.ffn.gate.tid2eid", "integer table", "0..3", "n_expert"])


# --------------------------------------------------------------------------- the indexer's choice

def llama_logits_f32_cache(path: Path, ids: list[int], n_ctx: int = 512) -> np.ndarray:
    """conftest.llama_logits with an F32 KV cache: no F16 rounding of cached keys to move a near-tie of the indexer's top-k."""
    from llama_cpp import GGML_TYPE_F32, Llama

    llm = Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, n_batch=n_ctx, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def test_indexer_selection_matches_transformers(tmp_path):
    """index_topk 8 of up to 75 ratio-4 entries: the lightning indexer chooses from token 35 on, and llama.cpp's choice is
    transformers' (16 indexer heads: with 2, ReLU leaves many entries at exactly 0 and the two top-k's break those ties
    differently; with the default F16 cache, rounded keys can move a near-tie: measured 2e-2 .. 6e-2 on such seeds, 4e-7 here)."""
    src = build(tmp_path / "hf", index_topk=8, index_n_heads=16)
    assert_close(llama_logits_f32_cache(convert(src, tmp_path / "m.gguf", "f32"), IDS), hf_logits(src, IDS), rel=1e-5)


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("edits,needles", [
    (dict(hc_mult=2), ["hc_mult", "4"]),
    (dict(layer_types=["sliding_attention", "compressed_sparse_attention", "sliding_attention", "compressed_sparse_attention"]),
     ["layer_types", "heavily_compressed_attention"]),
    (dict(compress_rates={"compressed_sparse_attention": 8, "heavily_compressed_attention": 128}), ["compress_rates", "4:1"]),
    (dict(index_head_dim=32), ["index_head_dim"]),
])
def test_refused_with_one_line(tmp_path, edits, needles):
    src = build(tmp_path / "hf", **edits)
    assert_convert_refused(src, tmp_path, needles)


@pytest.mark.parametrize("edits,needle", [
    (dict(scoring_func="sigmoid"), "scoring_func"),
    (dict(quantization_config={"quant_method": "fp8", "scale_fmt": "ue8m0"}), "quantization_config"),
    (dict(mlp_layer_types=["moe", "hash_moe", "moe", "moe"]), "mlp_layer_types"),
    (dict(o_groups=3), "o_groups"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"main": {"rope_type": "yarn", "factor": 2.0}, "compress": {"rope_type": "default"}}), "rope_parameters.main"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": 1.2}), "attention_factor"),
    (dict(compress_ratios=[0, 4, 64, 4]), "compress_ratios"),
])
def test_config_refused(edits, needle):
    from quantkit.converters import for_model_type
    from quantkit.errors import CheckpointError

    config = {"vocab_size": 3000, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, **BASE, **edits}
    if "compress_ratios" in edits:
        del config["layer_types"]
    with pytest.raises(CheckpointError) as e:
        for_model_type("deepseek_v4").hparams(config)
    msg = str(e.value)
    assert needle in msg and "fix:" in msg and "\n" not in msg, msg


HOSTILE = (None, -1, 0, 3, "x", 1.5, float("nan"), [], {}, True, 2**40, ["compressed_sparse_attention"], {"main": {}, "compress": []})
KEYS = (*BASE, "vocab_size", "max_position_embeddings", "rms_norm_eps", "scoring_func", "swiglu_limit", "hc_sinkhorn_iters", "hc_eps",
        "compress_rope_theta", "rope_theta", "rope_parameters", "rope_scaling", "compress_rates", "compress_ratios", "num_hash_layers",
        "qk_rope_head_dim", "quantization_config", "tie_word_embeddings", "mlp_bias", "hidden_act")


@pytest.mark.parametrize("key", KEYS)
def test_hostile_config_values_give_one_line_errors(key):
    """Every value of every key read: accepted, or one CheckpointError line with a fix (never another exception)."""
    from quantkit.converters import for_model_type
    from quantkit.errors import CheckpointError

    hparams = for_model_type("deepseek_v4").hparams
    for value in HOSTILE:
        config = {"vocab_size": 3000, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, **BASE, key: value}
        try:
            hparams(config)
        except CheckpointError as e:
            assert "fix:" in str(e) and "\n" not in str(e), (key, value, str(e))
