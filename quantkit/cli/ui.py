"""What the command line shows: consoles, one-line errors, tables of untrusted text, the library-call wrapper.

Shared by ``quantkit.cli.main`` and ``quantkit.cli.eval_commands`` (which import it; it imports neither).
Untrusted strings (file names, GGUF keys and values, tensor names, error text) are
never read as rich markup; an error is one capped line.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import TYPE_CHECKING, Any, Callable

import typer

from quantkit.errors import QuantkitError, Terminated

if TYPE_CHECKING:
    from rich.console import Console


class _Console:
    """rich's Console for stdout or stderr, made on first use.

    rich takes ~40 ms to import; a short command in a pipeline (``eval ppl`` printing
    one line, no terminal for a progress bar) never needs it.
    """

    def __init__(self, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr)
        return self._console

    @property
    def is_terminal(self) -> bool:
        stream = sys.stderr if self._stderr else sys.stdout
        if self._console is None and not (stream.isatty() or any(k in os.environ for k in ("FORCE_COLOR", "TTY_COMPATIBLE", "FORCE_TERMINAL"))):
            return False  # what rich would say, without importing it
        return self.console.is_terminal

    def say(self, label: str, style: str, message: str) -> None:
        """``label: message`` on one line: the label styled, the message shown as it is (never read as markup)."""
        if not self.is_terminal:
            (sys.stderr if self._stderr else sys.stdout).write(f"{label} {message}\n")
            return
        from rich.text import Text

        self.console.print(Text.assemble((label, style), " ", message), highlight=False, soft_wrap=True)

    def line(self, text: str) -> None:
        """One plain line (no markup): through rich on a terminal, written as is otherwise."""
        if self.is_terminal:
            self.console.print(text, markup=False)
        else:
            (sys.stderr if self._stderr else sys.stdout).write(text + "\n")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


out = _Console()
err = _Console(stderr=True)
_state = {"debug": False}

#: the longest error line printed; the rest is cut (a file can put megabytes into a key or value)
MAX_ERROR_CHARS = 2000


def esc(value: object) -> str:
    """``value`` as text that rich prints as it is: file names, keys and values from files are untrusted."""
    from rich.markup import escape

    return escape(str(value))


def cap(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit:,} more characters)"


def _plain(value: object, style: str = "") -> Any:
    """A table cell or title shown as it is (rich reads plain strings in tables as markup)."""
    from rich.text import Text

    return value if isinstance(value, Text) else Text(str(value), style=style)


def add_row(table: Any, *cells: object) -> None:
    """``table.add_row`` with every cell shown as it is: names and values from files are untrusted."""
    table.add_row(*(_plain(c) for c in cells))


def _run(fn: Callable[[], Any], how_far: Callable[[], str | None] | None = None) -> Any:
    """Call library code; turn its errors into one line and an exit code.  ``how_far``: what an interrupted long step had
    done ("after 12 of 64 chunks"), said on the same line."""
    def done() -> str:
        said = how_far() if how_far is not None else None
        return f"stopped {said}; " if said else ""

    try:
        return fn()
    except QuantkitError as e:
        if _state["debug"]:
            traceback.print_exc()
        error_line(e)
        raise typer.Exit(1) from None
    except Terminated as e:
        err.say("terminated:", "yellow", f"signal {e.signum}; {done()}nothing was written at the output path")
        raise typer.Exit(128 + e.signum) from None
    except KeyboardInterrupt:
        err.say("interrupted:", "yellow", f"{done()}nothing was written at the output path")
        raise typer.Exit(130) from None


def error_line(e: BaseException) -> None:
    """The one line a user sees for an error: newlines folded, length capped, never read as markup."""
    err.say("error:", "bold red", cap(" ".join(str(e).split("\n"))))


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def usage_error_line(e: Any) -> None:
    """A usage error (a missing argument, an unknown option, a bad value: click's exit 2) as one line naming the
    option and the fix, in place of typer's multi-line box; installed by :func:`one_line_usage_errors`."""
    msg = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)  # a usage error's (typer vendors click: its classes, not the click package's)
    where = getattr(ctx, "command_path", None) or "quantkit COMMAND"
    msg = msg.rstrip(".") + f"; fix: see '{where} --help'"
    error_line(Exception(msg))


def one_line_usage_errors() -> None:
    """Make typer print usage errors with :func:`usage_error_line`.  typer imports its rich formatter (and rich) only
    when an error is shown, so the patch waits for that import: a command that succeeds never loads rich."""
    import importlib.abc
    import importlib.util

    name = "typer.rich_utils"
    if name in sys.modules:
        sys.modules[name].rich_format_error = usage_error_line  # type: ignore[attr-defined]
        return

    class Patch(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
            if fullname != name:
                return None
            sys.meta_path.remove(self)  # the real spec, then this finder is done
            spec = importlib.util.find_spec(fullname)
            if spec is None or spec.loader is None:
                return spec
            run = spec.loader.exec_module

            def exec_module(module: Any) -> None:
                run(module)
                module.rich_format_error = usage_error_line

            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
            return spec

    if not any(type(f).__name__ == "Patch" and getattr(f, "_qk", False) for f in sys.meta_path):
        finder = Patch()
        finder._qk = True  # type: ignore[attr-defined]
        sys.meta_path.insert(0, finder)
