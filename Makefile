# The README's two commands. Each makes its own virtualenv (.venv) and installs the CPU build of torch first.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup test demo compile-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/pip install -q -r requirements-cpu.txt -e ".[test,demo]"

test: setup
	$(BIN)/python -m pytest -n 2 -q

demo: setup
	$(BIN)/fastmtt demo --quick --out demo_out

compile-check: setup
	$(BIN)/fastmtt compile-check
