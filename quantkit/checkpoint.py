"""Reading a Hugging Face checkpoint directory safely and lazily.

Validates ``config.json`` and every safetensors header before any tensor is
touched (header size cap, known dtypes, in-bounds contiguous offsets, byte sizes
equal to shape x dtype), memory-maps each shard, and hands out
:class:`TensorRef` handles whose bytes are read only when asked for.  Pages read
from a shard can be dropped again with :meth:`TensorRef.release`, so a
streaming conversion keeps a bounded resident set whatever the model size.

Not for: name mapping or per-architecture transforms (see ``quantkit.converters``).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from quantkit.errors import CheckpointError

#: safetensors dtype -> (numpy dtype used to view the raw bytes, bytes per element).
#: BF16 has no numpy dtype; it is viewed as uint16 and widened on demand.
DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F64": (np.dtype("<f8"), 8),
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "I16": (np.dtype("<i2"), 2),
    "I8": (np.dtype("i1"), 1),
    "U8": (np.dtype("u1"), 1),
    "BOOL": (np.dtype("?"), 1),
}
FLOAT_DTYPES = ("F32", "F16", "BF16")
MAX_HEADER_BYTES = 100 * 1024 * 1024
PAGE = mmap.PAGESIZE


@dataclass
class Shard:
    """One memory-mapped safetensors file."""

    path: Path
    data_start: int
    size: int
    _mm: mmap.mmap | None = field(default=None, repr=False)
    _fd: int | None = field(default=None, repr=False)

    def fileno(self) -> int:
        """A read-only descriptor of the shard (for kernel-side copies)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def view(self, start: int, stop: int) -> memoryview:
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return memoryview(self._mm)[self.data_start + start : self.data_start + stop]

    def release(self, start: int, stop: int) -> None:
        """Drop the pages of [start, stop) from this process's resident set."""
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        lo = (self.data_start + start) // PAGE * PAGE
        hi = min(self.size, self.data_start + stop)
        if hi > lo:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive somewhere; the OS unmaps at exit
                pass
            self._mm = None


@dataclass(frozen=True)
class FileSlice:
    """``nbytes`` bytes at ``offset`` of an open file: a tensor piece copied file to file by the kernel."""

    fd: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor in a shard: metadata now, bytes on demand."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: Shard
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start

    def file_slice(self) -> FileSlice:
        """Where the stored bytes lie in the shard file, for a copy that never maps them."""
        return FileSlice(self.shard.fileno(), self.shard.data_start + self.start, self.nbytes)

    def raw(self) -> memoryview:
        """The stored bytes, zero-copy from the memory map."""
        return self.shard.view(self.start, self.stop)

    def array(self) -> np.ndarray:
        """A read-only numpy view in the stored dtype (BF16 viewed as uint16)."""
        return np.frombuffer(self.raw(), dtype=DTYPES[self.dtype][0]).reshape(self.shape)

    def release(self, lo: int = 0, hi: int | None = None) -> None:
        """Drop bytes [lo, hi) of this tensor from the resident set (best effort)."""
        try:
            self.shard.release(self.start + lo, self.start + (self.nbytes if hi is None else hi))
        except (ValueError, OSError):  # the mapping is already gone
            pass


