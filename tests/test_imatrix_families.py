"""Importance matrices for the plug-in families (qwen3_moe, qwen2_moe, olmoe, granitemoe), as llama-imatrix collects them.

Reference: llama-imatrix built on this machine from the llama.cpp that
llama-cpp-python vendors (``tests/test_imatrix.py::local_llama_imatrix``:
``$QK_LLAMA_IMATRIX``, make setup's ``.venv/bin`` or make bench's build), run on the same F32 GGUF and text
with ``-c N -b N`` so its batches are ours: every count and every sum bit for
bit.  Skipped where no such binary exists; the structural tests run everywhere:
an entry for every ``blk.*`` weight matrix llama.cpp's graph multiplies
(attention, router, routed experts, qwen2_moe's shared expert and its gate),
per-expert counts summing to ``n_tokens * experts_used``, finite non-negative
sums, and an IQ3_XXS conversion that uses the matrix.
"""

from __future__ import annotations

import re
import subprocess

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import convert, random_model
from quantkit.cli.main import app
from quantkit.policy.imatrix import read_imatrix, write_imatrix
from quantkit.pipeline.imatrix_collect import collect_imatrix
from test_imatrix import local_llama_imatrix
from test_deepseek_v4 import BASE as DEEPSEEK_V4

CTX, CHUNKS = 64, 3  # every blk.* MUL_MAT sees 64 >= 16 tokens per decode; 192 tokens in all

