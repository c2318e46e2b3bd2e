"""Hostile Hugging Face directories (issue #12): bounded memory, one clear line, no silent acceptance.

Table-driven CLI cases for malformed files live in ``test_bad_inputs.py``.  Here:

* inputs that used to exhaust memory (token ids of 10^12 or 4x10^7), run in a
  subprocess whose address space is capped (RLIMIT_AS, :data:`CAP`);
* NaN / infinite weights: refused for a quantised type, a logged warning otherwise;
* ``--type ''`` and unknown type names;
* what must keep working (a symlinked snapshot directory, merges with spaces);
* property tests (hypothesis): the safetensors header, config.json and the
  tokenizer files of a tiny valid model, broken at random, go through
  ``quantkit.pipeline.convert.prepare`` and the GGUF header encoder; anything but a
  :class:`QuantkitError` or a clean success fails, and each example runs with
  its address space capped at :data:`FUZZ_CAP` more than the process already has.
  ``QK_FUZZ_EXAMPLES`` sets the examples per property (60 by default; ``make fuzz`` runs 2000).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import FIXTURE, ROOT, random_model
from quantkit.cli.main import app
from quantkit.errors import QuantkitError

#: address space a subprocess conversion of the tiny models below may map (it needs about 350 MB)
CAP = 1 << 30
#: address space one property-test example may add to what the test process already maps
FUZZ_CAP = 1 << 30
EXAMPLES = int(os.environ.get("QK_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("good") / "hf", "mixtral")


@pytest.fixture
def model(good, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(good, dst)
    return dst


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    obj = edit(obj) or obj
    path.write_text(json.dumps(obj))


def _bpe(d: Path, vocab_id: int = 2, added_id: int = 3) -> None:
    """tokenizer.json (byte-level BPE) in place of tokenizer.model, with the given ids."""
    (d / "tokenizer.model").unlink()
    tj = {
        "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": vocab_id}, "merges": ["a b"]},
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        "added_tokens": [{"id": added_id, "content": "<s>", "special": True}],
    }
    (d / "tokenizer.json").write_text(json.dumps(tj))


def _capped_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``quantkit ARGS`` in a fresh process that may map at most CAP bytes."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))

    return subprocess.run([sys.executable, "-m", "quantkit.cli", *args], capture_output=True, text=True, timeout=timeout, preexec_fn=cap, cwd=ROOT)


# --- token ids that used to grow lists to their value ------------------------------------------------------

MEMORY_CASES = {
    # tokenizer.json's vocab id: the list of tokens was grown to 10^12 entries (7 GB and rising)
    "tokenizer.json vocab id 10^12": (lambda d: _bpe(d, vocab_id=10**12), ["tokenizer.json", "model.vocab['ab']", "outside the vocabulary 0..2999"]),
    "tokenizer.json added token id 10^12": (lambda d: _bpe(d, added_id=10**12), ["tokenizer.json", "added_tokens[0].id", "outside the vocabulary"]),
    # tokenizer_config.json's added_tokens_decoder: padded to 4x10^7 tokens (3.4 GB, 27 s) before the vocab_size check
    "added_tokens_decoder id 4x10^7": (
        lambda d: _edit_json(d / "tokenizer_config.json", lambda c: c.update(added_tokens_decoder={"40000000": {"content": "<x>", "special": True}})),
        ["tokenizer_config.json", "added_tokens_decoder id = 40000000", "outside the vocabulary"],
    ),
    "num_local_experts 10^9": (lambda d: _edit_json(d / "config.json", lambda c: c.update(num_local_experts=10**9)), ["config.json implies"]),
}


@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_huge_ids_are_refused_before_allocating(model, tmp_path, case):
    breaker, needles = MEMORY_CASES[case]
    breaker(model)
    outdir = tmp_path / "out"
    outdir.mkdir()
    res = _capped_cli("convert", str(model), "-o", str(outdir / "m.gguf"), "--type", "q8_0")
    assert res.returncode == 1, res.stderr[-2000:]
    msg = res.stderr.strip()
    assert msg.startswith("error:") and len(msg.splitlines()) == 1 and "Traceback" not in msg, msg[-2000:]
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert list(outdir.iterdir()) == []


# --- non-finite weights ------------------------------------------------------------------------------------

EXPERT = "model.layers.0.block_sparse_moe.experts.1.w1.weight"


def _poison(d: Path, name: str, bits: int = 0x7FC0, count: int | None = None) -> None:
    """Overwrite ``count`` (default: all) BF16 values of tensor ``name`` with ``bits`` (0x7FC0: NaN, 0x7F80: +inf)."""
    shard = next(p for p in sorted(d.glob("*.safetensors")) if name.encode() in p.read_bytes()[:200_000])
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    info = json.loads(raw[8 : 8 + n])[name]
    assert info["dtype"] == "BF16"
    lo, hi = (8 + n + o for o in info["data_offsets"])
    k = (hi - lo) // 2 if count is None else count
    raw[lo : lo + 2 * k] = struct.pack("<H", bits) * k
    shard.write_bytes(bytes(raw))


@pytest.mark.parametrize("outtype", ["q8_0", "Q4_K_M"])
def test_nan_weights_are_not_quantised(model, tmp_path, outtype):
    """llama-quantize refuses them ("quantized data validation failed"): so does quantkit, naming the tensor, leaving nothing."""
    _poison(model, EXPERT)
    outdir = tmp_path / "out"
    outdir.mkdir()
    res = CliRunner().invoke(app, ["convert", str(model), "-o", str(outdir / "m.gguf"), "--type", outtype])
    assert res.exit_code == 1, res.output
    msg = " ".join(res.output.split())
    assert msg.startswith("error:") and EXPERT in msg and "blk.0.ffn_gate_exps.weight" in msg and "NaN" in msg and "fix:" in msg, msg
    assert list(outdir.iterdir()) == []


@pytest.mark.parametrize("outtype", ["f16", "bf16", "f32"])
def test_nan_weights_unquantised_are_copied_with_a_warning(model, tmp_path, caplog, outtype):
    """bf16 copies the stored bytes file to file: the check reads them on the side."""
    _poison(model, EXPERT, bits=0x7F80, count=3)  # three +inf
    _poison(model, "model.layers.1.input_layernorm.weight", count=1)  # a norm: F32 in every output
    from quantkit.pipeline.convert import convert

    with caplog.at_level(logging.WARNING, logger="quantkit.pipeline.convert"):
        convert(model, tmp_path / "m.gguf", outtype)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("blk.0.ffn_gate_exps.weight" in m and EXPERT in m and "3 of" in m for m in warned), warned
    assert any("blk.1.attn_norm.weight" in m and "1 of" in m for m in warned), warned


def test_nan_in_a_norm_is_a_warning_even_when_quantising(model, tmp_path, caplog):
    """Norms stay F32 (never quantised): llama-quantize copies them, so the conversion goes through, with a warning."""
    _poison(model, "model.norm.weight", count=2)
    from quantkit.pipeline.convert import convert

    with caplog.at_level(logging.WARNING, logger="quantkit.pipeline.convert"):
        convert(model, tmp_path / "m.gguf", "q8_0")
    assert any("output_norm.weight" in r.getMessage() and "2 of" in r.getMessage() for r in caplog.records)


def test_clean_weights_log_nothing(good, tmp_path, caplog):
    from quantkit.pipeline.convert import convert

    with caplog.at_level(logging.WARNING, logger="quantkit.pipeline.convert"):
        convert(good, tmp_path / "m.gguf", "q8_0")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# (dtype, numpy float dtype whose bit pattern it is): BF16 is the top half of a float32
_WIDTHS = {"F32": (np.uint32, np.float32), "F16": (np.uint16, np.float16), "BF16": (np.uint16, None)}


def _reference_nonfinite(bits: np.ndarray, dtype: str) -> int:
    if dtype == "BF16":
        return int(np.count_nonzero(~np.isfinite((bits.astype(np.uint32) << 16).view(np.float32))))
    return int(np.count_nonzero(~np.isfinite(bits.view(_WIDTHS[dtype][1]))))


@pytest.mark.parametrize("dtype", list(_WIDTHS))
def test_nonfinite_counts_edge_patterns(dtype):
    from quantkit.format.encode import nonfinite

    unsigned = _WIDTHS[dtype][0]
    bits = 8 * np.dtype(unsigned).itemsize
    exp = {"F32": 0x7F800000, "F16": 0x7C00, "BF16": 0x7F80}[dtype]
    sign = 1 << (bits - 1)
    edges = [0, 1, exp - 1, exp, exp + 1, sign - 1, sign, sign + 1, sign | (exp - 1), sign | exp, sign | (exp + 1), 2**bits - 1]
    for pattern in edges:
        a = np.array([0, pattern, 1], dtype=unsigned)
        assert nonfinite(a, dtype) == _reference_nonfinite(a, dtype), hex(pattern)
    assert nonfinite(np.zeros(0, dtype=unsigned), dtype) == 0


@pytest.mark.fuzz
@FUZZ
@given(dtype=st.sampled_from(list(_WIDTHS)), data=st.data())
def test_nonfinite_matches_numpy(dtype, data):
    from quantkit.format.encode import nonfinite

    unsigned = _WIDTHS[dtype][0]
    top = 2 ** (8 * np.dtype(unsigned).itemsize) - 1
    values = data.draw(st.lists(st.integers(0, top), max_size=64))
    a = np.array(values, dtype=unsigned)
    assert nonfinite(a, dtype) == _reference_nonfinite(a, dtype)


# --- --type names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", " ", "q9_k", "f8"])
def test_unknown_or_empty_type_is_refused_by_the_library(name):
    from quantkit.pipeline.convert import prepare
    from quantkit.policy.plan import check_outtype

    with pytest.raises(QuantkitError, match=r"--type .*(known: f32, f16, bf16 .*Q4_K_M.*); fix:"):
        check_outtype(name)
    with pytest.raises(QuantkitError, match="Q4_K_M"):
        prepare(FIXTURE, name)


@pytest.mark.parametrize(("name", "canonical"), [("f16", "f16"), ("F16", "f16"), ("bf16", "bf16"), ("q4_k", "Q4_K_M"), ("q8_0", "Q8_0"), ("iq4_xs", "IQ4_XS")])
def test_type_names_resolve(name, canonical):
    from quantkit.policy.plan import check_outtype

    assert check_outtype(name) == canonical


@pytest.mark.parametrize("command", ["convert", "plan"])
def test_empty_type_on_the_command_line_is_refused(tmp_path, command):
    """``--type ''`` used to become f16 silently (the CLI read '' as 'not given')."""
    out = tmp_path / "m.gguf"
    args = [command, str(FIXTURE), "--type", ""] + (["-o", str(out)] if command == "convert" else [])
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    msg = " ".join(res.output.split())
    assert msg.startswith("error:") and "--type ''" in msg and "Q4_K_M" in msg and "f16" in msg, msg
    assert not out.exists()


# --- what must keep working --------------------------------------------------------------------------------


def test_symlinked_snapshot_converts(good, tmp_path):
    """A Hugging Face cache snapshot: every file a symlink to a blob elsewhere."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snap.mkdir()
    for f in good.iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(os.path.relpath(blobs / f.name, snap))
    from quantkit.pipeline.convert import convert

    convert(snap, tmp_path / "m.gguf", "q8_0")
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"


