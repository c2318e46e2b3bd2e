"""Reading a Hugging Face checkpoint directory safely and lazily.

Validates ``config.json``, the index and every safetensors header before any
tensor is touched (header size cap, known dtypes, in-bounds contiguous offsets,
byte sizes equal to shape x dtype, every tensor in the shard the index names),
memory-maps each shard, and hands out
:class:`TensorRef` handles whose bytes are read only when asked for.  Pages read
from a shard can be dropped again with :meth:`TensorRef.release`, so a
streaming conversion keeps a bounded resident set whatever the model size.

A quantised checkpoint (``quantization_config``: FP8 with block scales, compressed-tensors, MXFP4)
hands out its quantised weights as :class:`QuantRef`: float32 values decoded a few rows at
a time by ``quantkit.hf.quantized``, their scale tensors consumed (not model tensors).

Every file of the directory is untrusted: :func:`read_json` / :func:`read_file`
read only regular files (no directories, symlink loops or pipes) of bounded size
and turn any failure -- bad UTF-8, JSON errors, nesting past the recursion
limit, integers too long to convert -- into one :class:`CheckpointError` line.

Not for: name mapping or per-architecture transforms (see ``quantkit.converters``).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from quantkit.errors import CheckpointError
from quantkit.format.gguf_write import FileSlice
from quantkit.hf import quantized

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
    # FP8 (quantised checkpoints, quantkit.hf.quantized): numpy has no such dtypes, the bytes are viewed as uint8
    "F8_E4M3": (np.dtype("u1"), 1),
    "F8_E5M2": (np.dtype("u1"), 1),
    "F8_E8M0": (np.dtype("u1"), 1),
}
FLOAT_DTYPES = ("F32", "F16", "BF16")
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: config.json, the index and tokenizer files (tokenizer.json, .model, _config.json): the largest real ones are a few tens of MiB
MAX_SIDE_FILE_BYTES = 128 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"
PAGE = mmap.PAGESIZE
SPILL = 2 << 20  # bytes on either side of a quantised weight dropped with it (page-cache folios mapped around it)
MAX_SHOWN = 80  # characters of an untrusted value echoed in an error


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
        """Drop bytes [lo, hi) of this tensor from the resident set (best effort; a range past its edges reaches into its neighbours)."""
        try:
            self.shard.release(max(0, self.start + lo), self.start + (self.nbytes if hi is None else hi))
        except (ValueError, OSError):  # the mapping is already gone
            pass


@dataclass(frozen=True)
class QuantRef(TensorRef):
    """A weight stored quantised (FP8 e4m3, packed integers, MXFP4 blocks): its float32 values, decoded on demand.

    ``dtype`` is "F32" and ``shape`` the weight's (what it hands out); ``shard`` / ``start`` / ``stop``
    are those of the stored tensor.  :meth:`array` is a :class:`quantkit.hf.quantized.Dequantised`:
    indexing its first axis (an expert, a range of rows) decodes just that, scale by scale, so a
    streaming conversion never holds more than a piece of it in float.  :meth:`release` takes byte
    offsets of the float32 values and drops the matching pages of the stored bytes and scales.
    """

    quant: quantized.QuantWeight | None = None
    stored: TensorRef | None = None
    scale: TensorRef | None = None
    zero: TensorRef | None = None
    qtype: None = None  # stored as no GGML type: the pipeline never copies its bytes as they are

    @property
    def nbytes(self) -> int:
        return 4 * math.prod(self.shape)

    def _rows(self, m: int, rows: slice | np.ndarray) -> np.ndarray:
        assert self.quant is not None and self.stored is not None and self.scale is not None
        zero = None if self.zero is None else self.zero.array()
        return quantized.decode_rows(self.quant, self.stored.array(), self.scale.array(), zero, m, rows)

    def array(self) -> quantized.Dequantised:  # type: ignore[override]
        return quantized.Dequantised(self.shape, self._rows)

    def raw(self) -> memoryview:
        """The float32 bytes of the values (decoded whole: for small kept tensors, not for streaming)."""
        return memoryview(np.ascontiguousarray(np.asarray(self.array())).reshape(-1).view(np.uint8))

    def file_slice(self) -> FileSlice:
        raise TypeError(f"{self.name}: the stored bytes of a quantised weight are not its values")

    def release(self, lo: int = 0, hi: int | None = None) -> None:
        """Drop the stored pages behind float32 bytes [lo, hi) of the values: the rows they cover, in the weight and its scales."""
        cols = max(1, self.shape[-1])
        total = max(1, math.prod(self.shape) // cols)
        hi = self.nbytes if hi is None else hi
        r0, r1 = lo // 4 // cols, -(-(hi // 4) // cols)
        for ref in (self.stored, self.scale, self.zero):
            if ref is not None:
                start, end = r0 * ref.nbytes // total, -(-r1 * ref.nbytes // total)
                # at the tensor's edges the pages the kernel mapped around it go too (large page-cache folios reach into the
                # neighbours; a neighbour that needs them maps them again from the page cache): quantised weights are small
                # and many, and what is mapped around each would add up
                ref.release(start - (SPILL if start == 0 else 0), end + (SPILL if end >= ref.nbytes else 0))


def _fail(path: Path, what: str, fix: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; fix: {fix}")


def shown(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` cut to ``limit`` characters: how an untrusted value is echoed in an error."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def json_kind(value: Any) -> str:
    """The JSON name of a parsed value's type, for "expected an object, found an array"."""
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "integer", float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def not_a_file(path: Path) -> str | None:
    """Why ``path`` is not a regular file that can be opened, or None if it is one."""
    try:
        st = path.stat()
    except OSError as e:
        if path.is_symlink():
            return f"is a symlink that leads nowhere or loops ({e.strerror or e})"
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file (a device, pipe or socket)"
    return None


