"""scripts/train.py refuses what would lose a run or train on the wrong thing, in one line.

Each case is a subprocess on tiny synthetic (or 8-image folder) data. A run whose
checkpoints all fail to load is left untouched; rotation after a fallback keeps the good
``prev.pt``; class names must match on resume; one launch per run directory; the config
snapshot keeps what the checkpoints were trained with; bad values, a full disk and a DataError
under torchrun end in one ``error:`` line, printed once and written to train.log.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TRAIN, one_error_line, run_command, subprocess_env
from PIL import Image

from xvol.engine import load_checkpoint

pytestmark = pytest.mark.slow  # every case launches scripts/train.py

# 3 updates per epoch of 4 random 16 px images; a checkpoint after every update
SYNTHETIC = [
    "data=synthetic",
    "data.num_classes=2",
    "data.img_size=16",
    "data.batch_size=4",
    "data.length=3",
    "data.val_length=1",
]
FAST = [
    "model=resnet18",
    "trainer.epochs=1",
    "trainer.ema=null",
    "trainer.progress_bar=false",
    "trainer.checkpoint.every_steps=1",
    "sched.warmup_epochs=0",
]

# scripts/train.py with every checkpoint write failing as on a full disk: the file object
# raises OSError(ENOSPC) part-way, which torch.save reports as "unexpected pos"
_FULL_DISK = """
import errno, runpy, sys, torch
real_save = torch.save
class Full:
    def __init__(self, fh):
        self.fh, self.written = fh, 0
    def write(self, data):
        self.written += memoryview(data).nbytes
        if self.written > 65536:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.fh.write(data)
    def flush(self):
        self.fh.flush()
torch.save = lambda obj, f, *a, **k: real_save(obj, Full(f), *a, **k)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(
    *args: str, data: tuple[str, ...] = tuple(SYNTHETIC), full_disk: bool = False
) -> subprocess.CompletedProcess:
    head = [sys.executable, "-c", _FULL_DISK] if full_disk else [sys.executable]
    return run_command([*head, TRAIN, *FAST, *data, *args])


def _error_line(proc: subprocess.CompletedProcess) -> str:
    return one_error_line(proc, last=True)


