"""Quantisation recipes: a base preset plus ordered rules, first match wins.

A recipe is a small TOML file::

    base = "Q4_K_M"
    [[rules]]
    pattern = "ffn_down_exps"     # regex searched in the GGUF tensor name
    type = "Q6_K"
    layers = [0, 0]               # optional: first and last block (negative counts from the end)

Built-in recipes (``moe-q3``, ``moe-q4``, ``moe-q5``) ship in
``quantkit/policy/recipes/``.  Routers and norms stay F32 unless a rule names them
explicitly (with a warning, see ``quantkit.policy.plan``).  A rule that matches no
tensor warns; an unknown type or a malformed recipe is an error naming the line.

Not for: applying rules (``quantkit.policy.plan.make_plan``).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from quantkit.hf.checkpoint import read_file
from quantkit.errors import CheckpointError, QuantkitError
from quantkit.policy.plan import Override
from quantkit.policy.presets import get_preset


@dataclass(frozen=True)
class Recipe:
    name: str
    base: str
    rules: tuple[Override, ...]


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("quantkit.policy.recipes").iterdir() if p.name.endswith(".toml"))


#: the most rules a recipe may hold: far beyond any real recipe (a few dozen); the plan tries every rule
#: on every tensor name until one matches, so the count bounds that work
MAX_RULES = 4096
#: the largest recipe file read (4096 rules take about 200 kB)
MAX_RECIPE_BYTES = 1 << 20
#: the longest rule pattern: GGUF tensor names have at most 63 characters (GGML_MAX_NAME)
MAX_PATTERN_CHARS = 1024
_FIX = "correct the recipe (see quantkit/policy/recipes/moe-q4.toml)"
_RULES_HEADER = re.compile(r"\s*\[\[\s*rules\s*\]\]")
_KEY = re.compile(r"\s*([A-Za-z0-9_-]+)\s*=")


def _show(value: object, cap: int = 80) -> str:
    """An untrusted value for a message: its repr, capped."""
    r = repr(value)
    return r if len(r) <= cap else r[: cap - 1] + "…"


class _Lines:
    """Where each ``[[rules]]`` table (and each of its keys) starts in the text: one pass, looked up per rule.

    Only for messages; a rule written another way (``rules = [{...}]``) points at line 1.
    """

    def __init__(self, text: str) -> None:
        self.base = 1
        self.rules: list[dict[str | None, int]] = []
        current: dict[str | None, int] | None = None
        for i, line in enumerate(text.splitlines(), 1):
            if _RULES_HEADER.match(line):
                current = {None: i}
                self.rules.append(current)
            elif line.lstrip().startswith("["):
                current = None
            elif (m := _KEY.match(line)) is not None:
                if current is not None:
                    current.setdefault(m.group(1), i)
                elif m.group(1) == "base" and not self.rules:
                    self.base = i

    def of(self, rule_index: int, key: str | None = None) -> int:
        """1-based line of the ``rule_index``-th [[rules]] table (of its ``key`` if that has a line)."""
        if rule_index >= len(self.rules):
            return 1
        r = self.rules[rule_index]
        return r.get(key, r[None])


def parse(text: str, where: str) -> Recipe:
    """A recipe from its TOML text; ``where`` names it in messages.  Every key and type is checked: one line otherwise."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise QuantkitError(f"{where}: malformed TOML ({e}); fix: correct the recipe") from None
    lines = _Lines(text)
    base = data.get("base")
    if not isinstance(base, str):
        raise QuantkitError(f"{where}: line {lines.base}: 'base' must name a preset ({_show(base)}); fix: add e.g. base = \"Q4_K_M\"")
    try:
        get_preset(base)
    except QuantkitError as e:
        raise QuantkitError(f"{where}: base {_show(base)}: {e}") from None
    unknown = set(data) - {"base", "rules"}
    if unknown:
        raise QuantkitError(f"{where}: unknown key {_show(sorted(unknown)[0])} (allowed: base, rules); fix: remove it")
    raw = data.get("rules", [])
    if not isinstance(raw, list):
        raise QuantkitError(f"{where}: 'rules' must be an array of [[rules]] tables ({_show(raw)}); fix: {_FIX}")
    if len(raw) > MAX_RULES:
        raise QuantkitError(f"{where}: {len(raw):,} rules, more than the {MAX_RULES:,} a recipe may hold; fix: merge rules (one regex can name many tensors)")
    return Recipe(where, base, tuple(_rule(r, i, where, lines) for i, r in enumerate(raw)))


