"""``quantkit eval matrix``: quantise one model several ways and chart size against damage.

Converts the source once to a BF16 base, then to every requested type, runs
``eval kld`` of each against the base on the same tokens, and writes
``matrix.json``, ``matrix.md`` and two PNG plots: file size vs mean KLD with
the Pareto front marked, and the KLD distribution of every variant.

Not for: the statistics themselves (``quantkit.evals.kld``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    label: str
    path: Path
    bytes: int
    report: dict[str, Any]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both size and KLD (lower is better for both)."""
    front = []
    for i, (s, k) in enumerate(points):
        if not any((s2 <= s and k2 <= k) and (s2 < s or k2 < k) for j, (s2, k2) in enumerate(points) if j != i):
            front.append(i)
    return front


def run_matrix(
    src: Path, types: Sequence[str], text: str, out_dir: Path, n_ctx: int = 512, n_chunks: int | None = None,
    threads: int | None = None, on_step: Callable[[str], None] | None = None,
) -> list[Variant]:
    from quantkit.pipeline.convert import convert
    from quantkit.evals.kld import base_logprobs, compare_values
    from quantkit.engine.limits import check_chunks, check_ctx, check_ctx_value, check_text, check_threads, model_limits

    check_ctx_value(n_ctx)  # every argument before the first conversion
    check_chunks(n_chunks)
    check_threads(threads)
    check_text(text)
    check_ctx(n_ctx, model_limits(src))
    if not types:
        raise QuantkitError("--types: empty; fix: give comma-separated types, e.g. --types q8_0,Q4_K_M")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QuantkitError(f"{out_dir}: cannot create the output directory ({e.strerror or e}); fix: pass another -o") from None
    step = on_step or (lambda _msg: None)
    base = out_dir / "base-bf16.gguf"
    if not base.exists():
        step("convert base (bf16)")
        convert(src, base, "bf16")
    step("evaluate base")
    b = base_logprobs(base, text, n_ctx, n_chunks, threads, cache_dir=out_dir / "cache")
    variants, values = [], {}
    for t in types:
        path = out_dir / f"{src.name}-{t}.gguf"
        step(f"convert {t}")
        convert(src, path, t, force=True)
        step(f"evaluate {t}")
        report, kld = compare_values(b, path, text, threads, label=t)
        variants.append(Variant(t, path, path.stat().st_size, report))
        values[t] = kld
    write_outputs(variants, values, out_dir)
    return variants


def table(variants: Sequence[Variant]) -> list[dict[str, Any]]:
    front = set(pareto_front([(v.bytes, v.report["kld_mean"]) for v in variants]))
    rows = []
    for i, v in enumerate(variants):
        r = v.report
        rows.append({
            "type": v.label, "bytes": v.bytes, "kld_mean": r["kld_mean"], "kld_p99": r["kld_p99"], "same_top": r["same_top"],
            "ppl_ratio": r["ppl_ratio"], "topk_exact": r.get("routing", {}).get("topk_exact"), "pareto": i in front,
        })
    return rows


def write_outputs(variants: Sequence[Variant], values: dict[str, np.ndarray], out_dir: Path) -> None:
    rows = table(variants)
    (out_dir / "matrix.json").write_text(json.dumps({"variants": rows, "reports": {v.label: v.report for v in variants}}, indent=1) + "\n")
    md = ["| type | MiB | mean KLD | KLD p99 | same top | PPL ratio | routing top-k exact | Pareto |", "|---|---:|---:|---:|---:|---:|---:|:-:|"]
    for r in rows:
        topk = f"{r['topk_exact']:.4f}" if r["topk_exact"] is not None else "-"
        md.append(f"| {r['type']} | {r['bytes'] / 2**20:.2f} | {r['kld_mean']:.5f} | {r['kld_p99']:.5f} | {100 * r['same_top']:.2f}% | {r['ppl_ratio']:.4f} | {topk} | {'★' if r['pareto'] else ''} |")
    (out_dir / "matrix.md").write_text("\n".join(md) + "\n")
    plot(rows, values, out_dir)


def plot(rows: list[dict[str, Any]], values: dict[str, np.ndarray], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r["bytes"] / 2**20 for r in rows]
    ys = [max(r["kld_mean"], 1e-9) for r in rows]
    ax.scatter(xs, ys, c=["tab:red" if r["pareto"] else "tab:gray" for r in rows], zorder=3)
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(r["type"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = sorted((x, y) for r, x, y in zip(rows, xs, ys) if r["pareto"])
    if front:
        ax.plot(*zip(*front), color="tab:red", lw=1, label="Pareto front")
        ax.legend()
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("mean KL-divergence vs base")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "size_vs_kld.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = list(values)
    ax.boxplot([np.maximum(values[k], 1e-9) for k in labels], showfliers=False)
    ax.set_xticks(range(1, len(labels) + 1), labels)
    ax.set_yscale("log")
    ax.set_ylabel("per-token KL-divergence")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "kld_distribution.png", dpi=120)
    plt.close(fig)
