"""What a tensor does in a model: the groups of every report and the rules that decide its precision.

Shared by both kinds of source: the HF name table assigns roles rule by rule
(``quantkit.hf.mapping``), a GGUF tensor gets its role from its name (:func:`role_of`).

Not for: type choice (``quantkit.policy.presets``, ``quantkit.policy.plan``).
"""

from __future__ import annotations

import enum
import re
from typing import Any, Iterable


class Role(str, enum.Enum):
    """What a tensor does; groups in reports and decides precision rules."""

    EMBEDDINGS = "embeddings"
    ATTENTION = "attention"
    FFN = "ffn"
    EXPERTS = "experts"
    ROUTER = "router"
    NORM = "norms"
    OUTPUT = "output"
    OTHER = "other"


#: GGUF tensor name -> role, first match wins (names as llama.cpp writes them).
ROLE_PATTERNS: tuple[tuple[str, Role], ...] = (
    (r"ffn_gate_inp", Role.ROUTER),
    (r"\.exp_probs_b\.", Role.ROUTER),  # the per-expert selection bias beside the router (DeepSeek V3's e_score_correction_bias)
    (r"_exps?\b|_exps\.", Role.EXPERTS),
    (r"_shexp", Role.FFN),  # shared experts see every token: dense FFN weights (llama.cpp's size_label counts them as shared)
    (r"norm", Role.NORM),
    (r"^token_embd", Role.EMBEDDINGS),
    (r"^output\.", Role.OUTPUT),
    (r"\.attn_", Role.ATTENTION),
    (r"\.ffn_", Role.FFN),
)


def role_of(name: str) -> Role:
    for pattern, role in ROLE_PATTERNS:
        if re.search(pattern, name):
            return role
    return Role.OTHER


def group_totals(tensors: Iterable[Any]) -> dict[str, dict[str, float]]:
    """Tensors, parameters, bytes and bits per weight per role; items need ``role``, ``n_elements``, ``nbytes``."""
    out: dict[str, dict[str, float]] = {}
    for t in tensors:
        g = out.setdefault(t.role.value, {"tensors": 0, "params": 0, "bytes": 0})
        g["tensors"] += 1
        g["params"] += t.n_elements
        g["bytes"] += t.nbytes
    for g in out.values():
        g["bits_per_weight"] = round(8 * g["bytes"] / max(1, g["params"]), 4)
    return out
