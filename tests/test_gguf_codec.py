"""quantkit's own GGUF header/metadata encoder and full-array reader against the gguf package (gguf-py).

gguf-py is llama.cpp's reference Python implementation of the format: the bytes
quantkit encodes must equal what its ``GGUFWriter`` writes for the same
metadata and tensor table, and quantkit's full read must give back what its
``GGUFReader`` reads.  Undecodable string bytes (some vocabularies have them)
must survive a read and a write unchanged.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from quantkit.format.gguf_read import read_gguf
from quantkit.pipeline.gguf_source import source_metadata
from quantkit.format.gguf_write import MetaValue, StreamingGGUFWriter, encode_header, file_nbytes

V = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType

METADATA = {
    "general.name": MetaValue("tïny — ünïcode", V.STRING),
    "llama.block_count": MetaValue(2, V.UINT32),
    "llama.expert_count": MetaValue(4, V.UINT32),
    "llama.attention.head_count": MetaValue(2, V.UINT32),
    "t.u8": MetaValue(255, V.UINT8),
    "t.i8": MetaValue(-128, V.INT8),
    "t.u16": MetaValue(65535, V.UINT16),
    "t.i16": MetaValue(-3, V.INT16),
    "t.i32": MetaValue(-(2**31), V.INT32),
    "t.u64": MetaValue(2**63 + 5, V.UINT64),
    "t.i64": MetaValue(-(2**62), V.INT64),
    "t.f32": MetaValue(0.1, V.FLOAT32),
    "t.f64": MetaValue(1e-300, V.FLOAT64),
    "t.bool": MetaValue(True, V.BOOL),
    "tokenizer.ggml.tokens": MetaValue(["<s>", "</s>", "▁the", "日本", "", "a" * 300], V.ARRAY, V.STRING),
    "tokenizer.ggml.scores": MetaValue([0.0, -1.5, 3.25e-8, -0.0, 7.0, 1e30], V.ARRAY, V.FLOAT32),
    "tokenizer.ggml.token_type": MetaValue([3, 3, 1, 1, 6, 1], V.ARRAY, V.INT32),
    "t.u8s": MetaValue([0, 1, 255], V.ARRAY, V.UINT8),
    "t.bools": MetaValue([True, False, True], V.ARRAY, V.BOOL),
    "t.f64s": MetaValue([0.5, -2.0], V.ARRAY, V.FLOAT64),
    "t.u64s": MetaValue([2**64 - 1, 0], V.ARRAY, V.UINT64),
}
TENSORS = [("token_embd.weight", (6, 256), Q.Q4_K), ("blk.0.ffn_gate_inp.weight", (4, 256), Q.F32),
           ("blk.0.ffn_down_exps.weight", (4, 256, 512), Q.Q6_K), ("output_norm.weight", (256,), Q.F32)]


def nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def gguf_py_file(path, metadata=METADATA, tensors=TENSORS) -> None:
    w = gguf.GGUFWriter(path, "llama")
    for key, mv in metadata.items():
        w.add_key_value(key, mv.value, mv.vtype, sub_type=mv.sub_type)
    for name, shape, qtype in tensors:
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, shape, qtype in tensors:
        w.write_padding(w.fout[0], w.fout[0].tell())
        w.fout[0].write(bytes(nbytes(shape, qtype)))
    w.write_padding(w.fout[0], w.fout[0].tell())
    w.close()


def test_header_equals_gguf_py(tmp_path):
    ref = tmp_path / "ref.gguf"
    gguf_py_file(ref)
    head = encode_header("llama", METADATA, [(n, s, q, nbytes(s, q)) for n, s, q in TENSORS])
    data = ref.read_bytes()
    assert len(head) % gguf.GGUF_DEFAULT_ALIGNMENT == 0
    assert data[: len(head)] == head
    assert file_nbytes("llama", METADATA, [(n, s, nbytes(s, q)) for n, s, q in TENSORS]) == len(data)


def test_streaming_writer_equals_gguf_py(tmp_path):
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    gguf_py_file(ref)
    w = StreamingGGUFWriter(ours, "llama", METADATA)
    for name, shape, qtype in TENSORS:
        w.declare(name, shape, qtype)
    w.begin()
    for name, shape, qtype in TENSORS:
        half = nbytes(shape, qtype) // 2
        w.write_tensor(name, [bytes(half), np.zeros(nbytes(shape, qtype) - half, np.uint8)])
    w.finish()
    assert ours.read_bytes() == ref.read_bytes()


def test_full_read_equals_gguf_py_reader(tmp_path):
    ref = tmp_path / "ref.gguf"
    gguf_py_file(ref)
    g = read_gguf(ref, full=True)
    r = gguf.GGUFReader(ref)
    assert list(g.metadata) == [k for k in r.fields if not k.startswith("GGUF.")]
    for key, value in g.metadata.items():
        f = r.fields[key]
        assert g.types[key][0] == f.types[0], key
        if f.types[0] == V.ARRAY:
            assert g.types[key][1] == f.types[1], key
            assert list(value) == f.contents(), key
        else:
            assert value == f.contents(), key
    summary = read_gguf(ref)  # the bounded default keeps a head of long arrays only
    assert summary.metadata["tokenizer.ggml.tokens"] == METADATA["tokenizer.ggml.tokens"].value


@pytest.mark.parametrize("bad", [b"\xff\xfe", b"ab\x80", b"\xed\xa0\x80"])
def test_undecodable_token_bytes_survive_requantisation(tmp_path, bad):
    md = dict(METADATA)
    md["tokenizer.ggml.tokens"] = MetaValue(["<s>", bad, "x"], V.ARRAY, V.STRING)
    src = tmp_path / "src.gguf"
    gguf_py_file(src, md, [("output_norm.weight", (256,), Q.F32)])
    metadata = source_metadata(read_gguf(src, full=True))  # what open_gguf copies (it also checks the model: this is none)
    tokens = metadata["tokenizer.ggml.tokens"]
    out = tmp_path / "out.gguf"
    w = StreamingGGUFWriter(out, "llama", metadata)
    w.declare("output_norm.weight", (256,), Q.F32)
    w.begin()
    w.write_tensor("output_norm.weight", [bytes(1024)])
    w.finish()
    assert len(tokens.value) == 3
    r = gguf.GGUFReader(out)
    f = r.fields["tokenizer.ggml.tokens"]
    assert bytes(f.parts[f.data[1]]) == bad
    assert out.read_bytes() == src.read_bytes()


def test_empty_arrays_round_trip(tmp_path):
    """gguf-py's writer refuses empty arrays; the format allows them and llama.cpp reads them."""
    md = {"t.none": MetaValue([], V.ARRAY, V.STRING), "t.zero": MetaValue([], V.ARRAY, V.INT32), "t.after": MetaValue(7, V.UINT32)}
    out = tmp_path / "empty.gguf"
    w = StreamingGGUFWriter(out, "llama", md)
    w.begin()
    w.finish()
    g = read_gguf(out, full=True)
    assert g.metadata["t.none"] == [] and g.metadata["t.zero"].size == 0 and g.metadata["t.after"] == 7
    assert gguf.GGUFReader(out).fields["t.after"].contents() == 7