def _fail(path: Path, what: str, fix: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; fix: {fix}")


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """Parse and validate a safetensors header; return (data start offset, tensor table)."""
    size = path.stat().st_size
    redownload = "re-download or re-save the checkpoint"
    if size < 8:
        raise _fail(path, f"truncated safetensors file ({size} bytes, no header)", redownload)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise _fail(path, f"safetensors header claims {n} bytes (limit {MAX_HEADER_BYTES}); the file is corrupt", redownload)
        if 8 + n > size:
            raise _fail(path, f"truncated safetensors file: header needs {8 + n} bytes, file has {size}", redownload)
        blob = f.read(n)
    try:
        header = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"corrupt safetensors header (not JSON: {e.msg if hasattr(e, 'msg') else e})", redownload) from None
    if not isinstance(header, dict):
        raise _fail(path, "corrupt safetensors header (not a JSON object)", redownload)
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise _fail(path, f"tensor {name!r}: header entry lacks dtype/shape/data_offsets", redownload)
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise _fail(path, f"tensor {name!r}: unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})", "save the checkpoint in F32, F16 or BF16")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise _fail(path, f"tensor {name!r}: bad shape {shape!r}", redownload)
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs) and 0 <= offs[0] <= offs[1]):
            raise _fail(path, f"tensor {name!r}: bad data_offsets {offs!r}", redownload)
        want = math.prod(shape) * DTYPES[dtype][1]
        if offs[1] - offs[0] != want:
            raise _fail(path, f"tensor {name!r}: {offs[1] - offs[0]} bytes stored, shape {shape} x {dtype} needs {want}", redownload)
        spans.append((offs[0], offs[1], name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise _fail(path, f"tensor {name!r}: data starts at {begin}, expected {pos} (overlapping or gapped offsets)", redownload)
        pos = end
    if pos > data_len:
        raise _fail(path, f"truncated safetensors file: tensors need {pos} data bytes, file has {data_len}", redownload)
    if pos != data_len:
        raise _fail(path, f"{data_len - pos} trailing bytes after the last tensor; the file is corrupt", redownload)
    return 8 + n, header


@dataclass
class Checkpoint:
    """A validated HF model directory with lazily readable tensors."""

    root: Path
    config: dict[str, Any]
    tensors: dict[str, TensorRef]
    shards: list[Shard]

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    def __iter__(self) -> Iterator[TensorRef]:
        return iter(self.tensors.values())

    def close(self) -> None:
        for s in self.shards:
            s.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_config(root: Path) -> dict[str, Any]:
    path = root / "config.json"
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory; fix: pass a Hugging Face model directory (config.json + *.safetensors)")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; fix: pass a Hugging Face model directory that contains config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); fix: restore the original config.json") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object; fix: restore the original config.json")
    return config


def weight_files(root: Path, allow_pickle: bool = False) -> list[Path]:
    """The safetensors shards of a checkpoint, in index order; refuses pickles by default."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r}); fix: restore model.safetensors.index.json") from None
        files = list(dict.fromkeys(weight_map.values()))
        for name in files:
            if Path(name).name != name:
                raise CheckpointError(f"{index}: shard name {name!r} is not a plain file name; fix: restore the index")
            if not (root / name).is_file():
                raise CheckpointError(f"{index}: names shard {name!r}, which is missing from {root}; fix: download the missing shard")
        return [root / n for n in files]
    files = sorted(root.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(root.glob("pytorch_model*.bin")) + sorted(root.glob("*.pt")) + sorted(root.glob("*.pth"))
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{pickles[0]}: PyTorch pickle weights can run arbitrary code when loaded and are refused; "
                "fix: convert to safetensors (transformers save_pretrained(safe_serialization=True)) or pass --allow-pickle if you trust the file"
            )
        raise CheckpointError(f"{pickles[0]}: pickle checkpoints are not supported yet; fix: convert to safetensors first")
    raise CheckpointError(f"{root}: no *.safetensors weights found; fix: download the model's safetensors files")


def open_checkpoint(root: str | os.PathLike[str], allow_pickle: bool = False) -> Checkpoint:
    """Validate a model directory and map its shards (no tensor bytes are read)."""
    root = Path(root)
    config = load_config(root)
    tensors: dict[str, TensorRef] = {}
    shards: list[Shard] = []
    index_map: dict[str, str] | None = None
    index = root / "model.safetensors.index.json"
    for path in weight_files(root, allow_pickle):
        start, header = read_safetensors_header(path)
        shard = Shard(path=path, data_start=start, size=path.stat().st_size)
        shards.append(shard)
        for name, info in header.items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name!r} also stored in {tensors[name].shard.path.name}; fix: remove the duplicate shard")
            offs = info["data_offsets"]
            tensors[name] = TensorRef(name, info["dtype"], tuple(info["shape"]), shard, offs[0], offs[1])
    if index.is_file():
        index_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        missing = sorted(set(index_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{index}: lists {missing[0]!r} (and {len(missing) - 1} more) but no shard holds it; fix: re-download the shards")
    return Checkpoint(root=root, config=config, tensors=tensors, shards=shards)
