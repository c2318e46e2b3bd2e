#!/usr/bin/env bash
# Regenerate the llama.cpp reference outputs that tests compare quantkit with:
#   ppl:     evals/reference/llama_perplexity.json, perplexity numbers printed by llama.cpp's
#            own llama-perplexity on the bundled fixture (tests/test_eval.py, 4 significant digits);
#   imatrix: evals/reference/imatrix-fixture.gguf (+ .json: command, model and text SHA-256),
#            llama-imatrix's importance matrix of the BF16 fixture (tests/test_imatrix.py).
#
# Builds the tools from the llama.cpp sources vendored in the llama-cpp-python sdist of the
# installed version (pip download, cached in $WORK), converts the fixture with quantkit, and
# runs them on the held-out Shakespeare plays.
#   usage: evals/reference/make_refs.sh [WORK_DIR] [ppl|imatrix|all]   (run from the repo root, .venv set up)
set -euo pipefail
WORK=${1:-/tmp/qk-llama-ref}
WHAT=${2:-all}
PY=${PY:-.venv/bin/python}
QK=${QK:-.venv/bin/quantkit}
CTX=256
CHUNKS=6
IM_CTX=128     # llama-imatrix: small chunks, one per batch (-b = -c) as quantkit decodes them
IM_CHUNKS=4
VER=$($PY -c "import llama_cpp; print(llama_cpp.__version__)")
mkdir -p "$WORK"
SRC="$WORK/llama_cpp_python-$VER/vendor/llama.cpp"
if [ ! -x "$SRC/build/bin/llama-perplexity" ] || [ ! -x "$SRC/build/bin/llama-imatrix" ]; then
  [ -f "$WORK/llama_cpp_python-$VER.tar.gz" ] || $PY -m pip download --no-binary :all: --no-deps "llama-cpp-python==$VER" -d "$WORK"
  [ -d "$SRC" ] || tar -xzf "$WORK/llama_cpp_python-$VER.tar.gz" -C "$WORK"
  cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
  cmake --build "$SRC/build" --target llama-perplexity llama-imatrix -j"$(nproc)" >/dev/null
fi
$PY -c "from quantkit.evals.corpora import heldout_text; open('$WORK/heldout.txt','w',encoding='utf-8').write(heldout_text())"
TEXT_SHA=$(sha256sum "$WORK/heldout.txt" | cut -d' ' -f1)

if [ "$WHAT" = imatrix ] || [ "$WHAT" = all ]; then
  $QK convert tests/fixtures/tiny-mixtral -o "$WORK/tiny-mixtral-bf16.gguf" --type bf16 --force --no-progress >/dev/null
  OUT="$PWD/evals/reference/imatrix-fixture.gguf"
  CMD="llama-imatrix -m tiny-mixtral-bf16.gguf -f heldout.txt -c $IM_CTX -b $IM_CTX --chunks $IM_CHUNKS -o imatrix-fixture.gguf"
  (cd "$WORK" && "$SRC/build/bin/llama-imatrix" -m tiny-mixtral-bf16.gguf -f heldout.txt -c $IM_CTX -b $IM_CTX --chunks $IM_CHUNKS \
     -t "$(nproc)" -o "$OUT" >/dev/null 2>&1)
  cat > evals/reference/imatrix-fixture.json <<JSON
{
  "made_by": "evals/reference/make_refs.sh: llama-imatrix built from llama-cpp-python $VER's vendored llama.cpp, $(date -u +%Y-%m-%d), $(uname -m)",
  "command": "$CMD",
  "n_ctx": $IM_CTX,
  "n_chunks": $IM_CHUNKS,
  "model": "tests/fixtures/tiny-mixtral converted by quantkit --type bf16",
  "model_sha256": "$(sha256sum "$WORK/tiny-mixtral-bf16.gguf" | cut -d' ' -f1)",
  "text_sha256": "$TEXT_SHA",
  "imatrix_sha256": "$(sha256sum "$OUT" | cut -d' ' -f1)"
}
JSON
  cat evals/reference/imatrix-fixture.json
fi
[ "$WHAT" = ppl ] || [ "$WHAT" = all ] || exit 0

results=()
for t in bf16 q8_0; do
  $QK convert tests/fixtures/tiny-mixtral -o "$WORK/tiny-mixtral-$t.gguf" --type "$t" --force --no-progress >/dev/null
  line=$("$SRC/build/bin/llama-perplexity" -m "$WORK/tiny-mixtral-$t.gguf" -f "$WORK/heldout.txt" -c $CTX --chunks $CHUNKS -t "$(nproc)" 2>&1 | grep "Final estimate")
  ppl=$(echo "$line" | sed -E 's/.*PPL = ([0-9.]+) \+\/- ([0-9.]+).*/\1/')
  err=$(echo "$line" | sed -E 's/.*PPL = ([0-9.]+) \+\/- ([0-9.]+).*/\2/')
  sha=$(sha256sum "$WORK/tiny-mixtral-$t.gguf" | cut -d' ' -f1)
  results+=("{\"type\": \"$t\", \"n_ctx\": $CTX, \"n_chunks\": $CHUNKS, \"ppl\": $ppl, \"ppl_stderr\": $err, \"model_sha256\": \"$sha\", \"text_sha256\": \"$TEXT_SHA\"}")
done
{
  echo "{"
  echo "  \"made_by\": \"evals/reference/make_refs.sh: llama-perplexity built from llama-cpp-python $VER's vendored llama.cpp, $(date -u +%Y-%m-%d), $(uname -m)\","
  echo "  \"command\": \"llama-perplexity -m MODEL -f heldout.txt -c $CTX --chunks $CHUNKS\","
  echo "  \"results\": ["
  (IFS=$',\n'; echo "    ${results[*]}" | sed 's/},{/},\n    {/g')
  echo "  ]"
  echo "}"
} > evals/reference/llama_perplexity.json
cat evals/reference/llama_perplexity.json
