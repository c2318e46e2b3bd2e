"""Importance matrices, as llama.cpp's ``llama-imatrix`` writes them and ``llama-quantize`` reads them.

An importance matrix holds, for every weight matrix the model multiplies
activations with, the sum over calibration tokens of each input column's
squared activation (``in_sum2``) and how many tokens that sum covers
(``counts``); stacked expert tensors have one row of each per expert.  The
quantisation kernels weight each column's rounding error by
``in_sum2 / counts`` (:meth:`Imatrix.weights`).

File format (``tools/imatrix/imatrix.cpp`` ``save_imatrix`` and
``common/imatrix-loader.cpp`` of llama-cpp-python 0.3.36's llama.cpp): a GGUF
file with ``general.type = "imatrix"``, ``imatrix.datasets`` (array of
strings), ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32), and per
weight tensor ``<name>.in_sum2`` (F32, ggml shape ``[n_cols, n_expert]``,
``[n_cols]`` for one matrix) and ``<name>.counts`` (F32, ``[1, n_expert]``,
``[1]``), sorted by name.  :func:`write_imatrix` writes the same bytes
llama-imatrix writes.  The legacy ``.dat`` format (already divided by the
counts, one call count per tensor) is read too, never written.

``llama-quantize`` turns an entry into weights per expert: ``in_sum2 /
counts`` with the counts rounded to integers; an expert that saw no token
gets weight 1 for every column (plain, unweighted rounding); legacy entries
are divided by their call count.  A tensor without an entry is quantised
without weights (types that need them are refused), and an entry whose size
differs from its tensor's is an error (:func:`check_matches`).

Collection (running a model over calibration text) lives in ``quantkit.pipeline.imatrix_collect``.

Not for: choosing types (``quantkit.policy.plan``) or running quantisation kernels (``quantkit.format.ggml``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from quantkit.format import gguf_spec
from quantkit.errors import GGUFFormatError, OutputError, QuantkitError

log = logging.getLogger(__name__)

KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"
_EXPERT_NAME = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")


# --------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class Entry:
    """One weight tensor's statistics: ``in_sum2`` (n_expert, n_cols) and ``counts`` (n_expert,), float32."""

    in_sum2: np.ndarray
    counts: np.ndarray

    @property
    def n_expert(self) -> int:
        return int(self.in_sum2.shape[0])

    @property
    def n_cols(self) -> int:
        return int(self.in_sum2.shape[1])


@dataclass(frozen=True)
class Imatrix:
    """An importance matrix: entries by GGUF weight name plus llama-imatrix's metadata.

    ``legacy`` marks one read from a ``.dat`` file: its sums are already divided
    by the counts and multiplied by ``counts[0]`` (the call count), and each
    entry is one flat row (n_expert * n_cols values), since the format does not
    record the expert count.
    """

    entries: Mapping[str, Entry]
    datasets: tuple[str, ...] = ()
    chunk_count: int = 0
    chunk_size: int = 0
    source: str = "imatrix"  # the file it came from, for messages
    legacy: bool = False
    left_out: frozenset[str] = frozenset()  # entries the file holds that --imatrix-include / --imatrix-exclude took out

    def weights(self, name: str) -> np.ndarray | None:
        """What llama-quantize passes to ``ggml_quantize_chunk`` for ``name``: (n_expert, n_cols) float32, or None.

        ``quantize.cpp`` ``load_imatrix``: counts are rounded to integers; an
        expert with count 0 gets 1.0 for every column; legacy entries are
        divided by their call count (kept as they are when it is 0).
        """
        e = self.entries.get(name)
        if e is None:
            return None
        sums = np.asarray(e.in_sum2, dtype=np.float32)
        if self.legacy:
            ncall = np.float32(_lround(e.counts[:1])[0])
            return (sums / ncall).astype(np.float32) if ncall > 0 else sums.copy()
        counts = _lround(e.counts).astype(np.float32)  # std::lround to int64, then (float)
        out = np.ones_like(sums)
        seen = counts > 0
        out[seen] = sums[seen] / counts[seen, None]
        return out

    @property
    def n_tokens(self) -> int:
        """Tokens the statistics were collected on (largest count; chunks x chunk size for a dense layer)."""
        return int(max((float(e.counts.max()) for e in self.entries.values() if e.counts.size), default=0))


