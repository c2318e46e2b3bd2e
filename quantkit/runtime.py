"""Running a GGUF through llama-cpp-python: loading, backend detection, generation.

Offloads every layer when the installed llama.cpp build has a GPU backend
(CUDA, Metal, …) unless told otherwise; threads default to the physical
cores.  Chat prompts are rendered with the template stored in the GGUF by
llama-cpp-python's sandboxed Jinja environment.

Not for: the interactive terminal loop (``quantkit.cli``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from quantkit.errors import QuantkitError
from quantkit.gguf_read import read_gguf

log = logging.getLogger(__name__)


def physical_cores() -> int:
    """Physical cores (hyper-threads share execution units, which slows matmuls)."""
    try:
        pairs = set()
        cpuinfo = Path("/proc/cpuinfo").read_text()
        phys = core = None
        for line in cpuinfo.splitlines():
            if line.startswith("physical id"):
                phys = line.split(":")[1].strip()
            elif line.startswith("core id"):
                core = line.split(":")[1].strip()
                pairs.add((phys, core))
        if pairs:
            return min(len(pairs), len(os.sched_getaffinity(0)))
    except (OSError, AttributeError):
        pass
    return max(1, (os.cpu_count() or 2) // 2)


def gpu_offload_supported() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


@dataclass(frozen=True)
class Sampling:
    """Sampling options shared by ``run`` and ``chat``; temperature 0 is greedy."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    seed: int | None = None
    max_tokens: int = 256

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repeat_penalty=self.repeat_penalty, max_tokens=self.max_tokens,
        )
        if self.seed is not None:
            kw["seed"] = self.seed
        if self.temperature <= 0:  # greedy: the sampler picks the top token
            kw.update(temperature=0.0, top_k=1)
        return kw


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: str | None
    prompt: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.completion_tokens / self.seconds, 2) if self.seconds > 0 else None,
            "finish_reason": self.finish_reason,
        }


def load(model: str | Path, n_ctx: int = 2048, gpu_layers: int | None = None, threads: int | None = None, seed: int | None = None):
    """Open a GGUF with llama-cpp-python after validating it with quantkit's bounded reader."""
    from llama_cpp import Llama

    path = Path(model)
    read_gguf(path)  # a readable one-line error for bad files before llama.cpp sees them
    n_gpu = gpu_layers if gpu_layers is not None else (-1 if gpu_offload_supported() else 0)
    kwargs: dict[str, Any] = dict(n_ctx=n_ctx, n_gpu_layers=n_gpu, n_threads=threads or physical_cores(), verbose=False)
    if seed is not None:
        kwargs["seed"] = seed
    try:
        return Llama(str(path), **kwargs)
    except ValueError as e:
        raise QuantkitError(f"{path}: llama.cpp could not load the model ({e}); fix: re-convert it with quantkit convert") from None


def generate(
    llm: Any,
    prompt: str,
    sampling: Sampling,
    chat: bool = False,
    system: str | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """Generate from a prompt (or a one-turn chat), streaming text pieces to ``on_text``."""
    t0 = time.perf_counter()
    pieces: list[str] = []
    finish = None
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        stream: Iterator[dict[str, Any]] = llm.create_chat_completion(messages=messages, stream=True, **sampling.kwargs())
        for chunk in stream:
            choice = chunk["choices"][0]
            text = choice.get("delta", {}).get("content") or ""
            finish = choice.get("finish_reason") or finish
            if text:
                pieces.append(text)
                if on_text:
                    on_text(text)
    else:
        for chunk in llm.create_completion(prompt, stream=True, **sampling.kwargs()):
            choice = chunk["choices"][0]
            finish = choice.get("finish_reason") or finish
            if choice["text"]:
                pieces.append(choice["text"])
                if on_text:
                    on_text(choice["text"])
    seconds = time.perf_counter() - t0
    text = "".join(pieces)
    n_prompt = len(llm.tokenize(prompt.encode(), add_bos=True, special=chat))
    n_out = len(llm.tokenize(text.encode(), add_bos=False, special=False)) if text else 0
    return Generation(text, n_prompt, n_out, seconds, finish, prompt)
