"""Bit-budget benchmark: what a budget's measurements cost next to a preset conversion, and what they buy.

Three parts, each run side by side in one process tree so the machine's load is shared (ratios are the
result; the load average is recorded before and after every part):

  speed    synthetic bf16 Mixtral checkpoints of two sizes (bench_convert.py's generator: 1 and 3 layers,
           ~0.65 and ~1.5 GB): ``convert --type Q4_K_M`` against ``--target-size`` of that file, ``--target-bpw 4.8``
           (the case of issue 16) against ``--type IQ4_XS`` (the type that plan is mostly made of) and Q4_K_M, and
           ``plan --target-bpw 4.8`` (the measurement alone); wall time and peak RSS (GNU time) of each command,
           alternating order, median of the repeats.
  quality  the fixture at stock Q4_K_M's file size: mean KLD vs BF16 on the held-out plays for the stock preset, the
           priors budget, and budgets measured on --calib-text in full and grouped modes; each measurement's cost
           (probes x passes, estimated and taken).
  quality2 the same on a second trained MoE (bench/work/moe16-top4: 16 experts of ffn 128, top-4; trained first if missing).
  scaling  many-expert synthetic models (Mixtral-shaped, 256 experts of ffn 64, hidden 256: DeepSeek V3's expert
           count and proportions scaled down; 15, 30 and 60 layers): the error sampling, the knapsack and the
           --calib-text cost (grouped measured; full estimated from the same timing) against the tensor count.

``--baseline REV`` adds the bit-budget code of a git revision (``git show``, read-only; run in a child with
those three modules swapped in) as extra rows of the speed and quality parts: the before/after table.
Writes bench/RESULTS_budget.md (the current table; history in git).

Usage: python bench/bench_budget.py [--parts speed,quality,quality2,scaling] [--repeats N] [--baseline REV] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from bench_convert import TIME, TOKENIZER_FILES, compile_bytecode, machine_info, make_checkpoint, tensor_shapes, write_bf16  # noqa: E402

WORK = BENCH / "work" / "budget"
SIZES = (1, 3)  # layers of the synthetic Mixtral (bench_convert.py's shapes): ~0.65 and ~1.5 GB
DEPTHS = (15, 30, 60)  # layers of the many-expert models
EXPERTS = 256
WIDTHS = (64, 128, 256)  # experts of the 15-layer models
TARGETS = {"budget / preset time": 1.5, "peak RSS growth": 1.25}
SECOND = BENCH / "work" / "moe16-top4"  # quality2's model, trained by tests/fixtures/train_fixture.py SECOND_ARGS when missing
SECOND_ARGS = ("--experts", "16", "--top-k", "4", "--ffn", "128", "--steps", "500", "--seed", "1")
SECOND_DESC = "16 experts of ffn 128, top-4, 4 layers, 500 steps on the training plays"
MAX_PROBES = 64  # quantkit.pipeline.sensitivity.MAX_PROBES (said in the table)
BASELINE_FILES = ("quantkit/policy/budget.py", "quantkit/policy/plan.py", "quantkit/pipeline/sensitivity.py")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --------------------------------------------------------------------------- models


def many_expert_config(layers: int, experts: int = EXPERTS) -> dict[str, Any]:
    """DeepSeek V3's expert count (256, top-8) and proportions (hidden / expert ffn ~ 4) at hidden 256, Mixtral-shaped
    (quantkit's llama-arch MoE: no shared expert, no MLA), with the fixture's 3000-token tokenizer."""
    return {
        "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 256, "intermediate_size": 64,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "num_local_experts": experts, "num_experts_per_tok": 8, "vocab_size": 3000, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 1e4, "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"},
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
    }


def make_many(layers: int, experts: int = EXPERTS) -> Path:
    """A one-shard synthetic checkpoint of :func:`many_expert_config` (cached)."""
    config = many_expert_config(layers, experts)
    src = WORK / f"moe{experts}-L{layers}"
    marker = src / ".complete"
    if marker.exists() and json.loads(marker.read_text()) == config:
        return src
    src.mkdir(parents=True, exist_ok=True)
    print(f"  generating {src.name}", file=sys.stderr)
    write_bf16(src / "model.safetensors", tensor_shapes(config), np.random.default_rng(layers))
    (src / "config.json").write_text(json.dumps(config, indent=2))
    fixture = ROOT / "tests" / "fixtures" / "tiny-mixtral"
    for name in TOKENIZER_FILES:
        (src / name).write_bytes((fixture / name).read_bytes())
    marker.write_text(json.dumps(config))
    return src


# --------------------------------------------------------------------------- the baseline revision


def baseline_dir(rev: str) -> Path:
    """The bit-budget modules of ``rev`` (git show: reads the repository, changes nothing)."""
    out = WORK / f"baseline-{rev}"
    out.mkdir(parents=True, exist_ok=True)
    for f in BASELINE_FILES:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{f}"], capture_output=True, text=True, check=True).stdout
        (out / Path(f).name).write_text(text)
    return out


BASELINE_PRELUDE = """
import sys
from pathlib import Path
import quantkit.policy.budget as b, quantkit.policy.plan as p, quantkit.pipeline.convert as c, quantkit.pipeline.sensitivity as s
d = Path({dir!r})
for mod, name in ((b, "budget.py"), (p, "plan.py"), (s, "sensitivity.py")):
    exec(compile((d / name).read_text(), str(d / name), "exec"), mod.__dict__)
c.make_plan, c.Target = p.make_plan, p.Target
"""


# --------------------------------------------------------------------------- timing


def timed(cmd: list[str], log: Path) -> tuple[float, float, float]:
    """(wall seconds, peak RSS MiB, CPU seconds: user + system) of one command under GNU time."""
    rss = log.with_suffix(".rss")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with open(log, "ab") as err:
        r = subprocess.run([TIME, "-f", "%M %U %S", "-o", str(rss), *cmd], stdout=subprocess.DEVNULL, stderr=err, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{cmd[:4]} failed (rc {r.returncode}); see {log}:\n" + log.read_text()[-3000:])
    kb, user, system = rss.read_text().split()[-3:]
    return wall, int(kb) / 1024, float(user) + float(system)


def speed(repeats: int, rev_dir: Path | None) -> dict[str, Any]:
    """Part 1: time and peak RSS of budget conversions next to preset conversions, two model sizes."""
    qk = str(Path(sys.executable).parent / "quantkit")
    out_dir, logs = WORK / "out", WORK / "logs"
    out_dir.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for layers in SIZES:
        src = make_checkpoint(layers)
        model_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        out = out_dir / "o.gguf"
        subprocess.run(["cat", *map(str, src.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)  # warm cache
        q4 = json.loads(subprocess.run([qk, "convert", str(src), "-o", str(out), "--type", "Q4_K_M", "--force", "--json"],
                                       capture_output=True, text=True, check=True).stdout)["bytes"]
        def same_plan(*budget_args: str) -> list[str]:
            """The budget's plan given back as --tensor-type rules: the conversion alone, without the measurement."""
            plan = json.loads(subprocess.run([qk, "plan", str(src), *budget_args, "--json"], capture_output=True, text=True, check=True).stdout)
            rules = [a for t in plan["tensors"] if t["type"] != "F32" for a in ("--tensor-type", f"^{re.escape(t['name'])}$={t['type']}")]
            return [qk, "convert", str(src), "-o", str(out), "--type", "f16", *rules, "--force", "--json"]

        variants = {
            "Q4_K_M": [qk, "convert", str(src), "-o", str(out), "--type", "Q4_K_M", "--force", "--json"],
            "budget @ Q4_K_M size": [qk, "convert", str(src), "-o", str(out), "--target-size", str(q4), "--force", "--json"],
            "its plan as rules @ Q4_K_M size": same_plan("--target-size", str(q4)),
            "IQ4_XS": [qk, "convert", str(src), "-o", str(out), "--type", "IQ4_XS", "--force", "--json"],
            "budget 4.8 bpw": [qk, "convert", str(src), "-o", str(out), "--target-bpw", "4.8", "--force", "--json"],
            "its plan as rules 4.8 bpw": same_plan("--target-bpw", "4.8"),
            "plan 4.8 bpw (measurement only)": [qk, "plan", str(src), "--target-bpw", "4.8", "--json"],
            # the least damage whatever the time (the budget before --time-cap): what the cap saves
            "budget @ Q4_K_M size, --time-cap 0": [qk, "convert", str(src), "-o", str(out), "--target-size", str(q4), "--time-cap", "0", "--force", "--json"],
            "budget 4.8 bpw, --time-cap 0": [qk, "convert", str(src), "-o", str(out), "--target-bpw", "4.8", "--time-cap", "0", "--force", "--json"],
        }
        if rev_dir is not None:
            code = BASELINE_PRELUDE.format(dir=str(rev_dir)) + textwrap.dedent(f"""
                from quantkit.pipeline.convert import convert
                r = convert({str(src)!r}, {str(out)!r}, target=p.Target(bpw=4.8), force=True)
                print(r.seconds)
            """)
            variants[f"budget 4.8 bpw ({rev_dir.name.removeprefix('baseline-')})"] = [sys.executable, "-c", code]
        runs: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
        loads = [load()]
        for r in range(repeats):
            for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
                runs[name].append(timed(variants[name], logs / f"L{layers}.log"))
                wall, rss, cpu = runs[name][-1]
                print(f"  L{layers} run {r + 1} {name:<34} {wall:7.2f} s {cpu:7.2f} CPU s {rss:7.0f} MiB  (load {load()})", file=sys.stderr)
        loads.append(load())
        out.unlink(missing_ok=True)
        results[f"L{layers}"] = {"layers": layers, "model_bytes": model_bytes, "q4_bytes": q4, "load": loads,
                                 "rows": {n: {"wall": statistics.median(w for w, _, _ in v), "cpu": statistics.median(c for _, _, c in v),
                                              "rss": max(m for _, m, _ in v), "runs": [w for w, _, _ in v]} for n, v in runs.items()}}
    return results


# --------------------------------------------------------------------------- quality and cost on the fixture


def quality(threads: int, n_chunks: int, rev_dir: Path | None, model: Path | None = None, part: str = "quality") -> dict[str, Any]:
    """Part 2: mean KLD at stock Q4_K_M's size on the fixture (or ``model``: part ``quality2``), and what each measurement cost."""
    from quantkit.evals import corpora
    from quantkit.evals.kld import base_logprobs, compare_values
    from quantkit.pipeline import sensitivity
    from quantkit.pipeline.convert import convert, prepare
    from quantkit.policy import budget
    from quantkit.policy.plan import Target

    fixture = model or ROOT / "tests" / "fixtures" / "tiny-mixtral"
    if not (fixture / "config.json").is_file():  # the second model is trained once (seeded: the same weights each time), ~25 min
        cmd = [sys.executable, str(ROOT / "tests" / "fixtures" / "train_fixture.py"), *SECOND_ARGS, "--out", str(fixture)]
        print(f"  training {fixture.name}: {' '.join(cmd[1:])}", file=sys.stderr)
        subprocess.run(cmd, check=True)
    qdir = WORK / part
    qdir.mkdir(parents=True, exist_ok=True)
    calib = corpora.shakespeare().train_text[:60000]  # the tests' calibration text: training plays only
    held = corpora.heldout_text()
    base = qdir / "bf16.gguf"
    convert(fixture, base, "bf16", force=True)
    stock = convert(fixture, qdir / "stock.gguf", "Q4_K_M", force=True)
    size = stock.nbytes
    rows: dict[str, dict[str, Any]] = {"stock Q4_K_M": {"path": qdir / "stock.gguf", "cost": None, "seconds": 0.0}}
    (qdir / "calib.txt").write_text(calib)
    ckpt, prep = prepare(fixture, "f32")
    t0 = time.perf_counter()
    errors = budget.measure_errors(prep.tensors, hparams=prep.hparams)  # what every budget samples first (not counted below)
    t_sample = time.perf_counter() - t0
    ckpt.close()
    convert(fixture, qdir / "priors.gguf", target=Target(size=size, errors=errors), force=True)
    rows["budget, priors"] = {"path": qdir / "priors.gguf", "cost": None, "seconds": 0.0}
    convert(fixture, qdir / "priors-nocap.gguf", target=Target(size=size, errors=errors, time_cap=0), force=True)
    rows["budget, priors, --time-cap 0"] = {"path": qdir / "priors-nocap.gguf", "cost": None, "seconds": 0.0}
    modes = [("full", 4, 8), ("grouped", 2, 8), ("grouped", 1, 8), ("full", 4, 2)]
    for mode, ranges, chunks in modes:
        label = f"measured, {mode}" + (f" ({ranges} ranges)" if mode == "grouped" else "") + f", {chunks} chunks"
        t0 = time.perf_counter()
        m = sensitivity.measure_checkpoint(fixture, calib, 256, chunks, threads=threads, mode=mode, ranges=ranges, work_dir=qdir)
        took = time.perf_counter() - t0
        name = label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        convert(fixture, qdir / f"{name}.gguf", target=Target(size=size, measured=m, errors=errors), force=True)
        rows["budget, " + label] = {"path": qdir / f"{name}.gguf", "cost": m.cost.to_json(), "seconds": took}
        print(f"  {label}: {m.cost.describe()} [{took:.1f} s with the copy]  (load {load()})", file=sys.stderr)
    if rev_dir is not None:
        rev = rev_dir.name.removeprefix("baseline-")
        code = BASELINE_PRELUDE.format(dir=str(rev_dir)) + textwrap.dedent(f"""
            import json, time
            from quantkit.pipeline.convert import convert
            out = {{}}
            t0 = time.perf_counter()
            convert({str(fixture)!r}, {str(qdir / 'rev-priors.gguf')!r}, target=p.Target(size={size}), force=True)
            out["priors"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            m = s.measure_checkpoint({str(fixture)!r}, Path({str(qdir / 'calib.txt')!r}).read_text(), 256, 8, threads={threads}, work_dir={str(qdir)!r})
            out["measure"] = time.perf_counter() - t0
            convert({str(fixture)!r}, {str(qdir / 'rev-measured.gguf')!r}, target=p.Target(size={size}, measured=m), force=True)
            print(json.dumps(out))
        """)
        got = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        rows[f"budget, priors ({rev}; total s = its whole conversion)"] = {"path": qdir / "rev-priors.gguf", "cost": None, "seconds": got["priors"]}
        rows[f"budget, measured, full, 8 chunks ({rev})"] = {"path": qdir / "rev-measured.gguf", "cost": None, "seconds": got["measure"]}
    b = base_logprobs(base, held, n_ctx=256, n_chunks=n_chunks, cache_dir=qdir / "cache")
    per = {}
    for name, r in rows.items():
        res, klds = compare_values(b, r["path"], held)
        per[name] = klds
        r.update(kld=res["kld_mean"], kld_se=res["kld_mean_stderr"], same_top=res.get("same_top_p"), bytes=Path(r["path"]).stat().st_size)
        print(f"  {name}: KLD {res['kld_mean']:.5f} +- {res['kld_mean_stderr']:.5f}", file=sys.stderr)
    ref = per["budget, measured, full, 8 chunks"]
    for name, r in rows.items():  # paired against the full measurement: same positions
        d = per[name] - ref
        r["vs_full"] = float(d.mean())
        r["vs_full_se"] = float(d.std(ddof=1) / np.sqrt(len(d)))
        r["path"] = str(r["path"])
    return {"size": size, "n_chunks": n_chunks, "threads": threads, "rows": rows, "load": load(), "sample_s": t_sample, "model": fixture.name}


# --------------------------------------------------------------------------- scaling with many experts


def scaling(threads: int) -> dict[str, Any]:
    """Part 3: error sampling, knapsack and --calib-text cost against the tensor count of many-expert models."""
    from quantkit.evals import corpora
    from quantkit.pipeline import sensitivity
    from quantkit.pipeline.convert import prepare
    from quantkit.policy import budget
    from quantkit.policy.plan import Target

    calib = corpora.shakespeare().train_text[:20000]
    rows = []
    for layers, experts in [(DEPTHS[0], e) for e in WIDTHS] + [(d, EXPERTS) for d in DEPTHS[1:]]:
        src = make_many(layers, experts)
        ckpt, prep = prepare(src, "f32")
        n_tensors = sum(1 for t in prep.tensors if budget.candidates(t))
        t0 = time.perf_counter()
        errors = budget.measure_errors(prep.tensors, hparams=prep.hparams)
        t_sample = time.perf_counter() - t0
        ckpt.close()
        t0 = time.perf_counter()
        ckpt, _ = prepare(src, "budget", target=Target(bpw=4.5, errors=errors))
        t_plan = time.perf_counter() - t0  # the knapsack, with the errors given
        ckpt.close()
        t0 = time.perf_counter()
        m = sensitivity.measure_checkpoint(src, calib, 64, 2, threads=threads, mode="grouped", ranges=4, work_dir=WORK)
        took = time.perf_counter() - t0
        c = m.cost
        full_est = n_tensors * c.passes * c.seconds_per_pass + c.quantise_seconds
        auto = len(sensitivity.probe_groups(prep.tensors, "auto"))  # what the default mode would run
        assert sensitivity.MAX_PROBES == MAX_PROBES
        row = {"layers": layers, "experts": experts, "hf_tensors": sum(len(t.sources) for t in prep.tensors), "tensors": n_tensors,
               "model_bytes": (src / "model.safetensors").stat().st_size, "sample_s": t_sample, "knapsack_s": t_plan,
               "grouped": c.to_json(), "grouped_total_s": took, "full_estimate_s": full_est, "full": None, "load": load(),
               "auto_probes": auto, "auto_estimate_s": auto * c.passes * c.seconds_per_pass + c.quantise_seconds}
        if layers == DEPTHS[0]:  # the full measurement too, where it is affordable
            f = sensitivity.measure_checkpoint(src, calib, 64, 2, threads=threads, mode="full", work_dir=WORK).cost
            row["full"] = f.to_json()
        rows.append(row)
        print(f"  L{layers} E{experts}: {n_tensors} tensors, sampling {t_sample:.1f} s, plan {t_plan:.1f} s, {c.describe()}; full ~{full_est:.0f} s"
              + (f", took {row['full']['seconds']:.1f} s" if row["full"] else "") + f"  (load {load()})", file=sys.stderr)
    return {"rows": rows}


# --------------------------------------------------------------------------- report


def render(info: dict[str, Any], res: dict[str, Any]) -> str:
    L = ["# Bit-budget benchmark (`bench/bench_budget.py`)", "",
         "The current table of each part (a run replaces the parts it measures; history in git).", "",
         f"- machine: {info['nproc']} cores, {info['cpu']}, {info['ram']} RAM, kernel {info['kernel']}; "
         "shared with other engineers' jobs while it ran: compare rows side by side (ratios), not with other days",
         f"- versions: {info['versions']}", ""]

    def when(part: str) -> list[str]:
        r = res[part].get("run", {})
        return [f"Run: {r.get('date', '?')}, `{r.get('command', '?')}`; load average (1/5/15 min) {r.get('load_start', '?')} at the start, "
                f"{r.get('load_end', '?')} at the end.", ""]

    if "speed" in res:
        L += ["## Budget vs preset: time and peak RSS", "", *when("speed"),
              "Synthetic bf16 Mixtral (bench_convert.py's shapes: hidden 2048, 8 experts of ffn 4096, 32000-token vocabulary), "
              f"warm page cache, median of the runs (alternating order), peak RSS = the largest of the runs (GNU time). "
              "`budget ...` is the whole command: sampling the errors, the knapsack, the conversion.", "",
              "| model | variant | median wall s | runs s | median CPU s | peak RSS MiB | wall / Q4_K_M | CPU / Q4_K_M | wall / IQ4_XS |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|"]
        sizes = {k: v for k, v in res["speed"].items() if k != "run"}
        for key, s in sizes.items():
            rows = s["rows"]
            for name, r in rows.items():
                L.append(f"| {key}, {s['model_bytes'] / 1e9:.2f} GB | {name} | {r['wall']:.1f} | {', '.join(f'{w:.1f}' for w in r['runs'])} | {r['cpu']:.1f} | "
                         f"{r['rss']:.0f} | {r['wall'] / rows['Q4_K_M']['wall']:.2f} | {r['cpu'] / rows['Q4_K_M']['cpu']:.2f} | {r['wall'] / rows['IQ4_XS']['wall']:.2f} |")
            L.append(f"| {key} | load before / after | {s['load'][0]} / {s['load'][1]} | | | | | | |")
        keys = list(sizes)
        small, big = res["speed"][keys[0]]["rows"], res["speed"][keys[-1]]["rows"]
        size_ratio = res["speed"][keys[-1]]["model_bytes"] / res["speed"][keys[0]]["model_bytes"]
        L += ["", "Checks: wall-time and CPU-time (user + system) ratios of the medians; CPU time is the steadier one on a shared machine.", "",
              "| check | wall ratio | CPU ratio | target | result |", "|---|---:|---:|---:|---|"]

        def check(what: str, rows: dict[str, Any], a: str, b: str, target: float | None) -> None:
            w, c = rows[a]["wall"] / rows[b]["wall"], rows[a]["cpu"] / rows[b]["cpu"]
            verdict = "" if target is None else "PASS" if max(w, c) <= target else "FAIL" if min(w, c) > target else \
                f"PASS on {'CPU' if c <= target else 'wall'}, not on {'wall' if c <= target else 'CPU'}"
            L.append(f"| {what} | {w:.2f} | {c:.2f} | {'<= ' + str(target) if target else ''} | {verdict} |")

        t = TARGETS["budget / preset time"]
        for key in keys:
            rows = res["speed"][key]["rows"]
            check(f"{key}: budget @ Q4_K_M size / Q4_K_M", rows, "budget @ Q4_K_M size", "Q4_K_M", t)
            check(f"{key}: budget 4.8 bpw / IQ4_XS (its main type)", rows, "budget 4.8 bpw", "IQ4_XS", t)
            check(f"{key}: budget 4.8 bpw / Q4_K_M", rows, "budget 4.8 bpw", "Q4_K_M", t)
            for size in ("@ Q4_K_M size", "4.8 bpw"):
                check(f"{key}: budget {size} / its own plan given as rules (the budget's overhead)", rows, f"budget {size}", f"its plan as rules {size}", t)
            check(f"{key}: the measurement alone (plan 4.8 bpw) / Q4_K_M", rows, "plan 4.8 bpw (measurement only)", "Q4_K_M", None)
            for size in ("@ Q4_K_M size", "4.8 bpw"):
                if f"budget {size}, --time-cap 0" in rows:
                    check(f"{key}: budget {size}, --time-cap 0 (no cap) / Q4_K_M", rows, f"budget {size}, --time-cap 0", "Q4_K_M", None)
            old = next((n for n in rows if n.startswith("budget 4.8 bpw (")), None)
            if old:
                check(f"{key}: budget 4.8 bpw / {old} (after / before)", rows, "budget 4.8 bpw", old, None)
        L += ["", "| peak RSS | larger / smaller model | model size ratio | target | result |", "|---|---:|---:|---:|---|"]
        names = ["budget @ Q4_K_M size", "budget 4.8 bpw", "plan 4.8 bpw (measurement only)", "Q4_K_M"] + [n for n in small if n.startswith("budget 4.8 bpw (")]
        for name in names:
            v = big[name]["rss"] / small[name]["rss"]
            verdict = ("PASS" if v <= TARGETS["peak RSS growth"] else "FAIL") if not name.startswith("budget 4.8 bpw (") and name != "Q4_K_M" else ""
            L.append(f"| {name}: {big[name]['rss']:.0f} / {small[name]['rss']:.0f} MiB | {v:.2f} | {size_ratio:.2f} | "
                     f"{'<= ' + str(TARGETS['peak RSS growth']) if verdict else ''} | {verdict} |")
        L.append("")
    for part in ("quality", "quality2"):
        if part not in res:
            continue
        q = res[part]
        title = "the fixture" if part == "quality" else f"a second trained MoE ({q.get('model', '?')}: {SECOND_DESC})"
        L += [f"## --calib-text: cost vs KLD gain on {title}", "", *when(part),
              f"Every budget at stock Q4_K_M's file size ({q['size']:,} bytes); mean KLD vs the BF16 file on the held-out plays "
              f"(ctx 256, {q['n_chunks']} chunks, second halves scored); calibration on the training plays (first 60,000 characters), "
              f"ctx 256, llama.cpp on {q['threads']} thread(s). Cost: what `plan` prints before it starts (probes x passes x s/pass "
              "+ quantising) and what it took (probes only; `total` adds writing the unquantised copy and the base passes). "
              f"Sampling the relative errors, which every budget does first, took {q['sample_s']:.1f} s (not in the columns). "
              "`vs full` is the paired difference from the full measurement on the same positions (± its standard error).", "",
              "| variant | bytes | mean KLD | vs stock | vs full (paired) | probes x passes | estimated s | took s | total s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        stock = q["rows"]["stock Q4_K_M"]["kld"]
        for name, r in q["rows"].items():
            c = r["cost"]
            cost = f"{c['probes']} x {c['passes_per_probe']}" if c else ""
            est = f"{c['estimated_seconds']:.1f}" if c else ""
            took = f"{c['seconds']:.1f}" if c else ""
            L.append(f"| {name} | {r['bytes']:,} | {r['kld']:.5f} ± {r['kld_se']:.5f} | {100 * (r['kld'] / stock - 1):+.0f}% | "
                     f"{r['vs_full']:+.5f} ± {r['vs_full_se']:.5f} | {cost} | {est} | {took} | {r['seconds']:.1f} |")
        L += [f"", f"Load at the end of this part: {q['load']}.", ""]
    if "scaling" in res:
        L += ["## --calib-text cost on many-expert models", "", *when("scaling"),
              f"Synthetic bf16 Mixtral-shaped models with {EXPERTS} experts (top-8, expert ffn 64, hidden 256, 3000-token vocabulary): "
              "the expert count and proportions of DeepSeek V3 scaled down (no shared expert or MLA). `tensors` = quantisable GGUF "
              "tensors (experts stacked per layer); `HF tensors` = the checkpoint's. Calibration: ctx 64, 2 chunks per probe. "
              "Grouped (4 layer ranges) measured; full = tensors x passes x s/pass + quantising, from the same run's timing.", "",
              "| layers | experts | HF tensors | tensors | GB | sample errors s | plan (knapsack) s | s/pass | grouped: probes | est. s | took s | full: probes | est. s | took s | auto (default): probes | est. s | load |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        rows = res["scaling"]["rows"]
        for r in rows:
            g, f = r["grouped"], r.get("full")
            full = f"{f['probes']} | {f['estimated_seconds']:.1f} | {f['seconds']:.1f}" if f else f"{r['tensors']} | {r['full_estimate_s']:.0f} | (not run)"
            L.append(f"| {r['layers']} | {r.get('experts', EXPERTS)} | {r['hf_tensors']:,} | {r['tensors']} | {r['model_bytes'] / 1e9:.2f} | {r['sample_s']:.1f} | "
                     f"{r['knapsack_s']:.1f} | {g['seconds_per_pass']:.3f} | {g['probes']} | {g['estimated_seconds']:.1f} | {g['seconds']:.1f} | {full} | "
                     f"{r.get('auto_probes', '')} | {r.get('auto_estimate_s', 0):.1f} | {r['load']} |")
        wide = [r for r in rows if r["layers"] == DEPTHS[0]]
        deep = [r for r in rows if r.get("experts", EXPERTS) == EXPERTS]
        if len(wide) > 1 and wide[0].get("full") and wide[-1].get("full"):
            a, b = wide[0], wide[-1]
            L += ["", f"Experts {a['experts']} -> {b['experts']} at {a['layers']} layers: HF tensors {b['hf_tensors'] / a['hf_tensors']:.2f}x, "
                  f"model {b['model_bytes'] / a['model_bytes']:.2f}x; full measurement {b['full']['seconds'] / a['full']['seconds']:.2f}x, "
                  f"grouped {b['grouped']['seconds'] / a['grouped']['seconds']:.2f}x, error sampling {b['sample_s'] / a['sample_s']:.2f}x."]
        if len(deep) > 1:
            a, b = deep[0], deep[-1]
            L += ["", f"Layers {a['layers']} -> {b['layers']} at {b.get('experts', EXPERTS)} experts: tensors {b['tensors'] / a['tensors']:.2f}x; "
                  f"error sampling {b['sample_s'] / a['sample_s']:.2f}x, grouped measurement {b['grouped']['seconds'] / a['grouped']['seconds']:.2f}x "
                  f"(a fixed 30 probes; each pass {b['grouped']['seconds_per_pass'] / a['grouped']['seconds_per_pass']:.2f}x longer), "
                  f"full measurement (estimated) {b['full_estimate_s'] / a['full_estimate_s']:.2f}x (probes and passes both grow with depth), "
                  f"auto (the default: at most {MAX_PROBES} probes) {b.get('auto_estimate_s', 0) / max(a.get('auto_estimate_s', 1), 1e-9):.2f}x."]
        L.append("")
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="speed,quality,quality2,scaling", help="comma-separated; 'none' renders the saved results again")
    ap.add_argument("--second", type=Path, default=SECOND, help="quality2: a second trained MoE (made by the command in its error if missing)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--baseline", default=None, help="a git revision whose bit-budget code is timed beside the current one")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads of the --calib-text measurements (1: stable on a shared machine)")
    ap.add_argument("--chunks", type=int, default=100, help="held-out chunks of the KLD evaluation")
    args = ap.parse_args()
    compile_bytecode()
    WORK.mkdir(parents=True, exist_ok=True)
    info = {**machine_info(), "load_start": load(), "command": " ".join(["python", "bench/bench_budget.py", *sys.argv[1:]])}
    rev_dir = baseline_dir(args.baseline) if args.baseline else None
    parts = args.parts.split(",")
    saved = WORK / "results.json"
    res: dict[str, Any] = json.loads(saved.read_text()) if saved.exists() else {}  # parts not run now keep their last table
    old = res.pop("info", None)
    for part in ("speed", "quality", "quality2", "scaling"):  # a results file from before parts carried their own run
        if old and part in res and "run" not in res[part]:
            res[part]["run"] = {"date": old["date"], "load_start": old["load_start"], "command": old["command"], "load_end": res[part].get("load", "?")}
    for name, fn in (("speed", lambda: speed(args.repeats, rev_dir)), ("quality", lambda: quality(args.threads, args.chunks, rev_dir)),
                     ("quality2", lambda: quality(args.threads, args.chunks, None, args.second, "quality2")), ("scaling", lambda: scaling(args.threads))):
        if name in parts:
            start = {"date": machine_info()["date"], "load_start": load(), "command": info["command"]}
            res[name] = {**fn(), "run": {**start, "load_end": load()}}
    saved.write_text(json.dumps(res, indent=2, default=str))
    text = render(info, res)
    (BENCH / "RESULTS_budget.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
