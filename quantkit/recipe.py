"""Quantisation recipes: a base preset plus ordered rules, first match wins.

A recipe is a small TOML file::

    base = "Q4_K_M"
    [[rules]]
    pattern = "ffn_down_exps"     # regex searched in the GGUF tensor name
    type = "Q6_K"
    layers = [0, 0]               # optional: first and last block (negative counts from the end)

Built-in recipes (``moe-q3``, ``moe-q4``, ``moe-q5``) ship in
``quantkit/recipes/``.  Routers and norms stay F32 unless a rule names them
explicitly (with a warning, see ``quantkit.plan``).  A rule that matches no
tensor warns; an unknown type or a malformed recipe is an error naming the line.

Not for: applying rules (``quantkit.plan.make_plan``).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.plan import Override
from quantkit.presets import get_preset


@dataclass(frozen=True)
class Recipe:
    name: str
    base: str
    rules: tuple[Override, ...]


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("quantkit.recipes").iterdir() if p.name.endswith(".toml"))


def _line(text: str, rule_index: int, key: str | None) -> int:
    """1-based line of the ``rule_index``-th [[rules]] table (or of its ``key``)."""
    lines = text.splitlines()
    seen = -1
    for i, line in enumerate(lines):
        if line.strip() == "[[rules]]":
            seen += 1
            if seen == rule_index:
                if key is None:
                    return i + 1
                for j in range(i + 1, len(lines)):
                    if lines[j].strip().startswith("[["):
                        break
                    if re.match(rf"\s*{re.escape(key)}\s*=", lines[j]):
                        return j + 1
                return i + 1
    return 1


def parse(text: str, where: str) -> Recipe:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise QuantkitError(f"{where}: malformed TOML ({e}); fix: correct the recipe") from None
    base = data.get("base")
    if not isinstance(base, str):
        raise QuantkitError(f"{where}: line {next((i + 1 for i, l in enumerate(text.splitlines()) if l.strip().startswith('base')), 1)}: 'base' must name a preset, e.g. base = \"Q4_K_M\"")
    try:
        get_preset(base)
    except QuantkitError as e:
        raise QuantkitError(f"{where}: base {base!r}: {e}") from None
    unknown = set(data) - {"base", "rules"}
    if unknown:
        raise QuantkitError(f"{where}: unknown key {sorted(unknown)[0]!r} (allowed: base, rules); fix: remove it")
    rules = []
    for i, r in enumerate(data.get("rules", [])):
        at = f"{where}: line {_line(text, i, None)}"
        if not isinstance(r, dict) or set(r) - {"pattern", "type", "layers"} or not {"pattern", "type"} <= set(r):
            raise QuantkitError(f"{at}: a rule needs 'pattern' and 'type' (and optional 'layers'); fix: correct rule {i + 1}")
        layers = r.get("layers")
        if layers is not None and not (isinstance(layers, list) and len(layers) == 2 and all(isinstance(x, int) for x in layers)):
            raise QuantkitError(f"{where}: line {_line(text, i, 'layers')}: layers must be [first, last], e.g. layers = [0, 3]")
        try:
            rule = Override.parse(r["pattern"], r["type"], source=f"{where}: line {_line(text, i, 'type')}")
        except QuantkitError as e:
            raise QuantkitError(str(e)) from None
        rules.append(Override(rule.pattern, rule.qtype, f"recipe {where} rule {i + 1}", tuple(layers) if layers else None))
    return Recipe(where, base, tuple(rules))


def load_recipe(spec: str) -> Recipe:
    """A recipe from a TOML file path or a built-in name."""
    path = Path(spec)
    if path.is_file():
        return parse(path.read_text(encoding="utf-8"), str(path))
    if spec in builtin_names():
        return parse(resources.files("quantkit.recipes").joinpath(f"{spec}.toml").read_text(encoding="utf-8"), spec)
    raise QuantkitError(f"--recipe {spec!r}: no such file or built-in recipe (built-in: {', '.join(builtin_names())}); fix: pass a TOML file or one of those names")
