"""``quantkit card`` and ``convert --model-card``: the README of a Hub repository of GGUF files.

The YAML header is parsed back (PyYAML, as the Hub reads it); the numbers are checked against
``quantkit inspect`` and a real ``quantkit eval kld --json`` report; hostile metadata must not
add YAML keys or Markdown / HTML to the card.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import FIXTURE
from quantkit.cli.main import app
from quantkit.format.gguf_read import read_gguf
from quantkit.pipeline.card import COMMAND_KEY, make_card
from quantkit.pipeline.convert import convert
from test_hub_cache import COMMIT, make_cache

REPO = "test-org/tiny-mixtral"


def _invoke(args):
    return CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)


def _said(r) -> str:
    return " ".join(r.output.replace("│", " ").split())


def _header(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


@pytest.fixture
def cached_source(tmp_path, monkeypatch):
    """The fixture in a Hugging Face cache, its README declaring a licence (as Hub model cards do)."""
    src = tmp_path / "src"
    src.mkdir()
    for f in FIXTURE.iterdir():
        if f.is_file():
            (src / f.name).write_bytes(f.read_bytes())
    (src / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\n---\n\n# tiny\n")
    make_cache(tmp_path / "hub", REPO, COMMIT, src)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


def test_convert_model_card_for_a_split_set_from_a_repo_id(cached_source):
    out = cached_source
    r = _invoke(["convert", REPO, "-o", out / "tiny-Q4_K_M.gguf", "--type", "Q4_K_M", "--tensor-type", "ffn_down_exps=q8_0",
                 "--split-max-tensors", "20", "--model-card", "--json"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.output)
    assert j["model_card"] == str(out / "README.md") and len(j["parts"]) == 3
    card = (out / "README.md").read_text()
    h = _header(card)
    assert h == {"base_model": REPO, "base_model_relation": "quantized", "license": "apache-2.0", "tags": ["gguf", "quantized"], "quantized_by": "quantkit"}
    command = "quantkit convert test-org/tiny-mixtral --output tiny-Q4_K_M.gguf --type Q4_K_M --tensor-type ffn_down_exps=q8_0 --split-max-tensors 20"
    assert read_gguf(j["output"]).metadata[COMMAND_KEY] == command  # recorded in the file (no local paths in it)
    assert f"```sh\n{command}\n```" in card
    for p in j["parts"]:  # every part with its size
        assert f"| {Path(p).name} | {Path(p).stat().st_size / 1e6:.2f} MB |" in card
    groups = json.loads(_invoke(["inspect", j["output"], "--json"]).output)["groups"]
    for name, g in groups.items():  # the bits per weight quantkit inspect computes
        assert f"| {name} | {g['tensors']} | {g['params']:,} | {g['bytes']:,} | {g['bits_per_weight']:.3f} |" in card
    assert "Q4_K_M" in card and "## Quality" not in card


def test_card_command_with_a_kld_report(fixture_gguf, tmp_path):
    base, model = fixture_gguf("bf16"), fixture_gguf("q8_0")
    report = tmp_path / "kld.json"
    r = _invoke(["eval", "kld", base, model, "--corpus", "heldout", "--ctx", "64", "--chunks", "2", "--threads", "2",
                 "--cache-dir", tmp_path / "cache", "--json", report, "--no-progress"])
    assert r.exit_code == 0, r.output
    kld = json.loads(report.read_text())
    r = _invoke(["card", model, "--kld-report", report, "-o", tmp_path / "README.md", "--base-model", "mistralai/Mixtral-8x7B-v0.1"])
    assert r.exit_code == 0, r.output
    card = (tmp_path / "README.md").read_text()
    h = _header(card)
    assert h["base_model"] == "mistralai/Mixtral-8x7B-v0.1" and "license" not in h  # no licence known: not made up
    assert f"| mean KL divergence | {kld['kld_mean']:.6f} ± {kld['kld_mean_stderr']:.6f} |" in card
    assert f"| perplexity ratio | {kld['ppl_ratio']:.5f} |" in card
    assert f"| same top token | {kld['same_top']:.4f} ± {kld['same_top_stderr']:.4f} |" in card
    assert f"| MoE routing: top-k sets equal | {kld['routing']['topk_exact']:.4f} |" in card
    assert "not recorded" in card  # converted without --model-card: said, not invented
    # the card exists now: replaced only with --force
    r = _invoke(["card", model, "-o", tmp_path / "README.md"])
    assert r.exit_code == 1 and "--force" in _said(r)
    assert (tmp_path / "README.md").read_text() == card
    # a report that is not a kld report: one line, nothing written
    (tmp_path / "bad.json").write_text("{}")
    r = _invoke(["card", model, "--kld-report", tmp_path / "bad.json", "-o", tmp_path / "other.md"])
    assert r.exit_code == 1 and "not a quantkit eval kld report" in _said(r) and not (tmp_path / "other.md").exists()


def test_card_of_a_report_for_another_file_warns(fixture_gguf, tmp_path, caplog):
    kld = {"kind": "quantkit.kld", "setup": {"model": "/x/other.gguf", "base": "/x/base.gguf", "n_ctx": 64, "n_chunks": 1}, "kld_mean": 0.01}
    c = make_card(fixture_gguf("q8_0"), kld=kld)
    assert any("other.gguf" in n for n in c.notes)


def test_refusals(fixture_gguf, tmp_path):
    model = fixture_gguf("q8_0")
    r = _invoke(["card", tmp_path / "missing.gguf"])
    assert r.exit_code == 1 and "no such file" in _said(r)
    r = _invoke(["card", model, "-o", model, "--force"])
    assert r.exit_code == 1 and "a model card is Markdown" in _said(r)
    (tmp_path / "notes.md").write_text("mine")
    r = _invoke(["card", model, "--kld-report", tmp_path / "notes.md", "-o", tmp_path / "notes.md", "--force"])
    assert r.exit_code == 1 and (tmp_path / "notes.md").read_text() == "mine"
    r = _invoke(["card", model, "-o", tmp_path / "card.gguf"])
    assert r.exit_code == 1 and "a model card is Markdown" in _said(r)
    r = _invoke(["card", model, "-o", tmp_path / "README.md", "--base-model", "not a repo"])
    assert r.exit_code == 1 and "--base-model" in _said(r) and not (tmp_path / "README.md").exists()
    r = _invoke(["convert", FIXTURE, "-o", tmp_path / "b", "--format", "bnb", "--model-card"])
    assert r.exit_code == 2 and "apply to --format gguf" in _said(r)


def _with_metadata(src: Path, dst: Path, extra: dict[str, str]) -> Path:
    """``src`` requantised to itself with hostile string keys added."""
    from quantkit.format.gguf_write import MetaValue
    from quantkit.format.gguf_spec import GGUFValueType
    from quantkit.pipeline.convert import _write, prepare

    gs, prep = prepare(src, "f32")
    with gs:
        prep.metadata.update({k: MetaValue(v, GGUFValueType.STRING) for k, v in extra.items()})
        _write(dst, prep, None, None)
    return dst


def test_hostile_metadata_adds_no_yaml_keys_and_no_markup(fixture_gguf, tmp_path):
    bad = _with_metadata(fixture_gguf("f32"), tmp_path / "bad.gguf", {
        "general.license": "mit\nevil: true",
        "general.source.repo_url": "https://huggingface.co/a/b\nx: 1",
        COMMAND_KEY: "quantkit convert x ```\n<script>alert(1)</script>",
    })
    c = make_card(bad)
    card = c.render()
    h = _header(card)
    assert set(h) == {"license", "tags", "quantized_by"} and h["license"] == "mit evil: true"  # one quoted value, no new key
    assert "<script>" not in card.replace("````sh", "")[: card.index("````sh")]  # nothing outside the code block
    block = card[card.index("````sh") :]
    assert block.split("\n")[1] == "quantkit convert x ``` <script>alert(1)</script>" and block.split("\n")[2] == "````"  # a longer fence


def test_a_requantised_file_does_not_keep_the_sources_command(cached_source, tmp_path):
    out = cached_source
    r = _invoke(["convert", REPO, "-o", out / "bf16.gguf", "--type", "bf16", "--model-card"])
    assert r.exit_code == 0, r.output
    assert COMMAND_KEY in read_gguf(out / "bf16.gguf").metadata
    convert(out / "bf16.gguf", tmp_path / "q8.gguf", "q8_0")
    assert COMMAND_KEY not in read_gguf(tmp_path / "q8.gguf").metadata
