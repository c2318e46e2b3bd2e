"""The CI quality gate: compare an ``eval kld`` report with a committed baseline.

Fails when a metric regresses past its threshold (``allowed = max(abs, rel *
|baseline|)`` in the metric's bad direction, plus optional hard ``max``/``min``
limits) or when the setup differs (tokenizer, ctx, chunks, text, base model,
variant label, llama.cpp version): numbers from different setups are not
compared.  Renders the verdict as JSON, Markdown (CI job summaries) and JUnit
XML.

Not for: computing the metrics (``quantkit.evals.kld``).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from quantkit.errors import QuantkitError

DEFAULT_THRESHOLDS = Path(__file__).with_name("thresholds.toml")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    value: Any
    baseline: Any
    allowed: str
    message: str


@dataclass(frozen=True)
class Verdict:
    ok: bool
    checks: tuple[Check, ...]
    report: str
    baseline: str

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "report": self.report, "baseline": self.baseline, "checks": [asdict(c) for c in self.checks]}


def load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QuantkitError(f"{path}: {what} not found; fix: check the path (record a baseline with --update-baseline)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantkitError(f"{path}: {what} is not valid JSON ({e}); fix: regenerate it with quantkit eval kld") from None
    if not isinstance(data, dict) or data.get("kind") != "quantkit.kld":
        raise QuantkitError(f"{path}: {what} is not a quantkit eval kld report; fix: pass the JSON written by quantkit eval kld --json")
    return data


def load_thresholds(path: Path | None) -> dict[str, Any]:
    path = Path(path or DEFAULT_THRESHOLDS)
    try:
        t = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QuantkitError(f"{path}: thresholds file not found; fix: check the path") from None
    except tomllib.TOMLDecodeError as e:
        raise QuantkitError(f"{path}: invalid TOML ({e}); fix: correct the file") from None
    for name, m in t.get("metrics", {}).items():
        if m.get("direction") not in ("lower", "higher"):
            raise QuantkitError(f"{path}: metrics.{name}.direction must be 'lower' or 'higher'; fix: set it")
        for key in ("abs", "rel", "max", "min"):
            if key in m and not isinstance(m[key], (int, float)):
                raise QuantkitError(f"{path}: metrics.{name}.{key} must be a number; fix: correct it")
    return t


def _get(report: dict[str, Any], dotted: str) -> Any:
    cur: Any = report
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def check_metric(name: str, rule: dict[str, Any], value: Any, base: Any) -> Check:
    if value is None or base is None:
        return Check(name, False, value, base, "-", f"{name} missing from {'report' if value is None else 'baseline'}")
    lower = rule["direction"] == "lower"
    allowed = max(float(rule.get("abs", 0.0)), float(rule.get("rel", 0.0)) * abs(base))
    worse_by = (value - base) if lower else (base - value)
    msgs = []
    if worse_by > allowed:
        msgs.append(f"{'rose' if lower else 'fell'} by {worse_by:.4g} (allowed {allowed:.4g})")
    if "max" in rule and value > rule["max"]:
        msgs.append(f"above the limit {rule['max']}")
    if "min" in rule and value < rule["min"]:
        msgs.append(f"below the limit {rule['min']}")
    sign = "+" if lower else "-"
    return Check(name, not msgs, value, base, f"{sign}{allowed:.4g}", "; ".join(msgs) or "ok")


def gate(report_path: Path, baseline_path: Path, thresholds_path: Path | None = None) -> Verdict:
    report = load_json(report_path, "report")
    baseline = load_json(baseline_path, "baseline")
    t = load_thresholds(thresholds_path)
    checks: list[Check] = []
    for key in t.get("setup", {}).get("must_match", []):
        a, b = report["setup"].get(key), baseline["setup"].get(key)
        checks.append(Check(f"setup.{key}", a == b, a, b, "equal", "ok" if a == b else "setup differs from the baseline: not comparable"))
    for name, rule in t.get("metrics", {}).items():
        checks.append(check_metric(name, rule, _get(report, name), _get(baseline, name)))
    return Verdict(all(c.ok for c in checks), tuple(checks), str(report_path), str(baseline_path))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    s = str(v)
    return s[:16] + "…" if len(s) > 20 else s


def to_markdown(v: Verdict) -> str:
    lines = [f"### quantkit gate: {'✅ pass' if v.ok else '❌ FAIL'}", "", f"report `{v.report}` vs baseline `{v.baseline}`", "",
             "| check | value | baseline | allowed | result |", "|---|---|---|---|---|"]
    for c in v.checks:
        lines.append(f"| {c.name} | {_fmt(c.value)} | {_fmt(c.baseline)} | {c.allowed} | {'ok' if c.ok else '**' + c.message + '**'} |")
    return "\n".join(lines) + "\n"


def to_junit(v: Verdict) -> str:
    fails = sum(not c.ok for c in v.checks)
    out = [f'<?xml version="1.0" encoding="UTF-8"?>', f'<testsuite name="quantkit.gate" tests="{len(v.checks)}" failures="{fails}">']
    for c in v.checks:
        out.append(f'  <testcase classname="quantkit.gate" name={quoteattr(c.name)}>')
        if not c.ok:
            out.append(f"    <failure message={quoteattr(c.message)}>{escape(f'value={c.value!r} baseline={c.baseline!r} allowed={c.allowed}')}</failure>")
        out.append("  </testcase>")
    out.append("</testsuite>")
    return "\n".join(out) + "\n"