def test_bpe_merges_with_spaces_are_encoded_as_gguf_py_does(model, tmp_path):
    """Pairs (transformers >= 4.45) may hold spaces; llama.cpp splits a merge at its first space, so gguf-py writes them as U+0120."""
    (model / "tokenizer.model").unlink()
    tj = {
        "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "a b": 2, "c": 3, "a bc": 4}, "merges": [["a b", "c"]]},
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        "added_tokens": [],
    }
    (model / "tokenizer.json").write_text(json.dumps(tj))
    from quantkit.hf.vocab import load_vocab

    vocab, _ = load_vocab(model, 3000)
    assert vocab.merges == ["a\u0120b c"]
    assert vocab.tokens[:5] == ["a", "b", "a b", "c", "a bc"]


def test_padding_names_avoid_real_tokens(model):
    """Ids the tokenizer leaves out become [PAD<id>] (as llama.cpp's converter names them), never a name a real token has."""
    (model / "tokenizer.model").unlink()
    tj = {
        "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "[PAD3]": 2, "[PAD3]_": 4}, "merges": []},
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
    }
    (model / "tokenizer.json").write_text(json.dumps(tj))
    from quantkit.hf.vocab import load_vocab

    vocab, _ = load_vocab(model, 3000)
    assert vocab.tokens[:6] == ["a", "b", "[PAD3]", "[PAD3]__", "[PAD3]_", "[PAD5]"]
    assert len(set(vocab.tokens)) == 3000


