"""Every bad input: a one-line error naming the file or key and the fix, exit 1, no output file.

Each case breaks a copy of a small valid checkpoint in one way and runs the
real CLI.  After each failure the output directory must hold nothing new
(no partial file, no temp file).
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from typer.testing import CliRunner

from conftest import assert_convert_refused, random_model
from quantkit.cli.main import app


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("good") / "hf", "mixtral", max_shard_size="300KB")


@pytest.fixture
def model(good, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(good, dst)
    return dst


def _shards(d):
    return sorted(d.glob("*.safetensors"))


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def _index(d):
    return json.loads((d / "model.safetensors.index.json").read_text())


def _drop_tensor(d, name):
    idx = _index(d)
    shard = d / idx["weight_map"].pop(name)
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))

    def edit(h):
        info = h.pop(name)
        lo, hi = info["data_offsets"]
        for v in h.values():  # close the gap so the file stays a valid safetensors file
            if isinstance(v, dict) and "data_offsets" in v and v["data_offsets"][0] >= hi:
                v["data_offsets"] = [v["data_offsets"][0] - (hi - lo), v["data_offsets"][1] - (hi - lo)]
        edit.cut = (lo, hi)

    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    _rewrite_header(shard, edit)
    raw2 = shard.read_bytes()
    (n2,) = struct.unpack("<Q", raw2[:8])
    lo, hi = edit.cut
    data = raw[8 + n :]
    shard.write_bytes(raw2[: 8 + n2] + data[:lo] + data[hi:])


def _rename_tensor(d, old, new):
    idx = _index(d)
    shard = d / idx["weight_map"][old]
    idx["weight_map"][new] = idx["weight_map"].pop(old)
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    _rewrite_header(shard, lambda h: h.__setitem__(new, h.pop(old)))


def _set_config(d, **kv):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kv)
    (d / "config.json").write_text(json.dumps(cfg))


def _raw_header_edit(d, edit):
    """Rewrite the first shard's header text (for headers json.dumps cannot write, e.g. a key listed twice)."""
    path = _shards(d)[0]
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    blob = edit(raw[8 : 8 + n].decode())
    blob = blob.encode() + b" " * (-len(blob.encode()) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def _duplicate_first_entry(text):
    header = json.loads(text)
    name = next(k for k in header if k != "__metadata__")
    return text.replace("{", "{" + json.dumps(name) + ": " + json.dumps(header[name]) + ", ", 1)


def _key(d, pattern):
    return next(k for k in _index(d)["weight_map"] if pattern in k)


def _edit_json(path, edit):
    obj = json.loads(path.read_text())
    obj = edit(obj) or obj
    path.write_text(json.dumps(obj))


def _set_tcfg(d, **kv):
    _edit_json(d / "tokenizer_config.json", lambda c: c.update(kv))


def _set_index(d, edit):
    _edit_json(d / "model.safetensors.index.json", edit)


def _single_file(d, make):
    """No index and no shards, then ``make(d / "model.safetensors")``."""
    for p in [*_shards(d), d / "model.safetensors.index.json"]:
        p.unlink()
    make(d / "model.safetensors")


def _swap_shards(idx):
    """Two tensors of different shards trade places in the index (each shard still holds its own)."""
    wm = idx["weight_map"]
    a = next(iter(wm))
    b = next(k for k in wm if wm[k] != wm[a])
    wm[a], wm[b] = wm[b], wm[a]


def _raw_header(d, blob):
    p = _shards(d)[0]
    p.write_bytes(struct.pack("<Q", len(blob)) + blob)


def _copy_tensor(d, name, new):
    """Store tensor ``name``'s bytes a second time under ``new`` (at the end of the same shard)."""
    idx = _index(d)
    shard = d / idx["weight_map"][name]
    idx["weight_map"][new] = idx["weight_map"][name]
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    lo, hi = header[name]["data_offsets"]
    header[new] = {**header[name], "data_offsets": [len(data), len(data) + hi - lo]}
    blob = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(blob)) + blob + data + data[lo:hi])


#: a minimal byte-level BPE tokenizer.json; _bpe(d, ...) writes it (edited) in place of tokenizer.model
BPE = {
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]},
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
    "added_tokens": [{"id": 3, "content": "<s>", "special": True}],
}


