"""Hostile inputs to ``run`` and ``chat``: one clear line each, never a traceback.

Covered: a GGUF whose chat template is broken (syntax errors, rendering errors, the
template's own ``raise_exception``), sampling and loading options out of range (NaN and
infinity included), the count of generated tokens, undecodable prompt bytes, hostile
``/load`` and ``/save`` files, and untrusted values echoed in messages (capped).

GGUFs with another template are made by patching the string in a converted fixture
(:func:`with_template`); everything else is built in ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantkit.engine import runtime
from quantkit.engine.chat import ChatTemplate, History, MAX_HISTORY_BYTES, Turn, history_from_json, load_history, save_history
from quantkit.errors import QuantkitError
from quantkit.format.gguf_read import GGUFFile, read_gguf

from conftest import ROOT

CLI = [sys.executable, "-m", "quantkit.cli"]
FAST = ["--threads", "1", "--seed", "0"]
FUZZ = settings(
    max_examples=int(os.environ.get("QK_FUZZ_EXAMPLES", "60")), deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
#: Longest error line accepted: untrusted values are echoed capped.
MAX_LINE = 600


def with_template(src: Path, dst: Path, template: str) -> Path:
    """A copy of ``src`` whose ``tokenizer.chat_template`` is ``template``.

    The string is padded with a Jinja comment so that the header grows by a multiple of the
    alignment: tensor offsets (relative to the aligned data section) stay valid."""
    g = read_gguf(src)
    raw = src.read_bytes()
    key = b"tokenizer.chat_template"
    old = g.metadata[key.decode()].encode()
    new = template.encode()
    pad = 5
    while (len(new) + pad - len(old)) % g.alignment:
        pad += 1
    new += b"{#" + b" " * (pad - 4) + b"#}"
    field = struct.pack("<Q", len(key)) + key + struct.pack("<I", 8)  # key, then type 8 (string)
    at = raw.index(field + struct.pack("<Q", len(old)) + old) + len(field)
    dst.write_bytes(raw[:at] + struct.pack("<Q", len(new)) + new + raw[at + 8 + len(old) :])
    return dst


def cli(*args: str | bytes, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def refused(r: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 1 and exactly one line on stderr, the error, holding every fragment."""
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and len(message) < MAX_LINE and "; fix: " in message, message
    return message


@pytest.fixture(scope="module")
def gguf(fixture_gguf):
    """The fixture converted to q8_0 (its own, valid, Mistral-style template)."""
    return fixture_gguf("q8_0")


@pytest.fixture(scope="module")
def broken(gguf, tmp_path_factory):
    """A GGUF whose template has a syntax error on its second line."""
    return with_template(gguf, tmp_path_factory.mktemp("broken") / "broken.gguf", "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")


@pytest.fixture(scope="module")
def llm(gguf):
    model = runtime.load(gguf, n_ctx=256, threads=1, seed=0)
    yield model
    model.close()


# --- chat templates from the GGUF ---------------------------------------------


def test_with_template_patches_only_the_template(gguf, broken):
    a, b = read_gguf(gguf), read_gguf(broken)
    assert b.metadata["tokenizer.chat_template"].startswith("{% for m in messages %}\n{{ m['content'] }\n")
    assert {k: v for k, v in a.metadata.items() if k != "tokenizer.chat_template"} == {k: v for k, v in b.metadata.items() if k != "tokenizer.chat_template"}
    assert [(t.name, t.offset) for t in a.tensors] == [(t.name, t.offset) for t in b.tensors]


def test_a_broken_template_does_not_stop_a_plain_run(broken):
    """llama-cpp-python compiles the GGUF's templates inside Llama(): a syntax error there used
    to abort loading (an internal error) even when no template is used."""
    r = cli("run", str(broken), "-p", "HAMLET.", "-n", "3", "--ignore-eos", "--json", *FAST)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["completion_tokens"] == 3


@pytest.mark.parametrize(
    "args,stdin",
    [
        (["run", "-p", "Who art thou?", "--chat"], None),
        (["chat"], "Who art thou?\n/exit\n"),  # refused before the first message
    ],
    ids=["run --chat", "chat"],
)
def test_a_broken_template_is_one_line_naming_file_key_and_line(broken, args, stdin):
    r = cli(args[0], str(broken), *args[1:], *FAST, stdin=stdin)
    refused(r, f"{broken}: tokenizer.chat_template line 2: Jinja syntax error: unexpected '}}'; fix: ", "re-convert")


