"""``converters/gpt_oss.py``: logits parity with transformers, its transforms, its refusals, the CLI path.

A tiny random gpt-oss (4 experts top-2, window 8, YaRN) converted to F32 gives transformers' float32
logits on prompts longer than the window; each transform is checked against transformers' own
indexing and fails when its interleave or transpose is changed; every configuration llama.cpp's
gpt-oss graph would compute differently is refused in one line.  Type plans against
``llama_model_quantize``: ``test_presets.py`` (``gpt-oss-e4``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from conftest import assert_convert_refused, convert, hf_logits, llama_logits, random_model, vendored_llama_cpp
from test_logits_parity import assert_close

#: 40 tokens: five times the window of 8
IDS = [1] + [(7 * i + 3) % 2990 + 5 for i in range(39)]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("gpt_oss") / "hf", "gpt_oss")


@pytest.fixture
def model(good, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(good, dst)
    return dst


def _set_config(d, **kv):
    p = d / "config.json"
    cfg = json.loads(p.read_text())
    cfg.update(kv)
    p.write_text(json.dumps(cfg))


def test_f32_logits_match_transformers(good, tmp_path):
    ref = hf_logits(good, IDS)
    assert_close(llama_logits(convert(good, tmp_path / "m.gguf"), IDS), ref)


def test_window_matters(good, tmp_path):
    """The prompts are long enough that the sliding blocks compute something else than full attention would."""
    wide = tmp_path / "wide"
    shutil.copytree(good, wide)
    _set_config(wide, sliding_window=4096)
    a, b = hf_logits(good, IDS), hf_logits(wide, IDS)
    assert np.abs(a - b).max() > 5e-3 * np.abs(a).max()


def test_yarn_truncate_false_gap(good, tmp_path):
    """Published configs say truncate: false; ggml always rounds the correction range.  Measured, not refused."""
    src = tmp_path / "notrunc"
    shutil.copytree(good, src)
    cfg = json.loads((src / "config.json").read_text())
    _set_config(src, rope_parameters={**cfg["rope_parameters"], "truncate": False})
    got, ref = llama_logits(convert(src, tmp_path / "m.gguf"), IDS), hf_logits(src, IDS)
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    print(f"yarn truncate=false: max |llama.cpp - transformers| / logit scale = {rel:.3g}")
    assert rel < 2e-2 and (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


# -- transforms: against transformers' own indexing, and mutations that must fail --------------------


def test_transforms_match_transformers_indexing():
    import torch

    from quantkit.converters import gpt_oss as g

    rng = np.random.default_rng(0)
    E, H, F = 3, 8, 6
    gate_up = rng.standard_normal((E, H, 2 * F)).astype(np.float32)
    down = rng.standard_normal((E, F, H)).astype(np.float32)
    bias = rng.standard_normal((E, 2 * F)).astype(np.float32)
    x = rng.standard_normal((5, H)).astype(np.float32)
    for e in range(E):
        gu = torch.from_numpy(x) @ torch.from_numpy(gate_up[e])  # transformers: x @ gate_up_proj[e], then [..., ::2] / [..., 1::2]
        gate_w, up_w = g.GATE_T.apply(gate_up[e], None), g.UP_T.apply(gate_up[e], None)
        np.testing.assert_allclose(x @ gate_w.T, gu[:, ::2].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(x @ up_w.T, gu[:, 1::2].numpy(), rtol=1e-5, atol=1e-5)
        y = rng.standard_normal((5, F)).astype(np.float32)
        np.testing.assert_allclose(y @ g.TRANSPOSED.apply(down[e], None).T, y @ down[e], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(g.GATE_BIAS.apply(bias, None), bias[:, ::2])
    np.testing.assert_array_equal(g.UP_BIAS.apply(bias, None), bias[:, 1::2])
    rows = rng.standard_normal((2 * F, H)).astype(np.float32)
    np.testing.assert_array_equal(g.GATE_ROWS.apply(rows, None), rows[::2])
    np.testing.assert_array_equal(g.UP_ROWS.apply(rows, None), rows[1::2])
    # shapes known before any weight is read
    assert g.GATE_T.out_shape((E, H, 2 * F), None) == (E, F, H)
    assert g.TRANSPOSED.out_shape((E, F, H), None) == (E, H, F)
    assert g.UP_BIAS.out_shape((E, 2 * F), None) == (E, F)
    assert g.GATE_ROWS.out_shape((E, 2 * F, H), None) == (E, F, H)


# Each mutation: a plausible mistake in a transform; the tiny model's logits must then differ.
MUTATIONS = {
    "gate/up swapped": lambda g: [("GATE_T", dataclasses.replace(g.GATE_T, first=False)), ("UP_T", dataclasses.replace(g.UP_T, first=True))],
    "halves instead of interleave": lambda g: [("GATE_T", _Halves(True)), ("UP_T", _Halves(False))],
    "down not transposed": lambda g: [("TRANSPOSED", _Reshaped())],
    "bias halves swapped": lambda g: [("GATE_BIAS", dataclasses.replace(g.GATE_BIAS, first=False)), ("UP_BIAS", dataclasses.replace(g.UP_BIAS, first=True))],
}


def _halves_cls():
    from quantkit.converters.gpt_oss import InterleavedT

    @dataclasses.dataclass(frozen=True)
    class Halves(InterleavedT):
        def select(self, a):
            a = np.asarray(a)
            half = a.shape[1] // 2
            return np.ascontiguousarray((a[:, :half] if self.first else a[:, half:]).T)

    @dataclasses.dataclass(frozen=True)
    class Reshaped(InterleavedT):  # [F, H] -> [H, F] by reshape instead of transpose
        def out_shape(self, shape, hparams):
            return (*shape[:-2], shape[-1], shape[-2])

        def select(self, a):
            a = np.asarray(a)
            return np.ascontiguousarray(a.reshape(a.shape[1], a.shape[0]))

    return Halves, Reshaped


def _Halves(first):
    return _halves_cls()[0]("mut_halves", first=first)


def _Reshaped():
    return _halves_cls()[1]("mut_reshape")


@pytest.mark.parametrize("case", list(MUTATIONS))
def test_mutated_transform_breaks_parity(good, tmp_path, monkeypatch, case):
    from quantkit.converters import gpt_oss as g

    for attr, value in MUTATIONS[case](g):
        old = getattr(g, attr)
        for rules_attr in ("EXPERT_RULES", "ROUTER_RULES"):
            rules = tuple(dataclasses.replace(r, transform=value) if r.transform is old else r for r in getattr(g, rules_attr))
            monkeypatch.setattr(g, rules_attr, rules)
    got = llama_logits(convert(good, tmp_path / "m.gguf"), IDS)
    ref = hf_logits(good, IDS)
    assert np.abs(got - ref).max() > 5e-3 * np.abs(ref).max(), f"{case}: parity survived the mutation"


# -- refusals ----------------------------------------------------------------------------------------

REFUSED = {
    # llama.cpp's graph hard-codes the clamped SwiGLU constants
    "swiglu_limit": (lambda d: _set_config(d, swiglu_limit=5.0), ["swiglu_limit = 5.0", "7.0"]),
    "swiglu_alpha": (lambda d: _set_config(d, swiglu_alpha=1.5), ["swiglu_alpha = 1.5", "1.702"]),
    # the graph hard-codes sliding on even blocks, full on odd ones
    "layer_types full first": (lambda d: _set_config(d, layer_types=["full_attention", "sliding_attention"]), ["layer_types", "even blocks"]),
    "attention_bias false": (lambda d: _set_config(d, attention_bias=False), ["attention_bias = False", "attn_output.bias"]),
    "llama3 rope": (lambda d: _set_config(d, rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                               "original_max_position_embeddings": 64, "rope_theta": 10000.0}), ["rope_type = 'llama3'", "yarn"]),
    "yarn beta_fast": (lambda d: _set_config(d, rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 16.0, "beta_slow": 1.0,
                                                                  "original_max_position_embeddings": 4096, "rope_theta": 150000.0}), ["beta_fast = 16.0"]),
    "yarn attention_factor": (lambda d: _set_config(d, rope_parameters={"rope_type": "yarn", "factor": 32.0, "attention_factor": 2.0,
                                                                         "original_max_position_embeddings": 4096, "rope_theta": 150000.0}), ["attention_factor = 2.0"]),
    "num_experts_per_tok above experts": (lambda d: _set_config(d, num_experts_per_tok=5), ["num_experts_per_tok = 5", "num_local_experts = 4"]),
    "expert width wrong": (lambda d: _set_config(d, intermediate_size=96), ["mlp.experts.", "config.json implies"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_one_line(model, tmp_path, case):
    breaker, needles = REFUSED[case]
    breaker(model)
    assert_convert_refused(model, tmp_path, needles)


def test_expert_biases_stay_f32(good, tmp_path):
    import gguf

    path = convert(good, tmp_path / "m.gguf", "f16")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    for name in ("blk.0.ffn_gate_exps.bias", "blk.0.ffn_up_exps.bias", "blk.1.ffn_down_exps.bias", "blk.0.attn_sinks.weight", "blk.0.ffn_gate_inp.bias"):
        assert types[name] == gguf.GGMLQuantizationType.F32, name
    assert types["blk.0.ffn_gate_exps.weight"] == gguf.GGMLQuantizationType.F16


def test_cli_convert_q4_k_m_and_run(good, tmp_path):
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    out = tmp_path / "x.gguf"
    r = CliRunner().invoke(app, ["convert", str(good), "-o", str(out), "--type", "Q4_K_M"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["run", str(out), "-p", "hi", "-n", "5"])
    assert r.exit_code == 0, r.output


# -- MXFP4 experts (quant_method: mxfp4, the published gpt-oss checkpoints) ------------------------------
#
# The tiny model's experts quantised to MXFP4 the way gpt-oss-20b / -120b store them: per 32 values of a row
# one e8m0 exponent (the block's largest magnitude brought within e2m1's 6), e2m1 nibbles (value 2j in the
# low half of byte j), rows in llama.cpp's order -- gate_up_proj_blocks [E, 2F, H/32, 16] with gate in the
# even rows, down_proj_blocks [E, H, F/32, 16].  The reference: the same model with those experts decoded,
# as plain F32 weights in transformers' [E, in, out] layout.  Here hidden (128) = 2 * ffn (64): the layout
# is told by the names, not by the shape.

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)
MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def mxfp4_quantise(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float rows [..., rows, cols] -> (blocks uint8 [..., rows, cols/32, 16], scales uint8 [..., rows, cols/32]): the OCP MX recipe."""
    *lead, cols = w.shape
    x = w.astype(np.float64).reshape(*lead, cols // 32, 32)
    amax = np.abs(x).max(-1)
    exp = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2, -127).astype(np.int64)  # e2m1's largest exponent is 2
    exp = np.clip(exp, -127, 127)
    y = x / np.exp2(exp)[..., None]
    mags = E2M1[:8].astype(np.float64)
    idx = np.abs(np.abs(y)[..., None] - mags).argmin(-1)  # nearest magnitude (ties to the lower code, i.e. even mantissa here)
    nib = (idx | np.where(y < 0, 8, 0)).astype(np.uint8)
    blocks = (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(np.uint8)
    return blocks, (exp + 127).astype(np.uint8)


def mxfp4_reference(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """A straightforward decode: value 2j = low nibble of byte j, 2j+1 the high one, times 2**(scale - 127)."""
    *lead, nb, _ = blocks.shape
    out = np.empty((*lead, nb, 32), dtype=np.float32)
    for j in range(16):
        out[..., 2 * j] = E2M1[blocks[..., j] & 0xF]
        out[..., 2 * j + 1] = E2M1[blocks[..., j] >> 4]
    for i in np.ndindex(*scales.shape):
        out[i] = [np.ldexp(float(v), int(scales[i]) - 127) for v in out[i]]
    return out.reshape(*lead, nb * 32)


def _mxfp4_pair(good, dst_q, dst_ref):
    """(MXFP4 checkpoint, its dequantised F32 twin) from the tiny BF16 model."""
    import torch
    from safetensors.torch import load_file, save_file

    state = {k: v.float() for k, v in load_file(str(good / "model.safetensors")).items()}
    quant, ref = dict(state), dict(state)
    for name in list(state):
        if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            rows = state[name].transpose(1, 2).numpy()  # [E, in, out] -> llama.cpp's rows [E, out, in]
            # blocks of 32 columns a power of two apart, so each block's scale differs from its neighbours'
            E, R, C = rows.shape
            rows = rows * np.exp2((np.arange(E * R * C // 32) % 3 - 1).reshape(E, R, C // 32, 1)).repeat(32, -1).reshape(E, R, C).astype(np.float32)
            blocks, scales = mxfp4_quantise(rows)
            del quant[name]
            quant[name + "_blocks"], quant[name + "_scales"] = torch.from_numpy(blocks), torch.from_numpy(scales)
            ref[name] = torch.from_numpy(np.ascontiguousarray(mxfp4_reference(blocks, scales).transpose(0, 2, 1)))
    for d, tensors, qc in ((dst_q, quant, MXFP4_CONFIG), (dst_ref, ref, None)):
        shutil.copytree(good, d, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
        if qc:
            _set_config(d, quantization_config=qc)
    return dst_q, dst_ref


@pytest.fixture(scope="module")
def mxfp4(good, tmp_path_factory):
    base = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    return _mxfp4_pair(good, base / "mxfp4", base / "dequantised")


def test_mxfp4_decoded_exactly(mxfp4):
    """quantkit's decode = a straightforward one = transformers' ``convert_moe_packed_tensors``, bit for bit."""
    import torch
    from safetensors.numpy import load_file

    from quantkit.hf.checkpoint import open_checkpoint

    q, _ = mxfp4
    stored = load_file(str(q / "model.safetensors"))
    scales_seen = np.concatenate([s.ravel() for k, s in stored.items() if k.endswith("_scales")])
    assert scales_seen.max() < 127 and len(np.unique(scales_seen)) >= 4  # several negative exponents
    try:
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    except ImportError:  # pragma: no cover
        convert_moe_packed_tensors = None
    with open_checkpoint(q) as ckpt:
        assert ckpt.quantization is not None and ckpt.quantization.method == "mxfp4"
        assert not any(n.endswith(("_blocks", "_scales")) for n in ckpt.tensors)
        for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
            blocks, scales = stored[name + "_blocks"], stored[name + "_scales"]
            ref = ckpt.tensors[name]
            got = np.asarray(ref.array())
            assert got.shape == ref.shape == (*blocks.shape[:2], blocks.shape[2] * 32)
            want = mxfp4_reference(blocks, scales)
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
            np.testing.assert_array_equal(ref.array()[2][5:9], want[2][5:9])  # a few rows of one expert, decoded alone
            np.testing.assert_array_equal(ref.array()[1][np.array([7, 0, 3])], want[1][[7, 0, 3]])
            if convert_moe_packed_tensors is not None:  # transformers hands out [E, in, out]
                hf = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32).numpy()
                np.testing.assert_array_equal(got.transpose(0, 2, 1).view(np.uint32), hf.view(np.uint32))


def test_mxfp4_decode_of_every_byte_and_scale():
    """Every nibble pair under extreme and middle exponents (what a real checkpoint may hold, 2**-127 included)."""
    from quantkit.hf import quantized as qz

    blocks = np.tile(np.arange(256, dtype=np.uint8), 3).reshape(3 * 16, 1, 16)
    scales = np.array([0, 1, 100, 126, 127, 128, 140, 200, 250] * 6)[: 3 * 16].astype(np.uint8).reshape(3 * 16, 1)
    w = qz.QuantWeight("x", (48, 32), "x_blocks", "x_scales", "U8", (1, 32), "mxfp4", 4, None, "ue8m0", "")
    got = qz.decode_rows(w, blocks, scales, None, 0, slice(0, 48))
    np.testing.assert_array_equal(got.view(np.uint32), mxfp4_reference(blocks, scales).view(np.uint32))


def _requantised(src, out, outtype="f32"):
    """``convert --allow-requantize``: MXFP4 experts decoded and written per the type instead of carried as MXFP4."""
    from quantkit.pipeline.convert import convert as do_convert

    do_convert(src, out, outtype, force=True, allow_requantize=True)
    return out


def test_mxfp4_logits_match_dequantised_transformers(good, mxfp4, tmp_path):
    """MXFP4 experts decoded -> F32 GGUF (--allow-requantize): llama.cpp's logits equal transformers' on the same weights.
    (Carried as MXFP4, the default: ``test_gpt_oss_mxfp4.py``.)"""
    q, deq = mxfp4
    ref = hf_logits(deq, IDS)
    assert_close(llama_logits(_requantised(q, tmp_path / "m.gguf"), IDS), ref)
    assert np.abs(hf_logits(good, IDS) - ref).max() > 5e-3 * np.abs(ref).max()  # the fixture's experts do differ from the BF16 model's


def _nibbles_swapped(w, blocks, scale, m, rows):
    from quantkit.hf import quantized as qz

    return qz.__dict__["_decode_mxfp4_orig"](w, (blocks >> 4) | (blocks << 4), scale, m, rows)


MXFP4_MUTATIONS = {
    "gate/up rows swapped": "rules",
    "nibbles swapped": "decode",
}


@pytest.mark.parametrize("case", list(MXFP4_MUTATIONS))
def test_mxfp4_mutation_breaks_parity(mxfp4, tmp_path, monkeypatch, case):
    from quantkit.converters import gpt_oss as g
    from quantkit.hf import quantized as qz

    q, deq = mxfp4
    if MXFP4_MUTATIONS[case] == "rules":
        swapped = (dataclasses.replace(g.MXFP4_GATE_UP_RULES[0], transform=g.UP_ROWS), dataclasses.replace(g.MXFP4_GATE_UP_RULES[1], transform=g.GATE_ROWS))
        monkeypatch.setattr(g, "MXFP4_GATE_UP_RULES", swapped)
    else:
        monkeypatch.setitem(qz.__dict__, "_decode_mxfp4_orig", qz._decode_mxfp4)
        monkeypatch.setattr(qz, "_decode_mxfp4", _nibbles_swapped)
    path = convert(q, tmp_path / "m.gguf") if MXFP4_MUTATIONS[case] == "rules" else _requantised(q, tmp_path / "m.gguf")  # rules: the carried path
    got, ref = llama_logits(path, IDS), hf_logits(deq, IDS)
    assert np.abs(got - ref).max() > 5e-3 * np.abs(ref).max(), f"{case}: parity survived the mutation"


def test_mxfp4_gguf_equals_dequantised_gguf(mxfp4, tmp_path):
    """Decoded (--allow-requantize), the GGUF from the MXFP4 checkpoint holds the same expert tensors as the one from its dequantised F32 twin."""
    import gguf

    q, deq = mxfp4
    a = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(_requantised(q, tmp_path / "q.gguf"))).tensors}
    b = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(convert(deq, tmp_path / "d.gguf"))).tensors}
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_mxfp4_requantised_warns_once(mxfp4, tmp_path, caplog):
    import logging

    q, _ = mxfp4
    with caplog.at_level(logging.WARNING):
        _requantised(q, tmp_path / "m.gguf", "Q4_K_M")
    hits = [r.getMessage() for r in caplog.records if "quantised again" in r.getMessage()]
    assert len(hits) == 1 and "mxfp4" in hits[0] and "MXFP4" in hits[0] and "--allow-requantize" in hits[0], hits


def _edit_mxfp4(d, fn):
    from safetensors.numpy import load_file, save_file

    state = load_file(str(d / "model.safetensors"))
    fn(state)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})