#: per family: the keys that size the experts (rows/columns multiples of 256 for the routed experts so IQ3_XXS applies)
#: and the tensors llama.cpp's graph multiplies in every block beyond attention and the router
FAMILIES = {
    "qwen3_moe": (dict(hidden_size=256, moe_intermediate_size=256), ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")),
    "qwen2_moe": (dict(hidden_size=256, moe_intermediate_size=256),
                  ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp", "ffn_gate_inp_shexp")),
    "olmoe": (dict(hidden_size=256, intermediate_size=256), ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")),
    "granitemoe": (dict(hidden_size=256, intermediate_size=256), ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")),
}
ATTENTION = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp")


@pytest.fixture(scope="module")
def text():
    from quantkit.evals.corpora import heldout_text

    return heldout_text()[:20000].removesuffix("\n")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, text):
    """(model_type, HF dir, F32 GGUF, config, our imatrix) for one family."""
    model_type = request.param
    base = tmp_path_factory.mktemp(f"im-{model_type}")
    src = random_model(base / "hf", model_type, **FAMILIES[model_type][0])
    f32 = convert(src, base / "f32.gguf", "f32")
    im = collect_imatrix(f32, text, n_ctx=CTX, n_chunks=CHUNKS, threads=2, dataset="calib.txt")
    import json

    return model_type, src, f32, json.loads((src / "config.json").read_text()), im


def _gguf_matrices(path) -> set[str]:
    """The blk.* tensors of the file that are not norms or biases: what the graph multiplies activations by."""
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    return {n for n in names if n.startswith("blk.") and n.endswith(".weight") and not n.endswith("_norm.weight")}


def test_every_multiplied_weight_has_an_entry(family):
    model_type, _, f32, cfg, im = family
    n_layers, top_k = cfg["num_hidden_layers"], cfg["num_experts_per_tok"]
    n_expert = cfg.get("num_experts", cfg.get("num_local_experts"))
    expected = {f"blk.{i}.{t}.weight" for i in range(n_layers) for t in ATTENTION + FAMILIES[model_type][1]}
    assert expected <= _gguf_matrices(f32), sorted(expected - _gguf_matrices(f32))
    assert set(im.entries) == _gguf_matrices(f32) == expected
    n_tokens = CTX * CHUNKS
    assert im.n_tokens == n_tokens and im.chunk_count == CHUNKS and im.chunk_size == CTX
    for name, e in im.entries.items():
        assert np.isfinite(e.in_sum2).all() and (e.in_sum2 >= 0).all(), name
        if "_exps" in name:
            assert e.counts.shape == (n_expert,) and e.in_sum2.shape[0] == n_expert, name
            assert e.counts.sum() == n_tokens * top_k, name
            up = name.replace(re.search(r"ffn_\w+_exps", name).group(0), "ffn_up_exps")
            np.testing.assert_array_equal(e.counts, im.entries[up].counts, err_msg=name)
            seen = e.counts > 0
            assert (e.in_sum2[seen].sum(axis=1) > 0).all() and (e.in_sum2[~seen] == 0).all(), name
        else:
            assert e.counts.tolist() == [n_tokens] and e.in_sum2.shape[0] == 1, name
            assert e.in_sum2.sum() > 0, name


def test_iq3_xxs_conversion_with_the_matrix(family, tmp_path):
    _, src, _, _, im = family
    path = write_imatrix(im, tmp_path / "im.gguf")
    out = tmp_path / "x.gguf"
    result = CliRunner().invoke(app, ["convert", str(src), "-o", str(out), "--type", "IQ3_XXS", "--imatrix", str(path)])
    assert result.exit_code == 0, result.output
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type) for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == gguf.GGMLQuantizationType.IQ3_XXS


def test_bit_identical_to_a_local_llama_imatrix(family, text, tmp_path):
    """llama-imatrix on the same F32 GGUF and text, one chunk per batch: the same counts and sums, bit for bit, and the same file."""
    exe = local_llama_imatrix()
    if exe is None:
        pytest.skip("no llama-imatrix built on this machine (make setup builds one into .venv/bin; or set QK_LLAMA_IMATRIX)")
    _, _, f32, _, ours = family
    (tmp_path / "calib.txt").write_text(text, encoding="utf-8")
    r = subprocess.run([str(exe), "-m", str(f32), "-f", "calib.txt", "-c", str(CTX), "-b", str(CTX), "--chunks", str(CHUNKS), "-t", "2", "-o", "local.gguf"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = read_imatrix(tmp_path / "local.gguf")
    assert sorted(ours.entries) == sorted(theirs.entries)
    assert (ours.chunk_count, ours.chunk_size, ours.datasets) == (theirs.chunk_count, theirs.chunk_size, theirs.datasets)
    for name, e in theirs.entries.items():
        np.testing.assert_array_equal(ours.entries[name].counts, e.counts, err_msg=name)
        np.testing.assert_array_equal(ours.entries[name].in_sum2, e.in_sum2, err_msg=name)
    assert write_imatrix(ours, tmp_path / "ours.gguf").read_bytes() == (tmp_path / "local.gguf").read_bytes()


#: the families of the DeepSeek / GLM / gpt-oss / Llama 4 issues: MLA (attn_q_a / q_b / kv_a_mqa / k_b / v_b), dense-first blocks,
#: shared experts, sigmoid routing with a selection bias and groups, gpt-oss's biased router and interleaved experts, Llama 4's
#: input-weighted experts beside a shared one, GLM's nextn-free trunk; against llama-imatrix only (each graph multiplies its own set)
MORE_FAMILIES = {
    "deepseek_v3": dict(num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3),
    "glm4_moe": dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3),
    "dots1": dict(num_hidden_layers=3),
    "minimax_m2": {},
    "ernie4_5_moe": {},
    "gpt_oss": {},
    "llama4_text": {},
    "qwen3_next": dict(num_hidden_layers=4),
    # DeepSeek V4's hyper-connections, shared-KV attention with KV compressors and the lightning indexer, the grouped attn_output_a
    # (llama.cpp multiplies it as o_groups matrices: one row of o_groups x columns, as llama-imatrix records it), hash-routed blocks
    "deepseek_v4": dict(DEEPSEEK_V4),
}


@pytest.mark.parametrize("model_type", list(MORE_FAMILIES))
def test_more_families_bit_identical_to_a_local_llama_imatrix(model_type, text, tmp_path):
    """Every entry, count and sum of quantkit's matrix equal llama-imatrix's on the same F32 GGUF and text (one chunk per
    batch), and every routed-expert entry's counts sum to tokens x experts used."""
    exe = local_llama_imatrix()
    if exe is None:
        pytest.skip("no llama-imatrix built on this machine (make setup builds one into .venv/bin; or set QK_LLAMA_IMATRIX)")
    src = random_model(tmp_path / "hf", model_type, **MORE_FAMILIES[model_type])
    f32 = convert(src, tmp_path / "f32.gguf", "f32")
    ours = collect_imatrix(f32, text, n_ctx=CTX, n_chunks=CHUNKS, threads=2, dataset="calib.txt")
    (tmp_path / "calib.txt").write_text(text, encoding="utf-8")
    r = subprocess.run([str(exe), "-m", str(f32), "-f", "calib.txt", "-c", str(CTX), "-b", str(CTX), "--chunks", str(CHUNKS), "-t", "2", "-o", "local.gguf"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = read_imatrix(tmp_path / "local.gguf")
    assert sorted(ours.entries) == sorted(theirs.entries)
    assert any("_exps" in n for n in ours.entries)
    for name, e in theirs.entries.items():
        np.testing.assert_array_equal(ours.entries[name].counts, e.counts, err_msg=name)
        np.testing.assert_array_equal(ours.entries[name].in_sum2, e.in_sum2, err_msg=name)
