"""The project's own quality gate on the bundled fixture, shared by the test and the baseline updater.

``python -m quantkit.evals.ci --update`` converts the fixture to its BF16 base
and to every gated type, evaluates each against the base on the held-out plays,
and records the reports as baselines under ``evals/baselines/``.
``tests/test_quality_gate.py`` makes the same reports and gates them.

Not for: general use (``quantkit eval kld`` / ``quantkit gate``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-mixtral"
BASELINES = ROOT / "evals" / "baselines"
#: The gated variants: the converter's own q8_0 and llama.cpp presets (type plans of quantkit.policy.presets).
GATED_TYPES: tuple[str, ...] = ("q8_0", "Q4_K_M")
N_CTX = 256
N_CHUNKS = 16


def fixture_reports(work: Path, types: tuple[str, ...] = GATED_TYPES) -> dict[str, dict[str, Any]]:
    """Convert and evaluate every gated type; returns label -> eval kld report."""
    from quantkit.pipeline.convert import convert
    from quantkit.evals.corpora import heldout_text
    from quantkit.evals.kld import base_logprobs, compare

    work.mkdir(parents=True, exist_ok=True)
    text = heldout_text()
    base = work / "tiny-mixtral-bf16.gguf"
    convert(FIXTURE, base, "bf16", force=True)
    b = base_logprobs(base, text, N_CTX, N_CHUNKS, cache_dir=work / "cache")
    reports = {}
    for t in types:
        path = work / f"tiny-mixtral-{t}.gguf"
        convert(FIXTURE, path, t, force=True)
        report = compare(b, path, text, label=t)
        # paths differ between machines; identity is in the hashes
        report["setup"]["base"] = base.name
        report["setup"]["model"] = path.name
        reports[t] = report
    return reports


def baseline_path(label: str) -> Path:
    return BASELINES / f"tiny-mixtral-{label}.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--update", action="store_true", help="record new baselines (deliberately)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantkit-ci-gate"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.update:
        ap.error("pass --update to record new baselines; the gate itself runs in tests/test_quality_gate.py")
    BASELINES.mkdir(parents=True, exist_ok=True)
    for label, report in fixture_reports(args.work).items():
        baseline_path(label).write_text(json.dumps(report, indent=2) + "\n")
        log.info("%s: kld_mean %.6f, same_top %.4f, ppl_ratio %.4f", baseline_path(label), report["kld_mean"], report["same_top"], report["ppl_ratio"])


if __name__ == "__main__":
    main()
