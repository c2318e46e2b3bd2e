"""``model_type: deepseek_v32``: DeepSeek-V3.2 checkpoints -> GGUF arch ``deepseek32``.

transformers 5.23's ``modeling_deepseek_v32.py`` is DeepSeek V3's model (multi-head latent
attention, sigmoid routing with ``e_score_correction_bias`` within groups, shared experts) plus
DeepSeek Sparse Attention: in every block a lightning indexer scores the cached tokens and each
query attends to the best ``index_topk`` of them only.  The vendored llama.cpp's converter
(``conversion/deepseek.py`` ``DeepseekV32Model``, a ``DeepseekV2Model``) writes it as
``deepseek32`` and its graph (``src/models/deepseek32.cpp``) computes the same indexer; the MLA
name table, transforms, routing keys and checks are ``converters/_deepseek.py``'s.  What is V3.2's
own:

* the indexer (``self_attn.indexer.*``): ``wq_b`` -> ``indexer.attn_q_b`` (queries from the
  low-rank query latent), ``wk`` -> ``indexer.attn_k``, the LayerNorm ``k_norm`` (weight and
  bias) -> ``indexer.k_norm``, ``weights_proj`` -> ``indexer.proj``, and the keys
  ``attention.indexer.head_count`` / ``key_length`` / ``top_k`` (``index_n_heads`` /
  ``index_head_dim`` / ``index_topk``).  Rotary embeddings turn the first ``qk_rope_head_dim``
  dimensions of each indexer head by halves (NEOX) in both programs; llama.cpp multiplies the
  indexer's queries and keys by a Hadamard matrix (their dot products are unchanged), which it
  builds only for a power-of-two ``index_head_dim`` of at least 64 (any other size is refused:
  its graph aborts);
* the main attention always rotates interleaved pairs (transformers' V3.2 has no
  ``rope_interleave``), and always has low-rank queries (``q_lora_rank`` is required);
* dense and MoE blocks come from ``mlp_layer_types`` (``first_k_dense_replace`` dense blocks
  first when absent), written as ``leading_dense_block_count`` (refused when a dense block
  follows a MoE block);
* ``expert_gating_func`` sigmoid is always written (llama.cpp's deepseek32 loader requires it);
* multi-token-prediction blocks (``model.layers.{num_hidden_layers + i}``, which transformers does
  not load) are kept, as llama.cpp's converter keeps them for V3.2: ``blk.N`` with its ``nextn.*``
  tensors, the block count grown by them, ``nextn_predict_layers``; a checkpoint without them is
  written without them (as ``--no-mtp``).

What the tests can show: with fewer tokens than ``index_topk`` every cached token is selected in
both programs, so sparse attention is dense attention and the logits agree whatever the indexer
computes.  A context longer than ``index_topk`` makes the selection matter: then the two
programs agree only where their indexer scores rank the tokens alike (transformers in the
checkpoint's dtype, llama.cpp in F32 after the Hadamard product, with its indexer keys cached in
the KV cache type), ties included (``relu`` makes many scores exactly 0).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

from quantkit.converters import MLP_EXPERTS, Routing, register
from quantkit.converters import _deepseek as ds
from quantkit.converters._deepseek import Family, _refuse
from quantkit.converters.dots1 import with_class_defaults
from quantkit.converters.glm4_moe import NextnConverter, check_nextn, nextn_rules, rope_settings
from quantkit.converters.glm4_moe_lite import LiteHparams, dense_lead
from quantkit.converters.llama import IGNORE, LLAMA_MAX_LAYERS, _get, _p
from quantkit.errors import CheckpointError
from quantkit.format import gguf_spec
from quantkit.format.gguf_write import MetaValue
from quantkit.hf.checkpoint import shown
from quantkit.hf.mapping import OutTensor, Role, Rule

MODEL_TYPE = "deepseek_v32"
ARCH = "deepseek32"  # gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK32]
T = gguf_spec.TensorName

#: DeepseekV32Config's defaults (transformers 5.23) for the keys the DeepSeek pieces read
DEFAULTS = dict(
    kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1,
    moe_intermediate_size=2048, routed_scaling_factor=2.5, n_group=8, topk_group=4, num_experts_per_tok=8, norm_topk_prob=True,
)
#: the sizes :func:`_deepseek.hparams_for` reads with defaults of its own (or none)
SIZE_DEFAULTS = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61, num_attention_heads=128,
                     num_key_value_heads=128, max_position_embeddings=163840, rms_norm_eps=1e-6)
INDEX_DEFAULTS = dict(index_topk=2048, index_head_dim=128, index_n_heads=64)
FIRST_K_DENSE_DEFAULT = 3


@dataclass(frozen=True)
class DsaSpec:
    """What tells the DeepSeek Sparse Attention families apart (deepseek_v32, glm_moe_dsa)."""

    family: Family
    arch: str
    size_defaults: dict[str, Any]
    index_defaults: dict[str, Any]
    first_k_dense: int  # first_k_dense_replace's class default (mlp_layer_types' default follows it)
    #: config.json -> which trunk blocks run their own indexer (True) or reuse the previous one's top-k; None: every block
    indexer_types: Callable[[dict[str, Any], int], tuple[bool, ...]] | None = None


@dataclass(frozen=True)
class DsaHparams(LiteHparams):
    index_n_head: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    indexer_full: tuple[bool, ...] = ()  # per trunk block (written as attention.indexer.types); () = every block, no key


def _index_int(config: dict[str, Any], spec: DsaSpec, key: str) -> int:
    value = config.get(key)
    if value is None:
        value = spec.index_defaults[key]
    return _get({key: value}, key, int)


def hparams_for(spec: DsaSpec) -> Callable[[dict[str, Any]], DsaHparams]:
    deepseek_hparams = ds.hparams_for(spec.family)

    def hparams(config: dict[str, Any]) -> DsaHparams:
        filled = with_class_defaults(config, spec.size_defaults)
        n_layer = filled["num_hidden_layers"]
        if isinstance(n_layer, bool) or not isinstance(n_layer, int) or n_layer < 1:
            raise CheckpointError(f"config.json: key 'num_hidden_layers' = {shown(n_layer)}, expected a positive integer; fix: restore the original value")
        if n_layer > LLAMA_MAX_LAYERS:  # before anything is built per layer
            raise CheckpointError(f"config.json: num_hidden_layers = {n_layer}, more than the {LLAMA_MAX_LAYERS} llama.cpp supports (it aborts loading "
                                  "such a file); fix: none with this llama.cpp, the model is too deep")
        if filled.get("mlp_layer_types") is None:  # the config class's default: first_k_dense_replace dense blocks, then MoE blocks
            fk = config.get("first_k_dense_replace")
            fk = spec.first_k_dense if fk is None else _get({"first_k_dense_replace": fk}, "first_k_dense_replace", int, positive=False)
            n_dense = min(fk, n_layer)
            filled["mlp_layer_types"] = ["dense"] * n_dense + ["sparse"] * (n_layer - n_dense)
        filled["first_k_dense_replace"] = dense_lead(filled, n_layer)  # transformers reads mlp_layer_types only
        q_lora = config.get("q_lora_rank", spec.family.defaults["q_lora_rank"])
        if q_lora is None or q_lora == 0:
            raise _refuse("q_lora_rank", q_lora, f"transformers' {spec.family.model_type} attention always has low-rank queries (q_a_proj / q_b_proj), "
                          f"and llama.cpp's {spec.arch} graph reads attn_q_a / attn_q_b", "restore the original value")
        _, _, factor = rope_settings(config, 1.0)
        if factor != 1.0:
            raise _refuse("partial_rotary_factor", factor, f"transformers' {spec.family.model_type} rotary embedding turns all qk_rope_head_dim "
                          "dimensions, while llama.cpp's converter would narrow the rotary width (the checkpoint's two references disagree)",
                          "remove the key if the model turns every rotary dimension")
        declared = config.get("num_nextn_predict_layers", 0)
        if declared is None:
            declared = 0
        if isinstance(declared, bool) or not isinstance(declared, int) or declared < 0:
            raise CheckpointError(f"config.json: key 'num_nextn_predict_layers' = {shown(declared)}, expected a number of blocks; fix: restore the original value")
        h = deepseek_hparams(filled)
        n_head_idx, head_dim_idx, topk = (_index_int(config, spec, k) for k in ("index_n_heads", "index_head_dim", "index_topk"))
        if head_dim_idx < h.qk_rope_head_dim:
            raise _refuse("index_head_dim", head_dim_idx, f"each indexer head starts with the qk_rope_head_dim = {h.qk_rope_head_dim} rotary "
                          "dimensions (transformers fails on a smaller head)", "restore the original value")
        if head_dim_idx < 64 or head_dim_idx & (head_dim_idx - 1):
            raise _refuse("index_head_dim", head_dim_idx, f"llama.cpp's {spec.arch} graph multiplies the indexer's queries and keys by a Hadamard "
                          "matrix it builds only for powers of two from 64 (it aborts on any other size)", "none with this llama.cpp")
        full = spec.indexer_types(config, h.n_layer) if spec.indexer_types else ()
        return DsaHparams(**{f: getattr(h, f) for f in h.__dataclass_fields__}, n_trunk=h.n_layer, n_mtp=0, n_mtp_declared=declared,
                          index_n_head=n_head_idx, index_head_dim=head_dim_idx, index_topk=topk, indexer_full=full)

    return hparams


# --------------------------------------------------------------------------- the name table

_IDX = "model.layers.{bid}.self_attn.indexer."
INDEXER_RULES: tuple[Rule, ...] = (  # optional: check() says which blocks hold them
    _p(_IDX + "wq_b.weight", T.INDEXER_ATTN_Q_B, Role.ATTENTION, lambda h: (h.index_n_head * h.index_head_dim, h.q_lora_rank), optional=True),
    _p(_IDX + "wk.weight", T.INDEXER_ATTN_K, Role.ATTENTION, lambda h: (h.index_head_dim, h.n_embd), optional=True),
    _p(_IDX + "k_norm.weight", T.INDEXER_K_NORM, Role.NORM, lambda h: (h.index_head_dim,), optional=True),
    Rule(_IDX + "k_norm.bias", T.INDEXER_K_NORM + ".bias", Role.NORM, lambda h: (h.index_head_dim,), optional=True),
    _p(_IDX + "weights_proj.weight", T.INDEXER_PROJ, Role.ATTENTION, lambda h: (h.index_n_head, h.n_embd), optional=True),
)
#: GGUF name (after ``blk.N.``) -> the checkpoint's name (after ``model.layers.N.``)
_INDEXER_HF = {r.gguf.split(".", 2)[2]: r.hf.split(".", 3)[3] for r in INDEXER_RULES}


def rules_for(spec: DsaSpec) -> Callable[[list[str]], tuple[Rule, ...]]:
    deepseek_rules = ds.rules_for(spec.family)

    def rules(names: list[str]) -> tuple[Rule, ...]:
        return tuple(deepseek_rules(names)) + INDEXER_RULES + nextn_rules(names)

    return rules


def check_indexer(h: DsaHparams, tensors: list[OutTensor]) -> None:
    """Indexer tensors in every trunk block that runs an indexer, none in the others; an MTP block's all or none
    (llama.cpp's MTP draft head runs dense attention: it loads them only with the MTP block)."""
    have: dict[int, set[str]] = {}
    for t in tensors:
        b = gguf_spec.block_of(t.name)
        if b is not None:
            have.setdefault(b, set()).add(t.name.split(".", 2)[2])
    for b in range(h.n_layer):
        present = sorted(n for n in _INDEXER_HF if n in have.get(b, set()))
        wanted = (h.indexer_full[b] if h.indexer_full else True) if b < h.n_trunk else bool(present)
        if wanted and len(present) != len(_INDEXER_HF):
            missing = next(n for n in _INDEXER_HF if n not in present)
            raise CheckpointError(f"checkpoint: tensor 'model.layers.{b}.{_INDEXER_HF[missing]}' is missing (block {b} runs a lightning indexer); "
                                  "fix: re-download the checkpoint, or use the config.json that belongs to these weights")
        if not wanted and present:
            raise CheckpointError(f"checkpoint: tensor 'model.layers.{b}.{_INDEXER_HF[present[0]]}' is in block {b}, which config.json's "
                                  "indexer_types makes a \"shared\" block (no indexer of its own); fix: use the config.json that belongs to these weights")


def check_for(spec: DsaSpec) -> Callable[[DsaHparams, list[OutTensor]], None]:
    def check(h: DsaHparams, tensors: list[OutTensor]) -> None:
        if not any(t.name.endswith(".attn_q_a.weight") for t in tensors):
            raise CheckpointError(f"checkpoint: no self_attn.q_a_proj / q_b_proj (the checkpoint has q_proj), but transformers' {spec.family.model_type} "
                                  "always has low-rank queries; fix: use the checkpoint of this model_type")
        ds.check(h, tensors)
        check_nextn(h, tensors)
        check_indexer(h, tensors)

    return check


def metadata_for(spec: DsaSpec) -> Callable[[DsaHparams], dict[str, MetaValue]]:
    def metadata(h: DsaHparams) -> dict[str, MetaValue]:
        K, V = gguf_spec.Keys, gguf_spec.GGUFValueType
        a = spec.arch
        md = ds.metadata(h, a)
        md[K.Attention.INDEXER_HEAD_COUNT.format(arch=a)] = MetaValue(int(h.index_n_head), V.UINT32)
        md[K.Attention.INDEXER_KEY_LENGTH.format(arch=a)] = MetaValue(int(h.index_head_dim), V.UINT32)
        md[K.Attention.INDEXER_TOP_K.format(arch=a)] = MetaValue(int(h.index_topk), V.UINT32)
        if h.indexer_full:
            md[K.Attention.INDEXER_TYPES.format(arch=a)] = MetaValue([bool(x) for x in h.indexer_full], V.ARRAY, V.BOOL)
        if h.n_mtp:
            md[K.LLM.NEXTN_PREDICT_LAYERS.format(arch=a)] = MetaValue(int(h.n_mtp), V.UINT32)
        return md

    return metadata


DSA_NOTES = (
    "lightning indexer: self_attn.indexer.{wq_b,wk,k_norm,weights_proj} -> indexer.{attn_q_b,attn_k,k_norm,proj}, with "
    "attention.indexer.head_count / key_length / top_k",
    "dense blocks from mlp_layer_types (what transformers reads), written as leading_dense_block_count",
    "multi-token-prediction blocks (model.layers.N past num_hidden_layers) are kept as blk.N with their nextn.* tensors, as llama.cpp's "
    "converter keeps them; a checkpoint without them is written without them (as --no-mtp)",
)


def register_dsa(spec: DsaSpec, hf_architectures: tuple[str, ...], routing: Routing, notes: tuple[str, ...]) -> NextnConverter:
    return register(NextnConverter(
        model_type=spec.family.model_type, arch=spec.arch, hparams=hparams_for(spec), rules=rules_for(spec), metadata=metadata_for(spec),
        check=check_for(spec), ignore=IGNORE, hf_architectures=hf_architectures, routing=routing, notes=ds.NOTES + DSA_NOTES + notes,
        # --format bnb: as deepseek_v3 (MTP blocks, which transformers does not load, left out); the indexer's wq_b / wk 4-bit, its
        # weights_proj kept in source precision (transformers casts the indexer's input to that weight's dtype; DeepSeek keeps it bf16)
        hf_experts=replace(MLP_EXPERTS, kept=("model.layers.{bid}.self_attn.indexer.weights_proj.weight",)),
    ))


FAMILY = Family(model_type=MODEL_TYPE, gating="sigmoid", defaults={**DEFAULTS, "first_k_dense_replace": FIRST_K_DENSE_DEFAULT},
                aliases={"n_routed_experts": ("num_local_experts",)})
SPEC = DsaSpec(family=FAMILY, arch=ARCH, size_defaults=SIZE_DEFAULTS, index_defaults=INDEX_DEFAULTS, first_k_dense=FIRST_K_DENSE_DEFAULT)
ROUTING = Routing(scoring="sigmoid", normalize_top_k=True, score_bias=True, group_limited=True, weights_scaled=True,
                  per_checkpoint=("normalize_top_k", "group_limited"))
NOTES = ("routing: sigmoid, selection by score + e_score_correction_bias (exp_probs_b) within the best topk_group groups, top-k renormalised "
         "when norm_topk_prob, times routed_scaling_factor; expert_gating_func is always written",)

CONVERTER = register_dsa(SPEC, ("DeepseekV32ForCausalLM",), ROUTING, NOTES)

