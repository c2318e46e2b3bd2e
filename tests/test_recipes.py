"""Recipes and tensor-type rules: first match wins, layer ranges, routers protected, clear errors."""

from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

from conftest import FIXTURE
from quantkit.cli import app
from quantkit.errors import QuantkitError
from quantkit.plan import Override
from quantkit.recipe import builtin_names, load_recipe, parse


def _plan(outtype, rules=()):
    from quantkit.convert import prepare

    ckpt, prep = prepare(FIXTURE, outtype, overrides=rules)
    ckpt.close()
    return {t.name: t for t in prep.plan.tensors}


def test_builtin_recipes_load_and_keep_routers_and_norms_f32():
    assert {"moe-q3", "moe-q4", "moe-q5"} <= set(builtin_names())
    for name in builtin_names():
        r = load_recipe(name)
        plan = _plan(r.base, r.rules)
        for t in plan.values():
            if "ffn_gate_inp" in t.name or "norm" in t.name:
                assert t.qtype.name == "F32", (name, t.name)


def test_first_match_wins_and_layer_ranges():
    r = parse('base = "Q4_K_M"\n[[rules]]\npattern = "ffn_down_exps"\ntype = "Q8_0"\nlayers = [-1, -1]\n[[rules]]\npattern = "ffn_down_exps"\ntype = "Q5_K"\n', "t.toml")
    plan = _plan(r.base, r.rules)
    assert plan["blk.3.ffn_down_exps.weight"].qtype.name == "Q8_0"  # last layer: the first rule
    assert {plan[f"blk.{i}.ffn_down_exps.weight"].qtype.name for i in range(3)} == {"Q5_K"}
    assert "rule 1" in plan["blk.3.ffn_down_exps.weight"].reason


def test_moe_q4_spends_bits_on_attention_and_down_projections():
    stock = _plan("Q4_K_M")
    r = load_recipe("moe-q4")
    ours = _plan(r.base, r.rules)
    assert ours["blk.1.attn_q.weight"].bpw > stock["blk.1.attn_q.weight"].bpw
    assert ours["blk.1.ffn_down_exps.weight"].bpw >= stock["blk.1.ffn_down_exps.weight"].bpw
    assert ours["blk.1.ffn_gate_exps.weight"].qtype.name == "Q4_K"


@pytest.mark.parametrize(
    "pattern,router_changes",
    [
        ("ffn_gate_inp", True),  # names it
        (r"blk\.\d+\.ffn_gate_inp\.weight", True),
        ("ffn_gate", False),  # meant for ffn_gate_exps: covers only part of the router's name
        ("attn_|ffn_", False),
        ("weight", False),
    ],
)
def test_only_a_rule_naming_the_router_changes_it_and_norms_never(pattern, router_changes):
    rule = Override.parse(pattern, "q2_k", source="--tensor-type")
    plan = _plan("Q4_K_M", [rule])
    assert (plan["blk.0.ffn_gate_inp.weight"].qtype.name == "Q2_K") is router_changes
    assert plan["blk.0.attn_norm.weight"].qtype.name == "F32" and plan["output_norm.weight"].qtype.name == "F32"


def test_rule_naming_the_router_changes_it_with_a_warning(caplog):
    r = parse('base = "Q8_0"\n[[rules]]\npattern = "ffn_gate_inp"\ntype = "Q8_0"\n', "r.toml")
    with caplog.at_level(logging.WARNING):
        plan = _plan(r.base, r.rules)
    assert plan["blk.0.ffn_gate_inp.weight"].qtype.name == "Q8_0"
    assert "overrides the F32 rule" in caplog.text


def test_rule_matching_nothing_warns(caplog):
    r = parse('base = "Q8_0"\n[[rules]]\npattern = "no_such_tensor"\ntype = "Q4_K"\n', "r.toml")
    with caplog.at_level(logging.WARNING):
        _plan(r.base, r.rules)
    assert "matched no tensor" in caplog.text


@pytest.mark.parametrize(
    "text, needle",
    [
        ('base = "Q4_K_M"\n\n[[rules]]\npattern = "attn"\ntype = "Q9_K"\n', "line 5"),  # unknown type: its line
        ('base = "Q4_K_M"\n[[rules]]\npattern = "(("\ntype = "Q4_K"\n', "not a valid regex"),
        ('base = "Q4_K_M"\n[[rules]]\npattern = "attn"\n', "line 2"),  # type missing
        ('base = "Q4_K_M"\n[[rules]]\npattern = "x"\ntype = "Q4_K"\nlayers = [1]\n', "line 5"),
        ('base = "Q4_K_MM"\n', "not a llama.cpp preset"),
        ('base = "Q4_K_M"\nrules = [\n', "malformed TOML"),
    ],
)
def test_malformed_recipes_name_the_line(text, needle):
    with pytest.raises(QuantkitError, match=needle.replace("(", r"\(")):
        parse(text, "bad.toml")


def test_cli_recipe_and_type_are_exclusive(tmp_path):
    result = CliRunner().invoke(app, ["plan", str(FIXTURE), "--type", "Q4_K_M", "--recipe", "moe-q4"])
    assert result.exit_code == 1 and "not both" in result.output
    result = CliRunner().invoke(app, ["convert", str(FIXTURE), "-o", str(tmp_path / "m.gguf"), "--recipe", "moe-q4", "--json"])
    assert result.exit_code == 0, result.output


def test_plan_predicts_the_converted_file(tmp_path):
    """`plan --json` gives the same types and bytes the conversion then writes."""
    import json

    runner = CliRunner()
    planned = json.loads(runner.invoke(app, ["plan", str(FIXTURE), "--recipe", "moe-q4", "--json"]).output)
    out = tmp_path / "m.gguf"
    assert runner.invoke(app, ["convert", str(FIXTURE), "-o", str(out), "--recipe", "moe-q4"]).exit_code == 0
    written = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).output)
    assert {t["name"]: t["type"] for t in planned["tensors"]} == {t["name"]: t["type"] for t in written["tensors"]}
    assert planned["tensor_bytes"] == written["totals"]["bytes"]
    assert written["metadata"]["general.file_type"] == planned["file_type"]
