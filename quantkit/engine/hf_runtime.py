"""``run`` and ``chat`` on a bitsandbytes export: a transformers model behind llama-cpp-python's interface.

:class:`TransformersLlama` offers the part of ``llama_cpp.Llama`` that
``quantkit.engine.runtime`` uses (tokenize with special tokens, detokenize, the chat
template in ``metadata``, ``create_completion`` streaming with the same
sampling options, ``reset``), so run and chat treat a ``convert --format bnb``
directory exactly like a GGUF.  The model comes from ``quantkit.load_bnb``:
experts stay 4-bit.  Sampling: repeat penalty, then top-k, top-p, min-p and
temperature on the logits (temperature 0 is greedy), seeded by ``seed``.

Not for: GGUF files (llama.cpp runs those).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

from quantkit.hf.checkpoint import load_config
from quantkit.errors import QuantkitError
from quantkit.hf.vocab import load_vocab, vocab_metadata


class TransformersLlama:
    def __init__(self, path: Path, n_ctx: int, threads: int | None = None, seed: int | None = None, device: str = "cpu") -> None:
        import torch

        from quantkit.policy.bnb import load_bnb

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.model_path = str(path)
        config = load_config(path)
        self.vocab, tcfg = load_vocab(path, int(config.get("vocab_size", 0)))
        md = vocab_metadata(self.vocab, tcfg, config)
        self.metadata = {k: str(v.value) for k, v in md.items() if not isinstance(v.value, list)}
        self._bos = int(md["tokenizer.ggml.bos_token_id"].value) if "tokenizer.ggml.bos_token_id" in md else -1
        self._eos = int(md["tokenizer.ggml.eos_token_id"].value) if "tokenizer.ggml.eos_token_id" in md else -1
        self._add_bos = bool(md["tokenizer.ggml.add_bos_token"].value)
        specials = [(t, i) for i, (t, ty) in enumerate(zip(self.vocab.tokens, self.vocab.types)) if ty in (3, 4) and t]  # control, user-defined
        self._special_ids = dict(specials)
        self._special_re = re.compile("|".join(re.escape(t) for t, _ in sorted(specials, key=lambda x: -len(x[0])))) if specials else None
        if self.vocab.model == "llama":
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
            self._encode, self._decode = sp.encode, lambda ids: sp.decode(ids)
        else:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
            self._encode = lambda text: tok.encode(text, add_special_tokens=False).ids
            self._decode = lambda ids: tok.decode(ids, skip_special_tokens=False)
        self.model = load_bnb(path, device=device).eval()
        self.device = device
        self._n_ctx = n_ctx
        self._gen = torch.Generator().manual_seed(seed if seed is not None else 0)

    # -- the llama_cpp.Llama subset quantkit.engine.runtime uses ---------------------------------

    def n_ctx(self) -> int:
        return self._n_ctx

    def token_bos(self) -> int:
        return self._bos

    def token_eos(self) -> int:
        return self._eos

    def token_is_eog(self, token: int) -> bool:
        return token == self._eos

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        s = text.decode("utf-8", errors="replace")
        ids: list[int] = []
        if special and self._special_re is not None:
            pos = 0
            for m in self._special_re.finditer(s):
                if m.start() > pos:
                    ids += self._encode(s[pos : m.start()])
                ids.append(self._special_ids[m.group(0)])
                pos = m.end()
            if pos < len(s):
                ids += self._encode(s[pos:])
        else:
            ids = list(self._encode(s)) if s else []
        return [self._bos, *ids] if add_bos and self._add_bos and self._bos >= 0 else ids

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        out = []
        for t in tokens:
            if t in self._special_ids.values():
                out.append(self.vocab.tokens[t] if special else "")
            else:
                out.append(self._decode([t]))
        return "".join(out).encode("utf-8")

    def reset(self) -> None:
        """Nothing persists between calls: every completion starts from its own prompt."""

    def create_completion(self, prompt: Sequence[int], stream: bool = True, stop: Sequence[str] = (), max_tokens: int = 256,
                          temperature: float = 0.8, top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
                          repeat_penalty: float = 1.1, seed: int | None = None, logit_bias: dict[int, float] | None = None, **_: Any) -> Iterator[dict[str, Any]]:
        if seed is not None:
            self._gen.manual_seed(seed)
        return _Stream(self._generate(list(prompt), stop, max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, logit_bias or {}))

    # -- generation ---------------------------------------------------------------------

    def _sample(self, logits: Any, seen: list[int], temperature: float, top_p: float, top_k: int, min_p: float, repeat_penalty: float, bias: dict[int, float]) -> int:
        torch = self._torch
        logits = logits.float().clone()
        for t, b in bias.items():
            logits[t] += b
        if repeat_penalty != 1.0 and seen:
            idx = torch.tensor(sorted(set(seen[-64:])))
            vals = logits[idx]
            logits[idx] = torch.where(vals > 0, vals / repeat_penalty, vals * repeat_penalty)
        if temperature <= 0 or top_k == 1:
            return int(logits.argmax())
        if top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits[logits < kth] = float("-inf")
        probs = torch.softmax(logits, -1)
        if top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            cut = (sp.cumsum(0) - sp) > top_p
            probs[si[cut]] = 0
        if min_p > 0:
            probs[probs < min_p * probs.max()] = 0
        probs = torch.softmax(torch.log(probs + 1e-30) / temperature, -1)
        return int(torch.multinomial(probs, 1, generator=self._gen))

    def generate(self, tokens: Sequence[int], max_tokens: int, temperature: float, top_p: float, top_k: int, min_p: float,
                 repeat_penalty: float, bias: dict[int, float]) -> Iterator[int]:
        """Sample up to ``max_tokens`` token ids after ``tokens`` (an end-of-sequence id included, then stop),
        like ``llama_cpp.Llama.generate``; ``quantkit.engine.runtime`` counts what this yields."""
        torch = self._torch
        out: list[int] = []
        past = None
        ids = torch.tensor([list(tokens)], device=self.device)
        with torch.no_grad():
            for _ in range(max_tokens):
                res = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                past = res.past_key_values
                nxt = self._sample(res.logits[0, -1], list(tokens) + out, temperature, top_p, top_k, min_p, repeat_penalty, bias)
                yield nxt
                if nxt == self._eos:
                    return
                out.append(nxt)
                ids = torch.tensor([[nxt]], device=self.device)

    def _generate(self, tokens: list[int], stop: Sequence[str], max_tokens: int, temperature: float, top_p: float, top_k: int,
                  min_p: float, repeat_penalty: float, bias: dict[int, float]) -> Iterator[tuple[str, str | None]]:
        if len(tokens) + max_tokens > self._n_ctx:
            max_tokens = max(0, self._n_ctx - len(tokens))
        out: list[int] = []
        text_so_far = ""
        for nxt in self.generate(tokens, max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, bias):
            if nxt == self._eos:
                yield "", "stop"
                return
            out.append(nxt)
            full = self._decode([t for t in out if t not in self._special_ids.values()])
            if full.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
                continue
            hit = next((s for s in stop if s and s in full), None)
            if hit is not None:
                yield full[len(text_so_far) : full.index(hit)], "stop"
                return
            yield full[len(text_so_far) :], None
            text_so_far = full
        yield "", "length"


class _Stream:
    """Chunks shaped like llama-cpp-python's streaming completion."""

    def __init__(self, gen: Iterator[tuple[str, str | None]]) -> None:
        self._gen = gen

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for text, finish in self._gen:
            yield {"choices": [{"text": text, "finish_reason": finish}]}

    def close(self) -> None:
        self._gen.close()  # type: ignore[attr-defined]


def is_bnb_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.is_file()):
        return False
    try:
        return "quantization_config" in json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False


def dir_weights_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def check_dir(path: Path) -> None:
    if not is_bnb_dir(path):
        raise QuantkitError(
            f"{path}: is a directory but not a quantkit bitsandbytes export (no quantization_config in config.json); "
            f"fix: convert it with `quantkit convert {path} -o model.gguf` (or --format bnb) and pass the result"
        )

