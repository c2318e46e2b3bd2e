"""Streaming GGUF writer: header and tensor table first, then tensor data piece by piece.

The header, metadata and tensor table are encoded here in one pass (a 150k-token
vocabulary is a few joins, not 300k calls through gguf-py's packer); tensor data
is written in pieces (an expert at a time, say) so no stacked tensor has to
exist in memory.  Pieces of one tensor are concatenated in order; the
writer checks that each tensor gets exactly the bytes its info declared.
The data alignment is the metadata's ``general.alignment`` when it has one
(a requantised file keeps its source's), else GGUF's default of 32 bytes: the
header, every tensor offset and every tensor's padding follow it, as llama.cpp
reads them.

Not for: choosing tensor types or names (see ``quantkit.policy.plan`` and the converters).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from quantkit.format import gguf_spec
from quantkit.format.gguf_read import SCALARS

ALIGN = gguf_spec.GGUF_DEFAULT_ALIGNMENT
VT = gguf_spec.GGUFValueType


@dataclass(frozen=True)
class FileSlice:
    """``nbytes`` bytes at ``offset`` of an open file: a tensor piece copied file to file by the kernel."""

    fd: int
    offset: int
    nbytes: int



def type_nbytes(qtype: gguf_spec.GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``shape`` (numpy order, row length last) stored as ``qtype``."""
    block, size = gguf_spec.GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    if shape[-1] % block:
        raise ValueError(f"row length {shape[-1]} is not a multiple of {qtype.name}'s block size {block}")
    return n // block * size


