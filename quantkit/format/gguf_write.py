"""Streaming GGUF writer: header and tensor table first, then tensor data piece by piece.

The header, metadata and tensor table are encoded here in one pass (a 150k-token
vocabulary is a few joins, not 300k calls through gguf-py's packer); tensor data
is written in pieces (an expert at a time, say) so no stacked tensor has to
exist in memory.  Pieces of one tensor are concatenated in order; the
writer checks that each tensor gets exactly the bytes its info declared.
The data alignment is the metadata's ``general.alignment`` when it has one
(a requantised file keeps its source's), else GGUF's default of 32 bytes: the
header, every tensor offset and every tensor's padding follow it, as llama.cpp
reads them.  :class:`SplitGGUFWriter` writes the same tensors as a split set,
byte for byte as llama.cpp's ``llama-gguf-split --split`` cuts the single file.

Not for: choosing tensor types or names (see ``quantkit.policy.plan`` and the converters).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from quantkit.format import gguf_spec
from quantkit.format.gguf_read import SCALARS, SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS_COUNT

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


def encode_header(arch: str | None, metadata: dict[str, MetaValue], tensors: Iterable[tuple[str, tuple[int, ...], gguf_spec.GGMLQuantizationType, int]]) -> bytes:
    """Header, metadata (``general.architecture`` first) and tensor table of a GGUF v3 file, padded to the alignment.

    ``tensors``: (name, numpy-order shape, type, nbytes) in file order; data offsets
    follow each other, each padded to the alignment (:func:`alignment_of`), as llama.cpp expects.
    ``arch`` None: no ``general.architecture`` key (the second and later parts of a split set hold only ``split.*`` keys).
    """
    align = alignment_of(metadata)
    kv = {} if arch is None else {gguf_spec.Keys.General.ARCHITECTURE: MetaValue(arch, VT.STRING)}
    kv.update((k, v) for k, v in metadata.items() if arch is None or k != gguf_spec.Keys.General.ARCHITECTURE)
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

    def __init__(self, path: Path, arch: str | None, metadata: dict[str, MetaValue]) -> None:
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


# --- split sets, as llama.cpp's llama-gguf-split writes them (tools/gguf-split/gguf-split.cpp) -------------------------
#
# NAME-00001-of-0000K.gguf .. NAME-0000K-of-0000K.gguf (llama_split_path's "%s-%05d-of-%05d.gguf").  The first part
# holds every metadata key, then split.no (UINT16), split.tensors.count (INT32: tensors in the whole set) and
# split.count (UINT16), in that order; every other part holds only those three keys (no general.architecture).
# Tensors keep the single file's order and never span parts.  --split-max-size counts only tensor bytes, each padded
# to 32 (the header is not counted): a tensor that would take the running total past the limit starts the next part.
# --split-max-tensors N starts a part at every N-th tensor.  llama.cpp loads the set given the first part.

SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT)
MAX_SPLITS = 65535  # split.count is a UINT16 (and the names have five digits)
_UNITS = {"K": 1000, "M": 1000**2, "G": 1000**3}  # decimal, as llama-gguf-split's split_str_to_n_bytes


@dataclass(frozen=True)
class SplitSpec:
    """How to cut a file into a split set: at most ``max_bytes`` of (padded) tensor data or ``max_tensors`` tensors a part."""

    max_bytes: int | None = None
    max_tensors: int | None = None

    def __post_init__(self) -> None:
        if (self.max_bytes is None) == (self.max_tensors is None):
            raise ValueError("give one of --split-max-size and --split-max-tensors")  # llama-gguf-split refuses both too
        for flag, v in (("--split-max-size", self.max_bytes), ("--split-max-tensors", self.max_tensors)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"{flag} {v!r}: expected a positive number")


def parse_split_size(text: str) -> int:
    """``--split-max-size``: a positive whole number with a decimal unit, ``K``, ``M`` or ``G`` (48G = 48*10**9 bytes).

    llama-gguf-split takes M and G (and reads "1.5G" as 1G); K is accepted here too, a fraction is refused.
    """
    s = text.strip()
    unit = s[-1:].upper()
    digits = s[:-1]
    if unit not in _UNITS or not digits.isascii() or not digits.isdigit() or int(digits) <= 0:
        raise ValueError(f"--split-max-size {text[:40]!r}: expected a positive whole number with a unit K, M or G (decimal, as llama-gguf-split), e.g. 48G or 500M")
    return int(digits) * _UNITS[unit]


def split_layout(nbytes: Sequence[int], spec: SplitSpec, names: Sequence[str] = ()) -> list[int]:
    """How many tensors each part holds, tensors in file order (llama-gguf-split's ``split_strategy``).

    A tensor larger than ``max_bytes`` on its own is refused (llama-gguf-split refuses it as the first tensor and
    writes an oversized part for any other; a part over the limit defeats the limit's purpose).
    """
    counts: list[int] = [0]
    size = 0
    for i, n in enumerate(nbytes):
        if spec.max_bytes is not None:
            padded = pad(n, ALIGN)
            if padded > spec.max_bytes:
                name = names[i] if i < len(names) else f"#{i}"
                raise ValueError(f"tensor {name!r} alone is {padded:,} bytes, more than --split-max-size ({spec.max_bytes:,} bytes): it cannot go in any part; "
                                 "fix: raise --split-max-size")
            if counts[-1] and size + padded > spec.max_bytes:
                counts.append(0)
                size = 0
            size += padded
        elif counts[-1] and i % spec.max_tensors == 0:  # type: ignore[operator]
            counts.append(0)
        counts[-1] += 1
    if len(counts) > MAX_SPLITS:
        raise ValueError(f"the split set would have {len(counts)} parts, more than {MAX_SPLITS} (split.count is 16 bits); fix: raise the split limit")
    return counts


def split_prefix(output: Path) -> Path:
    """``-o NAME.gguf`` -> ``NAME`` (llama-gguf-split takes that prefix itself; any other name is the prefix as it is)."""
    output = Path(output)
    return output.with_name(output.name[: -len(".gguf")]) if output.name.lower().endswith(".gguf") and len(output.name) > 5 else output


def split_path(prefix: Path, no: int, count: int) -> Path:
    """Part ``no`` (0-based) of ``count``: llama_split_path's ``PREFIX-%05d-of-%05d.gguf``."""
    prefix = Path(prefix)
    return prefix.with_name(f"{prefix.name}-{no + 1:05d}-of-{count:05d}.gguf")


def split_metadata(metadata: dict[str, MetaValue], no: int, count: int, n_tensors: int) -> dict[str, MetaValue]:
    """A part's metadata: all of it in the first part (earlier ``split.*`` keys dropped), the ``split.*`` keys alone in the others."""
    md = {k: v for k, v in metadata.items() if k not in SPLIT_KEYS} if no == 0 else {}
    md[SPLIT_NO] = MetaValue(no, VT.UINT16)
    md[SPLIT_TENSORS_COUNT] = MetaValue(n_tensors, VT.INT32)
    md[SPLIT_COUNT] = MetaValue(count, VT.UINT16)
    return md


def split_file_sizes(arch: str, metadata: dict[str, MetaValue], tensors: Sequence[tuple[str, tuple[int, ...], int]], counts: Sequence[int]) -> list[int]:
    """Exact size of every part :class:`SplitGGUFWriter` writes for ``(name, shape, nbytes)`` tensors cut as ``counts``."""
    sizes, at = [], 0
    for no, n in enumerate(counts):
        part = tensors[at : at + n]
        md = split_metadata(metadata, no, len(counts), len(tensors))
        head = encode_header(arch if no == 0 else None, md, ((name, shape, gguf_spec.GGMLQuantizationType.F32, 0) for name, shape, _ in part))
        sizes.append(len(head) + sum(pad(nbytes, alignment_of(md)) for _, _, nbytes in part))
        at += n
    return sizes


class SplitGGUFWriter:
    """:class:`StreamingGGUFWriter`'s interface over a split set: ``paths[k]`` gets part k's header and tensors.

    ``counts``: tensors per part (:func:`split_layout`), in the order they are declared and written.
    """

    def __init__(self, paths: Sequence[Path], arch: str, metadata: dict[str, MetaValue], counts: Sequence[int]) -> None:
        if len(paths) != len(counts) or not counts:
            raise ValueError(f"{len(paths)} part paths for {len(counts)} parts")
        self._paths, self._arch, self._metadata, self._counts = list(paths), arch, metadata, list(counts)
        self._declared: list[tuple[str, tuple[int, ...], gguf_spec.GGMLQuantizationType]] = []
        self._parts: list[StreamingGGUFWriter] = []
        self._part = -1  # the part being written
        self._left = 0  # tensors still to write into it

    def declare(self, name: str, shape: tuple[int, ...], qtype: gguf_spec.GGMLQuantizationType) -> int:
        self._declared.append((name, tuple(shape), qtype))
        return type_nbytes(qtype, shape)

    def begin(self) -> None:
        """Lay out every part (the tensor count must match ``counts``); the first part's header is written."""
        if len(self._declared) != sum(self._counts):
            raise RuntimeError(f"{len(self._declared)} tensors declared, the split layout holds {sum(self._counts)}")
        at, n_parts = 0, len(self._counts)
        for no, n in enumerate(self._counts):
            md = split_metadata(self._metadata, no, n_parts, len(self._declared))
            w = StreamingGGUFWriter(self._paths[no], self._arch if no == 0 else None, md)
            for name, shape, qtype in self._declared[at : at + n]:
                w.declare(name, shape, qtype)
            self._parts.append(w)
            at += n
        self._next_part()

    def _next_part(self) -> None:
        if self._part >= 0:
            self._parts[self._part].finish()
        self._part += 1
        self._left = self._counts[self._part]
        self._parts[self._part].begin()

    def write_tensor(self, name: str, pieces: Iterable[Any], on_bytes: Callable[[int], None] | None = None) -> None:
        if self._left == 0:
            self._next_part()
        self._parts[self._part].write_tensor(name, pieces, on_bytes)
        self._left -= 1

    def finish(self) -> None:
        """Close after checking every part got all its tensors."""
        if self._part != len(self._parts) - 1 or self._left:
            self.close()
            raise RuntimeError(f"split set finished in part {self._part + 1} of {len(self._parts)}, before every tensor was written")
        self._parts[self._part].finish()

    def close(self) -> None:
        for w in self._parts:
            w.close()
