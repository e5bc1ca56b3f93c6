"""scripts/compare.sh end to end (what `make compare DATA=cifar10` runs), the CPU rehearsal of
the CIFAR-10 comparison: one torchrun launch (2 CPU ranks, gloo) runs the Hydra sweep
experiment=cifar10 model=resnet18,xresnet18 x seed=0,1 for one epoch on a small generated
CIFAR-like folder (the in-memory backend, the CIFAR stem), one process group, run directory and
train.log per job; each best.pt is evaluated into one results directory (records carry the
seed), and compare.json pairs the two arms by seed with the leaderboard's 95% interval. It
checks the pipeline and the statistics, not accuracy.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from xvol.data.fake import write_image_tree
from xvol.engine import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _cifar_like(root: Path) -> Path:
    """10 classes x (8 train, 3 val) 32 px JPEGs in the ImageNet layout."""
    classes = [f"class{c}" for c in range(10)]
    counts = {"train": dict.fromkeys(classes, 8), "val": dict.fromkeys(classes, 3)}
    write_image_tree(root, counts, kind="texture", size=(32, 32))
    return root


def test_compare_sweeps_models_and_seeds(out_dir: Path) -> None:
    data = _cifar_like(out_dir / "cifar")
    env = dict(
        os.environ,
        DATA="cifar10",
        DATA_ROOT=str(data),
        SEEDS="0,1",
        COMPARE_EPOCHS="1",
        OUT=str(out_dir),
        NPROC="2",
        OMP_NUM_THREADS="1",
        WANDB_MODE="offline",
        PYTHONUNBUFFERED="1",
    )
    proc = subprocess.run(
        ["bash", "scripts/compare.sh", "data.batch_size=8", "data.workers=2"],
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
        assert best["config"]["model"]["stem"] == "cifar"
        assert best["config"]["data"]["name"] == "cifar10"
        assert best["best_metric_name"] == "ema_top1" and best["epoch"] == 1
        assert (run_dir / "epoch_0001.pt").is_file()
        log = (run_dir / "train.log").read_text()
        assert log.count("] - run compare in ") == 1 and str(run_dir) in log  # its own job only
    records = [json.loads(p.read_text()) for p in (out_dir / "results").glob("*.json")]
    assert sorted((r["model"], r["seed"]) for r in records) == [
        ("resnet18-cifar", 0),
        ("resnet18-cifar", 1),
        ("xresnet18-cifar", 0),
        ("xresnet18-cifar", 1),
    ]
    assert all(r["weights"] == "ema" and r["num_images"] == 30 for r in records)
    assert (out_dir / "results" / "leaderboard.md").is_file()
    # the pairing and the interval: per-seed differences of the records, their mean and a
    # t-interval with n - 1 = 1 degree of freedom around it
    summary = json.loads((out_dir / "compare.json").read_text())
    top1 = {(r["model"], r["seed"]): r["top1"] for r in records}
    assert [row["seed"] for row in summary["per_seed"]] == [0, 1]
    diffs = []
    for row in summary["per_seed"]:
        expected = top1[("xresnet18-cifar", row["seed"])] - top1[("resnet18-cifar", row["seed"])]
        assert row["diff"] == pytest.approx(expected)
        diffs.append(expected)
    (paired,) = summary["paired"]
    assert paired["n"] == 2 and paired["seeds"] == [0, 1]
    assert paired["mean"] == pytest.approx(sum(diffs) / 2)
    half = 12.706 * abs(diffs[0] - diffs[1]) / 2 ** 0.5 / 2 ** 0.5  # t(0.975, 1) * std / sqrt(n)
    assert paired["lo"] == pytest.approx(paired["mean"] - half, abs=1e-6)
    assert paired["hi"] == pytest.approx(paired["mean"] + half, abs=1e-6)
    assert "paired (torchvision, n=2)" in proc.stdout