def _drop(name):
    return lambda st: st.pop(name)


def _reshape(name, shape):
    def fn(st):
        st[name] = np.zeros(shape, dtype=st[name].dtype)
    return fn


def _no_config(d):
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))


def _mix_layers(deq):
    def fn(st):
        from safetensors.numpy import load_file

        n = "model.layers.1.mlp.experts.gate_up_proj"
        del st[n + "_blocks"], st[n + "_scales"]
        st[n] = load_file(str(deq / "model.safetensors"))[n]
    return fn


GU = "model.layers.0.mlp.experts.gate_up_proj"
MXFP4_REFUSED = {
    "scales missing": (lambda d, deq: _edit_mxfp4(d, _drop(GU + "_scales")), [GU + "_blocks", "_scales", "missing"]),
    "blocks missing": (lambda d, deq: _edit_mxfp4(d, _drop(GU + "_blocks")), [GU + "_scales", GU + "_blocks", "missing"]),
    "scales of the wrong shape": (lambda d, deq: _edit_mxfp4(d, _reshape(GU + "_scales", (4, 128, 2))), [GU + "_scales", "[4, 128, 2]", "[4, 128, 4]"]),
    "blocks not 16 bytes": (lambda d, deq: _edit_mxfp4(d, _reshape(GU + "_blocks", (4, 128, 4, 8))), [GU + "_blocks", "[4, 128, 4, 8]", "16"]),
    "blocks of another width": (lambda d, deq: (_edit_mxfp4(d, _reshape(GU + "_blocks", (4, 128, 2, 16))), _edit_mxfp4(d, _reshape(GU + "_scales", (4, 128, 2)))),
                                [GU, "config.json implies"]),
    "no quantization_config": (lambda d, deq: _no_config(d), ["mlp.experts.", "_blocks", "quant_method 'mxfp4'"]),
    "MXFP4 and plain experts mixed": (lambda d, deq: _edit_mxfp4(d, _mix_layers(deq)), ["MXFP4", "model.layers.1.mlp.experts.gate_up_proj", "one layout"]),
}


