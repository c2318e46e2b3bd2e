"""Measured sensitivity: how far the model's output moves when one tensor (or one group of tensors) is quantised.

For ``--target-bpw/--target-size`` with ``--calib-text``.  The model is
written once as an unquantised GGUF in a temporary directory (its own dtype:
BF16 sources stay exact) and loaded once by llama.cpp on the CPU, which maps
the file.  Then, probe by probe, the stored bytes of the probe's tensors are
overwritten in place with those tensors quantised to the probe type and
dequantised again (the exact values the quantised file would hold; written a
matrix or a 16 MiB row chunk at a time), the calibration chunks are evaluated,
the mean KL-divergence from the unmodified model's distribution is recorded,
and the original bytes are put back.  llama.cpp reads weights through its
shared mapping of the file, so no reload is needed; a probe whose first
change does not move the logits (a runtime that copied the weights) is an
error, not a silent zero.

Modes (:data:`MODES`).  ``full``: one probe per quantisable tensor.
``grouped``: one probe per role (``attn_q``, ``ffn_down_exps``, ...) per range of
layers (``ranges`` equal ranges), plus one per tensor outside the blocks
(embeddings, output): a fixed number of probes whatever the depth, each
group's KLD shared between its tensors by ``quantkit.policy.plan.Target.weights``.
``auto`` (the default): ``full`` up to :data:`MAX_PROBES` tensors, else ``grouped``
with as many layer ranges as fit in that many probes.  The cost is
``probes x chunks`` forward passes of the model (each pass as long as the model
is deep) plus one quantisation of the probed weights, so ``full`` grows with
depth squared and ``grouped`` / ``auto`` linearly in the tensors.  Before the
probes start, :class:`budget.Cost` states it from a timing of the base passes
(``on_estimate``), and the result carries the estimate next to the time taken.

``quantkit.policy.plan.Target.weight`` turns each measurement into the cost of a unit
of relative error (KLD / rel(probe type)), which scales that tensor's
measured errors for every candidate type (``quantkit.policy.budget``).

Not for: choosing types (``quantkit.policy.budget``), evaluating finished files (``quantkit.evals``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from quantkit.policy import budget
from quantkit.format import ggml, gguf_spec
from quantkit.format.encode import f32_to_bf16, to_f32
from quantkit.errors import QuantkitError
from quantkit.hf.mapping import OutTensor

log = logging.getLogger(__name__)
Q = gguf_spec.GGMLQuantizationType
PROBE_256 = Q.Q3_K  # probe type for rows of 256: the middle of the range budgets choose from
PROBE_32 = Q.Q4_0
_STORED = {Q.F32: "F32", Q.F16: "F16", Q.BF16: "BF16"}
CHUNK_BYTES = 16 * 1024 * 1024  # float32 bytes quantised and written back per piece of a probe
MODES = ("auto", "full", "grouped")
DEFAULT_RANGES = 4  # layer ranges of a grouped measurement
MAX_PROBES = 64  # auto: probes before it groups (the fixture's 30 tensors are probed one by one)


def probe_type(t: OutTensor) -> gguf_spec.GGMLQuantizationType | None:
    c = budget.candidates(t)
    if not c:
        return None
    return PROBE_256 if c is budget.CANDIDATES_256 else PROBE_32


def _simulated_rows(raw: bytes, stored: gguf_spec.GGMLQuantizationType, cols: int, qtype: gguf_spec.GGMLQuantizationType, w: np.ndarray | None) -> bytes:
    """Stored bytes of whole rows -> the same rows quantised to ``qtype`` and back, in the stored type."""
    dtype = _STORED[stored]
    a = np.frombuffer(raw, dtype={"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[dtype]).reshape(-1, cols)
    y = budget.dequantize(ggml.quantize(to_f32(a, dtype), qtype, w), qtype, a.shape)
    out = y if stored == Q.F32 else ggml.convert(y, "f32", "f16") if stored == Q.F16 else f32_to_bf16(y)
    return out.tobytes()


def _pieces(shape: tuple[int, ...], itemsize: int) -> Iterator[tuple[int, int, int]]:
    """(expert, byte offset, bytes) of a tensor's row chunks: about CHUNK_BYTES of float32 each, never across experts."""
    cols = shape[-1]
    n_mats = shape[0] if len(shape) == 3 else 1
    rows = shape[-2] if len(shape) == 3 else int(np.prod(shape[:-1]))
    step = max(1, CHUNK_BYTES // (4 * cols))
    for e in range(n_mats):
        for r in range(0, rows, step):
            yield e, (e * rows + r) * cols * itemsize, min(step, rows - r) * cols * itemsize


def simulate(raw: bytes, stored: gguf_spec.GGMLQuantizationType, shape: tuple[int, ...], qtype: gguf_spec.GGMLQuantizationType, weights: np.ndarray | None) -> bytes:
    """Stored bytes of a tensor -> the same tensor quantised to ``qtype`` and back, in the stored type."""
    out = bytearray(len(raw))
    for e, at, n in _pieces(shape, len(raw) // int(np.prod(shape))):
        out[at : at + n] = _simulated_rows(raw[at : at + n], stored, shape[-1], qtype, None if weights is None else weights[e])
    return bytes(out)


def _simulate_in_place(
    fd: int, at: int, stored: gguf_spec.GGMLQuantizationType, shape: tuple[int, ...], qtype: gguf_spec.GGMLQuantizationType,
    weights: np.ndarray | None, spill: Any,
) -> None:
    """Overwrite the tensor stored at ``at`` with its probe values a row chunk at a time, its original bytes appended to
    ``spill`` (a file: memory stays at one chunk however large the probe)."""
    itemsize = {Q.F32: 4, Q.F16: 2, Q.BF16: 2}[stored]
    for e, off, n in _pieces(shape, itemsize):
        raw = os.pread(fd, n, at + off)
        spill.write(raw)
        os.pwrite(fd, _simulated_rows(raw, stored, shape[-1], qtype, None if weights is None else weights[e]), at + off)


def role_of(name: str) -> str:
    """A GGUF tensor name without its block: ``blk.3.attn_q.weight`` -> ``attn_q.weight``."""
    return name if gguf_spec.block_of(name) is None else name.split(".", 2)[2]


def probe_groups(tensors: Sequence[OutTensor], mode: str = "full", ranges: int | None = None) -> list[tuple[str, list[OutTensor]]]:
    """The probes of a measurement, each (label, tensors quantised together), in the order of ``tensors``.

    ``full``: one per tensor.  ``grouped``: one per role per range of blocks (``ranges`` equal ranges, default
    :data:`DEFAULT_RANGES`; fewer when the model has fewer blocks), one per tensor outside the blocks.  ``auto``:
    ``full`` up to :data:`MAX_PROBES` tensors, else ``grouped`` with the most ranges that fit in that many probes.
    """
    if mode not in MODES:
        raise QuantkitError(f"--calib-mode {mode!r}: expected one of {', '.join(MODES)}")
    if ranges is not None and (not isinstance(ranges, int) or isinstance(ranges, bool) or ranges < 1):
        raise QuantkitError(f"--calib-ranges {ranges!r}: expected a whole number >= 1; fix: use e.g. --calib-ranges 4")
    probed = [t for t in tensors if probe_type(t) is not None]
    if mode == "full" or mode == "auto" and len(probed) <= MAX_PROBES:
        return [(t.name, [t]) for t in probed]
    if mode == "auto":
        roles = {role_of(t.name) for t in probed if gguf_spec.block_of(t.name) is not None}
        singles = sum(1 for t in probed if gguf_spec.block_of(t.name) is None)
        ranges = max(1, (MAX_PROBES - singles) // max(1, len(roles)))
    n_layer = 1 + max((b for t in probed if (b := gguf_spec.block_of(t.name)) is not None), default=-1)
    k = min(ranges or DEFAULT_RANGES, max(1, n_layer))
    groups: dict[str, list[OutTensor]] = {}
    for t in probed:
        b = gguf_spec.block_of(t.name)
        if b is None:
            groups[t.name] = [t]
            continue
        r = b * k // n_layer
        lo, hi = -(-r * n_layer // k), -(-(r + 1) * n_layer // k) - 1
        groups.setdefault(f"blk.{lo}-{hi}.{role_of(t.name)}", []).append(t)
    return list(groups.items())


def resolved_mode(groups: Sequence[tuple[str, list[OutTensor]]]) -> str:
    """``full`` when every probe is one tensor, else ``grouped``."""
    return "full" if all(len(ts) == 1 and label == ts[0].name for label, ts in groups) else "grouped"


#: the smallest --calib-ctx: each chunk's second half (n_ctx/2 positions) is compared, at least 4 of them
MIN_CALIB_CTX = 8


def check_calib_args(n_ctx: object, n_chunks: object, threads: object, text: object) -> None:
    """``--calib-ctx`` >= 8, ``--calib-chunks`` >= 1, threads 1..512 and a non-empty text, before anything is converted or loaded."""
    from quantkit.engine.limits import check_chunks, check_ctx_value, check_text, check_threads

    check_ctx_value(n_ctx, MIN_CALIB_CTX, even=False, flag="--calib-ctx")
    if n_chunks is None:
        raise QuantkitError("--calib-chunks None: expected a whole number >= 1; fix: use e.g. --calib-chunks 8")
    check_chunks(n_chunks, flag="--calib-chunks")
    check_threads(threads)
    check_text(text, "--calib-text")


#: progress callback: (stage, done, total, label); stages "write" (bytes of the unquantised copy), "probe" (probes)
Progress = Callable[[str, int, int, str], None]


def _quantise_seconds(tensors: Sequence[OutTensor]) -> float:
    """Seconds to quantise, dequantise, write and restore the probes of ``tensors``, from one timed sample of 64K
    values per probe type and row length."""
    import time

    rate: dict[tuple[Any, int], float] = {}
    total = 0.0
    for t in tensors:
        q, cols = probe_type(t), t.shape[-1]
        if q is None:
            continue
        if (q, cols) not in rate:
            x = np.random.default_rng(0).standard_normal((max(1, (1 << 16) // cols), cols), dtype=np.float32)
            t0 = time.perf_counter()
            f32_to_bf16(budget.dequantize(ggml.quantize(x, q), q, x.shape))
            rate[(q, cols)] = (time.perf_counter() - t0) / x.size  # reading, writing and restoring add about what a bigger piece saves
        total += rate[(q, cols)] * t.n_elements
    return total


def measure(
    model: Path,
    tensors: list[OutTensor],
    text: str,
    n_ctx: int = 256,
    n_chunks: int = 8,
    importance: budget.Importance | None = None,
    threads: int | None = None,
    on_tensor: Callable[[str], None] | None = None,
    mode: str = "auto",
    ranges: int | None = None,
    on_estimate: Callable[[budget.Cost], None] | None = None,
    on_progress: Progress | None = None,
    setup_seconds: float = 0.0,
) -> budget.Measured:
    """Mean KLD per quantisable tensor (or group of tensors, ``mode="grouped"``) of ``model``, an unquantised GGUF
    that may be modified and is restored.  ``on_estimate`` gets the :class:`budget.Cost` before the probes start;
    Ctrl-C stops it with a warning saying how far it got (the file restored, nothing kept)."""
    import time

    from quantkit.engine.limits import check_ctx, model_limits
    from quantkit.engine.session import check_logits, log_softmax
    from quantkit.engine.session import EvalSession
    from quantkit.format.gguf_read import read_gguf

    check_calib_args(n_ctx, n_chunks, threads, text)
    groups = probe_groups(tensors, mode, ranges)
    check_ctx(n_ctx, model_limits(model), outputs=0.5, minimum=MIN_CALIB_CTX, even=False, flag="--calib-ctx")  # logits of the second halves
    t_setup = time.perf_counter()
    g = read_gguf(model)
    info = {t.name: t for t in g.tensors}
    groups = [(label, [t for t in ts if t.name in info and info[t.name].qtype in _STORED]) for label, ts in groups]
    groups = [(label, ts) for label, ts in groups if ts]
    state: dict[str, Any] = {"stage": "loading the model", "done": 0, "t0": time.perf_counter(), "estimate": None}
    try:
        session = EvalSession(model, n_ctx, threads=threads, gpu_layers=0)
        try:
            state["stage"] = "evaluating the base"
            chunks, base, per_pass = _base(session, text, n_ctx, n_chunks, model)
            probed = [t for _, ts in groups for t in ts]
            cost = budget.Cost(resolved_mode(groups) if mode == "auto" else mode, len(probed), len(groups), len(chunks), per_pass,
                               _quantise_seconds(probed), setup_seconds + time.perf_counter() - t_setup,
                               grouped_probes=len(probe_groups(probed, "grouped", ranges)), auto=mode == "auto")
            log.info("%s", cost.describe())
            state.update(stage="probing", estimate=cost.estimated_seconds, t0=time.perf_counter())
            if on_estimate is not None:
                on_estimate(cost)
            spent = [0.0]

            def kld_now() -> float:
                t0 = time.perf_counter()
                total = 0.0
                for i, (c, b) in enumerate(zip(chunks, base)):
                    n = log_softmax(session.eval_chunk(c, n_ctx // 2))
                    check_logits(n, i, model)  # a broken file (or probe) must not turn into a measured sensitivity
                    total += float(np.einsum("ij,ij->", np.exp(b), b - n, dtype=np.float64)) / len(b)  # b - n: exact in float32 (close values)
                spent[0] += time.perf_counter() - t0
                return total / len(chunks)

            kld: dict[str, tuple[gguf_spec.GGMLQuantizationType, float]] = {}
            labels: dict[str, str] = {}
            fd = os.open(model, os.O_RDWR)
            try:
                for label, ts in groups:
                    if on_progress is not None:
                        on_progress("probe", state["done"], len(groups), label)
                    for t in ts:
                        if on_tensor is not None:
                            on_tensor(t.name)
                    k = _probe(fd, g.data_offset, info, ts, importance, kld_now, model.parent)
                    if not kld and k <= 0.0:
                        raise QuantkitError(f"{model}: changing {ts[0].name} did not change llama.cpp's output (the runtime copied the weights); fix: run the probe on a CPU build")
                    for t in ts:
                        kld[t.name] = (probe_type(t), k)  # type: ignore[assignment]
                        if cost.mode == "grouped":
                            labels[t.name] = label
                    state["done"] += 1
                if on_progress is not None:
                    on_progress("probe", state["done"], len(groups), "")
            finally:
                os.close(fd)
        finally:
            session.close()
    except KeyboardInterrupt:
        est = f" of ~{state['estimate']:.1f} s" if state["estimate"] is not None else ""
        log.warning("sensitivity: interrupted while %s, after %d of %d probes (%.1f s%s); %s was restored, nothing was kept",
                    state["stage"], state["done"], len(groups), time.perf_counter() - state["t0"], est, model.name)
        raise
    took = time.perf_counter() - state["t0"]
    cost = budget.Cost(**{**cost.__dict__, "seconds": took, "done": state["done"], "pass_seconds": spent[0], "quantise_taken": took - spent[0]})
    return budget.Measured(kld, labels, cost)


def _base(session: Any, text: str, n_ctx: int, n_chunks: int, model: Path) -> tuple[list[list[int]], list[np.ndarray], float]:
    """The calibration chunks, the unmodified model's log-probabilities of their second halves, and the seconds per pass."""
    import time

    from quantkit.engine.session import check_logits, log_softmax

    tokens = session.tokenize(text)
    bos = session.bos
    step = n_ctx - (1 if bos is not None else 0)
    chunks = [([bos] if bos is not None else []) + tokens[i : i + step] for i in range(0, len(tokens) - step + 1, step)][:n_chunks]
    if not chunks:
        raise QuantkitError(f"--calib-text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}; fix: give a longer text or a smaller --calib-ctx")
    base, times = [], []
    for i, c in enumerate(chunks):
        t0 = time.perf_counter()
        lp = log_softmax(session.eval_chunk(c, n_ctx // 2))  # float32: 4 bytes per vocabulary entry and scored position
        times.append(time.perf_counter() - t0)
        check_logits(lp, i, model)
        base.append(lp)
    return chunks, base, float(np.median(times[1:] if len(times) > 2 else times))  # the first pass also pages the model in


def _probe(
    fd: int, data_offset: int, info: Mapping[str, Any], ts: Sequence[OutTensor], importance: budget.Importance | None,
    kld_now: Callable[[], float], spill_dir: Path,
) -> float:
    """Quantise the tensors ``ts`` in place to their probe types, measure, and put the original bytes back (from an
    unlinked spill file: nothing is left behind, however the process ends)."""
    with tempfile.TemporaryFile(dir=spill_dir, prefix=".quantkit-probe-") as spill:
        saved: list[tuple[int, int]] = []
        try:
            for t in ts:
                ti = info[t.name]
                saved.append((data_offset + ti.offset, ti.nbytes))
                weights = importance(t.name)[0] if importance is not None else None
                _simulate_in_place(fd, data_offset + ti.offset, ti.qtype, t.shape, probe_type(t), weights, spill)  # type: ignore[arg-type]
            return kld_now()
        finally:
            spill.flush()
            spill.seek(0)
            for at, n in saved:  # what was written of the last tensor is in the spill file too
                for off in range(0, n, CHUNK_BYTES):
                    raw = spill.read(min(CHUNK_BYTES, n - off))
                    if not raw:
                        break
                    os.pwrite(fd, raw, at + off)


def measure_checkpoint(
    src: Path,
    text: str,
    n_ctx: int = 256,
    n_chunks: int = 8,
    importance: budget.Importance | None = None,
    threads: int | None = None,
    on_tensor: Callable[[str], None] | None = None,
    work_dir: Path | None = None,
    mode: str = "auto",
    ranges: int | None = None,
    on_estimate: Callable[[budget.Cost], None] | None = None,
    on_progress: Progress | None = None,
    no_mtp: bool = False,
) -> budget.Measured:
    """:func:`measure` for an HF checkpoint: written as an unquantised GGUF in a temporary directory first (removed
    afterwards, Ctrl-C included).  ``no_mtp``: without its multi-token-prediction blocks, as ``convert --no-mtp``
    writes it (the measurement covers the tensors the file will hold, and the model the file will be)."""
    import time

    from quantkit.pipeline.convert import convert, prepare
    from quantkit.engine.limits import check_ctx, model_limits

    check_calib_args(n_ctx, n_chunks, threads, text)
    check_ctx(n_ctx, model_limits(src), minimum=MIN_CALIB_CTX, even=False, flag="--calib-ctx")  # before the conversion
    t0 = time.perf_counter()
    ckpt, prep = prepare(src, "f32", no_mtp=no_mtp)
    dtypes = {ref.dtype for t in prep.tensors for ref in t.sources}
    ckpt.close()
    probe_groups(prep.tensors, mode, ranges)  # a bad mode is an error before the conversion
    outtype = "bf16" if dtypes == {"BF16"} else "f16" if dtypes == {"F16"} else "f32"  # exact for the source
    with tempfile.TemporaryDirectory(prefix="quantkit-probe-", dir=work_dir) as tmp:
        path = Path(tmp) / "probe.gguf"
        written = [0, 0]

        def start(plan: Any) -> None:
            written[1] = plan.nbytes

        def wrote(n: int) -> None:
            written[0] += n
            if on_progress is not None:
                on_progress("write", written[0], written[1], path.name)

        try:
            convert(src, path, outtype, on_start=start, on_bytes=wrote, no_mtp=no_mtp)
        except KeyboardInterrupt:
            log.warning("sensitivity: interrupted while writing the unquantised copy (%d of %d MiB); it was removed, nothing was kept",
                        written[0] >> 20, written[1] >> 20)
            raise
        return measure(path, prep.tensors, text, n_ctx, n_chunks, importance, threads, on_tensor, mode, ranges, on_estimate, on_progress,
                       setup_seconds=time.perf_counter() - t0)