def test_a_template_that_refuses_the_conversation(gguf, tmp_path):
    """raise_exception() inside the template: one line in `run`; in `chat` one line per message, and chat goes on."""
    model = with_template(gguf, tmp_path / "strict.gguf", "{% if messages[0]['role'] == 'system' %}\n{{ raise_exception('System role not supported') }}\n{% endif %}{{ messages[-1]['content'] }}")
    r = cli("run", str(model), "-p", "hi", "--chat", "--system", "be brief", *FAST)
    refused(r, f"{model}: tokenizer.chat_template line 2: the template refuses this conversation: System role not supported; fix: ")
    r = cli("chat", str(model), "--system", "be brief", "-n", "4", *FAST, stdin="hi\nagain\n/exit\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("the template refuses this conversation" in e for e in errors), r.stderr


def test_a_built_in_template_replaces_a_broken_one(broken):
    """The library's way past a broken GGUF template (a CLI --chat-template option would pass it on)."""
    llm = runtime.load(broken, n_ctx=128, threads=1)
    try:
        g = runtime.generate(llm, "hi", runtime.Sampling(temperature=0, max_tokens=1), chat=True, chat_template="chatml")
        with pytest.raises(QuantkitError, match="tokenizer.chat_template line 2: Jinja syntax error"):
            runtime.chat_template_for(llm)
    finally:
        llm.close()
    assert g.template == "chatml" and g.prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_llama_cpp_python_chat_api_still_works_after_a_deferred_load(llm):
    """Deferring the compilation of the GGUF's templates keeps llama-cpp-python's own chat handler working."""
    import llama_cpp.llama_chat_format as lcf

    assert lcf.Jinja2ChatFormatter is not runtime._DeferredChatFormatter  # noqa: SLF001  (restored after loading)
    out = llm.create_chat_completion(messages=[{"role": "user", "content": "Who art thou?"}], max_tokens=2, temperature=0)
    assert out["choices"][0]["message"]["role"] == "assistant"


RENDER_ERRORS = [
    # (template, line, fragment)
    ("line one\n{% if messages %}{{ messages | no_such_filter }}{% endif %}", 2, "rendering failed (TemplateRuntimeError: No filter named 'no_such_filter'"),
    ("a\nb\n{{ raise_exception('roles must alternate') }}", 3, "the template refuses this conversation: roles must alternate"),
    ("\n\n\n{{ 1 / 0 }}", 4, "rendering failed (ZeroDivisionError: division by zero)"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", 1, "rendering failed (RecursionError"),
    ("{% for i in range(10 ** 9) %}{% endfor %}", 1, "rendering failed (OverflowError: Range too big"),
    ("{{ messages[0]['content'] + 1 }}", 1, "rendering failed (TypeError"),
    ("{{ ''.__class__.__mro__ }}", 1, "rendering failed (SecurityError"),
    ("{% for %}", 1, "Jinja syntax error: Expected an expression"),
    ("ok\n{% endfor %}", 2, "Jinja syntax error: Encountered unknown tag 'endfor'"),
    ("{% " + "x" * 5000 + " %}", 1, "Jinja syntax error: Encountered unknown tag 'xxxx"),  # the echo is capped
    ("{{ raise_exception('" + "[/red] " * 2000 + "') }}", 1, "the template refuses this conversation: [/red] [/red]"),
]


@pytest.mark.parametrize("source,line,fragment", RENDER_ERRORS)
def test_template_errors_are_one_capped_line_with_the_line_number(source, line, fragment):
    template = ChatTemplate("gguf", source, origin="m.gguf")
    with pytest.raises(QuantkitError) as e:
        template.render([{"role": "user", "content": "hi"}])
    message = one_line(e)
    assert message.startswith(f"m.gguf: tokenizer.chat_template line {line}: "), message
    assert fragment in message, message


def test_template_too_large_or_not_text():
    from quantkit.engine.chat import MAX_TEMPLATE_CHARS, chat_template

    with pytest.raises(QuantkitError, match=r"^m.gguf: tokenizer.chat_template: 1,048,577 characters, more than 1,048,576"):
        ChatTemplate("gguf", "x" * (MAX_TEMPLATE_CHARS + 1), origin="m.gguf").check()
    with pytest.raises(QuantkitError, match=r"^m.gguf: tokenizer.chat_template is a int \(7\), expected text"):
        chat_template({"tokenizer.chat_template": 7}, source="m.gguf")
    assert chat_template({"tokenizer.chat_template": "{{ x"}, source="m.gguf", override="chatml").name == "chatml"


JINJA_PIECES = st.sampled_from(
    ["{{", "}}", "{%", "%}", "{#", "#}", "(", ")", "[", "]", "'", '"', "|", ".", "+", "-", "/", "~", ",", " ", "\n", "=", "==",
     "for", "in", "if", "else", "endif", "endfor", "set", "macro", "endmacro", "messages", "message", "loop", "range",
     "raise_exception", "content", "role", "bos_token", "x", "1", "2", "0", "length", "upper", "join", "tojson", "namespace"]
)  # no "*": a random product of powers could ask for gigabytes


@pytest.mark.fuzz
@FUZZ
@given(st.lists(JINJA_PIECES, max_size=30).map("".join))
def test_any_template_renders_or_fails_in_one_line(source):
    template = ChatTemplate("gguf", source, origin="fuzz.gguf")
    try:
        out = template.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    except QuantkitError as e:
        message = str(e)
        assert "\n" not in message and len(message) < MAX_LINE and message.startswith("fuzz.gguf: tokenizer.chat_template")
    else:
        assert isinstance(out, str)


# --- options ------------------------------------------------------------------


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("max_tokens", -1, "--max-tokens: expected an integer from 1 to 2147483647 (found -1)"),  # llama-cpp-python: unbounded
        ("max_tokens", 0, "--max-tokens: expected an integer from 1"),
        ("temperature", -1.0, "--temperature: expected a number >= 0 (found -1.0)"),
        ("temperature", NAN, "--temperature: expected a number >= 0 (found nan)"),
        ("temperature", INF, "(found inf)"),
        ("top_p", 5.0, "--top-p: expected a number from 0 to 1 (found 5.0)"),
        ("top_p", -0.1, "--top-p: expected a number from 0 to 1"),
        ("top_k", -3, "--top-k: expected an integer from 0 to 2147483647 (found -3)"),
        ("top_k", 2**32, "--top-k"),  # ctypes would wrap it to 0
        ("top_k", 1.5, "--top-k: expected an integer"),
        ("min_p", 1.5, "--min-p: expected a number from 0 to 1 (found 1.5)"),
        ("min_p", NAN, "--min-p"),
        ("repeat_penalty", 0.0, "--repeat-penalty: expected a number > 0 (found 0.0)"),
        ("repeat_penalty", -1.1, "--repeat-penalty"),
        ("seed", -1, "--seed: expected an integer from 0 to 4294967294 (found -1)"),
        ("seed", 2**32 - 1, "--seed"),  # llama.cpp reads 0xFFFFFFFF as "random"
        ("max_tokens", True, "(found True)"),
        ("temperature", "hot", "(found 'hot')"),
    ],
)
def test_sampling_options_out_of_range_are_refused(field, value, message):
    with pytest.raises(QuantkitError) as e:
        runtime.Sampling(**{field: value})
    assert message in one_line(e)
    assert "; fix: leave it out for " in str(e.value)


def test_sampling_edges_are_accepted():
    runtime.Sampling(temperature=0, top_p=0, top_k=0, min_p=0, repeat_penalty=0.01, seed=0, max_tokens=1)
    runtime.Sampling(temperature=100.0, top_p=1, top_k=2**31 - 1, min_p=1, seed=2**32 - 2)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(n_ctx=0), "--ctx: expected an integer from 16 to 16777216 (found 0)"),
        (dict(n_ctx=-5), "--ctx: expected an integer from 16"),
        (dict(n_ctx=2**32 + 16), "(found 4294967312)"),  # ctypes would hand llama.cpp n_ctx = 16
        (dict(gpu_layers=-2), "--gpu-layers: expected an integer from -1 to 2147483647 (found -2)"),
        (dict(threads=0), "--threads: expected an integer from 1 to 512 (found 0)"),
        (dict(threads=-3), "--threads"),
        (dict(threads=100_000), "(found 100000)"),  # libgomp fails to start the threads and exits the process
        (dict(seed=-1), "--seed"),
    ],
)
def test_load_options_are_refused_before_any_file_is_read(tmp_path, kwargs, message):
    with pytest.raises(QuantkitError) as e:
        runtime.plan_load(tmp_path / "never-read.gguf", **kwargs)
    assert message in one_line(e)


