"""``quantkit convert``: a Hugging Face checkpoint -> one GGUF file, streamed.

Reads tensors lazily from memory-mapped shards, transforms and encodes one
piece at a time (a stacked expert tensor is written expert by expert, large
matrices in row chunks) and drops the source pages it has read, so the peak
resident set does not grow with model size.  Output is atomic
(``quantkit.format.output``).  The same function is the Python API and the CLI's body.

With an importance matrix (``quantkit.policy.imatrix``) every quantised matrix is
encoded with the weights llama-quantize would give it, expert by expert (rows
of a stacked expert tensor use their own expert's weights), so the bytes equal
``llama_model_quantize``'s given the same matrix; the file records it in
llama-quantize's ``quantize.imatrix.*`` keys.

A checkpoint's MXFP4 experts (gpt-oss) are carried: their ``_blocks`` / ``_scales`` repacked into GGML
MXFP4 a few experts at a time, the rows a row-picking transform selects (:func:`_carried_pieces`), no
value decoded -- the vendored ``convert_hf_to_gguf.py``'s bytes, whatever the type of the rest.

Not for: argument parsing or terminal output (``quantkit.cli.main``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from quantkit import __version__
from quantkit.format import ggml, gguf_spec
from quantkit.hf.checkpoint import DTYPES, open_checkpoint
from quantkit.converters import for_model_type
from quantkit.format.encode import SAME, encode, nonfinite
from quantkit.errors import CheckpointError, OutputError, QuantkitError
from quantkit.format.gguf_write import MetaValue, SplitGGUFWriter, SplitSpec, StreamingGGUFWriter, alignment_of
from quantkit.format.gguf_write import split_file_sizes, split_layout, split_path, split_prefix
from quantkit.hf.hub_cache import repo_of_snapshot, resolve_source
from quantkit.pipeline.card import COMMAND_KEY
from quantkit.hf.mapping import IntegerTable, OutTensor, Role, group_totals
from quantkit.hf.quantized import mxfp4_to_ggml, warn_requantised
from quantkit.format.output import atomic_file, atomic_files, check_free_space, check_target
from quantkit.policy.plan import Override, Plan, Target, TensorPlan, carried, header_bytes, make_plan
from quantkit.hf.vocab import load_vocab, vocab_metadata

if TYPE_CHECKING:
    from quantkit.policy.imatrix import Imatrix

log = logging.getLogger(__name__)
V = gguf_spec.GGUFValueType
_LOCAL = threading.local()  # per thread: the reused buffer of the quantised pieces (ggml.Scratch)
CHUNK_BYTES = 16 * 1024 * 1024  # source bytes encoded per piece: bounds transient copies and resident pages


@dataclass(frozen=True)
class ConvertResult:
    output: str
    model_type: str
    outtype: str
    n_tensors: int
    n_params: int
    nbytes: int
    seconds: float
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    types: dict[str, dict[str, int]] = field(default_factory=dict)  # GGML type -> tensors, params, bytes
    parts: list[str] = field(default_factory=list)  # a split set: every part, the first is ``output``

    def to_json(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "model_type": self.model_type,
            "type": self.outtype,
            "tensors": self.n_tensors,
            "params": self.n_params,
            "bytes": self.nbytes,
            "bits_per_weight": round(8 * self.nbytes / max(1, self.n_params), 4),
            "seconds": round(self.seconds, 3),
            "groups": self.groups,
            "types": self.types,
        } | ({"parts": self.parts} if self.parts else {})


@dataclass(frozen=True)
class Prepared:
    """Everything known before a byte of tensor data is written."""

    model_type: str
    hparams: Any  # the converter's hyperparameters (or a GGUF source's shape)
    tensors: list[OutTensor]
    plan: Plan
    metadata: dict[str, MetaValue]
    imatrix: Imatrix | None = None
    arch: str = gguf_spec.ARCH_LLAMA  # general.architecture of the output


def general_metadata(src: Path, config: dict[str, Any], plan: Plan, tensors: list[OutTensor], hp: Any) -> dict[str, MetaValue]:
    K = gguf_spec.Keys.General
    given = config.get("_name_or_path")
    repo = repo_of_snapshot(src)  # a Hugging Face cache snapshot: its directory is named after a commit, not the model
    name = (given if isinstance(given, str) and given else repo or src.resolve().name).rstrip("/").split("/")[-1]
    name = name.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate (JSON escape, odd file name) is not UTF-8
    expert = sum(t.n_elements for t in tensors if t.role is Role.EXPERTS)
    total = sum(t.n_elements for t in tensors)
    md = {
        K.TYPE: MetaValue("model", V.STRING),
        K.NAME: MetaValue(name, V.STRING),
        K.QUANTIZED_BY: MetaValue(f"quantkit {__version__}", V.STRING),
        K.FILE_TYPE: MetaValue(int(plan.file_type), V.UINT32),
        K.SIZE_LABEL: MetaValue(gguf_spec.size_label(total, total - expert, expert // max(1, hp.n_expert), hp.n_expert), V.STRING),
    }
    md[K.QUANTIZATION_VERSION] = MetaValue(gguf_spec.GGML_QUANT_VERSION, V.UINT32)  # as llama.cpp writes it, always
    if repo is not None:
        md[K.SOURCE_REPO_URL] = MetaValue(f"https://huggingface.co/{repo}", V.STRING)
    return md


def prepare(
    src: str | Path, outtype: str = "f16", allow_pickle: bool = False, overrides: Sequence[Override] = (), target: Target | None = None,
    imatrix: Imatrix | None = None, allow_requantize: bool = False, no_mtp: bool = False,
):
    """Validate a checkpoint (and an importance matrix against it) and build its tensor map, type plan and metadata (reads no weights).

    ``src`` is a Hugging Face directory (or a repo id in the local Hugging Face cache, ``quantkit.hf.hub_cache``),
    or a GGUF file to requantise (``quantkit.pipeline.gguf_source``; a split set by its first part).
    ``no_mtp``: leave the checkpoint's multi-token-prediction blocks out (llama.cpp's main graph never runs them,
    and an importance matrix has no data for them), as llama.cpp's converter's ``--no-mtp`` does.
    """
    src = resolve_source(src)
    if src.is_file():  # a directory is a checkpoint: the GGUF code is not even imported
        from quantkit.pipeline import gguf_source

        if gguf_source.is_gguf(src):
            return _prepare_gguf(src, outtype, overrides, target, imatrix, allow_requantize)
    ckpt = open_checkpoint(src, allow_pickle=allow_pickle)
    try:
        conv = for_model_type(ckpt.model_type, where=str(src / "config.json"))
        if no_mtp:
            mtp = set(conv.mtp_sources(ckpt.config, list(ckpt.tensors)))
            if mtp:
                log.info("%s: --no-mtp: %d multi-token-prediction tensors left out", src, len(mtp))
                ckpt.tensors = {n: r for n, r in ckpt.tensors.items() if n not in mtp}
        hp, tensors = conv.map(ckpt)
        vocab, tcfg = load_vocab(src, hp.n_vocab)
        other_md = {**conv.metadata(hp), **vocab_metadata(vocab, tcfg, ckpt.config)}
        stand_in = Plan("f32", gguf_spec.LlamaFileType.ALL_F32, ())  # the header's size does not depend on the types
        plan = _plan_and_check(tensors, outtype, overrides, hp, target, imatrix, str(src), {**general_metadata(src, ckpt.config, stand_in, tensors, hp), **other_md}, conv.arch,
                               allow_requantize)
        md = {**general_metadata(src, ckpt.config, plan, tensors, hp), **other_md, **imatrix_metadata(imatrix)}
        warn_requantised(str(src), ckpt.quantization, tensors, plan.tensors)  # an FP8 / INT4 source quantised again: once
    except BaseException:
        ckpt.close()
        raise
    return ckpt, Prepared(ckpt.model_type, hp, tensors, plan, md, imatrix, conv.arch)


def _plan_and_check(
    tensors: list[OutTensor], outtype: str, overrides: Sequence[Override], hp: Any, target: Target | None, imatrix: Imatrix | None,
    where: str, header_md: dict[str, MetaValue], arch: str, requantize: bool = False,
) -> Plan:
    """The plan of either kind of source, with its importance-matrix checks (``requantize``: MXFP4 experts converted per the type, not carried)."""
    overhead = 0
    if target is not None:  # the header's size does not depend on the types
        overhead = header_bytes(arch, header_md, tensors)
    if imatrix is not None:
        from quantkit.policy.imatrix import check_matches

        check_matches(imatrix, {t.name: t.shape for t in tensors}, where)
    importance = _importance(imatrix, tensors)
    plan = make_plan(tensors, outtype, overrides, hp, has_imatrix=imatrix is not None, target=target, importance=importance, overhead=overhead,
                     requantize=requantize)
    _check_imatrix_coverage(plan, imatrix, where)
    return plan


def _prepare_gguf(
    src: Path, outtype: str, overrides: Sequence[Override], target: Target | None, imatrix: Imatrix | None, allow_requantize: bool,
):
    from quantkit.pipeline import gguf_source

    gs = gguf_source.open_gguf(src)
    try:
        K = gguf_spec.Keys.General

        def md_for(plan_ft: int) -> dict[str, MetaValue]:
            return {
                **gs.metadata,
                K.QUANTIZED_BY: MetaValue(f"quantkit {__version__}", V.STRING),
                K.FILE_TYPE: MetaValue(plan_ft, V.UINT32),
                K.QUANTIZATION_VERSION: MetaValue(gguf_spec.GGML_QUANT_VERSION, V.UINT32),
            }

        arch = gs.metadata[K.ARCHITECTURE].value
        plan = _plan_and_check(gs.tensors, outtype, overrides, gs.hparams, target, imatrix, str(src), md_for(0), arch)
        gguf_source.check_requantize(gs, {tp.name: tp.qtype for tp in plan.tensors}, allow_requantize)
        md = {**md_for(int(plan.file_type)), **imatrix_metadata(imatrix)}
    except BaseException:
        gs.close()
        raise
    return gs, Prepared(gs.model_type, gs.hparams, gs.tensors, plan, md, imatrix, arch)  # type: ignore[arg-type]


def _importance(imatrix: Imatrix | None, tensors: list[OutTensor]) -> Callable[[str], tuple[np.ndarray | None, np.ndarray | None]] | None:
    """quantkit.policy.budget's view of an importance matrix: per tensor (weights (E, cols), each expert's share of tokens)."""
    if imatrix is None:
        return None
    from quantkit.policy.imatrix import expert_weights

    shapes = {t.name: t.shape for t in tensors}

    def importance(name: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        w = expert_weights(imatrix, name, shapes[name]) if name in shapes else None
        e = imatrix.entries.get(name)
        if w is None or e is None or w.shape[0] < 2 or imatrix.legacy or e.counts.sum() <= 0:
            return w, None
        return w, (e.counts / e.counts.sum()).astype(np.float64)

    return importance


def _check_imatrix_coverage(plan: Plan, imatrix: Imatrix | None, where: str) -> None:
    """Refuse, as llama-quantize does, a quantised tensor whose type needs importance weights it will not get."""
    from quantkit.format import ggml
    from quantkit.policy.presets import tensor_requires_imatrix

    for tp in plan.tensors:
        if tp.qtype in (gguf_spec.GGMLQuantizationType.F32, gguf_spec.GGMLQuantizationType.F16, gguf_spec.GGMLQuantizationType.BF16):
            continue
        if imatrix is not None and tp.name in imatrix.entries:
            continue
        if tensor_requires_imatrix(tp.name, tp.qtype, plan.outtype) or ggml.requires_imatrix(tp.qtype):
            if imatrix is None:
                raise QuantkitError(f"{where}: tensor {tp.name!r} gets {tp.qtype.name}, which needs an importance matrix; fix: pass --imatrix FILE or choose another type for it")
            if tp.name in imatrix.left_out:
                raise QuantkitError(
                    f"{imatrix.source}: the entry for {tp.name!r} was left out (--imatrix-include / --imatrix-exclude), and it gets "
                    f"{tp.qtype.name}, which needs importance weights; fix: keep that entry, or choose another type for it "
                    f"(--tensor-type {tp.name.removesuffix('.weight')}=q4_k)"
                )
            block = gguf_spec.block_of(tp.name)
            if block is not None and any(t.name.startswith(f"blk.{block}.nextn.") for t in plan.tensors):
                raise QuantkitError(
                    f"{imatrix.source}: no entry for {tp.name!r}, which gets {tp.qtype.name} and needs importance weights: block {block} is a "
                    "multi-token-prediction block, which llama.cpp's main graph never runs; fix: convert with --no-mtp, or choose another type for it"
                )
            short = tp.name.removesuffix(".weight")
            if block is None and not any(n.startswith(short) for n in imatrix.entries):  # outside the blocks: llama-imatrix never records it
                raise QuantkitError(
                    f"{imatrix.source}: no entry for {tp.name!r}, which gets {tp.qtype.name} and needs importance weights; llama-imatrix "
                    f"records no entry for it (it is not a block's matrix); fix: choose another type for it (--tensor-type {short}=q8_0)"
                )
            raise QuantkitError(
                f"{imatrix.source}: no entry for {tp.name!r}, which gets {tp.qtype.name} and needs importance weights; "
                f"fix: collect the imatrix on this model (quantkit imatrix) or choose another type for that tensor"
            )


def imatrix_metadata(imatrix: Imatrix | None) -> dict[str, MetaValue]:
    """The keys llama-quantize adds when it is given an importance matrix (quantize.cpp)."""
    if imatrix is None:
        return {}
    md = {"quantize.imatrix.file": MetaValue(imatrix.source[:127], V.STRING)}
    if imatrix.datasets:
        md["quantize.imatrix.dataset"] = MetaValue(imatrix.datasets[0][:127], V.STRING)
    md["quantize.imatrix.entries_count"] = MetaValue(len(imatrix.entries), V.UINT32)
    if imatrix.chunk_count > 0:
        md["quantize.imatrix.chunks_count"] = MetaValue(imatrix.chunk_count, V.UINT32)
    return md


def _scratch() -> ggml.Scratch:
    if not hasattr(_LOCAL, "scratch"):
        _LOCAL.scratch = ggml.Scratch()
    return _LOCAL.scratch


_UNQUANTISED = (gguf_spec.GGMLQuantizationType.F32, gguf_spec.GGMLQuantizationType.F16, gguf_spec.GGMLQuantizationType.BF16)


class _FiniteCheck:
    """Counts NaN / infinite source values of one output tensor, piece by piece, before each piece is encoded.

    Quantising them is refused, as llama-quantize refuses ("quantized data validation failed"):
    a block's scale becomes NaN and some of llama.cpp's kernels assert on them.  Unquantised
    types keep the values as they are, with a warning once the tensor is written.
    """

    def __init__(self, t: OutTensor, qtype: gguf_spec.GGMLQuantizationType):
        self.t, self.qtype, self.count = t, qtype, 0

    def __call__(self, a: np.ndarray, dtype: str, ref: Any) -> None:
        n = nonfinite(a, dtype)
        if not n:
            return
        self.count += n
        if self.qtype not in _UNQUANTISED:
            raise CheckpointError(
                f"{ref.shard.path}: tensor {ref.name!r} holds NaN or infinite values (at least {n}), which cannot be quantised to {self.qtype.name} "
                f"for {self.t.name} (llama-quantize refuses them too); fix: repair or re-download the checkpoint, or convert with --type f16/bf16/f32 to copy them as they are"
            )

    def report(self) -> None:
        if self.count:
            log.warning("%s: %d of %d values are NaN or infinite in the source (%s); they are copied as they are and llama.cpp will compute NaN wherever they are used",
                        self.t.name, self.count, self.t.n_elements, ", ".join(dict.fromkeys(r.name for r in self.t.sources)))


def _rows(
    a: np.ndarray, dtype: str, qtype: gguf_spec.GGMLQuantizationType, release: Callable[[int, int], None] | None = None,
    imatrix: np.ndarray | None = None, check: Callable[[np.ndarray], None] | None = None,
) -> Iterator[Any]:
    """Encode a matrix in row chunks of about CHUNK_BYTES source bytes (``imatrix``: per-column weights for every row).

    Bounds the transient float copies, and ``release(lo, hi)`` drops each chunk's
    source pages once its piece has been written.  ``check`` sees each chunk before it is encoded.
    """
    if a.ndim == 1:
        if check:
            check(a)
        yield encode(a, dtype, qtype)
        if release:
            release(0, a.nbytes)
        return
    rows = a.shape[0]
    row_bytes = a.nbytes // max(1, rows)
    step = max(1, CHUNK_BYTES // max(1, row_bytes))
    for r in range(0, rows, step):
        if check:
            check(a[r : r + step])
        piece = encode(a[r : r + step], dtype, qtype, imatrix, _scratch(), wait=False)
        drop = (lambda lo=r * row_bytes, hi=min(rows, r + step) * row_bytes: release(lo, hi)) if release else None
        if isinstance(piece, ggml.Pending):  # still quantising (see _in_flight): its pages go when it is done
            yield piece.then(drop) if drop else piece
        else:
            yield piece  # may view the source pages: they go once it has been written
            if drop:
                drop()


def _check_stored(ref: Any, check: Callable[[np.ndarray], None]) -> None:
    """Check the stored bytes of a tensor copied file to file, a chunk at a time, dropping each chunk's pages again."""
    dtype = DTYPES[ref.dtype][0]
    raw = ref.raw()
    step = CHUNK_BYTES // dtype.itemsize * dtype.itemsize
    for lo in range(0, len(raw), step):
        hi = min(len(raw), lo + step)
        check(np.frombuffer(raw[lo:hi], dtype=dtype))
        ref.release(lo, hi)
    del raw


