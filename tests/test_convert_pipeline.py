"""A converted model through the whole pipeline: xregnety_008 (timm's regnety_008 with
xvol.convert in stage 3) trained by scripts/train.py, then xvol-reparam, xvol-eval of both
checkpoints, xvol-export (ONNX, with its parity check) and xvol-leaderboard, each through its
command's ``main(argv)`` (training as a subprocess: Hydra owns that process). Nothing in the
tools knows about conversion: the validated model spec in the checkpoint carries it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import TRAIN, run_command
from tools_helpers import make_val_folder

from xvol.cli import eval as eval_tool
from xvol.cli import export as export_tool
from xvol.cli import leaderboard as leaderboard_tool
from xvol.cli import reparam as reparam_tool
from xvol.formats.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # a training subprocess and five tool runs

TOOLS = {"reparam": reparam_tool, "eval": eval_tool, "export": export_tool}


def _main(tool: Any, args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert tool.main(args) == 0
    return capsys.readouterr().out


def _tool(name: str, *args: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    return json.loads(_main(TOOLS[name], list(args), capsys))


def test_xregnety_008_trains_reparameterizes_evaluates_and_ranks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proc = run_command([
        sys.executable, TRAIN, "model=xregnety_008", "data=synthetic", "data.num_classes=3",
        "data.img_size=32", "data.batch_size=4", "data.length=2", "data.val_length=1",
        "trainer.epochs=1", "trainer.progress_bar=false", "sched.warmup_epochs=0",
        "run_name=xreg", f"paths.output_dir={tmp_path / 'out'}",
    ])  # fmt: skip
    assert proc.returncode == 0, proc.output[-3000:]
    ckpt = tmp_path / "out" / "xreg" / "best.pt"
    stored = load_checkpoint(ckpt)["config"]["model"]
    assert stored["arch"] == "regnety_008" and stored["convert"]["require_bn"] is True

    data = make_val_folder(tmp_path / "data", num_classes=3, per_class=4)
    deploy = tmp_path / "deploy"
    record = _tool("reparam", str(ckpt), "--out", str(deploy), "--data", str(data), capsys=capsys)
    assert record["verification"]["passed"]
    results = tmp_path / "results"
    common = ["--data", str(data), "--results-dir", str(results), "--workers", "0"]
    common += ["--device", "cpu", "--json", "--allow-class-mismatch"]  # synthetic: no names
    train = _tool("eval", str(ckpt), *common, capsys=capsys)
    deployed = _tool("eval", str(deploy), *common, capsys=capsys)
    assert train["num_images"] == deployed["num_images"] == 12
    assert train["predictions_sha256"] == deployed["predictions_sha256"]
    assert train["model"] == "xregnety_008" == deployed["model"]
    onnx = _tool("export", str(deploy), "--out", str(tmp_path / "xreg.onnx"), capsys=capsys)
    assert onnx["parity"]["max_abs_diff"] <= 1e-4

    board = _main(leaderboard_tool, ["--results-dir", str(results)], capsys)
    rows = [line for line in board.splitlines() if line.startswith("| ") and ".json" in line]
    assert len(rows) == 2 and all("xregnety_008" in r for r in rows)
    # the deploy-vs-training table (markdown escapes the underscore)
    pair = [line for line in board.splitlines() if line.startswith("| xregnety\\_008 | ema |")]
    assert len(pair) == 1 and "| yes |" in pair[0], board  # identical predictions
