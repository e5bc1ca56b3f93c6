"""scripts/gpu_check.sh, the one-command GPU check, kept from rotting without a GPU.

The slow test runs its CPU rehearsal end to end (the same steps with tiny sizes, no GPU tests):
bench.py, 1-process torchrun trainings of xresnet50 and resnet50 on synthetic data, reparam and
eval of the checkpoint, with wandb / mlxtend / submitit / DALI blocked as on a bare GPU machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_gpu_check_is_valid_bash_and_documents_its_device_invocation() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    header = SCRIPT.read_text().split("set -uo pipefail")[0]
    assert 'run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=420)' in header
    assert "make gpu-wheels" in header
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^gpu-check:", makefile, re.M) and re.search(r"^gpu-wheels:", makefile, re.M)
    assert re.search(r"^\.PHONY:.*\bgpu-check\b.*\bgpu-wheels\b", makefile, re.M)
    assert "/.whl/" in (ROOT / ".gitignore").read_text().splitlines()


def test_gpu_check_rejects_unknown_arguments() -> None:
    proc = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument" in proc.stderr


@pytest.mark.slow
def test_gpu_check_cpu_rehearsal_end_to_end(tmp_path: Path) -> None:
    env = dict(
        os.environ,
        OUT=str(tmp_path / "out"),
        XVOL_GPU_CHECK_WORK=str(tmp_path / "work"),
        XVOL_PYTHON=sys.executable,
    )
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "PASSED" in proc.stdout and "| step" in proc.stdout
    record = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert record["mode"] == "cpu rehearsal" and record["ok"] is True
    steps = {s["name"]: s["status"] for s in record["steps"]}
    assert steps == {
        "gpu_tests": "skipped",
        "bench": "ok",
        "train_xresnet50": "ok",
        "train_resnet50": "ok",
        "reparam": "ok",
        "eval_train": "ok",
        "eval_deploy": "ok",
    }
    cases = record["bench"]["cases"]
    assert cases["train timm resnet50"]["status"] == "ok"
    assert all(c["memory_bytes"] for n, c in cases.items() if n.startswith("train") and
               c["status"] == "ok")  # fmt: skip
    for model in ("xresnet50", "resnet50"):
        epoch = record["train"][model]["epoch"]
        assert epoch["global_step"] == 3 and "val_top1" in epoch
    assert record["reparam"]["verification"]["passed"] is True
    assert record["eval_train"]["deploy"] is False and record["eval_deploy"]["deploy"] is True
    assert record["eval_train"]["num_images"] == record["eval_deploy"]["num_images"] == 40
    assert (tmp_path / "out" / "bench.json").exists()
    assert (tmp_path / "out" / "gpu_check.log").exists()
