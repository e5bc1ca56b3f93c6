"""Checkpoint I/O: weights_only round trip, atomic writes, corrupt-file fallback, key checks,
full-disk messages, and rotation that never puts an unverified last.pt over prev.pt."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from xvol.engine import checkpointing as ck
from xvol.engine.checkpointing import CheckpointManager, capture_rng_state, restore_rng_state
from xvol.formats import checkpoint as fmt
from xvol.formats.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from xvol.formats.load import load_state_dict_strict, strip_prefixes
from xvol.formats.provenance import git_revision


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))


def _full_state(tag: float = 0.0) -> dict:
    """A checkpoint with every kind of entry the trainer writes (after one real update)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    opt = create_optimizer_v2(model, "sgd", lr=0.1, weight_decay=1e-4)
    sched, _ = create_scheduler_v2(
        opt, "cosine", num_epochs=2, warmup_epochs=1, step_on_epochs=False, updates_per_epoch=3
    )
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()
    sched.step_update(1)
    scaler = torch.amp.GradScaler("cpu")
    return {
        "format_version": fmt.FORMAT_VERSION,
        "kind": fmt.KIND,
        "model": model.state_dict(),
        "ema": None,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": 1,
        "step": 2,
        "global_step": 5,
        "epoch_state": {"loss_sum": 1.0, "loss_count": 2.0, "images": 8.0, "elapsed": 0.5},
        "rng": [capture_rng_state()],
        "bn_buffers": None,
        "config": {"a": {"b": [1, 2.5, None, "x"]}},
        "metrics": {"val_top1": tag},
        "best_metric": tag,
        "wandb_id": "abc123",
        "git": git_revision(),
        "versions": fmt.checkpoint_versions(),
        "time": 1.0,
    }


def test_round_trip_with_weights_only(tmp_path: Path) -> None:
    state = _full_state(3.0)
    path = save_checkpoint(state, tmp_path / "last.pt")
    loaded = torch.load(path, weights_only=True)  # raises on any non-allowlisted type
    assert loaded["metrics"] == {"val_top1": 3.0}
    assert loaded["config"] == {"a": {"b": [1, 2.5, None, "x"]}}
    assert torch.equal(loaded["model"]["0.weight"], state["model"]["0.weight"])
    assert loaded["optimizer"]["param_groups"][0]["nesterov"] is True
    assert loaded["scheduler"]["t_initial"] == 6  # 2 epochs x 3 updates: stepped per update
    assert not list(tmp_path.glob(".*tmp*"))


def test_rng_state_restores_every_generator() -> None:
    state = capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2] == second[2]


def test_failed_write_leaves_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(_full_state(1.0), path)

    def dying_save(obj: object, fh) -> None:
        fh.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(fmt.torch, "save", dying_save)
    with pytest.raises(CheckpointError, match="simulated") as err:
        save_checkpoint(_full_state(2.0), path)
    assert str(err.value).startswith(f"{path}: cannot write checkpoint: ")
    monkeypatch.undo()
    assert load_checkpoint(path)["metrics"]["val_top1"] == 1.0
    assert not list(tmp_path.glob(".*tmp*"))


class _FullFile:
    """A file whose disk fills after ``room`` bytes (what torch.save sees on a full disk)."""

    def __init__(self, fh, room: int = 4096) -> None:
        self.fh, self.room = fh, room

    def write(self, data) -> int:
        self.room -= memoryview(data).nbytes
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def _fill_disk(monkeypatch) -> None:
    real_save = torch.save
    monkeypatch.setattr(fmt.torch, "save", lambda obj, fh: real_save(obj, _FullFile(fh)))


