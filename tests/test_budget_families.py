"""Bit budgets on every expert layout: fused 3-D experts, per-expert 2-D sources stacked into one GGUF tensor,
MLA, shared experts, linear attention, interleaved gate/up.  The budget samples each tensor's errors on the rows
the converter writes, so a family whose GGUF tensor is assembled from differently shaped sources must still give
a file of the requested size that llama.cpp runs."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from conftest import llama_logits, random_model
from quantkit.pipeline.convert import convert
from quantkit.policy.plan import Target

Q = gguf.GGMLQuantizationType
BPW = 6.5  # inside every family's range at these sizes (rows of 64..256: the cheapest types differ per family)

CASES = [
    ("deepseek_v3", False, dict(num_hidden_layers=3, first_k_dense_replace=1)),
    ("deepseek_v3", True, dict(num_hidden_layers=3, first_k_dense_replace=1)),
    ("qwen2_moe", False, {}),
    ("qwen3_moe", True, {}),
    ("gpt_oss", False, {}),
    ("minimax_m2", False, {}),
]


@pytest.mark.parametrize("model_type,fused,cfg", CASES, ids=[f"{m}-{'fused' if f else 'per-expert'}" for m, f, _ in CASES])
def test_budget_on_each_family_lands_and_runs(tmp_path, model_type, fused, cfg):
    src = random_model(tmp_path / "hf", model_type, fused=fused, **cfg)
    out = tmp_path / "b.gguf"
    r = convert(src, out, target=Target(bpw=BPW))
    tensors = gguf.GGUFReader(out).tensors
    got = 8 * sum(int(t.n_bytes) for t in tensors) / r.n_params
    assert BPW * 0.98 <= got <= BPW, got
    types = {t.name: Q(t.tensor_type) for t in tensors}
    assert all(q == Q.F32 for n, q in types.items() if "ffn_gate_inp" in n or n.endswith("norm.weight"))
    assert len({q for q in types.values() if q not in (Q.F32, Q.F16, Q.BF16)}) >= 2  # a mix of quantised types
    logits = llama_logits(out, [1, 5, 17, 200, 33, 7, 999, 12])
    assert np.isfinite(logits).all() and logits.std() > 0
