"""Atomic output files: temp file in the target directory, fsync, rename.

An interrupt, an error or a full disk never leaves a partial file at the
target path, and an existing file is only replaced when the caller says so.
:func:`atomic_files` does the same for a set of files that belong together
(a split GGUF): all are renamed at the end, or none is left.

Not for: what goes into the file (see ``quantkit.format.gguf_write``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from quantkit.errors import OutputError

log = logging.getLogger(__name__)


def check_target(path: Path, force: bool, inputs: tuple[Path | str, ...] = ()) -> None:
    """Refuse a missing parent directory, a directory target, or an existing file without force.

    A symbolic link at the target counts as existing even when it dangles: replacing it
    needs ``--force`` like any other file.  ``inputs`` are the files (or directories) the
    command reads: the output may not be one of them or lie inside one, even with ``--force``.
    """
    raw = os.fspath(path)
    if raw.endswith(os.sep) or raw in ("", "."):
        raise OutputError(f"{raw!r}: names a directory, not a file; fix: give a file name such as {Path(raw or '.') / 'model.gguf'}")
    path = Path(path)
    try:
        _check_target(path, force, inputs)
    except OSError as e:  # a name too long, a path through a file, no permission to look
        raise OutputError(f"{raw[:200]}: cannot be used as an output path ({e.strerror or e}); fix: choose another path") from None


def _check_target(path: Path, force: bool, inputs: tuple[Path | str, ...]) -> None:
    if len(os.fsencode(path.name)) > 255:  # NAME_MAX: the rename at the end would fail after all the work
        raise OSError(36, "File name too long")
    target = path.resolve()
    for given in inputs:
        try:
            src = Path(given).resolve()
        except (OSError, RuntimeError):  # a symlink loop: no file the output could be (reading it fails with its own error)
            continue
        if target == src or src in target.parents:
            raise OutputError(f"{path}: is {'inside ' if target != src else ''}the input {given}; fix: write the output elsewhere")
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; fix: give a file name such as {path / 'model.gguf'}")
    if not path.parent.is_dir():
        raise OutputError(f"{path.parent}: directory does not exist; fix: create it first (mkdir -p {path.parent})")
    if path.exists() and not path.is_file():  # a device, FIFO or socket: never replaced, not even with --force
        raise OutputError(f"{path}: not a regular file (a device, pipe or socket); fix: give a file path")
    if os.path.lexists(path) and not force:
        what = "is a symbolic link" + (" to a missing file" if not path.exists() else "") if path.is_symlink() else "already exists"
        raise OutputError(f"{path}: {what}; fix: pass --force to overwrite it or choose another path")


def partial_prefix(path: Path) -> str:
    """The name prefix of this process's temporary files for ``path``: ``.NAME.PID.``.

    The process id in the name lets a later run tell a partial file of a process
    that died (SIGKILL, power loss) from one that is still being written.
    """
    return f".{Path(path).name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_partials(path: Path) -> list[Path]:
    """Remove temporary files (or directories) for ``path`` left by processes that no longer run.

    Returns what was removed; each removal is logged as a warning.  Partial files of
    live processes are left alone.
    """
    path = Path(path)
    pattern = re.compile(r"\." + re.escape(path.name) + r"\.(\d+)\.[a-z0-9_]+\.partial")  # mkstemp: 8 of [a-z0-9_]
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        stale = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(stale)
            else:
                stale.unlink()
        except OSError as e:
            log.warning("%s: stale partial output of an interrupted run (pid %s) could not be removed: %s", stale, m.group(1), e)
            continue
        log.warning("%s: removed the partial output of an interrupted run (pid %s)", stale, m.group(1))
        removed.append(stale)
    return removed


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
    clean_stale_partials(path)
    fd, tmp_name = tempfile.mkstemp(prefix=partial_prefix(path), suffix=".partial", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a finished file gets the usual mode, as open() would give
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if os.path.lexists(path) and not force:  # appeared while we were writing
            raise OutputError(f"{path}: appeared during the conversion; fix: pass --force to overwrite it")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_files(paths: Sequence[Path], force: bool = False) -> Iterator[list[Path]]:
    """:func:`atomic_file` for a set of files that only make sense together (the parts of a split GGUF).

    Yields one temporary path beside each target; once the body returns, every temporary file is
    fsynced, then all are renamed onto their targets.  On any exception (KeyboardInterrupt included),
    before or during the renames, every temporary file is removed and so is every target already
    renamed in this call: no part of the set is left behind, not even the complete ones.
    """
    paths = [Path(p) for p in paths]
    for p in paths:
        check_target(p, force)
        clean_stale_partials(p)
    tmps: list[Path] = []
    done: list[Path] = []
    try:
        for p in paths:
            fd, tmp_name = tempfile.mkstemp(prefix=partial_prefix(p), suffix=".partial", dir=p.parent)
            tmps.append(Path(tmp_name))
            os.fchmod(fd, 0o666 & ~_umask())
            os.close(fd)
        yield list(tmps)
        for tmp in tmps:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for p in paths:
            if os.path.lexists(p) and not force:  # appeared while we were writing
                raise OutputError(f"{p}: appeared during the conversion; fix: pass --force to overwrite it")
        for tmp, p in zip(tmps, paths):
            os.replace(tmp, p)
            done.append(p)
        for d in dict.fromkeys(p.parent for p in paths):
            fsync_dir(d)
    except BaseException:
        for f in (*tmps, *done):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        raise
