"""``model_type: mixtral``: sparse MoE checkpoints -> GGUF arch ``llama`` with experts.

Experts are stacked per block into 3-D ``ffn_{gate,up,down}_exps`` tensors
``[n_expert, rows, cols]``; the router ``block_sparse_moe.gate`` becomes
``ffn_gate_inp`` and always stays F32.  Two source layouts are read:

* per expert (HF Mixtral checkpoints, what ``save_pretrained`` writes):
  ``block_sparse_moe.experts.{xid}.w1/w3/w2`` = gate / up / down;
* fused (transformers 5 in-memory layout, some re-saved checkpoints):
  ``mlp.experts.gate_up_proj [E, 2*ff, n]`` split in halves and ``mlp.experts.down_proj``.
"""

from __future__ import annotations

from quantkit.converters import Converter, HfExperts, Routing, register
from quantkit.converters.llama import ARCH, BASE_RULES, HEAD_RULES, IGNORE, Hparams, T, _p, generated_tensors, metadata
from quantkit.converters.llama import check_hparams as _check_dense
from quantkit.errors import CheckpointError
from quantkit.hf.mapping import OutTensor, Role, Transform

MODEL_TYPE = "mixtral"

PER_EXPERT_RULES = (
    _p("model.layers.{bid}.block_sparse_moe.gate.weight", T.FFN_GATE_INP, Role.ROUTER, lambda h: (h.n_expert, h.n_embd)),
    _p("model.layers.{bid}.block_sparse_moe.experts.{xid}.w1.weight", T.FFN_GATE_EXP, Role.EXPERTS, lambda h: (h.n_ff, h.n_embd)),
    _p("model.layers.{bid}.block_sparse_moe.experts.{xid}.w3.weight", T.FFN_UP_EXP, Role.EXPERTS, lambda h: (h.n_ff, h.n_embd)),
    _p("model.layers.{bid}.block_sparse_moe.experts.{xid}.w2.weight", T.FFN_DOWN_EXP, Role.EXPERTS, lambda h: (h.n_embd, h.n_ff)),
)
FUSED_RULES = (
    _p("model.layers.{bid}.mlp.gate.weight", T.FFN_GATE_INP, Role.ROUTER, lambda h: (h.n_expert, h.n_embd)),
    _p("model.layers.{bid}.mlp.experts.gate_up_proj", T.FFN_GATE_EXP, Role.EXPERTS, lambda h: (h.n_expert, 2 * h.n_ff, h.n_embd), Transform.FIRST_HALF),
    _p("model.layers.{bid}.mlp.experts.gate_up_proj", T.FFN_UP_EXP, Role.EXPERTS, lambda h: (h.n_expert, 2 * h.n_ff, h.n_embd), Transform.SECOND_HALF),
    _p("model.layers.{bid}.mlp.experts.down_proj", T.FFN_DOWN_EXP, Role.EXPERTS, lambda h: (h.n_expert, h.n_embd, h.n_ff)),
)


def rules(names: list[str]):
    fused = any(n.endswith(".mlp.experts.gate_up_proj") for n in names)
    return BASE_RULES + (FUSED_RULES if fused else PER_EXPERT_RULES) + HEAD_RULES


def check_hparams(h: Hparams, tensors: list[OutTensor]) -> None:
    if h.n_expert < 2:
        raise CheckpointError(f"config.json: num_local_experts = {h.n_expert}, a Mixtral needs at least 2; fix: restore the original config.json")
    if not 1 <= h.n_expert_used <= h.n_expert:
        raise CheckpointError(f"config.json: num_experts_per_tok = {h.n_expert_used}, expected 1..{h.n_expert}; fix: restore the original config.json")
    _check_dense(h, tensors)


CONVERTER = register(Converter(
    model_type=MODEL_TYPE, arch=ARCH, hparams=Hparams.from_config, rules=rules, metadata=metadata, check=check_hparams,
    generated=generated_tensors, ignore=IGNORE, hf_architectures=("MixtralForCausalLM",),
    routing=Routing(scoring="softmax", normalize_top_k=True),  # softmax, top-k, renormalised: llama.cpp's llama graph computes the same
    hf_experts=HfExperts(  # transformers' per-expert Mixtral keys (w1 gate, w3 up, w2 down), what --format bnb writes
        router="model.layers.{bid}.block_sparse_moe.gate.weight",
        gate="model.layers.{bid}.block_sparse_moe.experts.{xid}.w1.weight",
        up="model.layers.{bid}.block_sparse_moe.experts.{xid}.w3.weight",
        down="model.layers.{bid}.block_sparse_moe.experts.{xid}.w2.weight",
        block="model.layers.{bid}.mlp",
    ),
))
