"""Quantised fixtures: routers and norms untouched in every output, perplexity ordered by bits, text still sensible.

Perplexity is llama-perplexity's number (proven equal in test_eval) on the
held-out plays; every variant is scored on exactly the same tokens, and
quantisation is deterministic, so the order is a property of the files, not
of noise.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from conftest import FIXTURE
from quantkit.pipeline.convert import convert
from quantkit.policy.plan import Override, Target
from quantkit.policy.recipe import load_recipe

Q = gguf.GGMLQuantizationType
LADDER = ("Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K")


@pytest.fixture(scope="module")
def quantised(tmp_path_factory):
    d = tmp_path_factory.mktemp("quantised")
    return {ty: convert(FIXTURE, d / f"{ty}.gguf", ty).output for ty in LADDER}


@pytest.fixture(scope="module")
def source_f32():
    from test_tensor_roundtrip import source_tensors

    return source_tensors()


def _variants(tmp_path):
    r = load_recipe("moe-q3")
    yield "recipe moe-q3", convert(FIXTURE, tmp_path / "recipe.gguf", r.base, overrides=r.rules).output
    yield "budget 3.5 bpw", convert(FIXTURE, tmp_path / "budget.gguf", target=Target(bpw=3.5)).output
    yield "tensor-type _exps|attn_=q2_k", convert(FIXTURE, tmp_path / "rule.gguf", "Q4_K_M", overrides=[Override.parse(r"_exps|attn_", "q2_k")]).output


def test_routers_and_norms_are_bit_identical_in_every_output(tmp_path, quantised, source_f32):
    """Presets, a recipe, a budget: every router and norm is F32 and equals the bf16 source widened exactly."""
    outputs = {**quantised, **dict(_variants(tmp_path))}
    for what, path in outputs.items():
        seen = 0
        for t in gguf.GGUFReader(path).tensors:
            if "ffn_gate_inp" in t.name or t.name.endswith("norm.weight"):
                assert Q(t.tensor_type) == Q.F32, (what, t.name)
                want = source_f32[t.name].astype(np.float32)
                assert np.array_equal(np.asarray(t.data).reshape(want.shape), want), (what, t.name)
                seen += 1
        assert seen == 4 + 4 * 2 + 1, what  # 4 routers, 2 norms per block, output norm


def test_perplexity_orders_by_bits(quantised):
    from quantkit.evals.corpora import heldout_text
    from quantkit.evals.perplexity import perplexity

    text = heldout_text()
    ppl = {ty: perplexity(path, text, n_ctx=256, n_chunks=16).ppl for ty, path in quantised.items()}
    assert [ppl[t] for t in LADDER] == sorted(ppl.values()), ppl
    assert ppl["Q2_K"] < 1.1 * ppl["Q8_0"], ppl  # even 2-bit stays close on this model


def test_quantised_fixture_generates_sensible_text(quantised):
    """Greedy text from Q4_K_M: the base model finds it likely (random tokens would score PPL ~ vocab size)."""
    from llama_cpp import Llama

    from quantkit.engine.session import log_softmax

    llm = Llama(str(quantised["Q4_K_M"]), n_ctx=256, verbose=False, seed=0)
    prompt = "HAMLET:\nTo be, or not to be"
    text = llm.create_completion(prompt, max_tokens=48, temperature=0.0)["choices"][0]["text"]
    llm.close()
    assert len(text.strip()) > 20, text
    base = Llama(str(quantised["Q8_0"]), n_ctx=256, logits_all=True, verbose=False)
    ids = base.tokenize((prompt + text).encode())
    base.eval(ids)
    logp = log_softmax(np.asarray(base.scores[: len(ids)], dtype=np.float32))
    n_prompt = len(base.tokenize(prompt.encode()))
    nll = -np.mean([logp[i - 1, ids[i]] for i in range(n_prompt, len(ids))])
    base.close()
    assert np.exp(nll) < 30, (np.exp(nll), text)
