"""gpt-oss MXFP4 experts carried into GGUF MXFP4 as the checkpoint stores them (no value decoded or re-encoded).

The fixture is ``test_gpt_oss.py``'s: a tiny random gpt-oss whose experts are quantised to MXFP4 the way the
published checkpoints store them, and its dequantised F32 twin.  Checked here: the carried tensors' bytes are the
vendored llama.cpp converter's (its own ``repack_mxfp4`` run on the same blocks, the gate/up split as it slices
them), ggml's decoding of them is transformers' dequantised weights bit for bit, every ``--type`` keeps them (the
rest of the file as the type says), ``plan`` names them and predicts the file's size, ``--allow-requantize``
converts them (warned once, except MXFP4 -> MXFP4), recipes and bit budgets hold them as fixed bytes, and the
carried file's logits are transformers' within what llama.cpp's MXFP4 kernel allows (see
:func:`test_carried_logits_match_dequantised_transformers`).
"""

from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np
import pytest

from conftest import convert, hf_logits, llama_logits
from conftest import vendored_llama_cpp
from test_gpt_oss import IDS, _mxfp4_pair, _requantised, mxfp4_reference
from test_logits_parity import assert_close

EXPERTS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")
#: llama.cpp's CPU kernel multiplies MXFP4 weights with activations rounded to Q8_0 (``vec_dot_type``): logits of a file
#: holding transformers' exact weights differ from transformers' by up to ~2.1e-3 of the logit scale on this fixture
#: (measured; the same file with the experts decoded to F32 meets assert_close's 5e-4).  Bound: twice that.
MXFP4_KERNEL_REL = 4e-3


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from conftest import random_model

    base = tmp_path_factory.mktemp("gpt_oss_mxfp4_carried")
    good = random_model(base / "hf", "gpt_oss")
    return _mxfp4_pair(good, base / "mxfp4", base / "dequantised")


@pytest.fixture(scope="module")
def carried_f32(pair, tmp_path_factory):
    q, _ = pair
    return convert(q, tmp_path_factory.mktemp("carried") / "m.gguf", "f32")


def _tensors(path):
    import gguf

    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _expert_names(tensors):
    return sorted(n for n in tensors if n.endswith(EXPERTS))


def _vendored_repack():
    """llama.cpp's converter's ``GptOssModel.repack_mxfp4``, run on torch tensors with its writer recording what it adds."""
    LLAMA_CPP = vendored_llama_cpp("conversion")
    import gguf.quants  # noqa: F401  (the installed gguf-py, before the vendored converter's package is put on the path)

    sys.path.insert(0, LLAMA_CPP)
    try:
        from conversion.gpt_oss import GptOssModel
    finally:
        sys.path.remove(LLAMA_CPP)
    added = {}

    class Writer:
        def add_tensor(self, name, data, raw_dtype=None):
            added[name] = (np.asarray(data).copy(), raw_dtype)

    class Fake:
        gguf_writer = Writer()

        def transform_nibble_layout(self, t):
            return GptOssModel.transform_nibble_layout(self, t)

    return lambda name, blocks, scales: (GptOssModel.repack_mxfp4(Fake(), name, blocks, scales), added[name])[1]


def test_carried_bytes_are_the_vendored_converters(pair, carried_f32):
    """Each expert tensor: the vendored converter's bytes (gate = even rows, up = odd rows, as it slices ``_blocks``),
    ``mxfp4_to_ggml`` per expert, and ggml's decoding (gguf-py) = transformers' ``convert_moe_packed_tensors``, bit for bit."""
    import gguf
    import torch
    from safetensors.numpy import load_file

    from quantkit.hf.quantized import mxfp4_to_ggml

    q, _ = pair
    stored = load_file(str(q / "model.safetensors"))
    got = _tensors(carried_f32)
    assert all(got[n].tensor_type == gguf.GGMLQuantizationType.MXFP4 for n in _expert_names(got)) and len(_expert_names(got)) == 6
    repack = _vendored_repack()
    try:
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    except ImportError:  # pragma: no cover
        convert_moe_packed_tensors = None
    for bid in (0, 1):
        p = f"model.layers.{bid}.mlp.experts."
        gu_b, gu_s = stored[p + "gate_up_proj_blocks"], stored[p + "gate_up_proj_scales"]
        dn_b, dn_s = stored[p + "down_proj_blocks"], stored[p + "down_proj_scales"]
        cases = {  # GGUF name -> (blocks, scales) as the vendored generate_extra_tensors slices them
            f"blk.{bid}.ffn_gate_exps.weight": (gu_b[:, ::2], gu_s[:, ::2]),
            f"blk.{bid}.ffn_up_exps.weight": (gu_b[:, 1::2], gu_s[:, 1::2]),
            f"blk.{bid}.ffn_down_exps.weight": (dn_b, dn_s),
        }
        for name, (b, s) in cases.items():
            data, raw = repack(name, torch.from_numpy(np.ascontiguousarray(b)), torch.from_numpy(np.ascontiguousarray(s)))
            assert raw == gguf.GGMLQuantizationType.MXFP4
            mine = np.asarray(got[name].data).reshape(data.shape)
            np.testing.assert_array_equal(mine, data, err_msg=name)
            per_expert = np.stack([mxfp4_to_ggml(b[e], s[e]) for e in range(b.shape[0])])
            np.testing.assert_array_equal(mine, per_expert, err_msg=name)
            values = gguf.quants.dequantize(mine, gguf.GGMLQuantizationType.MXFP4).astype(np.float32)
            np.testing.assert_array_equal(values, mxfp4_reference(b, s), err_msg=name)  # as floats: ggml's e2m1 table has +0 for -0
            if convert_moe_packed_tensors is not None:  # transformers' [E, in, out]
                hf = convert_moe_packed_tensors(torch.from_numpy(np.ascontiguousarray(b)), torch.from_numpy(np.ascontiguousarray(s)), dtype=torch.float32).numpy()
                np.testing.assert_array_equal(values.transpose(0, 2, 1), hf, err_msg=name)


