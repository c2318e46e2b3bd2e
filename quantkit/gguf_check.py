"""What llama.cpp assumes of a model GGUF, checked before llama.cpp loads it (or quantkit requantises it).

llama.cpp checks the container (``quantkit.gguf_read`` restates those rules) but
trusts much of the model metadata: ``GGML_ASSERT``s on the block count, the
expert counts, the RoPE scaling type and a vocabulary with two equal tokens
abort the whole process, silently when llama-cpp-python hides llama.cpp's
stderr; other mistakes come back as "failed to load model" with the reason in
a log nobody sees.  This module restates those rules from the vendored
llama.cpp (``src/llama-model.cpp`` ``load_hparams``, ``src/models/llama.cpp``,
``src/llama-vocab.cpp`` ``load``, ``src/llama-model-loader.cpp``) so that each
bad file gets one line naming the key or tensor, what was found and the fix:

- every architecture: key types as llama.cpp reads them (counts UINT32, per-layer
  counts a UINT32 or an int array of ``block_count`` items, epsilons FLOAT32),
  ``block_count`` in 1..512 and no ``blk.N`` tensor beyond it, a positive context
  and embedding length, expert counts that agree with each other and with the
  router and stacked expert tensors, query heads a multiple of KV heads, a known
  RoPE scaling type, a vocabulary of distinct tokens as long as ``token_embd`` /
  ``output`` have rows (with byte tokens for an SPM vocabulary), no empty tensor,
  F32 norms and 1-D tensors, no tensor in a type llama.cpp cannot compute with;
- the ``llama`` architecture (Mixtral, Mistral, Llama: what quantkit converts):
  every tensor llama.cpp loads present with the shape it expects, nothing else.

:func:`check_before_load` also makes an abort that still happens inside llama.cpp
say why (:func:`quantkit.ggml.install_abort_message`).

Not for: the container format (``quantkit.gguf_read``), running models (``quantkit.runtime``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.errors import GGUFFormatError
from quantkit.gguf_read import ArraySummary, GGUFFile, TensorInfo, read_gguf
from quantkit import gguf_spec as _spec
from quantkit.gguf_spec import GGMLQuantizationType
from quantkit.gguf_spec import GGUFValueType as VT

LLAMA_MAX_LAYERS = 512  # llama-hparams.h
LLAMA_MAX_EXPERTS = 1024
MAX_VOCAB = 1 << 22  # token ids are int32; real vocabularies hold up to a few 100k tokens
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # llama-model.cpp LLAMA_ROPE_SCALING_TYPES
NO_VOCAB = ("no_vocab", "none")  # tokenizer.ggml.model values that need no token list
TOKENIZERS = ("llama", "bert", "gpt2", "hybriddna", "whitespace", "t5", "rwkv", "plamo2", "gemma4", *NO_VOCAB)  # llama-vocab.cpp load()
FIX = "fix: re-convert the model with quantkit convert (or re-download it)"
#: keys llama.cpp reads per layer: one UINT32 for all layers, or an array of block_count ints
PER_LAYER = ("attention.head_count", "attention.head_count_kv", "feed_forward_length", "expert_used_count")
U32_KEYS = ("attention.key_length", "attention.value_length", "rope.dimension_count", "vocab_size", "expert_group_count",
            "expert_group_used_count", "nextn_predict_layers", "rope.scaling.original_context_length", "attention.sliding_window")
F32_KEYS = ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon", "rope.freq_base", "rope.scaling.factor")
SPECIAL_IDS = ("bos", "eos")  # tokenizer.ggml.<x>_token_id: the ones llama.cpp tokenises and stops with
_Q = GGMLQuantizationType
NOT_WEIGHT_TYPES = _spec.NOT_WEIGHT_TYPES
_EXPS = re.compile(r"^blk\.\d+\.ffn_(gate|up|down|gate_up)_exps\.weight$")
_ROUTER = re.compile(r"^blk\.\d+\.ffn_gate_inp\.weight$")


def keep_key(key: str) -> bool:
    """Arrays the checks need whole (``read_gguf(keep=...)``): the token list and the per-layer counts."""
    return key == "tokenizer.ggml.tokens" or key.endswith(tuple("." + k for k in PER_LAYER))


def check_before_load(path: str | Path) -> GGUFFile:
    """Read ``path`` and check it as llama.cpp will load it; arm the abort message.  Returns the (summary) file."""
    from quantkit import ggml

    g = read_gguf(path, keep=keep_key)
    check_model(g)
    ggml.install_abort_message()
    return g


def check_model(g: GGUFFile) -> None:
    """GGUFFormatError for the first hyperparameter, vocabulary or tensor llama.cpp would abort on or refuse."""
    _Model(g).check()


def _cap(v: Any, n: int = 80) -> str:
    """An untrusted value for an error message: repr, at most ``n`` characters; long arrays by their length."""
    if isinstance(v, ArraySummary):
        return f"array of {v.count} {v.item_type}"
    if isinstance(v, (list, np.ndarray)):
        if len(v) > 8:
            return f"array of {len(v)} items"
        v = v.tolist() if isinstance(v, np.ndarray) else v
    r = repr(v)
    return r if len(r) <= n else r[:n] + "…"


class _Model:
    def __init__(self, g: GGUFFile) -> None:
        self.g, self.md = g, g.metadata
        self.tensors = {t.name: t for t in g.tensors}

    def fail(self, what: str, fix: str = FIX) -> GGUFFormatError:
        return GGUFFormatError(f"{self.g.path}: {what}; {fix}")

    def bad(self, key: str, found: Any, expected: str) -> GGUFFormatError:
        return self.fail(f"metadata {key} = {_cap(found)}, expected {expected}")

    # --- typed metadata, as llama.cpp's loader reads it (a wrong type is an error there too)

    def vtype(self, key: str) -> int:
        return self.g.types[key][0]

    def u32(self, key: str, required: bool = False) -> int | None:
        if key not in self.md:
            if required:
                raise self.fail(f"metadata {key} is missing (llama.cpp requires it)")
            return None
        v = self.md[key]
        if self.vtype(key) != VT.UINT32:
            raise self.bad(key, v, f"a UINT32 (found type {_vt(self.vtype(key))})")
        return int(v)

    def f32(self, key: str) -> float | None:
        if key not in self.md:
            return None
        v = self.md[key]
        if self.vtype(key) != VT.FLOAT32:
            raise self.bad(key, v, f"a FLOAT32 (found type {_vt(self.vtype(key))})")
        if not np.isfinite(v):
            raise self.bad(key, v, "a finite number")
        return float(v)

    def string(self, key: str, required: bool = False) -> str | None:
        if key not in self.md:
            if required:
                raise self.fail(f"metadata {key} is missing (llama.cpp requires it)")
            return None
        if self.vtype(key) != VT.STRING:
            raise self.bad(key, self.md[key], f"a STRING (found type {_vt(self.vtype(key))})")
        return str(self.md[key])

    def per_layer(self, key: str, n_layer: int, default: tuple[int, ...]) -> tuple[int, ...]:
        """llama.cpp's ``get_key_or_arr``: a UINT32 for every layer, or an INT32/UINT32/BOOL array of ``n_layer`` items."""
        if key not in self.md:
            return default
        v, (vtype, sub) = self.md[key], self.g.types[key]
        if vtype == VT.UINT32:
            return (int(v),) * n_layer
        if vtype != VT.ARRAY or sub not in (VT.UINT32, VT.INT32, VT.BOOL):
            raise self.bad(key, v, "a UINT32 or an array of per-layer integers")
        n = v.count if isinstance(v, ArraySummary) else len(v)
        if n != n_layer or isinstance(v, ArraySummary):
            raise self.bad(key, v, f"one value per layer ({n_layer} of them, the block count)")
        values = tuple(int(x) for x in v)
        if min(values, default=0) < 0:
            raise self.bad(key, v, "counts of zero or more")
        return values

    # --- the checks

    def check(self) -> None:
        arch = self.string("general.architecture", required=True)
        assert arch is not None
        p = arch + "."
        for k in U32_KEYS:
            self.u32(p + k)
        for k in F32_KEYS:
            self.f32(p + k)
        n_layer = self.u32(p + "block_count", required=True)
        assert n_layer is not None
        if not 1 <= n_layer <= LLAMA_MAX_LAYERS:
            raise self.bad(p + "block_count", n_layer, f"1..{LLAMA_MAX_LAYERS} layers")
        nextn = self.u32(p + "nextn_predict_layers") or 0
        if nextn > n_layer:
            raise self.bad(p + "nextn_predict_layers", nextn, f"at most the block count {n_layer}")
        if not self.u32(p + "context_length", required=True):
            raise self.bad(p + "context_length", 0, "a positive number of tokens")
        n_embd = self.u32(p + "embedding_length", required=True)
        if not n_embd:
            raise self.bad(p + "embedding_length", 0, "a positive width")
        heads = self.per_layer(p + "attention.head_count", n_layer, (0,) * n_layer)
        kv_heads = self.per_layer(p + "attention.head_count_kv", n_layer, heads)
        self.per_layer(p + "feed_forward_length", n_layer, (0,) * n_layer)
        for il, (h, kv) in enumerate(zip(heads, kv_heads)):
            if h and kv and h % kv:  # grouped-query attention shares each KV head between a whole number of query heads
                raise self.fail(f"layer {il}: {h} attention heads ({p}attention.head_count) are not a multiple of {kv} KV heads ({p}attention.head_count_kv)")
        if heads[0] and self.u32(p + "attention.key_length") is None and n_embd % heads[0]:
            raise self.fail(f"metadata {p}embedding_length {n_embd} is not a multiple of {p}attention.head_count {heads[0]} (and no {p}attention.key_length says the head size)")
        rope = self.string(p + "rope.scaling.type")
        if rope is not None and rope not in ROPE_SCALING_TYPES:
            raise self.bad(p + "rope.scaling.type", rope, f"one of {', '.join(ROPE_SCALING_TYPES)}")
        n_expert = self._check_experts(p, n_layer)
        n_vocab = self._check_vocab()
        self._check_tensors(n_layer, n_expert, n_vocab)
        if arch == "llama":
            _Llama(self, n_layer, n_embd, heads, kv_heads, n_expert, n_vocab).check()

    def _check_experts(self, p: str, n_layer: int) -> int:
        """llama.cpp's asserts in load_hparams: each one a process abort."""
        n_expert = self.u32(p + "expert_count") or 0
        if n_expert > LLAMA_MAX_EXPERTS:
            raise self.bad(p + "expert_count", n_expert, f"at most {LLAMA_MAX_EXPERTS} experts")
        used = max(self.per_layer(p + "expert_used_count", n_layer, (0,)), default=0)
        groups, group_used = self.u32(p + "expert_group_count") or 0, self.u32(p + "expert_group_used_count") or 0
        if used > n_expert:
            raise self.fail(f"metadata {p}expert_used_count = {used} is more than {p}expert_count = {n_expert}")
        if n_expert == 0:
            if groups:
                raise self.fail(f"metadata {p}expert_group_count = {groups} in a model without experts ({p}expert_count = 0)")
            return 0
        if used == 0:
            raise self.fail(f"metadata {p}expert_used_count is {'missing' if p + 'expert_used_count' not in self.md else 0} in a model with {n_expert} experts; expected 1..{n_expert}")
        if groups >= n_expert:
            raise self.bad(p + "expert_group_count", groups, f"fewer than the {n_expert} experts")
        if groups > 1 and (n_expert % groups or not 0 < group_used < groups):
            raise self.fail(f"metadata {p}expert_group_count = {groups}, {p}expert_group_used_count = {group_used}: expected a divisor of {n_expert} experts and 1..{groups - 1} groups used")
        return n_expert

    def _check_vocab(self) -> int | None:
        """The token list llama-vocab.cpp builds: distinct strings (two equal ones abort), scores and types for each."""
        key = "tokenizer.ggml.tokens"
        model = self.string("tokenizer.ggml.model", required=True)
        if model not in TOKENIZERS:
            raise self.bad("tokenizer.ggml.model", model, f"a tokenizer llama.cpp knows ({', '.join(TOKENIZERS)})")
        if model in NO_VOCAB:
            return None
        if key not in self.md:
            raise self.fail(f"metadata {key} is missing (no vocabulary)")
        tokens, (vtype, sub) = self.md[key], self.g.types[key]
        if vtype != VT.ARRAY or sub != VT.STRING:
            raise self.bad(key, tokens, "an array of strings")
        if isinstance(tokens, ArraySummary):  # longer than read_gguf's MAX_KEEP
            raise self.bad(key, tokens, f"at most {MAX_VOCAB} tokens")
        n = len(tokens)
        if not 1 <= n <= MAX_VOCAB:
            raise self.bad(key, tokens, f"1..{MAX_VOCAB} tokens")
        if len(set(tokens)) != n or any(not t or "\0" in t for t in tokens):
            self._find_equal_tokens(key, tokens)
        if model == "llama":
            self._check_byte_tokens(key, tokens)
        for k, types in (("tokenizer.ggml.scores", (VT.FLOAT32, VT.INT32)), ("tokenizer.ggml.token_type", (VT.INT32,))):
            if k in self.md:
                v, (vt, st) = self.md[k], self.g.types[k]
                count = v.count if isinstance(v, ArraySummary) else len(v) if isinstance(v, (list, np.ndarray)) else -1
                if vt != VT.ARRAY or st not in types or count < n:
                    raise self.bad(k, v, f"an array of {' or '.join(_vt(t) for t in types)} with one item per token ({n})")
        for s in SPECIAL_IDS:
            tid = self.u32(f"tokenizer.ggml.{s}_token_id")
            if tid is not None and tid >= n:
                raise self.bad(f"tokenizer.ggml.{s}_token_id", tid, f"a token id below the vocabulary size {n}")
        return n

    def _find_equal_tokens(self, key: str, tokens: list[str]) -> None:
        """The first two tokens llama.cpp takes for the same one (it aborts): equal strings, or equal up to a NUL."""
        seen: dict[str, int] = {}
        for i, t in enumerate(tokens):
            t = t.split("\0", 1)[0] or f"[EMPTY_{i}]"  # llama.cpp reads a token as a C string; an empty one gets this name
            j = seen.setdefault(t, i)
            if j != i:
                raise self.fail(f"metadata {key}: tokens {j} and {i} are both {_cap(t)} (llama.cpp aborts on a vocabulary with equal tokens)")

    def _check_byte_tokens(self, key: str, tokens: list[str]) -> None:
        """llama.cpp's SPM tokenizer spells a piece it has no token for in byte tokens, ``<0xXX>`` (or the byte itself);
        a byte with neither throws inside llama_tokenize and aborts the process on the first text that needs it."""
        have = set(tokens)
        for b in range(256):
            if f"<0x{b:02X}>" not in have and bytes([b]).decode("utf-8", "surrogateescape") not in have:
                raise self.fail(f"metadata {key}: no token for byte 0x{b:02X} ('<0x{b:02X}>'), which llama.cpp's SPM tokenizer "
                                "(tokenizer.ggml.model 'llama') needs for text outside the vocabulary")

    def _check_tensors(self, n_layer: int, n_expert: int, n_vocab: int | None) -> None:
        if not self.g.tensors:
            raise self.fail("the file holds no tensors")
        for t in self.g.tensors:
            if 0 in t.ne:
                raise self.fail(f"tensor {t.name!r} has a zero-sized dimension (shape {list(t.ne)})")
            if t.qtype in NOT_WEIGHT_TYPES:
                raise self.fail(f"tensor {t.name!r} is stored as {t.qtype.name}, a type llama.cpp cannot compute with (it crashes); expected a float or quantised type")
            if (len(t.ne) == 1 or t.name.endswith("_norm.weight")) and t.qtype != _Q.F32:
                raise self.fail(f"tensor {t.name!r} is stored as {t.qtype.name}; llama.cpp applies norms, biases and other 1-D tensors "
                                "in F32 only (it aborts on anything else)")
            block = _spec.block_of(t.name)
            if block is not None and block >= n_layer:
                raise self.fail(f"tensor {t.name!r} is in block {block}, but the block count is {n_layer}")
            if _EXPS.match(t.name):
                if n_expert == 0:
                    raise self.fail(f"tensor {t.name!r} holds experts, but the model declares none (expert_count)")
                if len(t.ne) != 3 or t.ne[2] != n_expert:
                    raise self.fail(f"tensor {t.name!r} has shape {list(t.ne)}, expected {n_expert} experts stacked in its last dimension (expert_count)")
            if _ROUTER.match(t.name) and (len(t.ne) != 2 or t.ne[1] != n_expert):
                raise self.fail(f"tensor {t.name!r} has shape {list(t.ne)}, expected one router row per expert ({n_expert}, expert_count)")
        if n_vocab is not None:
            for name in ("token_embd.weight", "output.weight"):
                t = self.tensors.get(name)
                if t is not None and len(t.ne) == 2 and t.ne[1] != n_vocab:
                    raise self.fail(f"tensor {name!r} has {t.ne[1]} rows but tokenizer.ggml.tokens has {n_vocab} tokens (one row per token)")


