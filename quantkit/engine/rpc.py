"""llama.cpp's RPC backend: model layers offloaded to ``ggml-rpc-server`` processes on other machines (``--rpc``).

llama-cpp-python 0.3.36's ``Llama`` has no RPC argument.  llama.cpp built with ``-DGGML_RPC=ON`` has an ``"RPC"``
backend registry whose ``ggml_backend_rpc_add_server(endpoint)`` (found through ``ggml_backend_reg_get_proc_address``)
returns a registry holding the server's devices; ``ggml_backend_register`` adds them to ggml's device list, exactly as
llama.cpp's own ``--rpc`` does (``common/arg.cpp`` ``add_rpc_devices``).  Model loading then places offloaded layers
on RPC devices first (``llama_prepare_model_devices``), split by the memory each server reports, so
:func:`add_servers` only has to run before the model is loaded; ``--gpu-layers`` says how many layers leave the host.

ggml's RPC client aborts the process (``GGML_ABORT``) when it cannot connect, when the handshake fails and when a
server goes away mid-run.  So every endpoint is first probed from Python (TCP connect and the protocol's HELLO, with
a timeout: a server busy with another client does not answer it), and an abort raised by the RPC client later is
turned into one line naming the endpoint that stopped answering, and exit status 1 (:func:`_install_abort_line`).
The registry is process-wide and llama.cpp offers no way to remove a server: :func:`add_servers` registers each
endpoint once per process.

RPC is unauthenticated and unencrypted: servers belong on a trusted network.

Not for: choosing layers or memory (``quantkit.engine.runtime``).
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any, Sequence

from quantkit.errors import QuantkitError

#: ``ggml-rpc.h`` of llama-cpp-python 0.3.36: protocol version, most servers; ``ggml-rpc.cpp``: HELLO's command
#: number (fixed across versions) and the size of its capability field.
RPC_PROTO_MAJOR, RPC_PROTO_MINOR = 7, 0
GGML_RPC_MAX_SERVERS = 16
RPC_CMD_HELLO = 14
RPC_CONN_CAPS_SIZE = 24
#: seconds a probe waits for a connection and for the HELLO answer
PROBE_TIMEOUT = 5.0
DEFAULT_PORT = 50052
OPTION_HELP = (
    "Offload layers to llama.cpp RPC servers (ggml-rpc-server on each worker), HOST:PORT[,HOST:PORT...]; "
    "unauthenticated: trusted networks only."
)
_FIX_FORMAT = f"fix: give HOST:PORT[,HOST:PORT...], e.g. --rpc 192.168.1.10:{DEFAULT_PORT},192.168.1.11:{DEFAULT_PORT}"
_HOST = re.compile(r"[A-Za-z0-9._-]{1,253}")


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_endpoints(spec: str) -> tuple[Endpoint, ...]:
    """``HOST:PORT[,HOST:PORT...]`` as llama.cpp reads it (the host is a name or an IPv4 address: llama.cpp splits
    at the first colon, so IPv6 literals cannot be given); one line naming the bad part otherwise."""
    shown = spec if len(spec) <= 80 else spec[:80] + "…"
    parts = [p.strip() for p in spec.split(",")]
    if not spec.strip() or not all(parts):
        raise QuantkitError(f"--rpc {shown!r}: an empty endpoint; {_FIX_FORMAT}")
    if len(parts) > GGML_RPC_MAX_SERVERS:
        raise QuantkitError(f"--rpc: {len(parts)} servers, llama.cpp takes at most {GGML_RPC_MAX_SERVERS}; fix: give fewer servers")
    out: list[Endpoint] = []
    for part in parts:
        text = part if len(part) <= 80 else part[:80] + "…"
        host, colon, port = part.rpartition(":")
        if not colon or not port.isascii() or not port.isdigit():
            raise QuantkitError(f"--rpc {text!r}: expected HOST:PORT; {_FIX_FORMAT}")
        if not _HOST.fullmatch(host):
            raise QuantkitError(f"--rpc {text!r}: {host!r} is not a host name or IPv4 address (IPv6 literals are not supported by llama.cpp); {_FIX_FORMAT}")
        number = int(port)
        if not 0 < number < 65536:
            raise QuantkitError(f"--rpc {text!r}: port {number} is outside 1..65535; {_FIX_FORMAT}")
        ep = Endpoint(host, number)
        if ep in out:
            raise QuantkitError(f"--rpc: {ep} is given twice; fix: list each server once")
        out.append(ep)
    return tuple(out)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        piece = sock.recv(n - len(data))
        if not piece:
            raise ConnectionError("the connection was closed")
        data += piece
    return data


def probe(ep: Endpoint, timeout: float = PROBE_TIMEOUT) -> None:
    """Connect and exchange the RPC protocol's HELLO as llama.cpp's client does; QuantkitError naming ``ep`` and the
    reason when that fails (nothing listening, no answer in ``timeout`` seconds, not a ggml-rpc-server, another
    protocol version)."""
    start = f"--rpc {ep}: "
    fix_run = f"fix: start it there (ggml-rpc-server -H 0.0.0.0 -p {ep.port}) or leave it out of --rpc"
    try:
        with socket.create_connection((ep.host, ep.port), timeout=timeout) as s:
            # request: | cmd (1 byte) | size (8 bytes, the client's byte order) | caps (no RDMA: zeros) |
            s.sendall(bytes([RPC_CMD_HELLO]) + struct.pack("=Q", RPC_CONN_CAPS_SIZE) + bytes(RPC_CONN_CAPS_SIZE))
            (size,) = struct.unpack("=Q", _recv_exactly(s, 8))
            if size != 4 + RPC_CONN_CAPS_SIZE:
                raise QuantkitError(f"{start}answered HELLO with {size} bytes, not a ggml-rpc-server of RPC protocol {RPC_PROTO_MAJOR}.x; "
                                    "fix: run the ggml-rpc-server built from llama-cpp-python 0.3.36's llama.cpp (README: Multi-machine)")
            major, minor, patch = _recv_exactly(s, size)[:3]
    except socket.gaierror as e:
        raise QuantkitError(f"{start}cannot resolve host {ep.host!r} ({e.strerror}); fix: check the name or give an IP address") from None
    except ConnectionRefusedError:
        raise QuantkitError(f"{start}connection refused, no ggml-rpc-server listening there; {fix_run}") from None
    except (socket.timeout, TimeoutError):
        raise QuantkitError(f"{start}no answer within {timeout:g} s (unreachable, or the server is busy with another client: "
                            f"ggml-rpc-server serves one at a time); {fix_run}, or wait for the other client to finish") from None
    except (ConnectionError, OSError) as e:
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise QuantkitError(f"{start}connection failed ({why}); {fix_run}") from None
    if major != RPC_PROTO_MAJOR or minor > RPC_PROTO_MINOR:
        raise QuantkitError(f"{start}the server speaks RPC protocol {major}.{minor}.{patch}, this llama.cpp {RPC_PROTO_MAJOR}.{RPC_PROTO_MINOR}.x; "
                            "fix: run the ggml-rpc-server built from llama-cpp-python 0.3.36's llama.cpp (README: Multi-machine)")


@functools.lru_cache(maxsize=1)
def _libggml() -> Any:
    """libggml as libllama links it (``.so.0``: llama-cpp-python's ``llama_cpp._ggml`` maps a second copy, whose
    device registry model loading never sees), with the registry prototypes declared."""
    from quantkit.format import ggml

    lib = ggml._load("ggml")
    vp = ctypes.c_void_p
    for name, res, args in (
        ("ggml_backend_reg_by_name", vp, [ctypes.c_char_p]),
        ("ggml_backend_reg_get_proc_address", vp, [vp, ctypes.c_char_p]),
        ("ggml_backend_register", None, [vp]),
        ("ggml_backend_reg_dev_count", ctypes.c_size_t, [vp]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def rpc_supported() -> bool:
    """Whether the installed llama.cpp has the RPC backend (built with -DGGML_RPC=ON)."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    return bool(_libggml().ggml_backend_reg_by_name(b"RPC"))