def test_carried_logits_match_dequantised_transformers(pair, carried_f32):
    """The carried file's logits vs transformers on the dequantised twin.

    Not assert_close's 5e-4: llama.cpp's CPU MXFP4 dot product rounds activations to Q8_0, so even a file holding
    transformers' exact weights (the previous test) computes something slightly else (measured ~2.1e-3 of the
    logit scale here; the same weights decoded to F32 meet 5e-4, ``test_gpt_oss.py``).  The vendored converter's
    file holds the same bytes, so it gives these very logits.
    """
    _, deq = pair
    got, ref = llama_logits(carried_f32, IDS), hf_logits(deq, IDS)
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    print(f"carried MXFP4: max |llama.cpp - transformers| / logit scale = {rel:.3g}")
    assert rel <= MXFP4_KERNEL_REL, rel
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert_close(got, llama_logits(_requantised(pair[0], carried_f32.parent / "req.gguf"), IDS), rel=MXFP4_KERNEL_REL)


def test_carried_streams_expert_by_expert(pair, carried_f32, tmp_path, monkeypatch):
    """With pieces of at most one expert's source bytes, the carried tensors come out piece by piece, the same bytes."""
    from quantkit.pipeline import convert as cv

    q, _ = pair
    sizes = []
    real = cv._carried_pieces

    def spy(t):
        for piece in real(t):
            sizes.append((t.name, piece.nbytes, t.shape))
            yield piece

    monkeypatch.setattr(cv, "CHUNK_BYTES", 4096)  # below one expert's blocks (8 KiB and 16 KiB here)
    monkeypatch.setattr(cv, "_carried_pieces", spy)
    out = convert(q, tmp_path / "small.gguf", "f32")
    assert {n for n, _, _ in sizes} == set(_expert_names(_tensors(out)))
    for name, nbytes, shape in sizes:
        assert nbytes == shape[1] * shape[2] // 32 * 17  # one expert's rows
    a, b = _tensors(out), _tensors(carried_f32)
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name].data), np.asarray(b[name].data), err_msg=name)


def _types():
    from quantkit.policy.presets import PRESETS

    return ["f32", "f16", "bf16"] + [p for p in PRESETS if p not in ("F32", "F16", "BF16")]


TYPES = _types()
CONVERTED = ("f32", "f16", "Q8_0", "Q4_K_M", "IQ4_XS", "MXFP4_MOE")  # converted too; the rest planned


