"""Hostile inputs to the evaluation library and the quality gate (issue #12).

Every bad input gives one QuantkitError line naming the file or key and the
fix, before any model is loaded where the input can be judged without it:
reports and thresholds the gate cannot trust (NaN metrics, wrong types, a
directory), ``--ctx`` / ``--chunks`` / ``--threads`` outside their ranges,
pickled weights in an HF directory, empty or too-short texts.  "Before
loading" is proven by replacing the loader with one that fails the test.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import FIXTURE, TOKENIZER_FILES
from quantkit.cli.main import app
from quantkit.errors import QuantkitError
from quantkit.evals import gate as g

FUZZ_EXAMPLES = int(os.environ.get("QK_FUZZ_EXAMPLES", "60"))
METRICS = ("kld_mean", "kld_p99", "same_top", "ppl_ratio", "routing.topk_exact", "routing.top1")  # gated by evals/thresholds.toml


def _one_line(e: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "fix:" in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def _cli_one_line(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    msg = " ".join(result.output.split())
    assert result.output.strip().startswith("error:") and "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


# --------------------------------------------------------------------------- the gate


def _report(**metrics) -> dict:
    r = {
        "kind": "quantkit.kld",
        "setup": {"base_sha256": "a" * 64, "label": "q8_0", "text_sha256": "b" * 64, "n_ctx": 256, "n_chunks": 16, "vocab": "c" * 64,
                  "llama_cpp": "llama-cpp-python 0.3.36"},
        "kld_mean": 0.001, "kld_p99": 0.01, "same_top": 0.98, "ppl_ratio": 1.001,
        "routing": {"topk_exact": 0.97, "top1": 0.99},
    }
    for k, v in metrics.items():
        if k.startswith("routing_"):
            r["routing"][k.removeprefix("routing_")] = v
        else:
            r[k] = v
    return r


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj, encoding="utf-8")
    return path


@pytest.fixture
def baseline(tmp_path):
    return _write(tmp_path / "baseline.json", _report())


def test_the_unchanged_report_passes(tmp_path, baseline):
    assert g.gate(_write(tmp_path / "r.json", _report()), baseline).ok


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_metric_fails_its_check(tmp_path, baseline, bad):
    """json.dumps writes NaN / Infinity and json.loads reads them back: NaN compares False with everything, so it passed."""
    v = g.gate(_write(tmp_path / "r.json", _report(kld_mean=bad)), baseline)
    assert not v.ok
    (check,) = [c for c in v.checks if c.name == "kld_mean"]
    assert not check.ok and "is not a number" in check.message, check
    for name in ("same_top", "ppl_ratio"):  # the others still pass
        assert next(c for c in v.checks if c.name == name).ok


def test_every_metric_nan_fails_every_check_and_the_cli_exits_1(tmp_path, baseline):
    report = _write(tmp_path / "r.json", _report(**{m.replace(".", "_"): math.nan for m in METRICS}))
    v = g.gate(report, baseline)
    assert not v.ok and all(not c.ok and "not a number" in c.message for c in v.checks if c.name in METRICS)
    result = CliRunner().invoke(app, ["gate", str(report), "--baseline", str(baseline), "--json", str(tmp_path / "v.json")], terminal_width=200)
    assert result.exit_code == 1, result.output
    assert json.loads((tmp_path / "v.json").read_text())["ok"] is False


def test_a_nan_baseline_fails_too(tmp_path):
    base = _write(tmp_path / "b.json", _report(same_top=math.nan))
    v = g.gate(_write(tmp_path / "r.json", _report()), base)
    assert not v.ok and "the baseline value nan is not a number" in next(c for c in v.checks if c.name == "same_top").message


def _nest(depth: int) -> str:
    return '{"kind": "quantkit.kld", "setup": {}, "x": ' + "[" * depth + "]" * depth + "}"


@pytest.mark.parametrize(
    "case, content, needles",
    [
        ("setup missing", {k: v for k, v in _report().items() if k != "setup"}, ["key 'setup'", "missing"]),
        ("setup a list", {**_report(), "setup": ["label", "q8_0"]}, ["key 'setup'", "list"]),
        ("setup null", {**_report(), "setup": None}, ["key 'setup'"]),
        ("metric a string", _report(kld_mean="0.001"), ["key 'kld_mean' must be a number", "'0.001'"]),
        ("metric a bool", _report(same_top=True), ["key 'same_top' must be a number", "True"]),
        ("metric a list", _report(ppl_ratio=[1.0]), ["key 'ppl_ratio' must be a number"]),
        ("nested metric a string", _report(routing_topk_exact="high"), ["key 'routing.topk_exact' must be a number"]),
        ("metric an enormous integer", '{"kind": "quantkit.kld", "setup": {}, "kld_mean": 1' + "0" * 400 + "}", ["key 'kld_mean' is out of range"]),
        ("integer of 5000 digits", '{"kind": "quantkit.kld", "setup": {}, "kld_mean": 1' + "0" * 5000 + "}", ["not valid JSON"]),
        ("setup value an object", {**_report(), "setup": {**_report()["setup"], "label": {"a": 1}}}, ["setup.label must be a string", "{'a': 1}"]),
        ("not an object", [1, 2, 3], ["not a quantkit eval kld report"]),
        ("another kind", {**_report(), "kind": "quantkit.ppl"}, ["not a quantkit eval kld report"]),
        ("not JSON", "{kld_mean: 1", ["not valid JSON"]),
        ("nested too deeply", _nest(100_000), ["not valid JSON"]),
        ("not UTF-8", b"\xff\xfe{}", ["not UTF-8"]),
        ("a directory", None, ["is a directory"]),
        ("missing", "MISSING", ["not found"]),
    ],
)
@pytest.mark.parametrize("which", ["report", "baseline"])
def test_a_malformed_report_or_baseline_is_one_line(tmp_path, which, case, content, needles):
    good = _write(tmp_path / "good.json", _report())
    bad = tmp_path / "bad.json"
    if content is None:
        bad.mkdir()
    elif content == "MISSING":
        pass
    elif isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        _write(bad, content)
    report, base = (bad, good) if which == "report" else (good, bad)
    with pytest.raises(QuantkitError) as e:
        g.gate(report, base)
    _one_line(e, str(bad), *needles)
    result = CliRunner().invoke(app, ["gate", str(report), "--baseline", str(base)], terminal_width=300)
    _cli_one_line(result, str(bad))


def test_update_baseline_refuses_a_malformed_report(tmp_path):
    bad = _write(tmp_path / "r.json", {**_report(), "setup": "q8_0"})
    base = tmp_path / "base.json"
    result = CliRunner().invoke(app, ["gate", str(bad), "--baseline", str(base), "--update-baseline"], terminal_width=300)
    _cli_one_line(result, str(bad), "key 'setup'")
    assert not base.exists()


def _edit(report: dict, dotted: str, value) -> dict:
    """``report`` with the value at ``dotted`` (``a.b``, ``a.b[0].c``) replaced, the path created as needed."""
    cur = report
    parts = dotted.replace("[", ".[").split(".")
    for part, nxt in zip(parts, parts[1:] + [None]):
        key = int(part[1:-1]) if part.startswith("[") else part
        if nxt is None:
            cur[key] = value
        else:
            cur = cur[key]
    return report


def _full_report() -> dict:
    """A report with every key quantkit writes, routing layers included: the committed baseline of the fixture."""
    return json.loads((Path(g.__file__).parent / "baselines" / "tiny-mixtral-q8_0.json").read_text())


#: values no evaluation can produce (the audit: kld_mean = -5.0 and same_top = 1.5 passed the gate)
OUT_OF_DOMAIN = [
    ("kld_mean", -5.0, "a KL-divergence >= 0"),
    ("kld_mean", -0.001, "a KL-divergence >= 0"),  # beyond float32 rounding
    ("kld_p99", -1, "a KL-divergence >= 0"),
    ("kld_min", -0.5, "a KL-divergence >= 0"),
    ("same_top", 1.5, "a rate in [0, 1]"),
    ("same_top", -0.01, "a rate in [0, 1]"),
    ("same_top_stderr", -0.1, "a standard error >= 0"),
    ("ppl_ratio", 0.0, "a ratio > 0"),
    ("ppl_ratio", -1.2, "a ratio > 0"),
    ("ppl", 0, "a perplexity > 0"),
    ("ppl_base", -3.0, "a perplexity > 0"),
    ("dp_max", 1.5, "a change of probability in [-1, 1]"),
    ("dp_rms", -0.2, "in [0, 1]"),
    ("seconds", -1.0, "a duration >= 0"),
    ("routing.topk_exact", 1.2, "a rate in [0, 1]"),
    ("routing.top1", -0.5, "a rate in [0, 1]"),
    ("routing.router_kld", -2.0, "a KL-divergence >= 0"),
    ("routing.k", 2.5, "a count (a whole number >= 0)"),
    ("routing.k", -1, "a count (a whole number >= 0)"),
    ("routing.dead_experts_cand", True, "a count"),
    ("routing.layers[1].top1", 7.0, "a rate in [0, 1]"),
    ("routing.layers[0].load_cand[3]", 1.5, "a rate in [0, 1]"),
    ("routing.layers[2].flips_by_margin[0].flip_rate", -0.5, "a rate in [0, 1] or null"),
    ("routing.layers[0].positions", 12.5, "a count"),
    ("routing.layers[0]", "layer", "must be a JSON object"),
    ("routing.layers", {"top1": 1.0}, "must be a JSON array"),
    ("routing", [0.9], "must be a JSON object"),
    ("setup.n_ctx", 256.0, "a whole number >= 1"),
    ("setup.n_chunks", 0, "a whole number >= 1"),
    ("setup.vocab", 12345, "must be a string"),
]


@pytest.mark.parametrize("which", ["report", "baseline"])
@pytest.mark.parametrize("key, value, needle", OUT_OF_DOMAIN, ids=[f"{k}={v!r}" for k, v, _ in OUT_OF_DOMAIN])
def test_a_value_outside_its_domain_is_one_line(tmp_path, which, key, value, needle):
    good = _write(tmp_path / "good.json", _full_report())
    bad = _write(tmp_path / "bad.json", _edit(_full_report(), key, value))
    report, base = (bad, good) if which == "report" else (good, bad)
    with pytest.raises(QuantkitError) as e:
        g.gate(report, base)
    _one_line(e, str(bad), key, needle)
    _cli_one_line(CliRunner().invoke(app, ["gate", str(report), "--baseline", str(base)], terminal_width=300), str(bad), key)


@pytest.mark.parametrize("key, value", [("kld_min", -3e-7), ("kld_p1", -1e-6), ("routing.router_kld", -1e-9), ("dp_max", 1.0), ("same_top", 1), ("kld_mean", 0)])
def test_values_at_the_edge_of_their_domain_pass(tmp_path, key, value):
    """A KL-divergence a hair below 0 is float32 rounding (llama-perplexity prints such minima too); 1 and 0 are in range."""
    report = _write(tmp_path / "r.json", _edit(_full_report(), key, value))
    g.load_json(report, "report")
    assert g.gate(report, report).ok


def test_every_key_the_fixture_baselines_hold_is_checked():
    """The schema covers what ``eval kld --json`` writes: a key it does not know would go unchecked."""
    def keys(obj, schema, prefix=""):
        for k, v in obj.items():
            assert k in schema, f"{prefix}{k} is not in gate.REPORT_SCHEMA"
            want = schema[k]
            if isinstance(want, dict):
                yield from keys(v, want, f"{prefix}{k}.")
            elif isinstance(want, list) and isinstance(want[0], dict):
                for item in v:
                    yield from keys(item, want[0], f"{prefix}{k}[].")
            yield k

    for path in (Path(g.__file__).parent / "baselines").glob("*.json"):
        data = json.loads(path.read_text())
        setup = data.pop("setup")
        assert set(setup) <= set(g.SETUP_SCHEMA), path
        data.pop("kind")
        assert list(keys(data, g.REPORT_SCHEMA)), path
        g.load_json(path, "baseline")


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("kld_mean", math.nan, "kld_mean"),
        ("same_top", math.inf, "same_top"),
        ("routing.top1", -math.inf, "routing.top1"),
        ("kld_mean_stderr", math.nan, "kld_mean_stderr"),  # not gated, still not a baseline
        ("routing.layers[0].load_base[0]", math.nan, "routing.layers[0].load_base[0]"),
        ("extra.note", math.nan, "extra.note"),  # a key quantkit does not write: no NaN there either
        ("kld_mean", -5.0, "a KL-divergence >= 0"),
        ("same_top", 1.5, "a rate in [0, 1]"),
        ("setup.n_ctx", 256.5, "setup.n_ctx"),
    ],
)
def test_update_baseline_refuses_a_nan_or_impossible_metric(tmp_path, key, value, needle):
    """The audit: `gate REPORT --baseline NEW --update-baseline` wrote a NaN or a negative KLD into the baseline, exit 0."""
    full = _full_report()
    full["extra"] = {"note": 1.0}
    bad = _write(tmp_path / "r.json", _edit(full, key, value))
    new, old = tmp_path / "new.json", _write(tmp_path / "old.json", _full_report())
    before = old.read_bytes()
    for base in (new, old):
        result = CliRunner().invoke(app, ["gate", str(bad), "--baseline", str(base), "--update-baseline"], terminal_width=300)
        _cli_one_line(result, str(bad), needle)
    assert not new.exists() and old.read_bytes() == before
    with pytest.raises(QuantkitError) as e:
        g.load_json(bad, "report")
    _one_line(e, str(bad), needle)


def test_update_baseline_records_a_valid_report(tmp_path):
    report = _write(tmp_path / "r.json", _full_report())
    base = tmp_path / "sub" / "b.json"
    result = CliRunner().invoke(app, ["gate", str(report), "--baseline", str(base), "--update-baseline"], terminal_width=300)
    assert result.exit_code == 0, result.output
    assert json.loads(base.read_text()) == _full_report()
    assert g.gate(report, base).ok


@pytest.mark.parametrize(
    "toml",
    [
        "",  # an empty file
        "# nothing but a comment\n",
        "[metrics]\n",
        '[setup]\nmust_match = ["label"]\n',  # setup only: no metric is compared
    ],
)
def test_thresholds_without_a_metric_rule_are_refused(tmp_path, baseline, toml):
    """The audit: an empty thresholds file passed every report."""
    t = _write(tmp_path / "t.toml", toml)
    with pytest.raises(QuantkitError) as e:
        g.gate(baseline, baseline, t)
    _one_line(e, str(t), "no checks", "[metrics.")
    _cli_one_line(CliRunner().invoke(app, ["gate", str(baseline), "--baseline", str(baseline), "--thresholds", str(t)], terminal_width=300), str(t), "no checks")


def test_must_match_naming_a_key_neither_report_has_is_refused(tmp_path, baseline):
    """The audit: a typo in must_match (a key in neither file) compared None with None and passed."""
    t = _write(tmp_path / "t.toml", '[metrics.kld_mean]\ndirection = "lower"\nabs = 0.1\n[setup]\nmust_match = ["label", "lable"]\n')
    with pytest.raises(QuantkitError) as e:
        g.gate(baseline, baseline, t)
    _one_line(e, str(t), "setup.must_match", "'lable'")
    _cli_one_line(CliRunner().invoke(app, ["gate", str(baseline), "--baseline", str(baseline), "--thresholds", str(t)], terminal_width=300), str(t), "'lable'")
    # a key only one side has is a setup difference: a failed check, not an error
    r = _report()
    r["setup"]["lable"] = "x"
    v = g.gate(_write(tmp_path / "r.json", r), baseline, t)
    assert not v.ok and not next(c for c in v.checks if c.name == "setup.lable").ok


@pytest.mark.parametrize("which", ["report", "baseline", "thresholds"])
def test_a_fifo_is_refused_without_waiting(tmp_path, baseline, which):
    """The audit: `quantkit gate FIFO` blocked forever in open(); a subprocess so the test fails instead of hanging."""
    import subprocess
    import sys

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    args = {"report": (fifo, baseline, None), "baseline": (baseline, fifo, None), "thresholds": (baseline, baseline, fifo)}[which]
    code = (
        "import sys; from pathlib import Path; from quantkit.errors import QuantkitError; from quantkit.evals import gate as g\n"
        "a = [None if x == 'None' else Path(x) for x in sys.argv[1:]]\n"
        "try:\n    g.gate(*a)\nexcept QuantkitError as e:\n    print(e)\n"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"gate waited on a FIFO given as the {which}")
    assert out.returncode == 0 and str(fifo) in out.stdout and "not a regular file" in out.stdout, out


@pytest.mark.parametrize(
    "toml, needles",
    [
        ("metrics = 3\n", ["metrics must be a table"]),
        ("[metrics]\nkld_mean = 3\n", ["metrics.kld_mean must be a table"]),
        ('[metrics.kld_mean]\nabs = 0.1\n', ["metrics.kld_mean.direction must be 'lower' or 'higher'", "None"]),
        ('[metrics.kld_mean]\ndirection = 1\n', ["metrics.kld_mean.direction"]),
        ('[metrics.kld_mean]\ndirection = "lower"\nabs = "0.1"\n', ["metrics.kld_mean.abs must be a number", "'0.1'"]),
        ('[metrics.kld_mean]\ndirection = "lower"\nrel = true\n', ["metrics.kld_mean.rel must be a number", "True"]),
        ('[metrics.kld_mean]\ndirection = "lower"\nmax = nan\n', ["metrics.kld_mean.max must be a finite number"]),
        ('[metrics.kld_mean]\ndirection = "lower"\nabs = inf\n', ["metrics.kld_mean.abs must be a finite number"]),
        ('[metrics.kld_mean]\ndirection = "lower"\nabs = -0.1\n', ["metrics.kld_mean.abs must be >= 0"]),
        ('[metrics.kld_mean]\ndirection = "lower"\nmaximum = 0.1\n', ["metrics.kld_mean.maximum is not a rule key"]),
        ('[setup]\nmust_match = "label"\n', ["setup.must_match must be a list of key names", "'label'"]),
        ("[setup]\nmust_match = [1, 2]\n", ["setup.must_match must be a list of key names"]),
        ('setup = "x"\n', ["setup must be a table"]),
        ('[setup]\nmustmatch = ["label"]\n', ["setup.mustmatch is not a known key"]),
        ('[metric.kld_mean]\ndirection = "lower"\n', ["unknown section 'metric'"]),
        ("[metrics\n", ["invalid TOML"]),
        (b"\xff\xfe", ["not UTF-8"]),
        (None, ["is a directory"]),
    ],
)
def test_a_malformed_thresholds_file_is_one_line(tmp_path, baseline, toml, needles):
    t = tmp_path / "t.toml"
    if toml is None:
        t.mkdir()
    elif isinstance(toml, bytes):
        t.write_bytes(toml)
    else:
        t.write_text(toml, encoding="utf-8")
    with pytest.raises(QuantkitError) as e:
        g.gate(baseline, baseline, t)
    _one_line(e, str(t), *needles)
    _cli_one_line(CliRunner().invoke(app, ["gate", str(baseline), "--baseline", str(baseline), "--thresholds", str(t)], terminal_width=300), str(t))


def test_the_builtin_thresholds_load():
    t = g.load_thresholds(None)
    assert set(t["metrics"]) == set(METRICS) and "label" in t["setup"]["must_match"]


def test_untrusted_strings_render_in_every_output(tmp_path):
    """A label with rich markup, a pipe, a newline and control characters: the CLI table, Markdown and JUnit survive it."""
    label = "[/x] a|b\nc\x01[bold]"
    report = _write(tmp_path / "r.json", {**_report(), "setup": {**_report()["setup"], "label": label}})
    base = _write(tmp_path / "b.json", _report())
    junit, md = tmp_path / "j.xml", tmp_path / "s.md"
    result = CliRunner().invoke(app, ["gate", str(report), "--baseline", str(base), "--junit", str(junit), "--markdown", str(md)], terminal_width=300)
    assert result.exit_code == 1 and "Traceback" not in result.output and "setup differs" in result.output, result.output
    ET.fromstring(junit.read_text(encoding="utf-8"))  # well-formed XML 1.0
    row = next(line for line in md.read_text(encoding="utf-8").splitlines() if line.startswith("| setup.label"))
    assert row.count(" | ") == 4, row  # five cells: the pipe and the newline did not break the table


@pytest.mark.fuzz
def test_gate_fuzz_one_line_or_verdict(tmp_path_factory):
    """Any JSON where a report's values go: a Verdict (never ok with a non-finite metric) or one QuantkitError line."""
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    d = tmp_path_factory.mktemp("gate-fuzz")
    base = _write(d / "b.json", _report())
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)
    keys = st.sampled_from(["setup", "kind", "kld_mean", "kld_p99", "same_top", "ppl_ratio", "routing"])

    @hyp.settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(hyp.HealthCheck))
    @hyp.given(edits=st.dictionaries(keys, values, max_size=3), setup_edits=st.dictionaries(st.sampled_from(["label", "n_ctx", "vocab"]), values, max_size=2))
    def run(edits, setup_edits):
        r = _report()
        r["setup"].update(setup_edits)
        r.update(edits)
        report = d / "r.json"
        report.write_text(json.dumps(r), encoding="utf-8")
        try:
            v = g.gate(report, base)
        except QuantkitError as e:
            assert "\n" not in str(e) and "fix:" in str(e) and str(report) in str(e), str(e)
            return
        g.to_markdown(v), ET.fromstring(g.to_junit(v)), json.dumps(v.to_json())
        gated = [g._get(r, m) for m in METRICS]
        if any(isinstance(x, float) and not math.isfinite(x) for x in gated):
            assert not v.ok

    run()


