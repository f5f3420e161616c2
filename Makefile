# Two commands for a fresh machine:
#   make run   sets up and runs the main job (a batch file on the embedded default model)
#   make test  sets up and passes every test (ctest + pytest)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
BUILD_DIR ?= build/ci
DEV_BUILD_DIR ?= build/dev
JOBS ?= $(shell nproc)

.PHONY: all venv install test test-cpp test-python run dev clean

all: test

# The virtual environment with torch (pinned: an unpinned torch pulls a multi-GB CUDA build)
# and the build and test dependencies from pyproject's extras.
$(VENV)/.ready: pyproject.toml .ci/requirements.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q ninja "cmake>=3.24" $$($(PY) .ci/requirements.py build test bench)
	touch $@

venv: $(VENV)/.ready

# Build and install the package (with its GoogleTest suites in $(BUILD_DIR) for ctest).
install: venv
	rm -f python/batchllm_core/_C*.so
	CMAKE_BUILD_PARALLEL_LEVEL=$(JOBS) $(PIP) install --no-build-isolation --no-deps -q \
	  -Cbuild-dir=$(BUILD_DIR) -Ccmake.define.BATCHLLM_BUILD_TESTS=ON .

test-cpp: install
	ctest --test-dir $(BUILD_DIR) --output-on-failure -j $(JOBS)

# Without a GPU, the GPU op tests run the CUDA kernels on the CPU emulation built beside the gtests.
test-python: install
	cd tests && BATCHLLM_CUDA_EMULATION_DIR=$(abspath $(BUILD_DIR))/cuda_emulation \
	  ../$(PY) -m pytest -q -p no:cacheprovider python

test: test-cpp test-python

run: install
	$(VENV)/bin/batchllm run-batch -i examples/fewshot_batch.jsonl -o build/fewshot_output.jsonl

# Development: build _C in place (python/batchllm_core) and run tests with PYTHONPATH=python.
dev: venv
	$(VENV)/bin/cmake -S . -B $(DEV_BUILD_DIR) -G Ninja -DBATCHLLM_DEV_INPLACE=ON -DBATCHLLM_BUILD_TESTS=ON \
	  -DPython_EXECUTABLE=$(abspath $(PY)) -Dpybind11_DIR=$$($(PY) -m pybind11 --cmakedir) $(DEV_CMAKE_ARGS)
	$(VENV)/bin/cmake --build $(DEV_BUILD_DIR) -j $(JOBS)

clean:
	rm -rf build dist python/batchllm_core/_C*.so
