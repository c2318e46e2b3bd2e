"""OpenAI's harmony chat format (GPT-OSS): detection and a streaming channel parser.

A harmony model answers in messages, each ``<|channel|>NAME[ to=RECIPIENT][<|constrain|>TYPE]<|message|>TEXT``
closed by ``<|end|>`` (another message follows after ``<|start|>assistant``), ``<|return|>`` (the
answer is complete) or ``<|call|>`` (a tool call waits for its result).  Only the ``final``
channel is the answer; ``analysis`` is the model's reasoning; ``commentary`` carries tool calls
and preambles.  llama.cpp renders ``<|start|>``, ``<|channel|>``, ``<|message|>``, ``<|constrain|>``
and ``<|end|>`` as text for such a vocabulary and stops by itself on ``<|return|>`` / ``<|call|>``;
the parser reads the markers out of the streamed text, wherever chunk boundaries split them.

Earlier reasoning is not sent back: the harmony template renders an assistant turn of the
history as its final message only, so the history keeps the final text.

Not for: sampling (``quantkit.engine.runtime``) or the terminal (``quantkit.cli.main``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

START, CHANNEL, MESSAGE, END, RETURN, CALL, CONSTRAIN = (
    "<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>",
)
MARKERS = (START, CHANNEL, MESSAGE, END, RETURN, CALL, CONSTRAIN)
#: What a template must write for the model to be read as harmony.
TEMPLATE_MARKERS = (START, CHANNEL, MESSAGE, END)
#: What the vocabulary must hold, each as one special token (the markers llama.cpp stops on included).
VOCAB_MARKERS = (START, CHANNEL, MESSAGE, END, RETURN, CALL)
FINAL, ANALYSIS, COMMENTARY = "final", "analysis", "commentary"


def is_harmony(template_source: str, single_token: Callable[[str], bool]) -> bool:
    """A harmony model: its template writes the message markers and its vocabulary holds every
    marker as one token (``single_token(text)``: the text tokenises to exactly one special token)."""
    return all(m in template_source for m in TEMPLATE_MARKERS) and all(single_token(m) for m in VOCAB_MARKERS)


@dataclass(frozen=True)
class Message:
    """One parsed message of the answer."""

    channel: str | None  # None when the header named none
    recipient: str | None  # "functions.x" for a tool call
    text: str
    closed_by: str | None  # END, RETURN, CALL, or None when generation stopped inside it


def _header(text: str) -> tuple[str | None, str | None]:
    """(channel, recipient) from a header such as ``assistant to=functions.f<|channel|>commentary json``."""
    channel = None
    if CHANNEL in text:
        after = text.split(CHANNEL, 1)[1].replace(CONSTRAIN, " ").split()
        channel = after[0] if after else None
    recipient = re.search(r"\bto=(\S+?)(?=\s|<\||$)", text)
    return channel, recipient.group(1) if recipient else None


class HarmonyParser:
    """Feed the streamed text of a harmony answer chunk by chunk; final-channel text goes to
    ``on_final``, analysis-channel text to ``on_reasoning``, as it arrives.

    The model's output starts inside the header of its first message (the prompt ends with
    ``<|start|>assistant``).  :attr:`done` turns true where the format ends the answer:
    ``<|return|>``, ``<|call|>``, or ``<|end|>`` after a final message."""

    def __init__(self, on_final: Callable[[str], None] | None = None, on_reasoning: Callable[[str], None] | None = None) -> None:
        self.on_final, self.on_reasoning = on_final, on_reasoning
        self.messages: list[Message] = []
        self.done = False
        self.stopped_by: str | None = None  # the marker that ended the answer
        self._buf = ""  # text that may still be the start of a marker
        self._state = "header"  # header | body | between (after <|end|>, before <|start|>)
        self._head = ""
        self._channel: str | None = None
        self._recipient: str | None = None
        self._body: list[str] = []

    # --- results --------------------------------------------------------

    def _text(self, channel: str) -> str:
        parts = [m.text for m in self.messages if (m.channel or FINAL) == channel]
        if self._state == "body" and (self._channel or FINAL) == channel:
            parts.append("".join(self._body))
        return "".join(parts)

    @property
    def answer(self) -> str:
        """The final channel's text (the answer; empty when the model wrote none)."""
        return self._text(FINAL)

    @property
    def reasoning(self) -> str:
        return self._text(ANALYSIS)

    @property
    def tool_calls(self) -> list[Message]:
        return [m for m in self.messages if m.recipient is not None]

    # --- parsing --------------------------------------------------------

    def feed(self, text: str) -> None:
        if self.done:
            return
        buf = self._buf + text
        while buf and not self.done:
            at = buf.find("<")
            if at < 0:
                self._emit(buf)
                buf = ""
                break
            if at:
                self._emit(buf[:at])
                buf = buf[at:]
            marker = next((m for m in MARKERS if buf.startswith(m)), None)
            if marker is not None:
                buf = buf[len(marker):]
                self._marker(marker)
            elif any(m.startswith(buf) for m in MARKERS):
                break  # a marker may be arriving: wait for the next chunk
            else:
                self._emit("<")
                buf = buf[1:]
        self._buf = "" if self.done else buf

    def close(self) -> None:
        """The stream ended: what was held back is text; an open message is kept as it stands."""
        if not self.done and self._buf:
            buf, self._buf = self._buf, ""
            self._emit(buf)
        if self._state == "body":
            self._finish(None)
        self.done = True

    def _emit(self, text: str) -> None:
        if self._state == "header":
            self._head += text
        elif self._state == "body":
            self._body.append(text)
            channel = self._channel or FINAL
            sink = self.on_final if channel == FINAL else self.on_reasoning if channel == ANALYSIS else None
            if sink is not None and text:
                sink(text)
        # between messages: stray text is not part of any message

    def _finish(self, closed_by: str | None) -> None:
        self.messages.append(Message(self._channel, self._recipient, "".join(self._body), closed_by))
        self._body, self._channel, self._recipient = [], None, None
        self._state = "between"

    def _marker(self, marker: str) -> None:
        if marker == START:
            if self._state == "body":  # a message left open: the model skipped <|end|>
                self._finish(None)
            self._state, self._head = "header", ""
        elif marker in (CHANNEL, CONSTRAIN):
            if self._state == "body":  # a new header without <|end|><|start|>
                self._finish(None)
                self._head = ""
            self._state = "header"
            self._head += marker
        elif marker == MESSAGE:
            if self._state == "body":  # a second <|message|> inside a body is ignored
                return
            self._channel, self._recipient = _header(self._head)
            self._state, self._head = "body", ""
        else:  # END, RETURN, CALL
            final = self._state == "body" and (self._channel or FINAL) == FINAL
            if self._state == "body":
                self._finish(marker)
            if marker != END or final:
                self.done, self.stopped_by = True, marker
            self._state = "between"