def test_named_chat_templates_keep_the_default(model):
    from quantkit.hf.vocab import load_vocab, vocab_metadata

    templates = [{"name": "tool_use", "template": "{% if %}"}, {"name": "default", "template": "{{ messages[0]['content'] }}"}]
    _edit_json(model / "tokenizer_config.json", lambda c: c.update(chat_template=templates))
    vocab, tcfg = load_vocab(model, 3000)  # only the template that is written is compiled
    assert vocab_metadata(vocab, tcfg, {})["tokenizer.chat_template"].value == "{{ messages[0]['content'] }}"


def test_a_pipe_is_not_read(model):
    """A named pipe where a file should be is refused at once (opening it would block)."""
    (model / "tokenizer_config.json").unlink()
    os.mkfifo(model / "tokenizer_config.json")
    from quantkit.pipeline.convert import prepare

    with pytest.raises(QuantkitError, match="tokenizer_config.json: is not a regular file"):
        prepare(model, "f16")


# --- property tests: random damage to a tiny valid model ---------------------------------------------------
#
# The model is written with numpy (F16) in its own directory; each example links every file into a fresh
# directory except the one it breaks.

TINY_CONFIG = {
    "model_type": "mixtral", "vocab_size": 3000, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 2, "num_experts_per_tok": 1,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
}  # fmt: skip


