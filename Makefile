# xvol: two commands on a fresh machine.
#   make demo   set up .venv, install, train -> reparam -> eval -> leaderboard on the bundled demo set
#   make test   set up .venv, install, run the whole test suite (what CI runs)
#   make test-fast / make bench / make lint / make clean
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch/torchvision are named first so pip takes the local CUDA builds (Python 3.11) here.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

.PHONY: help venv test test-fast lint demo bench clean

help:
	@grep -E '^#   ' Makefile | sed 's/^#   //'

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Re-install only when the package metadata changes.
$(VENV)/.installed: $(VENV)/bin/python setup.cfg pyproject.toml
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e ".[dev,dali]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m ruff check xvol scripts tools tests
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check xvol scripts tools tests

demo: venv
	bash scripts/demo.sh

# Benchmarks print a table and write bench_results/*.json; CUDA when present, else the CPU mode.
bench: venv
	$(PY) scripts/bench_op.py
	$(PY) scripts/bench.py --device $$($(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")

clean:
	rm -rf outputs multirun results bench_results .pytest_cache .ruff_cache
