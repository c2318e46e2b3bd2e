"""Quantisation benchmark: quantkit vs llama.cpp's quantiser, one pass vs two steps, quality at equal size.

Three parts, each selected by a flag (none given: all three):

``--speed``     quantkit producing Q4_K_M vs ``llama_cpp.llama_model_quantize``
                (llama-quantize in process, ``params.nthread = os.cpu_count()``,
                the thread count quantkit's kernel pool uses) from the same model:
                the bundled fixture (tests/fixtures/tiny-mixtral) and the
                synthetic >= 2 GB bf16 Mixtral of ``bench_convert.py``.
                llama.cpp reads the model's BF16 GGUF (made by ``quantkit convert
                --type bf16``, bit-identical to llama.cpp's converter, see
                RESULTS_convert_mixtral.md); quantkit is timed from the HF directory (one pass)
                and, where ``quantkit.pipeline.convert.convert`` accepts a ``.gguf``
                source, from the same BF16 GGUF.  Both outputs are compared
                tensor by tensor (type, shape, bytes).
``--two-step``  on the synthetic model: quantkit HF -> Q4_K_M in one pass vs
                llama.cpp's two steps, ``convert_hf_to_gguf.py --outtype f16``
                (the vendored converter ``bench_convert.py`` extracts) then
                ``llama_model_quantize`` F16 -> Q4_K_M.
``--quality``   on the fixture, mean KLD vs its BF16 GGUF on the held-out plays
                (ctx 256, every chunk): per level (Q3_K_M, Q4_K_M, Q5_K_M) the
                stock preset, the built-in recipe (moe-q3/4/5), bit budgets at
                exactly the stock file's size (priors; sensitivity measured on
                the *training* plays) and at the recipe's size, then the same
                with an importance matrix collected on the training plays.

Every timed variant runs in its own subprocess under GNU ``/usr/bin/time``
(child peak RSS ``%M``, CPU ``%U + %S``).  Wall time includes an fsync of the
output (quantkit fsyncs itself, llama.cpp does not) and, for a child, its
interpreter start and imports.  Sources are read (``cat``) before every run
(warm page cache; ``fincore`` residency is recorded just before); variants alternate
order across repeats and the median is reported.  The machine is shared: the
1-minute load average before each run is recorded, and CPU seconds (which
other processes do not inflate much) are reported beside wall time.

``bench/RESULTS_quant.md`` holds the current table of every part and source:
a run replaces the blocks it measured (``<!-- bench:speed-fixture -->``,
``speed-synthetic-L5``, ``two-step``, ``quality-fixture``, ``quality-<model>``)
and keeps the others and the hand-written summary (history lives in git); raw
numbers go to ``bench/work/quant/<part>.json``.

Usage: python bench/bench_quant.py [--speed] [--two-step] [--quality] [--repeats N] [--layers N] [--note TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from bench_convert import BENCH, ROOT, TIME, compare_gguf, compile_bytecode, get_llama_converter, machine_info, make_checkpoint, record

WORK = BENCH / "work" / "quant"
RESULTS = BENCH / "RESULTS_quant.md"
BLOCK_ORDER = ("speed-", "two-step", "quality-")  # the results file's blocks, in the order of the parts
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-mixtral"
PRESET = "Q4_K_M"
TARGETS = {"speed": 0.95, "two_step": 1.4}  # llama time / quantkit time at least this
LEVELS = (("Q3_K_M", "moe-q3"), ("Q4_K_M", "moe-q4"), ("Q5_K_M", "moe-q5"))
KLD_CTX = 256
CALIB_CHUNKS = 8  # measure_checkpoint's chunks per probe (the CLI's default)
IMATRIX_CTX, IMATRIX_CHUNKS = 512, 100  # quantkit imatrix defaults (ctx 512), first 100 chunks of the training plays

# Children: each prints one JSON line with the seconds spent after its imports.
QK_CHILD = """
import json, sys, time
from quantkit.pipeline.convert import convert
t0 = time.perf_counter()
convert(sys.argv[1], sys.argv[2], sys.argv[3], force=True)
print(json.dumps({"work_s": time.perf_counter() - t0}))
"""
LLAMA_CHILD = """
import ctypes, json, os, sys, time
import llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
p.nthread = os.cpu_count()
t0 = time.perf_counter()
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))
if rc:
    sys.exit(f"llama_model_quantize returned {rc}")