def _tiny_tensors(c: dict = TINY_CONFIG) -> dict[str, np.ndarray]:
    h, ff, v, e = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_local_experts"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    g = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "model.norm.weight": (h,)}
    for b in range(c["num_hidden_layers"]):
        p = f"model.layers.{b}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,), p + "block_sparse_moe.gate.weight": (e, h)})
        shapes.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q)})
        for x in range(e):
            shapes.update({p + f"block_sparse_moe.experts.{x}.w1.weight": (ff, h), p + f"block_sparse_moe.experts.{x}.w3.weight": (ff, h), p + f"block_sparse_moe.experts.{x}.w2.weight": (h, ff)})
    return {k: (g.standard_normal(s) * 0.05).astype(np.float16) for k, s in shapes.items()}


def _write_tiny(d: Path, **config) -> Path:
    """The tiny model (TINY_CONFIG with ``config``) written to ``d``."""
    c = {**TINY_CONFIG, **config}
    d.mkdir(parents=True)
    header, data = _safetensors(_tiny_tensors(c))
    blob = _header_bytes(header)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    (d / "config.json").write_text(json.dumps(c))
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(FIXTURE / f, d / f)
    return d


def _safetensors(tensors: dict[str, np.ndarray]) -> tuple[dict, bytes]:
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        b = a.tobytes()
        header[name] = {"dtype": "F16", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    return header, b"".join(blobs)


def _header_bytes(header: object) -> bytes:
    blob = json.dumps(header).encode()
    return blob + b" " * (-len(blob) % 8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _write_tiny(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.mark.parametrize(("config", "needles"), [
    # llama.cpp (llama-cpp-python 0.3.36) kills the process loading these: GGML_ASSERT n_layer <= 512, n_expert <= 1024
    ({"num_hidden_layers": 513}, ["num_hidden_layers = 513", "512"]),
    ({"num_local_experts": 1025, "num_experts_per_tok": 2, "intermediate_size": 16}, ["num_local_experts = 1025", "1024"]),
], ids=["513 layers", "1025 experts"])
def test_llama_cpp_limits(tmp_path, config, needles):
    from quantkit.pipeline.convert import prepare

    d = _write_tiny(tmp_path / "hf", **config)
    with pytest.raises(QuantkitError) as e:
        prepare(d, "f16")
    assert all(n in str(e.value) for n in needles), e.value


def test_dense_model_with_an_expert_count_is_refused(tmp_path):
    """A dense llama whose config.json names experts got llama.expert_count and no expert tensors: llama.cpp aborts (GGML_ASSERT n_expert_used_max > 0)."""
    from quantkit.pipeline.convert import prepare

    good = random_model(tmp_path / "hf", "llama", num_local_experts=4)
    with pytest.raises(QuantkitError, match="num_local_experts = 4, but the checkpoint has no expert tensors"):
        prepare(good, "f16")


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


@contextlib.contextmanager
def _memory_cap(extra: int = FUZZ_CAP):
    """Cap this process's address space at what it maps now plus ``extra`` bytes (a blow-up raises MemoryError)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_bytes() + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _prepare_or_refuse(tiny: Path, files: dict[str, bytes | None]) -> str:
    """Link ``tiny``'s files into a fresh directory, write ``files`` over them (None: delete), prepare it.

    Returns "ok" or "refused"; any other exception (and MemoryError) propagates and fails the property.
    A prepared model's metadata and generated tensors must also encode: GGUF's fixed-width fields hold them.
    """
    from quantkit.pipeline.convert import prepare
    from quantkit.format.gguf_write import encode_header

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for f in tiny.iterdir():
            if f.name not in files:
                (d / f.name).symlink_to(f)
        for name, data in files.items():
            if data is not None:
                (d / name).write_bytes(data)
        with _memory_cap():
            try:
                ckpt, prep = prepare(d, "f16")
            except QuantkitError as e:
                _event(f"refused: {str(e).split(': ')[1][:40] if ': ' in str(e) else e}")
                return "refused"
            try:
                encode_header(prep.arch, prep.metadata, ((tp.name, tp.shape, tp.qtype, tp.nbytes) for tp in prep.plan.tensors))
                for t in prep.tensors:
                    if t.data is not None:
                        t.data()
            finally:
                ckpt.close()
    _event("prepared")
    return "ok"


def _event(what: str) -> None:
    """Tally an outcome (pytest --hypothesis-show-statistics shows how often each refusal and success came up)."""
    if currently_in_test_context():
        event(what)


def test_tiny_model_prepares(tiny):
    """The property tests start from a model that converts: their refusals are the damage's doing."""
    assert _prepare_or_refuse(tiny, {}) == "ok"


NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 2, 3, 7, -1, 2**31, 2**32 - 1, 2**32, 2**63, 10**12, 4 * 10**7, 3000, 2999]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e-50, 1e300, 3.5e38, 0.5, 8.0, 1e-5]),
)
STRINGS = st.one_of(st.text(max_size=12), st.sampled_from(["\ud800", "a\udc80", "F16", "BF16", "BPE", "ByteLevel", "llama3", "yarn", "linear", "default", "8"]))
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBERS, STRINGS),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(STRINGS, inner, max_size=4)),
    max_leaves=10,
)
DELETE = object()


