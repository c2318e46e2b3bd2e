"""The plug-in point: every converter module registers itself, and what it declares matches gguf-py's tables.

Adding a family is adding ``converters/<model_type>.py``: nothing lists the modules by hand,
and each one's GGUF architecture name and tensor names are llama.cpp's (gguf-py, pinned).
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import gguf
import pytest

from conftest import ROOT
from quantkit import converters
from quantkit.converters import CONVERTERS, for_gguf_arch, for_model_type
from quantkit.errors import CheckpointError

MODULES = sorted(m.name for m in pkgutil.iter_modules([str(ROOT / "converters")]) if not m.name.startswith("_"))
#: names that make each module's rules() choose its other layout (fused experts, biases, untied head)
LAYOUT_HINTS = (["lm_head.weight"], ["lm_head.weight", "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.self_attn.q_proj.bias"])


def test_every_module_is_discovered_and_registered():
    for_model_type("mixtral")  # discovery
    assert set(MODULES) <= set(CONVERTERS), set(MODULES) - set(CONVERTERS)
    for name in MODULES:
        assert CONVERTERS[name].model_type == name  # the module is named after config.json's model_type
    assert for_gguf_arch("llama") and not for_gguf_arch("no-such-arch")
    with pytest.raises(CheckpointError, match="not supported"):
        for_model_type("gpt_neox")
    with pytest.raises(CheckpointError, match="not supported"):
        for_model_type(["mixtral"])  # a config.json whose model_type is not a string


@pytest.mark.parametrize("model_type", MODULES)
def test_arch_and_tensor_names_are_llama_cpps(model_type):
    conv = for_model_type(model_type)
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == conv.arch), None)
    if arch is None:  # an arch newer than the pinned gguf-py (deepseek32): the vendored llama.cpp's own gguf-py tables
        allowed = _vendored_tensor_names(conv.arch)
        assert allowed is not None, f"{conv.arch!r} is not a gguf-py architecture name"
    else:
        allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    for names in LAYOUT_HINTS:
        written = {r.gguf.removesuffix(".weight").removesuffix(".bias") for r in conv.rules(names)}  # ssm_a has no suffix
        assert written <= allowed, f"{model_type}: not in llama.cpp's {conv.arch} table: {sorted(written - allowed)}"


def _vendored_tensor_names(arch_name: str) -> set[str] | None:
    """The tensor names of ``arch_name`` in the vendored llama.cpp's gguf-py (newer than the pinned one), None if it has no such arch."""
    import subprocess
    import sys

    from conftest import vendored_llama_cpp

    root = vendored_llama_cpp("gguf-py") + "/gguf-py"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import gguf; a = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == sys.argv[2]); "
            "print('\\n'.join(gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[a]))")
    r = subprocess.run([sys.executable, "-c", code, root, arch_name], capture_output=True, text=True, timeout=120)
    return set(r.stdout.split()) if r.returncode == 0 else None


def test_routing_is_declared_for_moe_families():
    for conv in CONVERTERS.values():
        expert_rules = any(r.stacked or "exps" in r.gguf for names in LAYOUT_HINTS for r in conv.rules(names))
        assert (conv.routing is not None) == expert_rules, conv.model_type


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_only_converters_name_a_family():
    """Downstream code asks the registry: no module outside converters/ imports a family's module."""
    families = {f"quantkit.converters.{m}" for m in MODULES} - {"quantkit.converters.llama"}
    for folder in ("quantkit", "evals"):
        for f in (ROOT / folder).glob("*.py"):
            assert not (_imports(f) & families), f"{f.relative_to(ROOT)} imports {sorted(_imports(f) & families)}"
    assert converters.__file__