# --------------------------------------------------------------------------- --ctx, --chunks, --threads: checked before loading


@pytest.fixture
def no_loading(monkeypatch, fixture_gguf):
    """Any attempt to load a model (llama.cpp, transformers) or to convert one fails the test (the fixture GGUFs are made first)."""
    import quantkit.pipeline.convert
    import quantkit.evals.kld as kld
    import quantkit.evals.perplexity as ppl
    import quantkit.engine.session as session

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded or converted before the arguments were checked")

    fixture_gguf("q8_0"), fixture_gguf("bf16")

    for mod, name in ((ppl, "EvalSession"), (session, "EvalSession"), (kld, "open_session"), (quantkit.pipeline.convert, "convert")):
        monkeypatch.setattr(mod, name, boom)


TEXT = "To be, or not to be, that is the question. " * 200

BAD_CTX = [  # (value, what the message says); the audit's tracebacks: 0 (ZeroDivisionError), -2, 1, 2, 7
    (0, "expected an even number >= 8"),
    (-2, "expected an even number >= 8"),
    (1, "expected an even number >= 8"),
    (2, "expected an even number >= 8"),
    (7, "expected an even number >= 8"),
    (9, "expected an even number >= 8"),
    (4096, "more than the model's trained context of 2048"),
    (1_000_000_000, "more than the model's trained context of 2048"),  # grew to 7.7 GB before failing
    (True, "expected a whole number"),
    (256.0, "expected a whole number"),
    ("256", "expected a whole number"),
]


