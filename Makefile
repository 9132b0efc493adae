# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On this CPU machine pip takes torch 2.13.0's CPU build from local disk; on a GPU box the same
# pin gives the CUDA build. Override with e.g. `make setup TORCH_SPEC='torch==2.11.0'`.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# `make demo BUDGET=long` trades time for stronger numbers; DEMO_ARGS=--fresh starts over;
# `make demo DOMAIN=sql` runs it on toy text-to-SQL, `DOMAIN=code` on toy HumanEval-form code,
# `DOMAIN=chat` on toy multi-turn chat through a ChatML template (math is the default).
BUDGET ?= quick
DOMAIN ?= math
DEMO_ARGS ?=
# -qq: errors only (pip's per-location index warnings would drown the output).
PIP := $(BIN)/python -m pip install -qq --disable-pip-version-check

.PHONY: setup deepspeed-ops lint test test-fast demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "setting up $(VENV): torch, then cllm-ray with its ray, train, report and test extras"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	# torch first, so the project's `torch>=2.4` range is already satisfied.
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -e '.[ray,train,report,test]'
	touch $@

# DeepSpeed JIT-compiles its CPU shared-memory comm op once (about 80 s) into
# ~/.cache/torch_extensions; building it up front keeps that out of the training tests' timeouts.
# The venv's ninja builds it, as on the training workers (pipelines/train.py): another ninja
# version would rebuild it there.
deepspeed-ops: setup
	@PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -c "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()" > /dev/null

lint: setup
	$(BIN)/ruff check .

test: setup deepspeed-ops lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup lint
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup deepspeed-ops
	$(BIN)/python pipelines/demo.py --domain $(DOMAIN) --budget $(BUDGET) $(DEMO_ARGS)

bench: setup
	$(BIN)/python benchmarks/jacobi_vs_ar.py

clean:
	rm -rf $(VENV) runs .pytest_cache