class _Llama:
    """The tensors ``src/models/llama.cpp`` loads, with the shapes it expects (ggml order: row length first)."""

    def __init__(self, m: _Model, n_layer: int, n_embd: int, heads: tuple[int, ...], kv_heads: tuple[int, ...], n_expert: int, n_vocab: int | None) -> None:
        self.m, self.n_layer, self.n_embd, self.n_expert, self.n_vocab = m, n_layer, n_embd, n_expert, n_vocab
        self.heads, self.kv_heads = heads, kv_heads

    def check(self) -> None:
        m, p = self.m, "llama."
        for key, values in ((p + "attention.head_count", self.heads), (p + "attention.head_count_kv", self.kv_heads)):
            if len(set(values)) != 1 or values[0] == 0:
                raise m.bad(key, m.md.get(key), "the same positive count for every layer (the llama architecture)")
        ff = m.per_layer(p + "feed_forward_length", self.n_layer, (0,))
        if len(set(ff)) != 1 or ff[0] == 0:
            raise m.bad(p + "feed_forward_length", m.md.get(p + "feed_forward_length"), "the same positive width for every layer")
        if m.f32(p + "attention.layer_norm_rms_epsilon") is None:
            raise m.fail(f"metadata {p}attention.layer_norm_rms_epsilon is missing (llama.cpp requires it)")
        n_head, n_head_kv, n_ff = self.heads[0], self.kv_heads[0], ff[0]

        def size(key: str, default: int) -> int:
            value = m.u32(p + key)
            if value == 0:
                raise m.bad(p + key, 0, "a positive size")
            return default if value is None else value

        head_k = size("attention.key_length", self.n_embd // n_head)
        head_v = size("attention.value_length", self.n_embd // n_head)  # llama.cpp's default, whatever key_length says
        n_rot = size("rope.dimension_count", head_k)
        if not head_k == head_v == n_rot:  # llama.cpp: a load error for n_rot, an abort in the graph for the rest
            raise m.fail(f"metadata {p}attention.key_length {head_k}, value_length {head_v} and rope.dimension_count {n_rot} differ; the llama architecture needs one head size")
        e = self.n_embd
        embd = m.tensors.get("token_embd.weight")
        v = self.n_vocab if self.n_vocab is not None else embd.ne[-1] if embd is not None else 0  # no token list: vocab_size rows
        want: dict[str, tuple[tuple[int, ...], bool]] = {  # name -> (shape, required)
            "token_embd.weight": ((e, v), True), "output_norm.weight": ((e,), True), "output.weight": ((e, v), False),
            "rope_freqs.weight": ((n_rot // 2,), False),
        }
        fused = any(f"blk.{il}.attn_qkv.weight" in m.tensors for il in range(self.n_layer))
        q, k, vv = n_head * head_k, n_head_kv * head_k, n_head_kv * head_v
        for il in range(self.n_layer):
            b = f"blk.{il}."
            want[b + "attn_norm.weight"] = ((e,), True)
            if fused:
                want[b + "attn_qkv.weight"] = ((e, q + k + vv), True)
            else:
                want.update({b + "attn_q.weight": ((e, q), True), b + "attn_k.weight": ((e, k), True), b + "attn_v.weight": ((e, vv), True)})
            want[b + "attn_output.weight"] = ((q, e), True)
            want[b + "ffn_norm.weight"] = ((e,), True)
            if self.n_expert == 0:
                want.update({b + "ffn_gate.weight": ((e, n_ff), True), b + "ffn_up.weight": ((e, n_ff), True), b + "ffn_down.weight": ((n_ff, e), True)})
            else:
                x = self.n_expert
                want.update({b + "ffn_gate_inp.weight": ((e, x), True), b + "ffn_gate_exps.weight": ((e, n_ff, x), False),
                             b + "ffn_up_exps.weight": ((e, n_ff, x), True), b + "ffn_down_exps.weight": ((n_ff, e, x), True)})
        for name, (shape, required) in want.items():
            t = m.tensors.get(name)
            if t is None:
                if required:
                    raise m.fail(f"tensor {name!r} is missing (the llama architecture needs it for block count {self.n_layer}, expert count {self.n_expert})")
                continue
            if t.ne != shape:
                raise m.fail(f"tensor {name!r} has shape {list(t.ne)}, expected {list(shape)} from the metadata (embedding_length, head counts, feed_forward_length, expert_count, vocabulary)")
        for t in m.g.tensors:
            if not _llama_loads(t, want):
                raise m.fail(f"tensor {t.name!r} is not one llama.cpp's llama architecture loads (it refuses the file)")


_OPTIONAL = re.compile(r"^(?:blk\.\d+\.)?[a-z_]+\.(bias|scale)$|^rope_factors_(long|short)\.weight$")


def _llama_loads(t: TensorInfo, want: dict[str, Any]) -> bool:
    """A tensor the llama loader creates: a weight checked above, or an optional bias, scale or long-RoPE factor."""
    return t.name in want or bool(_OPTIONAL.match(t.name))


def _vt(vtype: int) -> str:
    return VT(vtype).name if vtype in VT._value2member_map_ else str(vtype)
