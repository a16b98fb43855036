# The README's two commands: `make demo` (end-to-end run on a generated dataset) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: venv install demo test test-cuda benchmark clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned, so that pip does not pull a multi-GB CUDA build on CPU machines
$(VENV)/.installed: setup.py $(BIN)/python
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[test]"
	touch $@

venv: $(BIN)/python
install: $(VENV)/.installed

demo: install
	$(BIN)/saumamba_demo

test: install
	$(BIN)/python -m pytest -q tests

test-cuda: install
	$(BIN)/python -m pytest -q -m cuda tests

benchmark: install
	$(BIN)/python benchmarks/benchmark_network.py

clean:
	rm -rf $(VENV) demo_output benchmark_results