def _dumps(obj: object) -> bytes:
    return json.dumps(obj).encode("utf-8", "surrogatepass")  # lone surrogates travel as \ud800 escapes (ensure_ascii)


def _apply(base: dict, edits: dict) -> dict:
    out = dict(base)
    for k, v in edits.items():
        if v is DELETE:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def _mutate_bytes(data: bytes, draw) -> bytes:
    """One random byte-level change: flip, truncate, insert, overwrite a run."""
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
    pos = draw(st.integers(0, max(0, len(data) - 1)))
    if kind == "flip":
        return data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1 :] if data else data
    if kind == "truncate":
        return data[:pos]
    extra = draw(st.binary(min_size=1, max_size=16))
    return data[:pos] + extra + data[pos + (len(extra) if kind == "overwrite" else 0) :]


@pytest.mark.fuzz
@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header(tiny, data):
    header, body = _safetensors(_tiny_tensors())
    names = list(header)
    mode = data.draw(st.sampled_from(["entry", "json", "bytes", "deep", "size"]), label="mode")
    if mode == "entry":  # one field of one tensor entry replaced
        name = data.draw(st.sampled_from(names), label="tensor")
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "*", "__metadata__"]), label="field")
        value = data.draw(st.one_of(JSON, st.lists(st.integers(-(2**65), 2**65), max_size=4), st.sampled_from(["F32", "BF16", "I8", "F8_E4M3"])), label="value")
        if field == "*":
            header[name] = value
        elif field == "__metadata__":
            header["__metadata__"] = value
        else:
            header[name] = {**header[name], field: value}
        blob = _header_bytes(header)
    elif mode == "json":  # any JSON at all as the header
        blob = _dumps(data.draw(JSON, label="header"))
    elif mode == "bytes":  # the valid header's bytes damaged
        blob = _mutate_bytes(_header_bytes(header), data.draw)
    else:  # nesting far past Python's recursion limit
        depth = data.draw(st.integers(500, 200_000), label="depth")
        opener = data.draw(st.sampled_from([b"[", b'{"a":']), label="opener")
        blob = b'{"x":' + opener * depth + b"1" + (b"]" if opener == b"[" else b"}") * depth + b"}"
    size = len(blob) if mode != "size" else data.draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 4096)), label="size")
    if mode == "size":
        blob = _header_bytes(header)
    _prepare_or_refuse(tiny, {"model.safetensors": struct.pack("<Q", size) + blob + body})


