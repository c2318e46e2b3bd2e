"""Bit budgets (--target-bpw / --target-size) and measured sensitivity.

Budgets must land within 1% under the target on the real fixture, keep routers
and norms F32, honour user rules, and -- the point of the feature -- give a
lower mean KL-divergence than llama.cpp's stock preset of the same file size.
The knapsack itself is checked against exhaustive search on small instances.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import subprocess
import sys

import gguf
import numpy as np
import pytest

from conftest import FIXTURE
from quantkit.policy import budget
from quantkit.policy.budget import Option, parse_size, solve
from quantkit.pipeline.convert import convert, prepare
from quantkit.errors import QuantkitError
from quantkit.policy.plan import Override, Target

Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize(
    "text,want",
    [
        ("12GiB", 12 * 2**30),
        ("7.5GB", 7_500_000_000),
        ("800MiB", 800 * 2**20),
        ("5MB", 5_000_000),
        ("123456", 123456),
        ("1.5 kib", 1536),
    ],
)
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "GiB", "12XB", "-3GB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(QuantkitError, match="--target-size"):
        parse_size(text)


def _brute(options, budget_bytes):
    best = None
    for combo in itertools.product(*options.values()):
        size = sum(o.nbytes for o in combo)
        if size <= budget_bytes:
            dmg = sum(o.damage for o in combo)
            best = dmg if best is None or dmg < best else best
    return best


@pytest.mark.parametrize("seed", range(6))
def test_solve_is_near_optimal_and_fits(seed):
    """Random rate/damage curves: never over budget, within 0.5% of the exhaustive optimum."""
    rng = random.Random(seed)
    options = {}
    for i in range(6):
        n = rng.choice([1000, 4000, 9000])
        scale = rng.uniform(0.1, 10.0)
        options[f"t{i}"] = [Option(q, int(n * bpw / 8), scale * 2.0 ** (-2 * bpw) * rng.uniform(0.9, 1.1))
                            for q, bpw in zip((Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0), (2.6, 3.4, 4.5, 5.5, 6.6, 8.5))]
    lo = sum(min(o.nbytes for o in v) for v in options.values())
    hi = sum(max(o.nbytes for o in v) for v in options.values())
    for frac in (0.2, 0.5, 0.8):
        b = int(lo + frac * (hi - lo))
        chosen = solve(options, b)
        size = sum(o.nbytes for o in chosen.values())
        assert size <= b
        got = sum(o.damage for o in chosen.values())
        assert got <= 1.005 * _brute(options, b), (seed, frac)


def test_solve_refuses_unreachable_budgets():
    options = {"a": [Option(Q.Q2_K, 100, 1.0), Option(Q.Q8_0, 300, 0.1)]}
    with pytest.raises(budget.OutOfReach):
        solve(options, 99)
    with pytest.raises(budget.OutOfReach):
        solve(options, 1000)


# --------------------------------------------------------------------------- the fixture


def _types(path):
    return {t.name: Q(t.tensor_type) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("bpw", [3.0, 4.5, 6.0])
def test_target_bpw_lands_within_one_percent(tmp_path, bpw):
    out = tmp_path / "b.gguf"
    r = convert(FIXTURE, out, target=Target(bpw=bpw))
    got = 8 * sum(int(t.n_bytes) for t in gguf.GGUFReader(out).tensors) / r.n_params
    assert bpw * 0.99 <= got <= bpw, got
    types = _types(out)
    assert all(q == Q.F32 for n, q in types.items() if "ffn_gate_inp" in n or "norm" in n)
    assert len({q for n, q in types.items() if q != Q.F32}) >= 2  # a mix, not one type everywhere


@pytest.mark.parametrize("size", [4_000_000, 5_500_000])
def test_target_size_is_the_file_size(tmp_path, size):
    out = tmp_path / "s.gguf"
    convert(FIXTURE, out, target=Target(size=size))
    assert size * 0.99 <= out.stat().st_size <= size


def test_user_rules_are_pinned_inside_a_budget(tmp_path):
    out = tmp_path / "p.gguf"
    rule = Override.parse(r"ffn_down_exps", "q8_0", source="--tensor-type")
    convert(FIXTURE, out, overrides=[rule], target=Target(bpw=4.5))
    types = _types(out)
    assert all(q == Q.Q8_0 for n, q in types.items() if "ffn_down_exps" in n)
    assert 8 * sum(int(t.n_bytes) for t in gguf.GGUFReader(out).tensors) / sum(int(t.n_elements) for t in gguf.GGUFReader(out).tensors) <= 4.5


def test_budget_prefers_the_output_projection():
    """With the priors, the logits' own projection gets at least the bits of the median matrix."""
    ckpt, prep = prepare(FIXTURE, "budget", target=Target(bpw=4.0))
    ckpt.close()
    bpw = {t.name: t.bpw for t in prep.plan.tensors if t.qtype != Q.F32}
    assert bpw["output.weight"] >= float(np.median(list(bpw.values())))
    assert all("target-bpw 4" in t.reason for t in prep.plan.tensors if t.name in bpw)


