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

Collection (:func:`collect_imatrix`) runs the model in llama.cpp through
llama-cpp-python with an eval callback, as llama-imatrix does: the text is
tokenised once (BOS first), cut into chunks of ``n_ctx`` tokens whose first
token is replaced by BOS, each chunk decoded from an empty cache with every
output requested; for every ``MUL_MAT`` whose weight is ``blk.*`` (at least
16 tokens, F32 activations) the callback adds each token's squared input to
the tensor's sums, for every ``MUL_MAT_ID`` (experts) it adds each token's
input only to the experts the router chose for it (``src[2]`` holds the
chosen ids), counting tokens per expert; sums run token after token in
float32, in llama-imatrix's order (on the fixture the file is bit-identical to
llama-imatrix's).  Not reproduced: several chunks per decode (llama-imatrix
packs ``n_batch / n_ctx`` chunks into one batch; run it with ``-b`` equal to
``-c`` for the same batches), its perplexity printout, periodic saves,
``--process-output`` (``output.weight``) and merging of earlier files
(``--in-file``).

``all_experts=True`` sends every calibration token through every expert for
the statistics while the model's outputs stay gated by the router, so rare
experts get data: the input of ``ffn_gate_exps`` and ``ffn_up_exps`` is the
same normed hidden state for every expert, so each expert's gate/up sums are
the sums over all tokens; the input of ``ffn_down_exps`` differs per expert,
so it is computed in numpy, ``silu(W_gate_e x) * (W_up_e x)`` in float32 from
the model's own expert weights (read and dequantised from the GGUF) for every
token and expert, a batch of chunks at a time (each flush dequantises every
expert once: the price is about ``n_expert / n_expert_used`` times the FFN
work of a normal run).  Every expert's count is then the number of tokens.  The
numpy hidden activations differ from llama.cpp's at the rounding level of its
matmuls (which round activations to the weight's dot-product type); only
llama-architecture files (SiLU-gated experts, what quantkit writes) are
supported.

Not for: choosing types (``quantkit.plan``) or running quantisation kernels (``quantkit.ggml``).
"""

from __future__ import annotations

import logging
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import gguf
import numpy as np

from quantkit.errors import GGUFFormatError, OutputError, QuantkitError

log = logging.getLogger(__name__)

KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"
MIN_TOKENS_PER_MATMUL = 16  # llama-imatrix ignores MUL_MAT calls with fewer tokens
FLUSH_BYTES = 1 << 30  # all_experts: hidden states buffered before the experts are dequantised and run on them
_BLOCK = re.compile(r"^blk\.(\d+)\.")
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
        m = _BLOCK.match(name)
        for x, c in enumerate(_lround(e.counts)):
            if c < min_tokens:
                out.append(ExpertCoverage(name, int(m.group(1)) if m else None, x, int(c)))
    return sorted(out, key=lambda c: (-1 if c.layer is None else c.layer, c.tensor, c.expert))


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
    from quantkit.gguf_read import ArraySummary, read_gguf

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
            if s.qtype != gguf.GGMLQuantizationType.F32 or c.qtype != gguf.GGMLQuantizationType.F32:
                raise _fail(path, f"{name!r}: sums and counts must be F32, found {s.qtype.name} and {c.qtype.name}")
            n_expert = c.n_elements
            if n_expert < 1 or s.n_elements % n_expert or s.n_elements == 0 or (len(s.ne) > 1 and s.ne[1] != n_expert):
                raise _fail(path, f"{name!r}: {s.n_elements} sums for {n_expert} counts")
            sums = _read_f32(f, g.data_offset + s.offset, s.n_elements).reshape(n_expert, -1)
            counts = _read_f32(f, g.data_offset + c.offset, n_expert)
            if not (np.isfinite(sums).all() and np.isfinite(counts).all()):
                raise _fail(path, f"{name!r} holds non-finite values (llama-quantize refuses them)")
            entries[name] = Entry(sums, counts)
    return Imatrix(entries, tuple(datasets), int(md[KEY_CHUNK_COUNT]), int(md[KEY_CHUNK_SIZE]), str(path))


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
    from quantkit.output import atomic_file

    path = Path(path)
    if imatrix.legacy:
        raise QuantkitError(f"{imatrix.source}: a legacy .dat importance matrix has no raw sums to write as GGUF; fix: re-collect it with quantkit imatrix")
    try:
        with atomic_file(path, force=force) as tmp:
            w = gguf.GGUFWriter(tmp, arch="")
            w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes no architecture
            w.add_type("imatrix")
            datasets = list(imatrix.datasets) or ["unknown"]  # gguf-py writes no empty arrays
            w.add_key_value(KEY_DATASETS, datasets, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
            w.add_uint32(KEY_CHUNK_COUNT, imatrix.chunk_count)
            w.add_uint32(KEY_CHUNK_SIZE, imatrix.chunk_size)
            for name in sorted(imatrix.entries):
                e = imatrix.entries[name]
                sums = np.ascontiguousarray(e.in_sum2, dtype=np.float32)
                counts = np.ascontiguousarray(e.counts, dtype=np.float32)
                if e.n_expert == 1:  # ggml_n_dims drops trailing 1s: [n_cols] and [1]
                    w.add_tensor(name + SUM_SUFFIX, sums.reshape(-1))
                    w.add_tensor(name + COUNT_SUFFIX, counts.reshape(1))
                else:
                    w.add_tensor(name + SUM_SUFFIX, sums)
                    w.add_tensor(name + COUNT_SUFFIX, counts.reshape(-1, 1))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
    except OSError as e:
        raise OutputError(f"{path}: writing failed ({e.strerror or e}); nothing was left at the path; fix: free disk space or write elsewhere") from e
    return path


# --------------------------------------------------------------------------- collection


def _weight_name(name: bytes) -> str:
    """llama-imatrix's filter_tensor_name: ``CUDA0#blk.0.attn_k.weight#0`` -> ``blk.0.attn_k.weight``."""
    s = name.decode("utf-8", "replace")
    if "#" in s:
        s = s.split("#")[1]
    return s


def _accumulate(acc: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``acc[j] += x[i, j] * x[i, j]`` token after token in float32, as llama-imatrix's loop adds them."""
    if x.shape[0] == 0:
        return acc
    sq = np.square(x, dtype=np.float32)
    sq[0] += acc
    return np.cumsum(sq, axis=0, dtype=np.float32)[-1]


class _ExpertWeights:
    """Expert matrices of a GGUF, dequantised to float32 on demand (for ``all_experts``)."""

    def __init__(self, path: Path) -> None:
        from quantkit.gguf_read import read_gguf

        self.file = read_gguf(path)
        self.infos = {t.name: t for t in self.file.tensors}
        self.mm = np.memmap(path, dtype=np.uint8, mode="r")
        arch = self.file.metadata.get("general.architecture")
        if arch != "llama":
            raise QuantkitError(f"{path}: all_experts supports llama-architecture files (SiLU-gated experts, what quantkit writes), this one is {arch!r}; fix: collect without --all-experts")

    def matrix(self, name: str, expert: int) -> np.ndarray:
        """Expert ``expert`` of a stacked tensor as float32 (rows, cols)."""
        from quantkit.encode import to_f32

        t = self.infos[name]
        n_cols, n_rows = t.ne[0], t.ne[1]
        per = t.nbytes // t.ne[2]
        start = self.file.data_offset + t.offset + expert * per
        raw = self.mm[start : start + per]
        Q = gguf.GGMLQuantizationType
        if t.qtype == Q.F32:
            return np.array(raw.view(np.float32)).reshape(n_rows, n_cols)
        if t.qtype in (Q.F16, Q.BF16):
            u = np.array(raw.view(np.uint16 if t.qtype == Q.BF16 else np.float16))
            return to_f32(u, t.qtype.name).reshape(n_rows, n_cols)
        return gguf.quants.dequantize(np.array(raw), t.qtype).astype(np.float32).reshape(n_rows, n_cols)


@dataclass
class _Collector:
    """llama-imatrix's ``collect_imatrix`` eval callback, in Python."""

    all_experts: bool = False
    experts: _ExpertWeights | None = None
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n_mat, n_cols) float32
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n_mat,) int64
    pending: dict[int, list[np.ndarray]] = field(default_factory=dict)  # layer -> inputs of ffn_gate_exps (all_experts)
    pending_bytes: int = 0
    error: BaseException | None = None
    checked: bool = False

    def __call__(self, t: int, ask: bool) -> bool:
        try:
            return self._on_tensor(t, ask)
        except BaseException as e:  # noqa: BLE001  (nothing may escape a C callback: re-raised after the decode)
            if self.error is None:
                self.error = e
            return False

    def _on_tensor(self, t: int, ask: bool) -> bool:
        from quantkit.evals.session import GGMLTensor, _ggml_fns, check_tensor_layout

        so = _ggml_fns()
        op = so.ggml_op_desc(t)
        if op not in (b"MUL_MAT", b"MUL_MAT_ID"):
            return False
        if not self.checked:
            check_tensor_layout(t)
            self.checked = True
        node = GGMLTensor.from_address(t)
        src0, src1 = GGMLTensor.from_address(node.src[0]), GGMLTensor.from_address(node.src[1])
        wname = _weight_name(src0.name)
        if ask:
            if op == b"MUL_MAT_ID":
                return not (self.all_experts and wname.endswith("ffn_down_exps.weight"))
            return src1.ne[1] >= MIN_TOKENS_PER_MATMUL and src1.type == 0 and wname.startswith("blk.")
        if op == b"MUL_MAT_ID":
            self._mul_mat_id(wname, node, src0)
        else:
            self._mul_mat(wname, node, src0)
        return True

    def _entry(self, name: str, n_mat: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.sums:
            self.sums[name] = np.zeros((n_mat, n_cols), dtype=np.float32)
            self.counts[name] = np.zeros(n_mat, dtype=np.int64)
        sums, counts = self.sums[name], self.counts[name]
        if sums.shape != (n_mat, n_cols):
            raise QuantkitError(f"{name}: inconsistent activation size ({n_mat} x {n_cols}, earlier {sums.shape[0]} x {sums.shape[1]})")
        return sums, counts

    def _mul_mat(self, name: str, node: Any, src0: Any) -> None:
        from quantkit.evals.session import tensor_array

        x = tensor_array(node.src[1])  # (ne3, ne2, ne1 tokens, ne0 cols)
        n2, n3 = max(1, src0.ne[2]), max(1, src0.ne[3])
        sums, counts = self._entry(name, n2 * n3, x.shape[-1])
        for i3 in range(x.shape[0]):
            for i2 in range(x.shape[1]):
                mat = (i3 % n3) * n2 + (i2 % n2)
                sums[mat] = _accumulate(sums[mat], x[i3, i2])
        self._check_finite(name, sums)
        counts += x.shape[0] * x.shape[1] * x.shape[2] // (n2 * n3)

    def _mul_mat_id(self, name: str, node: Any, src0: Any) -> None:
        from quantkit.evals.session import GGMLTensor, tensor_array

        x = tensor_array(node.src[1])  # (1, n_tokens, ne11, n_cols): ne11 = 1 when every chosen expert gets the same input
        ids = tensor_array(node.src[2])  # (1, 1, n_tokens, n_used) int32
        if x.dtype != np.float32 or x.shape[0] != 1 or ids.shape[2] != x.shape[1]:
            raise QuantkitError(f"{name}: unexpected MUL_MAT_ID operands {x.shape} {x.dtype} / ids {ids.shape}")
        n_as = GGMLTensor.from_address(node.src[0]).ne[2]
        x, ids = x[0], ids[0, 0]
        n_tokens, ne11, n_cols = x.shape
        sums, counts = self._entry(name, n_as, n_cols)
        if self.all_experts and _EXPERT_NAME.match(name):
            xs = x[:, 0, :]
            total = _accumulate(np.zeros(n_cols, dtype=np.float32), xs)
            sums += total
            counts += n_tokens
            m = _EXPERT_NAME.match(name)
            if m.group(2) == "gate":
                self._queue(int(m.group(1)), np.array(xs))
            return
        # llama-imatrix's loop: for idx in chosen slots, for row in tokens: acc[ids[row, idx]] += x[row, idx % ne11]^2
        order_ex = ids.T.reshape(-1)  # idx-major, as the C loop visits them
        order_row = np.tile(np.arange(n_tokens), ids.shape[1])
        order_col = np.repeat(np.arange(ids.shape[1]) % ne11, n_tokens)
        if order_ex.size and (order_ex.min() < 0 or order_ex.max() >= n_as):
            raise QuantkitError(f"{name}: expert id out of range 0..{n_as - 1}")
        for e in np.unique(order_ex):
            sel = order_ex == e
            sums[e] = _accumulate(sums[e], x[order_row[sel], order_col[sel]])
            counts[e] += int(sel.sum())
        self._check_finite(name, sums)

    @staticmethod
    def _check_finite(name: str, sums: np.ndarray) -> None:
        if not np.isfinite(sums).all():
            raise QuantkitError(f"{name}: non-finite activations (llama-imatrix stops here too); fix: check the model with quantkit eval ppl")

    # all_experts: every token through every expert's gate/up, in numpy, to get ffn_down's inputs

    def _queue(self, layer: int, x: np.ndarray) -> None:
        self.pending.setdefault(layer, []).append(x)
        self.pending_bytes += x.nbytes
        if self.pending_bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        assert self.experts is not None
        for layer, xs in sorted(self.pending.items()):
            x = np.concatenate(xs)
            gate, up, down = (f"blk.{layer}.ffn_{k}_exps.weight" for k in ("gate", "up", "down"))
            n_expert = self.experts.infos[gate].ne[2]
            n_ff = self.experts.infos[down].ne[0]
            sums, counts = self._entry(down, n_expert, n_ff)
            for e in range(n_expert):
                g = x @ self.experts.matrix(gate, e).T
                u = x @ self.experts.matrix(up, e).T
                h = (g / (1.0 + np.exp(-g))) * u  # silu(gate) * up
                sums[e] = _accumulate(sums[e], h)
            counts += x.shape[0]
            self._check_finite(down, sums)
        self.pending.clear()
        self.pending_bytes = 0

    def result(self, chunk_size: int, datasets: tuple[str, ...], source: str) -> Imatrix:
        entries = {n: Entry(self.sums[n].copy(), self.counts[n].astype(np.float32)) for n in sorted(self.sums)}
        top = max((int(c.max()) for c in self.counts.values() if c.size), default=0)
        return Imatrix(entries, datasets, top // max(1, chunk_size), chunk_size, source)


@dataclass(frozen=True)
class Progress:
    """Reported after every chunk."""

    chunk: int  # chunks done
    n_chunks: int
    tokens: int  # tokens evaluated so far
    seconds: float


def check_args(n_ctx: Any, n_chunks: Any, threads: Any, text: Any, dataset: str = "") -> None:
    """Collection arguments on their own, before anything is converted or loaded: ``--ctx`` >= 16 (llama-imatrix
    ignores smaller batches), ``--chunks`` >= 1, ``--threads`` 1..512, a non-empty text."""
    from quantkit.evals.perplexity import check_chunks, check_ctx_value, check_text, check_threads

    if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and n_ctx < MIN_TOKENS_PER_MATMUL:
        raise QuantkitError(f"--ctx {n_ctx}: llama-imatrix ignores batches under {MIN_TOKENS_PER_MATMUL} tokens; fix: use --ctx 512 or at least {MIN_TOKENS_PER_MATMUL}")
    check_ctx_value(n_ctx, MIN_TOKENS_PER_MATMUL, even=False)
    check_chunks(n_chunks)
    check_threads(threads)
    check_text(text, dataset or "text")


def collect_imatrix(
    gguf_path: str | Path,
    text: str,
    n_ctx: int = 512,
    n_chunks: int | None = None,
    all_experts: bool = False,
    threads: int | None = None,
    on_chunk: Callable[[Progress], None] | None = None,
    dataset: str = "",
    gpu_layers: int | None = None,
) -> Imatrix:
    """Collect an importance matrix for ``gguf_path`` on ``text``, as llama-imatrix does (see the module docstring).

    ``dataset`` is recorded in ``imatrix.datasets`` (llama-imatrix records the
    ``-f`` path).  Needs at least ``2 * n_ctx`` tokens; ``n_chunks`` limits the
    chunks evaluated (default: all whole chunks of the text).
    """
    from quantkit.evals.perplexity import check_ctx, model_limits
    from quantkit.evals.session import EvalSession

    gguf_path = Path(gguf_path)
    check_args(n_ctx, n_chunks, threads, text, dataset)
    check_ctx(n_ctx, model_limits(gguf_path), minimum=MIN_TOKENS_PER_MATMUL, even=False)  # every position's logits
    experts = _ExpertWeights(gguf_path) if all_experts else None
    collector = _Collector(all_experts=all_experts, experts=experts)
    session = EvalSession(gguf_path, n_ctx, threads=threads, gpu_layers=gpu_layers, on_tensor=collector)
    try:
        tokens = session.tokenize(text)
        if len(tokens) < 2 * n_ctx:
            raise QuantkitError(
                f"{dataset or 'text'}: {len(tokens)} tokens, llama-imatrix needs at least {2 * n_ctx} (2 x --ctx {n_ctx}); fix: give more text or a smaller --ctx"
            )
        total = len(tokens) // n_ctx if n_chunks is None else min(n_chunks, len(tokens) // n_ctx)
        bos = session.bos
        t0 = time.perf_counter()
        for i in range(total):
            chunk = tokens[i * n_ctx : (i + 1) * n_ctx]
            if bos is not None:
                chunk[0] = bos
            session.eval_chunk(chunk)
            if collector.error is not None:
                raise collector.error
            if on_chunk is not None:
                on_chunk(Progress(i + 1, total, (i + 1) * n_ctx, time.perf_counter() - t0))
        if experts is not None:
            collector.flush()
        if not collector.sums:
            raise QuantkitError(f"{gguf_path}: llama.cpp ran no matrix multiplication with a blk.* weight; fix: pass a transformer model GGUF")
    finally:
        session.close()
    return collector.result(n_ctx, (dataset,) if dataset else (), str(gguf_path))


def collect_from_source(
    src: str | Path,
    text: str,
    workdir: str | Path | None = None,
    on_convert: Callable[[], None] | None = None,
    **kwargs: Any,
) -> Imatrix:
    """:func:`collect_imatrix` on a GGUF file, or on a Hugging Face directory converted to a temporary BF16 GGUF first.

    The temporary file lives in ``workdir`` (default: the system temp dir) and is removed afterwards.
    """
    import tempfile

    from quantkit.evals.perplexity import check_ctx, model_limits

    src = Path(src)
    if not src.is_dir():
        return collect_imatrix(src, text, **kwargs)
    n_ctx = kwargs.get("n_ctx", 512)
    check_args(n_ctx, kwargs.get("n_chunks"), kwargs.get("threads"), text, kwargs.get("dataset", ""))
    check_ctx(n_ctx, model_limits(src), minimum=MIN_TOKENS_PER_MATMUL, even=False)  # before the conversion, not after it
    from quantkit.convert import convert

    with tempfile.TemporaryDirectory(prefix="quantkit-imatrix-", dir=workdir) as tmp:
        if on_convert is not None:
            on_convert()
        gguf_path = Path(tmp) / "model-bf16.gguf"
        convert(src, gguf_path, "bf16")
        im = collect_imatrix(gguf_path, text, **kwargs)
    import dataclasses

    return dataclasses.replace(im, source=str(src))  # not the temporary file, which is gone


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
