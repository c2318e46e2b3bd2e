"""quantkit: convert, run and check quantised Mixture-of-Experts language models.

Python API: ``quantkit.convert.convert`` (HF -> GGUF), ``quantkit.export_bnb`` /
``quantkit.load_bnb`` (bitsandbytes 4-bit), ``quantkit.evals`` (ppl, KLD, gate).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:  # lazy: importing quantkit must not import torch/bitsandbytes
    if name in ("export_bnb", "load_bnb"):
        from quantkit import bnb

        return getattr(bnb, name)
    raise AttributeError(f"module 'quantkit' has no attribute {name!r}")
