"""``model_type: granitemoeshared``: Granite MoE with a shared MLP -> GGUF arch ``granitemoe``.

llama.cpp has no architecture of its own for it: its reference converter writes
``GraniteMoeSharedForCausalLM`` as ``granitemoe`` plus
``expert_shared_feed_forward_length``, and the granite graph then adds a shared
SiLU-gated MLP (``ffn_{gate,up,down}_shexp``) to the routed experts' output,
before the residual multiplier: what transformers' ``modeling_granitemoeshared.py``
computes.  Everything else is :mod:`quantkit.converters.granitemoe`.

The shared MLP is stored fused: ``shared_mlp.input_linear.weight [2*S, H]``
(first half gate, second half up: transformers ``chunk(2)``s it and gates with the
first), split into ``ffn_gate_shexp`` / ``ffn_up_shexp``, and
``shared_mlp.output_linear.weight [H, S]`` -> ``ffn_down_shexp``, with
``S = shared_intermediate_size``.  transformers 5 renames only the experts, so the
shared MLP has these names in both layouts.  ``shared_intermediate_size: 0`` (the
config class default) means no shared MLP in either program: a plain Granite MoE.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from quantkit.converters import Converter, register
from quantkit.converters.granitemoe import ARCH, ATTENTION_RULES, HF_EXPERTS, IGNORE, ROUTING, GraniteHparams, expert_rules, generated_tensors, metadata
from quantkit.converters.granitemoe import check as _check_granite
from quantkit.converters.granitemoe import hparams as _granite_hparams
from quantkit.converters.llama import HEAD_RULES, T, _get, _p
from quantkit.errors import CheckpointError
from quantkit.hf.mapping import OutTensor, Role, Rule, Transform

MODEL_TYPE = "granitemoeshared"

# Role FFN, not EXPERTS: the shared MLP runs on every token (and llama.cpp's size label counts it as shared).
SHARED_RULES: tuple[Rule, ...] = (
    _p("model.layers.{bid}.shared_mlp.input_linear.weight", T.FFN_GATE_SHEXP, Role.FFN, lambda h: (2 * h.n_ff_shexp, h.n_embd), Transform.FIRST_HALF),
    _p("model.layers.{bid}.shared_mlp.input_linear.weight", T.FFN_UP_SHEXP, Role.FFN, lambda h: (2 * h.n_ff_shexp, h.n_embd), Transform.SECOND_HALF),
    _p("model.layers.{bid}.shared_mlp.output_linear.weight", T.FFN_DOWN_SHEXP, Role.FFN, lambda h: (h.n_embd, h.n_ff_shexp)),
)


def hparams(config: dict[str, Any]) -> GraniteHparams:
    h = _granite_hparams(config)
    return dataclasses.replace(h, n_ff_shexp=_get(config, "shared_intermediate_size", int, 0, positive=False))


def rules(names: list[str]) -> tuple[Rule, ...]:
    shared = any(n.endswith(".shared_mlp.input_linear.weight") or n.endswith(".shared_mlp.output_linear.weight") for n in names)
    return ATTENTION_RULES + expert_rules(names) + (SHARED_RULES if shared else ()) + HEAD_RULES


def check(h: GraniteHparams, tensors: list[OutTensor]) -> None:
    if h.n_ff_shexp and not any(t.name.endswith("_shexp.weight") for t in tensors):
        raise CheckpointError(
            f"checkpoint: config.json shared_intermediate_size = {h.n_ff_shexp}, but tensor 'model.layers.0.shared_mlp.input_linear.weight' is missing; "
            "fix: re-download the checkpoint, or set shared_intermediate_size to 0 if the model has no shared MLP"
        )
    _check_granite(h, tensors)


CONVERTER = register(Converter(
    model_type=MODEL_TYPE, arch=ARCH, hparams=hparams, rules=rules, metadata=metadata, check=check,
    generated=generated_tensors, ignore=IGNORE, hf_architectures=("GraniteMoeSharedForCausalLM",), routing=ROUTING,
    hf_experts=HF_EXPERTS,  # the shared MLP (input_linear [2S, H], output_linear) is 4-bit under its own module path
))
