"""A tiny learnable data set honouring the DataBundle contract, for engine tests without data/.

Images of class c are noise around a class-specific pattern; the batch order of epoch e is a
permutation seeded by (seed, e) and each image depends only on (seed, index), so
``set_epoch(e, start_step=k)`` resumes exactly at batch k.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from xvol.data.base import DataBundle


def _images(indices: Tensor, seed: int, num_classes: int, img_size: int) -> tuple[Tensor, Tensor]:
    labels = indices % num_classes
    protos = torch.randn(
        num_classes, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed)
    )
    noise = torch.stack(
        [
            torch.randn(
                3,
                img_size,
                img_size,
                generator=torch.Generator().manual_seed(seed * 100_003 + int(i)),
            )
            for i in indices
        ]
    )
    return protos[labels] + 1.5 * noise, labels


class FakeTrain:
    def __init__(self, n: int, rank: int, world: int, batch: int, seed: int, nc: int, size: int):
        self.n, self.rank, self.world, self.batch = n, rank, world, batch
        self.seed, self.nc, self.size = seed, nc, size
        self.steps = n // (world * batch)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = epoch, start_step

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        perm = torch.randperm(
            self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)
        )
        for step in range(self.start, self.steps):
            lo = (step * self.world + self.rank) * self.batch
            yield _images(perm[lo : lo + self.batch], self.seed, self.nc, self.size)


class FakeVal:
    def __init__(self, n: int, rank: int, world: int, batch: int, seed: int, nc: int, size: int):
        self.idx = torch.arange(10**6, 10**6 + n)[rank::world]
        self.batch, self.seed, self.nc, self.size = batch, seed, nc, size

    def __len__(self) -> int:
        return (len(self.idx) + self.batch - 1) // self.batch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for lo in range(0, len(self.idx), self.batch):
            yield _images(self.idx[lo : lo + self.batch], self.seed, self.nc, self.size)


def build(
    *,
    rank: int,
    world_size: int,
    device: object,
    seed: int,
    num_classes: int = 4,
    img_size: int = 16,
    batch_size: int = 8,
    num_train: int = 128,
    num_val: int = 64,
    **_: object,
) -> DataBundle:
    train = FakeTrain(num_train, rank, world_size, batch_size, seed, num_classes, img_size)
    val = FakeVal(num_val, rank, world_size, batch_size, seed, num_classes, img_size)
    return DataBundle(
        train=train,
        val=val,
        steps_per_epoch=train.steps,
        num_classes=num_classes,
        class_names=[str(c) for c in range(num_classes)],
        num_train=num_train,
        num_val=num_val,
    )
