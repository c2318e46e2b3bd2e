"""Chat sessions as data: history, context trimming, commands, multi-line input,
save / load, and chat templates.

Everything here is pure or file I/O: the model enters only through callables
(``tokenize``) and strings (the template source and its special tokens), so
every rule is testable without loading a model.  Templates are rendered by
llama-cpp-python's :class:`Jinja2ChatFormatter` (its globals, filters and
extensions) in a sandboxed Jinja environment that is also bounded: a chat
template stored in a GGUF is untrusted code, and a loop nest or a string
repeated a billion times would otherwise hang or exhaust memory.  Repetition
and powers are checked before they run, a rendering stops after
:data:`MAX_RENDER_SECONDS` (main thread) and its text is capped at
:data:`MAX_RENDER_CHARS`.

Not for: running the model (``quantkit.engine.runtime``) or the terminal (``quantkit.cli.main``).
"""

from __future__ import annotations

import functools
import json
import os
import logging
import signal
import stat
import threading
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from quantkit.errors import QuantkitError
from quantkit.format.output import atomic_file

log = logging.getLogger(__name__)

HISTORY_FORMAT = "quantkit-chat"
HISTORY_VERSION = 1
MAX_HISTORY_BYTES = 16 * 2**20
#: The GGUF metadata key that holds the model's own chat template.
TEMPLATE_KEY = "tokenizer.chat_template"
#: Longer templates are refused before Jinja compiles them (real ones are a few KiB; tool-calling ones ~20 KiB).
MAX_TEMPLATE_CHARS = 2**20
#: A rendering that takes longer is stopped (real templates take milliseconds; a loop nest of a hostile one never ends).
MAX_RENDER_SECONDS = 5.0
#: Longest prompt text a template may produce, and the most a ``*`` in it may build (far beyond any context window).
MAX_RENDER_CHARS = 16 * 2**20
#: What to do about a GGUF whose own template is broken.
TEMPLATE_FIX = "pass --chat-template chatml, or re-convert the model with a corrected chat_template in tokenizer_config.json"

