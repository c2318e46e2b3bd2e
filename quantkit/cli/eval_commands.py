"""``quantkit eval …`` and ``quantkit gate``: thin typer wrappers over ``quantkit.evals``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import typer

from quantkit.errors import QuantkitError

#: --progress/--no-progress, one declaration for every command that draws a bar
PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on a terminal.")
#: options shared by the eval commands, with the ranges checked before anything is loaded
CTX = typer.Option(512, "--ctx", min=8, help="Tokens per chunk (llama-perplexity's -c); the text needs at least twice as many.")
CHUNKS = typer.Option(None, "--chunks", min=1, help="Score only the first N chunks.")
THREADS = typer.Option(None, "--threads", min=1, help="CPU threads (default: physical cores).")
FORCE = typer.Option(False, "--force", help="Overwrite an existing --json file.")
#: --rpc on every command that loads a model (run, chat, eval ppl, eval kld, imatrix)
RPC = typer.Option(
    None, "--rpc", metavar="HOST:PORT[,...]",
    help="Offload layers to llama.cpp RPC servers (ggml-rpc-server on each worker); unauthenticated: trusted networks only.",
)
eval_app = typer.Typer(no_args_is_help=True, help="Measure what quantisation cost: perplexity, KL-divergence, routing fidelity.")


def _cli():
    """The shared console and error handling (``quantkit.cli.ui``; this module never imports ``quantkit.cli.main``)."""
    from quantkit.cli import ui as cli_ui

    return cli_ui


def read_text(text: Optional[Path], corpus: Optional[str]) -> str:
    if (text is None) == (corpus is None):
        raise QuantkitError("give exactly one of --text FILE or --corpus NAME (built-in: heldout)")
    if corpus is not None:
        if corpus != "heldout":
            raise QuantkitError(f"--corpus {corpus[:80]!r}: unknown (built-in: heldout, the Shakespeare plays the fixture never saw)")
        from quantkit.evals.corpora import heldout_text

        return heldout_text()
    assert text is not None
    return read_text_file(text, "--text")


#: the largest text file read whole (--text, --calib-text): far beyond any evaluation or calibration set
MAX_TEXT_BYTES = 1 << 30


def _open_text(path: Path) -> Any:
    """Open for reading; a FIFO without a writer gives end-of-file at once instead of blocking forever
    (a pipe from a running process, ``--text <(zcat corpus.gz)``, is read as usual)."""
    import stat

    if not stat.S_ISFIFO(os.stat(path).st_mode):
        return path.open("rb")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_text_file(path: Path, what: str) -> str:
    """A whole UTF-8 text file, or one line saying why it cannot be one."""
    path = Path(path)
    parts: list[bytes] = []
    try:
        with _open_text(path) as f:  # in pieces: a pipe or a device (/dev/zero) has no size to check first
            size = 0
            while piece := f.read(1 << 24):
                size += len(piece)
                if size > MAX_TEXT_BYTES:
                    raise QuantkitError(f"{what} {path}: more than {MAX_TEXT_BYTES:,} bytes, the most read; fix: give a smaller text")
                if b"\0" in piece:
                    raise QuantkitError(f"{what} {path}: holds NUL bytes, not text; fix: give a UTF-8 text file")
                parts.append(piece)
    except FileNotFoundError:
        raise QuantkitError(f"{what} {path}: no such file; fix: check the path") from None
    except IsADirectoryError:
        raise QuantkitError(f"{what} {path}: is a directory; fix: give a UTF-8 text file") from None
    except OSError as e:
        raise QuantkitError(f"{what} {path}: cannot be read ({e.strerror}); fix: check the path and its permissions") from None
    try:
        body = b"".join(parts).decode("utf-8")
    except UnicodeDecodeError as e:
        raise QuantkitError(f"{what} {path}: not UTF-8 text (byte {e.start}); fix: convert it to UTF-8") from None
    if not body.strip():
        raise QuantkitError(f"{what} {path}: empty text; fix: give a file with text to evaluate")
    return body


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

    bar = Progress(TextColumn(desc, markup=False), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}", markup=False), TimeRemainingColumn(), console=cli.err.console)
    return bar, bar.add_task(desc, total=None, info="")


def _write_json(obj: dict[str, Any], path: Optional[Path], force: bool) -> None:
    if path is not None:
        _write_file(path, json.dumps(obj, indent=2) + "\n", force)


def _write_file(path: Path, text: str, force: bool) -> None:
    from quantkit.format.output import atomic_file

    cli = _cli()

    def write() -> None:
        with atomic_file(path, force=force) as tmp:
            tmp.write_text(text, encoding="utf-8")

    cli._run(write)


def _check_outputs(force: bool, paths: tuple[Optional[Path], ...], inputs: tuple[Optional[Path], ...]) -> None:
    """Refuse unwritable report paths before the evaluation, not after it ('-' is stdout).

    An output may not be one of the command's inputs, nor the same file as another output.
    """
    from quantkit.format.output import check_target

    cli = _cli()
    for p in paths:  # `--json --no-progress` would write a file named "--no-progress"
        if p is not None and str(p).startswith("-") and str(p) != "-":
            raise typer.BadParameter(f"{str(p)!r} looks like an option, not a file; give a file name, or '-' for stdout", param_hint="--json")
    given = [p for p in paths if p is not None and str(p) != "-"]
    reads = tuple(p for p in inputs if p is not None)
    seen: dict[Path, Path] = {}
    for path in given:
        cli._run(lambda: check_target(path, force, inputs=reads))
        key = path.resolve()
        if key in seen:
            cli._run(lambda: _refuse(f"{path}: given for two outputs ({seen[key]} and {path}); fix: give each output its own file"))
        seen[key] = path


def _far(at: list[int], what: str = "") -> str | None:
    """How far an interrupted evaluation got, for its one line: "after 12 of 64 chunks [of the base]"."""
    return f"after {at[0]} of {at[1]} chunks" + (f" of {what}" if what else "") if at and at[1] else None


def _refuse(message: str) -> None:
    raise QuantkitError(message)


def use_rpc(spec: Optional[str]) -> None:
    """``--rpc``: probe the servers and register them as llama.cpp devices before any model is loaded
    (one line naming the endpoint, exit 1, when one is down)."""
    if spec is not None:
        from quantkit.engine.rpc import add_servers

        _cli()._run(lambda: add_servers(spec))


@eval_app.command("ppl")
def ppl(
    model: Path = typer.Argument(..., help="A .gguf file."),
    text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text file to score."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="Built-in text instead of --text: heldout."),
    ctx: int = CTX,
    chunks: Optional[int] = CHUNKS,
    threads: Optional[int] = THREADS,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON to this file ('-' for stdout)."),
    force: bool = FORCE,
    progress: bool = PROGRESS,
    rpc: Optional[str] = RPC,
) -> None:
    """Perplexity as llama-perplexity computes it, with its standard error."""
    from quantkit.evals.perplexity import perplexity

    cli = _cli()
    _check_outputs(force, (json_out,), (model, text))
    use_rpc(rpc)
    body = cli._run(lambda: read_text(text, corpus))
    bar, task = _progress("perplexity", progress and str(json_out) != "-")
    at: list[int] = []
    with bar:
        def tick(i: int, n: int, running: float) -> None:
            at[:] = [i, n]
            bar.update(task, total=n, completed=i, info=f"ppl {running:.4f}")

        r = cli._run(lambda: perplexity(model, body, n_ctx=ctx, n_chunks=chunks, threads=threads, on_chunk=tick), lambda: _far(at))
    j = r.to_json()
    if str(json_out) == "-":
        cli._print_json(j)
        return
    _write_json(j, json_out, force)
    cli.out.line(f"PPL = {r.ppl:.4f} +/- {r.ppl_stderr:.5f}  ({r.n_chunks} chunks of {r.n_ctx}, {r.n_scored} scored tokens, {r.tokens_per_second:.0f} tok/s)")


@eval_app.command("kld")
def kld(
    base: Path = typer.Argument(..., help="Base model: a .gguf file (e.g. the F32/BF16 conversion)."),
    model: Path = typer.Argument(..., help="Candidate .gguf file."),
    text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text file."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="Built-in text instead of --text: heldout."),
    ctx: int = CTX,
    chunks: Optional[int] = CHUNKS,
    label: Optional[str] = typer.Option(None, "--label", help="Variant name recorded in the report (default: file stem)."),
    cache_arg: Optional[str] = typer.Option(None, "--cache-dir", help="Where base log-probs are cached (default ~/.cache/quantkit)."),
    threads: Optional[int] = THREADS,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON to this file ('-' for stdout)."),
    force: bool = FORCE,
    progress: bool = PROGRESS,
    rpc: Optional[str] = RPC,
) -> None:
    """KL-divergence, token statistics and routing fidelity of MODEL against BASE on the same tokens."""
    from quantkit.evals.kld import base_logprobs, compare

    cli = _cli()
    if cache_arg is not None and not cache_arg.strip():
        raise typer.BadParameter("empty; give a directory (or leave it out for ~/.cache/quantkit)", param_hint="--cache-dir")
    cache_dir = Path(cache_arg) if cache_arg is not None else None
    _check_outputs(force, (json_out,), (base, model, text))
    use_rpc(rpc)
    body = cli._run(lambda: read_text(text, corpus))
    bar, task = _progress("base", progress and str(json_out) != "-")
    at: list[int] = []
    with bar:
        def tick(i: int, n: int) -> None:
            at[:] = [i, n]
            bar.update(task, total=n, completed=i)

        b = cli._run(lambda: base_logprobs(base, body, ctx, chunks, threads, cache_dir, on_chunk=tick), lambda: _far(at, "the base"))
        bar.update(task, description="candidate", completed=0)
        at.clear()
        report = cli._run(lambda: compare(b, model, body, threads, label, on_chunk=tick), lambda: _far(at, "the candidate"))
    if str(json_out) == "-":
        cli._print_json(report)
        return
    _write_json(report, json_out, force)
    from rich.table import Table

    t = Table(title=cli._plain(f"{report['setup']['label']} vs {Path(report['setup']['base']).name}"))
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("mean KLD", f"{report['kld_mean']:.6f} ± {report['kld_mean_stderr']:.6f}")
    for k in ("kld_max", "kld_p99_9", "kld_p99", "kld_p95", "kld_p90", "kld_median"):
        t.add_row(k, f"{report[k]:.6f}")
    t.add_row("same top token", f"{100 * report['same_top']:.3f} ± {100 * report['same_top_stderr']:.3f} %")
    t.add_row("Δp mean / RMS", f"{100 * report['dp_mean']:.4f} % / {100 * report['dp_rms']:.4f} %")
    t.add_row("PPL(Q) / PPL(base)", f"{report['ppl']:.4f} / {report['ppl_base']:.4f} = {report['ppl_ratio']:.5f}")
    if "routing" in report and "topk_exact" in report["routing"]:  # absent when every MoE layer is hash-routed
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
    ctx: int = CTX,
    chunks: Optional[int] = CHUNKS,
    threads: Optional[int] = THREADS,
) -> None:
    """Quantise SRC several ways, evaluate each against its BF16 base, write a table and plots."""
    from quantkit.evals.matrix import run_matrix

    cli = _cli()
    body = cli._run(lambda: read_text(text, corpus))
    names = [t.strip() for t in types.split(",") if t.strip()]
    cli._run(lambda: run_matrix(src, names, body, out_dir, ctx, chunks, threads, on_step=lambda m: cli.err.print(f"[dim]{cli.esc(m)}[/]")))
    cli.out.line((out_dir / "matrix.md").read_text())
    cli.out.line(f"plots: {out_dir / 'size_vs_kld.png'}, {out_dir / 'kld_distribution.png'}")


def gate_command(
    report: Path = typer.Argument(..., help="JSON report from quantkit eval kld --json."),
    baseline: Path = typer.Option(..., "--baseline", help="Committed baseline report."),
    thresholds: Optional[Path] = typer.Option(None, "--thresholds", help="TOML thresholds (default: quantkit's built-in)."),
    update_baseline: bool = typer.Option(False, "--update-baseline", help="Record REPORT as the new baseline instead of checking."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the verdict as JSON."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Write a Markdown table (e.g. $GITHUB_STEP_SUMMARY)."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing --json / --junit files (--markdown always appends)."),
) -> None:
    """Fail (exit 1) when REPORT regresses past thresholds against BASELINE, or the setups differ."""
    from quantkit.evals import gate as g

    cli = _cli()
    if update_baseline:
        data = cli._run(lambda: g.load_json(report, "report"))
        if baseline.is_symlink() and not baseline.exists():
            cli._run(lambda: _refuse(f"--baseline {baseline}: a symbolic link to a missing file; fix: give the baseline's real path"))
        cli._run(lambda: _make_parent(baseline))
        _write_file(baseline, json.dumps(data, indent=2) + "\n", force=True)
        cli.out.line(f"baseline {baseline} updated from {report}")
        return
    _check_outputs(force, (json_out, junit), (report, baseline, thresholds))
    if markdown is not None:
        cli._run(lambda: _check_appendable(markdown, (report, baseline, thresholds), (json_out, junit)))
    verdict = cli._run(lambda: g.gate(report, baseline, thresholds))
    _write_json(verdict.to_json(), json_out, force)
    if markdown is not None:
        cli._run(lambda: _append(markdown, g.to_markdown(verdict)))
    if junit is not None:
        _write_file(junit, g.to_junit(verdict), force)
    from rich.table import Table
    from rich.text import Text

    t = Table(title=f"quantkit gate: {'PASS' if verdict.ok else 'FAIL'}")
    for col in ("check", "value", "baseline", "allowed", "result"):
        t.add_column(col)
    for c in verdict.checks:
        cli.add_row(t, c.name, g._fmt(c.value), g._fmt(c.baseline), c.allowed, Text("ok", "green") if c.ok else Text(str(c.message), "red"))
    cli.out.print(t)
    if not verdict.ok:
        raise typer.Exit(1)


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QuantkitError(f"--baseline {path}: cannot create {path.parent} ({e.strerror}); fix: choose another path") from None


def _check_appendable(path: Path, inputs: tuple[Optional[Path], ...], outputs: tuple[Optional[Path], ...]) -> None:
    """--markdown appends (GitHub's step summary is one file for the whole job): its directory must exist,
    and it may be neither an input nor another output."""
    key = path.resolve()
    for other in (*inputs, *outputs):
        if other is not None and Path(other).resolve() == key:
            raise QuantkitError(f"--markdown {path}: is also {other} (an input or another output); fix: give the Markdown its own file")
    if path.is_dir():
        raise QuantkitError(f"--markdown {path}: is a directory; fix: give a file, e.g. \"$GITHUB_STEP_SUMMARY\"")
    if not path.parent.is_dir():
        raise QuantkitError(f"--markdown {path}: directory {path.parent} does not exist; fix: create it first (mkdir -p {path.parent})")
    if path.exists() and not path.is_file():  # a FIFO would block the gate forever
        raise QuantkitError(f"--markdown {path}: not a regular file; fix: give a file, e.g. \"$GITHUB_STEP_SUMMARY\"")


def _append(path: Path, text: str) -> None:
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise QuantkitError(f"--markdown {path}: cannot append ({e.strerror}); fix: check the path and its permissions") from None


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
    app.command("gate")(gate_command)
