"""``--rpc``: layers offloaded to llama.cpp RPC servers, on loopback only.

Two ``ggml-rpc-server`` processes (built by ``make setup`` next to the venv's python) on free local ports; the
commands run in subprocesses, since registering a server is process-wide and permanent in llama.cpp.  Outside CI a
missing server binary skips these tests with the reason; under CI (``CI=true``) it fails them, since ``make test``
builds it.  A llama.cpp without the RPC backend always fails (``make setup`` builds it with ``-DGGML_RPC=ON``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from quantkit.errors import QuantkitError

SERVER = Path(sys.executable).parent / "ggml-rpc-server"
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")
CTX = 128


def _need_server() -> None:
    if SERVER.is_file() and os.access(SERVER, os.X_OK):
        return
    message = f"{SERVER} is missing: make setup builds it (tools/build_llama.sh)"
    if IN_CI:
        pytest.fail(message + "; under CI make test must have built it")
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``ggml-rpc-server -H 127.0.0.1 -p PORT`` with a single CPU thread; counts the clients it accepted."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.accepted = 0
        self.proc = subprocess.Popen([str(SERVER), "-H", "127.0.0.1", "-p", str(self.port), "-t", "1"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # listening once a connection succeeds (that probe counts as a client)
            if self.proc.poll() is not None:
                raise AssertionError(f"ggml-rpc-server exited: {''.join(self.lines)[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise AssertionError(f"ggml-rpc-server did not listen on {self.endpoint}")
        self.wait_for(lambda: self.accepted >= 1, 10)
        self.base = self.accepted

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("Accepted client connection"):
                self.accepted += 1

    def wait_for(self, cond, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"ggml-rpc-server {self.endpoint}: timed out; output: {''.join(self.lines)[-2000:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def servers():
    _need_server()
    started: list[Server] = []
    try:
        started += [Server(), Server()]
        yield started
    finally:
        for s in started:
            s.stop()


def _quantkit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "quantkit.cli", *args], capture_output=True, text=True, timeout=timeout, env=env)


def _ppl_args(model: Path, *extra: str) -> list[str]:
    return ["eval", "ppl", str(model), "--corpus", "heldout", "--ctx", str(CTX), "--no-progress", "--threads", "2", *extra]


@pytest.fixture(scope="module")
def q4(fixture_gguf):
    return fixture_gguf("Q4_K_M")


def test_llama_cpp_has_the_rpc_backend():
    """The setup's promise: llama-cpp-python built with -DGGML_RPC=ON (a cached CPU-only wheel would fail here)."""
    from quantkit.engine.rpc import NO_RPC_FIX, rpc_supported

    assert rpc_supported(), f"the installed llama.cpp has no RPC backend; {NO_RPC_FIX}"


@pytest.mark.parametrize("spec, needle", [
    ("", "empty endpoint"),
    ("127.0.0.1:50052,", "empty endpoint"),
    ("127.0.0.1", "expected HOST:PORT"),
    ("127.0.0.1:http", "expected HOST:PORT"),
    ("127.0.0.1:0", "outside 1..65535"),
    ("127.0.0.1:70000", "outside 1..65535"),
    ("[::1]:50052", "IPv6"),
    ("a b:1", "not a host name"),
    ("h:1,h:1", "given twice"),
    (",".join(f"h{i}:1" for i in range(17)), "at most 16"),
])
def test_bad_endpoint_lists_are_refused(spec, needle):
    from quantkit.engine.rpc import parse_endpoints

    with pytest.raises(QuantkitError, match=needle) as e:
        parse_endpoints(spec)
    assert "\n" not in str(e.value) and "fix:" in str(e.value)


def test_endpoint_list_parses():
    from quantkit.engine.rpc import Endpoint, parse_endpoints

    assert parse_endpoints("10.0.0.2:50052, worker-3.lan:50053") == (Endpoint("10.0.0.2", 50052), Endpoint("worker-3.lan", 50053))


def test_probe_refuses_what_is_not_an_rpc_server():
    """Something that accepts connections but does not answer HELLO: a timeout naming the endpoint, not a hang."""
    from quantkit.engine.rpc import Endpoint, probe

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(QuantkitError, match=f"127.0.0.1:{port}: no answer within 0.5 s"):
            probe(Endpoint("127.0.0.1", port), timeout=0.5)
        assert time.monotonic() - t0 < 5


def test_lost_server_line():
    """What an abort in ggml's RPC client becomes: the server that no longer accepts connections, else all of them."""
    from quantkit.engine.rpc import Endpoint, lost_line

    a, b = Endpoint("10.0.0.2", 50052), Endpoint("10.0.0.3", 50052)
    message = "/build/vendor/llama.cpp/ggml/src/ggml-rpc/ggml-rpc.cpp:354: Remote RPC server crashed or returned malformed response"
    assert lost_line(message, (a, b), (b,)) == (
        "error: RPC server 10.0.0.3:50052 is gone (llama.cpp: Remote RPC server crashed or returned malformed response); "
        "fix: restart ggml-rpc-server there, or leave it out of --rpc, and rerun\n"
    )
    line = lost_line(message, (a, b), ())
    assert line.startswith("error: an RPC server (10.0.0.2:50052, 10.0.0.3:50052) stopped answering") and line.count("\n") == 1