def test_full_disk_says_so_and_keeps_previous(tmp_path: Path, monkeypatch) -> None:
    """torch.save turns ENOSPC into "unexpected pos"; the message must still say disk full."""
    path = save_checkpoint(_full_state(1.0), tmp_path / "last.pt")
    _fill_disk(monkeypatch)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(_full_state(2.0), path)
    assert str(err.value) == (
        f"{path}: cannot write checkpoint: no space left on device (the previous last.pt is "
        "unchanged)"
    )
    monkeypatch.undo()
    assert load_checkpoint(path)["metrics"]["val_top1"] == 1.0
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.slow  # a subprocess (or several seconds): make test, not test-fast
def test_write_killed_mid_way_leaves_previous_checkpoint(tmp_path: Path) -> None:
    """A real SIGKILL while torch.save is half-way through the temp file."""
    path = tmp_path / "last.pt"
    save_checkpoint(_full_state(1.0), path)
    ready = tmp_path / "ready"
    code = textwrap.dedent(f"""
        import time, torch
        from xvol.formats import checkpoint as fmt
        real_save = torch.save
        def slow_save(obj, fh):
            fh.write(b"PK\\x03\\x04" + b"x" * 100000)
            fh.flush()
            open({str(ready)!r}, "w").close()
            time.sleep(60)
        fmt.torch.save = slow_save
        fmt.save_checkpoint({{"model": {{}}, "metrics": {{"val_top1": 2.0}}}}, {str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "the writer never reached the middle of its write"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    leftovers = list(tmp_path.glob(".last.pt.tmp-*"))
    assert leftovers, "the killed write should have left its temp file behind"
    assert load_checkpoint(path)["metrics"]["val_top1"] == 1.0
    CheckpointManager(tmp_path).remove_stale_temp_files()
    assert not list(tmp_path.glob(".last.pt.tmp-*"))


def test_truncated_checkpoint_names_file_and_falls_back(tmp_path: Path, caplog) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(_full_state(1.0))
    manager.save(_full_state(2.0))  # last.pt = 2.0, prev.pt = 1.0
    data = manager.last.read_bytes()
    manager.last.unlink()  # a fresh inode: prev.pt may be a hard link to the old last.pt
    manager.last.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(manager.last)):
        load_checkpoint(manager.last)
    with caplog.at_level(logging.WARNING, logger="xvol"):
        state, used = manager.load_latest()
    assert used == manager.prev
    assert state["metrics"]["val_top1"] == 1.0
    assert str(manager.last) in caplog.text and "falling back to prev.pt" in caplog.text


def test_no_loadable_checkpoint_names_each_file(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    assert manager.load_latest() is None  # nothing at all: a fresh start is fine
    manager.save(_full_state(1.0))
    manager.save(_full_state(2.0))
    newer = _full_state(2.0)
    newer["format_version"] = fmt.FORMAT_VERSION + 1
    torch.save(newer, manager.prev)
    data = manager.last.read_bytes()
    manager.last.unlink()
    manager.last.write_bytes(data[:100])
    with pytest.raises(CheckpointError) as err:
        CheckpointManager(tmp_path).load_latest()
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{tmp_path} holds checkpoints but none")
    assert "last.pt: cannot read checkpoint (truncated or corrupt?)" in message
    assert f"prev.pt: checkpoint format {fmt.FORMAT_VERSION + 1} is newer" in message


def test_fallback_never_rotates_an_unverified_last(tmp_path: Path, monkeypatch) -> None:
    """Resumed from prev.pt because last.pt is corrupt: saves must keep prev.pt until the
    new last.pt is written, even when that write fails."""
    manager = CheckpointManager(tmp_path)
    manager.save(_full_state(1.0))
    manager.save(_full_state(2.0))  # last 2.0, prev 1.0
    data = manager.last.read_bytes()
    manager.last.unlink()
    manager.last.write_bytes(data[: len(data) // 2])
    resumed = CheckpointManager(tmp_path)  # a new launch
    state, used = resumed.load_latest()
    assert used == resumed.prev and not resumed.last_known_good
    _fill_disk(monkeypatch)
    with pytest.raises(CheckpointError, match="no space left on device"):
        resumed.save(_full_state(3.0))
    monkeypatch.undo()
    assert load_checkpoint(resumed.prev)["metrics"]["val_top1"] == 1.0
    resumed.save(_full_state(3.0))  # replaces the corrupt last.pt, prev.pt untouched
    assert load_checkpoint(resumed.prev)["metrics"]["val_top1"] == 1.0
    assert load_checkpoint(resumed.last)["metrics"]["val_top1"] == 3.0
    resumed.save(_full_state(4.0))  # last.pt is known good now: it rotates
    assert load_checkpoint(resumed.prev)["metrics"]["val_top1"] == 3.0


def test_resume_from_last_rotates(tmp_path: Path) -> None:
    CheckpointManager(tmp_path).save(_full_state(1.0))
    manager = CheckpointManager(tmp_path)
    _, used = manager.load_latest()
    assert used == manager.last and manager.last_known_good
    manager.save(_full_state(2.0))
    assert load_checkpoint(manager.prev)["metrics"]["val_top1"] == 1.0


def test_garbage_and_foreign_files_are_rejected(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(junk)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match="not an xvol checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.pt")
    odd = _full_state()
    odd["format_version"] = "2"
    torch.save(odd, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="format_version '2' is not an integer"):
        load_checkpoint(tmp_path / "odd.pt")


def test_strip_prefixes() -> None:
    state = {"module._orig_mod.a.weight": 1, "_orig_mod.module.b": 2, "c.module.d": 3}
    assert strip_prefixes(state) == {"a.weight": 1, "b": 2, "c.module.d": 3}


def test_load_strips_wrappers() -> None:
    src, dst = _net(), _net()
    src(torch.randn(1, 3, 5, 5))
    dst(torch.randn(1, 3, 5, 5))
    wrapped = {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}
    load_state_dict_strict(dst, wrapped, "x.pt")
    assert torch.equal(dst[0].weight, src[0].weight)


def test_strict_mismatch_names_keys_and_source() -> None:
    model = _net()
    model(torch.randn(1, 3, 5, 5))
    state = dict(model.state_dict())
    state.pop("1.running_var")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(model, state, "run/last.pt")
    message = str(err.value)
    assert "run/last.pt" in message and "1.running_var" in message and "extra.weight" in message
    bad_shape = dict(model.state_dict())
    bad_shape["0.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(CheckpointError, match="run/last.pt"):
        load_state_dict_strict(model, bad_shape, "run/last.pt")


def test_top_k_and_best(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_top_k=2, metric="val_top1", mode="max")
    for epoch, top1 in enumerate([10.0, 30.0, 20.0, 5.0]):
        state = _full_state(top1)
        state["epoch"], state["global_step"] = epoch + 1, (epoch + 1) * 10
        manager.save(state, epoch_end=True)
    kept = sorted(p.name for p in tmp_path.glob("epoch_*.pt"))
    assert kept == ["epoch_0002.pt", "epoch_0003.pt"]  # epochs 2 and 3 (1-based): 30 and 20
    assert load_checkpoint(manager.best)["metrics"]["val_top1"] == 30.0
    assert load_checkpoint(manager.last)["metrics"]["val_top1"] == 5.0
    assert load_checkpoint(manager.prev)["metrics"]["val_top1"] == 20.0
    assert [p.name for p in manager.candidates()] == [
        "last.pt",
        "prev.pt",
        "epoch_0003.pt",
        "epoch_0002.pt",
    ]


def _epoch_end(manager: CheckpointManager, epoch: int, **metrics: float) -> None:
    state = _full_state()
    state["epoch"], state["step"], state["global_step"] = epoch, 0, epoch * 10
    state["metrics"] = dict(metrics)
    manager.save(state, epoch_end=True)


def test_index_names_the_metric_and_the_best_epoch(tmp_path: Path) -> None:
    """Epoch files and the index use 1-based epochs; the index says what picked best.pt."""
    manager = CheckpointManager(tmp_path, keep_top_k=3, metric="ema_top1", mode="max")
    for epoch, (raw, ema) in enumerate([(50.0, 40.0), (70.0, 35.0), (60.0, 55.0)], start=1):
        _epoch_end(manager, epoch, val_top1=raw, ema_top1=ema)
        assert manager.best_updated == (epoch != 2)
    index = json.loads((tmp_path / "checkpoints.json").read_text())
    assert (index["metric"], index["mode"], index["best_epoch"]) == ("ema_top1", "max", 3)
    assert sorted(e["file"] for e in index["epochs"]) == [
        "epoch_0001.pt",
        "epoch_0002.pt",
        "epoch_0003.pt",
    ]
    assert load_checkpoint(manager.best)["metrics"]["ema_top1"] == 55.0  # not the best raw one
    assert manager.best_epoch() == (3, 55.0)


def test_another_metric_reranks_the_kept_epochs(tmp_path: Path, caplog) -> None:
    """A relaunch that ranks by another metric (EMA turned on, metric changed) re-ranks the
    kept epochs from the numbers the index keeps and points best.pt at the best of them."""
    manager = CheckpointManager(tmp_path, keep_top_k=3, metric="val_top1", mode="max")
    _epoch_end(manager, 1, val_top1=70.0, ema_top1=40.0)
    _epoch_end(manager, 2, val_top1=60.0, ema_top1=65.0)
    assert load_checkpoint(manager.best)["metrics"]["val_top1"] == 70.0
    relaunched = CheckpointManager(tmp_path, keep_top_k=3, metric="ema_top1", mode="max")
    with caplog.at_level(logging.WARNING, logger="xvol"):
        _epoch_end(relaunched, 3, val_top1=80.0, ema_top1=50.0)
    assert "ranked checkpoints by val_top1 (max); this run ranks them by ema_top1" in caplog.text
    assert load_checkpoint(relaunched.best)["metrics"]["ema_top1"] == 65.0  # epoch 2
    assert relaunched.best_epoch() == (2, 65.0) and not relaunched.best_updated
    # an index written before metric names were kept, ranked by a metric it lacks
    index = json.loads((tmp_path / "checkpoints.json").read_text())
    for e in index["epochs"]:
        e.pop("metrics")
    del index["metric"], index["mode"]
    (tmp_path / "checkpoints.json").write_text(json.dumps(index))
    fresh = CheckpointManager(tmp_path, keep_top_k=3, metric="val_loss", mode="min")
    _epoch_end(fresh, 4, val_top1=1.0, val_loss=0.5)
    assert fresh.best_epoch() == (4, 0.5) and fresh.best_updated


def test_classifier_keys_of_a_timm_resnet() -> None:
    model = timm.create_model("resnet18", num_classes=3)
    assert ck.classifier_keys(model) == {"fc.weight", "fc.bias"}
    assert ck.classifier_keys(nn.Linear(2, 2)) == set()


def test_a_nan_epoch_never_becomes_best(tmp_path: Path) -> None:
    """best.pt and the index follow the one rule (xvol.engine.metrics.better)."""
    manager = CheckpointManager(tmp_path, keep_top_k=3, metric="val_loss", mode="min")
    _epoch_end(manager, 1, val_loss=float("nan"))
    assert not manager.best_updated and not manager.best.exists()
    assert manager.best_epoch() == (None, None)
    _epoch_end(manager, 2, val_loss=0.5)
    assert manager.best_updated and manager.best_epoch() == (2, 0.5)
    _epoch_end(manager, 3, val_loss=float("nan"))
    assert not manager.best_updated and manager.best_epoch() == (2, 0.5)
    assert load_checkpoint(manager.best)["metrics"]["val_loss"] == 0.5


def test_each_checkpoint_carries_the_index_best_value(tmp_path: Path) -> None:
    """best_metric in a checkpoint is what checkpoints.json held when it was written: one record
    of the best value, also across a relaunch that ranks by another metric and mid-epoch saves."""
    manager = CheckpointManager(tmp_path, keep_top_k=3, metric="val_top1", mode="max")
    _epoch_end(manager, 1, val_top1=float("nan"), ema_top1=10.0)
    assert load_checkpoint(manager.last)["best_metric"] is None
    _epoch_end(manager, 2, val_top1=60.0, ema_top1=20.0)
    _epoch_end(manager, 3, val_top1=50.0, ema_top1=30.0)
    last = load_checkpoint(manager.last)
    assert (last["best_metric"], last["best_metric_name"]) == (60.0, "val_top1")
    relaunched = CheckpointManager(tmp_path, keep_top_k=3, metric="ema_top1", mode="max")
    relaunched.save(_full_state(), epoch_end=False)  # mid-epoch: the index ranks by val_top1
    last = load_checkpoint(relaunched.last)
    assert (last["best_metric"], last["best_metric_name"]) == (None, "ema_top1")
    _epoch_end(relaunched, 4, val_top1=70.0, ema_top1=25.0)  # re-ranked: epoch 3's 30 is best
    assert load_checkpoint(relaunched.last)["best_metric"] == 30.0 == relaunched.best_epoch()[1]