_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)  # ggml_backend_reg_t (*)(const char * endpoint)
_added: dict[Endpoint, int] = {}  # endpoint -> devices registered (the registry is process-wide)
_known: list[Endpoint] = []  # endpoints handed to llama.cpp (registered, or being registered): named when one is lost
_add_lock = threading.Lock()
NO_RPC_FIX = ("fix: rerun make setup (it builds llama-cpp-python with -DGGML_RPC=ON), or "
              "CMAKE_ARGS=-DGGML_RPC=ON pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python==0.3.36")


def add_servers(spec: str | Sequence[Endpoint], timeout: float = PROBE_TIMEOUT) -> tuple[Endpoint, ...]:
    """Probe every endpoint, then register each as llama.cpp devices; call before a model is loaded.

    QuantkitError (one line naming the endpoint) for a malformed list, a server that is down or does not answer,
    or a llama.cpp built without RPC.  Returns the endpoints."""
    endpoints = parse_endpoints(spec) if isinstance(spec, str) else tuple(spec)
    from quantkit.format import ggml

    ggml.prepare_llama()  # llama.cpp's own abort line first: the RPC line below chains to it
    if not rpc_supported():
        raise QuantkitError(f"--rpc: this llama-cpp-python was built without llama.cpp's RPC backend; {NO_RPC_FIX}")
    lib = _libggml()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    address = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
    if not address:
        raise QuantkitError(f"--rpc: llama.cpp's RPC backend has no ggml_backend_rpc_add_server; {NO_RPC_FIX}")
    add = _ADD_SERVER(address)
    with _add_lock:
        new = [ep for ep in endpoints if ep not in _added]
        for ep in new:  # all of them before any is registered: a failure leaves nothing half-registered
            probe(ep, timeout)
        _install_abort_line()
        for ep in new:
            if ep not in _known:
                _known.append(ep)
            server = add(str(ep).encode())  # connects (again) and asks for the device count
            if not server:
                raise QuantkitError(f"--rpc {ep}: the server offers no device; fix: start ggml-rpc-server there with a device (see its --device)")
            lib.ggml_backend_register(server)
            _added[ep] = int(lib.ggml_backend_reg_dev_count(server))
    from quantkit.engine import runtime

    clear = getattr(runtime.detect_backend, "cache_clear", None)
    if clear is not None:
        clear()  # the device list (and its memory figures) now includes the servers
    return endpoints


