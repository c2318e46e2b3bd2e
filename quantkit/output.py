"""Atomic output files: temp file in the target directory, fsync, rename.

An interrupt, an error or a full disk never leaves a partial file at the
target path, and an existing file is only replaced when the caller says so.

Not for: what goes into the file (see ``quantkit.gguf_write``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from quantkit.errors import OutputError


def check_target(path: Path, force: bool) -> None:
    """Refuse a missing parent directory, a directory target, or an existing file without force."""
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; fix: give a file name such as {path / 'model.gguf'}")
    if not path.parent.is_dir():
        raise OutputError(f"{path.parent}: directory does not exist; fix: create it first (mkdir -p {path.parent})")
    if path.exists() and not force:
        raise OutputError(f"{path}: already exists; fix: pass --force to overwrite it or choose another path")


def check_free_space(path: Path, need: int, margin: float = 1.01) -> None:
    free = shutil.disk_usage(path.parent).free
    if free < need * margin:
        raise OutputError(
            f"{path.parent}: {free / 2**30:.2f} GiB free, the output needs {need / 2**30:.2f} GiB; fix: free space or write elsewhere"
        )


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and rename it onto ``path``.

    On any exception (KeyboardInterrupt included) the temp file is removed and
    ``path`` is left untouched.
    """
    path = Path(path)
    check_target(path, force)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a finished file gets the usual mode, as open() would give
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if path.exists() and not force:  # appeared while we were writing
            raise OutputError(f"{path}: appeared during the conversion; fix: pass --force to overwrite it")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
