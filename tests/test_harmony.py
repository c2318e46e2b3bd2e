"""GPT-OSS's harmony chat format: detection, the exact prompt llama.cpp receives, the streaming
channel parser, and `run --chat` / `chat` printing only the final channel.

The model is a tiny random gpt_oss converted by quantkit, whose tokenizer holds the harmony
markers as special tokens and whose chat template is a compact harmony template (the published
one's structure: a system block, the system prompt as a developer message, earlier assistant
turns as their final message only, ``<|start|>assistant`` to answer; no date and no tools).
Its own sampling cannot follow the format, so the streaming tests script the tokens it
"samples" (a fake token source behind llama-cpp-python's real detokenising stream).
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import FIXTURE, convert, random_model

from quantkit.engine import runtime
from quantkit.engine.chat import History
from quantkit.engine.harmony import HarmonyParser, is_harmony

SPECIALS = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>"]
FIRST = 3000  # the tokenizer.model holds 3000 pieces; the markers follow
IDS = {t: FIRST + i for i, t in enumerate(SPECIALS)}

SYSTEM_BLOCK = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\n\n"
    "Reasoning: medium\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
)
TEMPLATE = (
    "{{- '" + SYSTEM_BLOCK.replace("\n", "\\n") + "' -}}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{{- '<|start|>developer<|message|># Instructions\\n\\n' + message.content + '\\n\\n<|end|>' -}}"
    "{%- elif message.role == 'user' -%}{{- '<|start|>user<|message|>' + message.content + '<|end|>' -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{%- if '<|channel|>analysis<|message|>' in message.content -%}{{- raise_exception('analysis in an assistant message') -}}{%- endif -%}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"
)


@pytest.fixture(scope="module")
def harmony_gguf(tmp_path_factory):
    base = tmp_path_factory.mktemp("harmony")
    src = random_model(base / "hf", "gpt_oss", dtype="float32", vocab_size=FIRST + 8, eos_token_id=IDS["<|return|>"], bos_token_id=1)
    tcfg = json.loads((FIXTURE / "tokenizer_config.json").read_text())
    tcfg.update(
        add_bos_token=False, eos_token="<|return|>",
        added_tokens_decoder={str(i): {"content": t, "special": True} for t, i in IDS.items()},
    )
    tcfg.pop("chat_template", None)
    (src / "tokenizer_config.json").write_text(json.dumps(tcfg))
    (src / "chat_template.jinja").write_text(TEMPLATE)
    return convert(src, base / "gpt-oss-tiny.gguf")


@pytest.fixture(scope="module")
def llm(harmony_gguf):
    model = runtime.load(harmony_gguf, n_ctx=512, threads=1, seed=0)
    yield model
    model.close()


def script(llm, text: str) -> list[int]:
    """The token ids of a harmony answer written as text (markers as their special ids).

    The test tokenizer is SentencePiece with a dummy prefix: each text piece after a marker comes
    back with a leading space (gpt-oss's byte-level BPE has none), so answers are compared stripped."""
    ids: list[int] = []
    for piece in re.split("(" + "|".join(map(re.escape, SPECIALS)) + ")", text):
        if piece in IDS:
            ids.append(IDS[piece])
        elif piece:
            ids += llm.tokenize(piece.encode(), add_bos=False, special=False)
    return ids


@pytest.fixture
def scripted(llm, monkeypatch):
    """Make the model 'sample' the given answer: llama-cpp-python's real stream (detokenising,
    end-of-generation, stop strings) over a fake token source."""

    def use(text: str) -> list[int]:
        ids = script(llm, text)
        state = {"sent": 0}

        def generate(tokens, **kwargs):
            for t in ids:
                state["sent"] += 1
                yield t

        monkeypatch.setattr(llm, "generate", generate)
        return state

    return use


ANSWER = (
    "<|channel|>analysis<|message|>The user asks about France. Capital is Paris.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>Paris is the capital.<|return|>"
)


# --- detection and the prompt ---------------------------------------------------


def test_detected_from_template_and_vocabulary(llm):
    template = runtime.chat_template_for(llm)
    assert template.name == "gguf" and runtime.is_harmony_model(llm, template)
    assert not is_harmony("{{ '<|im_start|>' }}", lambda t: True)  # a ChatML template
    assert not is_harmony(TEMPLATE, lambda t: t != "<|call|>")  # a vocabulary without one marker
    from quantkit.engine.chat import chat_template

    chatml = chat_template({}, source="x", override="chatml")
    assert not runtime.is_harmony_model(llm, chatml)


def test_llama_cpp_treats_the_markers_as_harmony(llm):
    """llama.cpp stops on <|return|> and <|call|>, not on <|end|>, and renders the header markers as text."""
    assert runtime.is_end_of_generation(llm, IDS["<|return|>"]) and runtime.is_end_of_generation(llm, IDS["<|call|>"])
    assert not runtime.is_end_of_generation(llm, IDS["<|end|>"])
    for t in ("<|start|>", "<|channel|>", "<|message|>", "<|end|>"):
        assert llm.detokenize([IDS[t]]) == t.encode()


def test_exact_prompt_and_tokens_for_system_and_user(llm, monkeypatch, scripted):
    scripted(ANSWER)
    seen: list[list[int]] = []
    real = llm.create_completion
    monkeypatch.setattr(llm, "create_completion", lambda tokens, **kw: (seen.append(list(tokens)), real(tokens, **kw))[1])
    g = runtime.generate(llm, "What is the capital of France?", runtime.Sampling(temperature=0, max_tokens=64), chat=True, system="Be brief.")
    want = (
        SYSTEM_BLOCK + "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n<|end|>"
        "<|start|>user<|message|>What is the capital of France?<|end|><|start|>assistant"
    )
    assert g.prompt == want
    assert seen == [script(llm, want)]  # every marker one special id, no BOS (add_bos_token false)
    assert seen[0].count(IDS["<|start|>"]) == 4 and seen[0].count(IDS["<|end|>"]) == 3 and seen[0][-1] != IDS["<|end|>"]
    assert (g.text.strip(), g.reasoning.strip(), g.finish_reason) == ("Paris is the capital.", "The user asks about France. Capital is Paris.", "stop")
    j = g.to_json()
    assert j["text"] == g.text and j["reasoning"] == g.reasoning and j["tool_calls"] == []


def test_history_keeps_only_the_final_channel(llm):
    """The next turn's prompt holds the earlier answer as a final message; its reasoning is gone."""
    template = runtime.chat_template_for(llm)
    history = History().add("Capital of France?", "Paris.")
    rendered = template.render(history.messages("And of Spain?"))
    assert rendered == (
        SYSTEM_BLOCK + "<|start|>user<|message|>Capital of France?<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Paris.<|end|><|start|>user<|message|>And of Spain?<|end|><|start|>assistant"
    )
    assert "analysis" not in rendered.split("Capital of France?")[1]


# --- generation stops where the format says ------------------------------------


def test_end_after_final_stops_generation(llm, scripted):
    state = scripted("<|channel|>final<|message|>Hi.<|end|><|start|>assistant<|channel|>final<|message|>more text")
    g = runtime.generate(llm, "Hello", runtime.Sampling(temperature=0, max_tokens=64), chat=True)
    assert (g.text.strip(), g.reasoning, g.finish_reason) == ("Hi.", "", "stop")
    assert g.completion_tokens == len(script(llm, "<|channel|>final<|message|>Hi."))  # the closing <|end|> not counted
    assert state["sent"] == len(script(llm, "<|channel|>final<|message|>Hi.<|end|>"))  # nothing sampled after it


def test_end_after_analysis_does_not_stop(llm, scripted):
    scripted(ANSWER)
    g = runtime.generate(llm, "Hello", runtime.Sampling(temperature=0, max_tokens=64), chat=True)
    assert g.text.strip() == "Paris is the capital." and g.completion_tokens == len(script(llm, ANSWER)) - 1  # <|return|> not counted


def test_tool_call_stops_and_is_not_the_answer(llm, scripted):
    scripted(
        "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather "
        '<|constrain|>json<|message|>{"city":"Paris"}<|call|><|start|>assistant<|channel|>final<|message|>never'
    )
    g = runtime.generate(llm, "Weather?", runtime.Sampling(temperature=0, max_tokens=64), chat=True)
    assert (g.text, g.reasoning.strip(), g.finish_reason) == ("", "Need weather.", "stop")
    assert [(c["recipient"], c["channel"], c["text"].strip()) for c in g.tool_calls] == [("functions.get_weather", "commentary", '{"city":"Paris"}')]


def test_plain_run_is_not_parsed(llm, scripted):
    scripted("<|channel|>final<|message|>x<|return|>")
    g = runtime.generate(llm, "Hello", runtime.Sampling(temperature=0, max_tokens=64))
    assert g.text.replace(" ", "") == "<|channel|>final<|message|>x" and g.reasoning is None and "reasoning" not in g.to_json()


# --- the parser on token streams --------------------------------------------------


def parse(chunks: list[str]) -> tuple[HarmonyParser, str, str]:
    final: list[str] = []
    reasoning: list[str] = []
    p = HarmonyParser(final.append, reasoning.append)
    for c in chunks:
        p.feed(c)
    p.close()
    return p, "".join(final), "".join(reasoning)


def split_every(text: str, n: int) -> list[str]:
    return [text[i : i + n] for i in range(0, len(text), n)]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 1000])
