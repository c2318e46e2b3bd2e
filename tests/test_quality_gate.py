"""The project's own CI quality gate: the fixture's gated quantisations against committed baselines.

Converts the fixture to its BF16 base and to every type in
``quantkit.evals.ci.GATED_TYPES``, evaluates each on the held-out plays, and
runs ``quantkit gate`` against ``evals/baselines/``.  A regression in the
converter, the quantiser or the evaluation fails this test.  Record new
baselines deliberately with ``python -m quantkit.evals.ci --update``.

Across CPU kinds: the baselines were recorded on one x86_64 machine and llama.cpp's
floating point differs between builds.  On an AMD EPYC (AVX-512) build every gated
metric stays far inside ``evals/thresholds.toml``'s tolerances (largest drifts: kld_mean
9.7e-6 of 8.5e-4 allowed for Q4_K_M and 9.3e-6 of 5e-4 for q8_0, same_top 4.9e-4 of
1e-2, routing.topk_exact 1.2e-4 of 2e-2, ppl_ratio 1.4e-4 of 1e-2), and the setup keys
the gate compares (hashes of the BF16 base and the text, ctx, chunks, vocabulary,
llama-cpp-python version) do not depend on the CPU.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from quantkit.cli.main import app
from quantkit.evals.ci import GATED_TYPES, baseline_path, fixture_reports


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return fixture_reports(tmp_path_factory.mktemp("ci-gate"))


@pytest.mark.parametrize("label", GATED_TYPES)
def test_fixture_quantisation_passes_the_gate(reports, tmp_path, label):
    report = tmp_path / f"{label}.json"
    report.write_text(json.dumps(reports[label]))
    summary = tmp_path / "summary.md"
    result = CliRunner().invoke(app, ["gate", str(report), "--baseline", str(baseline_path(label)), "--markdown", str(summary)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "pass" in summary.read_text()


def test_gated_types_order_as_expected(reports):
    """More bits, less damage: q8_0 must beat Q4_K_M on every headline metric."""
    q8, q4 = reports["q8_0"], reports["Q4_K_M"]
    assert q8["kld_mean"] < q4["kld_mean"]
    assert q8["same_top"] >= q4["same_top"]
    assert q8["routing"]["topk_exact"] >= q4["routing"]["topk_exact"]
