#!/usr/bin/env bash
# Install llama-cpp-python, built from source with llama.cpp's RPC backend (-DGGML_RPC=ON), into a venv,
# and build llama.cpp's `ggml-rpc-server` next to it (VENV/bin/ggml-rpc-server).
#
#   tools/build_llama.sh VENV
#
# pip's wheel cache does not key on CMAKE_ARGS: a plain `pip install llama-cpp-python` may reuse a wheel built
# earlier without RPC (or with other options). So the wheel is built here with --no-cache-dir and kept in our own
# cache, keyed by the version, the CMake arguments and (llama.cpp builds with -march=native by default) the CPU:
#   ${QUANTKIT_WHEEL_CACHE:-${XDG_CACHE_HOME:-~/.cache}/quantkit/wheels}/<key>/
# A second clone on the same machine installs that wheel in seconds. Extra CMake options (CUDA, Metal, ...) come
# from $CMAKE_ARGS as with pip; -DGGML_RPC=ON is always added.
#
# The server is rpc-server.cpp from the same sources compiled alone against the installed wheel's libggml
# (seconds, not a second llama.cpp build). The install fails if the installed llama.cpp has no RPC backend.
set -euo pipefail

VENV=${1:?usage: tools/build_llama.sh VENV}
PY="$VENV/bin/python"
VERSION=0.3.36
CMAKE_ARGS_ALL="${CMAKE_ARGS:+$CMAKE_ARGS }-DGGML_RPC=ON"
CXX=${CXX:-c++}

cpu_flags=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || uname -m)
key_src="llama-cpp-python=$VERSION|$CMAKE_ARGS_ALL|$(uname -sm)|$cpu_flags"
key=$(printf '%s' "$key_src" | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:16])')
CACHE_ROOT=${QUANTKIT_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/quantkit/wheels}
CACHE="$CACHE_ROOT/llama-cpp-python-$VERSION-$key"

# The reference the tests compare with (llama.cpp's own Python): the vendored converter
# (convert_hf_to_gguf.py, conversion/) and its gguf-py, a few MB of the same sdist, copied to VENV/llama.cpp-src.
extract_reference() {  # SDIST DEST
    local t
    t=$(mktemp -d "$CACHE_ROOT/.ref.XXXXXX")
    tar -xzf "$1" -C "$t" "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/conversion" "llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py"
    rm -rf "$2"
    mv "$t/llama_cpp_python-$VERSION/vendor/llama.cpp" "$2"
    rm -rf "$t"
}

if ! ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1 || [ ! -f "$CACHE/src/rpc-server.cpp" ]; then
    echo "building llama-cpp-python $VERSION with CMAKE_ARGS='$CMAKE_ARGS_ALL' (several minutes; cached in $CACHE)"
    mkdir -p "$CACHE_ROOT"
    tmp=$(mktemp -d "$CACHE_ROOT/.build.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    "$PY" -m pip download --quiet --no-binary :all: --no-deps -d "$tmp/sdist" "llama-cpp-python==$VERSION"
    sdist=$(ls "$tmp"/sdist/llama_cpp_python-"$VERSION".tar.gz)
    CMAKE_ARGS="$CMAKE_ARGS_ALL" "$PY" -m pip wheel --quiet --no-deps --no-cache-dir -w "$tmp/wheel" "$sdist"
    # What the server build needs from the sources: ggml's public headers and the server's one file.
    mkdir -p "$tmp/wheel/src"
    tar -xzf "$sdist" -C "$tmp" "llama_cpp_python-$VERSION/vendor/llama.cpp/ggml/include" \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/tools/rpc/rpc-server.cpp"
    vendor="$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp"
    cp -r "$vendor/ggml/include" "$tmp/wheel/src/include"
    cp "$vendor/tools/rpc/rpc-server.cpp" "$tmp/wheel/src/rpc-server.cpp"
    extract_reference "$sdist" "$tmp/wheel/src/llama.cpp"
    printf '%s\n' "$key_src" > "$tmp/wheel/KEY"
    rm -rf "$CACHE"  # an incomplete entry
    # one rename: the entry is complete or absent (an interrupted build leaves nothing); if a concurrent build
    # renamed its own first, that one is used
    "$PY" -c 'import os, sys; os.rename(sys.argv[1], sys.argv[2])' "$tmp/wheel" "$CACHE" 2>/dev/null || [ -f "$CACHE/KEY" ]
else
    echo "llama-cpp-python $VERSION (CMAKE_ARGS='$CMAKE_ARGS_ALL') from $CACHE"
fi
if [ ! -f "$CACHE/src/llama.cpp/convert_hf_to_gguf.py" ]; then  # a cache entry from before the reference was kept
    t=$(mktemp -d "$CACHE_ROOT/.sdist.XXXXXX")
    "$PY" -m pip download --quiet --no-binary :all: --no-deps -d "$t" "llama-cpp-python==$VERSION"
    extract_reference "$t/llama_cpp_python-$VERSION.tar.gz" "$CACHE/src/llama.cpp"
    rm -rf "$t"
fi
rm -rf "$VENV/llama.cpp-src"
cp -r "$CACHE/src/llama.cpp" "$VENV/llama.cpp-src"
wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl | head -n1)

# --force-reinstall: a llama-cpp-python 0.3.36 already in the venv (say, built without RPC) must be replaced;
# the second call installs its dependencies without touching the wheel again.
"$PY" -m pip install --quiet --no-deps --force-reinstall "$wheel"
"$PY" -m pip install --quiet "$wheel"

libdir=$("$PY" - <<'EOF'
import os, importlib.util
spec = importlib.util.find_spec("llama_cpp")
print(os.path.join(os.path.dirname(spec.origin), "lib"))
EOF
)

# The check: the installed llama.cpp registers an "RPC" backend.
"$PY" - "$libdir" <<'EOF'
import ctypes, os, sys
libdir = sys.argv[1]
ext = ".dylib" if sys.platform == "darwin" else ".so"
ctypes.CDLL(os.path.join(libdir, "libggml-base" + ext), mode=ctypes.RTLD_GLOBAL)
ggml = ctypes.CDLL(os.path.join(libdir, "libggml" + ext), mode=ctypes.RTLD_GLOBAL)
ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
if not ggml.ggml_backend_reg_by_name(b"RPC"):
    sys.exit(f"error: the llama.cpp in {libdir} has no RPC backend (built without -DGGML_RPC=ON)")
EOF

"$CXX" -std=c++17 -O2 -o "$VENV/bin/ggml-rpc-server.tmp" "$CACHE/src/rpc-server.cpp" -I "$CACHE/src/include" \
    -L "$libdir" -lggml -lggml-base -Wl,-rpath,"$libdir" -pthread
mv "$VENV/bin/ggml-rpc-server.tmp" "$VENV/bin/ggml-rpc-server"
echo "llama-cpp-python $VERSION with RPC installed; server: $VENV/bin/ggml-rpc-server"
