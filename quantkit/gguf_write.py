"""Streaming GGUF writer: header and tensor table first, then tensor data piece by piece.

The ``gguf`` package encodes the header, metadata and tensor infos; tensor data
is written here in pieces (an expert at a time, say) so no stacked tensor has
to exist in memory.  Pieces of one tensor are concatenated in order; the
writer checks that each tensor gets exactly the bytes its info declared.

Not for: choosing tensor types or names (see ``quantkit.plan`` and the converters).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import gguf
import numpy as np

from quantkit.checkpoint import FileSlice

ALIGN = gguf.GGUF_DEFAULT_ALIGNMENT


def type_nbytes(qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``shape`` (numpy order, row length last) stored as ``qtype``."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
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
    vtype: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None = None


def file_nbytes(arch: str, metadata: dict[str, MetaValue], tensors: Iterable[tuple[str, tuple[int, ...], int]]) -> int:
    """Exact size of the file :class:`StreamingGGUFWriter` writes for ``(name, shape, nbytes)`` tensors."""
    w = gguf.GGUFWriter(None, arch)
    for key, mv in metadata.items():
        if key != gguf.Keys.General.ARCHITECTURE:
            w.add_key_value(key, mv.value, mv.vtype, sub_type=mv.sub_type)
    n = 4 + 4 + 8 + 8  # magic, version, tensor count, kv count
    for key, val in w.kv_data[0].items():
        n += len(w._pack_val(key, gguf.GGUFValueType.STRING, add_vtype=False))
        n += len(w._pack_val(val.value, val.type, add_vtype=True, sub_type=val.sub_type))
    data = 0
    for name, shape, nbytes in tensors:
        n += 8 + len(name.encode("utf-8")) + 4 + 8 * len(shape) + 4 + 8  # name, n_dims, dims, type, offset
        data += pad(nbytes)
    return pad(n) + data


class StreamingGGUFWriter:
    """Write a GGUF file whose tensors are declared up front and streamed afterwards."""

    def __init__(self, path: Path, arch: str, metadata: dict[str, MetaValue]) -> None:
        self._w = gguf.GGUFWriter(path, arch)
        for key, mv in metadata.items():
            if key == gguf.Keys.General.ARCHITECTURE:
                continue
            self._w.add_key_value(key, mv.value, mv.vtype, sub_type=mv.sub_type)
        self._declared: list[tuple[str, int]] = []
        self._next = 0
        self._written = 0
        self.path = path

    def declare(self, name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
        nbytes = type_nbytes(qtype, shape)
        self._w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        self._declared.append((name, nbytes))
        return nbytes

    def begin(self) -> None:
        """Write header, metadata and tensor infos; tensor data follows."""
        self._w.write_header_to_file()
        self._w.write_kv_data_to_file()
        self._w.write_ti_data_to_file()
        self._f = self._w.fout[0]
        self._pad_to_alignment()

    def _pad_to_alignment(self) -> None:
        pos = self._f.tell()
        if pos % ALIGN:
            self._f.write(b"\0" * (pad(pos) - pos))

    def write_tensor(self, name: str, pieces: Iterable[Any], on_bytes: Callable[[int], None] | None = None) -> None:
        """Write the next declared tensor from an iterable of bytes-like pieces."""
        want_name, want = self._declared[self._next]
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
        self._w.close()