print(json.dumps({"work_s": time.perf_counter() - t0, "nthread": p.nthread}))
"""


# --------------------------------------------------------------------------- running children


def residency(paths: list[Path]) -> float:
    """Share of the files' pages in the page cache (util-linux fincore), 0..1; NaN without fincore."""
    if not shutil.which("fincore"):
        return float("nan")
    res = subprocess.run(["fincore", "-b", "-n", "-o", "RES,SIZE", *map(str, paths)], capture_output=True, text=True)
    rows = [tuple(map(int, line.split())) for line in res.stdout.splitlines() if line.strip()]
    return sum(r for r, _ in rows) / max(1, sum(s for _, s in rows))


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all processes, /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def warm(paths: list[Path]) -> None:
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)


def run_child(cmd: list[str], out: Path, log: Path, sources: list[Path]) -> dict[str, Any]:
    """Run ``cmd`` under /usr/bin/time, fsync ``out``; wall s, CPU s, peak RSS MiB, load and cache state before."""
    out.unlink(missing_ok=True)
    os.sync()  # earlier writes are not billed to this run
    warm(sources)  # other jobs on the machine may have evicted them since the last run
    cached = residency(sources)
    load = os.getloadavg()[0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    stats = log.with_suffix(".time")
    with open(log, "ab") as err:
        t0, busy0 = time.perf_counter(), busy_seconds()
        res = subprocess.run([TIME, "-f", "%M %U %S", "-o", str(stats), *cmd], stdout=subprocess.PIPE, stderr=err, env=env, cwd=ROOT)
        if res.returncode == 0:
            with open(out, "rb+") as f:
                os.fsync(f.fileno())
        wall, busy = time.perf_counter() - t0, busy_seconds() - busy0
    if res.returncode != 0:
        raise ChildFailed(f"{cmd[:3]} failed (rc {res.returncode}); see {log}:\n" + log.read_text(errors="replace")[-2000:])
    rss_kb, user, sys_s = stats.read_text().split()[-3:]
    inner = json.loads(res.stdout.decode().strip().splitlines()[-1]) if res.stdout.strip() else {}
    cpu = float(user) + float(sys_s)
    return {"wall": wall, "cpu": cpu, "rss": int(rss_kb) / 1024, "load1": load, "others": max(0.0, busy - cpu) / wall, "cached": cached,
            "work_s": inner.get("work_s"), "bytes": out.stat().st_size, "mode": oct(out.stat().st_mode & 0o777)}


class ChildFailed(RuntimeError):
    pass


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    work = [r["work_s"] for r in runs if r.get("work_s") is not None]
    return {"wall": med("wall"), "cpu": med("cpu"), "work": statistics.median(work) if work else float("nan"), "rss": max(r["rss"] for r in runs), "runs": [round(r["wall"], 2) for r in runs],
            "cpu_runs": [round(r["cpu"], 1) for r in runs], "load1": [round(r["load1"], 2) for r in runs],
            "others": [round(r["others"], 2) for r in runs],
            "cached": min(r["cached"] for r in runs), "bytes": runs[-1]["bytes"], "mode": runs[-1]["mode"]}


def alternate(variants: dict[str, Callable[[int], dict[str, Any]]], repeats: int) -> dict[str, list[dict[str, Any]]]:
    """Run every variant ``repeats`` times, order reversed on every other round."""
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(variants[name](r))
            x = runs[name][-1]
            print(f"  run {r + 1} {name:<16} {x['wall']:7.2f} s wall {x['cpu']:7.1f} s cpu {x['rss']:6.0f} MiB "
                  f"(load {x['load1']:.2f}, others {x['others']:.2f} cores, cached {x['cached']:.0%})", file=sys.stderr)
    return runs


def bf16_gguf(src: Path, name: str) -> Path:
    """The model's BF16 GGUF in WORK, made by quantkit (reused when newer than every source file)."""
    path = WORK / f"{name}-bf16.gguf"
    newest = max(p.stat().st_mtime for p in src.iterdir())
    if not path.exists() or path.stat().st_mtime < newest:
        from quantkit.pipeline.convert import convert

        print(f"  converting {src.name} -> {path.name}", file=sys.stderr)
        convert(src, path, "bf16", force=True)
    return path


def gguf_input(src_gguf: Path) -> str | None:
    """None when quantkit converts a .gguf source, else why not (tried on the given file, output discarded)."""
    out = WORK / "probe-gguf-input.gguf"
    try:
        run_child([sys.executable, "-c", QK_CHILD, str(src_gguf), str(out), PRESET], out, WORK / "logs" / "probe-gguf-input.log", [src_gguf])
    except ChildFailed as e:
        last = [line for line in str(e).splitlines() if line.strip()]
        return last[-1][:300] if last else str(e)[:300]
    finally:
        out.unlink(missing_ok=True)
    return None


# --------------------------------------------------------------------------- part 1: speed


def part_speed(args: argparse.Namespace) -> dict[str, Any]:
    sources = {"fixture": FIXTURE} if args.only != "synthetic" else {}
    if args.only != "fixture":
        sources[f"synthetic-L{args.layers}"] = make_checkpoint(args.layers)
    result: dict[str, Any] = {"threads": os.cpu_count(), "repeats": args.repeats, "sources": {}}
    for label, src in sources.items():
        bf16 = bf16_gguf(src, label)
        shards = sorted(src.glob("*.safetensors"))
        why_not = gguf_input(bf16)
        out = {k: WORK / f"{label}-{k}.gguf" for k in ("qk-hf", "qk-gguf", "llama")}
        log = lambda k: WORK / "logs" / f"speed-{label}-{k}.log"  # noqa: E731
        variants: dict[str, Callable[[int], dict[str, Any]]] = {
            "qk-hf": lambda r: run_child([sys.executable, "-c", QK_CHILD, str(src), str(out["qk-hf"]), PRESET], out["qk-hf"], log("qk-hf"), shards),
            "llama": lambda r: run_child([sys.executable, "-c", LLAMA_CHILD, str(bf16), str(out["llama"]), PRESET], out["llama"], log("llama"), [bf16]),
        }
        if why_not is None:
            variants["qk-gguf"] = lambda r: run_child([sys.executable, "-c", QK_CHILD, str(bf16), str(out["qk-gguf"]), PRESET], out["qk-gguf"], log("qk-gguf"), [bf16])
        print(f"speed: {label} ({sum(p.stat().st_size for p in shards):,} B of shards)", file=sys.stderr)
        warm([*shards, bf16])
        rows = {k: summarise(v) for k, v in alternate(variants, args.repeats).items()}
        checks = {}
        for k in rows:
            if k != "llama":
                checks[k] = {"wall_ratio": rows["llama"]["wall"] / rows[k]["wall"], "cpu_ratio": rows["llama"]["cpu"] / rows[k]["cpu"],
                             "work_ratio": rows["llama"]["work"] / rows[k]["work"],
                             "diff": compare_gguf(out[k], out["llama"])}
        for p in out.values():
            p.unlink(missing_ok=True)
        result["sources"][label] = {"bytes": sum(p.stat().st_size for p in shards), "bf16_gguf": str(bf16.relative_to(ROOT)),
                                    "gguf_input": why_not or "supported", "rows": rows, "checks": checks}
    return result


def render_speed(info: dict[str, Any], res: dict[str, Any]) -> dict[str, str]:
    """One block per source (``speed-<label>``), each with its own header: ``--only`` re-measures one source."""
    head = [f"## 1. Q4_K_M speed: quantkit vs llama_model_quantize, {info['date']}", "", *machine_lines(info),
            f"- threads: llama.cpp `params.nthread = os.cpu_count()` = {res['threads']}; quantkit's kernel pool = os.cpu_count() = {res['threads']}",
            f"- median of {res['repeats']} runs per variant, alternating order; "
            "wall includes child start-up, imports and an fsync of the output; `work s` is the child's time after its imports; "
            "the sources are re-read (`cat`) before every run, `source cached` is the lowest page-cache residency (fincore) seen just before a run", ""]
    blocks = {}
    for label, s in res["sources"].items():
        lines = [*head, f"### {label} ({s['bytes'] / 1e9:.3f} GB of bf16 safetensors; llama.cpp input {s['bf16_gguf']})", "",
                 "| variant | median wall s | runs s | median work s | median CPU s | peak RSS MiB | other jobs' cores during runs | source cached | output B | mode |",
                 "|---|---:|---|---:|---:|---:|---|---:|---:|---|"]
        for k, r in s["rows"].items():
            name = {"qk-hf": "quantkit HF dir -> Q4_K_M", "qk-gguf": "quantkit BF16 GGUF -> Q4_K_M", "llama": "llama_model_quantize BF16 GGUF -> Q4_K_M"}[k]
            lines.append(f"| {name} | {r['wall']:.2f} | {', '.join(map(str, r['runs']))} | {r['work']:.2f} | {r['cpu']:.1f} | {r['rss']:.0f} | "
                         f"{', '.join(map(str, r['others']))} | {r['cached']:.0%} | {r['bytes']:,} | {r['mode']} |")
        if s["gguf_input"] != "supported":
            lines.append(f"| quantkit BF16 GGUF -> Q4_K_M | not available: `{s['gguf_input']}` | | | | | | | | |")
        lines += ["", "| check | value | target | result |", "|---|---:|---:|---|"]
        for k, c in s["checks"].items():
            ok = c["wall_ratio"] >= TARGETS["speed"]
            lines.append(f"| llama wall / {k} wall | {c['wall_ratio']:.3f} | >= {TARGETS['speed']} | {'PASS' if ok else 'FAIL'} |")
            lines.append(f"| llama work / {k} work (info: after imports) | {c['work_ratio']:.3f} | | |")
            lines.append(f"| llama CPU / {k} CPU (info) | {c['cpu_ratio']:.3f} | | |")
            lines.append(f"| {k} vs llama: tensor types and bytes | {'; '.join(c['diff'][:3]) or 'all tensors identical'} | identical | {'FAIL' if c['diff'] else 'PASS'} |")
        blocks[f"speed-{label}"] = "\n".join(lines) + "\n"
    return blocks


# --------------------------------------------------------------------------- part 2: one pass vs two steps


def part_two_step(args: argparse.Namespace) -> dict[str, Any]:
    src = make_checkpoint(args.layers)
    script = get_llama_converter()
    shards = sorted(src.glob("*.safetensors"))
    qk_out, f16, ll_out = WORK / "2s-qk.gguf", WORK / "2s-f16.gguf", WORK / "2s-llama.gguf"
    logs = WORK / "logs"

    def qk(r: int) -> dict[str, Any]:
        return run_child([sys.executable, "-c", QK_CHILD, str(src), str(qk_out), PRESET], qk_out, logs / "2s-qk.log", shards)

    def two(r: int) -> dict[str, Any]:
        a = run_child([sys.executable, str(script), str(src), "--outfile", str(f16), "--outtype", "f16"], f16, logs / "2s-convert.log", shards)
        b = run_child([sys.executable, "-c", LLAMA_CHILD, str(f16), str(ll_out), PRESET], ll_out, logs / "2s-quantize.log", [f16])
        f16.unlink()
        return {"wall": a["wall"] + b["wall"], "cpu": a["cpu"] + b["cpu"], "rss": max(a["rss"], b["rss"]), "load1": a["load1"], "others": (a["others"] * a["wall"] + b["others"] * b["wall"]) / (a["wall"] + b["wall"]),
                "cached": a["cached"], "bytes": b["bytes"], "mode": b["mode"], "steps": [a, b], "f16_bytes": a["bytes"]}

    print(f"two-step: {src.name}", file=sys.stderr)
    warm(shards)
    runs = alternate({"quantkit": qk, "two-step": two}, args.repeats)
    rows = {k: summarise(v) for k, v in runs.items()}
    steps = runs["two-step"]
    rows["two-step"]["convert"] = summarise([s["steps"][0] for s in steps])
    rows["two-step"]["quantize"] = summarise([s["steps"][1] for s in steps])
    rows["two-step"]["f16_bytes"] = steps[-1]["f16_bytes"]
    diff = compare_gguf(qk_out, ll_out)
    for p in (qk_out, ll_out):
        p.unlink(missing_ok=True)
    return {"bytes": sum(p.stat().st_size for p in shards), "repeats": args.repeats, "rows": rows,
            "ratio": rows["two-step"]["wall"] / rows["quantkit"]["wall"], "cpu_ratio": rows["two-step"]["cpu"] / rows["quantkit"]["cpu"], "diff": diff}


def render_two_step(info: dict[str, Any], res: dict[str, Any]) -> dict[str, str]:
    r, two = res["rows"], res["rows"]["two-step"]
    ok = res["ratio"] >= TARGETS["two_step"]
    same = not res["diff"]
    diff_text = f"{len(res['diff'])} tensors differ, e.g. {'; '.join(res['diff'][:3])}" if res["diff"] else "all tensors identical"
    lines = [f"## 2. One pass vs two steps (synthetic Mixtral, {res['bytes'] / 1e9:.3f} GB bf16 -> Q4_K_M), {info['date']}", "", *machine_lines(info),
             f"- median of {res['repeats']} runs, alternating order, shards re-read before every run (warm cache); each step's wall includes an fsync of its output", "",
             "| path | median wall s | runs s | median CPU s | peak RSS MiB | extra disk |", "|---|---:|---|---:|---:|---:|",
             f"| quantkit convert --type Q4_K_M (one pass) | {r['quantkit']['wall']:.2f} | {', '.join(map(str, r['quantkit']['runs']))} | {r['quantkit']['cpu']:.1f} | {r['quantkit']['rss']:.0f} | 0 |",
             f"| convert_hf_to_gguf.py --outtype f16 | {two['convert']['wall']:.2f} | {', '.join(map(str, two['convert']['runs']))} | {two['convert']['cpu']:.1f} | {two['convert']['rss']:.0f} | {two['f16_bytes'] / 2**30:.2f} GiB F16 GGUF |",
             f"| llama_model_quantize F16 -> Q4_K_M | {two['quantize']['wall']:.2f} | {', '.join(map(str, two['quantize']['runs']))} | {two['quantize']['cpu']:.1f} | {two['quantize']['rss']:.0f} | |",
             f"| two steps, total | {two['wall']:.2f} | {', '.join(map(str, two['runs']))} | {two['cpu']:.1f} | {two['rss']:.0f} | |", "",
             "| check | value | target | result |", "|---|---:|---:|---|",
             f"| two-step wall / quantkit wall | {res['ratio']:.3f} | >= {TARGETS['two_step']} | {'PASS' if ok else 'FAIL'} |",
             f"| two-step CPU / quantkit CPU (info) | {res['cpu_ratio']:.3f} | | |",
             f"| outputs identical (info: the two-step path rounds bf16 -> f16 first) | {diff_text} | | {'same' if same else 'differ'} |"]
    return {"two-step": "\n".join(lines) + "\n"}


# --------------------------------------------------------------------------- part 3: quality at equal size


def part_quality(args: argparse.Namespace) -> dict[str, Any]:
    from quantkit.pipeline import sensitivity
    from quantkit.pipeline.convert import _importance, convert, prepare
    from quantkit.evals import corpora
    from quantkit.evals.kld import base_logprobs, compare
    from quantkit.evals.matrix import pareto_front
    from quantkit.policy.imatrix import write_imatrix
    from quantkit.pipeline.imatrix_collect import collect_from_source
    from quantkit.policy.plan import Target
    from quantkit.policy.recipe import load_recipe

    src = args.model
    name = "fixture" if src.resolve() == FIXTURE.resolve() else src.name
    qdir = WORK / ("quality" if name == "fixture" else f"quality-{name}")
    qdir.mkdir(parents=True, exist_ok=True)
    corpus = corpora.shakespeare()
    heldout, train = corpus.heldout_text, corpus.train_text
    assert not set(corpus.heldout_files) & set(corpus.train_files)
    base = bf16_gguf(src, name)
    t0 = time.perf_counter()
    print("quality: base log-probs", file=sys.stderr)
    b = base_logprobs(base, heldout, KLD_CTX, None, cache_dir=qdir / "cache")
    print(f"quality: importance matrix on the training plays ({IMATRIX_CHUNKS} x {IMATRIX_CTX} tokens)", file=sys.stderr)
    imat = collect_from_source(src, train, workdir=qdir, n_ctx=IMATRIX_CTX, n_chunks=IMATRIX_CHUNKS, dataset="shakespeare train plays")
    write_imatrix(imat, qdir / f"{name}-train.imatrix.gguf", force=True)
    ckpt, prep = prepare(src, "f32")
    ckpt.close()
    print("quality: measured sensitivity on the training plays (without / with the imatrix)", file=sys.stderr)
    measured = sensitivity.measure_checkpoint(src, train, n_ctx=KLD_CTX, n_chunks=CALIB_CHUNKS, work_dir=qdir)
    measured_im = sensitivity.measure_checkpoint(src, train, n_ctx=KLD_CTX, n_chunks=CALIB_CHUNKS, importance=_importance(imat, prep.tensors), work_dir=qdir)
    setup_s = time.perf_counter() - t0

    rows: list[dict[str, Any]] = []

    def variant(level: str, group: str, label: str, outtype: str, **kw: Any) -> dict[str, Any]:
        path = qdir / f"{label}.gguf"
        try:
            r = convert(src, path, outtype, force=True, **kw)
        except Exception as e:  # a budget out of reach, a refused plan: recorded, not fatal
            row = {"level": level, "group": group, "label": label, "error": f"{type(e).__name__}: {e}"}
            print(f"  {label:<34} FAILED {row['error'][:200]}", file=sys.stderr)
            rows.append(row)
            return row
        rep = compare(b, path, heldout, label=label)
        row = {"level": level, "group": group, "label": label, "bytes": r.nbytes, "params": r.n_params, "bpw": 8 * r.nbytes / r.n_params,
               "kld": rep["kld_mean"], "kld_err": rep["kld_mean_stderr"], "kld_p99": rep["kld_p99"], "same_top": rep["same_top"],
               "same_top_err": rep["same_top_stderr"], "ppl_ratio": rep["ppl_ratio"], "ppl": rep["ppl"], "ppl_base": rep["ppl_base"],
               "n_positions": rep["setup"]["n_positions"], "n_chunks": rep["setup"]["n_chunks"]}
        print(f"  {label:<34} {r.nbytes:>10,} B {row['bpw']:.3f} bpw KLD {row['kld']:.5f} ± {row['kld_err']:.5f}", file=sys.stderr)
        rows.append(row)
        path.unlink()
        return row

    for level, recipe_name in LEVELS:
        print(f"quality: {level}", file=sys.stderr)
        rec = load_recipe(recipe_name)
        l = level.lower()
        for im, sfx in ((None, ""), (imat, "+imatrix")):
            m = measured if im is None else measured_im
            stock = variant(level, f"stock size{sfx}", f"{l}-stock{sfx}", level, imatrix=im)
            size = stock.get("bytes")
            if size:
                variant(level, f"stock size{sfx}", f"{l}-budget-priors{sfx}", level, target=Target(size=size), imatrix=im)
                variant(level, f"stock size{sfx}", f"{l}-budget-measured{sfx}", level, target=Target(size=size, measured=m), imatrix=im)
            r = variant(level, f"recipe size{sfx}", f"{l}-{recipe_name}{sfx}", rec.base, overrides=rec.rules, imatrix=im)
            if r.get("bytes"):
                if im is None:
                    variant(level, f"recipe size{sfx}", f"{l}-budget-priors@recipe{sfx}", level, target=Target(size=r["bytes"]), imatrix=im)
                variant(level, f"recipe size{sfx}", f"{l}-budget-measured@recipe{sfx}", level, target=Target(size=r["bytes"], measured=m), imatrix=im)

    ok = [r for r in rows if "kld" in r]
    for r in ok:
        r["pareto"] = False
    for i in pareto_front([(r["bytes"], r["kld"]) for r in ok]):
        ok[i]["pareto"] = True
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in ok:
        groups.setdefault((r["level"], r["group"]), []).append(r)
    for g in groups.values():
        best = min(g, key=lambda r: r["kld"])
        for r in g:
            r["wins"] = r is best
            # Within one standard error of the winner: not a significant loss (errors of means, positions shared).
            r["tie"] = r is not best and r["kld"] - best["kld"] <= (r["kld_err"] ** 2 + best["kld_err"] ** 2) ** 0.5
    return {"model": name, "rows": rows, "n_chunks": b.meta["n_chunks"], "n_tokens": b.meta["n_tokens"], "ctx": KLD_CTX, "setup_s": setup_s,
            "imatrix": {"ctx": IMATRIX_CTX, "chunks": imat.chunk_count, "tokens": imat.n_tokens, "entries": len(imat.entries)},
            "calib": {"ctx": KLD_CTX, "chunks": CALIB_CHUNKS, "probed": len(measured)}, "heldout": list(corpus.heldout_files),
            "train_files": len(corpus.train_files)}


def render_quality(info: dict[str, Any], res: dict[str, Any]) -> dict[str, str]:
    im, cal = res["imatrix"], res["calib"]
    lines = [f"## 3. Quality at equal size ({res.get('model', 'fixture')}, mean KLD vs its BF16 GGUF), {info['date']}", "", *machine_lines(info),
             f"- eval text: held-out plays {', '.join(res['heldout'])} ({res['n_tokens']:,} tokens), ctx {res['ctx']}, all {res['n_chunks']} chunks "
             "(second half of each scored, llama-perplexity's KLD statistics; ± is the standard error of the mean)",
             f"- measured sensitivity: `sensitivity.measure_checkpoint({res.get('model', 'fixture')}, train_text, n_ctx={cal['ctx']}, n_chunks={cal['chunks']})` "
             f"on the {res['train_files']} training plays ({cal['probed']} tensors probed); with the imatrix its weights are used by the probes as the CLI does",
             f"- importance matrix: `imatrix.collect_from_source` on the training plays, ctx {im['ctx']}, first {im['chunks']} chunks ({im['tokens']:,} tokens, {im['entries']} entries); "
             "used by the stock preset (`convert(..., imatrix=...)`), the recipe and the budgets of the `+imatrix` rows",
             "- ★ = lowest mean KLD of its size group (level x stock size / recipe size x with or without imatrix); "
             "≈ = within one combined standard error of that group's winner; P = on the Pareto front (file bytes vs mean KLD, all rows)", "",
             "| level | group | variant | file B | bpw | mean KLD ± err | KLD p99 | same top | PPL ratio | wins | Pareto |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|:-:|:-:|"]
    for r in res["rows"]:
        if "kld" not in r:
            lines.append(f"| {r['level']} | {r['group']} | {r['label']} | failed: {r['error'][:160]} | | | | | | | |")
            continue
        mark = "★" if r["wins"] else "≈" if r["tie"] else ""
        lines.append(f"| {r['level']} | {r['group']} | {r['label']} | {r['bytes']:,} | {r['bpw']:.3f} | {r['kld']:.5f} ± {r['kld_err']:.5f} | "
                     f"{r['kld_p99']:.4f} | {100 * r['same_top']:.2f}% | {r['ppl_ratio']:.4f} | {mark} | {'P' if r['pareto'] else ''} |")
    return {f"quality-{res.get('model', 'fixture')}": "\n".join(lines) + "\n"}


# --------------------------------------------------------------------------- main


def source_state() -> str:
    """The commit the benchmark ran on, and whether the library's sources had uncommitted changes."""
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()  # noqa: E731
    dirty = git("status", "--porcelain", "--", "quantkit", "converters", "evals")
    return git("rev-parse", "--short", "HEAD") + (f" + uncommitted changes in {len(dirty.splitlines())} library files" if dirty else "")


def machine_lines(info: dict[str, Any]) -> list[str]:
    return [f"- machine: {info['nproc']} cores, {info['cpu']}, {info['ram']} RAM, kernel {info['kernel']} (shared with other engineers' jobs: "
            "'other jobs' cores' = CPU seconds the rest of the machine used during a run / its wall time, from /proc/stat)",
            f"- versions: {info['versions']}; quantkit at {info.get('commit', '?')}",
            *([f"- load: {info['note']}"] if info.get("note") else [])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--speed", action="store_true", help="part 1: Q4_K_M speed vs llama_model_quantize (fixture and synthetic)")
    ap.add_argument("--two-step", action="store_true", help="part 2: one pass vs convert_hf_to_gguf.py + llama_model_quantize (synthetic)")
    ap.add_argument("--quality", action="store_true", help="part 3: KLD at equal size, presets vs recipes vs budgets (fixture)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    ap.add_argument("--model", type=Path, default=FIXTURE, help="--quality: the HF checkpoint to study (trained on the Shakespeare plays, "
                    "e.g. by tests/fixtures/train_fixture.py --experts 16 --top-k 4 --ffn 128 --out bench/work/moe16-top4)")
    ap.add_argument("--only", choices=("fixture", "synthetic"), help="--speed: time one source only")
    ap.add_argument("--layers", type=int, default=5, help="decoder layers of the synthetic model (5 -> ~2.4 GB)")
    ap.add_argument("--note", help="recorded with the tables, e.g. what else ran or what changed since the last table")
    ap.add_argument("--no-record", action="store_true", help="do not write bench/RESULTS_quant.md")
    args = ap.parse_args()
    compile_bytecode()
    parts = [p for p in ("speed", "two_step", "quality") if getattr(args, p)] or ["speed", "two_step", "quality"]
    (WORK / "logs").mkdir(parents=True, exist_ok=True)
    info = {**machine_info(), "commit": source_state(), "note": args.note}
    run = {"speed": (part_speed, render_speed), "two_step": (part_two_step, render_two_step), "quality": (part_quality, render_quality)}
    for part in parts:
        measure, render = run[part]
        res = measure(args)
        stem = part if res.get("model", "fixture") == "fixture" else f"{part}-{res['model']}"
        (WORK / f"{stem}.json").write_text(json.dumps({"info": info, **res}, indent=1, default=str))
        for key, text in render(info, res).items():
            print(text)
            if not args.no_record:  # replaces this part's block for this source, keeps the rest of the file
                record(RESULTS, "Quantisation benchmark results", key, text, BLOCK_ORDER)


if __name__ == "__main__":
    main()
