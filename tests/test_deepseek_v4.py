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
    (dict(quantization_config={"quant_method": "compressed-tensors"}), "quantization_config"),
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


# --------------------------------------------------------------------------- importance matrices

#: rows of 256 (k-quants and IQ3_XXS apply), 8 experts top-2, attn_output_a of 2 groups of 128 columns, an indexer that chooses
#: (top 8); chunks of 256 tokens: both compressors emit entries (ratio 4 every 4 tokens, ratio 128 twice a chunk)
IM_CONFIG = dict(hidden_size=256, moe_intermediate_size=256, intermediate_size=256, n_routed_experts=8, q_lora_rank=256, o_lora_rank=128,
                 index_n_heads=4, index_topk=8)
IM_CTX, IM_CHUNKS = 256, 3
#: the matrices llama.cpp's deepseek4 graph multiplies activations by (MUL_MAT / MUL_MAT_ID), per block kind: what an imatrix holds
IM_ALL = ("hc_attn_fn", "hc_ffn_fn", "attn_q_a", "attn_q_b", "attn_kv", "attn_output_a", "attn_output_b", "ffn_gate_inp",
          "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")
IM_COMP = ("attn_compressor_kv", "attn_compressor_gate")
IM_CSA = ("indexer_compressor_kv", "indexer_compressor_gate", "indexer.proj", "indexer.attn_q_b")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """(HF dir, its F32 GGUF, quantkit's matrix on it, the collection's warnings, the text)."""
    import logging

    from quantkit.evals.corpora import heldout_text
    from quantkit.pipeline.imatrix_collect import collect_imatrix

    base = tmp_path_factory.mktemp("v4-imatrix")
    src = build(base / "hf", **IM_CONFIG)
    f32 = convert(src, base / "f32.gguf", "f32")
    text = heldout_text()[:40000].removesuffix("\n")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("quantkit.pipeline.imatrix_collect")
    logger.addHandler(handler)
    try:
        im = collect_imatrix(f32, text, n_ctx=IM_CTX, n_chunks=IM_CHUNKS, threads=2, dataset="calib.txt")
    finally:
        logger.removeHandler(handler)
    return src, f32, im, [r.getMessage() for r in records], text


def test_imatrix_entries(calibrated):
    """An entry for every matrix the graph multiplies; attn_output_a (llama.cpp multiplies it as o_groups matrices of 128 columns)
    one row of 2 x 128 and one count, as llama-imatrix records it -- which llama-quantize refuses (the collection says so once)."""
    from quantkit.pipeline.imatrix_collect import llama_quantize_misfits

    _, f32, im, warnings, _ = calibrated
    ratios = [RATIO[t] for t in BASE["layer_types"]]
    want = {f"blk.{b}.{t}.weight" for b, r in enumerate(ratios) for t in IM_ALL + (IM_COMP if r else ()) + (IM_CSA if r == 4 else ())}
    assert set(im.entries) == want, sorted(set(im.entries) ^ want)
    n_tokens = IM_CTX * IM_CHUNKS
    for name, e in im.entries.items():
        assert np.isfinite(e.in_sum2).all() and (e.in_sum2 >= 0).all(), name
        if "_exps" in name:
            assert e.counts.shape == (8,) and e.counts.sum() == n_tokens * BASE["num_experts_per_tok"], name
        else:
            assert e.counts.tolist() == [n_tokens] and e.in_sum2.sum() > 0, name
    assert im.entries["blk.0.attn_output_a.weight"].in_sum2.shape == (1, 256)
    assert llama_quantize_misfits(im, f32) == {f"blk.{b}.attn_output_a.weight": (256, 128) for b in range(4)}
    assert len(warnings) == 1 and "attn_output_a" in warnings[0] and "--exclude-weights attn_output_a" in warnings[0], warnings