@pytest.mark.parametrize("ctx, needle", BAD_CTX)
def test_perplexity_ctx_checked_before_loading(fixture_gguf, no_loading, ctx, needle):
    from quantkit.evals.perplexity import perplexity

    with pytest.raises(QuantkitError) as e:
        perplexity(fixture_gguf("q8_0"), TEXT, n_ctx=ctx)
    _one_line(e, "--ctx", needle)


@pytest.mark.parametrize("ctx, needle", BAD_CTX)
def test_kld_ctx_checked_before_loading(fixture_gguf, no_loading, tmp_path, ctx, needle):
    from quantkit.evals.kld import base_logprobs

    with pytest.raises(QuantkitError) as e:
        base_logprobs(fixture_gguf("q8_0"), TEXT, ctx, 2, cache_dir=tmp_path)
    _one_line(e, "--ctx", needle)
    assert list(tmp_path.iterdir()) == []


def test_kld_hf_base_ctx_checked_against_config_json(no_loading, tmp_path):
    from quantkit.evals.kld import base_logprobs

    with pytest.raises(QuantkitError) as e:
        base_logprobs(FIXTURE, TEXT, 4096, 2, cache_dir=tmp_path)
    _one_line(e, "--ctx 4096", "trained context of 2048", "config.json")


@pytest.mark.parametrize("ctx, needle", [(0, "ignores batches under 16"), (8, "ignores batches under 16"), (15, "ignores batches under 16"), (-3, "ignores batches under 16"),
                                         (4096, "trained context of 2048"), (1_000_000_000, "trained context of 2048"), (64.5, "whole number")])