def _open_regular(path: Path, fix: str) -> int:
    """A read-only descriptor of ``path``, refused unless it is a regular file (never blocks on a pipe)."""
    why = not_a_file(path)
    if why is None:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            why = f"cannot be read ({e.strerror or e})"
        else:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return fd
            os.close(fd)
            why = "is not a regular file"
    raise _fail(path, why, fix)


def read_file(path: Path, fix: str, limit: int = MAX_SIDE_FILE_BYTES) -> bytes:
    """The bytes of a small file of a checkpoint (config, index, tokenizer): a regular file of at most ``limit`` bytes."""
    fd = _open_regular(path, fix)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise _fail(path, f"{size:,} bytes, more than the {limit:,} such a file may have", fix)
        chunks, got = [], 0
        while got <= limit and (b := os.read(fd, min(1 << 24, limit + 1 - got))):
            chunks.append(b)
            got += len(b)
    except OSError as e:
        raise _fail(path, f"cannot be read ({e.strerror or e})", fix) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise _fail(path, f"more than the {limit:,} bytes such a file may have", fix)
    return data


def parse_json(path: Path, data: bytes, fix: str) -> Any:
    """``data`` (the UTF-8 bytes of ``path``) parsed as JSON; any failure is one CheckpointError."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _fail(path, f"not UTF-8 text ({e.reason} at byte {e.start})", fix) from None
    except RecursionError:
        raise _fail(path, "JSON nested too deeply to parse; the file is corrupt", fix) from None
    except json.JSONDecodeError as e:
        raise _fail(path, f"not valid JSON ({e})", fix) from None
    except ValueError:  # an integer literal of more digits than Python converts
        raise _fail(path, "not valid JSON (an integer literal thousands of digits long)", fix) from None


def read_json(path: Path, fix: str, limit: int = MAX_SIDE_FILE_BYTES) -> Any:
    """A JSON file of a checkpoint, refused in one line if it is not a readable regular file of valid JSON."""
    return parse_json(path, read_file(path, fix, limit), fix)


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """Parse and validate a safetensors header; return (data start offset, tensor table)."""
    redownload = "re-download or re-save the checkpoint"
    fd = _open_regular(path, redownload)
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise _fail(path, f"truncated safetensors file ({size} bytes, no header)", redownload)
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if n > MAX_HEADER_BYTES:
            raise _fail(path, f"safetensors header claims {n} bytes (limit {MAX_HEADER_BYTES}); the file is corrupt", redownload)
        if 8 + n > size:
            raise _fail(path, f"truncated safetensors file: header needs {8 + n} bytes, file has {size}", redownload)
        blob = b""
        while len(blob) < n and (more := os.pread(fd, n - len(blob), 8 + len(blob))):
            blob += more
    except OSError as e:
        raise _fail(path, f"cannot be read ({e.strerror or e})", redownload) from None
    finally:
        os.close(fd)
    if len(blob) != n:
        raise _fail(path, f"truncated safetensors file: header needs {8 + n} bytes, read {8 + len(blob)}", redownload)
    try:
        header = json.loads(blob, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise _fail(path, f"corrupt safetensors header (tensor {shown(e.args[0])} listed twice)", redownload) from None
    except RecursionError:
        raise _fail(path, "corrupt safetensors header (JSON nested too deeply)", redownload) from None
    except json.JSONDecodeError as e:
        raise _fail(path, f"corrupt safetensors header (not JSON: {e.msg})", redownload) from None
    except ValueError as e:  # not UTF-8, or an integer literal of more digits than Python converts
        raise _fail(path, f"corrupt safetensors header (not UTF-8 JSON: {str(e)[:80]})", redownload) from None
    if not isinstance(header, dict):
        raise _fail(path, "corrupt safetensors header (not a JSON object)", redownload)
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _fail(path, "corrupt safetensors header (__metadata__ is not an object of strings)", redownload)
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise _fail(path, f"tensor {shown(name)}: header entry lacks dtype/shape/data_offsets", redownload)
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise _fail(path, f"tensor {shown(name)}: unsupported dtype {shown(dtype)} (supported: {', '.join(DTYPES)})", "save the checkpoint in F32, F16 or BF16")
        if not (isinstance(shape, list) and all(_count(d) for d in shape)):
            raise _fail(path, f"tensor {shown(name)}: bad shape {shown(shape)}", redownload)
        if not (isinstance(offs, list) and len(offs) == 2 and all(_count(o) for o in offs) and offs[0] <= offs[1]):
            raise _fail(path, f"tensor {shown(name)}: bad data_offsets {shown(offs)}", redownload)
        want = math.prod(shape) * DTYPES[dtype][1]
        if offs[1] - offs[0] != want:
            raise _fail(path, f"tensor {shown(name)}: {offs[1] - offs[0]} bytes stored, shape {shown(shape)} x {dtype} needs {want}", redownload)
        spans.append((offs[0], offs[1], name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise _fail(path, f"tensor {shown(name)}: data starts at {begin}, expected {pos} (overlapping or gapped offsets)", redownload)
        pos = end
    if pos > data_len:
        raise _fail(path, f"truncated safetensors file: tensors need {pos} data bytes, file has {data_len}", redownload)
    if pos != data_len:
        raise _fail(path, f"{data_len - pos} trailing bytes after the last tensor; the file is corrupt", redownload)
    return 8 + n, header


def _count(v: Any) -> bool:
    """A JSON non-negative integer (not a boolean)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


