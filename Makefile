# The README's two commands: `make demo` (end-to-end run on a generated dataset) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CONSTRAINTS ?= constraints.txt
PIP_INDEX_ARGS ?=

.PHONY: venv install demo lint test test-fast test-cuda benchmark clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch and torchvision pinned as a pair (constraints.txt says why)
$(VENV)/.installed: setup.py $(TORCH_CONSTRAINTS) $(BIN)/python
	$(BIN)/pip install -q $(PIP_INDEX_ARGS) -c $(TORCH_CONSTRAINTS) -e ".[test]"
	touch $@

venv: $(BIN)/python
install: $(VENV)/.installed

demo: install
	$(BIN)/saumamba_demo

lint: install
	$(BIN)/ruff check .

# all tests: what CI runs
test: install
	$(BIN)/python -m pytest -q tests

# the inner loop: all but the end-to-end runs through nnU-Net's command-line tools (marked `slow`)
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

test-cuda: install
	$(BIN)/python -m pytest -q -m cuda tests

benchmark: install
	$(BIN)/python benchmarks/benchmark_network.py

clean:
	rm -rf $(VENV) demo_output benchmark_results
