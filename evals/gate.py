"""The CI quality gate: compare an ``eval kld`` report with a committed baseline.

Fails when a metric regresses past its threshold (``allowed = max(abs, rel *
|baseline|)`` in the metric's bad direction, plus optional hard ``max``/``min``
limits) or when the setup differs (tokenizer, ctx, chunks, text, base model,
variant label, llama.cpp version): numbers from different setups are not
compared.  Renders the verdict as JSON, Markdown (CI job summaries) and JUnit
XML.  Reports are checked key by key against what each metric can be
(:data:`REPORT_SCHEMA`: KL-divergences >= 0, rates in [0, 1], perplexities > 0,
counts whole): a value no evaluation can produce is an error naming the file
and the key, never a verdict; a NaN or infinite metric fails its check (and is
never recorded as a baseline).

Not for: computing the metrics (``quantkit.evals.kld``).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
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
    """The text of a small regular file, every failure one line (a FIFO or a device is refused, never waited on)."""
    path = Path(path)
    try:
        if path.is_dir():
            raise QuantkitError(f"{path}: {what} is a directory, expected a file; fix: {fix}")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise QuantkitError(f"{path}: {what} is not a regular file (a device, pipe or socket); fix: {fix}")
            if st.st_size > MAX_REPORT_BYTES:
                raise QuantkitError(f"{path}: {what} is {st.st_size} bytes, more than {MAX_REPORT_BYTES} (not a quantkit file); fix: {fix}")
            data = f.read(MAX_REPORT_BYTES + 1)
        if len(data) > MAX_REPORT_BYTES:  # grew while being read
            raise QuantkitError(f"{path}: {what} is more than {MAX_REPORT_BYTES} bytes (not a quantkit file); fix: {fix}")
        return data.decode("utf-8")
    except FileNotFoundError:
        raise QuantkitError(f"{path}: {what} not found; fix: {fix}") from None
    except UnicodeDecodeError as e:
        raise QuantkitError(f"{path}: {what} is not UTF-8 text (byte {e.start}); fix: {fix}") from None
    except OSError as e:
        raise QuantkitError(f"{path}: {what} cannot be read ({e.strerror or e}); fix: {fix}") from None


@dataclass(frozen=True)
class Domain:
    """The values a report key can hold: a number within [lo, hi] (``lo_open``: above lo), or a whole number."""

    text: str  # for messages: "a rate in [0, 1]"
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    whole: bool = False
    nullable: bool = False

    def holds(self, v: float) -> bool:
        """Whether the finite number ``v`` lies in the domain."""
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or v <= self.hi


#: KL-divergences are >= 0, but one computed from float32 log-probabilities can come out a hair below
#: (llama-perplexity prints such minima too): rounding, never a real value
KLD_ROUNDING = 1e-4
#: a difference of two probabilities, each rounded in float32
DP_ROUNDING = 1e-6

_KLD = Domain("a KL-divergence >= 0", lo=-KLD_ROUNDING)
_RATE = Domain("a rate in [0, 1]", lo=0.0, hi=1.0)
_STDERR = Domain("a standard error >= 0", lo=0.0)
_DP = Domain("a change of probability in [-1, 1]", lo=-1.0 - DP_ROUNDING, hi=1.0 + DP_ROUNDING)
_RMS = Domain("a root-mean-square change of probability in [0, 1]", lo=0.0, hi=1.0 + DP_ROUNDING)
_PPL = Domain("a perplexity > 0", lo=0.0, lo_open=True)
_RATIO = Domain("a ratio > 0", lo=0.0, lo_open=True)
_REAL = Domain("a finite number")
_SECONDS = Domain("a duration >= 0", lo=0.0)
_COUNT = Domain("a count (a whole number >= 0)", lo=0, whole=True)
_SIZE = Domain("a whole number >= 1", lo=1, whole=True)

_PERCENTILES = ("max", "p99_9", "p99", "p95", "p90", "median", "p10", "p5", "p1", "min")  # quantkit.evals.kld.PERCENTILES
_FLIPS = {"margin": [_RATE], "positions": _COUNT, "flip_rate": Domain("a rate in [0, 1] or null", lo=0.0, hi=1.0, nullable=True)}
_LAYER = {
    "positions": _COUNT, "topk_exact": _RATE, "topk_jaccard": _RATE, "top1": _RATE, "router_kld": _KLD,
    "load_base": [_RATE], "load_cand": [_RATE],
    "dead_experts_base": _COUNT, "dead_experts_cand": _COUNT, "overloaded_experts_cand": _COUNT,
    "flips_by_margin": [_FLIPS],
}
#: What ``quantkit eval kld --json`` writes (``quantkit.evals.kld.compare``, ``quantkit.evals.routing``), key by key:
#: a Domain, a nested object, or ``[item]`` for a list of such items.  Keys outside it are not checked (the gate
#: refuses any metric it compares that is not a number); keys in it may be absent (a missing gated metric fails its check).
REPORT_SCHEMA: dict[str, Any] = {
    "kld_mean": _KLD, "kld_mean_stderr": _STDERR, **{f"kld_{p}": _KLD for p in _PERCENTILES},
    "same_top": _RATE, "same_top_stderr": _STDERR,
    "dp_mean": _DP, "dp_mean_stderr": _STDERR, "dp_rms": _RMS, **{f"dp_{p}": _DP for p in _PERCENTILES},
    "ppl_base": _PPL, "ppl": _PPL, "ln_ppl_ratio": _REAL, "ln_ppl_ratio_stderr": _STDERR, "ppl_ratio": _RATIO,
    "seconds": _SECONDS,
    "routing": {
        "k": _COUNT, "topk_exact": _RATE, "topk_exact_min": _RATE, "topk_jaccard": _RATE, "top1": _RATE,
        "router_kld": _KLD, "dead_experts_cand": _COUNT, "layers": [_LAYER],
    },
}
_TEXT = "text"
#: the report's ``setup``: what quantkit writes there (strings and whole numbers)
SETUP_SCHEMA: dict[str, Any] = {
    **{k: _TEXT for k in ("base", "base_sha256", "model", "model_sha256", "label", "text_sha256", "vocab", "llama_cpp")},
    "n_ctx": _SIZE, "n_chunks": _SIZE, "n_positions": _SIZE,
}


def _check_value(path: Path, key: str, value: Any, domain: Domain, finite: bool, fix: str) -> None:
    """One value of a report against its domain: one QuantkitError line naming the file and the key otherwise.

    NaN and infinities pass unless ``finite`` (the gate turns them into a failed check: an evaluation that
    produced them did run); a finite value outside the domain never does (no evaluation can produce it).
    """
    if value is None and domain.nullable:
        return
    if domain.whole:
        if isinstance(value, bool) or not isinstance(value, int):
            raise QuantkitError(f"{path}: key {key!r} must be {domain.text} ({_show(value)}); fix: {fix}")
        if not domain.holds(value):
            raise QuantkitError(f"{path}: key {key!r} must be {domain.text} ({_show(value)}); fix: {fix}")
        return
    v = _number(path, f"key {key!r}", value, fix)
    if not math.isfinite(v):
        if finite:
            raise QuantkitError(f"{path}: key {key!r} must be {domain.text}, a finite number ({_show(v)}); fix: {fix}")
        return
    if not domain.holds(v):
        raise QuantkitError(f"{path}: key {key!r} must be {domain.text} ({_show(value)}); fix: {fix}")


def _check_schema(path: Path, obj: dict[str, Any], schema: dict[str, Any], prefix: str, finite: bool, fix: str) -> None:
    """Every key of ``schema`` that ``obj`` holds, recursively (the schema is a few levels deep: so is this)."""
    for key, want in schema.items():
        if key not in obj:
            continue
        value, name = obj[key], f"{prefix}{key}"
        if isinstance(want, Domain):
            _check_value(path, name, value, want, finite, fix)
        elif isinstance(want, dict):
            if not isinstance(value, dict):
                raise QuantkitError(f"{path}: key {name!r} must be a JSON object ({_show(value)}); fix: {fix}")
            _check_schema(path, value, want, name + ".", finite, fix)
        else:  # [item]: a list of items
            if not isinstance(value, list):
                raise QuantkitError(f"{path}: key {name!r} must be a JSON array ({_show(value)}); fix: {fix}")
            (item,) = want
            for i, v in enumerate(value):
                if isinstance(item, Domain):
                    _check_value(path, f"{name}[{i}]", v, item, finite, fix)
                elif not isinstance(v, dict):
                    raise QuantkitError(f"{path}: key {f'{name}[{i}]'!r} must be a JSON object ({_show(v)}); fix: {fix}")
                else:
                    _check_schema(path, v, item, f"{name}[{i}].", finite, fix)


def _check_setup(path: Path, setup: dict[str, Any], fix: str) -> None:
    for key, want in SETUP_SCHEMA.items():
        if key not in setup:
            continue
        if want is _TEXT:
            if not isinstance(setup[key], str):
                raise QuantkitError(f"{path}: setup.{key} must be a string ({_show(setup[key])}); fix: {fix}")
        else:
            _check_value(path, f"setup.{key}", setup[key], want, True, fix)


def _non_finite(data: Any) -> str | None:
    """The dotted key of the first NaN or infinity anywhere in ``data`` (iteratively: any depth json.loads accepted)."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        key, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return key
        if isinstance(v, dict):
            stack.extend((f"{key}.{k}" if key else str(k), x) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((f"{key}[{i}]", x) for i, x in enumerate(v))
    return None


def load_json(path: Path, what: str, *, finite: bool = True) -> dict[str, Any]:
    """An ``eval kld`` report (or baseline), fully checked: a JSON object of kind ``quantkit.kld`` with a ``setup`` object,
    every key quantkit writes within its domain (:data:`REPORT_SCHEMA`, :data:`SETUP_SCHEMA`).

    ``finite`` (the default, for a report about to be recorded as a baseline) refuses NaN and infinities anywhere;
    the gate itself passes ``finite=False`` and fails the check of a non-finite metric instead.
    """
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
    regen = "regenerate it with quantkit eval kld --json"
    _check_setup(path, setup, regen)
    _check_schema(path, data, REPORT_SCHEMA, "", finite, regen)
    if finite and (key := _non_finite(data)) is not None:
        raise QuantkitError(f"{path}: key {_show(key)} is not a finite number (NaN or infinity); fix: {regen}")
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
    if not metrics:
        raise QuantkitError(
            f"{path}: no [metrics.NAME] rule, the gate would pass every report (no checks); "
            f"fix: add one, e.g. [metrics.kld_mean] with direction = \"lower\" and abs = 0.0005 (see quantkit's evals/thresholds.toml)"
        )
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
    report = load_json(report_path, "report", finite=False)
    baseline = load_json(baseline_path, "baseline", finite=False)
    t = load_thresholds(thresholds_path)
    checks: list[Check] = []
    for key in t.get("setup", {}).get("must_match", []):
        if key not in report["setup"] and key not in baseline["setup"]:  # a typo, or reports of another tool: nothing would be compared
            raise QuantkitError(
                f"{thresholds_path or DEFAULT_THRESHOLDS}: setup.must_match names {_show(key)}, a key neither the report nor the baseline has in its setup; "
                f"fix: correct the name (keys quantkit writes: {', '.join(SETUP_SCHEMA)})"
            )
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
    out = ['<?xml version="1.0" encoding="UTF-8"?>', f'<testsuite name="quantkit.gate" tests="{len(v.checks)}" failures="{fails}">']
    for c in v.checks:
        out.append(f'  <testcase classname="quantkit.gate" name={quoteattr(_xml(c.name))}>')
        if not c.ok:
            detail = f"value={_show(c.value, 200)} baseline={_show(c.baseline, 200)} allowed={c.allowed}"
            out.append(f"    <failure message={quoteattr(_xml(c.message))}>{escape(_xml(detail))}</failure>")
        out.append("  </testcase>")
    out.append("</testsuite>")
    return "\n".join(out) + "\n"