@dataclass
class Checkpoint:
    """A validated HF model directory with lazily readable tensors."""

    root: Path
    config: dict[str, Any]
    tensors: dict[str, TensorRef]
    shards: list[Shard]
    quantization: quantized.SourceQuant | None = None  # a quantised source (FP8, compressed-tensors): what it holds

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
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: missing; fix: pass a Hugging Face model directory that contains config.json")
    config = read_json(path, "restore the original config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found a JSON {json_kind(config)}; fix: restore the original config.json")
    return config


def read_index(root: Path) -> dict[str, str] | None:
    """``weight_map`` of ``model.safetensors.index.json`` (tensor name -> shard file name), or None without an index."""
    index = root / INDEX_NAME
    if not os.path.lexists(index):
        return None
    fix = f"restore {INDEX_NAME}"
    data = read_json(index, fix)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        found = f"a JSON {json_kind(data)}" if not isinstance(data, dict) else f"'weight_map' a JSON {json_kind(weight_map)}"
        raise CheckpointError(f"{index}: not a valid safetensors index (expected an object whose 'weight_map' maps tensor names to shard file names, found {found}); fix: {fix}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index}: weight_map[{shown(name)}] is {shown(shard)}, expected a shard file name; fix: {fix}")
    return weight_map


def _check_weight_file(path: Path, where: Path | None = None) -> None:
    why = not_a_file(path)
    if why is not None:
        named = f"{where}: names shard {path.name!r}, which " if where is not None else f"{path}: "
        raise CheckpointError(f"{named}{why}; fix: replace it with the model's safetensors file")


