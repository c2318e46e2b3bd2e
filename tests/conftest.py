"""Shared test helpers: the bundled fixture, random HF models, and the two reference runtimes.

References: transformers (float32) for logits, llama.cpp through
llama-cpp-python for running GGUF, sentencepiece / tokenizers for tokenisation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-mixtral"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def vendored_llama_cpp(need: str = "conversion") -> str:
    """The llama.cpp sources llama-cpp-python vendors (the reference converter and its gguf-py), as setup copies them
    into the venv (tools/build_llama.sh: ``.venv/llama.cpp-src``); ``QK_LLAMA_CPP_SRC`` or an unpacked sdist in /tmp
    elsewhere.  Skipped where none is found, except under CI (``make test`` must have put it there)."""
    import os
    import sys

    for root in (os.environ.get("QK_LLAMA_CPP_SRC"), str(Path(sys.prefix) / "llama.cpp-src"), str(ROOT / ".venv" / "llama.cpp-src"),
                 "/tmp/lcp-sdist/llama_cpp_python-0.3.36/vendor/llama.cpp"):
        if root and (Path(root) / need).exists():
            return root
    if os.environ.get("CI"):
        pytest.fail(f"the vendored llama.cpp sources ({need}) are missing from {sys.prefix}/llama.cpp-src; fix: run make setup (tools/build_llama.sh)")
    pytest.skip(f"the vendored llama.cpp sources ({need}) are not unpacked here; run tools/build_llama.sh .venv")


def llama_tool(name: str, env: str) -> Path | None:
    """llama.cpp's own tool ``name`` (llama-imatrix, llama-gguf-split) built from the sources llama-cpp-python vendors:
    ``$env`` if set, else the venv's ``bin/<name>`` (tools/build_llama.sh links it against the installed wheel's
    libllama), else make bench's full build under ``$BENCH_WORK`` (/tmp/qk-llama-ref).  None where none is found
    (the caller skips), except under CI, where ``make test`` must have built it: the test fails."""
    import os
    import sys

    if os.environ.get(env):
        return Path(os.environ[env])
    import llama_cpp

    work = Path(os.environ.get("BENCH_WORK", "/tmp/qk-llama-ref"))
    for path in (Path(sys.prefix) / "bin" / name, ROOT / ".venv" / "bin" / name,
                 work / f"llama_cpp_python-{llama_cpp.__version__}" / "vendor" / "llama.cpp" / "build" / "bin" / name):
        if path.is_file() and os.access(path, os.X_OK):
            return path
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{name} is missing from {Path(sys.prefix) / 'bin'}; fix: run make setup (tools/build_llama.sh builds it)")
    return None


def convert(src: Path, out: Path, outtype: str = "f32") -> Path:
    from quantkit.pipeline.convert import convert as do_convert

    do_convert(src, out, outtype, force=True)
    return out


@pytest.fixture(scope="session")
def fixture_gguf(tmp_path_factory):
    """The bundled fixture converted once per type for the whole session."""
    cache: dict[str, Path] = {}
    base = tmp_path_factory.mktemp("fixture-gguf")

    def get(outtype: str) -> Path:
        if outtype not in cache:
            cache[outtype] = convert(FIXTURE, base / f"tiny-mixtral-{outtype}.gguf", outtype)
        return cache[outtype]

    return get


def llama_logits(path: Path, ids: list[int], n_ctx: int = 512) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, n_batch=n_ctx)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


#: per model_type, what a small random model of the family needs beyond the common sizes (one line a family)
ARCH_DEFAULTS: dict[str, dict] = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    # norm_topk_prob: what published Qwen3 MoE checkpoints say (the config class defaults to false)
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True),
    # routed experts and the shared expert of their own widths (the config class's defaults are Qwen1.5-MoE's sizes)
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=96),
    # as many KV heads as query heads: llama.cpp's olmoe graph has no grouped-query attention
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, num_key_value_heads=4),
    # Granite's four multipliers away from 1, each visible in the logits (the published 12 / 0.22 / 1/64 / 6 shrink the layers' share below the tolerance)
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=2.0, residual_multiplier=0.7, attention_multiplier=0.25, logits_scaling=0.5),
    "granitemoeshared": dict(num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=96, embedding_multiplier=2.0, residual_multiplier=0.7, attention_multiplier=0.25, logits_scaling=0.5),
    # MLA of its own sizes (low-rank queries, latent 32, rope 16 / nope 32 / v 32 per head), one leading dense block, 4 experts + 1 shared,
    # weights scaled 1.5; as many KV heads as heads (MLA expands the latent per head)
    "deepseek_v2": dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1, kv_lora_rank=32,
                        q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, first_k_dense_replace=1, routed_scaling_factor=1.5),
    # as deepseek_v2, and V3's sigmoid router (the class defaults are DeepSeek-V3's: 8 groups of 256 experts, 3 dense blocks)
    "deepseek_v3": dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1, kv_lora_rank=32,
                        q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, first_k_dense_replace=1, n_group=1, topk_group=1),
    # hybrid blocks: every 2nd one full attention (2 layers: one of each), Gated DeltaNet of 2 key heads serving 4 value heads
    # (grouped vs tiled value heads differ), head sizes of their own (the class defaults are the 80B / 35B models' sizes)
    "qwen3_next": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=96, head_dim=32, full_attention_interval=2,
                       linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32),
    "qwen3_5_moe_text": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=96, head_dim=32, full_attention_interval=2,
                             linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32),
    # dots.llm1's layout at a small size: one leading dense block, 4 experts top-2 + 1 shared, renormalised and scaled 2.5 as published
    # (the class defaults are 1.0 / false); as many KV heads as query heads (llama.cpp's dots1 graph has no grouped-query attention)
    "dots1": dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1,
                  first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5),
    # MiniMax-M2's partial rotary (half of each head, as its 64 of 128) at a head size of its own (the class defaults are the 230B model's)
    "minimax_m2": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=32, rotary_dim=16),
    # Llama 4 text at a small size: 4 blocks (llama.cpp needs a NoPE block: every 4th), dense / MoE interleaved (step 2), 4 experts top-1
    # + a shared expert of width 64, dense MLPs of width 96 (the class defaults are Scout's sizes)
    "llama4_text": dict(num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=1, intermediate_size=64, intermediate_size_mlp=96,
                        interleave_moe_layer_step=2, head_dim=32),
    # GLM-4.5's layout at a small size: head_dim of its own (half of it rotary, the class default), one leading dense block, 4 experts top-2
    # + 1 shared, q/k norms and q/k/v biases as GLM-4.5 publishes them, weights scaled 2.5 (the class defaults are the 106B model's sizes)
    "glm4_moe": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=32, use_qk_norm=True, attention_bias=True,
                     routed_scaling_factor=2.5),
    # GLM-4.7-Flash (DeepSeek V3's MLA and router) at deepseek_v3's small sizes; one dense block (mlp_layer_types' default)
    "glm4_moe_lite": dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, kv_lora_rank=32,
                          q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32),
    # ERNIE-4.5 MoE's layout at a small size: one leading dense block (moe_layer_start_index 1, the class default), 4 experts top-2 + 1 shared
    "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=64, moe_num_shared_experts=1),
    # gpt-oss at a small size: 4 experts top-2, a window of 8 (shorter than the test prompts: the sliding blocks differ from full ones),
    # YaRN as published but with truncate true (ggml always rounds the correction range; truncate false is measured in test_gpt_oss.py)
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, head_dim=32, sliding_window=8,
                    rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True,
                                     "original_max_position_embeddings": 4096, "rope_theta": 150000.0}),
}


def random_model(
    path: Path,
    model_type: str,
    tokenizer_dir: Path = FIXTURE,
    seed: int = 0,
    max_shard_size: str | None = None,
    dtype: str = "bfloat16",
    fused: bool = False,
    **overrides,
) -> Path:
    """A randomly initialised HF model (every weight perturbed, norms too) with a copied tokenizer."""
    import torch
    import transformers

    cfg = dict(
        vocab_size=3000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    cfg.update(ARCH_DEFAULTS.get(model_type, {}))
    cfg.update(overrides)
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.6 / p.shape[-1] ** 0.5 if "embed" not in name else 1.0))
    model = model.to(getattr(torch, dtype))
    kwargs: dict = {"max_shard_size": max_shard_size} if max_shard_size else {}
    if fused:  # transformers 5's own layout: mlp.experts.gate_up_proj [E, 2F, H] / down_proj [E, H, F]
        kwargs["save_original_format"] = False
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    for f in TOKENIZER_FILES:
        if (tokenizer_dir / f).exists():
            shutil.copy(tokenizer_dir / f, path / f)
    return path


def sp_ids(model_dir: Path, text: str) -> list[int]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    return [sp.bos_id()] + sp.encode(text)


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def fused_copy(src: Path, dst: Path) -> Path:
    """The same Mixtral weights in transformers 5's fused layout: mlp.experts.gate_up_proj [E, 2F, H], down_proj [E, H, F]."""
    import torch
    from safetensors.torch import load_file, save_file

    config = read_config(src)
    state = load_file(str(src / "model.safetensors"))
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        ex = [{w: state.pop(f"{p}block_sparse_moe.experts.{e}.{w}.weight") for w in ("w1", "w2", "w3")} for e in range(config["num_local_experts"])]
        state[p + "mlp.experts.gate_up_proj"] = torch.stack([torch.cat([x["w1"], x["w3"]]) for x in ex])
        state[p + "mlp.experts.down_proj"] = torch.stack([x["w2"] for x in ex])
        state[p + "mlp.gate.weight"] = state.pop(p + "block_sparse_moe.gate.weight")
    dst.mkdir()
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    return dst


