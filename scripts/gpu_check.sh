#!/usr/bin/env bash
# One-command GPU check: the GPU tests, a short bench.py (img/s, ratios, peak memory per model),
# a 1-GPU torchrun training of xresnet50 and of resnet50 on synthetic data (60 steps + evaluation),
# then tools/reparam.py (verification on the GPU, fp32 without TF32) and tools/eval.py of the
# xresnet50 checkpoint on the GPU. Prints one table, writes one JSON record.
#
# Usage:
#   bash scripts/gpu_check.sh             # one H100/H200: about 4-6 minutes (steps share a 330 s budget)
#   make gpu-check                        # the same
#   bash scripts/gpu_check.sh --dry-run   # CPU rehearsal (= XVOL_GPU_CHECK_CPU=1): the same steps with
#                                         # tiny sizes, no GPU tests; tests/test_gpu_check.py runs it
#
# On the device tool's machine (bare CUDA Python 3.12 with torch, timm, triton; no hydra-core,
# omegaconf, wandb or DALI):
#   1. here, once:   make gpu-wheels      # .whl/: hydra-core, omegaconf, antlr4-python3-runtime
#   2. device tool:  run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=420)
# .whl/*.whl, when present, are installed with pip --no-index --no-deps --target /tmp/site and put
# on PYTHONPATH with the repo root (the package is used from the source tree, not installed). wandb
# stays off (logger.wandb.enabled=false, WANDB_MODE=disabled); DALI is not used.
#
# Output: $OUT/gpu_check.json when OUT is set (the device tool brings $OUT back), else
# bench_results/gpu_check.json; bench.json and gpu_check.log (every step's output) beside it.
# Exit status 0 when every step passed, 1 otherwise.
# Environment: XVOL_PYTHON (default python3), XVOL_GPU_CHECK_BUDGET_S (seconds for all steps),
# XVOL_GPU_CHECK_WORK (scratch folder; default a new temporary one), XVOL_SITE (wheel target).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CPU=${XVOL_GPU_CHECK_CPU:-0}
for arg in "$@"; do
    case $arg in
        --dry-run | --cpu) CPU=1 ;;
        -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (--dry-run, --help)" >&2; exit 2 ;;
    esac
done
[[ $CPU == 0 || $CPU == 1 ]] || { echo "XVOL_GPU_CHECK_CPU must be 0 or 1" >&2; exit 2; }