def tensor_pieces(t: OutTensor, tp: TensorPlan, hp: Any, weights: np.ndarray | None = None) -> Iterator[Any]:
    """Bytes of one output tensor, piece by piece, releasing source pages as it goes.

    ``weights``: importance weights (n_expert, cols) for a quantised type; expert
    ``e``'s rows use ``weights[e]``, whether the experts come one source each or
    stacked in one 3-D source.  Source values that are NaN or infinite are refused
    for a quantised type and logged as a warning otherwise (:class:`_FiniteCheck`).
    """
    if t.data is not None:
        yield encode(np.asarray(t.data(), dtype=np.float32), "F32", tp.qtype)
        return
    if tp.qtype == gguf_spec.GGMLQuantizationType.MXFP4 and carried(t) == tp.qtype:
        yield from _carried_pieces(t)
        return
    if isinstance(t.transform, IntegerTable):  # an integer lookup table: its values as I32 (checked in range)
        yield t.transform.apply(t.sources[0].array(), hp)
        return

    def w(e: int) -> np.ndarray | None:
        return None if weights is None else weights[e]

    finite = _FiniteCheck(t, tp.qtype)
    for i, ref in enumerate(t.sources):  # several sources: one per expert
        check = functools.partial(finite, dtype=ref.dtype, ref=ref)
        if t.transform.identity and getattr(ref, "qtype", SAME.get(ref.dtype)) == tp.qtype:
            if tp.qtype in _UNQUANTISED:
                _check_stored(ref, check)
            yield ref.file_slice()  # stored bytes are the output bytes: copy file to file
            continue
        a = ref.array()  # a quantised GGUF source is dequantised to F32, its dtype says "F32"
        if not t.transform.identity and a.ndim == 3:  # a fused [E, rows, cols] source: the transform per expert
            for e in range(a.shape[0]):
                yield from _rows(t.transform.apply(a[e], hp), ref.dtype, tp.qtype, imatrix=w(e), check=check)
            ref.release()
        elif not t.transform.identity:  # one matrix (q/k rows permuted: a copy, the source can go)
            a = t.transform.apply(a, hp)
            ref.release()
            dtype = "F32" if a.dtype == np.float32 else ref.dtype  # a value transform (norm + 1, -exp(A_log)) computes in float32
            yield from _rows(a, dtype, tp.qtype, None, w(i), functools.partial(finite, dtype=dtype, ref=ref))
        elif a.ndim == 3:  # experts stacked in one source [E, rows, cols]
            per = a.nbytes // max(1, a.shape[0])
            for e in range(a.shape[0]):
                yield from _rows(a[e], ref.dtype, tp.qtype, lambda lo, hi, at=e * per: ref.release(at + lo, at + hi), w(e), check)
        else:
            yield from _rows(a, ref.dtype, tp.qtype, ref.release, w(i), check)
        del a
    finite.report()


