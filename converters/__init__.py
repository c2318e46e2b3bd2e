"""The one place that knows model architectures: a registry of converters, one module per family.

Each module here, named after a Hugging Face ``model_type``, builds a
:class:`Converter` (the GGUF architecture it writes, how config.json becomes
hyperparameters, its tensor-name table, its GGUF metadata block, its checks and
what its router computes) and passes it to :func:`register`.  Modules are
discovered, not listed: adding a family is adding ``converters/<model_type>.py``
(and its test parameters).  Installed as ``quantkit.converters``.

Not for: reading files (``quantkit.hf.checkpoint``), tokenizers (``quantkit.hf.vocab``)
or type choice (``quantkit.policy.plan``).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from quantkit.errors import CheckpointError
from quantkit.hf.mapping import OutTensor, Role, Rule, map_tensors

if TYPE_CHECKING:
    from quantkit.hf.checkpoint import Checkpoint
    from quantkit.format.gguf_write import MetaValue


@dataclass(frozen=True)
class Routing:
    """What a MoE block's router computes, as transformers' modeling code does (the reference).

    ``scoring``: ``softmax`` or ``sigmoid`` over the router logits; ``normalize_top_k``: the
    chosen experts' weights are renormalised to sum to 1.  Evaluations and checks read these
    instead of guessing from config keys.
    """

    scoring: str = "softmax"
    normalize_top_k: bool = True
    #: each routed expert is ``down(silu(gate x) * up x)`` over stacked ``ffn_{gate,up,down}_exps`` without biases:
    #: what ``quantkit imatrix --all-experts`` recomputes for every expert
    silu_gated_experts: bool = True
    #: experts are chosen by score + a learned per-expert bias (``e_score_correction_bias`` -> ``exp_probs_b``);
    #: the chosen experts' weights use the unbiased scores (DeepSeek V3)
    score_bias: bool = False
    #: the top-k may be limited to the best ``expert_group_used_count`` of ``expert_group_count`` groups of experts
    #: (each group scored by the sum of its two best biased scores); the GGUF keys hold a checkpoint's values
    group_limited: bool = False
    #: the chosen weights are multiplied by ``expert_weights_scale`` (``routed_scaling_factor``), after any renormalisation
    weights_scaled: bool = False
    #: the fields above that a checkpoint's config.json decides (its GGUF keys ``expert_weights_norm``,
    #: ``expert_group_count`` ... hold its own values); the declared value is what the family's published models use
    per_checkpoint: tuple[str, ...] = ()


@dataclass(frozen=True)
class HfExperts:
    """Where a MoE family's routed experts and router live in transformers: what ``convert --format bnb``
    writes and ``quantkit.load_bnb`` rebuilds.

    Keys are templates (``{bid}`` = block, ``{xid}`` = expert) of the per-expert layout ``save_pretrained``
    writes, each expert's gate / up / down projection a ``[rows, cols]`` weight of its own.  A family whose
    checkpoints only exist fused (Granite's ``input_linear`` [E, 2F, H]) declares per-expert names under its
    transformers 5 module path instead: only ``quantkit.load_bnb`` reads them back.  In memory
    transformers 5 fuses a block's experts into one module, ``{block}.experts`` (3-D ``gate_up_proj`` /
    ``down_proj``), beside the router ``{block}.gate``: the loader swaps that module for per-expert 4-bit
    linears.  Everything else (attention, norms, a shared expert and its gate) is stored under its own
    module path and needs no entry.
    """

    router: str  # e.g. "model.layers.{bid}.mlp.gate.weight"
    gate: str  # e.g. "model.layers.{bid}.mlp.experts.{xid}.gate_proj.weight"
    up: str
    down: str
    block: str = "model.layers.{bid}.mlp"  # the transformers 5 module holding the router and ``experts``
    router_param: str = "gate.weight"  # the router's parameter inside ``block`` (Granite: ``router.weight``)
    #: further ``nn.Linear`` weights (key templates, ``{bid}``) whose name-table role is not a quantised one
    #: (Role.OTHER: the Gated DeltaNet projections of Qwen3-Next / Qwen3.5): stored 4-bit as well
    linears: tuple[str, ...] = ()
    #: regexes of source tensors transformers' model does not load (``_keys_to_ignore_on_load_unexpected``,
    #: e.g. multi-token-prediction blocks ``mtp.*``): left out of the export
    unloaded: tuple[str, ...] = ()
    #: (source prefix, exported prefix) of keys transformers' causal LM names otherwise: Qwen3.5's vision-language
    #: checkpoints hold the language model under ``model.language_model.``, ``AutoModelForCausalLM`` under ``model.``
    renamed: tuple[tuple[str, str], ...] = ()
    #: key templates (``{bid}``) of weights whose name-table role is a quantised one but which stay in source precision:
    #: DeepSeek V3.2's / GLM-5's indexer ``weights_proj`` (transformers casts the indexer's input to that weight's dtype,
    #: uint8 for a 4-bit one; DeepSeek's own code keeps it bf16)
    kept: tuple[str, ...] = ()
    #: the transformers ``model_type`` whose model ``quantkit.load_bnb`` builds, where transformers does not know the
    #: checkpoint's own (Kimi K2's ``kimi_k2`` runs DeepSeek V3's code: ``deepseek_v3``); None: config.json's model_type
    model_type: str | None = None
    #: (stored key template, transformers 5 key template) of MoE-block tensors ``save_pretrained`` writes under another module
    #: than the one holding them in memory (``{bid}``): MiniMax-M2's selection bias ``block_sparse_moe.e_score_correction_bias``
    #: is ``mlp.e_score_correction_bias``; ERNIE-4.5's ``mlp.moe_statics.e_score_correction_bias`` is
    #: ``mlp.gate.moe_statics.e_score_correction_bias``.  Exported under the stored key (a fused source's in-memory key too),
    #: set by ``quantkit.load_bnb`` at the in-memory one
    moved: tuple[tuple[str, str], ...] = ()

    @property
    def projections(self) -> tuple[str, str, str]:
        """The gate, up and down leaf names (``gate_proj`` / ``up_proj`` / ``down_proj``, Mixtral's ``w1`` / ``w3`` / ``w2``)."""
        return tuple(k.removesuffix(".weight").rpartition(".")[2] for k in (self.gate, self.up, self.down))  # type: ignore[return-value]


#: transformers' ``mlp.gate`` + ``mlp.experts.{xid}.gate_proj/up_proj/down_proj`` (Qwen2/3 MoE, OLMoE)
MLP_EXPERTS = HfExperts(
    router="model.layers.{bid}.mlp.gate.weight",
    gate="model.layers.{bid}.mlp.experts.{xid}.gate_proj.weight",
    up="model.layers.{bid}.mlp.experts.{xid}.up_proj.weight",
    down="model.layers.{bid}.mlp.experts.{xid}.down_proj.weight",
)


def _no_check(h: Any, tensors: list[OutTensor]) -> None:
    return None


def _no_tensors(h: Any) -> list[OutTensor]:
    return []


def _nothing_dropped(h: Any) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class Converter:
    """One architecture: everything the pipeline needs to know about it, declared by its module."""

    model_type: str  # config.json model_type
    arch: str  # GGUF general.architecture
    hparams: Callable[[dict[str, Any]], Any]  # config.json -> hyperparameters (checked, typed)
    rules: Callable[[list[str]], Sequence[Rule]]  # the name table for a checkpoint with these tensor names
    metadata: Callable[[Any], dict[str, MetaValue]]  # the ``{arch}.*`` GGUF block
    check: Callable[[Any, list[OutTensor]], None] = _no_check  # what the name table cannot see
    generated: Callable[[Any], list[OutTensor]] = _no_tensors  # tensors made from hyperparameters (rope_freqs)
    ignore: tuple[str, ...] = ()  # regexes of source tensors that are dropped on purpose
    hf_architectures: tuple[str, ...] = ()  # config.json ``architectures`` entries of this family
    routing: Routing | None = None  # None: a dense model
    hf_experts: HfExperts | None = None  # a MoE family's transformers expert layout (--format bnb); None: not declared
    notes: tuple[str, ...] = field(default=())  # what differs from transformers, said in docs and plan
    #: regexes of source tensors dropped on purpose for these hyperparameters (multi-token-prediction blocks past
    #: num_hidden_layers); ``ignore`` is the same for every checkpoint
    dropped: Callable[[Any], tuple[str, ...]] = _nothing_dropped

    def mtp_sources(self, config: dict[str, Any], names: list[str]) -> list[str]:
        """The checkpoint's multi-token-prediction tensors this family would keep as nextn blocks (``--no-mtp`` leaves
        them out, as llama.cpp's converter's ``--no-mtp`` does); none for a family that keeps none."""
        return []

    def map(self, ckpt: Checkpoint) -> tuple[Any, list[OutTensor]]:
        """Hyperparameters and the checked tensor map of a checkpoint (no weights are read)."""
        hp = self.hparams(ckpt.config)
        drop = [re.compile(p) for p in self.dropped(hp)]
        source = {n: ref for n, ref in ckpt.tensors.items() if not any(p.search(n) for p in drop)} if drop else ckpt.tensors
        rules = self.rules(list(source))
        n_experts = hp.n_expert if any(r.stacked or r.role is Role.EXPERTS for r in rules) else 0
        tensors = map_tensors(source, rules, hp, hp.n_layer, n_experts, self.ignore, where=str(ckpt.root))
        tensors += self.generated(hp)
        self.check(hp, tensors)
        return hp, tensors


CONVERTERS: dict[str, Converter] = {}
_discovered = False


def register(converter: Converter) -> Converter:
    """Add a converter; a second one for the same ``model_type`` is a programming error."""
    if converter.model_type in CONVERTERS:
        raise ValueError(f"converter for model_type {converter.model_type!r} registered twice")
    CONVERTERS[converter.model_type] = converter
    return converter


def _discover() -> None:
    """Import every converter module once (each registers itself)."""
    global _discovered
    if not _discovered:
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")
        _discovered = True


def for_model_type(model_type: object, where: str = "config.json") -> Converter:
    _discover()
    if isinstance(model_type, str) and model_type in CONVERTERS:
        return CONVERTERS[model_type]
    shown = repr(model_type)[:80]
    raise CheckpointError(
        f"{where}: model_type {shown} is not supported (supported: {', '.join(sorted(CONVERTERS))}); fix: convert a model of a supported architecture"
    )


def for_gguf_arch(arch: str) -> list[Converter]:
    """The converters that write GGUF architecture ``arch`` (requantising and evaluating GGUF files)."""
    _discover()
    return [c for c in CONVERTERS.values() if c.arch == arch]
