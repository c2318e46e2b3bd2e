"""``model_type: mistral``: dense Mistral checkpoints -> GGUF arch ``llama``.

Same tensors as Llama; config.json may carry ``sliding_window``, which is
recorded as ``llama.attention.sliding_window`` (llama.cpp's llama graph runs
full attention, identical to the HF model for contexts up to the window).
"""

from __future__ import annotations

from dataclasses import replace

from quantkit.converters import register
from quantkit.converters.llama import CONVERTER as LLAMA

MODEL_TYPE = "mistral"
CONVERTER = register(replace(LLAMA, model_type=MODEL_TYPE, hf_architectures=("MistralForCausalLM",)))