def pad(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class MetaValue:
    """One metadata entry: value plus its GGUF value type (and array element type)."""

    value: Any
    vtype: gguf_spec.GGUFValueType
    sub_type: gguf_spec.GGUFValueType | None = None


def _string(s: str | bytes) -> bytes:
    b = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else bytes(s)  # a reader's undecodable bytes go back as they came
    return struct.pack("<Q", len(b)) + b


def _value(key: str, mv: MetaValue) -> bytes:
    """GGUF encoding of one value, its type tag first."""
    vt = mv.vtype
    if vt in SCALARS:
        return struct.pack("<I" + SCALARS[vt][0][1:], vt, mv.value)
    if vt == VT.STRING:
        return struct.pack("<I", vt) + _string(mv.value)
    if vt == VT.ARRAY:
        sub, items = mv.sub_type, mv.value
        head = struct.pack("<IIQ", vt, sub, len(items))
        if sub in SCALARS:  # the struct codes are numpy dtype strings too
            return head + np.asarray(items, dtype=SCALARS[sub][0]).tobytes()
        if sub == VT.STRING:
            return head + b"".join(map(_string, items))
        raise ValueError(f"metadata {key!r}: arrays of {sub!r} are not written")
    raise ValueError(f"metadata {key!r}: unknown value type {vt!r}")


def alignment_of(metadata: dict[str, MetaValue]) -> int:
    """The data alignment a file with this metadata declares: ``general.alignment`` (a UINT32 power of two) or 32."""
    mv = metadata.get(gguf_spec.Keys.General.ALIGNMENT)
    if mv is None:
        return ALIGN
    value = mv.value
    if mv.vtype != VT.UINT32 or isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0 or value & (value - 1):
        raise ValueError(f"metadata {gguf_spec.Keys.General.ALIGNMENT} = {value!r} ({mv.vtype!r}): expected a UINT32 power of two")
    return int(value)


def encode_header(arch: str, metadata: dict[str, MetaValue], tensors: Iterable[tuple[str, tuple[int, ...], gguf_spec.GGMLQuantizationType, int]]) -> bytes:
    """Header, metadata (``general.architecture`` first) and tensor table of a GGUF v3 file, padded to the alignment.

    ``tensors``: (name, numpy-order shape, type, nbytes) in file order; data offsets
    follow each other, each padded to the alignment (:func:`alignment_of`), as llama.cpp expects.
    """
    align = alignment_of(metadata)
    kv = {gguf_spec.Keys.General.ARCHITECTURE: MetaValue(arch, VT.STRING)}
    kv.update((k, v) for k, v in metadata.items() if k != gguf_spec.Keys.General.ARCHITECTURE)
    parts = [b""]
    for key, mv in kv.items():
        parts.append(_string(key))
        parts.append(_value(key, mv))
    offset = n = 0
    for name, shape, qtype, nbytes in tensors:
        parts.append(_string(name) + struct.pack(f"<I{len(shape)}QIQ", len(shape), *reversed(shape), int(qtype), offset))
        offset += pad(nbytes, align)
        n += 1
    parts[0] = struct.pack("<IIQQ", gguf_spec.GGUF_MAGIC, gguf_spec.GGUF_VERSION, n, len(kv))
    head = b"".join(parts)
    return head + bytes(pad(len(head), align) - len(head))


def file_nbytes(arch: str, metadata: dict[str, MetaValue], tensors: Iterable[tuple[str, tuple[int, ...], int]]) -> int:
    """Exact size of the file :class:`StreamingGGUFWriter` writes for ``(name, shape, nbytes)`` tensors."""
    tensors = list(tensors)
    head = encode_header(arch, metadata, ((name, shape, gguf_spec.GGMLQuantizationType.F32, 0) for name, shape, _ in tensors))
    align = alignment_of(metadata)
    return len(head) + sum(pad(nbytes, align) for _, _, nbytes in tensors)


class StreamingGGUFWriter:
    """Write a GGUF file whose tensors are declared up front and streamed afterwards."""

    def __init__(self, path: Path, arch: str, metadata: dict[str, MetaValue]) -> None:
        self._arch, self._metadata = arch, metadata
        self._align = alignment_of(metadata)
        self._declared: list[tuple[str, tuple[int, ...], gguf_spec.GGMLQuantizationType, int]] = []
        self._next = 0
        self._written = 0
        self._f: Any = None
        self.path = path

    def declare(self, name: str, shape: tuple[int, ...], qtype: gguf_spec.GGMLQuantizationType) -> int:
        nbytes = type_nbytes(qtype, shape)
        self._declared.append((name, tuple(shape), qtype, nbytes))
        return nbytes

    def begin(self) -> None:
        """Write header, metadata and tensor infos; tensor data follows."""
        head = encode_header(self._arch, self._metadata, self._declared)
        self._f = open(self.path, "wb")
        self._f.write(head)

    def _pad_to_alignment(self) -> None:
        pos = self._f.tell()
        if pos % self._align:
            self._f.write(b"\0" * (pad(pos, self._align) - pos))

    def write_tensor(self, name: str, pieces: Iterable[Any], on_bytes: Callable[[int], None] | None = None) -> None:
        """Write the next declared tensor from an iterable of bytes-like pieces."""
        want_name, _, _, want = self._declared[self._next]
        if name != want_name:
            raise RuntimeError(f"tensor {name!r} written out of order (expected {want_name!r})")
        done = 0
        for piece in pieces:
            if isinstance(piece, FileSlice):
                n = self._copy_slice(piece)
            else:
                mv = memoryview(piece).cast("B")
                self._f.write(mv)
                n = mv.nbytes
            done += n
            if on_bytes is not None:
                on_bytes(n)
        if done != want:
            raise RuntimeError(f"tensor {name!r}: wrote {done} bytes, declared {want}")
        self._next += 1
        self._written += done
        self._pad_to_alignment()

    def _copy_slice(self, piece: FileSlice) -> int:
        """Copy file bytes to the output in the kernel (copy_file_range), falling back to pread/write."""
        self._f.flush()
        pos = self._f.tell()
        out_fd = self._f.fileno()
        done = 0
        while done < piece.nbytes:
            want = min(piece.nbytes - done, 1 << 30)
            try:
                n = os.copy_file_range(piece.fd, out_fd, want, piece.offset + done, pos + done)
            except (AttributeError, OSError):  # no copy_file_range here, or not across these files
                n = os.pwrite(out_fd, os.pread(piece.fd, min(want, 1 << 24), piece.offset + done), pos + done)
            if n <= 0:
                raise OSError(f"short copy: {done} of {piece.nbytes} bytes")
            done += n
        self._f.seek(pos + done)
        return done

    def finish(self) -> None:
        """Close after checking every declared tensor was written."""
        if self._next != len(self._declared):
            self.close()
            raise RuntimeError(f"GGUF finished before tensor {self._declared[self._next][0]!r} was written")
        self.close()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