def _members(enum_cls: type) -> dict[str, int]:
    return {m.name: int(m.value) for m in enum_cls}


def _check_against_vendored_gguf_py(values: dict[str, str]) -> None:
    """``Keys.<Group>.<NAME>`` / ``TensorName.<NAME>`` values equal the vendored llama.cpp's gguf-py (newer than the pin)."""
    import json
    import subprocess
    import sys

    from conftest import vendored_llama_cpp

    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import gguf; out = {}\n"
            "for q in json.loads(sys.argv[2]):\n"
            "    kind, *path = q.split('.')\n"
            "    if kind == 'Keys':\n"
            "        g = getattr(gguf.Keys, path[0], None); v = getattr(g, path[1], None) if g else None\n"
            "        if v is None and g is not None and '_' in path[1]:  # a nested group there: INDEXER_TOP_K = Indexer.TOP_K\n"
            "            sub, name = path[1].split('_', 1); v = getattr(getattr(g, sub.capitalize(), None), name, None)\n"
            "        out[q] = v\n"
            "    else:\n"
            "        t = getattr(gguf.MODEL_TENSOR, path[0], None); out[q] = gguf.TENSOR_NAMES.get(t) if t is not None else None\n"
            "print(json.dumps(out))")
    r = subprocess.run([sys.executable, "-c", code, vendored_llama_cpp("gguf-py") + "/gguf-py", json.dumps(list(values))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == values


def test_spec_matches_gguf_py() -> None:
    """quantkit.format.gguf_spec restates gguf-py's constants (to keep gguf-py's import off the hot paths): every value must equal gguf-py's."""
    from quantkit.format import gguf_spec as spec

    for ours, theirs in ((spec.GGMLQuantizationType, gguf.GGMLQuantizationType), (spec.LlamaFileType, gguf.LlamaFileType),
                         (spec.GGUFValueType, gguf.GGUFValueType), (spec.TokenType, gguf.TokenType)):
        assert _members(ours) == _members(theirs), ours.__name__
    assert {int(k): v for k, v in spec.GGML_QUANT_SIZES.items()} == {int(k): tuple(v) for k, v in gguf.GGML_QUANT_SIZES.items()}
    assert (spec.GGUF_MAGIC, spec.GGUF_VERSION, spec.GGUF_DEFAULT_ALIGNMENT, spec.GGML_QUANT_VERSION) == (
        gguf.GGUF_MAGIC, gguf.GGUF_VERSION, gguf.GGUF_DEFAULT_ALIGNMENT, gguf.GGML_QUANT_VERSION)
    newer: dict[str, str] = {}  # what the pinned gguf-py predates: checked against the vendored llama.cpp's gguf-py
    groups = [k for k, v in vars(spec.Keys).items() if isinstance(v, type)]  # every group quantkit restates, none left out
    assert {"General", "LLM", "Attention", "Rope", "Tokenizer", "HyperConnection"} <= set(groups)
    for group in groups:
        ours_g, theirs_g = getattr(spec.Keys, group), getattr(gguf.Keys, group, None)  # None: a group newer than the pin
        keys = [k for k in vars(ours_g) if k.isupper()]
        assert keys, group
        for k in keys:
            if theirs_g is not None and hasattr(theirs_g, k):
                assert getattr(ours_g, k) == getattr(theirs_g, k), f"Keys.{group}.{k}"
            else:
                newer[f"Keys.{group}.{k}"] = getattr(ours_g, k)
    assert spec.ARCH_LLAMA == gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    names = [k for k in vars(spec.TensorName) if k.isupper()]
    assert len(names) >= 17
    for k in names:
        if hasattr(gguf.MODEL_TENSOR, k):
            assert getattr(spec.TensorName, k) == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[k]], k
        else:
            newer[f"TensorName.{k}"] = getattr(spec.TensorName, k)
    if newer:
        _check_against_vendored_gguf_py(newer)
    # spec's enums interoperate with gguf-py's tables (IntEnum: same hash and equality as the number)
    assert gguf.GGML_QUANT_SIZES[spec.GGMLQuantizationType.Q4_K] == (256, 144)
    assert spec.GGMLQuantizationType.Q6_K == gguf.GGMLQuantizationType.Q6_K


@pytest.mark.parametrize("counts", [(0, 0, 0, 0), (8_600_000, 8_600_000, 0, 0), (999_999, 999_999, 0, 0), (46_700_000_000, 1_600_000_000, 5_600_000_000, 8),
                                    (1_500, 1_500, 0, 0), (3_000_000_000_000, 3_000_000_000_000, 0, 0), (123_456_789, 23_456_789, 12_500_000, 8),
                                    (7_241_732_096, 7_241_732_096, 0, 0), (100_000_000, 100_000, 99_900_000, 128)])
def test_size_label_matches_gguf_py(counts: tuple[int, int, int, int]) -> None:
    from quantkit.format import gguf_spec as spec

    assert spec.size_label(*counts) == gguf.size_label(*counts)


def test_hot_paths_do_not_import_heavy_modules() -> None:
    """`quantkit convert` and `quantkit eval ppl` start fast: no gguf-py, pydantic, torch or transformers on their path.

    Not a timing test: a module list.  Each import is a measured share of a short command
    (bench/RESULTS_eval.md): gguf-py ~80 ms, pydantic (typer >= 0.29's coercion) ~130 ms, torch seconds.
    """
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "import quantkit.cli.main, quantkit.cli.eval_commands\n"
        "from quantkit.pipeline.convert import convert, prepare\n"
        "from quantkit.evals import perplexity\n"
        "from quantkit.engine import session, limits\n"
        "from quantkit.engine import runtime\n"
        "from typer.testing import CliRunner\n"
        "r = CliRunner().invoke(quantkit.cli.main.app, ['eval', 'ppl', '/nonexistent.gguf', '--text', '/nonexistent.txt'])\n"
        "assert r.exit_code != 0, r.output\n"
        "heavy = sorted(m for m in ('gguf', 'yaml', 'pydantic', 'torch', 'transformers', 'safetensors.torch') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"heavy modules imported on a hot path: {out.stdout.strip()}"