CONFIG_KEYS = sorted({*TINY_CONFIG, "rope_scaling", "rope_theta", "sliding_window", "pad_token_id", "_name_or_path", "dtype"})
ROPE = st.fixed_dictionaries(
    {"rope_type": st.one_of(st.sampled_from(["default", "linear", "yarn", "llama3", "dynamic"]), JSON)},
    optional={k: st.one_of(NUMBERS, JSON) for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "rope_theta")},
)


@pytest.mark.fuzz
@FUZZ
@given(data=st.data())
def test_fuzz_config_json(tiny, data):
    if data.draw(st.booleans(), label="raw"):
        raw = data.draw(st.one_of(JSON.map(_dumps), st.binary(max_size=64)), label="config.json")
    else:
        edits = data.draw(st.dictionaries(st.sampled_from(CONFIG_KEYS), st.one_of(NUMBERS, JSON, ROPE, st.just(DELETE)), max_size=4), label="edits")
        if data.draw(st.booleans(), label="rope"):
            edits[data.draw(st.sampled_from(["rope_parameters", "rope_scaling"]))] = data.draw(ROPE, label="rope_value")
        raw = _dumps(_apply(TINY_CONFIG, edits))
    _prepare_or_refuse(tiny, {"config.json": raw})


TOKEN_IDS = st.one_of(st.integers(-5, 3005), st.sampled_from([10**12, 4 * 10**7, 2**63, -(2**63)]), JSON)
JINJA = st.lists(st.sampled_from(["{%", "%}", "{{", "}}", "{#", "#}", " if ", " for m in messages ", " endif ", " endfor ", " set x = 1 ", " x ", "'", "(", ")", "|", "\n", " break ", "raise_exception('no')", "}}{{"]), max_size=12).map("".join)


def _tokenizer_config(draw) -> bytes:
    base = json.loads((FIXTURE / "tokenizer_config.json").read_text())
    if draw(st.booleans(), label="raw tokenizer_config"):
        return draw(st.one_of(JSON.map(_dumps), st.binary(max_size=64)), label="tokenizer_config.json")
    decoder = st.dictionaries(
        st.one_of(TOKEN_IDS.map(str), STRINGS), st.one_of(st.fixed_dictionaries({"content": st.one_of(STRINGS, JSON)}, optional={"special": JSON}), JSON), max_size=3
    )
    values = {
        "added_tokens_decoder": st.one_of(decoder, JSON),
        "chat_template": st.one_of(JINJA, JSON, st.lists(st.fixed_dictionaries({"name": st.one_of(st.just("default"), STRINGS), "template": st.one_of(JINJA, JSON)}), max_size=2)),
        **{k: st.one_of(STRINGS, JSON, st.fixed_dictionaries({"content": st.one_of(STRINGS, JSON)})) for k in ("bos_token", "eos_token", "unk_token", "pad_token")},
        **{k: JSON for k in ("add_bos_token", "add_eos_token")},
    }
    keys = draw(st.lists(st.sampled_from(sorted(values)), max_size=3, unique=True), label="keys")
    return _dumps(_apply(base, {k: draw(values[k], label=k) for k in keys}))


