"""What llama.cpp assumes of a model GGUF, checked before llama.cpp loads it (or quantkit requantises it).

llama.cpp checks the container (``quantkit.format.gguf_read`` restates those rules) but
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
  ``output`` have rows (with byte tokens for an SPM vocabulary, merges for a BPE one, and
  never "no vocabulary": llama.cpp aborts on the first text it tokenises), no empty tensor,
  F32 norms and 1-D tensors holding finite numbers, no tensor in a type llama.cpp cannot
  compute with; float hyperparameters finite and in the range llama.cpp computes with
  (:data:`F32_RANGES`: a negative epsilon aborts, a RoPE base <= 0 gives NaN), a context
  length llama-cpp-python can read (int32); the file laid out as every GGUF writer lays it
  out (zero padding, nothing after the last tensor's padding: a tensor count lowered in
  the header is read by llama.cpp without a word);
- the ``llama`` architecture (Mixtral, Mistral, Llama: what quantkit converts):
  every tensor llama.cpp loads present with the shape it expects, nothing else.

:func:`check_before_load` also makes an abort that still happens inside llama.cpp
say why (:func:`quantkit.format.ggml.install_abort_message`).  A split set is checked
as the one model llama.cpp loads from its first part (the layout rules part by part).

Not for: the container format (``quantkit.format.gguf_read``), running models (``quantkit.engine.runtime``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.errors import GGUFFormatError
from quantkit.format.gguf_read import ArraySummary, GGUFFile, TensorInfo, read_gguf
from quantkit.format import gguf_spec as _spec
from quantkit.format.gguf_spec import GGMLQuantizationType
from quantkit.format.gguf_spec import GGUFValueType as VT

LLAMA_MAX_LAYERS = 512  # llama-hparams.h
LLAMA_MAX_EXPERTS = 1024
MAX_VOCAB = 1 << 22  # token ids are int32; real vocabularies hold up to a few 100k tokens
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # llama-model.cpp LLAMA_ROPE_SCALING_TYPES
#: tokenizer.ggml.model values llama.cpp loads as "no vocabulary": it then aborts (GGML_ASSERT "Tokenizer not
#: initialized") on the first text it tokenises, and every quantkit use of a model tokenises text
NO_VOCAB = ("no_vocab", "none")
TOKENIZERS = ("llama", "bert", "gpt2", "hybriddna", "whitespace", "t5", "rwkv", "plamo2", "gemma4")  # llama-vocab.cpp load()
BPE_MERGES = ("gpt2", "hybriddna", "whitespace", "gemma4")  # need tokenizer.ggml.merges ("cannot find tokenizer merges")
MAX_INT32 = 2**31 - 1  # llama-cpp-python reads n_ctx_train and n_embd as int32: a larger UINT32 turns negative there
FIX = "fix: re-convert the model with quantkit convert (or re-download it)"
#: keys llama.cpp reads per layer: one UINT32 for all layers, or an array of block_count ints
PER_LAYER = ("attention.head_count", "attention.head_count_kv", "feed_forward_length", "expert_used_count")
U32_KEYS = ("attention.key_length", "attention.value_length", "rope.dimension_count", "vocab_size", "expert_group_count",
            "expert_group_used_count", "nextn_predict_layers", "rope.scaling.original_context_length", "attention.sliding_window")
#: FLOAT32 hyperparameters llama.cpp reads for the architectures quantkit writes (llama-model.cpp load_hparams and
#: src/models/{llama,qwen2moe,qwen3moe,olmoe,granite-moe}.cpp) -> the values it computes sensibly with.  Out of range,
#: it aborts (a negative epsilon: GGML_ASSERT(eps >= 0)) or computes NaN or garbage logits without a word.
#: Every other float under "{arch}." must at least be finite.  key -> (rule, expected, architectures: None for all)
GRANITE = ("granite", "granitemoe", "granitehybrid")
F32_RANGES: dict[str, tuple[str, str, tuple[str, ...] | None]] = {
    "attention.layer_norm_rms_epsilon": (">=0", "a finite epsilon >= 0", None),
    "attention.layer_norm_epsilon": (">=0", "a finite epsilon >= 0", None),
    "rope.freq_base": (">0", "a finite RoPE base > 0 (e.g. 10000.0)", None),
    "rope.freq_base_swa": (">0", "a finite RoPE base > 0 (e.g. 10000.0)", None),
    "rope.scaling.factor": (">=0", "a finite factor > 0 (0 means no scaling to llama.cpp)", None),
    "rope.scale_linear": (">=0", "a finite factor > 0 (0 means no scaling to llama.cpp)", None),
    "rope.scaling.attn_factor": (">0", "a finite factor > 0 (1.0 by default)", None),
    "logit_scale": (">0", "a finite scale > 0 (llama.cpp divides the logits by it)", GRANITE),
    "embedding_scale": (">=0", "a finite scale > 0 (0 means none to llama.cpp)", GRANITE),
    "residual_scale": (">=0", "a finite scale > 0 (0 means none to llama.cpp)", GRANITE),
    "attention.scale": (">=0", "a finite scale > 0 (0 means 1/sqrt(head size) to llama.cpp)", GRANITE),
}
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
    from quantkit.format import ggml

    g = read_gguf(path, keep=keep_key)
    check_model(g)
    ggml.prepare_llama()
    return g


def layout_problem(g: GGUFFile) -> str | None:
    """What is wrong with the bytes around the tensor data (see ``_Model._check_layout``), or None: for ``inspect``,
    which shows such a file (llama.cpp's GGUF library reads it) but says why run/eval/convert refuse it."""
    try:
        _Model(g)._check_layout()
    except GGUFFormatError as e:
        return str(e)
    return None


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

    def f32(self, key: str, rule: str = "", expected: str = "a finite number") -> float | None:
        """A FLOAT32 hyperparameter: finite, and ``> 0`` / ``>= 0`` per ``rule``."""
        if key not in self.md:
            return None
        v = self.md[key]
        if self.vtype(key) != VT.FLOAT32:
            raise self.bad(key, v, f"a FLOAT32 (found type {_vt(self.vtype(key))})")
        x = float(v)
        if not np.isfinite(x) or (rule == ">0" and not x > 0) or (rule == ">=0" and not x >= 0):
            raise self.bad(key, v, expected)
        return x

    def floats_finite(self, prefix: str) -> None:
        """Every FLOAT32 / FLOAT64 scalar under ``prefix`` finite: no hyperparameter is meant to be NaN or infinity."""
        for key, (vtype, _) in self.g.types.items():
            if key.startswith(prefix) and vtype in (VT.FLOAT32, VT.FLOAT64) and not np.isfinite(float(self.md[key])):
                raise self.bad(key, self.md[key], "a finite number")

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
        for k, (rule, expected, archs) in F32_RANGES.items():
            self.f32(p + k, rule if archs is None or arch in archs else "", expected)
        self.floats_finite(p)
        n_layer = self.u32(p + "block_count", required=True)
        assert n_layer is not None
        if not 1 <= n_layer <= LLAMA_MAX_LAYERS:
            raise self.bad(p + "block_count", n_layer, f"1..{LLAMA_MAX_LAYERS} layers")
        nextn = self.u32(p + "nextn_predict_layers") or 0
        if nextn > n_layer:
            raise self.bad(p + "nextn_predict_layers", nextn, f"at most the block count {n_layer}")
        n_ctx_train = self.u32(p + "context_length", required=True)
        if not n_ctx_train or n_ctx_train > MAX_INT32:
            raise self.bad(p + "context_length", n_ctx_train, f"a positive number of tokens up to {MAX_INT32}")
        n_embd = self.u32(p + "embedding_length", required=True)
        if not n_embd or n_embd > MAX_INT32:
            raise self.bad(p + "embedding_length", n_embd, f"a positive width up to {MAX_INT32}")
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
        self._check_layout()
        self._check_vectors_finite()
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
        if model in NO_VOCAB:
            raise self.fail(f"metadata tokenizer.ggml.model = {_cap(model)}: a model without a vocabulary, which llama.cpp cannot "
                            "tokenise text for (it aborts on the first text)", "fix: re-convert the model with its tokenizer (quantkit convert)")
        if model not in TOKENIZERS:
            raise self.bad("tokenizer.ggml.model", model, f"a tokenizer llama.cpp knows ({', '.join(TOKENIZERS)})")
        if model in BPE_MERGES and not (model != "gemma4" and self.md.get("tokenizer.ggml.pre") == "kimi-k2"):
            merges = "tokenizer.ggml.merges"
            if merges not in self.md:
                raise self.fail(f"metadata {merges} is missing (llama.cpp's BPE tokenizer, tokenizer.ggml.model {_cap(model)}, needs its merges)")
            if self.g.types[merges] != (VT.ARRAY, VT.STRING):
                raise self.bad(merges, self.md[merges], "an array of strings")
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
            if t.qtype in NOT_WEIGHT_TYPES and not (t.qtype == _Q.I32 and t.name.endswith(".ffn_gate_tid2eid.weight")):  # hash routing: I32 ids
                raise self.fail(f"tensor {t.name!r} is stored as {t.qtype.name}, a type llama.cpp cannot compute with (it crashes); expected a float or quantised type")
            if (len(t.ne) == 1 or t.name.endswith("_norm.weight")) and t.qtype != _Q.F32:
                raise self.fail(f"tensor {t.name!r} is stored as {t.qtype.name}; llama.cpp applies norms, biases and other 1-D tensors "
                                "in F32 only (it aborts on anything else)")
            if t.name.endswith(".ssm_conv1d.weight") and t.qtype != _Q.F32:
                raise self.fail(f"tensor {t.name!r} is stored as {t.qtype.name}; llama.cpp's short convolution of linear-attention "
                                "blocks takes an F32 kernel only (it aborts on anything else)")
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


    def _check_layout(self) -> None:
        """The bytes around the tensor data, as every GGUF writer lays them out (gguf.cpp, gguf-py's GGUFWriter, quantkit):
        zeros from the end of the tensor table to the aligned data section, and after the last tensor's data nothing but
        its zero padding to the alignment (accepted shorter or absent).  A tensor count lowered by one in the header leaves
        the table's last entry in the header padding (or shifts the data section): llama.cpp reads the file all the same,
        without that tensor (a missing output.weight becomes the tied embeddings) or with every tensor shifted."""
        for g in self.g.files:  # each part of a split set is a file of its own
            self._check_file_layout(g)

    def _check_file_layout(self, g: GGUFFile) -> None:
        if not g.table_end or not g.tensors or not g.file_size:
            return
        n = len(g.tensors)
        count = f"the header's tensor count ({n}) may be lower than the tensors the file holds"
        end = g.data_offset + max(t.offset + t.nbytes for t in g.tensors)
        padded = -(-end // g.alignment) * g.alignment
        fail = self.fail if g is self.g else lambda what, fix: GGUFFormatError(f"{g.path}: {what}; {fix}")
        if g.file_size > padded:
            raise fail(f"{g.file_size - end} bytes follow the data of the last tensor (at most {padded - end} bytes of padding "
                       f"expected; {count}, or data was appended)", "fix: re-download the file or re-convert it")
        for start, stop, what in ((g.table_end, g.data_offset, "between the tensor table and the tensor data"),
                                  (end, g.file_size, "after the last tensor's data")):
            at = _first_nonzero(g.path, start, stop)
            if at is not None:
                raise fail(f"the padding {what} (bytes {start}..{stop - 1}) is not zeros (byte {at}); {count}",
                           "fix: re-download the file or re-convert it")


    def _check_vectors_finite(self) -> None:
        """Norms, biases and the other 1-D tensors (F32, a few KB each) hold finite numbers.  A NaN there does not
        always give NaN logits: ggml rounds the NaN activations it quantises for a quantised matmul to integers, and
        llama.cpp then computes finite garbage (the big matrices are not read: that would be the whole file)."""
        g = self.g
        if not g.file_size:
            return
        block = 1 << 22  # bytes read at a time: a hostile file may declare one huge 1-D tensor
        opened: dict[Path, Any] = {}
        try:
            for t in g.tensors:
                if len(t.ne) != 1 or t.qtype != _Q.F32:
                    continue
                path, start = g.locate(t)  # a split set: the part that holds it
                f = opened.get(path) or opened.setdefault(path, open(path, "rb"))
                f.seek(start)
                for first in range(0, t.nbytes, block):
                    x = np.frombuffer(f.read(min(block, t.nbytes - first)), dtype="<f4")
                    bad = np.flatnonzero(~np.isfinite(x))
                    if bad.size:
                        at = first // 4 + int(bad[0])
                        where = "" if path == g.path else f" (in {path.name})"
                        raise self.fail(f"tensor {t.name!r}{where} holds non-finite values (first at index {at}: {x[bad[0]]}); "
                                        "llama.cpp computes garbage or NaN logits from it", "fix: re-download the file or re-convert it")
        finally:
            for f in opened.values():
                f.close()


def _first_nonzero(path: Path, start: int, stop: int, block: int = 1 << 20) -> int | None:
    """Offset of the first non-zero byte of ``path[start:stop]``, or None."""
    with open(path, "rb") as f:
        f.seek(start)
        while start < stop:
            chunk = f.read(min(block, stop - start))
            if not chunk:
                return None
            nz = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8))
            if nz.size:
                return start + int(nz[0])
            start += len(chunk)
    return None


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
