"""scripts/train.py end to end, as subprocesses: torchrun (2 CPU processes, gloo) on the demo set
at 32 px; one run stopped by SIGTERM under --max-restarts, then by kill -9, then resumed, exactly;
forced NaN (one process, synthetic batches); wandb offline files. Run A (2 epochs, uninterrupted)
is the reference the others must match exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TRAIN, run_command, subprocess_env, torchrun_train

from xvol.engine import EXIT_NON_FINITE, load_checkpoint

STEPS_PER_EPOCH = 31  # helpers.DEMO_DDP: trainer.limit_train_batches

pytestmark = pytest.mark.slow


def _records(run_dir: Path, kind: str) -> list[dict]:
    """Records of one kind; a line still being written (while we poll) is skipped."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["kind"] == kind:
            out.append(record)
    return out


def _max_weight_diff(a: Path, b: Path, key: str = "model") -> float:
    sa, sb = load_checkpoint(a)[key], load_checkpoint(b)[key]
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


def _assert_same_metrics(ref: Path, other: Path, after: int = 0) -> None:
    """Same train/epoch records (by global step, those past ``after``) as the uninterrupted
    run: none missing or repeated, and the same losses and accuracies."""
    for kind in ("train", "epoch"):
        a = [r for r in _records(ref, kind) if r["global_step"] > after]
        b = [r for r in _records(other, kind) if r["global_step"] > after]
        steps_b = [r["global_step"] for r in b]
        assert len(steps_b) == len(set(steps_b)), f"duplicated {kind} steps: {steps_b}"
        assert [r["global_step"] for r in a] == steps_b
        for ra, rb in zip(a, b):
            for key in ("loss", "lr", "train_loss", "val_top1", "ema_top1"):
                if key in ra:
                    assert rb[key] == pytest.approx(ra[key], abs=1e-4), (key, ra, rb)


@pytest.fixture(scope="module")
def run_a(demo_ddp_run: Path) -> Path:
    """The reference: 2 epochs, uninterrupted (made once per test run: conftest.py)."""
    return demo_ddp_run


