"""trainer.init_from through scripts/train.py: fine-tuning from a training checkpoint's weights.

Weights only (the new run starts at epoch 1 with its own optimizer), through the safe loader;
strict except the classifier head, which is re-initialized when the class count differs; another
architecture is refused in one line; a run that already has checkpoints resumes them instead.
Each case is a subprocess on tiny synthetic data (3 updates of 4 images at 16 px).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TRAIN, one_error_line, run_command

from xvol.engine import load_checkpoint

TINY = [
    "model=resnet18",
    "data=synthetic",
    "data.img_size=16",
    "data.batch_size=4",
    "data.length=3",
    "data.val_length=1",
    "trainer.epochs=1",
    "trainer.progress_bar=false",
    "sched.warmup_epochs=0",
]
# a learning rate so small that the trained weights stay the initial ones (to 1e-6)
FROZEN = ["optim.lr=1e-12"]
PROBE = "layer1.0.conv1.weight"  # a body weight the tests mark in the source checkpoint

pytestmark = pytest.mark.slow  # subprocesses of 10 s and more (about 3 minutes in all)


def _run(out_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return run_command([sys.executable, TRAIN, *TINY, f"paths.output_dir={out_dir}", *args])


def _error_line(proc: subprocess.CompletedProcess) -> str:
    return one_error_line(proc, last=False)


@pytest.fixture(scope="module")
def source(out_dir: Path) -> Path:
    """A 2-class run with EMA, its best.pt marked: PROBE is 0.25 in the model weights and 0.5
    in the EMA weights, and the stored config names a hostile _target_ (never instantiated)."""
    proc = _run(out_dir, "run_name=src", "data.num_classes=2")
    assert proc.returncode == 0, proc.output[-3000:]
    state = load_checkpoint(out_dir / "src" / "best.pt")
    state["model"][PROBE].fill_(0.25)
    state["ema"][PROBE].fill_(0.5)
    state["config"]["model"]["_target_"] = "os.system"
    path = out_dir / "source.pt"
    torch.save(state, path)
    return path


def _probe(run_dir: Path) -> torch.Tensor:
    return load_checkpoint(run_dir / "last.pt")["model"][PROBE]


def test_init_from_other_class_count_reinitializes_the_head(source: Path, out_dir: Path) -> None:
    proc = _run(
        out_dir, "run_name=ft3", "data.num_classes=3", f"trainer.init_from={source}", *FROZEN
    )
    assert proc.returncode == 0, proc.output[-3000:]
    lines = [line for line in proc.output.splitlines() if "initialized from" in line]
    assert len(lines) == 1, proc.output[-3000:]
    assert lines[0].endswith(
        f"initialized from {source}: model weights; classifier head (fc.bias, fc.weight) "
        "re-initialized: the checkpoint has 2 classes, this run 3"
    )
    last = load_checkpoint(out_dir / "ft3" / "last.pt")
    assert torch.allclose(last["model"][PROBE], torch.full_like(last["model"][PROBE], 0.25))
    assert last["model"]["fc.weight"].shape == (3, 512)
    # weights only: a new run from epoch 1 with its own optimizer, scheduler and counters
    assert (last["epoch"], last["global_step"]) == (1, 3)
    assert last["config"]["trainer"]["init_from"] == str(source)
    assert "epoch 1/1" in proc.output


def test_init_from_same_classes_keeps_the_head_and_can_take_ema(
    source: Path, out_dir: Path
) -> None:
    proc = _run(
        out_dir,
        "run_name=ftema",
        "data.num_classes=2",
        f"trainer.init_from={source}",
        "trainer.init_from_ema=true",
        *FROZEN,
    )
    assert proc.returncode == 0, proc.output[-3000:]
    assert f"initialized from {source}: ema weights" in proc.output
    assert "re-initialized" not in proc.output
    probe = _probe(out_dir / "ftema")
    assert torch.allclose(probe, torch.full_like(probe, 0.5))
    head = load_checkpoint(source)["ema"]["fc.weight"]
    assert torch.allclose(
        load_checkpoint(out_dir / "ftema" / "last.pt")["model"]["fc.weight"], head
    )


def test_init_from_another_architecture_is_refused(source: Path, out_dir: Path) -> None:
    proc = _run(out_dir, "run_name=ftx", "model=xresnet18", "data.num_classes=2",
                f"trainer.init_from={source}")  # fmt: skip
    line = _error_line(proc)
    assert line.startswith(f"error: {source}: another architecture (trained as resnet18) ")
    assert "missing keys [layer3.0.conv2." in line and "unexpected keys [layer3.0.bn2." in line
    assert not (out_dir / "ftx" / "last.pt").exists()
    # another depth: same names for the first blocks, extra blocks missing
    proc = _run(out_dir, "run_name=ft34", "model=resnet34", "data.num_classes=2",
                f"trainer.init_from={source}")  # fmt: skip
    assert "another architecture" in _error_line(proc)


def test_init_from_ema_without_ema_and_unreadable_files_are_refused(
    source: Path, out_dir: Path
) -> None:
    state = load_checkpoint(source)
    state["ema"] = None
    no_ema = out_dir / "no_ema.pt"
    torch.save(state, no_ema)
    proc = _run(out_dir, "run_name=ftn", "data.num_classes=2", f"trainer.init_from={no_ema}",
                "trainer.init_from_ema=true")  # fmt: skip
    assert _error_line(proc) == (
        f"error: {no_ema}: has no EMA weights (trained with trainer.ema=null); set "
        "trainer.init_from_ema=false to start from its model weights"
    )
    pickled = out_dir / "pickled.pt"
    torch.save({"model": {}, "payload": object()}, pickled)  # not loadable with weights_only
    proc = _run(out_dir, "run_name=ftp", "data.num_classes=2", f"trainer.init_from={pickled}")
    assert "cannot read checkpoint" in _error_line(proc)
    proc = _run(out_dir, "run_name=fte", "data.num_classes=2", "trainer.init_from_ema=true")
    assert _error_line(proc) == (
        "error: trainer.init_from_ema: true needs trainer.init_from (the checkpoint to take EMA "
        "weights from)"
    )


def test_resume_wins_over_init_from(source: Path, out_dir: Path) -> None:
    """A relaunch of a fine-tuning run continues its own checkpoints, not the source."""
    args = ("run_name=ftr", "data.num_classes=3", f"trainer.init_from={source}")
    first = _run(out_dir, *args)
    assert first.returncode == 0, first.output[-3000:]
    again = _run(out_dir, *args, "trainer.epochs=2")
    assert again.returncode == 0, again.output[-3000:]
    assert "initialized from" not in again.output
    assert (
        f"trainer.init_from={source} not used: this run continues its own checkpoint "
        f"{out_dir / 'ftr' / 'last.pt'} (resume wins once a run has checkpoints)"
    ) in again.output
    last = load_checkpoint(out_dir / "ftr" / "last.pt")
    assert (last["epoch"], last["global_step"]) == (2, 6)
