"""The ``quantkit`` command line: thin typer wrappers around library functions.

Each command parses arguments, calls one library function, and renders its
result (rich tables / progress bars on a terminal, ``--json`` for scripts).
Errors from the library are :class:`QuantkitError`: printed as one line, exit
code 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from quantkit.cli.eval_commands import PROGRESS, read_text_file
from quantkit.cli.eval_commands import register as _register_eval
from quantkit.cli.eval_commands import RPC, use_rpc
from quantkit.cli.ui import one_line_usage_errors
from quantkit.cli.ui import MAX_ERROR_CHARS, _plain, _print_json, _run, _state, add_row, cap, err, error_line, esc, out  # noqa: F401
from quantkit.errors import QuantkitError, Terminated

if TYPE_CHECKING:
    from llama_cpp import Llama

    from quantkit.engine.chat import ChatTemplate, Command, History
    from quantkit.engine.runtime import LoadPlan, Sampling

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Convert, run and check quantised Mixture-of-Experts models.")
one_line_usage_errors()  # exit 2 with one line, as every other error
_register_eval(app)


# Bit-budget options, shared by convert and plan (one declaration, the same flags and help on both).
TARGET_BPW = typer.Option(None, "--target-bpw", min=1.0, max=32.0, help="Bit budget: choose per-tensor types for this many bits per weight (instead of --type).")
TARGET_SIZE = typer.Option(None, "--target-size", help="Bit budget: the largest file, e.g. 12GiB or 800MB (instead of --type).")
CALIB_TEXT = typer.Option(None, "--calib-text", help="With a budget: measure each tensor's effect on the output on this text (slower, better) instead of using priors.")
CALIB_CTX = typer.Option(256, "--calib-ctx", min=8, help="--calib-text: tokens per chunk.")
CALIB_CHUNKS = typer.Option(8, "--calib-chunks", min=1, help="--calib-text: chunks evaluated per tensor.")
CALIB_MODE = typer.Option("auto", "--calib-mode", help="--calib-text: full (one probe per tensor), grouped (one per role per layer range: fewer passes, most of the gain) or auto (full up to 64 tensors, else grouped).")
IMATRIX_INCLUDE = typer.Option([], "--imatrix-include", help="Use only the --imatrix entries whose name contains this (repeatable), as llama-quantize --include-weights.")
IMATRIX_EXCLUDE = typer.Option([], "--imatrix-exclude", help="Leave out the --imatrix entries whose name contains this (repeatable), as llama-quantize --exclude-weights.")
NO_MTP = typer.Option(False, "--no-mtp", help="Leave multi-token-prediction blocks out (GLM, DeepSeek V3.2, Qwen3-Next / 3.5 keep them as nextn blocks, as llama.cpp's converter does; its main graph never runs them, and an importance matrix has no data for them).")
TIME_CAP = typer.Option(None, "--time-cap", help="Bit budget: the chosen types may take at most this many times the quantising time of Q4_K on the same tensors (default 1.15: a budget costs at most ~1.5x a preset conversion; 0: no limit, the least damage whatever the time).")
CALIB_RANGES = typer.Option(None, "--calib-ranges", min=1, help="--calib-mode grouped: layer ranges per role (default 4; auto fits as many as 64 probes allow).")

TYPE_HELP = "f32, f16, bf16 (every matrix in that type) or a llama.cpp preset: q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K, IQ4_XS, … Routers and norms always stay F32."


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details to stderr."),
) -> None:
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@app.command()
def convert(
    ctx: typer.Context,
    src: Path = typer.Argument(..., help="Hugging Face model directory (config.json, *.safetensors, tokenizer), a repo id in the local Hugging Face cache "
                                         "(ORG/NAME[@REVISION], read offline; a local directory of that name wins), or a GGUF file to requantise (a split set by its first part)."),
    output_arg: str = typer.Option(..., "-o", "--output", help="Output .gguf file (--format gguf) or directory (--format bnb); with --split-max-*, NAME.gguf gives NAME-00001-of-0000K.gguf ..."),
    out_format: str = typer.Option("gguf", "--format", help="gguf (one llama.cpp file) or bnb (bitsandbytes 4-bit HF directory, every expert 4-bit)."),
    bnb_type: str = typer.Option("nf4", "--bnb-type", help="--format bnb: 4-bit data type, nf4 or fp4."),
    double_quant: bool = typer.Option(True, "--double-quant/--no-double-quant", help="--format bnb: quantise the absmax statistics too (bitsandbytes double quantisation)."),
    compute_dtype: str = typer.Option("bf16", "--compute-dtype", help="--format bnb: dtype of the 4-bit matmuls, bf16, f16 or f32."),
    outtype: Optional[str] = typer.Option(None, "--type", "-t", help=TYPE_HELP + " Default f16."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="A recipe TOML file or built-in name (moe-q3, moe-q4, moe-q5): base preset + rules."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file (or, with --format bnb, model directory)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept pytorch_model.bin pickles (unsafe; not supported yet)."),
    tensor_type: list[str] = typer.Option([], "--tensor-type", help="REGEX=TYPE: tensors whose GGUF name matches get TYPE (first match wins; repeatable)."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix (llama-imatrix or quantkit imatrix GGUF, or legacy .dat) weighting the quantisation, as llama-quantize --imatrix."),
    imatrix_include: list[str] = IMATRIX_INCLUDE,
    imatrix_exclude: list[str] = IMATRIX_EXCLUDE,
    target_bpw: Optional[float] = TARGET_BPW,
    target_size: Optional[str] = TARGET_SIZE,
    calib_text: Optional[Path] = CALIB_TEXT,
    calib_ctx: int = CALIB_CTX,
    calib_chunks: int = CALIB_CHUNKS,
    calib_mode: str = CALIB_MODE,
    calib_ranges: Optional[int] = CALIB_RANGES,
    time_cap: Optional[float] = TIME_CAP,
    no_mtp: bool = NO_MTP,
    allow_requantize: bool = typer.Option(False, "--allow-requantize", help="GGUF source: quantise already-quantised tensors again (quality drops twice). MXFP4 experts (gpt-oss): write them per the type instead of as stored."),
    split_max_size: Optional[str] = typer.Option(None, "--split-max-size", help="Write a split set (as llama-gguf-split --split): at most this much tensor data per part, e.g. 48G or 500M (decimal K/M/G)."),
    split_max_tensors: Optional[int] = typer.Option(None, "--split-max-tensors", min=1, help="Write a split set (as llama-gguf-split --split): at most N tensors per part."),
    download: bool = typer.Option(False, "--download", help="SRC is a repo id not in the local Hugging Face cache: download its config, safetensors and tokenizer files into the cache first (the only network access)."),
    model_card: bool = typer.Option(False, "--model-card", help="Also write README.md beside the output (a Hugging Face model card, as quantkit card) and record this command in the file (quantkit.command)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of text."),
    progress: bool = PROGRESS,
) -> None:
    """Convert a Hugging Face checkpoint of a supported family to GGUF, or to a bitsandbytes 4-bit directory (--format bnb)."""
    from quantkit.pipeline.convert import convert as do_convert

    if out_format not in ("gguf", "bnb"):
        raise typer.BadParameter(f"{out_format!r} is not supported; use gguf or bnb", param_hint="--format")
    output = _file_arg(output_arg, "--output") if out_format == "gguf" else Path(output_arg)
    show = progress and err.is_terminal and not as_json
    split = _split_spec(split_max_size, split_max_tensors)
    from quantkit.hf.hub_cache import resolve_source

    src = _run(lambda: resolve_source(src, download=download))  # a repo id: its snapshot in the local Hugging Face cache
    if out_format == "bnb":
        from quantkit.policy.bnb import export_bnb

        if split is not None or model_card:
            raise typer.BadParameter("--split-max-size, --split-max-tensors and --model-card apply to --format gguf", param_hint="--format bnb")
        if imatrix is not None:
            raise typer.BadParameter("--imatrix applies to --format gguf (llama.cpp quantisation)", param_hint="--format bnb")
        if outtype is not None or recipe is not None or tensor_type:
            raise typer.BadParameter("--type, --recipe and --tensor-type apply to --format gguf; use --bnb-type, --double-quant and --compute-dtype", param_hint="--format bnb")
        from rich.progress import BarColumn, Progress, TextColumn

        bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), console=err.console, disable=not show)
        task = bar.add_task("bnb", total=None)
        with bar:
            result = _run(
                lambda: export_bnb(
                    src, output, quant_type=bnb_type, double_quant=double_quant, compute_dtype=compute_dtype, force=force,
                    allow_pickle=allow_pickle, on_tensor=lambda name: bar.update(task, description=f"{name:<64}"),
                )
            )
        j = result.to_json()
        if as_json:
            _print_json(j)
            return
        out.print(f"wrote [bold]{esc(j['output'])}[/]: {j['weights']} weights in {j['shards']} shard(s), {j['params']:,} params, {100 * j['share_4bit']:.1f}% 4-bit "
                  f"{j['quant_type']}, {j['bytes'] / 2**20:.1f} MiB, {j['bits_per_weight']:.2f} bpw in {j['seconds']:.1f}s")
        return

    if bnb_type != "nf4" or compute_dtype != "bf16" or not double_quant:
        raise typer.BadParameter("--bnb-type, --compute-dtype and --no-double-quant apply to --format bnb", param_hint="--format gguf")
    outtype, overrides = _run(lambda: _type_and_rules(outtype, recipe, tensor_type, target_bpw, target_size))
    imat = _load_imatrix(imatrix, imatrix_include, imatrix_exclude)
    target = _target(src, target_bpw, target_size, calib_text, calib_ctx, calib_chunks, show, imat, calib_mode, calib_ranges, time_cap, no_mtp,
                     overrides, allow_requantize)

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), console=err.console, disable=not show)
    task = bar.add_task("convert", total=None)
    card_out = output.parent / "README.md" if model_card else None
    if card_out is not None:
        from quantkit.format.output import check_target

        _run(lambda: check_target(card_out, force, inputs=(src,)))  # before the conversion, not after it
    with bar:
        result = _run(
            lambda: do_convert(
                src, output, outtype, force=force, allow_pickle=allow_pickle, overrides=overrides, target=target, allow_requantize=allow_requantize,
                on_start=lambda plan: bar.update(task, total=plan.nbytes),
                on_bytes=lambda n: bar.advance(task, n),
                on_tensor=lambda name: bar.update(task, description=f"{name:<28}"),
                imatrix=imat, split=split, command=_command_line(ctx) if model_card else None, no_mtp=no_mtp,
            )
        )
    if card_out is not None:
        from quantkit.pipeline.card import write_card

        _run(lambda: write_card(result.output, card_out, force=force, source=src if src.is_dir() else None))  # a GGUF source: the file says
    if as_json:
        _print_json(result.to_json() | ({"model_card": str(card_out)} if card_out is not None else {}) | _budget_json(target))
        return
    j = result.to_json()
    parts = f" and {len(j['parts']) - 1} more parts" if len(j.get("parts", ())) > 1 else ""
    out.print(f"wrote [bold]{esc(j['output'])}[/]{esc(parts)}: {j['tensors']} tensors, {j['params']:,} params, {j['bytes'] / 2**20:.1f} MiB, {j['bits_per_weight']:.2f} bpw in {j['seconds']:.1f}s")
    if card_out is not None:
        out.print(f"wrote [bold]{esc(card_out)}[/] (model card)")
    if target is not None or overrides:  # a mixed plan: say what was chosen (quantkit plan shows it tensor by tensor)
        out.print("types: " + ", ".join(f"{esc(k)} x{v['tensors']} ({8 * v['bytes'] / max(1, v['params']):.2f} bpw, {v['bytes'] / 2**20:.1f} MiB)" for k, v in j["types"].items()))


def _split_spec(max_size: Optional[str], max_tensors: Optional[int]) -> Any:
    """--split-max-size / --split-max-tensors as a SplitSpec (None: one file)."""
    if max_size is None and max_tensors is None:
        return None
    from quantkit.format.gguf_write import SplitSpec, parse_split_size

    if max_size is not None and max_tensors is not None:
        raise typer.BadParameter("give one of --split-max-size and --split-max-tensors (as llama-gguf-split)", param_hint="--split-max-tensors")
    try:
        return SplitSpec(max_bytes=parse_split_size(max_size) if max_size is not None else None, max_tensors=max_tensors)
    except ValueError as e:
        raise typer.BadParameter(str(e).removeprefix("--split-max-size "), param_hint="--split-max-size" if max_size is not None else "--split-max-tensors") from None


#: options of convert left out of the recorded command (how it ran, not what it made)
_NOT_RECORDED = ("force", "as_json", "progress", "model_card", "download")


def _command_line(ctx: typer.Context) -> str:
    """The command as given, from what click parsed: paths by their file names (no local directories in a published card)."""
    import shlex

    def shown(value: Any) -> str:
        text = os.fspath(value) if isinstance(value, Path) else str(value)
        return Path(text).name if os.path.lexists(text) or isinstance(value, Path) and os.sep in text and not _repo_id(text) else text

    words = ["quantkit", ctx.info_name or "convert"]
    for p in ctx.command.params:
        source = ctx.get_parameter_source(p.name)  # typer may bring its own copy of click: compared by name
        if p.name in _NOT_RECORDED or getattr(source, "name", None) not in ("COMMANDLINE", "ENVIRONMENT"):
            continue
        value = ctx.params.get(p.name)
        if p.param_type_name == "argument":
            words.append(shown(value))
            continue
        long = max(p.opts, key=len)
        if getattr(p, "is_flag", False) and isinstance(value, bool):
            off = max(p.secondary_opts, key=len) if p.secondary_opts else None
            words += [long] if value else [off] if off else []
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            words += [long, Path(str(v)).name if p.name in ("output_arg",) else shown(v)]
    return " ".join(shlex.quote(w) for w in words)


def _repo_id(text: str) -> bool:
    from quantkit.hf.hub_cache import parse_repo_id

    return parse_repo_id(text) is not None


def _file_arg(value: str, hint: str) -> Path:
    """An output file given on the command line: a name ending in a slash asks for a directory (typer's Path would drop it)."""
    if not value or value.endswith(("/", os.sep)):
        raise typer.BadParameter(f"{value!r} names a directory, not a file; give a file name such as {os.path.join(value or '.', 'model.gguf')}", param_hint=hint)
    return Path(value)


def _type_and_rules(
    outtype: str | None, recipe: str | None, tensor_type: list[str], target_bpw: float | None = None, target_size: str | None = None
) -> tuple[str, list[Any]]:
    """--type / --recipe / --tensor-type -> (preset or type name, ordered rules); --tensor-type rules come first."""
    if target_bpw is not None or target_size is not None:
        if outtype is not None or recipe is not None:
            raise QuantkitError("give --type/--recipe or a bit budget (--target-bpw/--target-size), not both; --tensor-type rules still apply to a budget")
        if target_bpw is not None and target_size is not None:
            raise QuantkitError("give one of --target-bpw and --target-size")
        return "budget", _overrides(tensor_type)
    rules = _overrides(tensor_type)
    if recipe is None:
        return (outtype if outtype is not None else "f16"), rules
    if outtype is not None:
        raise QuantkitError("give --type or --recipe, not both (a recipe names its base preset)")
    from quantkit.policy.recipe import load_recipe

    r = load_recipe(recipe)
    return r.base, rules + list(r.rules)


def _target(
    src: Path, bpw: float | None, size: str | None, calib: Path | None, ctx: int, chunks: int, show: bool, imat: Any = None,
    mode: str = "auto", ranges: int | None = None, time_cap: float | None = None, no_mtp: bool = False,
    overrides: list[Any] | tuple[()] = (), requantize: bool = False,
) -> Any:
    """The bit budget of --target-bpw/--target-size: the errors of each tensor it chooses for sampled (not of those
    --tensor-type rules or the checkpoint's carried MXFP4 fix, unless ``requantize``), and its sensitivity measured on
    --calib-text when given (the cost said first), each step behind a progress bar with an ETA (None without a budget)."""
    if calib is None and (mode != "auto" or ranges is not None):
        raise typer.BadParameter("--calib-mode and --calib-ranges choose how --calib-text measures; add --calib-text FILE", param_hint="--calib-mode")
    if bpw is None and size is None:
        if time_cap is not None:
            raise typer.BadParameter("limits the time of a bit budget; add --target-bpw or --target-size", param_hint="--time-cap")
        if calib is not None:
            raise typer.BadParameter("--calib-text measures sensitivity for a bit budget; add --target-bpw or --target-size", param_hint="--calib-text")
        return None
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from quantkit.pipeline import sensitivity
    from quantkit.pipeline.convert import _importance, prepare
    from quantkit.policy import budget
    from quantkit.policy.plan import Target, check_reach, header_bytes

    nbytes = _run(lambda: budget.parse_size(size)) if size is not None else None
    _run(lambda: Target(bpw=bpw, size=nbytes, time_cap=time_cap))  # validate before the slow part
    text = _run(lambda: read_text_file(calib, "--calib-text")) if calib is not None else None
    if calib is not None:
        _run(lambda: sensitivity.probe_groups([], mode, ranges))
    ckpt, prep = _run(lambda: prepare(src, "f32", no_mtp=no_mtp))
    bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=err.console, disable=not show)
    tasks: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int, label: str) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total, description=f"{stage} {label[:40]:<40}")

    def estimate(cost: Any) -> None:
        err.print(esc(cost.describe()) + "; Ctrl-C stops it", highlight=False, soft_wrap=True)

    measured = None
    importance = _importance(imat, prep.tensors)
    with ckpt, bar:
        _run(lambda: check_reach(prep.tensors, Target(bpw=bpw, size=nbytes), header_bytes(prep.arch, prep.metadata, prep.tensors)))  # from the shapes, before anything is measured
        from quantkit.policy.plan import budget_tensors

        free = _run(lambda: budget_tensors(prep.tensors, overrides, prep.hparams, requantize))  # as the plan leaves them to the budget
        errors = _run(lambda: budget.measure_errors(free, importance, prep.hparams, lambda d, n, name: progress("sample errors", d, n, name)))
        if calib is not None:
            measured = _run(lambda: sensitivity.measure_checkpoint(
                src, text, ctx, chunks, importance=importance, mode=mode, ranges=ranges, on_estimate=estimate, no_mtp=no_mtp,
                on_progress=lambda stage, d, n, label: progress({"write": "write unquantised copy", "probe": "probe"}.get(stage, stage), d, n, label)))
    if measured is not None and measured.cost is not None and measured.cost.seconds is not None:
        err.print(esc(measured.cost.describe()), highlight=False, soft_wrap=True)
    return Target(bpw=bpw, size=nbytes, measured=measured, errors=errors, time_cap=time_cap)