def test_an_absurd_ctx_is_refused_even_when_memory_is_unknown(gguf, monkeypatch):
    monkeypatch.setattr(runtime, "mem_available", lambda: None)
    with pytest.raises(QuantkitError, match=r"^--ctx: expected an integer from 16 to 16777216 \(found 4294967312\)"):
        runtime.plan_load(gguf, n_ctx=2**32 + 16)
    monkeypatch.setattr(runtime, "mem_available", lambda: 1 << 30)  # the largest valid --ctx meets the KV-cache estimate
    with pytest.raises(QuantkitError, match=rf"^{gguf}: needs .* GiB of RAM, 1.00 GiB available \(weights .* KV cache .* for --ctx 16777216\)"):
        runtime.plan_load(gguf, n_ctx=2**24)


def test_ctx_beyond_the_trained_context_is_a_note(gguf):
    trained = read_gguf(gguf).metadata["llama.context_length"]
    plan = runtime.plan_load(gguf, n_ctx=trained * 2)
    assert any(f"beyond the {trained} tokens the model was trained on" in n for n in plan.notes)
    assert not any("trained on" in n for n in runtime.plan_load(gguf, n_ctx=trained).notes)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--threads", "600"], "--threads: expected an integer from 1 to 512 (found 600)"),
        (["--ctx", str(2**32 + 16)], "--ctx: expected an integer from 16 to 16777216 (found 4294967312)"),
    ],
)
def test_cli_refuses_load_options_in_one_line(gguf, args, fragment):
    refused(cli("run", str(gguf), "-p", "x", "-n", "1", *args), fragment)