def _bpe(d, edit=None, raw=None):
    import copy

    (d / "tokenizer.model").unlink()
    tj = copy.deepcopy(BPE)
    if edit:
        tj = edit(tj) or tj
    (d / "tokenizer.json").write_text(raw if raw is not None else json.dumps(tj))


def _huge_int_config(d):
    p = d / "config.json"
    p.write_text(p.read_text().replace('"vocab_size": 3000', '"vocab_size": 3' + "0" * 5000))


CASES = {
    "missing config.json": (lambda d: (d / "config.json").unlink(), ["config.json", "missing"]),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{oops"), ["config.json", "not valid JSON"]),
    "missing weights": (lambda d: [p.unlink() for p in [*_shards(d), d / "model.safetensors.index.json"]], ["no *.safetensors", "fix:"]),
    "index names a missing shard": (lambda d: _shards(d)[1].unlink(), ["model.safetensors.index.json", "missing", "download"]),
    "truncated shard": (lambda d: (p := _shards(d)[0]).write_bytes(p.read_bytes()[:-1000]), ["truncated", ".safetensors"]),
    "corrupt header": (lambda d: (p := _shards(d)[0]).write_bytes(struct.pack("<Q", 40) + b"{not json" + p.read_bytes()[17:]), ["corrupt safetensors header"]),
    "absurd header size": (lambda d: (p := _shards(d)[0]).write_bytes(struct.pack("<Q", 1 << 50) + p.read_bytes()[8:]), ["header claims"]),
    "shape disagrees with config": (lambda d: _set_config(d, intermediate_size=512), ["shape", "config.json implies"]),
    "layer count disagrees": (lambda d: _set_config(d, num_hidden_layers=1), ["num_hidden_layers"]),
    "expert missing": (lambda d: _drop_tensor(d, "model.layers.1.block_sparse_moe.experts.2.w3.weight"), ["experts.2.w3", "missing"]),
    "tensor left over": (lambda d: _rename_tensor(d, "model.layers.0.input_layernorm.weight", "model.layers.0.mystery.weight"), ["mystery", "matches no known tensor"]),
    "lm_head missing, not tied": (lambda d: _drop_tensor(d, "lm_head.weight"), ["lm_head.weight", "tie_word_embeddings"]),
    "unknown model_type": (lambda d: _set_config(d, model_type="gpt_neox"), ["gpt_neox", "supported:", "mixtral"]),
    "config value wrong type": (lambda d: _set_config(d, hidden_size="128"), ["hidden_size", "expected an integer"]),
    "tensor listed twice in a header": (lambda d: _raw_header_edit(d, _duplicate_first_entry), ["listed twice", ".safetensors"]),
    "__metadata__ not an object": (lambda d: _rewrite_header(_shards(d)[0], lambda h: h.__setitem__("__metadata__", ["pt"])), ["__metadata__", "not an object"]),
    "linear rope without factor": (lambda d: _set_config(d, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0}), ["linear", "factor", "fix:"]),
    "context beyond int32": (lambda d: _set_config(d, max_position_embeddings=2**31), ["max_position_embeddings", "2147483647", "fix:"]),
    "bos_token not in the vocabulary": (lambda d: (d / "tokenizer_config.json").write_text(json.dumps({**json.loads((d / "tokenizer_config.json").read_text()), "bos_token": "<nope>"})), ["bos_token", "<nope>", "not a token"]),
    "hidden_act not silu": (lambda d: _set_config(d, hidden_act="gelu"), ["hidden_act", "gelu", "SiLU", "fix:"]),
    "missing tokenizer": (lambda d: (d / "tokenizer.model").unlink(), ["tokenizer.model", "tokenizer.json"]),
    "corrupt tokenizer.model": (lambda d: (d / "tokenizer.model").write_bytes(b"garbage"), ["tokenizer.model", "SentencePiece"]),
    "pytorch pickle": (lambda d: [p.unlink() for p in [*_shards(d), d / "model.safetensors.index.json"]] and (d / "pytorch_model.bin").write_bytes(b"\x80\x04"), ["pytorch_model.bin", "pickle", "refused"]),
    "other pickle names": (lambda d: [p.unlink() for p in [*_shards(d), d / "model.safetensors.index.json"]] and (d / "model.ckpt").write_bytes(b"\x80\x04"), ["model.ckpt", "pickle", "refused"]),
    # --- issue #12, hostile HF directories ---------------------------------------------------------------
    # safetensors files and the index
    "header nested 200k deep": (lambda d: _raw_header(d, b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"), ["corrupt safetensors header", "nested"]),
    "header dtype not a string": (lambda d: _rewrite_header(_shards(d)[0], lambda h: next(v for v in h.values() if "dtype" in v).update(dtype=["F32"])), ["unsupported dtype"]),
    "index weight_map a list": (lambda d: _set_index(d, lambda i: i.update(weight_map=list(i["weight_map"]))), ["model.safetensors.index.json", "weight_map", "array"]),
    "index weight_map value not a string": (lambda d: _set_index(d, lambda i: i["weight_map"].update({next(iter(i["weight_map"])): 5})), ["model.safetensors.index.json", "expected a shard file name"]),
    "index a JSON list": (lambda d: (d / "model.safetensors.index.json").write_text("[]"), ["model.safetensors.index.json", "found a JSON array"]),
    "index names the wrong shard": (lambda d: _set_index(d, _swap_shards), ["model.safetensors.index.json", "holds it"]),
    "model.safetensors a symlink loop": (lambda d: _single_file(d, lambda p: p.symlink_to(p.name)), ["model.safetensors", "symlink"]),
    "model.safetensors a directory": (lambda d: _single_file(d, lambda p: p.mkdir()), ["model.safetensors", "is a directory"]),
    "layer number with a leading zero": (lambda d: _copy_tensor(d, "model.layers.1.input_layernorm.weight", "model.layers.01.input_layernorm.weight"), ["layers.01", "matches no known tensor"]),
    "layer number of 5000 digits": (lambda d: _rename_tensor(d, "model.layers.1.input_layernorm.weight", "model.layers.1" + "0" * 5000 + ".input_layernorm.weight"), ["matches no known tensor"]),
    # config.json: wrong JSON types, values too large for their GGUF field
    "num_local_experts a string": (lambda d: _set_config(d, num_local_experts="abc"), ["num_local_experts", "expected an integer"]),
    "num_local_experts a list": (lambda d: _set_config(d, num_local_experts=[8]), ["num_local_experts", "expected an integer"]),
    "num_local_experts a numeric string": (lambda d: _set_config(d, num_local_experts="4"), ["num_local_experts", "expected an integer"]),
    "num_local_experts a float": (lambda d: _set_config(d, num_local_experts=4.7), ["num_local_experts", "expected an integer"]),
    "num_experts_per_tok a string": (lambda d: _set_config(d, num_experts_per_tok="2"), ["num_experts_per_tok", "expected an integer"]),
    "rope_theta a string": (lambda d: _set_config(d, rope_theta="abc"), ["rope_theta", "expected a number"]),
    "rope_parameters a list": (lambda d: _set_config(d, rope_parameters=[1, 2]), ["rope_parameters", "expected an object"]),
    "rope_scaling a list": (lambda d: _set_config(d, rope_parameters=None, rope_scaling=["linear"]), ["rope_scaling", "expected an object"]),
    "rope factor a string": (lambda d: _set_config(d, rope_parameters={"rope_type": "linear", "factor": "abc"}), ["rope_parameters.factor", "expected a number"]),
    "rope llama3 low = high": (lambda d: _set_config(d, rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 2.0}), ["high_freq_factor"]),
    "max_position_embeddings beyond uint32": (lambda d: _set_config(d, max_position_embeddings=2**40), ["max_position_embeddings", "uint32"]),
    "rms_norm_eps beyond float32": (lambda d: _set_config(d, rms_norm_eps=1e300), ["rms_norm_eps", "float32"]),
    "rms_norm_eps NaN": (lambda d: _set_config(d, rms_norm_eps=float("nan")), ["rms_norm_eps", "finite"]),
    "tie_word_embeddings a string": (lambda d: _set_config(d, tie_word_embeddings="false"), ["tie_word_embeddings", "true or false"]),
    "sliding_window a string": (lambda d: _set_config(d, sliding_window="4096"), ["sliding_window", "expected an integer"]),
    "odd head_dim": (lambda d: _set_config(d, num_attention_heads=128, num_key_value_heads=64, head_dim=1), ["head_dim", "even"]),
    # olmoe configs llama.cpp's olmoe graph cannot compute (refused from config.json, before any tensor is read)
    "olmoe with GQA": (lambda d: _set_config(d, model_type="olmoe"), ["num_key_value_heads = 2", "olmoe graph", "as many KV heads as query heads"]),
    "olmoe norm_topk_prob true": (lambda d: _set_config(d, model_type="olmoe", num_key_value_heads=4, norm_topk_prob=True), ["norm_topk_prob = True", "never"]),
    "olmoe clip_qkv": (lambda d: _set_config(d, model_type="olmoe", num_key_value_heads=4, clip_qkv=8.0), ["clip_qkv = 8.0", "does not clamp"]),
    "olmoe head_dim not hidden/heads": (lambda d: _set_config(d, model_type="olmoe", num_key_value_heads=4, head_dim=48), ["head_dim = 48", "hidden_size = 128"]),
    # granitemoe configs llama.cpp's granite graph would compute differently (refused from config.json; more in test_granitemoe.py)
    "granitemoe hidden_act gelu": (lambda d: _set_config(d, model_type="granitemoe", hidden_act="gelu"), ["hidden_act = 'gelu'", "SiLU", "fix:"]),
    "granitemoe residual_multiplier 0": (lambda d: _set_config(d, model_type="granitemoe", residual_multiplier=0), ["residual_multiplier = 0", "llama.cpp reads 0 as no residual scaling"]),
    # dots1 / minimax_m2 / ernie4_5_moe configs their llama.cpp graphs would compute differently (refused from config.json; the
    # Mixtral fixture's 4 experts are num_local_experts, an alias of dots1's n_routed_experts; more in test_dots1.py, test_minimax_m2.py,
    # test_ernie4_5_moe.py)
    "dots1 with GQA": (lambda d: _set_config(d, model_type="dots1"), ["num_key_value_heads = 2", "dots1 graph", "as many KV heads as query heads"]),
    "dots1 sliding-window layers": (lambda d: _set_config(d, model_type="dots1", num_key_value_heads=4, sliding_window=64, max_window_layers=1),
                                    ["blocks [1]", "sliding window", "whole context"]),
    "dots1 attention_bias": (lambda d: _set_config(d, model_type="dots1", num_key_value_heads=4, attention_bias=True), ["attention_bias = True", "no attn_output bias"]),
    "dots1 n_group not dividing": (lambda d: _set_config(d, model_type="dots1", num_key_value_heads=4, n_shared_experts=1, moe_intermediate_size=64, n_group=3),
                                   ["n_group = 3", "groups of at least 2"]),
    "dots1 every block dense": (lambda d: _set_config(d, model_type="dots1", num_key_value_heads=4, n_shared_experts=1, first_k_dense_replace=2),
                                ["first_k_dense_replace = 2", "every one of the 2 blocks"]),
    "dots1 llama3 rope": (lambda d: _set_config(d, model_type="dots1", num_key_value_heads=4, rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0}),
                          ["rope_type = 'llama3'", "dots1 graph"]),
    "minimax_m2 scoring_func softmax": (lambda d: _set_config(d, model_type="minimax_m2", scoring_func="softmax"), ["scoring_func = 'softmax'", "always scores experts with sigmoid"]),
    "minimax_m2 use_routing_bias false": (lambda d: _set_config(d, model_type="minimax_m2", use_routing_bias=False), ["use_routing_bias = False", "e_score_correction_bias"]),
    "minimax_m2 rotary_dim odd": (lambda d: _set_config(d, model_type="minimax_m2", rotary_dim=15), ["rotary_dim = 15", "head_dim = 128", "even number"]),
    "minimax_m2 partial_rotary_factor too large": (lambda d: _set_config(d, model_type="minimax_m2", rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 2.0}),
                                                   ["rope_parameters.partial_rotary_factor = 2.0", "rotates 256 of the head_dim = 128", "at most head_dim"]),
    "ernie4_5_moe use_bias": (lambda d: _set_config(d, model_type="ernie4_5_moe", use_bias=True), ["use_bias = True", "biases"]),
    "ernie4_5_moe every 2nd block MoE": (lambda d: _set_config(d, model_type="ernie4_5_moe", moe_num_experts=4, moe_k=2, moe_layer_start_index=0, moe_layer_interval=2),
                                         ["moe_layer_interval", "blocks [1] MoE blocks", "every block from"]),
    "ernie4_5_moe MoE blocks end early": (lambda d: _set_config(d, model_type="ernie4_5_moe", moe_num_experts=4, moe_k=2, moe_layer_start_index=0, moe_layer_end_index=0),
                                          ["moe_layer_end_index", "blocks [0] MoE blocks"]),
    "ernie4_5_moe no MoE block": (lambda d: _set_config(d, model_type="ernie4_5_moe", moe_num_experts=4, moe_k=2, moe_layer_start_index=2), ["every one of the 2 blocks"]),
    "ernie4_5_moe moe_norm_min above the top-k floor": (lambda d: _set_config(d, model_type="ernie4_5_moe", moe_num_experts=4, moe_k=2, moe_norm_min=0.75),
                                                        ["moe_norm_min = 0.75", "(2/4)"]),
    "integer of 5000 digits": (_huge_int_config, ["config.json", "not valid JSON"]),
    # tokenizer_config.json
    "tokenizer_config.json a JSON list": (lambda d: (d / "tokenizer_config.json").write_text("[]"), ["tokenizer_config.json", "expected a JSON object", "array"]),
    "tokenizer_config.json a directory": (lambda d: (d / "tokenizer_config.json").unlink() or (d / "tokenizer_config.json").mkdir(), ["tokenizer_config.json", "is a directory"]),
    "added token id not a number": (lambda d: _set_tcfg(d, added_tokens_decoder={"abc": {"content": "<x>"}}), ["tokenizer_config.json", "added_tokens_decoder", "not a token id"]),
    "added token id -5": (lambda d: _set_tcfg(d, added_tokens_decoder={"-5": {"content": "<x>", "special": True}}), ["tokenizer_config.json", "'-5'"]),
    "added token without content": (lambda d: _set_tcfg(d, added_tokens_decoder={"5": {"content": 7}}), ["tokenizer_config.json", "added_tokens_decoder['5']"]),
    "bos_token content a list": (lambda d: _set_tcfg(d, bos_token={"content": ["<s>"]}), ["tokenizer_config.json", "bos_token"]),
    "add_bos_token a string": (lambda d: _set_tcfg(d, add_bos_token="false"), ["tokenizer_config.json", "add_bos_token", "true or false"]),
    "chat_template list of strings": (lambda d: _set_tcfg(d, chat_template=["{{ x }}"]), ["tokenizer_config.json", "chat_template"]),
    "chat_template a number": (lambda d: _set_tcfg(d, chat_template=5), ["tokenizer_config.json", "chat_template", "integer"]),
    "chat_template Jinja syntax error": (lambda d: _set_tcfg(d, chat_template="{% for m in messages %}\n{{ m['content'] }\n{% endfor %}"), ["tokenizer_config.json", "chat_template", "line 2", "correct the template or remove it"]),
    "chat_template unclosed block": (lambda d: _set_tcfg(d, chat_template="{% if x %}hi"), ["tokenizer_config.json", "chat_template", "line 1"]),
    # tokenizer.model / tokenizer.json
    "tokenizer.model a directory": (lambda d: (d / "tokenizer.model").unlink() or (d / "tokenizer.model").mkdir(), ["tokenizer.model", "is a directory"]),
    "tokenizer.json a JSON list": (lambda d: _bpe(d, raw="[1, 2]"), ["tokenizer.json", "expected a JSON object"]),
    "tokenizer.json pre_tokenizer a string": (lambda d: _bpe(d, lambda t: t.update(pre_tokenizer="ByteLevel")), ["tokenizer.json", "pre_tokenizer", "expected an object"]),
    "tokenizer.json token id a string": (lambda d: _bpe(d, lambda t: t["model"]["vocab"].update(b="1")), ["tokenizer.json", "model.vocab['b']", "expected an integer token id"]),
    "tokenizer.json token id a float": (lambda d: _bpe(d, lambda t: t["model"]["vocab"].update(b=1.5)), ["tokenizer.json", "expected an integer token id"]),
    "tokenizer.json token id negative": (lambda d: _bpe(d, lambda t: t["model"]["vocab"].update(b=-1)), ["tokenizer.json", "outside the vocabulary"]),
    "tokenizer.json two tokens one id": (lambda d: _bpe(d, lambda t: t["model"]["vocab"].update(b=0)), ["tokenizer.json", "gives id 0 to both"]),
    "tokenizer.json added token id -5": (lambda d: _bpe(d, lambda t: t["added_tokens"][0].update(id=-5)), ["tokenizer.json", "added_tokens[0].id", "outside the vocabulary"]),
    "tokenizer.json merge not a pair": (lambda d: _bpe(d, lambda t: t["model"].update(merges=[[1, 2]])), ["tokenizer.json", "model.merges[0]"]),
    # llama.cpp aborts the process on a vocabulary that holds a token string twice (GGML_ASSERT in llama-vocab.cpp),
    # and reads token strings up to a NUL (so "a\0b" repeats "a")
    "tokenizer.json added token repeats a token": (lambda d: _bpe(d, lambda t: t["added_tokens"].append({"id": 4, "content": "a"})), ["tokenizer.json", "tokens 0 and 4 are both 'a'"]),
    "tokenizer.json two added tokens alike": (lambda d: _bpe(d, lambda t: t["added_tokens"].append({"id": 7, "content": "<s>", "special": True})), ["tokenizer.json", "tokens 3 and 7 are both '<s>'"]),
    "tokenizer.json token with a NUL": (lambda d: _bpe(d, lambda t: t["model"]["vocab"].update({"a\u0000b": 6})), ["tokenizer.json", "token 6", "NUL"]),
    "tokenizer.json lone surrogate": (lambda d: _bpe(d, lambda t: t["model"]["vocab"].update({"\ud800": 5})), ["tokenizer.json", "not valid Unicode"]),
    # a split regex no llama.cpp pre-tokenizer has: never written as llama.cpp's 'default' (it would tokenise differently)
    "tokenizer.json unknown split regex": (lambda d: _bpe(d, lambda t: t.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": r"\p{L}+|\s+"}, "behavior": "Isolated"}, {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]})), ["tokenizer.json", "matches none of the llama.cpp pre-tokenizers", "qwen2"]),
    "tokenizer.json ByteLevel add_prefix_space": (lambda d: _bpe(d, lambda t: t["pre_tokenizer"].update(add_prefix_space=True)), ["tokenizer.json", "add_prefix_space = true"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line_and_leaves_nothing(model, tmp_path, case):
    breaker, needles = CASES[case]
    breaker(model)
    assert_convert_refused(model, tmp_path, needles)


def test_debug_shows_traceback(model, tmp_path):
    (model / "config.json").unlink()
    result = CliRunner().invoke(app, ["--debug", "convert", str(model), "-o", str(tmp_path / "m.gguf")])
    assert result.exit_code == 1 and "Traceback" in result.output


def test_refuses_to_overwrite_without_force(model, tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"precious")
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(model), "-o", str(target)])
    assert result.exit_code == 1 and "--force" in result.output
    assert target.read_bytes() == b"precious"
    result = runner.invoke(app, ["convert", str(model), "-o", str(target), "--force"])
    assert result.exit_code == 0, result.output
    assert target.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_interrupt_or_full_disk_mid_write_leaves_no_file(model, tmp_path, exc):
    """An interrupt or ENOSPC half-way through keeps the previous file intact and leaves no temp file."""
    from quantkit.pipeline.convert import convert

    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    seen = []

    def boom(name):
        seen.append(name)
        if len(seen) == 5:
            raise exc

    from quantkit.errors import OutputError

    with pytest.raises(KeyboardInterrupt if exc is KeyboardInterrupt else OutputError):
        convert(model, target, "f16", force=True, on_tensor=boom)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir() if p.name != "model"] == ["m.gguf"]


def test_not_enough_free_space_is_refused_before_writing(model, tmp_path, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    result = CliRunner().invoke(app, ["convert", str(model), "-o", str(tmp_path / "m.gguf")])
    assert result.exit_code == 1 and "GiB free" in result.output
    assert not (tmp_path / "m.gguf").exists()


def test_output_directory_missing(model, tmp_path):
    result = CliRunner().invoke(app, ["convert", str(model), "-o", str(tmp_path / "nope" / "m.gguf")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_output_file_gets_the_usual_mode(tmp_path):
    """Atomic output is created 0600 by mkstemp; the finished file must be readable as open() would make it."""
    import os

    from conftest import FIXTURE
    from quantkit.pipeline.convert import convert

    old = os.umask(0o022)
    try:
        convert(FIXTURE, tmp_path / "m.gguf", "q8_0")
    finally:
        os.umask(old)
    assert (tmp_path / "m.gguf").stat().st_mode & 0o777 == 0o644
