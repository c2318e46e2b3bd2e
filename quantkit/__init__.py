"""quantkit: convert, run and check quantised Mixture-of-Experts language models.

Python API: ``quantkit.pipeline.convert.convert`` (HF -> GGUF), ``quantkit.export_bnb`` /
``quantkit.load_bnb`` (bitsandbytes 4-bit), ``quantkit.evals`` (ppl, KLD, gate).
"""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0"

# numpy's OpenBLAS starts a server thread per core that busy-waits ~2^28 cycles (~0.1 s) for work before it
# sleeps, at import and after every BLAS call; quantkit runs llama.cpp's kernels on every core meanwhile, so
# that spin is stolen time.  2^4 cycles: the threads sleep at once (BLAS calls still use every core).  Only
# takes effect when quantkit is imported before numpy, and never overrides a user's own setting.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def __getattr__(name: str) -> Any:  # lazy: importing quantkit must not import torch/bitsandbytes
    if name in ("export_bnb", "load_bnb"):
        from quantkit.policy import bnb

        return getattr(bnb, name)
    raise AttributeError(f"module 'quantkit' has no attribute {name!r}")
