"""Files a run reads back from its run directory are input.

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
from omegaconf import OmegaConf

from xvol.config import write_run_snapshot
from xvol.engine import JsonlMetrics, MetricsLogger
from xvol.engine.checkpointing import CheckpointManager, init_weights_from
from xvol.formats import checkpoint as fmt
from xvol.formats.checkpoint import load_checkpoint, save_checkpoint
from xvol.models import ModelSpec

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


# ----------------------------------------------------------------------------- checkpoints.json


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


# ----------------------------------------------------------- a malformed index or metrics line


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[]", "holds an array, not a JSON object"),
        ('{"epochs": [{"epoch": 1, "global_step": 10}]}', "no 'file'"),
        ('{"epochs": {"file": "epoch_0001.pt"}}', "'epochs' is not a list"),
        ('{"epochs": [{"file": "epoch_0001.pt", "epoch": "one", "global_step": 10}]}', "epoch"),
        (
            '{"epochs": [{"file": "epoch_0001.pt", "epoch": true, "global_step": 10}]}',
            "'epoch' and 'global_step' must be integers",
        ),
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


def test_metrics_lines_that_are_not_records_are_named_and_kept(tmp_path: Path, caplog) -> None:
    """A deeply nested line, a non-object and a record with a text epoch: no traceback on
    resume, one warning naming the file and the lines, which stay where they were."""
    jsonl = JsonlMetrics(tmp_path / "metrics.jsonl")
    logger = MetricsLogger(jsonl)
    logger.write({"kind": "train", "epoch": 1, "step": 1, "global_step": 1})
    logger.close()
    deep = "[" * 100_000 + "]" * 100_000
    odd = ["[1, 2]", '{"kind": "epoch", "epoch": "one", "global_step": 1}', deep]
    with open(jsonl.path, "a") as fh:
        fh.write("".join(line + "\n" for line in odd))
    logger.write({"kind": "train", "epoch": 1, "step": 2, "global_step": 2})
    logger.close()
    with caplog.at_level(logging.WARNING, logger="xvol"):
        logger.truncate_after(epochs_done=0, global_step=1)
        records = jsonl.read()
    assert [r["global_step"] for r in records] == [1]
    messages = [m for m in _warnings(caplog) if "metrics.jsonl" in m]
    assert messages and all("\n" not in m for m in messages)
    assert str(jsonl.path) in messages[0] and "lines 2, 3, 4" in messages[0]
    assert "nested too deeply" in messages[0]
    lines = jsonl.path.read_text().splitlines()
    assert lines[1:] == odd  # left in place; the record past the checkpoint is gone


# ----------------------------------------------------------------------- init_from, config.yaml


def test_init_from_names_another_xvolution_spec(tmp_path: Path, caplog) -> None:
    """shifts [2] from a shifts [1] checkpoint: the shapes match, so the weights load, and the
    warning names the difference (as a resumed launch names its config differences)."""
    trained = OmegaConf.to_container(
        OmegaConf.create(
            {
                "_target_": "xvol.models.build_model",
                "arch": "resnet18",
                "num_classes": 3,
                "stages": [4],
                "xconv": {"_target_": "xvol.ops.XConv2d", "_partial_": True, "shifts": [1]},
            }
        )
    )
    ours = json.loads(json.dumps(trained))
    ours["xconv"]["shifts"] = [2]
    source = ModelSpec.from_config(trained).build()
    path = tmp_path / "source.pt"
    state = _state(1, 1.0)
    state["model"], state["config"] = source.state_dict(), {"model": trained}
    save_checkpoint(state, path)
    model = ModelSpec.from_config(ours).build()
    with caplog.at_level(logging.WARNING, logger="xvol"):
        init_weights_from(model, path, model_config=trained)
    assert not _warnings(caplog)  # the same spec: nothing to say
    with caplog.at_level(logging.WARNING, logger="xvol"):
        note = init_weights_from(model, path, model_config=ours)
    messages = _warnings(caplog)
    assert len(messages) == 1 and "\n" not in messages[0]
    assert str(path) in messages[0] and "model.xconv.shifts ([1] -> [2])" in messages[0]
    assert "model weights" in note
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


@pytest.mark.parametrize("text", ["a: [1, 2\nb: {", "- just\n- a list\n", "[" * 5_000])
def test_run_config_that_does_not_parse_is_named(tmp_path: Path, caplog, text: str) -> None:
    (tmp_path / "config.yaml").write_text(text)
    cfg = OmegaConf.create({"model": {"arch": "resnet18"}, "trainer": {"epochs": 2}})
    with caplog.at_level(logging.WARNING, logger="xvol"):
        differ = write_run_snapshot(tmp_path, cfg, [], resumed=True)
    assert differ == []  # not "every key differs"
    messages = _warnings(caplog)
    assert len(messages) == 1 and "\n" not in messages[0]
    assert str(tmp_path / "config.yaml") in messages[0]
    assert (tmp_path / "config.yaml").read_text() == text  # kept as found
