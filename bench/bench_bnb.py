"""bitsandbytes 4-bit benchmark: quantkit's per-expert export vs transformers' load_in_4bit + save_pretrained.

On the synthetic sharded bf16 Mixtral of ``bench/bench_convert.py`` (>= 2 GB
with the default 5 layers; generated once and cached under ``bench/work/``),
each variant runs in its own subprocess under GNU ``/usr/bin/time`` (child
peak RSS, ``%M``):

  quantkit      quantkit convert SRC --format bnb -o OUT (nf4, double quant, bf16 compute)
  transformers  AutoModelForCausalLM.from_pretrained(SRC, quantization_config=
                BitsAndBytesConfig(load_in_4bit=True, nf4, double quant, bf16 compute),
                device_map="cpu") followed by save_pretrained(OUT)

Wall time includes an fsync of every output file.  The source is read once
before timing (warm page cache); variants alternate order across repeats and
the median is reported.  Afterwards the share of parameters each output
stores 4-bit (a weight with a ``quant_state`` entry) is counted from the
written files, overall and over the expert weights.  The run's table replaces
the current one in ``bench/RESULTS_bnb.md`` (history lives in git).

Usage: python bench/bench_bnb.py [--layers N] [--repeats N] [--keep] [--json] [--note TEXT]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from bench_convert import BENCH, TIME, load_line, machine_info, make_checkpoint, record

RESULTS = BENCH / "RESULTS_bnb.md"
HF_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=q, dtype=torch.bfloat16, device_map="cpu")
model.save_pretrained(sys.argv[2])
"""
QUANT_AUX = re.compile(r"\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.bitsandbytes__\w+)$")
# Expert weights in either layout: per expert (HF checkpoints) or fused (transformers 5 in memory).
EXPERT = re.compile(r"\.experts\.(\d+\.w[123]\.weight|gate_up_proj|down_proj)$")


def measure(cmd: list[str], out: Path, log: Path) -> tuple[float, float]:
    """Run cmd into a fresh directory ``out``, fsync what it wrote; return (wall s, child peak RSS MiB)."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # flush earlier writes so they are not billed to this run
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    rss_file = log.with_suffix(".rss")
    with open(log, "ab") as err:
        t0 = time.perf_counter()
        rc = subprocess.run([TIME, "-f", "%M", "-o", str(rss_file), *cmd], stdout=err, stderr=err, env=env).returncode
        if rc == 0:
            for f in out.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        wall = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"{cmd[0]} failed (rc {rc}); see {log}:\n" + log.read_text(errors="replace")[-3000:])
    return wall, int(rss_file.read_text().split()[-1]) / 1024


def count_4bit(out: Path) -> dict[str, float]:
    """Parameters stored 4-bit in an output directory, counted from its safetensors headers and quant_states."""
    from quantkit.hf.checkpoint import open_checkpoint

    params = bits4 = expert = expert4 = 0
    with open_checkpoint(out) as ckpt:
        t = ckpt.tensors
        for key, ref in t.items():
            if QUANT_AUX.search(key):
                continue
            qs = [k for k in t if k.startswith(f"{key}.quant_state.bitsandbytes__")] if key.endswith(".weight") else []
            n = math.prod(json.loads(bytes(t[qs[0]].array()))["shape"]) if qs else math.prod(ref.shape)
            params += n
            bits4 += n if qs else 0
            if EXPERT.search(key):
                expert += n
                expert4 += n if qs else 0
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"params": params, "params_4bit": bits4, "share_4bit": bits4 / max(1, params),
            "expert_params": expert, "expert_share_4bit": expert4 / max(1, expert), "bytes": size}


def render(info: dict[str, Any], rows: dict[str, dict[str, Any]]) -> str:
    lines = [f"## bitsandbytes 4-bit export benchmark, {info['date']}", "",
             f"- machine: {info['nproc']} cores, {info['cpu']}, {info['ram']} RAM, kernel {info['kernel']}",
             f"- versions: {info['versions']}",
             f"- model: synthetic Mixtral, {info['layers']} layers x 8 experts, {info['shards']} bf16 shards, {info['model_bytes']} bytes "
             f"({info['model_params']:,} parameters); median of {info['repeats']} run(s), warm cache, wall time includes fsync of the output",
             "- both: nf4, double quantisation, bf16 compute dtype; 4-bit share counted from the written files (weights with a quant_state)",
             info["load"], "",
             "| variant | median wall s | runs s | peak RSS MiB | output MiB | params 4-bit | expert params 4-bit |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        runs = ", ".join(f"{t:.1f}" for t in r["runs"])
        lines.append(f"| {name} | {r['wall']:.2f} | {runs} | {r['rss']:.0f} | {r['bytes'] / 2**20:.0f} | "
                     f"{100 * r['share_4bit']:.1f}% | {100 * r['expert_share_4bit']:.1f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=5, help="decoder layers of the synthetic model (5 -> ~2.4 GB)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per variant (median reported)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs in bench/work/out")
    ap.add_argument("--json", action="store_true", help="print results as JSON instead of a table")
    ap.add_argument("--note", help="recorded on the table's load line, e.g. what else ran or what changed since the last table")
    ap.add_argument("--no-record", action="store_true", help="do not write bench/RESULTS_bnb.md")
    args = ap.parse_args()

    src = make_checkpoint(args.layers)
    shards = sorted(src.glob("*.safetensors"))
    out_dir, log_dir = BENCH / "work" / "out", BENCH / "work" / "logs"
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    qk = shutil.which("quantkit", path=str(Path(sys.executable).parent)) or "quantkit"
    variants = {
        "quantkit": [qk, "convert", str(src), "-o", "{out}", "--format", "bnb", "--force", "--no-progress"],
        "transformers": [sys.executable, "-c", HF_SCRIPT, str(src), "{out}"],
    }
    subprocess.run(["cat", *map(str, shards)], stdout=subprocess.DEVNULL, check=True)  # warm-up read
    load_before = os.getloadavg()[0]
    runs: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    counts: dict[str, dict[str, float]] = {}
    for r in range(args.repeats):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            out = out_dir / f"bnb-{name}"
            cmd = [a.replace("{out}", str(out)) for a in variants[name]]
            runs[name].append(measure(cmd, out, log_dir / f"bnb-{name}.log"))
            print(f"  run {r + 1} {name:<12} {runs[name][-1][0]:7.2f} s {runs[name][-1][1]:7.0f} MiB", file=sys.stderr)
            counts[name] = count_4bit(out)
            if not args.keep:
                shutil.rmtree(out)
    rows = {n: {"wall": statistics.median(t for t, _ in v), "rss": max(m for _, m in v), "runs": [t for t, _ in v], **counts[n]}
            for n, v in runs.items()}
    info = machine_info()
    info["versions"] += ", " + ", ".join(f"{p} {metadata.version(p)}" for p in ("bitsandbytes", "accelerate"))
    info.update(layers=args.layers, shards=len(shards), model_bytes=sum(p.stat().st_size for p in shards),
                model_params=int(counts["quantkit"]["params"]), repeats=args.repeats, load=load_line(load_before, os.getloadavg()[0], args.note))
    text = render(info, rows)
    if not args.no_record:
        record(RESULTS, "bitsandbytes 4-bit export benchmark", "current", text)
    print(json.dumps({"info": info, "variants": rows}, indent=2) if args.json else text)


if __name__ == "__main__":
    main()
