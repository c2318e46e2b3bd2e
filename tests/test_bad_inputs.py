"""Every bad input: a one-line error naming the file or key and the fix, exit 1, no output file.

Each case breaks a copy of a small valid checkpoint in one way and runs the
real CLI.  After each failure the output directory must hold nothing new
(no partial file, no temp file).
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from typer.testing import CliRunner

from conftest import random_model
from quantkit.cli import app


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("good") / "hf", "mixtral", max_shard_size="300KB")


@pytest.fixture
def model(good, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(good, dst)
    return dst


def _shards(d):
    return sorted(d.glob("*.safetensors"))


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def _index(d):
    return json.loads((d / "model.safetensors.index.json").read_text())


def _drop_tensor(d, name):
    idx = _index(d)
    shard = d / idx["weight_map"].pop(name)
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))

    def edit(h):
        info = h.pop(name)
        lo, hi = info["data_offsets"]
        for v in h.values():  # close the gap so the file stays a valid safetensors file
            if isinstance(v, dict) and "data_offsets" in v and v["data_offsets"][0] >= hi:
                v["data_offsets"] = [v["data_offsets"][0] - (hi - lo), v["data_offsets"][1] - (hi - lo)]
        edit.cut = (lo, hi)

    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    _rewrite_header(shard, edit)
    raw2 = shard.read_bytes()
    (n2,) = struct.unpack("<Q", raw2[:8])
    lo, hi = edit.cut
    data = raw[8 + n :]
    shard.write_bytes(raw2[: 8 + n2] + data[:lo] + data[hi:])


def _rename_tensor(d, old, new):
    idx = _index(d)
    shard = d / idx["weight_map"][old]
    idx["weight_map"][new] = idx["weight_map"].pop(old)
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    _rewrite_header(shard, lambda h: h.__setitem__(new, h.pop(old)))


def _set_config(d, **kv):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kv)
    (d / "config.json").write_text(json.dumps(cfg))


def _key(d, pattern):
    return next(k for k in _index(d)["weight_map"] if pattern in k)


CASES = {
    "missing config.json": (lambda d: (d / "config.json").unlink(), ["config.json", "missing"]),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{oops"), ["config.json", "not valid JSON"]),
    "missing weights": (lambda d: [p.unlink() for p in [*_shards(d), d / "model.safetensors.index.json"]], ["no *.safetensors", "fix:"]),
    "index names a missing shard": (lambda d: _shards(d)[1].unlink(), ["model.safetensors.index.json", "missing", "download"]),
    "truncated shard": (lambda d: (p := _shards(d)[0]).write_bytes(p.read_bytes()[:-1000]), ["truncated", ".safetensors"]),
    "corrupt header": (lambda d: (p := _shards(d)[0]).write_bytes(struct.pack("<Q", 40) + b"{not json" + p.read_bytes()[17:]), ["corrupt safetensors header"]),
    "absurd header size": (lambda d: (p := _shards(d)[0]).write_bytes(struct.pack("<Q", 1 << 50) + p.read_bytes()[8:]), ["header claims"]),
    "shape disagrees with config": (lambda d: _set_config(d, intermediate_size=512), ["shape", "config.json implies"]),
    "layer count disagrees": (lambda d: _set_config(d, num_hidden_layers=1), ["num_hidden_layers"]),
    "expert missing": (lambda d: _drop_tensor(d, "model.layers.1.block_sparse_moe.experts.2.w3.weight"), ["experts.2.w3", "missing"]),
    "tensor left over": (lambda d: _rename_tensor(d, "model.layers.0.input_layernorm.weight", "model.layers.0.mystery.weight"), ["mystery", "matches no known tensor"]),
    "lm_head missing, not tied": (lambda d: _drop_tensor(d, "lm_head.weight"), ["lm_head.weight", "tie_word_embeddings"]),
    "unknown model_type": (lambda d: _set_config(d, model_type="gpt_neox"), ["gpt_neox", "supported: llama, mistral, mixtral"]),
    "config value wrong type": (lambda d: _set_config(d, hidden_size="128"), ["hidden_size", "expected a int"]),
    "missing tokenizer": (lambda d: (d / "tokenizer.model").unlink(), ["tokenizer.model", "tokenizer.json"]),
    "corrupt tokenizer.model": (lambda d: (d / "tokenizer.model").write_bytes(b"garbage"), ["tokenizer.model", "SentencePiece"]),
    "pytorch pickle": (lambda d: [p.unlink() for p in [*_shards(d), d / "model.safetensors.index.json"]] and (d / "pytorch_model.bin").write_bytes(b"\x80\x04"), ["pytorch_model.bin", "pickle", "refused"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line_and_leaves_nothing(model, tmp_path, case):
    breaker, needles = CASES[case]
    breaker(model)
    outdir = tmp_path / "out"
    outdir.mkdir()
    result = CliRunner().invoke(app, ["convert", str(model), "-o", str(outdir / "m.gguf"), "--type", "q8_0"])
    assert result.exit_code == 1, result.output
    msg = result.output.strip()
    assert msg.startswith("error:") and len(msg.splitlines()) == 1, msg
    flat = " ".join(msg.split())
    for needle in needles:
        assert needle in flat, f"{needle!r} not in {flat!r}"
    assert "fix:" in flat
    assert list(outdir.iterdir()) == []


def test_debug_shows_traceback(model, tmp_path):
    (model / "config.json").unlink()
    result = CliRunner().invoke(app, ["--debug", "convert", str(model), "-o", str(tmp_path / "m.gguf")])
    assert result.exit_code == 1 and "Traceback" in result.output


def test_refuses_to_overwrite_without_force(model, tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"precious")
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(model), "-o", str(target)])
    assert result.exit_code == 1 and "--force" in result.output
    assert target.read_bytes() == b"precious"
    result = runner.invoke(app, ["convert", str(model), "-o", str(target), "--force"])
    assert result.exit_code == 0, result.output
    assert target.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_interrupt_or_full_disk_mid_write_leaves_no_file(model, tmp_path, exc):
    """An interrupt or ENOSPC half-way through keeps the previous file intact and leaves no temp file."""
    from quantkit.convert import convert

    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    seen = []

    def boom(name):
        seen.append(name)
        if len(seen) == 5:
            raise exc

    from quantkit.errors import OutputError

    with pytest.raises(KeyboardInterrupt if exc is KeyboardInterrupt else OutputError):
        convert(model, target, "f16", force=True, on_tensor=boom)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir() if p.name != "model"] == ["m.gguf"]


def test_not_enough_free_space_is_refused_before_writing(model, tmp_path, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    result = CliRunner().invoke(app, ["convert", str(model), "-o", str(tmp_path / "m.gguf")])
    assert result.exit_code == 1 and "GiB free" in result.output
    assert not (tmp_path / "m.gguf").exists()


def test_output_directory_missing(model, tmp_path):
    result = CliRunner().invoke(app, ["convert", str(model), "-o", str(tmp_path / "nope" / "m.gguf")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_output_file_gets_the_usual_mode(tmp_path):
    """Atomic output is created 0600 by mkstemp; the finished file must be readable as open() would make it."""
    import os

    from conftest import FIXTURE
    from quantkit.convert import convert

    old = os.umask(0o022)
    try:
        convert(FIXTURE, tmp_path / "m.gguf", "q8_0")
    finally:
        os.umask(old)
    assert (tmp_path / "m.gguf").stat().st_mode & 0o777 == 0o644
