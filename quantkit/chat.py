"""Chat sessions as data: history, context trimming, commands, multi-line input,
save / load, and chat templates.

Everything here is pure or file I/O: the model enters only through callables
(``tokenize``) and strings (the template source and its special tokens), so
every rule is testable without loading a model.  Templates are rendered by
llama-cpp-python's :class:`Jinja2ChatFormatter`, whose Jinja environment is
sandboxed: a chat template stored in a GGUF is untrusted input.

Not for: running the model (``quantkit.runtime``) or the terminal (``quantkit.cli``).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from quantkit.errors import QuantkitError
from quantkit.output import atomic_file

log = logging.getLogger(__name__)

HISTORY_FORMAT = "quantkit-chat"
HISTORY_VERSION = 1
MAX_HISTORY_BYTES = 16 * 2**20

#: Templates used when a GGUF carries no ``tokenizer.chat_template``: name -> (Jinja source, stop strings).
FALLBACK_TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        ("<|im_end|>",),
    ),
}
DEFAULT_FALLBACK = "chatml"


# --- templates --------------------------------------------------------------


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template with the special-token strings it is rendered with."""

    name: str  # "gguf" for the model's own template, else the fallback's name
    source: str
    bos_token: str = ""
    eos_token: str = ""
    stop: tuple[str, ...] = ()
    origin: str = "model"  # the file the template came from, for error messages

    @functools.cached_property
    def _formatter(self) -> Any:
        import jinja2
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        try:
            return Jinja2ChatFormatter(self.source, eos_token=self.eos_token, bos_token=self.bos_token, add_generation_prompt=True)
        except jinja2.TemplateError as e:
            raise self._error(e) from None

    def _error(self, e: Exception) -> QuantkitError:
        return QuantkitError(f"{self.origin}: the chat template ({self.name}) failed: {e}; fix: re-convert with a working tokenizer_config.json chat_template")

    def render(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt for ``messages`` (OpenAI-style dicts), ending where the assistant speaks."""
        import jinja2

        try:
            return self._formatter(messages=list(messages)).prompt
        except (jinja2.TemplateError, ValueError, TypeError) as e:
            raise self._error(e) from None


def chat_template(
    metadata: Mapping[str, Any], bos_token: str = "", eos_token: str = "", source: str = "model", fallback: str = DEFAULT_FALLBACK
) -> ChatTemplate:
    """The GGUF's ``tokenizer.chat_template``, or the named fallback with a logged warning."""
    text = metadata.get("tokenizer.chat_template")
    stop = (eos_token,) if eos_token else ()
    if isinstance(text, str) and text.strip():
        return ChatTemplate("gguf", text, bos_token, eos_token, stop, source)
    if fallback not in FALLBACK_TEMPLATES:
        raise QuantkitError(f"unknown fallback chat template {fallback!r}; fix: use one of {', '.join(FALLBACK_TEMPLATES)}")
    log.warning("%s has no tokenizer.chat_template; using the %r fallback template, which the model may not have been trained on", source, fallback)
    body, extra_stop = FALLBACK_TEMPLATES[fallback]
    return ChatTemplate(fallback, body, bos_token, eos_token, tuple(dict.fromkeys(stop + extra_stop)), source)


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
        raise QuantkitError(f"unknown command /{word}; fix: type /help for the list (start a message with // to send a literal /)")
    arg = arg.strip()
    if spec.arg and not arg:
        raise QuantkitError(f"/{spec.name} needs {spec.arg}; fix: /{spec.name} {spec.arg.lower()}.json")
    if not spec.arg and arg:
        raise QuantkitError(f"/{spec.name} takes no argument (got {arg!r}); fix: type /{spec.name} alone")
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


def history_from_json(obj: Any, origin: str = "history") -> History:
    """Validate a saved conversation: optional system message, then user/assistant pairs."""

    def bad(where: str, why: str) -> QuantkitError:
        return QuantkitError(f"{origin}: {where}: {why}; fix: pass a file written by /save")

    if not isinstance(obj, dict) or obj.get("format") != HISTORY_FORMAT:
        raise bad("format", f"expected {HISTORY_FORMAT!r}")
    if obj.get("version") != HISTORY_VERSION:
        raise bad("version", f"{obj.get('version')!r} is not supported (expected {HISTORY_VERSION})")
    messages = obj.get("messages")
    if not isinstance(messages, list):
        raise bad("messages", "expected a list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise bad(f"messages[{i}]", "expected an object with string 'role' and 'content'")
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    body = messages[1:] if system is not None else messages
    for i, m in enumerate(body):
        want = ("user", "assistant")[i % 2]
        if m["role"] != want:
            raise bad(f"messages[{i + (system is not None)}]", f"role {m['role']!r}, expected {want!r} (roles alternate user/assistant)")
    if len(body) % 2:
        raise bad("messages", "the last user message has no answer")
    turns = tuple(Turn(u["content"], a["content"]) for u, a in zip(body[::2], body[1::2]))
    return History(system, turns)


def save_history(history: History, path: str | Path) -> Path:
    """Write the conversation as JSON (atomically; an existing file is replaced)."""
    path = Path(path).expanduser()
    try:
        with atomic_file(path, force=True) as tmp:
            tmp.write_text(json.dumps(history_to_json(history), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as e:
        raise QuantkitError(f"{path}: cannot write the conversation ({e.strerror or e}); fix: choose a writable path") from None
    return path


def load_history(path: str | Path) -> History:
    path = Path(path).expanduser()
    try:
        if path.stat().st_size > MAX_HISTORY_BYTES:
            raise QuantkitError(f"{path}: larger than {MAX_HISTORY_BYTES // 2**20} MiB; fix: pass a file written by /save")
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QuantkitError(f"{path}: no such file; fix: check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantkitError(f"{path}: cannot read a conversation ({e}); fix: pass a file written by /save") from None
    return history_from_json(obj, str(path))