def weight_files(root: Path, allow_pickle: bool = False, weight_map: dict[str, str] | None = None) -> list[Path]:
    """The safetensors shards of a checkpoint, in index order; refuses pickles by default."""
    index = root / INDEX_NAME
    if weight_map is None:
        weight_map = read_index(root)
    if weight_map is not None:
        files = list(dict.fromkeys(weight_map.values()))
        for name in files:
            if Path(name).name != name or name in ("", ".", ".."):
                raise CheckpointError(f"{index}: shard name {shown(name)} is not a plain file name; fix: restore the index")
            if not os.path.lexists(root / name):
                raise CheckpointError(f"{index}: names shard {shown(name)}, which is missing from {root}; fix: download the missing shard")
            _check_weight_file(root / name, index)
        return [root / n for n in files]
    files = sorted(root.glob("*.safetensors"))
    for path in files:
        _check_weight_file(path)
    if files:
        return files
    pickles = sorted(p for p in root.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{pickles[0]}: PyTorch pickle weights can run arbitrary code when loaded and are refused; "
                "fix: convert to safetensors (transformers save_pretrained(safe_serialization=True)) or pass --allow-pickle if you trust the file"
            )
        raise CheckpointError(f"{pickles[0]}: pickle checkpoints are not supported yet; fix: convert to safetensors first")
    raise CheckpointError(f"{root}: no *.safetensors weights found; fix: download the model's safetensors files")


#: weight files that are Python pickles (torch.load runs code from them): refused wherever a model directory is read
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: a safetensors header naming a tensor twice is corrupt (JSON keeps the last)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def open_checkpoint(root: str | os.PathLike[str], allow_pickle: bool = False) -> Checkpoint:
    """Validate a model directory and map its shards (no tensor bytes are read)."""
    root = Path(root)
    config = load_config(root)
    tensors: dict[str, TensorRef] = {}
    shards: list[Shard] = []
    index = root / INDEX_NAME
    index_map = read_index(root)
    for path in weight_files(root, allow_pickle, index_map):
        start, header = read_safetensors_header(path)
        shard = Shard(path=path, data_start=start, size=path.stat().st_size)
        shards.append(shard)
        for name, info in header.items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {shown(name)} also stored in {tensors[name].shard.path.name}; fix: remove the duplicate shard")
            offs = info["data_offsets"]
            tensors[name] = TensorRef(name, info["dtype"], tuple(info["shape"]), shard, offs[0], offs[1])
    if index_map is not None:
        missing = sorted(set(index_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{index}: lists {shown(missing[0])} (and {len(missing) - 1} more) but no shard holds it; fix: re-download the shards")
        for name, shard_name in index_map.items():
            held = tensors[name].shard.path.name
            if held != shard_name:
                raise CheckpointError(
                    f"{index}: says tensor {shown(name)} is in {shown(shard_name)}, but {held!r} holds it; fix: restore the index that came with these shards"
                )
    try:
        tensors, source = _dequantised(root, config, tensors)
    except BaseException:
        for s in shards:
            s.close()
        raise
    return Checkpoint(root=root, config=config, tensors=tensors, shards=shards, quantization=source)


def _dequantised(root: Path, config: dict[str, Any], tensors: dict[str, TensorRef]) -> tuple[dict[str, TensorRef], quantized.SourceQuant | None]:
    """The tensors of a quantised checkpoint as the model sees them: each quantised weight one :class:`QuantRef`, its scales gone."""
    found = quantized.find_quantised(
        config, {n: (r.dtype, r.shape) for n, r in tensors.items()}, str(root / "config.json"),
        where=lambda n: str(tensors[n].shard.path), read_ints=lambda n: np.array(tensors[n].array()),
    )
    if not found.weights and not found.consumed:
        return tensors, None
    out: dict[str, TensorRef] = {}
    for name, ref in tensors.items():
        w = found.weights.get(name)
        if w is not None:
            if w.name != name and w.name in tensors:
                raise CheckpointError(f"{ref.shard.path}: tensors {shown(name)} and {shown(w.name)} are the same weight; fix: remove one of them")
            out[w.name] = QuantRef(w.name, "F32", w.shape, ref.shard, ref.start, ref.stop, quant=w, stored=_as_blocks(w, ref), scale=tensors[w.scale],
                                   zero=None if w.zero is None else tensors[w.zero])
        elif name not in found.consumed:
            out[name] = ref
    return out, found.source


def _as_blocks(w: quantized.QuantWeight, ref: TensorRef) -> TensorRef:
    """The stored tensor of a quantised weight as its decoder reads it: DeepSeek V4's FP4 experts (I8 [rows, cols/2]) as the
    same bytes in MXFP4 blocks (U8 [rows, cols/32, 16], as gpt-oss stores them), which the pipeline can carry into GGUF MXFP4."""
    if w.storage != "mxfp4" or ref.dtype != "I8":
        return ref
    half = quantized.MXFP4_BLOCK // 2
    return TensorRef(ref.name, "U8", (*ref.shape[:-1], ref.shape[-1] // half, half), ref.shard, ref.start, ref.stop)