@pytest.mark.parametrize("source", ["gguf", "hf"])
def test_imatrix_ctx_checked_before_loading_or_converting(fixture_gguf, no_loading, ctx, needle, source):
    from quantkit.pipeline.imatrix_collect import collect_from_source

    src = fixture_gguf("bf16") if source == "gguf" else FIXTURE
    with pytest.raises(QuantkitError) as e:
        collect_from_source(src, TEXT, n_ctx=ctx)
    _one_line(e, "--ctx", needle)


@pytest.mark.parametrize("kwargs, needle", [
    ({"n_chunks": 0}, "--chunks 0: expected at least 1"),
    ({"n_chunks": -1}, "--chunks -1: expected at least 1"),
    ({"n_chunks": 1.5}, "--chunks 1.5: expected a whole number"),
    ({"threads": 0}, "--threads 0: expected 1 to 512"),
    ({"threads": -3}, "--threads -3: expected 1 to 512"),
    ({"threads": 100_000}, "--threads 100000: expected 1 to 512"),
    ({"threads": "2"}, "--threads '2': expected a whole number"),
])
@pytest.mark.parametrize("entry", ["ppl", "kld", "imatrix", "imatrix-hf", "matrix", "sensitivity"])
def test_chunks_and_threads_checked_before_loading(fixture_gguf, no_loading, tmp_path, kwargs, needle, entry):
    from quantkit.evals.kld import base_logprobs
    from quantkit.evals.matrix import run_matrix
    from quantkit.evals.perplexity import perplexity
    from quantkit.pipeline.imatrix_collect import collect_from_source
    from quantkit.pipeline.sensitivity import measure_checkpoint

    n_chunks, threads = kwargs.get("n_chunks"), kwargs.get("threads")
    call = {
        "ppl": lambda: perplexity(fixture_gguf("q8_0"), TEXT, 64, n_chunks, threads),
        "kld": lambda: base_logprobs(fixture_gguf("q8_0"), TEXT, 64, n_chunks, threads, cache_dir=tmp_path),
        "imatrix": lambda: collect_from_source(fixture_gguf("bf16"), TEXT, n_ctx=64, n_chunks=n_chunks, threads=threads),
        "imatrix-hf": lambda: collect_from_source(FIXTURE, TEXT, n_ctx=64, n_chunks=n_chunks, threads=threads),
        "matrix": lambda: run_matrix(FIXTURE, ["q8_0"], TEXT, tmp_path / "m", 64, n_chunks, threads),
        "sensitivity": lambda: measure_checkpoint(FIXTURE, TEXT, 64, 8 if n_chunks is None else n_chunks, threads=threads),
    }[entry]
    if entry == "sensitivity":
        needle = needle.replace("--chunks", "--calib-chunks")
    with pytest.raises(QuantkitError) as e:
        call()
    _one_line(e, needle)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("ctx, needle", [(0, "--calib-ctx 0: expected a number >= 8"), (4096, "--calib-ctx 4096: more than the model's trained context")])
