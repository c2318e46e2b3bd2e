"""Imports flow one way: each module imports only its own layer and the layers below (read from the source).

The layers are the subpackages of ``quantkit``, lowest first:
``errors`` -> ``format`` (GGUF spec, reader, writer, roles, kernels) -> ``hf`` (HF files, name table, tokenizers)
-> ``converters`` (architectures) -> ``policy`` (presets, plans, budgets, importance data, bnb format)
-> ``engine`` (llama.cpp sessions, run limits, load checks, runtime, chat; the transformers runtime)
-> ``pipeline`` (convert, requantise, importance collection, sensitivity) -> ``evals`` -> ``cli``.
Function-level imports count too: a lazy import is still a dependency.  The package root
(``quantkit/__init__.py``: version, lazy ``load_bnb``) is the public facade and is left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

LAYERS: tuple[str, ...] = ("errors", "format", "hf", "converters", "policy", "engine", "pipeline", "evals", "cli")
FOLDERS = {"quantkit": ROOT / "quantkit", "quantkit.converters": ROOT / "converters", "quantkit.evals": ROOT / "evals"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in FOLDERS.items():
        for f in folder.rglob("*.py"):
            parts = f.relative_to(folder).with_suffix("").parts
            name = ".".join((pkg, *parts)).removesuffix(".__init__").removesuffix(".__main__")
            mods.setdefault(name, f)
    return mods


def _layer(module: str) -> int | None:
    top = module.removeprefix("quantkit.").split(".")[0]
    return LAYERS.index(top) if top in LAYERS else None


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            subs = {f"{node.module}.{a.name}" for a in node.names} & mods.keys()
            out |= subs if len(subs) == len(node.names) else {node.module, *subs}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out & mods.keys()


def test_every_module_has_a_layer():
    missing = [m for m in _modules() if m != "quantkit" and _layer(m) is None]
    assert not missing, f"place these modules in LAYERS: {missing}"


def test_imports_only_go_down():
    mods = _modules()
    up = []
    for module, path in sorted(mods.items()):
        if module == "quantkit":
            continue
        mine = _layer(module)
        for target in sorted(_imports(path, mods) - {module, "quantkit"}):
            theirs = _layer(target)
            if theirs is not None and mine is not None and theirs > mine:
                up.append(f"{module} ({LAYERS[mine]}) imports {target} ({LAYERS[theirs]})")
    assert not up, "imports against the layers:\n" + "\n".join(up)


def test_no_import_cycles():
    mods = _modules()
    graph = {m: _imports(p, mods) - {m, "quantkit"} for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
