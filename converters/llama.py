"""``model_type: llama``: dense Llama checkpoints -> GGUF arch ``llama``.

Owns what every Llama-family converter shares: hyperparameters read from
config.json (:class:`Hparams`), the attention / norm / embedding rows of the
name table, llama.cpp's rotary permutation of q/k rows, rope scaling
(linear, yarn, llama3 via a generated ``rope_freqs`` tensor) and the GGUF
metadata block.  ``mistral`` and ``mixtral`` extend it.

Not for: tokenizer metadata (``quantkit.hf.vocab``) or type choice (``quantkit.policy.plan``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from quantkit.format import gguf_spec
from quantkit.hf.checkpoint import shown
from quantkit.converters import Converter, register
from quantkit.errors import CheckpointError
from quantkit.format.gguf_write import MetaValue
from quantkit.hf.mapping import OutTensor, Role, Rule, Transform

MODEL_TYPE = "llama"
ARCH = gguf_spec.ARCH_LLAMA
T = gguf_spec.TensorName


#: the widest values GGUF's fixed-width fields hold: llama.cpp reads these hyperparameters as uint32 / float32
U32_MAX = 2**32 - 1
F32_MAX = float(np.finfo(np.float32).max)
ROPE_KEYS = ("rope_parameters", "rope_scaling")
_KIND = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _get(config: dict[str, Any], key: str, kind: type, default: Any = ..., *, positive: bool = True, where: str = "config.json", shown_key: str | None = None) -> Any:
    """``config[key]`` checked against ``kind`` and the GGUF field it goes to (uint32 for ints, float32 for floats).

    Ints must be positive (``positive=False``: zero allowed) and at most 2**32-1; floats
    finite, within float32's range, and positive unless ``positive=False``.
    """
    name = shown_key or key
    if key not in config or config[key] is None:
        if default is ...:
            raise CheckpointError(f"{where}: key {name!r} is missing; fix: add it ({_KIND.get(kind, kind.__name__)}, the value from the model's original config)")
        return default
    value = config[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CheckpointError(f"{where}: key {name!r} = {shown(value)}, expected {_KIND.get(kind, kind.__name__)}; fix: restore the original value")
    if kind is int:
        lo = 1 if positive else 0
        if not lo <= value <= U32_MAX:
            what = "a positive integer" if positive else "a non-negative integer"
            raise CheckpointError(f"{where}: key {name!r} = {shown(value)}, expected {what} of at most {U32_MAX} (GGUF stores it as uint32); fix: restore the original value")
    elif kind is float:
        if not math.isfinite(value) or abs(value) > F32_MAX:
            raise CheckpointError(f"{where}: key {name!r} = {shown(value)}, expected a finite number within float32's range (GGUF stores it as float32); fix: restore the original value")
        if positive and not np.float32(value) > 0:
            raise CheckpointError(f"{where}: key {name!r} = {shown(value)}, expected a positive number (above float32's smallest); fix: restore the original value")
    return value


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    """``rope_parameters`` (transformers 5) or ``rope_scaling``: an object of checked values (numbers as float, sizes as int)."""
    key = next((k for k in ROPE_KEYS if config.get(k)), None)
    if key is None:
        return {}
    raw = config[key]
    if not isinstance(raw, dict):
        raise CheckpointError(f"config.json: key {key!r} = {shown(raw)}, expected an object (e.g. {{\"rope_type\": \"default\"}}); fix: restore the original value")
    rope = dict(raw)
    for k in ("rope_type", "type"):
        if k in rope and not isinstance(rope[k], str):
            raise CheckpointError(f"config.json: key '{key}.{k}' = {shown(rope[k])}, expected a string; fix: restore the original value")
    for k in ("rope_theta", "factor", "low_freq_factor", "high_freq_factor"):
        if rope.get(k) is not None:
            rope[k] = _get(rope, k, float, shown_key=f"{key}.{k}")
    if rope.get("original_max_position_embeddings") is not None:
        rope["original_max_position_embeddings"] = _get(rope, "original_max_position_embeddings", int, shown_key=f"{key}.original_max_position_embeddings")
    kind = rope.get("rope_type", rope.get("type"))
    if kind in ("linear", "yarn", "llama3") and rope.get("factor") is None:  # llama.cpp would read no scaling at all
        raise CheckpointError(f"config.json: key '{key}' has rope_type {kind!r} without a 'factor'; fix: restore the original value")
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    if kind == "llama3" and low == high:
        raise CheckpointError(f"config.json: key '{key}.high_freq_factor' = {high!r} equals low_freq_factor, which llama3 rope scaling divides by the difference of; fix: restore the original values")
    return rope


def _context_length(config: dict[str, Any]) -> int:
    """``max_position_embeddings``: llama.cpp's context keys are uint32, but llama-cpp-python reads the trained context as an int32."""
    n = _get(config, "max_position_embeddings", int, 4096)
    if n > 2**31 - 1:
        raise CheckpointError(f"config.json: key 'max_position_embeddings' = {n}, more than the 2147483647 llama.cpp's runtime can take; fix: restore the original value")
    return n


