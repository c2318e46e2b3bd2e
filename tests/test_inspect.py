"""``quantkit inspect`` and the bounded GGUF reader, on good and hostile files."""

from __future__ import annotations

import json
import struct

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from quantkit.cli.main import app
from quantkit.errors import GGUFFormatError
from quantkit.format.gguf_read import read_gguf


def test_inspect_json_matches_gguf_package(fixture_gguf):
    path = fixture_gguf("q8_0")
    result = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    j = json.loads(result.output)
    ref = gguf.GGUFReader(path)
    assert [t["name"] for t in j["tensors"]] == [t.name for t in ref.tensors]
    for t, r in zip(j["tensors"], ref.tensors):
        assert t["shape"] == [int(x) for x in r.shape] and t["type"] == r.tensor_type.name and t["bytes"] == int(r.n_bytes)
    assert j["metadata"]["llama.expert_count"] == 8
    assert j["metadata"]["tokenizer.ggml.tokens"]["count"] == 3000
    groups = j["groups"]
    assert groups["router"]["bits_per_weight"] == 32.0 and groups["norms"]["bits_per_weight"] == 32.0
    assert groups["experts"]["bits_per_weight"] == 8.5  # Q8_0: 34 bytes per 32 weights
    assert groups["experts"]["tensors"] == 3 * 4
    assert sum(g["bytes"] for g in groups.values()) == j["totals"]["bytes"]


def test_inspect_table(fixture_gguf):
    result = CliRunner().invoke(app, ["inspect", str(fixture_gguf("q8_0"))], terminal_width=200)
    assert result.exit_code == 0
    for word in ("blk.0.ffn_gate_exps.weight", "Q8_0", "experts", "router", "bits/weight"):
        assert word in result.output


def _header(n_tensors=0, n_kv=0, version=3):
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _kv_string(key, value_len, payload=b""):
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<IQ", gguf.GGUFValueType.STRING, value_len) + payload


HOSTILE = {
    "not gguf": (b"PK\x03\x04 zip file", "not a GGUF file"),
    "empty": (b"", "not a GGUF file"),
    "bad version": (_header(version=99), "unsupported GGUF version"),
    "huge kv count": (_header(n_kv=1 << 62), "cannot fit"),
    "huge tensor count": (_header(n_tensors=1 << 62), "cannot fit"),
    "huge string": (_header(n_kv=1) + _kv_string("general.name", 1 << 60), "claims"),
    "string past end": (_header(n_kv=1) + _kv_string("general.name", 1000, b"abc"), "truncated"),
    "huge array": (_header(n_kv=1) + struct.pack("<Q", 1) + b"a" + struct.pack("<IIQ", gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32, 1 << 61), "cannot fit"),
    "unknown value type": (_header(n_kv=1) + struct.pack("<Q", 1) + b"a" + struct.pack("<I", 77), "unknown value type"),
    "too many dims": (_header(n_tensors=1) + struct.pack("<Q", 1) + b"t" + struct.pack("<I", 9) + b"\0" * 100, "dimensions"),
    "unknown tensor type": (_header(n_tensors=1) + struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 32, 999, 0) + b"\0" * 64, "unknown type"),
    "tensor past end": (_header(n_tensors=1) + struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 1 << 30, 0, 0) + b"\0" * 64, "truncated"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_files_are_refused_cleanly(tmp_path, case):
    blob, needle = HOSTILE[case]
    path = tmp_path / "x.gguf"
    path.write_bytes(blob)
    with pytest.raises(GGUFFormatError, match=needle):
        read_gguf(path)
    result = CliRunner().invoke(app, ["inspect", str(path)])
    assert result.exit_code == 1 and result.output.startswith("error:")


def test_truncated_real_file(fixture_gguf, tmp_path):
    data = fixture_gguf("q8_0").read_bytes()
    for cut in (10, 5000, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(GGUFFormatError, match="truncated"):
            read_gguf(p)


def test_fuzzed_files_never_crash(fixture_gguf, tmp_path):
    """Random byte flips in the header region: parse or GGUFFormatError, nothing else, no huge allocation."""
    import resource

    data = bytearray(fixture_gguf("q8_0").read_bytes()[:400_000])
    rng = np.random.default_rng(0)
    p = tmp_path / "f.gguf"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(300):
        blob = bytearray(data)
        for pos in rng.integers(0, 60_000, size=rng.integers(1, 8)):
            blob[pos] = rng.integers(0, 256)
        p.write_bytes(bytes(blob))
        try:
            read_gguf(p)
        except GGUFFormatError:
            pass
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200, f"reader grew RSS by {grown_mib:.0f} MiB on fuzzed input"
