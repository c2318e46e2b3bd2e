"""Typed errors raised by quantkit.

Every user-facing failure is a :class:`QuantkitError` whose message is one line
naming the file or key, what was expected, what was found, and the fix.  The CLI
prints that line and exits non-zero; ``--debug`` adds the traceback.
"""

from __future__ import annotations


class QuantkitError(Exception):
    """A user-facing error: one line, names the file or key and the fix."""


class CheckpointError(QuantkitError):
    """The Hugging Face checkpoint is missing, malformed or inconsistent."""


class GGUFFormatError(QuantkitError):
    """A file is not GGUF, is truncated, or declares absurd sizes."""


class OutputError(QuantkitError):
    """The output path cannot be written (exists, no space, not a directory)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C, so partial outputs are removed on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
