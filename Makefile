# Two commands a new user needs: `make demo` and `make test`.
# Each creates .venv, installs the CPU torch wheel first (torch==2.13.0), then the project.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

venv: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_SPEC)

demo: venv
	$(BIN)/pip install --quiet -e ".[demo]"
	$(BIN)/lyco demo

test: venv
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 -q

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) lyco_demo_out .pytest_cache .ruff_cache
