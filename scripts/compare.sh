#!/usr/bin/env bash
# A paired multi-seed comparison on the bundled demo set: resnet18 and xresnet18 (X-volution in
# stage 3) trained alike (configs/experiment/demo.yaml) for each seed, each best.pt evaluated by
# tools/eval.py into one results directory, and tools/leaderboard.py over it (per model: mean,
# std and n over seeds; the X-volution minus baseline difference with a 95% interval, paired by
# seed).
#   make compare                          (sets up .venv first; SEEDS=0,1,2)
#   SEEDS=0,1,2,3,4 bash scripts/compare.sh
# One torchrun launch (NPROC ranks: CPU and gloo, or one process per GPU) runs the Hydra sweep
#   scripts/train.py --multirun experiment=demo model=resnet18,xresnet18 seed=0,1,2
# one job after another, each in its own run directory $OUT/runs/<model>_seed<seed>. A job whose
# run directory already holds checkpoints continues them (resume=auto; a finished one is
# skipped), so an interrupted comparison picks up where it stopped; COMPARE_FRESH=1 starts over.
# Environment: PYTHON (default .venv/bin/python, else python3), NPROC (2), SEEDS (0,1,2),
# MODELS (resnet18,xresnet18), COMPARE_EPOCHS (default: the experiment's), OUT
# (outputs/compare), XVOL_DATA (data cache, default ~/.cache/xvol). Records and the
# leaderboard: $OUT/results (rebuilt on every call).
# On ImageNet the same sweep is one line per cluster job (see README, "Paired comparison"):
#   torchrun --nproc_per_node=8 scripts/train.py --multirun experiment=resnet50_imagenet \
#       model=resnet50,xresnet50 seed=0,1,2 data.root=/imagenet run_name=cmp
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
NPROC=${NPROC:-2}
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if ((GPUS > 0 && GPUS < NPROC)); then
    NPROC=$GPUS
fi
SEEDS=${SEEDS:-0,1,2}
MODELS=${MODELS:-resnet18,xresnet18}
OUT=${OUT:-outputs/compare}
RESULTS="$OUT/results"
DATA="${XVOL_DATA:-$HOME/.cache/xvol}/demo"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per rank: 2 ranks on 2 cores
export WANDB_MODE=${WANDB_MODE:-offline}

if [[ "${COMPARE_FRESH:-0}" == 1 ]]; then
    rm -rf "${OUT:?}/runs"
fi
start=$(date +%s)
echo "== 1/3 train models {$MODELS} x seeds {$SEEDS} ($NPROC rank(s)) into $OUT/runs"
# shellcheck disable=SC2016  # ${...} below are Hydra interpolations, not shell variables
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" scripts/train.py \
    --multirun experiment=demo "model=$MODELS" "seed=$SEEDS" \
    trainer.deterministic=true trainer.progress_bar=false trainer.log_interval=10 \
    run_name=compare paths.output_dir="$OUT" hydra.sweep.dir="$OUT/runs" \
    'hydra.sweep.subdir=${hydra.runtime.choices.model}_seed${seed}' \
    ${COMPARE_EPOCHS:+trainer.epochs="$COMPARE_EPOCHS"}
echo "   trained in $(($(date +%s) - start)) s"

echo "== 2/3 evaluate each best.pt (EMA weights, as picked) into $RESULTS"
rm -rf "${RESULTS:?}"
mkdir -p "$RESULTS"
IFS=, read -r -a models <<<"$MODELS"
IFS=, read -r -a seeds <<<"$SEEDS"
EVAL_ARGS=()
[[ -t 2 ]] || EVAL_ARGS=(--no-progress)  # a progress bar only on a terminal, not in a log
for model in "${models[@]}"; do
    for seed in "${seeds[@]}"; do
        echo "-- $model, seed $seed"
        "$PY" tools/eval.py "$OUT/runs/${model}_seed${seed}/best.pt" --data "$DATA" \
            --results-dir "$RESULTS" "${EVAL_ARGS[@]}" | tail -n 1  # the summary line
    done
done

echo "== 3/3 leaderboard ($RESULTS/leaderboard.*)"
"$PY" tools/leaderboard.py --results-dir "$RESULTS"
echo "   done in $(($(date +%s) - start)) s"