def _rule(r: object, i: int, where: str, lines: _Lines) -> Override:
    """The ``i``-th rule, checked key by key (its pattern compiled once, by Override.parse)."""
    n = i + 1
    if not isinstance(r, dict):
        raise QuantkitError(f"{where}: line {lines.of(i)}: rule {n} must be a table with 'pattern' and 'type' ({_show(r)}); fix: {_FIX}")
    extra = sorted(set(r) - {"pattern", "type", "layers"})
    if extra:
        raise QuantkitError(f"{where}: line {lines.of(i, extra[0])}: rule {n} has unknown key {_show(extra[0])} (allowed: pattern, type, layers); fix: remove it")
    for key in ("pattern", "type"):
        if key not in r:
            raise QuantkitError(f"{where}: line {lines.of(i)}: rule {n} needs a {key!r} (and optional 'layers'); fix: add it")
        if not isinstance(r[key], str):
            raise QuantkitError(f"{where}: line {lines.of(i, key)}: rule {n} key {key!r} must be a string ({_show(r[key])}); fix: quote it, e.g. {key} = \"{'attn_v' if key == 'pattern' else 'Q6_K'}\"")
    pattern = r["pattern"]
    if len(pattern) > MAX_PATTERN_CHARS:
        raise QuantkitError(f"{where}: line {lines.of(i, 'pattern')}: rule {n} pattern has {len(pattern):,} characters, more than {MAX_PATTERN_CHARS:,}; fix: shorten it")
    layers = r.get("layers")
    if layers is not None:
        at = f"{where}: line {lines.of(i, 'layers')}: rule {n} key 'layers'"
        if not (isinstance(layers, list) and len(layers) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in layers)):
            raise QuantkitError(f"{at} must be [first, last], two whole numbers ({_show(layers)}); fix: write e.g. layers = [0, 3]")
        first, last = layers
        if (first < 0) == (last < 0) and first > last:  # with mixed signs the order depends on the model's depth
            raise QuantkitError(f"{at}: first block {first} is after last block {last}, no layer is in the range ({_show(layers)}); fix: write layers = [{last}, {first}]")
    rule = Override.parse(pattern, r["type"], source=f"{where}: line {lines.of(i, 'type')}")
    return Override(rule.pattern, rule.qtype, f"recipe {where} rule {n}", tuple(layers) if layers else None)


def load_recipe(spec: str) -> Recipe:
    """A recipe from a TOML file path or a built-in name; the file must be a regular file of at most MAX_RECIPE_BYTES."""
    path = Path(spec)
    if spec in builtin_names() and not path.is_file():
        return parse(resources.files("quantkit.policy.recipes").joinpath(f"{spec}.toml").read_text(encoding="utf-8"), spec)
    if spec and os.path.lexists(path):
        fix = "pass a recipe TOML file or a built-in name (" + ", ".join(builtin_names()) + ")"
        try:
            data = read_file(path, fix, limit=MAX_RECIPE_BYTES)
        except CheckpointError as e:  # a directory, a FIFO, a device, too large, unreadable
            raise QuantkitError(f"--recipe {e}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise QuantkitError(f"--recipe {path}: not UTF-8 text ({e.reason} at byte {e.start}); fix: save the recipe as UTF-8") from None
        return parse(text, str(path))
    raise QuantkitError(f"--recipe {_show(spec)}: no such file or built-in recipe (built-in: {', '.join(builtin_names())}); fix: pass a TOML file or one of those names")
