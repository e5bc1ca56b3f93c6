"""Files a run reads back from its run directory are input (issue 19, findings 1, 6, 12).

checkpoints.json may only name the epoch files the manager writes: anything else is refused and
nothing outside the run directory is read, linked or deleted; a malformed index is rebuilt from
the epoch files; a malformed metrics.jsonl line or config.yaml is named in one line and never
ends in a traceback; trainer.init_from names the model differences the weights' shapes hide.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from xvol.engine.checkpoint import CheckpointManager
from xvol.formats import checkpoint as fmt
from xvol.formats.checkpoint import load_checkpoint, save_checkpoint

INDEX = "checkpoints.json"


def _state(epoch: int, top1: float) -> dict:
    """A minimal epoch-end checkpoint (the manager does not look inside the weights)."""
    return {
        "format_version": fmt.FORMAT_VERSION,
        "kind": fmt.KIND,
        "model": {"w": torch.full((2,), float(epoch))},
        "epoch": epoch,
        "step": 0,
        "global_step": epoch * 10,
        "metrics": {"val_top1": top1},
    }


def _run(run_dir: Path, top1s: list[float], keep_top_k: int = 3) -> CheckpointManager:
    manager = CheckpointManager(run_dir, keep_top_k=keep_top_k)
    for epoch, top1 in enumerate(top1s, start=1):
        manager.save(_state(epoch, top1), epoch_end=True)
    return manager


def _index(run_dir: Path) -> dict:
    return json.loads((run_dir / INDEX).read_text())


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ----------------------------------------------------------------------------- finding 1


def test_index_entries_outside_the_run_are_never_deleted(tmp_path: Path, caplog) -> None:
    """An absolute path and a ../ path in checkpoints.json, resumed with keep_top_k=1: both files
    survive, the entries are named in one warning, and only the run's epoch files are pruned."""
    run = tmp_path / "runs" / "a"
    _run(run, [10.0, 20.0])
    absolute = tmp_path / "precious.pt"
    save_checkpoint(_state(9, 99.0), absolute)
    escape = tmp_path / "x" / "y"
    escape.parent.mkdir()
    escape.write_text("not yours")
    index = _index(run)
    index["epochs"] += [
        {"file": str(absolute), "epoch": 9, "global_step": 90, "metric": -5.0, "metrics": {}},
        {"file": "../../x/y", "epoch": 8, "global_step": 80, "metric": -5.0, "metrics": {}},
    ]
    (run / INDEX).write_text(json.dumps(index))

    resumed = CheckpointManager(run, keep_top_k=1)
    with caplog.at_level(logging.WARNING, logger="xvol"):
        assert all(p.parent == run for p in resumed.candidates())
        resumed.load_latest()
        resumed.save(_state(3, 5.0), epoch_end=True)
    assert absolute.is_file() and escape.read_text() == "not yours"
    assert load_checkpoint(absolute)["epoch"] == 9  # not linked over either
    messages = [m for m in _warnings(caplog) if INDEX in m]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert repr(str(absolute)) in messages[0] and "'../../x/y'" in messages[0]
    # the rebuilt index kept the best epoch (20.0) and ranks by the run's own numbers
    assert [e["file"] for e in _index(run)["epochs"]] == ["epoch_0002.pt"]
    assert sorted(p.name for p in run.glob("epoch_*.pt")) == ["epoch_0002.pt"]
    assert load_checkpoint(run / "best.pt")["metrics"]["val_top1"] == 20.0


def test_index_never_resumes_from_a_file_outside_the_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    outside = tmp_path / "outside.pt"
    save_checkpoint(_state(7, 1.0), outside)
    entry = {"file": str(outside), "epoch": 7, "global_step": 70, "metric": 1.0, "metrics": {}}
    (run / INDEX).write_text(json.dumps({"metric": "val_top1", "epochs": [entry]}))
    manager = CheckpointManager(run)
    assert manager.candidates() == []
    assert manager.load_latest() is None and outside.is_file()


# ----------------------------------------------------------------------------- finding 12


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[]", "holds an array, not a JSON object"),
        ('{"epochs": [{"epoch": 1, "global_step": 10}]}', "no 'file'"),
        ('{"epochs": {"file": "epoch_0001.pt"}}', "'epochs' is not a list"),
        ('{"epochs": [{"file": "epoch_0001.pt", "epoch": "one", "global_step": 10}]}', "epoch"),
        ('{"metric": "val_top1", "best_metric": "high", "epochs": []}', "best_metric"),
        ("[" * 100_000 + "]" * 100_000, "nested"),
        ('{"epochs": [', "not valid JSON"),
    ],
)
def test_malformed_index_is_rebuilt_from_the_epoch_files(
    tmp_path: Path, caplog, text: str, problem: str
) -> None:
    """No traceback, one warning naming the file, and the run goes on from its epoch files:
    the best one is still best and the top-k pruning keeps it."""
    _run(tmp_path, [10.0, 30.0, 20.0])
    (tmp_path / INDEX).write_text(text)
    manager = CheckpointManager(tmp_path, keep_top_k=2)
    with caplog.at_level(logging.WARNING, logger="xvol"):
        assert [p.name for p in manager.candidates()][:2] == ["last.pt", "prev.pt"]
        assert manager.best_epoch() == (2, 30.0)
        manager.save(_state(3, 20.0), epoch_end=False)  # a mid-epoch save reads it too
        manager.save(_state(4, 25.0), epoch_end=True)
    messages = [m for m in _warnings(caplog) if INDEX in m]
    assert len(messages) == 1 and "\n" not in messages[0], messages
    assert str(tmp_path / INDEX) in messages[0] and problem in messages[0]
    assert "rebuilt" in messages[0]
    index = _index(tmp_path)
    assert sorted(e["file"] for e in index["epochs"]) == ["epoch_0002.pt", "epoch_0004.pt"]
    assert (index["best_epoch"], index["best_metric"]) == (2, 30.0)
    assert not manager.best_updated
    assert load_checkpoint(tmp_path / "best.pt")["metrics"]["val_top1"] == 30.0


def test_a_missing_index_is_rebuilt_when_epoch_files_exist(tmp_path: Path, caplog) -> None:
    _run(tmp_path, [10.0, 30.0])
    (tmp_path / INDEX).unlink()
    manager = CheckpointManager(tmp_path, keep_top_k=1)
    with caplog.at_level(logging.WARNING, logger="xvol"):
        manager.save(_state(3, 20.0), epoch_end=True)
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pt")) == ["epoch_0002.pt"]
    assert any(INDEX in m and "missing" in m for m in _warnings(caplog))
    fresh = tmp_path / "fresh"
    with caplog.at_level(logging.WARNING, logger="xvol"):
        caplog.clear()
        _run(fresh, [1.0])  # a new run: no index yet is normal
    assert not _warnings(caplog)
