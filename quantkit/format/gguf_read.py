"""A GGUF reader that is safe on hostile files.

Every length is checked against the bytes that remain before anything is read
or allocated: string and array sizes, tensor counts, dimensions, types,
offsets and alignment.  Large arrays are summarised (count + first items), so
inspecting a file never needs memory proportional to its metadata.  A file
that is not GGUF, is truncated, or declares absurd sizes raises
:class:`GGUFFormatError` with a one-line reason.

The container rules are llama.cpp's own (``ggml/src/gguf.cpp``), so that a file
read here is one llama.cpp opens: no empty or duplicate keys, no array of arrays, no duplicate
tensor names (refused as soon as the second one is read), ``general.alignment``
a UINT32 power of two, tensor names shorter than 64 bytes, and tensor data laid
out back to back in table order, each tensor padded to the alignment (so no two
tensors overlap).

A split set (``NAME-00001-of-0000K.gguf`` ..., as ``llama-gguf-split`` writes it) is
read from its first part as one model, the way llama.cpp's loader reads it: every
part present, numbered and counted consistently, tensors never in two parts.

Not for: loading tensor data for inference (llama.cpp does that).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from quantkit.format import gguf_spec
from quantkit.errors import GGUFFormatError
from quantkit.format.roles import Role, group_totals, role_of  # noqa: F401  (role_of re-exported)

VT = gguf_spec.GGUFValueType
SCALARS: dict[int, tuple[str, int]] = {
    VT.UINT8: ("<B", 1), VT.INT8: ("<b", 1), VT.UINT16: ("<H", 2), VT.INT16: ("<h", 2),
    VT.UINT32: ("<I", 4), VT.INT32: ("<i", 4), VT.FLOAT32: ("<f", 4), VT.BOOL: ("<?", 1),
    VT.UINT64: ("<Q", 8), VT.INT64: ("<q", 8), VT.FLOAT64: ("<d", 8),
}
MAX_STRING = 64 * 1024 * 1024
MAX_DIMS = 4
MAX_NAME = 64  # GGML_MAX_NAME: llama.cpp refuses a tensor name of 64 bytes or more
MAX_KEYS = 1 << 16  # real files hold tens of keys (arrays are one key each); millions would take seconds to walk
MAX_TENSORS = 1 << 18  # the largest MoE GGUFs hold a few thousand (experts stacked); each costs a few 100 bytes here
MAX_KEEP = 1 << 22  # items of an array read in full on request (``keep``): a vocabulary is at most a few 100k
ARRAY_HEAD = 16  # items kept from each array
_U64 = struct.Struct("<Q")



@dataclass(frozen=True)
class ArraySummary:
    item_type: str
    count: int
    head: list[Any]

    def to_json(self) -> dict[str, Any]:
        return {"array": self.item_type, "count": self.count, "head": self.head}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order: ne0 (row length) first
    qtype: gguf_spec.GGMLQuantizationType
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.ne:
            n *= d
        return n

    part: int = 0  # the part of a split set that holds the data (0: the first part, or a single file)

    @property
    def role(self) -> Role:
        return role_of(self.name)


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int
    alignment: int
    file_size: int = 0
    warnings: list[str] = field(default_factory=list)
    types: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # key -> (value type, array item type)
    table_end: int = 0  # where the tensor table ends: the bytes from here to data_offset are padding
    #: a split set read as one model: every part as read on its own (the first included); the fields above
    #: are the first part's, except ``tensors`` (all of them, each with its ``part``) and ``file_size`` (all parts)
    parts: tuple[GGUFFile, ...] = ()

    def locate(self, t: TensorInfo) -> tuple[Path, int]:
        """The file that holds ``t``'s data and the byte where it starts there (a split set's part, or this file)."""
        f = self.parts[t.part] if self.parts else self
        return f.path, f.data_offset + t.offset

    @property
    def files(self) -> tuple[GGUFFile, ...]:
        """The files of the model: its parts, or itself."""
        return self.parts or (self,)


class _Reader:
    """Cursor over the file's bytes (a read-only mmap): every read is bounds-checked against the file size."""

    def __init__(self, buf: Any, size: int, path: Path, full: bool = False) -> None:
        self.buf, self.size, self.path, self.pos, self.full = buf, size, path, 0, full
        self.item_type: int | None = None  # item type of the last array read

    def fail(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path}: {what} (at byte {self.pos}); fix: re-download or re-convert the file")

    def _need(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(f"truncated: {what} needs {n} bytes, {self.size - self.pos} remain")

    def read(self, n: int, what: str) -> bytes:
        self._need(n, what)
        b = self.buf[self.pos : self.pos + n]  # a copy: nothing keeps the mapping alive
        self.pos += n
        return b

    def skip(self, n: int, what: str) -> None:
        self._need(n, what)
        self.pos += n

    def scalar(self, vtype: int, what: str) -> Any:
        fmt, n = SCALARS[vtype]
        self._need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar(VT.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(VT.UINT64, what)

    def string(self, what: str, keep: bool = True) -> str:
        got = self.strings(1, what, 1 if keep else 0)
        return got[0] if got else ""

    def name(self, what: str) -> str:
        """A metadata key or tensor name: UTF-8 (the GGUF spec's rule), so that equal names are equal strings."""
        start = self.pos
        n = self.u64(f"{what} length")
        if n > MAX_STRING:
            raise self.fail(f"{what} claims {n} bytes (limit {MAX_STRING})")
        raw = self.read(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.pos = start
            raise self.fail(f"{what} {_cap(raw.decode('utf-8', 'replace'))} is not UTF-8") from None

    def strings(self, count: int, what: str, keep: int, exact: bool = False) -> list[str]:
        """``count`` length-prefixed strings; the first ``keep`` decoded, the rest only stepped over.

        One tight loop (a vocabulary is 32k-256k strings): the same checks as :meth:`read`.
        Full and ``exact`` reads keep undecodable bytes (surrogateescape): writing the value back gives
        the same bytes, and two different byte strings stay different.
        """
        buf, pos, size, out = self.buf, self.pos, self.size, []
        errors = "surrogateescape" if self.full or exact else "replace"
        unpack = _U64.unpack_from
        try:
            for i in range(count):
                if size - pos < 8:
                    raise self.fail(f"truncated: {what} length needs 8 bytes, {size - pos} remain")
                n = unpack(buf, pos)[0]
                pos += 8
                if n > MAX_STRING:
                    raise self.fail(f"{what} claims {n} bytes (limit {MAX_STRING})")
                if n > size - pos:
                    raise self.fail(f"truncated: {what} needs {n} bytes, {size - pos} remain")
                if i < keep:
                    out.append(buf[pos : pos + n].decode("utf-8", errors))
                pos += n
        finally:
            self.pos = pos
        return out

    def value(self, vtype: int, what: str, keep: bool = False) -> Any:
        """One value; ``keep``: a top-level array of at most MAX_KEEP items is read whole even in a summary read."""
        if vtype in SCALARS:
            return self.scalar(vtype, what)
        if vtype == VT.STRING:
            return self.string(what)
        if vtype == VT.ARRAY:
            itype = self.u32(f"{what} item type")
            if itype == VT.ARRAY:  # gguf.cpp: "key has invalid GGUF type" (gguf-py writes and reads them; llama.cpp never)
                raise self.fail(f"{what}: an array of arrays, which llama.cpp's GGUF reader refuses")
            self.item_type = itype
            count = self.u64(f"{what} count")
            whole = self.full or (keep and count <= MAX_KEEP)
            if itype in SCALARS:
                size = SCALARS[itype][1]
                if count > (self.size - self.pos) // size:
                    raise self.fail(f"{what}: array of {count} items cannot fit in the file")
                if whole:
                    return np.frombuffer(self.read(count * size, what), dtype=SCALARS[itype][0])
                head = [self.scalar(itype, what) for _ in range(min(count, ARRAY_HEAD))]
                self.skip((count - len(head)) * size, what)
            elif itype == VT.STRING:
                if count > (self.size - self.pos) // 8:
                    raise self.fail(f"{what}: array of {count} items cannot fit in the file")
                head = self.strings(count, what, count if whole else ARRAY_HEAD, exact=whole)
                if whole:
                    return head
            else:
                raise self.fail(f"{what}: unknown array item type {itype}")
            if count <= ARRAY_HEAD:
                return head
            return ArraySummary(VT(itype).name, count, head)
        raise self.fail(f"{what}: unknown value type {vtype}")


def read_gguf(path: str | Path, full: bool = False, keep: Callable[[str], bool] | None = None) -> GGUFFile:
    """Parse a GGUF header, metadata and tensor table with every size checked.

    ``full``: keep whole arrays (numeric ones as read-only numpy arrays, strings as
    lists) instead of summaries, e.g. to copy the metadata into a new file.
    ``keep(key)``: read that key's array whole all the same (up to MAX_KEEP items),
    e.g. the vocabulary a model check needs.

    The first part of a split set (``split.count`` > 1) is read with all its parts, as llama.cpp
    loads it: one model (:func:`read_split_set`).  A later part alone is refused.
    """
    g = read_gguf_file(path, full, keep)
    count = _split_count(g)
    return g if count <= 1 else read_split_set(g, count, full)


def read_gguf_file(path: str | Path, full: bool = False, keep: Callable[[str], bool] | None = None) -> GGUFFile:
    """One GGUF file as it is, a part of a split set included (see :func:`read_gguf`)."""
    path = Path(path)
    if not path.is_file():
        raise GGUFFormatError(f"{path}: no such file; fix: check the path")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        magic = f.read(4)
        if magic != b"GGUF":
            raise GGUFFormatError(f"{path}: not a GGUF file (magic {magic[:4]!r}, expected b'GGUF'); fix: pass a .gguf file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(_Reader(buf, size, path, full), path, size, keep)


def _parse(r: _Reader, path: Path, size: int, keep: Callable[[str], bool] | None = None) -> GGUFFile:
    r.pos = 4
    version = r.u32("version")
    if version not in (2, 3):
        raise r.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = r.u64("tensor count")
    n_kv = r.u64("metadata count")
    if n_kv > (size - r.pos) // 12:
        raise r.fail(f"metadata count {n_kv} cannot fit in a {size}-byte file")
    if n_kv > MAX_KEYS:
        raise r.fail(f"metadata count {n_kv} is absurd (limit {MAX_KEYS})")
    if n_tensors > (size - r.pos) // 24:
        raise r.fail(f"tensor count {n_tensors} cannot fit in a {size}-byte file")
    if n_tensors > MAX_TENSORS:
        raise r.fail(f"tensor count {n_tensors} is absurd (limit {MAX_TENSORS})")
    md: dict[str, Any] = {}
    types: dict[str, tuple[int, int | None]] = {}
    for _ in range(n_kv):
        key = r.name("metadata key")
        if not key:
            raise r.fail("empty metadata key")
        if key in md:  # llama.cpp refuses the file; the last value must not silently win
            raise r.fail(f"duplicate metadata key {_cap(key)}")
        vtype = r.u32(f"type of {_cap(key)}")
        md[key] = r.value(vtype, _cap(key), keep=keep is not None and keep(key))
        types[key] = (vtype, r.item_type if vtype == VT.ARRAY else None)
    alignment = _alignment(r, md, types)
    infos: list[TensorInfo] = []
    names: set[str] = set()
    expected = 0  # where the next tensor's data must start: llama.cpp lays tensors back to back, each padded
    for _ in range(n_tensors):
        name = r.name("tensor name")
        if len(name.encode("utf-8")) >= MAX_NAME:
            raise r.fail(f"tensor name {_cap(name)} is {len(name.encode('utf-8'))} bytes (llama.cpp allows {MAX_NAME - 1})")
        if name in names:
            raise r.fail(f"duplicate tensor name {_cap(name)}")
        names.add(name)
        n_dims = r.u32(f"dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise r.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        ne = tuple(r.u64(f"dimension of {name!r}") for _ in range(n_dims))
        raw_type = r.u32(f"type of {name!r}")
        offset = r.u64(f"offset of {name!r}")
        try:
            qtype = gguf_spec.GGMLQuantizationType(raw_type)
            block, tsize = gguf_spec.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise r.fail(f"tensor {name!r} has unknown type {raw_type}") from None
        n = 1
        for d in ne:
            if d > 1 << 40:
                raise r.fail(f"tensor {name!r} dimension {d} is absurd")
            n *= d
        if ne[0] % block:
            raise r.fail(f"tensor {name!r}: row length {ne[0]} is not a multiple of {qtype.name}'s block {block}")
        nbytes = n // block * tsize
        if offset != expected:
            how = "overlaps the tensor before it" if offset < expected else "leaves a gap after the tensor before it"
            raise r.fail(f"tensor {name!r}: data offset {offset} {how} (expected {expected}, tensors back to back aligned to {alignment})")
        expected = offset + (nbytes + alignment - 1) // alignment * alignment
        infos.append(TensorInfo(name, ne, qtype, offset, nbytes))
    data_offset = (r.pos + alignment - 1) // alignment * alignment
    for t in infos:
        end = data_offset + t.offset + t.nbytes
        if end > size:
            raise GGUFFormatError(f"{path}: truncated: tensor {t.name!r} ends at byte {end}, file has {size}; fix: re-download or re-convert the file")
    return GGUFFile(path, version, md, infos, data_offset, alignment, size, types=types, table_end=r.pos)


_S = gguf_spec.Keys.Split
SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT = _S.LLM_KV_SPLIT_NO, _S.LLM_KV_SPLIT_COUNT, _S.LLM_KV_SPLIT_TENSORS_COUNT
_SPLIT_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.gguf")
_SPLIT_FIX = "fix: re-download the part or re-convert the whole set"


def _split_key(g: GGUFFile, key: str, vtype: int, required: bool = True) -> int | None:
    """A ``split.*`` key with the type llama.cpp reads it with (its loader refuses any other)."""
    if key not in g.metadata:
        if required:
            raise GGUFFormatError(f"{g.path}: metadata {key} is missing from a part of a split set; {_SPLIT_FIX}")
        return None
    if g.types[key][0] != vtype:
        raise GGUFFormatError(f"{g.path}: metadata {key} has type {_type_name(g.types[key][0])}, llama.cpp reads it as {_type_name(vtype)}; {_SPLIT_FIX}")
    return int(g.metadata[key])


def _split_count(g: GGUFFile) -> int:
    """Parts of the split set whose first part ``g`` is (1: a single file); a later part is refused, naming the first."""
    count = _split_key(g, SPLIT_COUNT, VT.UINT16, required=False)
    if count is None or count <= 1:  # llama-gguf-split --merge leaves split.count = 0; one part is a file on its own
        return 1
    no = _split_key(g, SPLIT_NO, VT.UINT16)
    assert no is not None
    m = _SPLIT_NAME.fullmatch(g.path.name[-len("-00001-of-00001.gguf"):]) if len(g.path.name) > 20 else None
    if no != 0:
        first = f" ({g.path.name[: -len(m.group(0))]}-00001-of-{count:05d}.gguf)" if m else ""
        raise GGUFFormatError(f"{g.path}: part {no + 1} of a split set of {count} parts; fix: pass the first part{first}, llama.cpp loads the others from it")
    if m is None or m.group(0) != f"-00001-of-{count:05d}.gguf":
        raise GGUFFormatError(f"{g.path}: the first part of a split set of {count} parts must be named PREFIX-00001-of-{count:05d}.gguf "
                              "(llama.cpp finds the other parts by that name); fix: give the parts their original names")
    return count


def split_part_paths(path: str | Path, count: int) -> list[Path]:
    """The file names of a split set of ``count`` parts whose first part is ``path`` (llama.cpp's ``llama_split_path``)."""
    path = Path(path)
    prefix = path.name[: -len("-00001-of-00001.gguf")]
    return [path.with_name(f"{prefix}-{no + 1:05d}-of-{count:05d}.gguf") for no in range(count)]


def read_split_set(first: GGUFFile, count: int, full: bool = False) -> GGUFFile:
    """A split set read as one model: the first part's metadata, every part's tensors (each knowing its part).

    Every part must be there, say which part it is (``split.no``), belong to a set of as many parts with as
    many tensors in all (``split.count``, ``split.tensors.count``), and no tensor may be in two parts; the
    first part's ``split.tensors.count`` must equal the tensors found.  Each refusal names the part.
    """
    total = _split_key(first, SPLIT_TENSORS_COUNT, VT.INT32)
    parts, tensors, names, size = [first], [], set(), 0
    for no, p in enumerate(split_part_paths(first.path, count)):
        if no:
            if not p.is_file():
                raise GGUFFormatError(f"{p}: part {no + 1} of {count} of the split set {first.path.name} is missing; fix: put every part beside the first one")
            g = read_gguf_file(p, full)
            for key, want in ((SPLIT_NO, no), (SPLIT_COUNT, count), (SPLIT_TENSORS_COUNT, total)):
                got = _split_key(g, key, VT.INT32 if key == SPLIT_TENSORS_COUNT else VT.UINT16)
                if got != want:
                    raise GGUFFormatError(f"{p}: metadata {key} = {got}, expected {want}: a mismatched part (renamed, or from another split set than {first.path.name}); {_SPLIT_FIX}")
            parts.append(g)
        g = parts[no]
        for t in g.tensors:
            if t.name in names:
                raise GGUFFormatError(f"{p}: tensor {_cap(t.name)} is also in an earlier part of the split set; {_SPLIT_FIX}")
            names.add(t.name)
            tensors.append(dataclasses.replace(t, part=no))
        size += g.file_size
    if total != len(tensors):
        raise GGUFFormatError(f"{first.path}: metadata {SPLIT_TENSORS_COUNT} = {total}, the {count} parts hold {len(tensors)} tensors; {_SPLIT_FIX}")
    return dataclasses.replace(first, tensors=tensors, file_size=size, warnings=[w for g in parts for w in g.warnings], parts=tuple(parts))


def _cap(s: str, n: int = 80) -> str:
    """An untrusted string for an error message: repr (no control characters), at most ``n`` characters of it."""
    return repr(s[:n]) + ("…" if len(s) > n else "")


def _alignment(r: _Reader, md: dict[str, Any], types: dict[str, tuple[int, int | None]]) -> int:
    """``general.alignment`` as llama.cpp takes it: absent (32), or a UINT32 power of two."""
    key = gguf_spec.Keys.General.ALIGNMENT
    if key not in md:
        return gguf_spec.GGUF_DEFAULT_ALIGNMENT
    value, vtype = md[key], types[key][0]
    if vtype != VT.UINT32:
        raise r.fail(f"{key} has type {_type_name(vtype)}, llama.cpp requires UINT32")
    if value <= 0 or value & (value - 1):
        raise r.fail(f"{key} = {value}, expected a power of two")
    return int(value)


def _type_name(vtype: int) -> str:
    return VT(vtype).name if vtype in VT._value2member_map_ else str(vtype)


def to_json(g: GGUFFile) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        return v.to_json() if isinstance(v, ArraySummary) else v

    params = sum(t.n_elements for t in g.tensors)
    nbytes = sum(t.nbytes for t in g.tensors)
    j = {
        "path": str(g.path),
        "version": g.version,
        "file_bytes": g.file_size,
        "metadata": {k: plain(v) for k, v in g.metadata.items()},
        "tensors": [
            {"name": t.name, "shape": list(t.ne), "type": t.qtype.name, "bytes": t.nbytes, "group": t.role.value, **({"part": t.part + 1} if g.parts else {})}
            for t in g.tensors
        ],
        "groups": group_totals(g.tensors),
        "totals": {"tensors": len(g.tensors), "params": params, "bytes": nbytes, "bits_per_weight": round(8 * nbytes / max(1, params), 4)},
    }
    if g.parts:  # a split set: the model is all of them (file_bytes counts every part)
        j["parts"] = [{"path": str(f.path), "bytes": f.file_size, "tensors": len(f.tensors)} for f in g.parts]
    return j
