"""Models run by transformers: an HF directory (float32, the reference) or a bitsandbytes export.

Same interface as :class:`quantkit.engine.session.EvalSession` (tokenize,
eval_chunk, router, vocab_fingerprint, bos), so ``eval kld`` can take an HF
directory as its base: logits from transformers' own model code and router
logits from ``output_router_logits``.  Tokenisation uses the model's own
tokenizer library (sentencepiece for ``tokenizer.model``, tokenizers for
``tokenizer.json``), which llama.cpp matches (tests/test_tokenizer_parity.py).

Not for: GGUF models (``quantkit.engine.session``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from quantkit.hf.checkpoint import load_config
from quantkit.converters import for_model_type
from quantkit.errors import CheckpointError, QuantkitError
from quantkit.hf.vocab import load_vocab, vocab_metadata


def check_weights(path: Path) -> None:
    """Refuse an HF directory whose weights are not safetensors, before transformers sees it.

    ``quantkit.hf.checkpoint.open_checkpoint`` validates the index and every safetensors header
    (one-line errors for corrupt shards) and refuses a directory without safetensors shards;
    a pickle (``pytorch_model.bin``, ``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) is named in that error.
    """
    from quantkit.hf.checkpoint import PICKLE_SUFFIXES, open_checkpoint

    has_safetensors = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    if not has_safetensors:
        pickles = sorted(p for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
        if pickles:
            raise CheckpointError(
                f"{pickles[0]}: PyTorch pickle weights can run arbitrary code when loaded and are refused (no *.safetensors in {path}); "
                "fix: convert them to safetensors (transformers save_pretrained(safe_serialization=True)) in a trusted environment"
            )
    open_checkpoint(path).close()


class HFSession:
    def __init__(self, path: str | Path, n_ctx: int, threads: int | None = None) -> None:
        try:
            import torch
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise QuantkitError("an HF directory as base needs torch and transformers; fix: pip install 'quantkit[dev]' or convert the base to GGUF first") from None
        self.path = Path(path)
        config = load_config(self.path)
        check_weights(self.path)
        hp = for_model_type(config.get("model_type"), where=str(self.path / "config.json")).hparams(config)
        self.vocab, tcfg = load_vocab(self.path, hp.n_vocab)
        md = vocab_metadata(self.vocab, tcfg, config)
        self._bos = md["tokenizer.ggml.bos_token_id"].value if "tokenizer.ggml.bos_token_id" in md else None
        self._add_bos = bool(md["tokenizer.ggml.add_bos_token"].value)
        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if "quantization_config" in config:  # a quantkit bitsandbytes export: experts stay 4-bit
            from quantkit.policy.bnb import load_bnb

            self.model = load_bnb(self.path).eval()
        else:
            try:  # use_safetensors: transformers never falls back to a pickle (check_weights refused those already)
                self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32, use_safetensors=True).eval()
            except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
                msg = " ".join(str(e).split())
                raise QuantkitError(
                    f"{self.path}: transformers could not load the model ({msg[:200]}); fix: check config.json and the safetensors shards, or convert it to GGUF and pass that"
                ) from None
        self._moe = hp.n_expert > 0  # the converter's reading of config.json (num_local_experts, num_experts, ...)
        self.experts_used = hp.n_expert_used
        self.n_ctx = n_ctx
        self.capture_router = self._moe  # router logits of every position, every chunk
        self.n_vocab = len(self.vocab.tokens)
        self.router: dict[int, np.ndarray] = {}
        if self.vocab.model == "llama":
            import sentencepiece as spm

            self._encode = spm.SentencePieceProcessor(model_file=str(self.path / "tokenizer.model")).encode
        else:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(self.path / "tokenizer.json"))
            self._encode = lambda text: tok.encode(text, add_special_tokens=False).ids

    @property
    def bos(self) -> int | None:
        return self._bos if self._add_bos else None

    def tokenize(self, text: str) -> list[int]:
        ids = list(self._encode(text))
        return [self._bos, *ids] if self._add_bos and self._bos is not None else ids

    def eval_chunk(self, tokens: list[int]) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            out = self.model(torch.tensor([tokens]), output_router_logits=self._moe)
        if self._moe:
            self.router = {i: r.float().numpy().reshape(len(tokens), -1) for i, r in enumerate(out.router_logits)}
        return out.logits[0].float().numpy()

    def eval_chunks(self, chunks: list[list[int]], first_output: int = 0, copy: bool = True) -> list[np.ndarray]:
        """One chunk at a time (``n_seq`` is 1 here); logits from ``first_output`` on (fresh arrays, whatever ``copy``)."""
        return [self.eval_chunk(c)[first_output:] for c in chunks]

    def vocab_fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in self.vocab.tokens:
            h.update(t.encode("utf-8", "surrogatepass") + b"\0")
        return h.hexdigest()

    def close(self) -> None:
        del self.model