#: Templates used when a GGUF carries no ``tokenizer.chat_template``: name -> (Jinja source, stop strings).
FALLBACK_TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        ("<|im_end|>",),
    ),
}
DEFAULT_FALLBACK = "chatml"


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` capped at ``limit`` characters: how an untrusted value is echoed in a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clipped(text: str, limit: int = 160) -> str:
    """A message from a library (Jinja, json, the OS) as one capped line: it may quote untrusted text."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --- templates --------------------------------------------------------------


def _template_line(e: BaseException) -> int | None:
    """The template line an exception came from: Jinja rewrites tracebacks to ``<template>`` frames."""
    lineno = getattr(e, "lineno", None)
    if isinstance(lineno, int):
        return lineno
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "<template>"]
    return frames[-1].lineno if frames else None


class RenderLimit(Exception):
    """A template went past :data:`MAX_RENDER_SECONDS` or :data:`MAX_RENDER_CHARS`."""


@functools.cache
def _bounded_formatter_class() -> Any:
    """llama-cpp-python's Jinja2ChatFormatter on a sandbox whose ``*`` and ``**`` are checked before they run."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_RENDER_CHARS:
                        raise RenderLimit(f"repeats a sequence of {len(seq):,} {n:,} times, more than {MAX_RENDER_CHARS:,} items")
            elif operator == "**" and isinstance(right, (int, float)) and abs(right) > 64 and isinstance(left, (int, float)) and abs(left) > 1:
                raise RenderLimit(f"raises to the power {shown(right)}")
            return super().call_binop(context, operator, left, right)

    class BoundedFormatter(Jinja2ChatFormatter):
        def __init__(self, template: str, eos_token: str, bos_token: str, add_generation_prompt: bool = True) -> None:
            # Jinja2ChatFormatter.__init__ with the bounded sandbox: the same options, extensions and tojson filter
            self.template, self.eos_token, self.bos_token = template, eos_token, bos_token
            self.add_generation_prompt, self.stop_token_ids = add_generation_prompt, None
            env = BoundedSandbox(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                 extensions=[Jinja2ChatFormatter.IgnoreGenerationTags, jinja2.ext.loopcontrols])
            env.filters["tojson"] = self.tojson
            self._environment = env.from_string(template)

    return BoundedFormatter


@contextmanager
def _deadline(seconds: float) -> Any:
    """Raise :class:`RenderLimit` in the main thread after ``seconds`` (elsewhere: no limit; signals go to the main thread)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(_sig: int, _frame: Any) -> None:
        raise RenderLimit(f"rendering took longer than {seconds:g} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _raised_by_template(e: BaseException) -> bool:
    """True for the ValueError of the template's own ``raise_exception(...)`` call."""
    frames = traceback.extract_tb(e.__traceback__)
    return isinstance(e, ValueError) and bool(frames) and frames[-1].name == "raise_exception"


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template with the special-token strings it is rendered with."""

    name: str  # "gguf" for the model's own template, else the fallback's name
    source: str
    bos_token: str = ""
    eos_token: str = ""
    stop: tuple[str, ...] = ()
    origin: str = "model"  # the file the template came from, for error messages

    @property
    def where(self) -> str:
        """The template as an error message names it: the file and key, or the fallback's name."""
        return f"{self.origin}: {TEMPLATE_KEY}" if self.name == "gguf" else f"{self.origin}: the {self.name} fallback chat template"

    @property
    def fix(self) -> str:
        return TEMPLATE_FIX if self.name == "gguf" else "report it as a quantkit bug"

    @functools.cached_property
    def _formatter(self) -> Any:
        Jinja2ChatFormatter = _bounded_formatter_class()

        if len(self.source) > MAX_TEMPLATE_CHARS:
            raise QuantkitError(f"{self.where}: {len(self.source):,} characters, more than {MAX_TEMPLATE_CHARS:,}; fix: {self.fix}")
        try:  # llama-cpp-python's formatter on a bounded ImmutableSandboxedEnvironment (the template is untrusted code)
            return Jinja2ChatFormatter(self.source, eos_token=self.eos_token, bos_token=self.bos_token, add_generation_prompt=True)
        except RecursionError:
            raise QuantkitError(f"{self.where}: nested too deeply to compile; fix: {self.fix}") from None
        except Exception as e:  # noqa: BLE001  (anything the compiler of an untrusted template raises)
            raise QuantkitError(f"{self.where}{self._at(e)}: Jinja syntax error: {clipped(getattr(e, 'message', None) or e)}; fix: {self.fix}") from None

    @staticmethod
    def _at(e: BaseException) -> str:
        line = _template_line(e)
        return f" line {line}" if line is not None else ""

    def check(self) -> ChatTemplate:
        """Compile the template now (a syntax error is reported before the first message)."""
        self._formatter  # noqa: B018
        return self

    def render(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt for ``messages`` (OpenAI-style dicts), ending where the assistant speaks."""
        formatter = self._formatter
        try:
            with _deadline(MAX_RENDER_SECONDS):
                prompt = formatter(messages=list(messages)).prompt
        except RenderLimit as e:
            raise QuantkitError(f"{self.where}{self._at(e)}: the template {e}; fix: {self.fix}") from None
        except MemoryError:
            raise QuantkitError(f"{self.where}: rendering ran out of memory; fix: {self.fix}") from None
        except Exception as e:  # noqa: BLE001  (a template is untrusted code: any failure is the template's)
            if _raised_by_template(e):
                raise QuantkitError(
                    f"{self.where}{self._at(e)}: the template refuses this conversation: {clipped(e)}; "
                    "fix: leave out what it refuses (often --system or a role order) or use a model whose template accepts it"
                ) from None
            raise QuantkitError(f"{self.where}{self._at(e)}: rendering failed ({type(e).__name__}: {clipped(e)}); fix: {self.fix}") from None
        if not isinstance(prompt, str):
            raise QuantkitError(f"{self.where}: rendered {type(prompt).__name__}, expected text; fix: {self.fix}")
        if len(prompt) > MAX_RENDER_CHARS:
            raise QuantkitError(f"{self.where}: rendered {len(prompt):,} characters, more than {MAX_RENDER_CHARS:,}; fix: {self.fix}")
        return prompt


def chat_template(
    metadata: Mapping[str, Any],
    bos_token: str = "",
    eos_token: str = "",
    source: str = "model",
    fallback: str = DEFAULT_FALLBACK,
    override: str | None = None,
) -> ChatTemplate:
    """The GGUF's ``tokenizer.chat_template``, or the named fallback with a logged warning.

    ``override`` names a fallback to use even when the GGUF has a template (its own may be broken)."""
    text = metadata.get(TEMPLATE_KEY)
    stop = (eos_token,) if eos_token else ()
    name = override or fallback
    if name not in FALLBACK_TEMPLATES:
        raise QuantkitError(f"unknown chat template {shown(name)}; fix: use one of {', '.join(FALLBACK_TEMPLATES)}")
    if override is None and text is not None and not isinstance(text, str):
        raise QuantkitError(f"{source}: {TEMPLATE_KEY} is a {type(text).__name__} ({shown(text)}), expected text; fix: {TEMPLATE_FIX}")
    if override is None and isinstance(text, str) and text.strip():
        return ChatTemplate("gguf", text, bos_token, eos_token, stop, source)
    if override is None:
        log.warning("%s has no %s; using the %r fallback template, which the model may not have been trained on", source, TEMPLATE_KEY, name)
    body, extra_stop = FALLBACK_TEMPLATES[name]
    return ChatTemplate(name, body, bos_token, eos_token, tuple(dict.fromkeys(stop + extra_stop)), source)


# --- history ----------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    user: str
    assistant: str


@dataclass(frozen=True)
class History:
    """The conversation so far: an optional system prompt and completed turns, oldest first."""

    system: str | None = None
    turns: tuple[Turn, ...] = ()

    def messages(self, pending: str | None = None) -> list[dict[str, str]]:
        """OpenAI-style messages; ``pending`` is the user message awaiting an answer."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for t in self.turns:
            out += [{"role": "user", "content": t.user}, {"role": "assistant", "content": t.assistant}]
        if pending is not None:
            out.append({"role": "user", "content": pending})
        return out

    def add(self, user: str, assistant: str) -> History:
        return replace(self, turns=self.turns + (Turn(user, assistant),))

    def reset(self) -> History:
        """Forget the turns; keep the system prompt."""
        return replace(self, turns=())

    def drop_oldest(self, n: int) -> History:
        return replace(self, turns=self.turns[n:])


@dataclass(frozen=True)
class Prepared:
    """A prompt that fits: the (possibly trimmed) history, its rendering and its tokens."""

    history: History
    prompt: str
    tokens: tuple[int, ...]
    dropped: int  # oldest turns removed to make room


def check_reserve(n_ctx: int, reserve: int) -> None:
    """The answer's room (``--max-tokens``) must leave part of the window for the prompt."""
    if not 0 < reserve < n_ctx:
        raise QuantkitError(f"--max-tokens {reserve} must be between 1 and --ctx {n_ctx} minus the prompt; fix: lower --max-tokens or raise --ctx")


def prepare_turn(
    history: History,
    user: str,
    render: Callable[[Sequence[Mapping[str, str]]], str],
    tokenize: Callable[[str], Sequence[int]],
    n_ctx: int,
    reserve: int,
) -> Prepared:
    """Render ``history`` + ``user``, dropping the oldest turns until the prompt leaves
    ``reserve`` tokens (the answer) free in an ``n_ctx`` window."""
    budget = n_ctx - reserve
    for dropped in range(len(history.turns) + 1):
        kept = history.drop_oldest(dropped)
        prompt = render(kept.messages(user))
        tokens = tuple(tokenize(prompt))
        if len(tokens) <= budget:
            return Prepared(kept, prompt, tokens, dropped)
    raise QuantkitError(
        f"this message needs {len(tokens)} prompt tokens but only {budget} fit (--ctx {n_ctx} minus --max-tokens {reserve}); "
        "fix: shorten the message or the system prompt, raise --ctx or lower --max-tokens"
    )


# --- commands and input -----------------------------------------------------


@dataclass(frozen=True)
class CommandSpec:
    name: str
    arg: str | None  # the argument's name when one is required
    help: str
    aliases: tuple[str, ...] = ()


COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec("help", None, "show this help"),
    CommandSpec("reset", None, "forget the conversation (the system prompt stays)"),
    CommandSpec("save", "FILE", "write the conversation to FILE as JSON"),
    CommandSpec("load", "FILE", "replace the conversation with the one in FILE"),
    CommandSpec("exit", None, "leave (Ctrl-D does the same)", ("quit",)),
)

INPUT_HELP = (
    'End a line with \\ to continue on the next one, or put a message between lines of """. '
    "Ctrl-C stops an answer; Ctrl-D exits."
)


@dataclass(frozen=True)
class Command:
    name: str
    arg: str | None = None


def help_text() -> str:
    rows = [f"/{c.name}{' ' + c.arg if c.arg else ''}".ljust(14) + c.help for c in COMMANDS]
    return "\n".join(rows + [INPUT_HELP])


def parse_command(line: str) -> Command | None:
    """A ``/command [arg]`` line as a :class:`Command`; None for an ordinary message."""
    text = line.strip()
    if not text.startswith("/") or text.startswith("//"):
        return None
    word, _, arg = text[1:].partition(" ")
    spec = next((c for c in COMMANDS if word.lower() in (c.name, *c.aliases)), None)
    if spec is None:
        raise QuantkitError(f"unknown command /{word[:40]}; fix: type /help for the list (start a message with // to send a literal /)")
    arg = arg.strip()
    if spec.arg and not arg:
        raise QuantkitError(f"/{spec.name} needs {spec.arg}; fix: /{spec.name} {spec.arg.lower()}.json")
    if not spec.arg and arg:
        raise QuantkitError(f"/{spec.name} takes no argument (got {shown(arg)}); fix: type /{spec.name} alone")
    return Command(spec.name, arg or None)


def unescape(message: str) -> str:
    """``//text`` sends ``/text``."""
    return message[1:] if message.lstrip().startswith("//") else message


def read_message(read_line: Callable[[str], str], prompt: str = ">>> ", more: str = "... ") -> str:
    """Read one message: a line ending in ``\\`` continues on the next, and a line starting with
    ``\"\"\"`` opens a block closed by a line ending with ``\"\"\"``.  EOFError passes through."""
    first = read_line(prompt)
    if first.lstrip().startswith('"""'):
        return _read_block(first.lstrip()[3:], read_line, more)
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(read_line(more))
    return "\n".join(lines)


def _read_block(opening: str, read_line: Callable[[str], str], more: str) -> str:
    lines: list[str] = []
    line = opening
    while not line.rstrip().endswith('"""'):
        lines.append(line)
        line = read_line(more)
    lines.append(line.rstrip()[:-3])
    return "\n".join(lines).strip("\n")


# --- save / load ------------------------------------------------------------


def history_to_json(history: History) -> dict[str, Any]:
    return {"format": HISTORY_FORMAT, "version": HISTORY_VERSION, "messages": history.messages()}


def _text(value: Any) -> bool:
    """A string that can be written as UTF-8 (no lone surrogates)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def history_from_json(obj: Any, origin: str = "history") -> History:
    """Validate a saved conversation: optional system message, then user/assistant pairs."""

    def bad(where: str, why: str) -> QuantkitError:
        return QuantkitError(f"{origin}: {where}: {why}; fix: pass a file written by /save")

    if not isinstance(obj, dict) or obj.get("format") != HISTORY_FORMAT:
        found = f"a JSON {type(obj).__name__}" if not isinstance(obj, dict) else shown(obj.get("format"))
        raise bad("format", f"expected {HISTORY_FORMAT!r} (found {found})")
    version = obj.get("version")
    if type(version) is not int or version != HISTORY_VERSION:
        raise bad("version", f"{shown(version)} is not supported (expected {HISTORY_VERSION})")
    messages = obj.get("messages")
    if not isinstance(messages, list):
        raise bad("messages", f"expected a list (found {shown(messages)})")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise bad(f"messages[{i}]", f"expected an object with string 'role' and 'content' (found {shown(m)})")
        if not _text(m["content"]) or not _text(m["role"]):
            raise bad(f"messages[{i}]", "holds a lone surrogate, which is not Unicode text")
    has_system = bool(messages) and messages[0]["role"] == "system"
    body = messages[1:] if has_system else messages
    for i, m in enumerate(body):
        want = ("user", "assistant")[i % 2]
        if m["role"] != want:
            raise bad(f"messages[{i + has_system}]", f"role {shown(m['role'])}, expected {want!r} (roles alternate user/assistant)")
    if len(body) % 2:
        raise bad("messages", "the last user message has no answer")
    turns = tuple(Turn(u["content"], a["content"]) for u, a in zip(body[::2], body[1::2]))
    return History((messages[0]["content"] or None) if has_system else None, turns)  # an empty system prompt is none


def _path(path: str | Path, command: str) -> Path:
    """The user's path, ``~`` expanded; a path no file system accepts is refused here."""
    text = str(path)
    if "\0" in text:
        raise QuantkitError(f"{shown(text)}: a path cannot hold a NUL character; fix: {command} a plain file name")
    try:
        return Path(text).expanduser()
    except RuntimeError:  # ~user that does not exist
        return Path(text)


def save_history(history: History, path: str | Path) -> Path:
    """Write the conversation as JSON, atomically; an existing file is replaced only when it is an earlier /save."""
    path = _path(path, "/save")
    try:
        path.is_dir()
    except OSError as e:  # a name too long, a loop: as one line, the chat goes on
        raise QuantkitError(f"{shown(str(path))}: cannot be used ({e.strerror or e}); fix: /save a shorter plain file name") from None
    fix = f"fix: /save {path / 'chat.json'}" if path.is_dir() else "fix: /save a path to a regular file"
    if path.is_dir():
        raise QuantkitError(f"{path}: is a directory; {fix}")
    if path.exists() and not path.is_file():  # a device, FIFO or socket: renaming over it would replace it
        raise QuantkitError(f"{path}: exists and is not a regular file (a device, FIFO or socket); {fix}")
    if os.path.lexists(path):  # only an earlier /save is replaced: never a model, a text or a dangling link
        try:
            load_history(path)
        except QuantkitError:
            raise QuantkitError(f"{path}: already exists and is not a conversation saved by /save; fix: /save another file name") from None
    try:
        text = json.dumps(history_to_json(history), indent=2, ensure_ascii=False) + "\n"
        data = text.encode("utf-8")
    except (UnicodeEncodeError, ValueError) as e:
        raise QuantkitError(f"{path}: the conversation cannot be written as UTF-8 JSON ({clipped(e)}); fix: /reset and retype the messages") from None
    try:
        with atomic_file(path, force=True) as tmp:
            tmp.write_bytes(data)
    except OSError as e:
        raise QuantkitError(f"{path}: cannot write the conversation ({e.strerror or clipped(e)}); fix: choose a writable path") from None
    return path


def load_history(path: str | Path) -> History:
    """Read a conversation written by :func:`save_history`: a regular UTF-8 JSON file of at most 16 MiB."""
    path = _path(path, "/load")
    fix = "fix: pass a file written by /save"
    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise QuantkitError(f"{path}: is a directory; {fix}")
        if not stat.S_ISREG(st.st_mode):  # a FIFO or a device (/dev/zero) would block or never end
            raise QuantkitError(f"{path}: is not a regular file (a device, FIFO or socket); {fix}")
        if st.st_size > MAX_HISTORY_BYTES:
            raise QuantkitError(f"{path}: {st.st_size:,} bytes, larger than {MAX_HISTORY_BYTES // 2**20} MiB; {fix}")
        with open(path, "rb") as f:
            raw = f.read(MAX_HISTORY_BYTES + 1)  # the file may have grown since stat
        if len(raw) > MAX_HISTORY_BYTES:
            raise QuantkitError(f"{path}: larger than {MAX_HISTORY_BYTES // 2**20} MiB; {fix}")
        obj = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise QuantkitError(f"{path}: no such file; fix: check the path") from None
    except OSError as e:
        raise QuantkitError(f"{path}: cannot read a conversation ({e.strerror or clipped(e)}); {fix}") from None
    except UnicodeDecodeError as e:
        raise QuantkitError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); {fix}") from None
    except json.JSONDecodeError as e:
        raise QuantkitError(f"{path}: not JSON (line {e.lineno} column {e.colno}: {e.msg}); {fix}") from None
    except RecursionError:
        raise QuantkitError(f"{path}: JSON nested too deeply; {fix}") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise QuantkitError(f"{path}: cannot read a conversation ({clipped(e)}); {fix}") from None
    return history_from_json(obj, str(path))
