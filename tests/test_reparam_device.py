"""xvol-reparam --device: the verification runs where asked, and a device that is not there is
one line (the GPU check verifies on the GPU; tests/test_kernels.py has the CUDA runs)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import run_python
from tools_helpers import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _reparam(ckpt: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_python([str(ROOT / "tools" / "reparam.py"), str(ckpt), "--out", str(out), *extra])


@pytest.mark.slow
def test_reparam_verifies_on_the_requested_device(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    proc = _reparam(ckpt, tmp_path / "deploy", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout)
    assert record["verification"]["device"] == "cpu" and record["verification"]["passed"]
    if not torch.cuda.is_available():
        proc = _reparam(ckpt, tmp_path / "gpu", "--device", "cuda")
        assert proc.returncode == 1 and proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert lines[-1] == (
            "xvol-reparam: error: --device cuda: CUDA is not available on this machine"
        )
        assert "Traceback" not in proc.stderr and not (tmp_path / "gpu").exists()
    bad = _reparam(ckpt, tmp_path / "bad", "--device", "tpu9")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == (
        "xvol-reparam: error: --device: expected cpu, cuda or cuda:N, got 'tpu9'"
    )
    assert not (tmp_path / "bad").exists()
