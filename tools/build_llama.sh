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
#
# llama.cpp's own tools the tests compare with ($LLAMA_TOOLS: llama-imatrix, llama-gguf-split) are built the same
# way, from the same sdist's sources, into VENV/bin/<tool>: the tools' own files and the part of llama.cpp's common/
# library they link (not console/debug/llguidance/subproc), compiled once per cache entry ($JOBS at a time; about
# 2.5 CPU-minutes) and kept there as objects, then linked against the installed wheel's libllama/libggml in a second.
set -euo pipefail

VENV=${1:?usage: tools/build_llama.sh VENV}
PY="$VENV/bin/python"
VERSION=0.3.36
CMAKE_ARGS_ALL="${CMAKE_ARGS:+$CMAKE_ARGS }-DGGML_RPC=ON"
CXX=${CXX:-c++}
LLAMA_TOOLS="llama-imatrix llama-gguf-split"
cleanup=()  # temporary folders, removed however the script ends
trap 'rm -rf ${cleanup[@]+"${cleanup[@]}"}' EXIT
JOBS=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}

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

# llama.cpp's tools: compile what they need from the sdist SDIST into DEST (created by one rename: complete or absent).
# Flags as llama.cpp's CMake Release build gives the tools (-O3 -DNDEBUG, no -march: the sums llama-imatrix adds up
# are compiled as in a full build); common/ and cpp-httplib (argument parsing, chat templates, downloads: not on
# any path that computes) at -O1, a third less compile time. No OpenSSL: the tools never download.
build_tools() {  # SDIST DEST
    local t v f
    t=$(mktemp -d "$CACHE_ROOT/.tools.XXXXXX")
    cleanup+=("$t")
    v="llama_cpp_python-$VERSION/vendor/llama.cpp"
    tar -xzf "$1" -C "$t" "$v/common" "$v/include" "$v/ggml/include" "$v/src/llama-ext.h" "$v/vendor/nlohmann" \
        "$v/vendor/sheredom" "$v/vendor/cpp-httplib" "$v/tools/imatrix/imatrix.cpp" "$v/tools/gguf-split/gguf-split.cpp"
    v="$t/$v"
    # common/build-info.cpp as CMake's configure_file writes it outside a git checkout (build 0, commit unknown)
    sed -e 's|@LLAMA_BUILD_NUMBER@|0|' -e 's|@LLAMA_BUILD_COMMIT@|unknown|' -e "s|@BUILD_COMPILER@|$CXX|" \
        -e "s|@BUILD_TARGET@|$(uname -sm)|" "$v/common/build-info.cpp.in" > "$v/common/build-info.cpp"
    mkdir "$t/obj"
    (cd "$v" && {
        for f in common/*.cpp common/jinja/*.cpp common/parsers/*.cpp; do
            case "$f" in common/console.cpp|common/debug.cpp|common/llguidance.cpp|common/subproc.cpp) continue;; esac
            printf '%s -O1\n' "$f"
        done
        printf '%s\n' "vendor/cpp-httplib/httplib.cpp -O1 -DCPPHTTPLIB_FORM_URL_ENCODED_PAYLOAD_MAX_LENGTH=1048576 -DCPPHTTPLIB_LISTEN_BACKLOG=512 -DCPPHTTPLIB_REQUEST_URI_MAX_LENGTH=32768 -DCPPHTTPLIB_TCP_NODELAY=1" \
            "tools/imatrix/imatrix.cpp -O3" "tools/gguf-split/gguf-split.cpp -O3"
    } | CXX="$CXX" OBJ="$t/obj" xargs -P "$JOBS" -L 1 sh -c \
        'o="$OBJ/$(printf %s "$0" | tr / _).o"; exec $CXX -std=c++17 "$@" -DNDEBUG -DLLAMA_SUBPROCESS -w -I common -I vendor -I include -I ggml/include -c "$0" -o "$o"') \
        || { echo "error: compiling llama.cpp's tools failed (the compiler's message is above)" >&2; exit 1; }
    mkdir "$t/tools"
    mv "$t/obj/tools_imatrix_imatrix.cpp.o" "$t/tools/llama-imatrix.o"
    mv "$t/obj/tools_gguf-split_gguf-split.cpp.o" "$t/tools/llama-gguf-split.o"
    ar rcs "$t/tools/libllama-common.a" "$t"/obj/*.o
    rm -rf "$2"  # an incomplete entry
    "$PY" -c 'import os, sys; os.rename(sys.argv[1], sys.argv[2])' "$t/tools" "$2" 2>/dev/null || [ -f "$2/libllama-common.a" ]
}

if ! ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1 || [ ! -f "$CACHE/src/rpc-server.cpp" ]; then
    echo "building llama-cpp-python $VERSION with CMAKE_ARGS='$CMAKE_ARGS_ALL' (several minutes; cached in $CACHE)"
    mkdir -p "$CACHE_ROOT"
    tmp=$(mktemp -d "$CACHE_ROOT/.build.XXXXXX")
    cleanup+=("$tmp")
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
    echo "building llama.cpp's tools ($LLAMA_TOOLS; $JOBS jobs, about 2.5 CPU-minutes)"
    build_tools "$sdist" "$tmp/wheel/tools"
    printf '%s\n' "$key_src" > "$tmp/wheel/KEY"
    rm -rf "$CACHE"  # an incomplete entry
    # one rename: the entry is complete or absent (an interrupted build leaves nothing); if a concurrent build
    # renamed its own first, that one is used
    "$PY" -c 'import os, sys; os.rename(sys.argv[1], sys.argv[2])' "$tmp/wheel" "$CACHE" 2>/dev/null || [ -f "$CACHE/KEY" ]
else
    echo "llama-cpp-python $VERSION (CMAKE_ARGS='$CMAKE_ARGS_ALL') from $CACHE"
fi
# a cache entry from before the reference or the tools were kept: the same sdist again, for what is missing
if [ ! -f "$CACHE/src/llama.cpp/convert_hf_to_gguf.py" ] || [ ! -f "$CACHE/tools/libllama-common.a" ]; then
    t=$(mktemp -d "$CACHE_ROOT/.sdist.XXXXXX")
    cleanup+=("$t")
    "$PY" -m pip download --quiet --no-binary :all: --no-deps -d "$t" "llama-cpp-python==$VERSION"
    if [ ! -f "$CACHE/src/llama.cpp/convert_hf_to_gguf.py" ]; then
        extract_reference "$t/llama_cpp_python-$VERSION.tar.gz" "$CACHE/src/llama.cpp"
    fi
    if [ ! -f "$CACHE/tools/libllama-common.a" ]; then
        echo "building llama.cpp's tools ($LLAMA_TOOLS; $JOBS jobs, about 2.5 CPU-minutes; cached in $CACHE/tools)"
        build_tools "$t/llama_cpp_python-$VERSION.tar.gz" "$CACHE/tools"
    fi
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
for tool in $LLAMA_TOOLS; do
    "$CXX" -o "$VENV/bin/$tool.tmp" "$CACHE/tools/$tool.o" "$CACHE/tools/libllama-common.a" \
        -L "$libdir" -lllama -lggml -lggml-base -Wl,-rpath,"$libdir" -pthread
    mv "$VENV/bin/$tool.tmp" "$VENV/bin/$tool"
done
echo "llama-cpp-python $VERSION with RPC installed; server: $VENV/bin/ggml-rpc-server; tools: $LLAMA_TOOLS in $VENV/bin"
