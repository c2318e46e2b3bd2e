"""Importance matrices: llama.cpp's file format, collection as llama-imatrix does it, quantisation as llama-quantize does it.

References: ``evals/reference/imatrix-fixture.gguf``, written by llama-imatrix
itself on the BF16 fixture (``evals/reference/make_refs.sh``; command and
SHA-256 of model and text in the ``.json`` beside it), and
``llama_cpp.llama_model_quantize`` (llama-quantize in process) handed the same
weights through ``params.imatrix`` as quantize.cpp's ``load_imatrix`` computes
them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import FIXTURE, ROOT, fused_copy, read_config
from quantkit.cli.main import app
from quantkit.errors import QuantkitError
from quantkit.policy.imatrix import Entry, Imatrix, check_matches, coverage, expert_weights, read_imatrix, write_imatrix
from quantkit.pipeline.imatrix_collect import collect_imatrix

Q = gguf.GGMLQuantizationType
REF = ROOT / "evals" / "reference" / "imatrix-fixture.gguf"
REF_META = json.loads((ROOT / "evals" / "reference" / "imatrix-fixture.json").read_text())
CTX, CHUNKS = 64, 3  # our own collections (the reference uses REF_META's)


@pytest.fixture(scope="module")
def text():
    from quantkit.evals.corpora import heldout_text

    return heldout_text()


@pytest.fixture(scope="module")
def ref():
    return read_imatrix(REF)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(text[:20000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def routed(fixture_gguf, text):
    return collect_imatrix(fixture_gguf("bf16"), text, n_ctx=CTX, n_chunks=CHUNKS, threads=2)


@pytest.fixture(scope="module")
def every(fixture_gguf, text):
    return collect_imatrix(fixture_gguf("bf16"), text, n_ctx=CTX, n_chunks=CHUNKS, threads=2, all_experts=True)


def _one_line_error(e: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg and "fix:" in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


# --------------------------------------------------------------------------- the file format


def test_reference_file_round_trips_byte_for_byte(ref, tmp_path):
    """Read llama-imatrix's file and write it back: the same bytes (keys, names, shapes, order, padding)."""
    out = write_imatrix(ref, tmp_path / "again.gguf")
    assert out.read_bytes() == REF.read_bytes()
    assert ref.chunk_count == REF_META["n_chunks"] and ref.chunk_size == REF_META["n_ctx"] and ref.datasets == ("heldout.txt",)


def test_written_file_has_the_names_and_shapes_llama_cpp_reads(tmp_path):
    rng = np.random.default_rng(0)
    im = Imatrix(
        {
            "blk.0.attn_q.weight": Entry(rng.random((1, 32), dtype=np.float32), np.array([40], dtype=np.float32)),
            "blk.0.ffn_down_exps.weight": Entry(rng.random((4, 64), dtype=np.float32), np.array([3, 0, 20, 17], dtype=np.float32)),
        },
        datasets=("a.txt", "b.txt"), chunk_count=2, chunk_size=20,
    )
    path = write_imatrix(im, tmp_path / "im.gguf")
    r = gguf.GGUFReader(path)
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.datasets"].contents() == ["a.txt", "b.txt"]
    assert r.fields["imatrix.chunk_count"].contents() == 2 and r.fields["imatrix.chunk_size"].contents() == 20
    assert "general.architecture" not in r.fields  # llama-imatrix writes none
    shapes = {t.name: ([int(d) for d in t.shape], t.tensor_type) for t in r.tensors}
    assert shapes == {  # ggml order, ne0 first; one matrix drops the trailing 1 as ggml_n_dims does
        "blk.0.attn_q.weight.in_sum2": ([32], Q.F32),
        "blk.0.attn_q.weight.counts": ([1], Q.F32),
        "blk.0.ffn_down_exps.weight.in_sum2": ([64, 4], Q.F32),
        "blk.0.ffn_down_exps.weight.counts": ([1, 4], Q.F32),
    }
    back = read_imatrix(path)
    for name, e in im.entries.items():
        np.testing.assert_array_equal(back.entries[name].in_sum2, e.in_sum2)
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)
    with pytest.raises(QuantkitError, match="already exists"):
        write_imatrix(im, path)


def test_weights_are_what_llama_quantize_computes():
    """quantize.cpp load_imatrix: sums / lround(count) per expert, 1.0 for an expert that saw nothing."""
    sums = np.arange(1, 13, dtype=np.float32).reshape(4, 3) * np.float32(1.7)
    im = Imatrix({"w": Entry(sums, np.array([0, 2.4, 2.5, 7], dtype=np.float32))})
    got = im.weights("w")
    want = np.stack([np.ones(3, np.float32), sums[1] / np.float32(2), sums[2] / np.float32(3), sums[3] / np.float32(7)])
    np.testing.assert_array_equal(got, want)  # 2.5 rounds away from zero, as std::lround does
    assert got.dtype == np.float32 and im.weights("missing") is None


def _legacy_bytes(entries: list[tuple[str, int, np.ndarray]], trailer: tuple[int, str] | None = (5, "calib.txt")) -> bytes:
    b = struct.pack("<i", len(entries))
    for name, ncall, vals in entries:
        b += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, vals.size) + vals.astype("<f4").tobytes()
    if trailer:
        b += struct.pack("<ii", trailer[0], len(trailer[1])) + trailer[1].encode()
    return b


