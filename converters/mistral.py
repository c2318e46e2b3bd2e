"""``model_type: mistral``: dense Mistral checkpoints -> GGUF arch ``llama``.

Same tensors as Llama; config.json may carry ``sliding_window``, which is
recorded as ``llama.attention.sliding_window`` (llama.cpp's llama graph runs
full attention, identical to the HF model for contexts up to the window).
"""

from __future__ import annotations

from quantkit.converters.llama import ARCH, IGNORE, Hparams, check_hparams, generated_tensors, metadata, rules  # noqa: F401

MODEL_TYPE = "mistral"
