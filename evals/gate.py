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
import math
import re
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


#: a report or baseline larger than this is not an ``eval kld`` report (they are a few kB): refused before reading it
MAX_REPORT_BYTES = 64 << 20
#: keys a metric rule of the thresholds file may hold
RULE_KEYS = ("direction", "abs", "rel", "max", "min")


def _show(value: Any, cap: int = 80) -> str:
    """An untrusted value for a message: its repr, capped."""
    r = repr(value)
    return r if len(r) <= cap else r[: cap - 1] + "…"


def _read(path: Path, what: str, fix: str) -> str:
    """The text of a small file, every failure one line."""
    path = Path(path)
    try:
        if path.is_dir():
            raise QuantkitError(f"{path}: {what} is a directory, expected a file; fix: {fix}")
        size = path.stat().st_size
        if size > MAX_REPORT_BYTES:
            raise QuantkitError(f"{path}: {what} is {size} bytes, more than {MAX_REPORT_BYTES} (not a quantkit file); fix: {fix}")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QuantkitError(f"{path}: {what} not found; fix: {fix}") from None
    except UnicodeDecodeError as e:
        raise QuantkitError(f"{path}: {what} is not UTF-8 text (byte {e.start}); fix: {fix}") from None
    except OSError as e:
        raise QuantkitError(f"{path}: {what} cannot be read ({e.strerror or e}); fix: {fix}") from None


def load_json(path: Path, what: str) -> dict[str, Any]:
    """An ``eval kld`` report (or baseline): a JSON object of kind ``quantkit.kld`` with a ``setup`` object."""
    fix = "check the path (record a baseline with --update-baseline)" if what == "baseline" else "pass the JSON written by quantkit eval kld --json"
    text = _read(path, what, fix)
    try:
        data = json.loads(text)
    except ValueError as e:  # JSONDecodeError, or an integer of more than 4300 digits
        raise QuantkitError(f"{path}: {what} is not valid JSON ({_show(str(e), 120)}); fix: regenerate it with quantkit eval kld") from None
    except RecursionError:
        raise QuantkitError(f"{path}: {what} is not valid JSON (nested too deeply); fix: regenerate it with quantkit eval kld") from None
    if not isinstance(data, dict) or data.get("kind") != "quantkit.kld":
        raise QuantkitError(f"{path}: {what} is not a quantkit eval kld report (no \"kind\": \"quantkit.kld\"); fix: pass the JSON written by quantkit eval kld --json")
    setup = data.get("setup")
    if not isinstance(setup, dict):
        found = "missing" if setup is None else f"a {type(setup).__name__}"
        raise QuantkitError(f"{path}: key 'setup' of the {what} must be a JSON object ({found}); fix: regenerate it with quantkit eval kld --json")
    return data


