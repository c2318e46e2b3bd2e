"""The command line on hostile text, signals and misuse: one line, a non-zero exit, nothing half-written.

Untrusted strings (paths, GGUF keys and values, tensor names, error text) are shown
as they are, never read as rich markup; SIGTERM and SIGHUP unwind like Ctrl-C;
report files are checked before an evaluation starts; out-of-range options are
refused before anything is loaded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import FIXTURE, ROOT
from quantkit.cli.main import MAX_ERROR_CHARS, app

MARKUP = ["[/INST] evil", "[red]x[/red]", "[bold]", "trailing\\", "[/]"]


def _invoke(args, **kw):
    return CliRunner().invoke(app, [str(a) for a in args], terminal_width=200, **kw)


def _no_crash(result):
    """A clean exit: typer's own SystemExit, never another exception."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


def _tiny_gguf(path: Path, name: str, tensor: str = "blk.0.attn_q.weight") -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_string("user.note " + name, name)  # markup in a key too
    w.add_tensor(tensor, np.ones((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("text", MARKUP)
def test_inspect_shows_markup_in_metadata_and_names_as_text(tmp_path, text):
    path = _tiny_gguf(tmp_path / "m.gguf", text, tensor=f"blk.0.{text}.weight")
    result = _invoke(["inspect", path])
    _no_crash(result)
    assert result.exit_code == 0, result.output
    assert text in result.output  # shown, not interpreted (was MarkupError, or "x" shown red)


def test_paths_with_markup_in_success_and_error_lines(tmp_path):
    out = tmp_path / "[" / "x]"  # the audit's -o 'out/[/x].gguf'
    out.mkdir(parents=True)
    result = _invoke(["convert", FIXTURE, "-o", out / "[red]m.gguf", "--type", "f16"])
    _no_crash(result)
    assert result.exit_code == 0, result.output
    assert "[red]m.gguf" in result.output and (out / "[red]m.gguf").is_file()
    missing = tmp_path / "[/nope]"
    result = _invoke(["convert", missing, "-o", tmp_path / "o.gguf"])
    _no_crash(result)
    assert result.exit_code == 1 and "[/nope]" in result.output


def test_error_lines_are_capped(tmp_path):
    result = _invoke(["plan", FIXTURE, "--tensor-type", "x" * (1 << 20)])
    _no_crash(result)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) < MAX_ERROR_CHARS + 100, len(result.output)
    assert "more characters" in lines[0]


def _quantkit(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-c", *args], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# Runs the real console entry point with the output's rename held back until the test has signalled:
# the partial file then certainly exists, with all its bytes, when the signal arrives.
_SLOW_CONVERT = """
import contextlib, sys, time
import quantkit.pipeline.convert as c
orig = c.atomic_file
@contextlib.contextmanager
def slow(path, force=False):
    with orig(path, force) as tmp:
        yield tmp
        (path.parent / "ready").touch()
        time.sleep(60)
c.atomic_file = slow
from quantkit.cli.main import run
sys.argv = ["quantkit", *sys.argv[1:]]
run()
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_during_convert_leaves_nothing(tmp_path, sig):
    out = tmp_path / "m.gguf"
    p = _quantkit(_SLOW_CONVERT, "convert", str(FIXTURE), "-o", str(out), "--type", "q8_0")
    deadline = time.time() + 120
    while not (tmp_path / "ready").exists():
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.05)
    assert [f for f in tmp_path.iterdir() if f.name.endswith(".partial")]  # the write is in progress
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == (130 if sig == signal.SIGINT else 128 + sig), stderr
    assert "Traceback" not in stderr and "nothing was written" in stderr
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ready"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # reaped: nothing runs under this id (reuse within the test is vanishingly unlikely)


def test_stale_partials_of_dead_processes_are_removed(tmp_path, caplog):
    out = tmp_path / "m.gguf"
    stale = tmp_path / f".m.gguf.{_dead_pid()}.abcd1234.partial"
    stale.write_bytes(b"x" * 1000)
    live = tmp_path / ".m.gguf.1.efgh5678.partial"  # pid 1 runs: a conversion in progress elsewhere
    live.write_bytes(b"y")
    other = tmp_path / ".other.gguf.1.efgh5678.partial"
    other.write_bytes(b"z")
    with caplog.at_level("WARNING"):
        result = _invoke(["convert", FIXTURE, "-o", out, "--type", "f16"])
    assert result.exit_code == 0, result.output
    assert not stale.exists() and live.exists() and other.exists() and out.is_file()
    assert any("interrupted run" in r.getMessage() for r in caplog.records)


def test_dangling_symlink_at_output_needs_force(tmp_path):
    out = tmp_path / "m.gguf"
    out.symlink_to(tmp_path / "nowhere.gguf")
    result = _invoke(["convert", FIXTURE, "-o", out, "--type", "f16"])
    _no_crash(result)
    assert result.exit_code == 1 and "symbolic link" in result.output and "--force" in result.output
    assert out.is_symlink() and not (tmp_path / "nowhere.gguf").exists()
    result = _invoke(["convert", FIXTURE, "-o", out, "--type", "f16", "--force"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and not out.is_symlink()


@pytest.mark.parametrize("args", [["convert", FIXTURE, "--type", "f16"], ["eval", "ppl", "m.gguf", "--corpus", "heldout"]])
def test_special_files_are_never_replaced_even_with_force(tmp_path, args):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(fifo)  # as /dev/stdout links to a pipe or terminal
    for target in (fifo, link):
        opt = "-o" if args[0] == "convert" else "--json"
        result = _invoke([*args, opt, target, "--force"])
        _no_crash(result)
        assert result.exit_code == 1 and "not a regular file" in result.output, result.output
        assert fifo.exists() and not fifo.is_file() and link.is_symlink()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["fifo", "link"]


def test_eval_report_path_checked_before_evaluation(tmp_path):
    report = tmp_path / "r.json"
    report.write_text("keep me")
    text = tmp_path / "t.txt"
    text.write_text("some text " * 10)
    # the model does not exist: an error about the report path proves it was checked first
    for cmd in (["eval", "ppl", tmp_path / "none.gguf"], ["eval", "kld", tmp_path / "a.gguf", tmp_path / "b.gguf"]):
        result = _invoke([*cmd, "--text", text, "--json", report])
        _no_crash(result)
        assert result.exit_code == 1 and "already exists" in result.output and "--force" in result.output
        assert report.read_text() == "keep me"
        result = _invoke([*cmd, "--text", text, "--json", tmp_path / "missing" / "r.json"])
        assert result.exit_code == 1 and "does not exist" in result.output


@pytest.mark.parametrize("cmd", [["eval", "ppl", "m.gguf"], ["imatrix", "m.gguf", "-o", "im.gguf"]])
def test_text_that_is_not_a_text_file(tmp_path, cmd):
    cases = {"dir": (tmp_path / "d", "is a directory"), "missing": (tmp_path / "no.txt", "no such file"),
             "binary": (tmp_path / "b.bin", "NUL bytes"), "latin1": (tmp_path / "l.txt", "not UTF-8"), "empty": (tmp_path / "e.txt", "empty text")}
    (tmp_path / "d").mkdir()
    (tmp_path / "b.bin").write_bytes(b"\x00\x01\x02" * 10)
    (tmp_path / "l.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "e.txt").write_text(" \n")
    for path, words in cases.values():
        args = [a if a not in ("m.gguf", "im.gguf") else tmp_path / a for a in cmd]
        result = _invoke([*args, "--text", path])
        _no_crash(result)
        assert result.exit_code == 1 and words in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_gate_outputs_into_missing_directories(tmp_path):
    base = ROOT / "evals" / "baselines" / "tiny-mixtral-Q4_K_M.json"
    for opt in ("--junit", "--json", "--markdown"):
        result = _invoke(["gate", base, "--baseline", base, opt, tmp_path / "no" / "out"])
        _no_crash(result)
        assert result.exit_code == 1 and "does not exist" in result.output, (opt, result.output)
    result = _invoke(["gate", base, "--baseline", base, "--junit", tmp_path / "g.xml", "--json", tmp_path / "g.json"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "g.xml").read_text().startswith("<?xml") and json.loads((tmp_path / "g.json").read_text())["ok"] is True


BAD_OPTIONS = [
    # each: a value outside the option's range, refused by the parser before any file is read
    ["run", "m.gguf", "-p", "x", "--max-tokens", "-1"],
    ["run", "m.gguf", "-p", "x", "--max-tokens", "0"],
    ["run", "m.gguf", "-p", "x", "--threads", "0"],
    ["run", "m.gguf", "-p", "x", "--threads", "-3"],
    ["run", "m.gguf", "-p", "x", "--temperature", "-1"],
    ["run", "m.gguf", "-p", "x", "--top-p", "5"],
    ["run", "m.gguf", "-p", "x", "--top-k", "-3"],
    ["run", "m.gguf", "-p", "x", "--min-p", "2"],
    ["run", "m.gguf", "-p", "x", "--repeat-penalty", "0"],
    ["run", "m.gguf", "-p", "x", "--ctx", "0"],
    ["run", "m.gguf", "-p", "x", "--gpu-layers", "-5"],
    ["run", "m.gguf", "-p", "x", "--seed", "-1"],
    ["chat", "m.gguf", "--ctx", "-2"],
    ["eval", "ppl", "m.gguf", "--corpus", "heldout", "--ctx", "0"],
    ["eval", "ppl", "m.gguf", "--corpus", "heldout", "--ctx", "7"],
    ["eval", "ppl", "m.gguf", "--corpus", "heldout", "--chunks", "0"],
    ["eval", "ppl", "m.gguf", "--corpus", "heldout", "--chunks", "-1"],
    ["eval", "ppl", "m.gguf", "--corpus", "heldout", "--threads", "0"],
    ["eval", "kld", "a.gguf", "b.gguf", "--corpus", "heldout", "--ctx", "-2"],
    ["imatrix", "m.gguf", "--text", "t.txt", "-o", "i.gguf", "--ctx", "1"],
    ["imatrix", "m.gguf", "--text", "t.txt", "-o", "i.gguf", "--chunks", "0"],
    ["convert", "src", "-o", "o.gguf", "--target-bpw", "0"],
    ["convert", "src", "-o", "o.gguf", "--target-bpw", "4", "--calib-text", "t.txt", "--calib-chunks", "0"],
]


@pytest.mark.parametrize("args", BAD_OPTIONS, ids=[" ".join(a[:1] + a[-2:]) for a in BAD_OPTIONS])
def test_out_of_range_options_are_refused_before_loading(args):
    result = _invoke(args)
    _no_crash(result)
    assert result.exit_code == 2 and "Invalid value" in result.output, result.output


_CRASH = """
import sys
import quantkit.format.gguf_read as g
def boom(*a, **k):
    raise RuntimeError("an unexpected [/bug]")
g.read_gguf = boom
from quantkit.cli.main import run
sys.argv = ["quantkit", *sys.argv[1:]]
run()
"""


def test_an_unexpected_exception_is_one_line_not_a_traceback(tmp_path):
    p = _quantkit(_CRASH, "inspect", str(tmp_path / "x.gguf"))
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 70
    assert "Traceback" not in stderr and "internal error (RuntimeError: an unexpected [/bug])" in stderr
    assert "--debug" in stderr and len(stderr.strip().splitlines()) == 1
    p = _quantkit(_CRASH, "--debug", "inspect", str(tmp_path / "x.gguf"))
    assert "Traceback" in p.communicate(timeout=120)[1]


def test_bnb_export_target_rules(tmp_path):
    """--format bnb writes a directory: a link there is refused, and a dead process's partial directory is removed."""
    pytest.importorskip("bitsandbytes")
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    result = _invoke(["convert", FIXTURE, "--format", "bnb", "-o", link, "--force"])
    _no_crash(result)
    assert result.exit_code == 1 and "symbolic link" in result.output
    stale = tmp_path / f".real.{_dead_pid()}.abcd1234.partial"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x")
    result = _invoke(["convert", FIXTURE, "--format", "bnb", "-o", tmp_path / "real"])
    assert result.exit_code == 0, result.output
    assert not stale.exists() and (tmp_path / "real" / "config.json").is_file()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out", "real"]


def test_streamed_text_loses_control_characters_on_a_terminal(monkeypatch):
    """A hostile vocabulary cannot send escape sequences to the user's terminal; pipes get the text as it is."""
    import io

    from quantkit.cli import main as cli

    class Tty(io.StringIO):
        def isatty(self):
            return True

    evil = "ok\x1b]0;pwned\x07\x1b[2J\r\tline\n\x9bX"
    tty = Tty()
    monkeypatch.setattr(sys, "stdout", tty)
    cli._stream(evil)
    assert tty.getvalue() == "ok\ufffd]0;pwned\ufffd\ufffd[2J\ufffd\tline\n\ufffdX"
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stdout", pipe)
    cli._stream(evil)
    assert pipe.getvalue() == evil


@pytest.mark.parametrize("qtype", ["q8_1", "Q8_K", "i32", "f64"])
def test_types_llama_cpp_cannot_compute_with_are_refused_as_rules(qtype):
    """--tensor-type attn_q=q8_1 made the quantiser abort inside ggml (exit 134): refused before any work."""
    result = _invoke(["plan", FIXTURE, "--tensor-type", f"attn_q={qtype}"])
    _no_crash(result)
    assert result.exit_code == 1 and "not a weight type" in result.output, result.output


def test_output_may_not_be_an_input_even_with_force(tmp_path, fixture_gguf):
    """Each of these destroyed its own input with --force and exited 0."""
    src = tmp_path / "fx"
    import shutil

    shutil.copytree(FIXTURE, src)
    model = tmp_path / "m.gguf"
    shutil.copy(fixture_gguf("q8_0"), model)
    text = tmp_path / "t.txt"
    text.write_text("some text to score " * 50)
    cases = [
        ["convert", src, "-o", src / "model.safetensors", "--type", "f16", "--force"],
        ["convert", model, "-o", model, "--type", "q8_0", "--force"],
        ["eval", "ppl", model, "--text", text, "--json", model, "--force"],
        ["eval", "ppl", model, "--text", text, "--json", text, "--force"],
        ["imatrix", model, "--text", text, "-o", model, "--force"],
    ]
    before = {p: p.read_bytes() for p in (src / "model.safetensors", model, text)}
    for args in cases:
        result = _invoke(args)
        _no_crash(result)
        assert result.exit_code == 1 and "input" in result.output and "fix:" in result.output, (args, result.output)
    assert {p: p.read_bytes() for p in before} == before


def test_gate_outputs_must_be_distinct_files(tmp_path):
    base = ROOT / "evals" / "baselines" / "tiny-mixtral-Q4_K_M.json"
    o = tmp_path / "o.json"
    for a, b in (("--json", "--junit"), ("--junit", "--markdown"), ("--json", "--markdown")):
        result = _invoke(["gate", base, "--baseline", base, a, o, b, o])
        _no_crash(result)
        assert result.exit_code == 1 and ("two outputs" in result.output or "another output" in result.output), result.output
        assert not o.exists()
    result = _invoke(["gate", base, "--baseline", base, "--json", base, "--force"])
    assert result.exit_code == 1 and "input" in result.output


def test_output_names_the_os_cannot_take(tmp_path):
    for out in (tmp_path / ("n" * 300 + ".gguf"), tmp_path / ("n" * 300) / "m.gguf"):
        result = _invoke(["convert", FIXTURE, "-o", out, "--type", "f16"])
        _no_crash(result)
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert list(tmp_path.iterdir()) == []


def test_fifo_inputs_do_not_hang(tmp_path):
    """A FIFO nobody writes to: one line at once (was: blocked forever)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    base = ROOT / "evals" / "baselines" / "tiny-mixtral-Q4_K_M.json"
    for args in (["eval", "ppl", "m.gguf", "--text", fifo], ["gate", base, "--baseline", base, "--markdown", fifo],
                 ["convert", FIXTURE, "-o", tmp_path / "o.gguf", "--target-bpw", "5", "--calib-text", fifo]):
        p = subprocess.run([sys.executable, "-m", "quantkit.cli", *map(str, args)], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert p.returncode == 1 and "Traceback" not in p.stderr and p.stderr.startswith("error:"), p.stderr


def test_chat_save_replaces_only_an_earlier_save(tmp_path):
    """/save m.gguf turned the running model into a JSON file: only a conversation saved before is replaced."""
    from quantkit.engine.chat import History, load_history, save_history
    from quantkit.errors import QuantkitError

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF model bytes")
    h = History(system="s").add("hi", "hello")
    with pytest.raises(QuantkitError, match="not a conversation saved by /save"):
        save_history(h, model)
    assert model.read_bytes() == b"GGUF model bytes"
    dangling = tmp_path / "link.json"
    dangling.symlink_to(tmp_path / "nowhere.json")
    with pytest.raises(QuantkitError, match="not a conversation"):
        save_history(h, dangling)
    chat = save_history(History(), tmp_path / "c.json")
    save_history(h, chat)  # an earlier /save is replaced
    assert load_history(chat) == h


def test_bnb_options_with_gguf_output_are_refused(tmp_path):
    """--bnb-type nf9 with a GGUF output was silently ignored."""
    result = _invoke(["convert", FIXTURE, "-o", tmp_path / "o.gguf", "--type", "q8_0", "--bnb-type", "nf9"])
    _no_crash(result)
    assert result.exit_code == 2 and "apply to --format bnb" in result.output
    assert not (tmp_path / "o.gguf").exists()


def test_rerun_audit_leftovers(tmp_path, fixture_gguf):
    """The second audit's last findings: a symlink loop as the source, /save with a name the OS refuses,
    a GGUF whose header hides its last tensor (inspect warns), --update-baseline onto a dangling link."""
    import struct

    from quantkit.engine.chat import History, save_history
    from quantkit.errors import QuantkitError

    loop = tmp_path / "loop1.gguf"
    loop.symlink_to(tmp_path / "loop2.gguf")
    (tmp_path / "loop2.gguf").symlink_to(loop)
    result = _invoke(["convert", loop, "-o", tmp_path / "o.gguf", "--type", "q8_0"])
    _no_crash(result)
    assert result.exit_code == 1 and "internal error" not in result.output and not (tmp_path / "o.gguf").exists()

    with pytest.raises(QuantkitError, match="cannot be used"):
        save_history(History(), tmp_path / ("n" * 300 + ".json"))

    raw = fixture_gguf("q8_0").read_bytes()
    (n,) = struct.unpack("<Q", raw[8:16])
    short = tmp_path / "short.gguf"
    short.write_bytes(raw[:8] + struct.pack("<Q", n - 1) + raw[16:])
    result = _invoke(["inspect", short, "--json"])
    _no_crash(result)
    assert result.exit_code == 0 and "tensor count" in result.output
    assert "warnings" not in json.loads(_invoke(["inspect", fixture_gguf("q8_0"), "--json"]).output)

    base = ROOT / "evals" / "baselines" / "tiny-mixtral-Q4_K_M.json"
    dangling = tmp_path / "b.json"
    dangling.symlink_to(tmp_path / "nowhere" / "b.json")
    result = _invoke(["gate", base, "--baseline", dangling, "--update-baseline"])
    _no_crash(result)
    assert result.exit_code == 1 and "missing file" in result.output and dangling.is_symlink()


def test_last_low_audit_findings(tmp_path):
    """-o DIR/ names a directory (typer's Path dropped the slash and wrote a file DIR); --cache-dir '' is no directory."""
    result = _invoke(["convert", FIXTURE, "-o", str(tmp_path / "newdir") + "/", "--type", "q8_0"])
    _no_crash(result)
    assert result.exit_code == 2 and "names a directory" in _flat(result.output) and not (tmp_path / "newdir").exists()
    result = _invoke(["imatrix", "m.gguf", "--text", "t.txt", "-o", str(tmp_path) + "/"])
    assert result.exit_code == 2 and "names a directory" in _flat(result.output)
    result = _invoke(["eval", "kld", "a.gguf", "b.gguf", "--corpus", "heldout", "--cache-dir", ""])
    _no_crash(result)
    assert result.exit_code == 2 and "--cache-dir" in _flat(result.output)


def _flat(text: str) -> str:
    """typer's usage-error box as one line of words."""
    return " ".join(text.replace("│", " ").split())
