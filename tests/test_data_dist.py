"""Sharding under torchrun (2 ranks, gloo): disjoint train shards, every val image exactly once,
for the torchvision and DALI backends, with sizes not divisible by world_size x batch_size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xvol.data.fake import write_image_tree
from xvol.data.folder import epoch_order

REPO = Path(__file__).resolve().parents[1]
TRAIN = {"n01": 9, "n02": 8, "n03": 8}  # 25 readable train images (+1 truncated, skipped)
VAL = {"n01": 5, "n02": 4, "n03": 4}  # 13 val images: 6 + 7 over 2 ranks, batch 4
BATCH = 4


@pytest.mark.slow
@pytest.mark.dali
def test_torchrun_two_ranks_shards_and_eval_coverage(tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    root = tmp_path / "tree"
    write_image_tree(root, {"train": TRAIN, "val": VAL}, kind="color", size_range=(24, 40))
    bad = root / "train" / "n02" / "broken.JPEG"  # both ranks must agree to skip it
    bad.write_bytes((root / "train" / "n02" / "img_00009.JPEG").read_bytes()[:200])
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "tests" / "dist_data_worker.py"),
        "--root",
        str(root),
        "--out",
        str(out),
        "--batch-size",
        str(BATCH),
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    num_train, num_val = sum(TRAIN.values()), sum(VAL.values())
    train_ids = set(range(num_train))
    val_ids = set(range(num_train, num_train + num_val))
    steps = num_train // (2 * BATCH)
    for backend in ("torchvision", "dali"):
        recs = [r[backend] for r in ranks]
        for rec in recs:
            assert rec["num_train"] == num_train and rec["num_val"] == num_val
            assert rec["steps_per_epoch"] == rec["len_train"] == steps
        for epoch in ("0", "1"):
            shards = [[i for batch in rec["train"][epoch] for i in batch] for rec in recs]
            assert all(len(rec["train"][epoch]) == steps for rec in recs), backend
            assert all(len(b) == BATCH for rec in recs for b in rec["train"][epoch])
            assert not set(shards[0]) & set(shards[1]), f"{backend}: ranks share train samples"
            assert set(shards[0]) | set(shards[1]) <= train_ids
            # the order is the documented one (torchvision and DALI alike)
            table = epoch_order(num_train, 2, BATCH, 7, int(epoch)).tolist()
            assert shards == table, backend
        assert recs[0]["train"]["0"] != recs[0]["train"]["1"], "epochs must reshuffle"
        eval_all = recs[0]["val_ids"] + recs[1]["val_ids"]
        assert len(eval_all) == num_val, f"{backend}: {len(eval_all)} eval samples"
        assert sorted(eval_all) == sorted(val_ids), f"{backend}: eval misses or repeats images"
        assert [len(rec["val_ids"]) for rec in recs] == [6, 7]
        assert [rec["val_batches"] for rec in recs] == [rec["len_val"] for rec in recs] == [2, 2]
