"""Calibration benchmark: `quantkit imatrix` vs llama.cpp's llama-imatrix, side by side, and where quantkit's time goes.

Both tools collect an importance matrix of the same GGUF on the same text (the
training plays, cut to the tokens the chunks need), same ``--ctx`` and thread
count, each in its own process, alternating order; the median wall time of each
is reported with the ratios (target: quantkit <= 1.05x llama-imatrix with its
default batching, ``-b 2048``).  Rows:

  llama-imatrix          its defaults (``-b 2048``: several chunks per batch, interleaved in 512-token micro-batches)
  llama-imatrix -b ctx   one chunk per batch: the order of additions quantkit reproduces bit for bit (timed
                         ``--bctx-repeats`` times, default once: it is the matrix reference, not the speed target)
  quantkit imatrix       the ``quantkit`` console script as users run it (process start, imports, model load included)
  quantkit --all-experts every token through every expert for the statistics (no llama.cpp counterpart)
  quantkit @ DIR         ``--baseline DIR``: quantkit from another source tree (e.g. ``git archive`` of an older commit)
  ... [NAME=VALUE]       ``--env NAME=VALUE``: both tools again with that environment (e.g. ``OMP_WAIT_POLICY=PASSIVE``)

Matrices are checked after the runs: quantkit's counts must equal both llama-imatrix
runs', its sums llama-imatrix ``-b ctx``'s bit for bit (same machine, same
llama.cpp) and the default run's to summation order (the max relative
difference is reported).

Models: the bundled fixture (tests/fixtures/tiny-mixtral, 8 experts) as F16 and
Q8_0, and ``moe16``: a synthetic Mixtral with 16 experts (top-2), 4 layers,
hidden 512, random bf16 weights and the fixture's tokenizer, converted to F16
(built once under bench/work/calib/).

Each run's 1-minute load average at its start is in the table, and CPU time (user + system of the
child) beside wall time: on a shared machine the ratios of runs side by side are the result.

A breakdown of quantkit's time per chunk follows (``--no-profile`` skips it), in one process per
model: model load, tokenisation, the decode with no eval callback, with a
callback that declines every node (the cost of llama.cpp calling into Python
for each graph node), with quantkit's asks but no statistics (the graph splits
at the matrix multiplications, as llama-imatrix's), and the whole collection
(every graph, and as ``quantkit imatrix`` runs it: stopped after the last matrix),
the last with clocks inside the eval callback (all of the Python per node) and
around the statistics (the numpy sums).

llama-imatrix is the one ``evals/reference/make_refs.sh WORK`` builds (``make
bench`` does) from the llama.cpp that llama-cpp-python vendors; without it the
comparison rows are skipped with a message and quantkit is timed alone.

Usage: python bench/bench_calibration.py [--work /tmp/qk-llama-ref] [--ctx 256] [--chunks 400] [--threads 2]
       [--repeats 3] [--bctx-repeats 1] [--models fixture-f16,fixture-q8_0,moe16] [--baseline DIR] [--env NAME=VALUE] [--no-profile]
       [--no-record] [--note TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from bench_convert import BENCH, ROOT, TOKENIZER_FILES, compile_bytecode, load_line, machine_info, record, tensor_shapes, write_bf16

RESULTS = BENCH / "RESULTS_calibration.md"
WORK = BENCH / "work" / "calib"
TARGET = 1.05  # quantkit imatrix wall / llama-imatrix wall (its defaults) at most this
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-mixtral"
_SCRIPT = Path(sys.executable).with_name("quantkit")
QK = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "quantkit.cli"]
MOE16 = {  # the synthetic 16-expert model: the fixture's shape class, twice as wide, twice the experts
    "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 512, "intermediate_size": 512,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "num_local_experts": 16,
    "num_experts_per_tok": 2, "vocab_size": 3000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
}


def find_llama_imatrix(work: Path) -> Path | None:
    exe = os.environ.get("QK_LLAMA_IMATRIX")
    if exe:
        return Path(exe)
    return next(work.glob("llama_cpp_python-*/vendor/llama.cpp/build/bin/llama-imatrix"), None)


def make_moe16() -> Path:
    """The synthetic 16-expert Mixtral's HF directory (generated once; ~100 MB of bf16)."""
    src = WORK / "moe16-hf"
    marker = src / ".complete"
    if marker.exists() and json.loads(marker.read_text()) == MOE16:
        return src
    src.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(MOE16)
    write_bf16(src / "model.safetensors", shapes, np.random.default_rng(16))
    (src / "config.json").write_text(json.dumps(MOE16, indent=2))
    for name in TOKENIZER_FILES:
        (src / name).write_bytes((FIXTURE / name).read_bytes())
    marker.write_text(json.dumps(MOE16))
    return src


