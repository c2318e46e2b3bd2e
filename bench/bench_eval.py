"""Perplexity benchmark: `quantkit eval ppl` vs llama.cpp's llama-perplexity, side by side.

Both score the same GGUF (the fixture converted to Q8_0 and BF16) on the same
held-out text at the same ctx and thread count, each in its own process,
alternating order; the median wall time of each is reported with their ratio
(target: quantkit <= 1.15x llama-perplexity) and both PPL values (they must
agree to 4 significant digits).  llama-perplexity is built by
``evals/reference/make_refs.sh`` (its WORK dir is the first argument here).

``--model PATH[:CHUNKS]`` (repeatable) times a further GGUF as well, e.g. the synthetic
2.4 GB MoE converted by bench_quant.py: the fixture's ~3 s job shows mostly the fixed
cost of a Python process (interpreter, imports, teardown), a larger model the cost per token.

The run's table replaces the current one in ``bench/RESULTS_eval.md`` (history lives in git).

Usage: python bench/bench_eval.py [--work /tmp/qk-llama-ref] [--ctx 512] [--chunks 40] [--repeats 3] [--model PATH[:CHUNKS]] [--note TEXT]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench_convert import compile_bytecode, load_line, machine_info, record

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS_eval.md"
TARGET = 1.15  # quantkit eval ppl wall / llama-perplexity wall at most this
# The `quantkit` command as users run it (the console script next to this Python); `python -m quantkit.cli`
# would load cli.py twice (as __main__ and as quantkit.cli.main, which the eval commands import).
_SCRIPT = Path(sys.executable).with_name("quantkit")
QK = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "quantkit.cli"]


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"{cmd[0]} failed:\n{res.stderr[-2000:]}")
    return time.perf_counter() - t0, res.stdout + res.stderr


def render(info: dict[str, Any], rows: list[tuple[str, float, float, float, float, float]]) -> str:
    """The run's table: per model the median wall of each tool, their ratio against the target, and both PPLs."""
    lines = [
        f"## eval ppl benchmark, {info['utc']} UTC",
        "",
        f"- machine: {info['nproc']} cores, {info['cpu']}, {info['ram']} RAM, kernel {info['kernel']}; threads {info['threads']}; ctx {info['ctx']}, "
        f"median of {info['repeats']} (alternating order, wall time incl. process start, model load and exit)",
        f"- versions: {info['versions']}",
        info["load"],
        "",
        f"| model | llama-perplexity s | quantkit eval ppl s | ratio (target <= {TARGET}) | PPL llama.cpp | PPL quantkit |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for t, a, b, r, pa, pb in rows:
        lines.append(f"| {t} | {a:.2f} | {b:.2f} | {r:.3f} {'PASS' if r <= TARGET else 'FAIL'} | {pa:.4f} | {pb:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qk-llama-ref"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", action="append", default=[], help="also time this GGUF (PATH or PATH:CHUNKS)")
    ap.add_argument("--note", help="recorded on the table's load line, e.g. what else ran or what changed since the last table")
    ap.add_argument("--no-record", action="store_true", help="do not write bench/RESULTS_eval.md")
    args = ap.parse_args()
    compile_bytecode()
    binary = next(args.work.glob("llama_cpp_python-*/vendor/llama.cpp/build/bin/llama-perplexity"), None)
    if binary is None:
        raise SystemExit(f"llama-perplexity not found under {args.work}; build it with evals/reference/make_refs.sh {args.work}")
    text = args.work / "heldout.txt"
    subprocess.run([sys.executable, "-c", f"from quantkit.evals.corpora import heldout_text; open({str(text)!r}, 'w', encoding='utf-8').write(heldout_text())"], check=True)
    rows = []
    jobs = []
    for t in ("q8_0", "bf16"):
        model = args.work / f"bench-{t}.gguf"
        subprocess.run(QK + ["convert", "tests/fixtures/tiny-mixtral", "-o", str(model), "--type", t, "--force", "--no-progress"], check=True, cwd=ROOT, capture_output=True)
        jobs.append((f"fixture {t}", model, args.chunks))
    for spec in args.model:
        path, _, chunks = spec.partition(":")
        jobs.append((Path(path).name, Path(path), int(chunks or args.chunks)))
    load_before = os.getloadavg()[0]
    for t, model, n_chunks in jobs:
        ref_cmd = [str(binary), "-m", str(model), "-f", str(text), "-c", str(args.ctx), "--chunks", str(n_chunks), "-t", str(args.threads)]
        qk_cmd = QK + ["eval", "ppl", str(model), "--text", str(text), "--ctx", str(args.ctx), "--chunks", str(n_chunks), "--threads", str(args.threads)]
        times: dict[str, list[float]] = {"llama-perplexity": [], "quantkit": []}
        ppl = {}
        for i in range(args.repeats):
            order = [("llama-perplexity", ref_cmd), ("quantkit", qk_cmd)]
            for name, cmd in order if i % 2 == 0 else order[::-1]:
                secs, out = timed(cmd)
                times[name].append(secs)
                m = re.search(r"PPL = ([0-9.]+)", out)
                ppl[name] = float(m.group(1)) if m else float("nan")
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((f"{t}, {n_chunks} chunks", med["llama-perplexity"], med["quantkit"], med["quantkit"] / med["llama-perplexity"], ppl["llama-perplexity"], ppl["quantkit"]))
    info = {**machine_info(), "utc": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}", "threads": args.threads, "ctx": args.ctx,
            "repeats": args.repeats, "load": load_line(load_before, os.getloadavg()[0], args.note)}
    report = render(info, rows)
    print(report)
    if not args.no_record:
        record(RESULTS, "eval ppl benchmark: quantkit eval ppl vs llama-perplexity", "current", report)


if __name__ == "__main__":
    main()
