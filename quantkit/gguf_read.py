"""A GGUF reader that is safe on hostile files.

Every length is checked against the bytes that remain before anything is read
or allocated: string and array sizes, tensor counts, dimensions, types,
offsets and alignment.  Large arrays are summarised (count + first items), so
inspecting a file never needs memory proportional to its metadata.  A file
that is not GGUF, is truncated, or declares absurd sizes raises
:class:`GGUFFormatError` with a one-line reason.

Not for: loading tensor data for inference (llama.cpp does that).
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantkit import gguf_spec
from quantkit.errors import GGUFFormatError
from quantkit.mapping import Role, group_totals

VT = gguf_spec.GGUFValueType
SCALARS: dict[int, tuple[str, int]] = {
    VT.UINT8: ("<B", 1), VT.INT8: ("<b", 1), VT.UINT16: ("<H", 2), VT.INT16: ("<h", 2),
    VT.UINT32: ("<I", 4), VT.INT32: ("<i", 4), VT.FLOAT32: ("<f", 4), VT.BOOL: ("<?", 1),
    VT.UINT64: ("<Q", 8), VT.INT64: ("<q", 8), VT.FLOAT64: ("<d", 8),
}
MAX_STRING = 64 * 1024 * 1024
MAX_DIMS = 4
MAX_DEPTH = 3
ARRAY_HEAD = 16  # items kept from each array
_U64 = struct.Struct("<Q")

#: GGUF tensor name -> role, first match wins (names as llama.cpp writes them).
ROLE_PATTERNS: tuple[tuple[str, Role], ...] = (
    (r"ffn_gate_inp", Role.ROUTER),
    (r"_exps?\b|_exps\.", Role.EXPERTS),
    (r"_shexp", Role.EXPERTS),
    (r"norm", Role.NORM),
    (r"^token_embd", Role.EMBEDDINGS),
    (r"^output\.", Role.OUTPUT),
    (r"\.attn_", Role.ATTENTION),
    (r"\.ffn_", Role.FFN),
)


def role_of(name: str) -> Role:
    for pattern, role in ROLE_PATTERNS:
        if re.search(pattern, name):
            return role
    return Role.OTHER


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

    def strings(self, count: int, what: str, keep: int) -> list[str]:
        """``count`` length-prefixed strings; the first ``keep`` decoded, the rest only stepped over.

        One tight loop (a vocabulary is 32k-256k strings): the same checks as :meth:`read`.
        Full reads keep undecodable bytes (surrogateescape) so that writing the value back gives the same bytes.
        """
        buf, pos, size, out = self.buf, self.pos, self.size, []
        errors = "surrogateescape" if self.full else "replace"
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

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in SCALARS:
            return self.scalar(vtype, what)
        if vtype == VT.STRING:
            return self.string(what)
        if vtype == VT.ARRAY:
            if depth >= MAX_DEPTH:
                raise self.fail(f"{what}: arrays nested deeper than {MAX_DEPTH}")
            itype = self.u32(f"{what} item type")
            if depth == 0:
                self.item_type = itype
            count = self.u64(f"{what} count")
            if itype in SCALARS:
                size = SCALARS[itype][1]
                if count > (self.size - self.pos) // size:
                    raise self.fail(f"{what}: array of {count} items cannot fit in the file")
                if self.full and depth == 0:
                    return np.frombuffer(self.read(count * size, what), dtype=SCALARS[itype][0])
                head = [self.scalar(itype, what) for _ in range(min(count, ARRAY_HEAD))]
                self.skip((count - len(head)) * size, what)
            elif itype in (VT.STRING, VT.ARRAY):
                if count > (self.size - self.pos) // 8:
                    raise self.fail(f"{what}: array of {count} items cannot fit in the file")
                if itype == VT.STRING:
                    head = self.strings(count, what, count if self.full and depth == 0 else ARRAY_HEAD)
                    if self.full and depth == 0:
                        return head
                else:
                    head = []
                    for i in range(count):
                        v = self.value(itype, what, depth + 1)
                        if i < ARRAY_HEAD:
                            head.append(v)
            else:
                raise self.fail(f"{what}: unknown array item type {itype}")
            if count <= ARRAY_HEAD:
                return head
            return ArraySummary(VT(itype).name, count, head)
        raise self.fail(f"{what}: unknown value type {vtype}")


def read_gguf(path: str | Path, full: bool = False) -> GGUFFile:
    """Parse a GGUF header, metadata and tensor table with every size checked.

    ``full``: keep whole arrays (numeric ones as read-only numpy arrays, strings as
    lists) instead of summaries, e.g. to copy the metadata into a new file.
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
            return _parse(_Reader(buf, size, path, full), path, size)


def _parse(r: _Reader, path: Path, size: int) -> GGUFFile:
    r.pos = 4
    version = r.u32("version")
    if version not in (2, 3):
        raise r.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = r.u64("tensor count")
    n_kv = r.u64("metadata count")
    if n_kv > (size - r.pos) // 12:
        raise r.fail(f"metadata count {n_kv} cannot fit in a {size}-byte file")
    if n_tensors > (size - r.pos) // 24:
        raise r.fail(f"tensor count {n_tensors} cannot fit in a {size}-byte file")
    md: dict[str, Any] = {}
    types: dict[str, tuple[int, int | None]] = {}
    for _ in range(n_kv):
        key = r.string("metadata key")
        vtype = r.u32(f"type of {key!r}")
        md[key] = r.value(vtype, repr(key))
        types[key] = (vtype, r.item_type if vtype == VT.ARRAY else None)
    alignment = md.get("general.alignment", gguf_spec.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise r.fail(f"general.alignment = {alignment!r}, expected a power of two")
    infos = []
    for _ in range(n_tensors):
        name = r.string("tensor name")
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
        if offset % alignment:
            raise r.fail(f"tensor {name!r}: offset {offset} is not aligned to {alignment}")
        infos.append(TensorInfo(name, ne, qtype, offset, nbytes))
    data_offset = (r.pos + alignment - 1) // alignment * alignment
    for t in infos:
        end = data_offset + t.offset + t.nbytes
        if end > size:
            raise GGUFFormatError(f"{path}: truncated: tensor {t.name!r} ends at byte {end}, file has {size}; fix: re-download or re-convert the file")
    names = [t.name for t in infos]
    if len(set(names)) != len(names):
        raise r.fail("duplicate tensor names")
    return GGUFFile(path, version, md, infos, data_offset, alignment, size, types=types)


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
