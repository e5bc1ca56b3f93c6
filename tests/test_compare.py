"""scripts/compare.sh, what `make compare` runs, hands its environment to scripts/compare.py.

The sweep itself (compare.py: one torchrun launch with 2 CPU ranks running both arms over two
seeds, each best.pt evaluated, the paired interval) runs end to end as the science step of the
GPU check's CPU rehearsal (tests/test_gpu_check.py). Here a stand-in interpreter records the
command line compare.sh builds.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _compare_sh(tmp_path: Path, env: dict[str, str], *args: str) -> tuple[list[str], list[str]]:
    """(argv, environment lines) the stand-in python received from compare.sh."""
    record = tmp_path / "argv"
    stub = tmp_path / "python"
    stub.write_text(
        '#!/bin/sh\nprintf "%s\\n" "$@" > "$RECORD"\n'
        'printf "%s\\n" "OMP_NUM_THREADS=$OMP_NUM_THREADS" "WANDB_MODE=$WANDB_MODE" '
        '"PYTHON=$PYTHON" >> "$RECORD"\n'
    )
    stub.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "WANDB_MODE")}
    full = {**base, "PYTHON": str(stub), "RECORD": str(record), **env}
    proc = subprocess.run(
        ["bash", "scripts/compare.sh", *args], cwd=ROOT, env=full, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = record.read_text().splitlines()
    return lines[:-3], lines[-3:]


def test_compare_sh_defaults(tmp_path: Path) -> None:
    argv, env = _compare_sh(tmp_path, {})
    assert argv == [
        "scripts/compare.py", "--data", "demo", "--seeds", "0,1,2", "--models",
        "resnet18,xresnet18", "--out", "outputs/compare", "--",
    ]  # fmt: skip
    assert env == ["OMP_NUM_THREADS=1", "WANDB_MODE=offline", f"PYTHON={tmp_path / 'python'}"]


@pytest.mark.parametrize("fresh", ["1", "0"])
def test_compare_sh_passes_every_setting_and_the_overrides(tmp_path: Path, fresh: str) -> None:
    settings = {
        "DATA": "cifar10",
        "DATA_ROOT": "/data/cifar 10",
        "SEEDS": "0,1",
        "MODELS": "resnet50,xresnet50",
        "COMPARE_EPOCHS": "3",
        "NPROC": "2",
        "OUT": "/runs/out",
        "COMPARE_FRESH": fresh,
        "OMP_NUM_THREADS": "4",
        "WANDB_MODE": "disabled",
    }
    argv, env = _compare_sh(tmp_path, settings, "data.batch_size=8", "optim.lr=0.2 x")
    assert argv == [
        "scripts/compare.py", "--data", "cifar10", "--seeds", "0,1", "--models",
        "resnet50,xresnet50", "--out", "/runs/out", "--root", "/data/cifar 10", "--epochs", "3",
        "--nproc", "2", *(["--fresh"] if fresh == "1" else []), "--", "data.batch_size=8",
        "optim.lr=0.2 x",
    ]  # fmt: skip
    assert env[:2] == ["OMP_NUM_THREADS=4", "WANDB_MODE=disabled"]  # the caller's are kept
