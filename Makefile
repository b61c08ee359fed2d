# Every target works on a fresh machine: `setup` builds .venv itself.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test unit lint bench demo clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch that lies on these machines' disk; a bare `torch` pulls CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/.installed

test: setup
	$(BIN)/python -m pytest

unit: setup
	$(BIN)/python -m pytest -m unit

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check flowpp orchestrator tests bench

bench: setup
	$(BIN)/python bench/train_step.py

demo: setup
	$(BIN)/flowpp smoke --steps 100

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