def test_out_of_reach_target_names_the_range():
    with pytest.raises(QuantkitError, match=r"--target-bpw 1.2 is out of reach: plans of this model span 2\.\d+\.\.8\.\d+ bits per weight"):
        prepare(FIXTURE, "budget", target=Target(bpw=1.2))


# --------------------------------------------------------------------------- measured sensitivity


@pytest.fixture(scope="module")
def calib_text():
    from quantkit.evals import corpora

    return corpora.shakespeare().train_text[:60000]  # training plays: never the held-out ones


@pytest.fixture(scope="module")
def measured(calib_text):
    from quantkit.pipeline import sensitivity

    return sensitivity.measure_checkpoint(FIXTURE, calib_text, n_ctx=256, n_chunks=4)


def test_probe_restores_the_file_and_sees_every_matrix(tmp_path, fixture_gguf, calib_text):
    import shutil

    from quantkit.pipeline import sensitivity

    path = tmp_path / "m.gguf"
    shutil.copy(fixture_gguf("bf16"), path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    ckpt, prep = prepare(FIXTURE, "f32")
    ckpt.close()
    some = [t for t in prep.tensors if t.name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.1.ffn_down_exps.weight", "blk.0.ffn_gate_inp.weight", "output.weight")]
    got = sensitivity.measure(path, some, calib_text, n_ctx=128, n_chunks=2)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert set(got) == {t.name for t in some} - {"blk.0.ffn_gate_inp.weight"}  # routers are never probed: they stay F32
    assert all(k > 0 for _, k in got.values())


def test_measured_sensitivity_ranks_output_above_attention(measured):
    attn = np.median([k for n, (_, k) in measured.items() if ".attn_" in n])
    assert measured["output.weight"][1] > 5 * attn
    assert measured["token_embd.weight"][1] > attn


def _kld(base, model, tmp_path):
    from quantkit.evals.corpora import heldout_text
    from quantkit.evals.kld import base_logprobs, compare

    cache = tmp_path / "cache"
    text = heldout_text()
    b = base_logprobs(base, text, n_ctx=256, n_chunks=24, cache_dir=cache)
    return compare(b, model, text)["kld_mean"]


def test_budget_beats_stock_preset_at_equal_size(tmp_path, fixture_gguf, measured):
    """The goal of bit budgets: at Q4_K_M's file size, a measured plan has lower mean KLD on held-out text."""
    stock = convert(FIXTURE, tmp_path / "stock.gguf", "Q4_K_M")
    ours = convert(FIXTURE, tmp_path / "ours.gguf", target=Target(size=stock.nbytes, measured=measured))
    assert stock.nbytes * 0.99 <= ours.nbytes <= stock.nbytes
    base = fixture_gguf("bf16")
    k_stock, k_ours = _kld(base, tmp_path / "stock.gguf", tmp_path), _kld(base, tmp_path / "ours.gguf", tmp_path)
    assert k_ours < 0.8 * k_stock, (k_ours, k_stock)


def test_cli_budget_plan_json_and_errors(tmp_path, calib_text):
    calib = tmp_path / "calib.txt"
    calib.write_text(calib_text[:20000])
    qk = [sys.executable, "-m", "quantkit.cli"]
    r = subprocess.run([*qk, "plan", str(FIXTURE), "--target-bpw", "4.25", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert 4.25 * 0.99 <= j["bits_per_weight"] <= 4.25 and j["type"] == "budget-4.25bpw"
    r = subprocess.run([*qk, "convert", str(FIXTURE), "-o", str(tmp_path / "x.gguf"), "--type", "q4_k_m", "--target-bpw", "4"], capture_output=True, text=True)
    assert r.returncode == 1 and "not both" in r.stderr and not (tmp_path / "x.gguf").exists()
    r = subprocess.run([*qk, "convert", str(FIXTURE), "-o", str(tmp_path / "x.gguf"), "--target-size", "1MB"], capture_output=True, text=True)
    assert r.returncode == 1 and "out of reach" in r.stderr and not (tmp_path / "x.gguf").exists()
    r = subprocess.run([*qk, "convert", str(FIXTURE), "-o", str(tmp_path / "x.gguf"), "--target-bpw", "4", "--calib-text", str(tmp_path / "nope.txt")], capture_output=True, text=True)
    assert r.returncode == 1 and "nope.txt: no such file" in r.stderr and not (tmp_path / "x.gguf").exists()
    r = subprocess.run([*qk, "convert", str(FIXTURE), "-o", str(tmp_path / "y.gguf"), "--target-size", "5MB", "--calib-text", str(calib), "--calib-chunks", "2", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert 4_950_000 <= (tmp_path / "y.gguf").stat().st_size <= 5_000_000


def test_budget_with_an_importance_matrix(tmp_path):
    """The imatrix weights each column's error and each expert's share; the budget still lands within 1%."""
    from conftest import ROOT
    from quantkit.policy.imatrix import read_imatrix

    imat = read_imatrix(ROOT / "evals" / "reference" / "imatrix-fixture.gguf")
    out = tmp_path / "i.gguf"
    r = convert(FIXTURE, out, target=Target(bpw=4.0), imatrix=imat)
    got = 8 * sum(int(t.n_bytes) for t in gguf.GGUFReader(out).tensors) / r.n_params
    assert 4.0 * 0.99 <= got <= 4.0
    ckpt, plain = prepare(FIXTURE, "budget", target=Target(bpw=4.0))
    ckpt.close()
    ckpt, weighted = prepare(FIXTURE, "budget", target=Target(bpw=4.0), imatrix=imat)
    ckpt.close()
    damage = lambda p: [t.reason for t in p.plan.tensors]  # noqa: E731
    assert damage(plain) != damage(weighted)  # the measured errors changed with the weights


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_budget_on_fused_expert_layout(tmp_path, model_type):
    """transformers 5's fused experts (one [E, 2F, H] source): every expert sampled, not only the first.

    The sampler rebound the fused array while iterating over it: from the second expert on it sampled
    one column (a ValueError, or heap corruption in the kernel) -- a crash of --target-bpw on every fused checkpoint.
    """
    from conftest import random_model

    src = random_model(tmp_path / "hf", model_type, fused=True, hidden_size=256, intermediate_size=256, moe_intermediate_size=256,
                       num_attention_heads=4, head_dim=64) if model_type == "qwen3_moe" else \
        random_model(tmp_path / "hf", model_type, fused=True, hidden_size=256, intermediate_size=256, head_dim=64)
    t = next(t for t in prepare(src, "f16")[1].tensors if t.name == "blk.0.ffn_up_exps.weight")
    rows = list(budget.expert_rows(t))
    assert len(rows) == t.shape[0] and all(r.shape[1] == t.shape[-1] for r in rows)
    r = convert(src, tmp_path / "b.gguf", target=Target(bpw=4.5))
    got = 8 * sum(int(t.n_bytes) for t in gguf.GGUFReader(tmp_path / "b.gguf").tensors) / r.n_params
    assert 4.5 * 0.98 <= got <= 4.5, got
