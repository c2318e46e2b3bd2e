"""Routing fidelity chooses experts as the architecture does: ``evals.routing.Gate`` against llama.cpp's own choice.

llama.cpp's graph names each MoE layer's router logits ``ffn_moe_logits-<il>`` (what ``eval kld`` caches) and
the experts it then uses ``ffn_moe_argsort-<il>`` (its first ``k`` rows per token are the choice).  Both are read
through the eval callback on the same decode; the gate built from the GGUF must choose the same top-k set from
the logits as the graph did, on models where the choice is not the top-k of the logits: DeepSeek V3's sigmoid
with a selection bias and group-limited top-k, gpt-oss's router bias.  The softmax-of-logits rule of old is
shown to disagree on those, so the test cannot pass by chance.
"""

from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest

from conftest import convert, random_model
from test_deepseek import _set_score_bias
from quantkit.engine.session import EvalSession, _ggml_fns
from evals.routing import Gate, softmax, topk_sets

IDS = [1] + np.random.default_rng(7).integers(3, 2999, size=120).tolist()
_NAME = re.compile(rb"ffn_moe_(logits|argsort)-(\d+)$")
GGML_TYPE_F32, GGML_TYPE_I32 = 0, 26


def _graph_choice(path, k: int, hashed: frozenset[int] = frozenset()):
    """(logits, chosen mask) per MoE block, in block order, as llama.cpp computed them on IDS (``hashed`` blocks left out)."""
    got: dict[tuple[str, int], np.ndarray] = {}
    so = _ggml_fns()

    def on_tensor(t: int, ask: bool) -> bool:
        m = _NAME.match(so.ggml_get_name(t) or b"")
        if ask:
            return m is not None
        if m is not None and so.ggml_is_contiguous(t):
            kind = ctypes.c_int32.from_address(t).value
            rows = so.ggml_nrows(t)
            out = np.empty((rows, so.ggml_nelements(t) // rows), dtype=np.float32 if kind == GGML_TYPE_F32 else np.int32)
            assert kind in (GGML_TYPE_F32, GGML_TYPE_I32)
            so.ggml_backend_tensor_get(t, out.ctypes.data, 0, out.nbytes)
            got[(m.group(1).decode(), int(m.group(2)))] = out
        return True

    s = EvalSession(path, len(IDS), threads=2, on_tensor=on_tensor)
    try:
        s.eval_chunk(IDS)
    finally:
        s.close()
    blocks = sorted(b for kind, b in got if kind == "logits")
    assert blocks and all(("argsort", b) in got for b in blocks if b not in hashed)
    out = []
    for b in blocks:
        if b in hashed:  # the token's row of ffn_gate_tid2eid chose: no argsort
            assert ("argsort", b) not in got
            continue
        logits, order = got[("logits", b)], got[("argsort", b)]
        mask = np.zeros(logits.shape, dtype=bool)
        np.put_along_axis(mask, order[:, :k].astype(np.int64), True, axis=-1)
        out.append((logits, mask))
    return out


def _agreement(gate: Gate, layers, k: int) -> tuple[float, float]:
    """(gate, softmax-of-logits) share of positions whose top-k set equals llama.cpp's."""
    g = o = n = 0
    for i, (logits, mask) in enumerate(layers):
        _, sel = gate.scores(logits, i)
        g += int((topk_sets(sel, k) == mask).all(-1).sum())
        o += int((topk_sets(softmax(logits), k) == mask).all(-1).sum())
        n += len(logits)
    return g / n, o / n


CASES = {
    "deepseek_v3-groups-bias": ("deepseek_v3", dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, num_hidden_layers=3), 3,
                                "sigmoid + selection bias + top 2 of 4 groups"),
    "gpt_oss-router-bias": ("gpt_oss", {}, 2, "softmax_weight + router bias"),
    "qwen3_moe-plain": ("qwen3_moe", {}, None, "softmax"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gate_chooses_what_llama_cpp_chooses(tmp_path, case):
    model_type, cfg, k, described = CASES[case]
    src = random_model(tmp_path / "hf", model_type, **cfg)
    if model_type == "deepseek_v3":
        _set_score_bias(src)
    path = convert(src, tmp_path / "m.gguf", "f32")
    gate = Gate.from_gguf(path)
    assert gate.describe() == described
    k = k or _experts_used(path)
    layers = _graph_choice(path, k)
    ours, old = _agreement(gate, layers, k)
    print(case, "gate", ours, "softmax of logits", old)
    assert ours >= 0.99, ours  # float64 here vs float32 there: a rare near-tie may differ
    if not gate.plain:
        assert old < 0.9, old  # the choice differs from the logits' top-k: the gate matters
    else:
        assert old == ours


def _experts_used(path) -> int:
    from quantkit.format.gguf_read import read_gguf

    md = read_gguf(path).metadata
    return int(md[f"{md['general.architecture']}.expert_used_count"])


def test_deepseek4_gate_sqrt_softplus_and_hash_routed_layers(tmp_path):
    """DeepSeek V4: sqrt(softplus) scores with a selection bias choose what llama.cpp chooses on the score-routed blocks; the
    hash-routed blocks (experts from the token's ffn_gate_tid2eid row, no argsort in the graph) are the gate's hashed layers,
    left out of routing fidelity."""
    from test_deepseek_v4 import IM_CONFIG, build

    from evals.routing import RoutingStats

    path = convert(build(tmp_path / "hf", **IM_CONFIG), tmp_path / "m.gguf", "f32")
    gate = Gate.from_gguf(path)
    assert gate.hashed == (True, True, False, False)
    assert gate.describe() == "sqrt_softplus + selection bias + 2 hash-routed layer(s) not compared"
    k = _experts_used(path)
    layers = _graph_choice(path, k, hashed=frozenset({0, 1}))
    assert len(layers) == 2
    g = n = 0
    for i, (logits, mask) in enumerate(layers, start=2):  # the gate's index is the MoE block's
        _, sel = gate.scores(logits, i)
        g += int((topk_sets(sel, k) == mask).all(-1).sum())
        n += len(logits)
    assert g / n >= 0.99, g / n
    stats = RoutingStats.empty(4, 8, k, gate)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 16, 8))
    stats.add(logits, {2: logits[2], 3: logits[3]})  # nothing asked of the hashed layers
    s = stats.summary()
    assert s["layers"][:2] == [{"hash_routed": True}] * 2 and s["layers"][2]["positions"] == 16
    assert s["topk_exact"] == 1.0 and s["topk_exact_min"] == 1.0