def _budget_json(target: Any) -> dict[str, Any]:
    """What a budget's measurements cost, for --json: the error sample and the --calib-text probes."""
    if target is None:
        return {}
    out: dict[str, Any] = {}
    if target.errors:
        out["error_sample"] = {"tensors": len(target.errors), "values": sum(s.values for s in target.errors.values()),
                               "max_relative_stderr": round(max(s.rse for s in target.errors.values()), 4)}
    cost = getattr(target.measured, "cost", None)
    if cost is not None:
        out["calibration"] = cost.to_json()
    return out


def _overrides(specs: list[str]) -> list[Any]:
    from quantkit.policy.plan import Override

    out = []
    for spec in specs:
        pattern, sep, type_name = spec.rpartition("=")
        if not sep or not pattern:
            raise QuantkitError(f"--tensor-type {spec!r}: expected REGEX=TYPE, e.g. 'ffn_down_exps=q8_0'")
        out.append(Override.parse(pattern, type_name, source="--tensor-type"))
    return out


@app.command()
def plan(
    src: Path = typer.Argument(..., help="Hugging Face model directory (or a repo id in the local Hugging Face cache, as for convert), or a GGUF file to requantise."),
    outtype: Optional[str] = typer.Option(None, "--type", "-t", help=TYPE_HELP + " Default f16."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="A recipe TOML file or built-in name."),
    allow_requantize: bool = typer.Option(False, "--allow-requantize", help="GGUF source: plan already-quantised tensors to be quantised again. MXFP4 experts (gpt-oss): planned per the type instead of as stored."),
    tensor_type: list[str] = typer.Option([], "--tensor-type", help="REGEX=TYPE overrides, as for convert."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix, as for convert (checked against the model; some presets choose differently with one)."),
    imatrix_include: list[str] = IMATRIX_INCLUDE,
    imatrix_exclude: list[str] = IMATRIX_EXCLUDE,
    target_bpw: Optional[float] = TARGET_BPW,
    target_size: Optional[str] = TARGET_SIZE,
    calib_text: Optional[Path] = CALIB_TEXT,
    calib_ctx: int = CALIB_CTX,
    calib_chunks: int = CALIB_CHUNKS,
    calib_mode: str = CALIB_MODE,
    calib_ranges: Optional[int] = CALIB_RANGES,
    time_cap: Optional[float] = TIME_CAP,
    no_mtp: bool = NO_MTP,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Print the per-tensor type plan (type, bytes, bits per weight, the rule that chose it) and the file size, without converting."""
    from quantkit.pipeline.convert import prepare
    from quantkit.hf.mapping import group_totals

    outtype, overrides = _run(lambda: _type_and_rules(outtype, recipe, tensor_type, target_bpw, target_size))
    imat = _load_imatrix(imatrix, imatrix_include, imatrix_exclude)
    from quantkit.hf.hub_cache import resolve_source

    src = _run(lambda: resolve_source(src))  # a repo id: its snapshot in the local Hugging Face cache (offline)
    target = _target(src, target_bpw, target_size, calib_text, calib_ctx, calib_chunks, err.is_terminal and not as_json, imat, calib_mode, calib_ranges, time_cap, no_mtp,
                     overrides, allow_requantize)
    ckpt, prep = _run(lambda: prepare(src, outtype, overrides=overrides, target=target, imatrix=imat, allow_requantize=allow_requantize, no_mtp=no_mtp))
    ckpt.close()
    p = prep.plan
    rows = [{"name": t.name, "shape": list(t.shape), "type": t.qtype.name, "bytes": t.nbytes, "bits_per_weight": round(t.bpw, 4), "why": t.reason} for t in p.tensors]
    summary = {"type": p.outtype, "file_type": int(p.file_type), "tensor_bytes": p.nbytes, "params": p.n_elements,
               "bits_per_weight": round(8 * p.nbytes / max(1, p.n_elements), 4), "groups": group_totals(p.tensors), **_budget_json(target)}
    source_q = getattr(ckpt, "quantization", None)  # a quantised HF source (FP8, compressed-tensors): said in the header
    if source_q is not None:
        summary["source_quantization"] = source_q.to_json()
    if as_json:
        _print_json({**summary, "tensors": rows})
        return
    from rich.table import Table

    t = Table(title=_plain(f"{src} as {p.outtype}" + (f" (source {source_q.describe()})" if source_q is not None else "")))
    for c in ("tensor", "type", "bytes", "bpw", "why"):
        t.add_column(c, justify="right" if c in ("bytes", "bpw") else "left", overflow="fold")
    for r in rows:
        add_row(t, r["name"], r["type"], f"{r['bytes']:,}", f"{r['bits_per_weight']:.2f}", r["why"])
    out.print(t)
    out.print(f"total: {p.nbytes / 2**20:.2f} MiB of tensors, {summary['bits_per_weight']:.3f} bits per weight")


def _load_imatrix(path: Path | None, include: list[str] | None = None, exclude: list[str] | None = None) -> Any:
    from quantkit.policy.imatrix import read_imatrix, select_entries

    if path is None:
        if include or exclude:
            raise typer.BadParameter("needs --imatrix", param_hint="--imatrix-include" if include else "--imatrix-exclude")
        return None
    return _run(lambda: select_entries(read_imatrix(path), include or (), exclude or ()))


@app.command("imatrix")
def imatrix_command(
    src: Path = typer.Argument(..., help="A GGUF model (F32/F16/BF16 or quantised), or a Hugging Face directory (converted to a temporary BF16 GGUF first)."),
    text: Path = typer.Option(..., "--text", help="UTF-8 calibration text."),
    output_arg: str = typer.Option(..., "-o", "--output", help="The importance matrix to write (.gguf, llama-imatrix's format)."),
    ctx: int = typer.Option(512, "--ctx", min=16, help="Tokens per chunk (llama-imatrix's -c); the text needs at least twice as many."),
    chunks: Optional[int] = typer.Option(None, "--chunks", min=1, help="Evaluate only the first N chunks (default: the whole text)."),
    all_experts: bool = typer.Option(False, "--all-experts", help="Send calibration tokens through all experts (statistics only, outputs still gated by the router), so rare experts are covered."),
    min_tokens: int = typer.Option(16, "--min-tokens", min=0, help="Report experts that saw fewer calibration tokens than this."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads (default: physical cores)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON report (with the coverage) instead of text."),
    progress: bool = PROGRESS,
    rpc: Optional[str] = RPC,
) -> None:
    """Collect an importance matrix as llama-imatrix does (for --imatrix on convert, or llama-quantize)."""
    output = _file_arg(output_arg, "--output")
    from quantkit.cli.eval_commands import NoBar, read_text
    from quantkit.policy.imatrix import summary, write_imatrix
    from quantkit.pipeline.imatrix_collect import collect_from_source
    from quantkit.format.output import check_target

    _run(lambda: check_target(output, force, inputs=(src, text)))
    use_rpc(rpc)
    body = _run(lambda: read_text(text, None))
    body = body[:-1] if body.endswith("\n") else body  # llama-imatrix's -f drops one trailing newline
    bar: Any = NoBar()  # rich is not even imported without a bar to show (process start-up counts on short runs)
    if progress and err.is_terminal and not as_json:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}", markup=False), TimeRemainingColumn(), console=err.console)
    task = bar.add_task("imatrix", total=None, info="")
    last: list[Any] = []

    def tick(p: Any) -> None:
        last[:] = [p]
        bar.update(task, description="imatrix", total=p.n_chunks, completed=p.chunk, info=f"{p.tokens / max(p.seconds, 1e-9):.0f} tok/s")

    def how_far() -> str | None:
        p = last[0] if last else None
        return f"after {p.chunk} of {p.n_chunks} chunks ({p.tokens:,} tokens, {p.seconds:.1f} s)" if p is not None and p.n_chunks else None

    with bar:
        im = _run(lambda: collect_from_source(
            src, body, workdir=output.parent, on_convert=lambda: bar.update(task, description="convert to BF16"),
            n_ctx=ctx, n_chunks=chunks, all_experts=all_experts, threads=threads, on_chunk=tick, dataset=str(text),
        ), how_far)
    _run(lambda: write_imatrix(im, output, force=force))
    seconds = last[0].seconds if last else 0.0
    j = {"output": str(output), **summary(im, min_tokens), "all_experts": all_experts, "seconds": round(seconds, 3),
         "tokens_per_second": round(last[0].tokens / max(seconds, 1e-9), 1) if last else 0.0}
    if as_json:
        _print_json(j)
        return
    out.line(f"wrote {output}: {j['entries']} tensors, {j['chunks']} chunks of {j['chunk_size']} tokens "  # plain: no rich import in a pipe
             f"({j['tokens']:,} tokens, {j['tokens_per_second']:,.0f} tok/s)")
    cov = j["coverage"]
    if not cov["below"]:
        out.line("no expert tensors (dense model)" if not cov["expert_matrices"] else f"every expert saw at least {min_tokens} tokens ({cov['expert_matrices']} expert matrices)")
        return
    out.print(f"[yellow]{len(cov['below'])} of {cov['expert_matrices']} expert matrices saw fewer than {min_tokens} tokens[/] "
              "(quantised with weaker or, at 0 tokens, no importance weights; --all-experts covers them)", highlight=False)
    from rich.table import Table

    t = Table()
    for c in ("layer", "tensor", "expert", "tokens"):
        t.add_column(c, justify="left" if c == "tensor" else "right")
    for r in cov["below"][:40]:
        add_row(t, r["layer"], r["tensor"], r["expert"], r["tokens"])
    out.print(t)
    if len(cov["below"]) > 40:
        out.print(f"… and {len(cov['below']) - 40} more (--json lists them all)")


@app.command()
def inspect(
    file: Path = typer.Argument(..., help="A .gguf file (a split set by its first part: all parts are read as one model)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    tensors: bool = typer.Option(True, "--tensors/--no-tensors", help="Show the tensor table."),
) -> None:
    """Show a GGUF file's metadata, tensors and bits per weight per tensor group (safe on untrusted files)."""
    from quantkit.format.gguf_read import read_gguf, to_json

    g = _run(lambda: read_gguf(file))
    j = to_json(g)
    from quantkit.engine.gguf_check import layout_problem

    problem = layout_problem(g)
    if problem is not None:  # shown, since llama.cpp's library reads it, but run/eval/convert refuse it
        j["warnings"] = [problem]
        err.say("warning:", "yellow", cap(problem))
    if as_json:
        _print_json(j)
        return
    from rich.table import Table

    whole = f"split set of {len(j['parts'])} parts, " if "parts" in j else ""
    meta = Table(title=_plain(f"{file} (GGUF v{j['version']}, {whole}{j['file_bytes']:,} bytes)"), show_lines=False)
    meta.add_column("key")
    meta.add_column("value", overflow="fold")
    for k, v in j["metadata"].items():
        if isinstance(v, dict) and "array" in v:
            v = f"[{v['array']} x {v['count']}] {v['head'][:6]}…"
        elif isinstance(v, str) and len(v) > 120:
            v = v[:117] + "…"
        add_row(meta, k, v)
    out.print(meta)
    if "parts" in j:
        pt = Table(title="parts")
        for c in ("part", "file", "tensors", "bytes"):
            pt.add_column(c, justify="left" if c == "file" else "right")
        for i, p in enumerate(j["parts"], 1):
            add_row(pt, i, Path(p["path"]).name, p["tensors"], f"{p['bytes']:,}")
        out.print(pt)
    if tensors:
        tt = Table(title="tensors")
        for c in ("name", "shape", "type", "bytes", "group"):
            tt.add_column(c, justify="right" if c == "bytes" else "left")
        for t in j["tensors"]:
            add_row(tt, t["name"], "x".join(map(str, t["shape"])), t["type"], f"{t['bytes']:,}", t["group"])
        out.print(tt)
    gt = Table(title="groups")
    for c in ("group", "tensors", "params", "bytes", "bits/weight"):
        gt.add_column(c, justify="left" if c == "group" else "right")
    for name, g in j["groups"].items():
        add_row(gt, name, g["tensors"], f"{g['params']:,}", f"{g['bytes']:,}", f"{g['bits_per_weight']:.3f}")
    tot = j["totals"]
    add_row(gt, _plain("total", "bold"), tot["tensors"], f"{tot['params']:,}", f"{tot['bytes']:,}", f"{tot['bits_per_weight']:.3f}")
    out.print(gt)


@app.command()
def card(
    file: Path = typer.Argument(..., help="The .gguf file the card describes (a split set by its first part: every part is listed)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where to write the card (default: README.md beside FILE)."),
    kld_report: Optional[Path] = typer.Option(None, "--kld-report", help="A report of quantkit eval kld --json on this file: its numbers go in the card."),
    source: Optional[Path] = typer.Option(None, "--source", help="The Hugging Face directory (or cached repo id) FILE was made from: base_model and license when the file does not say."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="The source model's repo id (ORG/NAME) for the card's base_model."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing card."),
) -> None:
    """Write the README.md (model card) a Hugging Face repository of GGUF files needs: YAML header, command, files, bits per weight, eval numbers."""
    from quantkit.pipeline.card import write_card

    report = None
    if kld_report is not None:
        from quantkit.evals.gate import load_json

        report = _run(lambda: load_json(kld_report, "report"))
    written, c = _run(lambda: write_card(file, output, force=force, source=source, kld=report, base_model=base_model,
                                         inputs=(kld_report,) if kld_report is not None else ()))
    out.print(f"wrote [bold]{esc(written)}[/] (model card of {esc(file.name)}, {len(c.files)} file(s))")


# Options shared by `run` and `chat`: one definition each, so the two cannot drift apart.
TEMPERATURE = typer.Option(0.8, "--temperature", min=0.0, help="0 is greedy.")
TOP_P = typer.Option(0.95, "--top-p", min=0.0, max=1.0)
TOP_K = typer.Option(40, "--top-k", min=0, help="0 keeps every token.")
MIN_P = typer.Option(0.05, "--min-p", min=0.0, max=1.0)
def _positive(value: float) -> float:
    if value <= 0:
        raise typer.BadParameter(f"{value} is not above 0")
    return value


REPEAT_PENALTY = typer.Option(1.1, "--repeat-penalty", callback=_positive, help="Above 0; 1 is no penalty.")
SEED = typer.Option(None, "--seed", min=0, max=2**32 - 2, help="Sampling seed (default: random).")
MAX_TOKENS = typer.Option(256, "--max-tokens", "-n", min=1, help="Most tokens per answer.")
IGNORE_EOS = typer.Option(False, "--ignore-eos", help="Keep generating past end-of-sequence (benchmarks, tests).")
CTX = typer.Option(2048, "--ctx", min=16, help="Context window in tokens.")
THREADS = typer.Option(None, "--threads", min=1, help="CPU threads (default: physical cores).")
GPU_LAYERS = typer.Option(None, "--gpu-layers", min=-1, help="Layers to offload (default: all when a GPU backend exists; -1 all).")
CPU_MOE = typer.Option(False, "--cpu-moe", help="Keep MoE expert tensors in CPU memory while the rest is offloaded to the GPU.")
MODEL = typer.Argument(..., help="A .gguf file.")
CHAT_TEMPLATE = typer.Option(None, "--chat-template", help="Use this built-in chat template (chatml) instead of the model's own (e.g. when the GGUF's is broken).")
SHOW_REASONING = typer.Option(False, "--show-reasoning", help="Harmony models (GPT-OSS): show the analysis channel, dimmed, on stderr before the answer.")
#: the longest prompt read from standard input (``-p -``)
MAX_PROMPT_CHARS = 1 << 26


def _load_model(model: Path, ctx: int, gpu_layers: Optional[int], threads: Optional[int], seed: Optional[int], cpu_moe: bool,
                rpc: Optional[str] = None) -> tuple[LoadPlan, Llama]:
    """Plan (memory check, backend) and open the model; notes about ignored options go to stderr."""
    from quantkit.engine.runtime import open_model, plan_load

    use_rpc(rpc)  # --rpc servers become devices before the plan counts them
    plan = _run(lambda: plan_load(model, n_ctx=ctx, gpu_layers=gpu_layers, threads=threads, seed=seed, cpu_moe=cpu_moe))
    for note in plan.notes:
        err.say("note:", "yellow", note)
    return plan, _run(lambda: open_model(plan))


#: C0 controls but tab and newline, DEL, C1 controls: what a model's output may not send to a terminal
_CONTROL = None


def _stream(text: str) -> None:
    """Generated text to stdout; on a terminal without its control characters (a hostile
    vocabulary could otherwise send escape sequences: retitle the window, rewrite the screen)."""
    global _CONTROL
    if sys.stdout.isatty():
        if _CONTROL is None:
            import re

            _CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
        text = _CONTROL.sub("\ufffd", text)
    sys.stdout.write(text)
    sys.stdout.flush()


class _Reasoning:
    """``--show-reasoning``: a harmony model's analysis channel on stderr, dimmed on a terminal and
    labelled, ended by a line break before the answer streams to stdout."""

    def __init__(self, show: bool) -> None:
        self.show, self.open = show, False

    def __call__(self, text: str) -> None:
        if not self.show:
            return
        tty = sys.stderr.isatty()
        if not self.open:
            self.open = True
            sys.stderr.write("\x1b[2m[reasoning] " if tty else "[reasoning] ")
        import re

        sys.stderr.write(re.sub("[\x00-\x08\x0b-\x1f\x7f-\x9f]", "\ufffd", text) if tty else text)
        sys.stderr.flush()

    def close(self) -> None:
        if self.open:
            self.open = False
            sys.stderr.write("\x1b[0m\n" if sys.stderr.isatty() else "\n")
            sys.stderr.flush()

    def answer(self, text: str) -> None:
        self.close()
        _stream(text)


@app.command()
def run(
    model: Path = MODEL,
    prompt: str = typer.Option(..., "-p", "--prompt", help="Prompt text ('-' reads stdin)."),
    chat: bool = typer.Option(False, "--chat", help="Apply the model's chat template to the prompt."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt (with --chat)."),
    chat_template: Optional[str] = CHAT_TEMPLATE,
    show_reasoning: bool = SHOW_REASONING,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
    min_p: float = MIN_P,
    repeat_penalty: float = REPEAT_PENALTY,
    seed: Optional[int] = SEED,
    max_tokens: int = MAX_TOKENS,
    ignore_eos: bool = IGNORE_EOS,
    ctx: int = CTX,
    threads: Optional[int] = THREADS,
    gpu_layers: Optional[int] = GPU_LAYERS,
    cpu_moe: bool = CPU_MOE,
    rpc: Optional[str] = RPC,
    as_json: bool = typer.Option(False, "--json", help="Print text, prompt, token counts, timings and placement as JSON."),
) -> None:
    """Generate once from a prompt and print the text to stdout."""
    from quantkit.engine.runtime import Sampling, generate

    if prompt == "-":
        try:
            prompt = sys.stdin.read(MAX_PROMPT_CHARS + 1)
        except UnicodeDecodeError:
            raise typer.BadParameter("standard input is not UTF-8 text", param_hint="--prompt -") from None
        if len(prompt) > MAX_PROMPT_CHARS:
            raise typer.BadParameter(f"standard input holds more than {MAX_PROMPT_CHARS:,} characters, far beyond any context window", param_hint="--prompt -")
    sampling = _run(lambda: Sampling(temperature, top_p, top_k, min_p, repeat_penalty, seed, max_tokens, ignore_eos))
    plan, llm = _load_model(model, ctx, gpu_layers, threads, seed, cpu_moe, rpc)
    if chat_template is not None and not chat:
        raise typer.BadParameter("applies to --chat", param_hint="--chat-template")
    shown = _Reasoning(show_reasoning and not as_json)
    result = _run(lambda: generate(llm, prompt, sampling, chat=chat, system=system, on_text=None if as_json else shown.answer,
                                   chat_template=chat_template, on_reasoning=shown))
    shown.close()
    if as_json:
        _print_json({**result.to_json(), "load": plan.to_json()})
    else:
        sys.stdout.write("\n")
        err.print(f"[dim]{result.completion_tokens} tokens in {result.seconds:.2f}s ({result.tokens_per_second} tok/s)[/]")


@app.command()
def chat(
    model: Path = MODEL,
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    chat_template: Optional[str] = CHAT_TEMPLATE,
    show_reasoning: bool = SHOW_REASONING,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
    min_p: float = MIN_P,
    repeat_penalty: float = REPEAT_PENALTY,
    seed: Optional[int] = SEED,
    max_tokens: int = MAX_TOKENS,
    ignore_eos: bool = IGNORE_EOS,
    ctx: int = CTX,
    threads: Optional[int] = THREADS,
    gpu_layers: Optional[int] = GPU_LAYERS,
    cpu_moe: bool = CPU_MOE,
    rpc: Optional[str] = RPC,
) -> None:
    """Chat with a model in the terminal; /help lists the commands, Ctrl-C stops an answer, Ctrl-D exits."""
    from quantkit.engine.chat import History, check_reserve
    from quantkit.engine.runtime import Sampling, chat_template_for

    sampling = _run(lambda: Sampling(temperature, top_p, top_k, min_p, repeat_penalty, seed, max_tokens, ignore_eos))
    _run(lambda: check_reserve(ctx, max_tokens))
    plan, llm = _load_model(model, ctx, gpu_layers, threads, seed, cpu_moe, rpc)
    template = _run(lambda: chat_template_for(llm, override=chat_template))
    err.print(f"[dim]{esc(model.name)}: {esc(plan.describe())}; chat template: {esc(template.name)}[/]", highlight=False, soft_wrap=True)
    err.print("[dim]Type /help for commands; Ctrl-C stops an answer, Ctrl-D exits.[/]", highlight=False)
    _chat_loop(llm, template, History(system=system), sampling, ctx, show_reasoning)


def _chat_loop(llm: Llama, template: ChatTemplate, history: History, sampling: Sampling, n_ctx: int, show_reasoning: bool = False) -> None:
    """Read messages and commands until /exit or Ctrl-D."""
    from quantkit.engine.chat import parse_command, read_message, unescape

    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    while True:
        try:
            text = read_message(input)
            command = parse_command(text)
            if command is None and text.strip():
                history = _chat_turn(llm, template, history, unescape(text), sampling, n_ctx, show_reasoning)
            elif command is not None:
                if command.name == "exit":
                    return
                history = _chat_command(command, history)
        except EOFError:
            sys.stdout.write("\n")
            return
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            err.print("[dim](/exit or Ctrl-D quits)[/]")
        except QuantkitError as e:
            error_line(e)


def _chat_command(command: Command, history: History) -> History:
    """Apply /help, /reset, /save or /load; returns the new history."""
    from quantkit.engine.chat import help_text, load_history, save_history

    if command.name == "help":
        err.print(help_text(), highlight=False, markup=False)
    elif command.name == "reset":
        history = history.reset()
        err.print("[dim]conversation cleared[/]")
    elif command.name == "save":
        path = save_history(history, command.arg)
        err.print(f"[dim]saved {len(history.turns)} turns to {esc(path)}[/]", highlight=False)
    elif command.name == "load":
        history = load_history(command.arg)
        err.print(f"[dim]loaded {len(history.turns)} turns from {esc(command.arg)}[/]", highlight=False)
    return history


def _chat_turn(llm: Llama, template: ChatTemplate, history: History, user: str, sampling: Sampling, n_ctx: int, show_reasoning: bool = False) -> History:
    """Fit the history into the context, stream one answer, and return the history with it."""
    from quantkit.engine.chat import prepare_turn
    from quantkit.engine.runtime import chat_tokens, complete_chat

    prep = prepare_turn(history, user, template.render, lambda p: chat_tokens(llm, p), n_ctx, sampling.max_tokens)
    if prep.dropped:
        err.print(
            f"[yellow]context full:[/] dropped the {prep.dropped} oldest turn(s) to fit --ctx {n_ctx}; {len(prep.history.turns)} kept",
            highlight=False, soft_wrap=True,
        )
    shown = _Reasoning(show_reasoning)
    result = complete_chat(llm, template, list(prep.tokens), sampling, on_text=shown.answer, on_reasoning=shown, interruptible=True)
    shown.close()
    sys.stdout.write("\n")
    if result.finish_reason == "interrupted":
        err.print("[yellow]stopped[/]")
    err.print(f"[dim]{result.completion_tokens} tokens in {result.seconds:.2f}s ({result.tokens_per_second} tok/s)[/]", highlight=False)
    return prep.history.add(user, result.text) if result.text or result.finish_reason != "interrupted" else prep.history


#: signals that arrived (SIGTERM/SIGHUP): one caught by click or typer outside a library call still ends the run as 128+N
_signalled: list[int] = []


def _terminate_like_interrupt() -> None:
    """SIGTERM and SIGHUP unwind the command like Ctrl-C (partial outputs removed, one line, exit 128+N).

    Without this Python dies at once on them and leaves ``*.partial`` files behind.
    """
    import signal

    def handler(signum: int, frame: object) -> None:
        _signalled.append(signum)
        raise Terminated(signum)

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, handler)


def run() -> None:
    """The ``quantkit`` command: run it, then leave without the interpreter's teardown.

    When a command returns, what it wrote is closed (``with`` blocks, atomic renames) and
    the exit handlers still run here (logging, thread pools, temporary files); what is
    skipped is the clean-up of every module and the final garbage collection, ~0.1 s once
    llama-cpp-python (thousands of ctypes bindings) is loaded: a tenth of a short
    ``eval ppl`` (bench/RESULTS_eval.md).  ``QUANTKIT_SLOW_EXIT=1`` exits the usual way.
    """
    import atexit

    _terminate_like_interrupt()
    try:
        app(prog_name="quantkit")
        code: Any = 0
    except SystemExit as e:
        code = e.code
    except Terminated as e:  # arrived outside a library call
        err.say("terminated:", "yellow", f"signal {e.signum}")
        code = 128 + e.signum
    except KeyboardInterrupt:
        err.say("interrupted:", "yellow", "stopped")
        code = 130
    except Exception as e:  # a bug: one line instead of a traceback (--debug shows it)
        if _state["debug"]:
            traceback.print_exc()
        err.say("error:", "bold red", cap(f"internal error ({type(e).__name__}: {' '.join(str(e).split())}); fix: rerun with --debug and report it as a quantkit bug"))
        code = 70  # EX_SOFTWARE
    if _signalled and code != 128 + _signalled[0]:  # arrived while typer/click parsed or set up (they report it as Ctrl-C)
        err.say("terminated:", "yellow", f"signal {_signalled[0]}; nothing was written at the output path")
        code = 128 + _signalled[0]
    if os.environ.get("QUANTKIT_SLOW_EXIT"):
        sys.exit(code)
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code)