def test_torchrun_two_epochs(run_a: Path) -> None:
    assert sorted(p.name for p in run_a.parent.iterdir()) == ["A"]  # one run dir for both ranks
    names = {p.name for p in run_a.iterdir()}
    assert {
        "last.pt",
        "best.pt",
        "epoch_0001.pt",
        "epoch_0002.pt",
        "metrics.jsonl",
        "config.yaml",
        "train.log",
    } <= names
    assert ".hydra" not in names and not any(n.endswith(".tmp") for n in names)
    epochs = _records(run_a, "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2]  # 1-based, as the logs and file names
    assert {r["best_by"] for r in epochs} == {"ema_top1"}  # trainer.ema on: metric auto
    assert epochs[-1]["val_top1"] > 60.0, epochs  # chance is 10%
    for key in ("train_loss", "val_top5", "ema_top1", "lr", "img_s", "epoch_time"):
        assert key in epochs[-1]
    train = _records(run_a, "train")
    assert [r["global_step"] for r in train] == list(range(5, 2 * STEPS_PER_EPOCH + 1, 5))
    # trainer.limit_train_batches: 31 of the 125 batches per epoch, and the cosine schedule
    # counts those (at update 60 of 62 it is near its end; counting 125 it would be at ~0.87)
    assert train[-1]["lr"] < 0.01 * train[0]["lr"], (train[0]["lr"], train[-1]["lr"])
    ckpt = torch.load(run_a / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["global_step"]) == (2, 0, 2 * STEPS_PER_EPOCH)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert ckpt["config"]["model"]["arch"] == "resnet18" and ckpt["config"]["run_name"] == "A"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    log = (run_a / "train.log").read_text()
    assert "final: val top-1" in log and "[rank 1]" not in log  # rank 0 writes the log


def test_sigterm_restart_then_kill9_then_resume_exactly(run_a: Path, out_dir: Path) -> None:
    """One run interrupted both ways. It starts from run A's end of epoch 1 (epoch_0001.pt, a
    full training state, as the run directory's only checkpoint). Rank 0 gets SIGTERM after
    update 40 (epoch 2, batch 9): both ranks stop after that step, checkpoint, exit 143, and
    torchrun --max-restarts brings them back, resume=auto continuing. Past update 55 the whole
    launch (agent, workers, wandb) gets SIGKILL; a plain relaunch resumes from the last
    checkpoint of every 10 updates. Weights, EMA and epoch 2's metrics end as run A's:
    interruptions and saving do not change the trajectory."""
    run_b = out_dir / "B"
    run_b.mkdir()
    shutil.copy2(run_a / "epoch_0001.pt", run_b / "epoch_0001.pt")
    args = [
        "run_name=B",
        f"paths.output_dir={out_dir}",
        "logger=wandb",
        "debug.signal_at_step=40",  # once: a resumed run is past it
        "trainer.checkpoint.every_steps=10",
    ]
    launch_log = out_dir / "B-first-launch.log"
    with open(launch_log, "w") as log:
        proc = subprocess.Popen(
            torchrun_train(*args, restarts=1),
            cwd=ROOT,
            env=subprocess_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.time() + 400
            while time.time() < deadline and proc.poll() is None:
                if (run_b / "metrics.jsonl").exists() and any(
                    r["global_step"] >= 55 for r in _records(run_b, "train")
                ):
                    break
                time.sleep(0.2)
            assert proc.poll() is None, "training ended before it could be killed"
        finally:  # the workers run in their own sessions: kill the whole tree, workers first
            for pid in [*_descendants(proc.pid), proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait(timeout=60)
    first = launch_log.read_text()
    assert re.search(r"resumed from \S*/B/epoch_0001.pt: .*update 31\b", first), first[-4000:]
    assert "exitcode: 143" in first or "exitcode  : 143" in first, first[-4000:]
    assert re.search(r"resumed from \S*/B/last.pt: in epoch 2/2 after batch 9/31, update 40", first)
    killed_at = load_checkpoint(run_b / "last.pt")["global_step"]
    assert killed_at >= 50, killed_at
    again = run_command(torchrun_train(*args, restarts=1), 420)
    assert again.returncode == 0, again.output[-4000:]
    resumed = [line for line in again.output.splitlines() if "resumed from" in line]
    assert resumed and resumed[0].endswith(f"update {killed_at}"), (killed_at, resumed)
    assert _max_weight_diff(run_a / "last.pt", run_b / "last.pt") <= 1e-6
    assert _max_weight_diff(run_a / "last.pt", run_b / "last.pt", "ema") <= 1e-6
    _assert_same_metrics(run_a, run_b, after=STEPS_PER_EPOCH)
    # wandb offline: three runs (launch, restart, relaunch) with one id. The first and the last
    # ended cleanly: they hold the train steps up to the SIGTERM and after the checkpoint the
    # relaunch resumed from, and epoch 2's result (the killed one is not read)
    runs = sorted((run_b / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 3, runs
    ids = {p.stem.removeprefix("run-") for p in runs}
    assert len(ids) == 1 and load_checkpoint(run_b / "last.pt")["wandb_id"] in ids
    before, after = _wandb_history(runs[0]), _wandb_history(runs[2])
    steps = [r["global_step"] for r in _records(run_b, "train")]
    assert steps[0] == STEPS_PER_EPOCH + 4  # the first record of epoch 2 (every 5 updates)
    assert [int(r["_step"]) for r in before if "train/loss" in r] == [s for s in steps if s <= 40]
    assert [int(r["_step"]) for r in after if "train/loss" in r] == [
        s for s in steps if s > killed_at
    ]
    top1 = [r["epoch/val_top1"] for r in [*before, *after] if "epoch/val_top1" in r]
    assert top1 == pytest.approx([r["val_top1"] for r in _records(run_b, "epoch")])


def test_non_finite_loss_stops_and_keeps_checkpoint(out_dir: Path) -> None:
    # one process on small synthetic batches: the stop, not the data, is under test
    cmd = [
        sys.executable,
        TRAIN,
        "model=xresnet18",
        "data=synthetic",
        "trainer.progress_bar=false",
        "trainer.log_interval=5",
        "data.num_classes=10",
        "data.img_size=16",
        "data.batch_size=8",
        "data.length=12",
        "data.val_length=1",
        "run_name=N",
        f"paths.output_dir={out_dir}",
        "trainer.epochs=1",
        "trainer.checkpoint.every_steps=5",
        "debug.nan_at_step=8",
    ]
    proc = run_command(cmd)
    assert proc.returncode == EXIT_NON_FINITE, proc.output[-4000:]
    assert "non-finite loss at epoch 1/1, batch 8, update 8" in proc.output
    assert re.search(r"the last good checkpoint is \S*/N/last.pt", proc.output)
    ckpt = load_checkpoint(out_dir / "N" / "last.pt")
    assert ckpt["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert max(r["global_step"] for r in _records(out_dir / "N", "train")) == 5


def _descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively, deepest first (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))

    def walk(parent: int) -> list[int]:
        return [p for child in children.get(parent, []) for p in (*walk(child), child)]

    return walk(pid)


def _wandb_history(path: Path) -> list[dict]:
    """History rows of an offline .wandb file (LevelDB-style log of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, rows, block = 7, b"", [], 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block tail too short for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (2, 3):  # first / middle fragment
            pending = chunk if kind == 2 else pending + chunk
            continue
        record = pb.Record()
        record.ParseFromString(pending + chunk if kind == 4 else chunk)
        pending = b""
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                    for i in record.history.item
                }
            )
    return rows
