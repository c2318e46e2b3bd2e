"""llama.cpp tokenises like the reference tokenizer libraries.

SentencePiece models are compared with the ``sentencepiece`` library (the
ground truth; transformers' fast Llama tokenizer differs on leading spaces),
byte-level BPE models with ``tokenizers``.
"""

from __future__ import annotations

import json

import pytest

from conftest import FIXTURE, convert, random_model, sp_ids

TEXTS = [
    "Hello world",
    " x = 1",
    "\nleading newline",
    "two  spaces,   three   and\ttabs\t\t",
    "lines\n\n\nblank lines\r\nand CRLF",
    "digits 1234567890 and 3.14159, 2026-11-23",
    "unicode: café naïve Ærø — “quotes” 你好 🙂 ß",
    "   ",
    "",
    "KING. O, my offence is rank, it smells to heaven;",
]


def _llama(path):
    from llama_cpp import Llama

    return Llama(str(path), vocab_only=True, verbose=False)


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_fixture_matches_sentencepiece(fixture_gguf, text):
    llm = _llama(fixture_gguf("q8_0"))
    assert llm.tokenize(text.encode(), add_bos=True, special=False) == sp_ids(FIXTURE, text)


def test_sentencepiece_special_tokens(fixture_gguf):
    """With special=True, <s> and </s> in text become BOS/EOS; the text between is tokenised as usual."""
    llm = _llama(fixture_gguf("q8_0"))
    got = llm.tokenize(b"<s>[INST] Who art thou? [/INST]</s>", add_bos=False, special=True)
    assert got == sp_ids(FIXTURE, "[INST] Who art thou? [/INST]") + [2]
    literal = llm.tokenize(b"<s>x</s>", add_bos=False, special=False)
    assert 1 not in literal and 2 not in literal  # without special=True they are plain text
    assert llm.token_bos() == 1 and llm.token_eos() == 2


def _train_bpe(path, kind: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if kind == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:  # llama-bpe: Llama 3's split regex, then bytes
        from quantkit.vocab import LLAMA3_REGEX

        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|begin|>", "<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    from quantkit.evals.corpora import shakespeare

    tok.train_from_iterator([shakespeare().train_text[:300_000], *TEXTS], trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"bos_token": "<|begin|>", "eos_token": "<|end|>", "add_bos_token": False, "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tok


@pytest.mark.parametrize("kind", ["gpt-2", "llama-bpe"])
def test_byte_level_bpe_matches_tokenizers(tmp_path, kind):
    tok_dir = tmp_path / "tok"
    tok = _train_bpe(tok_dir, kind)
    src = random_model(tmp_path / "hf", "llama", tokenizer_dir=tok_dir, vocab_size=tok.get_vocab_size(), bos_token_id=0, eos_token_id=1)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).write_bytes((tok_dir / f).read_bytes())
    out = convert(src, tmp_path / "bpe.gguf", "f16")
    import gguf

    md = gguf.GGUFReader(out)
    pre = md.fields["tokenizer.ggml.pre"]
    assert bytes(pre.parts[pre.data[0]]).decode() == kind
    llm = _llama(out)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text).ids, text
    assert llm.tokenize(b"<|begin|>hi<|end|>", add_bos=False, special=True) == tok.encode("<|begin|>hi<|end|>").ids


def _train_spm(tmp_path, **options):
    import io

    import sentencepiece as spm

    from quantkit.evals.corpora import heldout_text

    model = io.BytesIO()
    lines = [line for line in heldout_text()[:200_000].splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, minloglevel=2,
                                   **{"vocab_size": 400, "model_type": "bpe", **options})
    return model.getvalue()


@pytest.mark.parametrize("options", [
    {},
    {"byte_fallback": True, "user_defined_symbols": ["<tool>", "ünï"], "control_symbols": ["<ctl>"]},
    {"add_dummy_prefix": False},
    {"treat_whitespace_as_suffix": True},
    {"model_type": "unigram", "vocab_size": 600, "byte_fallback": True},
], ids=["plain", "byte-user-control", "no-dummy-prefix", "suffix", "unigram"])
def test_sentencepiece_reader_matches_sentencepiece(tmp_path, options):
    """quantkit reads tokenizer.model's protobuf itself: pieces, scores, types and the space prefix as sentencepiece gives them."""
    import sentencepiece as spm

    from quantkit.gguf_spec import TokenType as TT
    from quantkit.vocab import read_sentencepiece

    data = _train_spm(tmp_path, **options)
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(data)
    n = sp.get_piece_size()
    want_types = [TT.UNKNOWN if sp.is_unknown(i) else TT.CONTROL if sp.is_control(i) else TT.UNUSED if sp.is_unused(i)
                  else TT.BYTE if sp.is_byte(i) else TT.NORMAL for i in range(n)]
    tokens, scores, types, adds_prefix = read_sentencepiece(data)
    assert tokens == [sp.id_to_piece(i) for i in range(n)]
    assert scores == [sp.get_score(i) for i in range(n)]
    assert types == want_types
    pieces = sp.encode_as_pieces("x")
    assert adds_prefix == (bool(pieces) and pieces[0].startswith("\u2581"))
    for bad in (data[: len(data) // 2], b"garbage", b""):
        with pytest.raises(ValueError):
            read_sentencepiece(bad)