def _digests(run_dir: Path) -> dict[str, str]:
    """Every file but the log and the lock, by content."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in run_dir.iterdir()
        if p.is_file() and p.name not in ("train.log", ".lock")
    }


@pytest.fixture(scope="module")
def base_run(out_dir: Path) -> Path:
    """One finished epoch: last.pt (update 3, epoch end), prev.pt (update 2), epoch_0001.pt."""
    proc = _run("run_name=base", f"paths.output_dir={out_dir}")
    assert proc.returncode == 0, proc.output[-3000:]
    return out_dir / "base"


def _copy(base_run: Path, name: str) -> Path:
    run_dir = base_run.parent / name
    shutil.copytree(base_run, run_dir)
    return run_dir


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.unlink()  # a new inode: the other names of a hard link keep the good bytes
    path.write_bytes(data[: len(data) // 2])


def test_no_loadable_checkpoint_refuses_and_changes_nothing(base_run: Path) -> None:
    run_dir = _copy(base_run, "unreadable")
    _truncate(run_dir / "last.pt")
    newer = torch.load(run_dir / "prev.pt", weights_only=True)
    newer["format_version"] = 99
    torch.save(newer, run_dir / "prev.pt")
    for name in ("epoch_0001.pt", "best.pt"):
        _truncate(run_dir / name)
    before = _digests(run_dir)
    proc = _run("run_name=unreadable", f"paths.output_dir={run_dir.parent}")
    line = _error_line(proc)
    assert "holds checkpoints but none loads" in line and "nothing was changed" in line
    assert "last.pt: cannot read checkpoint" in line and "epoch_0001.pt: cannot read" in line
    assert "prev.pt: checkpoint format 99 is newer" in line
    assert _digests(run_dir) == before  # checkpoints, index, metrics and snapshot untouched
    assert line in (run_dir / "train.log").read_text()


def test_full_disk_names_file_and_keeps_checkpoint(base_run: Path) -> None:
    run_dir = _copy(base_run, "full")
    last = load_checkpoint(run_dir / "last.pt")["global_step"]
    before = _digests(run_dir)
    proc = _run(
        "run_name=full", f"paths.output_dir={run_dir.parent}", "trainer.epochs=2", full_disk=True
    )
    line = _error_line(proc)
    assert line == (
        f"error: {run_dir / 'last.pt'}: cannot write checkpoint: no space left on device "
        "(the previous last.pt is unchanged)"
    )
    assert len(proc.stderr.strip().splitlines()) <= 3, proc.stderr
    assert load_checkpoint(run_dir / "last.pt")["global_step"] == last
    assert _digests(run_dir)["last.pt"] == before["last.pt"]
    assert not list(run_dir.glob(".*.tmp-*"))
    assert line in (run_dir / "train.log").read_text()


def test_fallback_to_prev_never_rotates_the_corrupt_last(base_run: Path) -> None:
    """last.pt corrupt, resume from prev.pt, then the next save fails: prev.pt must survive."""
    run_dir = _copy(base_run, "fallback")
    _truncate(run_dir / "last.pt")
    prev = _digests(run_dir)["prev.pt"]
    failed = _run(
        "run_name=fallback",
        f"paths.output_dir={run_dir.parent}",
        "trainer.epochs=2",
        full_disk=True,
    )
    assert "resumed from" in failed.output and "prev.pt" in failed.output, failed.output[-3000:]
    assert "no space left on device" in _error_line(failed)
    assert _digests(run_dir)["prev.pt"] == prev  # the corrupt last.pt was not linked over it
    again = _run("run_name=fallback", f"paths.output_dir={run_dir.parent}", "trainer.epochs=2")
    assert again.returncode == 0, again.output[-3000:]
    assert f"resumed from {run_dir / 'prev.pt'}: in epoch 1/2 after batch 2/3, update 2" in (
        again.output
    )
    assert load_checkpoint(run_dir / "last.pt")["global_step"] == 6
    assert load_checkpoint(run_dir / "prev.pt")["global_step"] == 5


def test_relaunch_keeps_config_snapshot(base_run: Path) -> None:
    run_dir = _copy(base_run, "snapshot")
    config = (run_dir / "config.yaml").read_text()
    overrides = (run_dir / "overrides.yaml").read_text()
    proc = _run("run_name=snapshot", f"paths.output_dir={run_dir.parent}", "optim.lr=5.0")
    assert proc.returncode == 0, proc.output[-3000:]
    assert "run already complete" in proc.output
    assert "config.yaml and overrides.yaml keep the values" in proc.output
    assert "optim.lr (" in proc.output and "-> 5.0)" in proc.output
    assert (run_dir / "config.yaml").read_text() == config
    assert (run_dir / "overrides.yaml").read_text() == overrides


def test_second_launch_into_a_busy_run_dir_is_refused(out_dir: Path) -> None:
    run_dir = out_dir / "busy"
    holder = subprocess.Popen(
        [
            sys.executable,
            TRAIN,
            *FAST,
            *SYNTHETIC,
            "run_name=busy",
            f"paths.output_dir={out_dir}",
            "data.length=100000",
            "trainer.checkpoint.every_steps=0",
        ],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        log = run_dir / "train.log"
        while time.time() < deadline and holder.poll() is None:
            if log.exists() and "run busy in" in log.read_text():
                break
            time.sleep(0.2)
        assert holder.poll() is None, "the first launch ended early"
        proc = _run("run_name=busy", f"paths.output_dir={out_dir}")
        line = _error_line(proc)
        assert line.startswith(f"error: {run_dir} is in use by another launch (pid {holder.pid} ")
        assert "pick another run_name" in line
        assert holder.poll() is None  # the first launch goes on
        metrics = run_dir / "metrics.jsonl"
        while time.time() < deadline and holder.poll() is None:  # and logs its steps
            if metrics.exists() and '"train"' in metrics.read_text():
                break
            time.sleep(0.2)
    finally:
        holder.send_signal(signal.SIGTERM)  # checkpoints and exits 143
        holder.wait(timeout=120)
    assert holder.returncode == 143
    steps = [r for r in metrics.read_text().splitlines() if '"train"' in r]
    assert steps and len(steps) == len(set(steps))
    assert line in log.read_text()


def _image_folder(root: Path, classes: list[str]) -> None:
    for split, n in (("train", 4), ("val", 2)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (60 * c, 7 * i, 90)).save(folder / f"{i}.jpg")


@pytest.mark.slow  # three launches on folder data: ~20 s
def test_resume_into_renamed_classes_is_refused(out_dir: Path) -> None:
    data = out_dir / "folder"
    _image_folder(data, ["ant", "bee", "cat"])
    folder = (
        "data=imagenet",
        f"data.root={data}",
        "data.num_classes=3",
        "data.img_size=16",
        "data.batch_size=4",
        "data.workers=0",
    )
    first = _run("run_name=classes", f"paths.output_dir={out_dir}", data=folder)
    assert first.returncode == 0, first.output[-3000:]
    (data / "train" / "bee").rename(data / "train" / "bug")
    (data / "val" / "bee").rename(data / "val" / "bug")
    last = out_dir / "classes" / "last.pt"
    before = _digests(last.parent)
    for resume in ("auto", str(last)):
        run = "classes" if resume == "auto" else "classes_path"
        proc = _run(
            f"run_name={run}",
            f"paths.output_dir={out_dir}",
            f"resume={resume}",
            "trainer.epochs=2",
            data=folder,
        )
        line = _error_line(proc)
        assert line.startswith(f"error: {last}: trained on other class names than the data")
        assert "index 1: checkpoint 'bee', data 'bug'" in line
        assert "trainer.allow_class_mismatch=true" in line
    assert _digests(last.parent) == before
    assert not (out_dir / "classes_path" / "last.pt").exists()


def test_resume_into_another_network_is_refused(out_dir: Path) -> None:
    """Resume continues the network the run trained: other shifts keep every tensor's shape, so
    the weights would load and train another operator; refused naming the key, nothing changed."""
    xconv = ("model=xresnet18",)
    first = _run("run_name=net", f"paths.output_dir={out_dir}", *xconv)
    assert first.returncode == 0, first.output[-3000:]
    run_dir = out_dir / "net"
    before = _digests(run_dir)
    proc = _run(
        "run_name=net", f"paths.output_dir={out_dir}", "trainer.epochs=2", *xconv,
        "model.xconv.shifts=[2]",
    )  # fmt: skip
    line = _error_line(proc)
    assert line.startswith(f"error: {run_dir / 'last.pt'}: trained as another network")
    assert "model.xconv.shifts ([1] -> [2])" in line and "trainer.init_from" in line
    assert _digests(run_dir) == before


def test_bad_value_is_one_line_naming_the_key(out_dir: Path) -> None:
    proc = _run("run_name=bad", f"paths.output_dir={out_dir}", "trainer.epochs=0")
    line = _error_line(proc)
    assert line == "error: trainer.epochs: expected a positive integer, got 0"
    assert line in (out_dir / "bad" / "train.log").read_text()
    assert not list((out_dir / "bad").glob("*.pt"))


@pytest.mark.slow  # torchrun, two processes, ~15 s each
@pytest.mark.parametrize("case", ["rank1_val_image", "bad_override"])
def test_an_error_under_torchrun_is_printed_once(out_dir: Path, case: str) -> None:
    """rank1_val_image: only rank 1 meets an undecodable val
    image (data.validate=off; its shard is the second half of the sorted val list) while rank 0
    waits for it in a collective. Rank 0 used to print gloo's "Connection closed by peer"
    traceback, and the real cause was only in torchrun's summary, not in train.log. Now the
    rank that met the error prints it, once, and train.log keeps it. bad_override: an error
    every rank meets before the process group exists is
    printed once by rank 0; torchrun's summary points at the line instead of repeating it."""
    data = out_dir / f"data_{case}"
    _image_folder(data, ["ant", "bee"])
    bad = data / "val" / "bee" / "zz.jpg"  # sorted last: rank 1's val shard
    bad.write_bytes(b"not a JPEG" * 20)
    args = {
        "rank1_val_image": ["data.validate=off", "data.batch_size=2"],
        "bad_override": ["model.arch=resnet17"],
    }[case]
    proc = run_command(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         TRAIN, *FAST, f"run_name={case}", f"paths.output_dir={out_dir}", "data=imagenet",
         f"data.root={data}", "data.num_classes=2", "data.img_size=16", "data.workers=0", *args],
    )  # fmt: skip
    output = proc.output
    assert proc.returncode == 1, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    line = errors[0]
    if case == "rank1_val_image":
        assert line.startswith(f"error: cannot decode val image {bad} ")
        assert line.endswith("(rank 1 of 2)")
    else:
        assert line.startswith("error: model.arch: unknown arch 'resnet17'")
    message = line.removeprefix("error: ").split(" (rank")[0]
    assert output.count(message) == 1, output[-3000:]  # not again in torchrun's summary
    assert "Connection closed by peer" not in output
    # the ranks print no traceback; torchrun's own ChildFailedError is the one left
    assert output.count("Traceback (most recent call last)") <= 1
    assert "error: line printed above" in output  # the summary points at it
    log = (out_dir / case / "train.log").read_text()
    assert log.count(line) == 1
