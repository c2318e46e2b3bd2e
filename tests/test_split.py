"""Split GGUF sets: written as llama.cpp's ``llama-gguf-split --split`` writes them, read back as one model.

References: the single file of the same conversion (tensor bytes, llama.cpp logits, requantised bytes,
perplexity, importance matrix), llama.cpp's loader (it loads the set from the first part), and, where
a ``llama-gguf-split`` built from the vendored sources exists on this machine, its own split and merge.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import FIXTURE, llama_logits
from quantkit.cli.main import app
from quantkit.errors import GGUFFormatError, OutputError
from quantkit.format.gguf_read import read_gguf
from quantkit.format.gguf_write import SplitSpec, parse_split_size, split_layout
from quantkit.pipeline.convert import convert

MAX = "2M"  # the bf16 fixture (17 MB) in 15 parts (each stacked expert tensor is 1 MB)
IDS = [1, 450, 1200, 33, 2900, 7, 15, 600, 2048, 77]


def _invoke(args):
    return CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)


def _said(r) -> str:
    """The output as one line (rich wraps usage errors in a box)."""
    return " ".join(r.output.replace("│", " ").split())


@pytest.fixture(scope="module")
def split_set(tmp_path_factory):
    """The fixture as a bf16 split set of parts of at most 2 MB of tensor data (first part's path, all parts)."""
    d = tmp_path_factory.mktemp("split")
    r = convert(FIXTURE, d / "tiny.gguf", "bf16", split=SplitSpec(max_bytes=parse_split_size(MAX)))
    return Path(r.output), [Path(p) for p in r.parts]


def _copy_set(parts: list[Path], dst: Path) -> list[Path]:
    dst.mkdir()
    return [Path(shutil.copy(p, dst / p.name)) for p in parts]


# --- the layout rules, as llama-gguf-split's split_strategy applies them ----------------------------------------------

@pytest.mark.parametrize("sizes,spec,want", [
    ([10, 10, 10], SplitSpec(max_bytes=64), [2, 1]),  # each tensor counts padded to 32: 32 + 32 = 64 fits, a third does not
    ([32, 32, 1], SplitSpec(max_bytes=64), [2, 1]),  # exactly at the limit still fits
    ([33, 1], SplitSpec(max_bytes=64), [1, 1]),  # 33 pads to 64: the next one goes to a new part
    ([5] * 7, SplitSpec(max_tensors=3), [3, 3, 1]),  # a part starts at every 3rd tensor
    ([5] * 6, SplitSpec(max_tensors=3), [3, 3]),
    ([5] * 2, SplitSpec(max_tensors=3), [2]),  # everything fits: one part (still named -00001-of-00001)
])
def test_split_layout(sizes, spec, want):
    assert split_layout(sizes, spec) == want


def test_split_layout_refuses_a_tensor_larger_than_a_part():
    with pytest.raises(ValueError, match=r"'big' alone is 96 bytes, more than --split-max-size \(64 bytes\).*fix: raise"):
        split_layout([10, 70], SplitSpec(max_bytes=64), ["small", "big"])


@pytest.mark.parametrize("text,want", [("48G", 48 * 10**9), ("500M", 500 * 10**6), ("2m", 2 * 10**6), ("64K", 64000)])
def test_split_size_units_are_decimal(text, want):
    assert parse_split_size(text) == want


@pytest.mark.parametrize("text", ["1.5G", "0G", "-1M", "10", "G", "10T", "１０M"])
def test_split_size_refuses_what_llama_gguf_split_would_misread(text):
    with pytest.raises(ValueError, match="--split-max-size"):
        parse_split_size(text)


def test_split_options_are_exclusive_on_the_command_line(tmp_path):
    r = _invoke(["convert", FIXTURE, "-o", tmp_path / "m.gguf", "--split-max-size", "2M", "--split-max-tensors", "10"])
    assert r.exit_code == 2 and "one of --split-max-size and --split-max-tensors" in _said(r)
    r = _invoke(["convert", FIXTURE, "-o", tmp_path / "m.gguf", "--split-max-size", "1.5G"])
    assert r.exit_code == 2 and "positive whole number" in _said(r)
    assert list(tmp_path.iterdir()) == []


# --- the files --------------------------------------------------------------------------------------------------------

def test_parts_are_named_and_keyed_as_llama_gguf_split_writes_them(split_set, fixture_gguf):
    first, parts = split_set
    n = len(parts)
    assert n >= 5
    assert [p.name for p in parts] == [f"tiny-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    single = gguf.GGUFReader(fixture_gguf("bf16"))
    n_tensors = len(single.tensors)
    single_keys = [k for k in single.fields if not k.startswith("GGUF.")]
    T = gguf.GGUFValueType
    for i, p in enumerate(parts):
        r = gguf.GGUFReader(p)
        keys = [k for k in r.fields if not k.startswith("GGUF.")]
        split_keys = ["split.no", "split.tensors.count", "split.count"]  # llama-gguf-split's order (split.count set last)
        assert keys == (single_keys if i == 0 else []) + split_keys, p.name  # all metadata in the first part only
        assert [r.fields[k].types[0] for k in split_keys] == [T.UINT16, T.INT32, T.UINT16]
        assert [r.fields[k].contents() for k in split_keys] == [i, n_tensors, n]
        data = sum((int(t.n_bytes) + 31) // 32 * 32 for t in r.tensors)
        assert data <= parse_split_size(MAX), p.name  # tensor data of a part (padded) within the limit
    # the same tensors, in the same order, with the same bytes
    got = [(t.name, t.tensor_type, bytes(t.data)) for p in parts for t in gguf.GGUFReader(p).tensors]
    assert got == [(t.name, t.tensor_type, bytes(t.data)) for t in single.tensors]
    # the first part's metadata values equal the single file's
    r0 = gguf.GGUFReader(parts[0])
    for k in single_keys:
        assert r0.fields[k].contents() == single.fields[k].contents(), k


def test_llama_cpp_loads_the_set_with_the_same_logits(split_set, fixture_gguf):
    first, _ = split_set
    got, want = llama_logits(first, IDS), llama_logits(fixture_gguf("bf16"), IDS)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)  # the same weights, the same machine


def test_inspect_shows_the_set_as_one_model(split_set, fixture_gguf):
    first, parts = split_set
    r = _invoke(["inspect", first, "--json"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.output)
    s = json.loads(_invoke(["inspect", fixture_gguf("bf16"), "--json"]).output)
    assert j["totals"] == s["totals"] and j["groups"] == s["groups"]
    assert [(t["name"], t["type"], t["bytes"]) for t in j["tensors"]] == [(t["name"], t["type"], t["bytes"]) for t in s["tensors"]]
    assert j["file_bytes"] == sum(p.stat().st_size for p in parts)
    assert [p["path"] for p in j["parts"]] == [str(p) for p in parts]
    assert sum(p["tensors"] for p in j["parts"]) == len(j["tensors"])
    assert "warnings" not in j
    text = _said(_invoke(["inspect", first, "--no-tensors"]))
    assert f"split set of {len(parts)} parts" in text and parts[-1].name in text


def test_requantising_a_set_equals_requantising_the_single_file(split_set, fixture_gguf, tmp_path):
    first, _ = split_set
    a = convert(first, tmp_path / "from-split.gguf", "Q4_K_M")
    b = convert(fixture_gguf("bf16"), tmp_path / "from-single.gguf", "Q4_K_M")
    assert a.nbytes == b.nbytes
    assert (tmp_path / "from-split.gguf").read_bytes() == (tmp_path / "from-single.gguf").read_bytes()  # split.* keys dropped
    # and a split set of the requantised file: the single file's parts, as one would cut them
    c = convert(first, tmp_path / "q.gguf", "Q4_K_M", split=SplitSpec(max_tensors=10))
    assert len(c.parts) == 5
    got = [(t.name, bytes(t.data)) for p in c.parts for t in gguf.GGUFReader(p).tensors]
    assert got == [(t.name, bytes(t.data)) for t in gguf.GGUFReader(tmp_path / "from-single.gguf").tensors]


def test_eval_and_imatrix_read_the_set_like_the_single_file(split_set, fixture_gguf, tmp_path, monkeypatch):
    """eval ppl, eval kld and imatrix (with --all-experts, which reads expert weights from the parts) on the set."""
    from quantkit.evals.corpora import heldout_text
    from quantkit.evals.kld import base_logprobs, compare
    from quantkit.evals.perplexity import perplexity
    from quantkit.pipeline.imatrix_collect import collect_imatrix

    first, _ = split_set
    single = fixture_gguf("bf16")
    text = heldout_text()[:20000]
    assert perplexity(first, text, n_ctx=64, n_chunks=2, threads=2).ppl == pytest.approx(perplexity(single, text, n_ctx=64, n_chunks=2, threads=2).ppl, rel=1e-6)
    base = base_logprobs(single, text, 64, 2, threads=2, cache_dir=tmp_path / "kld")
    report = compare(base, first, text, threads=2)
    assert report["kld_mean"] < 1e-6 and report["same_top"] == 1.0
    a = collect_imatrix(first, text, n_ctx=64, n_chunks=1, all_experts=True, threads=2)
    b = collect_imatrix(single, text, n_ctx=64, n_chunks=1, all_experts=True, threads=2)
    assert sorted(a.entries) == sorted(b.entries)
    for name, e in b.entries.items():
        np.testing.assert_array_equal(a.entries[name].counts, e.counts, err_msg=name)
        np.testing.assert_allclose(a.entries[name].in_sum2, e.in_sum2, rtol=1e-6, err_msg=name)


# --- sets that llama.cpp would not load: one line naming the part ---------------------------------------------------

@pytest.mark.parametrize("command", ["inspect", "run", "convert"])
def test_a_missing_part_is_refused_naming_it(split_set, tmp_path, command):
    first, parts = split_set
    copies = _copy_set(parts, tmp_path / "set")
    copies[3].unlink()
    args = {"inspect": ["inspect", copies[0]], "run": ["run", copies[0], "-p", "hi", "-n", "2"],
            "convert": ["convert", copies[0], "-o", tmp_path / "out.gguf", "--type", "q8_0"]}[command]
    r = _invoke(args)
    assert r.exit_code == 1, r.output
    line = _said(r)
    assert f"{copies[3].name}: part 4 of {len(parts)} of the split set {copies[0].name} is missing" in line, r.output
    assert not (tmp_path / "out.gguf").exists()


def test_mismatched_parts_are_refused_naming_them(split_set, tmp_path):
    first, parts = split_set
    copies = _copy_set(parts, tmp_path / "set")
    shutil.copy(copies[1], copies[2])  # part 2 where part 3 belongs
    with pytest.raises(GGUFFormatError, match=rf"{copies[2].name}: metadata split.no = 1, expected 2: a mismatched part"):
        read_gguf(copies[0])
    # a part of another cut of the same model: the counts disagree
    other = convert(FIXTURE, tmp_path / "other.gguf", "bf16", split=SplitSpec(max_tensors=5))
    shutil.copy(parts[2], copies[2])
    shutil.copy(other.parts[4], copies[4])
    with pytest.raises(GGUFFormatError, match=rf"{copies[4].name}: metadata split.count = {len(other.parts)}, expected {len(parts)}"):
        read_gguf(copies[0])


def test_a_later_part_or_a_renamed_first_part_is_refused(split_set, tmp_path):
    first, parts = split_set
    with pytest.raises(GGUFFormatError, match=rf"part 2 of a split set of {len(parts)} parts; fix: pass the first part \({first.name}\)"):
        read_gguf(parts[1])
    renamed = tmp_path / "model.gguf"
    shutil.copy(first, renamed)
    with pytest.raises(GGUFFormatError, match=rf"must be named PREFIX-00001-of-{len(parts):05d}.gguf \(llama.cpp finds the other parts by that name\)"):
        read_gguf(renamed)
    r = _invoke(["run", renamed, "-p", "hi"])  # refused before llama.cpp, which would look for the parts and fail
    assert r.exit_code == 1 and "PREFIX-00001-of" in r.output


# --- writing: atomic as a set, --force, free space -------------------------------------------------------------------

def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_an_interruption_leaves_no_part_behind(tmp_path, exc):
    """Interrupted in the last part: the complete earlier parts go too."""
    seen = []

    def boom(name):
        seen.append(name)
        if name == "output.weight":  # the last tensor: every earlier part is complete by then
            raise exc

    with pytest.raises(KeyboardInterrupt if exc is KeyboardInterrupt else OutputError):
        convert(FIXTURE, tmp_path / "m.gguf", "bf16", split=SplitSpec(max_bytes=parse_split_size(MAX)), on_tensor=boom)
    assert len(seen) > 30
    assert _files(tmp_path) == []


def test_an_interruption_while_renaming_leaves_no_part_behind(tmp_path, monkeypatch):
    import quantkit.format.output as output

    calls = []
    real = os.replace

    def replace(a, b):
        calls.append(b)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(a, b)

    monkeypatch.setattr(output.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        convert(FIXTURE, tmp_path / "m.gguf", "bf16", split=SplitSpec(max_bytes=parse_split_size(MAX)))
    assert len(calls) == 3 and _files(tmp_path) == []


def test_existing_parts_need_force(split_set, tmp_path):
    _, parts = split_set
    (tmp_path / parts[2].name.replace("tiny", "m")).write_bytes(b"precious")
    r = _invoke(["convert", FIXTURE, "-o", tmp_path / "m.gguf", "--type", "bf16", "--split-max-size", MAX])
    assert r.exit_code == 1 and f"m-00003-of-{len(parts):05d}.gguf: already exists" in _said(r) and "--force" in r.output
    assert _files(tmp_path) == [f"m-00003-of-{len(parts):05d}.gguf"]
    r = _invoke(["convert", FIXTURE, "-o", tmp_path / "m.gguf", "--type", "bf16", "--split-max-size", MAX, "--force", "--json"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.output)
    assert _files(tmp_path) == [p.name.replace("tiny", "m") for p in parts]
    assert j["output"] == str(tmp_path / f"m-00001-of-{len(parts):05d}.gguf") and len(j["parts"]) == len(parts)
    assert j["bytes"] == sum(p.stat().st_size for p in parts)


def test_free_space_is_checked_for_the_whole_set(tmp_path, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: Usage(10**9, 0, 5 * 10**6))  # room for a third of the set
    with pytest.raises(OutputError, match="the output needs"):
        convert(FIXTURE, tmp_path / "m.gguf", "bf16", split=SplitSpec(max_bytes=parse_split_size(MAX)))
    assert _files(tmp_path) == []


# --- llama.cpp's own tool, where it was built on this machine ---------------------------------------------------------

def local_gguf_split() -> Path | None:
    """llama-gguf-split built from the vendored llama.cpp: $QK_LLAMA_GGUF_SPLIT, the venv's (make setup builds it), or
    make bench's beside its llama-imatrix (conftest.llama_tool: under CI a missing one fails the test)."""
    from conftest import llama_tool

    return llama_tool("llama-gguf-split", "QK_LLAMA_GGUF_SPLIT")


@pytest.mark.parametrize("flags,spec", [(["--split-max-size", MAX], SplitSpec(max_bytes=2 * 10**6)), (["--split-max-tensors", "7"], SplitSpec(max_tensors=7))])
def test_parts_equal_llama_gguf_split_and_its_merge_gives_the_single_file(fixture_gguf, tmp_path, flags, spec):
    """Skipped unless llama-gguf-split exists (make setup builds it, or $QK_LLAMA_GGUF_SPLIT); under CI a missing one fails."""
    exe = local_gguf_split()
    if exe is None:
        pytest.skip("no llama-gguf-split built on this machine (make setup builds one into .venv/bin; or set QK_LLAMA_GGUF_SPLIT)")
    single = fixture_gguf("bf16")
    ours = convert(FIXTURE, tmp_path / "ours.gguf", "bf16", split=spec)
    (tmp_path / "theirs").mkdir()
    r = subprocess.run([str(exe), "--split", *flags, str(single), str(tmp_path / "theirs" / "ours")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = sorted((tmp_path / "theirs").iterdir())
    assert [p.name for p in theirs] == [Path(p).name for p in ours.parts]
    for a, b in zip(ours.parts, theirs):
        assert Path(a).read_bytes() == b.read_bytes(), b.name  # byte for byte
    r = subprocess.run([str(exe), "--merge", ours.parts[0], str(tmp_path / "merged.gguf")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    # llama-gguf-split --merge keeps the split keys (split.count = 0): everything else is the single file's
    merged, ref = read_gguf(tmp_path / "merged.gguf", full=True), read_gguf(single, full=True)
    kept = {k: v for k, v in merged.metadata.items() if not k.startswith("split.")}
    assert list(kept) == list(ref.metadata) and merged.metadata["split.count"] == 0
    for k, v in kept.items():
        assert np.array_equal(v, ref.metadata[k]) if isinstance(v, np.ndarray) else v == ref.metadata[k], k
    assert [(t.name, t.ne, t.qtype, t.offset) for t in merged.tensors] == [(t.name, t.ne, t.qtype, t.offset) for t in ref.tensors]
    with open(merged.path, "rb") as f, open(single, "rb") as g:
        f.seek(merged.data_offset)
        g.seek(ref.data_offset)
        assert f.read() == g.read()  # the tensor data section, padding included


def test_split_keys_must_have_llama_cpps_types_and_counts(split_set, tmp_path):
    """llama.cpp reads split.count / split.no as UINT16 and split.tensors.count as INT32, and checks the total."""
    from quantkit.format.gguf_spec import GGUFValueType as V
    from quantkit.format.gguf_write import MetaValue, encode_header

    odd = tmp_path / "odd-00001-of-00002.gguf"
    odd.write_bytes(encode_header("llama", {"split.count": MetaValue(2, V.UINT32)}, []))
    with pytest.raises(GGUFFormatError, match="split.count has type UINT32, llama.cpp reads it as UINT16"):
        read_gguf(odd)
    _, parts = split_set
    copies = _copy_set(parts, tmp_path / "set")
    key = b"split.tensors.count" + struct.pack("<I", V.INT32)
    for p in copies:  # every part agrees on a total that is one too many
        raw = bytearray(p.read_bytes())
        at = raw.index(key) + len(key)
        raw[at : at + 4] = struct.pack("<i", struct.unpack_from("<i", raw, at)[0] + 1)
        p.write_bytes(bytes(raw))
    with pytest.raises(GGUFFormatError, match=rf"split.tensors.count = 44, the {len(parts)} parts hold 43 tensors"):
        read_gguf(copies[0])


def test_model_identity_covers_every_part(tmp_path):
    """The SHA-256 in eval reports and the KLD base cache key hash every part of a split set, not only the first."""
    from quantkit.evals.kld import model_identity
    from quantkit.evals.perplexity import model_sha256, sha256_file

    one, two = tmp_path / "m-00001-of-00002.gguf", tmp_path / "m-00002-of-00002.gguf"
    one.write_bytes(b"first part")
    two.write_bytes(b"second part")
    before = model_sha256(one)
    assert before == model_identity(one) != sha256_file(one)
    two.write_bytes(b"second part, changed")
    assert model_sha256(one) != before
    single = tmp_path / "m.gguf"
    single.write_bytes(b"first part")
    assert model_sha256(single) == sha256_file(single)  # a single file: its own digest, as before