def test_imatrix_bit_identical_to_a_local_llama_imatrix(calibrated, tmp_path):
    """llama-imatrix on the same F32 GGUF and text, one chunk per batch: the same file, every count and sum bit for bit."""
    from test_imatrix import local_llama_imatrix

    from quantkit.policy.imatrix import read_imatrix, write_imatrix

    exe = local_llama_imatrix()
    if exe is None:
        pytest.skip("no llama-imatrix built on this machine (make setup builds one into .venv/bin; or set QK_LLAMA_IMATRIX)")
    _, f32, ours, _, text = calibrated
    (tmp_path / "calib.txt").write_text(text, encoding="utf-8")
    r = subprocess.run([str(exe), "-m", str(f32), "-f", "calib.txt", "-c", str(IM_CTX), "-b", str(IM_CTX), "--chunks", str(IM_CHUNKS), "-t", "2",
                        "-o", "local.gguf"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = read_imatrix(tmp_path / "local.gguf")
    assert sorted(ours.entries) == sorted(theirs.entries)
    for name, e in theirs.entries.items():
        np.testing.assert_array_equal(ours.entries[name].counts, e.counts, err_msg=name)
        np.testing.assert_array_equal(ours.entries[name].in_sum2, e.in_sum2, err_msg=name)
    assert write_imatrix(ours, tmp_path / "ours.gguf").read_bytes() == (tmp_path / "local.gguf").read_bytes()


def _llama_quantize(src: Path, out: Path, preset: str, im, overrides: dict[str, str] | None = None) -> tuple[int, str]:
    """llama.cpp's in-process quantiser (the wheel's libllama) with ``im``'s weights as quantize.cpp loads them and llama-quantize's
    ``--tensor-type`` overrides: (return code, log)."""
    import ctypes

    import llama_cpp

    from conftest import llama_quantize_imatrix, llama_quantize_run

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}")
    params.nthread = 2
    params.imatrix, keep = llama_quantize_imatrix(im)
    tt = (llama_cpp.llama_model_tensor_override * (len(overrides or {}) + 1))()
    for i, (pattern, qtype) in enumerate((overrides or {}).items()):
        tt[i].pattern, tt[i].type = pattern.encode(), int(gguf.GGMLQuantizationType[qtype.upper()])
    if overrides:
        params.tt_overrides = ctypes.cast(tt, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    return llama_quantize_run(src, out, params)


def _convert_cli(src: Path, out: Path, preset: str, imatrix: Path, *extra: str):
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    return CliRunner().invoke(app, ["convert", str(src), "-o", str(out), "--type", preset, "--imatrix", str(imatrix), "--no-progress", *extra])


@pytest.mark.parametrize("preset,overrides", [("Q4_K_M", {}), ("IQ3_XXS", {"output_hc_fn": "q8_0"})])
def test_convert_with_the_imatrix_refused_as_llama_quantize_refuses_it(calibrated, tmp_path, preset, overrides):
    """The matrix as llama-imatrix writes it: llama-quantize stops at blk.0.attn_output_a ("imatrix size 256 is different from tensor
    size 128"), and quantkit convert refuses it before writing anything, in one line naming that entry.  (IQ3_XXS: output_hc_fn
    given another type, else llama-quantize stops at it first: see the next test.)"""
    from quantkit.policy.imatrix import write_imatrix

    src, f32, im, _, _ = calibrated
    rc, log = _llama_quantize(f32, tmp_path / "llama.gguf", preset, im, overrides)
    assert rc != 0 and "imatrix size 256 is different from tensor size 128 for blk.0.attn_output_a.weight" in log
    path = write_imatrix(im, tmp_path / "im.gguf")
    (tmp_path / "out").mkdir()
    extra = [a for p, t in overrides.items() for a in ("--tensor-type", f"{p}={t}")]
    result = _convert_cli(src, tmp_path / "out" / "m.gguf", preset, path, *extra)
    msg = result.output.strip()
    assert result.exit_code == 1 and msg.startswith("error:") and len(msg.splitlines()) == 1, msg
    assert "'blk.0.attn_output_a.weight' has 1 x 256" in msg and "needs 1 x 128" in msg and "fix:" in msg, msg
    assert "2 matrices" in msg and "--imatrix-exclude attn_output_a" in msg and "another model" not in msg.split("fix:")[0], msg
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("preset,overrides", [
    ("Q4_K_M", {}),
    # output_hc_fn (hc_head_fn, not blk.*: no imatrix has an entry for it) needs importance weights in IQ3_XXS: another type for it
    ("IQ3_XXS", {"output_hc_fn": "q8_0"}),
])
def test_convert_without_the_grouped_entries_equals_llama_quantize(calibrated, tmp_path, preset, overrides):
    """Without the attn_output_a entries (quantkit's --imatrix-exclude attn_output_a, llama-quantize's --exclude-weights): every tensor
    bit for bit llama-quantize's with the same matrix (attn_output_a then quantised without importance weights by both); and
    IQ3_XXS without a type for output_hc_fn refused by both."""
    from quantkit.policy.imatrix import write_imatrix

    src, f32, im, _, _ = calibrated
    kept = dataclasses.replace(im, entries={n: e for n, e in im.entries.items() if "attn_output_a" not in n})  # what --exclude-weights leaves
    path = write_imatrix(im, tmp_path / "all.gguf")
    rc, log = _llama_quantize(f32, tmp_path / "llama.gguf", preset, kept, overrides)
    assert rc == 0, log[-2000:]
    extra = [a for p, t in overrides.items() for a in ("--tensor-type", f"{p}={t}")]
    result = _convert_cli(src, tmp_path / "ours.gguf", preset, path, "--imatrix-exclude", "attn_output_a", *extra)
    assert result.exit_code == 0, result.output
    ours, theirs = _tensors(tmp_path / "ours.gguf"), _tensors(tmp_path / "llama.gguf")
    assert ours.keys() == theirs.keys()
    assert [n for n in ours if ours[n] != theirs[n]] == []
    if preset == "IQ3_XXS":
        assert ours["blk.0.ffn_gate_exps.weight"][0] == gguf.GGMLQuantizationType.IQ3_XXS
        rc, log = _llama_quantize(f32, tmp_path / "bare.gguf", preset, kept)
        assert rc != 0 and "Missing importance matrix for tensor output_hc_fn.weight" in log
        (tmp_path / "out").mkdir()
        result = _convert_cli(src, tmp_path / "out" / "m.gguf", preset, path, "--imatrix-exclude", "attn_output_a")
        assert result.exit_code == 1 and "'output_hc_fn.weight'" in result.output and list((tmp_path / "out").iterdir()) == [], result.output
        assert "--tensor-type output_hc_fn=q8_0" in result.output, result.output


# --------------------------------------------------------------------------- the published quantised layout

#: DeepSeek V4's release: FP8 e4m3 linear weights with a UE8M0 .scale per 128x128 block, routed experts FP4 (e2m1, I8 two a byte)
#: with a UE8M0 .scale per 32 values of a row; expert_dtype beside quantization_config, as V4's config.json holds it
V4_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
FP8_LEAVES = ("attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_a.weight", "attn.wo_b.weight", "ffn.shared_experts.w1.weight",
              "ffn.shared_experts.w2.weight", "ffn.shared_experts.w3.weight", "attn.compressor.wkv.weight", "attn.compressor.wgate.weight",
              "attn.indexer.wq_b.weight", "attn.indexer.compressor.wkv.weight", "attn.indexer.compressor.wgate.weight")
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _fp8_blocks(w):
    """(e4m3 [r, c], UE8M0 scales [ceil(r/128), ceil(c/128)], the values they hold) -- a power-of-two scale per block, as V4's
    release (scale_fmt ue8m0); the last blocks partial."""
    import torch

    r, c = w.shape
    R, C = -(-r // 128), -(-c // 128)
    pad = torch.zeros(R * 128, C * 128)
    pad[:r, :c] = w.float()
    amax = pad.view(R, 128, C, 128).abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
    full = scale.repeat_interleave(128, 0)[:r].repeat_interleave(128, 1)[:, :c]
    q = (w.float() / full).to(torch.float8_e4m3fn)
    return q, scale.to(torch.float8_e8m0fnu), q.float() * full


def _fp4_groups(w):
    """(I8 [r, c/2]: value 2j in the low nibble of byte j, UE8M0 scales [r, c/32], the values they hold) -- V4's FP4 experts."""
    import torch

    r, c = w.shape
    grid = torch.tensor(E2M1_VALUES)
    g = w.float().view(r, c // 32, 32)
    scale = torch.exp2(torch.ceil(torch.log2(g.abs().amax(-1).clamp(min=1e-12) / 6.0)))
    codes = ((g / scale[..., None])[..., None] - grid).abs().argmin(-1).view(r, c)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed, scale.to(torch.float8_e8m0fnu), (grid[codes].view(r, c // 32, 32) * scale[..., None]).view(r, c)


def quantised(pub: Path, dst: Path, twin: Path) -> tuple[Path, Path]:
    """``pub`` (published layout) stored as DeepSeek releases V4 (FP8 / FP4 with .scale tensors) in ``dst``, and its BF16 twin --
    the very values the quantised file holds -- in ``twin``."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(pub / "model.safetensors"))
    q_state, twin_state = dict(state), dict(state)
    for k, v in state.items():
        leaf = k.split(".", 2)[2] if k.startswith("layers.") else ""
        if leaf in FP8_LEAVES or ".ffn.experts." in k:
            q, s, values = (_fp4_groups if ".ffn.experts." in k else _fp8_blocks)(v)
            q_state[k], q_state[k.removesuffix(".weight") + ".scale"] = q, s
            twin_state[k] = values.to(torch.bfloat16)
            assert torch.equal(twin_state[k].float(), values), k  # exact in BF16
    for path, st, qc in ((dst, q_state, True), (twin, twin_state, False)):
        path.mkdir()
        save_file(st, str(path / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((pub / "config.json").read_text())
        if qc:
            cfg["quantization_config"], cfg["expert_dtype"] = V4_QUANT, "fp4"
        (path / "config.json").write_text(json.dumps(cfg))
        for f in pub.iterdir():
            if f.suffix != ".safetensors" and f.name != "config.json":
                shutil.copy(f, path / f.name)
    return dst, twin


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(the quantised published checkpoint, its BF16 twin): rows of 256 (full 128x128 blocks), experts of 256 x 256."""
    base = tmp_path_factory.mktemp("v4-release")
    pub = published(build(base / "hf", **IM_CONFIG), base / "pub")
    return quantised(pub, base / "q", base / "twin")


def test_release_decoded_equals_its_bf16_twin(released, tmp_path):
    """Every weight decoded (--allow-requantize: the FP4 experts too) to F32: the file converted from the BF16 twin, tensor for tensor."""
    from quantkit.pipeline.convert import convert as do_convert

    q, twin = released
    a = do_convert(q, tmp_path / "q.gguf", "f32", allow_requantize=True).output
    assert _tensors(a) == _tensors(convert(twin, tmp_path / "twin.gguf", "f32"))


def test_release_experts_carried_as_mxfp4(released, tmp_path):
    """By default the FP4 experts are written as stored, GGUF MXFP4 (bytes repacked, no value changed: they decode to the twin's), every
    other tensor as from the twin; the plan says so."""
    q, twin = released
    ours, ref = _tensors(convert(q, tmp_path / "q.gguf", "f32")), _tensors(convert(twin, tmp_path / "twin.gguf", "f32"))
    assert ours.keys() == ref.keys()
    experts = {n for n in ours if "_exps." in n}
    assert len(experts) == 12 and all(ours[n][0] == gguf.GGMLQuantizationType.MXFP4 for n in experts)
    assert {n: ours[n] for n in ours if n not in experts} == {n: ref[n] for n in ref if n not in experts}
    for n in experts:
        values = gguf.quants.dequantize(np.frombuffer(ours[n][2], np.uint8).reshape(ours[n][1][::-1][:-1] + (-1,)), gguf.GGMLQuantizationType.MXFP4)
        assert np.array_equal(values.reshape(-1), np.frombuffer(ref[n][2], np.float32)), n


_RELEASE_DRIVER = """
import runpy, sys
root = sys.argv[1]
sys.argv = [root + "/convert_hf_to_gguf.py"] + sys.argv[2:]
sys.path[:0] = [root, root + "/gguf-py"]
import conversion.deepseek as dsk
dsk.DeepseekV4Model.set_vocab = lambda self: self._set_vocab_sentencepiece()
runpy.run_path(root + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def test_release_equals_vendored_converter(released, tmp_path):
    """llama.cpp's converter on the same release: the experts it repacks to MXFP4 and the FP8 weights it dequantises and writes Q8_0
    are ours at --type q8_0, byte for byte; its BF16 / F32 tensors ours at --type bf16."""
    q, _ = released
    root = vendored_llama_cpp("conversion")
    r = subprocess.run([sys.executable, "-c", _RELEASE_DRIVER, root, str(q), "--outtype", "bf16", "--outfile", str(tmp_path / "ref.gguf")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = _tensors(tmp_path / "ref.gguf")
    q8, bf16 = _tensors(convert(q, tmp_path / "q8.gguf", "q8_0")), _tensors(convert(q, tmp_path / "bf16.gguf", "bf16"))
    assert ref.keys() == q8.keys()
    Q = gguf.GGMLQuantizationType
    by_type = {t: sorted(n for n in ref if ref[n][0] == t) for t in {v[0] for v in ref.values()}}
    assert len(by_type[Q.MXFP4]) == 12 and len(by_type[Q.Q8_0]) > 13
    for n, (t, shape, data) in ref.items():
        if t in (Q.MXFP4, Q.Q8_0):
            assert q8[n] == (t, shape, data), (n, Q(t).name, Q(q8[n][0]).name)
        else:  # the same values (quantkit keeps the router F32 whatever the type, llama.cpp's converter a BF16 one BF16)
            assert bf16[n][1] == shape and np.array_equal(_values(bf16[n]), _values(ref[n])), n


def _values(t: tuple[int, tuple[int, ...], bytes]) -> np.ndarray:
    if t[0] == gguf.GGMLQuantizationType.BF16:
        return (np.frombuffer(t[2], np.uint16).astype(np.uint32) << 16).view(np.float32)
    if t[0] == gguf.GGMLQuantizationType.I32:
        return np.frombuffer(t[2], np.int32)
    assert t[0] == gguf.GGMLQuantizationType.F32, t[0]
    return np.frombuffer(t[2], np.float32)


def _edited(src: Path, dst: Path, edit, config_edit=None) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config_edit is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config_edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


W1 = "layers.2.ffn.experts.3.w1"


@pytest.mark.parametrize("case,needles", [
    # an FP4 expert whose scales are not one per 32 values of a row
    ("fp4-scale-shape", [W1 + ".weight", W1 + ".scale", "[256, 8]", "fix:"]),
    # FP4-packed experts in a checkpoint whose config does not say expert_dtype "fp4"
    ("no-expert-dtype", ["layers.0.ffn.experts.0.w1.weight", "is I8", "expert_dtype is not 'fp4'", "fix:"]),
    # an FP8 weight without its scale
    ("fp8-scale-missing", ["layers.0.attn.wq_a.weight", "layers.0.attn.wq_a.scale", "is missing"]),
])
def test_release_damage_refused(released, tmp_path, case, needles):
    def edit(state):
        if case == "fp4-scale-shape":
            state[W1 + ".scale"] = state[W1 + ".scale"][:, :4].contiguous()
        elif case == "fp8-scale-missing":
            del state["layers.0.attn.wq_a.scale"]

    cfg_edit = (lambda cfg: cfg.pop("expert_dtype")) if case == "no-expert-dtype" else None
    bad = _edited(released[0], tmp_path / "bad", edit, cfg_edit)
    if case == "fp4-scale-shape":
        needles = [n.replace("[256, 8]", "[256, 4]") for n in needles]
    assert_convert_refused(bad, tmp_path, needles)


def test_quantised_transformers_layout_refused(tmp_path, base):
    """FP8 weights in transformers' save_pretrained names: one line saying the published layout is read quantised."""
    src, _ = base

    def edit(state):
        k = "model.layers.0.attn.wq_a.weight"
        q, s, _ = _fp8_blocks(state[k])
        state[k], state[k.removesuffix(".weight") + ".scale"] = q, s

    bad = _edited(src, tmp_path / "bad", edit, lambda cfg: cfg.update(quantization_config=V4_QUANT))
    assert_convert_refused(bad, tmp_path, ["published layout", "fix:"])