@pytest.mark.parametrize("command", ["run", "chat"])
def test_cli_refuses_nan_sampling_options_in_one_line(gguf, command):
    r = cli(command, str(gguf), *(["-p", "x"] if command == "run" else []), "--temperature", "nan", stdin="")
    refused(r, "--temperature: expected a number >= 0 (found nan)")


# --- generated tokens and prompts ---------------------------------------------


@pytest.mark.parametrize("n", [1, 5])
def test_run_counts_the_tokens_it_generated(gguf, n):
    """-n 1 used to report 2: the text was re-tokenised instead of counting what was sampled."""
    out = json.loads(cli("run", str(gguf), "-p", "HAMLET. To be", "-n", str(n), "--ignore-eos", "--json", *FAST).stdout)
    assert (out["completion_tokens"], out["finish_reason"]) == (n, "length")


def test_complete_counts_like_llama_cpp_python_usage(llm):
    """An independent count: llama-cpp-python's own non-streaming usage for the same greedy request."""
    sampling = runtime.Sampling(temperature=0, max_tokens=24, repeat_penalty=1.0)
    tokens = llm.tokenize(b"HAMLET. To be, or not", add_bos=True, special=True)
    llm.reset()
    ours = runtime.complete(llm, tokens, sampling)
    llm.reset()
    usage = llm.create_completion(tokens, stream=False, **sampling.kwargs())["usage"]
    assert ours.completion_tokens == usage["completion_tokens"] > 0
    assert ours.prompt_tokens == usage["prompt_tokens"]
    assert "generate" not in vars(llm)  # the counting wrapper is gone


def test_an_undecodable_prompt_byte_is_one_line(gguf):
    r = subprocess.run([*CLI, "run", str(gguf), "-p", b"HAMLET \xff", "-n", "1", *FAST], capture_output=True, cwd=ROOT, timeout=300)
    r = subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode("utf-8", "replace"))
    refused(r, "the prompt: character 7 ('\\udcff') is not Unicode text", "fix: pass UTF-8 text")


# --- /load and /save ----------------------------------------------------------


def _saved(messages, **extra) -> str:
    return json.dumps({"format": "quantkit-chat", "version": 1, "messages": messages, **extra})