def _optional_count(config: dict[str, Any], key: str) -> int | None:
    """A size that may be absent, null or 0 (None then), else a positive uint32."""
    value = _get(config, key, int, 0, positive=False)
    return value or None


@dataclass(frozen=True)
class Hparams:
    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    norm_eps: float
    rope_theta: float
    rope: dict[str, Any] = field(default_factory=dict)
    sliding_window: int | None = None
    tie_embeddings: bool = False
    n_expert: int = 0
    n_expert_used: int = 0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Hparams:
        act = config.get("hidden_act", "silu")
        if act != "silu":  # llama.cpp's llama (and qwen3moe) graphs gate every FFN with SiLU, whatever the file says
            raise CheckpointError(
                f"config.json: hidden_act = {shown(act)}: llama.cpp's graph for this family gates its feed-forward layers with SiLU "
                "and would compute another model; fix: only checkpoints with hidden_act = \"silu\" can be converted"
            )
        n_embd = _get(config, "hidden_size", int)
        n_head = _get(config, "num_attention_heads", int)
        n_head_kv = _get(config, "num_key_value_heads", int, n_head)
        if n_head % n_head_kv:
            raise CheckpointError(f"config.json: num_attention_heads = {n_head} is not a multiple of num_key_value_heads = {n_head_kv}; fix: restore the original values")
        head_dim = _get(config, "head_dim", int, n_embd // n_head)
        if head_dim < 2 or head_dim % 2:
            raise CheckpointError(
                f"config.json: head_dim = {head_dim} (hidden_size // num_attention_heads unless given), expected an even number of at least 2 "
                "(rotary embeddings pair the dimensions); fix: restore the original values"
            )
        rope = _rope(config)
        theta = _get(config, "rope_theta", float, None)
        tie = config.get("tie_word_embeddings")
        if tie is not None and not isinstance(tie, bool):
            raise CheckpointError(f"config.json: key 'tie_word_embeddings' = {shown(tie)}, expected true or false; fix: restore the original value")
        return cls(
            n_vocab=_get(config, "vocab_size", int),
            n_embd=n_embd,
            n_ff=_get(config, "intermediate_size", int),
            n_layer=_get(config, "num_hidden_layers", int),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_ctx=_context_length(config),
            norm_eps=_get(config, "rms_norm_eps", float, 1e-6),
            rope_theta=theta if theta is not None else rope.get("rope_theta", 10000.0),
            rope=rope,
            sliding_window=_optional_count(config, "sliding_window"),
            tie_embeddings=bool(tie),
            n_expert=_get(config, "num_local_experts", int, 0, positive=False),
            n_expert_used=_get(config, "num_experts_per_tok", int, 0, positive=False),
        )

    @property
    def rope_type(self) -> str:
        return str(self.rope.get("rope_type", self.rope.get("type", "default")))


def _p(hf: str, tensor: str, role: Role, shape, transform: Transform = Transform.NONE, optional: bool = False) -> Rule:
    gguf_name = tensor + ".weight"
    return Rule(hf, gguf_name, role, shape, transform, optional)


# Rows every Llama-family model has.  Shapes are HF (out, in) for one source tensor.
BASE_RULES: tuple[Rule, ...] = (
    _p("model.embed_tokens.weight", T.TOKEN_EMBD, Role.EMBEDDINGS, lambda h: (h.n_vocab, h.n_embd)),
    _p("model.layers.{bid}.input_layernorm.weight", T.ATTN_NORM, Role.NORM, lambda h: (h.n_embd,)),
    _p("model.layers.{bid}.self_attn.q_proj.weight", T.ATTN_Q, Role.ATTENTION, lambda h: (h.n_head * h.head_dim, h.n_embd), Transform.PERMUTE_Q),
    _p("model.layers.{bid}.self_attn.k_proj.weight", T.ATTN_K, Role.ATTENTION, lambda h: (h.n_head_kv * h.head_dim, h.n_embd), Transform.PERMUTE_K),
    _p("model.layers.{bid}.self_attn.v_proj.weight", T.ATTN_V, Role.ATTENTION, lambda h: (h.n_head_kv * h.head_dim, h.n_embd)),
    _p("model.layers.{bid}.self_attn.o_proj.weight", T.ATTN_OUT, Role.ATTENTION, lambda h: (h.n_embd, h.n_head * h.head_dim)),
    _p("model.layers.{bid}.post_attention_layernorm.weight", T.FFN_NORM, Role.NORM, lambda h: (h.n_embd,)),
)
DENSE_FFN_RULES: tuple[Rule, ...] = (
    _p("model.layers.{bid}.mlp.gate_proj.weight", T.FFN_GATE, Role.FFN, lambda h: (h.n_ff, h.n_embd)),
    _p("model.layers.{bid}.mlp.up_proj.weight", T.FFN_UP, Role.FFN, lambda h: (h.n_ff, h.n_embd)),
    _p("model.layers.{bid}.mlp.down_proj.weight", T.FFN_DOWN, Role.FFN, lambda h: (h.n_embd, h.n_ff)),
)
HEAD_RULES: tuple[Rule, ...] = (
    _p("model.norm.weight", T.OUTPUT_NORM, Role.NORM, lambda h: (h.n_embd,)),
    _p("lm_head.weight", T.OUTPUT, Role.OUTPUT, lambda h: (h.n_vocab, h.n_embd), optional=True),
)
#: Buffers some checkpoints store that carry no weights.
IGNORE: tuple[str, ...] = (r"\.rotary_emb\.inv_freq$",)


# Shared by the MoE families transformers models with ``mlp.gate`` + ``mlp.experts`` (Qwen2/3 MoE, OLMoE):
#: embeddings and the attention projections as they are (NeoX rotary: llama.cpp takes q/k rows unpermuted)
NEOX_ATTENTION_RULES: tuple[Rule, ...] = (
    _p("model.embed_tokens.weight", T.TOKEN_EMBD, Role.EMBEDDINGS, lambda h: (h.n_vocab, h.n_embd)),
    _p("model.layers.{bid}.input_layernorm.weight", T.ATTN_NORM, Role.NORM, lambda h: (h.n_embd,)),
    _p("model.layers.{bid}.self_attn.q_proj.weight", T.ATTN_Q, Role.ATTENTION, lambda h: (h.n_head * h.head_dim, h.n_embd)),
    _p("model.layers.{bid}.self_attn.k_proj.weight", T.ATTN_K, Role.ATTENTION, lambda h: (h.n_head_kv * h.head_dim, h.n_embd)),
    _p("model.layers.{bid}.self_attn.v_proj.weight", T.ATTN_V, Role.ATTENTION, lambda h: (h.n_head_kv * h.head_dim, h.n_embd)),
    _p("model.layers.{bid}.self_attn.o_proj.weight", T.ATTN_OUT, Role.ATTENTION, lambda h: (h.n_embd, h.n_head * h.head_dim)),
    _p("model.layers.{bid}.post_attention_layernorm.weight", T.FFN_NORM, Role.NORM, lambda h: (h.n_embd,)),
)
#: graphs that always read ``output``: a tied checkpoint (no ``lm_head``) gets the embeddings again
TIED_OUTPUT_RULE = _p("model.embed_tokens.weight", T.OUTPUT, Role.OUTPUT, lambda h: (h.n_vocab, h.n_embd))


def moe_counts(config: dict[str, Any]) -> tuple[int, int]:
    """(experts, experts per token) of the families that call them ``num_experts`` (transformers 5 also writes
    its alias ``num_local_experts``) and ``num_experts_per_tok``, checked against each other."""
    key = "num_experts" if "num_experts" in config else "num_local_experts"
    n_expert = _get(config, key, int)
    n_used = _get(config, "num_experts_per_tok", int)
    if not 1 <= n_used <= n_expert:
        raise CheckpointError(f"config.json: num_experts_per_tok = {n_used}, expected 1..{key} = {n_expert}; fix: restore the original config.json")
    return n_expert, n_used


def moe_rules(names: list[str], width: Callable[[Any], int]) -> tuple[Rule, ...]:
    """Router ``mlp.gate`` and routed experts of ``width(h)`` rows: per-expert ``mlp.experts.{xid}.gate_proj/up_proj/down_proj``
    keys, or transformers 5's fused ``mlp.experts.gate_up_proj`` [E, 2F, H] (gate first) / ``down_proj`` [E, H, F]."""
    router = _p("model.layers.{bid}.mlp.gate.weight", T.FFN_GATE_INP, Role.ROUTER, lambda h: (h.n_expert, h.n_embd))
    if any(n.endswith(".mlp.experts.gate_up_proj") for n in names):
        return (
            router,
            _p("model.layers.{bid}.mlp.experts.gate_up_proj", T.FFN_GATE_EXP, Role.EXPERTS, lambda h: (h.n_expert, 2 * width(h), h.n_embd), Transform.FIRST_HALF),
            _p("model.layers.{bid}.mlp.experts.gate_up_proj", T.FFN_UP_EXP, Role.EXPERTS, lambda h: (h.n_expert, 2 * width(h), h.n_embd), Transform.SECOND_HALF),
            _p("model.layers.{bid}.mlp.experts.down_proj", T.FFN_DOWN_EXP, Role.EXPERTS, lambda h: (h.n_expert, h.n_embd, width(h))),
        )
    return (
        router,
        _p("model.layers.{bid}.mlp.experts.{xid}.gate_proj.weight", T.FFN_GATE_EXP, Role.EXPERTS, lambda h: (width(h), h.n_embd)),
        _p("model.layers.{bid}.mlp.experts.{xid}.up_proj.weight", T.FFN_UP_EXP, Role.EXPERTS, lambda h: (width(h), h.n_embd)),
        _p("model.layers.{bid}.mlp.experts.{xid}.down_proj.weight", T.FFN_DOWN_EXP, Role.EXPERTS, lambda h: (h.n_embd, width(h))),
    )


def head_rules(names: list[str], always_output: bool = False) -> tuple[Rule, ...]:
    """``output_norm`` and ``output``; with ``always_output`` a tied checkpoint's embeddings are written as ``output`` too."""
    return HEAD_RULES + ((TIED_OUTPUT_RULE,) if always_output and "lm_head.weight" not in names else ())


def rules(names: list[str]) -> tuple[Rule, ...]:
    return BASE_RULES + DENSE_FFN_RULES + HEAD_RULES


#: llama.cpp aborts the process loading a file beyond these (GGML_ASSERT in llama-model.cpp, llama-cpp-python 0.3.36)
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024


def check_hparams(h: Hparams, tensors: list[OutTensor]) -> None:
    if h.n_layer > LLAMA_MAX_LAYERS:
        raise CheckpointError(f"config.json: num_hidden_layers = {h.n_layer}, more than the {LLAMA_MAX_LAYERS} llama.cpp supports (it aborts loading such a file); fix: none with this llama.cpp, the model is too deep")
    if h.n_expert > LLAMA_MAX_EXPERTS:
        raise CheckpointError(f"config.json: num_local_experts = {h.n_expert}, more than the {LLAMA_MAX_EXPERTS} llama.cpp supports (it aborts loading such a file); fix: none with this llama.cpp")
    if h.n_expert and not any(t.role is Role.EXPERTS for t in tensors):
        raise CheckpointError(
            f"config.json: num_local_experts = {h.n_expert}, but the checkpoint has no expert tensors (a dense model); "
            "fix: remove num_local_experts, or set model_type to the MoE architecture the weights belong to"
        )
    if not any(t.name == "output.weight" for t in tensors) and not h.tie_embeddings:
        raise CheckpointError("checkpoint: tensor 'lm_head.weight' is missing and config.json tie_word_embeddings is false; fix: re-download the shard holding lm_head.weight")
    if h.rope_type not in ("default", "linear", "yarn", "llama3"):
        raise CheckpointError(f"config.json: rope scaling type {h.rope_type!r} is not supported (supported: default, linear, yarn, llama3); fix: use a model with a supported rope scaling")


def rope_freqs(h: Hparams) -> np.ndarray:
    """llama3 rope scaling as per-dimension frequency factors (llama.cpp's ``rope_freqs``)."""
    r = h.rope
    factor = float(r.get("factor", 8.0))
    low, high = float(r.get("low_freq_factor", 1.0)), float(r.get("high_freq_factor", 4.0))
    old_ctx = float(r.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (h.rope_theta ** (np.arange(0, h.head_dim, 2, dtype=np.float32) / h.head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def generated_tensors(h: Hparams) -> list[OutTensor]:
    if h.rope_type == "llama3":
        name = T.ROPE_FREQS + ".weight"
        return [OutTensor(name, (h.head_dim // 2,), Role.OTHER, (), data=lambda: rope_freqs(h))]
    return []


def metadata(h: Hparams, arch: str = ARCH) -> dict[str, MetaValue]:
    """The ``{arch}.*`` hyperparameter block llama.cpp's generic loader reads (``llama.*`` here)."""
    K, V = gguf_spec.Keys, gguf_spec.GGUFValueType
    a = arch
    u32 = lambda v: MetaValue(int(v), V.UINT32)  # noqa: E731
    f32 = lambda v: MetaValue(float(v), V.FLOAT32)  # noqa: E731
    md = {
        K.LLM.CONTEXT_LENGTH.format(arch=a): u32(h.n_ctx),
        K.LLM.EMBEDDING_LENGTH.format(arch=a): u32(h.n_embd),
        K.LLM.BLOCK_COUNT.format(arch=a): u32(h.n_layer),
        K.LLM.FEED_FORWARD_LENGTH.format(arch=a): u32(h.n_ff),
        K.LLM.VOCAB_SIZE.format(arch=a): u32(h.n_vocab),
        K.Attention.HEAD_COUNT.format(arch=a): u32(h.n_head),
        K.Attention.HEAD_COUNT_KV.format(arch=a): u32(h.n_head_kv),
        K.Attention.KEY_LENGTH.format(arch=a): u32(h.head_dim),
        K.Attention.VALUE_LENGTH.format(arch=a): u32(h.head_dim),
        K.Attention.LAYERNORM_RMS_EPS.format(arch=a): f32(h.norm_eps),
        K.Rope.DIMENSION_COUNT.format(arch=a): u32(h.head_dim),
        K.Rope.FREQ_BASE.format(arch=a): f32(h.rope_theta),
    }
    if h.rope_type == "linear":
        md[K.Rope.SCALING_TYPE.format(arch=a)] = MetaValue("linear", V.STRING)
        md[K.Rope.SCALING_FACTOR.format(arch=a)] = f32(h.rope.get("factor", 1.0))
    elif h.rope_type == "yarn":
        md[K.Rope.SCALING_TYPE.format(arch=a)] = MetaValue("yarn", V.STRING)
        md[K.Rope.SCALING_FACTOR.format(arch=a)] = f32(h.rope.get("factor", 1.0))
        md[K.Rope.SCALING_ORIG_CTX_LEN.format(arch=a)] = u32(h.rope.get("original_max_position_embeddings", h.n_ctx))
    if h.sliding_window:
        md[K.Attention.SLIDING_WINDOW.format(arch=a)] = u32(h.sliding_window)
    if h.n_expert:
        md[K.LLM.EXPERT_COUNT.format(arch=a)] = u32(h.n_expert)
        md[K.LLM.EXPERT_USED_COUNT.format(arch=a)] = u32(h.n_expert_used)
    return md


CONVERTER = register(Converter(
    model_type=MODEL_TYPE, arch=ARCH, hparams=Hparams.from_config, rules=rules, metadata=metadata, check=check_hparams,
    generated=generated_tensors, ignore=IGNORE, hf_architectures=("LlamaForCausalLM",),
))


# --------------------------------------------------------------------------- what only llama.cpp cannot compute

#: who runs the conversion's output: "gguf" (llama.cpp: every check) or "transformers" (``convert --format bnb``)
_OUTPUT: ContextVar[str] = ContextVar("quantkit_conversion_output", default="gguf")
_log = logging.getLogger(__name__)


@contextlib.contextmanager
def output_for_transformers() -> Iterator[None]:
    """Within: converters map a checkpoint for transformers (``convert --format bnb``), not for llama.cpp, so refusals of
    what only llama.cpp's graph cannot compute (:func:`llama_cpp_limit`) are logged instead of raised."""
    token = _OUTPUT.set("transformers")
    try:
        yield
    finally:
        _OUTPUT.reset(token)


def llama_cpp_limit(error: CheckpointError) -> None:
    """A refusal of what transformers computes but llama.cpp cannot (``error``: one line naming the key and llama.cpp):
    raised for a GGUF output (the default); inside :func:`output_for_transformers` only logged, and the caller goes on
    with the checkpoint's own values (what transformers computes)."""
    if _OUTPUT.get() == "gguf":
        raise error
    _log.info("not a limit for transformers, passed over: %s", error)


#: the rotary embeddings transformers 5.23 computes (``modeling_rope_utils.ROPE_INIT_FUNCTIONS`` and ``default``): a rope type a
#: family's llama.cpp graph lacks is a llama.cpp limit only (:func:`llama_cpp_limit`) if it is one of these
TRANSFORMERS_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")