def test_sensitivity_ctx_checked_before_converting(no_loading, ctx, needle):
    from quantkit.pipeline.sensitivity import measure_checkpoint

    with pytest.raises(QuantkitError) as e:
        measure_checkpoint(FIXTURE, TEXT, ctx, 2)
    _one_line(e, needle)


def test_perplexity_of_a_directory_is_one_line(no_loading):
    from quantkit.evals.perplexity import perplexity

    with pytest.raises(QuantkitError) as e:
        perplexity(FIXTURE, TEXT, n_ctx=64)
    _one_line(e, str(FIXTURE), "a directory", "GGUF")


def test_hf_base_ctx_beyond_available_memory_is_refused(no_loading, monkeypatch, tmp_path):
    from quantkit.engine import runtime
    from quantkit.evals.kld import base_logprobs

    monkeypatch.setattr(runtime, "mem_available", lambda: 1 << 20)
    with pytest.raises(QuantkitError) as e:
        base_logprobs(FIXTURE, TEXT, 2048, 2, cache_dir=tmp_path)
    _one_line(e, "--ctx 2048", "float32 logits", "config.json")


def test_ctx_beyond_available_memory_is_refused(fixture_gguf, no_loading, monkeypatch):
    """A context within the trained one whose KV cache and logits alone exceed MemAvailable: refused, not allocated."""
    from quantkit.engine import runtime
    from quantkit.evals.perplexity import perplexity
    from quantkit.engine.limits import model_limits

    limits = model_limits(fixture_gguf("q8_0"))
    # the fixture: 4 layers x 2 KV heads x (64 + 64) x 2 bytes per token, 3000-token vocabulary
    assert (limits.n_ctx_train, limits.kv_bytes_per_token, limits.n_vocab) == (2048, 4 * 2 * 128 * 2, 3000)
    monkeypatch.setattr(runtime, "mem_available", lambda: 1 << 20)
    monkeypatch.setattr(runtime, "gpu_offload_supported", lambda: False)
    with pytest.raises(QuantkitError) as e:
        perplexity(fixture_gguf("q8_0"), TEXT, n_ctx=2048)
    _one_line(e, "--ctx 2048", "GiB of RAM", "available")


