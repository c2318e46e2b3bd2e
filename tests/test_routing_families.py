"""Routing fidelity works for every MoE family, with a GGUF base and with the Hugging Face directory as base.

The router logits come from llama.cpp's eval callback (``ffn_moe_logits-N``) for GGUF models and from
transformers' ``output_router_logits`` for an HF base: both must be found for every MoE block of every
family, with the family's own expert count and top-k (a family whose router went uncaptured would report
no routing section: a wrong result, not an error).  The same weights in both engines route the same way.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import convert, random_model
from quantkit.cli.main import app

#: each family with the config keys that name its expert count and top-k
FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=6, num_experts_per_tok=3),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_routing_is_captured_for_every_block(tmp_path, family):
    spec = FAMILIES[family]
    src = random_model(tmp_path / "hf", family, num_hidden_layers=3, dtype="float32", **spec)
    f32 = convert(src, tmp_path / "f32.gguf", "f32")
    q = convert(src, tmp_path / "q.gguf", "q8_0")
    k = spec["num_experts_per_tok"]
    reports = {}
    for name, base in (("gguf", f32), ("hf", src)):
        r = CliRunner().invoke(app, ["eval", "kld", str(base), str(q), "--corpus", "heldout", "--ctx", "64", "--chunks", "2",
                                     "--threads", "2", "--cache-dir", str(tmp_path / f"cache-{name}"), "--json", "-", "--no-progress"])
        assert r.exit_code == 0, r.output
        reports[name] = json.loads(r.stdout[r.stdout.index("{"):])
    for name, rep in reports.items():
        routing = rep.get("routing")
        assert routing is not None, f"{family} ({name} base): no routing section"
        assert routing["k"] == k and len(routing["layers"]) == 3, (name, routing["k"], len(routing["layers"]))
        n_experts = len(routing["layers"][0]["load_base"])
        assert n_experts == spec.get("num_experts", spec.get("num_local_experts"))
        # Q8_0 of the same weights: the routes agree almost everywhere, whichever engine is the base
        assert routing["topk_jaccard"] > 0.85, (name, routing["topk_jaccard"])
    # llama.cpp (F32) and transformers (float32) as bases: the same routes for the same weights
    assert abs(reports["gguf"]["routing"]["topk_jaccard"] - reports["hf"]["routing"]["topk_jaccard"]) < 0.05