@pytest.mark.parametrize("case", list(MXFP4_REFUSED))
def test_mxfp4_refused_with_one_line(mxfp4, tmp_path, case):
    q, deq = mxfp4
    dst = tmp_path / "model"
    shutil.copytree(q, dst)
    breaker, needles = MXFP4_REFUSED[case]
    breaker(dst, deq)
    assert_convert_refused(dst, tmp_path, needles)




def test_mxfp4_to_ggml_is_the_vendored_repack(mxfp4):
    """``mxfp4_to_ggml`` (for carrying the experts as GGUF MXFP4): llama.cpp's converter's bytes, and ggml's decode of them is ours."""
    import os
    import sys

    import torch
    from safetensors.numpy import load_file

    from quantkit.hf import quantized as qz

    q, _ = mxfp4
    stored = load_file(str(q / "model.safetensors"))
    name = "model.layers.0.mlp.experts.gate_up_proj"
    blocks, scales = stored[name + "_blocks"], stored[name + "_scales"]
    got = qz.mxfp4_to_ggml(blocks, scales)
    assert got.shape == (*blocks.shape[:2], blocks.shape[2] * 17)
    want = mxfp4_reference(blocks, scales)
    LLAMA_CPP = vendored_llama_cpp("conversion")
    import gguf.quants  # the installed gguf-py, before the vendored converter's package is put on the path

    sys.path.insert(0, LLAMA_CPP)
    try:
        from conversion.gpt_oss import GptOssModel
    finally:
        sys.path.remove(LLAMA_CPP)
    tb = GptOssModel.transform_nibble_layout(None, torch.from_numpy(blocks))
    ref = torch.concat((torch.from_numpy(scales).unsqueeze(-1), tb), dim=-1).numpy().reshape(got.shape)
    np.testing.assert_array_equal(got, ref)
    deq = gguf.quants.dequantize(got, gguf.GGMLQuantizationType.MXFP4)
    np.testing.assert_array_equal(deq.astype(np.float32), want)