def make_model(name: str) -> Path:
    """The GGUF of a benchmark model (converted once by quantkit; the conversion is not timed)."""
    out = WORK / f"{name}.gguf"
    if out.exists():
        return out
    src, qtype = (FIXTURE, name.split("-", 1)[1]) if name.startswith("fixture-") else (make_moe16(), "f16")
    subprocess.run(QK + ["convert", str(src), "-o", str(out), "--type", qtype, "--force", "--no-progress"], check=True, cwd=ROOT, capture_output=True)
    return out


def make_text(model: Path, n_tokens: int) -> tuple[Path, int]:
    """The training plays cut to about ``n_tokens`` tokens of ``model`` (both tools tokenise the whole file): (path, tokens)."""
    code = (
        "import sys, json\n"
        "from quantkit.evals.corpora import shakespeare\n"
        "from quantkit.engine.session import EvalSession\n"
        "text = shakespeare().train_text\n"
        "s = EvalSession(sys.argv[1], 64, threads=1)\n"
        "need = int(sys.argv[2]); cut = min(len(text), need * 4)\n"
        "while True:\n"
        "    n = len(s.tokenize(text[:cut]))\n"
        "    if n >= need or cut >= len(text): break\n"
        "    cut = min(len(text), int(cut * need / max(n, 1) * 1.05) + 1000)\n"
        "print(json.dumps({'text': text[:cut], 'tokens': n}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(model), str(n_tokens)], check=True, capture_output=True, text=True, cwd=ROOT)
    got = json.loads(r.stdout)
    path = WORK / f"calib-{n_tokens}.txt"
    path.write_text(got["text"], encoding="utf-8")  # llama-imatrix's -f and quantkit's --text both drop one trailing newline
    return path, got["tokens"]


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall s, CPU s of the child, output) of one run; the bench stops on a failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=WORK, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode:
        raise SystemExit(f"{cmd[0]} failed (rc {res.returncode}):\n{res.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), res.stdout + res.stderr


def compare(ours: Path, theirs: Path) -> dict[str, Any]:
    """Counts equal? Largest relative difference of the sums (over entries with a nonzero sum)."""
    from quantkit.policy.imatrix import read_imatrix

    a, b = read_imatrix(ours), read_imatrix(theirs)
    if sorted(a.entries) != sorted(b.entries):
        return {"names": False, "counts": False, "max_rel": float("inf"), "identical": False}
    counts = all(np.array_equal(a.entries[n].counts, b.entries[n].counts) for n in a.entries)
    rel, same = 0.0, True
    for n, e in a.entries.items():
        x, y = e.in_sum2, b.entries[n].in_sum2
        same &= bool(np.array_equal(x, y))
        nz = y != 0
        if nz.any():
            rel = max(rel, float(np.max(np.abs(x[nz] - y[nz]) / np.abs(y[nz]))))
    return {"names": True, "counts": counts, "max_rel": rel, "identical": same}


# ----------------------------------------------------------------------------------------------- profile (one process)


def profile_worker(model: str, text_path: str, ctx: int, chunks: int, threads: int) -> dict[str, float]:
    """Seconds per phase of one collection, measured in this process (see the module docstring)."""
    t0 = time.perf_counter()
    from quantkit.engine.session import EvalSession
    from quantkit.pipeline import imatrix_collect as ic

    t_import = time.perf_counter() - t0
    text = Path(text_path).read_text(encoding="utf-8").removesuffix("\n")
    per = ic.chunks_per_decode(ctx)

    class NoStats(ic._Collector):  # asks as quantkit does (graph split at every matrix multiplication), adds nothing
        def _mul_mat(self, name: str, node: Any, src0: Any) -> None:
            pass

        def _mul_mat_id(self, name: str, node: Any, src0: Any) -> None:
            pass

    class Timed(ic._Collector):  # quantkit's collector with clocks around the callback and around the statistics (~0.1 us per node)
        def __call__(self, t: int, ask: bool) -> bool:
            t0 = time.perf_counter()
            try:
                return super().__call__(t, ask)
            finally:
                self.callback_s = getattr(self, "callback_s", 0.0) + time.perf_counter() - t0
                self.calls = getattr(self, "calls", 0) + 1

        def _mul_mat(self, name: str, node: Any, src0: Any) -> None:
            t0 = time.perf_counter()
            super()._mul_mat(name, node, src0)
            self.stats_s = getattr(self, "stats_s", 0.0) + time.perf_counter() - t0

        def _mul_mat_id(self, name: str, node: Any, src0: Any) -> None:
            t0 = time.perf_counter()
            super()._mul_mat_id(name, node, src0)
            self.stats_s = getattr(self, "stats_s", 0.0) + time.perf_counter() - t0

    seg = min(ctx, ic.MICRO_BATCH)
    callbacks = {"decode, no eval callback": None, "decode, callback declines every node": lambda t, ask: False,
                 "decode, quantkit's asks, no statistics": NoStats(), "collection, whole graph every decode": ic._Collector(segment=seg),
                 "collection as quantkit imatrix runs it (graph stopped after its last matrix)": Timed(segment=seg, learn=True)}
    out: dict[str, float] = {"imports": t_import}
    tokens: list[int] = []
    for label, cb in callbacks.items():
        t1 = time.perf_counter()
        s = EvalSession(model, ctx, threads=threads, on_tensor=cb, n_seq=per, n_ubatch=min(per * ctx, ic.MICRO_BATCH), kv_unified=per > 1)
        out.setdefault("model load (EvalSession)", time.perf_counter() - t1)
        if not tokens:
            t1 = time.perf_counter()
            tokens = s.tokenize(text)
            out["tokenisation"] = time.perf_counter() - t1
        n = min(chunks, len(tokens) // ctx)
        if isinstance(cb, ic._Collector):
            cb.new_batch()
        s.eval_chunks([tokens[:ctx]] * per, copy=False)  # warm-up (buffers, weight repacking; the graph learnt), as llama-imatrix's first pass has it too
        if isinstance(cb, ic._Collector):
            cb.sums.clear(), cb.counts.clear(), cb.state.clear()
            cb.reused = 0
            cb.__dict__.update(callback_s=0.0, stats_s=0.0, calls=0)
        t1 = time.perf_counter()
        for first in range(0, n, per):
            group = [tokens[i * ctx : (i + 1) * ctx] for i in range(first, min(n, first + per))]
            if isinstance(cb, ic._Collector):
                cb.new_batch()
            s.eval_chunks(group, copy=False)
        out[label] = time.perf_counter() - t1
        if isinstance(cb, Timed):
            out["  of which in quantkit's eval callback (Python: asks, statistics)"] = cb.callback_s
            out["  of which adding the statistics (numpy)"] = cb.stats_s
            out["eval callback calls (count)"] = cb.calls
        if isinstance(cb, ic._Collector) and cb.stop_after:
            out["updates reused from a sibling (count)"] = cb.reused
        s.close()
    out["chunks"] = n
    return out


def profile(model: Path, text: Path, ctx: int, chunks: int, threads: int) -> dict[str, float]:
    r = subprocess.run([sys.executable, __file__, "--profile-worker", str(model), str(text), str(ctx), str(chunks), str(threads)],
                       check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- the side-by-side runs


def bench_model(name: str, args: argparse.Namespace, exe: Path | None) -> dict[str, Any]:
    model = make_model(name)
    text, n_tokens = make_text(model, args.chunks * args.ctx + args.ctx)
    chunks = min(args.chunks, n_tokens // args.ctx)
    c, t = str(args.ctx), str(args.threads)
    variants: dict[str, tuple[list[str], dict[str, str] | None, Path]] = {}
    if exe is not None:
        variants["llama-imatrix"] = ([str(exe), "-m", str(model), "-f", text.name, "-c", c, "--chunks", str(chunks), "-t", t, "-o", "li-default.gguf"], None, WORK / "li-default.gguf")
        variants["llama-imatrix -b ctx"] = ([str(exe), "-m", str(model), "-f", text.name, "-c", c, "-b", c, "--chunks", str(chunks), "-t", t, "-o", "li-bctx.gguf"], None, WORK / "li-bctx.gguf")
    qk = QK + ["imatrix", str(model), "--text", text.name, "--ctx", c, "--chunks", str(chunks), "--threads", t, "--force", "--json", "--no-progress"]
    variants["quantkit imatrix"] = (qk + ["-o", "qk.gguf"], None, WORK / "qk.gguf")
    if args.all_experts:
        variants["quantkit imatrix --all-experts"] = (qk + ["-o", "qk-all.gguf", "--all-experts"], None, WORK / "qk-all.gguf")
    if args.baseline:
        env = {**os.environ, "PYTHONPATH": str(args.baseline)}
        variants[f"quantkit @ {args.baseline.name}"] = ([sys.executable, "-m", "quantkit.cli", *qk[len(QK):], "-o", "qk-base.gguf"], env, WORK / "qk-base.gguf")
    for setting in args.env:  # the same runs under another environment (e.g. OMP_WAIT_POLICY=PASSIVE)
        var, _, value = setting.partition("=")
        env = {**os.environ, var: value}
        if exe is not None:
            variants[f"llama-imatrix [{setting}]"] = (variants["llama-imatrix"][0][:-1] + ["li-env.gguf"], env, WORK / "li-env.gguf")
        variants[f"quantkit imatrix [{setting}]"] = (qk + ["-o", "qk-env.gguf"], env, WORK / "qk-env.gguf")
    if args.bctx_repeats < 1:  # no bit-for-bit reference run (and no check against it)
        variants.pop("llama-imatrix -b ctx", None)
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    loads: list[float] = []
    load_of: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for i in range(args.repeats):
        for v in names if i % 2 == 0 else names[::-1]:
            if v == "llama-imatrix -b ctx" and i >= args.bctx_repeats:
                continue
            cmd, env, _ = variants[v]
            loads.append(os.getloadavg()[0])
            load_of[v].append(loads[-1])
            wall, secs, _ = timed(cmd, env)
            times[v].append(wall)
            cpu[v].append(secs)
            print(f"  {name} {v}: {wall:.2f} s (CPU {secs:.2f} s, load {loads[-1]:.2f})", file=sys.stderr)
    checks: dict[str, Any] = {}
    if exe is not None:
        if "llama-imatrix -b ctx" in variants:
            checks["vs llama-imatrix -b ctx"] = compare(variants["quantkit imatrix"][2], variants["llama-imatrix -b ctx"][2])
        checks["vs llama-imatrix"] = compare(variants["quantkit imatrix"][2], variants["llama-imatrix"][2])
    result = {"model": name, "bytes": model.stat().st_size, "chunks": chunks, "tokens": chunks * args.ctx, "times": times, "cpu": cpu,
              "load": (min(loads), max(loads)), "load_of": load_of, "checks": checks}
    if args.profile:
        result["profile"] = profile(model, text, args.ctx, min(chunks, args.profile_chunks), args.threads)
    return result


def render(info: dict[str, Any], results: list[dict[str, Any]], exe: Path | None) -> str:
    lines = [f"## imatrix vs llama-imatrix, {info['utc']} UTC", "",
             f"- machine: {info['nproc']} cores, {info['cpu']}, {info['ram']} RAM, kernel {info['kernel']}",
             f"- versions: {info['versions']}",
             f"- ctx {info['ctx']}, threads {info['threads']}; median of {info['repeats']} runs per variant ({info['bctx_repeats']} of llama-imatrix -b ctx; alternating order, wall time of the "
             "whole process: start, imports, model load, tokenisation, collection, writing the file)",
             f"- llama-imatrix: {exe if exe else 'not built (evals/reference/make_refs.sh WORK builds it): comparison skipped'}",
             info["load"], "",
             f"| model | variant | median wall s | runs s | median CPU s | load (1 min) at each start | wall ratio vs llama-imatrix (target <= {TARGET}) | CPU ratio | wall ratio vs -b ctx |",
             "|---|---|---:|---|---:|---|---:|---:|---:|"]
    for r in results:
        med = {k: statistics.median(v) for k, v in r["times"].items()}
        cpu = {k: statistics.median(v) for k, v in r["cpu"].items()}
        ref, refb = med.get("llama-imatrix"), med.get("llama-imatrix -b ctx")
        label = f"{r['model']} ({r['bytes'] / 2**20:.0f} MiB), {r['chunks']} chunks"
        for v, secs in med.items():
            runs = ", ".join(f"{x:.1f}" for x in r["times"][v])
            twin = v.replace("quantkit imatrix", "llama-imatrix") if v.startswith("quantkit imatrix [") else "llama-imatrix"
            ref_v = med.get(twin, ref)  # a row under another environment is compared with llama-imatrix under the same one
            ratio = "" if ref_v is None or v.startswith("llama") else f"{secs / ref_v:.3f}" + (" PASS" if secs / ref_v <= TARGET else " FAIL") * (v == "quantkit imatrix")
            ratio_b = "" if refb is None or v.startswith("llama") else f"{secs / refb:.3f}"
            ratio_c = "" if twin not in cpu or v.startswith("llama") else f"{cpu[v] / cpu[twin]:.3f}"
            loads = ", ".join(f"{x:.1f}" for x in r.get("load_of", {}).get(v, []))
            lines.append(f"| {label} | {v} | {secs:.2f} | {runs} | {cpu[v]:.1f} | {loads} | {ratio} | {ratio_c} | {ratio_b} |")
            label = ""
    if any(r["checks"] for r in results):
        lines += ["", "| model | matrix of quantkit imatrix vs | names | counts | sums |", "|---|---|---|---|---|"]
        for r in results:
            for against, c in r["checks"].items():
                sums = "bit for bit" if c["identical"] else f"max rel. diff {c['max_rel']:.1e}"
                lines.append(f"| {r['model']} | {against.removeprefix('vs ')} | {'same' if c['names'] else 'DIFFER'} | {'equal' if c['counts'] else 'DIFFER'} | {sums} |")
    profiled = [r for r in results if "profile" in r]
    if profiled:
        lines += ["", "Where quantkit's time goes (one process per model, the same batching as `quantkit imatrix`; ms per chunk "
                  "for the decode rows, seconds for the others):", "",
                  "| model | phase | time | per chunk ms | vs decode without callback |", "|---|---|---:|---:|---:|"]
        for r in profiled:
            p = dict(r["profile"])
            n = p.pop("chunks")
            reused = p.pop("updates reused from a sibling (count)", None)
            calls = p.pop("eval callback calls (count)", None)
            base = p["decode, no eval callback"]
            label = f"{r['model']}, {n} chunks"
            for k, secs in p.items():
                decode = k.startswith(("decode", "collection", "  of which"))
                lines.append(f"| {label} | {k} | {secs:.2f} s | {1000 * secs / n:.2f} | {secs / base:.3f} |" if decode else f"| {label} | {k} | {secs:.2f} s | | |")
                label = ""
            if calls is not None:
                lines.append(f"| | eval callback calls (every node of every graph, asked and computed) | {calls:.0f} ({calls / n:.0f} per chunk) | | |")
            if reused is not None:
                lines.append(f"| | matrix updates reused from a sibling (attn_k/v, ffn_up_exps) | {reused:.0f} | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--profile-worker":
        model, text, ctx, chunks, threads = sys.argv[2:7]
        print(json.dumps(profile_worker(model, text, int(ctx), int(chunks), int(threads))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("BENCH_WORK", "/tmp/qk-llama-ref")), help="where make_refs.sh built llama-imatrix")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bctx-repeats", type=int, default=1, help="runs of llama-imatrix -b ctx (the bit-for-bit reference, no target): at most --repeats; 0 leaves it out")
    ap.add_argument("--models", default="fixture-f16,fixture-q8_0,moe16", help="comma-separated: fixture-f16, fixture-q8_0, fixture-bf16, moe16")
    ap.add_argument("--no-all-experts", dest="all_experts", action="store_false", help="skip the --all-experts row")
    ap.add_argument("--baseline", type=Path, help="also time quantkit from this source tree (PYTHONPATH), e.g. an older commit's")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the per-phase breakdown of quantkit's time")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="also time both tools with this environment variable set")
    ap.add_argument("--profile-chunks", type=int, default=200)
    ap.add_argument("--note", help="recorded on the table's load line")
    ap.add_argument("--no-record", action="store_true", help="do not write bench/RESULTS_calibration.md")
    args = ap.parse_args()
    compile_bytecode()
    WORK.mkdir(parents=True, exist_ok=True)
    exe = find_llama_imatrix(args.work)
    if exe is None:
        print(f"llama-imatrix not found under {args.work} (build it with evals/reference/make_refs.sh {args.work}, or set QK_LLAMA_IMATRIX): "
              "timing quantkit alone", file=sys.stderr)
    load_before = os.getloadavg()[0]
    results = [bench_model(m.strip(), args, exe) for m in args.models.split(",") if m.strip()]
    info = {**machine_info(), "utc": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}", "ctx": args.ctx, "threads": args.threads,
            "repeats": args.repeats, "bctx_repeats": min(args.bctx_repeats, args.repeats), "load": load_line(load_before, os.getloadavg()[0], args.note)}
    report = render(info, results, exe)
    print(report)
    (WORK / "last.json").write_text(json.dumps(results, indent=1, default=str))
    if not args.no_record:
        record(RESULTS, "Calibration benchmarks", "imatrix", report)


if __name__ == "__main__":
    main()
