"""One rank of tests/test_data_dist.py: build each backend, record which samples it yields.

Usage (what the test runs):
    torchrun --standalone --nproc_per_node=2 tests/dist_data_worker.py \
        --root TREE --out DIR [--backends torchvision dali] [--batch-size 4]

The tree must come from xvol.data.fake.write_image_tree(kind="color"), whose flat colours encode
a sample id. Writes DIR/rank<r>.json: per backend, the ids of every train batch of epochs 0 and 1,
the ids of every eval image, and the loader lengths.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from xvol.data import dali, imagenet
from xvol.data.fake import decode_color_ids

BUILDERS = {"torchvision": imagenet.build, "dali": dali.build}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--backends", nargs="+", default=list(BUILDERS))
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    record: dict = {"rank": rank, "world_size": world}
    for backend in args.backends:
        bundle = BUILDERS[backend](
            rank=rank,
            world_size=world,
            device="cpu",
            seed=7,
            root=args.root,
            num_classes=3,
            img_size=16,
            batch_size=args.batch_size,
            workers=0,
            color_jitter=0.0,
            validate="fast",
            dali={"device": "cpu", "threads": 1},
        )
        train = {}
        for epoch in (0, 1):
            bundle.train.set_epoch(epoch)
            train[epoch] = [decode_color_ids(x) for x, _ in bundle.train]
        val_ids, val_batches = [], 0
        for x, y in bundle.val:
            assert y.dtype == torch.int64 and x.shape[0] == y.shape[0]
            val_ids += decode_color_ids(x)
            val_batches += 1
        record[backend] = {
            "train": train,
            "steps_per_epoch": bundle.steps_per_epoch,
            "len_train": len(bundle.train),
            "val_ids": val_ids,
            "val_batches": val_batches,
            "len_val": len(bundle.val),
            "num_train": bundle.num_train,
            "num_val": bundle.num_val,
        }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