def test_parser_markers_split_across_chunks(n):
    text = ANSWER.replace("Paris.", "Paris <b>|<| not a marker.") + "<|start|>assistant<|channel|>final<|message|>after"
    p, final, reasoning = parse(split_every(text, n))
    assert final == p.answer == "Paris is the capital."
    assert reasoning == p.reasoning == "The user asks about France. Capital is Paris <b>|<| not a marker."
    assert p.stopped_by == "<|return|>"


def test_parser_on_llama_cpp_token_pieces(llm):
    """The pieces llama.cpp detokenises one token at a time (markers whole, words split)."""
    pieces = [llm.detokenize([t]).decode() for t in script(llm, ANSWER)]
    p, final, reasoning = parse(pieces)
    assert len(pieces) > 20 and (final.strip(), reasoning.strip()) == ("Paris is the capital.", "The user asks about France. Capital is Paris.")


def test_parser_analysis_only_and_missing_final():
    p, final, reasoning = parse(["<|channel|>analysis<|message|>thinking", " more"])  # cut by --max-tokens
    assert (final, reasoning, p.answer) == ("", "thinking more", "")
    assert p.messages[-1].closed_by is None
    p, final, reasoning = parse(["<|channel|>analysis<|message|>only this<|return|>"])
    assert (final, reasoning, p.stopped_by) == ("", "only this", "<|return|>")