@pytest.mark.parametrize("outtype", TYPES)
def test_every_type_keeps_mxfp4_experts(pair, carried_f32, tmp_path, outtype):
    """Every --type: the experts are the carried MXFP4 bytes; every other tensor has the type (and, converted, the bytes)
    the same --type gives the dequantised twin; the plan says so and its size is the file's tensor data."""
    import gguf

    from quantkit.pipeline.convert import prepare

    from quantkit.errors import QuantkitError

    q, deq = pair
    try:
        ckpt2, twin = prepare(deq, outtype)
        ckpt2.close()
    except QuantkitError:  # presets that need an importance matrix, or blocks wider than this tiny model's rows
        try:
            ckpt, prep = prepare(q, outtype)
        except QuantkitError:
            return  # refused for its other tensors too
        ckpt.close()  # refused only for the experts, which are carried here
        assert all(tp.qtype.name == "MXFP4" for tp in prep.plan.tensors if tp.name.endswith(EXPERTS))
        return
    ckpt, prep = prepare(q, outtype)
    ckpt.close()
    plan, twin_types = {tp.name: tp for tp in prep.plan.tensors}, {tp.name: tp.qtype for tp in twin.plan.tensors}
    assert prep.plan.file_type == twin.plan.file_type
    for name, tp in plan.items():
        if name.endswith(EXPERTS):
            assert tp.qtype.name == "MXFP4" and tp.reason.startswith("carried MXFP4"), (name, tp)
        else:
            assert tp.qtype == twin_types[name] and not tp.reason.startswith("carried"), name
    if outtype not in CONVERTED:
        return  # converting is slow-ish: the plan is what decides the types
    path = convert(q, tmp_path / "m.gguf", outtype)
    got, ref, twin_file = _tensors(path), _tensors(carried_f32), _tensors(convert(deq, tmp_path / "t.gguf", outtype))
    for name, t in got.items():
        assert t.tensor_type == plan[name].qtype, name
        other = ref if name.endswith(EXPERTS) else twin_file
        np.testing.assert_array_equal(np.asarray(t.data).view(np.uint8), np.asarray(other[name].data).view(np.uint8), err_msg=name)
    assert sum(int(t.n_bytes) for t in got.values()) == prep.plan.nbytes
    assert all(got[n].tensor_type == gguf.GGMLQuantizationType.MXFP4 for n in _expert_names(got))


def test_requantize_converts_and_warns_once(pair, carried_f32, tmp_path, caplog):
    """--allow-requantize: the experts follow the type (what the twin gets), with one warning for a lossy type; MXFP4 -> MXFP4
    (MXFP4_MOE) is no loss: the same carried bytes, no warning; decoded to F32/BF16: exact, no warning."""
    from quantkit.pipeline.convert import prepare

    q, deq = pair
    with caplog.at_level(logging.WARNING):
        out = _requantised(q, tmp_path / "q4.gguf", "Q4_K_M")
    hits = [r.getMessage() for r in caplog.records if "quantised again" in r.getMessage()]
    assert len(hits) == 1 and "mxfp4" in hits[0], hits
    ckpt, twin = prepare(deq, "Q4_K_M")
    ckpt.close()
    want = {tp.name: tp.qtype for tp in twin.plan.tensors}
    got = _tensors(out)
    for name in _expert_names(got):
        assert got[name].tensor_type.name == want[name].name != "MXFP4", name
    for outtype in ("Q8_0",):  # Q8_0 does not hold e2m1 x 2**e values exactly: warned too
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            _requantised(q, tmp_path / "q8.gguf", outtype)
        assert sum("quantised again" in r.getMessage() for r in caplog.records) == 1
    for outtype in ("MXFP4_MOE", "bf16"):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            path = _requantised(q, tmp_path / f"{outtype}.gguf", outtype)
        assert not [r.getMessage() for r in caplog.records if "quantised again" in r.getMessage()], outtype
        if outtype == "MXFP4_MOE":
            a, b = _tensors(path), _tensors(carried_f32)
            for name in _expert_names(a):
                np.testing.assert_array_equal(np.asarray(a[name].data), np.asarray(b[name].data), err_msg=name)


def test_carried_is_not_warned(pair, tmp_path, caplog):
    """The default keeps the experts: no "quantised again" warning for any type; a rule naming them says it leaves them."""
    from quantkit.pipeline.convert import convert as do_convert
    from quantkit.policy.plan import Override

    q, _ = pair
    with caplog.at_level(logging.WARNING):
        convert(q, tmp_path / "a.gguf", "Q2_K")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        do_convert(q, tmp_path / "b.gguf", "Q4_K_M", force=True, overrides=[Override.parse("ffn_down_exps", "Q4_K", "--tensor-type")])
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "ffn_down_exps" in msgs[0] and "written as stored" in msgs[0] and "--allow-requantize" in msgs[0], msgs
    assert _tensors(tmp_path / "b.gguf")["blk.0.ffn_down_exps.weight"].tensor_type.name == "MXFP4"
    caplog.clear()
    do_convert(q, tmp_path / "c.gguf", "Q4_K_M", force=True, allow_requantize=True, overrides=[Override.parse("ffn_down_exps", "Q8_0", "--tensor-type")])
    assert _tensors(tmp_path / "c.gguf")["blk.0.ffn_down_exps.weight"].tensor_type.name == "Q8_0"


