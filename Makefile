# `make demo` and `make test` do all set-up on a fresh machine: a virtual environment,
# torch (the CPU wheel where no NVIDIA GPU is present, a CUDA build where one is), then
# fastface itself, built without build isolation (which would pull a second torch).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
HAVE_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
# The CPU wheel comes from PyTorch's CPU index where no local wheel is configured; set
# TORCH_INDEX to pick another (e.g. https://download.pytorch.org/whl/cu130).
TORCH_INDEX ?=
comma := ,
# DALI ships manylinux wheels for x86_64 and aarch64 only; elsewhere the torch loader is used.
EXTRAS ?= $(if $(filter x86_64 aarch64,$(shell uname -m)),test$(comma)dali,test)
CSRC   := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/build/inductor-cache
PYTEST_ARGS ?=

.PHONY: setup demo test bench cuda-check info clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	@if [ -n "$(TORCH_INDEX)" ]; then \
	  $(PIP) install -q torch==$(TORCH_VERSION) --index-url $(TORCH_INDEX); \
	elif [ "$(HAVE_GPU)" = "1" ]; then \
	  echo "NVIDIA GPU found: installing the CUDA build of torch"; \
	  $(PIP) install -q torch==$(TORCH_VERSION); \
	else \
	  echo "no NVIDIA GPU: installing the CPU build of torch"; \
	  $(PIP) install -q torch==$(TORCH_VERSION) || \
	  $(PIP) install -q torch==$(TORCH_VERSION) --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PIP) install -q ninja setuptools wheel
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml setup.py $(CSRC)
	$(PIP) install -q --no-build-isolation -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

info: setup
	$(PY) -m fastface.info

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(PY) -m fastface demo

bench: setup
	$(PY) -m pytest bench -q --benchmark-only --benchmark-json=bench/results/latest.json $(PYTEST_ARGS)

# Compiles every CUDA source with the machine's nvcc: CUDA code that does not compile never lands.
NVCC ?= nvcc
CUDA_ARCH ?= sm_90
cuda-check:
	@mkdir -p build/cuda-check
	@set -e; for f in csrc/cuda/*.cu; do \
	  echo "nvcc -arch=$(CUDA_ARCH) $$f"; \
	  $(NVCC) -arch=$(CUDA_ARCH) -std=c++17 -O3 -Xcompiler -Wall -c $$f -o build/cuda-check/$$(basename $$f .cu).o; \
	done

clean:
	rm -rf build fastface/_C*.so fastface/_build_info.json
