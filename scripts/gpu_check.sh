#!/usr/bin/env bash
# One-command GPU check: installs the wheels a bare CUDA machine lacks, then runs
# scripts/gpu_check.py (every step in its own process: GPU kernel tests, xresnet50 and resnet50
# training, reparam + eval on the device, bench, then the bounded CIFAR-10 comparison; see its
# --help). Prints one table, writes gpu_check.json after every step.
#
# Usage:
#   bash scripts/gpu_check.sh                     # one H100/H200: 9 minutes at most (caps 510 s;
#                                                 # the steps before the science run 295 s)
#   make gpu-check                                # the same
#   bash scripts/gpu_check.sh --steps bench       # rerun only the steps that failed
#   bash scripts/gpu_check.sh --dry-run           # CPU rehearsal at tiny sizes (tests/test_gpu_check.py)
#
# On the device tool's machine (bare CUDA Python 3.12 with torch, timm, triton; no hydra-core,
# omegaconf, wandb or DALI):
#   1. here, once:   make gpu-wheels      # .whl/: hydra-core, omegaconf, antlr4-python3-runtime
#   2. device tool:  run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
# .whl/*.whl, when present, are installed with pip --no-index --no-deps --target into a scratch
# folder and put on PYTHONPATH with the repo root (the package is used from the source tree).
# wandb stays off; DALI is not used. The rehearsal blocks wandb, mlxtend, submitit and DALI, as
# a bare machine lacks them.
# Environment: XVOL_PYTHON (default python3), XVOL_SITE (wheel target), and gpu_check.py's own.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${XVOL_PYTHON:-python3}
CPU=0
for arg in "$@"; do
    case $arg in
        --dry-run | --cpu) CPU=1 ;;
        -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exec "$PY" scripts/gpu_check.py --help ;;
    esac
done

SCRATCH=${XVOL_GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/xvol_gpu_check.XXXXXX")}
export XVOL_GPU_CHECK_WORK=$SCRATCH XVOL_PYTHON=$PY
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=${XVOL_SITE:-$SCRATCH/site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl || { echo "gpu_check.sh: installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ $CPU == 1 ]]; then
    mkdir -p "$SCRATCH/block"
    cat >"$SCRATCH/block/sitecustomize.py" <<'PYEOF'
import sys
BLOCKED = ("wandb", "mlxtend", "submitit", "nvidia.dali")
class _Block:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} is blocked: a bare GPU machine does not have it")
sys.meta_path.insert(0, _Block())
PYEOF
    export PYTHONPATH=$SCRATCH/block:$PYTHONPATH
fi
exec "$PY" scripts/gpu_check.py "$@"