def _number(path: Path, key: str, value: Any, fix: str) -> float:
    """A JSON / TOML number as a float (NaN and infinities pass: the caller decides); anything else is an error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise QuantkitError(f"{path}: {key} must be a number ({_show(value)}); fix: {fix}")
    try:
        return float(value)
    except OverflowError:
        raise QuantkitError(f"{path}: {key} is out of range ({_show(value)}); fix: {fix}") from None


def load_thresholds(path: Path | None) -> dict[str, Any]:
    """The gate's rules, every key and type checked: ``[metrics.NAME]`` (direction, abs, rel, max, min) and ``[setup] must_match``."""
    path = Path(path or DEFAULT_THRESHOLDS)
    fix = "correct it (see quantkit's evals/thresholds.toml)"
    text = _read(path, "thresholds file", "check the path")
    try:
        t = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise QuantkitError(f"{path}: invalid TOML ({e}); fix: correct the file") from None
    unknown = sorted(set(t) - {"metrics", "setup"})
    if unknown:
        raise QuantkitError(f"{path}: unknown section {_show(unknown[0])} (expected metrics, setup); fix: {fix}")
    metrics = t.get("metrics", {})
    if not isinstance(metrics, dict):
        raise QuantkitError(f"{path}: metrics must be a table ({_show(metrics)}); fix: {fix}")
    for name, m in metrics.items():
        if not isinstance(m, dict):
            raise QuantkitError(f"{path}: metrics.{name} must be a table with a direction ({_show(m)}); fix: {fix}")
        extra = sorted(set(m) - set(RULE_KEYS))
        if extra:
            raise QuantkitError(f"{path}: metrics.{name}.{extra[0]} is not a rule key (expected {', '.join(RULE_KEYS)}); fix: {fix}")
        if m.get("direction") not in ("lower", "higher"):
            raise QuantkitError(f"{path}: metrics.{name}.direction must be 'lower' or 'higher' ({_show(m.get('direction'))}); fix: set it")
        for key in ("abs", "rel", "max", "min"):
            if key not in m:
                continue
            v = _number(path, f"metrics.{name}.{key}", m[key], fix)
            if not math.isfinite(v):
                raise QuantkitError(f"{path}: metrics.{name}.{key} must be a finite number ({_show(v)}); fix: {fix}")
            if key in ("abs", "rel") and v < 0:
                raise QuantkitError(f"{path}: metrics.{name}.{key} must be >= 0 ({_show(v)}); fix: {fix}")
    setup = t.get("setup", {})
    if not isinstance(setup, dict):
        raise QuantkitError(f"{path}: setup must be a table ({_show(setup)}); fix: {fix}")
    extra = sorted(set(setup) - {"must_match"})
    if extra:
        raise QuantkitError(f"{path}: setup.{extra[0]} is not a known key (expected must_match); fix: {fix}")
    keys = setup.get("must_match", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise QuantkitError(f"{path}: setup.must_match must be a list of key names ({_show(keys)}); fix: {fix}")
    return t


def _get(report: dict[str, Any], dotted: str) -> Any:
    cur: Any = report
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _finite(v: Any) -> bool:
    try:
        return not isinstance(v, bool) and math.isfinite(v)
    except (TypeError, OverflowError):
        return False


def check_metric(name: str, rule: dict[str, Any], value: Any, base: Any) -> Check:
    """One metric against its baseline; a missing, NaN or infinite value fails the check."""
    if value is None or base is None:
        return Check(name, False, value, base, "-", f"{name} missing from {'report' if value is None else 'baseline'}")
    bad = [f"the {w} value {v!r} is not a number" for w, v in (("report", value), ("baseline", base)) if not _finite(v)]
    if bad:
        return Check(name, False, value, base, "-", "; ".join(bad))
    lower = rule["direction"] == "lower"
    allowed = max(float(rule.get("abs", 0.0)), float(rule.get("rel", 0.0)) * abs(base))
    worse_by = (value - base) if lower else (base - value)
    msgs = []
    if not worse_by <= allowed:
        msgs.append(f"{'rose' if lower else 'fell'} by {worse_by:.4g} (allowed {allowed:.4g})")
    if "max" in rule and not value <= rule["max"]:
        msgs.append(f"above the limit {rule['max']}")
    if "min" in rule and not value >= rule["min"]:
        msgs.append(f"below the limit {rule['min']}")
    sign = "+" if lower else "-"
    return Check(name, not msgs, value, base, f"{sign}{allowed:.4g}", "; ".join(msgs) or "ok")


def gate(report_path: Path, baseline_path: Path, thresholds_path: Path | None = None) -> Verdict:
    """The verdict on ``report_path`` against ``baseline_path``; malformed inputs raise QuantkitError naming the file and key."""
    report = load_json(report_path, "report")
    baseline = load_json(baseline_path, "baseline")
    t = load_thresholds(thresholds_path)
    checks: list[Check] = []
    for key in t.get("setup", {}).get("must_match", []):
        a, b = report["setup"].get(key), baseline["setup"].get(key)
        for path, v in ((report_path, a), (baseline_path, b)):
            if not isinstance(v, (str, int, float, type(None))):  # quantkit writes strings and numbers only
                raise QuantkitError(f"{path}: setup.{key} must be a string or a number ({_show(v)}); fix: regenerate it with quantkit eval kld --json")
        checks.append(Check(f"setup.{key}", a == b, a, b, "equal", "ok" if a == b else "setup differs from the baseline: not comparable"))
    fix = "regenerate it with quantkit eval kld --json"
    for name, rule in t.get("metrics", {}).items():
        value, base = _get(report, name), _get(baseline, name)
        if value is not None:
            value = _number(Path(report_path), f"key {name!r}", value, fix)
        if base is not None:
            base = _number(Path(baseline_path), f"key {name!r}", base, fix)
        checks.append(check_metric(name, rule, value, base))
    return Verdict(all(c.ok for c in checks), tuple(checks), str(report_path), str(baseline_path))


def _fmt(v: Any) -> str:
    """A value for a table cell: short and printable (a report's strings are untrusted; the CLI shows it as plain text)."""
    if isinstance(v, float):
        return f"{v:.6g}"
    s = str(v)
    s = s[:16] + "…" if len(s) > 20 else s
    return "".join(ch if ch.isprintable() else "?" for ch in s)


def _md(s: str) -> str:
    """Text for a Markdown table cell: no cell break (``|``), no link, no HTML, one line."""
    for ch, esc in (("&", "&amp;"), ("\\", "\\\\"), ("|", "\\|"), ("[", "\\["), ("]", "\\]"), ("`", "\\`"), ("<", "&lt;"), (">", "&gt;"), ("\n", " ")):
        s = s.replace(ch, esc)
    return s


_XML_BAD = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml(s: str) -> str:
    """Text XML 1.0 can hold: control characters and lone surrogates become '?'."""
    return _XML_BAD.sub("?", s)


def to_markdown(v: Verdict) -> str:
    lines = [f"### quantkit gate: {'✅ pass' if v.ok else '❌ FAIL'}", "", f"report {_md(v.report)} vs baseline {_md(v.baseline)}", "",
             "| check | value | baseline | allowed | result |", "|---|---|---|---|---|"]
    for c in v.checks:
        lines.append(f"| {_md(c.name)} | {_md(_fmt(c.value))} | {_md(_fmt(c.baseline))} | {c.allowed} | {'ok' if c.ok else '**' + _md(c.message) + '**'} |")
    return "\n".join(lines) + "\n"


def to_junit(v: Verdict) -> str:
    fails = sum(not c.ok for c in v.checks)
    out = [f'<?xml version="1.0" encoding="UTF-8"?>', f'<testsuite name="quantkit.gate" tests="{len(v.checks)}" failures="{fails}">']
    for c in v.checks:
        out.append(f'  <testcase classname="quantkit.gate" name={quoteattr(_xml(c.name))}>')
        if not c.ok:
            detail = f"value={_show(c.value, 200)} baseline={_show(c.baseline, 200)} allowed={c.allowed}"
            out.append(f"    <failure message={quoteattr(_xml(c.message))}>{escape(_xml(detail))}</failure>")
        out.append("  </testcase>")
    out.append("</testsuite>")
    return "\n".join(out) + "\n"
