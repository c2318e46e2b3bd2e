"""``converters/deepseek_v32.py`` (GGUF arch ``deepseek32``) and ``converters/glm_moe_dsa.py`` (``glm-dsa``): DeepSeek Sparse Attention.

* Logits of the F32 GGUF run by llama.cpp equal transformers' float32 logits (``assert_close``) on tiny
  random models whose context (151 tokens) is shorter than ``index_topk``: every cached token is then
  selected in both programs, so sparse attention is dense attention.  Leading dense blocks and MoE
  blocks (``mlp_layer_types``), shared experts, sigmoid routing with a non-zero
  ``e_score_correction_bias``, group-limited routing, ``routed_scaling_factor`` != 1, both expert
  layouts, YaRN, GLM's shared-indexer blocks (``indexer_types``).
* A context longer than ``index_topk`` makes the indexer's choice matter: both programs must then
  rank the tokens alike, and they do except at (near-)ties of the indexer scores.  ``relu`` makes
  every score whose heads are all negative exactly 0, so with few indexer heads ties are common
  (4 heads, measured: 24% (deepseek32) / 49% (glm-dsa) of the positions leave the tolerance, because
  a flipped choice in an early block changes every later token's keys); with 16 heads ties are rare
  and at least 90% of positions must stay within the tolerance (measured 98.7% / 99.3%; an indexer with its rotary rows in the wrong order: 10.6%):
  ``test_sparse_selection_matches``.
* Every routing key matters: the file with one key changed or dropped leaves the tolerance.
* The tensors equal the vendored llama.cpp converter's on the same checkpoints (its tokenizer step
  swapped for the fixture's SentencePiece vocabulary), multi-token-prediction blocks included; its
  metadata too, but for ``expert_gating_func``, which it leaves out of a transformers-saved config
  (llama.cpp's deepseek32 loader then refuses the file; glm-dsa defaults to sigmoid).
* nextn blocks: kept after the trunk with ``nextn_predict_layers`` (llama.cpp still runs the file).
* What llama.cpp cannot compute like transformers is refused with one line naming the key.

Type plans against ``llama_model_quantize`` are in ``test_presets.py`` (``deepseek32-e8-L4-dsa``, ``glm-dsa-e8-L4-shared``).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import assert_convert_refused, convert, hf_logits, llama_logits, random_model, vendored_llama_cpp
from test_deepseek import _metadata, _set_score_bias
from test_glm4_moe import add_nextn
from test_logits_parity import assert_close

SIGMOID, SOFTMAX = int(gguf.ExpertGatingFuncType.SIGMOID), int(gguf.ExpertGatingFuncType.SOFTMAX)
IDS = [1] + np.random.default_rng(1).integers(3, 2999, size=150).tolist()
ARCH = {"deepseek_v32": "deepseek32", "glm_moe_dsa": "glm-dsa"}

#: small MLA sizes (deepseek_v3's in conftest), 4 experts top-2 + 1 shared, one leading dense block, an indexer of 4 heads of 64
#: (llama.cpp's Hadamard product needs a power of two from 64) keeping 256 tokens: more than the 151 of IDS
BASE = dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1, kv_lora_rank=32,
            q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, first_k_dense_replace=1, n_group=1, topk_group=1,
            index_topk=256, index_head_dim=64, index_n_heads=4)


def build(path: Path, model_type: str, **overrides) -> Path:
    src = random_model(path, model_type, **{**BASE, **overrides})
    _set_score_bias(src)
    return src


def _tensors(path: Path) -> dict[str, tuple[int, tuple[int, ...], bytes]]:
    return {t.name: (int(t.tensor_type), tuple(int(x) for x in t.shape), bytes(t.data)) for t in gguf.GGUFReader(path).tensors}


# --------------------------------------------------------------------------- logits parity (context shorter than index_topk)

CASES = {
    # V3.2: per-expert keys, sigmoid + bias, renormalised top-2 x 2.5, one dense block then one MoE block
    "v32": dict(model_type="deepseek_v32"),
    # V3.2 fused experts, 8 experts in 4 groups (best 2 kept), top-3, unnormalised x 0.7, mlp_layer_types with two dense blocks of 3
    "v32-fused-groups": dict(model_type="deepseek_v32", fused=True, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
                             num_hidden_layers=3, mlp_layer_types=["dense", "dense", "sparse"], routed_scaling_factor=0.7, norm_topk_prob=False),
    # V3.2's published YaRN (mscale = mscale_all_dim = 1), tied embeddings, 2 shared experts
    "v32-yarn-tied": dict(model_type="deepseek_v32", tie_word_embeddings=True, n_shared_experts=2,
                          rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "mscale": 1.0,
                                           "mscale_all_dim": 1.0, "rope_theta": 10000.0}),
    # GLM-5: per-expert keys, the class's routing defaults (no groups), x 2.5
    "glm-dsa": dict(model_type="glm_moe_dsa"),
    # GLM-5 fused, 4 blocks: full / shared / full / shared indexers (no indexer weights in shared blocks), groups, 8 experts
    "glm-dsa-fused-shared": dict(model_type="glm_moe_dsa", fused=True, num_hidden_layers=4, indexer_types=["full", "shared", "full", "shared"],
                                 n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    spec = dict(CASES[case])
    src = build(tmp_path / "hf", spec.pop("model_type"), **spec)
    out = convert(src, tmp_path / "m.gguf", "f32")
    assert_close(llama_logits(out, IDS), hf_logits(src, IDS))


@pytest.mark.parametrize("model_type,extra", [("deepseek_v32", {}), ("glm_moe_dsa", dict(num_hidden_layers=3, indexer_types=["full", "shared", "full"]))])
def test_sparse_selection_matches(tmp_path, model_type, extra):
    """index_topk 16 over 151 tokens: the indexer's choice matters.  16 indexer heads (ties rare): measured 98.7% (deepseek32) / 99.3%
    (glm-dsa) of positions within the tolerance, the same argmax everywhere; the rest are near-ties of the indexer scores ranked
    differently.  Control: the same deepseek32 file against a checkpoint whose indexer rotary rows are in the other pair order (the
    mistake a wrong rope convention makes): 10.6% within, argmax 75% (so the bounds below tell a right indexer from a wrong one)."""
    src = build(tmp_path / "hf", model_type, index_topk=16, index_n_heads=16, **extra)
    ref = hf_logits(src, IDS)
    got = llama_logits(convert(src, tmp_path / "m.gguf", "f32"), IDS)
    err = np.abs(got - ref).max(-1)
    within = float((err <= 5e-4 * max(1.0, float(np.abs(ref).max()))).mean())
    assert within >= 0.9, within
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95
    assert err[:16].max() <= 5e-4 * max(1.0, float(np.abs(ref).max()))  # up to index_topk tokens: dense in both


# --------------------------------------------------------------------------- routing keys


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """deepseek_v32 whose every routing key matters: bias, 4 groups of 2 with 2 kept, renormalised top-3 x 2.5; transformers' logits."""
    src = build(tmp_path_factory.mktemp("v32-grouped") / "hf", "deepseek_v32", n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    return src, hf_logits(src, IDS)


def test_routing_keys_written_from_the_architecture(grouped, tmp_path):
    src, ref = grouped
    out = convert(src, tmp_path / "m.gguf", "f32")
    md = _metadata(out)
    a = "deepseek32"
    assert md[f"{a}.expert_gating_func"] == SIGMOID
    assert md[f"{a}.expert_weights_norm"] is True and md[f"{a}.expert_weights_scale"] == pytest.approx(2.5)
    assert (md[f"{a}.expert_group_count"], md[f"{a}.expert_group_used_count"]) == (4, 2)
    assert md[f"{a}.leading_dense_block_count"] == 1 and md[f"{a}.block_count"] == 2
    assert (md[f"{a}.attention.indexer.head_count"], md[f"{a}.attention.indexer.key_length"], md[f"{a}.attention.indexer.top_k"]) == (4, 64, 256)
    assert f"{a}.attention.indexer.types" not in md and f"{a}.nextn_predict_layers" not in md
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert {"blk.1.exp_probs_b.bias", "blk.0.indexer.k_norm.bias", "blk.1.indexer.attn_q_b.weight"} <= names
    assert_close(llama_logits(out, IDS), ref)


def _drop_key(key):
    return lambda md: {k: v for k, v in md.items() if k != f"deepseek32.{key}"}


def _set_key(key, value):
    from quantkit.format.gguf_write import MetaValue

    return lambda md: {**md, f"deepseek32.{key}": MetaValue(value, md[f"deepseek32.{key}"].vtype)}


MUTATIONS = {
    "gating softmax": _set_key("expert_gating_func", SOFTMAX),
    "weights_norm dropped": _drop_key("expert_weights_norm"),
    "weights_scale dropped": _drop_key("expert_weights_scale"),
    "group counts dropped": lambda md: _drop_key("expert_group_used_count")(_drop_key("expert_group_count")(md)),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_every_routing_key_matters(grouped, tmp_path, monkeypatch, mutation):
    from quantkit import converters

    src, ref = grouped
    conv = converters.for_model_type("deepseek_v32")
    fn = MUTATIONS[mutation]
    monkeypatch.setitem(converters.CONVERTERS, "deepseek_v32", dataclasses.replace(conv, metadata=lambda h: fn(conv.metadata(h))))
    out = convert(src, tmp_path / "m.gguf", "f32")
    with pytest.raises(AssertionError):
        assert_close(llama_logits(out, IDS), ref)


def test_glm_indexer_types_written(tmp_path):
    """GlmMoeDsaConfig derives indexer_types from index_topk_freq / index_skip_topk_offset; the file says what it derived."""
    from quantkit.converters import for_model_type

    conv = for_model_type("glm_moe_dsa")
    cfg = dict(vocab_size=3000, hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4, **BASE)
    h = conv.hparams({**cfg, "index_topk_freq": 2, "index_skip_topk_offset": 2})
    assert h.indexer_full == (True, True, False, True, False, True)  # transformers: full if max(i - offset + 1, 0) % freq == 0
    assert _metadata_value(conv, h, "glm-dsa.attention.indexer.types") == [True, True, False, True, False, True]
    assert conv.hparams({**cfg, "index_topk_pattern": "FSSFSS"}).indexer_full == (True, False, False, True, False, False)
    assert conv.hparams(cfg).indexer_full == (True,) * 6


def _metadata_value(conv, h, key):
    return conv.metadata(h)[key].value


# --------------------------------------------------------------------------- the vendored converter

_DRIVER = """
import runpy, sys
root = sys.argv[1]
sys.argv = [root + "/convert_hf_to_gguf.py"] + sys.argv[2:]
sys.path[:0] = [root, root + "/gguf-py"]
import conversion.glm as glm, conversion.deepseek as dsk
for cls in (glm.GlmMoeDsaModel, dsk.DeepseekV32Model):
    cls.set_vocab = lambda self: self._set_vocab_sentencepiece()
runpy.run_path(root + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def reference_convert(src: Path, out: Path) -> Path:
    LLAMA_CPP = vendored_llama_cpp("conversion")
    r = subprocess.run([sys.executable, "-c", _DRIVER, LLAMA_CPP, str(src), "--outtype", "f32", "--outfile", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("model_type,extra", [("deepseek_v32", {}), ("glm_moe_dsa", dict(num_hidden_layers=3, indexer_types=["full", "shared", "full"]))])
def test_tensors_equal_vendored_converter_with_mtp(tmp_path, model_type, extra):
    """Per-expert keys (what the vendored converter reads) plus one MTP block: the same tensors bit for bit, nextn block included
    (kept as blk.N, nextn_predict_layers 1), the same metadata but for expert_gating_func (which it leaves out); llama.cpp runs
    the file and its trunk gives transformers' logits."""
    src = build(tmp_path / "hf", model_type, **extra)
    ref_logits = hf_logits(src, IDS)
    add_nextn(src)
    ours = convert(src, tmp_path / "ours.gguf", "f32")
    ref = reference_convert(src, tmp_path / "ref.gguf")
    assert _tensors(ours) == _tensors(ref)
    arch = ARCH[model_type]
    md, md_ref = _metadata(ours), _metadata(ref)
    n = extra.get("num_hidden_layers", 2)
    assert (md[f"{arch}.block_count"], md[f"{arch}.nextn_predict_layers"]) == (n + 1, 1)
    assert f"blk.{n}.nextn.eh_proj.weight" in _tensors(ours) and f"blk.{n}.indexer.attn_k.weight" in _tensors(ours)
    differ = {k for k in md.keys() | md_ref.keys() if k.startswith(arch + ".") and md.get(k) != md_ref.get(k)}
    assert differ == {f"{arch}.expert_gating_func"}, differ
    assert md[f"{arch}.expert_gating_func"] == SIGMOID
    assert_close(llama_logits(ours, IDS), ref_logits)


def test_fused_layout_converts_to_the_same_tensors(tmp_path):
    """transformers 5's fused experts (which llama.cpp's converter cannot read) give the per-expert checkpoint's tensors."""
    per = build(tmp_path / "per", "deepseek_v32")
    fused = build(tmp_path / "fused", "deepseek_v32", fused=True)
    assert _tensors(convert(per, tmp_path / "a.gguf", "f32")) == _tensors(convert(fused, tmp_path / "b.gguf", "f32"))


# --------------------------------------------------------------------------- refusals

_HBASE = dict(vocab_size=3000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, **BASE)


@pytest.mark.parametrize("model_type,edits,needle", [
    ("deepseek_v32", dict(index_head_dim=96), "index_head_dim"),  # llama.cpp's Hadamard product: powers of two from 64 only
    ("deepseek_v32", dict(index_head_dim=8), "index_head_dim"),  # smaller than the rotary part of each indexer head
    ("glm_moe_dsa", dict(index_head_dim=32), "index_head_dim"),
    ("deepseek_v32", dict(q_lora_rank=None), "q_lora_rank"),
    ("deepseek_v32", dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    ("deepseek_v32", dict(mlp_layer_types=["sparse", "dense"]), "mlp_layer_types"),
    ("deepseek_v32", dict(attention_bias=True), "attention_bias"),
    ("deepseek_v32", dict(scoring_func="softmax"), "scoring_func"),
    ("glm_moe_dsa", dict(indexer_types=["shared", "full"]), "indexer_types"),
    ("glm_moe_dsa", dict(indexer_types=["full"]), "indexer_types"),
    ("glm_moe_dsa", dict(index_topk_pattern="FX"), "index_topk_pattern"),
])
def test_refused_with_one_line(model_type, edits, needle):
    from quantkit.converters import for_model_type
    from quantkit.errors import CheckpointError

    with pytest.raises(CheckpointError) as e:
        for_model_type(model_type).hparams({**_HBASE, **edits})
    msg = str(e.value)
    assert needle in msg and "fix:" in msg and "\n" not in msg, msg


def test_shared_block_with_indexer_weights_refused(tmp_path):
    """A checkpoint whose config makes block 1 shared but that holds indexer weights for it: refused, nothing written."""
    import json

    src = build(tmp_path / "hf", "glm_moe_dsa")  # both blocks full
    cfg = json.loads((src / "config.json").read_text())
    cfg["indexer_types"] = ["full", "shared"]
    (src / "config.json").write_text(json.dumps(cfg))
    assert_convert_refused(src, tmp_path, ["indexer_types", "model.layers.1.self_attn.indexer"])
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("model_type", ["deepseek_v32", "glm_moe_dsa"])
def test_indexer_names_are_in_the_vendored_llama_cpp_tables(model_type):
    from quantkit.converters import for_model_type

    LLAMA_CPP = vendored_llama_cpp("gguf-py")
    conv = for_model_type(model_type)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import gguf; a = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == sys.argv[2]); "
            "print('\\n'.join(gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[a]))")
    r = subprocess.run([sys.executable, "-c", code, LLAMA_CPP + "/gguf-py", conv.arch], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    allowed = set(r.stdout.split())
    written = {x.gguf.removesuffix(".weight").removesuffix(".bias") for x in conv.rules(["model.layers.2.eh_proj.weight", "model.layers.0.self_attn.q_a_proj.weight"])}
    assert written <= allowed, sorted(written - allowed)


#: what the refusal of index_head_dim guards against: llama.cpp aborts the whole process on such a file
_ABORT = """
import dataclasses, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from conftest import convert
from quantkit import converters
conv = converters.for_model_type("deepseek_v32")
hd = int(sys.argv[3])
hp = lambda config: dataclasses.replace(conv.hparams({**config, "index_head_dim": 64}), index_head_dim=hd)
converters.CONVERTERS["deepseek_v32"] = dataclasses.replace(conv, hparams=hp)
out = convert(Path(sys.argv[2]), Path(sys.argv[2]).parent / "m.gguf", "f32")
from llama_cpp import Llama
Llama(str(out), n_ctx=64, verbose=False, n_threads=1).eval([1, 5, 7])
print("ran")
"""


def test_index_head_dim_refusal_is_needed(tmp_path):
    """The file quantkit refuses to write (index_head_dim 32, written anyway by bypassing the check) aborts llama.cpp
    (GGML_ASSERT in the indexer's Hadamard product); heads of 64 run (every parity test above)."""
    src = build(tmp_path / "hf", "deepseek_v32", index_head_dim=32)
    tests = str(Path(__file__).parent)
    r = subprocess.run([sys.executable, "-c", _ABORT, tests, str(src), "32"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "ran" not in r.stdout and "GGML_ASSERT" in r.stderr, (r.returncode, r.stderr[-2000:])


try:
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    st = None

if st is not None:
    _KEYS = sorted({*_HBASE, "index_topk", "index_head_dim", "index_n_heads", "indexer_types", "index_topk_pattern", "index_topk_freq",
                    "index_skip_topk_offset", "mlp_layer_types", "first_k_dense_replace", "num_nextn_predict_layers", "q_lora_rank",
                    "scoring_func", "topk_method", "partial_rotary_factor", "rope_parameters", "routed_scaling_factor", "norm_topk_prob"})
    _VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.sampled_from([0, 64, 128, 2**32, -(2**63)]),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4), st.sampled_from(["FS", "SF", "FFF", "sigmoid", "noaux_tc"]),
                        st.lists(st.sampled_from(["dense", "sparse", "full", "shared", 1]), max_size=4),
                        st.dictionaries(st.sampled_from(["rope_type", "factor", "rope_theta", "partial_rotary_factor"]),
                                        st.one_of(st.sampled_from(["default", "yarn", "linear"]), st.floats(-2, 50)), max_size=3))

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(model_type=st.sampled_from(sorted(ARCH)), edits=st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=4))
    @example(model_type="deepseek_v32", edits={"num_hidden_layers": 2**32})  # once built a list per layer first: out of memory
    @example(model_type="glm_moe_dsa", edits={"num_hidden_layers": 2**32})
    def test_hostile_config_is_refused_with_a_checkpoint_error(model_type, edits):
        """Whatever config.json holds, reading it gives hyperparameters and their metadata, or a one-line CheckpointError."""
        import math

        from quantkit.converters import for_model_type
        from quantkit.errors import CheckpointError

        conv = for_model_type(model_type)
        try:
            h = conv.hparams({**_HBASE, **edits})
        except CheckpointError as e:
            assert "fix:" in str(e) and "\n" not in str(e)
            return
        md = conv.metadata(h)
        assert all(math.isfinite(v.value) for v in md.values() if isinstance(v.value, float))