@pytest.mark.parametrize("args, needle, code", [  # code 2: typer's own range check (min=) refuses it; 1: the library's
    (["eval", "ppl", "MODEL", "--ctx", "0"], "--ctx", 2),
    (["eval", "ppl", "MODEL", "--ctx", "7"], "--ctx", 2),
    (["eval", "ppl", "MODEL", "--ctx", "9"], "--ctx 9: expected an even number", 1),
    (["eval", "ppl", "MODEL", "--ctx", "1000000000"], "trained context", 1),
    (["eval", "ppl", "MODEL", "--chunks", "0"], "--chunks", 2),
    (["eval", "ppl", "MODEL", "--threads", "-3"], "--threads", 2),
    (["eval", "ppl", "MODEL", "--threads", "100000"], "--threads 100000: expected 1 to 512", 1),
    (["eval", "kld", "MODEL", "MODEL", "--ctx", "2"], "--ctx", 2),
    (["eval", "kld", "MODEL", "MODEL", "--ctx", "4097"], "--ctx 4097: expected an even number", 1),
    (["eval", "kld", "MODEL", "MODEL", "--ctx", "4096"], "trained context of 2048", 1),
    (["eval", "kld", "MODEL", "MODEL", "--chunks", "-1"], "--chunks", 2),
    (["eval", "kld", "MODEL", "MODEL", "--threads", "513"], "--threads 513", 1),
    (["imatrix", "MODEL", "-o", "OUT", "--ctx", "1"], "--ctx", 2),
    (["imatrix", "MODEL", "-o", "OUT", "--ctx", "12"], "--ctx", 2),  # the library says: llama-imatrix ignores batches under 16
    (["imatrix", "MODEL", "-o", "OUT", "--ctx", "1000000000"], "trained context", 1),
    (["imatrix", "MODEL", "-o", "OUT", "--chunks", "0"], "--chunks", 2),
    (["imatrix", "MODEL", "-o", "OUT", "--threads", "600"], "--threads 600", 1),
])
def test_cli_range_errors(fixture_gguf, no_loading, tmp_path, args, needle, code):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    args = [str(fixture_gguf("q8_0")) if a == "MODEL" else str(tmp_path / "im.gguf") if a == "OUT" else a for a in args]
    extra = ["--cache-dir", str(tmp_path / "c")] if args[1] == "kld" else []
    result = CliRunner().invoke(app, [*args, "--text", str(text), *extra], terminal_width=300)
    if code == 1:
        _cli_one_line(result, needle)
    else:
        assert result.exit_code == 2 and "Traceback" not in result.output and needle in result.output, result.output
    assert not (tmp_path / "im.gguf").exists() and not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- texts: empty, too short


