"""Streaming conversion: peak memory does not grow with the number of layers.

Two synthetic Mixtral checkpoints that differ only in depth (1 vs 6 layers,
about 30 MiB of weights per layer) are converted in fresh processes; the peak
resident set of the deeper one may exceed the shallow one's by at most about
one stacked expert tensor, not by the extra layers' weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import FIXTURE

H, FF, E = 512, 1024, 8  # one stacked expert tensor: 8 x 1024 x 512 bf16 = 8 MiB


def _checkpoint(path, layers):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(layers)
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    state = {"model.embed_tokens.weight": rnd(3000, H), "model.norm.weight": rnd(H), "lm_head.weight": rnd(3000, H)}
    for i in range(layers):
        p = f"model.layers.{i}."
        state.update({p + "input_layernorm.weight": rnd(H), p + "post_attention_layernorm.weight": rnd(H), p + "block_sparse_moe.gate.weight": rnd(E, H)})
        for n in "qkvo":
            state[p + f"self_attn.{n}_proj.weight"] = rnd(H, H)
        for x in range(E):
            state.update({p + f"block_sparse_moe.experts.{x}.w1.weight": rnd(FF, H), p + f"block_sparse_moe.experts.{x}.w3.weight": rnd(FF, H), p + f"block_sparse_moe.experts.{x}.w2.weight": rnd(H, FF)})
    path.mkdir()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(model_type="mixtral", vocab_size=3000, hidden_size=H, intermediate_size=FF, num_hidden_layers=layers, num_attention_heads=8,
               num_key_value_heads=8, num_local_experts=E, num_experts_per_tok=2, max_position_embeddings=1024, rms_norm_eps=1e-5)
    (path / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(FIXTURE / f, path / f)
    return path


def _peak_rss_mib(src, out, outtype):
    # VmHWM belongs to this process image (ru_maxrss would inherit the parent's peak across fork)
    code = (
        "from quantkit.pipeline.convert import convert; "
        f"convert({str(src)!r}, {str(out)!r}, {outtype!r}, force=True); "
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(res.stdout.split()[-1]) / 1024


@pytest.mark.parametrize("outtype", ["bf16", "q8_0"])
def test_peak_memory_does_not_grow_with_depth(tmp_path, outtype):
    shallow = _checkpoint(tmp_path / "l1", 1)
    deep = _checkpoint(tmp_path / "l6", 6)
    a = _peak_rss_mib(shallow, tmp_path / "a.gguf", outtype)
    b = _peak_rss_mib(deep, tmp_path / "b.gguf", outtype)
    extra_weights_mib = 5 * (3 * E * FF * H + 4 * H * H) * 2 / 2**20
    print("RSS", a, b); assert b - a < 24, f"peak RSS {a:.0f} MiB (1 layer) -> {b:.0f} MiB (6 layers); the 5 extra layers hold {extra_weights_mib:.0f} MiB"