def _lround(x: np.ndarray) -> np.ndarray:
    """``std::lround``: halves away from zero (numpy rounds them to even)."""
    x = np.asarray(x, dtype=np.float64)
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


@dataclass(frozen=True)
class ExpertCoverage:
    """An expert that saw fewer calibration tokens than asked for."""

    tensor: str
    layer: int | None
    expert: int
    tokens: int

    def to_json(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "layer": self.layer, "expert": self.expert, "tokens": self.tokens}


def coverage(imatrix: Imatrix, min_tokens: int) -> list[ExpertCoverage]:
    """Experts (of stacked expert tensors) with fewer than ``min_tokens`` calibration tokens, by layer, tensor, expert."""
    out = []
    if imatrix.legacy:
        return out  # the .dat format keeps no per-expert counts
    for name, e in imatrix.entries.items():
        if e.n_expert < 2:
            continue
        block = gguf_spec.block_of(name)
        for x, c in enumerate(_lround(e.counts)):
            if c < min_tokens:
                out.append(ExpertCoverage(name, block, x, int(c)))
    return sorted(out, key=lambda c: (-1 if c.layer is None else c.layer, c.tensor, c.expert))


# --------------------------------------------------------------------------- choosing entries


def select_entries(imatrix: Imatrix, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Imatrix:
    """llama-quantize's ``--include-weights`` / ``--exclude-weights``: keep only the entries whose name contains one of
    ``include``, or drop those that contain one of ``exclude`` (substrings, as ``prepare_imatrix`` matches them; not both).
    Tensors left without an entry are quantised without importance weights (types that need them are refused)."""
    if include and exclude:
        raise QuantkitError("--imatrix-include and --imatrix-exclude cannot be used together (as llama-quantize's --include-weights and "
                            "--exclude-weights); fix: pass one of them")
    if not include and not exclude:
        return imatrix
    keep = {n: e for n, e in imatrix.entries.items() if (any(s in n for s in include) if include else not any(s in n for s in exclude))}
    unused = [s for s in (include or exclude) if not any(s in n for n in imatrix.entries)]
    if unused:
        log.warning("%s: %s %r matches no entry (%d entries)", imatrix.source, "--imatrix-include" if include else "--imatrix-exclude",
                    unused[0], len(imatrix.entries))
    log.info("%s: %d of %d entries kept", imatrix.source, len(keep), len(imatrix.entries))
    return dataclasses.replace(imatrix, entries=keep, left_out=imatrix.left_out | (imatrix.entries.keys() - keep.keys()))


# --------------------------------------------------------------------------- checking against a model


def check_matches(imatrix: Imatrix, shapes: Mapping[str, Sequence[int]], where: str) -> list[str]:
    """Refuse an importance matrix made for another model; return (and log) the matrices it has no entry for.

    ``shapes`` are the model's tensors in numpy order ((n_expert, rows, cols) for
    stacked experts).  An entry naming a tensor the model lacks, or whose size
    or row length differs from the tensor's, is a QuantkitError (llama-quantize
    throws on a size mismatch, except for ``token_embd``, which it skips: so do
    we, with a warning).  Weight matrices without an entry only warn, as in
    llama.cpp: they are quantised without importance weights.
    """
    hint = f"fix: collect one for this model (quantkit imatrix {where} --text FILE -o imatrix.gguf)"
    unknown = [n for n in imatrix.entries if n not in shapes]
    if unknown:
        known = sum(n in shapes for n in imatrix.entries)
        raise QuantkitError(
            f"{imatrix.source}: entry {unknown[0]!r} names no tensor of {where} ({len(unknown)} of {len(imatrix.entries)} entries do not, {known} do): "
            f"it was made for another model; {hint}"
        )
    for name, e in imatrix.entries.items():
        shape = tuple(shapes[name])
        n_cols, n_expert = shape[-1], (shape[0] if len(shape) > 2 else 1)
        ok = e.in_sum2.size == n_cols * n_expert and (imatrix.legacy or e.n_cols == n_cols)
        if ok:
            continue
        got = f"{e.in_sum2.size} values" if imatrix.legacy else f"{e.n_expert} x {e.n_cols} (experts x columns)"
        msg = f"{imatrix.source}: entry {name!r} has {got}, the tensor in {where} needs {n_expert} x {n_cols}"
        if name == "token_embd.weight":
            log.warning("%s; ignored, as llama-quantize does", msg)
            continue
        if len(shape) == 2 and e.n_expert == 1 and e.n_cols > n_cols and e.n_cols % n_cols == 0:  # deepseek4's attn_output_a
            short = name.removesuffix(".weight").split(".", 2)[-1] if gguf_spec.block_of(name) is not None else name.removesuffix(".weight")
            raise QuantkitError(
                f"{msg}: llama.cpp's graph multiplies this tensor as {e.n_cols // n_cols} matrices (e.g. deepseek4's attn_output_a, one per "
                f"output group) and llama-imatrix records their columns in one row, an entry llama-quantize refuses too; fix: leave those "
                f"entries out (--imatrix-exclude {short}, as llama-quantize --exclude-weights), or collect a matrix for this model if it "
                "was made for another")
        raise QuantkitError(f"{msg}: it was made for another model; {hint}")
    missing = [n for n, s in shapes.items() if len(s) >= 2 and n not in imatrix.entries and n != "token_embd.weight"]
    if missing:
        log.warning(
            "%s: no entry for %d weight matrices of %s (e.g. %s); they are quantised without importance weights",
            imatrix.source, len(missing), where, missing[0],
        )
    return missing


# --------------------------------------------------------------------------- reading


def _fail(path: Path, what: str) -> QuantkitError:
    return QuantkitError(f"{path}: {what}; fix: pass an importance matrix written by llama-imatrix or quantkit imatrix")


def read_imatrix(path: str | Path) -> Imatrix:
    """Read an imatrix GGUF (or legacy ``.dat``) file with every size checked; one-line QuantkitError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise QuantkitError(f"{path}: no such file; fix: check the --imatrix path")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_gguf(path)
    return _read_legacy(path)


def _read_gguf(path: Path) -> Imatrix:
    from quantkit.format.gguf_read import ArraySummary, read_gguf

    try:
        g = read_gguf(path)
    except GGUFFormatError as e:
        raise _fail(path, f"unreadable GGUF ({str(e).split(': ', 1)[-1].split('; fix')[0]})") from None
    md = g.metadata
    kind = md.get(KEY_TYPE)
    if kind not in (None, "imatrix"):
        raise _fail(path, f"a GGUF {kind!r} file (general.type), not an importance matrix")
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in md]
    if missing:
        raise _fail(path, f"no {missing[0]} metadata: not an importance matrix (llama-quantize refuses it too)")
    datasets = md[KEY_DATASETS]
    if isinstance(datasets, ArraySummary):
        datasets = datasets.head
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        raise _fail(path, f"{KEY_DATASETS} is not an array of strings")
    for k in (KEY_CHUNK_COUNT, KEY_CHUNK_SIZE):
        if not isinstance(md[k], int) or md[k] < 0:
            raise _fail(path, f"{k} = {md[k]!r}, expected an unsigned integer")
    infos = {t.name: t for t in g.tensors}
    names = sorted({n[: -len(s)] for n in infos for s in (SUM_SUFFIX, COUNT_SUFFIX) if n.endswith(s)})
    if not names:
        raise _fail(path, f"no {SUM_SUFFIX} / {COUNT_SUFFIX} tensors")
    entries: dict[str, Entry] = {}
    with open(path, "rb") as f:
        for name in names:
            s, c = infos.get(name + SUM_SUFFIX), infos.get(name + COUNT_SUFFIX)
            if s is None or c is None:
                raise _fail(path, f"{name!r} has {'no' if s is None else 'a'} {SUM_SUFFIX} but {'no' if c is None else 'a'} {COUNT_SUFFIX} tensor")
            if s.qtype != gguf_spec.GGMLQuantizationType.F32 or c.qtype != gguf_spec.GGMLQuantizationType.F32:
                raise _fail(path, f"{name!r}: sums and counts must be F32, found {s.qtype.name} and {c.qtype.name}")
            n_expert = c.n_elements
            if n_expert < 1 or s.n_elements % n_expert or s.n_elements == 0 or (len(s.ne) > 1 and s.ne[1] != n_expert):
                raise _fail(path, f"{name!r}: {s.n_elements} sums for {n_expert} counts")
            sums = _read_f32(f, g.data_offset + s.offset, s.n_elements).reshape(n_expert, -1)
            counts = _read_f32(f, g.data_offset + c.offset, n_expert)
            if not (np.isfinite(sums).all() and np.isfinite(counts).all()):
                raise _fail(path, f"{name!r} holds non-finite values (llama-quantize refuses them)")
            _check_signs(path, name, sums, counts)
            entries[name] = Entry(sums, counts)
    return Imatrix(entries, tuple(datasets), int(md[KEY_CHUNK_COUNT]), int(md[KEY_CHUNK_SIZE]), str(path))


def _check_signs(path: Path, name: str, sums: np.ndarray, counts: np.ndarray, legacy: bool = False) -> None:
    """Sums of squares and token counts are never negative: a file holding one is corrupt (or not an importance matrix).

    llama-quantize would hand a negative weight to the kernels (or divide by a negative count) without a word.
    """
    parts = ((f"{name!r} values", sums, "mean squares"), (f"{name!r} call count", counts, "a count")) if legacy else (
        (repr(name + SUM_SUFFIX), sums, "sums of squares"), (repr(name + COUNT_SUFFIX), counts, "token counts"))
    for what, a, meaning in parts:
        neg = np.flatnonzero(a < 0)
        if neg.size:
            raise _fail(path, f"{what} holds {neg.size} negative value(s) (e.g. {float(a.flat[neg[0]])!r} at index {int(neg[0])}), impossible for {meaning}")


def _read_f32(f: Any, offset: int, n: int) -> np.ndarray:
    f.seek(offset)
    return np.frombuffer(f.read(4 * n), dtype="<f4").astype(np.float32)


def _read_legacy(path: Path) -> Imatrix:
    """llama.cpp's ``.dat`` format: int32 count, then (name, ncall, nval, floats) per entry, then an optional trailer."""
    data = path.read_bytes()
    pos = 0

    def bad(what: str) -> QuantkitError:
        return _fail(path, f"neither a GGUF importance matrix nor a legacy .dat one ({what} at byte {pos})")

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise bad(f"truncated: {what} needs {n} bytes")
        b = data[pos : pos + n]
        pos += n
        return b

    def i32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    n_entries = i32("the entry count")
    if not 1 <= n_entries <= len(data) // 16:
        raise bad(f"{n_entries} entries declared")
    entries: dict[str, Entry] = {}
    for i in range(n_entries):
        length = i32(f"entry {i} name length")
        if not 0 < length <= 4096:
            raise bad(f"entry {i} name of {length} bytes")
        try:
            name = take(length, f"entry {i} name").decode("utf-8")
        except UnicodeDecodeError:
            raise bad(f"entry {i} name is not text") from None
        ncall = i32(f"{name!r} call count")
        nval = i32(f"{name!r} value count")
        if nval < 1:
            raise bad(f"{name!r} has {nval} values")
        sums = np.frombuffer(take(4 * nval, f"{name!r} values"), dtype="<f4").astype(np.float32)
        if not np.isfinite(sums).all():
            raise _fail(path, f"{name!r} holds non-finite values (llama-quantize refuses them)")
        _check_signs(path, name, sums, np.array([ncall], dtype=np.float32), legacy=True)
        entries[name] = Entry(sums.reshape(1, -1), np.array([ncall], dtype=np.float32))
    chunk_count, datasets = 0, ()
    if pos < len(data):  # optional trailer: chunk count, dataset name
        chunk_count = i32("the chunk count")
        if pos < len(data):
            length = i32("the dataset name length")
            if length > 0:
                datasets = (take(length, "the dataset name").decode("utf-8", "replace"),)
    if pos != len(data):
        raise bad(f"{len(data) - pos} stray bytes")
    return Imatrix(entries, datasets, chunk_count, 0, str(path), legacy=True)


# --------------------------------------------------------------------------- writing


def write_imatrix(imatrix: Imatrix, path: str | Path, force: bool = False) -> Path:
    """Write ``imatrix`` as llama-imatrix does (same keys, tensor names, shapes and order), atomically."""
    from quantkit.format.gguf_write import MetaValue, StreamingGGUFWriter
    from quantkit.format.output import atomic_file

    path = Path(path)
    if imatrix.legacy:
        raise QuantkitError(f"{imatrix.source}: a legacy .dat importance matrix has no raw sums to write as GGUF; fix: re-collect it with quantkit imatrix")
    try:
        with atomic_file(path, force=force) as tmp:
            VT = gguf_spec.GGUFValueType
            datasets = list(imatrix.datasets) or ["unknown"]  # as gguf-py, which writes no empty arrays
            metadata = {KEY_TYPE: MetaValue("imatrix", VT.STRING), KEY_DATASETS: MetaValue(datasets, VT.ARRAY, VT.STRING),
                        KEY_CHUNK_COUNT: MetaValue(imatrix.chunk_count, VT.UINT32), KEY_CHUNK_SIZE: MetaValue(imatrix.chunk_size, VT.UINT32)}
            arrays: list[tuple[str, np.ndarray]] = []
            for name in sorted(imatrix.entries):
                e = imatrix.entries[name]
                sums = np.ascontiguousarray(e.in_sum2, dtype=np.float32)
                counts = np.ascontiguousarray(e.counts, dtype=np.float32)
                if e.n_expert == 1:  # ggml_n_dims drops trailing 1s: [n_cols] and [1]
                    arrays += [(name + SUM_SUFFIX, sums.reshape(-1)), (name + COUNT_SUFFIX, counts.reshape(1))]
                else:
                    arrays += [(name + SUM_SUFFIX, sums), (name + COUNT_SUFFIX, counts.reshape(-1, 1))]
            w = StreamingGGUFWriter(Path(tmp), None, metadata)  # no general.architecture, as llama-imatrix
            for name, a in arrays:
                w.declare(name, a.shape, gguf_spec.GGMLQuantizationType.F32)
            w.begin()
            try:
                for name, a in arrays:
                    w.write_tensor(name, [a])
                w.finish()
            finally:
                w.close()
    except OSError as e:
        raise OutputError(f"{path}: writing failed ({e.strerror or e}); nothing was left at the path; fix: free disk space or write elsewhere") from e
    return path


def expert_weights(imatrix: Imatrix | None, name: str, shape: Sequence[int]) -> np.ndarray | None:
    """:meth:`Imatrix.weights` as (n_expert, n_cols) for a tensor of numpy ``shape``, or None (no imatrix, no entry)."""
    if imatrix is None:
        return None
    w = imatrix.weights(name)
    n_expert = shape[0] if len(shape) > 2 else 1
    if w is None or w.size != n_expert * shape[-1]:
        return None  # no entry, or token_embd's mismatch that check_matches let through (llama-quantize skips it)
    return w.reshape(n_expert, shape[-1])


def summary(imatrix: Imatrix, min_tokens: int) -> dict[str, Any]:
    """A JSON-ready report: size, chunks, tokens, and the experts under ``min_tokens`` (:func:`coverage`)."""
    below = coverage(imatrix, min_tokens)
    return {
        "entries": len(imatrix.entries),
        "chunks": imatrix.chunk_count,
        "chunk_size": imatrix.chunk_size,
        "tokens": imatrix.n_tokens,
        "datasets": list(imatrix.datasets),
        "coverage": {
            "min_tokens": min_tokens,
            "expert_matrices": sum(e.n_expert for e in imatrix.entries.values() if e.n_expert > 1),
            "below": [c.to_json() for c in below],
        },
    }
