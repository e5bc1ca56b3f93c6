"""scripts/compare.sh end to end (what `make compare` runs): one torchrun launch (2 CPU ranks,
gloo) runs the Hydra sweep model=resnet18,xresnet18 x seed=0,1 on the demo set for one epoch,
one process group per job, one run directory and train.log per job; each best.pt is evaluated
into one results directory (records carry the seed) and the leaderboard aggregates them.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from xvol.engine import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_compare_sweeps_models_and_seeds(out_dir: Path) -> None:
    env = dict(
        os.environ,
        SEEDS="0,1",
        COMPARE_EPOCHS="1",
        OUT=str(out_dir),
        NPROC="2",
        OMP_NUM_THREADS="1",
        WANDB_MODE="offline",
        PYTHONUNBUFFERED="1",
    )
    proc = subprocess.run(
        ["bash", "scripts/compare.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    runs = sorted(p.name for p in (out_dir / "runs").iterdir() if p.is_dir())
    assert runs == ["resnet18_seed0", "resnet18_seed1", "xresnet18_seed0", "xresnet18_seed1"]
    for name in runs:
        run_dir = out_dir / "runs" / name
        best = load_checkpoint(run_dir / "best.pt")
        model, seed = name.split("_seed")
        assert best["config"]["seed"] == int(seed)
        assert best["config"]["model"]["stages"] == ([3] if model == "xresnet18" else [])
        assert best["best_metric_name"] == "ema_top1" and best["epoch"] == 1
        assert (run_dir / "epoch_0001.pt").is_file()
        log = (run_dir / "train.log").read_text()
        assert log.count("] - run compare in ") == 1 and str(run_dir) in log  # its own job only
    records = [json.loads(p.read_text()) for p in (out_dir / "results").glob("*.json")]
    assert sorted((r["model"], r["seed"]) for r in records) == [
        ("resnet18", 0),
        ("resnet18", 1),
        ("xresnet18", 0),
        ("xresnet18", 1),
    ]
    assert all(r["weights"] == "ema" for r in records)
    assert (out_dir / "results" / "leaderboard.md").is_file()