def _carried_pieces(t: OutTensor) -> Iterator[ggml.Pending]:
    """GGML MXFP4 bytes of ``t`` from the checkpoint's ``_blocks`` / ``_scales`` (:func:`mxfp4_to_ggml`, no value touched), the
    rows its transform picks (whole blocks: the interleaved gate/up split is exact), a few matrices (experts) per piece.

    Each piece is repacked on the pool while the writer writes the one before (:func:`_in_flight` keeps two alive), so the
    repack hides behind the write; its stored pages are dropped once it is made.  The pieces take turns in two buffers
    (a piece is written before the one two after it is started: :func:`_in_flight`), so no fresh pages are faulted in
    and zeroed for every piece."""
    pool = ggml.pool()
    bufs: list[np.ndarray] = []
    k = 0
    for ref in t.sources:
        blocks, scales = ref.stored.array(), ref.scale.array()  # [..., rows, cols/32, 16] / [..., rows, cols/32] uint8 views
        n = int(np.prod(blocks.shape[:-3], dtype=np.int64))
        blocks, scales = blocks.reshape(n, *blocks.shape[-3:]), scales.reshape(n, *scales.shape[-2:])
        per_b, per_s = blocks[0].nbytes, scales[0].nbytes
        rows, nb = t.transform.select(scales[0]).shape  # the rows the transform keeps (a view: nothing read yet)
        step = max(1, CHUNK_BYTES // max(1, per_b))
        for e0 in range(0, n, step):
            e1 = min(n, e0 + step)
            size, slot = (e1 - e0) * rows * nb * 17, k % 2
            if len(bufs) <= slot:
                bufs.append(np.empty(size, dtype=np.uint8))
            elif bufs[slot].size < size:
                bufs[slot] = np.empty(size, dtype=np.uint8)
            out = bufs[slot][:size].reshape(e1 - e0, rows, nb * 17)
            k += 1

            def repack(e0: int = e0, e1: int = e1, out: np.ndarray = out, blocks: np.ndarray = blocks, scales: np.ndarray = scales) -> int:
                for e in range(e0, e1):
                    mxfp4_to_ggml(t.transform.select(blocks[e]), t.transform.select(scales[e]), out=out[e - e0])
                return out.nbytes

            def release(ref: Any = ref, e0: int = e0, e1: int = e1, per_b: int = per_b, per_s: int = per_s) -> None:
                ref.stored.release(e0 * per_b, e1 * per_b)
                ref.scale.release(e0 * per_s, e1 * per_s)

            yield ggml.Pending(lambda: 0, [pool.submit(repack)], out, ()).then(release)
        del blocks, scales


def _weights_for(prep: Prepared, t: OutTensor, tp: TensorPlan) -> np.ndarray | None:
    if prep.imatrix is None or tp.qtype in (gguf_spec.GGMLQuantizationType.F32, gguf_spec.GGMLQuantizationType.F16, gguf_spec.GGMLQuantizationType.BF16):
        return None  # unquantised types ignore importance weights
    from quantkit.policy.imatrix import expert_weights

    return expert_weights(prep.imatrix, t.name, t.shape)


def _in_flight(pieces: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
    """``(tensor index, bytes)`` in order, the next piece's quantisation started before this one is handed out.

    While a piece is written (and the next one read and laid out), the pool already
    quantises the one after: no core waits on the writer between pieces or tensors.
    Two pieces are alive at a time, which ``Scratch.next_out``'s two buffers allow.
    On an error or an early close the piece still running is waited for, so that no
    thread reads a source that is being closed.
    """
    cur = nxt = None
    try:
        cur = next(pieces, None)
        while cur is not None:
            i, p = cur
            if isinstance(p, ggml.Pending):
                nxt = next(pieces, None)  # the next piece starts before this one is waited for
                data, cur = p.result(), None
                yield i, data
            else:
                yield i, p  # a plain piece may view source pages that making the next one releases: written first
                nxt = next(pieces, None)
            cur, nxt = nxt, None
    finally:
        for item in (cur, nxt):
            if item is not None and isinstance(item[1], ggml.Pending):
                with contextlib.suppress(Exception):
                    item[1].result()


def _write(
    tmp: Path | list[Path], prep: Prepared, on_bytes: Callable[[int], None] | None, on_tensor: Callable[[str], None] | None, parts: list[int] | None = None,
) -> None:
    """Stream the tensors into ``tmp``, or into the split set ``tmp[k]`` holding ``parts[k]`` tensors each."""
    writer: Any = StreamingGGUFWriter(tmp, prep.arch, prep.metadata) if parts is None else SplitGGUFWriter(tmp, prep.arch, prep.metadata, parts)
    pairs = list(zip(prep.tensors, prep.plan.tensors))
    stream = _in_flight((i, piece) for i, (t, tp) in enumerate(pairs) for piece in tensor_pieces(t, tp, prep.hparams, _weights_for(prep, t, tp)))
    head: tuple[int, Any] | None = None

    def pieces_of(i: int) -> Iterator[Any]:
        nonlocal head
        while head is not None and head[0] == i:
            yield head[1]
            head = next(stream, None)

    try:
        for tp in prep.plan.tensors:
            writer.declare(tp.name, tp.shape, tp.qtype)
        writer.begin()
        head = next(stream, None)
        for i, (_, tp) in enumerate(pairs):
            if on_tensor is not None:
                on_tensor(tp.name)
            writer.write_tensor(tp.name, pieces_of(i), on_bytes)
    except BaseException:
        stream.close()
        writer.close()
        raise
    writer.finish()


def convert(
    src: str | Path,
    out: str | Path,
    outtype: str = "f16",
    force: bool = False,
    allow_pickle: bool = False,
    overrides: Sequence[Override] = (),
    target: Target | None = None,
    imatrix: Imatrix | None = None,
    allow_requantize: bool = False,
    on_start: Callable[[Plan], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    on_tensor: Callable[[str], None] | None = None,
    split: SplitSpec | None = None,
    command: str | None = None,
    no_mtp: bool = False,
) -> ConvertResult:
    """Convert an HF model directory (or requantise a GGUF file) to a GGUF file at ``out`` (atomically).

    ``imatrix`` weights the quantisation; ``allow_requantize`` lets already-quantised GGUF tensors be quantised again.
    ``split``: write a split set instead, ``NAME-00001-of-0000K.gguf`` ... for ``out`` = ``NAME.gguf``, as
    llama-gguf-split cuts the single file (:func:`_write_split`).  ``command``: recorded as ``quantkit.command``.
    """
    t0 = time.perf_counter()
    out = Path(out)
    src = resolve_source(src)
    check_target(out if split is None else split_path(split_prefix(out), 0, 1), force or split is not None, inputs=(src,))  # parts: checked once counted
    ckpt, prep = prepare(src, outtype, allow_pickle, overrides, target, imatrix, allow_requantize, no_mtp)
    if command is not None:
        prep.metadata[COMMAND_KEY] = MetaValue(command, V.STRING)
    with ckpt:
        plan = prep.plan
        if split is not None:
            parts = _write_split(src, out, prep, split, force, on_start, on_bytes, on_tensor)
        else:
            header_guess = (1 << 20) + sum(len(t.name) + 64 + alignment_of(prep.metadata) for t in plan.tensors)
            check_free_space(out, plan.nbytes + header_guess)
            if on_start is not None:
                on_start(plan)
            log.info("converting %s (%s) -> %s as %s: %d tensors, %.2f GiB", src, prep.model_type, out, outtype, len(plan.tensors), plan.nbytes / 2**30)
            try:
                with atomic_file(out, force=force) as tmp:
                    _write(tmp, prep, on_bytes, on_tensor)
            except OSError as e:
                raise OutputError(f"{out}: writing failed ({e.strerror or e}); nothing was left at the path; fix: free disk space or write elsewhere") from e
            parts = [out]
    return ConvertResult(
        output=str(parts[0]),
        model_type=prep.model_type,
        outtype=plan.outtype,
        n_tensors=len(plan.tensors),
        n_params=plan.n_elements,
        nbytes=sum(p.stat().st_size for p in parts),
        seconds=time.perf_counter() - t0,
        groups=group_totals(plan.tensors),
        types=type_totals(plan),
        parts=[str(p) for p in parts] if split is not None else [],
    )


def _write_split(
    src: Path, out: Path, prep: Prepared, split: SplitSpec, force: bool, on_start: Callable[[Plan], None] | None,
    on_bytes: Callable[[int], None] | None, on_tensor: Callable[[str], None] | None,
) -> list[Path]:
    """Write the split set for ``out``: every part checked (``--force``) and the whole set's free space first, all
    parts written to temporary files and renamed together (``atomic_files``): a failure leaves no part behind."""
    plan = prep.plan
    try:
        counts = split_layout([tp.nbytes for tp in plan.tensors], split, [tp.name for tp in plan.tensors])
    except ValueError as e:
        raise OutputError(f"{out}: {e}") from None
    paths = [split_path(split_prefix(out), no, len(counts)) for no in range(len(counts))]
    for p in paths:
        check_target(p, force, inputs=(src,))
    sizes = split_file_sizes(prep.arch, prep.metadata, [(tp.name, tp.shape, tp.nbytes) for tp in plan.tensors], counts)
    check_free_space(paths[0], sum(sizes))
    if on_start is not None:
        on_start(plan)
    log.info("converting %s (%s) -> %s as %s: %d tensors in %d parts, %.2f GiB", src, prep.model_type, paths[0], plan.outtype, len(plan.tensors), len(paths), plan.nbytes / 2**30)
    try:
        with atomic_files(paths, force=force) as tmps:
            _write(tmps, prep, on_bytes, on_tensor, counts)
    except OSError as e:
        raise OutputError(f"{paths[0]}: writing the split set failed ({e.strerror or e}); no part was left behind; fix: free disk space or write elsewhere") from e
    return paths


def type_totals(plan: Plan) -> dict[str, dict[str, int]]:
    """Tensors, parameters and bytes per GGML type, largest share first."""
    out: dict[str, dict[str, int]] = {}
    for t in plan.tensors:
        g = out.setdefault(t.qtype.name, {"tensors": 0, "params": 0, "bytes": 0})
        g["tensors"] += 1
        g["params"] += t.n_elements
        g["bytes"] += t.nbytes
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["bytes"]))