LOAD_CASES = {
    # name: (file content (str, bytes, or a callable making the path), message fragment)
    "directory": (lambda p: p.mkdir(), "is a directory; fix: pass a file written by /save"),
    "json-list": ("[]", "format: expected 'quantkit-chat' (found a JSON list)"),
    "json-string": ('"quantkit-chat"', "found a JSON str"),
    "no-messages": (json.dumps({"format": "quantkit-chat", "version": 1}), "messages: expected a list (found None)"),
    "no-format": (json.dumps({"version": 1, "messages": []}), "format: expected 'quantkit-chat' (found None)"),
    "content-int": (_saved([{"role": "user", "content": 1}, {"role": "assistant", "content": "x"}]), "messages[0]: expected an object with string 'role' and 'content'"),
    "message-list": (_saved([["user", "x"]]), "messages[0]: expected an object"),
    "version-true": (json.dumps({"format": "quantkit-chat", "version": True, "messages": []}), "version: True is not supported (expected 1)"),
    "version-str": (json.dumps({"format": "quantkit-chat", "version": "1", "messages": []}), "version: '1' is not supported"),
    "long-role": (_saved([{"role": "u" * 100_000, "content": "x"}, {"role": "assistant", "content": "y"}]), "role 'uuuu"),
    "lone-surrogate": (_saved([{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "x"}]), "messages[0]: holds a lone surrogate"),
    "deep": ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    "huge-int": ('{"format": "quantkit-chat", "version": ' + "9" * 5000 + "}", "cannot read a conversation (Exceeds the limit"),
    "not-utf8": (b"\xff\xfe{}", "not UTF-8 text (byte 0xff at offset 0)"),
    "empty": ("", "not JSON (line 1 column 1: Expecting value)"),
    "huge": (lambda p: os.truncate(p.touch() or p, MAX_HISTORY_BYTES + 1), "16,777,217 bytes, larger than 16 MiB"),
    "fifo": (lambda p: os.mkfifo(p), "is not a regular file (a device, FIFO or socket)"),  # reading it would block
    "missing": (lambda p: None, "no such file; fix: check the path"),
}


def _make(tmp_path: Path, name: str) -> Path:
    content, _ = LOAD_CASES[name]
    path = tmp_path / f"{name}.json"
    if callable(content):
        content(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.fixture
def no_hang():
    """Fail instead of blocking forever (opening a FIFO for reading waits for a writer)."""

    def blocked(*_: object) -> None:
        raise TimeoutError("blocked for 20 s")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", LOAD_CASES)
def test_load_refuses_hostile_files_in_one_line(tmp_path, name, no_hang):
    path = _make(tmp_path, name)
    with pytest.raises(QuantkitError) as e:
        load_history(path)
    message = one_line(e)
    assert message.startswith(str(path)) and LOAD_CASES[name][1] in message, message


@pytest.mark.parametrize("path,fragment", [("/dev/zero", "is not a regular file"), ("a\0b.json", "a path cannot hold a NUL character")])
def test_load_refuses_devices_and_impossible_paths(path, fragment, no_hang):
    with pytest.raises(QuantkitError) as e:
        load_history(path)
    assert fragment in one_line(e)


def test_save_refuses_hostile_targets_in_one_line(tmp_path, no_hang):
    h = History("sys").add("hi", "hello")
    (tmp_path / "dir").mkdir()
    with pytest.raises(QuantkitError) as e:
        save_history(h, tmp_path / "dir")
    assert f"{tmp_path / 'dir'}: is a directory; fix: /save {tmp_path / 'dir' / 'chat.json'}" == one_line(e)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(QuantkitError) as e:  # an atomic rename would replace the FIFO (or, as root, /dev/null) with a file
        save_history(h, fifo)
    assert "exists and is not a regular file" in one_line(e)
    assert fifo.is_fifo()
    with pytest.raises(QuantkitError) as e:
        save_history(h, tmp_path / "missing" / "c.json")
    assert "directory does not exist" in one_line(e)
    with pytest.raises(QuantkitError) as e:
        save_history(h, tmp_path / "a\0b.json")
    assert "a path cannot hold a NUL character" in one_line(e)
    with pytest.raises(QuantkitError) as e:
        save_history(History(None, (Turn("\udcff", "x"),)), tmp_path / "s.json")
    assert "cannot be written as UTF-8 JSON" in one_line(e)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "fifo"]  # nothing half-written


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["role", "content", "format", "version", "messages", "x"]), inner, max_size=4),
    max_leaves=12,
)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", 1]), "content": st.text(max_size=5) | st.integers()})