def test_legacy_dat_file(tmp_path):
    """The pre-GGUF format: values already divided by the counts and times ncall; llama-quantize divides by ncall."""
    vals = np.linspace(1, 2, 8, dtype=np.float32)
    path = tmp_path / "imatrix.dat"
    path.write_bytes(_legacy_bytes([("blk.0.attn_q.weight", 4, vals), ("blk.0.attn_k.weight", 0, vals)]))
    im = read_imatrix(path)
    assert im.legacy and im.chunk_count == 5 and im.datasets == ("calib.txt",)
    np.testing.assert_array_equal(im.weights("blk.0.attn_q.weight"), (vals / np.float32(4)).reshape(1, -1))
    np.testing.assert_array_equal(im.weights("blk.0.attn_k.weight"), vals.reshape(1, -1))  # ncall 0: kept as is
    assert coverage(im, 100) == []
    check_matches(im, {"blk.0.attn_q.weight": (2, 5, 4), "blk.0.attn_k.weight": (8, 8)}, "model")  # sizes only: 2 experts x 4 = 8
    np.testing.assert_array_equal(expert_weights(im, "blk.0.attn_q.weight", (2, 5, 4)), (vals / np.float32(4)).reshape(2, 4))
    with pytest.raises(QuantkitError, match="legacy"):
        write_imatrix(im, tmp_path / "x.gguf")
    path.write_bytes(_legacy_bytes([("blk.0.attn_q.weight", 4, vals)])[:-3])
    with pytest.raises(QuantkitError) as e:
        read_imatrix(path)
    _one_line_error(e, str(path), "neither a GGUF importance matrix nor a legacy .dat one")