def added() -> tuple[Endpoint, ...]:
    """The endpoints registered in this process."""
    return tuple(_added)


# --- an RPC server lost mid-run -----------------------------------------------------------------------------------------

_abort_state: dict[str, Any] = {}  # "callback": the C callback, "previous": the one it chains to, "fd": stderr copy
_RPC_SOURCE = re.compile(r"ggml-rpc[/\\]|ggml-rpc\.cpp:")


def lost_line(message: str, endpoints: Sequence[Endpoint], down: Sequence[Endpoint]) -> str:
    """The one line for an abort inside ggml's RPC client (``message`` as ggml_abort formats it: ``file:line: what``)."""
    what = " ".join(re.sub(r"^\S*?ggml-rpc\.cpp:\d+:\s*", "", message).split())[:200] or "no message"
    if down:
        who = ", ".join(map(str, down))
        verb = "is" if len(down) == 1 else "are"
        return (f"error: RPC server {who} {verb} gone (llama.cpp: {what}); "
                f"fix: restart ggml-rpc-server there, or leave it out of --rpc, and rerun\n")
    who = ", ".join(map(str, endpoints)) or "?"
    return (f"error: an RPC server ({who}) stopped answering (llama.cpp: {what}); "
            "fix: check that ggml-rpc-server still runs on each and the network between, and rerun\n")


def _down(endpoints: Sequence[Endpoint], timeout: float = 1.0, settle: float = 0.3) -> list[Endpoint]:
    """Endpoints that refuse or ignore a new connection now, or close it at once (a server that went away).

    A server killed a moment ago can still take a connection into its listening socket's queue while the kernel
    tears the process down, then reset it: so a connection that was accepted is watched for ``settle`` seconds.
    A live server says nothing first (the client speaks first in ggml's RPC protocol; one busy with another client
    leaves it queued), so silence means alive."""
    out = []
    for ep in endpoints:
        try:
            with socket.create_connection((ep.host, ep.port), timeout=timeout) as s:
                s.settimeout(settle)
                try:
                    if s.recv(1) == b"":
                        out.append(ep)  # closed without a word: going away
                except socket.timeout:
                    pass
        except OSError:  # refused, reset, unreachable, no answer to the connect
            out.append(ep)
    return out


def _install_abort_line() -> None:
    """Put a callback in front of quantkit's abort line (``quantkit.format.ggml``): an abort raised in ggml's RPC
    client (a server went away, a handshake failed) writes :func:`lost_line`, naming the server that no longer
    accepts connections, and ends the process with status 1; any other abort goes on to the previous callback."""
    if _abort_state:
        return
    from quantkit.format import ggml

    base = ggml.lib()  # libggml-base as libllama links it: ggml_abort and its callback live there
    proto = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
    register = base.ggml_set_abort_callback
    fd = os.dup(2)  # llama-cpp-python points stderr at /dev/null while it loads a model
    said = threading.Event()

    def on_abort(raw: bytes | None) -> None:
        message = (raw or b"").decode("utf-8", "replace")
        try:
            if _RPC_SOURCE.search(message):
                if not said.is_set():
                    said.set()
                    endpoints = tuple(_known)
                    os.write(fd, lost_line(message, endpoints, _down(endpoints)).encode("utf-8", "replace"))
                os._exit(1)  # llama.cpp would abort() next: same end, no core file, the status a refused run has
            previous = _abort_state.get("previous")
            if previous:
                proto(previous)(raw)
            else:
                os.write(fd, (message + "\n").encode("utf-8", "replace"))
        except BaseException:  # nothing may unwind into C; the abort follows regardless
            pass

    callback = proto(on_abort)
    register.argtypes = [proto]
    register.restype = ctypes.c_void_p
    previous = register(callback)
    _abort_state.update(callback=callback, previous=previous, fd=fd)
