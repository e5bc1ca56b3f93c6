#!/usr/bin/env bash
# A paired multi-seed comparison (scripts/compare.py: train both arms over seeds with one
# recipe, evaluate each best.pt, aggregate with a 95% interval paired by seed). What
# `make compare` runs; the settings come from the environment:
#   DATA (demo | cifar10; default demo), DATA_ROOT (default the config's, $XVOL_DATA/<DATA>),
#   SEEDS (0,1,2), MODELS (resnet18,xresnet18), COMPARE_EPOCHS (default: the experiment's),
#   NPROC (2 on CPU, else the GPU count up to 2), OUT (outputs/compare), COMPARE_FRESH=1 (start
#   over), PYTHON (default .venv/bin/python, else python3); arguments are Hydra overrides for
#   every job.
#   make compare                                  # the demo set
#   make compare DATA=cifar10 DATA_ROOT=~/data/cifar10 SEEDS=0,1,2,3
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
export PYTHON=$PY
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per rank: 2 ranks on 2 cores
export WANDB_MODE=${WANDB_MODE:-offline}
args=(--data "${DATA:-demo}" --seeds "${SEEDS:-0,1,2}" --models "${MODELS:-resnet18,xresnet18}"
      --out "${OUT:-outputs/compare}")
[[ -n "${DATA_ROOT:-}" ]] && args+=(--root "$DATA_ROOT")
[[ -n "${COMPARE_EPOCHS:-}" ]] && args+=(--epochs "$COMPARE_EPOCHS")
[[ -n "${NPROC:-}" ]] && args+=(--nproc "$NPROC")
[[ "${COMPARE_FRESH:-0}" == 1 ]] && args+=(--fresh)
exec "$PY" scripts/compare.py "${args[@]}" -- "$@"
