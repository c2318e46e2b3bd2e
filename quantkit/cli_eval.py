"""``quantkit eval …`` and ``quantkit gate``: thin typer wrappers over ``quantkit.evals``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from quantkit.errors import QuantkitError

#: --progress/--no-progress, one declaration for every command that draws a bar
PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on a terminal.")
eval_app = typer.Typer(no_args_is_help=True, help="Measure what quantisation cost: perplexity, KL-divergence, routing fidelity.")


def _cli():
    from quantkit import cli

    return cli


def read_text(text: Optional[Path], corpus: Optional[str]) -> str:
    if (text is None) == (corpus is None):
        raise QuantkitError("give exactly one of --text FILE or --corpus NAME (built-in: heldout)")
    if corpus is not None:
        if corpus != "heldout":
            raise QuantkitError(f"--corpus {corpus!r}: unknown (built-in: heldout, the Shakespeare plays the fixture never saw)")
        from quantkit.evals.corpora import heldout_text

        return heldout_text()
    try:
        return Path(text).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QuantkitError(f"{text}: text file not found; fix: check the path") from None
    except UnicodeDecodeError:
        raise QuantkitError(f"{text}: not UTF-8 text; fix: convert it to UTF-8") from None


class NoBar:
    """Stands in for a rich Progress that is not shown."""

    def __enter__(self) -> NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None


def _progress(desc: str, enabled: bool) -> tuple[Any, Any]:
    """A rich progress bar on stderr when it is a terminal, else a stand-in (rich is then not even imported)."""
    cli = _cli()
    if not (enabled and cli.err.is_terminal):
        return NoBar(), 0
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(desc), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=cli.err.console)
    return bar, bar.add_task(desc, total=None, info="")


def _write_json(obj: dict[str, Any], path: Optional[Path]) -> None:
    if path is not None:
        path.write_text(json.dumps(obj, indent=2) + "\n")


@eval_app.command("ppl")
def ppl(
    model: Path = typer.Argument(..., help="A .gguf file."),
    text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text file to score."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="Built-in text instead of --text: heldout."),
    ctx: int = typer.Option(512, "--ctx", help="Tokens per chunk (llama-perplexity's -c)."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Score only the first N chunks."),
    threads: Optional[int] = typer.Option(None, "--threads"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON to this file ('-' for stdout)."),
    progress: bool = PROGRESS,
) -> None:
    """Perplexity as llama-perplexity computes it, with its standard error."""
    from quantkit.evals.perplexity import perplexity

    cli = _cli()
    body = cli._run(lambda: read_text(text, corpus))
    bar, task = _progress("perplexity", progress and str(json_out) != "-")
    with bar:
        def tick(i: int, n: int, running: float) -> None:
            bar.update(task, total=n, completed=i, info=f"ppl {running:.4f}")

        r = cli._run(lambda: perplexity(model, body, n_ctx=ctx, n_chunks=chunks, threads=threads, on_chunk=tick))
    j = r.to_json()
    if str(json_out) == "-":
        cli._print_json(j)
        return
    _write_json(j, json_out)
    cli.out.line(f"PPL = {r.ppl:.4f} +/- {r.ppl_stderr:.5f}  ({r.n_chunks} chunks of {r.n_ctx}, {r.n_scored} scored tokens, {r.tokens_per_second:.0f} tok/s)")


@eval_app.command("kld")
def kld(
    base: Path = typer.Argument(..., help="Base model: a .gguf file (e.g. the F32/BF16 conversion)."),
    model: Path = typer.Argument(..., help="Candidate .gguf file."),
    text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text file."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="Built-in text instead of --text: heldout."),
    ctx: int = typer.Option(512, "--ctx"),
    chunks: Optional[int] = typer.Option(None, "--chunks"),
    label: Optional[str] = typer.Option(None, "--label", help="Variant name recorded in the report (default: file stem)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where base log-probs are cached (default ~/.cache/quantkit)."),
    threads: Optional[int] = typer.Option(None, "--threads"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON to this file ('-' for stdout)."),
    progress: bool = PROGRESS,
) -> None:
    """KL-divergence, token statistics and routing fidelity of MODEL against BASE on the same tokens."""
    from quantkit.evals.kld import base_logprobs, compare

    cli = _cli()
    body = cli._run(lambda: read_text(text, corpus))
    bar, task = _progress("base", progress and str(json_out) != "-")
    with bar:
        tick = lambda i, n: bar.update(task, total=n, completed=i)  # noqa: E731
        b = cli._run(lambda: base_logprobs(base, body, ctx, chunks, threads, cache_dir, on_chunk=tick))
        bar.update(task, description="candidate", completed=0)
        report = cli._run(lambda: compare(b, model, body, threads, label, on_chunk=tick))
    if str(json_out) == "-":
        cli._print_json(report)
        return
    _write_json(report, json_out)
    from rich.table import Table

    t = Table(title=f"{report['setup']['label']} vs {Path(report['setup']['base']).name}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("mean KLD", f"{report['kld_mean']:.6f} ± {report['kld_mean_stderr']:.6f}")
    for k in ("kld_max", "kld_p99_9", "kld_p99", "kld_p95", "kld_p90", "kld_median"):
        t.add_row(k, f"{report[k]:.6f}")
    t.add_row("same top token", f"{100 * report['same_top']:.3f} ± {100 * report['same_top_stderr']:.3f} %")
    t.add_row("Δp mean / RMS", f"{100 * report['dp_mean']:.4f} % / {100 * report['dp_rms']:.4f} %")
    t.add_row("PPL(Q) / PPL(base)", f"{report['ppl']:.4f} / {report['ppl_base']:.4f} = {report['ppl_ratio']:.5f}")
    if "routing" in report:
        r = report["routing"]
        t.add_row("routing top-k exact / Jaccard", f"{r['topk_exact']:.4f} / {r['topk_jaccard']:.4f}")
        t.add_row("routing top-1 / router KLD", f"{r['top1']:.4f} / {r['router_kld']:.3g}")
        t.add_row("dead experts (cand)", str(r["dead_experts_cand"]))
    cli.out.print(t)


@eval_app.command("matrix")
def matrix(
    src: Path = typer.Argument(..., help="Hugging Face model directory."),
    types: str = typer.Option("q8_0,f16", "--types", help="Comma-separated --type values to compare."),
    text: Optional[Path] = typer.Option(None, "--text"),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="Built-in text instead of --text: heldout."),
    out_dir: Path = typer.Option(Path("matrix"), "-o", "--out-dir", help="Where GGUFs, matrix.json/md and PNG plots go."),
    ctx: int = typer.Option(512, "--ctx"),
    chunks: Optional[int] = typer.Option(None, "--chunks"),
    threads: Optional[int] = typer.Option(None, "--threads"),
) -> None:
    """Quantise SRC several ways, evaluate each against its BF16 base, write a table and plots."""
    from quantkit.evals.matrix import run_matrix

    cli = _cli()
    body = cli._run(lambda: read_text(text, corpus))
    names = [t.strip() for t in types.split(",") if t.strip()]
    cli._run(lambda: run_matrix(src, names, body, out_dir, ctx, chunks, threads, on_step=lambda m: cli.err.print(f"[dim]{m}[/]")))
    cli.out.print((out_dir / "matrix.md").read_text())
    cli.out.print(f"plots: {out_dir / 'size_vs_kld.png'}, {out_dir / 'kld_distribution.png'}")


def gate_command(
    report: Path = typer.Argument(..., help="JSON report from quantkit eval kld --json."),
    baseline: Path = typer.Option(..., "--baseline", help="Committed baseline report."),
    thresholds: Optional[Path] = typer.Option(None, "--thresholds", help="TOML thresholds (default: quantkit's built-in)."),
    update_baseline: bool = typer.Option(False, "--update-baseline", help="Record REPORT as the new baseline instead of checking."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the verdict as JSON."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Write a Markdown table (e.g. $GITHUB_STEP_SUMMARY)."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML."),
) -> None:
    """Fail (exit 1) when REPORT regresses past thresholds against BASELINE, or the setups differ."""
    from quantkit.evals import gate as g
    from quantkit.output import atomic_file

    cli = _cli()
    if update_baseline:
        data = cli._run(lambda: g.load_json(report, "report"))
        baseline.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(baseline, force=True) as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n")
        cli.out.print(f"baseline {baseline} updated from {report}")
        return
    verdict = cli._run(lambda: g.gate(report, baseline, thresholds))
    _write_json(verdict.to_json(), json_out)
    if markdown is not None:
        with markdown.open("a") as f:
            f.write(g.to_markdown(verdict))
    if junit is not None:
        junit.write_text(g.to_junit(verdict))
    from rich.table import Table

    t = Table(title=f"quantkit gate: {'PASS' if verdict.ok else 'FAIL'}")
    for col in ("check", "value", "baseline", "allowed", "result"):
        t.add_column(col)
    for c in verdict.checks:
        t.add_row(c.name, g._fmt(c.value), g._fmt(c.baseline), c.allowed, "[green]ok[/]" if c.ok else f"[red]{c.message}[/]")
    cli.out.print(t)
    if not verdict.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
    app.command("gate")(gate_command)