def assert_convert_refused(model: Path, tmp_path: Path, needles: list[str]) -> None:
    """``quantkit convert MODEL`` fails with exit 1 and one ``error:`` line holding every needle and a fix; nothing is written."""
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    outdir = tmp_path / "out"
    outdir.mkdir()
    result = CliRunner().invoke(app, ["convert", str(model), "-o", str(outdir / "m.gguf"), "--type", "q8_0"])
    assert result.exit_code == 1, result.output
    msg = result.output.strip()
    assert msg.startswith("error:") and len(msg.splitlines()) == 1, msg
    flat = " ".join(msg.split())
    for needle in needles:
        assert needle in flat, f"{needle!r} not in {flat!r}"
    assert "fix:" in flat
    assert list(outdir.iterdir()) == []


# --------------------------------------------------------------------------- llama.cpp's own quantiser, in process


def llama_quantize_imatrix(im) -> tuple[object, list]:
    """``im``'s weights as quantize.cpp's ``load_imatrix`` hands them to ``llama_model_quantize`` (``params.imatrix``), and
    what must stay alive while it runs."""
    import ctypes

    import llama_cpp

    keep: list = []
    arr = (llama_cpp.llama_model_imatrix_data * (len(im.entries) + 1))()  # zeroed terminator
    for i, name in enumerate(im.entries):
        w = np.ascontiguousarray(im.weights(name), dtype=np.float32).reshape(-1)
        keep += [w, name.encode()]
        arr[i].name, arr[i].data, arr[i].size = keep[-1], w.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), w.size
    keep.append(arr)
    return ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data)), keep


def llama_quantize_run(src: Path, out: Path, params) -> tuple[int, str]:
    """``llama_model_quantize(src, out, params)`` (the wheel's libllama) with its log captured: (return code, log)."""
    import ctypes

    import llama_cpp
    from llama_cpp import _logger

    chunks: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level, text, user_data):
        chunks.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    return rc, "".join(chunks)