def test_parser_tool_call_and_commentary_are_not_the_answer():
    p, final, reasoning = parse(split_every(
        "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant to=functions.f<|channel|>commentary json<|message|>{}<|call|>", 4
    ))
    assert (final, reasoning, p.stopped_by) == ("", "", "<|call|>")
    assert [(m.channel, m.recipient, m.text) for m in p.messages] == [("commentary", None, "Checking."), ("commentary", "functions.f", "{}")]


def test_parser_trailing_partial_marker_is_text():
    p, final, _ = parse(["<|channel|>final<|message|>a <", "|"])
    assert final == "a <|" and p.done


# --- the CLI --------------------------------------------------------------------


def run_cli(harmony_gguf, monkeypatch, answer: str, *args: str):
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    real_open = runtime.open_model

    def open_scripted(plan):
        model = real_open(plan)
        ids = script(model, answer)
        model.generate = lambda tokens, **kw: (t for t in ids)
        return model

    monkeypatch.setattr(runtime, "open_model", open_scripted)
    return CliRunner().invoke(app, ["run", str(harmony_gguf), "--chat", "-p", "Capital of France?", "--threads", "1", *args])


def test_run_chat_prints_only_the_final_channel(harmony_gguf, monkeypatch):
    r = run_cli(harmony_gguf, monkeypatch, ANSWER)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "Paris is the capital." and r.stdout.endswith("\n")
    assert "Capital is Paris" not in r.stderr


def test_run_chat_show_reasoning(harmony_gguf, monkeypatch):
    r = run_cli(harmony_gguf, monkeypatch, ANSWER, "--show-reasoning")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "Paris is the capital."
    assert "[reasoning]  The user asks about France. Capital is Paris." in r.stderr


def test_run_chat_json_separates_answer_and_reasoning(harmony_gguf, monkeypatch):
    r = run_cli(harmony_gguf, monkeypatch, ANSWER, "--json")
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout)
    assert j["text"].strip() == "Paris is the capital." and j["reasoning"].strip() == "The user asks about France. Capital is Paris."
    assert j["prompt"].endswith("<|start|>user<|message|>Capital of France?<|end|><|start|>assistant")