@pytest.mark.fuzz
@FUZZ
@given(st.one_of(JSON, st.builds(lambda m: {"format": "quantkit-chat", "version": 1, "messages": m}, st.lists(MESSAGE, max_size=5))))
def test_any_json_loads_as_a_history_or_one_line(obj):
    try:
        history = history_from_json(obj, "f.json")
    except QuantkitError as e:
        message = str(e)
        assert message.startswith("f.json: ") and "\n" not in message and len(message) < MAX_LINE
    else:
        assert history_from_json(json.loads(json.dumps({"format": "quantkit-chat", "version": 1, "messages": history.messages()}))) == history


def test_chat_survives_hostile_load_and_save(gguf, tmp_path):
    """The real chat loop: each hostile /load or /save prints one error line and the chat goes on."""
    names = ["directory", "json-list", "deep", "huge-int", "lone-surrogate", "not-utf8", "fifo", "huge"]
    paths = [_make(tmp_path, n) for n in names]
    (tmp_path / "out").mkdir()
    lines = [f"/load {p}" for p in paths] + [f"/save {tmp_path / 'out'}", f"/save {tmp_path / 'fifo.json'}", f"/save {tmp_path / 'ok.json'}", "/exit"]
    r = cli("chat", str(gguf), "-n", "4", *FAST, stdin="\n".join(lines) + "\n", timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(names) + 2, r.stderr
    for name, error in zip(names, errors):
        assert LOAD_CASES[name][1] in error, (name, error)
    assert json.loads((tmp_path / "ok.json").read_text())["messages"] == []


# --- untrusted values echoed in messages --------------------------------------


def _gguf(metadata: dict) -> GGUFFile:
    return GGUFFile(Path("m.gguf"), 3, metadata, [], 0, 32)


@pytest.mark.parametrize(
    "metadata,fragment",
    [
        ({"general.architecture": "llama", "llama.block_count": "[/x]" * 10_000}, "m.gguf: metadata llama.block_count = '[/x][/x]"),
        ({"general.architecture": "llama", "llama.block_count": 2**40}, "expected an integer from 1 to 16777216"),
        ({"general.architecture": "llama", "llama.block_count": 2, "llama.attention.head_count": "8"}, "metadata llama.attention.head_count = '8'"),
        ({"general.architecture": "llama", "llama.block_count": 2, "llama.attention.head_count_kv": [1, -1]}, "llama.attention.head_count_kv = [1, -1]"),
        ({"general.architecture": "x" * 10_000}, "metadata general.architecture = 'xxxx"),
        ({"general.architecture": 7}, "metadata general.architecture = 7, expected an architecture name"),
    ],
)
def test_gguf_metadata_echoes_are_capped(metadata, fragment):
    with pytest.raises(QuantkitError) as e:
        runtime.kv_shape(_gguf(metadata))
    assert fragment in one_line(e)


def test_hostile_bitsandbytes_config_is_one_line(tmp_path):
    d = tmp_path / "bnb"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"quantization_config": {}, "num_hidden_layers": 2, "num_attention_heads": "[b]" * 5000, "hidden_size": 64}))
    with pytest.raises(QuantkitError) as e:
        runtime.plan_load(d)
    assert f"{d / 'config.json'}: num_attention_heads = '[b][b]" in one_line(e)


def test_chat_template_option_replaces_a_broken_template(gguf, tmp_path):
    """A GGUF whose template does not compile still chats with --chat-template chatml (the fix its error names)."""
    broken = with_template(gguf, tmp_path / "broken.gguf", "{% for m in messages %}{{ m }")
    r = cli("run", str(broken), "-p", "hi", "-n", "2", "--chat", "--temperature", "0")
    refused(r, "--chat-template chatml")
    r = cli("run", str(broken), "-p", "hi", "-n", "2", "--chat", "--temperature", "0", "--chat-template", "chatml", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prompt"].startswith("<|im_start|>user\nhi<|im_end|>")
    r = cli("run", str(gguf), "-p", "hi", "--chat-template", "chatml")
    assert r.returncode == 2 and "applies to --chat" in r.stderr