def _tokenizer_json(draw) -> bytes:
    if draw(st.booleans(), label="raw tokenizer.json"):
        return draw(st.one_of(JSON.map(_dumps), st.binary(max_size=64)), label="tokenizer.json")
    vocab = draw(st.dictionaries(STRINGS, TOKEN_IDS, max_size=6), label="vocab")
    model = {"type": draw(st.sampled_from(["BPE", "BPE", "Unigram"]), label="type"), "vocab": vocab if draw(st.booleans()) else draw(JSON), "merges": draw(st.one_of(st.lists(st.one_of(STRINGS, st.lists(STRINGS, max_size=3), JSON), max_size=4), JSON), label="merges")}
    valid_pre = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    pre = draw(st.one_of(st.just(valid_pre), JSON, st.fixed_dictionaries({"type": st.just("Sequence"), "pretokenizers": st.one_of(JSON, st.lists(st.one_of(st.just(valid_pre), JSON), max_size=3))})), label="pre_tokenizer")
    added = draw(st.one_of(st.lists(st.fixed_dictionaries({"id": TOKEN_IDS, "content": st.one_of(STRINGS, JSON)}, optional={"special": JSON}), max_size=3), JSON), label="added_tokens")
    return _dumps({"model": model, "pre_tokenizer": pre, "added_tokens": added})


@pytest.mark.fuzz
@FUZZ
@given(data=st.data())
def test_fuzz_tokenizer_files(tiny, data):
    which = data.draw(st.sampled_from(["tokenizer_config.json", "tokenizer.model", "tokenizer.json"]), label="file")
    files: dict[str, bytes | None] = {}
    if which == "tokenizer_config.json":
        files[which] = _tokenizer_config(data.draw)
    elif which == "tokenizer.model":
        sp = (FIXTURE / "tokenizer.model").read_bytes()
        files[which] = data.draw(st.binary(max_size=64), label="bytes") if data.draw(st.booleans(), label="random") else _mutate_bytes(sp, data.draw)
    else:  # a byte-level BPE model instead of SentencePiece
        files = {"tokenizer.model": None, "tokenizer.json": _tokenizer_json(data.draw)}
    _prepare_or_refuse(tiny, files)


def test_chat_template_jinja_file_is_read_and_checked(tmp_path):
    """transformers 5 saves the template as chat_template.jinja beside tokenizer_config.json; it wins, as in transformers."""
    import shutil

    from quantkit.cli.main import app
    from quantkit.format.gguf_read import read_gguf
    from typer.testing import CliRunner

    src = tmp_path / "m"
    shutil.copytree(FIXTURE, src)
    template = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}"
    (src / "chat_template.jinja").write_text(template)
    result = CliRunner().invoke(app, ["convert", str(src), "-o", str(tmp_path / "a.gguf"), "--type", "f16"])
    assert result.exit_code == 0, result.output
    assert read_gguf(tmp_path / "a.gguf", full=True).metadata["tokenizer.chat_template"] == template
    (src / "chat_template.jinja").write_text("line one\n{% for m in messages %}{{ m }")
    result = CliRunner().invoke(app, ["convert", str(src), "-o", str(tmp_path / "b.gguf"), "--type", "f16"])
    assert result.exit_code == 1 and "chat_template.jinja line 2: Jinja syntax error" in result.output, result.output
    assert not (tmp_path / "b.gguf").exists()


@pytest.mark.parametrize("template", [
    "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}",  # transformers' assistant-mask tag
    "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m['content'] }}{% endfor %}",  # loop controls
])
def test_templates_llama_cpp_compiles_are_accepted(template):
    """The conversion-time check compiles in the environment llama-cpp-python renders in: what it accepts passes."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from quantkit.hf.vocab import check_chat_template

    Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>")  # the reference accepts it
    check_chat_template(template, "tokenizer_config.json: chat_template")