def test_plan_reports_carried_tensors(pair, tmp_path):
    """``quantkit plan --json``: the expert weights' rows say "carried MXFP4", their bytes and the total are the file's;
    the text table says it too; with --allow-requantize nothing is carried."""
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    q, _ = pair
    r = CliRunner().invoke(app, ["plan", str(q), "--type", "q8_0", "--json"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.output)
    rows = {row["name"]: row for row in j["tensors"]}
    carried = {n for n, row in rows.items() if row["why"].startswith("carried MXFP4")}
    assert carried == {n for n in rows if n.endswith(EXPERTS)} and len(carried) == 6
    assert all(rows[n]["type"] == "MXFP4" for n in carried) and j["source_quantization"]["quant_method"] == "mxfp4"
    path = convert(q, tmp_path / "m.gguf", "q8_0")
    got = _tensors(path)
    assert {n: int(t.n_bytes) for n, t in got.items()} == {n: row["bytes"] for n, row in rows.items()}
    assert j["tensor_bytes"] == sum(int(t.n_bytes) for t in got.values())
    text = CliRunner().invoke(app, ["plan", str(q), "--type", "q8_0"])
    assert text.exit_code == 0 and "carried MXFP4" in text.output, text.output
    again = json.loads(CliRunner().invoke(app, ["plan", str(q), "--type", "q8_0", "--json", "--allow-requantize"]).output)
    assert not [row for row in again["tensors"] if row["why"].startswith("carried")]
    assert {row["type"] for row in again["tensors"] if row["name"].endswith(EXPERTS)} == {"Q8_0"}


def test_budget_and_recipe_hold_carried_tensors_fixed(pair):
    """--target-bpw: the carried experts are fixed bytes (never a knapsack choice), the rest is chosen to land within the
    budget; a recipe's expert rules leave them too.  With --allow-requantize the budget chooses for them as well."""
    from quantkit.pipeline.convert import prepare
    from quantkit.policy import budget
    from quantkit.policy.plan import Target, make_plan
    from quantkit.policy.recipe import load_recipe

    q, _ = pair
    ckpt, prep = prepare(q, "f32")
    try:
        tensors = prep.tensors
        n = sum(t.n_elements for t in tensors)
        experts = {t.name for t in tensors if t.name.endswith(EXPERTS)}
        plan = make_plan(tensors, "f32", (), prep.hparams, target=Target(bpw=5.5))
        by = {tp.name: tp for tp in plan.tensors}
        assert all(by[e].qtype.name == "MXFP4" and by[e].reason.startswith("carried") for e in experts)
        assert (1 - budget.TOLERANCE) * 5.5 * n / 8 <= plan.nbytes <= 5.5 * n / 8
        free = make_plan(tensors, "f32", (), prep.hparams, target=Target(bpw=5.5), requantize=True)
        assert {tp.qtype.name for tp in free.tensors if tp.name in experts} != {"MXFP4"}
        recipe = load_recipe("moe-q4")
        rp = make_plan(tensors, recipe.base, list(recipe.rules), prep.hparams)
        assert all(tp.qtype.name == "MXFP4" for tp in rp.tensors if tp.name in experts)
    finally:
        ckpt.close()


def test_carried_nibble_order_mutation_breaks_parity(pair, tmp_path, monkeypatch):
    """A repack that keeps HF's nibble order (value 2j low, 2j+1 high) instead of GGML's (j low, 16+j high) must fail."""
    from quantkit.pipeline import convert as cv

    def hf_order(blocks, scales, out=None):
        b = np.asarray(blocks, dtype=np.uint8)
        got = np.empty((*b.shape[:-1], 17), dtype=np.uint8)
        got[..., 0], got[..., 1:] = scales, b
        got = got.reshape(*b.shape[:-2], b.shape[-2] * 17)
        if out is not None:
            out[...] = got
        return got

    monkeypatch.setattr(cv, "mxfp4_to_ggml", hf_order)
    q, deq = pair
    got, ref = llama_logits(convert(q, tmp_path / "m.gguf"), IDS), hf_logits(deq, IDS)
    assert np.abs(got - ref).max() > 5 * MXFP4_KERNEL_REL * np.abs(ref).max()


def test_calibrated_budget_measures_a_carried_checkpoint(pair):
    """--target-bpw with --calib-text: the probe copy keeps the experts MXFP4 (not probed: they are not the budget's to
    choose), the other matrices are measured, and the budget keeps the experts carried."""
    from quantkit.evals import corpora
    from quantkit.pipeline import sensitivity
    from quantkit.pipeline.convert import prepare

    q, _ = pair
    measured = sensitivity.measure_checkpoint(q, corpora.shakespeare().train_text[:4000], n_ctx=32, n_chunks=2)
    assert measured and not any(name.endswith(EXPERTS) for name in measured)
    from quantkit.policy.plan import Target

    ckpt, prep = prepare(q, "f32", target=Target(bpw=6.0, measured=measured))
    ckpt.close()
    assert all(tp.qtype.name == "MXFP4" for tp in prep.plan.tensors if tp.name.endswith(EXPERTS))
