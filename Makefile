PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= wsiats-demo

.PHONY: install install-test test typecheck demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip

# torch and torchvision are installed first, as a matched pair (a torchvision built for another
# torch fails on import, and timm imports it): the releases the development machines ship on local
# disk. On a GPU machine pick the pair for its CUDA, e.g.
#   make test TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

install: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[test]"

test: install-test
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q

typecheck: install-test
	$(BIN)/python -m mypy

demo: install
	$(BIN)/wsiats demo --out $(DEMO_OUT)

bench: install-test
	$(BIN)/python benchmarks/bench_read.py
	$(BIN)/python benchmarks/bench_predict.py
	$(BIN)/python benchmarks/bench_learning.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache build *.egg-info
