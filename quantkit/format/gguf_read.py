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

Not for: loading tensor data for inference (llama.cpp does that).
"""

from __future__ import annotations

import mmap
import os
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
    """
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
    return {
        "path": str(g.path),
        "version": g.version,
        "file_bytes": g.file_size,
        "metadata": {k: plain(v) for k, v in g.metadata.items()},
        "tensors": [
            {"name": t.name, "shape": list(t.ne), "type": t.qtype.name, "bytes": t.nbytes, "group": t.role.value} for t in g.tensors
        ],
        "groups": group_totals(g.tensors),
        "totals": {"tensors": len(g.tensors), "params": params, "bytes": nbytes, "bits_per_weight": round(8 * nbytes / max(1, params), 4)},
    }
