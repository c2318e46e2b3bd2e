"""Hostile importance matrices (issue #12): values no calibration run can produce are refused in one line.

``in_sum2`` is a sum of squared activations and ``counts`` a number of tokens: neither
is ever negative.  llama-quantize divides one by the other and hands the result to
the kernels as per-column weights without a check, so a negative value would
silently change how every row is rounded.  NaN and infinities were already refused
(tests/test_imatrix.py); these cases come from the audit of the current tree.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import FIXTURE
from quantkit.cli.main import app
from quantkit.errors import QuantkitError
from quantkit.policy.imatrix import Entry, Imatrix, read_imatrix, write_imatrix

NAME = "blk.0.attn_q.weight"


def _one_line(e: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "fix:" in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def _gguf(path, sums: np.ndarray, counts: np.ndarray):
    entries = {NAME: Entry(np.ones((1, 8), np.float32), np.ones(1, np.float32)), "blk.0.ffn_down_exps.weight": Entry(sums, counts)}
    return write_imatrix(Imatrix(entries, ("calib.txt",), 4, 64), path)


def _legacy(path, ncall: int, vals: np.ndarray):
    b = struct.pack("<i", 1) + struct.pack("<i", len(NAME)) + NAME.encode() + struct.pack("<ii", ncall, vals.size) + vals.astype("<f4").tobytes()
    path.write_bytes(b)
    return path


SUMS = np.abs(np.random.default_rng(0).standard_normal((4, 8))).astype(np.float32)
COUNTS = np.array([3, 0, 5, 8], np.float32)


@pytest.mark.parametrize(
    "case, sums, counts, needles",
    [
        ("negative sum", np.where(np.arange(32).reshape(4, 8) == 13, -1.0, SUMS).astype(np.float32), COUNTS, [".in_sum2'", "1 negative", "index 13", "sums of squares"]),
        ("all sums negative", -SUMS - 1, COUNTS, [".in_sum2'", "32 negative"]),
        ("negative count", SUMS, np.array([3, -5, 5, 8], np.float32), [".counts'", "-5.0", "index 1", "token counts"]),
    ],
)
def test_negative_sums_or_counts_are_refused(tmp_path, case, sums, counts, needles):
    """The audit: an imatrix with in_sum2 = -1 or counts = -5 was accepted and used for quantisation (exit 0)."""
    path = _gguf(tmp_path / "im.gguf", sums, counts)
    with pytest.raises(QuantkitError) as e:
        read_imatrix(path)
    _one_line(e, str(path), "blk.0.ffn_down_exps.weight", *needles)


def test_a_zero_count_and_zero_sums_are_fine(tmp_path):
    """An expert that saw no token has count 0 (weight 1 at quantise time); -0.0 is not negative."""
    sums = SUMS.copy()
    sums[1] = -0.0
    im = read_imatrix(_gguf(tmp_path / "im.gguf", sums, COUNTS))
    np.testing.assert_array_equal(im.weights("blk.0.ffn_down_exps.weight")[1], np.ones(8, np.float32))


@pytest.mark.parametrize("ncall, vals, needle", [(4, np.array([1.0, -2.0, 3.0]), "' values holds 1 negative"), (-3, np.array([1.0, 2.0]), "' call count holds 1 negative")])
def test_legacy_dat_with_negative_values_is_refused(tmp_path, ncall, vals, needle):
    path = _legacy(tmp_path / "im.dat", ncall, vals)
    with pytest.raises(QuantkitError) as e:
        read_imatrix(path)
    _one_line(e, str(path), NAME, needle)


def test_cli_convert_with_a_negative_imatrix_is_one_line_and_writes_nothing(tmp_path):
    path = _gguf(tmp_path / "im.gguf", SUMS, np.array([3, -5, 5, 8], np.float32))
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(app, ["convert", str(FIXTURE), "-o", str(out), "--type", "Q4_K_M", "--imatrix", str(path), "--no-progress"], terminal_width=300)
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert text.startswith("error:") and "Traceback" not in result.output and str(path) in text and "negative" in text, result.output
    assert not out.exists() and list(tmp_path.iterdir()) == [path]
