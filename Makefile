PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= wsiats-demo

.PHONY: install install-test test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip

# torch is installed first and pinned to the release the machine ships, so that pip does
# not go looking for a multi-gigabyte CUDA build; override with TORCH_SPEC=torch for a GPU box.
TORCH_SPEC ?= torch==2.13.0

install: $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"

test: install-test
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/wsiats demo --out $(DEMO_OUT)

bench: install-test
	$(BIN)/python benchmarks/bench_read.py
	$(BIN)/python benchmarks/bench_predict.py
	$(BIN)/python benchmarks/bench_learning.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache build *.egg-info
