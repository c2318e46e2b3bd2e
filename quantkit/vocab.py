"""Tokenizer files of an HF model directory -> GGUF ``tokenizer.*`` metadata.

Two families, as llama.cpp reads them:

* SentencePiece (``tokenizer.model``): ``tokenizer.ggml.model = llama``; tokens,
  scores and token types (normal, unknown, control, user-defined, unused, byte)
  straight from the SentencePiece model.
* byte-level BPE (``tokenizer.json`` with a BPE model and ByteLevel
  pre-tokenizer): ``tokenizer.ggml.model = gpt2``; tokens, merges and the
  pre-tokenizer name llama.cpp uses to pick its split regex.

Special tokens (bos/eos/unk/pad), add_bos/add_eos and the chat template come
from ``tokenizer_config.json`` (falling back to config.json's ids).

Not for: running a tokenizer (llama.cpp and the reference libraries do that).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from quantkit import gguf_spec
from quantkit.errors import CheckpointError
from quantkit.gguf_write import MetaValue

TT = gguf_spec.TokenType
V = gguf_spec.GGUFValueType
K = gguf_spec.Keys.Tokenizer

#: tokenizer.json pre-tokenizer regexes -> llama.cpp ``tokenizer.ggml.pre`` names.
LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
KNOWN_SPLIT_REGEXES: dict[str, str] = {LLAMA3_REGEX: "llama-bpe"}


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


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); fix: restore the original file") from None


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
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


def read_sentencepiece(data: bytes) -> tuple[list[str], list[float], list[int], bool]:
    """Pieces, scores, token types and whether a space is prepended, from a serialised SentencePiece ``ModelProto``.

    What ``SentencePieceProcessor``'s ``id_to_piece`` / ``get_score`` / ``is_*`` give, read straight from
    the protobuf wire format (sentencepiece's own loader costs an import and a model build; a
    32k vocabulary is ~0.1 s through its per-id calls).  Space prefix: ``add_dummy_prefix``
    (default true) unless ``treat_whitespace_as_suffix``.  Raises ValueError on a malformed message.
    """
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    dummy_prefix, suffix = True, False
    for field, value in _proto_fields(data, 0, len(data)):
        if field == 1 and isinstance(value, tuple):  # ModelProto.pieces
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
    try:
        tokens, scores, raw_types, adds_prefix = read_sentencepiece(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid SentencePiece model ({e}); fix: restore tokenizer.model") from None
    types: list[Any] = list(raw_types)
    for tid, (content, special) in sorted(added.items()):
        if tid < len(tokens):
            types[tid] = TT.CONTROL if special else TT.USER_DEFINED
            continue
        while len(tokens) < tid:
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-1000.0)
            types.append(TT.UNUSED)
        tokens.append(content)
        scores.append(0.0)
        types.append(TT.CONTROL if special else TT.USER_DEFINED)
    _pad(tokens, types, n_vocab, path, scores)
    return Vocab("llama", "default", tokens, scores, [int(t) for t in types], None, str(path), adds_prefix)


def _pad(tokens: list[str], types: list[int], n_vocab: int, path: Path, scores: list[float] | None = None) -> None:
    if len(tokens) > n_vocab:
        raise CheckpointError(f"{path}: {len(tokens)} tokens, but config.json vocab_size = {n_vocab}; fix: use the tokenizer that belongs to this model")
    while len(tokens) < n_vocab:  # embedding rows beyond the tokenizer: never produced
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(TT.UNUSED)
        if scores is not None:
            scores.append(-1000.0)


def _bpe_pre(tj: dict[str, Any], path: Path) -> str:
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if "ByteLevel" not in kinds:
        raise CheckpointError(f"{path}: pre_tokenizer {kinds} has no ByteLevel step; only byte-level BPE tokenizer.json files are supported; fix: provide tokenizer.model for SentencePiece models")
    splits = [s for s in steps if s.get("type") == "Split"]
    if not splits:
        bl = next(s for s in steps if s.get("type") == "ByteLevel")
        if bl.get("use_regex", True):
            return "gpt-2"
        raise CheckpointError(f"{path}: ByteLevel pre-tokenizer without a split regex is not supported; fix: use a tokenizer with a known pre-tokenizer")
    regex = (splits[0].get("pattern") or {}).get("Regex", "")
    if regex in KNOWN_SPLIT_REGEXES:
        return KNOWN_SPLIT_REGEXES[regex]
    raise CheckpointError(f"{path}: unknown pre-tokenizer split regex {regex[:60]!r}...; fix: use a tokenizer whose pre-tokenizer llama.cpp knows (gpt-2, llama-bpe)")


def bpe_vocab(path: Path, n_vocab: int) -> Vocab:
    tj = _load_json(path)
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise CheckpointError(f"{path}: model.type is {model.get('type')!r}, expected 'BPE' with a vocab; fix: provide tokenizer.model for SentencePiece models")
    pre = _bpe_pre(tj, path)
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    special: dict[int, bool] = {}
    for at in tj.get("added_tokens") or []:
        by_id[int(at["id"])] = at["content"]
        special[int(at["id"])] = bool(at.get("special"))
    size = max(by_id) + 1 if by_id else 0
    tokens, types = [], []
    for i in range(size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(TT.CONTROL if special.get(i) else TT.USER_DEFINED if i in special else TT.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TT.UNUSED)
    _pad(tokens, types, n_vocab, path)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return Vocab("gpt2", pre, tokens, None, [int(t) for t in types], merges, str(path))


def load_vocab(root: Path, n_vocab: int) -> tuple[Vocab, dict[str, Any]]:
    """Read the tokenizer of a model directory; SentencePiece wins when both exist."""
    cfg_path = root / "tokenizer_config.json"
    tcfg = _load_json(cfg_path) if cfg_path.is_file() else {}
    added: dict[int, tuple[str, bool]] = {}
    for tid, info in (tcfg.get("added_tokens_decoder") or {}).items():
        if isinstance(info, dict) and "content" in info:
            added[int(tid)] = (info["content"], bool(info.get("special", True)))
    if (root / "tokenizer.model").is_file():
        return sentencepiece_vocab(root / "tokenizer.model", n_vocab, added), tcfg
    if (root / "tokenizer.json").is_file():
        return bpe_vocab(root / "tokenizer.json", n_vocab), tcfg
    raise CheckpointError(f"{root}: no tokenizer.model or tokenizer.json; fix: copy the model's tokenizer files into the directory")


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
        tid = index.get(_token_str(tcfg.get(f"{role}_token")) or "\0")
        if tid is None and cfg_key is not None:
            raw = config.get(cfg_key)
            tid = raw[0] if isinstance(raw, list) and raw else raw
        if isinstance(tid, int) and 0 <= tid < len(vocab.tokens):
            md[key] = MetaValue(tid, V.UINT32)
    add_bos = tcfg.get("add_bos_token", vocab.model == "llama")
    md[K.ADD_BOS] = MetaValue(bool(add_bos), V.BOOL)
    md[K.ADD_EOS] = MetaValue(bool(tcfg.get("add_eos_token", False)), V.BOOL)
    if vocab.model == "llama":
        md[K.ADD_PREFIX] = MetaValue(vocab.adds_space_prefix, V.BOOL)
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # named templates: keep the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if isinstance(template, str) and template:
        md[K.CHAT_TEMPLATE] = MetaValue(template, V.STRING)
    return md