def test_empty_text_is_refused_before_loading(fixture_gguf, no_loading, tmp_path):
    from quantkit.evals.kld import base_logprobs
    from quantkit.evals.perplexity import perplexity
    from quantkit.pipeline.imatrix_collect import collect_imatrix

    for call in (lambda: perplexity(fixture_gguf("q8_0"), "", n_ctx=64), lambda: base_logprobs(fixture_gguf("q8_0"), "", 64, None, cache_dir=tmp_path),
                 lambda: collect_imatrix(fixture_gguf("bf16"), "", n_ctx=64, dataset="calib.txt")):
        with pytest.raises(QuantkitError) as e:
            call()
        _one_line(e, "empty (0 characters)")


@pytest.mark.parametrize("text", ["x", "To be, or not to be. " * 5])
def test_short_text_names_tokens_needed_and_found(fixture_gguf, tmp_path, text):
    from quantkit.evals.kld import base_logprobs
    from quantkit.evals.perplexity import perplexity
    from quantkit.engine.session import EvalSession
    from quantkit.pipeline.imatrix_collect import collect_imatrix

    s = EvalSession(fixture_gguf("q8_0"), 64)
    found = len(s.tokenize(text))
    s.close()
    for call, needed in ((lambda: perplexity(fixture_gguf("q8_0"), text, n_ctx=64), 128), (lambda: base_logprobs(fixture_gguf("q8_0"), text, 64, None, cache_dir=tmp_path), 128),
                         (lambda: collect_imatrix(fixture_gguf("bf16"), text, n_ctx=128), 256)):
        with pytest.raises(QuantkitError) as e:
            call()
        _one_line(e, f"{found} tokens", f"needs at least {needed}")
    assert list(tmp_path.iterdir()) == []  # no half-written cache entry


def test_compare_refuses_another_text(fixture_gguf, tmp_path):
    from quantkit.evals.kld import base_logprobs, compare

    base = base_logprobs(fixture_gguf("q8_0"), TEXT, 64, 2, cache_dir=tmp_path)
    with pytest.raises(QuantkitError) as e:
        compare(base, fixture_gguf("q8_0"), TEXT + "more")
    _one_line(e, "not the text the base was evaluated on")


def test_a_broken_cache_entry_is_evaluated_again(fixture_gguf, tmp_path):
    from quantkit.evals.kld import base_logprobs

    first = base_logprobs(fixture_gguf("q8_0"), TEXT, 64, 2, cache_dir=tmp_path)
    (first.dir / "meta.json").write_text('{"n_ctx": "64"}')
    again = base_logprobs(fixture_gguf("q8_0"), TEXT, 64, 2, cache_dir=tmp_path)
    assert again.meta["n_ctx"] == 64 and again.logprobs.shape == (2 * 31, 3000)
    (again.dir / "targets.npy").write_bytes(b"\x93NUMPY garbage")
    assert base_logprobs(fixture_gguf("q8_0"), TEXT, 64, 2, cache_dir=tmp_path).targets.shape == (62,)


def test_unwritable_cache_dir_is_one_line(fixture_gguf, tmp_path):
    from quantkit.evals.kld import base_logprobs

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(QuantkitError) as e:
        base_logprobs(fixture_gguf("q8_0"), TEXT, 64, 2, cache_dir=blocker)
    _one_line(e, str(blocker), "--cache-dir")


