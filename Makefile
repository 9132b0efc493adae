# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On this CPU machine pip takes torch 2.13.0's CPU build from local disk; on a GPU box the same
# pin gives the CUDA build. Override with e.g. `make setup TORCH_SPEC='torch==2.11.0'`.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# `make demo BUDGET=long` trades time for stronger numbers; DEMO_ARGS=--fresh starts over.
BUDGET ?= quick
DEMO_ARGS ?=

.PHONY: setup deepspeed-ops test test-fast demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, so the project's `torch>=2.4` range is already satisfied.
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# DeepSpeed JIT-compiles its CPU shared-memory comm op once (about 80 s) into
# ~/.cache/torch_extensions; building it up front keeps that out of the training tests' timeouts.
deepspeed-ops: setup
	$(BIN)/python -c "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()"

test: setup deepspeed-ops
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup deepspeed-ops
	$(BIN)/python pipelines/demo.py --budget $(BUDGET) $(DEMO_ARGS)

bench: setup
	$(BIN)/python benchmarks/jacobi_vs_ar.py

clean:
	rm -rf $(VENV) runs .pytest_cache