def test_down_tells_a_server_going_away_from_a_busy_one():
    """Which endpoints the abort line names: a closed port, and a listener that takes the connection and closes it at once
    (a server killed a moment ago, its listening socket not yet torn down) are down; one that accepts and stays silent
    (ggml-rpc-server serving another client) is not."""
    from quantkit.engine.rpc import Endpoint, _down

    def listener(close_at_once: bool) -> tuple[socket.socket, Endpoint]:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)

        def serve() -> None:
            held = []
            while True:
                try:
                    c, _ = srv.accept()
                except OSError:
                    return
                if close_at_once:
                    c.close()
                else:
                    held.append(c)

        threading.Thread(target=serve, daemon=True).start()
        return srv, Endpoint("127.0.0.1", srv.getsockname()[1])

    dying, d = listener(True)
    busy, b = listener(False)
    closed = Endpoint("127.0.0.1", _free_port())
    try:
        assert _down((b, d, closed)) == [d, closed]
    finally:
        dying.close()
        busy.close()


def test_ppl_through_two_servers_equals_local(servers, q4, monkeypatch):
    local = _quantkit(*_ppl_args(q4, "--chunks", "3", "--json", "-"))
    assert local.returncode == 0, local.stderr
    spec = ",".join(s.endpoint for s in servers)
    remote = _quantkit(*_ppl_args(q4, "--chunks", "3", "--json", "-", "--rpc", spec))
    assert remote.returncode == 0, remote.stderr
    for s in servers:  # quantkit's probe, then llama.cpp's connections (it opens several while loading)
        assert s.accepted >= s.base + 2, s.lines
    a, b = json.loads(local.stdout), json.loads(remote.stdout)
    assert a["n_scored"] == b["n_scored"] and a["n_chunks"] == b["n_chunks"] == 3
    # Locally llama.cpp repacks Q4_K weights for its CPU GEMM kernels (use_extra_bufts); a server keeps them as
    # stored and runs the plain dot products: measured 1.3e-4 to 1.5e-4 relative on the fixture (AMD EPYC; F32 and
    # Q8_0 files give bit-identical results).  Without the repacking the local run is the servers' result exactly.
    assert abs(a["ppl"] - b["ppl"]) <= 1e-3 * a["ppl"], (a["ppl"], b["ppl"])
    import llama_cpp

    from quantkit.evals.corpora import heldout_text
    from quantkit.evals.perplexity import perplexity

    defaults = llama_cpp.llama_model_default_params

    def no_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(llama_cpp, "llama_model_default_params", no_repack)
    plain = perplexity(q4, heldout_text(), n_ctx=CTX, n_chunks=3, threads=2)
    assert f"{plain.ppl:.4f}" == f"{b['ppl']:.4f}" and plain.ppl == b["ppl"], (plain.ppl, b["ppl"])


def test_run_through_a_server_places_layers_there(servers, q4):
    """run --json: the load plan names the RPC device; greedy text equals the local run's."""
    args = ["run", str(q4), "-p", "HAMLET. To be, or not to be", "--temperature", "0", "--max-tokens", "12", "--ctx", "256", "--json"]
    local = _quantkit(*args)
    remote = _quantkit(*args, "--rpc", servers[0].endpoint)
    assert local.returncode == 0 and remote.returncode == 0, (local.stderr, remote.stderr)
    a, b = json.loads(local.stdout), json.loads(remote.stdout)
    assert a["load"]["gpu_layers"] == 0 and a["load"]["backend"] == "CPU only"
    assert b["load"]["gpu_layers"] > 0 and servers[0].endpoint in b["load"]["backend"], b["load"]
    assert a["text"] == b["text"]


def test_down_server_is_one_line_naming_it(servers, q4):
    down = f"127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    r = _quantkit(*_ppl_args(q4, "--chunks", "1", "--rpc", f"{servers[0].endpoint},{down}"), timeout=60)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and down in lines[0] and "refused" in lines[0], r.stderr
    assert servers[0].endpoint not in lines[0]
    assert r.stdout == "" and time.monotonic() - t0 < 30
    assert servers[0].accepted == servers[0].base + 1  # probed, never handed the model


def test_server_killed_mid_run_is_an_error_not_a_hang(servers, q4):
    a, b = servers
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "400"}
    proc = subprocess.Popen([sys.executable, "-m", "quantkit.cli", *_ppl_args(q4, "--rpc", f"{a.endpoint},{b.endpoint}")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        b.wait_for(lambda: b.accepted >= b.base + 2, 120)  # llama.cpp connected: the model is loading or running
        time.sleep(1.0)
        assert proc.poll() is None, "the run ended before the server could be killed: give it more text"
        b.proc.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        out, errs = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, (proc.returncode, errs)
    lines = errs.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: RPC server ") and f"{b.endpoint} is gone" in lines[0], errs
    assert a.endpoint not in lines[0]
    assert elapsed < 30
