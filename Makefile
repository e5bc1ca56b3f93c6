# xvol: two commands on a fresh machine.
#   make demo   set up .venv, install, train -> reparam -> eval -> leaderboard on the bundled demo set
#   make test   set up .venv, install, run the whole test suite (what CI runs)
#   make compare  paired resnet18 vs xresnet18 over seeds (DATA=demo|cifar10, SEEDS=0,1,2; scripts/compare.sh)
#   make test-aot  every Triton kernel config compiled for sm_80 and sm_90 (CI runs it after make test)
#   make test-fast / make bench / make lint / make clean
#   make gpu-check  the one-command GPU check (scripts/gpu_check.sh); make gpu-wheels first on a bare machine
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch/torchvision are named first so pip takes the local CUDA builds (Python 3.11) here.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# pytest-xdist workers: one more than the CI machine's 2 cores, since many tests wait on the
# commands they launch (torchrun rendezvous, polls); whole files per worker (module fixtures
# built once), in the order tests/conftest.py sorts them (longest first; xdist would otherwise
# start the files with the most tests first). JOBS=0 runs serially.
JOBS ?= 3
XDIST := $(if $(filter 0,$(JOBS)),,-n $(JOBS) --dist loadfile --no-loadscope-reorder)
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

.PHONY: help venv test test-fast test-aot lint demo compare bench clean gpu-check gpu-wheels

help:
	@grep -E '^#   ' Makefile | sed 's/^#   //'

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Re-install only when the package metadata changes.
$(VENV)/.installed: $(VENV)/bin/python setup.cfg pyproject.toml
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e ".[dev,all]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m ruff check xvol scripts tools tests
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

# The whole autotune grid ahead of time (the suite compiles the configs impl="auto" launches):
# 60 compiles, 4-5 minutes on 2 cores with an empty Triton cache; exit 1 on any problem.
test-aot: venv
	$(PY) scripts/triton_smem.py --workers 2

lint: venv
	$(PY) -m ruff check xvol scripts tools tests

demo: venv
	bash scripts/demo.sh

# Paired multi-seed comparison (scripts/compare.sh): make compare DATA=cifar10 DATA_ROOT=DIR SEEDS=0,1,2
DATA ?= demo
compare: venv
	DATA=$(DATA) bash scripts/compare.sh

# Benchmarks print a table and write bench_results/*.json; CUDA when present, else the CPU mode.
bench: venv
	$(PY) scripts/bench_op.py
	$(PY) scripts/bench.py --device $$($(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")

# One-command GPU check (scripts/gpu_check.sh; see its header for the device tool invocation).
# Uses the venv's Python when there is one, else python3 (a bare CUDA machine with .whl/ wheels).
gpu-check:
	XVOL_PYTHON=$$( [ -x $(PY) ] && echo $(PY) || echo python3 ) bash scripts/gpu_check.sh

# Wheels a bare CUDA machine (Python 3.12, torch + timm + triton) lacks for gpu-check, into .whl/
# (git-ignored), at the versions installed here; timm too, so the check runs the timm tested here
# rather than the machine's own. antlr4-python3-runtime 4.9.3, omegaconf's pin, is published only
# as an sdist: its pure-Python wheel is built here.
GPU_WHEELS_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64,--platform $(p))
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_WHEELS_PLATFORMS) -d .whl \
		$$($(PY) -c "from importlib.metadata import version as v; print(*(f'{n}=={v(n)}' for n in ('hydra-core', 'omegaconf', 'timm')))")
	$(PIP) wheel -q --no-deps -w .whl antlr4-python3-runtime==$$($(PY) -c "from importlib.metadata import version; print(version('antlr4-python3-runtime'))")
	@ls .whl

clean:
	rm -rf outputs multirun results bench_results .pytest_cache .ruff_cache
