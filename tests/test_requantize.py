"""A GGUF file as the source: requantise from F32/F16/BF16, refuse (or, with consent, redo) quantised tensors.

The reference is our own Hugging Face path, itself proven against llama.cpp
(test_presets, test_tensor_roundtrip): the same model through either door must
give byte-identical tensors and the same metadata.
"""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest

from conftest import FIXTURE, llama_logits
from quantkit.pipeline.convert import convert
from quantkit.errors import QuantkitError

Q = gguf.GGMLQuantizationType


def _read(path):
    r = gguf.GGUFReader(path)
    tensors = {t.name: (Q(t.tensor_type), bytes(t.data)) for t in r.tensors}
    md = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return tensors, md


@pytest.mark.parametrize("base,outtype", [("bf16", "Q4_K_M"), ("f32", "q8_0"), ("bf16", "Q3_K_M"), ("f16", "Q5_K_M")])
def test_gguf_source_equals_hf_source(tmp_path, fixture_gguf, base, outtype):
    """HF -> type and GGUF(base) -> type: identical tensors (types and bytes) and metadata.

    BF16 and F32 hold the fixture's bf16 weights exactly, so those give the very same file; F16 rounds
    the weights, so only the types are compared.
    """
    a = convert(FIXTURE, tmp_path / "hf.gguf", outtype)
    b = convert(fixture_gguf(base), tmp_path / "gg.gguf", outtype)
    ta, ma = _read(tmp_path / "hf.gguf")
    tb, mb = _read(tmp_path / "gg.gguf")
    assert a.nbytes == b.nbytes
    assert {n: t for n, (t, _) in ta.items()} == {n: t for n, (t, _) in tb.items()}
    if base != "f16":
        assert ta == tb
        # and the same file: metadata in the same order too (the README promises byte-identical results)
        assert (tmp_path / "hf.gguf").read_bytes() == (tmp_path / "gg.gguf").read_bytes()
    assert ma == mb


def test_quantised_source_is_refused_without_consent(tmp_path, fixture_gguf):
    src = fixture_gguf("q8_0")
    out = tmp_path / "q4.gguf"
    with pytest.raises(QuantkitError, match=r"already quantised.*--allow-requantize"):
        convert(src, out, "Q4_K_M")
    assert not out.exists()


def test_requantise_with_consent_warns_and_runs(tmp_path, fixture_gguf, caplog):
    out = tmp_path / "q4.gguf"
    with caplog.at_level("WARNING"):
        convert(fixture_gguf("q8_0"), out, "Q4_K_M", allow_requantize=True)
    assert "requantising" in caplog.text
    ref = convert(FIXTURE, tmp_path / "direct.gguf", "Q4_K_M")
    types, _ = _read(out)
    assert {n: t for n, (t, _) in types.items()} == {n: t for n, (t, _) in _read(tmp_path / "direct.gguf")[0].items()}
    assert out.stat().st_size == ref.nbytes
    ids = [1, 450, 1200, 33, 2900, 7, 15, 600]
    got, want = llama_logits(out, ids), llama_logits(fixture_gguf("f32"), ids)
    # twice-quantised still tracks the original: most argmaxes agree
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.75


def test_same_type_is_copied_and_dequantising_needs_no_consent(tmp_path, fixture_gguf):
    q8 = fixture_gguf("q8_0")
    convert(q8, tmp_path / "same.gguf", "q8_0")  # every quantised tensor keeps its type: a byte copy
    assert _read(tmp_path / "same.gguf")[0] == _read(q8)[0]
    convert(q8, tmp_path / "f32.gguf", "f32")
    t32, _ = _read(tmp_path / "f32.gguf")
    from gguf import quants

    t8 = {t.name: t for t in gguf.GGUFReader(q8).tensors}
    w = t8["blk.0.attn_q.weight"]
    want = quants.dequantize(w.data, Q.Q8_0)
    got = np.frombuffer(t32["blk.0.attn_q.weight"][1], dtype=np.float32).reshape(want.shape)
    assert np.array_equal(got, want)


def test_other_architectures_are_refused(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(QuantkitError, match=r"general.architecture is 'gpt2'"):
        convert(path, tmp_path / "out.gguf", "q8_0")
    assert not (tmp_path / "out.gguf").exists()


def test_cli_requantize_flag(tmp_path, fixture_gguf):
    qk = [sys.executable, "-m", "quantkit.cli"]
    out = tmp_path / "o.gguf"
    r = subprocess.run([*qk, "convert", str(fixture_gguf("q8_0")), "-o", str(out), "--type", "q4_k_m"], capture_output=True, text=True)
    assert r.returncode == 1 and "--allow-requantize" in r.stderr and not out.exists()
    r = subprocess.run([*qk, "convert", str(fixture_gguf("q8_0")), "-o", str(out), "--type", "q4_k_m", "--allow-requantize", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.exists()
    r = subprocess.run([*qk, "plan", str(fixture_gguf("bf16")), "--type", "q4_k_m", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
