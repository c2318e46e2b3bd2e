"""``model_type: kimi_k2``: Kimi K2 / K2.5 text checkpoints -> GGUF arch ``deepseek2``.

Kimi K2 is DeepSeek V3's architecture (``architectures: ["DeepseekV3ForCausalLM"]``) under a
model_type of its own, which transformers 5.23 does not know; llama.cpp's converter takes it
by the architecture.  Everything is ``deepseek_v3``'s (``converters/_deepseek.py``), except that
its config class is the checkpoint's own code, not transformers': no default is assumed, every
routing and MLA key must be in config.json, and ``scoring_func`` must say sigmoid (that code
reads it).  Kimi K2's published YaRN (``beta_fast`` = ``beta_slow`` = 1) is refused: llama.cpp's
deepseek2 loader always computes YaRN with 32 / 1.
"""

from __future__ import annotations

from dataclasses import replace

from quantkit.converters import MLP_EXPERTS
from quantkit.converters._deepseek import Family, register_family
from quantkit.converters.deepseek_v3 import NOTES, ROUTING

MODEL_TYPE = "kimi_k2"

#: DeepSeek V3's code with its own config class: nothing assumed but the rope layout of that code (interleaved pairs) and no MTP block
FAMILY = Family(model_type=MODEL_TYPE, gating="sigmoid", defaults=dict(rope_interleave=True, num_nextn_predict_layers=0), needs_scoring_func=True)

CONVERTER = register_family(FAMILY, ("DeepseekV3ForCausalLM",), ROUTING, notes=NOTES,
                            # --format bnb: DeepSeek V3's layout; transformers has no kimi_k2 model, quantkit.load_bnb builds its deepseek_v3
                            hf_experts=replace(MLP_EXPERTS, model_type="deepseek_v3"))