@pytest.mark.parametrize("content, needle", [(None, "is a directory"), (b"\x00\xff\xfe binary", "NUL bytes"), (b"\xff\xfe binary", "not UTF-8"), (b"", "empty")])
def test_cli_text_that_is_no_text_is_one_line(fixture_gguf, tmp_path, content, needle):
    """quantkit.cli.eval_commands.read_text_file (the CLI's reader) for eval and imatrix."""
    text = tmp_path / "t.txt"
    text.mkdir() if content is None else text.write_bytes(content)
    for args in (["eval", "ppl", str(fixture_gguf("q8_0"))], ["imatrix", str(fixture_gguf("bf16")), "-o", str(tmp_path / "im.gguf")]):
        _cli_one_line(CliRunner().invoke(app, [*args, "--text", str(text)], terminal_width=300), str(text), needle)
    assert not (tmp_path / "im.gguf").exists()


# --------------------------------------------------------------------------- pickles never reach torch


class _Trap:
    """Unpickling this creates a file: proof that a loader ran the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickle_dir(tmp_path: Path, name: str, bnb: bool = False) -> tuple[Path, Path]:
    d = tmp_path / "hf"
    d.mkdir()
    config = json.loads((FIXTURE / "config.json").read_text())
    if bnb:
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                         "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"}
    (d / "config.json").write_text(json.dumps(config))
    for f in TOKENIZER_FILES:
        if (FIXTURE / f).exists():
            shutil.copy(FIXTURE / f, d / f)
    marker = tmp_path / "PICKLE-RAN"
    (d / name).write_bytes(pickle.dumps({"model.embed_tokens.weight": _Trap(marker)}))
    return d, marker


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.bin", "weights.pt", "model.pth", "model.ckpt"])
def test_kld_refuses_a_pickle_only_hf_directory(fixture_gguf, tmp_path, name):
    from quantkit.evals.kld import base_logprobs, model_identity

    d, marker = _pickle_dir(tmp_path, name)
    with pytest.raises(QuantkitError) as e:
        base_logprobs(d, TEXT, 64, 2, cache_dir=tmp_path / "cache")
    _one_line(e, str(d / name), "pickle")
    assert not marker.exists()
    result = CliRunner().invoke(app, ["eval", "kld", str(d), str(fixture_gguf("q8_0")), "--text", str(_text_file(tmp_path)), "--cache-dir", str(tmp_path / "cache")], terminal_width=300)
    _cli_one_line(result, name, "pickle")
    assert not marker.exists()
    assert model_identity(d)  # the hash never opens the pickle either


def _text_file(tmp_path: Path) -> Path:
    p = tmp_path / "t.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def test_kld_candidate_pickle_directory_is_refused(fixture_gguf, tmp_path):
    from quantkit.evals.kld import base_logprobs, compare

    base = base_logprobs(fixture_gguf("q8_0"), TEXT, 64, 2, cache_dir=tmp_path / "cache")
    d, marker = _pickle_dir(tmp_path, "pytorch_model.bin")
    with pytest.raises(QuantkitError) as e:
        compare(base, d, TEXT)
    _one_line(e, "pytorch_model.bin", "pickle")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.ckpt"])
def test_bnb_loader_never_unpickles(tmp_path, name):
    """quantkit.policy.bnb.load_bnb (eval kld candidates, run, chat) reads safetensors through open_checkpoint only."""
    from quantkit.policy.bnb import load_bnb

    d, marker = _pickle_dir(tmp_path, name, bnb=True)
    with pytest.raises(QuantkitError) as e:
        load_bnb(d)
    _one_line(e, str(d))
    assert not marker.exists()


def test_transformers_is_told_to_load_safetensors_only(monkeypatch, tmp_path):
    """Beside the safetensors shard, a pickle: transformers gets use_safetensors=True and never opens it."""
    import transformers

    from quantkit.evals.hf import HFSession

    d = tmp_path / "both"
    shutil.copytree(FIXTURE, d)
    marker = tmp_path / "PICKLE-RAN"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    seen = {}
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    s = HFSession(d, 64, threads=2)
    s.close()
    assert seen.get("use_safetensors") is True and not marker.exists()


def test_corrupt_safetensors_in_an_hf_base_is_one_line(tmp_path):
    from quantkit.evals.kld import base_logprobs

    d = tmp_path / "hf"
    shutil.copytree(FIXTURE, d)
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(QuantkitError) as e:
        base_logprobs(d, TEXT, 64, 2, cache_dir=tmp_path / "cache")
    _one_line(e, "model.safetensors", "truncated")


@pytest.mark.parametrize("command", ["ppl", "kld"])
def test_json_followed_by_an_option_is_not_a_file_name(fixture_gguf, tmp_path, monkeypatch, command):
    """`--json --no-progress`: --json takes a file, and an option-like value is refused (exit 2, one line) before anything runs,
    instead of a report file named "--no-progress"."""
    q8 = fixture_gguf("q8_0")
    monkeypatch.chdir(tmp_path)
    models = [str(q8)] if command == "ppl" else [str(q8), str(q8)]
    result = CliRunner().invoke(app, ["eval", command, *models, "--corpus", "heldout", "--json", "--no-progress"])
    assert result.exit_code == 2 and "looks like an option" in result.output and "Traceback" not in result.output, result.output
    assert list(tmp_path.iterdir()) == []