PY=${XVOL_PYTHON:-python3}
WORK=${XVOL_GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/xvol_gpu_check.XXXXXX")}
RESULTS=${OUT:-$ROOT/bench_results}
mkdir -p "$WORK/logs" "$RESULTS"
STEPS=$WORK/steps.tsv
: >"$STEPS"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 XVOL_DATA=$WORK/data

# Wheels for a bare machine (make gpu-wheels); a rehearsal installs them into its own folder.
if [[ $CPU == 1 ]]; then SITE=${XVOL_SITE:-$WORK/site}; else SITE=${XVOL_SITE:-/tmp/site}; fi
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl || { echo "gpu_check.sh: installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ $CPU == 1 ]]; then
    # The rehearsal proves the path needs none of what a bare machine lacks besides the wheels.
    mkdir -p "$WORK/block"
    cat >"$WORK/block/sitecustomize.py" <<'EOF'
import sys
BLOCKED = ("wandb", "mlxtend", "submitit", "nvidia.dali")
class _Block:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} is blocked: a bare GPU machine does not have it")
sys.meta_path.insert(0, _Block())
EOF
    export PYTHONPATH=$WORK/block:$PYTHONPATH
fi

if [[ $CPU == 1 ]]; then
    DEVICE=cpu BUDGET=${XVOL_GPU_CHECK_BUDGET_S:-900}
    BENCH_ARGS=(--device cpu --batch 2 --img-size 32 --iters 1 --warmup 0 --rounds 1 --num-classes 10)
    TRAIN_ARGS=(trainer.device=cpu data.img_size=32 data.batch_size=2 data.length=3 data.val_length=1
        optim.lr=0.001)
    EVAL_ARGS=(--device cpu --precision fp32 --batch-size 8 --workers 0 --bench-iters 1 --bench-warmup 0)
    VAL_SIZE=32
else
    DEVICE=cuda BUDGET=${XVOL_GPU_CHECK_BUDGET_S:-330}
    BENCH_ARGS=(--device cuda --iters 5 --warmup 2 --rounds 2)
    TRAIN_ARGS=(trainer.device=cuda data.img_size=224 data.batch_size=128 data.length=60 data.val_length=4
        optim.lr=0.02)
    EVAL_ARGS=(--device cuda --precision bf16 --channels-last --batch-size 64 --workers 2
        --bench-batch-size 256 --bench-iters 10 --bench-warmup 3)
    VAL_SIZE=160
fi

# step NAME CAP_SECONDS CMD...: run CMD (stdout NAME.out, stderr NAME.err) within min(CAP, what is
# left of BUDGET); one line per step in steps.tsv: name, exit status (124: timed out), seconds.
step() {
    local name=$1 cap=$2 left t start rc
    shift 2
    left=$((BUDGET - SECONDS))
    t=$((cap < left ? cap : left))
    if ((t < 5)); then
        printf '%s\tskipped\t0\n' "$name" >>"$STEPS"
        echo "== $name: skipped (budget of ${BUDGET}s spent)"
        return
    fi
    echo "== $name (limit ${t}s): $*"
    start=$SECONDS
    timeout --kill-after=10 "$t" "$@" >"$WORK/logs/$name.out" 2>"$WORK/logs/$name.err"
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$STEPS"
    echo "   exit $rc after $((SECONDS - start))s"
}

train() {  # train MODEL: 1-GPU torchrun of scripts/train.py on synthetic data, 10 classes
    step "train_$1" "$2" "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
        scripts/train.py "model=$1" data=synthetic data.num_classes=10 "${TRAIN_ARGS[@]}" \
        trainer.epochs=1 trainer.ema=null trainer.progress_bar=false trainer.log_interval=20 \
        trainer.checkpoint.keep_top_k=1 sched.warmup_epochs=0 resume=null \
        logger.wandb.enabled=false "run_name=gpu_check_$1" "paths.output_dir=$WORK/runs"
}

if [[ $CPU == 1 ]]; then
    printf 'gpu_tests\tskipped\t0\n' >>"$STEPS"
    echo "== gpu_tests: skipped (CPU rehearsal)"
else
    step gpu_tests 150 "$PY" -m pytest -m gpu tests/test_kernels.py -q -p no:cacheprovider
fi
step bench 150 "$PY" scripts/bench.py "${BENCH_ARGS[@]}" --skip-ops --out "$RESULTS/bench.json"
train xresnet50 100
train resnet50 70

# A val folder in the ImageNet layout whose class folders are the synthetic data's class names.
"$PY" - "$WORK/val" "$VAL_SIZE" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root, size = Path(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
for c in range(10):
    (root / str(c)).mkdir(parents=True, exist_ok=True)
    for i in range(4):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / str(c) / f"img_{i}.JPEG", quality=90)
EOF

CKPT=$WORK/runs/gpu_check_xresnet50/last.pt
step reparam 60 "$PY" tools/reparam.py "$CKPT" --out "$WORK/deploy" --data "$WORK/val" \
    --verify-images 16 --device "$DEVICE"
step eval_train 45 "$PY" tools/eval.py "$CKPT" --json --no-progress --data "$WORK/val" \
    "${EVAL_ARGS[@]}" --results-dir "$WORK/results"
step eval_deploy 45 "$PY" tools/eval.py "$WORK/deploy" --json --no-progress --data "$WORK/val" \
    "${EVAL_ARGS[@]}" --results-dir "$WORK/results"

# One log with every step's output, beside the record.
for f in "$WORK"/logs/*.out; do
    name=$(basename "$f" .out)
    printf '\n===== %s: stdout =====\n' "$name"
    cat "$f"
    printf '\n===== %s: stderr =====\n' "$name"
    cat "$WORK/logs/$name.err"
done >"$RESULTS/gpu_check.log"

"$PY" - "$WORK" "$RESULTS" "$DEVICE" "$CPU" "$BUDGET" <<'EOF'
"""Summarize the steps: one table on stdout, one JSON record (gpu_check.json)."""
import json
import os
import platform
import sys
from pathlib import Path

work, results, device, cpu, budget = sys.argv[1:6]
work, results = Path(work), Path(results)


def read_json_stdout(path):
    """The JSON record a tool printed (the first '{' line to the end), or None."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start = text.find("\n{") + 1 if not text.startswith("{") else 0
    try:
        return json.JSONDecoder().raw_decode(text[start:])[0] if "{" in text else None
    except ValueError:
        return None


def tail(name, n=15):
    lines = []
    for ext in ("out", "err"):
        p = work / "logs" / f"{name}.{ext}"
        if p.exists():
            lines += p.read_text(errors="replace").splitlines()
    return lines[-n:]


def mib(v):
    return "n/a" if v is None else f"{v / 2**20:,.0f} MiB"


steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    if rc == "skipped":
        status = "skipped"
    elif rc == "0":
        status = "ok"
    elif rc in ("124", "137"):
        status = "timed out"
    elif name == "gpu_tests" and rc == "5":
        status = "no tests collected"
    else:
        status = f"failed (exit {rc})"
    steps.append({"name": name, "exit": rc, "status": status, "seconds": int(seconds)})
by_name = {s["name"]: s for s in steps}
rows = []
record = {"tool": "gpu_check", "version": 1, "mode": "cpu rehearsal" if cpu == "1" else "gpu",
          "budget_s": int(budget), "steps": steps}


def add(name, result):
    s = by_name.get(name, {"status": "not run", "seconds": 0})
    rows.append([name, s["status"], str(s["seconds"]), result])
    if s["status"] not in ("ok", "skipped"):
        s["log_tail"] = tail(name)


gpu = by_name.get("gpu_tests", {})
summary = [ln for ln in tail("gpu_tests", 3) if " passed" in ln or " failed" in ln or "error" in ln]
add("gpu_tests", summary[-1].strip("= ") if summary else "")

bench_path = results / "bench.json"
bench = json.loads(bench_path.read_text()) if by_name["bench"]["status"] == "ok" else None
if bench:
    env = bench["environment"]
    record["device"] = env.get("gpu") or platform.processor() or "cpu"
    record["bench"] = {k: bench[k] for k in ("settings", "ratios", "verdicts", "flags",
                                             "memory_meaning", "ratio_info")}
    record["bench"]["cases"] = {
        n: {k: c[k] for k in ("status", "img_per_s", "memory_bytes")}
        for n, c in bench["cases"].items()
    }
    v = bench["verdicts"]
    train_best = v.get("xresnet50 train (best) / resnet50 train", {})
    best_case = (bench["ratio_info"].get("best_xresnet50_train_case") or "-").removeprefix(
        "train xresnet50 ")
    fmt = lambda r: "-" if r.get("value") is None else f"{r['value']:.3f} ({r['verdict']})"
    add("bench", f"train xresnet50 (best: {best_case}) / resnet50 {fmt(train_best)}; "
        f"deploy / resnet50 infer {fmt(v.get('deploy infer / resnet50 infer', {}))}; "
        f"{len(bench['flags'])} flag(s)")
    for name, c in bench["cases"].items():
        if c["kind"] == "train" or name.startswith("infer"):
            speed = f"{c['img_per_s']:,.0f} img/s" if c["img_per_s"] else c["status"]
            rows.append([f"  {name}", "", "", f"{speed}, memory {mib(c['memory_bytes'])}"])
    for name, r in v.items():
        rows.append([f"  {name}", "", "", fmt(r)])
else:
    record["device"] = None
    add("bench", "")

record["train"] = {}
for model in ("xresnet50", "resnet50"):
    metrics = work / "runs" / f"gpu_check_{model}" / "metrics.jsonl"
    epochs, trains = [], []
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            r = json.loads(line)
            (epochs if r.get("kind") == "epoch" else trains).append(r)
    ep = epochs[-1] if epochs else {}
    record["train"][model] = {"steps": trains[-1]["global_step"] if trains else None,
                              "epoch": ep}
    result = (f"{ep.get('global_step')} steps, {ep.get('img_s', 0):,.0f} img/s, val top-1 "
              f"{ep.get('val_top1')}, eval {ep.get('eval_time', 0):.1f}s") if ep else ""
    add(f"train_{model}", result)

rep = read_json_stdout(work / "logs" / "reparam.out")
record["reparam"] = rep
ver = (rep or {}).get("verification", {})
add("reparam", f"max |logit diff| {ver.get('max_abs_diff')}" if rep else "")
for name in ("eval_train", "eval_deploy"):
    ev = read_json_stdout(work / "logs" / f"{name}.out")
    record[name] = ev
    if ev:
        thr = (ev.get("throughput") or {}).get("img_s")
        dev = (ev.get("eval") or {}).get("device", "")
        add(name, f"top-1 {ev.get('top1')}, {thr and f'{thr:,.0f} img/s'} on {dev}")
    else:
        add(name, "")

record["ok"] = all(s["status"] in ("ok", "skipped") for s in steps) and (
    cpu == "1" or by_name.get("gpu_tests", {}).get("status") == "ok")
widths = [max(len(r[i]) for r in rows + [["step", "status", "s", "result"]]) for i in range(4)]
head = ["step", "status", "s", "result"]
line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
print(f"\n# gpu_check ({record['mode']}) on {record['device']}: "
      f"{'PASSED' if record['ok'] else 'FAILED'}")
print(line(head))
print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
for r in rows:
    print(line(r))
out = results / "gpu_check.json"
tmp = out.with_name(out.name + ".tmp")
tmp.write_text(json.dumps(record, indent=2, default=str))
os.replace(tmp, out)
print(f"wrote {out}")
sys.exit(0 if record["ok"] else 1)
EOF