@pytest.mark.parametrize("step", [1, 7, 16384])
@pytest.mark.parametrize("view", ["whole", "every other row", "odd rows"])
def test_mxfp4_to_ggml_runs_of_blocks_and_views_keep_every_byte(monkeypatch, step, view):
    """The repack works a run of blocks at a time: any run length, a last short run, and a caller's non-contiguous piece
    (the odd rows of gate_up are up) give the bytes of the vendored converter's rule, written out here block by block."""
    from quantkit.hf import quantized as qz

    monkeypatch.setattr(qz, "_MXFP4_BLOCKS", step)
    rng = np.random.default_rng(step)
    blocks = rng.integers(0, 256, (2, 61, 45, 16), dtype=np.uint8)
    scales = rng.integers(0, 256, (2, 61, 45), dtype=np.uint8)
    sel = {"whole": np.s_[:], "every other row": np.s_[:, ::2], "odd rows": np.s_[:, 1::2]}[view]
    b, s = blocks[sel], scales[sel]
    got = qz.mxfp4_to_ggml(b, s)
    want = np.empty((*s.shape, 17), dtype=np.uint8)
    want[..., 0] = s
    lo, hi = b & 0x0F, b >> 4  # HF byte j: values 2j (low nibble), 2j + 1 (high)
    vals = np.empty((*s.shape, 32), dtype=np.uint8)
    vals[..., 0::2], vals[..., 1::2] = lo, hi
    want[..., 1:] = vals[..., :16] | (vals[..., 16:] << 4)  # GGML byte i: values i (low nibble), 16 + i (high)
    np.testing.assert_array_equal(got, want.reshape(*s.shape[:-1], -1))
    assert qz.mxfp4_to_ggml(b[:, :0], s[:, :0]).shape == (2, 0, 45 * 17)