@pytest.mark.parametrize("case", ["missing", "garbage", "empty", "truncated", "model gguf", "no metadata"])
def test_unreadable_imatrix_is_one_line(fixture_gguf, tmp_path, case):
    path = tmp_path / "im.gguf"
    if case == "garbage":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(REF.read_bytes()[: REF.stat().st_size // 2])
    elif case == "model gguf":
        path = fixture_gguf("bf16")
    elif case == "no metadata":
        w = gguf.GGUFWriter(path, arch="")
        w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones(8, np.float32))
        w.add_tensor("blk.0.attn_q.weight.counts", np.ones(1, np.float32))
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(QuantkitError) as e:
        read_imatrix(path)
    _one_line_error(e, str(path))


# --------------------------------------------------------------------------- collection


#: Relative tolerance of the sums against the committed reference.  llama.cpp's floating point differs
#: across CPU kinds: the reference was made by llama-imatrix on one x86_64 machine; on an AMD EPYC
#: (AVX-512) build, llama-imatrix and quantkit (bit-identical to each other there) differ from it by at
#: most 5.1e-3 relative (blk.3.ffn_down_exps; 7e-4 or less elsewhere), the activations' rounding in
#: ggml's SIMD matmuls.  1e-2 holds that with a margin and still catches a wrong tensor, expert or token
#: (those move sums by tens of percent).  Counts are routing decisions: exact on both.
REF_RTOL = 1e-2


def _collect_like_the_reference(fixture_gguf, text) -> Imatrix:
    from quantkit.evals.perplexity import sha256_file, sha256_text

    model = fixture_gguf("bf16")
    if sha256_file(model) != REF_META["model_sha256"]:
        pytest.fail("the converter's BF16 output changed since the reference was made; regenerate it: evals/reference/make_refs.sh WORK imatrix")
    assert sha256_text(text) == REF_META["text_sha256"]
    return collect_imatrix(model, text.removesuffix("\n"), n_ctx=REF_META["n_ctx"], n_chunks=REF_META["n_chunks"], threads=2, dataset="heldout.txt")


def test_collection_matches_llama_imatrix(fixture_gguf, text, ref):
    """The same GGUF bytes and text, llama-imatrix's settings: every count as llama-imatrix wrote it, every sum within REF_RTOL."""
    ours = _collect_like_the_reference(fixture_gguf, text)
    assert sorted(ours.entries) == sorted(ref.entries)
    assert (ours.chunk_count, ours.chunk_size, ours.datasets) == (ref.chunk_count, ref.chunk_size, ref.datasets)
    for name, e in ref.entries.items():
        np.testing.assert_array_equal(ours.entries[name].counts, e.counts, err_msg=name)
        np.testing.assert_allclose(ours.entries[name].in_sum2, e.in_sum2, rtol=REF_RTOL, atol=0, err_msg=name)


def local_llama_imatrix() -> Path | None:
    """A llama-imatrix built on this machine: $QK_LLAMA_IMATRIX, the venv's (make setup builds it), or where
    evals/reference/make_refs.sh (make bench) builds it (conftest.llama_tool: under CI a missing one fails the test)."""
    from conftest import llama_tool

    return llama_tool("llama-imatrix", "QK_LLAMA_IMATRIX")


def test_collection_is_bit_identical_to_a_local_llama_imatrix(fixture_gguf, text, tmp_path):
    """Against llama-imatrix built from the same llama.cpp sources on this CPU: every sum and count, bit for bit.

    Skipped unless such a binary exists ($QK_LLAMA_IMATRIX, make setup's .venv/bin, or make bench's build under $BENCH_WORK);
    the tolerance test above runs everywhere.
    """
    import subprocess

    exe = local_llama_imatrix()
    if exe is None:
        pytest.skip("no llama-imatrix built on this machine (make setup builds one into .venv/bin; or set QK_LLAMA_IMATRIX)")
    model = fixture_gguf("bf16")
    (tmp_path / "heldout.txt").write_text(text, encoding="utf-8")  # llama-imatrix's -f drops the trailing newline itself
    n_ctx, n_chunks = REF_META["n_ctx"], REF_META["n_chunks"]
    r = subprocess.run([str(exe), "-m", str(model), "-f", "heldout.txt", "-c", str(n_ctx), "-b", str(n_ctx), "--chunks", str(n_chunks), "-t", "2", "-o", "local.gguf"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = read_imatrix(tmp_path / "local.gguf")
    ours = collect_imatrix(model, text.removesuffix("\n"), n_ctx=n_ctx, n_chunks=n_chunks, threads=2, dataset="heldout.txt")
    assert sorted(ours.entries) == sorted(theirs.entries)
    assert (ours.chunk_count, ours.chunk_size, ours.datasets) == (theirs.chunk_count, theirs.chunk_size, theirs.datasets)
    for name, e in theirs.entries.items():
        np.testing.assert_array_equal(ours.entries[name].counts, e.counts, err_msg=name)
        np.testing.assert_array_equal(ours.entries[name].in_sum2, e.in_sum2, err_msg=name)
    assert write_imatrix(ours, tmp_path / "ours.gguf").read_bytes() == (tmp_path / "local.gguf").read_bytes()


def test_ggml_tensor_layout_against_the_gguf(fixture_gguf):
    """GGMLTensor's ne / type / src agree with libggml's accessors and with the weights' shapes in the file."""
    from quantkit.engine.session import GGMLTensor, EvalSession, _ggml_fns, check_tensor_layout
    from quantkit.format.gguf_read import read_gguf

    path = fixture_gguf("bf16")
    seen: dict[str, tuple] = {}
    so = _ggml_fns()

    def on_tensor(t: int, ask: bool) -> bool:
        op = so.ggml_op_desc(t)
        if ask:
            return op in (b"MUL_MAT", b"MUL_MAT_ID")
        node = GGMLTensor.from_address(t)
        for p in (t, node.src[0], node.src[1]):
            check_tensor_layout(p)
        w = GGMLTensor.from_address(node.src[0])
        ids = GGMLTensor.from_address(node.src[2]) if op == b"MUL_MAT_ID" else None
        seen[w.name.decode()] = (tuple(w.ne), w.type, None if ids is None else (ids.type, ids.ne[0]))
        return True

    s = EvalSession(path, 32, threads=2, on_tensor=on_tensor)
    s.eval_chunk(s.tokenize("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer")[:32])
    s.close()
    infos = {t.name: t for t in read_gguf(path).tensors}
    weights = {n: v for n, v in seen.items() if n in infos}
    assert {"blk.0.attn_q.weight", "blk.3.ffn_down_exps.weight", "blk.2.ffn_gate_inp.weight"} <= set(weights)
    for name, (ne, ttype, ids) in weights.items():
        assert ne[: len(infos[name].ne)] == infos[name].ne and ttype == infos[name].qtype, name
        if "_exps" in name:
            assert ids == (26, read_config(FIXTURE)["num_experts_per_tok"]), name  # I32 ids, top-k per token


def test_counts_follow_the_router(routed):
    top_k = read_config(FIXTURE)["num_experts_per_tok"]
    n_tokens = CTX * CHUNKS
    assert routed.chunk_count == CHUNKS and routed.n_tokens == n_tokens
    for name, e in routed.entries.items():
        if "_exps" in name:
            assert e.counts.sum() == n_tokens * top_k, name
            np.testing.assert_array_equal(e.counts, routed.entries[name.replace(name.split(".")[2], "ffn_up_exps")].counts)
        else:
            assert e.counts.tolist() == [n_tokens], name


def test_all_experts_covers_every_expert(routed, every):
    n_tokens = CTX * CHUNKS
    for name, e in every.entries.items():
        if "_exps" in name:
            assert (e.counts == n_tokens).all(), name
            assert (e.in_sum2.sum(axis=1) > 0).all(), name
        else:  # dense tensors: the same computation, the same bits
            np.testing.assert_array_equal(e.in_sum2, routed.entries[name].in_sum2, err_msg=name)
    for layer in range(read_config(FIXTURE)["num_hidden_layers"]):
        # gate/up see the router's input, ffn_norm(x), for every token: every expert's row is the router's sums
        router = every.entries[f"blk.{layer}.ffn_gate_inp.weight"].in_sum2[0]
        for kind in ("gate", "up"):
            np.testing.assert_allclose(every.entries[f"blk.{layer}.ffn_{kind}_exps.weight"].in_sum2, np.broadcast_to(router, (8, router.size)), rtol=1e-5)
    assert coverage(every, n_tokens) == [] and coverage(routed, n_tokens) != []


def test_all_experts_down_inputs_are_llama_cpps(fixture_gguf, text):
    """For the tokens the router did send to an expert, the numpy ffn_down input equals llama.cpp's (to activation rounding)."""
    from quantkit.engine.session import EvalSession, tensor_array
    from quantkit.pipeline.imatrix_collect import _Collector, _ExpertWeights

    path = fixture_gguf("bf16")
    captured: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    class Capture(_Collector):
        def _mul_mat_id(self, name, node, src0):
            captured[name] = (tensor_array(node.src[1])[0].copy(), tensor_array(node.src[2])[0, 0].copy())
            super()._mul_mat_id(name, node, src0)

    s = EvalSession(path, CTX, threads=2, on_tensor=Capture())
    s.eval_chunk(s.tokenize(text[:2000])[:CTX])
    s.close()
    experts = _ExpertWeights(path)
    for layer in range(read_config(FIXTURE)["num_hidden_layers"]):
        x, _ = captured[f"blk.{layer}.ffn_gate_exps.weight"]
        down, ids = captured[f"blk.{layer}.ffn_down_exps.weight"]
        for e in range(8):
            g = x[:, 0] @ experts.matrix(f"blk.{layer}.ffn_gate_exps.weight", e).T
            u = x[:, 0] @ experts.matrix(f"blk.{layer}.ffn_up_exps.weight", e).T
            rows, slots = np.nonzero(ids == e)
            want = down[rows, slots]
            got = (g / (1 + np.exp(-g)) * u)[rows]
            assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max(), (layer, e)


def test_all_experts_flushes_in_batches(fixture_gguf, text, every, monkeypatch):
    """Running the experts after every chunk instead of once at the end: the same statistics (up to summation order)."""
    import quantkit.pipeline.imatrix_collect as imatrix

    monkeypatch.setattr(imatrix, "FLUSH_BYTES", 1)
    often = collect_imatrix(fixture_gguf("bf16"), text, n_ctx=CTX, n_chunks=CHUNKS, threads=2, all_experts=True)
    for name, e in every.entries.items():
        np.testing.assert_array_equal(often.entries[name].counts, e.counts, err_msg=name)
        np.testing.assert_allclose(often.entries[name].in_sum2, e.in_sum2, rtol=1e-5, err_msg=name)


def test_all_experts_on_a_quantised_gguf(fixture_gguf, text, every):
    """Q8_0 experts are dequantised for the numpy ffn_down inputs: statistics within Q8_0's noise of the BF16 ones."""
    q8 = collect_imatrix(fixture_gguf("q8_0"), text, n_ctx=CTX, n_chunks=CHUNKS, threads=2, all_experts=True)
    for name, e in every.entries.items():
        np.testing.assert_array_equal(q8.entries[name].counts, e.counts, err_msg=name)
        assert np.abs(q8.entries[name].in_sum2 - e.in_sum2).max() <= 2e-2 * np.abs(e.in_sum2).max(), name


def test_collection_needs_enough_text(fixture_gguf):
    with pytest.raises(QuantkitError, match=r"needs at least 1024 \(2 x --ctx 512\)"):
        collect_imatrix(fixture_gguf("bf16"), "too short", n_ctx=512)


# --------------------------------------------------------------------------- quantising with it, against llama-quantize


def llama_quantize(src, out, preset: str, im: Imatrix | None) -> None:
    import llama_cpp

    from conftest import llama_quantize_imatrix, llama_quantize_run

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}")
    params.nthread = 2
    keep: list = []
    if im is not None:  # as quantize.cpp builds it from load_imatrix's vectors
        params.imatrix, keep = llama_quantize_imatrix(im)
    rc, log = llama_quantize_run(src, out, params)
    assert rc == 0, f"llama_model_quantize {preset} failed: {log[-2000:]}"


def tensors_of(path) -> dict[str, tuple[Q, bytes]]:
    return {t.name: (Q(t.tensor_type), t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q2_K_S", pytest.param("IQ3_XXS", marks=pytest.mark.slow)])
def test_quantised_bytes_equal_llama_quantize_with_the_same_imatrix(fixture_gguf, ref, tmp_path, preset):
    """Q2_K_S and IQ3_XXS cannot be written without an imatrix; Q4_K_M can, and the imatrix changes its bytes."""
    from quantkit.pipeline.convert import convert

    ours = convert(FIXTURE, tmp_path / "ours.gguf", preset, imatrix=ref).output
    llama_quantize(fixture_gguf("bf16"), tmp_path / "llama.gguf", preset, ref)
    a, b = tensors_of(ours), tensors_of(tmp_path / "llama.gguf")
    assert a.keys() == b.keys()
    differ = [n for n in a if a[n] != b[n]]
    assert not differ, f"{len(differ)} tensors differ from llama-quantize's, e.g. {differ[0]} ({a[differ[0]][0].name} vs {b[differ[0]][0].name})"
    md = gguf.GGUFReader(ours).fields
    assert md["quantize.imatrix.entries_count"].contents() == len(ref.entries) and md["quantize.imatrix.file"].contents() == str(REF)
    if preset == "Q4_K_M":
        plain = tensors_of(convert(FIXTURE, tmp_path / "plain.gguf", preset).output)
        changed = {n for n in a if a[n] != plain[n]}
        weighted = {n for n in ref.entries if a[n][0] not in (Q.F32, Q.Q8_0)}  # ggml's Q8_0 kernel takes no weights
        assert "blk.0.ffn_down_exps.weight" in weighted and weighted <= changed
        assert "output.weight" not in changed and "token_embd.weight" not in changed  # no entries: as without


def test_fused_expert_sources_use_each_experts_own_weights(ref, tmp_path):
    """A fused 3-D source is split per expert: the bytes equal those from one source per expert."""
    from quantkit.pipeline.convert import convert

    fused = fused_copy(FIXTURE, tmp_path / "fused")
    a = tensors_of(convert(FIXTURE, tmp_path / "per-expert.gguf", "Q4_K_M", imatrix=ref).output)
    b = tensors_of(convert(fused, tmp_path / "fused.gguf", "Q4_K_M", imatrix=ref).output)
    assert a == b


# --------------------------------------------------------------------------- the wrong imatrix


def _variant(ref: Imatrix, rename: dict[str, str] | None = None, drop: str | None = None, cols: str | None = None) -> Imatrix:
    entries = {}
    for name, e in ref.entries.items():
        if name == drop:
            continue
        if name == cols:
            e = Entry(e.in_sum2[:, :128].copy(), e.counts)
        entries[(rename or {}).get(name, name)] = e
    return Imatrix(entries, ref.datasets, ref.chunk_count, ref.chunk_size, "other.gguf")


@pytest.mark.parametrize("how", ["names", "columns"])
def test_imatrix_of_another_model_is_refused_and_nothing_written(ref, tmp_path, how):
    from quantkit.pipeline.convert import convert

    if how == "names":  # a model with more layers
        im, needle = _variant(ref, rename={"blk.3.attn_q.weight": "blk.31.attn_q.weight"}), "'blk.31.attn_q.weight' names no tensor"
    else:  # a model with narrower layers
        im, needle = _variant(ref, cols="blk.1.ffn_up_exps.weight"), "'blk.1.ffn_up_exps.weight' has 8 x 128 (experts x columns), the tensor in"
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(QuantkitError) as e:
        convert(FIXTURE, out / "m.gguf", "Q4_K_M", imatrix=im)
    _one_line_error(e, "other.gguf", needle, "another model")
    assert list(out.iterdir()) == []


def test_partial_imatrix_warns_and_refuses_types_that_need_weights(ref, caplog):
    from quantkit.pipeline.convert import prepare
    from quantkit.policy.plan import Override

    partial = _variant(ref, drop="blk.0.attn_q.weight")
    ckpt, prep = prepare(FIXTURE, "Q4_K_M", imatrix=partial)
    ckpt.close()
    assert "no entry for 2 weight matrices" in caplog.text and "blk.0.attn_q.weight" in caplog.text  # + output.weight
    with pytest.raises(QuantkitError) as e:
        prepare(FIXTURE, "Q4_K_M", overrides=[Override.parse(r"blk\.0\.attn_q", "iq3_xxs")], imatrix=partial)
    _one_line_error(e, "other.gguf", "no entry for 'blk.0.attn_q.weight', which gets IQ3_XXS")
    with pytest.raises(QuantkitError) as e:  # IQ2_XXS's kernel would abort the process without weights
        prepare(FIXTURE, "f16", overrides=[Override.parse(r"blk\.0\.attn_q", "iq2_xxs")])
    _one_line_error(e, "'blk.0.attn_q.weight' gets IQ2_XXS, which needs an importance matrix")


# --------------------------------------------------------------------------- CLI


def test_cli_imatrix_writes_a_file_and_reports_coverage(fixture_gguf, text_file, tmp_path):
    out = tmp_path / "im.gguf"
    args = ["imatrix", str(fixture_gguf("bf16")), "--text", str(text_file), "-o", str(out), "--ctx", str(CTX), "--chunks", "2", "--min-tokens", "40", "--threads", "2"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    j = json.loads(result.stdout)
    assert j["chunks"] == 2 and j["chunk_size"] == CTX and j["tokens"] == 2 * CTX and j["entries"] == 32
    assert j["coverage"]["min_tokens"] == 40 and j["coverage"]["expert_matrices"] == 4 * 3 * 8
    below = j["coverage"]["below"]
    assert below and all(r["tokens"] < 40 and r["tensor"].startswith(f"blk.{r['layer']}.") for r in below)
    im = read_imatrix(out)
    assert len(coverage(im, 40)) == len(below) and im.datasets == (str(text_file),)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "already exists" in again.output and "--force" in again.output
    text_run = CliRunner().invoke(app, [*args, "--force"], terminal_width=200)
    assert text_run.exit_code == 0 and "expert matrices saw fewer than 40 tokens" in text_run.output


def test_cli_imatrix_from_a_hugging_face_directory(fixture_gguf, text_file, tmp_path):
    """An HF directory is converted to a temporary BF16 GGUF (removed afterwards): the same statistics as from that GGUF."""
    out = tmp_path / "hf.gguf"
    result = CliRunner().invoke(app, ["imatrix", str(FIXTURE), "--text", str(text_file), "-o", str(out), "--ctx", str(CTX), "--chunks", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf.gguf"]
    body = text_file.read_text(encoding="utf-8").removesuffix("\n")
    direct = collect_imatrix(fixture_gguf("bf16"), body, n_ctx=CTX, n_chunks=2, threads=2)
    got = read_imatrix(out)
    for name, e in direct.entries.items():
        np.testing.assert_array_equal(got.entries[name].in_sum2, e.in_sum2, err_msg=name)


def test_cli_convert_and_plan_with_imatrix(fixture_gguf, tmp_path):
    out = tmp_path / "q.gguf"
    refused = CliRunner().invoke(app, ["convert", str(FIXTURE), "-o", str(out), "--type", "Q2_K_S"])
    assert refused.exit_code == 1 and "needs an importance matrix" in refused.output and not out.exists()
    result = CliRunner().invoke(app, ["convert", str(FIXTURE), "-o", str(out), "--type", "Q2_K_S", "--imatrix", str(REF), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"] == str(out) and out.exists()
    plan = CliRunner().invoke(app, ["plan", str(FIXTURE), "--type", "IQ3_XXS", "--imatrix", str(REF), "--json"])
    assert plan.exit_code == 0, plan.output
    rows = {r["name"]: r for r in json.loads(plan.stdout)["tensors"]}
    assert "attn_v gets IQ3_XXS (imatrix)" in rows["blk.0.attn_v.weight"]["why"]  # then the 8-expert bump to Q8_0
    assert rows["blk.0.ffn_down_exps.weight"]["type"] == "IQ3_XXS"  # Q3_K without an imatrix


@pytest.mark.parametrize("content", [b"not an imatrix at all", None])
def test_cli_bad_imatrix_is_one_line_and_writes_nothing(tmp_path, content):
    bad = tmp_path / "bad.imatrix"
    if content is not None:
        bad.write_bytes(content)
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(app, ["convert", str(FIXTURE), "-o", str(out / "m.gguf"), "--type", "Q4_K_M", "--imatrix", str(bad)])
    assert result.exit_code == 1, result.output
    msg = result.output.strip()
    assert msg.startswith("error:") and len(msg.splitlines()) == 1 and str(bad) in " ".join(msg.split()) and "fix:" in msg, msg
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------- collection at llama-imatrix's speed (issue #16)


def test_vectorised_sums_add_in_llama_imatrixs_order():
    """The vectorised accumulation is llama-imatrix's loop: the same float32 additions in the same order, every bit.

    Pure numpy (one rounding per multiply and per add, as the C loop compiled without contraction): CPU-independent.
    """
    from quantkit.pipeline.imatrix_collect import _accumulate, _add_routed, _visit_order

    rng = np.random.default_rng(7)
    x = (rng.standard_normal((300, 48)) * rng.random(48) * 30).astype(np.float32)
    acc = (rng.random(48) * 1e3).astype(np.float32)
    want = acc.copy()
    for row in x:
        want = want + row * row
    np.testing.assert_array_equal(_accumulate(acc, x), want)
    # experts: ids[token, slot]; llama-imatrix visits slot after slot, token after token, per micro-batch of `segment` tokens
    n_tokens, n_used, n_as, segment = 96, 3, 7, 32
    ids = np.stack([rng.permutation(n_as)[:n_used] for _ in range(n_tokens)]).astype(np.int32)
    xs = (rng.standard_normal((n_tokens, n_used, 48)) * 10).astype(np.float32)
    sums0 = (rng.random((n_as, 48)) * 50).astype(np.float32)
    want = sums0.copy()
    for first in range(0, n_tokens, segment):
        for slot in range(n_used):
            for tok in range(first, first + segment):
                want[ids[tok, slot]] = want[ids[tok, slot]] + xs[tok, slot] * xs[tok, slot]
    tok, slot = _visit_order(n_tokens, n_used, segment)
    got = sums0.copy()
    chosen = ids[tok, slot]
    _add_routed(got, xs.reshape(n_tokens * n_used, 48), tok * n_used + slot, chosen, np.bincount(chosen, minlength=n_as),
                np.empty((n_tokens * n_used, 48), np.float32))
    np.testing.assert_array_equal(got, want)
    whole = sums0.copy()  # one segment: another order, other bits (the reason the order is kept)
    tok1, slot1 = _visit_order(n_tokens, n_used, n_tokens)
    _add_routed(whole, xs.reshape(n_tokens * n_used, 48), tok1 * n_used + slot1, ids[tok1, slot1], np.bincount(chosen, minlength=n_as))
    np.testing.assert_allclose(whole, want, rtol=1e-5)


def test_several_chunks_per_decode_give_the_same_matrix(fixture_gguf, text, routed):
    """Chunks decoded several at a time (one KV cache, whole chunks per micro-batch): every count and sum as one chunk per decode."""
    from quantkit.pipeline.imatrix_collect import chunks_per_decode

    assert chunks_per_decode(CTX) == 512 // CTX and chunks_per_decode(100) == 1 and chunks_per_decode(512) == 1
    one = collect_imatrix(fixture_gguf("bf16"), text, n_ctx=CTX, n_chunks=CHUNKS, threads=2, chunks_per_batch=1)
    two = collect_imatrix(fixture_gguf("bf16"), text, n_ctx=CTX, n_chunks=CHUNKS, threads=2, chunks_per_batch=2)  # a short last decode
    assert sorted(one.entries) == sorted(routed.entries) == sorted(two.entries)
    for name, e in one.entries.items():
        for other in (routed, two):
            np.testing.assert_array_equal(other.entries[name].counts, e.counts, err_msg=name)
            np.testing.assert_array_equal(other.entries[name].in_sum2, e.in_sum2, err_msg=name)
    with pytest.raises(ValueError, match="chunks_per_batch 0"):
        collect_imatrix(fixture_gguf("bf16"), text, n_ctx=CTX, n_chunks=1, chunks_per_batch=0)


def test_sibling_matrices_reuse_an_update_only_from_the_same_state():
    """attn_k after attn_q (same input node, same statistics): the update is copied; any other state or input is computed."""
    from quantkit.pipeline.imatrix_collect import _Collector

    c = _Collector()
    calls = []

    def add(name, value):
        def run():
            calls.append((name, value))
            c.sums[name][...] += value
            c.counts[name][...] += 1
        return run

    for name in ("q", "k", "v", "o"):
        c._entry(name, 1, 4)
    key = (11, 0, (1, 4))
    c._update("q", key, add("q", 2.0))
    c._update("k", key, add("k", 99.0))  # same input node, same state (zero): reused, not run
    assert calls == [("q", 2.0)] and c.reused == 1 and c.sums["k"].tolist() == [[2.0] * 4] and c.counts["k"].tolist() == [1]
    c._update("o", (12, 0, (1, 4)), add("o", 1.0))  # another input: computed (and now the last update)
    c._update("v", key, add("v", 3.0))  # the memo is o's: computed
    c._update("q", key, add("q", 5.0))  # q: 7 now, k still 2
    c._update("k", (13, 0, (1, 4)), add("k", 4.0))  # k from another node: computed, k is 6
    c._update("v", key, add("v", 6.0))  # v: the memo is k's (another input): computed
    c._update("q", key, add("q", 1.0))
    c._update("k", key, add("k", 8.0))  # same input as q's last update, but k's state (6) is not q's before it (7): computed
    assert [n for n, _ in calls] == ["q", "o", "v", "q", "k", "v", "q", "k"] and c.reused == 1
    c._update("o", (12, 0, (1, 4)), add("o", 1.0))
    c.new_batch()  # a new decode: nothing carries over, whatever the addresses
    c._update("v", (12, 0, (1, 4)), add("v", 4.0))
    assert calls[-1] == ("v", 4.0) and c.reused == 1
    assert c.sums["q"][0, 0] == 8.0 and c.sums["k"][0, 0] == 14.0 and c.sums["v"][0, 0] == 13.0


def test_activations_are_read_in_place(fixture_gguf):
    """tensor_view gives the CPU backend's buffer itself (no copy), with tensor_array's shape, strides and values."""
    from quantkit.engine.session import EvalSession, GGMLTensor, op_codes, tensor_array, tensor_view

    mm = {op_codes()[b"MUL_MAT"], op_codes()[b"MUL_MAT_ID"]}
    seen = []

    def on_tensor(t: int, ask: bool) -> bool:
        node = GGMLTensor.from_address(t)
        if node.op not in mm:
            return False
        if ask:
            return True
        for p in [node.src[1]] + ([node.src[2]] if node.src[2] else []):
            v, a = tensor_view(p), tensor_array(p)
            assert v.shape == a.shape and v.strides == a.strides and v.dtype == a.dtype
            np.testing.assert_array_equal(v, a)
            assert not v.flags.owndata and v.ctypes.data == GGMLTensor.from_address(p).data
            seen.append(v.dtype)
        return True

    s = EvalSession(fixture_gguf("bf16"), 32, threads=2, on_tensor=on_tensor)
    s.eval_chunk(s.tokenize("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer")[:32])
    s.close()
    assert np.dtype(np.float32) in seen and np.dtype(np.int32) in seen  # activations and expert ids


def test_ctrl_c_stops_the_collection_and_says_how_far_it_got(fixture_gguf, text, caplog, monkeypatch):
    """Ctrl-C (a KeyboardInterrupt in the eval callback, where a signal handler runs during a decode) stops the decode;
    the log (INFO: the CLI keeps its one line, its progress bar shows the count) names the chunks done, the interrupt
    is raised again, and the next collection works."""
    from quantkit.pipeline import imatrix_collect

    real = imatrix_collect._Collector._mul_mat

    def interrupted(self, name, node, src0):
        if name == "blk.3.attn_output.weight" and name in self.counts and self.counts[name][0] == CTX:  # late in the second decode
            raise KeyboardInterrupt
        real(self, name, node, src0)

    monkeypatch.setattr(imatrix_collect._Collector, "_mul_mat", interrupted)
    with caplog.at_level("INFO", logger="quantkit.pipeline.imatrix_collect"), pytest.raises(KeyboardInterrupt):
        collect_imatrix(fixture_gguf("bf16"), text, n_ctx=CTX, n_chunks=CHUNKS, threads=2, chunks_per_batch=1)
    assert "imatrix interrupted after 1 of 3 chunks (64 tokens" in caplog.text, caplog.text
    monkeypatch.undo()
    caplog.clear()
    seen = []

    def progress(p) -> None:  # the start is reported (chunk 0), then each decode
        seen.append(p.chunk)
        if p.chunk == 2:
            raise KeyboardInterrupt

    with caplog.at_level("INFO", logger="quantkit.pipeline.imatrix_collect"), pytest.raises(KeyboardInterrupt):
        collect_imatrix(fixture_gguf("bf16"), text, n_ctx=CTX, n_chunks=CHUNKS, threads=2, on_chunk=progress, chunks_per_batch=1)
    assert seen == [0, 1, 2] and "imatrix interrupted after 2 of 3 chunks (128 tokens" in caplog.text, caplog.text
    again = collect_imatrix(fixture_gguf("bf16"), text, n_ctx=CTX, n_chunks=1, threads=2)
    assert again.n_tokens == CTX


@pytest.mark.parametrize("at", [0, 1])
def test_cli_imatrix_interrupted_writes_nothing(fixture_gguf, text_file, tmp_path, monkeypatch, at):
    """Ctrl-C in the first or the second chunk: exit 130, one line saying how far it got, nothing written."""
    from quantkit.pipeline import imatrix_collect

    real, calls = imatrix_collect._Collector._mul_mat_id, []

    def interrupted(self, name, node, src0):
        calls.append(name)
        if len(calls) > at * 12:  # 4 blocks x 3 expert matrices a chunk (chunks_per_batch 1 at this ctx)
            raise KeyboardInterrupt
        return real(self, name, node, src0)

    monkeypatch.setattr(imatrix_collect, "chunks_per_decode", lambda *a, **k: 1)
    monkeypatch.setattr(imatrix_collect._Collector, "_mul_mat_id", interrupted)
    out = tmp_path / "im.gguf"
    result = CliRunner().invoke(app, ["imatrix", str(fixture_gguf("bf16")), "--text", str(text_file), "-o", str(out), "--ctx", str(CTX), "--chunks", "2"])
    msg = result.output.strip()
    assert result.exit_code == 130 and msg.startswith("interrupted:") and len(msg.splitlines()) == 1 and "nothing was written" in msg, result.output
    assert ("stopped after 1 of 2 chunks" in msg) == (at == 1), msg
    assert list(tmp_path.iterdir()) == []


def test_contexts_over_one_micro_batch_add_in_llama_imatrixs_order(fixture_gguf, text, tmp_path):
    """--ctx 640: llama-imatrix -b 640 computes each chunk in micro-batches of 512 and 128 tokens (and skips the dense
    matrices of none); so does quantkit: every sum bit for bit.  Skipped without a local llama-imatrix."""
    import subprocess

    exe = local_llama_imatrix()
    if exe is None:
        pytest.skip("no llama-imatrix built on this machine (make setup builds one into .venv/bin; or set QK_LLAMA_IMATRIX)")
    model = fixture_gguf("bf16")
    body = text[:60000]
    (tmp_path / "t.txt").write_text(body, encoding="utf-8")
    r = subprocess.run([str(exe), "-m", str(model), "-f", "t.txt", "-c", "640", "-b", "640", "--chunks", "2", "-t", "2", "-o", "local.gguf"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = read_imatrix(tmp_path / "local.gguf")
    ours = collect_imatrix(model, body.removesuffix("\n"), n_ctx=640, n_chunks=2, threads=2)
    assert sorted(ours.entries) == sorted(theirs.entries)
    for name, e in theirs.entries.items():
        np.testing.assert_array_equal(ours.entries[name].counts, e.counts, err_msg=name)
        np.testing.assert_array_equal(ours.entries[name].in_sum2, e.in_sum2, err_msg=name)


def test_later_decodes_skip_the_graph_after_its_last_matrix(fixture_gguf, text):
    """The first decode runs the whole graph and teaches the collector its last matrix; later decodes stop there
    (no output norm, no output projection, no logits), and the statistics are those of whole graphs (see
    test_several_chunks_per_decode_give_the_same_matrix, whose one-chunk-per-decode run stops early)."""
    from quantkit.engine.session import EvalSession, _ggml_fns
    from quantkit.pipeline.imatrix_collect import _Collector

    so = _ggml_fns()
    asked: list[list[bytes]] = []

    class Spy(_Collector):
        def __call__(self, t: int, ask: bool) -> bool:
            if ask:
                asked[-1].append(so.ggml_get_name(t))
            return super().__call__(t, ask)

    c = Spy(segment=CTX, learn=True)
    s = EvalSession(fixture_gguf("bf16"), CTX, threads=2, on_tensor=c)
    tokens = s.tokenize(text[:5000])
    for i in range(3):
        c.new_batch()
        assert (c.stop_after is None) == c.learn == (i == 0)
        asked.append([])
        s.eval_chunk(tokens[i * CTX : (i + 1) * CTX])
    s.close()
    assert c.stop_after == "blk.3.ffn_down_exps.weight" and c.order[-1] == c.stop_after and len(set(c.order)) == len(c.order)
    assert b"result_output" in asked[0] and asked[0][-1] == b"result_output"
    for later in asked[1:]:
        assert b"result_output" not in later and b"result_norm" not in later and len(later) < len(asked[0])
    assert all(c.counts[n].sum() == 3 * CTX * (2 if "_exps" in n else 1) for n in c.counts), {n: c.counts[n].sum() for n in c.counts}


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe", "olmoe", "granitemoe"])
def test_every_family_gives_the_same_matrix_however_its_chunks_are_decoded(model_type, tmp_path, text):
    """One chunk per decode (every decode after the first stopped after the graph's last matrix: for qwen2_moe the
    shared expert's) and all chunks in one decode (the whole graph): the same counts and sums, bit for bit."""
    from conftest import convert, random_model

    src = random_model(tmp_path / "hf", model_type, hidden_size=128, **({"moe_intermediate_size": 128} if "qwen" in model_type else {}))
    f32 = convert(src, tmp_path / "f32.gguf", "f32")
    body = text[:20000]
    one = collect_imatrix(f32, body, n_ctx=64, n_chunks=4, threads=2, chunks_per_batch=1)
    together = collect_imatrix(f32, body, n_ctx=64, n_chunks=4, threads=2, chunks_per_batch=4)
    assert sorted(one.entries) == sorted(together.entries)
    for name, e in together.entries.items():
        np.testing.assert_array_equal(one.entries[name].counts, e.counts, err_msg=name)
        np.testing.assert_array_equal(one.entries[name].in_sum2, e.in_sum2, err_msg=name)


def test_select_entries_as_llama_quantize_include_and_exclude_weights(caplog):
    """--imatrix-include / --imatrix-exclude: substrings of entry names, as llama-quantize's --include-weights / --exclude-weights
    (prepare_imatrix); not both; a substring that matches nothing is said."""
    import logging

    from quantkit.errors import QuantkitError
    from quantkit.policy.imatrix import Entry, Imatrix, select_entries

    e = Entry(np.ones((1, 4), np.float32), np.ones(1, np.float32))
    names = ["blk.0.attn_q.weight", "blk.0.attn_output_a.weight", "blk.1.attn_output_a.weight", "blk.1.ffn_down_exps.weight"]
    im = Imatrix({n: e for n in names}, source="m.gguf")
    assert select_entries(im) is im
    assert list(select_entries(im, exclude=["attn_output_a"]).entries) == ["blk.0.attn_q.weight", "blk.1.ffn_down_exps.weight"]
    assert list(select_entries(im, exclude=["blk.1.", "attn_q"]).entries) == ["blk.0.attn_output_a.weight"]
    assert list(select_entries(im, include=["attn_output_a", "exps"]).entries) == names[1:]
    with caplog.at_level(logging.WARNING):
        assert select_entries(im, exclude=["ffn_gate_inp"]).entries.keys() == im.entries.keys()
    assert "'ffn_gate_inp' matches no entry" in caplog.text
    with pytest.raises(QuantkitError, match="cannot be used together"):
        select_entries(im, include=["a"], exclude=["b"])


def test_cli_imatrix_exclude_leaves_entries_out(tmp_path):
    """convert --imatrix-exclude: the plan is the one without those entries (the same bytes as a matrix written without them);
    a type that then lacks its weights is refused naming the option, nothing written; --imatrix-exclude without --imatrix is
    a usage error."""
    im = read_imatrix(REF)
    without = write_imatrix(Imatrix({n: e for n, e in im.entries.items() if "attn_v" not in n}, im.datasets, im.chunk_count, im.chunk_size),
                            tmp_path / "without.gguf")
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    r = CliRunner().invoke(app, ["convert", str(FIXTURE), "-o", str(a), "--type", "Q3_K_M", "--imatrix", str(REF), "--imatrix-exclude", "attn_v", "--no-progress"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["convert", str(FIXTURE), "-o", str(b), "--type", "Q3_K_M", "--imatrix", str(without), "--no-progress"])
    assert r.exit_code == 0, r.output
    ta, tb = gguf.GGUFReader(a).tensors, gguf.GGUFReader(b).tensors
    assert [(t.name, bytes(t.data)) for t in ta] == [(t.name, bytes(t.data)) for t in tb]
    (tmp_path / "out").mkdir()
    r = CliRunner().invoke(app, ["convert", str(FIXTURE), "-o", str(tmp_path / "out" / "m.gguf"), "--type", "IQ3_XXS", "--imatrix", str(REF),
                                 "--imatrix-exclude", "ffn_down_exps", "--no-progress"])
    assert r.exit_code == 1 and "'blk.0.ffn_down_exps.weight' was left out (--imatrix-include / --imatrix-exclude)" in " ".join(r.output.split()), r.output
    assert list((tmp_path / "out").iterdir()) == []
    r = CliRunner().invoke(app, ["plan", str(FIXTURE), "--type", "Q4_K_M", "--imatrix-exclude", "attn_v"])
    assert r.exit_code == 2 and "needs --imatrix" in r.output, r.output
